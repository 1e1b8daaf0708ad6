//! A plain reference of ComPEFT selection (sort-based, f64), independent of the crate's radix
//! select, and factors of every dtype with their exact values, shared by the integration tests.

#![allow(dead_code)]

use compeft::{DType, Tensor};
use half::{bf16, f16};

/// Signs (-1, 0, 1) of the kept entries and sigma, as DESIGN.md section 1 states them.
pub fn reference(values: &[f64], k: f64) -> (Vec<i8>, f64) {
    let d = values.len();
    let mut signs = vec![0i8; d];
    if d == 0 {
        return (signs, 0.0);
    }
    let n = (((k * d as f64) + 0.5).floor() as usize).clamp(1, d);
    let mut idx: Vec<usize> = (0..d).collect();
    idx.sort_by(|&a, &b| {
        values[b]
            .abs()
            .partial_cmp(&values[a].abs())
            .unwrap()
            .then(a.cmp(&b))
    });
    for &i in &idx[..n] {
        if values[i] != 0.0 {
            signs[i] = if values[i] < 0.0 { -1 } else { 1 };
        }
    }
    let sigma = if d == 1 {
        values[0].abs()
    } else {
        let mean = values.iter().sum::<f64>() / d as f64;
        (values.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (d - 1) as f64).sqrt()
    };
    (signs, sigma)
}

/// Deterministic pseudo-random values (splitmix64), roughly normal by summing uniforms.
pub fn gaussian_like(n: usize, seed: u64) -> Vec<f64> {
    let mut s = seed;
    let mut next = || {
        s = s.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| (0..4).map(|_| next()).sum::<f64>() - 2.0)
        .collect()
}

/// A factor's values in one dtype: the stored bits and their exact values in f64.
pub struct Values {
    pub bits16: Vec<u16>,
    pub f32s: Vec<f32>,
    pub f64s: Vec<f64>,
    pub exact: Vec<f64>,
    pub dtype: DType,
}

impl Values {
    pub fn new(v: &[f64], dtype: DType) -> Values {
        let mut out = Values {
            bits16: Vec::new(),
            f32s: Vec::new(),
            f64s: Vec::new(),
            exact: Vec::new(),
            dtype,
        };
        match dtype {
            DType::F16 => {
                out.bits16 = v.iter().map(|&x| f16::from_f64(x).to_bits()).collect();
                out.exact = out
                    .bits16
                    .iter()
                    .map(|&b| f16::from_bits(b).to_f64())
                    .collect();
            }
            DType::BF16 => {
                out.bits16 = v.iter().map(|&x| bf16::from_f64(x).to_bits()).collect();
                out.exact = out
                    .bits16
                    .iter()
                    .map(|&b| bf16::from_bits(b).to_f64())
                    .collect();
            }
            DType::F32 => {
                out.f32s = v.iter().map(|&x| x as f32).collect();
                out.exact = out.f32s.iter().map(|&x| x as f64).collect();
            }
            DType::F64 => {
                out.f64s = v.to_vec();
                out.exact = v.to_vec();
            }
        }
        out
    }

    pub fn tensor(&self) -> Tensor<'_> {
        match self.dtype {
            DType::F16 => Tensor::F16(&self.bits16),
            DType::BF16 => Tensor::BF16(&self.bits16),
            DType::F32 => Tensor::F32(&self.f32s),
            DType::F64 => Tensor::F64(&self.f64s),
        }
    }
}

/// Any of the four dtypes.
pub fn dtype_strategy() -> impl proptest::strategy::Strategy<Value = DType> {
    use proptest::prelude::*;
    prop_oneof![
        Just(DType::F16),
        Just(DType::BF16),
        Just(DType::F32),
        Just(DType::F64)
    ]
}
