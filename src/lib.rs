//! qlora-rs: QLoRA fine-tuning of Llama-family models, with handwritten CUDA kernels.
//!
//! The frozen base model is stored as 4-bit NF4 (bit-exact with bitsandbytes, [`quant::nf4`]);
//! small LoRA adapters train on top of it. Every op has a CPU reference (f32) and a CUDA kernel
//! (`kernels/*.cu`) that is checked against it. See `docs/ARCHITECTURE.md` for the design and
//! the README for the layout.

#![warn(missing_docs)]

pub mod autograd;
pub mod data;
pub mod device;
pub mod error;
pub mod io;
pub mod model;
pub mod ops;
pub mod quant;
pub mod tensor;
pub mod testing;
pub mod train;

pub use device::{Device, DeviceRequest};
pub use error::{Error, Result};
pub use tensor::{DType, Tensor};
