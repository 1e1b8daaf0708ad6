//! Encoding from a threshold: the passes over the input (counting what is kept, summing it,
//! building bitmasks or Rice-coded gaps in parallel chunks) and [`compress_with_threshold`].

use rayon::prelude::*;

use crate::codec::{
    bad_scale, check_shape, chunk_starts, scale_is_valid, words_for, BitmaskBody, Body, Compressed,
    Encoding, GolombBody, DEFAULT_BLOCK_LOG2, MAX_NUMEL,
};
use crate::dtype::{Elem, Tensor};
use crate::error::{try_zeroed, Error, Result};
use crate::golomb::{rice_parameter, stitch, ChunkEncoder, EncodedChunk};
use crate::selection::{
    group_masks, take_ties, visit_keys, Key, KeySpace, KeyVisitor, Threshold, PASS_CHUNK,
};

struct CountPass {
    t: u64,
    /// The key of +Inf in the space: keys at or above it are NaN or Inf.
    inf: u64,
}

impl KeyVisitor for &CountPass {
    /// Per chunk: (above the threshold, equal to it, not finite).
    type Out = Vec<(u64, u64, u64)>;
    fn visit<T: Elem, U: Key, K: Fn(T) -> U + Copy + Send + Sync>(
        self,
        data: &[T],
        key: K,
    ) -> Self::Out {
        let inf = U::narrow(self.inf).expect("the key of Inf fits its space");
        // Keep nothing: a threshold above every key, so nothing compares above or equal.
        let t = U::narrow(self.t);
        data.par_chunks(PASS_CHUNK)
            .map(|c| {
                // Plain compare-and-add: vectorises to full-width SIMD.
                let (mut gt, mut eq, mut nf) = (0u32, 0u32, 0u32);
                match t {
                    Some(t) => {
                        for &x in c {
                            let k = key(x);
                            gt += (k > t) as u32;
                            eq += (k == t) as u32;
                            nf += (k >= inf) as u32;
                        }
                    }
                    None => {
                        for &x in c {
                            nf += (key(x) >= inf) as u32;
                        }
                    }
                }
                (gt as u64, eq as u64, nf as u64)
            })
            .collect()
    }
}

/// Sum of the magnitudes above a threshold, per chunk (summed in chunk order by the caller, so
/// the result does not depend on the thread count).
struct AboveSumPass {
    t: u64,
    space: KeySpace,
}

impl KeyVisitor for &AboveSumPass {
    type Out = Vec<f64>;
    fn visit<T: Elem, U: Key, K: Fn(T) -> U + Copy + Send + Sync>(
        self,
        data: &[T],
        key: K,
    ) -> Self::Out {
        let Some(t) = U::narrow(self.t) else {
            return Vec::new();
        };
        data.par_chunks(PASS_CHUNK)
            .map(|c| {
                let mut s = 0.0;
                for &x in c {
                    let k = key(x);
                    if k > t {
                        s += self.space.magnitude(k.to_u64());
                    }
                }
                s
            })
            .collect()
    }
}

/// Sum of |x| over the entries of `t` that `thr` keeps when `ties_taken` of its tied entries are
/// kept here (all tied entries have the threshold's magnitude). Exact in the key space, in f64.
pub fn kept_abs_sum(t: Tensor<'_>, thr: &Threshold, ties_taken: u64) -> Result<f64> {
    if thr.key == u64::MAX {
        return Ok(0.0);
    }
    let above: f64 = visit_keys(
        t,
        thr.space,
        &AboveSumPass {
            t: thr.key,
            space: thr.space,
        },
    )?
    .iter()
    .sum();
    let tied = if thr.key == 0 {
        0.0
    } else {
        ties_taken as f64 * thr.space.magnitude(thr.key)
    };
    Ok(above + tied)
}

struct MaskPass<'a> {
    t: u64,
    budgets: &'a [u64],
    pos: &'a mut [u64],
    neg: &'a mut [u64],
}

impl KeyVisitor for MaskPass<'_> {
    type Out = ();
    fn visit<T: Elem, U: Key, K: Fn(T) -> U + Copy + Send + Sync>(self, data: &[T], key: K) {
        // Keep-nothing thresholds never reach here (nnz is 0 and the masks stay zero).
        let Some(t) = U::narrow(self.t) else { return };
        let wpc = PASS_CHUNK / 64;
        data.par_chunks(PASS_CHUNK)
            .zip(self.pos.par_chunks_mut(wpc))
            .zip(self.neg.par_chunks_mut(wpc))
            .zip(self.budgets.par_iter())
            .for_each(|(((c, p), n), &budget)| {
                let mut budget = budget;
                for ((g, pw), nw) in c.chunks(64).zip(p.iter_mut()).zip(n.iter_mut()) {
                    let (gt, eq, ng) = group_masks(g, key, t);
                    let keep = gt | take_ties(eq, &mut budget);
                    *pw = keep & !ng;
                    *nw = keep & ng;
                }
            });
    }
}

struct GolombPass<'a> {
    t: u64,
    /// Sum the kept entries' magnitudes too (in `space`), in the same pass.
    sum: Option<KeySpace>,
    b: u8,
    block_log2: u8,
    budgets: &'a [u64],
    starts: &'a [u64],
    counts: &'a [u64],
}

impl KeyVisitor for &GolombPass<'_> {
    /// Per chunk: its codes, and the sum of its kept magnitudes (0 unless asked for).
    type Out = Vec<(EncodedChunk, f64)>;
    fn visit<T: Elem, U: Key, K: Fn(T) -> U + Copy + Send + Sync>(
        self,
        data: &[T],
        key: K,
    ) -> Self::Out {
        let Some(t) = U::narrow(self.t) else {
            return Vec::new();
        };
        data.par_chunks(PASS_CHUNK)
            .enumerate()
            .map(|(ci, c)| {
                let mut budget = self.budgets[ci];
                let mut enc =
                    ChunkEncoder::new(self.b, self.block_log2, self.starts[ci], self.counts[ci]);
                let base0 = (ci * PASS_CHUNK) as u64;
                let mut kept_sum = 0.0;
                for (gi, g) in c.chunks(64).enumerate() {
                    let (gt, eq, ng) = group_masks(g, key, t);
                    let keep = gt | take_ties(eq, &mut budget);
                    if keep != 0 {
                        enc.push_word(base0 + (gi * 64) as u64, keep & !ng, keep & ng);
                        if let Some(space) = self.sum {
                            let mut m = keep;
                            while m != 0 {
                                let x = g[m.trailing_zeros() as usize];
                                kept_sum += space.magnitude(key(x).to_u64());
                                m &= m - 1;
                            }
                        }
                    }
                }
                (enc.finish(), kept_sum)
            })
            .collect()
    }
}

/// Compresses one tensor given a threshold from [`crate::selection`].
///
/// `ties_left` is the number of entries equal to the threshold that may still be kept; it is
/// shared across the tensors of one global selection (pass them in selection order) and
/// decremented by the ties this tensor keeps.
pub fn compress_with_threshold(
    t: Tensor<'_>,
    shape: &[u64],
    thr: &Threshold,
    ties_left: &mut u64,
    scale: f64,
    encoding: Encoding,
) -> Result<Compressed> {
    compress_summed(t, shape, thr, ties_left, scale, encoding, false).map(|(c, _)| c)
}

/// [`compress_with_threshold`], and with `sum` the sum of |x| over the kept entries (as
/// [`kept_abs_sum`] gives it) where the encoding pass can add it for free (golomb; None
/// otherwise).
pub(crate) fn compress_summed(
    t: Tensor<'_>,
    shape: &[u64],
    thr: &Threshold,
    ties_left: &mut u64,
    scale: f64,
    encoding: Encoding,
    sum: bool,
) -> Result<(Compressed, Option<f64>)> {
    let numel = t.len() as u64;
    if numel > MAX_NUMEL {
        return Err(Error::InvalidArgument(format!(
            "the tensor has {numel} entries, the format holds at most {MAX_NUMEL}; split it"
        )));
    }
    check_shape(shape, numel)?;
    if !scale_is_valid(scale) {
        return Err(bad_scale(scale));
    }
    // -0.0 would be a second byte string for the same content.
    let scale = scale + 0.0;
    let counts = visit_keys(
        t,
        thr.space,
        &CountPass {
            t: thr.key,
            inf: thr.space.inf_key(),
        },
    )?;
    if counts.iter().any(|c| c.2 > 0) {
        return Err(Error::NonFinite {
            index: crate::selection::first_non_finite(t),
        });
    }
    let mut budgets = Vec::with_capacity(counts.len());
    let mut kept = Vec::with_capacity(counts.len());
    for &(gt, eq, _) in &counts {
        let take = if thr.key == 0 || thr.key == u64::MAX {
            0
        } else {
            eq.min(*ties_left)
        };
        *ties_left -= take;
        budgets.push(take);
        kept.push(if thr.key == u64::MAX { 0 } else { gt + take });
    }
    let sum = (sum && encoding == Encoding::Golomb).then_some(thr.space);
    encode_counted(t, shape, thr, &budgets, &kept, scale, encoding, sum)
}

/// The second pass of [`compress_with_threshold`]: encodes what the count pass found (`budgets`
/// of tied entries and `kept` entries per chunk), and errors if the data no longer agrees;
/// with `sum` (golomb only) also the kept entries' magnitudes summed, in chunk order.
#[allow(clippy::too_many_arguments)]
fn encode_counted(
    t: Tensor<'_>,
    shape: &[u64],
    thr: &Threshold,
    budgets: &[u64],
    kept: &[u64],
    scale: f64,
    encoding: Encoding,
    sum: Option<KeySpace>,
) -> Result<(Compressed, Option<f64>)> {
    let numel = t.len() as u64;
    let nnz: u64 = kept.iter().sum();
    let mut kept_sum = None;
    let body = match encoding {
        Encoding::Bitmask => {
            let words = words_for(numel);
            let mut pos = try_zeroed(words)?;
            let mut neg = try_zeroed(words)?;
            visit_keys(
                t,
                thr.space,
                MaskPass {
                    t: thr.key,
                    budgets,
                    pos: &mut pos,
                    neg: &mut neg,
                },
            )?;
            let set: u64 = pos
                .par_iter()
                .zip(&neg)
                .map(|(p, n)| (p | n).count_ones() as u64)
                .sum();
            // See the golomb case below: the input is read twice.
            if set != nnz {
                return Err(changed_under_us());
            }
            Body::Bitmask(BitmaskBody { pos, neg })
        }
        Encoding::Golomb => {
            let b = rice_parameter(nnz, numel);
            let starts = chunk_starts(kept);
            let pass = GolombPass {
                t: thr.key,
                sum,
                b,
                block_log2: DEFAULT_BLOCK_LOG2,
                budgets,
                starts: &starts,
                counts: kept,
            };
            let chunks = visit_keys(t, thr.space, &pass)?;
            // The input is read twice; a caller's buffer written to in between (another thread,
            // with the GIL released) can change what the second pass keeps.
            let same = if chunks.is_empty() {
                nnz == 0
            } else {
                chunks.len() == kept.len()
                    && chunks.iter().zip(kept).all(|((c, _), &k)| c.count() == k)
            };
            if !same {
                return Err(changed_under_us());
            }
            if sum.is_some() {
                kept_sum = Some(chunks.iter().map(|c| c.1).sum());
            }
            let s = stitch(chunks.into_iter().map(|c| c.0).collect(), b);
            Body::Golomb(GolombBody::from_stitched(s, b))
        }
    };
    let c = Compressed {
        dtype: t.dtype(),
        shape: shape.to_vec(),
        numel,
        nnz,
        scale,
        body,
    }
    .smaller_layout()?;
    Ok((c, kept_sum))
}

fn changed_under_us() -> Error {
    Error::InvalidArgument(
        "the input changed while it was being compressed (written to by another thread?); \
         compress a buffer nobody writes to"
            .into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The count pass sees one buffer, the encode pass another (as when another thread writes
    /// to a borrowed buffer between them): an error, never a stream that disagrees with itself.
    #[test]
    fn input_changed_between_passes_is_an_error() {
        let x: Vec<f32> = (0..20_000)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 100.0)
            .collect();
        let (thr, _) = crate::select(&[Tensor::F32(&x)], 0.1).unwrap();
        let counts = visit_keys(
            Tensor::F32(&x),
            thr.space,
            &CountPass {
                t: thr.key,
                inf: thr.space.inf_key(),
            },
        )
        .unwrap();
        let kept: Vec<u64> = counts.iter().map(|c| c.0).collect();
        let budgets = vec![0; kept.len()];
        let mut y = x.clone();
        y.iter_mut().take(100).for_each(|v| *v = 1000.0);
        for enc in [Encoding::Golomb, Encoding::Bitmask] {
            let enc_x = |t| encode_counted(t, &[20_000], &thr, &budgets, &kept, 1.0, enc, None);
            let ok = enc_x(Tensor::F32(&x));
            assert!(ok.is_ok());
            let bad = enc_x(Tensor::F32(&y));
            assert!(matches!(bad, Err(Error::InvalidArgument(m)) if m.contains("changed")));
        }
    }
}
