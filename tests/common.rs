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
