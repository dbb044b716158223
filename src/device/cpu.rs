//! Host storage: one `Vec` per dtype.

use half::{bf16, f16};

use crate::tensor::DType;

/// The values of a CPU tensor, by dtype.
#[derive(Clone, Debug, PartialEq)]
pub enum CpuStorage {
    /// [`DType::F32`] values.
    F32(Vec<f32>),
    /// [`DType::BF16`] values.
    BF16(Vec<bf16>),
    /// [`DType::F16`] values.
    F16(Vec<f16>),
    /// [`DType::U8`] values.
    U8(Vec<u8>),
    /// [`DType::I32`] values.
    I32(Vec<i32>),
}

impl CpuStorage {
    /// `n` zeros of `dtype`.
    pub fn zeros(dtype: DType, n: usize) -> CpuStorage {
        match dtype {
            DType::F32 => CpuStorage::F32(vec![0.0; n]),
            DType::BF16 => CpuStorage::BF16(vec![bf16::ZERO; n]),
            DType::F16 => CpuStorage::F16(vec![f16::ZERO; n]),
            DType::U8 => CpuStorage::U8(vec![0; n]),
            DType::I32 => CpuStorage::I32(vec![0; n]),
        }
    }

    /// The element type held.
    pub fn dtype(&self) -> DType {
        match self {
            CpuStorage::F32(_) => DType::F32,
            CpuStorage::BF16(_) => DType::BF16,
            CpuStorage::F16(_) => DType::F16,
            CpuStorage::U8(_) => DType::U8,
            CpuStorage::I32(_) => DType::I32,
        }
    }

    /// Number of elements (not bytes).
    pub fn len(&self) -> usize {
        match self {
            CpuStorage::F32(v) => v.len(),
            CpuStorage::BF16(v) => v.len(),
            CpuStorage::F16(v) => v.len(),
            CpuStorage::U8(v) => v.len(),
            CpuStorage::I32(v) => v.len(),
        }
    }

    /// Whether it holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
