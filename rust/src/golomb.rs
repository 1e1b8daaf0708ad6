//! Rice coding of the gaps between kept positions, with b* from the golden-ratio formula.

use crate::bits::{BitReader, BitWriter};
use crate::error::{malformed, Result};

/// b* = 1 + floor(log2(ln(phi - 1) / ln(1 - p))), clamped to [0, 63], for density p = nnz / d.
/// (Golomb 1966 / Gallager & van Voorhis 1975: the optimal Rice parameter for geometric gaps.)
pub fn rice_parameter(nnz: u64, d: u64) -> u8 {
    if nnz == 0 || d == 0 || nnz >= d {
        return 0;
    }
    let p = nnz as f64 / d as f64;
    let phi = (1.0 + 5.0f64.sqrt()) / 2.0;
    // ln_1p: 1 - p rounds away most of a small p's digits, which moved b at a boundary (nnz 789
    // of d 1,719,256,699 has r = 2^20 + 4e-5 and gave b = 20). floor(log2 r) is read from r's
    // exponent bits, exact and without libm's log2.
    let r = (phi - 1.0).ln() / (-p).ln_1p();
    if r.is_nan() || r < 1.0 {
        return 0;
    }
    let floor_log2 = ((r.to_bits() >> 52) & 0x7ff) as i64 - 1023;
    (1 + floor_log2).min(63) as u8
}

/// Expected Rice bits per nonzero for independent positions at density p, sign bit included:
/// b + 1 / (1 - (1 - p)^(2^b)) + 1.
pub fn expected_bits_per_nonzero(p: f64, b: u8) -> f64 {
    b as f64 + 1.0 / (1.0 - (1.0 - p).powf(2f64.powi(b as i32))) + 1.0
}

/// The entropy bound for a ternary vector of d entries at density k, in bits:
/// d * (-(1-k) log2(1-k) - k log2(k/2)).
pub fn entropy_bound_bits(d: u64, k: f64) -> f64 {
    if k <= 0.0 || d == 0 {
        return 0.0;
    }
    let zero_part = if k >= 1.0 {
        0.0
    } else {
        -(1.0 - k) * (1.0 - k).log2()
    };
    d as f64 * (zero_part - k * (k / 2.0).log2())
}

/// Start of a block of nonzeros in the gap stream: the bit offset of its first code and the first
/// position its first gap counts from (one past the previous nonzero's position).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockStart {
    pub bit: u64,
    pub next: u64,
}

/// Encodes one chunk of positions. The first code of a chunk is left out, because its gap depends
/// on the previous chunk; [`stitch`] writes it when the chunks are joined in order.
pub(crate) struct ChunkEncoder {
    b: u32,
    block_mask: u64,
    /// Global index of the next nonzero (known from a counting pass).
    g: u64,
    gaps: BitWriter,
    signs: BitWriter,
    first: Option<u64>,
    last: u64,
    /// Local bit offset and `next` of each block that starts inside this chunk after its first
    /// nonzero; `starts_at_first` tells whether a block starts at the first nonzero.
    marks: Vec<BlockStart>,
    starts_at_first: bool,
    count: u64,
}

pub(crate) struct EncodedChunk {
    gaps: (Vec<u64>, u64),
    signs: (Vec<u64>, u64),
    first: Option<u64>,
    last: u64,
    marks: Vec<BlockStart>,
    starts_at_first: bool,
    count: u64,
}

impl ChunkEncoder {
    pub fn new(b: u8, block_log2: u8, g0: u64, expected: u64) -> Self {
        ChunkEncoder {
            b: b as u32,
            block_mask: (1u64 << block_log2) - 1,
            g: g0,
            gaps: BitWriter::with_capacity_bits((expected * (b as u64 + 2)) as usize),
            signs: BitWriter::with_capacity_bits(expected as usize),
            first: None,
            last: 0,
            marks: Vec::new(),
            starts_at_first: false,
            count: 0,
        }
    }

    #[inline(always)]
    pub fn push(&mut self, pos: u64, neg: bool) {
        let block_start = self.g & self.block_mask == 0;
        if self.first.is_none() {
            self.first = Some(pos);
            self.starts_at_first = block_start;
        } else {
            if block_start {
                self.marks.push(BlockStart {
                    bit: self.gaps.len(),
                    next: self.last + 1,
                });
            }
            self.gaps.write_rice(pos - self.last - 1, self.b);
        }
        self.last = pos;
        self.signs.write_bit(neg);
        self.g += 1;
        self.count += 1;
    }

    /// Pushes every set bit of `pos | neg`; bit j is position `base + j`.
    #[inline(always)]
    pub fn push_word(&mut self, base: u64, pos: u64, neg: u64) {
        let mut m = pos | neg;
        while m != 0 {
            let t = m.trailing_zeros();
            self.push(base + t as u64, (neg >> t) & 1 == 1);
            m &= m - 1;
        }
    }

    pub fn finish(self) -> EncodedChunk {
        EncodedChunk {
            gaps: self.gaps.finish(),
            signs: self.signs.finish(),
            first: self.first,
            last: self.last,
            marks: self.marks,
            starts_at_first: self.starts_at_first,
            count: self.count,
        }
    }
}

impl EncodedChunk {
    /// Nonzeros pushed into this chunk.
    pub fn count(&self) -> u64 {
        self.count
    }
}

/// The joined gap stream, sign bits and block index (block 0, at bit 0 and position 0, left out).
pub(crate) struct Stitched {
    pub gaps: Vec<u64>,
    pub gap_bits: u64,
    pub signs: Vec<u64>,
    pub index: Vec<BlockStart>,
}

/// Joins chunks in order: writes each chunk's deferred first code, then appends its bits.
pub(crate) fn stitch(chunks: Vec<EncodedChunk>, b: u8) -> Stitched {
    let total_bits: u64 = chunks.iter().map(|c| c.gaps.1 + 64).sum();
    let nnz: u64 = chunks.iter().map(|c| c.count).sum();
    let mut gaps = BitWriter::with_capacity_bits(total_bits as usize);
    let mut signs = BitWriter::with_capacity_bits(nnz as usize);
    let mut index = Vec::new();
    let mut next = 0u64;
    for c in chunks {
        let Some(first) = c.first else { continue };
        if c.starts_at_first && signs.len() > 0 {
            index.push(BlockStart {
                bit: gaps.len(),
                next,
            });
        }
        gaps.write_rice(first - next, b as u32);
        let base = gaps.len();
        index.extend(c.marks.iter().map(|m| BlockStart {
            bit: base + m.bit,
            next: m.next,
        }));
        gaps.append(&c.gaps.0, c.gaps.1);
        signs.append(&c.signs.0, c.signs.1);
        next = c.last + 1;
    }
    let (gaps, gap_bits) = gaps.finish();
    let (signs, _) = signs.finish();
    Stitched {
        gaps,
        gap_bits,
        signs,
        index,
    }
}

/// Up to 64 bits of `words` starting at bit `bit`; bits past the end read as zero.
#[inline(always)]
fn peek(words: &[u64], bit: u64) -> u64 {
    let i = (bit / 64) as usize;
    let o = (bit % 64) as u32;
    if let Some(pair) = words.get(i..i + 2) {
        // Both words there (the common case): no branch on o; (w << 1) << (63 - o) is
        // w << (64 - o) for o >= 1 and 0 for o = 0.
        (pair[0] >> o) | ((pair[1] << 1) << (63 - o))
    } else {
        peek_end(words, i, o)
    }
}

/// [`peek`] in the last word, out of line (see [`read_rice_slow`]).
#[cold]
#[inline(never)]
fn peek_end(words: &[u64], i: usize, o: u32) -> u64 {
    let lo = words.get(i).copied().unwrap_or(0) >> o;
    lo | ((words.get(i + 1).copied().unwrap_or(0) << 1) << (63 - o))
}

/// Decodes `count` nonzeros of one block, calling `emit(position, negative)` for each.
/// Positions must stay below `limit` and codes inside `gap_bits`; returns one past the last
/// position and the bit offset after the last code.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn decode_block(
    gaps: &[u64],
    gap_bits: u64,
    signs: &[u64],
    b: u8,
    start: BlockStart,
    first_nz: u64,
    count: u64,
    limit: u64,
    mut emit: impl FnMut(u64, bool),
) -> Result<(u64, u64)> {
    let b32 = b as u32;
    let low = if b == 0 { 0 } else { (1u64 << b) - 1 };
    let mut bit = start.bit;
    let mut next = start.next;
    for j in 0..count {
        // Fast path: the whole code (unary quotient, stop bit, b low bits) is in one peek.
        let w = peek(gaps, bit);
        let tz = w.trailing_zeros();
        let g = if w != 0 && tz + 1 + b32 <= 64 {
            bit += (tz + 1 + b32) as u64;
            ((tz as u64) << b) | ((w >> tz >> 1) & low)
        } else {
            // A start past the stream (only in an index no check has passed): BitReader counts
            // the bits left as gap_bits - bit and would read zeros for ever.
            if bit > gap_bits {
                return Err(crate::error::Error::Truncated { what: "gap codes" });
            }
            let mut r = BitReader::new(gaps, bit, gap_bits);
            let g = r.read_rice(b32)?;
            bit = r.pos();
            g
        };
        if bit > gap_bits {
            return Err(crate::error::Error::Truncated { what: "gap codes" });
        }
        let pos = match next.checked_add(g) {
            Some(p) if p < limit => p,
            _ => {
                return malformed(
                    "a decoded position lies beyond the end of the tensor or its block",
                )
            }
        };
        let s = first_nz + j;
        let neg = match signs.get((s / 64) as usize) {
            Some(w) => (w >> (s % 64)) & 1 == 1,
            None => return malformed("fewer sign bits than nonzeros"),
        };
        emit(pos, neg);
        next = pos + 1;
    }
    Ok((next, bit))
}

/// Blocks walked side by side by [`walk_blocks`]: each block's Rice codes form one serial chain
/// (load -> tzcnt -> shift -> add), so several independent chains in one loop keep a core busy
/// (2.1-2.2x a single chain at 2^24 float32 entries, k = 0.3 to 0.01).
pub(crate) const WALK_LANES: usize = 4;

/// One block for [`walk_blocks`]: its number, where it starts, which nonzeros it holds, and where
/// it must end (bit `end_bit`; position `limit` exactly when `last` is false, else below it).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Block {
    pub j: usize,
    pub start: BlockStart,
    pub first_nz: u64,
    pub count: u64,
    pub limit: u64,
    pub end_bit: u64,
    pub last: bool,
}

/// Decodes `N` blocks in one loop, a code of each in turn, calling `emit(lane, position,
/// negative)` (lane `l` is `blocks[l]`): in position order within a lane, interleaved across
/// lanes. Checks each block as [`walk_block`] does and returns the error [`walk_block`] gives on
/// the first bad block in order (found again by walking them one at a time: errors are rare, so
/// the fast loop only notices one). After an error `emit` may have seen some of the entries.
#[inline(always)]
pub(crate) fn walk_blocks<const N: usize>(
    gaps: &[u64],
    gap_bits: u64,
    signs: &[u64],
    b: u8,
    blocks: &[Block; N],
    mut emit: impl FnMut(usize, u64, bool),
) -> Result<()> {
    let b32 = b as u32;
    let low = if b == 0 { 0 } else { (1u64 << b) - 1 };
    let mut bit = blocks.map(|k| k.start.bit);
    let mut next = blocks.map(|k| k.start.next);
    // Only the last block of a stream holds fewer nonzeros: the lanes run together for the
    // shortest count, then each finishes alone.
    let steps = blocks.iter().map(|k| k.count).min().unwrap_or(0);
    let mut bad = false;
    // One code of lane $l: a macro, not a loop over lanes, so that every lane's state has a
    // constant index and lives in registers (a loop over lanes kept it on the stack, and the
    // walk ran no faster than one block at a time).
    macro_rules! step {
        ($l:literal, $i:ident, $walk:lifetime) => {
            if $l < N {
                let w = peek(gaps, bit[$l]);
                let tz = w.trailing_zeros();
                let g = if w != 0 && tz + 1 + b32 <= 64 {
                    bit[$l] += (tz + 1 + b32) as u64;
                    ((tz as u64) << b) | ((w >> tz >> 1) & low)
                } else {
                    let Some((g, at)) = read_rice_slow(gaps, bit[$l], gap_bits, b32) else {
                        bad = true;
                        break $walk;
                    };
                    bit[$l] = at;
                    g
                };
                let pos = match next[$l].checked_add(g) {
                    Some(p) if p < blocks[$l].limit && bit[$l] <= gap_bits => p,
                    _ => {
                        bad = true;
                        break $walk;
                    }
                };
                let s = blocks[$l].first_nz + $i;
                let Some(sw) = signs.get((s / 64) as usize) else {
                    bad = true;
                    break $walk;
                };
                emit($l, pos, (sw >> (s % 64)) & 1 == 1);
                next[$l] = pos + 1;
            }
        };
    }
    const { assert!(N <= 4, "the walk is written out for at most 4 lanes") };
    'walk: for i in 0..steps {
        step!(0, i, 'walk);
        step!(1, i, 'walk);
        step!(2, i, 'walk);
        step!(3, i, 'walk);
    }
    if bad {
        for k in blocks {
            walk_block(gaps, gap_bits, signs, b, k, |_, _| {})?;
        }
        // The same checks one block at a time found nothing: they disagree with the loop above.
        return malformed("the interleaved and the plain Rice walk disagree (a decoder bug)");
    }
    for (l, k) in blocks.iter().enumerate() {
        let rest = Block {
            start: BlockStart {
                bit: bit[l],
                next: next[l],
            },
            first_nz: k.first_nz + steps,
            count: k.count - steps,
            ..*k
        };
        walk_block(gaps, gap_bits, signs, b, &rest, |p, n| emit(l, p, n))?;
    }
    Ok(())
}

/// A code that does not fit one peek (a long unary part, or b near 64): out of line, so that the
/// walk's loop stays small enough to keep every lane in registers. The code and the bit after it.
#[cold]
#[inline(never)]
fn read_rice_slow(gaps: &[u64], bit: u64, gap_bits: u64, b: u32) -> Option<(u64, u64)> {
    // BitReader needs bit <= gap_bits (it counts the bits left as gap_bits - bit).
    if bit > gap_bits {
        return None;
    }
    let mut r = BitReader::new(gaps, bit, gap_bits);
    let g = r.read_rice(b).ok()?;
    Some((g, r.pos()))
}

/// Decodes one block with [`decode_block`] and checks that it ends exactly where the next block
/// starts (or, for the last block, at the end of the gap stream).
#[inline(always)]
pub(crate) fn walk_block(
    gaps: &[u64],
    gap_bits: u64,
    signs: &[u64],
    b: u8,
    k: &Block,
    emit: impl FnMut(u64, bool),
) -> Result<()> {
    let (next, bit) = decode_block(
        gaps, gap_bits, signs, b, k.start, k.first_nz, k.count, k.limit, emit,
    )?;
    if bit != k.end_bit || (!k.last && next != k.limit) {
        return malformed(format!(
            "block {} does not end where the next block starts",
            k.j
        ));
    }
    Ok(())
}
