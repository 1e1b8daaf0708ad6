//! The arithmetic of the "pair" scale rule (python/compeft_rs/_scale.py decides which tensors
//! pair and what scale follows). For a LoRA pair, A (r x n) and B (m x r), the squared Frobenius
//! norm of the product the model applies, from the dense factors and from the kept signs,
//! through r x r Gram matrices, never the m x n product:
//!
//! ||BA||^2 = tr(B A A^T B^T) = sum_ij (B^T B)_ij (A A^T)_ij.
//!
//! The sign Grams are exact integers: the kept entries are walked into per-line bitsets (no
//! dense decode) and entry (i, j) is |Pi&Pj| + |Ni&Nj| - |Pi&Nj| - |Ni&Pj|. The dense Grams of
//! float16, bfloat16 and float32 factors are accumulated in f32 (precision: [`CHUNK`]); float64
//! factors stay in f64 throughout.

use rayon::prelude::*;

use crate::codec::Compressed;
use crate::dtype::Tensor;
use crate::error::{Error, Result};

/// Entries per line in one f32 accumulation chunk. Each chunk's sums go into f64; inside a chunk
/// every accumulator lane adds CHUNK / 16 = 16 products, so an entry of a Gram matrix computed
/// from float16/bfloat16 factors is off by at most 16 * 2^-24 (about 1e-6) of the sum of the
/// products' magnitudes ((|X||X|^T)_ij): products of two float16 or two bfloat16 values are
/// exact in f32 (22 and 16 significant bits), only the additions round. float32 factors add one
/// rounding per product (17 * 2^-24 in all). The rule takes a square root of ||BA||^2, halving
/// that relative error, and its scale multiplies float16 (2^-11) or bfloat16 (2^-8) outputs:
/// hundreds of times coarser. With exact products, fused (FMA) and separate multiply-adds give
/// the same sums, so half factors get the same Grams on every CPU.
pub const CHUNK: usize = 256;

/// The largest rank (lines of a Gram matrix) taken: an r x r matrix is allocated for it, and a
/// LoRA rank is a factor's small side (16 to a few hundred), so a larger one is a mistake in
/// the arguments, refused before anything is allocated.
pub const MAX_RANK: usize = 1 << 14;

/// Refuses a rank above [`MAX_RANK`].
pub(crate) fn check_rank(r: usize) -> Result<()> {
    if r > MAX_RANK {
        return Err(Error::InvalidArgument(format!(
            "a rank of {r} is beyond the {MAX_RANK} taken: pass the factors of a LoRA pair \
             (A: r x n, B: m x r) with their shapes"
        )));
    }
    Ok(())
}

/// Whether the CPU has AVX2, FMA and F16C, which the fast kernels of the Grams and of the
/// gauge (rust/src/gauge.rs) are compiled for.
pub(crate) fn fast_cpu() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Independent accumulators per dot product: lanes LLVM vectorises without reassociating.
const LANES: usize = 16;

/// Which lines of a row-major rows x cols matrix a Gram matrix is over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lines {
    /// The rows: X X^T (rows x rows), for lora_A (r x n).
    Rows,
    /// The columns: X^T X (cols x cols), for lora_B (m x r).
    Cols,
}

impl Lines {
    /// (number of lines, entries per line) of a rows x cols matrix.
    fn dims(self, rows: usize, cols: usize) -> (usize, usize) {
        match self {
            Lines::Rows => (rows, cols),
            Lines::Cols => (cols, rows),
        }
    }
}

/// A factor: a row-major rows x cols matrix.
#[derive(Clone, Copy, Debug)]
pub struct Factor<'a> {
    pub data: Tensor<'a>,
    pub rows: usize,
    pub cols: usize,
}

/// One LoRA pair: A (r x n) and B (m x r), with their compressed streams (of the same sizes).
#[derive(Clone, Copy, Debug)]
pub struct Pair<'a> {
    pub a: Factor<'a>,
    pub b: Factor<'a>,
    pub signs_a: &'a Compressed,
    pub signs_b: &'a Compressed,
}

/// Division by a fixed divisor through a 128-bit multiply (a u64 division per kept entry costs
/// as much as the walk that found it).
struct DivBy {
    d: u64,
    m: u128,
}

impl DivBy {
    fn new(d: u64) -> DivBy {
        let d = d.max(1);
        DivBy {
            d,
            m: (1u128 << 64) / d as u128 + 1,
        }
    }

    /// (n / d, n % d) for n < 2^63 (positions are below 2^48). With m = floor(2^64 / d) + 1,
    /// n * m / 2^64 = n / d + e with 0 < e < n / 2^64 < 1, so the estimate is the quotient or
    /// one above it.
    #[inline(always)]
    fn divmod(&self, n: u64) -> (u64, u64) {
        let mut q = ((n as u128 * self.m) >> 64) as u64;
        if q as u128 * self.d as u128 > n as u128 {
            q -= 1;
        }
        (q, n - q * self.d)
    }
}

/// The dot product of two lines of signs, each as disjoint positive and negative bitsets:
/// |Pi&Pj| + |Ni&Nj| - |Pi&Nj| - |Ni&Pj|, two popcounts per word (Pi&Pj and Ni&Nj are disjoint,
/// as Pi and Ni are, so the popcount of their union is the sum).
fn sign_dot(pi: &[u64], ni: &[u64], pj: &[u64], nj: &[u64]) -> i64 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("popcnt") {
            // SAFETY: the CPU supports AVX2 and POPCNT (checked just above).
            return unsafe { sign_dot_avx2(pi, ni, pj, nj) };
        }
        if std::is_x86_feature_detected!("popcnt") {
            // SAFETY: the CPU supports POPCNT (checked just above).
            return unsafe { sign_dot_popcnt(pi, ni, pj, nj) };
        }
    }
    sign_dot_words(pi, ni, pj, nj)
}

#[inline(always)]
fn sign_dot_words(pi: &[u64], ni: &[u64], pj: &[u64], nj: &[u64]) -> i64 {
    let (mut same, mut differ) = (0u64, 0u64);
    for (((&p, &n), &q), &m) in pi.iter().zip(ni).zip(pj).zip(nj) {
        same += ((p & q) | (n & m)).count_ones() as u64;
        differ += ((p & m) | (n & q)).count_ones() as u64;
    }
    same as i64 - differ as i64
}

// LLVM vectorises the popcounts of `sign_dot_words` with AVX2 (nibble lookups).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,popcnt")]
fn sign_dot_avx2(pi: &[u64], ni: &[u64], pj: &[u64], nj: &[u64]) -> i64 {
    sign_dot_words(pi, ni, pj, nj)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "popcnt")]
fn sign_dot_popcnt(pi: &[u64], ni: &[u64], pj: &[u64], nj: &[u64]) -> i64 {
    sign_dot_words(pi, ni, pj, nj)
}

/// ||BA||^2 of one pair: `dense` from the factors, `signs` from the kept signs (the product of
/// the two ternary matrices; an exact integer, rounded to f64 once).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PairNorms {
    pub dense: f64,
    pub signs: f64,
}

pub(crate) fn check_factor(f: &Factor<'_>, what: &str) -> Result<()> {
    match f.rows.checked_mul(f.cols) {
        Some(n) if n == f.data.len() => Ok(()),
        _ => Err(Error::InvalidArgument(format!(
            "{what} is given as {} x {} but holds {} entries; pass its data flat, row-major, \
             with its (rows, cols)",
            f.rows,
            f.cols,
            f.data.len()
        ))),
    }
}

/// The Gram matrix (r x r, row-major, symmetric) of the lines of `f`: X X^T for
/// [`Lines::Rows`], X^T X for [`Lines::Cols`].
pub fn gram(f: Factor<'_>, lines: Lines) -> Result<Vec<f64>> {
    gram_on(f, lines, true)
}

/// [`gram`] without AVX2, FMA or F16C even where the CPU has them (for tests of that path).
#[doc(hidden)]
pub fn gram_portable(f: Factor<'_>, lines: Lines) -> Result<Vec<f64>> {
    gram_on(f, lines, false)
}

fn gram_on(f: Factor<'_>, lines: Lines, fast: bool) -> Result<Vec<f64>> {
    check_factor(&f, "the factor")?;
    let (r, len) = lines.dims(f.rows, f.cols);
    check_rank(r)?;
    let mut g = vec![0f64; r * r];
    if r == 0 || len == 0 {
        return Ok(g);
    }
    match f.data {
        Tensor::F64(_) => gram_chunks::<f64>(f, lines, &mut g, fast),
        _ => gram_chunks::<f32>(f, lines, &mut g, fast),
    }
    for i in 0..r {
        for j in 0..i {
            g[i * r + j] = g[j * r + i];
        }
    }
    Ok(g)
}

/// The element types the dense Grams accumulate in.
pub(crate) trait Elem: Copy + Send + Sync + 'static {
    const ZERO: Self;
    /// a * b + c, fused when `FUSED` (only where the CPU has FMA).
    fn madd<const FUSED: bool>(a: Self, b: Self, c: Self) -> Self;
    fn to_f64(self) -> f64;
    /// Whether [`f32_safe`] holds for a chunk (always for f64).
    fn in_f32_range(buf: &[Self], r: usize, wp: usize) -> bool;
    /// Converts `src[start..start + dst.len()]` into `dst` (with F16C when `FAST`).
    fn fill<const FAST: bool>(src: Tensor<'_>, start: usize, dst: &mut [Self]);
}

impl Elem for f32 {
    const ZERO: f32 = 0.0;
    #[inline(always)]
    fn madd<const FUSED: bool>(a: f32, b: f32, c: f32) -> f32 {
        if FUSED {
            a.mul_add(b, c)
        } else {
            a * b + c
        }
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn in_f32_range(buf: &[f32], r: usize, wp: usize) -> bool {
        f32_safe(buf, r, wp)
    }
    #[inline(always)]
    fn fill<const FAST: bool>(src: Tensor<'_>, start: usize, dst: &mut [f32]) {
        let end = start + dst.len();
        match src {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: FAST is only set where the CPU has F16C (see `gram_chunks`).
            Tensor::F16(s) if FAST => unsafe { f16_to_f32_f16c(&s[start..end], dst) },
            Tensor::F16(s) => {
                for (d, &h) in dst.iter_mut().zip(&s[start..end]) {
                    *d = half::f16::from_bits(h).to_f32();
                }
            }
            // bfloat16 is the top half of an f32: a shift (half's slice conversion of bf16 is a
            // scalar loop).
            Tensor::BF16(s) => {
                for (d, &b) in dst.iter_mut().zip(&s[start..end]) {
                    *d = f32::from_bits((b as u32) << 16);
                }
            }
            Tensor::F32(s) => dst.copy_from_slice(&s[start..end]),
            Tensor::F64(s) => {
                for (d, &v) in dst.iter_mut().zip(&s[start..end]) {
                    *d = v as f32;
                }
            }
        }
    }
}

/// float16 bits to f32, eight at a time (half's slice conversion calls a function per eight
/// values; inlined here, this is about 3x faster).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
pub(crate) fn f16_to_f32_f16c(src: &[u16], dst: &mut [f32]) {
    use std::arch::x86_64::{__m128i, _mm256_cvtph_ps, _mm256_storeu_ps, _mm_loadu_si128};
    let mut s8 = src.chunks_exact(8);
    let mut d8 = dst.chunks_exact_mut(8);
    for (s, d) in (&mut s8).zip(&mut d8) {
        // SAFETY: `s` holds 8 u16 (16 bytes) to read and `d` 8 f32 (32 bytes) to write; the
        // loads and stores are unaligned.
        unsafe {
            let h = _mm_loadu_si128(s.as_ptr() as *const __m128i);
            _mm256_storeu_ps(d.as_mut_ptr(), _mm256_cvtph_ps(h));
        }
    }
    for (d, &h) in d8.into_remainder().iter_mut().zip(s8.remainder()) {
        *d = half::f16::from_bits(h).to_f32();
    }
}

impl Elem for f64 {
    const ZERO: f64 = 0.0;
    #[inline(always)]
    fn madd<const FUSED: bool>(a: f64, b: f64, c: f64) -> f64 {
        if FUSED {
            a.mul_add(b, c)
        } else {
            a * b + c
        }
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn in_f32_range(_: &[f64], _: usize, _: usize) -> bool {
        true
    }
    #[inline(always)]
    fn fill<const FAST: bool>(src: Tensor<'_>, start: usize, dst: &mut [f64]) {
        let end = start + dst.len();
        match src {
            Tensor::F64(s) => dst.copy_from_slice(&s[start..end]),
            Tensor::F32(s) => {
                for (d, &v) in dst.iter_mut().zip(&s[start..end]) {
                    *d = v as f64;
                }
            }
            Tensor::F16(s) => {
                for (d, &b) in dst.iter_mut().zip(&s[start..end]) {
                    *d = half::f16::from_bits(b).to_f64();
                }
            }
            Tensor::BF16(s) => {
                for (d, &b) in dst.iter_mut().zip(&s[start..end]) {
                    *d = f32::from_bits((b as u32) << 16) as f64;
                }
            }
        }
    }
}

/// Whether the f32 sums of a chunk can neither overflow nor lose a line to underflow: every
/// line's largest magnitude is 0 or within [2^-50, 2^56] (products at most 2^112, sums of 256 of
/// them far below f32's 2^128; a line's largest products at least 2^-100, far above the f32
/// subnormals at 2^-126, so whatever underflows is below 2^-26 of them). float16 is always
/// within (its range is 2^-24 to 2^16); bfloat16 and float32 share f32's range, so a chunk
/// outside it goes through f64 instead. A NaN is outside too (and stays a NaN in f64).
#[inline(always)]
fn f32_safe(buf: &[f32], r: usize, wp: usize) -> bool {
    const LO: u32 = (1.0 / (1u64 << 50) as f32).to_bits();
    const HI: u32 = ((1u64 << 56) as f32).to_bits();
    (0..r).all(|i| {
        let line = &buf[i * CHUNK..i * CHUNK + wp];
        let m = line
            .iter()
            .fold(0u32, |m, &v| m.max(v.to_bits() & 0x7fff_ffff));
        m == 0 || (LO..=HI).contains(&m)
    })
}

/// Adds the Gram of `f`'s lines into the upper triangle of `g` (r x r), CHUNK entries per line
/// at a time, each chunk converted to `T` (and, for the lines of columns, transposed) first;
/// compiled for AVX2, FMA and F16C where the CPU has them.
fn gram_chunks<T: Elem>(f: Factor<'_>, lines: Lines, g: &mut [f64], fast: bool) {
    #[cfg(target_arch = "x86_64")]
    if fast && fast_cpu() {
        // SAFETY: the CPU supports AVX2, FMA and F16C (checked just above).
        unsafe { gram_chunks_fast::<T>(f, lines, g) };
        return;
    }
    gram_chunks_with::<T, false>(f, lines, g)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn gram_chunks_fast<T: Elem>(f: Factor<'_>, lines: Lines, g: &mut [f64]) {
    gram_chunks_with::<T, true>(f, lines, g)
}

/// [`gram_chunks`]; `FAST`: fused multiply-adds and F16C conversions.
#[inline(always)]
fn gram_chunks_with<T: Elem, const FAST: bool>(f: Factor<'_>, lines: Lines, g: &mut [f64]) {
    let (r, len) = lines.dims(f.rows, f.cols);
    let mut buf = vec![T::ZERO; r * CHUNK];
    // Lines of columns: CHUNK rows of f as they lie, transposed into `buf` after.
    let mut rows = match lines {
        Lines::Rows => Vec::new(),
        Lines::Cols => vec![T::ZERO; CHUNK * f.cols],
    };
    let check_range = matches!(f.data, Tensor::BF16(_) | Tensor::F32(_));
    let mut wide: Vec<f64> = Vec::new();
    for k0 in (0..len).step_by(CHUNK) {
        let w = CHUNK.min(len - k0);
        // Zero padding up to a whole number of lanes: zeros add nothing.
        let wp = w.div_ceil(LANES) * LANES;
        match lines {
            Lines::Rows => {
                for i in 0..r {
                    let line = &mut buf[i * CHUNK..i * CHUNK + wp];
                    T::fill::<FAST>(f.data, i * f.cols + k0, &mut line[..w]);
                    line[w..].fill(T::ZERO);
                }
            }
            Lines::Cols => {
                let src = &mut rows[..w * f.cols];
                T::fill::<FAST>(f.data, k0 * f.cols, src);
                transpose(src, f.cols, w, &mut buf);
                for line in buf.chunks_exact_mut(CHUNK) {
                    line[w..wp].fill(T::ZERO);
                }
            }
        }
        if check_range && !T::in_f32_range(&buf, r, wp) {
            wide.clear();
            wide.extend(buf.iter().map(|v| v.to_f64()));
            chunk_gram_of::<f64, FAST>(&wide, r, wp, g);
        } else {
            chunk_gram_of::<T, FAST>(&buf, r, wp, g);
        }
    }
}

/// `src` (w rows of `cols`) transposed into the first w entries of `cols` lines CHUNK apart in
/// `buf`, eight rows at a time (a line's eight entries are stored together: twice as fast as
/// one entry at a time).
#[inline(always)]
fn transpose<T: Elem>(src: &[T], cols: usize, w: usize, buf: &mut [T]) {
    let mut k = 0;
    while k + 8 <= w {
        let tile = &src[k * cols..(k + 8) * cols];
        for (i, line) in buf.chunks_exact_mut(CHUNK).take(cols).enumerate() {
            for (t, d) in line[k..k + 8].iter_mut().enumerate() {
                *d = tile[t * cols + i];
            }
        }
        k += 8;
    }
    for (t, row) in src[k * cols..w * cols].chunks_exact(cols).enumerate() {
        for (i, &v) in row.iter().enumerate() {
            buf[i * CHUNK + k + t] = v;
        }
    }
}

/// [`chunk_gram`] out of line: inlined into the loop over chunks, its accumulators spill.
#[inline(always)]
fn chunk_gram_of<T: Elem, const FAST: bool>(buf: &[T], r: usize, wp: usize, g: &mut [f64]) {
    #[cfg(target_arch = "x86_64")]
    if FAST {
        // SAFETY: FAST is only set where the CPU has AVX2 and FMA (see `gram_chunks`).
        unsafe { chunk_gram_fma(buf, r, wp, g) };
        return;
    }
    chunk_gram_plain(buf, r, wp, g)
}

#[inline(never)]
fn chunk_gram_plain<T: Elem>(buf: &[T], r: usize, wp: usize, g: &mut [f64]) {
    chunk_gram::<T, false>(buf, r, wp, g)
}

#[cfg(target_arch = "x86_64")]
#[inline(never)]
#[target_feature(enable = "avx2,fma")]
fn chunk_gram_fma<T: Elem>(buf: &[T], r: usize, wp: usize, g: &mut [f64]) {
    chunk_gram::<T, true>(buf, r, wp, g)
}

/// Adds the dot products of lines i <= j of one chunk (`r` lines of `wp` entries, CHUNK apart)
/// into `g`, one line against four others at a time: the line's lanes are loaded once for four
/// dots.
#[inline(always)]
fn chunk_gram<T: Elem, const FUSED: bool>(buf: &[T], r: usize, wp: usize, g: &mut [f64]) {
    let line = |i: usize| &buf[i * CHUNK..i * CHUNK + wp];
    let lanes_sum = |acc: &[T; LANES]| acc.iter().map(|v| v.to_f64()).sum::<f64>();
    for i in 0..r {
        let x = line(i);
        let mut j = i;
        while j + 4 <= r {
            let (y0, y1, y2, y3) = (line(j), line(j + 1), line(j + 2), line(j + 3));
            let mut acc = [[T::ZERO; LANES]; 4];
            let blocks = x
                .chunks_exact(LANES)
                .zip(y0.chunks_exact(LANES))
                .zip(y1.chunks_exact(LANES))
                .zip(y2.chunks_exact(LANES))
                .zip(y3.chunks_exact(LANES));
            for ((((xb, b0), b1), b2), b3) in blocks {
                for l in 0..LANES {
                    acc[0][l] = T::madd::<FUSED>(xb[l], b0[l], acc[0][l]);
                    acc[1][l] = T::madd::<FUSED>(xb[l], b1[l], acc[1][l]);
                    acc[2][l] = T::madd::<FUSED>(xb[l], b2[l], acc[2][l]);
                    acc[3][l] = T::madd::<FUSED>(xb[l], b3[l], acc[3][l]);
                }
            }
            for (q, a) in acc.iter().enumerate() {
                g[i * r + j + q] += lanes_sum(a);
            }
            j += 4;
        }
        for j in j..r {
            let mut acc = [T::ZERO; LANES];
            for (xb, yb) in x.chunks_exact(LANES).zip(line(j).chunks_exact(LANES)) {
                for l in 0..LANES {
                    acc[l] = T::madd::<FUSED>(xb[l], yb[l], acc[l]);
                }
            }
            g[i * r + j] += lanes_sum(&acc);
        }
    }
}

/// The factors' sizes against their shapes, A's rows against B's columns, and each stream's
/// size against its factor's.
fn check_pair(p: &Pair<'_>) -> Result<()> {
    check_factor(&p.a, "A (lora_A)")?;
    check_factor(&p.b, "B (lora_B)")?;
    check_rank(p.a.rows)?;
    if p.a.rows != p.b.cols {
        return Err(Error::InvalidArgument(format!(
            "A is {} x {} and B {} x {}: not a factor pair of one rank (A's rows must equal B's \
             columns)",
            p.a.rows, p.a.cols, p.b.rows, p.b.cols
        )));
    }
    for (c, f) in [(p.signs_a, &p.a), (p.signs_b, &p.b)] {
        if (f.rows as u64).checked_mul(f.cols as u64) != Some(c.numel()) {
            return Err(Error::InvalidArgument(format!(
                "a stream of {} entries is given as {} x {}; pass the shape of the tensor it \
                 was compressed from",
                c.numel(),
                f.rows,
                f.cols
            )));
        }
    }
    Ok(())
}

fn line_of(m: &[u64], words: usize, i: usize) -> &[u64] {
    &m[i * words..(i + 1) * words]
}

/// The Gram matrix (r x r, row-major, symmetric) of the lines of the kept signs of `c`, taken as
/// a rows x cols matrix of -1, 0, 1: exact integers, from popcounts over per-line bitsets.
pub fn sign_gram(c: &Compressed, rows: usize, cols: usize, lines: Lines) -> Result<Vec<i64>> {
    if rows.checked_mul(cols).map(|n| n as u64) != Some(c.numel()) {
        return Err(Error::InvalidArgument(format!(
            "a stream of {} entries is given as {rows} x {cols}; pass the shape of the tensor it \
             was compressed from",
            c.numel()
        )));
    }
    let (r, len) = lines.dims(rows, cols);
    let mut g = vec![0i64; r * r];
    if r == 0 || len == 0 {
        return Ok(g);
    }
    let words = len.div_ceil(64);
    let mut pos = vec![0u64; r * words];
    let mut neg = vec![0u64; r * words];
    let words64 = words as u64;
    let by_cols = DivBy::new(cols as u64);
    let mut stray = false;
    c.for_each_kept_run(|ps, signs| {
        for (i, &at) in ps.iter().enumerate() {
            let (row, col) = by_cols.divmod(at);
            let (line, k) = match lines {
                Lines::Rows => (row, col),
                Lines::Cols => (col, row),
            };
            let w = (line * words64 + k / 64) as usize;
            let set = if signs >> i & 1 == 1 {
                &mut neg
            } else {
                &mut pos
            };
            match set.get_mut(w) {
                Some(x) => *x |= 1u64 << (k % 64),
                None => stray = true,
            }
        }
    })?;
    if stray {
        return Err(Error::Malformed(
            "a kept position lies beyond the stream's entries".into(),
        ));
    }
    for i in 0..r {
        let (pi, ni) = (line_of(&pos, words, i), line_of(&neg, words, i));
        for j in i..r {
            let v = sign_dot(pi, ni, line_of(&pos, words, j), line_of(&neg, words, j));
            g[i * r + j] = v;
            g[j * r + i] = v;
        }
    }
    Ok(g)
}

/// ||BA||^2 of one pair, from the factors and from the kept signs. The factors and the
/// streams must have the same sizes, and A as many rows as B has columns (r).
pub fn pair_norms(p: &Pair<'_>) -> Result<PairNorms> {
    check_pair(p)?;
    let (dense, (sa, sb)) = rayon::join(
        || dense_norm(p),
        || {
            rayon::join(
                || sign_gram(p.signs_a, p.a.rows, p.a.cols, Lines::Rows),
                || sign_gram(p.signs_b, p.b.rows, p.b.cols, Lines::Cols),
            )
        },
    );
    let (sa, sb) = (sa?, sb?);
    // Each sign Gram entry is at most 2^48 in magnitude; their products need 128 bits.
    let signs = sa
        .iter()
        .zip(&sb)
        .map(|(&x, &y)| x as i128 * y as i128)
        .sum::<i128>() as f64;
    Ok(PairNorms {
        dense: dense?,
        signs,
    })
}

/// ||BA||^2 of one pair from the factors alone: [`pair_norms`]'s `dense`, the same value,
/// without the sign Grams (checks as [`pair_norms`]).
pub fn pair_dense_norm(p: &Pair<'_>) -> Result<f64> {
    check_pair(p)?;
    dense_norm(p)
}

fn dense_norm(p: &Pair<'_>) -> Result<f64> {
    let (ga, gb) = rayon::join(|| gram(p.a, Lines::Rows), || gram(p.b, Lines::Cols));
    let (ga, gb) = (ga?, gb?);
    Ok(ga.iter().zip(&gb).map(|(x, y)| x * y).sum())
}

/// <S_B S_A, B A>: the product of the kept signs (S_A, S_B as matrices of -1, 0, 1) against
/// the product of the factors, for the "pair_proj" rule. Through two r x r cross-Grams,
/// tr((S_B^T B)(A S_A^T)), each summed over the kept entries only: a kept (i, p) of B adds
/// its sign times row i of B to row p of S_B^T B, a kept (q, j) of A adds its sign times column
/// j of A to column q of A S_A^T. In f64 from the factors' own values (half factors widened to
/// f32 once, exactly, rather than entry by entry). Checks as [`pair_norms`].
pub fn pair_cross(p: &Pair<'_>) -> Result<f64> {
    pair_cross_in(p, &mut Vec::new())
}

/// Half factors up to this many entries are widened into scratch space (4 bytes an entry, per
/// worker); larger ones (an embedding's lora_embedding_A) are read entry by entry.
const WIDEN_MAX: usize = 1 << 22;

/// A factor's values as f64, through the cheapest view at hand.
enum Values<'a> {
    F32(&'a [f32]),
    F64(&'a [f64]),
    F16(&'a [u16]),
    BF16(&'a [u16]),
}

impl<'a> Values<'a> {
    /// `x` as it lies (float32, float64), or widened into `scratch` (half types, up to
    /// [`WIDEN_MAX`] entries; reused from pair to pair: a fresh buffer costs page faults).
    fn of(x: Tensor<'a>, scratch: &'a mut Vec<f32>) -> Values<'a> {
        match x {
            Tensor::F32(s) => Values::F32(s),
            Tensor::F64(s) => Values::F64(s),
            Tensor::F16(s) if s.len() > WIDEN_MAX => Values::F16(s),
            Tensor::BF16(s) if s.len() > WIDEN_MAX => Values::BF16(s),
            _ => {
                scratch.resize(x.len(), 0.0);
                widen(x, scratch);
                Values::F32(scratch)
            }
        }
    }

    /// `f` with the values behind one [`Get`] type (so that its loops are compiled per type).
    fn with<R>(&self, f: impl GetFn<R>) -> R {
        match *self {
            Values::F32(s) => f.call(s),
            Values::F64(s) => f.call(s),
            Values::F16(s) => f.call(HalfBits::<false>(s)),
            Values::BF16(s) => f.call(HalfBits::<true>(s)),
        }
    }
}

/// Entry `i` of a factor as f64.
trait Get: Copy {
    fn get(self, i: usize) -> f64;

    /// out[t] += sign * entry (start + t), for t < out.len().
    #[inline(always)]
    fn add_line(self, start: usize, sign: f64, out: &mut [f64]) {
        for (t, o) in out.iter_mut().enumerate() {
            *o += sign * self.get(start + t);
        }
    }
}

impl Get for &[f32] {
    #[inline(always)]
    fn get(self, i: usize) -> f64 {
        self[i] as f64
    }

    // One bounds check for the line, so that the loop vectorises.
    #[inline(always)]
    fn add_line(self, start: usize, sign: f64, out: &mut [f64]) {
        let line = &self[start..start + out.len()];
        for (o, &v) in out.iter_mut().zip(line) {
            *o += sign * v as f64;
        }
    }
}

impl Get for &[f64] {
    #[inline(always)]
    fn get(self, i: usize) -> f64 {
        self[i]
    }

    #[inline(always)]
    fn add_line(self, start: usize, sign: f64, out: &mut [f64]) {
        let line = &self[start..start + out.len()];
        for (o, &v) in out.iter_mut().zip(line) {
            *o += sign * v;
        }
    }
}

/// float16 (`BF == false`) or bfloat16 bits, converted one by one.
#[derive(Clone, Copy)]
struct HalfBits<'a, const BF: bool>(&'a [u16]);

impl<const BF: bool> Get for HalfBits<'_, BF> {
    #[inline(always)]
    fn get(self, i: usize) -> f64 {
        if BF {
            f32::from_bits((self.0[i] as u32) << 16) as f64
        } else {
            half::f16::from_bits(self.0[i]).to_f64()
        }
    }
}

/// A function of any [`Get`] (a closure cannot be generic).
trait GetFn<R> {
    fn call<G: Get>(self, g: G) -> R;
}

/// B's side of [`pair_cross`]: a kept (i, p) of S_B adds its sign times row i of B (`r`
/// contiguous values) to row p of `out` = S_B^T B.
struct BSide<'a> {
    signs: &'a Compressed,
    m: usize,
    r: usize,
    out: &'a mut [f64],
}

impl GetFn<Result<()>> for BSide<'_> {
    fn call<G: Get>(self, g: G) -> Result<()> {
        let BSide { signs, m, r, out } = self;
        for_each_kept_signed(signs, m, r, |i, p, sign| {
            g.add_line(i * r, sign, &mut out[p * r..(p + 1) * r])
        })
    }
}

/// A's side of [`pair_cross`]: `out` = (A S_A^T)^T, entry (q, p) the sum over the kept (q, j)
/// of S_A of their signs times A[p][j]. The kept entries are first sorted into rows q (their
/// walk comes in no particular order); then each row p of A is read once, while it sits in
/// L1, against every row q of kept entries (reading A by columns, or a transposed copy of
/// it, took several times as long).
struct ASide<'a> {
    signs: &'a Compressed,
    r: usize,
    n: usize,
    out: &'a mut [f64],
}

impl GetFn<Result<()>> for ASide<'_> {
    fn call<G: Get>(self, g: G) -> Result<()> {
        let ASide { signs, r, n, out } = self;
        let mut kept: Vec<(u32, u32, f64)> = Vec::new();
        let mut starts = vec![0usize; r + 1];
        for_each_kept_signed(signs, r, n, |q, j, sign| {
            // q < r <= MAX_RANK and j < n < 2^32 (a factor of this rank holds r * n entries).
            kept.push((q as u32, j as u32, sign));
            starts[q + 1] += 1;
        })?;
        for q in 0..r {
            starts[q + 1] += starts[q];
        }
        let mut at = starts.clone();
        let mut by_row = vec![(0u32, 0f64); kept.len()];
        for &(q, j, sign) in &kept {
            by_row[at[q as usize]] = (j, sign);
            at[q as usize] += 1;
        }
        for p in 0..r {
            let row = p * n;
            for q in 0..r {
                let s: f64 = by_row[starts[q]..starts[q + 1]]
                    .iter()
                    .map(|&(j, sign)| sign * g.get(row + j as usize))
                    .sum();
                out[q * r + p] += s;
            }
        }
        Ok(())
    }
}

/// [`pair_cross`] with `scratch` for widened factors.
fn pair_cross_in(p: &Pair<'_>, scratch: &mut Vec<f32>) -> Result<f64> {
    check_pair(p)?;
    let r = p.a.rows;
    if r == 0 {
        return Ok(0.0);
    }
    let (m, n) = (p.b.rows, p.a.cols);
    let mut cb = vec![0f64; r * r]; // S_B^T B, row p = sum of the signed rows of B kept in column p
    let mut ca = vec![0f64; r * r]; // A S_A^T, column q = sum of the signed columns of A kept in row q
    Values::of(p.b.data, scratch).with(BSide {
        signs: p.signs_b,
        m,
        r,
        out: &mut cb,
    })?;
    Values::of(p.a.data, scratch).with(ASide {
        signs: p.signs_a,
        r,
        n,
        out: &mut ca,
    })?;
    // tr(CB CA) with CA stored transposed: sum_pq CB[p][q] * CA[q][p] = sum_pq cb[p][q] * ca_t[p][q].
    Ok(cb.iter().zip(&ca).map(|(x, y)| x * y).sum())
}

/// Calls `f(row, col, sign)` (sign -1.0 or 1.0) for each kept entry of `c` taken as a row-major
/// rows x cols matrix; a position past its last row is an error, not an index.
fn for_each_kept_signed(
    c: &Compressed,
    rows: usize,
    cols: usize,
    mut f: impl FnMut(usize, usize, f64),
) -> Result<()> {
    let by_cols = DivBy::new(cols as u64);
    let mut stray = false;
    c.for_each_kept_run(|ps, signs| {
        for (k, &at) in ps.iter().enumerate() {
            let (row, col) = by_cols.divmod(at);
            if row >= rows as u64 {
                stray = true;
                continue;
            }
            f(
                row as usize,
                col as usize,
                if signs >> k & 1 == 1 { -1.0 } else { 1.0 },
            );
        }
    })?;
    if stray {
        return Err(Error::Malformed(
            "a kept position lies beyond the stream's entries".into(),
        ));
    }
    Ok(())
}

/// A half-type factor as f32 (exact), with F16C where the CPU has it.
fn widen(x: Tensor<'_>, dst: &mut [f32]) {
    if fast_cpu() {
        // FAST is sound here: the CPU has AVX2 and F16C (checked just above).
        <f32 as Elem>::fill::<true>(x, 0, dst);
        return;
    }
    <f32 as Elem>::fill::<false>(x, 0, dst);
}

/// [`pair_cross`] of many pairs, in parallel. On an error the index of the pair comes with it.
pub fn pair_cross_many(pairs: &[Pair<'_>]) -> std::result::Result<Vec<f64>, (usize, Error)> {
    pairs
        .par_iter()
        .enumerate()
        .map_init(Vec::new, |scratch, (i, p)| {
            pair_cross_in(p, scratch).map_err(|e| (i, e))
        })
        .collect()
}

/// [`pair_norms`] of many pairs, in parallel. On an error the index of the pair comes with it.
pub fn pair_norms_many(pairs: &[Pair<'_>]) -> std::result::Result<Vec<PairNorms>, (usize, Error)> {
    per_pair(pairs, pair_norms)
}

/// [`pair_dense_norm`] of many pairs, in parallel. On an error the index of the pair comes with it.
pub fn pair_dense_norms_many(pairs: &[Pair<'_>]) -> std::result::Result<Vec<f64>, (usize, Error)> {
    per_pair(pairs, pair_dense_norm)
}

/// `f` of every pair, in parallel; on an error the index of the pair comes with it.
fn per_pair<T: Send>(
    pairs: &[Pair<'_>],
    f: impl Fn(&Pair<'_>) -> Result<T> + Sync,
) -> std::result::Result<Vec<T>, (usize, Error)> {
    pairs
        .par_iter()
        .enumerate()
        .map(|(i, p)| f(p).map_err(|e| (i, e)))
        .collect()
}
