//! Devices: where tensors live and ops run.
//!
//! `Device::Cpu` is the complete f32 reference backend; `Device::Cuda(ordinal)` runs our kernels.
//! [`select`] turns the user's `--device auto|cpu|cuda[:N]` into a device and says why, without
//! ever panicking: cudarc panics when `libcuda` is missing, so the driver's presence is checked
//! (`is_culib_present`) before any CUDA call.

pub mod cpu;
pub mod cuda;
mod kernel_table;
pub mod kernels;

pub use cpu::CpuStorage;
pub use cuda::CudaDevice;

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// A device that tensors live on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    /// Host memory; ops run the f32 reference.
    Cpu,
    /// The GPU with this CUDA ordinal; ops run our kernels.
    Cuda(usize),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(o) => write!(f, "cuda:{o}"),
        }
    }
}

/// What the user asked for with `--device`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeviceRequest {
    /// CUDA when a driver, a GPU and kernels are present, else CPU.
    #[default]
    Auto,
    /// `cpu`: always the CPU.
    Cpu,
    /// `cuda`, `gpu` (ordinal 0) or `cuda:N`: that GPU, or an error when it cannot be used.
    Cuda(usize),
}

impl FromStr for DeviceRequest {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(DeviceRequest::Auto),
            "cpu" => Ok(DeviceRequest::Cpu),
            "cuda" | "gpu" => Ok(DeviceRequest::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceRequest::Cuda)
                .ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "unknown device `{s}`: expected auto, cpu, cuda or cuda:N"
                    ))
                }),
        }
    }
}

/// What this process can use, probed without panicking.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Availability {
    /// The build carries compiled kernels.
    pub kernels: bool,
    /// `libcuda` can be loaded.
    pub driver: bool,
    /// GPUs the driver reports (0 when there is no driver or `cuInit` failed).
    pub gpu_count: usize,
    /// Why the driver reports no GPU, when it failed.
    pub driver_error: Option<String>,
}

/// Why CUDA is unusable when the build has no compiled kernels.
pub const NO_KERNELS: &str = "this build has no GPU kernels: install nvcc (see README) and rebuild";
/// Why CUDA is unusable when `libcuda` cannot be loaded.
pub const NO_DRIVER: &str =
    "no NVIDIA driver: libcuda could not be loaded (the CUDA device needs the NVIDIA driver)";

impl Availability {
    /// Looks at this build and this machine.
    pub fn probe() -> Availability {
        let kernels = kernels::available();
        let driver = cuda::driver_present();
        let (gpu_count, driver_error) = if driver {
            match cudarc::driver::CudaContext::device_count() {
                Ok(n) => (n.max(0) as usize, None),
                Err(e) => (0, Some(e.to_string())),
            }
        } else {
            (0, None)
        };
        Availability {
            kernels,
            driver,
            gpu_count,
            driver_error,
        }
    }

    /// Why CUDA device `ordinal` cannot be used, or `None` if it can.
    pub fn cuda_unavailable_reason(&self, ordinal: usize) -> Option<String> {
        if !self.kernels {
            return Some(NO_KERNELS.to_string());
        }
        if !self.driver {
            return Some(NO_DRIVER.to_string());
        }
        if self.gpu_count == 0 {
            return Some(match &self.driver_error {
                Some(e) => format!("the NVIDIA driver found no usable GPU ({e})"),
                None => "the NVIDIA driver reports no GPU".to_string(),
            });
        }
        if ordinal >= self.gpu_count {
            return Some(format!(
                "cuda:{ordinal} was asked for but the driver reports {} GPU(s) (cuda:0..cuda:{})",
                self.gpu_count,
                self.gpu_count - 1
            ));
        }
        None
    }
}

/// The chosen device and a sentence saying why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selection {
    /// The device to run on.
    pub device: Device,
    /// How it was chosen, for the log, e.g. `cpu (auto: no NVIDIA driver: …)`.
    pub reason: String,
}

/// Resolves a request against what is available. `Auto` never fails; an explicit `Cuda` that
/// cannot be served is an error with one clear line.
pub fn select(request: DeviceRequest, avail: &Availability) -> Result<Selection> {
    match request {
        DeviceRequest::Cpu => Ok(Selection {
            device: Device::Cpu,
            reason: "cpu (asked for)".to_string(),
        }),
        DeviceRequest::Cuda(o) => match avail.cuda_unavailable_reason(o) {
            Some(why) => Err(Error::CudaUnavailable(format!("--device cuda:{o}: {why}"))),
            None => Ok(Selection {
                device: Device::Cuda(o),
                reason: format!("cuda:{o} (asked for)"),
            }),
        },
        DeviceRequest::Auto => match avail.cuda_unavailable_reason(0) {
            Some(why) => Ok(Selection {
                device: Device::Cpu,
                reason: format!("cpu (auto: {why})"),
            }),
            None => Ok(Selection {
                device: Device::Cuda(0),
                reason: "cuda:0 (auto: driver, GPU and kernels present)".to_string(),
            }),
        },
    }
}
