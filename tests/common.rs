//! Helpers shared by the test modules.

use std::path::PathBuf;
use std::process::{Command, Output};

/// The `qlora-rs` binary: the one cargo built, or, for test binaries copied to a GPU host, the
/// bundled `.gpu/bin/qlora-rs` next to the current directory.
pub fn qlora_bin() -> PathBuf {
    let built = PathBuf::from(env!("CARGO_BIN_EXE_qlora-rs"));
    if built.is_file() {
        return built;
    }
    let bundled = std::env::current_dir()
        .unwrap_or_default()
        .join(".gpu/bin/qlora-rs");
    if bundled.is_file() {
        bundled
    } else {
        built
    }
}

/// Runs the `qlora-rs` binary with `args`.
pub fn qlora(args: &[&str]) -> Output {
    Command::new(qlora_bin())
        .args(args)
        .output()
        .expect("run qlora-rs")
}

/// The standard output of a `qlora-rs` run that must have succeeded (else a panic with both
/// outputs).
pub fn succeeded(args: &[&str], o: &Output) -> String {
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "qlora-rs {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    stdout
}

/// Runs `qlora-rs` with `args`, which must succeed; returns its standard output.
pub fn qlora_ok(args: &[&str]) -> String {
    succeeded(args, &qlora(args))
}

/// Whether CUDA device 0 is the simulated GPU (`scripts/sim.sh`): the real kernels run on the
/// CPU there, thousands of times slower, so tests swap their largest shapes for smaller ones
/// that still cross the same tile edges (never for speed-free cases: every odd size stays).
pub fn on_simulator() -> bool {
    qlora_rs::device::CudaDevice::get(0)
        .ok()
        .and_then(|d| d.name().ok())
        .is_some_and(|name| name.contains("simulated"))
}
