//! The `ptxas -v` report parser that build.rs uses to warn about kernels touching local memory.

#[path = "../build/ptxas_report.rs"]
mod ptxas_report;

use ptxas_report::{local_memory_uses, LocalMemoryUse};

/// Real nvcc 13.0 output (`nvcc --fatbin -Xptxas -v`) for one clean and one stack-using kernel.
const REPORT: &str = "\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'fine' for 'sm_90'
ptxas info    : Function properties for fine
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 10 registers, used 0 barriers
ptxas info    : Compiling entry function 'spill_me' for 'sm_90'
ptxas info    : Function properties for spill_me
    256 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers, 256 bytes cumulative stack size
ptxas info    : Compiling entry function 'spill_me' for 'sm_80'
ptxas info    : Function properties for spill_me
    264 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 255 registers, used 0 barriers, 364 bytes cmem[0]
ptxas info    : Compiling entry function 'old_style' for 'sm_86'
ptxas info    : Used 40 registers, 16 bytes lmem, 360 bytes cmem[0]
";

#[test]
fn ptxas_report_names_kernels_that_use_local_memory() {
    let uses = local_memory_uses(REPORT);
    assert_eq!(
        uses,
        vec![
            LocalMemoryUse {
                kernel: "spill_me".into(),
                arch: "sm_90".into(),
                stack_frame_bytes: 256,
                spill_store_bytes: 0,
                spill_load_bytes: 0,
            },
            LocalMemoryUse {
                kernel: "spill_me".into(),
                arch: "sm_80".into(),
                stack_frame_bytes: 264,
                spill_store_bytes: 8,
                spill_load_bytes: 12,
            },
            LocalMemoryUse {
                kernel: "old_style".into(),
                arch: "sm_86".into(),
                stack_frame_bytes: 16,
                spill_store_bytes: 0,
                spill_load_bytes: 0,
            },
        ]
    );
}

#[test]
fn ptxas_report_of_clean_kernels_is_empty() {
    let clean = "ptxas info    : Compiling entry function 'a' for 'sm_80'\n    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n";
    assert!(local_memory_uses(clean).is_empty());
}
