//! The row-adaptive layout of a golomb stream (encoding code 2, docs/FORMAT.md): a count per row
//! and each row's gaps Rice-coded with that row's own b*, counted from the row's start.
//!
//! Plain Rice coding is optimal for a mask whose kept entries are spread evenly. A full fine-tune's
//! residual is not: most rows of a word embedding are never touched, and the kept entries crowd
//! into the rest. Coding each row's count and then its gaps with the b* of its own density costs
//! 1.02-1.04x the adaptive (per-row Krichevsky-Trofimov) bound there, against 1.33-1.43x for one
//! b* over the tensor (benches/adaptive_candidates.py). The encoder builds the plain stream first,
//! builds this layout from its positions, and keeps whichever is smaller.

use rayon::prelude::*;

use crate::bits::BitWriter;
use crate::codec::{Body, Compressed, GolombBody, RowCoding};
use crate::error::{try_zeroed, Result};
use crate::golomb::{rice_parameter, BlockStart};

/// Positions per task of the row pass: long enough that a task's setup is noise.
const TASK_NNZ: usize = 1 << 16;

impl Compressed {
    /// This stream in the smaller of the plain and the row-coded golomb layouts (rows of the
    /// last dimension; tensors of one row, and bitmask streams, stay as they are). The choice
    /// depends only on the ternary pattern, so every path that builds a golomb stream (encoding,
    /// conversion from bitmasks) gives the same bytes.
    pub(crate) fn smaller_layout(self) -> Result<Compressed> {
        let Body::Golomb(g) = &self.body else {
            return Ok(self);
        };
        let cols = self.shape.last().copied().unwrap_or(1);
        if g.rows.is_some()
            || self.shape.len() < 2
            || cols == 0
            || cols >= self.numel
            || self.nnz == 0
        {
            return Ok(self);
        }
        let rows = self.with_rows(cols)?;
        Ok(if rows.nbytes() < self.nbytes() {
            rows
        } else {
            self
        })
    }

    /// A plain golomb stream (checked) in the row-coded layout with rows of `cols` entries
    /// (`cols` divides `numel`), whatever its size.
    pub(crate) fn with_rows(&self, cols: u64) -> Result<Compressed> {
        let Body::Golomb(g) = &self.body else {
            return crate::error::malformed("not a golomb stream");
        };
        Ok(Compressed {
            body: Body::Golomb(row_coded(g, self.numel, self.nnz, cols)?),
            ..self.clone()
        })
    }

    /// The same stream coded by rows of its last dimension (one row for a 0-d tensor), whatever
    /// its size.
    pub fn to_row_golomb(&self) -> Result<Compressed> {
        let plain = self.to_plain_golomb()?;
        plain.check()?;
        plain.with_rows(self.shape.last().copied().unwrap_or(1))
    }

    /// The same stream in the plain golomb layout (one Rice parameter over the tensor), for
    /// readers written before the row-coded layout.
    pub fn to_plain_golomb(&self) -> Result<Compressed> {
        match &self.body {
            Body::Golomb(g) if g.rows.is_none() => Ok(self.clone()),
            _ => self.to_bitmask()?.plain_golomb_from_masks(),
        }
    }
}

/// The kept positions of a checked golomb stream, in order, decoded in parallel groups of blocks.
fn positions(g: &GolombBody, numel: u64, nnz: u64) -> Result<Vec<u64>> {
    let mut out = try_zeroed(nnz as usize)?;
    if nnz == 0 {
        return Ok(out);
    }
    let nb = g.block_count(nnz) as usize;
    let bsz = 1usize << g.block_log2;
    let groups = nb.min(rayon::current_num_threads() * 4).max(1);
    let per = nb.div_ceil(groups);
    out.par_chunks_mut(per * bsz)
        .enumerate()
        .try_for_each(|(gi, o)| {
            let (b0, b1) = (gi * per, ((gi + 1) * per).min(nb));
            // Runs arrive interleaved across the blocks walked together: each block has its
            // own cursor into the output.
            let mut at: Vec<usize> = (0..b1 - b0).map(|j| j * bsz).collect();
            g.decode_runs(numel, nnz, b0, b1, |j, ps, _| {
                let k = &mut at[j - b0];
                o[*k..*k + ps.len()].copy_from_slice(ps);
                *k += ps.len();
            })
        })?;
    Ok(out)
}

/// One task of the row pass: the positions `lo..hi` (whole rows) and the rows `r0..r1` it codes.
struct Part {
    lo: usize,
    hi: usize,
    r0: u64,
    r1: u64,
}

/// What a task wrote: its count bits, its gap bits, and the block starts inside them (bit
/// offsets local to its gap bits).
struct Coded {
    counts: (Vec<u64>, u64),
    gaps: (Vec<u64>, u64),
    marks: Vec<BlockStart>,
}

/// The row-coded body of the plain golomb stream `g` (checked), rows of `cols` entries.
fn row_coded(g: &GolombBody, numel: u64, nnz: u64, cols: u64) -> Result<GolombBody> {
    let pos = positions(g, numel, nnz)?;
    let nrows = numel / cols;
    // Tasks of about TASK_NNZ positions, each cut at a row's first position.
    let mut parts = Vec::new();
    let (mut lo, mut r0) = (0usize, 0u64);
    while lo < pos.len() {
        let mut hi = (lo + TASK_NNZ).min(pos.len());
        if hi < pos.len() {
            let row_end = (pos[hi - 1] / cols + 1) * cols;
            hi += pos[hi..].partition_point(|&p| p < row_end);
        }
        let r1 = if hi < pos.len() {
            pos[hi] / cols
        } else {
            nrows
        };
        parts.push(Part { lo, hi, r0, r1 });
        (lo, r0) = (hi, r1);
    }
    if parts.is_empty() {
        // Nothing kept: a zero bit per row.
        parts.push(Part {
            lo: 0,
            hi: 0,
            r0: 0,
            r1: nrows,
        });
    }
    // Each non-empty row's count, to choose the counts' Rice parameter over the whole tensor.
    let counts: Vec<Vec<u64>> = parts
        .par_iter()
        .map(|p| row_counts(&pos[p.lo..p.hi], cols))
        .collect();
    let count_b = count_parameter(nrows, counts.iter().flatten().copied(), cols);
    let bsz = 1u64 << g.block_log2;
    let coded: Vec<Coded> = parts
        .par_iter()
        .zip(&counts)
        .map(|(p, cs)| code_part(&pos, p, cs, cols, count_b, bsz))
        .collect();
    let mut cw = BitWriter::with_capacity_bits(coded.iter().map(|c| c.counts.1 as usize).sum());
    let mut gw = BitWriter::with_capacity_bits(coded.iter().map(|c| c.gaps.1 as usize).sum());
    let mut index = Vec::new();
    for c in coded {
        let base = gw.len();
        index.extend(c.marks.iter().map(|m| BlockStart {
            bit: base + m.bit,
            next: m.next,
        }));
        cw.append(&c.counts.0, c.counts.1);
        gw.append(&c.gaps.0, c.gaps.1);
    }
    let (cwords, count_bits) = cw.finish();
    let (gaps, gap_bits) = gw.finish();
    let rows = RowCoding::parse(cols, count_b, cwords, count_bits, numel, nnz)?;
    Ok(GolombBody {
        rice_b: 0,
        block_log2: g.block_log2,
        gaps,
        gap_bits,
        signs: g.signs.clone(),
        index,
        rows: Some(Box::new(rows)),
    })
}

/// The count of each non-empty row among increasing positions, in order.
fn row_counts(pos: &[u64], cols: u64) -> Vec<u64> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < pos.len() {
        let end = (pos[i] / cols + 1) * cols;
        let n = pos[i..].partition_point(|&p| p < end);
        out.push(n as u64);
        i += n;
    }
    out
}

/// The Rice parameter that codes the counts (less one) of the non-empty rows in the fewest bits,
/// the smallest of equals.
fn count_parameter(nrows: u64, counts: impl Iterator<Item = u64> + Clone, cols: u64) -> u8 {
    let top = (64 - cols.leading_zeros()).min(63) as u8;
    (0..=top)
        .min_by_key(|&b| {
            nrows
                + counts
                    .clone()
                    .map(|c| ((c - 1) >> b) + 1 + b as u64)
                    .sum::<u64>()
        })
        .unwrap_or(0)
}

/// Writes `n` zero bits.
fn write_zeros(w: &mut BitWriter, mut n: u64) {
    while n > 0 {
        let k = n.min(64);
        w.write(0, k as u32);
        n -= k;
    }
}

/// Codes one task: a bit (and a count) per row `r0..r1`, the gaps of its positions row by row.
fn code_part(pos: &[u64], p: &Part, counts: &[u64], cols: u64, count_b: u8, bsz: u64) -> Coded {
    let mut cw = BitWriter::with_capacity_bits((p.r1 - p.r0) as usize + 16 * counts.len());
    let mut gw = BitWriter::with_capacity_bits(4 * (p.hi - p.lo));
    let mut marks = Vec::new();
    let (mut row, mut i) = (p.r0, p.lo);
    for &n in counts {
        let r = pos[i] / cols;
        write_zeros(&mut cw, r - row);
        cw.write_bit(true);
        cw.write_rice(n - 1, count_b as u32);
        let b = rice_parameter(n, cols) as u32;
        let mut next = r * cols;
        for &at in &pos[i..i + n as usize] {
            // Block 0 starts at bit 0 and is not in the index.
            if i as u64 % bsz == 0 && i > 0 {
                marks.push(BlockStart {
                    bit: gw.len(),
                    next,
                });
            }
            gw.write_rice(at - next, b);
            next = at + 1;
            i += 1;
        }
        row = r + 1;
    }
    write_zeros(&mut cw, p.r1 - row);
    Coded {
        counts: cw.finish(),
        gaps: gw.finish(),
        marks,
    }
}
