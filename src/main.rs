//! The `qlora-rs` command line: a thin layer over the library. Only this file exits the process.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use qlora_rs::device::{self, kernels, Availability, CudaDevice, DeviceRequest};

#[derive(Parser)]
#[command(
    name = "qlora-rs",
    version,
    about = "QLoRA fine-tuning of Llama-family models with handwritten CUDA kernels",
    long_about = "QLoRA fine-tuning of Llama-family models: a 4-bit NF4 base model (bit-exact with \
                  bitsandbytes) with LoRA adapters trained on top, on one GPU, through our own CUDA \
                  kernels; the CPU backend runs everything too (slowly) and is the reference."
)]
struct Cli {
    /// Where to run: `auto` (CUDA when a driver, a GPU and this build's kernels are present,
    /// else CPU), `cpu`, `cuda` or `cuda:N`.
    #[arg(long, global = true, default_value = "auto", value_parser = parse_device)]
    device: DeviceRequest,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show this build (kernels, nvcc, GPU architectures), the driver and GPUs found, and which
    /// device `--device` selects; on a GPU, run the NF4 kernels once against the CPU reference.
    Env,
}

fn parse_device(s: &str) -> Result<DeviceRequest, String> {
    s.parse().map_err(|e: qlora_rs::Error| e.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Env => env(cli.device),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn env(request: DeviceRequest) -> qlora_rs::Result<()> {
    println!("qlora-rs {}", env!("CARGO_PKG_VERSION"));
    if kernels::available() {
        let names: Vec<&str> = kernels::FATBINS.iter().map(|(s, _)| *s).collect();
        println!(
            "kernels: {} ({}), built by {}, for {}",
            names.len(),
            names.join(", "),
            kernels::NVCC_VERSION,
            kernels::CUDA_ARCHS.join(", ")
        );
    } else {
        println!("kernels: none ({})", device::NO_KERNELS);
    }
    let avail = Availability::probe();
    println!(
        "driver: {}",
        if avail.driver {
            "libcuda loaded"
        } else {
            "not found"
        }
    );
    if avail.driver {
        println!("GPUs: {}", avail.gpu_count);
        if let Some(e) = &avail.driver_error {
            println!("  cuInit: {e}");
        }
    }
    let selection = device::select(request, &avail)?;
    println!("device: {}", selection.reason);
    if let device::Device::Cuda(o) = selection.device {
        let dev = CudaDevice::get(o)?;
        let (major, minor) = dev.compute_capability()?;
        println!(
            "  {} (sm_{major}{minor}), {:.1} GiB",
            dev.name()?,
            dev.total_memory()? as f64 / (1u64 << 30) as f64
        );
        self_test(selection.device)?;
    }
    Ok(())
}

/// Runs the NF4 kernels on the selected GPU and checks their bytes against the CPU reference:
/// proves the fatbin loads and runs on this card and driver.
fn self_test(device: qlora_rs::Device) -> qlora_rs::Result<()> {
    use qlora_rs::quant::nf4::{Nf4Config, Nf4Tensor};
    use qlora_rs::{DType, Tensor};
    let n = 64 * 257 + 3;
    let w: Vec<f32> = (0..n)
        .map(|i| ((i as f32 * 0.618_034).fract() - 0.5) * (1.0 + (i % 97) as f32))
        .collect();
    let cpu_w = Tensor::from_vec(w, &[n], &qlora_rs::Device::Cpu)?;
    let cfg = Nf4Config::default();
    let cpu = Nf4Tensor::quantize(&cpu_w, cfg)?;
    let gpu = Nf4Tensor::quantize(&cpu_w.to_device(&device)?, cfg)?;
    let same_codes = cpu.packed.to_vec::<u8>()? == gpu.packed.to_vec::<u8>()?
        && cpu.absmax_f32()? == gpu.absmax_f32()?;
    let same_values = cpu.dequantize(DType::F32)?.to_vec::<f32>()?
        == gpu.dequantize(DType::F32)?.to_vec::<f32>()?;
    if same_codes && same_values {
        println!("self-test: NF4 quantize + dequantize on {device} match the CPU reference");
        Ok(())
    } else {
        Err(qlora_rs::Error::InvalidArgument(format!(
            "self-test failed: NF4 kernels on {device} differ from the CPU reference \
             (codes equal: {same_codes}, values equal: {same_values})"
        )))
    }
}
