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
