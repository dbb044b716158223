//! The model: configuration, the Llama decoder, LoRA adapters, GGUF import.

pub mod config;
pub mod import_gguf;
pub mod llama;
pub mod lora;
