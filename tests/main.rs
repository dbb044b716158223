//! The integration tests: one binary (so the GPU bundle stays small), one module per area.

mod cli;
mod cli_cuda;
mod common;
mod cuda_step;
mod data;
mod device;
mod e2e;
mod export;
mod export_gguf;
mod flash;
mod gemm;
mod gemma;
mod gguf;
mod gguf_quants;
mod gguf_qwen;
mod harness;
mod kernels;
mod llama;
mod nf4;
mod ops;
mod plot;
mod ptxas;
mod refusals;
mod tape;
mod train;
mod trainer;
