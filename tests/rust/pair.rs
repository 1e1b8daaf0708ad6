//! The pair rule's Gram matrices (rust/src/pair.rs) against plain double loops in f64 over the
//! factors' exact values, and ||BA||^2 against the m x n product itself: small random factors of
//! every dtype, rank 1 to 6, lines not a multiple of 64 long and some longer than one 256-entry
//! chunk, sign patterns of any density with whole lines left empty, both encodings.

use compeft::pair::{
    gram, gram_portable, pair_cross, pair_dense_norm, pair_norms, sign_gram, Factor, Lines, Pair,
};
use compeft::{compress, Compressed, DType, Encoding, Error, Tensor};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};

mod common;
use common::{dtype_strategy, Values};

/// Random values `rows` x `cols`, of magnitude around 2^scale, some entries zero, the lines
/// listed in `zero_lines` (rows for `Lines::Rows`, columns for `Lines::Cols`) all zero.
fn values(
    rows: usize,
    cols: usize,
    scale: i32,
    lines: Lines,
    zero_line: Option<usize>,
    seed: u64,
) -> Vec<f64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let s = 2f64.powi(scale);
    (0..rows * cols)
        .map(|p| {
            let line = match lines {
                Lines::Rows => p / cols,
                Lines::Cols => p % cols,
            };
            if Some(line) == zero_line || rng.gen_bool(0.1) {
                0.0
            } else {
                (rng.gen::<f64>() * 2.0 - 1.0) * s
            }
        })
        .collect()
}

/// A sign pattern (-1, 0, 1) of density about `density`, line `zero_line` empty, and a stream
/// that keeps exactly it (k = 1 keeps every nonzero entry).
/// A random LoRA pair A (r x n), B (m x r) in `dtype`, and random kept signs of each, compressed.
struct Case {
    a: Values,
    b: Values,
    sa: Vec<i64>,
    sb: Vec<i64>,
    ca: Compressed,
    cb: Compressed,
    dims: (usize, usize, usize),
}

impl Case {
    fn new(
        r: usize,
        n: usize,
        m: usize,
        dtype: DType,
        density: f64,
        enc: Encoding,
        seed: u64,
    ) -> Case {
        let a = Values::new(&values(r, n, -3, Lines::Rows, None, seed), dtype);
        let b = Values::new(&values(m, r, -6, Lines::Cols, None, seed ^ 1), dtype);
        let (sa, ca) = signs(r, n, density, Lines::Rows, None, enc, seed ^ 2);
        let (sb, cb) = signs(m, r, density, Lines::Cols, None, enc, seed ^ 3);
        Case {
            a,
            b,
            sa,
            sb,
            ca,
            cb,
            dims: (r, n, m),
        }
    }

    fn pair(&self) -> Pair<'_> {
        let (r, n, m) = self.dims;
        Pair {
            a: Factor {
                data: self.a.tensor(),
                rows: r,
                cols: n,
            },
            b: Factor {
                data: self.b.tensor(),
                rows: m,
                cols: r,
            },
            signs_a: &self.ca,
            signs_b: &self.cb,
        }
    }
}

fn signs(
    rows: usize,
    cols: usize,
    density: f64,
    lines: Lines,
    zero_line: Option<usize>,
    enc: Encoding,
    seed: u64,
) -> (Vec<i64>, Compressed) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed);
    let s: Vec<i64> = (0..rows * cols)
        .map(|p| {
            let line = match lines {
                Lines::Rows => p / cols,
                Lines::Cols => p % cols,
            };
            if Some(line) == zero_line || !rng.gen_bool(density) {
                0
            } else if rng.gen_bool(0.5) {
                -1
            } else {
                1
            }
        })
        .collect();
    let x: Vec<f32> = s.iter().map(|&v| v as f32).collect();
    let c = compress(Tensor::F32(&x), &[rows as u64, cols as u64], 1.0, 1.0, enc).unwrap();
    assert_eq!(c.nnz(), s.iter().filter(|&&v| v != 0).count() as u64);
    (s, c)
}

fn at(x: &[f64], cols: usize, lines: Lines, line: usize, k: usize) -> f64 {
    match lines {
        Lines::Rows => x[line * cols + k],
        Lines::Cols => x[k * cols + line],
    }
}

/// The Gram of the lines in f64, and the same sums over |products| (the error bound's scale).
fn gram_ref(x: &[f64], rows: usize, cols: usize, lines: Lines) -> (Vec<f64>, Vec<f64>) {
    let (r, len) = match lines {
        Lines::Rows => (rows, cols),
        Lines::Cols => (cols, rows),
    };
    let (mut g, mut a) = (vec![0f64; r * r], vec![0f64; r * r]);
    for i in 0..r {
        for j in 0..r {
            for k in 0..len {
                let p = at(x, cols, lines, i, k) * at(x, cols, lines, j, k);
                g[i * r + j] += p;
                a[i * r + j] += p.abs();
            }
        }
    }
    (g, a)
}

fn sign_gram_ref(s: &[i64], rows: usize, cols: usize, lines: Lines) -> Vec<i64> {
    let x: Vec<f64> = s.iter().map(|&v| v as f64).collect();
    gram_ref(&x, rows, cols, lines)
        .0
        .iter()
        .map(|&v| v as i64)
        .collect()
}

/// How far an entry of a dense Gram may be from the f64 double loop: float16/bfloat16/float32
/// are summed in f32, 16 products per accumulator lane per 256-entry chunk (16 * 2^-24 of the
/// sum of |products|, and 2^-24 more for float32's rounded products; 2^-19 covers both with room
/// to spare). Products below f32's normal range lose bits, but only next to far larger ones: at
/// most 2^-40 of the largest product the two lines can make, per entry (`big`: the product of
/// the lines' largest magnitudes). A line summed in f32 whose values all underflow or overflow
/// breaks this bound. float64 stays in f64.
fn tolerance(dtype: DType, abs_sum: f64, big: f64, len: usize) -> f64 {
    match dtype {
        DType::F64 => 1e-13 * abs_sum,
        _ => 2f64.powi(-19) * abs_sum + 2f64.powi(-40) * len as f64 * big,
    }
}

fn line_max(x: &[f64], rows: usize, cols: usize, lines: Lines) -> Vec<f64> {
    let (r, len) = match lines {
        Lines::Rows => (rows, cols),
        Lines::Cols => (cols, rows),
    };
    (0..r)
        .map(|i| {
            (0..len)
                .map(|k| at(x, cols, lines, i, k).abs())
                .fold(0.0, f64::max)
        })
        .collect()
}

/// Magnitudes: ordinary, and for bfloat16/float32 outside the range the f32 sums can take
/// (these chunks go through f64).
fn scale_strategy() -> impl Strategy<Value = i32> {
    prop_oneof![4 => Just(-7), 1 => Just(0), 1 => Just(-60), 1 => Just(70), 1 => Just(-130)]
}

fn enc_strategy() -> impl Strategy<Value = Encoding> {
    prop_oneof![Just(Encoding::Golomb), Just(Encoding::Bitmask)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn dense_grams_match_a_double_loop(
        r in 1usize..=6, len in prop_oneof![1usize..=70, 200usize..=600], dtype in dtype_strategy(),
        scale in scale_strategy(), zero in proptest::option::of(0usize..6), seed in any::<u64>(),
    ) {
        // float16 holds 2^-24 to 2^16: outside it the values would round to 0 or Inf.
        let scale = if dtype == DType::F16 { scale.clamp(-7, 0) } else { scale };
        for lines in [Lines::Rows, Lines::Cols] {
            let (rows, cols) = match lines { Lines::Rows => (r, len), Lines::Cols => (len, r) };
            let v = Values::new(&values(rows, cols, scale, lines, zero.filter(|&z| z < r), seed), dtype);
            let f = Factor { data: v.tensor(), rows, cols };
            let (want, abs) = gram_ref(&v.exact, rows, cols, lines);
            let big = line_max(&v.exact, rows, cols, lines);
            // The path this CPU takes (AVX2, FMA, F16C here) and the portable one; for half
            // factors (exact products in f32) they agree to the bit.
            let (fast, portable) = (gram(f, lines).unwrap(), gram_portable(f, lines).unwrap());
            if matches!(dtype, DType::F16 | DType::BF16) {
                prop_assert_eq!(&fast, &portable);
            }
            for (path, got) in [("fast", fast), ("portable", portable)] {
                for i in 0..r * r {
                    let tol = tolerance(dtype, abs[i], big[i / r] * big[i % r], len);
                    prop_assert!((got[i] - want[i]).abs() <= tol,
                        "{path} {lines:?} {dtype:?} entry {i}: {} vs {} (tolerance {tol})", got[i], want[i]);
                }
            }
        }
    }

    #[test]
    fn sign_grams_are_exact(
        r in 1usize..=6, len in prop_oneof![1usize..=70, 100usize..=300],
        density in prop_oneof![Just(0.0), Just(0.05), Just(0.3), Just(1.0)],
        zero in proptest::option::of(0usize..6), enc in enc_strategy(), seed in any::<u64>(),
    ) {
        for lines in [Lines::Rows, Lines::Cols] {
            let (rows, cols) = match lines { Lines::Rows => (r, len), Lines::Cols => (len, r) };
            let (s, c) = signs(rows, cols, density, lines, zero.filter(|&z| z < r), enc, seed);
            let got = sign_gram(&c, rows, cols, lines).unwrap();
            prop_assert_eq!(got, sign_gram_ref(&s, rows, cols, lines), "{:?}", lines);
        }
    }

    #[test]
    fn pair_norms_are_the_products_norms(
        r in 1usize..=5, n in 1usize..=90, m in 1usize..=90, dtype in dtype_strategy(),
        density in prop_oneof![Just(0.05), Just(0.3), Just(1.0)], enc in enc_strategy(),
        seed in any::<u64>(),
    ) {
        let case = Case::new(r, n, m, dtype, density, enc, seed);
        let (a, b, sa, sb, p) = (&case.a, &case.b, &case.sa, &case.sb, case.pair());
        let got = pair_norms(&p).unwrap();
        // The dense norm alone is the same number.
        prop_assert_eq!(pair_dense_norm(&p).unwrap().to_bits(), got.dense.to_bits());
        // ||BA||^2 from the m x n product, and its scale sum_ij (|B||A|)_ij^2 for the bound.
        let (mut want, mut scale, mut want_signs) = (0f64, 0f64, 0i64);
        for i in 0..m {
            for j in 0..n {
                let (mut x, mut ax, mut q) = (0f64, 0f64, 0i64);
                for t in 0..r {
                    x += b.exact[i * r + t] * a.exact[t * n + j];
                    ax += (b.exact[i * r + t] * a.exact[t * n + j]).abs();
                    q += sb[i * r + t] * sa[t * n + j];
                }
                want += x * x;
                scale += ax * ax;
                want_signs += q * q;
            }
        }
        prop_assert_eq!(got.signs, want_signs as f64);
        // Each Gram entry is within 2^-19 of its |products| sum, so the trace of their product
        // is within about 2 * 2^-19 of sum_ij (|B|^T|B|)_ij (|A||A|^T)_ij = scale.
        let tol = match dtype { DType::F64 => 1e-12 * scale, _ => 2.1 * 2f64.powi(-19) * scale };
        prop_assert!((got.dense - want).abs() <= tol + 1e-300, "{} vs {} (tolerance {tol})", got.dense, want);
    }

    #[test]
    fn pair_cross_is_the_signs_product_against_the_factors_product(
        r in 1usize..=5, n in 1usize..=90, m in 1usize..=90, dtype in dtype_strategy(),
        density in prop_oneof![Just(0.05), Just(0.3), Just(1.0)], enc in enc_strategy(),
        seed in any::<u64>(),
    ) {
        let case = Case::new(r, n, m, dtype, density, enc, seed);
        let (got, want, scale) = cross_and_reference(&case);
        // Both sides in f64 from the factors' exact values: only the order of the additions differs.
        prop_assert!((got - want).abs() <= 1e-12 * scale + 1e-300, "{got} vs {want}");
    }
}

/// pair_cross of a case, and <S_B S_A, B A> from the two m x n products with the sum of the
/// products' magnitudes (for the bound).
fn cross_and_reference(case: &Case) -> (f64, f64, f64) {
    let (r, n, m) = case.dims;
    let (a, b, sa, sb) = (&case.a, &case.b, &case.sa, &case.sb);
    let got = pair_cross(&case.pair()).unwrap();
    let (mut want, mut scale) = (0f64, 0f64);
    for i in 0..m {
        for j in 0..n {
            let (mut x, mut ax, mut q, mut aq) = (0f64, 0f64, 0f64, 0f64);
            for t in 0..r {
                x += b.exact[i * r + t] * a.exact[t * n + j];
                ax += (b.exact[i * r + t] * a.exact[t * n + j]).abs();
                q += (sb[i * r + t] * sa[t * n + j]) as f64;
                aq += (sb[i * r + t] * sa[t * n + j]).abs() as f64;
            }
            want += x * q;
            scale += ax * aq;
        }
    }
    (got, want, scale)
}

#[test]
fn pair_cross_of_a_half_factor_too_large_to_widen() {
    // Half factors above 2^22 entries are read entry by entry instead of widened once (an
    // embedding's lora_embedding_A): the same sums.
    for dtype in [DType::F16, DType::BF16] {
        let case = Case::new(1, (1 << 22) + 100, 3, dtype, 0.01, Encoding::Golomb, 11);
        let (got, want, scale) = cross_and_reference(&case);
        assert!(
            (got - want).abs() <= 1e-12 * scale + 1e-300,
            "{got} vs {want}"
        );
    }
}

#[test]
fn sizes_that_do_not_fit_are_argument_errors() {
    let a = vec![1f32; 4 * 10];
    let b = vec![1f32; 6 * 4];
    let ca = compress(Tensor::F32(&a), &[4, 10], 0.5, 1.0, Encoding::Golomb).unwrap();
    let cb = compress(Tensor::F32(&b), &[6, 4], 0.5, 1.0, Encoding::Golomb).unwrap();
    let fa = Factor {
        data: Tensor::F32(&a),
        rows: 4,
        cols: 10,
    };
    let fb = Factor {
        data: Tensor::F32(&b),
        rows: 6,
        cols: 4,
    };
    let ok = Pair {
        a: fa,
        b: fb,
        signs_a: &ca,
        signs_b: &cb,
    };
    assert!(pair_norms(&ok).is_ok());
    let cases = [
        // A's data does not hold rows x cols entries.
        Pair {
            a: Factor {
                rows: 4,
                cols: 9,
                ..fa
            },
            ..ok
        },
        // A's rows are not B's columns.
        Pair {
            a: Factor {
                data: Tensor::F32(&a),
                rows: 5,
                cols: 8,
            },
            ..ok
        },
        // A stream of another size than its factor.
        Pair { signs_a: &cb, ..ok },
        Pair { signs_b: &ca, ..ok },
    ];
    for p in &cases {
        match pair_norms(p) {
            Err(Error::InvalidArgument(msg)) => assert!(!msg.is_empty()),
            other => panic!("expected an argument error, got {other:?}"),
        }
        match pair_cross(p) {
            Err(Error::InvalidArgument(msg)) => assert!(!msg.is_empty()),
            other => panic!("expected an argument error from pair_cross, got {other:?}"),
        }
    }
}

#[test]
fn rank_one_and_empty_factors() {
    // r = 1: ||b a^T||^2 = ||a||^2 ||b||^2, exactly for small integers.
    let a = [1f32, -2.0, 0.0, 3.0];
    let b = [2f32, 0.0, -1.0];
    let ca = compress(Tensor::F32(&a), &[1, 4], 1.0, 1.0, Encoding::Bitmask).unwrap();
    let cb = compress(Tensor::F32(&b), &[3, 1], 1.0, 1.0, Encoding::Golomb).unwrap();
    let p = Pair {
        a: Factor {
            data: Tensor::F32(&a),
            rows: 1,
            cols: 4,
        },
        b: Factor {
            data: Tensor::F32(&b),
            rows: 3,
            cols: 1,
        },
        signs_a: &ca,
        signs_b: &cb,
    };
    let got = pair_norms(&p).unwrap();
    assert_eq!(got.dense, 14.0 * 5.0);
    assert_eq!(got.signs, 3.0 * 2.0);
    // No columns at all: zero Grams, not an error.
    let z = compress(Tensor::F32(&[]), &[3, 0], 0.5, 1.0, Encoding::Golomb).unwrap();
    assert_eq!(
        gram(
            Factor {
                data: Tensor::F32(&[]),
                rows: 3,
                cols: 0
            },
            Lines::Rows
        )
        .unwrap(),
        vec![0.0; 9]
    );
    assert_eq!(sign_gram(&z, 3, 0, Lines::Rows).unwrap(), vec![0; 9]);
}
