//! Rice coding of the gaps between kept positions, with b* from the golden-ratio formula.

use crate::bits::{BitReader, BitWriter};
use crate::error::{malformed, Error, Result};

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

/// Blocks walked side by side by [`walk_pool`]: each block's Rice codes form one serial chain
/// (load -> tzcnt -> shift -> add), so several independent chains in one loop keep a core busy
/// (1.3-1.5 ns per kept entry on one core here against 2.6 for one chain).
pub(crate) const WALK_LANES: usize = 4;

/// Codes a lane of [`walk_pool`] decodes between checks: fewer than 64 (their signs come as one
/// word), as many as that so that the checks and the hand-over cost little per code.
const RUN: usize = 63;

/// One block for [`walk_pool`]: its number, where it starts, which nonzeros it holds, and where
/// it must end (bit `end_bit`; position `limit` exactly when `last` is false, else below it).
/// In a row-coded stream, `seg` is the non-empty row holding its first nonzero (0 otherwise).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Block {
    pub j: usize,
    pub start: BlockStart,
    pub first_nz: u64,
    pub count: u64,
    pub limit: u64,
    pub end_bit: u64,
    pub last: bool,
    pub seg: usize,
}

/// The rows of a row-coded stream as the walk needs them: the row length, and for each
/// non-empty row in order its number, the count of nonzeros up to its end, and its Rice
/// parameter. Each row's first gap counts from the row's start.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RowsRef<'a> {
    pub cols: u64,
    pub rows: &'a [u64],
    pub ends: &'a [u64],
    pub bs: &'a [u8],
}

/// A block and the stream it lies in, as [`walk_pool`] walks it: one Rice parameter `b` for
/// the whole stream, or one per row (`rows`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct BlockRef<'a> {
    pub gaps: &'a [u64],
    pub gap_bits: u64,
    pub signs: &'a [u64],
    pub b: u8,
    pub rows: Option<RowsRef<'a>>,
    pub block: Block,
}

impl BlockRef<'_> {
    /// The block walked alone, every read checked: its first error, if any.
    fn walk_alone(&self) -> Result<()> {
        walk_block(self, |_, _| {})
    }
}

/// Where a lane of the walk stands: the bit of its next code, the position its next gap counts
/// from, the number of its next nonzero (where its sign bit is), the bound its positions must
/// stay below (its block's, and in a row-coded stream its row's end), the Rice parameter of its
/// codes, and in a row-coded stream its row (`seg`) and the codes left in it (else u64::MAX).
#[derive(Clone, Copy, Debug, Default)]
struct Lane {
    bit: u64,
    next: u64,
    nz: u64,
    limit: u64,
    b: u32,
    seg: usize,
    seg_left: u64,
}

impl Lane {
    /// The lane at the start of `r`'s block; an error when the block cannot start there (in a
    /// row-coded stream: its first nonzero's row does not exist, or its start lies outside that
    /// row).
    fn start(r: &BlockRef<'_>) -> Result<Lane> {
        let k = &r.block;
        let mut ln = Lane {
            bit: k.start.bit,
            next: k.start.next,
            nz: k.first_nz,
            limit: k.limit,
            b: r.b as u32,
            seg: 0,
            seg_left: u64::MAX,
        };
        if let Some(rw) = r.rows {
            let before = match k.seg {
                0 => Some(0),
                s => rw.ends.get(s - 1).copied(),
            };
            // A block at a row's first nonzero counts from the row's start; one inside a row
            // from one past a position of that row.
            let ok = match (before, ln.enter_row(&rw, k.seg, k.limit)) {
                (Some(before), Some(row_start)) if k.first_nz == before => {
                    k.start.next == row_start
                }
                (Some(before), Some(row_start)) if k.first_nz > before => {
                    k.start.next > row_start && k.start.next < row_start + rw.cols
                }
                _ => false,
            };
            if !ok {
                return malformed(format!(
                    "block {} starts outside the row its first nonzero is in",
                    k.j
                ));
            }
        }
        Ok(ln)
    }

    /// Puts the lane in non-empty row `s` from its next nonzero on: the row's Rice parameter,
    /// the codes left in it, its end (or the block's `limit`) as the bound. The row's start, or
    /// None when there is no such row or the lane's next nonzero is not in it.
    fn enter_row(&mut self, rw: &RowsRef<'_>, s: usize, limit: u64) -> Option<u64> {
        let (&row, &end, &b) = (rw.rows.get(s)?, rw.ends.get(s)?, rw.bs.get(s)?);
        let left = end.checked_sub(self.nz).filter(|&l| l > 0)?;
        let row_start = row * rw.cols;
        self.seg = s;
        self.b = b as u32;
        self.seg_left = left;
        self.limit = limit.min(row_start + rw.cols);
        Some(row_start)
    }

    /// Moves a lane whose row has ended to the next non-empty row: false if there is none.
    /// Only for row-coded streams.
    #[inline]
    fn next_row(&mut self, r: &BlockRef<'_>) -> bool {
        let Some(rw) = r.rows else { return false };
        match self.enter_row(&rw, self.seg + 1, r.block.limit) {
            Some(row_start) => {
                self.next = row_start;
                true
            }
            None => false,
        }
    }

    /// Whether a lane that has walked its block's codes ends where the block must: at its end
    /// bit and, unless it is the last block, at the next block's start (in a row-coded stream,
    /// a block that ends a row hands the next row's start on).
    fn ends_block(&mut self, r: &BlockRef<'_>) -> bool {
        let k = &r.block;
        if self.seg_left == 0 {
            self.next_row(r);
        }
        self.bit == k.end_bit && (k.last || self.next == k.limit)
    }
}

/// The pool's lanes, compact: slots `0..m` walk blocks `item[..m]`.
struct Lanes<'a> {
    src: [Option<BlockRef<'a>>; WALK_LANES],
    lane: [Lane; WALK_LANES],
    left: [u64; WALK_LANES],
    item: [usize; WALK_LANES],
    m: usize,
}

/// Decodes blocks `0..count` (`block(i)` gives block i and its stream; blocks of different
/// streams may mix) [`WALK_LANES`] at a time, a code of each in turn, and hands them to
/// `sink(i, positions, signs)` a run at a time: up to 63 increasing positions of block i and
/// their sign bits (bit r set: positions[r] is negative), in position order within a block,
/// interleaved across blocks. A lane whose block ends takes the next one, so that four chains
/// stay busy until the last blocks. Every run is checked before it reaches `sink` (positions
/// below the block's limit, codes inside the stream, sign bits present), and every block's end
/// as [`walk_block`] checks it. On a bad block: the first bad block in order and the error
/// [`walk_block`] gives on it (found again by walking the blocks from the earliest one not
/// finished, one at a time: errors are rare, so the fast loop only notices one); `sink` may have
/// seen runs of other blocks.
pub(crate) fn walk_pool<'a>(
    count: usize,
    block: impl Fn(usize) -> BlockRef<'a>,
    mut sink: impl FnMut(usize, &[u64], u64),
) -> std::result::Result<(), (usize, Error)> {
    let mut ls = Lanes {
        src: [None; WALK_LANES],
        lane: [Lane::default(); WALK_LANES],
        left: [0; WALK_LANES],
        item: [0; WALK_LANES],
        m: 0,
    };
    let mut taken = 0;
    // A block that could not start (row-coded streams): the walk stops there.
    let mut refused = None;
    let ok = 'pool: loop {
        while ls.m < WALK_LANES && taken < count {
            let r = block(taken);
            let Ok(ln) = Lane::start(&r) else {
                refused = Some(taken);
                break 'pool false;
            };
            let s = ls.m;
            ls.src[s] = Some(r);
            ls.lane[s] = ln;
            ls.left[s] = r.block.count;
            ls.item[s] = taken;
            ls.m += 1;
            taken += 1;
        }
        if ls.m == 0 {
            break 'pool true;
        }
        // A run stays inside every lane's block and row.
        let mut n = (0..ls.m)
            .map(|s| ls.left[s].min(ls.lane[s].seg_left))
            .min()
            .unwrap_or(0)
            .min(RUN as u64) as usize;
        if n > 0 {
            let ran = match ls.m {
                4 => run::<4>(&mut ls, n, &mut sink),
                3 => run::<3>(&mut ls, n, &mut sink),
                2 => run::<2>(&mut ls, n, &mut sink),
                _ => run::<1>(&mut ls, n, &mut sink),
            };
            match ran {
                Some(r) => n = r,
                None => break 'pool false,
            }
        }
        // Lanes whose row ended go on to the next row; blocks that ended give their lane to the
        // next block (the last lane moves into it).
        let mut s = 0;
        while s < ls.m {
            let Some(r) = ls.src[s] else {
                break 'pool false;
            };
            let ln = &mut ls.lane[s];
            ln.seg_left -= n as u64;
            if ls.left[s] > n as u64 {
                ls.left[s] -= n as u64;
                if ln.seg_left == 0 && !ln.next_row(&r) {
                    break 'pool false;
                }
                s += 1;
                continue;
            }
            if !ln.ends_block(&r) {
                break 'pool false;
            }
            ls.m -= 1;
            ls.src[s] = ls.src[ls.m];
            ls.lane[s] = ls.lane[ls.m];
            ls.left[s] = ls.left[ls.m];
            ls.item[s] = ls.item[ls.m];
        }
    };
    if ok {
        return Ok(());
    }
    // Every block before the earliest one in a lane (or the one refused) has ended and been
    // checked.
    let from = ls.item[..ls.m]
        .iter()
        .copied()
        .chain(refused)
        .min()
        .unwrap_or(0);
    for i in from..count {
        block(i).walk_alone().map_err(|e| (i, e))?;
    }
    // The same checks one block at a time found nothing: they disagree with the loop above.
    Err((
        from,
        Error::Malformed("the interleaved and the plain Rice walk disagree (a decoder bug)".into()),
    ))
}

/// The next codes of the first `N` lanes of `ls`, at most `n` (at most each one's count left),
/// checked and handed to `sink`: how many, or None on anything [`walk_block`] would reject
/// inside them.
#[inline(always)]
fn run<const N: usize>(
    ls: &mut Lanes<'_>,
    mut n: usize,
    sink: &mut impl FnMut(usize, &[u64], u64),
) -> Option<usize> {
    const { assert!(N <= WALK_LANES && RUN < 64) };
    let src: [BlockRef<'_>; N] = match std::array::from_fn(|s| ls.src[s]) {
        a if a.iter().all(Option::is_some) => a.map(|r: Option<BlockRef<'_>>| r.expect("checked")),
        _ => return None,
    };
    let mut buf = [[0u64; RUN]; N];
    let lanes: &mut [Lane; N] = (&mut ls.lane[..N]).try_into().expect("N <= WALK_LANES");
    // The fast loop reads 8 bytes at bit / 8 for each code, codes of at most 57 bits: from
    // `bit`, c codes stay inside a stream of w words when bit + 57 (c - 1) <= 64 (w - 1). Near
    // a stream's end the run gets shorter; in its last word the careful walk takes a few codes.
    let room = src
        .iter()
        .zip(lanes.iter())
        .map(|(r, ln)| {
            let end = 64 * (r.gaps.len() as u64).saturating_sub(1);
            match end.checked_sub(ln.bit) {
                Some(d) if ln.b <= 56 && ln.next <= crate::codec::MAX_NUMEL => {
                    (d / 64 + 1) as usize
                }
                _ => 0,
            }
        })
        .min()
        .unwrap_or(0);
    let fast = FAST_PEEK && room > 0 && {
        n = n.min(room);
        fast_gaps(&src, lanes, &mut buf, n)
    };
    if !fast && room == 0 {
        n = n.min(4);
    }
    if fast {
        // The fast loop stored gaps: positions now, a lane at a time. No overflow: a code of at
        // most 57 bits holds a gap below 2^57, and a lane starts at most at MAX_NUMEL (2^48).
        for (ln, out) in lanes.iter_mut().zip(buf.iter_mut()) {
            let mut next = ln.next;
            for g in &mut out[..n] {
                *g += next;
                next = *g + 1;
            }
            ln.next = next;
        }
    } else {
        // The run one lane at a time, every read checked (the stream's end, a long code, or a
        // code that went wrong).
        for ((r, ln), out) in src.iter().zip(lanes.iter_mut()).zip(buf.iter_mut()) {
            if !careful_run(r, ln, &mut out[..n]) {
                return None;
            }
        }
    }
    for (s, (r, ln)) in src.iter().zip(lanes.iter_mut()).enumerate() {
        let z = ln.nz;
        // Positions increase, so the last one's bound covers the run.
        if buf[s][n - 1] >= ln.limit
            || ln.bit > r.gap_bits
            || ((z + n as u64 - 1) / 64) as usize >= r.signs.len()
        {
            return None;
        }
        let sg = peek(r.signs, z) & ((1u64 << n) - 1);
        sink(ls.item[s], &buf[s][..n], sg);
        ln.nz += n as u64;
    }
    Some(n)
}

/// Whether [`fast_gaps`] can read gap streams' bytes as little-endian 64-bit loads.
const FAST_PEEK: bool = cfg!(target_endian = "little");

/// The gaps of the next `n` codes of every lane into `buf`, lanes advanced; false, with the
/// lanes as they were, if a code does not fit one 57-bit peek (the caller walks that run
/// carefully). The caller checked that n codes of at most 57 bits from each lane's bit leave
/// every 8-byte read inside its stream, and that b <= 56. The loop carries only each lane's bit offset
/// (the serial chain load -> tzcnt -> add, one per lane side by side) and calls nothing, so that
/// it stays in registers: positions are summed after it.
#[inline(always)]
fn fast_gaps<const N: usize>(
    src: &[BlockRef<'_>; N],
    lanes: &mut [Lane; N],
    buf: &mut [[u64; RUN]; N],
    n: usize,
) -> bool {
    let bytes = src.map(|r| r.gaps.as_ptr() as *const u8);
    let b32 = lanes.map(|ln| ln.b);
    let low = lanes.map(|ln| (1u64 << ln.b) - 1);
    let mut bit = lanes.map(|ln| ln.bit);
    macro_rules! step {
        ($l:literal, $i:ident) => {
            if $l < N {
                debug_assert!((bit[$l] / 8) as usize + 8 <= src[$l].gaps.len() * 8);
                // SAFETY: the 8 bytes from bit / 8 lie inside the lane's gap stream (the room
                // the caller checked covers n codes, each at most 57 bits here); the bytes of a u64
                // slice are initialised, and little-endian words put stream bit i at byte i / 8.
                let word = unsafe {
                    (bytes[$l].add((bit[$l] / 8) as usize) as *const u64).read_unaligned()
                };
                // At least 57 valid bits from `bit`; the shift brings in zeros above them.
                let w = u64::from_le(word) >> (bit[$l] % 8);
                let tz = w.trailing_zeros();
                if tz + 1 + b32[$l] > 57 {
                    return false;
                }
                bit[$l] += (tz + 1 + b32[$l]) as u64;
                buf[$l][$i] = ((tz as u64) << b32[$l]) | ((w >> tz >> 1) & low[$l]);
            }
        };
    }
    // Indexing every lane's row by i: a zip over four rows would not unroll into one loop.
    #[allow(clippy::needless_range_loop)]
    for i in 0..n {
        step!(0, i);
        step!(1, i);
        step!(2, i);
        step!(3, i);
    }
    for (ln, &at) in lanes.iter_mut().zip(&bit) {
        ln.bit = at;
    }
    true
}

/// `out.len()` codes of one lane with every read checked; false where [`walk_block`] would fail
/// on a read. Positions saturate (a code may hold any gap), so they never decrease.
#[inline(never)]
fn careful_run(r: &BlockRef<'_>, ln: &mut Lane, out: &mut [u64]) -> bool {
    let (b32, low) = (ln.b, low_mask(ln.b as u8));
    for o in out.iter_mut() {
        let Ok((g, at)) = read_code(r.gaps, r.gap_bits, b32, low, ln.bit) else {
            return false;
        };
        ln.bit = at;
        let pos = ln.next.saturating_add(g);
        *o = pos;
        ln.next = pos.saturating_add(1);
    }
    true
}

/// The low `b` bits of a Rice code's remainder as a mask (b <= 63).
fn low_mask(b: u8) -> u64 {
    if b == 0 {
        0
    } else {
        (1u64 << b) - 1
    }
}

/// The Rice code at bit `bit`: its value and the bit after it. The whole code (unary quotient,
/// stop bit, b low bits) is usually in one peek; a longer one goes out of line.
#[inline(always)]
fn read_code(gaps: &[u64], gap_bits: u64, b32: u32, low: u64, bit: u64) -> Result<(u64, u64)> {
    let w = peek(gaps, bit);
    let tz = w.trailing_zeros();
    // tz = 64 (w = 0) also goes the long way.
    if tz + 1 + b32 <= 64 {
        Ok((
            ((tz as u64) << b32) | ((w >> tz >> 1) & low),
            bit + (tz + 1 + b32) as u64,
        ))
    } else {
        read_rice_slow(gaps, bit, gap_bits, b32)
    }
}

/// A code that does not fit one peek (a long unary part, or b near 64): out of line, so that
/// the loops calling [`read_code`] stay small. The code and the bit after it.
#[cold]
#[inline(never)]
fn read_rice_slow(gaps: &[u64], bit: u64, gap_bits: u64, b: u32) -> Result<(u64, u64)> {
    // A start past the stream (only in an index no check has passed): BitReader counts the bits
    // left as gap_bits - bit and would read zeros for ever.
    if bit > gap_bits {
        return Err(Error::Truncated { what: "gap codes" });
    }
    let mut r = BitReader::new(gaps, bit, gap_bits);
    let g = r.read_rice(b)?;
    Ok((g, r.pos()))
}

/// Walks one block code by code, every read checked, calling `emit(position, negative)` for each
/// kept entry, and checks that it ends exactly where the next block starts (or, for the last
/// block, at the end of the gap stream). The plain reference the interleaved walk is tested
/// against, and the walk that finds the error the fast loop noticed.
pub(crate) fn walk_block(r: &BlockRef<'_>, mut emit: impl FnMut(u64, bool)) -> Result<()> {
    let k = &r.block;
    let mut ln = Lane::start(r)?;
    for _ in 0..k.count {
        if ln.seg_left == 0 && !ln.next_row(r) {
            return malformed("the row counts hold fewer nonzeros than the stream");
        }
        let (g, at) = read_code(r.gaps, r.gap_bits, ln.b, low_mask(ln.b as u8), ln.bit)?;
        ln.bit = at;
        if ln.bit > r.gap_bits {
            return Err(Error::Truncated { what: "gap codes" });
        }
        let pos =
            match ln.next.checked_add(g) {
                Some(p) if p < ln.limit => p,
                _ => return malformed(
                    "a decoded position lies beyond the end of the tensor, its row or its block",
                ),
            };
        let neg = match r.signs.get((ln.nz / 64) as usize) {
            Some(w) => (w >> (ln.nz % 64)) & 1 == 1,
            None => return malformed("fewer sign bits than nonzeros"),
        };
        emit(pos, neg);
        ln.next = pos + 1;
        ln.nz += 1;
        ln.seg_left -= 1;
    }
    if !ln.ends_block(r) {
        return malformed(format!(
            "block {} does not end where the next block starts",
            k.j
        ));
    }
    Ok(())
}
