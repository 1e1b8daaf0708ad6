//! Criterion benches of the Rust kernels, in elements per second.
//! `cargo bench -p compeft` (add `-- --quick` for a short run).

use compeft::popcount::{counts_with, Kernel};
use compeft::{
    compress, select, Compressed, Convention, Election, Encoding, MergeSpec, Method, Tensor,
    TensorMut,
};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::f16;
use rand::{Rng, SeedableRng};

const N: usize = 4_000_000;

fn data_f16() -> Vec<u16> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    (0..N)
        .map(|_| f16::from_f32(rng.gen::<f32>() - 0.5).to_bits())
        .collect()
}

fn data_f32() -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    (0..N).map(|_| rng.gen::<f32>() - 0.5).collect()
}

fn benches(c: &mut Criterion) {
    let h = data_f16();
    let f = data_f32();
    let mut g = c.benchmark_group("kernels");
    g.throughput(Throughput::Elements(N as u64));
    g.sample_size(10);

    g.bench_function("select/f16", |b| {
        b.iter(|| select(&[Tensor::F16(&h)], 0.1).unwrap())
    });
    g.bench_function("select/f32", |b| {
        b.iter(|| select(&[Tensor::F32(&f)], 0.1).unwrap())
    });
    for k in [0.05, 0.1, 0.2] {
        g.bench_with_input(BenchmarkId::new("encode_golomb/f16", k), &k, |b, &k| {
            b.iter(|| compress(Tensor::F16(&h), &[N as u64], k, 1.0, Encoding::Golomb).unwrap())
        });
    }
    g.bench_function("encode_bitmask/f16", |b| {
        b.iter(|| compress(Tensor::F16(&h), &[N as u64], 0.1, 1.0, Encoding::Bitmask).unwrap())
    });

    let gol = compress(Tensor::F16(&h), &[N as u64], 0.1, 1.0, Encoding::Golomb).unwrap();
    let bm = gol.to_bitmask().unwrap();
    let mut out = vec![0u16; N];
    g.bench_function("decode_golomb/f16", |b| {
        b.iter(|| gol.decode_into(TensorMut::F16(&mut out)).unwrap())
    });
    g.bench_function("decode_bitmask/f16", |b| {
        b.iter(|| bm.decode_into(TensorMut::F16(&mut out)).unwrap())
    });
    g.bench_function("golomb_to_bitmask", |b| {
        b.iter(|| gol.to_bitmask().unwrap())
    });
    g.bench_function("bitmask_to_golomb", |b| b.iter(|| bm.to_golomb().unwrap()));
    let bytes = gol.to_bytes();
    g.bench_function("parse_golomb", |b| {
        b.iter(|| Compressed::from_bytes(&bytes).unwrap())
    });

    let other = compress(Tensor::F32(&f), &[N as u64], 0.1, 1.0, Encoding::Bitmask).unwrap();
    let (ma, mb) = (bm.masks().unwrap(), other.masks().unwrap());
    for (name, k) in [
        ("scalar", Kernel::Scalar),
        ("popcnt", Kernel::Popcnt),
        ("avx2", Kernel::Avx2),
    ] {
        g.bench_function(format!("popcount/{name}"), |b| {
            b.iter(|| counts_with(k, &ma.pos, &ma.neg, &mb.pos, &mb.neg))
        });
    }
    g.bench_function("cosine/bitmask", |b| {
        b.iter(|| compeft::cosine(&bm, &other).unwrap())
    });

    // Merging 8 streams of N entries into one float32 tensor; elements are output entries.
    let eight: Vec<Compressed> = (0..8u64)
        .map(|s| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(10 + s);
            let x: Vec<f32> = (0..N).map(|_| rng.gen::<f32>() - 0.5).collect();
            compress(Tensor::F32(&x), &[N as u64], 0.1, 1.0, Encoding::Golomb).unwrap()
        })
        .collect();
    let refs: Vec<&Compressed> = eight.iter().collect();
    let mut merged = vec![0f32; N];
    for (name, method) in [
        ("task_arithmetic", Method::TaskArithmetic),
        ("ties", Method::Ties),
    ] {
        let spec = MergeSpec {
            method,
            election: Election::Total,
            convention: Convention::Peft,
            density: None,
            lam: 1.0,
        };
        g.bench_function(format!("merge8/{name}"), |b| {
            b.iter(|| compeft::merge_into(&refs, &[1.0; 8], &spec, &mut merged).unwrap())
        });
    }
    g.finish();
}

criterion_group!(kernels, benches);
criterion_main!(kernels);
