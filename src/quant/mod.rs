//! Quantized weight formats: NF4 (bit-exact with bitsandbytes), pre-quantized bitsandbytes
//! checkpoints, and GGUF files.

pub mod bnb;
pub mod ggml_quants;
pub mod gguf;
pub mod gguf_write;
pub mod nf4;
