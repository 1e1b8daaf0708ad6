//! Hardening: the same input gives the same bytes on any thread count; hostile inputs give
//! errors, not panics or unbounded allocations.

mod common;

use common::gaussian_like;
use compeft::{compress_global, compress_scaled, Encoding, Scale, Tensor};
use half::{bf16, f16};

fn with_threads<R: Send>(n: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build()
        .unwrap()
        .install(f)
}

struct Data {
    f16: Vec<u16>,
    bf16: Vec<u16>,
    f32: Vec<f32>,
    f64: Vec<f64>,
}

impl Data {
    fn new(n: usize, seed: u64) -> Data {
        // Offset and scaled so that the f64 sums of the moments round differently when merged
        // in another order.
        let x: Vec<f64> = gaussian_like(n, seed)
            .iter()
            .map(|v| 3.0 + v * 0.37)
            .collect();
        Data {
            f16: x.iter().map(|&v| f16::from_f64(v).to_bits()).collect(),
            bf16: x.iter().map(|&v| bf16::from_f64(v).to_bits()).collect(),
            f32: x.iter().map(|&v| v as f32).collect(),
            f64: x,
        }
    }

    fn tensors(&self) -> [Tensor<'_>; 4] {
        [
            Tensor::F16(&self.f16),
            Tensor::BF16(&self.bf16),
            Tensor::F32(&self.f32),
            Tensor::F64(&self.f64),
        ]
    }
}

#[test]
fn stream_bytes_do_not_depend_on_the_thread_count() {
    // 1M entries (small-half path for the half types) and past 2^21 (their histogram path).
    for n in [1_000_003usize, (1 << 21) + 4099] {
        let data = Data::new(n, 11);
        for t in data.tensors() {
            for scale in [Scale::Std, Scale::Norm, Scale::Proj, Scale::KeptMean] {
                let run = || {
                    compress_scaled(t, &[n as u64], 0.1, 1.0, scale, Encoding::Golomb)
                        .unwrap()
                        .to_bytes()
                };
                let one = with_threads(1, run);
                for threads in [2, 3, 7] {
                    assert!(
                        with_threads(threads, run) == one,
                        "{:?} {scale:?} n={n}: {threads} threads give other bytes than 1",
                        t.dtype()
                    );
                }
            }
        }
    }
}

#[test]
fn global_scope_bytes_do_not_depend_on_the_thread_count() {
    let data = Data::new(1_000_003, 12);
    let small = Data::new(70_001, 13);
    let run = || {
        let tensors: Vec<(Tensor<'_>, &[u64])> = data
            .tensors()
            .into_iter()
            .chain(small.tensors())
            .map(|t| (t, &[][..]))
            .collect();
        let shapes: Vec<[u64; 1]> = tensors.iter().map(|(t, _)| [t.len() as u64]).collect();
        let tensors: Vec<(Tensor<'_>, &[u64])> = tensors
            .iter()
            .zip(&shapes)
            .map(|((t, _), s)| (*t, &s[..]))
            .collect();
        compress_global(&tensors, 0.05, 2.0, Encoding::Golomb)
            .unwrap()
            .iter()
            .map(|c| c.to_bytes())
            .collect::<Vec<_>>()
    };
    let one = with_threads(1, run);
    for threads in [2, 7] {
        assert!(with_threads(threads, run) == one, "{threads} threads");
    }
}

#[test]
fn rice_parameter_is_exact_at_a_boundary() {
    // r = ln(phi - 1) / ln(1 - p) is 2^20 + 4.3e-5 here (50-digit arithmetic), so b = 21; with
    // ln(1 - p) in f64 it came out 20.
    assert_eq!(compeft::golomb::rice_parameter(789, 1_719_256_699), 21);
    assert_eq!(compeft::golomb::rice_parameter(796, 1_734_509_927), 21);
    // The ends: nothing or everything kept, and densities that give b = 0.
    assert_eq!(compeft::golomb::rice_parameter(0, 10), 0);
    assert_eq!(compeft::golomb::rice_parameter(10, 10), 0);
    assert_eq!(compeft::golomb::rice_parameter(9, 10), 0);
    assert_eq!(compeft::golomb::rice_parameter(1, 1 << 48), 47);
}
