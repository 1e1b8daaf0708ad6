//! The interleaved Rice walk through the public decode paths: streams of 1 to 7 blocks (not all
//! multiples of the walk's width), on one and on several threads, decode to the ternary vector
//! they were built from. (Its property test against the one-block walk, with corrupted streams,
//! is in rust/src/codec.rs, where the walks are visible.)

use compeft::{compress, decode_many, Compressed, Encoding, Tensor, TensorMut};
use rand::{Rng, SeedableRng};

/// A vector with `nnz` nonzeros (random positions, signs and magnitudes in [1, 2)) over `numel`
/// entries, and its signs.
fn ternary(numel: usize, nnz: usize, seed: u64) -> (Vec<f32>, Vec<i8>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut x = vec![0f32; numel];
    let mut left = nnz;
    while left > 0 {
        let i = rng.gen_range(0..numel);
        if x[i] == 0.0 {
            let m = 1.0 + rng.gen::<f32>();
            x[i] = if rng.gen_bool(0.5) { -m } else { m };
            left -= 1;
        }
    }
    let s = x
        .iter()
        .map(|&v| (v > 0.0) as i8 - (v < 0.0) as i8)
        .collect();
    (x, s)
}

fn signs_f32(out: &[f32]) -> Vec<i8> {
    out.iter()
        .map(|&v| (v > 0.0) as i8 - (v < 0.0) as i8)
        .collect()
}

fn check_all_paths(c: &Compressed, want: &[i8]) {
    let n = want.len();
    let mut out = vec![7f32; n];
    c.decode_into(TensorMut::F32(&mut out)).unwrap();
    assert_eq!(signs_f32(&out), want);
    let mut out16 = vec![0xffffu16; n];
    let mut out64 = vec![7f64; n];
    decode_many(vec![
        (c, TensorMut::F16(&mut out16)),
        (c, TensorMut::F64(&mut out64)),
    ])
    .unwrap();
    let s16: Vec<i8> = out16
        .iter()
        .map(|&h| {
            if h == 0 {
                0
            } else if h & 0x8000 != 0 {
                -1
            } else {
                1
            }
        })
        .collect();
    assert_eq!(s16, want);
    let s64: Vec<i8> = out64
        .iter()
        .map(|&v| (v > 0.0) as i8 - (v < 0.0) as i8)
        .collect();
    assert_eq!(s64, want);
    let mut seen = vec![0i8; n];
    let mut last = None;
    c.for_each_kept_in(0, n as u64, |at, neg| {
        assert!(last < Some(at), "entries out of order");
        last = Some(at);
        seen[at as usize] = if neg { -1 } else { 1 };
    })
    .unwrap();
    assert_eq!(seen, want);
    let m = c.to_bitmask().unwrap();
    let mut back = vec![0f32; n];
    m.decode_into(TensorMut::F32(&mut back)).unwrap();
    assert_eq!(signs_f32(&back), want);
    assert_eq!(m.to_golomb().unwrap().to_bytes(), c.to_bytes());
}

#[test]
fn odd_block_counts_decode_on_any_thread_count() {
    let block = 1usize << 12;
    for (i, &blocks) in [1usize, 2, 3, 5, 7].iter().enumerate() {
        for (j, &k) in [0.01, 0.1, 0.5, 0.9].iter().enumerate() {
            // The last block part full.
            let nnz = (blocks - 1) * block + block / 3;
            let numel = (nnz as f64 / k) as usize;
            let (x, want) = ternary(numel, nnz, (i * 10 + j) as u64);
            // Zeros are never kept: asking for a bit more keeps exactly the nonzeros.
            let keep = (nnz as f64 * 1.01 / numel as f64).min(1.0);
            let c = compress(
                Tensor::F32(&x),
                &[numel as u64],
                keep,
                1.0,
                Encoding::Golomb,
            )
            .unwrap();
            assert_eq!(c.nnz(), nnz as u64);
            for threads in [1, 3] {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap()
                    .install(|| check_all_paths(&c, &want));
            }
        }
    }
}
