//! Conversions that need no dense pass: golomb to bitmasks and back, and the kept entries of a
//! range of positions (in order, or a run at a time) straight from the stream.

use std::borrow::Cow;

use rayon::prelude::*;

use crate::codec::{
    chunk_starts, words_for, BitmaskBody, Body, Compressed, GolombBody, DEFAULT_BLOCK_LOG2,
};
use crate::error::{malformed, try_zeroed, Result};
use crate::golomb::{rice_parameter, stitch, ChunkEncoder, EncodedChunk, WALK_LANES};
use crate::selection::PASS_CHUNK;

impl Compressed {
    /// The ternary pattern as bitmasks; borrowed if this stream is already a bitmask.
    pub fn masks(&self) -> Result<Cow<'_, BitmaskBody>> {
        match &self.body {
            Body::Bitmask(m) => Ok(Cow::Borrowed(m)),
            Body::Golomb(g) => {
                self.check()?;
                let words = words_for(self.numel);
                let mut pos = try_zeroed(words)?;
                let mut neg = try_zeroed(words)?;
                let nb = g.block_count(self.nnz) as usize;
                let groups = nb.min(rayon::current_num_threads() * 4);
                // Groups of blocks, split by the block index. Group i owns the words from that
                // of its first position up to that of the next group's first position; its bits
                // in the next group's first word (shared) come back as a carry, ORed in after.
                let mut parts = Vec::with_capacity(groups);
                let (mut prest, mut nrest) = (&mut pos[..], &mut neg[..]);
                let mut w_at = 0usize;
                for gi in 0..groups {
                    let (b0, b1) = (gi * nb / groups, (gi + 1) * nb / groups);
                    let end = if b1 < nb {
                        g.block_start(b1).next
                    } else {
                        self.numel
                    };
                    let w_end = (end / 64) as usize;
                    if w_end < w_at || w_end > words {
                        return malformed("block index is not increasing");
                    }
                    let (p, pt) = std::mem::take(&mut prest).split_at_mut(w_end - w_at);
                    let (n, nt) = std::mem::take(&mut nrest).split_at_mut(w_end - w_at);
                    (prest, nrest) = (pt, nt);
                    parts.push((b0, b1, w_at, p, n));
                    w_at = w_end;
                }
                let (numel, nnz) = (self.numel, self.nnz);
                let carries: Vec<(usize, u64, u64)> = parts
                    .into_par_iter()
                    .map(|(b0, b1, w0, p, n)| {
                        let (mut cp, mut cn) = (0u64, 0u64);
                        let w_end = w0 + p.len();
                        g.decode_runs(numel, nnz, b0, b1, |_, ps, signs| {
                            for (r, &at) in ps.iter().enumerate() {
                                let (w, bit) = ((at / 64) as usize, 1u64 << (at % 64));
                                // The sign by masks, not a branch: signs are random, and a
                                // branch on them mispredicted half the time (2x slower).
                                let neg = (signs >> r) & 1;
                                let (bp, bn) =
                                    (bit & neg.wrapping_sub(1), bit & neg.wrapping_neg());
                                if w < w_end {
                                    p[w - w0] |= bp;
                                    n[w - w0] |= bn;
                                } else {
                                    cp |= bp;
                                    cn |= bn;
                                }
                            }
                        })?;
                        Ok((w_end, cp, cn))
                    })
                    .collect::<Result<_>>()?;
                for (w, cp, cn) in carries {
                    if cp | cn != 0 {
                        pos[w] |= cp;
                        neg[w] |= cn;
                    }
                }
                Ok(Cow::Owned(BitmaskBody { pos, neg }))
            }
        }
    }

    /// Calls `emit(position, negative)` for every kept entry at a position in `[lo, hi)`, in
    /// order, decoding only the blocks that overlap the range (found through the block index).
    pub fn for_each_kept_in(&self, lo: u64, hi: u64, emit: impl FnMut(u64, bool)) -> Result<()> {
        self.check()?;
        self.for_each_kept_in_checked(lo, hi, emit)
    }

    /// [`Compressed::for_each_kept_in`] for a stream the caller has checked: callers that
    /// visit many ranges of one stream check it once, not once per range (the check walks the
    /// whole block index).
    pub(crate) fn for_each_kept_in_checked(
        &self,
        lo: u64,
        hi: u64,
        mut emit: impl FnMut(u64, bool),
    ) -> Result<()> {
        let hi = hi.min(self.numel);
        if lo >= hi {
            return Ok(());
        }
        match &self.body {
            Body::Bitmask(m) => {
                for w in (lo / 64) as usize..hi.div_ceil(64) as usize {
                    let base = w as u64 * 64;
                    let mut bits = m.pos[w] | m.neg[w];
                    while bits != 0 {
                        let b = bits.trailing_zeros() as u64;
                        bits &= bits - 1;
                        let at = base + b;
                        if at >= lo && at < hi {
                            emit(at, m.neg[w] >> b & 1 == 1);
                        }
                    }
                }
                Ok(())
            }
            Body::Golomb(g) => {
                let (j0, j1) = g.blocks_overlapping(self.nnz, lo, hi);
                // The first block of each walk comes first in position order and goes straight
                // to `emit`; the others' entries (position << 1 | negative) wait until it ends.
                let mut held: [Vec<u64>; WALK_LANES - 1] = Default::default();
                let mut j = j0;
                while j < j1 {
                    let jn = (j + WALK_LANES).min(j1);
                    held.iter_mut().for_each(Vec::clear);
                    // At most WALK_LANES blocks: block j + l walks in lane l, none refills.
                    g.decode_runs(self.numel, self.nnz, j, jn, |jb, ps, signs| {
                        let l = jb - j;
                        for (i, &at) in ps.iter().enumerate() {
                            if at >= lo && at < hi {
                                let neg = (signs >> i) & 1 == 1;
                                if l == 0 {
                                    emit(at, neg)
                                } else {
                                    held[l - 1].push(at << 1 | neg as u64)
                                }
                            }
                        }
                    })?;
                    for e in held.iter().flatten() {
                        emit(e >> 1, e & 1 == 1);
                    }
                    j = jn;
                }
                Ok(())
            }
        }
    }

    /// Calls `sink(positions, signs)` for the kept entries at positions in `[lo, hi)`, a run
    /// at a time (increasing positions, bit r of `signs` set when positions[r] is negative), in
    /// no particular order across runs: for sums over a stream's entries, which need no order
    /// and walk its blocks four at a time with no buffering. For a stream the caller has checked.
    pub(crate) fn kept_runs_in_checked(
        &self,
        lo: u64,
        hi: u64,
        mut sink: impl FnMut(&[u64], u64),
    ) -> Result<()> {
        let hi = hi.min(self.numel);
        if lo >= hi {
            return Ok(());
        }
        match &self.body {
            Body::Bitmask(m) => {
                let mut ps = [0u64; 64];
                for w in (lo / 64) as usize..hi.div_ceil(64) as usize {
                    let base = w as u64 * 64;
                    // Only the range's bits of its first and last words.
                    let from = lo.saturating_sub(base).min(64);
                    let to = (hi - base).min(64);
                    let span = if to - from == 64 {
                        !0
                    } else {
                        ((1u64 << (to - from)) - 1) << from
                    };
                    let (mut bits, neg) = ((m.pos[w] | m.neg[w]) & span, m.neg[w]);
                    let (mut n, mut signs) = (0, 0u64);
                    while bits != 0 {
                        let b = bits.trailing_zeros() as u64;
                        bits &= bits - 1;
                        ps[n] = base + b;
                        signs |= ((neg >> b) & 1) << n;
                        n += 1;
                    }
                    if n > 0 {
                        sink(&ps[..n], signs);
                    }
                }
                Ok(())
            }
            Body::Golomb(g) => {
                let (j0, j1) = g.blocks_overlapping(self.nnz, lo, hi);
                g.decode_runs(self.numel, self.nnz, j0, j1, |_, ps, signs| {
                    let (first, last) = (ps[0], ps[ps.len() - 1]);
                    if first >= lo && last < hi {
                        sink(ps, signs);
                        return;
                    }
                    // A run across the range's edge (in its first or last block): the part
                    // inside, its signs shifted along.
                    let a = ps.partition_point(|&p| p < lo);
                    let b = ps.partition_point(|&p| p < hi);
                    if a < b {
                        sink(&ps[a..b], signs >> a);
                    }
                })
            }
        }
    }

    /// Every kept entry, a run at a time in no particular order (as
    /// [`Compressed::kept_runs_in_checked`]), after checking the stream: for callers that only
    /// accumulate.
    pub(crate) fn for_each_kept_run(&self, sink: impl FnMut(&[u64], u64)) -> Result<()> {
        self.check()?;
        self.kept_runs_in_checked(0, self.numel, sink)
    }

    /// The position of kept entry number `keep` (counting from 0 in position order), so that
    /// the positions below it hold exactly the first `keep` kept entries; `numel` when the
    /// stream keeps no more than `keep`. For a stream the caller has checked.
    pub(crate) fn kept_prefix_end(&self, keep: u64) -> Result<u64> {
        if keep >= self.nnz {
            return Ok(self.numel);
        }
        match &self.body {
            Body::Bitmask(m) => {
                let mut seen = 0u64;
                for (w, (&p, &n)) in m.pos.iter().zip(&m.neg).enumerate() {
                    let bits = p | n;
                    let c = bits.count_ones() as u64;
                    if seen + c > keep {
                        // Drop the lowest (keep - seen) set bits; the next one is the entry.
                        let mut rest = bits;
                        for _ in 0..keep - seen {
                            rest &= rest - 1;
                        }
                        return Ok(w as u64 * 64 + rest.trailing_zeros() as u64);
                    }
                    seen += c;
                }
                malformed("bitmasks hold fewer nonzeros than the header says")
            }
            Body::Golomb(g) => {
                // Only the block holding the entry is decoded.
                let j = (keep >> g.block_log2) as usize;
                let mut left = keep - ((j as u64) << g.block_log2);
                let mut found = None;
                g.decode_blocks(self.numel, self.nnz, j, j + 1, |_, at, _| {
                    if left == 0 && found.is_none() {
                        found = Some(at);
                    }
                    left = left.wrapping_sub(1);
                })?;
                found.map_or_else(
                    || malformed("a block holds fewer nonzeros than the header says"),
                    Ok,
                )
            }
        }
    }

    /// The same ternary vector in the bitmask encoding.
    pub fn to_bitmask(&self) -> Result<Compressed> {
        let m = self.masks()?.into_owned();
        Ok(Compressed {
            body: Body::Bitmask(m),
            ..self.header_clone()
        })
    }

    /// The same ternary vector in the golomb encoding, in the smaller of its two layouts: the
    /// bytes the encoder writes for it, from either encoding and either layout.
    pub fn to_golomb(&self) -> Result<Compressed> {
        self.to_plain_golomb()?.smaller_layout()
    }

    /// A bitmask stream in the plain golomb layout.
    pub(crate) fn plain_golomb_from_masks(&self) -> Result<Compressed> {
        let Body::Bitmask(m) = &self.body else {
            return malformed("not a bitmask stream");
        };
        self.check()?;
        let b = rice_parameter(self.nnz, self.numel);
        let wpc = PASS_CHUNK / 64;
        let counts: Vec<u64> = m
            .pos
            .par_chunks(wpc)
            .zip(m.neg.par_chunks(wpc))
            .map(|(p, n)| {
                p.iter()
                    .zip(n)
                    .map(|(a, b)| (a | b).count_ones() as u64)
                    .sum()
            })
            .collect();
        let starts = chunk_starts(&counts);
        let chunks: Vec<EncodedChunk> = m
            .pos
            .par_chunks(wpc)
            .zip(m.neg.par_chunks(wpc))
            .enumerate()
            .map(|(ci, (p, n))| {
                let mut enc = ChunkEncoder::new(b, DEFAULT_BLOCK_LOG2, starts[ci], counts[ci]);
                for (k, (&pw, &nw)) in p.iter().zip(n).enumerate() {
                    if pw | nw != 0 {
                        enc.push_word(((ci * wpc + k) * 64) as u64, pw, nw);
                    }
                }
                enc.finish()
            })
            .collect();
        Ok(Compressed {
            body: Body::Golomb(GolombBody::from_stitched(stitch(chunks, b), b)),
            ..self.header_clone()
        })
    }

    /// This stream's header with an empty body, for building another body under it.
    pub(crate) fn header_clone(&self) -> Compressed {
        Compressed {
            dtype: self.dtype,
            shape: self.shape.clone(),
            numel: self.numel,
            nnz: self.nnz,
            scale: self.scale,
            body: Body::Bitmask(BitmaskBody {
                pos: Vec::new(),
                neg: Vec::new(),
            }),
        }
    }
}
