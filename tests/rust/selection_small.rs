//! The small-tensor selection of float32 and float64 (`select_one` below 2^20 entries) against the
//! radix select every other path uses (a `Selector` fed the same tensor) and against a plain sort:
//! the same threshold, ties and spread to the bit, so the same kept set and the same stream bytes.

use compeft::selection::{select_one, Spread};
use compeft::{Error, KeySpace, Selector, Tensor, Threshold};
use proptest::prelude::*;

/// The switch-over in selection.rs: tensors shorter than this take the small path.
const SMALL_WIDE: usize = 1 << 20;

/// The radix select over all levels (the path of global scope and of large tensors).
fn radix(t: Tensor<'_>, k: f64) -> Result<(Threshold, Spread), Error> {
    let space = KeySpace::for_dtypes([t.dtype()]);
    let mut s = Selector::new(space, t.len() as u64, k)?;
    loop {
        s.feed(t)?;
        if s.finish_level()? {
            return Ok((s.threshold().unwrap(), s.spread()));
        }
    }
}

fn same(a: &Result<(Threshold, Spread), Error>, b: &Result<(Threshold, Spread), Error>) -> bool {
    match (a, b) {
        (Ok((ta, sa)), Ok((tb, sb))) => {
            ta == tb
                && sa.sigma.to_bits() == sb.sigma.to_bits()
                && sa.norm.to_bits() == sb.norm.to_bits()
        }
        (Err(ea), Err(eb)) => ea.to_string() == eb.to_string(),
        _ => false,
    }
}

/// Which entries a threshold keeps: every key above it and the first `ties` equal to it.
fn kept_by(mags: &[f64], thr: &Threshold) -> Vec<bool> {
    let t = thr.space.magnitude(thr.key);
    let mut ties = thr.ties;
    mags.iter()
        .map(|&m| {
            if thr.key == u64::MAX || m < t {
                false
            } else if m > t {
                true
            } else if ties > 0 {
                ties -= 1;
                true
            } else {
                false
            }
        })
        .collect()
}

/// The kept set by sorting: the n largest magnitudes, ties to the lower index, zeros never.
fn kept_by_sort(mags: &[f64], k: f64) -> Vec<bool> {
    let d = mags.len();
    let mut kept = vec![false; d];
    if d == 0 {
        return kept;
    }
    let n = (((k * d as f64) + 0.5).floor() as usize).clamp(1, d);
    let mut idx: Vec<usize> = (0..d).collect();
    idx.sort_by(|&a, &b| mags[b].total_cmp(&mags[a]).then(a.cmp(&b)));
    for &i in &idx[..n] {
        kept[i] = mags[i] != 0.0;
    }
    kept
}

/// Values that stress the bins: ties, both zeros, denormals, the ends of the range, and in float64
/// magnitudes that round to one float32 (one coarse bin) but differ, and ones beyond float32's range.
fn palette64() -> Vec<f64> {
    vec![
        0.0,
        -0.0,
        1.0,
        -1.0,
        1.0 + f64::EPSILON,
        -(1.0 + 2.0 * f64::EPSILON),
        1.0 - f64::EPSILON / 2.0,
        0.5,
        1.5,
        -1.5,
        1.0625,
        f64::from_bits(1),
        -f64::from_bits(7),
        f64::MIN_POSITIVE,
        f64::MAX,
        -f64::MAX,
        1e300,
        -1e-300,
        1e-40,
        f32::MAX as f64,
        f32::MAX as f64 * (1.0 + f64::EPSILON),
        f32::from_bits(1) as f64,
        f32::from_bits(1) as f64 * 0.5,
        f32::MIN_POSITIVE as f64,
        3.0e38,
        1e-45,
    ]
}

fn palette32() -> Vec<f32> {
    vec![
        0.0,
        -0.0,
        1.0,
        -1.0,
        1.0 + f32::EPSILON,
        -(1.0 + 2.0 * f32::EPSILON),
        1.0 - f32::EPSILON / 2.0,
        0.5,
        1.5,
        -1.5,
        1.0625,
        f32::from_bits(1),
        -f32::from_bits(7),
        f32::from_bits(0x000f_ffff),
        f32::MIN_POSITIVE,
        f32::MAX,
        -f32::MAX,
        3.0e38,
        -1e-30,
        1e-45,
    ]
}

/// Entries drawn from the palette (many ties) or as random bits (any finite value) or as a value
/// near 1 (a crowded bin).
fn values64(max_len: usize) -> impl Strategy<Value = Vec<f64>> {
    let p = palette64();
    let one = prop_oneof![
        3 => prop::sample::select(p),
        2 => any::<u64>().prop_map(f64::from_bits).prop_filter("finite", |x| x.is_finite()),
        2 => -4.0f64..4.0,
        1 => (0u64..64).prop_map(|m| f64::from_bits(1f64.to_bits() + m)),
    ];
    prop::collection::vec(one, 0..max_len)
}

fn values32(max_len: usize) -> impl Strategy<Value = Vec<f32>> {
    let p = palette32();
    let one = prop_oneof![
        3 => prop::sample::select(p),
        2 => any::<u32>().prop_map(f32::from_bits).prop_filter("finite", |x| x.is_finite()),
        2 => -4.0f32..4.0,
        1 => (0u32..64).prop_map(|m| f32::from_bits(1f32.to_bits() + m)),
    ];
    prop::collection::vec(one, 0..max_len)
}

/// A density from 1/d (one entry) up to 1, or an arbitrary fraction.
fn density(d: usize) -> impl Strategy<Value = f64> {
    let d = d.max(1);
    prop_oneof![
        (1..=d).prop_map(move |n| n as f64 / d as f64),
        (1e-9f64..=1.0),
        Just(1.0),
    ]
}

fn check32(v: &[f32], k: f64) -> Result<(), TestCaseError> {
    let t = Tensor::F32(v);
    let (small, large) = (select_one(t, k), radix(t, k));
    prop_assert!(same(&small, &large), "{:?} vs {:?}", small, large);
    let mags: Vec<f64> = v.iter().map(|x| x.abs() as f64).collect();
    prop_assert_eq!(kept_by(&mags, &small.unwrap().0), kept_by_sort(&mags, k));
    Ok(())
}

fn check64(v: &[f64], k: f64) -> Result<(), TestCaseError> {
    let t = Tensor::F64(v);
    let (small, large) = (select_one(t, k), radix(t, k));
    prop_assert!(same(&small, &large), "{:?} vs {:?}", small, large);
    let mags: Vec<f64> = v.iter().map(|x| x.abs()).collect();
    prop_assert_eq!(kept_by(&mags, &small.unwrap().0), kept_by_sort(&mags, k));
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn f32_small_path_is_the_radix_select((v, k) in values32(300).prop_flat_map(|v| {
        let d = v.len();
        (Just(v), density(d))
    })) {
        check32(&v, k)?;
    }

    #[test]
    fn f64_small_path_is_the_radix_select((v, k) in values64(300).prop_flat_map(|v| {
        let d = v.len();
        (Just(v), density(d))
    })) {
        check64(&v, k)?;
    }
}

proptest! {
    // Several moment chunks (16384 entries each), merged in order.
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn f32_small_path_over_several_chunks(
        v in values32(40_000).prop_filter("long", |v| v.len() > 16_384),
        k in 1e-5f64..=1.0,
    ) {
        check32(&v, k)?;
    }

    #[test]
    fn f64_small_path_over_several_chunks(
        v in values64(40_000).prop_filter("long", |v| v.len() > 16_384),
        k in 1e-5f64..=1.0,
    ) {
        check64(&v, k)?;
    }
}

/// Deterministic values with ties: `i`'s value repeats every `period` entries.
fn tied(d: usize, period: usize) -> Vec<f64> {
    (0..d)
        .map(|i| {
            let j = (i * 7919) % period;
            let x = (j as f64 - period as f64 / 2.0) / 37.0;
            if j % 11 == 0 {
                0.0
            } else {
                x
            }
        })
        .collect()
}

/// Around the switch-over: the last size of the small path and the first of the large one select
/// as the radix select does, at densities from one entry to all.
#[test]
fn sizes_around_the_switch_over() {
    for d in [SMALL_WIDE - 1, SMALL_WIDE, SMALL_WIDE + 1] {
        let v64 = tied(d, 1000);
        let v32: Vec<f32> = v64.iter().map(|&x| x as f32).collect();
        for k in [1.0 / d as f64, 0.001, 0.1, 0.37, 0.9, 1.0] {
            let t = Tensor::F64(&v64);
            assert!(same(&select_one(t, k), &radix(t, k)), "f64 d={d} k={k}");
            let t = Tensor::F32(&v32);
            assert!(same(&select_one(t, k), &radix(t, k)), "f32 d={d} k={k}");
        }
    }
}

/// NaN and Inf are refused with the index of the first; float64 magnitudes above float32's range
/// (which share its end bins) are not.
#[test]
fn non_finite_is_refused_at_its_index() {
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let mut v = tied(5000, 100);
        v[1234] = 1e300;
        v[4321] = bad;
        v[4500] = bad;
        match select_one(Tensor::F64(&v), 0.1) {
            Err(Error::NonFinite { index }) => assert_eq!(index, 4321),
            other => panic!("{other:?}"),
        }
        let v32: Vec<f32> = v.iter().map(|&x| x as f32).collect();
        // 1e300 is inf in float32: the first non-finite entry is there.
        match select_one(Tensor::F32(&v32), 0.1) {
            Err(Error::NonFinite { index }) => assert_eq!(index, 1234),
            other => panic!("{other:?}"),
        }
    }
    let mut v = tied(5000, 100);
    v[10] = f64::MAX;
    v[20] = -1e300;
    check64(&v, 0.1).unwrap();
    check64(&v, 1.0 / 5000.0).unwrap();
}

/// Edge cases: empty, one entry, all zeros, all one value.
#[test]
fn degenerate_tensors() {
    for v in [
        vec![],
        vec![-2.5],
        vec![0.0; 100],
        vec![-0.0; 3],
        vec![1.5; 1000],
    ] {
        for k in [1e-9, 0.5, 1.0] {
            check64(&v, k).unwrap();
            let v32: Vec<f32> = v.iter().map(|&x| x as f32).collect();
            check32(&v32, k).unwrap();
        }
    }
    assert!(select_one(Tensor::F32(&[1.0]), 0.0).is_err());
}

/// A selection over several tensors (global scope), some counted straight into the selector's
/// histogram and some (above 2^18 entries) in parallel, finds the threshold of their
/// concatenation, and keeps what a sort of the concatenation keeps.
#[test]
fn several_tensors_in_one_selection() {
    let sizes = [1000, (1 << 18) + 5, 70_000, 3, 1 << 18];
    let parts: Vec<Vec<f64>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &d)| tied(d, 500 + 97 * i))
        .collect();
    let all: Vec<f64> = parts.concat();
    let parts32: Vec<Vec<f32>> = parts
        .iter()
        .map(|p| p.iter().map(|&x| x as f32).collect())
        .collect();
    let all32: Vec<f32> = parts32.concat();
    let mags: Vec<f64> = all.iter().map(|x| x.abs()).collect();
    let mags32: Vec<f64> = all32.iter().map(|x| x.abs() as f64).collect();
    for k in [1.0 / all.len() as f64, 0.01, 0.2, 0.75, 1.0] {
        let t64: Vec<Tensor<'_>> = parts.iter().map(|p| Tensor::F64(p)).collect();
        let (thr, _) = compeft::select(&t64, k).unwrap();
        assert_eq!(thr, compeft::select(&[Tensor::F64(&all)], k).unwrap().0);
        assert_eq!(kept_by(&mags, &thr), kept_by_sort(&mags, k), "f64 k={k}");
        let t32: Vec<Tensor<'_>> = parts32.iter().map(|p| Tensor::F32(p)).collect();
        let (thr, _) = compeft::select(&t32, k).unwrap();
        assert_eq!(thr, compeft::select(&[Tensor::F32(&all32)], k).unwrap().0);
        assert_eq!(
            kept_by(&mags32, &thr),
            kept_by_sort(&mags32, k),
            "f32 k={k}"
        );
    }
}
