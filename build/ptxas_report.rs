//! Reads the `ptxas -v` report that nvcc prints with `-Xptxas -v` and finds the kernels that use
//! local memory (a stack frame) or spill registers. Shared by `build.rs` (which turns each finding
//! into a `cargo:warning`) and the integration tests (which check the parser on real nvcc output).

/// One kernel, for one GPU architecture, that touches local memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalMemoryUse {
    pub kernel: String,
    pub arch: String,
    pub stack_frame_bytes: u64,
    pub spill_store_bytes: u64,
    pub spill_load_bytes: u64,
}

/// Parses the report. ptxas writes, per entry function and architecture:
/// ```text
/// ptxas info    : Compiling entry function 'name' for 'sm_80'
/// ptxas info    : Function properties for name
///     256 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads
/// ```
/// (older releases also print `N bytes lmem` on the `Used .. registers` line).
pub fn local_memory_uses(report: &str) -> Vec<LocalMemoryUse> {
    let mut found: Vec<LocalMemoryUse> = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in report.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let mut parts = rest.split('\'');
            let kernel = parts.next().unwrap_or_default().to_string();
            let arch = parts.nth(1).unwrap_or_default().to_string();
            current = Some((kernel, arch));
            continue;
        }
        let Some((kernel, arch)) = current.as_ref() else {
            continue;
        };
        let stack = number_before(line, "bytes stack frame");
        let stores = number_before(line, "bytes spill stores");
        let loads = number_before(line, "bytes spill loads");
        let lmem = number_before(line, "bytes lmem");
        let (stack, stores, loads) = (stack.max(lmem), stores, loads);
        if stack + stores + loads > 0 {
            match found
                .iter_mut()
                .find(|u| &u.kernel == kernel && &u.arch == arch)
            {
                Some(u) => {
                    u.stack_frame_bytes = u.stack_frame_bytes.max(stack);
                    u.spill_store_bytes = u.spill_store_bytes.max(stores);
                    u.spill_load_bytes = u.spill_load_bytes.max(loads);
                }
                None => found.push(LocalMemoryUse {
                    kernel: kernel.clone(),
                    arch: arch.clone(),
                    stack_frame_bytes: stack,
                    spill_store_bytes: stores,
                    spill_load_bytes: loads,
                }),
            }
        }
    }
    found
}

/// The integer just before `marker` in `line` (0 when the marker is absent).
fn number_before(line: &str, marker: &str) -> u64 {
    let Some(at) = line.find(marker) else {
        return 0;
    };
    line[..at]
        .trim_end()
        .rsplit(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|digits| digits.parse().ok())
        .unwrap_or(0)
}
