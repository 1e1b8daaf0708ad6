//! Round trips against the plain reference in common.rs, for every dtype and both encodings.

mod common;

use common::{gaussian_like, reference};
use compeft::popcount::{counts_with, Kernel};
use compeft::{
    compress, compress_global, compress_scaled, Compressed, Encoding, Scale, Tensor, TensorMut,
};
use half::{bf16, f16};
use proptest::prelude::*;

fn signs_of(c: &Compressed) -> Vec<i8> {
    let mut out = vec![0f64; c.numel() as usize];
    c.decode_into(TensorMut::F64(&mut out)).unwrap();
    out.iter()
        .map(|&x| {
            if x > 0.0 {
                1
            } else if x < 0.0 {
                -1
            } else {
                0
            }
        })
        .collect()
}

fn check_f32(values: &[f32], k: f64, enc: Encoding) {
    let as64: Vec<f64> = values.iter().map(|&x| x as f64).collect();
    let (ref_signs, ref_sigma) = reference(&as64, k);
    let c = compress(Tensor::F32(values), &[values.len() as u64], k, 1.0, enc).unwrap();
    let nnz_ref = ref_signs.iter().filter(|&&s| s != 0).count() as u64;
    assert_eq!(c.nnz(), nnz_ref);
    if ref_sigma > 0.0 {
        assert!(
            (c.scale() - ref_sigma).abs() <= 1e-9 * ref_sigma,
            "{} vs {}",
            c.scale(),
            ref_sigma
        );
        assert_eq!(signs_of(&c), ref_signs);
    }
    let back = Compressed::from_bytes(&c.to_bytes()).unwrap();
    assert_eq!(back, c);
    assert_eq!(c.nbytes(), c.to_bytes().len());
    // Conversions keep the pattern and come back to the same bytes.
    let other = match enc {
        Encoding::Golomb => c.to_bitmask().unwrap(),
        Encoding::Bitmask => c.to_golomb().unwrap(),
    };
    assert_eq!(other.nnz(), c.nnz());
    let again = match enc {
        Encoding::Golomb => other.to_golomb().unwrap(),
        Encoding::Bitmask => other.to_bitmask().unwrap(),
    };
    assert_eq!(again.to_bytes(), c.to_bytes());
}

#[test]
fn gaussian_f32_both_encodings() {
    for &(n, k) in &[
        (1usize, 0.5),
        (2, 1.0),
        (7, 0.3),
        (1000, 0.1),
        (100_000, 0.05),
        (300_001, 0.2),
    ] {
        let v: Vec<f32> = gaussian_like(n, n as u64)
            .iter()
            .map(|&x| x as f32)
            .collect();
        check_f32(&v, k, Encoding::Golomb);
        check_f32(&v, k, Encoding::Bitmask);
    }
}

#[test]
fn many_blocks_decode_in_parallel() {
    // 2^12 nonzeros a block: this makes ~120 blocks, split over thread groups.
    let v: Vec<f32> = gaussian_like(1_000_000, 3)
        .iter()
        .map(|&x| x as f32)
        .collect();
    check_f32(&v, 0.5, Encoding::Golomb);
}

#[test]
fn ties_go_to_the_lower_index_and_zeros_are_never_kept() {
    let v = [1.0f32, -1.0, 1.0, 0.0, 0.0, 2.0, -1.0, 0.0];
    // k*d = 3.2 -> 3 kept: 2.0 and the first two of the four 1.0s.
    let c = compress(Tensor::F32(&v), &[8], 0.4, 1.0, Encoding::Golomb).unwrap();
    assert_eq!(signs_of(&c), vec![1, -1, 0, 0, 0, 1, 0, 0]);
    // k = 1 keeps all five nonzeros, never the zeros.
    let c = compress(Tensor::F32(&v), &[8], 1.0, 1.0, Encoding::Bitmask).unwrap();
    assert_eq!(c.nnz(), 5);
    assert_eq!(signs_of(&c), vec![1, -1, 1, 0, 0, 1, -1, 0]);
}

#[test]
fn half_types_match_reference() {
    let g = gaussian_like(50_000, 9);
    let h: Vec<u16> = g
        .iter()
        .map(|&x| f16::from_f64(x * 0.01).to_bits())
        .collect();
    let b: Vec<u16> = g
        .iter()
        .map(|&x| bf16::from_f64(x * 0.01).to_bits())
        .collect();
    for (t, vals) in [
        (
            Tensor::F16(&h),
            h.iter()
                .map(|&x| f16::from_bits(x).to_f64())
                .collect::<Vec<_>>(),
        ),
        (
            Tensor::BF16(&b),
            b.iter()
                .map(|&x| bf16::from_bits(x).to_f64())
                .collect::<Vec<_>>(),
        ),
    ] {
        let (rs, sigma) = reference(&vals, 0.1);
        let c = compress(t, &[250, 200], 0.1, 2.0, Encoding::Golomb).unwrap();
        assert!((c.scale() - 2.0 * sigma).abs() < 1e-12 * sigma);
        assert_eq!(signs_of(&c), rs);
    }
}

#[test]
fn global_scope_mixed_dtypes() {
    let a = gaussian_like(3000, 1);
    let b = gaussian_like(5000, 2);
    let a16: Vec<u16> = a.iter().map(|&x| f16::from_f64(x).to_bits()).collect();
    let b32: Vec<f32> = b.iter().map(|&x| (x * 1.5) as f32).collect();
    let mut all: Vec<f64> = a16.iter().map(|&x| f16::from_bits(x).to_f64()).collect();
    all.extend(b32.iter().map(|&x| x as f64));
    let (rs, sigma) = reference(&all, 0.1);
    let out = compress_global(
        &[
            (Tensor::F16(&a16), &[3000][..]),
            (Tensor::F32(&b32), &[50, 100][..]),
        ],
        0.1,
        1.0,
        Encoding::Golomb,
    )
    .unwrap();
    assert_eq!(out[0].scale(), out[1].scale());
    assert!((out[0].scale() - sigma).abs() < 1e-12 * sigma);
    let mut got = signs_of(&out[0]);
    got.extend(signs_of(&out[1]));
    assert_eq!(got, rs);
}

#[test]
fn non_finite_is_rejected_with_index() {
    let mut v = vec![0.5f32; 100];
    v[42] = f32::NAN;
    let e = compress(Tensor::F32(&v), &[100], 0.1, 1.0, Encoding::Golomb).unwrap_err();
    assert_eq!(e, compeft::Error::NonFinite { index: 42 });
    let h = vec![f16::INFINITY.to_bits(); 3];
    assert!(compress(Tensor::F16(&h), &[3], 0.1, 1.0, Encoding::Golomb).is_err());
    // Half tensors: -inf, NaN and the largest finite value at the edges of the key space.
    for (bf, bad) in [
        (false, f16::NEG_INFINITY.to_bits()),
        (false, f16::NAN.to_bits()),
        (true, bf16::INFINITY.to_bits()),
        (true, bf16::NAN.to_bits()),
    ] {
        let mut h = vec![0x3c00u16; 5000];
        let t = |h: &[u16]| compress(tensor(bf, h), &[5000], 0.1, 1.0, Encoding::Golomb);
        h[4321] = if bf {
            bf16::MAX.to_bits()
        } else {
            f16::MAX.to_bits()
        };
        assert!(t(&h).is_ok(), "largest finite value refused (bf16: {bf})");
        h[4000] = bad;
        assert_eq!(
            t(&h).unwrap_err(),
            compeft::Error::NonFinite { index: 4000 }
        );
    }
}

fn tensor(bf: bool, bits: &[u16]) -> Tensor<'_> {
    if bf {
        Tensor::BF16(bits)
    } else {
        Tensor::F16(bits)
    }
}

#[test]
fn bad_arguments() {
    let v = [1.0f32; 4];
    for k in [0.0, -0.1, 1.5, 20.0, f64::NAN] {
        assert!(matches!(
            compress(Tensor::F32(&v), &[4], k, 1.0, Encoding::Golomb),
            Err(compeft::Error::InvalidArgument(_))
        ));
    }
    for a in [0.0, -1.0, f64::INFINITY, f64::NAN] {
        assert!(compress(Tensor::F32(&v), &[4], 0.5, a, Encoding::Golomb).is_err());
    }
    assert!(compress(Tensor::F32(&v), &[3], 0.5, 1.0, Encoding::Golomb).is_err());
}

#[test]
fn empty_and_scalar() {
    let c = compress(Tensor::F32(&[]), &[0, 5], 0.1, 1.0, Encoding::Golomb).unwrap();
    assert_eq!((c.numel(), c.nnz()), (0, 0));
    assert_eq!(Compressed::from_bytes(&c.to_bytes()).unwrap(), c);
    let c = compress(Tensor::F64(&[-3.5]), &[], 0.1, 1.0, Encoding::Golomb).unwrap();
    let mut out = [0.0f64];
    c.decode_into(TensorMut::F64(&mut out)).unwrap();
    assert_eq!(
        out[0], -3.5,
        "d = 1 uses sigma = |x| and decodes to itself at alpha = 1"
    );
}

#[test]
fn popcount_kernels_agree_and_match_dense() {
    let a: Vec<f32> = gaussian_like(100_003, 5)
        .iter()
        .map(|&x| x as f32)
        .collect();
    let b: Vec<f32> = gaussian_like(100_003, 6)
        .iter()
        .map(|&x| (x + 0.3) as f32)
        .collect();
    let ca = compress(Tensor::F32(&a), &[100_003], 0.2, 1.0, Encoding::Golomb).unwrap();
    let cb = compress(Tensor::F32(&b), &[100_003], 0.3, 1.0, Encoding::Bitmask).unwrap();
    let (ma, mb) = (ca.masks().unwrap(), cb.masks().unwrap());
    let s = counts_with(Kernel::Scalar, &ma.pos, &ma.neg, &mb.pos, &mb.neg);
    assert_eq!(
        s,
        counts_with(Kernel::Popcnt, &ma.pos, &ma.neg, &mb.pos, &mb.neg)
    );
    assert_eq!(
        s,
        counts_with(Kernel::Avx2, &ma.pos, &ma.neg, &mb.pos, &mb.neg)
    );
    let (da, db) = (signs_of(&ca), signs_of(&cb));
    let dense_dot: i64 = da.iter().zip(&db).map(|(&x, &y)| x as i64 * y as i64).sum();
    let dense_diff = da.iter().zip(&db).filter(|(x, y)| x != y).count() as u64;
    assert_eq!(compeft::hamming(&ca, &cb).unwrap(), dense_diff);
    let dot = compeft::dot(&ca, &cb).unwrap();
    assert!((dot - dense_dot as f64 * ca.scale() * cb.scale()).abs() < 1e-9 * dot.abs().max(1.0));
    let cos = compeft::cosine(&ca, &cb).unwrap();
    let want = dense_dot as f64 / ((ca.nnz() * cb.nnz()) as f64).sqrt();
    assert!((cos - want).abs() < 1e-12);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn prop_roundtrip_matches_reference(
        // Small integer-valued magnitudes force many ties and zeros.
        vals in prop::collection::vec(-4i8..=4, 0..700),
        k in 0.001f64..=1.0,
        enc in prop::sample::select(vec![Encoding::Golomb, Encoding::Bitmask]),
    ) {
        let v: Vec<f32> = vals.iter().map(|&x| x as f32 * 0.25).collect();
        let as64: Vec<f64> = v.iter().map(|&x| x as f64).collect();
        let (rs, sigma) = reference(&as64, k);
        let c = compress(Tensor::F32(&v), &[v.len() as u64], k, 1.0, enc).unwrap();
        let back = Compressed::from_bytes(&c.to_bytes()).unwrap();
        prop_assert_eq!(&back, &c);
        prop_assert!((c.scale() - sigma).abs() <= 1e-12 * sigma.max(1e-300));
        if c.scale() > 0.0 {
            prop_assert_eq!(signs_of(&back), rs);
        } else {
            prop_assert_eq!(c.nnz() as usize, rs.iter().filter(|&&s| s != 0).count());
        }
    }

    /// Per-tensor half-precision selection (two small histograms) against the reference:
    /// magnitudes from a few exponents with many ties and zeros, both half types.
    #[test]
    fn prop_half_per_tensor_matches_reference(
        vals in prop::collection::vec((-3i32..=3, 0u16..8), 0..3000),
        k in 0.001f64..=1.0,
        bf in any::<bool>(),
    ) {
        let xs: Vec<f64> = vals.iter().map(|&(m, e)| m as f64 * 2f64.powi(e as i32 - 4)).collect();
        let bits: Vec<u16> = xs
            .iter()
            .map(|&x| if bf { bf16::from_f64(x).to_bits() } else { f16::from_f64(x).to_bits() })
            .collect();
        let t = if bf { Tensor::BF16(&bits) } else { Tensor::F16(&bits) };
        let (rs, sigma) = reference(&xs, k);
        let c = compress(t, &[bits.len() as u64], k, 1.0, Encoding::Golomb).unwrap();
        prop_assert!((c.scale() - sigma).abs() <= 1e-12 * sigma.max(1e-300));
        let nnz = rs.iter().filter(|&&s| s != 0).count();
        prop_assert_eq!(c.nnz() as usize, nnz);
        if c.scale() > 0.0 {
            prop_assert_eq!(signs_of(&c), rs);
        }
    }

    /// The data-free scales against plain sums over the input: the kept-mean scale is the mean
    /// |x| of exactly the entries the reference keeps, the norm scale ||x|| / sqrt(nnz), the
    /// projection scale ||x||^2 / sum of the kept |x|; for
    /// every dtype and per-tensor path (small half tensors, f32, f64).
    #[test]
    fn prop_data_free_scales_match_reference(
        vals in prop::collection::vec((-3i32..=3, 0u16..8), 0..3000),
        k in 0.001f64..=1.0,
        alpha in 0.25f64..4.0,
        which in 0usize..4,
        rule in prop::sample::select(vec![Scale::KeptMean, Scale::Norm, Scale::Proj]),
        // golomb sums the kept magnitudes in its encoding pass, bitmask in a pass of its own
        enc in prop::sample::select(vec![Encoding::Golomb, Encoding::Bitmask]),
    ) {
        let xs: Vec<f64> = vals.iter().map(|&(m, e)| m as f64 * 2f64.powi(e as i32 - 4)).collect();
        let (rs, _) = reference(&xs, k);
        let bits16: Vec<u16> = xs
            .iter()
            .map(|&x| if which == 1 { bf16::from_f64(x).to_bits() } else { f16::from_f64(x).to_bits() })
            .collect();
        let xs32: Vec<f32> = xs.iter().map(|&x| x as f32).collect();
        let t = match which {
            0 => Tensor::F16(&bits16),
            1 => Tensor::BF16(&bits16),
            2 => Tensor::F32(&xs32),
            _ => Tensor::F64(&xs),
        };
        let c = compress_scaled(t, &[xs.len() as u64], k, alpha, rule, enc).unwrap();
        let kept: Vec<f64> = xs.iter().zip(&rs).filter(|(_, &s)| s != 0).map(|(x, _)| x.abs()).collect();
        prop_assert_eq!(c.nnz() as usize, kept.len());
        let nnz = kept.len() as f64;
        let (kept_sum, squares) = (kept.iter().sum::<f64>(), xs.iter().map(|x| x * x).sum::<f64>());
        let want = alpha * match rule {
            _ if kept.is_empty() => 0.0,
            Scale::KeptMean => kept_sum / nnz,
            Scale::Norm => squares.sqrt() / nnz.sqrt(),
            _ => squares / kept_sum,
        };
        prop_assert!((c.scale() - want).abs() <= 1e-12 * want, "scale {} want {}", c.scale(), want);
        if c.nnz() > 0 {
            prop_assert_eq!(signs_of(&c), rs);
        }
    }

    #[test]
    fn prop_f64_continuous(vals in prop::collection::vec(-1e3f64..1e3, 1..3000), k in 0.01f64..=1.0) {
        let (rs, _) = reference(&vals, k);
        let c = compress(Tensor::F64(&vals), &[vals.len() as u64], k, 1.0, Encoding::Golomb).unwrap();
        if c.scale() > 0.0 {
            prop_assert_eq!(signs_of(&c), rs);
        }
    }
}

#[test]
fn with_density_shares_the_first_level() {
    use compeft::{KeySpace, Selector};
    let a: Vec<f32> = gaussian_like(70_000, 21)
        .iter()
        .map(|&x| x as f32)
        .collect();
    let mut s0 = Selector::new(KeySpace::F32, a.len() as u64, 0.5).unwrap();
    s0.feed(Tensor::F32(&a)).unwrap();
    for k in [0.01, 0.1, 0.3, 1.0] {
        let mut s = s0.with_density(k).unwrap();
        while !s.finish_level().unwrap() {
            s.feed(Tensor::F32(&a)).unwrap();
        }
        let (want, sigma) = compeft::select(&[Tensor::F32(&a)], k).unwrap();
        assert_eq!(s.threshold().unwrap(), want);
        assert_eq!(s.sigma(), sigma);
    }
    let mut done = s0.clone();
    done.finish_level().unwrap();
    assert!(done.with_density(0.1).is_err());
}
