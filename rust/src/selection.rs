//! Top-k selection by magnitude and the standard deviation, in O(d) without sorting.
//!
//! Magnitudes are compared as integer keys: for IEEE floats the bits of |x| order exactly like |x|.
//! A radix select walks 16-bit digits of the key from the top: one histogram pass per digit, each
//! restricted to the entries whose higher digits equal the prefix chosen so far. float16 and
//! bfloat16 keys have 15 bits, so one 2^15-bin histogram is exact; float32 takes two passes and
//! float64 four. Tensors of different dtypes selected together (global scope) are compared in the
//! widest key space they need (float32, or float64 if any is float64), where every value is exact.
//! A small tensor selected on its own ([`select_one`]) takes a path with histograms sized for it,
//! with the same result to the bit.
//!
//! The result is a [`Threshold`]: the key `t` of the n-th largest magnitude and how many entries
//! equal to `t` are still kept (`ties`), taken in row-major (and, across tensors, caller) order.

use half::{bf16, f16};
use rayon::prelude::*;

use crate::dtype::{DType, Elem, Tensor};
use crate::error::{Error, Result};

/// Elements per parallel work item in the passes over the data.
pub(crate) const PASS_CHUNK: usize = 1 << 16;

/// The integer space in which magnitudes are compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeySpace {
    F16,
    BF16,
    F32,
    F64,
}

impl KeySpace {
    /// The space in which tensors of these dtypes can be compared exactly.
    pub fn for_dtypes(dtypes: impl IntoIterator<Item = DType>) -> KeySpace {
        let mut first = None;
        let mut mixed = false;
        let mut any64 = false;
        for d in dtypes {
            any64 |= d == DType::F64;
            match first {
                None => first = Some(d),
                Some(f) if f != d => mixed = true,
                _ => {}
            }
        }
        match (first, mixed, any64) {
            (_, _, true) => KeySpace::F64,
            (Some(DType::F16), false, _) => KeySpace::F16,
            (Some(DType::BF16), false, _) => KeySpace::BF16,
            _ => KeySpace::F32,
        }
    }

    /// (shift, bits) of each radix level, most significant first.
    fn levels(self) -> &'static [(u32, u32)] {
        match self {
            KeySpace::F16 | KeySpace::BF16 => &[(0, 15)],
            KeySpace::F32 => &[(15, 16), (0, 15)],
            KeySpace::F64 => &[(47, 16), (31, 16), (15, 16), (0, 15)],
        }
    }

    /// The magnitude a key stands for (keys are the bits of |x| in this space).
    pub fn magnitude(self, key: u64) -> f64 {
        match self {
            KeySpace::F16 => f16::from_bits(key as u16).to_f64(),
            KeySpace::BF16 => bf16::from_bits(key as u16).to_f64(),
            KeySpace::F32 => f32::from_bits(key as u32) as f64,
            KeySpace::F64 => f64::from_bits(key),
        }
    }

    /// The key of +infinity: every key at or above it is Inf or NaN.
    pub(crate) fn inf_key(self) -> u64 {
        match self {
            KeySpace::F16 => 0x7c00,
            KeySpace::BF16 => 0x7f80,
            KeySpace::F32 => 0x7f80_0000,
            KeySpace::F64 => 0x7ff0_0000_0000_0000,
        }
    }
}

const MASK63: u64 = (1u64 << 63) - 1;

/// An unsigned integer key, as narrow as the key space allows so that comparisons vectorise wide.
pub(crate) trait Key: Copy + Ord + Send + Sync + 'static {
    fn to_u64(self) -> u64;
    /// The threshold in this width; `None` if it is above every key (keep nothing).
    fn narrow(t: u64) -> Option<Self>;
}

macro_rules! impl_key {
    ($($t:ty),*) => {$(
        impl Key for $t {
            #[inline(always)]
            fn to_u64(self) -> u64 {
                self as u64
            }
            #[inline(always)]
            fn narrow(t: u64) -> Option<Self> {
                <$t>::try_from(t).ok()
            }
        }
    )*};
}
impl_key!(u16, u32, u64);

/// Receives a tensor's elements together with the key function of the chosen space.
pub(crate) trait KeyVisitor {
    type Out;
    fn visit<T: Elem, U: Key, K: Fn(T) -> U + Copy + Send + Sync>(
        self,
        data: &[T],
        key: K,
    ) -> Self::Out;
}

/// Calls `v` with the monomorphised key function for (`t`'s dtype, `space`).
pub(crate) fn visit_keys<V: KeyVisitor>(t: Tensor<'_>, space: KeySpace, v: V) -> Result<V::Out> {
    Ok(match (t, space) {
        (Tensor::F16(s), KeySpace::F16) | (Tensor::BF16(s), KeySpace::BF16) => {
            v.visit(s, |x: u16| x & 0x7fff)
        }
        (Tensor::F16(s), KeySpace::F32) => v.visit(s, |x: u16| {
            f16::from_bits(x).to_f32().to_bits() & 0x7fff_ffff
        }),
        (Tensor::BF16(s), KeySpace::F32) => v.visit(s, |x: u16| ((x as u32) << 16) & 0x7fff_ffff),
        (Tensor::F32(s), KeySpace::F32) => v.visit(s, |x: f32| x.to_bits() & 0x7fff_ffff),
        (Tensor::F16(s), KeySpace::F64) => {
            v.visit(s, |x: u16| f16::from_bits(x).to_f64().to_bits() & MASK63)
        }
        (Tensor::BF16(s), KeySpace::F64) => {
            v.visit(s, |x: u16| bf16::from_bits(x).to_f64().to_bits() & MASK63)
        }
        (Tensor::F32(s), KeySpace::F64) => v.visit(s, |x: f32| (x as f64).to_bits() & MASK63),
        (Tensor::F64(s), KeySpace::F64) => v.visit(s, |x: f64| x.to_bits() & MASK63),
        (t, space) => {
            return Err(Error::InvalidArgument(format!(
                "a {} tensor cannot be compared in the {space:?} key space",
                t.dtype().name()
            )))
        }
    })
}

/// Count, mean and sum of squared deviations; merged with Chan et al.'s pairwise formula so that
/// the variance is accurate in f64 whatever the order and split of the data.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Moments {
    pub n: u64,
    pub mean: f64,
    pub m2: f64,
}

impl Moments {
    pub fn merge(self, o: Moments) -> Moments {
        if self.n == 0 {
            return o;
        }
        if o.n == 0 {
            return self;
        }
        let n = self.n + o.n;
        let delta = o.mean - self.mean;
        let (na, nb, nn) = (self.n as f64, o.n as f64, n as f64);
        Moments {
            n,
            mean: self.mean + delta * nb / nn,
            m2: self.m2 + o.m2 + delta * delta * na * nb / nn,
        }
    }

    /// Shifted sums over one chunk: exact enough in f64 and cheap per element.
    fn of_chunk(xs: impl Iterator<Item = f64> + Clone) -> Moments {
        let mut it = xs.clone();
        let Some(c) = it.next() else {
            return Moments::default();
        };
        let (mut n, mut s, mut q) = (0u64, 0.0f64, 0.0f64);
        for x in xs {
            let y = x - c;
            n += 1;
            s += y;
            q += y * y;
        }
        let nf = n as f64;
        Moments {
            n,
            mean: c + s / nf,
            m2: (q - s * s / nf).max(0.0),
        }
    }

    // Chunks of a fixed size, merged in order: a parallel `reduce` merges in a tree that depends
    // on the thread count and work stealing, and floating-point merging is not associative, so
    // sigma (and the stream's bytes) would depend on the machine.
    fn of_slice_f32(s: &[f32]) -> Moments {
        s.par_chunks(PASS_CHUNK / 4)
            .map(|c| Moments::of_chunk(c.iter().map(|&x| x as f64)))
            .collect::<Vec<_>>()
            .into_iter()
            .fold(Moments::default(), Moments::merge)
    }

    fn of_slice_f64(s: &[f64]) -> Moments {
        s.par_chunks(PASS_CHUNK / 4)
            .map(|c| Moments::of_chunk(c.iter().copied()))
            .collect::<Vec<_>>()
            .into_iter()
            .fold(Moments::default(), Moments::merge)
    }

    /// Moments of a small half-precision slice straight from the data, converted to f32 a block
    /// at a time (vectorised) and merged in order: cheaper than a 2^16-bin histogram when the
    /// slice holds fewer entries than the histogram has bins, and the same for every thread count.
    fn of_small_half(s: &[u16], dtype: DType) -> Moments {
        let bf = dtype == DType::BF16;
        let mut m = Moments::default();
        for c in s.chunks(1024) {
            let shift = half_to_f32(c[0], bf) as f64;
            let (sum, sq) = half_lanes(c, bf, shift);
            m = m.merge(Moments::from_lanes(c.len(), shift, sum, sq));
        }
        m
    }

    /// Moments of `n` entries from their lane sums of `y = x - c` and `y * y`, lanes combined in
    /// a fixed order.
    fn from_lanes(n: usize, c: f64, s: [f64; LANES], q: [f64; LANES]) -> Moments {
        let (s, q): (f64, f64) = (s.iter().sum(), q.iter().sum());
        let nf = n as f64;
        Moments {
            n: n as u64,
            mean: c + s / nf,
            m2: (q - s * s / nf).max(0.0),
        }
    }

    /// Two-pass moments from a histogram of all 2^16 bit patterns of a half type.
    fn of_half_histogram(hist: &[u64], to_f64: impl Fn(u16) -> f64) -> Moments {
        let (mut n, mut sum) = (0u64, 0.0f64);
        for (bits, &c) in hist.iter().enumerate() {
            if c > 0 {
                n += c;
                sum += c as f64 * to_f64(bits as u16);
            }
        }
        if n == 0 {
            return Moments::default();
        }
        let mean = sum / n as f64;
        let mut m2 = 0.0;
        for (bits, &c) in hist.iter().enumerate() {
            if c > 0 {
                let d = to_f64(bits as u16) - mean;
                m2 += c as f64 * d * d;
            }
        }
        Moments { n, mean, m2 }
    }
}

/// The unbiased standard deviation of `d` entries with these moments, as `torch.std`.
/// d = 0 gives 0; d = 1 has no unbiased estimate, and we use |x| (the single entry then decodes
/// to itself at alpha = 1) instead of NaN.
/// The spread of the data a scale rule may use: its standard deviation (the paper's sigma) and
/// its L2 norm.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    pub sigma: f64,
    pub norm: f64,
}

impl Spread {
    fn of(m: &Moments, single: Option<f64>) -> Spread {
        Spread {
            sigma: sigma_of(m, single),
            norm: (m.m2 + m.n as f64 * m.mean * m.mean).sqrt(),
        }
    }
}

pub fn sigma_of(m: &Moments, single: Option<f64>) -> f64 {
    match m.n {
        0 => 0.0,
        1 => single.map(f64::abs).unwrap_or(m.mean.abs()),
        n => (m.m2 / (n - 1) as f64).sqrt(),
    }
}

/// How many entries density `k` keeps out of `d`: floor(k*d + 0.5), at least 1 when d >= 1.
pub fn target_count(k: f64, d: u64) -> u64 {
    if d == 0 {
        return 0;
    }
    let n = (k * d as f64 + 0.5).floor() as u64;
    n.clamp(1, d)
}

/// Checks a density: a fraction in (0, 1].
pub fn check_density(k: f64) -> Result<()> {
    if k.is_finite() && k > 0.0 && k <= 1.0 {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "density k must be a fraction in (0, 1], got {k}; to keep 20% of the entries pass k=0.2"
        )))
    }
}

/// Checks a scale multiplier: finite and > 0.
pub fn check_alpha(alpha: f64) -> Result<()> {
    if alpha.is_finite() && alpha > 0.0 {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "alpha must be finite and > 0, got {alpha}; the paper's default is 1.0"
        )))
    }
}

/// The outcome of a selection: keep every entry with key > `key`, and the first `ties` entries
/// (in order) with key == `key`. `key == u64::MAX` keeps nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Threshold {
    pub space: KeySpace,
    pub key: u64,
    pub ties: u64,
}

impl Threshold {
    pub fn keep_nothing(space: KeySpace) -> Threshold {
        Threshold {
            space,
            key: u64::MAX,
            ties: 0,
        }
    }
}

/// Tensors up to this many entries are counted straight into the selector's histogram: a
/// parallel pass would allocate and zero a histogram per work item and one for the reduction
/// (2^16 u64 bins for float32's first level, 512 KiB), which for a LoRA factor costs more than
/// counting it.
const DIRECT_HIST: usize = 1 << 18;

/// One tensor's histogram pass, added into `hist` (2^bits bins).
struct HistPass<'a> {
    shift: u32,
    /// Entries count only if `key >> prefix_shift == prefix` (prefix_shift 64: all entries).
    prefix_shift: u32,
    prefix: u64,
    hist: &'a mut [u64],
}

impl KeyVisitor for HistPass<'_> {
    type Out = ();
    fn visit<T: Elem, U: Key, K: Fn(T) -> U + Copy + Send + Sync>(self, data: &[T], key: K) {
        let nbins = self.hist.len();
        let mask = (nbins - 1) as u64;
        let (shift, ps, prefix) = (self.shift, self.prefix_shift, self.prefix);
        let count = |h: &mut [u64], chunk: &[T]| {
            if ps >= 64 {
                for &x in chunk {
                    h[((key(x).to_u64() >> shift) & mask) as usize] += 1;
                }
            } else {
                for &x in chunk {
                    let k = key(x).to_u64();
                    if k >> ps == prefix {
                        h[((k >> shift) & mask) as usize] += 1;
                    }
                }
            }
        };
        if data.len() <= DIRECT_HIST {
            count(self.hist, data);
            return;
        }
        let h = data
            .par_chunks(PASS_CHUNK)
            .fold(
                || vec![0u64; nbins],
                |mut h, chunk| {
                    count(&mut h, chunk);
                    h
                },
            )
            .reduce(
                || vec![0u64; nbins],
                |mut a, b| {
                    a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                    a
                },
            );
        self.hist.iter_mut().zip(&h).for_each(|(a, b)| *a += b);
    }
}

/// Half-precision slices shorter than this take their moments from the data (vectorised) instead
/// of from a histogram of all 2^16 bit patterns, and per-tensor selection uses two small
/// histograms: measured faster up to 2^20 entries on 2 threads, slower from 2^22 (LoRA factors of
/// a 70B model have 2^17).
const SMALL_HALF: usize = 1 << 21;

/// Histogram of all 2^16 bit patterns of a half-precision slice.
fn half_histogram(s: &[u16]) -> Vec<u64> {
    s.par_chunks(PASS_CHUNK)
        .fold(
            || vec![0u64; 1 << 16],
            |mut h, chunk| {
                for &x in chunk {
                    h[x as usize] += 1;
                }
                h
            },
        )
        .reduce(
            || vec![0u64; 1 << 16],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                a
            },
        )
}

/// Incremental radix select over a sequence of tensors that may be fed in several passes (one per
/// level), so that data which never sits in memory at once (sharded checkpoints) can be selected.
///
/// Use: `feed` every tensor (always in the same order), then `finish_level`; repeat until it
/// returns true. The first level also accumulates the moments for sigma.
///
/// Several densities can share the first (most expensive) level: feed it once, then take
/// [`Selector::with_density`] for each k and finish those.
#[derive(Clone, Debug)]
pub struct Selector {
    space: KeySpace,
    d: u64,
    n: u64,
    level: usize,
    prefix: u64,
    remaining: u64,
    hist: Vec<u64>,
    moments: Moments,
    first_value: Option<f64>,
    /// Entries fed on the first level, and on the current level.
    fed: u64,
    fed_level: u64,
    /// Entries that share the prefix chosen so far: what a later level must count in all.
    in_prefix: u64,
    /// Set when `finish_level` returned true: feeding more is an error.
    closed: bool,
    result: Option<Threshold>,
}

impl Selector {
    /// `d` is the total number of entries that will be fed, `k` the density.
    pub fn new(space: KeySpace, d: u64, k: f64) -> Result<Selector> {
        check_density(k)?;
        let n = target_count(k, d);
        let bits = space.levels()[0].1;
        Ok(Selector {
            space,
            d,
            n,
            level: 0,
            prefix: 0,
            remaining: n,
            hist: vec![0; 1 << bits],
            moments: Moments::default(),
            first_value: None,
            fed: 0,
            fed_level: 0,
            in_prefix: d,
            closed: false,
            result: if n == 0 {
                Some(Threshold::keep_nothing(space))
            } else {
                None
            },
        })
    }

    /// A copy that selects density `k` instead, sharing the first-level histogram and moments
    /// already fed. Only valid after every tensor was fed on the first level, before
    /// `finish_level`.
    pub fn with_density(&self, k: f64) -> Result<Selector> {
        check_density(k)?;
        if self.level != 0 || self.fed != self.d || self.closed {
            return Err(Error::InvalidArgument(
                "with_density needs a selector whose first level is fully fed and not yet finished"
                    .into(),
            ));
        }
        let n = target_count(k, self.d);
        let mut s = self.clone();
        s.n = n;
        s.remaining = n;
        s.result = if n == 0 {
            Some(Threshold::keep_nothing(self.space))
        } else {
            None
        };
        Ok(s)
    }

    /// How many entries are kept in all: floor(k*d + 0.5) (fewer only if there are too few nonzeros).
    pub fn target(&self) -> u64 {
        self.n
    }

    pub fn is_done(&self) -> bool {
        self.result.is_some()
    }

    /// Feeds one tensor for the current level. On the first level a NaN or Inf is an error whose
    /// index is the flat position within this tensor.
    pub fn feed(&mut self, t: Tensor<'_>) -> Result<()> {
        if self.closed {
            return Err(Error::InvalidArgument(
                "the selection is finished (finish_level returned true); start a new Selector \
                 to select again"
                    .into(),
            ));
        }
        self.fed_level += t.len() as u64;
        let levels = self.space.levels();
        let (shift, _) = levels[self.level.min(levels.len() - 1)];
        if self.level == 0 {
            self.fed += t.len() as u64;
            if self.first_value.is_none() && !t.is_empty() {
                self.first_value = Some(t.get_f64(0));
            }
            // Half types: one histogram of all bit patterns gives both the moments and, in their
            // native key space, the exact level-0 magnitude histogram.
            let native = matches!(
                (t, self.space),
                (Tensor::F16(_), KeySpace::F16) | (Tensor::BF16(_), KeySpace::BF16)
            );
            match t {
                Tensor::F16(s) | Tensor::BF16(s) if s.len() < SMALL_HALF => {
                    self.moments = self.moments.merge(Moments::of_small_half(s, t.dtype()));
                    if native {
                        for &x in s {
                            self.hist[(x & 0x7fff) as usize] += 1;
                        }
                    }
                }
                Tensor::F16(s) | Tensor::BF16(s) => {
                    let full = half_histogram(s);
                    let m = if t.dtype() == DType::F16 {
                        Moments::of_half_histogram(&full, |b| f16::from_bits(b).to_f64())
                    } else {
                        Moments::of_half_histogram(&full, |b| bf16::from_bits(b).to_f64())
                    };
                    self.moments = self.moments.merge(m);
                    if native {
                        for (i, h) in self.hist.iter_mut().enumerate() {
                            *h += full[i] + full[i | 0x8000];
                        }
                    }
                }
                Tensor::F32(s) => self.moments = self.moments.merge(Moments::of_slice_f32(s)),
                Tensor::F64(s) => self.moments = self.moments.merge(Moments::of_slice_f64(s)),
            }
            if !native {
                visit_keys(
                    t,
                    self.space,
                    HistPass {
                        shift,
                        prefix_shift: 64,
                        prefix: 0,
                        hist: &mut self.hist,
                    },
                )?;
            }
            let inf_bin = (self.space.inf_key() >> shift) as usize;
            if self.hist[inf_bin..].iter().any(|&c| c > 0) {
                return Err(Error::NonFinite {
                    index: first_non_finite(t),
                });
            }
        } else {
            let prefix_shift = levels[self.level - 1].0;
            visit_keys(
                t,
                self.space,
                HistPass {
                    shift,
                    prefix_shift,
                    prefix: self.prefix,
                    hist: &mut self.hist,
                },
            )?;
        }
        Ok(())
    }

    /// Closes the current level; true when the threshold is known.
    pub fn finish_level(&mut self) -> Result<bool> {
        if self.level == 0 && self.fed != self.d {
            return Err(Error::InvalidArgument(format!(
                "the selector was told {} entries but fed {}",
                self.d, self.fed
            )));
        }
        if self.closed {
            return Ok(true);
        }
        if self.fed_level != self.d {
            return Err(Error::InvalidArgument(format!(
                "level {} was fed {} entries, the selector was told {}; feed every tensor on \
                 every level",
                self.level, self.fed_level, self.d
            )));
        }
        if self.result.is_some() {
            self.closed = true;
            return Ok(true);
        }
        let counted: u64 = self.hist.iter().sum();
        if counted != self.in_prefix {
            return Err(Error::InvalidArgument(format!(
                "level {} counted {counted} entries under the chosen prefix, the level before \
                 {}: the tensors fed on a later level differ from the first (same tensors, same \
                 order, unchanged)",
                self.level, self.in_prefix
            )));
        }
        self.fed_level = 0;
        let levels = self.space.levels();
        let (shift, _) = levels[self.level];
        // Walk bins from the largest magnitude down to the bin holding the n-th largest.
        let mut chosen = None;
        for b in (0..self.hist.len()).rev() {
            let c = self.hist[b];
            if c >= self.remaining {
                chosen = Some(b as u64);
                break;
            }
            self.remaining -= c;
        }
        let Some(b) = chosen else {
            return Err(Error::InvalidArgument(
                "the tensors fed on a later level differ from the first".into(),
            ));
        };
        self.in_prefix = self.hist[b as usize];
        self.prefix = (self.prefix << levels[self.level].1) | b;
        if self.level + 1 == levels.len() {
            let key = self.prefix << shift;
            // Zeros are never kept: their sign is 0.
            let ties = if key == 0 { 0 } else { self.remaining };
            self.result = Some(Threshold {
                space: self.space,
                key,
                ties,
            });
            self.closed = true;
            return Ok(true);
        }
        self.level += 1;
        self.hist = vec![0; 1 << levels[self.level].1];
        Ok(false)
    }

    pub fn threshold(&self) -> Option<Threshold> {
        self.result
    }

    /// Moments of everything fed on the first level.
    pub fn moments(&self) -> Moments {
        self.moments
    }

    /// The unbiased std of everything fed on the first level (see [`sigma_of`]).
    pub fn sigma(&self) -> f64 {
        sigma_of(&self.moments, self.first_value)
    }

    /// Sigma and L2 norm of everything fed in the first level.
    pub fn spread(&self) -> Spread {
        Spread::of(&self.moments, self.first_value)
    }
}

pub(crate) fn first_non_finite(t: Tensor<'_>) -> u64 {
    (0..t.len())
        .find(|&i| !t.get_f64(i).is_finite())
        .unwrap_or(0) as u64
}

/// Selects over tensors held in memory (in the given order); returns the threshold and sigma.
pub fn select(tensors: &[Tensor<'_>], k: f64) -> Result<(Threshold, f64)> {
    let space = KeySpace::for_dtypes(tensors.iter().map(|t| t.dtype()));
    let s = run_selector(tensors, space, k)?;
    Ok((
        s.threshold().expect("finished selector has a threshold"),
        s.sigma(),
    ))
}

fn run_selector(tensors: &[Tensor<'_>], space: KeySpace, k: f64) -> Result<Selector> {
    let d = tensors.iter().map(|t| t.len() as u64).sum();
    let mut s = Selector::new(space, d, k)?;
    loop {
        for &t in tensors {
            s.feed(t)?;
        }
        if s.finish_level()? {
            return Ok(s);
        }
    }
}

/// Per-tensor selection of a half-precision tensor shorter than 2^21 entries (a LoRA factor):
/// the same threshold and sigma as [`select`], from two small histograms that stay in L1 (256
/// bins on the top 8 bits of the magnitude, then 128 bins over the entries of the threshold's
/// bin) instead of one 2^15-bin table, which for such tensors costs more than the data.
/// float32 and float64 tensors shorter than 2^20 entries take a like path (one 2^11-bin histogram,
/// then an exact select within the threshold's bin). Falls back to [`select`] for other tensors.
pub fn select_one(t: Tensor<'_>, k: f64) -> Result<(Threshold, Spread)> {
    let (s, space) = match t {
        Tensor::F16(s) if s.len() < SMALL_HALF => (s, KeySpace::F16),
        Tensor::BF16(s) if s.len() < SMALL_HALF => (s, KeySpace::BF16),
        Tensor::F32(s) if s.len() < SMALL_WIDE => {
            return select_small_wide(t, s, k, KeySpace::F32);
        }
        Tensor::F64(s) if s.len() < SMALL_WIDE => {
            return select_small_wide(t, s, k, KeySpace::F64);
        }
        _ => {
            let s = run_selector(&[t], KeySpace::for_dtypes([t.dtype()]), k)?;
            let thr = s.threshold().expect("finished selector has a threshold");
            return Ok((thr, s.spread()));
        }
    };
    check_density(k)?;
    let spread = Spread::of(
        &Moments::of_small_half(s, t.dtype()),
        (!s.is_empty()).then(|| t.get_f64(0)),
    );
    // Four interleaved copies: a factor's magnitudes fall in a few bins, and increments of one
    // counter back to back would wait on each other.
    let coarse = interleaved_histogram::<256>(s, |x| ((x & 0x7fff) >> 7, 1));
    // Both half inf keys are multiples of 128: the bins from inf_key >> 7 up hold exactly the
    // non-finite entries.
    if coarse[(space.inf_key() >> 7) as usize..]
        .iter()
        .any(|&c| c != 0)
    {
        return Err(Error::NonFinite {
            index: first_non_finite(t),
        });
    }
    let n = target_count(k, s.len() as u64);
    if n == 0 {
        return Ok((Threshold::keep_nothing(space), spread));
    }
    // From the largest magnitudes down to the bin holding the n-th largest; `remaining` is then
    // how many of that bin's entries are kept.
    let walk = |hist: &[u32], remaining: &mut u64| -> usize {
        for b in (0..hist.len()).rev() {
            let c = u64::from(hist[b]);
            if c >= *remaining {
                return b;
            }
            *remaining -= c;
        }
        0 // unreachable: the bins hold all d >= n entries
    };
    let mut remaining = n;
    let top = walk(&coarse, &mut remaining);
    let top16 = top as u16;
    let fine = interleaved_histogram::<128>(s, |x| {
        let key = x & 0x7fff;
        // Counted as 0 outside the threshold's bin: no branch to mispredict.
        (key & 0x7f, u32::from(key >> 7 == top16))
    });
    let key = ((top << 7) | walk(&fine, &mut remaining)) as u64;
    // Zeros are never kept: their sign is 0.
    let ties = if key == 0 { 0 } else { remaining };
    Ok((Threshold { space, key, ties }, spread))
}

/// float32 and float64 tensors shorter than this select through [`select_small_wide`]: one
/// 2^11-bin histogram in L1 and an exact select among the entries of the threshold's bin, instead
/// of a 2^16-bin pass and one more per 15-16 bits of key, each allocated, zeroed and walked.
const SMALL_WIDE: usize = 1 << 20;

/// Bins of the small-tensor histogram for float32 and float64.
const WIDE_BINS: usize = 1 << 11;

/// Bins from here up hold every NaN and Inf (the bin of the float32 bits of +inf). In float32
/// they hold nothing else; in float64 also the finite magnitudes that round to inf in float32.
const WIDE_NONFINITE_BIN: usize = 0x7f80_0000 >> 20;

/// What the small-tensor path needs of a float32 or float64 element: its key in its own space,
/// its coarse bin and its value.
trait WideElem: Elem {
    type K: Key;
    fn key(self) -> Self::K;
    /// A bin that never decreases as the magnitude grows, so that every entry of a higher bin
    /// has a larger key: the float32 bits of |x| from the sign-free top: 8 exponent bits and 3
    /// of mantissa. float64 is rounded to float32 first (rounding is monotone), which keeps the
    /// resolution where the data are and folds the rest of the float64 range into the end bins.
    fn bin(self) -> usize;
    fn to_f64(self) -> f64;
}

impl WideElem for f32 {
    type K = u32;
    #[inline(always)]
    fn key(self) -> u32 {
        self.to_bits() & 0x7fff_ffff
    }
    #[inline(always)]
    fn bin(self) -> usize {
        ((self.to_bits() & 0x7fff_ffff) >> 20) as usize
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
}

impl WideElem for f64 {
    type K = u64;
    #[inline(always)]
    fn key(self) -> u64 {
        self.to_bits() & MASK63
    }
    #[inline(always)]
    fn bin(self) -> usize {
        ((self.abs() as f32).to_bits() >> 20) as usize
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
}

/// Moments of one chunk of `PASS_CHUNK / 4` entries with the arithmetic of [`Moments::of_chunk`]
/// (the same bits), and the chunk's coarse histogram counted in the same loop: the moment sums
/// are a chain of dependent adds, and the counting fits in the cycles they leave idle.
fn wide_chunk<T: WideElem>(c: &[T]) -> (Moments, Box<[u32; WIDE_BINS]>) {
    let mut h = Box::new([0u32; WIDE_BINS]);
    let Some(&first) = c.first() else {
        return (Moments::default(), h);
    };
    let c0 = first.to_f64();
    let (mut s, mut q) = (0.0f64, 0.0f64);
    for &x in c {
        let y = x.to_f64() - c0;
        s += y;
        q += y * y;
        h[x.bin() & (WIDE_BINS - 1)] += 1;
    }
    let nf = c.len() as f64;
    let m = Moments {
        n: c.len() as u64,
        mean: c0 + s / nf,
        m2: (q - s * s / nf).max(0.0),
    };
    (m, h)
}

/// Per-tensor selection of a float32 or float64 tensor shorter than [`SMALL_WIDE`]: the
/// threshold and spread of [`select`] to the bit. One pass gives the moments (in the chunks and
/// order of the large path) and a 2^11-bin histogram of coarse bins; the walk from the top finds
/// the bin holding the n-th largest magnitude, and an exact select among that bin's keys, gathered
/// in a second pass, finds the key and how many of its ties are kept.
fn select_small_wide<T: WideElem>(
    t: Tensor<'_>,
    s: &[T],
    k: f64,
    space: KeySpace,
) -> Result<(Threshold, Spread)> {
    check_density(k)?;
    // One chunk runs here: handing it to the pool costs more than it does.
    let parts: Vec<_> = if s.len() <= PASS_CHUNK / 4 {
        vec![wide_chunk(s)]
    } else {
        s.par_chunks(PASS_CHUNK / 4).map(wide_chunk).collect()
    };
    let mut moments = Moments::default();
    let mut hist = [0u32; WIDE_BINS];
    for (m, h) in &parts {
        moments = moments.merge(*m);
        hist.iter_mut().zip(h.iter()).for_each(|(a, b)| *a += b);
    }
    let spread = Spread::of(&moments, (!s.is_empty()).then(|| t.get_f64(0)));
    if hist[WIDE_NONFINITE_BIN..].iter().any(|&c| c != 0) {
        // float64 magnitudes above float32's range share these bins with NaN and Inf.
        if let Some(i) = s.iter().position(|x| !x.to_f64().is_finite()) {
            return Err(Error::NonFinite { index: i as u64 });
        }
    }
    let n = target_count(k, s.len() as u64);
    if n == 0 {
        return Ok((Threshold::keep_nothing(space), spread));
    }
    // From the largest magnitudes down to the bin holding the n-th largest; `remaining` is then
    // how many of that bin's entries are kept.
    let mut remaining = n;
    let mut top = 0;
    for b in (0..WIDE_BINS).rev() {
        let c = u64::from(hist[b]);
        if c >= remaining {
            top = b;
            break;
        }
        remaining -= c;
    }
    // The bin's keys, gathered 64 entries at a time: the bin tests vectorise into one word of
    // hits, and only the hits (a few percent of the entries for a threshold inside the bulk) are
    // visited.
    let in_bin = |x: T| u8::from(x.bin() & (WIDE_BINS - 1) == top);
    let mut keys = Vec::with_capacity(hist[top] as usize);
    let mut blocks = s.chunks_exact(64);
    for b in &mut blocks {
        let b: &[T; 64] = b.try_into().expect("64 entries");
        let mut hit = [0u8; 64];
        for j in 0..64 {
            hit[j] = in_bin(b[j]);
        }
        let mut m = pack_bools(&hit);
        while m != 0 {
            keys.push(b[m.trailing_zeros() as usize].key());
            m &= m - 1;
        }
    }
    keys.extend(
        blocks
            .remainder()
            .iter()
            .filter(|&&x| in_bin(x) != 0)
            .map(|x| x.key()),
    );
    // The remaining-th largest key of the bin (remaining is in 1..=len by the walk; checked, so
    // that a miscount is an error and not a panic).
    let Some(nth) = (remaining as usize)
        .checked_sub(1)
        .filter(|&i| i < keys.len())
    else {
        return Err(Error::InvalidArgument(
            "internal: the threshold's bin holds fewer entries than counted".into(),
        ));
    };
    let (_, &mut key, _) = keys.select_nth_unstable_by(nth, |a, b| b.cmp(a));
    let above = keys.iter().filter(|&&x| x > key).count() as u64;
    let key = key.to_u64();
    // Zeros are never kept: their sign is 0.
    let ties = if key == 0 { 0 } else { remaining - above };
    Ok((Threshold { space, key, ties }, spread))
}

/// Lanes of the moment sums: entry i of a block adds to lane i % LANES, so the adds vectorise
/// and do not wait on each other, and every kernel gives the same bits.
const LANES: usize = 8;

#[inline(always)]
fn half_to_f32(x: u16, bf: bool) -> f32 {
    if bf {
        bf16::from_bits(x).to_f32()
    } else {
        f16::from_bits(x).to_f32()
    }
}

/// Lane sums of `y = x - c` and `y * y` over a half-precision block, in f64.
fn half_lanes(xs: &[u16], bf: bool, c: f64) -> ([f64; LANES], [f64; LANES]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("f16c") {
        // SAFETY: the features the kernel is compiled for were just detected.
        return unsafe { half_lanes_avx2(xs, bf, c) };
    }
    half_lanes_scalar(xs, bf, c)
}

fn half_lanes_scalar(xs: &[u16], bf: bool, c: f64) -> ([f64; LANES], [f64; LANES]) {
    let (mut s, mut q) = ([0f64; LANES], [0f64; LANES]);
    for (i, &x) in xs.iter().enumerate() {
        let y = half_to_f32(x, bf) as f64 - c;
        s[i % LANES] += y;
        q[i % LANES] += y * y;
    }
    (s, q)
}

/// The scalar kernel's arithmetic, four lanes to a register: exact conversions (f16 -> f32 by
/// F16C, bf16 -> f32 by a shift, f32 -> f64), then a subtract, an add, a multiply and an add,
/// each rounded as the scalar code rounds it (no fused multiply-add).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn half_lanes_avx2(xs: &[u16], bf: bool, c: f64) -> ([f64; LANES], [f64; LANES]) {
    use std::arch::x86_64::*;
    let cv = _mm256_set1_pd(c);
    let (mut s0, mut s1) = (_mm256_setzero_pd(), _mm256_setzero_pd());
    let (mut q0, mut q1) = (_mm256_setzero_pd(), _mm256_setzero_pd());
    let mut blocks = xs.chunks_exact(LANES);
    for b in &mut blocks {
        // SAFETY: `b` holds exactly 8 u16 (16 bytes); the load is unaligned.
        let h = _mm_loadu_si128(b.as_ptr().cast());
        let f = if bf {
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
        } else {
            _mm256_cvtph_ps(h)
        };
        let y0 = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(f)), cv);
        let y1 = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps::<1>(f)), cv);
        s0 = _mm256_add_pd(s0, y0);
        s1 = _mm256_add_pd(s1, y1);
        q0 = _mm256_add_pd(q0, _mm256_mul_pd(y0, y0));
        q1 = _mm256_add_pd(q1, _mm256_mul_pd(y1, y1));
    }
    let (mut s, mut q) = ([0f64; LANES], [0f64; LANES]);
    _mm256_storeu_pd(s.as_mut_ptr(), s0);
    _mm256_storeu_pd(s.as_mut_ptr().add(4), s1);
    _mm256_storeu_pd(q.as_mut_ptr(), q0);
    _mm256_storeu_pd(q.as_mut_ptr().add(4), q1);
    for (j, &x) in blocks.remainder().iter().enumerate() {
        let y = half_to_f32(x, bf) as f64 - c;
        s[j] += y;
        q[j] += y * y;
    }
    (s, q)
}

/// Histogram over `s` where entry `x` adds `bin(x).1` to bin `bin(x).0`, built in four
/// interleaved copies so that runs of one bin do not serialize on a single counter.
#[inline(always)]
fn interleaved_histogram<const B: usize>(s: &[u16], bin: impl Fn(u16) -> (u16, u32)) -> [u32; B] {
    let mut h = [[0u32; B]; 4];
    let mut add = |copy: usize, x: u16| {
        let (b, w) = bin(x);
        h[copy][b as usize] += w;
    };
    let mut quads = s.chunks_exact(4);
    for q in &mut quads {
        add(0, q[0]);
        add(1, q[1]);
        add(2, q[2]);
        add(3, q[3]);
    }
    for &x in quads.remainder() {
        add(0, x);
    }
    let mut out = [0u32; B];
    for (b, o) in out.iter_mut().enumerate() {
        *o = h[0][b] + h[1][b] + h[2][b] + h[3][b];
    }
    out
}

/// Packs 64 bytes that are each 0 or 1 into a word (byte j -> bit j).
#[inline(always)]
fn pack_bools(b: &[u8; 64]) -> u64 {
    let mut r = 0u64;
    for i in 0..8 {
        let w = u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        // The multiply gathers bit 0 of each byte into the top byte, in order.
        r |= (w.wrapping_mul(0x0102_0408_1020_4080) >> 56) << (i * 8);
    }
    r
}

/// Per 64 entries: (key > t, key == t, negative) as bit words, bit j for entry j.
/// The comparisons go to byte arrays first so that the loop vectorises.
#[inline(always)]
pub(crate) fn group_masks<T: Elem, U: Key, K: Fn(T) -> U>(
    xs: &[T],
    key: K,
    t: U,
) -> (u64, u64, u64) {
    let (mut g, mut e, mut s) = ([0u8; 64], [0u8; 64], [0u8; 64]);
    if let Ok(full) = <&[T; 64]>::try_from(xs) {
        // A fixed trip count: this is the form the compiler turns into vector compares.
        for j in 0..64 {
            let k = key(full[j]);
            g[j] = (k > t) as u8;
            e[j] = (k == t) as u8;
            s[j] = full[j].negative() as u8;
        }
    } else {
        for (j, &x) in xs.iter().enumerate().take(64) {
            let k = key(x);
            g[j] = (k > t) as u8;
            e[j] = (k == t) as u8;
            s[j] = x.negative() as u8;
        }
    }
    (pack_bools(&g), pack_bools(&e), pack_bools(&s))
}

/// Keeps the lowest `budget` set bits of `eq` (ties go to the lower index); returns them.
#[inline(always)]
pub(crate) fn take_ties(mut eq: u64, budget: &mut u64) -> u64 {
    let mut taken = 0;
    while *budget > 0 && eq != 0 {
        let low = eq & eq.wrapping_neg();
        taken |= low;
        eq ^= low;
        *budget -= 1;
    }
    taken
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// The AVX2 moment kernel gives the scalar kernel's bits, so a file does not depend on
        /// the CPU that wrote it.
        #[test]
        fn half_lanes_kernels_agree(
            bits in prop::collection::vec(any::<u16>(), 0..100),
            bf in any::<bool>(),
        ) {
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("f16c") {
                let finite: Vec<u16> = bits
                    .into_iter()
                    .filter(|&x| half_to_f32(x, bf).is_finite())
                    .collect();
                let c = finite.first().map_or(0.0, |&x| half_to_f32(x, bf) as f64);
                let (s, q) = half_lanes_scalar(&finite, bf, c);
                // SAFETY: the features were detected just above.
                let (sv, qv) = unsafe { half_lanes_avx2(&finite, bf, c) };
                for j in 0..LANES {
                    prop_assert_eq!(s[j].to_bits(), sv[j].to_bits(), "sum lane {}", j);
                    prop_assert_eq!(q[j].to_bits(), qv[j].to_bits(), "square lane {}", j);
                }
            }
        }
    }
}
