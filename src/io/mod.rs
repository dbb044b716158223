//! Files: safetensors checkpoints (memory-mapped, sharded; a streaming writer), PEFT adapters,
//! and model export (merge, bitsandbytes quantization).

pub mod adapters;
pub mod export;
pub mod safetensors;
pub mod writer;
