//! The model: configuration, the Llama decoder, LoRA adapters.

pub mod config;
pub mod generate;
pub mod llama;
pub mod lora;
pub mod memory;
pub mod shapes;
