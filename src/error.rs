//! The library's one error type. Every fallible public function returns [`Result`]; only the
//! binary's `main` turns an error into an exit code.

use std::path::PathBuf;

/// `std::result::Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Every error the library returns; its `Display` is the message the binary prints.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// CUDA was asked for but cannot be used here (no kernels in this build, no driver, no GPU).
    #[error("{0}")]
    CudaUnavailable(String),

    /// A CUDA driver call failed; `op` says which step of ours made it.
    #[error("CUDA error in {op}: {source}")]
    Cuda {
        /// Our step that made the call, plus the suspect kernels after a fault.
        op: String,
        /// The driver's error.
        #[source]
        source: cudarc::driver::DriverError,
    },

    /// A tensor had the wrong shape for an op.
    #[error("{op}: expected shape {expected}, got {got}")]
    ShapeMismatch {
        /// The op that checked.
        op: &'static str,
        /// The shape it needed, or a description of it.
        expected: String,
        /// The shape (or element count) it was given.
        got: String,
    },

    /// A tensor had a dtype the op cannot take.
    #[error("{op}: unsupported dtype {got} (expected {expected})")]
    DTypeMismatch {
        /// The op that checked.
        op: &'static str,
        /// What it takes (a dtype, often with the operand's name).
        expected: String,
        /// The dtype (or conversion) it was given.
        got: String,
    },

    /// Two tensors of one op live on different devices.
    #[error("{op}: tensors on different devices ({a} and {b})")]
    DeviceMismatch {
        /// The op that checked.
        op: &'static str,
        /// One tensor's device (e.g. `cuda:0`).
        a: String,
        /// The other tensor's device.
        b: String,
    },

    /// A value outside what an op or a format allows.
    #[error("{0}")]
    InvalidArgument(String),

    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// A file was read but its content is not what was expected.
    #[error("{}: {msg}", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
}

impl Error {
    /// Wraps a driver error with the name of the step that made the call. A kernel fault
    /// surfaces at whichever call comes next, so its error also names the kernels launched since
    /// the last synchronisation (see `device::cuda`).
    pub fn cuda(op: impl Into<String>) -> impl FnOnce(cudarc::driver::DriverError) -> Error {
        // Converted only on an error: a launch or an allocation that succeeds builds no string.
        move |source| {
            let op = op.into();
            let op = match crate::device::cuda::fault_suspects(&source) {
                Some(suspects) => format!("{op} ({suspects})"),
                None => op,
            };
            Error::Cuda { op, source }
        }
    }

    /// [`Error::cuda`] whose message is formatted only when there is an error (for the calls made
    /// on every launch or allocation, whose messages name sizes or kernels).
    pub fn cuda_with(
        op: impl FnOnce() -> String,
    ) -> impl FnOnce(cudarc::driver::DriverError) -> Error {
        move |source| Error::cuda(op())(source)
    }
}
