//! Element types and borrowed tensor views. Half-precision values travel as their raw `u16` bits.

use crate::error::{Error, Result};

/// The floating-point type of the original tensor (and the default type of the decoded one).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DType {
    F16 = 1,
    BF16 = 2,
    F32 = 3,
    F64 = 4,
}

impl DType {
    pub fn from_code(code: u8) -> Result<DType> {
        Ok(match code {
            1 => DType::F16,
            2 => DType::BF16,
            3 => DType::F32,
            4 => DType::F64,
            _ => return Err(Error::Malformed(format!("unknown dtype code {code}"))),
        })
    }

    /// The name numpy and torch use: "float16", "bfloat16", "float32", "float64".
    pub fn name(self) -> &'static str {
        match self {
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::F32 => "float32",
            DType::F64 => "float64",
        }
    }

    pub fn from_name(name: &str) -> Result<DType> {
        Ok(match name {
            "float16" | "f16" | "half" => DType::F16,
            "bfloat16" | "bf16" => DType::BF16,
            "float32" | "f32" | "float" => DType::F32,
            "float64" | "f64" | "double" => DType::F64,
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "unsupported dtype {name:?}; use float16, bfloat16, float32 or float64"
                )))
            }
        })
    }

    pub fn size(self) -> usize {
        match self {
            DType::F16 | DType::BF16 => 2,
            DType::F32 => 4,
            DType::F64 => 8,
        }
    }
}

/// A borrowed, contiguous, row-major tensor.
#[derive(Clone, Copy, Debug)]
pub enum Tensor<'a> {
    F16(&'a [u16]),
    BF16(&'a [u16]),
    F32(&'a [f32]),
    F64(&'a [f64]),
}

impl Tensor<'_> {
    pub fn len(&self) -> usize {
        match self {
            Tensor::F16(s) | Tensor::BF16(s) => s.len(),
            Tensor::F32(s) => s.len(),
            Tensor::F64(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dtype(&self) -> DType {
        match self {
            Tensor::F16(_) => DType::F16,
            Tensor::BF16(_) => DType::BF16,
            Tensor::F32(_) => DType::F32,
            Tensor::F64(_) => DType::F64,
        }
    }

    /// Element `i` as f64 (used on error paths and for tiny inputs only).
    pub(crate) fn get_f64(&self, i: usize) -> f64 {
        match self {
            Tensor::F16(s) => half::f16::from_bits(s[i]).to_f64(),
            Tensor::BF16(s) => half::bf16::from_bits(s[i]).to_f64(),
            Tensor::F32(s) => s[i] as f64,
            Tensor::F64(s) => s[i],
        }
    }
}

/// A mutable output buffer for decoding; its dtype is the dtype of the decoded values.
#[derive(Debug)]
pub enum TensorMut<'a> {
    F16(&'a mut [u16]),
    BF16(&'a mut [u16]),
    F32(&'a mut [f32]),
    F64(&'a mut [f64]),
}

impl TensorMut<'_> {
    pub fn len(&self) -> usize {
        match self {
            TensorMut::F16(s) | TensorMut::BF16(s) => s.len(),
            TensorMut::F32(s) => s.len(),
            TensorMut::F64(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dtype(&self) -> DType {
        match self {
            TensorMut::F16(_) => DType::F16,
            TensorMut::BF16(_) => DType::BF16,
            TensorMut::F32(_) => DType::F32,
            TensorMut::F64(_) => DType::F64,
        }
    }
}

/// An element whose sign bit can be read without converting it.
pub(crate) trait Elem: Copy + Send + Sync + 'static {
    fn negative(self) -> bool;
}

impl Elem for u16 {
    #[inline(always)]
    fn negative(self) -> bool {
        self >> 15 != 0
    }
}

impl Elem for f32 {
    #[inline(always)]
    fn negative(self) -> bool {
        self.to_bits() >> 31 != 0
    }
}

impl Elem for f64 {
    #[inline(always)]
    fn negative(self) -> bool {
        self.to_bits() >> 63 != 0
    }
}

/// Bits of +scale in a half type. The value is rounded f64 -> f32 -> half, which is the cast torch
/// performs, so that decoded values equal `torch.tensor(scale, dtype=float64).to(dtype)`.
pub(crate) fn half_bits(dtype: DType, scale: f64) -> u16 {
    let s = scale as f32;
    match dtype {
        DType::BF16 => half::bf16::from_f32(s).to_bits(),
        _ => half::f16::from_f32(s).to_bits(),
    }
}
