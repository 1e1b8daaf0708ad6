//! The balanced gauge of LoRA pairs (python/compeft_rs/_gauge.py), the parts that touch the
//! factors: their r x r Gram matrices, and the products B' = B T_B and A' = T_A A with the
//! r x r transforms that the Python side derives from those Grams (eigen-decompositions and
//! one SVD of r x r matrices, by numpy). B'A' = B (T_B T_A) A equals BA because T_B T_A = I
//! whatever rounding the Grams carry: their error only makes the result slightly less than
//! balanced, never a different adapter.
//!
//! Products are accumulated in f32 for pairs of float16 and bfloat16 factors (each output is
//! then rounded once to its half type, 2^-11 or 2^-8, far coarser than the f32 sums) and in f64
//! for float32 and float64 factors and for pairs that mix a half type with another.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::pair::{check_factor, check_rank, fast_cpu, gram, Elem, Factor, Lines};
use crate::TensorMut;

/// Entries of a factor converted per step: a block of B's rows or of A's columns and its
/// product stay in L1.
const STEP: usize = 2048;

/// One pair to rewrite: A (r x n) and B (m x r), the transforms T_A and T_B (r x r, row-major),
/// and the outputs A' and B' (the shapes and dtypes of A and B).
pub struct Job<'a> {
    pub a: Factor<'a>,
    pub b: Factor<'a>,
    pub ta: &'a [f64],
    pub tb: &'a [f64],
    pub out_a: TensorMut<'a>,
    pub out_b: TensorMut<'a>,
}

fn check_pair(a: &Factor<'_>, b: &Factor<'_>) -> Result<usize> {
    check_factor(a, "A")?;
    check_factor(b, "B")?;
    if a.rows != b.cols {
        return Err(Error::InvalidArgument(format!(
            "A has {} rows but B {} columns; pass the two factors of one LoRA pair (A: r x n, \
             B: m x r)",
            a.rows, b.cols
        )));
    }
    check_rank(a.rows)?;
    Ok(a.rows)
}

/// (A A^T, B^T B) of one pair, each r x r, row-major.
pub type Grams = (Vec<f64>, Vec<f64>);

/// The [`Grams`] of one pair (see [`crate::pair::gram`]).
pub fn grams(a: Factor<'_>, b: Factor<'_>) -> Result<Grams> {
    check_pair(&a, &b)?;
    Ok((gram(a, Lines::Rows)?, gram(b, Lines::Cols)?))
}

/// [`grams`] of many pairs, in parallel. On an error the index of the pair comes with it.
pub fn grams_many(
    pairs: &[(Factor<'_>, Factor<'_>)],
) -> std::result::Result<Vec<Grams>, (usize, Error)> {
    pairs
        .par_iter()
        .enumerate()
        .map(|(i, (a, b))| grams(*a, *b).map_err(|e| (i, e)))
        .collect()
}

/// Writes A' = T_A A and B' = B T_B into the job's outputs. Ok(false) where an output entry is
/// not finite (an input that was not, or a value beyond the output dtype's range): the caller
/// keeps the factors as they were.
pub fn apply(job: Job<'_>) -> Result<bool> {
    apply_on(job, fast_cpu())
}

/// [`apply`] without AVX2, FMA or F16C even where the CPU has them (for tests of that path).
#[doc(hidden)]
pub fn apply_portable(job: Job<'_>) -> Result<bool> {
    apply_on(job, false)
}

/// [`apply`] of many jobs, in parallel. On an error the index of the job comes with it.
pub fn apply_many(jobs: Vec<Job<'_>>) -> std::result::Result<Vec<bool>, (usize, Error)> {
    let fast = fast_cpu();
    jobs.into_par_iter()
        .enumerate()
        .map(|(i, j)| apply_on(j, fast).map_err(|e| (i, e)))
        .collect()
}

fn apply_on(job: Job<'_>, fast: bool) -> Result<bool> {
    let r = check_pair(&job.a, &job.b)?;
    for (t, what) in [(job.ta, "T_A"), (job.tb, "T_B")] {
        if r.checked_mul(r) != Some(t.len()) {
            return Err(Error::InvalidArgument(format!(
                "{what} holds {} entries for a pair of rank {r}; pass it r x r, row-major",
                t.len()
            )));
        }
    }
    for (f, o, what) in [(&job.a, &job.out_a, "A'"), (&job.b, &job.out_b, "B'")] {
        if o.len() != f.data.len() || o.dtype() != f.data.dtype() {
            return Err(Error::InvalidArgument(format!(
                "the output for {what} holds {} {} entries for a factor of {} {}; pass one of \
                 the factor's size and dtype",
                o.len(),
                o.dtype().name(),
                f.data.len(),
                f.data.dtype().name()
            )));
        }
    }
    // f32 sums only where both outputs are half types (a mixed pair takes f64 for both).
    let half = |o: &TensorMut<'_>| matches!(o, TensorMut::F16(_) | TensorMut::BF16(_));
    let half = half(&job.out_a) && half(&job.out_b);
    #[cfg(target_arch = "x86_64")]
    if fast {
        // SAFETY: `fast` is only set where the CPU has AVX2, FMA and F16C (see `fast_cpu`).
        return Ok(unsafe {
            if half {
                apply_fast::<f32>(job, r)
            } else {
                apply_fast::<f64>(job, r)
            }
        });
    }
    let _ = fast;
    Ok(if half {
        apply_with::<f32, false>(job, r)
    } else {
        apply_with::<f64, false>(job, r)
    })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn apply_fast<T: Store>(job: Job<'_>, r: usize) -> bool {
    apply_with::<T, true>(job, r)
}

/// The two products, `STEP` entries of a factor at a time: converted to `T`, multiplied,
/// stored in the output's dtype. `FAST`: fused multiply-adds and F16C conversions.
#[inline(always)]
fn apply_with<T: Store, const FAST: bool>(job: Job<'_>, r: usize) -> bool {
    let Job {
        a,
        b,
        ta,
        tb,
        mut out_a,
        mut out_b,
    } = job;
    if r == 0 {
        return true;
    }
    let ta: Vec<T> = ta.iter().map(|&v| T::from_f64(v)).collect();
    let tb: Vec<T> = tb.iter().map(|&v| T::from_f64(v)).collect();
    let w = (STEP / r).max(1);
    let mut x = vec![T::ZERO; r * w];
    let mut y = vec![T::ZERO; r * w];
    let mut finite = true;

    // B' a block of whole rows at a time: row i of B' is sum_k B[i][k] * row k of T_B, eight
    // output columns at a time (a row is only r entries long: a loop along it would not
    // vectorise).
    let m = b.rows;
    for r0 in (0..m).step_by(w) {
        let h = w.min(m - r0);
        let (x, y) = (&mut x[..h * r], &mut y[..h * r]);
        T::fill::<FAST>(b.data, r0 * r, x);
        for (xi, yi) in x.chunks_exact(r).zip(y.chunks_exact_mut(r)) {
            let mut j0 = 0;
            while j0 + 8 <= r {
                let mut acc = [T::ZERO; 8];
                for (&xk, tk) in xi.iter().zip(tb.chunks_exact(r)) {
                    for (o, &t) in acc.iter_mut().zip(&tk[j0..j0 + 8]) {
                        *o = T::madd::<FAST>(xk, t, *o);
                    }
                }
                yi[j0..j0 + 8].copy_from_slice(&acc);
                j0 += 8;
            }
            for (j, o) in yi.iter_mut().enumerate().skip(j0) {
                *o = xi
                    .iter()
                    .zip(tb.chunks_exact(r))
                    .fold(T::ZERO, |s, (&xk, tk)| T::madd::<FAST>(xk, tk[j], s));
            }
        }
        finite &= T::store::<FAST>(y, &mut out_b, r0 * r);
    }

    // A' a block of columns of every row at a time: line i of the block of A' is
    // sum_k T_A[i][k] * line k of the block of A.
    let n = a.cols;
    for c0 in (0..n).step_by(w) {
        let h = w.min(n - c0);
        let (x, y) = (&mut x[..r * h], &mut y[..r * h]);
        for (k, line) in x.chunks_exact_mut(h).enumerate() {
            T::fill::<FAST>(a.data, k * n + c0, line);
        }
        for ((ti, yi), i) in ta.chunks_exact(r).zip(y.chunks_exact_mut(h)).zip(0..) {
            yi.fill(T::ZERO);
            for (&c, xk) in ti.iter().zip(x.chunks_exact(h)) {
                for (o, &v) in yi.iter_mut().zip(xk) {
                    *o = T::madd::<FAST>(c, v, *o);
                }
            }
            finite &= T::store::<FAST>(yi, &mut out_a, i * n + c0);
        }
    }
    finite
}

/// What the products accumulate in, and how they are written out.
trait Store: Elem {
    fn from_f64(v: f64) -> Self;
    /// Writes `src` into `dst[start..start + src.len()]` in dst's dtype; whether every written
    /// value is finite there.
    fn store<const FAST: bool>(src: &[Self], dst: &mut TensorMut<'_>, start: usize) -> bool;
}

impl Store for f32 {
    #[inline(always)]
    fn from_f64(v: f64) -> f32 {
        v as f32
    }
    #[inline(always)]
    fn store<const FAST: bool>(src: &[f32], dst: &mut TensorMut<'_>, start: usize) -> bool {
        let end = start + src.len();
        match dst {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: FAST is only set where the CPU has F16C (see `fast_cpu`).
            TensorMut::F16(d) if FAST => unsafe { f32_to_f16_f16c(src, &mut d[start..end]) },
            TensorMut::F16(d) => {
                for (o, &v) in d[start..end].iter_mut().zip(src) {
                    *o = half::f16::from_f32(v).to_bits();
                }
            }
            TensorMut::BF16(d) => {
                for (o, &v) in d[start..end].iter_mut().zip(src) {
                    *o = half::bf16::from_f32(v).to_bits();
                }
            }
            TensorMut::F32(d) => d[start..end].copy_from_slice(src),
            TensorMut::F64(d) => {
                for (o, &v) in d[start..end].iter_mut().zip(src) {
                    *o = v as f64;
                }
            }
        }
        finite_in(dst, start, end)
    }
}

impl Store for f64 {
    #[inline(always)]
    fn from_f64(v: f64) -> f64 {
        v
    }
    #[inline(always)]
    fn store<const FAST: bool>(src: &[f64], dst: &mut TensorMut<'_>, start: usize) -> bool {
        let end = start + src.len();
        match dst {
            TensorMut::F16(d) => {
                for (o, &v) in d[start..end].iter_mut().zip(src) {
                    *o = half::f16::from_f64(v).to_bits();
                }
            }
            TensorMut::BF16(d) => {
                for (o, &v) in d[start..end].iter_mut().zip(src) {
                    *o = half::bf16::from_f64(v).to_bits();
                }
            }
            TensorMut::F32(d) => {
                for (o, &v) in d[start..end].iter_mut().zip(src) {
                    *o = v as f32;
                }
            }
            TensorMut::F64(d) => d[start..end].copy_from_slice(src),
        }
        finite_in(dst, start, end)
    }
}

/// Whether `dst[start..end]` holds finite values only (half types by their exponent bits);
/// folded without an early exit, so that it vectorises.
#[inline(always)]
fn finite_in(dst: &TensorMut<'_>, start: usize, end: usize) -> bool {
    let all_set = |d: &[u16], e: u16| d.iter().fold(false, |any, &h| any | (h & e == e));
    !match dst {
        TensorMut::F16(d) => all_set(&d[start..end], 0x7c00),
        TensorMut::BF16(d) => all_set(&d[start..end], 0x7f80),
        TensorMut::F32(d) => d[start..end]
            .iter()
            .fold(false, |any, v| any | !v.is_finite()),
        TensorMut::F64(d) => d[start..end]
            .iter()
            .fold(false, |any, v| any | !v.is_finite()),
    }
}

/// f32 to float16 bits, eight at a time, rounded to nearest even (as `half::f16::from_f32`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
fn f32_to_f16_f16c(src: &[f32], dst: &mut [u16]) {
    use std::arch::x86_64::{
        __m128i, _mm256_cvtps_ph, _mm256_loadu_ps, _mm_storeu_si128, _MM_FROUND_TO_NEAREST_INT,
    };
    let mut s8 = src.chunks_exact(8);
    let mut d8 = dst.chunks_exact_mut(8);
    for (s, d) in (&mut s8).zip(&mut d8) {
        // SAFETY: `s` holds 8 f32 (32 bytes) to read and `d` 8 u16 (16 bytes) to write; the
        // loads and stores are unaligned.
        unsafe {
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(s.as_ptr()));
            _mm_storeu_si128(d.as_mut_ptr() as *mut __m128i, h);
        }
    }
    for (d, &v) in d8.into_remainder().iter_mut().zip(s8.remainder()) {
        *d = half::f16::from_f32(v).to_bits();
    }
}
