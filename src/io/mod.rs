//! Files: safetensors checkpoints (memory-mapped, sharded) and PEFT adapters.

pub mod adapters;
pub mod safetensors;
