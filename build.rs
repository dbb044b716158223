//! Compiles every `kernels/*.cu` into a fatbin with nvcc and embeds them.
//!
//! Output goes to `OUT_DIR` only: one `<stem>.fatbin` per kernel file and `kernels.rs`, which the
//! crate `include!`s (`src/device/kernels.rs`). nvcc is found through `NVCC`, `CUDA_HOME` /
//! `CUDA_PATH`, then `PATH`, always called by its real path (the PyPI nvcc finds its headers
//! relative to itself). Without nvcc the crate still builds, with a warning and no kernels, unless
//! `QLORA_REQUIRE_KERNELS=1`. `QLORA_CUDA_ARCHS` (e.g. `86` or `80,89,90`) overrides the SASS
//! list; PTX is always added for the lowest one so newer GPUs can JIT it.

#[path = "build/ptxas_report.rs"]
mod ptxas_report;

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const DEFAULT_ARCHS: &[u32] = &[80, 86, 89, 90, 120];

fn main() {
    for var in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "PATH",
        "QLORA_REQUIRE_KERNELS",
        "QLORA_CUDA_ARCHS",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-changed=build/ptxas_report.rs");

    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let sources = kernel_sources(Path::new("kernels"));
    let require = env::var("QLORA_REQUIRE_KERNELS").is_ok_and(|v| v == "1");

    let Some(nvcc) = find_nvcc() else {
        if require {
            panic!(
                "QLORA_REQUIRE_KERNELS=1 but no nvcc was found (looked at $NVCC, $CUDA_HOME/bin, \
                 $CUDA_PATH/bin and PATH). Run scripts/install-nvcc.sh and export the NVCC it prints."
            );
        }
        println!(
            "cargo:warning=qlora-rs: no nvcc found, building WITHOUT GPU kernels (the CUDA device will \
             refuse to start). Run scripts/install-nvcc.sh and set NVCC to build them."
        );
        write_index(&out_dir, &[], "", &[]);
        return;
    };

    let archs = cuda_archs();
    let version = nvcc_version(&nvcc);
    let compiled: Vec<(String, PathBuf, String)> = std::thread::scope(|scope| {
        let handles: Vec<_> = sources
            .iter()
            .map(|src| scope.spawn(|| compile(&nvcc, src, &archs, &out_dir)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("nvcc thread panicked"))
            .collect()
    });

    for (stem, _, report) in &compiled {
        for u in ptxas_report::local_memory_uses(report) {
            println!(
                "cargo:warning=kernel `{}` ({stem}.cu, {}) uses local memory: {} bytes stack frame, \
                 {} bytes spill stores, {} bytes spill loads",
                u.kernel, u.arch, u.stack_frame_bytes, u.spill_store_bytes, u.spill_load_bytes
            );
        }
    }
    let fatbins: Vec<(String, PathBuf)> = compiled.into_iter().map(|(s, p, _)| (s, p)).collect();
    write_index(&out_dir, &fatbins, &version, &archs);
}

/// Every `.cu` (compiled) and `.cuh` (tracked for rebuilds) under `dir`, sorted.
fn kernel_sources(dir: &Path) -> Vec<PathBuf> {
    let mut cu = Vec::new();
    let entries =
        fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("readable kernels/ entry").path();
        match path.extension().and_then(|e| e.to_str()) {
            Some("cu") => {
                println!("cargo:rerun-if-changed={}", path.display());
                cu.push(path);
            }
            Some("cuh") => println!("cargo:rerun-if-changed={}", path.display()),
            _ => {}
        }
    }
    cu.sort();
    cu
}

fn find_nvcc() -> Option<PathBuf> {
    if let Some(nvcc) = env::var_os("NVCC") {
        let path = PathBuf::from(nvcc);
        if !path.is_file() {
            panic!("NVCC={} is not a file", path.display());
        }
        return Some(fs::canonicalize(&path).unwrap_or(path));
    }
    let roots = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(env::var_os)
        .map(|root| PathBuf::from(root).join("bin"));
    let path_dirs = env::var_os("PATH")
        .map(|p| env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    roots
        .chain(path_dirs)
        .map(|dir| dir.join("nvcc"))
        .find(|candidate| candidate.is_file())
        .map(|nvcc| fs::canonicalize(&nvcc).unwrap_or(nvcc))
}

fn cuda_archs() -> Vec<u32> {
    let Ok(list) = env::var("QLORA_CUDA_ARCHS") else {
        return DEFAULT_ARCHS.to_vec();
    };
    let mut archs: Vec<u32> = list
        .split([',', ' ', ';'])
        .filter(|s| !s.is_empty())
        .map(|s| {
            let digits = s
                .trim()
                .trim_start_matches("sm_")
                .trim_start_matches("compute_");
            digits.parse::<u32>().unwrap_or_else(|_| {
                panic!("QLORA_CUDA_ARCHS: `{s}` is not an architecture like 86 or sm_86")
            })
        })
        .collect();
    archs.sort_unstable();
    archs.dedup();
    if archs.is_empty() || archs[0] < 80 {
        panic!("QLORA_CUDA_ARCHS={list}: need at least one architecture, all >= 80 (cp.async and bf16 mma.sync need sm_80)");
    }
    archs
}

fn nvcc_version(nvcc: &Path) -> String {
    let out = Command::new(nvcc)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", nvcc.display()));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.contains("release"))
        .unwrap_or("unknown")
        .trim()
        .to_string()
}

/// Compiles one `.cu` into `<out>/<stem>.fatbin`; returns (stem, path, ptxas report).
fn compile(nvcc: &Path, src: &Path, archs: &[u32], out_dir: &Path) -> (String, PathBuf, String) {
    let stem = src.file_stem().unwrap().to_string_lossy().into_owned();
    let out = out_dir.join(format!("{stem}.fatbin"));
    let mut cmd = Command::new(nvcc);
    // Compressed fatbins (the driver inflates them at load): about 6× smaller binaries.
    cmd.args([
        "--fatbin",
        "-O3",
        "-std=c++17",
        "--threads",
        "0",
        "-Xptxas",
        "-v",
        "-Xfatbin=-compress-all",
    ])
    .arg("-I")
    .arg("kernels")
    // The source file's name in every fatbin entry (cuobjdump's "identifier"; a driver ignores
    // it): the simulated GPU's driver stand-in maps a loaded image to its host-compiled kernels.
    .arg(format!("-Xfatbin=--ident={stem}.cu"));
    for a in archs {
        cmd.arg(format!("-gencode=arch=compute_{a},code=sm_{a}"));
    }
    let ptx = archs[0];
    cmd.arg(format!("-gencode=arch=compute_{ptx},code=compute_{ptx}"));
    cmd.arg("-o").arg(&out).arg(src);
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", nvcc.display()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        eprintln!("{stdout}{stderr}");
        panic!(
            "nvcc failed to compile {} (its messages are above)",
            src.display()
        );
    }
    (stem, out, format!("{stdout}{stderr}"))
}

/// Writes `kernels.rs`: the embedded fatbins, the nvcc that made them and the arch list.
fn write_index(out_dir: &Path, fatbins: &[(String, PathBuf)], nvcc: &str, archs: &[u32]) {
    let mut src = String::new();
    src.push_str(
        "/// (kernel file stem, fatbin bytes) for every `kernels/*.cu`, compiled by build.rs.\n",
    );
    src.push_str("pub static FATBINS: &[(&str, &[u8])] = &[\n");
    for (stem, path) in fatbins {
        writeln!(
            src,
            "    ({stem:?}, include_bytes!({:?})),",
            path.display().to_string()
        )
        .unwrap();
    }
    src.push_str("];\n");
    writeln!(
        src,
        "/// `nvcc --version` of the compiler that built them (empty: built without nvcc)."
    )
    .unwrap();
    writeln!(src, "pub const NVCC_VERSION: &str = {nvcc:?};").unwrap();
    let list: Vec<String> = archs.iter().map(|a| format!("sm_{a}")).collect();
    writeln!(
        src,
        "/// SASS architectures in each fatbin (plus PTX for the first)."
    )
    .unwrap();
    writeln!(src, "pub const CUDA_ARCHS: &[&str] = &{list:?};").unwrap();
    fs::write(out_dir.join("kernels.rs"), src).expect("write kernels.rs to OUT_DIR");
}
