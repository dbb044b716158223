//! Helpers shared by the test modules.

use std::path::PathBuf;

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

/// Whether CUDA device 0 is the simulated GPU (`scripts/sim.sh`): the real kernels run on the
/// CPU there, thousands of times slower, so tests swap their largest shapes for smaller ones
/// that still cross the same tile edges (never for speed-free cases: every odd size stays).
pub fn on_simulator() -> bool {
    qlora_rs::device::CudaDevice::get(0)
        .ok()
        .and_then(|d| d.name().ok())
        .is_some_and(|name| name.contains("simulated"))
}
