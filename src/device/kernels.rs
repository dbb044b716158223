//! The fatbins that `build.rs` compiled from `kernels/*.cu`, embedded in the binary.

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// The fatbin compiled from `kernels/<stem>.cu`, if this build has GPU kernels.
pub fn fatbin(stem: &str) -> Option<&'static [u8]> {
    FATBINS.iter().find(|(s, _)| *s == stem).map(|(_, b)| *b)
}

/// Whether this build was compiled with nvcc (and so carries GPU kernels).
pub fn available() -> bool {
    !FATBINS.is_empty()
}
