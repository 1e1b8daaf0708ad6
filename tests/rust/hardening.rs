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

/// A golomb stream of `numel` entries (one dimension) with nothing kept: 30-odd bytes.
fn empty_stream(numel: u64) -> Vec<u8> {
    let mut b = b"CPFT\x01\x00\x03\x01".to_vec();
    let mut put = |mut v: u64| {
        while v >= 0x80 {
            b.push(v as u8 | 0x80);
            v >>= 7;
        }
        b.push(v as u8);
    };
    put(numel);
    put(numel);
    put(0);
    b.extend_from_slice(&0.0f64.to_le_bytes());
    b.extend_from_slice(&[0, 12, 0, 0]);
    let crc = crc32fast::hash(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

#[test]
fn a_tiny_stream_cannot_ask_for_a_huge_allocation() {
    use compeft::{Compressed, Error};
    let bomb = empty_stream(1 << 40);
    assert!(bomb.len() < 40);
    match Compressed::from_bytes(&bomb) {
        Err(Error::LimitExceeded { numel, limit }) => {
            assert_eq!((numel, limit), (1 << 40, compeft::DEFAULT_MAX_NUMEL))
        }
        other => panic!("expected LimitExceeded, got {other:?}"),
    }
    // At the limit it parses and its masks are allocated zeroed (512 MiB each, untouched pages).
    let at_limit = Compressed::from_bytes(&empty_stream(compeft::DEFAULT_MAX_NUMEL)).unwrap();
    assert_eq!(at_limit.nnz(), 0);
    // Raising the limit (tests in this binary only ever raise it, so they cannot disturb each
    // other) lets a trusted stream through; the format's own bound stays.
    let before = compeft::set_max_numel(1 << 41).unwrap();
    assert_eq!(before, compeft::DEFAULT_MAX_NUMEL);
    assert_eq!(Compressed::from_bytes(&bomb).unwrap().numel(), 1 << 40);
    assert!(compeft::set_max_numel((1 << 48) + 1).is_err());
    compeft::set_max_numel(before).unwrap();
}

#[test]
fn selector_checks_every_level() {
    use compeft::{KeySpace, Selector};
    let a: Vec<f32> = gaussian_like(5000, 11).iter().map(|&x| x as f32).collect();
    let b: Vec<f32> = gaussian_like(3000, 12).iter().map(|&x| x as f32).collect();
    let fresh = || {
        let mut s = Selector::new(KeySpace::F32, 8000, 0.1).unwrap();
        s.feed(Tensor::F32(&a)).unwrap();
        s.feed(Tensor::F32(&b)).unwrap();
        assert!(!s.finish_level().unwrap());
        s
    };
    // The honest run finishes.
    let mut s = fresh();
    while !{
        s.feed(Tensor::F32(&a)).unwrap();
        s.feed(Tensor::F32(&b)).unwrap();
        s.finish_level().unwrap()
    } {}
    // Feeding after the end is refused.
    assert!(s.feed(Tensor::F32(&a)).is_err());
    // A tensor skipped on a later level.
    let mut s = fresh();
    s.feed(Tensor::F32(&a)).unwrap();
    assert!(s.finish_level().is_err());
    // Other data of the same size on a later level.
    let mut s = fresh();
    let mut a2 = a.clone();
    a2.iter_mut().for_each(|x| *x *= 0.5);
    s.feed(Tensor::F32(&a2)).unwrap();
    s.feed(Tensor::F32(&b)).unwrap();
    assert!(s.finish_level().is_err());
    // A later level fed more entries under the chosen prefix (copies of the 800th largest
    // magnitude in place of b): a threshold would still come out, from other data.
    let mut mags: Vec<f32> = a.iter().chain(&b).map(|x| x.abs()).collect();
    mags.sort_by(|x, y| y.total_cmp(x));
    let same = vec![mags[799]; b.len()];
    let mut s = fresh();
    s.feed(Tensor::F32(&a)).unwrap();
    s.feed(Tensor::F32(&same)).unwrap();
    assert!(s.finish_level().is_err());
}

#[test]
fn compress_with_threshold_refuses_non_finite_input_and_negative_zero_scale() {
    use compeft::codec::compress_with_threshold;
    use compeft::{select, Error};
    let x: Vec<f32> = gaussian_like(1000, 5).iter().map(|&x| x as f32).collect();
    let (thr, sigma) = select(&[Tensor::F32(&x)], 0.1).unwrap();
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut y = x.clone();
        y[321] = bad;
        // Also with a threshold that keeps nothing: a NaN must not become a silent zero.
        for t in [thr, compeft::Threshold::keep_nothing(thr.space)] {
            let mut ties = t.ties;
            let r = compress_with_threshold(
                Tensor::F32(&y),
                &[1000],
                &t,
                &mut ties,
                sigma,
                Encoding::Golomb,
            );
            assert_eq!(r.unwrap_err(), Error::NonFinite { index: 321 });
        }
    }
    let mut ties = thr.ties;
    let pos = compress_with_threshold(
        Tensor::F32(&x),
        &[1000],
        &thr,
        &mut ties,
        0.0,
        Encoding::Golomb,
    )
    .unwrap();
    let mut ties = thr.ties;
    let neg = compress_with_threshold(
        Tensor::F32(&x),
        &[1000],
        &thr,
        &mut ties,
        -0.0,
        Encoding::Golomb,
    )
    .unwrap();
    assert_eq!(pos.to_bytes(), neg.to_bytes());
    assert!(pos.with_scale(-0.0).unwrap().to_bytes() == pos.to_bytes());
}

#[test]
fn golomb_to_bitmask_is_the_same_on_any_thread_count() {
    // 1M entries at k = 0.1: 100,000 kept, 25 blocks of 4096, so the conversion splits them.
    let x: Vec<f32> = gaussian_like(1 << 20, 21)
        .iter()
        .map(|&v| v as f32)
        .collect();
    let g = compress_scaled(
        Tensor::F32(&x),
        &[1 << 20],
        0.1,
        1.0,
        Scale::Std,
        Encoding::Golomb,
    )
    .unwrap();
    let want = compress_scaled(
        Tensor::F32(&x),
        &[1 << 20],
        0.1,
        1.0,
        Scale::Std,
        Encoding::Bitmask,
    )
    .unwrap();
    for threads in [1, 2, 3, 7, 16] {
        let m = with_threads(threads, || g.to_bitmask().unwrap());
        assert!(m == want, "{threads} threads");
    }
}

/// Fuzzing finding (rust/fuzz/artifacts/popcount, kept in the popcount corpus): a constant tensor
/// has sigma 0, so its stream keeps a sign pattern that decodes to zeros; `hamming` counted that
/// pattern (2 where the decoded vectors differ in 23 places).
#[test]
fn hamming_counts_a_zero_scale_stream_as_all_zero() {
    let a = vec![109f32; 52];
    let mut b = vec![109f32; 44];
    b.extend([-128f32, 64., 97., 98., 1., 0., 101., 102.]);
    for enc in [Encoding::Golomb, Encoding::Bitmask] {
        let ca = compeft::compress(Tensor::F32(&a), &[52], 0.43, 1.0, enc).unwrap();
        let cb = compeft::compress(Tensor::F32(&b), &[52], 0.43, 1.0, enc).unwrap();
        assert!(ca.scale() == 0.0 && ca.nnz() > 0 && cb.scale() > 0.0);
        let dense = |c: &compeft::Compressed| {
            let mut d = vec![0f64; 52];
            c.decode_into(compeft::TensorMut::F64(&mut d)).unwrap();
            d
        };
        let (da, db) = (dense(&ca), dense(&cb));
        let want = da.iter().zip(&db).filter(|(p, q)| p != q).count() as u64;
        assert_eq!(compeft::hamming(&ca, &cb).unwrap(), want);
        assert_eq!(compeft::hamming(&cb, &ca).unwrap(), want);
        assert_eq!(compeft::hamming(&ca, &ca).unwrap(), 0);
        assert_eq!(compeft::dot(&ca, &cb).unwrap(), 0.0);
        assert_eq!(compeft::cosine(&ca, &cb).unwrap(), 0.0);
        let short = compeft::compress(Tensor::F32(&a[..51]), &[51], 0.43, 1.0, enc).unwrap();
        assert!(compeft::hamming(&ca, &short).is_err());
    }
}
