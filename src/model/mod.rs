//! The model: configuration, the Llama decoder, LoRA adapters, generation, memory planning,
//! GGUF import.

pub mod config;
pub mod cuda_llama;
pub mod generate;
pub mod import_gguf;
pub mod llama;
pub mod lora;
pub mod memory;
pub mod shapes;
