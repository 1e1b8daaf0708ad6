//! Merging and comparing experts on their compressed form.
//!
//! Every kept entry of stream i is `±s_i`, so task arithmetic and TIES (trim, elect a sign per
//! entry, disjoint mean) need only each stream's kept positions, signs and scale: the output is
//! cut into ranges, and in each range every stream's kept entries are decoded straight from the
//! stream and scattered into float32 sums, never a dense float vector per expert. The output
//! buffer (and, for TIES, two per-range float32 scratch arrays) is the only dense allocation.
//! [`similarity`] is the exact cosine matrix of whole experts by popcounts.

use rayon::prelude::*;

use crate::codec::{Body, Compressed};
use crate::error::{Error, Result};
use crate::popcount::{best_kernel, counts_with};

/// How the streams are combined.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// `lam * sum_i w_i tau_i`.
    TaskArithmetic,
    /// Elect a sign per entry, then the (weighted) mean of the entries that agree with it.
    Ties,
}

/// What the TIES election sums per entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Election {
    /// The values (peft "total", mergekit "sum").
    Total,
    /// The signs (peft "frequency", mergekit "count").
    Frequency,
}

/// Whose definition of TIES the result follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Convention {
    /// peft.utils.merge_utils: the sign is elected on the unweighted tensors; the sum of the
    /// agreeing weighted entries is divided by how many agree.
    Peft,
    /// mergekit's generalized task arithmetic: the sign is elected on the weighted tensors; the
    /// sum is divided by the sum of the agreeing weights (1 where that is 0).
    Mergekit,
}

#[derive(Clone, Copy, Debug)]
pub struct MergeSpec {
    pub method: Method,
    pub election: Election,
    pub convention: Convention,
    /// Keep only the first `floor(density * numel)` kept entries of each stream (row-major; at
    /// least 1 for a density > 0 in mergekit's convention, see `keep_count`); all kept entries
    /// of a stream have one magnitude, so the lowest indices win, as in selection.
    pub density: Option<f64>,
    /// Multiplies the result.
    pub lam: f64,
}

fn bad(msg: String) -> Error {
    Error::InvalidArgument(msg)
}

/// What one stream adds per entry in TIES. Every sum is float32, as the references compute.
struct Part<'a> {
    stream: &'a Compressed,
    /// Its kept entries below this position take part (all, or the first `keep`).
    end: u64,
    /// Tally added by a positive entry (subtracted by a negative one) in the election.
    elect: f32,
    /// Contribution of a positive entry: w * s in float32 (a negative entry gives -w * s).
    value: f32,
    /// Added to the divisor by an agreeing entry.
    den: f32,
    /// The entry's sign in the election is the pattern's sign times -1 (a negative mergekit
    /// weight).
    flip: bool,
}

/// Checks a stream to be merged (once per merge, not once per output range) and gives the
/// position below which its kept entries take part: all of them, or the first `keep`.
fn kept_end(s: &Compressed, keep: Option<u64>) -> Result<u64> {
    s.check()?;
    match keep {
        Some(k) => s.kept_prefix_end(k),
        None => Ok(s.numel()),
    }
}

/// How many kept entries of a `numel`-entry stream a trim to `density` leaves at most:
/// `floor(density * numel)`, as peft's `magnitude_based_pruning` keeps; mergekit's magnitude
/// sparsification keeps at least 1 for any density > 0 (so a density under 1 / numel keeps one
/// entry there, none in peft).
fn keep_count(density: f64, numel: u64, convention: Convention) -> u64 {
    let keep = (density * numel as f64).floor() as u64;
    match convention {
        Convention::Mergekit if density > 0.0 => keep.max(1),
        _ => keep,
    }
}

fn check_spec(spec: &MergeSpec) -> Result<()> {
    if !spec.lam.is_finite() {
        return Err(bad(format!("lam must be finite, got {}", spec.lam)));
    }
    if let Some(d) = spec.density {
        if !(0.0..=1.0).contains(&d) {
            return Err(bad(format!("density must be in [0, 1], got {d}")));
        }
    }
    Ok(())
}

/// Merges streams of one tensor into `out` (numel float32 entries). `weights[i]` weighs stream i.
///
/// The arithmetic is that of the references on the decoded float32 tensors: each kept entry is
/// `±f32(s_i)`, each weight `f32(w_i)`, their product rounded to float32, and every per-entry
/// sum (the election's tally, the merged value, mergekit's divisor) is a float32 sum in
/// stream order from 0. That is the order of torch's `sum(dim=0)` over a stack of up to 4
/// tensors, and of up to 15 on all but a tensor's last `numel % 64` entries (`% 32` with AVX2),
/// which torch adds 4 rows at a time (from 16 rows on it adds blocks of 16); so ties in the
/// election, such as 0.1f + 0.2f - 0.3f == 0 electing +, fall exactly where peft's and
/// mergekit's fall. The result is multiplied by `f32(lam)`; no entry is -0.0.
pub fn merge_into(
    streams: &[&Compressed],
    weights: &[f64],
    spec: &MergeSpec,
    out: &mut [f32],
) -> Result<()> {
    check_spec(spec)?;
    let first = streams
        .first()
        .ok_or_else(|| bad("no streams to merge".into()))?;
    if weights.len() != streams.len() {
        return Err(bad(format!(
            "{} weights for {} streams; give one weight per expert",
            weights.len(),
            streams.len()
        )));
    }
    if let Some(w) = weights.iter().find(|w| !w.is_finite()) {
        return Err(bad(format!("weights must be finite, got {w}")));
    }
    for (i, s) in streams.iter().enumerate() {
        if s.shape() != first.shape() {
            return Err(bad(format!(
                "stream {i} has shape {:?} but stream 0 has {:?}; merged streams must describe the same tensor",
                s.shape(),
                first.shape()
            )));
        }
    }
    if out.len() as u64 != first.numel() {
        return Err(bad(format!(
            "output has {} entries, the tensor {}",
            out.len(),
            first.numel()
        )));
    }
    let keep = spec
        .density
        .map(|d| keep_count(d, first.numel(), spec.convention));
    if spec.method == Method::TaskArithmetic {
        return task_arithmetic(streams, weights, keep, spec.lam, out);
    }
    let mut parts = Vec::with_capacity(streams.len());
    for (s, &w) in streams.iter().zip(weights) {
        // The values a float32 decode holds, and the weight as a float32 tensor holds it.
        let (scale, w) = (s.scale() as f32, w as f32);
        let value = w * scale;
        if scale == 0.0 || s.nnz() == 0 {
            continue; // decodes to zeros: no sign, no value
        }
        // The election sees the sign of each entry of tau (peft) or of w * tau (mergekit).
        let (elect, den, flip) = match (spec.convention, spec.election) {
            (Convention::Peft, Election::Total) => (scale, 1.0, false),
            (Convention::Peft, Election::Frequency) => (1.0, 1.0, false),
            (Convention::Mergekit, _) if value == 0.0 => continue, // w * tau has no sign
            (Convention::Mergekit, Election::Total) => (value.abs(), w, w < 0.0),
            (Convention::Mergekit, Election::Frequency) => (1.0, w, w < 0.0),
        };
        parts.push(Part {
            stream: s,
            end: kept_end(s, keep)?,
            elect,
            value,
            den,
            flip,
        });
    }
    ties(&parts, spec.convention, spec.lam as f32, out)
}

/// Longest output range TIES works on: its two float32 scratch arrays take 32 MiB at most, and
/// offsets in a range fit 31 bits.
const TIES_RANGE_MAX: u64 = 1 << 22;

/// TIES over output ranges: per range, the kept entries of every stream are decoded once (only
/// the blocks overlapping the range) and their signed election values added to a float32 tally
/// in stream order, their offsets and signs kept; the elected sign of each entry is then the
/// tally's (0 elects +, as both references do), and the agreeing entries' values and divisors
/// are added, again in stream order. Entries no stream keeps come out 0.
fn ties(parts: &[Part<'_>], conv: Convention, lam: f32, out: &mut [f32]) -> Result<()> {
    let streams: Vec<&Compressed> = parts.iter().map(|p| p.stream).collect();
    let bounds = range_bounds(&streams, out.len() as u64, TIES_RANGE_MAX);
    let ranges = cut(out, &bounds);
    // Scratch reused by each thread across its ranges: the allocator's fresh pages (and, for
    // large arrays, a map and unmap each time) cost more than the merge of a LoRA factor.
    ranges.into_par_iter().try_for_each_init(
        || (Vec::new(), Vec::new(), vec![Vec::new(); parts.len()]),
        |(tally, den, kept): &mut (Vec<f32>, Vec<f32>, Vec<Vec<u32>>), (lo, num)| -> Result<()> {
            let hi = lo + num.len() as u64;
            tally.clear();
            tally.resize(num.len(), 0.0);
            // Per stream, its entries in the range: offset from lo, the pattern's sign in bit 31.
            for (p, mine) in parts.iter().zip(kept.iter_mut()) {
                let (e, flip) = (p.elect.to_bits(), p.flip as u32);
                mine.clear();
                p.stream
                    .kept_runs_in_checked(lo, hi.min(p.end), |ps, signs| {
                        for (r, &at) in ps.iter().enumerate() {
                            // Signs by xor, not a branch: random signs mispredict half the time.
                            let neg = ((signs >> r) & 1) as u32;
                            let off = (at - lo) as u32;
                            tally[off as usize] += f32::from_bits(e ^ (neg ^ flip) << 31);
                            mine.push(off | neg << 31);
                        }
                    })?;
            }
            num.fill(0.0);
            den.clear();
            den.resize(num.len(), 0.0);
            for (p, mine) in parts.iter().zip(kept.iter()) {
                let (v, flip) = (p.value.to_bits(), p.flip as u32);
                for &x in mine {
                    let (off, neg) = ((x & 0x7fff_ffff) as usize, x >> 31);
                    // It agrees when its election sign (neg ^ flip: 1 is -) is the elected one;
                    // a disagreeing entry adds +-0.0, which changes no sum (none is -0.0).
                    let agree = ((tally[off] >= 0.0) as u32 ^ neg ^ flip) as f32;
                    num[off] += f32::from_bits(v ^ neg << 31) * agree;
                    den[off] += p.den * agree;
                }
            }
            for (o, d) in num.iter_mut().zip(den.iter()) {
                *o = merged(*o, *d, conv, lam);
            }
            Ok(())
        },
    )
}

/// Fewest output entries per range of a merge: 512 kB of float32, within a core's L2 cache, and a
/// whole LoRA factor of a 7B model (16 x 4096) in one range.
const TA_RANGE: usize = 1 << 17;

/// Where a merge cuts the output: ranges of at least [`TA_RANGE`] entries and of four blocks of
/// the stream whose blocks span the most positions (the sparsest), cut at that stream's block
/// starts, so that it decodes each block once and the others at most two blocks in part per
/// range (fixed ranges re-decoded whole blocks across every edge: 4.6x one walk at k = 0.01); no
/// longer than a share of two ranges per thread of a large tensor, nor than `max_len`.
/// Increasing, from 0 to `numel`.
fn range_bounds(streams: &[&Compressed], numel: u64, max_len: u64) -> Vec<u64> {
    let threads = rayon::current_num_threads().max(1) as u64;
    let floor = TA_RANGE as u64;
    let cap = (numel / (2 * threads)).max(floor).min(max_len);
    let sparsest = streams
        .iter()
        .filter_map(|s| match s.body() {
            Body::Golomb(g) if !g.index.is_empty() => {
                Some((s.numel() * (1u64 << g.block_log2) / s.nnz(), g))
            }
            _ => None,
        })
        .max_by_key(|&(span, _)| span);
    let target = sparsest
        .map_or(floor, |(span, _)| span.saturating_mul(4))
        .clamp(floor.min(cap), cap);
    let mut bounds = vec![0u64];
    let mut lo = 0u64;
    while lo < numel {
        let want = lo.saturating_add(target);
        let hi = match sparsest {
            // The first block start at or after `want` (block starts increase: checked).
            Some((_, g)) => g
                .index
                .get(g.index.partition_point(|b| b.next < want))
                .map_or(numel, |b| b.next),
            None => want,
        }
        .clamp(lo + 1, numel.min(lo.saturating_add(max_len)));
        bounds.push(hi);
        lo = hi;
    }
    bounds
}

/// `out` cut at `bounds` (increasing, from 0 to its length): each range with its first position.
fn cut<'o>(out: &'o mut [f32], bounds: &[u64]) -> Vec<(u64, &'o mut [f32])> {
    let mut ranges = Vec::with_capacity(bounds.len());
    let mut rest = out;
    for w in bounds.windows(2) {
        let (chunk, tail) = std::mem::take(&mut rest).split_at_mut((w[1] - w[0]) as usize);
        ranges.push((w[0], chunk));
        rest = tail;
    }
    ranges
}

/// Task arithmetic, trimmed or not: each output range sums, in float32 and stream order, the
/// kept entries every stream has there (the first `keep` of each, when trimmed), decoded straight
/// from the stream (only the blocks overlapping the range); no masks are built. Each stream is
/// checked once here, not once per range.
fn task_arithmetic(
    streams: &[&Compressed],
    weights: &[f64],
    keep: Option<u64>,
    lam: f64,
    out: &mut [f32],
) -> Result<()> {
    let mut parts: Vec<(&Compressed, f32, u64)> = Vec::with_capacity(streams.len());
    for (s, &w) in streams.iter().zip(weights) {
        if s.scale() == 0.0 || s.nnz() == 0 {
            continue;
        }
        parts.push((*s, w as f32 * s.scale() as f32, kept_end(s, keep)?));
    }
    let lam = lam as f32;
    let streams: Vec<&Compressed> = parts.iter().map(|p| p.0).collect();
    let bounds = range_bounds(&streams, out.len() as u64, u64::MAX);
    let ranges = cut(out, &bounds);
    ranges
        .into_par_iter()
        .try_for_each(|(lo, chunk)| -> Result<()> {
            let hi = lo + chunk.len() as u64;
            chunk.fill(0.0);
            for &(s, v, end) in &parts {
                let vb = v.to_bits();
                // A stream's entries are distinct positions: any order gives the same sums.
                s.kept_runs_in_checked(lo, hi.min(end), |ps, signs| {
                    for (r, &at) in ps.iter().enumerate() {
                        // The sign by xor, not a branch: signs are random and a branch on them
                        // mispredicted half the time (this loop ran 1.6x slower).
                        let neg = ((signs >> r) & 1) as u32;
                        chunk[(at - lo) as usize] += f32::from_bits(vb ^ neg << 31);
                    }
                })?;
            }
            if lam != 1.0 {
                for o in chunk.iter_mut() {
                    *o = *o * lam + 0.0; // + 0.0: no -0.0 from a negative lam
                }
            }
            Ok(())
        })
}

/// One merged TIES entry from the sum of the agreeing values and of their divisors: peft divides
/// by how many agree (at least 1), mergekit by the sum of their weights (1 where that is 0).
#[inline(always)]
fn merged(num: f32, den: f32, conv: Convention, lam: f32) -> f32 {
    let d = match conv {
        Convention::Peft => den.max(1.0),
        Convention::Mergekit if den == 0.0 => 1.0,
        Convention::Mergekit => den,
    };
    let m = num / d;
    // + 0.0: no -0.0 (a sum that cancels over a negative mergekit divisor, or a negative lam)
    (if lam != 1.0 { m * lam } else { m }) + 0.0
}

/// Merges many tensors at once (parallel over tensors and within each): `groups[t]` holds the
/// streams of tensor t, one per expert; errors carry the tensor's index.
pub fn merge_many(
    groups: &[Vec<&Compressed>],
    weights: &[f64],
    spec: &MergeSpec,
    outs: Vec<&mut [f32]>,
) -> std::result::Result<(), (usize, Error)> {
    if groups.len() != outs.len() {
        return Err((0, bad("one output per tensor is needed".into())));
    }
    groups
        .par_iter()
        .zip(outs)
        .enumerate()
        .map(|(t, (g, o))| merge_into(g, weights, spec, o).map_err(|e| (t, e)))
        .collect::<std::result::Result<Vec<()>, _>>()
        .map(|_| ())
}

/// The N x N cosine matrix (row-major) of N experts, each the concatenation of its streams:
/// `experts[i][t]` is tensor t of expert i. Exact up to the final division: every dot product is
/// `s_a * s_b * (|Pa&Pb| + |Na&Nb| - |Pa&Nb| - |Na&Pb|)` summed over tensors in order. An expert
/// that decodes to all zeros has cosine 0 with everything, itself included.
pub fn similarity(experts: &[Vec<&Compressed>]) -> Result<Vec<f64>> {
    let n = experts.len();
    let tensors = experts.first().map_or(0, |e| e.len());
    for (i, e) in experts.iter().enumerate() {
        if e.len() != tensors {
            return Err(bad(format!(
                "expert {i} has {} tensors but expert 0 has {tensors}",
                e.len()
            )));
        }
        for (t, s) in e.iter().enumerate() {
            if s.shape() != experts[0][t].shape() {
                return Err(bad(format!(
                    "tensor {t}: expert {i} has shape {:?} but expert 0 has {:?}",
                    s.shape(),
                    experts[0][t].shape()
                )));
            }
        }
    }
    let kernel = best_kernel();
    // One N x N block of dot products per tensor, summed afterwards in tensor order so the
    // result does not depend on the thread count.
    let per_tensor: Vec<Vec<f64>> = (0..tensors)
        .into_par_iter()
        .map(|t| -> Result<Vec<f64>> {
            let masks = experts
                .iter()
                .map(|e| e[t].masks())
                .collect::<Result<Vec<_>>>()?;
            let mut dots = vec![0f64; n * n];
            for i in 0..n {
                for j in i..n {
                    let (a, b) = (&masks[i], &masks[j]);
                    let c = counts_with(kernel, &a.pos, &a.neg, &b.pos, &b.neg);
                    let m = c.pp as f64 + c.nn as f64 - c.pn as f64 - c.np as f64;
                    let d = experts[i][t].scale() * experts[j][t].scale() * m;
                    dots[i * n + j] = d;
                    dots[j * n + i] = d;
                }
            }
            Ok(dots)
        })
        .collect::<Result<_>>()?;
    let mut dots = vec![0f64; n * n];
    for block in &per_tensor {
        for (d, x) in dots.iter_mut().zip(block) {
            *d += x;
        }
    }
    let norms: Vec<f64> = (0..n).map(|i| dots[i * n + i].sqrt()).collect();
    Ok((0..n * n)
        .map(|ij| {
            let (i, j) = (ij / n, ij % n);
            if norms[i] == 0.0 || norms[j] == 0.0 {
                0.0
            } else {
                (dots[ij] / (norms[i] * norms[j])).clamp(-1.0, 1.0)
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_entries_in_a_range_match_the_dense_decode() {
        use crate::{compress, Encoding, Tensor, TensorMut};
        // 20,000 kept entries: several golomb blocks, so ranges start inside and across blocks.
        let x: Vec<f32> = (0..100_000u64)
            .map(|i| ((i * 2_654_435_761) % 1000) as f32 - 499.5)
            .collect();
        for enc in [Encoding::Golomb, Encoding::Bitmask] {
            let c = compress(Tensor::F32(&x), &[100_000], 0.2, 1.0, enc).unwrap();
            let mut d = vec![0f64; 100_000];
            c.decode_into(TensorMut::F64(&mut d)).unwrap();
            for (lo, hi) in [
                (0, 100_000),
                (0, 1),
                (17, 64),
                (4095, 40_001),
                (99_999, 200_000),
                (500, 500),
            ] {
                let mut got = Vec::new();
                c.for_each_kept_in(lo, hi, |at, neg| got.push((at, neg)))
                    .unwrap();
                let want: Vec<(u64, bool)> = (lo..hi.min(100_000))
                    .filter(|&i| d[i as usize] != 0.0)
                    .map(|i| (i, d[i as usize] < 0.0))
                    .collect();
                assert_eq!(got, want, "{enc:?} [{lo}, {hi})");
            }
        }
    }

    #[test]
    fn task_arithmetic_over_many_output_ranges_is_the_ordered_float32_sum() {
        use crate::TensorMut;
        // 300,001 entries: three output ranges, the last one short, in both encodings.
        let n = 300_001u64;
        let streams = range_streams(n);
        let refs: Vec<&Compressed> = streams.iter().collect();
        let weights = [0.5, -1.25, 2.0];
        let spec = MergeSpec {
            method: Method::TaskArithmetic,
            election: Election::Total,
            convention: Convention::Peft,
            density: None,
            lam: 0.75,
        };
        let mut got = vec![f32::NAN; n as usize];
        merge_into(&refs, &weights, &spec, &mut got).unwrap();
        let mut want = vec![0f32; n as usize];
        for (s, w) in streams.iter().zip(weights) {
            let mut d = vec![0f32; n as usize];
            s.decode_into(TensorMut::F32(&mut d)).unwrap();
            for (o, v) in want.iter_mut().zip(&d) {
                *o += w as f32 * v;
            }
        }
        for o in want.iter_mut() {
            *o = *o * 0.75 + 0.0;
        }
        assert_eq!(got, want);
    }

    /// Sparse streams (blocks spanning ~800k positions) and a dense one: the ranges are cut at
    /// the sparsest stream's block starts, cover the output once, and give the ordered float32
    /// sum, trimmed or not.
    #[test]
    fn task_arithmetic_ranges_follow_the_sparsest_blocks() {
        use crate::{compress, Encoding, Tensor};
        let n = 3_000_001u64;
        let streams: Vec<Compressed> = [0.005, 0.2, 0.01]
            .iter()
            .enumerate()
            .map(|(s, &k)| {
                let x: Vec<f32> = (0..n)
                    .map(|i| (((i + 11 * s as u64) * 2_654_435_761) % 100_003) as f32 - 5e4)
                    .collect();
                compress(Tensor::F32(&x), &[n], k, 0.3 + s as f64, Encoding::Golomb).unwrap()
            })
            .collect();
        let refs: Vec<&Compressed> = streams.iter().collect();
        let b = range_bounds(&refs, n, u64::MAX);
        assert_eq!((b[0], *b.last().unwrap()), (0, n));
        assert!(b.windows(2).all(|w| w[0] < w[1]));
        let Body::Golomb(g) = streams[0].body() else {
            unreachable!()
        };
        let starts: Vec<u64> = g.index.iter().map(|s| s.next).collect();
        assert!(
            b.len() > 2 && b[1..b.len() - 1].iter().all(|x| starts.contains(x)),
            "{b:?}"
        );
        let weights = [1.5, -0.25, 2.0];
        for density in [None, Some(0.004)] {
            let spec = MergeSpec {
                method: Method::TaskArithmetic,
                election: Election::Total,
                convention: Convention::Peft,
                density,
                lam: 1.0,
            };
            let mut got = vec![f32::NAN; n as usize];
            merge_into(&refs, &weights, &spec, &mut got).unwrap();
            let keep = density.map(|d| keep_count(d, n, Convention::Peft));
            assert_eq!(got, ordered_f32_sum(&streams, &weights, keep, 1.0));
        }
    }

    /// A cap on range length (TIES keeps two float32 arrays per range) holds even where the
    /// sparsest stream's blocks span more: ranges increase, cover the output, and none is longer.
    #[test]
    fn range_bounds_keep_under_their_cap() {
        let streams = range_streams(300_001);
        let refs: Vec<&Compressed> = streams.iter().collect();
        for cap in [1u64, 1000, 65_536, u64::MAX] {
            let b = range_bounds(&refs, 300_001, cap);
            assert_eq!((b[0], *b.last().unwrap()), (0, 300_001), "cap {cap}");
            assert!(
                b.windows(2).all(|w| w[0] < w[1] && w[1] - w[0] <= cap),
                "cap {cap}"
            );
        }
    }

    /// Streams of `n` entries whose kept entries sit on both sides of every task-arithmetic
    /// range boundary, with scales that make float32 and float64 sums differ.
    fn range_streams(n: u64) -> Vec<Compressed> {
        use crate::{compress, Encoding, Tensor};
        (0..3u64)
            .map(|s| {
                let mut x: Vec<f32> = (0..n)
                    .map(|i| (((i + 7 * s) * 2_654_435_761) % 1009) as f32 - 504.0)
                    .collect();
                for r in (0..=n as usize).step_by(TA_RANGE) {
                    for i in [r.wrapping_sub(1), r] {
                        if let Some(v) = x.get_mut(i) {
                            *v = if (i + s as usize) % 2 == 0 { 1e4 } else { -1e4 };
                        }
                    }
                }
                x[n as usize - 1] = 2e4;
                let enc = if s == 1 {
                    Encoding::Bitmask
                } else {
                    Encoding::Golomb
                };
                compress(Tensor::F32(&x), &[n], 0.1, 0.1 + 0.2 * s as f64, enc).unwrap()
            })
            .collect()
    }

    /// The reference: each stream decoded to float32, its first `keep` kept entries (all of
    /// them without a trim) times f32(w), summed in float32 in stream order, times f32(lam).
    fn ordered_f32_sum(
        streams: &[Compressed],
        weights: &[f64],
        keep: Option<u64>,
        lam: f32,
    ) -> Vec<f32> {
        use crate::TensorMut;
        let n = streams[0].numel() as usize;
        let mut want = vec![0f32; n];
        for (s, w) in streams.iter().zip(weights) {
            let mut d = vec![0f32; n];
            s.decode_into(TensorMut::F32(&mut d)).unwrap();
            let mut seen = 0u64;
            for (o, v) in want.iter_mut().zip(&d) {
                if *v != 0.0 {
                    seen += 1;
                    if keep.is_some_and(|k| seen > k) {
                        continue;
                    }
                }
                *o += *w as f32 * v;
            }
        }
        if lam != 1.0 {
            for o in want.iter_mut() {
                *o = *o * lam + 0.0;
            }
        }
        want
    }

    #[test]
    fn task_arithmetic_has_one_rule_trimmed_or_not() {
        // 300,001 entries: three output ranges, the last one short; weights whose float32 and
        // float64 products and sums round differently; two identical streams at +w and -w cancel
        // to +0.0, never -0.0, under a negative lam.
        let streams = range_streams(300_001);
        let n = streams[0].numel() as usize;
        let weights = [0.1, -1.3, 0.7];
        for density in [None, Some(0.05), Some(0.0), Some(1.0)] {
            let keep = density.map(|d| (d * n as f64).floor() as u64);
            for lam in [1.0f32, -0.75] {
                let spec = MergeSpec {
                    method: Method::TaskArithmetic,
                    election: Election::Total,
                    convention: Convention::Peft,
                    density,
                    lam: lam as f64,
                };
                let refs: Vec<&Compressed> = streams.iter().collect();
                let mut got = vec![f32::NAN; n];
                merge_into(&refs, &weights, &spec, &mut got).unwrap();
                let want = ordered_f32_sum(&streams, &weights, keep, lam);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert!(bits(&got) == bits(&want), "density {density:?}, lam {lam}");
                let pair = [&streams[0], &streams[0]];
                merge_into(&pair, &[0.3, -0.3], &spec, &mut got).unwrap();
                assert!(
                    got.iter().all(|x| x.to_bits() == 0),
                    "density {density:?}, lam {lam}"
                );
            }
        }
    }

    #[test]
    fn a_merge_checks_each_stream_once_not_once_per_range() {
        use crate::codec::check_count;
        // 5 output ranges over streams of many golomb blocks: checking per range walked the
        // whole block index each time.
        let streams = range_streams(5 * TA_RANGE as u64 + 3);
        let refs: Vec<&Compressed> = streams.iter().collect();
        let mut out = vec![0f32; streams[0].numel() as usize];
        for density in [None, Some(0.05)] {
            let spec = MergeSpec {
                method: Method::TaskArithmetic,
                election: Election::Total,
                convention: Convention::Peft,
                density,
                lam: 1.0,
            };
            for s in &streams {
                check_count::take(s);
            }
            merge_into(&refs, &[1.0, 2.0, 3.0], &spec, &mut out).unwrap();
            for s in &streams {
                assert_eq!(check_count::take(s), 1, "density {density:?}");
            }
        }
    }

    /// TIES from its definition on the dense float32 decodes: per entry, the election sums (in
    /// stream order) tau_i's sign times s_i (peft "total"), its sign (frequency), or the same of
    /// w_i * tau_i (mergekit); 0 elects +; the agreeing entries' f32(w_i) * tau_i are summed and
    /// divided by their count (peft, at least 1) or by the sum of their weights (mergekit, 1 where
    /// that is 0); times lam, + 0.0. Each stream's first `keep` kept entries take part.
    fn ties_reference(streams: &[Compressed], weights: &[f64], spec: &MergeSpec) -> Vec<f32> {
        use crate::TensorMut;
        let n = streams[0].numel() as usize;
        let mk = spec.convention == Convention::Mergekit;
        // peft keeps floor(d n), mergekit at least 1 for d > 0.
        let keep = spec.density.map(|d| {
            let k = (d * n as f64).floor() as u64;
            if mk && d > 0.0 {
                k.max(1)
            } else {
                k
            }
        });
        let taus: Vec<Vec<f32>> = streams
            .iter()
            .map(|s| {
                let mut d = vec![0f32; n];
                s.decode_into(TensorMut::F32(&mut d)).unwrap();
                for (seen, v) in d.iter_mut().filter(|v| **v != 0.0).enumerate() {
                    if keep.is_some_and(|k| seen as u64 >= k) {
                        *v = 0.0;
                    }
                }
                d
            })
            .collect();
        let sign = |x: f32| (x > 0.0) as i32 as f32 - (x < 0.0) as i32 as f32;
        (0..n)
            .map(|j| {
                let mut tally = 0f32;
                for (t, &w) in taus.iter().zip(weights) {
                    let x = if mk { w as f32 * t[j] } else { t[j] };
                    tally += match spec.election {
                        Election::Total => x,
                        Election::Frequency => sign(x),
                    };
                }
                let up = tally >= 0.0;
                let (mut num, mut den) = (0f32, 0f32);
                for (t, &w) in taus.iter().zip(weights) {
                    let x = if mk { w as f32 * t[j] } else { t[j] };
                    if x != 0.0 && (x > 0.0) == up {
                        num += w as f32 * t[j];
                        den += if mk { w as f32 } else { 1.0 };
                    }
                }
                // peft divides by the count (at least 1), mergekit by the weights (1 for 0).
                let d = match (mk, den) {
                    (true, 0.0) => 1.0,
                    (true, _) => den,
                    (false, _) => den.max(1.0),
                };
                let m = num / d;
                (if spec.lam != 1.0 {
                    m * spec.lam as f32
                } else {
                    m
                }) + 0.0
            })
            .collect()
    }

    proptest::proptest! {
        /// TIES over output ranges equals its definition on the dense decodes, bit for bit:
        /// tensors of one to several ranges (cut inside golomb streams' blocks), golomb and
        /// bitmask streams, scales whose float32 sums cancel exactly (0.1 + 0.2 - 0.3), both
        /// conventions and elections, negative weights and lam, trimmed or not.
        #[test]
        fn ties_equals_its_definition(
            n in 1usize..6,
            numel in proptest::sample::select(vec![1u64, 63, 1000, 300_001]),
            k in proptest::sample::select(vec![0.01, 0.1, 0.5, 1.0]),
            seed in proptest::prelude::any::<u64>(),
            mergekit in proptest::prelude::any::<bool>(),
            frequency in proptest::prelude::any::<bool>(),
            density in proptest::option::of(proptest::sample::select(vec![0.0, 0.02, 0.3])),
            lam in proptest::sample::select(vec![1.0f64, 0.5, -1.0]),
        ) {
            use crate::{compress, Encoding, Tensor};
            use rand::{Rng, SeedableRng};
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let scales = [0.1, 0.2, 0.3, 1.0, 0.5, 2.5e-3];
            let ws = [1.0, 0.5, -0.25, 2.0, 0.0, -1.0];
            let streams: Vec<Compressed> = (0..n)
                .map(|_| {
                    let x: Vec<f32> = (0..numel).map(|_| rng.gen::<f32>() - 0.5).collect();
                    let enc = if rng.gen_bool(0.3) { Encoding::Bitmask } else { Encoding::Golomb };
                    compress(Tensor::F32(&x), &[numel], k, 1.0, enc)
                        .and_then(|c| c.with_scale(scales[rng.gen_range(0..scales.len())]))
                        .unwrap()
                })
                .collect();
            let weights: Vec<f64> = (0..n).map(|_| ws[rng.gen_range(0..ws.len())]).collect();
            let spec = MergeSpec {
                method: Method::Ties,
                election: if frequency { Election::Frequency } else { Election::Total },
                convention: if mergekit { Convention::Mergekit } else { Convention::Peft },
                density,
                lam,
            };
            let refs: Vec<&Compressed> = streams.iter().collect();
            let mut got = vec![f32::NAN; numel as usize];
            merge_into(&refs, &weights, &spec, &mut got).unwrap();
            let want = ties_reference(&streams, &weights, &spec);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            proptest::prop_assert_eq!(bits(&got), bits(&want));
        }
    }

    #[test]
    fn ties_votes_in_float32_in_stream_order() {
        use crate::{compress, Encoding, Tensor};
        // One kept entry per stream, scales 0.1f, 0.2f, 0.3f (the mean of the kept |x|): in
        // float32 0.1 + 0.2 - 0.3 is exactly 0, which elects +; in float64 it is -7.5e-9.
        let one = |v: f32| compress(Tensor::F32(&[v, 0.0]), &[2], 0.5, 1.0, Encoding::Golomb);
        let one = |v: f32| {
            let c = one(v).unwrap();
            c.with_scale(v.abs() as f64).unwrap()
        };
        let streams = [one(0.1), one(0.2), one(-0.3)];
        let refs: Vec<&Compressed> = streams.iter().collect();
        for convention in [Convention::Peft, Convention::Mergekit] {
            let spec = MergeSpec {
                method: Method::Ties,
                election: Election::Total,
                convention,
                density: None,
                lam: 1.0,
            };
            let mut got = [f32::NAN; 2];
            merge_into(&refs, &[1.0, 1.0, 1.0], &spec, &mut got).unwrap();
            assert_eq!(got, [(0.1f32 + 0.2f32) / 2.0, 0.0], "{convention:?}");
        }
    }

    #[test]
    fn a_density_under_one_entry_keeps_one_in_mergekit_none_in_peft() {
        use crate::{compress, Encoding, Tensor};
        assert_eq!(keep_count(0.005, 130, Convention::Peft), 0);
        assert_eq!(keep_count(0.005, 130, Convention::Mergekit), 1);
        for convention in [Convention::Peft, Convention::Mergekit] {
            assert_eq!(keep_count(0.0, 130, convention), 0, "{convention:?}");
            assert_eq!(keep_count(0.05, 130, convention), 6, "{convention:?}");
            assert_eq!(keep_count(1.0, 130, convention), 130, "{convention:?}");
        }
        // Two kept entries (at 3 and 7): density 0.005 keeps the first in mergekit's convention,
        // nothing in peft's, for both methods.
        let mut x = [0f32; 130];
        (x[3], x[7]) = (-2.0, 2.0);
        let c = compress(Tensor::F32(&x), &[130], 2.0 / 130.0, 1.0, Encoding::Golomb)
            .and_then(|c| c.with_scale(2.0))
            .unwrap();
        for method in [Method::Ties, Method::TaskArithmetic] {
            for (convention, want) in [(Convention::Peft, 0.0), (Convention::Mergekit, -2.0)] {
                let spec = MergeSpec {
                    method,
                    election: Election::Total,
                    convention,
                    density: Some(0.005),
                    lam: 1.0,
                };
                let mut got = [f32::NAN; 130];
                merge_into(&[&c], &[1.0], &spec, &mut got).unwrap();
                let mut expect = [0f32; 130];
                expect[3] = want;
                assert_eq!(got, expect, "{method:?} {convention:?}");
            }
        }
    }
}
