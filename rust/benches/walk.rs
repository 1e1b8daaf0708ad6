//! The Rice walk on one thread: golomb `decode_into` of 2^24 float32 entries at k = 0.3, 0.1 and
//! 0.01, and a 7B-shaped LoRA expert (256 float16 tensors of 16 x 4096 at k = 0.1) decoded whole,
//! with throughput in kept entries (criterion's time per element is ns per kept entry).
//! `cargo bench -p compeft --bench walk` (add `-- --quick` for a short run).

use compeft::{compress, Encoding, Tensor, TensorMut};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand::{Rng, SeedableRng};

const N: usize = 1 << 24;

fn walk(c: &mut Criterion) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let x: Vec<f32> = (0..N).map(|_| rng.gen::<f32>() - 0.5).collect();
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let mut out = vec![0f32; N];
    let mut g = c.benchmark_group("walk");
    g.sample_size(10);
    // The floor of a dense decode: writing the output (per kept entry at each k below).
    g.bench_function("fill_1thread/f32", |b| b.iter(|| out.fill(0.0)));
    for k in [0.3, 0.1, 0.01] {
        let s = compress(Tensor::F32(&x), &[N as u64], k, 1.0, Encoding::Golomb).unwrap();
        g.throughput(Throughput::Elements(s.nnz()));
        g.bench_with_input(
            BenchmarkId::new("decode_golomb_1thread/f32", k),
            &k,
            |b, _| b.iter(|| one.install(|| s.decode_into(TensorMut::F32(&mut out)).unwrap())),
        );
        g.bench_with_input(BenchmarkId::new("for_each_kept_1thread", k), &k, |b, _| {
            b.iter(|| {
                let mut acc = 0u64;
                s.for_each_kept_in(0, N as u64, |at, neg| acc ^= at + neg as u64)
                    .unwrap();
                acc
            })
        });
        g.bench_with_input(BenchmarkId::new("to_bitmask_1thread", k), &k, |b, _| {
            b.iter(|| one.install(|| s.to_bitmask().unwrap()))
        });
        let m = s.to_bitmask().unwrap();
        g.bench_with_input(
            BenchmarkId::new("decode_bitmask_1thread/f32", k),
            &k,
            |b, _| b.iter(|| one.install(|| m.decode_into(TensorMut::F32(&mut out)).unwrap())),
        );
    }
    // A 7B-shaped LoRA expert at k = 0.1: 256 tensors of 16 x 4096 float16 entries, decoded in
    // one call (the whole-expert decode), against zero-filling the same outputs.
    let experts: Vec<_> = (0..256)
        .map(|_| {
            let x: Vec<f32> = (0..1 << 16).map(|_| rng.gen::<f32>() - 0.5).collect();
            compress(Tensor::F32(&x), &[16, 4096], 0.1, 1.0, Encoding::Golomb).unwrap()
        })
        .collect();
    let mut outs: Vec<Vec<u16>> = vec![vec![0u16; 1 << 16]; 256];
    g.throughput(Throughput::Elements(experts.iter().map(|c| c.nnz()).sum()));
    g.bench_function("expert_7b_zero_fill_1thread/f16", |b| {
        b.iter(|| outs.iter_mut().for_each(|o| o.fill(0)))
    });
    g.bench_function("expert_7b_decode_many_1thread/f16", |b| {
        b.iter(|| {
            one.install(|| {
                let jobs = experts
                    .iter()
                    .zip(outs.iter_mut())
                    .map(|(c, o)| (c, TensorMut::F16(o)))
                    .collect();
                compeft::decode_many(jobs).unwrap()
            })
        })
    });
    g.finish();
}

criterion_group!(benches, walk);
criterion_main!(benches);
