//! Exact arithmetic on two ternary vectors with popcounts over their bitmasks.
//!
//! For a = sa * (Pa - Na) and b = sb * (Pb - Nb) with disjoint masks:
//! dot = sa * sb * (|Pa&Pb| + |Na&Nb| - |Pa&Nb| - |Na&Pb|), and the number of positions whose
//! ternary values differ is |(Pa^Pb) | (Na^Nb)|. The counting kernel has a scalar path, a POPCNT
//! path and an AVX2 path (nibble lookup), picked at run time; tests check that they agree.

use rayon::prelude::*;

use crate::codec::Compressed;
use crate::error::{Error, Result};

/// The five popcounts that all the ops derive from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub pp: u64,
    pub nn: u64,
    pub pn: u64,
    pub np: u64,
    pub diff: u64,
}

impl std::ops::Add for Counts {
    type Output = Counts;
    fn add(self, o: Counts) -> Counts {
        Counts {
            pp: self.pp + o.pp,
            nn: self.nn + o.nn,
            pn: self.pn + o.pn,
            np: self.np + o.np,
            diff: self.diff + o.diff,
        }
    }
}

/// Which kernel [`counts`] uses on this CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    Scalar,
    Popcnt,
    Avx2,
}

pub fn best_kernel() -> Kernel {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            return Kernel::Avx2;
        }
        if std::is_x86_feature_detected!("popcnt") {
            return Kernel::Popcnt;
        }
    }
    Kernel::Scalar
}

#[inline(always)]
fn counts_words(pa: &[u64], na: &[u64], pb: &[u64], nb: &[u64]) -> Counts {
    let mut c = Counts::default();
    for i in 0..pa.len() {
        let (p, n, q, m) = (pa[i], na[i], pb[i], nb[i]);
        c.pp += (p & q).count_ones() as u64;
        c.nn += (n & m).count_ones() as u64;
        c.pn += (p & m).count_ones() as u64;
        c.np += (n & q).count_ones() as u64;
        c.diff += ((p ^ q) | (n ^ m)).count_ones() as u64;
    }
    c
}

fn counts_scalar(pa: &[u64], na: &[u64], pb: &[u64], nb: &[u64]) -> Counts {
    counts_words(pa, na, pb, nb)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "popcnt")]
fn counts_popcnt(pa: &[u64], na: &[u64], pb: &[u64], nb: &[u64]) -> Counts {
    counts_words(pa, na, pb, nb)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn counts_avx2(pa: &[u64], na: &[u64], pb: &[u64], nb: &[u64]) -> Counts {
    use std::arch::x86_64::*;
    let n4 = pa.len() / 4;
    // SAFETY: every load reads 4 words at an index below n4 * 4 <= len of all four slices, which
    // the caller made equal; unaligned loads need no alignment.
    unsafe {
        let lut = _mm256_setr_epi8(
            0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2,
            3, 3, 4,
        );
        let low = _mm256_set1_epi8(0x0f);
        let zero = _mm256_setzero_si256();
        // Byte counts per 32-byte lane, summed into four u64 lanes with vpsadbw.
        let pc = |v: __m256i| -> __m256i {
            let lo = _mm256_shuffle_epi8(lut, _mm256_and_si256(v, low));
            let hi = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v, 4), low));
            _mm256_sad_epu8(_mm256_add_epi8(lo, hi), zero)
        };
        let (mut app, mut ann, mut apn, mut anp, mut adf) = (zero, zero, zero, zero, zero);
        for i in 0..n4 {
            let p = _mm256_loadu_si256(pa.as_ptr().add(i * 4) as *const __m256i);
            let n = _mm256_loadu_si256(na.as_ptr().add(i * 4) as *const __m256i);
            let q = _mm256_loadu_si256(pb.as_ptr().add(i * 4) as *const __m256i);
            let m = _mm256_loadu_si256(nb.as_ptr().add(i * 4) as *const __m256i);
            app = _mm256_add_epi64(app, pc(_mm256_and_si256(p, q)));
            ann = _mm256_add_epi64(ann, pc(_mm256_and_si256(n, m)));
            apn = _mm256_add_epi64(apn, pc(_mm256_and_si256(p, m)));
            anp = _mm256_add_epi64(anp, pc(_mm256_and_si256(n, q)));
            adf = _mm256_add_epi64(
                adf,
                pc(_mm256_or_si256(
                    _mm256_xor_si256(p, q),
                    _mm256_xor_si256(n, m),
                )),
            );
        }
        let sum = |v: __m256i| -> u64 {
            let mut a = [0u64; 4];
            _mm256_storeu_si256(a.as_mut_ptr() as *mut __m256i, v);
            a.iter().sum()
        };
        let head = Counts {
            pp: sum(app),
            nn: sum(ann),
            pn: sum(apn),
            np: sum(anp),
            diff: sum(adf),
        };
        let k = n4 * 4;
        head + counts_words(&pa[k..], &na[k..], &pb[k..], &nb[k..])
    }
}

/// The five counts with a chosen kernel (slices must have equal lengths).
pub fn counts_with(kernel: Kernel, pa: &[u64], na: &[u64], pb: &[u64], nb: &[u64]) -> Counts {
    assert!(pa.len() == na.len() && pa.len() == pb.len() && pa.len() == nb.len());
    match kernel {
        Kernel::Scalar => counts_scalar(pa, na, pb, nb),
        #[cfg(target_arch = "x86_64")]
        Kernel::Popcnt if std::is_x86_feature_detected!("popcnt") => {
            // SAFETY: the CPU supports POPCNT (checked just above).
            unsafe { counts_popcnt(pa, na, pb, nb) }
        }
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 if std::is_x86_feature_detected!("avx2") => {
            // SAFETY: the CPU supports AVX2 (checked just above).
            unsafe { counts_avx2(pa, na, pb, nb) }
        }
        _ => counts_scalar(pa, na, pb, nb),
    }
}

/// The five counts with the best kernel, split across threads.
pub fn counts(pa: &[u64], na: &[u64], pb: &[u64], nb: &[u64]) -> Counts {
    let k = best_kernel();
    const W: usize = 1 << 14;
    pa.par_chunks(W)
        .zip(na.par_chunks(W))
        .zip(pb.par_chunks(W).zip(nb.par_chunks(W)))
        .map(|((p, n), (q, m))| counts_with(k, p, n, q, m))
        .reduce(Counts::default, |a, b| a + b)
}

fn check_shapes(a: &Compressed, b: &Compressed) -> Result<()> {
    if a.shape != b.shape {
        return Err(Error::InvalidArgument(format!(
            "shapes differ: {:?} and {:?}; both operands must describe the same tensor",
            a.shape, b.shape
        )));
    }
    Ok(())
}

fn pair_counts(a: &Compressed, b: &Compressed) -> Result<Counts> {
    check_shapes(a, b)?;
    let (ma, mb) = (a.masks()?, b.masks()?);
    Ok(counts(&ma.pos, &ma.neg, &mb.pos, &mb.neg))
}

/// Dot product of the two decoded vectors (in f64), exactly sa * sb * (matches - mismatches).
pub fn dot(a: &Compressed, b: &Compressed) -> Result<f64> {
    let c = pair_counts(a, b)?;
    Ok(a.scale * b.scale * (c.pp as f64 + c.nn as f64 - c.pn as f64 - c.np as f64))
}

/// Number of positions where the decoded ternary values (-1, 0, +1 times the scale) differ; a
/// stream with scale 0 counts as all zero.
pub fn hamming(a: &Compressed, b: &Compressed) -> Result<u64> {
    // A stream with scale 0 decodes to zeros whatever pattern it stores (a constant tensor has
    // sigma 0), so its pattern must not count; dot and cosine are 0 there by their formulas.
    match (a.scale == 0.0, b.scale == 0.0) {
        (false, false) => Ok(pair_counts(a, b)?.diff),
        (za, zb) => {
            check_shapes(a, b)?;
            Ok(if za { 0 } else { a.nnz } + if zb { 0 } else { b.nnz })
        }
    }
}

/// Cosine similarity of the decoded vectors; 0 when either is all zero (no direction).
pub fn cosine(a: &Compressed, b: &Compressed) -> Result<f64> {
    let c = pair_counts(a, b)?;
    if a.nnz == 0 || b.nnz == 0 || a.scale == 0.0 || b.scale == 0.0 {
        return Ok(0.0);
    }
    let num = c.pp as f64 + c.nn as f64 - c.pn as f64 - c.np as f64;
    Ok(num / ((a.nnz as f64) * (b.nnz as f64)).sqrt())
}
