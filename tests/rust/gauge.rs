//! The balanced gauge's products (rust/src/gauge.rs) against plain triple loops in f64 over the
//! factors' exact values, rounded once to the factor's dtype: every dtype, ranks on both sides
//! of the eight-column blocks (1 to 17), factors longer than one block, the AVX2/FMA/F16C path
//! and the portable one; overflow and NaN reported, bad sizes refused.

use compeft::gauge::{apply, apply_many, apply_portable, grams, Job};
use compeft::pair::{gram, Factor, Lines};
use compeft::{DType, Error, TensorMut};
use half::{bf16, f16};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};

mod common;
use common::{dtype_strategy, Values};

fn random(len: usize, scale: f64, seed: u64) -> Vec<f64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..len)
        .map(|_| (rng.gen::<f64>() * 2.0 - 1.0) * scale)
        .collect()
}

/// An output buffer of `len` entries in `dtype`.
enum Out {
    U16(Vec<u16>),
    F32(Vec<f32>),
    F64(Vec<f64>),
}

impl Out {
    fn new(dtype: DType, len: usize) -> Out {
        match dtype {
            DType::F16 | DType::BF16 => Out::U16(vec![0; len]),
            DType::F32 => Out::F32(vec![0.0; len]),
            DType::F64 => Out::F64(vec![0.0; len]),
        }
    }

    fn view(&mut self, dtype: DType) -> TensorMut<'_> {
        match (self, dtype) {
            (Out::U16(v), DType::F16) => TensorMut::F16(v),
            (Out::U16(v), DType::BF16) => TensorMut::BF16(v),
            (Out::F32(v), _) => TensorMut::F32(v),
            (Out::F64(v), _) => TensorMut::F64(v),
            _ => unreachable!(),
        }
    }

    fn values(&self, dtype: DType) -> Vec<f64> {
        match self {
            Out::U16(v) if dtype == DType::F16 => {
                v.iter().map(|&b| f16::from_bits(b).to_f64()).collect()
            }
            Out::U16(v) => v.iter().map(|&b| bf16::from_bits(b).to_f64()).collect(),
            Out::F32(v) => v.iter().map(|&x| x as f64).collect(),
            Out::F64(v) => v.clone(),
        }
    }
}

/// Relative precision of one rounding to `dtype`, and the spacing of its subnormals.
fn unit(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F16 => (2f64.powi(-11), 2f64.powi(-24)),
        DType::BF16 => (2f64.powi(-8), 2f64.powi(-133)),
        DType::F32 => (2f64.powi(-24), 2f64.powi(-149)),
        DType::F64 => (2f64.powi(-53), 0.0),
    }
}

/// x (rows x inner) times y (inner x cols), and the sums of the terms' magnitudes, in f64.
fn matmul(x: &[f64], y: &[f64], rows: usize, inner: usize, cols: usize) -> (Vec<f64>, Vec<f64>) {
    let mut out = vec![0.0; rows * cols];
    let mut mag = vec![0.0; rows * cols];
    for i in 0..rows {
        for j in 0..cols {
            for k in 0..inner {
                out[i * cols + j] += x[i * inner + k] * y[k * cols + j];
                mag[i * cols + j] += (x[i * inner + k] * y[k * cols + j]).abs();
            }
        }
    }
    (out, mag)
}

fn is_half(d: DType) -> bool {
    matches!(d, DType::F16 | DType::BF16)
}

/// Each entry of `got` is `want` rounded once to `dtype`, up to the sums' own rounding (f32
/// sums where both factors are half types, f64 otherwise: 2^-19 or 2^-45 of the terms'
/// magnitudes).
fn assert_rounded(
    got: &[f64],
    want: &[f64],
    mag: &[f64],
    dtype: DType,
    f32_sums: bool,
    what: &str,
) {
    let (u, sub) = unit(dtype);
    let sums = if f32_sums {
        2f64.powi(-19)
    } else {
        2f64.powi(-45)
    };
    for (t, ((g, w), m)) in got.iter().zip(want).zip(mag).enumerate() {
        let tol = u * w.abs() + sub + sums * m;
        assert!(
            (g - w).abs() <= tol,
            "{what}[{t}]: {g} against {w} (tolerance {tol}, {dtype:?})"
        );
    }
}

struct Case {
    a: Values,
    b: Values,
    ta: Vec<f64>,
    tb: Vec<f64>,
    dims: (usize, usize, usize),
}

impl Case {
    fn new(r: usize, n: usize, m: usize, dtype: DType, seed: u64) -> Case {
        Case::mixed(r, n, m, (dtype, dtype), seed)
    }

    fn mixed(r: usize, n: usize, m: usize, (da, db): (DType, DType), seed: u64) -> Case {
        Case {
            a: Values::new(&random(r * n, 0.05, seed), da),
            b: Values::new(&random(m * r, 0.01, seed ^ 1), db),
            ta: random(r * r, 4.0, seed ^ 2),
            tb: random(r * r, 0.3, seed ^ 3),
            dims: (r, n, m),
        }
    }

    fn factors(&self) -> (Factor<'_>, Factor<'_>) {
        let (r, n, m) = self.dims;
        (
            Factor {
                data: self.a.tensor(),
                rows: r,
                cols: n,
            },
            Factor {
                data: self.b.tensor(),
                rows: m,
                cols: r,
            },
        )
    }

    /// (A', B') from `f` (apply or apply_portable) and whether it called them finite.
    fn run(&self, f: fn(Job<'_>) -> Result<bool, Error>) -> (Vec<f64>, Vec<f64>, bool) {
        let (da, db) = (self.a.dtype, self.b.dtype);
        let (r, n, m) = self.dims;
        let (mut oa, mut ob) = (Out::new(da, r * n), Out::new(db, m * r));
        let (a, b) = self.factors();
        let ok = f(Job {
            a,
            b,
            ta: &self.ta,
            tb: &self.tb,
            out_a: oa.view(da),
            out_b: ob.view(db),
        })
        .unwrap();
        (oa.values(da), ob.values(db), ok)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn products_are_the_exact_products_rounded_once(
        r in prop_oneof![1usize..=9, Just(16usize), Just(17usize)],
        n in 1usize..400,
        m in 1usize..400,
        dtype in dtype_strategy(),
        other in prop_oneof![3 => Just(None), 1 => dtype_strategy().prop_map(Some)],
        seed in any::<u64>(),
    ) {
        // Mostly one dtype for both factors (as trained), sometimes two.
        let dtypes = (dtype, other.unwrap_or(dtype));
        let c = Case::mixed(r, n, m, dtypes, seed);
        let f32_sums = is_half(dtypes.0) && is_half(dtypes.1);
        let (want_a, mag_a) = matmul(&c.ta, &c.a.exact, r, r, n);
        let (want_b, mag_b) = matmul(&c.b.exact, &c.tb, m, r, r);
        for (f, path) in [(apply as fn(Job<'_>) -> _, "fast"), (apply_portable, "portable")] {
            let (a2, b2, ok) = c.run(f);
            prop_assert!(ok, "{path}: finite outputs reported as not finite");
            assert_rounded(&a2, &want_a, &mag_a, dtypes.0, f32_sums, &format!("{path} A'"));
            assert_rounded(&b2, &want_b, &mag_b, dtypes.1, f32_sums, &format!("{path} B'"));
        }
    }
}

#[test]
fn grams_are_a_a_t_and_b_t_b() {
    let c = Case::new(5, 70, 90, DType::F32, 7);
    let (a, b) = c.factors();
    let (ga, gb) = grams(a, b).unwrap();
    assert_eq!(ga, gram(a, Lines::Rows).unwrap());
    assert_eq!(gb, gram(b, Lines::Cols).unwrap());
    let (want, _) = matmul(
        &c.a.exact,
        &(0..70 * 5)
            .map(|x| c.a.exact[(x % 5) * 70 + x / 5])
            .collect::<Vec<_>>(),
        5,
        70,
        5,
    );
    for (g, w) in ga.iter().zip(&want) {
        assert!((g - w).abs() <= 1e-6 * w.abs().max(1e-3), "{g} against {w}");
    }
}

#[test]
fn outputs_beyond_the_dtype_or_not_a_number_are_reported() {
    // float16 tops out at 65504: a transform of 1e9 overflows it.
    let mut c = Case::new(4, 30, 20, DType::F16, 3);
    c.tb[0] = 1e9;
    assert!(!c.run(apply).2 && !c.run(apply_portable).2);
    let mut c = Case::new(3, 30, 20, DType::F64, 4);
    c.a.f64s[5] = f64::NAN;
    assert!(!c.run(apply).2);
    let mut c = Case::new(3, 30, 20, DType::F32, 5);
    c.ta[4] = f64::INFINITY;
    assert!(!c.run(apply).2);
}

/// apply (or apply_many, with a good job first) on `c` with T_A and T_B cut to the lengths
/// given, and A' of `out_a` entries in `dtype_a`.
fn try_apply(
    c: &Case,
    ta: usize,
    tb: usize,
    out_a: usize,
    dtype_a: DType,
    many: bool,
) -> Result<(), (usize, Error)> {
    let (a, b) = c.factors();
    let (mut oa, mut ob) = (
        Out::new(dtype_a, out_a),
        Out::new(c.b.dtype, b.rows * b.cols),
    );
    let (mut ga, mut gb) = (
        Out::new(c.a.dtype, a.rows * a.cols),
        Out::new(c.b.dtype, b.rows * b.cols),
    );
    let job = Job {
        a,
        b,
        ta: &c.ta[..ta],
        tb: &c.tb[..tb],
        out_a: oa.view(dtype_a),
        out_b: ob.view(c.b.dtype),
    };
    if many {
        let first = Job {
            a,
            b,
            ta: &c.ta,
            tb: &c.tb,
            out_a: ga.view(c.a.dtype),
            out_b: gb.view(c.b.dtype),
        };
        apply_many(vec![first, job]).map(|_| ())
    } else {
        apply(job).map(|_| ()).map_err(|e| (0, e))
    }
}

#[test]
fn sizes_that_do_not_fit_are_argument_errors() {
    let c = Case::new(4, 30, 20, DType::F32, 9);
    let bad = [
        (15, 16, 120, DType::F32), // T_A of the wrong size
        (16, 9, 120, DType::F32),  // T_B of the wrong size
        (16, 16, 119, DType::F32), // an output of the wrong size
        (16, 16, 120, DType::F64), // an output of the wrong dtype
    ];
    for (ta, tb, out, dt) in bad {
        assert!(matches!(
            try_apply(&c, ta, tb, out, dt, false),
            Err((0, Error::InvalidArgument(_)))
        ));
        // Many jobs: the index of the bad one comes with its error.
        assert!(matches!(
            try_apply(&c, ta, tb, out, dt, true),
            Err((1, Error::InvalidArgument(_)))
        ));
    }
    assert!(try_apply(&c, 16, 16, 120, DType::F32, true).is_ok());
    // A's rows against B's columns, and a factor's size against its shape.
    let (mut a, mut b) = c.factors();
    a.rows = 3;
    assert!(matches!(grams(a, b), Err(Error::InvalidArgument(_))));
    a.rows = 4;
    b.rows = 21;
    assert!(matches!(grams(a, b), Err(Error::InvalidArgument(_))));
    // A rank beyond any LoRA's, of empty factors: refused before an r x r matrix is allocated.
    let r = compeft::pair::MAX_RANK + 1;
    let empty = |rows, cols| Factor {
        data: compeft::Tensor::F32(&[]),
        rows,
        cols,
    };
    assert!(matches!(
        grams(empty(r, 0), empty(0, r)),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        gram(empty(r, 0), Lines::Rows),
        Err(Error::InvalidArgument(_))
    ));
    let r = 1usize << 33; // r * r wraps around in 64 bits
    assert!(matches!(
        grams(empty(r, 0), empty(0, r)),
        Err(Error::InvalidArgument(_))
    ));
}
