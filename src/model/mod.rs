//! The model: configuration, the Llama decoder, LoRA adapters, generation, memory planning,
//! GGUF import.

pub mod adapters;
pub mod config;
pub mod export_gguf;
pub mod generate;
pub mod import_gguf;
pub mod llama;
pub mod lora;
pub mod memory;
pub mod shapes;
