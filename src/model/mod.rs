//! The model: configuration, the Llama decoder, LoRA adapters.

pub mod config;
pub mod llama;
pub mod lora;
