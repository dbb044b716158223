//! `Tensor`: a contiguous, row-major array of one dtype on one device.
//!
//! Deliberately small: ops take tensors, check shape/dtype/device at entry and dispatch to the CPU
//! reference or the CUDA launcher. There are no strides or views; a tensor owns its storage.

use half::{bf16, f16};

use crate::device::cuda::{CudaDevice, CudaStorage};
use crate::device::{CpuStorage, Device};
use crate::error::{Error, Result};

/// Element types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit IEEE float: the CPU reference's dtype, and the adapters' master weights and
    /// gradients on a GPU.
    F32,
    /// bfloat16: frozen weights and activations on a GPU.
    BF16,
    /// IEEE half.
    F16,
    /// Bytes: packed NF4 codes and quantized absmax indices.
    U8,
    /// 32-bit signed integers: token ids and positions handed to the kernels.
    I32,
}

impl DType {
    /// Bytes per element.
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::BF16 | DType::F16 => 2,
            DType::U8 => 1,
        }
    }

    /// Whether the type is f32, bf16 or f16.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::BF16 | DType::F16)
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::U8 => "u8",
            DType::I32 => "i32",
        })
    }
}

/// Rust element types that a [`Tensor`] can hold.
pub trait Element:
    bytemuck::Pod + cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits + Send + Sync
{
    /// The [`DType`] this Rust type stores as.
    const DTYPE: DType;
    /// Wraps a vector as CPU storage, without copying.
    fn into_cpu(data: Vec<Self>) -> CpuStorage;
    /// The values of CPU storage of this type (`None` for another dtype).
    fn cpu_slice(s: &CpuStorage) -> Option<&[Self]>;
    /// Mutable [`Element::cpu_slice`].
    fn cpu_slice_mut(s: &mut CpuStorage) -> Option<&mut [Self]>;
    /// Wraps a device buffer as CUDA storage, without copying.
    fn into_cuda(data: cudarc::driver::CudaSlice<Self>) -> CudaStorage;
    /// The device buffer of CUDA storage of this type (`None` for another dtype).
    fn cuda_slice(s: &CudaStorage) -> Option<&cudarc::driver::CudaSlice<Self>>;
    /// Mutable [`Element::cuda_slice`].
    fn cuda_slice_mut(s: &mut CudaStorage) -> Option<&mut cudarc::driver::CudaSlice<Self>>;
}

macro_rules! element {
    ($t:ty, $variant:ident) => {
        impl Element for $t {
            const DTYPE: DType = DType::$variant;
            fn into_cpu(data: Vec<Self>) -> CpuStorage {
                CpuStorage::$variant(data)
            }
            fn cpu_slice(s: &CpuStorage) -> Option<&[Self]> {
                match s {
                    CpuStorage::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn cpu_slice_mut(s: &mut CpuStorage) -> Option<&mut [Self]> {
                match s {
                    CpuStorage::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn into_cuda(data: cudarc::driver::CudaSlice<Self>) -> CudaStorage {
                CudaStorage::$variant(data)
            }
            fn cuda_slice(s: &CudaStorage) -> Option<&cudarc::driver::CudaSlice<Self>> {
                match s {
                    CudaStorage::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn cuda_slice_mut(s: &mut CudaStorage) -> Option<&mut cudarc::driver::CudaSlice<Self>> {
                match s {
                    CudaStorage::$variant(v) => Some(v),
                    _ => None,
                }
            }
        }
    };
}
element!(f32, F32);
element!(bf16, BF16);
element!(f16, F16);
element!(u8, U8);
element!(i32, I32);

/// Where a tensor's bytes live.
#[derive(Debug)]
pub enum Storage {
    /// Host memory, a `Vec` per dtype.
    Cpu(CpuStorage),
    /// Device memory on one GPU.
    Cuda(CudaStorage),
}

/// A contiguous row-major tensor.
#[derive(Debug)]
pub struct Tensor {
    storage: Storage,
    shape: Vec<usize>,
    device: Device,
}

pub(crate) fn shape_str(shape: &[usize]) -> String {
    format!("{shape:?}")
}

impl Tensor {
    /// A tensor holding `data` with `shape`, placed on `device`.
    pub fn from_vec<T: Element>(data: Vec<T>, shape: &[usize], device: &Device) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(Error::ShapeMismatch {
                op: "Tensor::from_vec",
                expected: format!("{} elements for shape {}", n, shape_str(shape)),
                got: format!("{} elements", data.len()),
            });
        }
        let cpu = Tensor {
            storage: Storage::Cpu(T::into_cpu(data)),
            shape: shape.to_vec(),
            device: Device::Cpu,
        };
        match device {
            // The vector becomes the storage: no copy.
            Device::Cpu => Ok(cpu),
            Device::Cuda(_) => cpu.to_device(device),
        }
    }

    /// A tensor for a kernel to overwrite whole: on a GPU its memory is not cleared (what it
    /// holds is unspecified), on the CPU it is zeros. Only for outputs whose kernel writes every
    /// element (the simulated GPU reports a read of any element that was never written);
    /// accumulators take [`Tensor::zeros`].
    pub(crate) fn uninit(shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let storage = match device {
            Device::Cpu => Storage::Cpu(CpuStorage::zeros(dtype, n)),
            Device::Cuda(ordinal) => {
                Storage::Cuda(CudaDevice::get(*ordinal)?.alloc_uninit(dtype, n)?)
            }
        };
        Ok(Tensor {
            storage,
            shape: shape.to_vec(),
            device: *device,
        })
    }

    /// A zero-filled tensor.
    pub fn zeros(shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let storage = match device {
            Device::Cpu => Storage::Cpu(CpuStorage::zeros(dtype, n)),
            Device::Cuda(ordinal) => {
                Storage::Cuda(CudaDevice::get(*ordinal)?.alloc_zeros(dtype, n)?)
            }
        };
        Ok(Tensor {
            storage,
            shape: shape.to_vec(),
            device: *device,
        })
    }

    /// Dimensions, outermost first (row-major).
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements (the product of the shape; 1 for a scalar `[]`).
    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }

    /// Element type of the storage.
    pub fn dtype(&self) -> DType {
        match &self.storage {
            Storage::Cpu(s) => s.dtype(),
            Storage::Cuda(s) => s.dtype(),
        }
    }

    /// The device the storage lives on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The underlying buffer, for ops that dispatch on it.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The same values, shape changed (element counts must agree).
    pub fn reshape(mut self, shape: &[usize]) -> Result<Tensor> {
        if shape.iter().product::<usize>() != self.elem_count() {
            return Err(Error::ShapeMismatch {
                op: "Tensor::reshape",
                expected: format!("{} elements", self.elem_count()),
                got: format!("shape {}", shape_str(shape)),
            });
        }
        self.shape = shape.to_vec();
        Ok(self)
    }

    /// Changes the shape in place (element counts must agree); no data moves.
    pub fn reshape_in_place(&mut self, shape: &[usize]) -> Result<()> {
        if shape.iter().product::<usize>() != self.elem_count() {
            return Err(Error::ShapeMismatch {
                op: "Tensor::reshape_in_place",
                expected: format!("{} elements", self.elem_count()),
                got: format!("shape {}", shape_str(shape)),
            });
        }
        self.shape = shape.to_vec();
        Ok(())
    }

    /// A copy on `device` (host↔device, device↔device or host↔host).
    pub fn to_device(&self, device: &Device) -> Result<Tensor> {
        let storage = match (&self.storage, device) {
            (Storage::Cpu(s), Device::Cpu) => Storage::Cpu(s.clone()),
            (Storage::Cpu(s), Device::Cuda(o)) => Storage::Cuda(CudaDevice::get(*o)?.upload(s)?),
            (Storage::Cuda(s), Device::Cpu) => Storage::Cpu(s.download()?),
            (Storage::Cuda(s), Device::Cuda(o)) => {
                let dev = CudaDevice::get(*o)?;
                if s.ordinal() == *o {
                    Storage::Cuda(dev.copy(s)?)
                } else {
                    Storage::Cuda(dev.upload(&s.download()?)?)
                }
            }
        };
        Ok(Tensor {
            storage,
            shape: self.shape.clone(),
            device: *device,
        })
    }

    /// The values, copied to the host. Fails if `T` is not the tensor's dtype.
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        let wrong = || Error::DTypeMismatch {
            op: "Tensor::to_vec",
            expected: self.dtype().to_string(),
            got: T::DTYPE.to_string(),
        };
        match &self.storage {
            Storage::Cpu(s) => T::cpu_slice(s).map(|v| v.to_vec()).ok_or_else(wrong),
            Storage::Cuda(s) => {
                let slice = T::cuda_slice(s).ok_or_else(wrong)?;
                slice
                    .stream()
                    .clone_dtoh(slice)
                    .map_err(Error::cuda("Tensor::to_vec (device to host copy)"))
            }
        }
    }

    /// The host slice of a CPU tensor of dtype `T`.
    pub fn cpu_slice<T: Element>(&self, op: &'static str) -> Result<&[T]> {
        match &self.storage {
            Storage::Cpu(s) => T::cpu_slice(s).ok_or_else(|| Error::DTypeMismatch {
                op,
                expected: T::DTYPE.to_string(),
                got: self.dtype().to_string(),
            }),
            Storage::Cuda(_) => Err(Error::InvalidArgument(format!(
                "{op}: expected a CPU tensor, got one on {}",
                self.device
            ))),
        }
    }

    /// The mutable host slice of a CPU tensor of dtype `T`.
    pub fn cpu_slice_mut<T: Element>(&mut self, op: &'static str) -> Result<&mut [T]> {
        let (dtype, device) = (self.dtype(), self.device);
        match &mut self.storage {
            Storage::Cpu(s) => T::cpu_slice_mut(s).ok_or_else(|| Error::DTypeMismatch {
                op,
                expected: T::DTYPE.to_string(),
                got: dtype.to_string(),
            }),
            Storage::Cuda(_) => Err(Error::InvalidArgument(format!(
                "{op}: expected a CPU tensor, got one on {device}"
            ))),
        }
    }

    /// The device slice of a CUDA tensor of dtype `T`.
    pub fn cuda_slice<T: Element>(
        &self,
        op: &'static str,
    ) -> Result<&cudarc::driver::CudaSlice<T>> {
        match &self.storage {
            Storage::Cuda(s) => T::cuda_slice(s).ok_or_else(|| Error::DTypeMismatch {
                op,
                expected: T::DTYPE.to_string(),
                got: self.dtype().to_string(),
            }),
            Storage::Cpu(_) => Err(Error::InvalidArgument(format!(
                "{op}: expected a CUDA tensor, got one on cpu"
            ))),
        }
    }

    /// The raw device address of a CUDA tensor (0 for a CPU tensor), for building views (e.g.
    /// [`crate::ops::gemm::DevMat`]) into a larger buffer. The tensor must outlive every use.
    pub fn device_address(&self) -> u64 {
        self.device_ptr()
    }

    /// The raw device address of a CUDA tensor (0 for a CPU tensor), for parameter structs.
    pub(crate) fn device_ptr(&self) -> u64 {
        match &self.storage {
            Storage::Cuda(s) => s.device_ptr(),
            Storage::Cpu(_) => 0,
        }
    }

    /// The mutable device slice of a CUDA tensor of dtype `T`.
    pub fn cuda_slice_mut<T: Element>(
        &mut self,
        op: &'static str,
    ) -> Result<&mut cudarc::driver::CudaSlice<T>> {
        let dtype = self.dtype();
        match &mut self.storage {
            Storage::Cuda(s) => T::cuda_slice_mut(s).ok_or_else(|| Error::DTypeMismatch {
                op,
                expected: T::DTYPE.to_string(),
                got: dtype.to_string(),
            }),
            Storage::Cpu(_) => Err(Error::InvalidArgument(format!(
                "{op}: expected a CUDA tensor, got one on cpu"
            ))),
        }
    }
}
