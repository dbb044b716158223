pub mod bnb;
pub mod gguf;
pub mod nf4;
