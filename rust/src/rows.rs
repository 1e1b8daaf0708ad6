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
use crate::format::{golomb_body_nbytes, index_nbytes};
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
        Ok(row_coded(&self, cols, Some(self.nbytes()))?.unwrap_or(self))
    }

    /// A plain golomb stream (checked) in the row-coded layout with rows of `cols` entries
    /// (`cols` divides `numel`), whatever its size.
    pub(crate) fn with_rows(&self, cols: u64) -> Result<Compressed> {
        row_coded(self, cols, None)?.ok_or_else(|| {
            crate::error::Error::Malformed(
                "coding by rows gave nothing without a size limit".into(),
            )
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
    // A small stream in one group on this thread: handing work to the pool costs more.
    let groups = if nnz < TASK_NNZ as u64 {
        1
    } else {
        nb.min(rayon::current_num_threads() * 4).max(1)
    };
    let per = nb.div_ceil(groups);
    let fill = |gi: usize, o: &mut [u64]| {
        let (b0, b1) = (gi * per, ((gi + 1) * per).min(nb));
        // Runs arrive interleaved across the blocks walked together: each block has its own
        // cursor into the output.
        let mut at: Vec<usize> = (0..b1 - b0).map(|j| j * bsz).collect();
        g.decode_runs(numel, nnz, b0, b1, |j, ps, _| {
            let k = &mut at[j - b0];
            o[*k..*k + ps.len()].copy_from_slice(ps);
            *k += ps.len();
        })
    };
    if groups == 1 {
        fill(0, &mut out)?;
    } else {
        out.par_chunks_mut(per * bsz)
            .enumerate()
            .try_for_each(|(gi, o)| fill(gi, o))?;
    }
    Ok(out)
}

/// One task of the row pass: the positions `lo..hi` (whole rows) and the rows `r0..r1` it codes.
struct Part {
    lo: usize,
    hi: usize,
    r0: u64,
    r1: u64,
}

/// Where the row pass writes its bits: a [`BitWriter`], or a counter that only adds up their
/// lengths (the size pass that decides whether coding by rows pays).
trait Bits {
    fn len(&self) -> u64;
    fn zeros(&mut self, n: u64);
    fn one(&mut self);
    fn rice(&mut self, g: u64, b: u32);
}

impl Bits for BitWriter {
    fn len(&self) -> u64 {
        BitWriter::len(self)
    }
    fn zeros(&mut self, mut n: u64) {
        while n > 0 {
            let k = n.min(64);
            self.write(0, k as u32);
            n -= k;
        }
    }
    fn one(&mut self) {
        self.write_bit(true);
    }
    #[inline(always)]
    fn rice(&mut self, g: u64, b: u32) {
        self.write_rice(g, b);
    }
}

/// A bit count.
#[derive(Default)]
struct Count(u64);

impl Bits for Count {
    fn len(&self) -> u64 {
        self.0
    }
    fn zeros(&mut self, n: u64) {
        self.0 += n;
    }
    fn one(&mut self) {
        self.0 += 1;
    }
    #[inline(always)]
    fn rice(&mut self, g: u64, b: u32) {
        self.0 += (g >> b) + 1 + b as u64;
    }
}

/// The plain golomb stream `c` (checked) coded by rows of `cols` entries; None when it would
/// not be smaller than `limit` bytes. A size pass runs first, so a tensor that stays plain costs
/// a walk of its positions and no writing.
fn row_coded(c: &Compressed, cols: u64, limit: Option<usize>) -> Result<Option<Compressed>> {
    let Body::Golomb(g) = &c.body else {
        return crate::error::malformed("not a golomb stream");
    };
    let plan = RowPlan::new(g, c.numel, c.nnz, cols)?;
    if let Some(limit) = limit {
        // From the counts alone: every code takes at least its stop bit and b low bits. Where
        // that is already no smaller than the plain gap codes and index (with room for the few
        // header bytes the layouts differ by), the rows cannot win: no size pass.
        let at_least = plan.count_bits() + plan.min_gap_bits();
        let plain = g.gap_bits.div_ceil(8) as usize + index_nbytes(&g.index, g.block_start(0)) + 10;
        if at_least.div_ceil(8) as usize >= plain || plan.nbytes(g, c) >= limit {
            return Ok(None);
        }
    }
    Ok(Some(Compressed {
        body: Body::Golomb(plan.build(g)),
        ..c.header_clone()
    }))
}

/// What coding a stream by rows takes: its positions cut into tasks at row starts, each
/// non-empty row's count, the counts' Rice parameter and each count's b*.
struct RowPlan {
    pos: Vec<u64>,
    cols: u64,
    parts: Vec<Part>,
    counts: Vec<Vec<(u64, u64)>>,
    count_b: u8,
    bsz: u64,
    levels: Vec<(u64, u64, u8)>,
}

impl RowPlan {
    fn new(g: &GolombBody, numel: u64, nnz: u64, cols: u64) -> Result<RowPlan> {
        if cols == 0 || numel % cols != 0 {
            return Err(crate::error::Error::InvalidArgument(format!(
                "a tensor of {numel} entries has no rows of {cols} entries to code by; \
                 use the plain layout"
            )));
        }
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
        let counts: Vec<Vec<(u64, u64)>> = if parts.len() == 1 {
            vec![row_counts(&pos, cols)]
        } else {
            parts
                .par_iter()
                .map(|p| row_counts(&pos[p.lo..p.hi], cols))
                .collect()
        };
        // The distinct counts and how many rows hold each: the counts' Rice parameter, and
        // each count's b* computed once.
        let mut all: Vec<u64> = counts.iter().flatten().map(|rc| rc.1).collect();
        all.sort_unstable();
        let mut levels: Vec<(u64, u64, u8)> = Vec::new();
        for n in all {
            match levels.last_mut() {
                Some(l) if l.0 == n => l.1 += 1,
                _ => levels.push((n, 1, rice_parameter(n, cols))),
            }
        }
        let count_b = count_parameter(nrows, &levels, cols);
        Ok(RowPlan {
            pos,
            cols,
            parts,
            counts,
            count_b,
            bsz: 1u64 << g.block_log2,
            levels,
        })
    }

    /// The b* of a row holding `n` entries (a count the plan has seen).
    fn b_of(&self, n: u64) -> u8 {
        let i = self.levels.partition_point(|l| l.0 < n);
        self.levels[i].2
    }

    /// The bits of the row counts.
    fn count_bits(&self) -> u64 {
        let cb = self.count_b as u64;
        let rows: u64 = self.parts.iter().map(|p| p.r1 - p.r0).sum();
        rows + self
            .levels
            .iter()
            .map(|&(n, h, _)| h * (((n - 1) >> cb) + 1 + cb))
            .sum::<u64>()
    }

    /// The fewest bits the gap codes can take: a stop bit and b low bits each.
    fn min_gap_bits(&self) -> u64 {
        self.levels
            .iter()
            .map(|&(n, h, b)| h * n * (1 + b as u64))
            .sum()
    }

    /// Every task coded into fresh `B`s: its count bits, gap bits and block starts (local).
    fn code<B: Bits + Send>(
        &self,
        new: impl Fn(&Part, &[(u64, u64)]) -> B + Sync,
    ) -> Vec<(B, B, Vec<BlockStart>)> {
        let one = |(p, cs): (&Part, &Vec<(u64, u64)>)| {
            let (mut cw, mut gw) = (new(p, cs), new(p, cs));
            let marks = code_part(self, p, cs, &mut cw, &mut gw);
            (cw, gw, marks)
        };
        // One task (a small tensor) on this thread.
        if self.parts.len() == 1 {
            return self.parts.iter().zip(&self.counts).map(one).collect();
        }
        self.parts.par_iter().zip(&self.counts).map(one).collect()
    }

    /// The size of the row-coded stream, exactly, without writing it: the plain stream `c` (body
    /// `g`) less its index and payload, plus what coding by rows adds.
    fn nbytes(&self, g: &GolombBody, c: &Compressed) -> usize {
        let (mut count_bits, mut gap_bits, mut index) = (0u64, 0u64, Vec::new());
        for (cw, gw, marks) in self.code(|_, _| Count::default()) {
            index.extend(marks.iter().map(|m| BlockStart {
                bit: gap_bits + m.bit,
                next: m.next,
            }));
            count_bits += cw.0;
            gap_bits += gw.0;
        }
        let first = BlockStart {
            bit: 0,
            next: self.pos.first().map_or(0, |&p| p / self.cols * self.cols),
        };
        // The plain stream with its golomb body swapped for this one.
        c.nbytes() - golomb_body_nbytes(g.gap_bits, &g.index, g.block_start(0), c.nnz, None)
            + golomb_body_nbytes(
                gap_bits,
                &index,
                first,
                c.nnz,
                Some((self.cols, count_bits)),
            )
    }

    /// The row-coded body.
    fn build(&self, g: &GolombBody) -> GolombBody {
        let coded = self.code(|p, cs| {
            BitWriter::with_capacity_bits(
                (p.r1 - p.r0) as usize + 16 * cs.len() + 4 * (p.hi - p.lo),
            )
        });
        let mut cw = BitWriter::with_capacity_bits(coded.iter().map(|c| c.0.len() as usize).sum());
        let mut gw = BitWriter::with_capacity_bits(coded.iter().map(|c| c.1.len() as usize).sum());
        let mut index = Vec::new();
        for (c, gg, marks) in coded {
            let base = gw.len();
            index.extend(marks.iter().map(|m| BlockStart {
                bit: base + m.bit,
                next: m.next,
            }));
            let (cwords, cbits) = c.finish();
            let (gwords, gbits) = gg.finish();
            cw.append(&cwords, cbits);
            gw.append(&gwords, gbits);
        }
        let (counts, count_bits) = cw.finish();
        let (gaps, gap_bits) = gw.finish();
        // What the walk needs, from the counts at hand (a parse would read back what was just
        // written; the round-trip tests check that it agrees).
        let n = self.counts.iter().map(Vec::len).sum();
        let (mut rows, mut ends, mut bs) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let mut total = 0;
        for &(row, c) in self.counts.iter().flatten() {
            total += c;
            rows.push(row);
            ends.push(total);
            bs.push(self.b_of(c));
        }
        GolombBody {
            rice_b: 0,
            block_log2: g.block_log2,
            gaps,
            gap_bits,
            signs: g.signs.clone(),
            index,
            rows: Some(Box::new(RowCoding {
                cols: self.cols,
                count_b: self.count_b,
                counts,
                count_bits,
                rows,
                ends,
                bs,
            })),
        }
    }
}

/// Each non-empty row among increasing positions and its count, in order. One division for the
/// first row, then the rows are stepped through (a division per position cost more than the
/// coding of a tensor of narrow rows).
fn row_counts(pos: &[u64], cols: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    let Some(&first) = pos.first() else {
        return out;
    };
    let mut row = first / cols;
    let mut end = (row + 1) * cols;
    let mut n = 0u64;
    for &p in pos {
        if p >= end {
            out.push((row, n));
            n = 0;
            // Far jumps (runs of empty rows) by division, near ones by steps.
            if p - end >= 4 * cols {
                row = p / cols;
                end = (row + 1) * cols;
            } else {
                while p >= end {
                    row += 1;
                    end += cols;
                }
            }
        }
        n += 1;
    }
    out.push((row, n));
    out
}

/// The Rice parameter that codes the counts (less one) of the non-empty rows in the fewest bits,
/// the smallest of equals; `levels` holds (count, rows with it, its b*).
fn count_parameter(nrows: u64, levels: &[(u64, u64, u8)], cols: u64) -> u8 {
    let top = (64 - cols.leading_zeros()).min(63) as u8;
    (0..=top)
        .min_by_key(|&b| {
            nrows
                + levels
                    .iter()
                    .map(|&(n, h, _)| h * (((n - 1) >> b) + 1 + b as u64))
                    .sum::<u64>()
        })
        .unwrap_or(0)
}

/// Codes one task into `cw` (a bit and a count per row `r0..r1`) and `gw` (the gaps of its
/// positions row by row); the block starts inside it, bit offsets local to `gw`.
fn code_part(
    plan: &RowPlan,
    p: &Part,
    counts: &[(u64, u64)],
    cw: &mut impl Bits,
    gw: &mut impl Bits,
) -> Vec<BlockStart> {
    let (pos, cols) = (&plan.pos, plan.cols);
    let mut marks = Vec::new();
    let (mut row, mut i) = (p.r0, p.lo);
    for &(r, n) in counts {
        cw.zeros(r - row);
        cw.one();
        cw.rice(n - 1, plan.count_b as u32);
        let b = plan.b_of(n) as u32;
        let mut next = r * cols;
        for &at in &pos[i..i + n as usize] {
            // Block 0 starts at bit 0 and is not in the index.
            if i as u64 & (plan.bsz - 1) == 0 && i > 0 {
                marks.push(BlockStart {
                    bit: gw.len(),
                    next,
                });
            }
            gw.rice(at - next, b);
            next = at + 1;
            i += 1;
        }
        row = r + 1;
    }
    cw.zeros(p.r1 - row);
    marks
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{compress, Encoding, Tensor};

    /// The size pass predicts the row-coded stream's bytes exactly (the encoder's choice rests on
    /// it), on tensors with and without empty rows, one block and many.
    #[test]
    fn size_pass_is_exact() {
        for (rows, cols, k, seed) in [
            (40, 64, 0.1, 1),
            (3000, 96, 0.05, 2),
            (4096, 16, 0.1, 3),
            (16, 4096, 0.1, 4),
            (500, 1, 0.3, 5),
        ] {
            let mut s = seed as u64;
            let x: Vec<f32> = (0..rows * cols)
                .map(|i| {
                    s = s
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let v = ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5;
                    if (i / cols) % 5 < 2 {
                        v
                    } else {
                        v * ((i / cols) % 7) as f32 * 0.1
                    }
                })
                .collect();
            let c = compress(
                Tensor::F32(&x),
                &[rows as u64, cols as u64],
                k,
                1.0,
                Encoding::Golomb,
            )
            .unwrap();
            let plain = c.to_plain_golomb().unwrap();
            let Body::Golomb(g) = &plain.body else {
                unreachable!()
            };
            let plan = RowPlan::new(g, plain.numel, plain.nnz, cols as u64).unwrap();
            let built = Compressed {
                body: Body::Golomb(plan.build(g)),
                ..plain.header_clone()
            };
            // The tables the walk uses are those a parse of the bytes gives.
            assert_eq!(Compressed::from_bytes(&built.to_bytes()).unwrap(), built);
            assert_eq!(plan.nbytes(g, &plain), built.nbytes(), "{rows}x{cols}");
            assert_eq!(built.to_bytes().len(), built.nbytes());
            assert_eq!(c.nbytes(), plain.nbytes().min(built.nbytes()));
        }
    }
}
