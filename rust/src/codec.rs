//! The compressed tensor: its two encodings, the checks every stream passes before use, and the
//! golomb block index (where each block starts and how blocks are walked). Building one from a
//! threshold is in `encode.rs`, dense decoding in `decode.rs`, conversions and range walks in
//! `convert.rs`.

use rayon::prelude::*;

use crate::dtype::DType;
use crate::error::{malformed, Error, Result};
use crate::golomb::{walk_pool, Block, BlockRef, BlockStart, RowsRef};

// The paths these had when they lived here (the crate's public API).
pub use crate::decode::decode_many;
pub use crate::encode::{compress_with_threshold, kept_abs_sum};

/// The block sizes (log2 of nonzeros per block) a stream may have: parsed and checked against
/// this one range.
pub(crate) const BLOCK_LOG2_RANGE: std::ops::RangeInclusive<u8> = 6..=24;

/// A scale a stream may hold: finite and >= 0 (the one rule for parsing, encoding and
/// `with_scale`).
pub(crate) fn scale_is_valid(scale: f64) -> bool {
    scale.is_finite() && scale >= 0.0
}

/// The invalid-argument error for a scale [`scale_is_valid`] refuses.
pub(crate) fn bad_scale(scale: f64) -> Error {
    Error::InvalidArgument(format!("scale must be finite and >= 0, got {scale}"))
}

/// Where each chunk's nonzeros start in the whole stream, from each chunk's count (the counting
/// pass of every parallel encode: chunk c's first code is nonzero number starts[c]).
pub(crate) fn chunk_starts(counts: &[u64]) -> Vec<u64> {
    counts
        .iter()
        .scan(0u64, |acc, &c| {
            let s = *acc;
            *acc += c;
            Some(s)
        })
        .collect()
}

/// Nonzeros per block of the golomb index, as log2: a block is the unit of parallel decoding.
pub const DEFAULT_BLOCK_LOG2: u8 = 12;
/// Largest accepted number of entries in one tensor (2^48): far above any real weight matrix, and
/// low enough that every size computed from it fits in 64 bits.
pub const MAX_NUMEL: u64 = 1 << 48;
/// Largest accepted number of dimensions.
pub const MAX_NDIM: usize = 64;

/// Which of the two encodings a stream uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Encoding {
    /// Rice-coded gaps between nonzeros plus one sign bit each (storage, transfer).
    Golomb = 0,
    /// Two packed bit vectors of d bits, positive and negative (popcount arithmetic).
    Bitmask = 1,
}

impl Encoding {
    pub fn from_code(c: u8) -> Result<Encoding> {
        match c {
            0 => Ok(Encoding::Golomb),
            1 => Ok(Encoding::Bitmask),
            _ => malformed(format!("unknown encoding code {c}")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Encoding::Golomb => "golomb",
            Encoding::Bitmask => "bitmask",
        }
    }

    pub fn from_name(s: &str) -> Result<Encoding> {
        match s {
            "golomb" => Ok(Encoding::Golomb),
            "bitmask" => Ok(Encoding::Bitmask),
            _ => Err(Error::InvalidArgument(format!(
                "unknown encoding {s:?}; use \"golomb\" or \"bitmask\""
            ))),
        }
    }
}

/// Golomb payload: Rice-coded gaps, sign bits (1 = negative), and the block index; with
/// `rows`, the row-adaptive layout (encoding code 2): a count per row and each row's gaps coded
/// with that row's own Rice parameter (then `rice_b` is 0 and unused).
#[derive(Clone, Debug, PartialEq)]
pub struct GolombBody {
    pub rice_b: u8,
    pub block_log2: u8,
    pub gaps: Vec<u64>,
    pub gap_bits: u64,
    pub signs: Vec<u64>,
    /// Starts of blocks 1.. (block 0 starts at bit 0, position 0; in a row-coded stream at the
    /// first non-empty row's start).
    pub index: Vec<BlockStart>,
    pub rows: Option<Box<RowCoding>>,
}

/// The row counts of a row-coded golomb stream (docs/FORMAT.md, encoding 2): the tensor seen as
/// rows of `cols` entries; per row one bit (1: the row holds nonzeros) and, for a non-empty row,
/// its count minus one Rice-coded with `count_b`. What the walk needs is derived from them once,
/// when the stream is built or parsed.
#[derive(Clone, Debug, PartialEq)]
pub struct RowCoding {
    pub cols: u64,
    pub count_b: u8,
    pub counts: Vec<u64>,
    pub count_bits: u64,
    /// The non-empty rows in order, the nonzeros up to the end of each, and each one's b*.
    pub(crate) rows: Vec<u64>,
    pub(crate) ends: Vec<u64>,
    pub(crate) bs: Vec<u8>,
}

impl RowCoding {
    /// Reads the row counts of a tensor of `numel` entries holding `nnz`, checking them: every
    /// row's count present and at most `cols`, the counts adding up to `nnz`, the bit string
    /// ending exactly at `count_bits`.
    pub(crate) fn parse(
        cols: u64,
        count_b: u8,
        counts: Vec<u64>,
        count_bits: u64,
        numel: u64,
        nnz: u64,
    ) -> Result<RowCoding> {
        if cols == 0 || numel % cols != 0 {
            return malformed(format!(
                "rows of {cols} entries do not divide a tensor of {numel}"
            ));
        }
        if count_b > 63 {
            return malformed(format!("count Rice parameter {count_b} is above 63"));
        }
        let nrows = numel / cols;
        // Every row takes at least one bit: no loop longer than the bits present.
        if count_bits < nrows || counts.len() != words_for(count_bits) {
            return malformed("the row counts are shorter than the number of rows");
        }
        // Each non-empty row takes at least two count bits; reserve without trusting nnz.
        let most = nnz.min(count_bits / 2) as usize;
        let (mut rows, mut ends, mut bs) = (Vec::new(), Vec::new(), Vec::new());
        let reserved = rows.try_reserve_exact(most).is_ok()
            && ends.try_reserve_exact(most).is_ok()
            && bs.try_reserve_exact(most).is_ok();
        if !reserved {
            return Err(Error::OutOfMemory {
                bytes: most as u64 * 17,
            });
        }
        let mut r = crate::bits::BitReader::new(&counts, 0, count_bits);
        let mut total = 0u64;
        for row in 0..nrows {
            if r.read(1)? == 0 {
                continue;
            }
            let c = r.read_rice(count_b as u32)?.checked_add(1);
            let Some(c) = c.filter(|&c| c <= cols) else {
                return malformed(format!(
                    "row {row} counts more nonzeros than its {cols} entries"
                ));
            };
            total += c;
            if total > nnz {
                return malformed(format!("the row counts add up to more than {nnz} nonzeros"));
            }
            rows.push(row);
            ends.push(total);
            bs.push(crate::golomb::rice_parameter(c, cols));
        }
        if total != nnz {
            return malformed(format!(
                "the row counts add up to {total}, the header says {nnz}"
            ));
        }
        if r.pos() != count_bits {
            return malformed("the row counts end before their bit string does");
        }
        Ok(RowCoding {
            cols,
            count_b,
            counts,
            count_bits,
            rows,
            ends,
            bs,
        })
    }

    fn walk_ref(&self) -> RowsRef<'_> {
        RowsRef {
            cols: self.cols,
            rows: &self.rows,
            ends: &self.ends,
            bs: &self.bs,
        }
    }
}

/// Bitmask payload: bit i of `pos` (`neg`) is set when entry i is kept positive (negative).
#[derive(Clone, Debug, PartialEq)]
pub struct BitmaskBody {
    pub pos: Vec<u64>,
    pub neg: Vec<u64>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Body {
    Golomb(GolombBody),
    Bitmask(BitmaskBody),
}

/// One compressed tensor: the ternary pattern and the single scale.
#[derive(Clone, Debug, PartialEq)]
///
/// The fields are private: a value exists only as checked by the parser or built by the encoder,
/// so no method can meet a hand-built inconsistent one.
pub struct Compressed {
    pub(crate) dtype: DType,
    pub(crate) shape: Vec<u64>,
    pub(crate) numel: u64,
    pub(crate) nnz: u64,
    pub(crate) scale: f64,
    pub(crate) body: Body,
}

/// Checks a shape against the number of elements it describes.
pub fn check_shape(shape: &[u64], numel: u64) -> Result<()> {
    if shape.len() > MAX_NDIM {
        return Err(Error::InvalidArgument(format!(
            "shape has {} dimensions, at most {MAX_NDIM} are supported",
            shape.len()
        )));
    }
    let prod = shape.iter().try_fold(1u64, |a, &s| a.checked_mul(s));
    match prod {
        Some(p) if p == numel => Ok(()),
        Some(p) => Err(Error::InvalidArgument(format!(
            "shape {shape:?} holds {p} entries but the data has {numel}"
        ))),
        None => Err(Error::InvalidArgument(format!(
            "shape {shape:?} holds more than 2^64 entries"
        ))),
    }
}

/// Words of a bitmask of `bits` entries.
pub(crate) fn words_for(bits: u64) -> usize {
    bits.div_ceil(64) as usize
}

impl GolombBody {
    pub(crate) fn from_stitched(s: crate::golomb::Stitched, rice_b: u8) -> GolombBody {
        GolombBody {
            rice_b,
            block_log2: DEFAULT_BLOCK_LOG2,
            gaps: s.gaps,
            gap_bits: s.gap_bits,
            signs: s.signs,
            index: s.index,
            rows: None,
        }
    }

    pub(crate) fn block_count(&self, nnz: u64) -> u64 {
        nnz.div_ceil(1u64 << self.block_log2)
    }

    pub(crate) fn block_start(&self, j: usize) -> BlockStart {
        if j == 0 {
            let next = match &self.rows {
                Some(rc) => rc.rows.first().map_or(0, |&r| r * rc.cols),
                None => 0,
            };
            BlockStart { bit: 0, next }
        } else {
            self.index[j - 1]
        }
    }

    /// The blocks `[j0, j1)` holding positions in `[lo, hi)` (none when nothing is kept): block
    /// j starts at position index[j - 1].next (block 0 at 0), so they run from the last block
    /// starting at or before lo to the last one starting before hi.
    pub(crate) fn blocks_overlapping(&self, nnz: u64, lo: u64, hi: u64) -> (usize, usize) {
        let nb = self.block_count(nnz) as usize;
        if nb == 0 {
            return (0, 0);
        }
        let j0 = self.index.partition_point(|s| s.next <= lo);
        let j1 = (1 + self.index.partition_point(|s| s.next < hi)).min(nb);
        (j0, j1)
    }

    /// Structural checks that need no decoding: index length, monotone offsets, sizes of buffers.
    pub(crate) fn check(&self, numel: u64, nnz: u64) -> Result<()> {
        if !BLOCK_LOG2_RANGE.contains(&self.block_log2) {
            return malformed(format!(
                "block size 2^{} is outside 2^6..2^24",
                self.block_log2
            ));
        }
        if self.rice_b > 63 {
            return malformed(format!("Rice parameter {} is above 63", self.rice_b));
        }
        if let Some(rc) = &self.rows {
            // Built by RowCoding::parse or the encoder, so consistent with itself; it must
            // describe this stream.
            if self.rice_b != 0
                || rc.ends.last().copied().unwrap_or(0) != nnz
                || rc.cols == 0
                || numel % rc.cols != 0
            {
                return malformed("the row counts disagree with the stream");
            }
        }
        let nb = self.block_count(nnz);
        if self.index.len() as u64 != nb.saturating_sub(1) {
            return malformed(format!(
                "block index has {} entries, expected {}",
                self.index.len(),
                nb.saturating_sub(1)
            ));
        }
        if self.gaps.len() != words_for(self.gap_bits) || self.signs.len() != words_for(nnz) {
            return malformed("payload sizes disagree with the header");
        }
        // With no nonzeros nothing is decoded, so gap bits would be bytes no check reads: a
        // second byte form of the same stream.
        if nnz == 0 && self.gap_bits != 0 {
            return malformed(format!(
                "a stream with no nonzeros has {} gap bits; it must have none",
                self.gap_bits
            ));
        }
        // Each block holds 2^block_log2 nonzeros at distinct positions and at least one bit each.
        let bsz = 1u64 << self.block_log2;
        let mut prev = self.block_start(0);
        for s in &self.index {
            if s.bit < prev.bit + bsz
                || s.next < prev.next + bsz
                || s.bit > self.gap_bits
                || s.next > numel
            {
                return malformed("block index is not increasing or points past the data");
            }
            prev = *s;
        }
        if nnz > 0 && self.gap_bits < prev.bit + (nnz - (nb - 1) * bsz) {
            return malformed("gap stream is shorter than its last block");
        }
        Ok(())
    }

    /// Block `j` as [`walk_pool`] takes it: where it starts, its nonzeros, where it must end.
    pub(crate) fn block(&self, numel: u64, nnz: u64, j: usize) -> Block {
        let bsz = 1u64 << self.block_log2;
        let first_nz = j as u64 * bsz;
        let last = j + 1 >= self.block_count(nnz) as usize;
        let (limit, end_bit) = if last {
            (numel, self.gap_bits)
        } else {
            (self.index[j].next, self.index[j].bit)
        };
        Block {
            j,
            start: self.block_start(j),
            first_nz,
            count: bsz.min(nnz - first_nz),
            limit,
            end_bit,
            last,
            seg: self
                .rows
                .as_ref()
                .map_or(0, |rc| rc.ends.partition_point(|&e| e <= first_nz)),
        }
    }

    /// Block `j` and the stream it lies in, as [`walk_pool`] walks it.
    pub(crate) fn block_ref(&self, numel: u64, nnz: u64, j: usize) -> BlockRef<'_> {
        BlockRef {
            gaps: &self.gaps,
            gap_bits: self.gap_bits,
            signs: &self.signs,
            b: self.rice_b,
            rows: self.rows.as_ref().map(|rc| rc.walk_ref()),
            block: self.block(numel, nnz, j),
        }
    }

    /// Decodes blocks `[b0, b1)`, checking that each ends exactly where the next begins, and
    /// calls `emit(block, position, negative)` for every kept entry: in position order within a
    /// block, interleaved across the [`crate::golomb::WALK_LANES`] blocks walked together. On an error, the
    /// error of the first bad block in order (as walking them one at a time gives).
    pub(crate) fn decode_blocks(
        &self,
        numel: u64,
        nnz: u64,
        b0: usize,
        b1: usize,
        mut emit: impl FnMut(usize, u64, bool),
    ) -> Result<()> {
        self.decode_runs(numel, nnz, b0, b1, |j, ps, signs| {
            for (i, &p) in ps.iter().enumerate() {
                emit(j, p, (signs >> i) & 1 == 1);
            }
        })
    }

    /// [`Self::decode_blocks`] a run at a time: `sink(block, positions, signs)` gets up to 63
    /// increasing, checked positions of one block and their sign bits (bit i: positions[i] is
    /// negative). The blocks go through one pool of lanes ([`walk_pool`]).
    pub(crate) fn decode_runs(
        &self,
        numel: u64,
        nnz: u64,
        b0: usize,
        b1: usize,
        mut sink: impl FnMut(usize, &[u64], u64),
    ) -> Result<()> {
        walk_pool(
            b1.saturating_sub(b0),
            |i| self.block_ref(numel, nnz, b0 + i),
            |i, ps, s| sink(b0 + i, ps, s),
        )
        .map_err(|(_, e)| e)
    }
}

impl BitmaskBody {
    pub(crate) fn check(&self, numel: u64, nnz: u64) -> Result<()> {
        let words = words_for(numel);
        if self.pos.len() != words || self.neg.len() != words {
            return malformed("bitmask sizes disagree with the number of entries");
        }
        let tail = numel % 64;
        if tail != 0 && words > 0 {
            let pad = !((1u64 << tail) - 1);
            if (self.pos[words - 1] | self.neg[words - 1]) & pad != 0 {
                return malformed("bits are set past the last entry");
            }
        }
        let (both, count) = self
            .pos
            .par_iter()
            .zip(self.neg.par_iter())
            .map(|(&p, &n)| ((p & n != 0) as u64, (p | n).count_ones() as u64))
            .reduce(|| (0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
        if both > 0 {
            return malformed("an entry is marked both positive and negative");
        }
        if count != nnz {
            return malformed(format!("bitmasks hold {count} nonzeros, header says {nnz}"));
        }
        Ok(())
    }
}

impl Compressed {
    /// Checks the body against the header (used after parsing and before every decode).
    pub fn check(&self) -> Result<()> {
        #[cfg(test)]
        check_count::bump(self);
        check_shape(&self.shape, self.numel)?;
        if self.numel > MAX_NUMEL {
            return Err(Error::TooLarge {
                what: "number of entries",
                value: self.numel,
                limit: MAX_NUMEL,
            });
        }
        if self.nnz > self.numel {
            return malformed(format!("{} nonzeros in {} entries", self.nnz, self.numel));
        }
        if !scale_is_valid(self.scale) {
            return malformed(format!("scale {} is not finite and >= 0", self.scale));
        }
        match &self.body {
            Body::Golomb(g) => g.check(self.numel, self.nnz),
            Body::Bitmask(m) => m.check(self.numel, self.nnz),
        }
    }

    /// The dtype of the original tensor (the default output dtype).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The original tensor's shape.
    pub fn shape(&self) -> &[u64] {
        &self.shape
    }

    /// Number of entries `d`.
    pub fn numel(&self) -> u64 {
        self.numel
    }

    /// Number of kept (nonzero) entries.
    pub fn nnz(&self) -> u64 {
        self.nnz
    }

    /// Every kept entry decodes to `+scale` or `-scale`.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// The payload, read-only.
    pub fn body(&self) -> &Body {
        &self.body
    }

    /// The same ternary pattern with another scale (finite and >= 0).
    pub fn with_scale(&self, scale: f64) -> Result<Compressed> {
        if !scale_is_valid(scale) {
            return Err(bad_scale(scale));
        }
        Ok(Compressed {
            scale: scale + 0.0,
            ..self.clone()
        })
    }

    pub fn encoding(&self) -> Encoding {
        match self.body {
            Body::Golomb(_) => Encoding::Golomb,
            Body::Bitmask(_) => Encoding::Bitmask,
        }
    }
}

/// How often each live stream was checked, for tests that a call checks a stream once, not once
/// per piece of work (keyed by address: tests running at once hold distinct streams).
#[cfg(test)]
pub(crate) mod check_count {
    use std::collections::HashMap;
    use std::sync::Mutex;

    static COUNTS: Mutex<Option<HashMap<usize, usize>>> = Mutex::new(None);

    pub(crate) fn bump(c: &super::Compressed) {
        let mut m = COUNTS.lock().unwrap();
        *m.get_or_insert_with(HashMap::new)
            .entry(c as *const _ as usize)
            .or_default() += 1;
    }

    /// The count for `c` since the last call, reset to 0.
    pub(crate) fn take(c: &super::Compressed) -> usize {
        let mut m = COUNTS.lock().unwrap();
        m.get_or_insert_with(HashMap::new)
            .remove(&(c as *const _ as usize))
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::TensorMut;
    use crate::golomb::{rice_parameter, stitch, walk_block, ChunkEncoder};

    /// A golomb stream with 2^`block_log2` nonzeros per block over `numel` entries, from the
    /// kept positions and signs (random, at density `k`), built the way the encoder builds one.
    fn stream(numel: u64, k: f64, block_log2: u8, seed: u64) -> (Compressed, Vec<(u64, bool)>) {
        rows_stream(numel, k, block_log2, seed, None)
    }

    /// [`stream`], or with `cols`: rows of `cols` entries (`numel` rounded up to whole rows)
    /// whose densities differ (none, a third, k, three times k), in the row-coded layout.
    fn rows_stream(
        numel: u64,
        k: f64,
        block_log2: u8,
        seed: u64,
        cols: Option<u64>,
    ) -> (Compressed, Vec<(u64, bool)>) {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let numel = cols.map_or(numel, |c| numel.div_ceil(c) * c);
        let factors = [0.0, 0.33, 1.0, 3.0];
        let mut kept = Vec::new();
        let mut density = k;
        for p in 0..numel {
            if let Some(c) = cols {
                if p % c == 0 {
                    density = (k * factors[rng.gen_range(0..4)]).min(1.0);
                }
            }
            if rng.gen_bool(density) {
                kept.push((p, rng.gen_bool(0.5)));
            }
        }
        let nnz = kept.len() as u64;
        let b = rice_parameter(nnz, numel);
        let mut enc = ChunkEncoder::new(b, block_log2, 0, nnz);
        for &(p, neg) in &kept {
            enc.push(p, neg);
        }
        let st = stitch(vec![enc.finish()], b);
        let c = Compressed {
            dtype: DType::F32,
            shape: vec![numel],
            numel,
            nnz,
            scale: 1.0,
            body: Body::Golomb(GolombBody {
                block_log2,
                ..GolombBody::from_stitched(st, b)
            }),
        };
        match cols {
            Some(cols) => {
                let c = Compressed {
                    shape: vec![numel / cols, cols],
                    ..c
                };
                (c.with_rows(cols).unwrap(), kept)
            }
            None => (c, kept),
        }
    }

    fn golomb(c: &Compressed) -> &GolombBody {
        match &c.body {
            Body::Golomb(g) => g,
            Body::Bitmask(_) => unreachable!(),
        }
    }

    /// Blocks `[b0, b1)` one at a time (the walk before interleaving): entries and the error.
    fn single_walk(c: &Compressed, b0: usize, b1: usize) -> (Vec<(usize, u64, bool)>, Result<()>) {
        let g = golomb(c);
        let mut got = Vec::new();
        let r = (b0..b1).try_for_each(|j| {
            walk_block(&g.block_ref(c.numel, c.nnz, j), |p, n| got.push((j, p, n)))
        });
        (got, r)
    }

    /// Blocks `[b0, b1)` through the interleaved walk, entries sorted by block (the walk
    /// interleaves them; within a block they come in order, which the stable sort keeps).
    fn interleaved(c: &Compressed, b0: usize, b1: usize) -> (Vec<(usize, u64, bool)>, Result<()>) {
        let g = golomb(c);
        let mut got = Vec::new();
        let r = g.decode_blocks(c.numel, c.nnz, b0, b1, |j, p, n| got.push((j, p, n)));
        got.sort_by_key(|e| e.0);
        (got, r)
    }

    /// Forged row-coded streams, each with a valid checksum, are refused by parsing or by
    /// decoding, never decoded into something else: a block at a row's first entry that does
    /// not count from the row's start, a block inside a row that counts from outside it, and
    /// row counts that do not add up.
    #[test]
    fn forged_row_coded_streams_are_refused() {
        let (c, _) = rows_stream(6000, 0.2, 6, 7, Some(40));
        let g = golomb(&c);
        let rc = g.rows.as_ref().unwrap();
        let first_in_row = |j: usize| {
            let nz = (j as u64) << g.block_log2;
            rc.ends.binary_search(&nz).is_ok()
        };
        let nb = g.block_count(c.nnz) as usize;
        let at_row = (1..nb).find(|&j| first_in_row(j));
        let mid_row = (1..nb).find(|&j| !first_in_row(j)).unwrap();
        // Refused by the parser, or by every decode: whole, to bitmasks, and a range walk from
        // block j on (which checks the block's own start, not the one before it).
        let refused_from = |forged: &Compressed, j: usize| {
            let bytes = forged.to_bytes();
            match Compressed::from_bytes(&bytes) {
                Err(_) => true,
                Ok(p) => {
                    let mut out = vec![0f32; p.numel as usize];
                    let Body::Golomb(pg) = &p.body else {
                        return false;
                    };
                    p.decode_into(TensorMut::F32(&mut out)).is_err()
                        && p.to_bitmask().is_err()
                        && p.for_each_kept_in(pg.block_start(j).next, p.numel, |_, _| {})
                            .is_err()
                }
            }
        };
        let with_index = |j: usize, next: u64| {
            let mut f = c.clone();
            if let Body::Golomb(g) = &mut f.body {
                g.index[j - 1].next = next;
            }
            f
        };
        let row_start = |j: usize| {
            let nz = (j as u64) << g.block_log2;
            rc.rows[rc.ends.partition_point(|&e| e <= nz)] * rc.cols
        };
        if let Some(j) = at_row {
            assert!(refused_from(&with_index(j, row_start(j) + 1), j));
        }
        let s = row_start(mid_row);
        assert!(refused_from(&with_index(mid_row, s), mid_row));
        assert!(refused_from(&with_index(mid_row, s + rc.cols), mid_row));
        // A count bit flipped (the checksum recomputed over the new bytes).
        for bit in [0u64, 1, 5, rc.count_bits - 1] {
            let mut f = c.clone();
            if let Body::Golomb(g) = &mut f.body {
                let r = g.rows.as_mut().unwrap();
                r.counts[(bit / 64) as usize] ^= 1 << (bit % 64);
            }
            assert!(refused_from(&f, 0), "count bit {bit}");
        }
        // And the stream as built decodes.
        assert!(!refused_from(&c, mid_row));
    }

    use proptest::prelude::*;

    proptest! {
        // Few shrink steps: a case can decode tens of millions of entries.
        #![proptest_config(ProptestConfig {
            cases: 256,
            max_shrink_iters: 64,
            ..ProptestConfig::default()
        })]

        /// The interleaved walk gives the single-block walk's entries (positions and signs, in
        /// order within each block) over whole streams and sub-ranges of blocks, for block counts
        /// that are and are not multiples of the walk's width, and the same error on streams
        /// with flipped gap bits (the checks before a walk cannot see those). Never a panic.
        #[test]
        fn prop_interleaved_walk_matches_single_walk(
            blocks in prop::sample::select(vec![1u64, 2, 3, 4, 5, 7, 8, 9, 13]),
            k in prop::sample::select(vec![1e-4, 1e-3, 0.01, 0.1, 0.3, 0.6, 0.9]),
            block_log2 in 6u8..=8,
            seed in any::<u64>(),
            flips in prop::collection::vec(any::<u64>(), 0..4),
            range in any::<(u16, u16)>(),
            shift in prop::option::of(any::<(u16, i8, bool)>()),
            cols in prop::option::of(prop::sample::select(vec![1u64, 3, 16, 64, 100, 1000])),
        ) {
            // Enough entries for about `blocks` blocks, the last one part full.
            let per = 1u64 << block_log2;
            let numel = (((blocks - 1) * per + per / 2 + 1) as f64 / k) as u64 + 1;
            let (mut c, kept) = rows_stream(numel, k, block_log2, seed, cols);
            let numel = c.numel;
            prop_assert!(c.check().is_ok());
            let nb = golomb(&c).block_count(c.nnz) as usize;
            let (want, r) = single_walk(&c, 0, nb);
            prop_assert!(r.is_ok());
            prop_assert_eq!(
                want.iter().map(|e| (e.1, e.2)).collect::<Vec<_>>(),
                kept
            );
            let (got, r) = interleaved(&c, 0, nb);
            prop_assert!(r.is_ok());
            prop_assert_eq!(&got, &want);
            let (b0, b1) = (range.0 as usize % (nb + 1), range.1 as usize % (nb + 1));
            let (b0, b1) = (b0.min(b1), b0.max(b1));
            let (a, b) = (interleaved(&c, b0, b1), single_walk(&c, b0, b1));
            prop_assert!(a.1.is_ok() && b.1.is_ok());
            prop_assert_eq!(a.0, b.0);

            if let Body::Golomb(g) = &mut c.body {
                // An index entry moved a little (what the index check lets through is caught by
                // the walk: a block that does not end where the next one starts).
                if let (Some(&(i, d, on_bit)), false) = (shift.as_ref(), g.index.is_empty()) {
                    let n = g.index.len();
                    let s = &mut g.index[i as usize % n];
                    let v = if on_bit { &mut s.bit } else { &mut s.next };
                    *v = v.saturating_add_signed(d as i64);
                }
                for f in &flips {
                    if g.gap_bits > 0 {
                        let at = f % g.gap_bits;
                        g.gaps[(at / 64) as usize] ^= 1 << (at % 64);
                    }
                }
            }
            // Flips can leave a valid stream (then both walks agree on its entries) or not
            // (then both give the same error; the entries seen before it may differ).
            let (a, b) = (interleaved(&c, 0, nb), single_walk(&c, 0, nb));
            match (&a.1, &b.1) {
                (Ok(()), Ok(())) => prop_assert_eq!(&a.0, &b.0),
                (ea, eb) => prop_assert_eq!(format!("{ea:?}"), format!("{eb:?}")),
            }
            // What a user calls: the same error, or the same output, from every decode path
            // (a moved index entry the index check refuses never reaches a walk).
            if c.check().is_err() {
                return Ok(());
            }
            let mut out = vec![0f32; numel as usize];
            let dense = c.decode_into(TensorMut::F32(&mut out));
            let (want, r) = single_walk(&c, 0, nb);
            match r {
                Ok(()) => {
                    prop_assert!(dense.is_ok());
                    let mut expect = vec![0f32; numel as usize];
                    for &(_, p, n) in &want {
                        expect[p as usize] = if n { -1.0 } else { 1.0 };
                    }
                    prop_assert_eq!(&out, &expect);
                    let mut seen = Vec::new();
                    prop_assert!(c.for_each_kept_in(0, numel, |p, n| seen.push((p, n))).is_ok());
                    prop_assert_eq!(seen, want.iter().map(|e| (e.1, e.2)).collect::<Vec<_>>());
                    prop_assert!(c.to_bitmask().is_ok());
                }
                Err(e) => {
                    // An error; which of two bad blocks a parallel decode reports depends on its
                    // threads (a truncated code in one, a bad position in another: two kinds).
                    // for_each_kept_in walks in order: the same error.
                    prop_assert!(dense.is_err());
                    let fe = c.for_each_kept_in(0, numel, |_, _| {}).unwrap_err();
                    prop_assert_eq!(format!("{fe:?}"), format!("{e:?}"));
                    prop_assert!(c.to_bitmask().is_err());
                }
            }
        }

        /// Several streams in one `decode_many` call, whose pool walks blocks of different
        /// streams side by side (refilling lanes across streams), in float32, float64 and
        /// float16 outputs, golomb and bitmask, some keeping nothing: every output equals its
        /// stream's one-block-at-a-time walk. With gap bits flipped in one stream: an error
        /// naming a stream whose own walk fails, or (if the flips left a valid stream) the
        /// outputs of the walks.
        #[test]
        fn prop_decode_many_matches_single_walks(
            specs in prop::collection::vec(
                (1u64..6, prop::sample::select(vec![0.0, 1e-3, 0.05, 0.3, 0.9]), 0u8..3, any::<bool>()),
                1..7,
            ),
            block_log2 in 6u8..=7,
            seed in any::<u64>(),
            flips in prop::option::of((any::<usize>(), prop::collection::vec(any::<u64>(), 1..3))),
        ) {
            let per = 1u64 << block_log2;
            let mut streams = Vec::new();
            for (i, &(blocks, k, _, bitmask)) in specs.iter().enumerate() {
                let numel = if k == 0.0 { 100 } else { (((blocks - 1) * per + per / 2 + 1) as f64 / k) as u64 + 1 };
                let (c, _) = stream(numel, k, block_log2, seed.wrapping_add(i as u64));
                streams.push(if bitmask { c.to_bitmask().unwrap() } else { c });
            }
            if let Some((at, bits)) = &flips {
                if let Body::Golomb(g) = &mut streams[at % specs.len()].body {
                    for f in bits {
                        if g.gap_bits > 0 {
                            let b = f % g.gap_bits;
                            g.gaps[(b / 64) as usize] ^= 1 << (b % 64);
                        }
                    }
                }
            }
            // The reference: each stream alone, one block at a time (bitmasks bit by bit).
            let mut want = Vec::new();
            let mut bad = Vec::new();
            for (i, c) in streams.iter().enumerate() {
                let mut v = vec![0i8; c.numel as usize];
                match &c.body {
                    Body::Golomb(g) => {
                        let (entries, r) = single_walk(c, 0, g.block_count(c.nnz) as usize);
                        if r.is_err() {
                            bad.push(i);
                        }
                        for (_, p, n) in entries {
                            v[p as usize] = if n { -1 } else { 1 };
                        }
                    }
                    Body::Bitmask(m) => {
                        for (p, x) in v.iter_mut().enumerate() {
                            let (w, b) = (p / 64, p % 64);
                            *x = ((m.pos[w] >> b) & 1) as i8 - ((m.neg[w] >> b) & 1) as i8;
                        }
                    }
                }
                want.push(v);
            }
            let mut f32s: Vec<Vec<f32>> = Vec::new();
            let mut f64s: Vec<Vec<f64>> = Vec::new();
            let mut f16s: Vec<Vec<u16>> = Vec::new();
            for (c, &(_, _, dt, _)) in streams.iter().zip(&specs) {
                let n = c.numel as usize;
                match dt {
                    0 => f32s.push(vec![7.0; n]),
                    1 => f64s.push(vec![7.0; n]),
                    _ => f16s.push(vec![7; n]),
                }
            }
            let (mut a, mut b, mut h) = (f32s.iter_mut(), f64s.iter_mut(), f16s.iter_mut());
            let jobs: Vec<(&Compressed, TensorMut<'_>)> = streams
                .iter()
                .zip(&specs)
                .map(|(c, &(_, _, dt, _))| {
                    let out = match dt {
                        0 => TensorMut::F32(a.next().unwrap()),
                        1 => TensorMut::F64(b.next().unwrap()),
                        _ => TensorMut::F16(h.next().unwrap()),
                    };
                    (c, out)
                })
                .collect();
            let r = crate::decode_many(jobs);
            if !bad.is_empty() {
                let (i, _) = r.unwrap_err();
                prop_assert!(bad.contains(&i), "stream {} reported, bad ones {:?}", i, bad);
                return Ok(());
            }
            prop_assert!(r.is_ok(), "{:?}", r);
            let (mut a, mut b, mut h) = (f32s.iter(), f64s.iter(), f16s.iter());
            for (w, &(_, _, dt, _)) in want.iter().zip(&specs) {
                let got: Vec<i8> = match dt {
                    0 => a.next().unwrap().iter().map(|&x| x as i8).collect(),
                    1 => b.next().unwrap().iter().map(|&x| x as i8).collect(),
                    _ => h.next().unwrap().iter().map(|&x| match x {
                        0 => 0,
                        0x3C00 => 1,
                        0xBC00 => -1,
                        _ => 7,
                    }).collect(),
                };
                prop_assert_eq!(&got, w);
            }
        }

        /// Ranges of positions through `for_each_kept_in` (and `kept_runs_in_checked`, golomb
        /// and bitmask): the entries in the range, in order,
        /// across range edges inside and between blocks.
        #[test]
        fn prop_for_each_kept_in_ranges(
            blocks in prop::sample::select(vec![1u64, 2, 3, 5, 7]),
            k in prop::sample::select(vec![1e-3, 0.05, 0.5, 0.9]),
            seed in any::<u64>(),
            lo in any::<u32>(),
            len in any::<u32>(),
        ) {
            let numel = ((blocks * 64 - 20) as f64 / k) as u64 + 1;
            let (c, kept) = stream(numel, k, 6, seed);
            let lo = lo as u64 % (numel + 1);
            let hi = lo + len as u64 % (numel + 1 - lo + 1);
            let mut seen = Vec::new();
            prop_assert!(c.for_each_kept_in(lo, hi, |p, n| seen.push((p, n))).is_ok());
            let want: Vec<_> = kept.into_iter().filter(|e| e.0 >= lo && e.0 < hi).collect();
            prop_assert_eq!(&seen, &want);
            // The same entries a run at a time (in any order), from both encodings.
            for s in [c.clone(), c.to_bitmask().unwrap()] {
                let mut runs = Vec::new();
                let r = s.kept_runs_in_checked(lo, hi, |ps, signs| {
                    runs.extend(ps.iter().enumerate().map(|(r, &p)| (p, (signs >> r) & 1 == 1)))
                });
                prop_assert!(r.is_ok());
                runs.sort();
                prop_assert_eq!(&runs, &want);
            }
        }
    }
}
