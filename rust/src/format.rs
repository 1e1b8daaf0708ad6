//! The byte layout of one compressed tensor (format version 1). docs/FORMAT.md is the spec; the
//! golden files under tests/golden pin it.
//!
//! Parsing trusts nothing: the checksum is verified first, every length is compared with the bytes
//! that remain before anything is sliced or allocated, and the body is checked against the header.

use crate::codec::{
    check_shape, BitmaskBody, Body, Compressed, Encoding, GolombBody, RowCoding, MAX_NDIM,
    MAX_NUMEL,
};
use crate::dtype::DType;
use crate::error::{malformed, Error, Result};
use crate::golomb::BlockStart;

pub const MAGIC: &[u8; 4] = b"CPFT";
pub const VERSION: u8 = 1;
/// The encoding byte of a row-coded golomb stream (its body differs from code 0's; readers
/// before it refuse it as an unknown encoding).
pub const ROWS_CODE: u8 = 2;
/// Smallest possible stream: magic, version, encoding, dtype, ndim, numel, nnz, scale, crc.
const MIN_LEN: usize = 4 + 4 + 1 + 1 + 8 + 4;

pub(crate) fn varint_len(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Little-endian bytes of the first `nbits` bits of `words`.
fn put_bits(out: &mut Vec<u8>, words: &[u64], nbits: u64) {
    let nbytes = nbits.div_ceil(8) as usize;
    let full = nbytes / 8;
    for w in &words[..full] {
        out.extend_from_slice(&w.to_le_bytes());
    }
    if nbytes % 8 != 0 {
        out.extend_from_slice(&words[full].to_le_bytes()[..nbytes % 8]);
    }
}

/// Bytes of a block index's varints, each entry a difference from the one before (`first`,
/// block 0's start, for the first).
pub(crate) fn index_nbytes(index: &[BlockStart], first: BlockStart) -> usize {
    let mut prev = first;
    let mut n = 0;
    for s in index {
        n += varint_len(s.bit - prev.bit) + varint_len(s.next - prev.next);
        prev = *s;
    }
    n
}

/// Bytes of a golomb body from the Rice parameter (or, coded by rows, `cols`, `count_b` and
/// `count_bits`) through the signs: the one size rule for both layouts.
pub(crate) fn golomb_body_nbytes(
    gap_bits: u64,
    index: &[BlockStart],
    first: BlockStart,
    nnz: u64,
    rows: Option<(u64, u64)>,
) -> usize {
    // rice_b (or count_b) and block_log2, the lengths, the index.
    let mut m = 2 + varint_len(gap_bits) + varint_len(index.len() as u64);
    m += index_nbytes(index, first);
    if let Some((cols, count_bits)) = rows {
        m += varint_len(cols) + varint_len(count_bits) + count_bits.div_ceil(8) as usize;
    }
    m + gap_bits.div_ceil(8) as usize + nnz.div_ceil(8) as usize
}

impl Compressed {
    /// Size of [`Compressed::to_bytes`] without building it.
    pub fn nbytes(&self) -> usize {
        let mut n = 8 + self.shape.iter().map(|&s| varint_len(s)).sum::<usize>();
        n += varint_len(self.numel) + varint_len(self.nnz) + 8;
        n += match &self.body {
            Body::Golomb(g) => golomb_body_nbytes(
                g.gap_bits,
                &g.index,
                g.block_start(0),
                self.nnz,
                g.rows.as_ref().map(|rc| (rc.cols, rc.count_bits)),
            ),
            Body::Bitmask(_) => 2 * self.numel.div_ceil(8) as usize,
        };
        n + 4
    }

    /// The self-describing byte string (docs/FORMAT.md).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.nbytes());
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        self.write_head(&mut out);
        self.write_payload(&mut out);
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        debug_assert_eq!(out.len(), self.nbytes());
        out
    }

    /// The fields after the version up to the payload: encoding through the block index.
    /// An expert file's stream pack stores these apart from the payloads (docs/FORMAT.md).
    pub fn write_head(&self, out: &mut Vec<u8>) {
        out.push(match &self.body {
            Body::Golomb(g) if g.rows.is_some() => ROWS_CODE,
            _ => self.encoding() as u8,
        });
        out.push(self.dtype as u8);
        out.push(self.shape.len() as u8);
        for &s in &self.shape {
            put_varint(out, s);
        }
        put_varint(out, self.numel);
        put_varint(out, self.nnz);
        out.extend_from_slice(&self.scale.to_le_bytes());
        if let Body::Golomb(g) = &self.body {
            match &g.rows {
                Some(rc) => {
                    put_varint(out, rc.cols);
                    out.push(rc.count_b);
                    out.push(g.block_log2);
                    put_varint(out, rc.count_bits);
                }
                None => {
                    out.push(g.rice_b);
                    out.push(g.block_log2);
                }
            }
            put_varint(out, g.gap_bits);
            put_varint(out, g.index.len() as u64);
            let mut prev = g.block_start(0);
            for s in &g.index {
                put_varint(out, s.bit - prev.bit);
                put_varint(out, s.next - prev.next);
                prev = *s;
            }
        }
    }

    /// The payload: gap codes and sign bits, or the two masks.
    pub fn write_payload(&self, out: &mut Vec<u8>) {
        match &self.body {
            Body::Golomb(g) => {
                if let Some(rc) = &g.rows {
                    put_bits(out, &rc.counts, rc.count_bits);
                }
                put_bits(out, &g.gaps, g.gap_bits);
                put_bits(out, &g.signs, self.nnz);
            }
            Body::Bitmask(m) => {
                put_bits(out, &m.pos, self.numel);
                put_bits(out, &m.neg, self.numel);
            }
        }
    }

    /// Size of [`Compressed::write_payload`]'s output.
    pub fn payload_nbytes(&self) -> usize {
        match &self.body {
            Body::Golomb(g) => {
                let counts = g.rows.as_ref().map_or(0, |rc| rc.count_bits.div_ceil(8));
                (counts + g.gap_bits.div_ceil(8) + self.nnz.div_ceil(8)) as usize
            }
            Body::Bitmask(_) => 2 * self.numel.div_ceil(8) as usize,
        }
    }

    /// Parses and checks a stream stored in two parts, as in an expert file's pack: `head` as
    /// written by [`Compressed::write_head`], `payload` by [`Compressed::write_payload`]. The
    /// caller has verified the checksum that covers both.
    pub fn from_parts(head: &[u8], payload: &[u8]) -> Result<Compressed> {
        let mut h = Reader { data: head, pos: 0 };
        let fields = Head::parse(&mut h)?;
        if h.remaining() != 0 {
            return malformed(format!(
                "{} unexpected bytes after the stream header",
                h.remaining()
            ));
        }
        let c = fields.with_payload(&mut Reader {
            data: payload,
            pos: 0,
        })?;
        c.check()?;
        Ok(c)
    }

    /// Parses and fully checks a byte string written by [`Compressed::to_bytes`].
    pub fn from_bytes(data: &[u8]) -> Result<Compressed> {
        if data.len() < 4 || &data[..4] != MAGIC {
            return Err(if data.len() < 4 {
                Error::Truncated { what: "magic" }
            } else {
                Error::BadMagic
            });
        }
        if data.len() < 5 {
            return Err(Error::Truncated { what: "version" });
        }
        if data[4] != VERSION {
            return Err(Error::UnsupportedVersion(data[4]));
        }
        if data.len() < MIN_LEN {
            return Err(Error::Truncated { what: "header" });
        }
        let (body, crc_bytes) = data.split_at(data.len() - 4);
        let stored = u32::from_le_bytes(crc_bytes.try_into().expect("4 bytes"));
        let computed = crc32fast::hash(body);
        if stored != computed {
            // A cut-off stream also fails the checksum; say which of the two it is.
            return Err(match Self::parse_unchecked(body) {
                Err(e @ Error::Truncated { .. }) => e,
                _ => Error::ChecksumMismatch { stored, computed },
            });
        }
        let c = Self::parse_unchecked(body)?;
        c.check()?;
        Ok(c)
    }

    /// Parses the bytes before the checksum, checking every length against what remains.
    fn parse_unchecked(body: &[u8]) -> Result<Compressed> {
        let mut r = Reader { data: body, pos: 5 };
        Head::parse(&mut r)?.with_payload(&mut r)
    }
}

/// The header fields of a stream, read before its payload.
struct Head {
    encoding: Encoding,
    dtype: DType,
    shape: Vec<u64>,
    numel: u64,
    nnz: u64,
    scale: f64,
    /// Golomb only: rice_b, block_log2, gap_bits and the block index.
    golomb: Option<(u8, u8, u64, Vec<BlockStart>)>,
    /// Row-coded golomb only: cols, count_b and count_bits.
    rows: Option<(u64, u8, u64)>,
}

impl Head {
    fn parse(r: &mut Reader<'_>) -> Result<Head> {
        let code = r.u8("encoding")?;
        let row_coded = code == ROWS_CODE;
        let encoding = if row_coded {
            Encoding::Golomb
        } else {
            Encoding::from_code(code)?
        };
        let dtype = DType::from_code(r.u8("dtype")?)?;
        let ndim = r.u8("ndim")? as usize;
        if ndim > MAX_NDIM {
            return Err(Error::TooLarge {
                what: "number of dimensions",
                value: ndim as u64,
                limit: MAX_NDIM as u64,
            });
        }
        let mut shape = Vec::with_capacity(ndim);
        for _ in 0..ndim {
            shape.push(r.varint("shape")?);
        }
        let numel = r.varint("numel")?;
        if numel > MAX_NUMEL {
            return Err(Error::TooLarge {
                what: "number of entries",
                value: numel,
                limit: MAX_NUMEL,
            });
        }
        check_shape(&shape, numel).map_err(|e| Error::Malformed(e.to_string()))?;
        let limit = crate::max_numel();
        if numel > limit {
            return Err(Error::LimitExceeded { numel, limit });
        }
        let nnz = r.varint("nnz")?;
        if nnz > numel {
            return malformed(format!("{nnz} nonzeros in {numel} entries"));
        }
        let scale = f64::from_le_bytes(r.take(8, "scale")?.try_into().expect("8 bytes"));
        let mut rows = None;
        let golomb = match encoding {
            Encoding::Golomb => {
                let mut rice_b = 0;
                if row_coded {
                    let cols = r.varint("row length")?;
                    let count_b = r.u8("count Rice parameter")?;
                    rows = Some((cols, count_b, 0));
                } else {
                    rice_b = r.u8("Rice parameter")?;
                }
                let block_log2 = r.u8("block size")?;
                if let Some(rw) = &mut rows {
                    rw.2 = r.varint("row count length")?;
                }
                if !crate::codec::BLOCK_LOG2_RANGE.contains(&block_log2) {
                    return malformed(format!("block size 2^{block_log2} is outside 2^6..2^24"));
                }
                let gap_bits = r.varint("gap stream length")?;
                let nidx = r.varint("block index length")?;
                let expected = nnz.div_ceil(1 << block_log2).saturating_sub(1);
                // Each entry takes at least two bytes, so a valid count is bounded by what remains.
                if nidx != expected || nidx > (r.remaining() / 2) as u64 {
                    return malformed(format!(
                        "block index has {nidx} entries, expected {expected}"
                    ));
                }
                let mut index = Vec::with_capacity(nidx as usize);
                // Block 0's position is known only from the counts (the first non-empty row's
                // start); the deltas from it are checked once the counts are read.
                let mut prev = BlockStart { bit: 0, next: 0 };
                for _ in 0..nidx {
                    let bit = prev.bit.checked_add(r.varint("block index")?);
                    let next = prev.next.checked_add(r.varint("block index")?);
                    let (Some(bit), Some(next)) = (bit, next) else {
                        return malformed("block index overflows");
                    };
                    prev = BlockStart { bit, next };
                    index.push(prev);
                }
                Some((rice_b, block_log2, gap_bits, index))
            }
            Encoding::Bitmask => None,
        };
        Ok(Head {
            encoding,
            dtype,
            shape,
            numel,
            nnz,
            scale,
            golomb,
            rows,
        })
    }

    /// Reads the payload the header announces; `r` must end exactly there.
    fn with_payload(self, r: &mut Reader<'_>) -> Result<Compressed> {
        let Head {
            encoding,
            dtype,
            shape,
            numel,
            nnz,
            scale,
            golomb,
            rows,
        } = self;
        let body = match (encoding, golomb) {
            (Encoding::Golomb, Some((rice_b, block_log2, gap_bits, mut index))) => {
                let rows = match rows {
                    Some((cols, count_b, count_bits)) => {
                        // The whole payload must be there before the counts size anything.
                        let payload =
                            count_bits.div_ceil(8) + gap_bits.div_ceil(8) + nnz.div_ceil(8);
                        if payload > r.remaining() as u64 {
                            return Err(Error::Truncated { what: "row counts" });
                        }
                        let counts = r.bits(count_bits, "row counts")?;
                        let rc = RowCoding::parse(cols, count_b, counts, count_bits, numel, nnz)?;
                        // The index deltas count from block 0's start, the first row's.
                        let first = rc.rows.first().map_or(0, |&row| row * cols);
                        for s in &mut index {
                            s.next = s
                                .next
                                .checked_add(first)
                                .ok_or_else(|| Error::Malformed("block index overflows".into()))?;
                        }
                        Some(Box::new(rc))
                    }
                    None => None,
                };
                let gap_bytes = gap_bits.div_ceil(8);
                if gap_bytes > r.remaining() as u64 {
                    return Err(Error::Truncated { what: "gap codes" });
                }
                let gaps = r.bits(gap_bits, "gap codes")?;
                let signs = r.bits(nnz, "sign bits")?;
                Body::Golomb(GolombBody {
                    rice_b,
                    block_log2,
                    gaps,
                    gap_bits,
                    signs,
                    index,
                    rows,
                })
            }
            _ => {
                let pos = r.bits(numel, "positive mask")?;
                let neg = r.bits(numel, "negative mask")?;
                Body::Bitmask(BitmaskBody { pos, neg })
            }
        };
        if r.remaining() != 0 {
            return malformed(format!(
                "{} unexpected bytes after the payload",
                r.remaining()
            ));
        }
        Ok(Compressed {
            dtype,
            shape,
            numel,
            nnz,
            scale,
            body,
        })
    }
}

pub(crate) struct Reader<'a> {
    pub(crate) data: &'a [u8],
    pub(crate) pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    pub(crate) fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(Error::Truncated { what });
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }

    pub(crate) fn varint(&mut self, what: &'static str) -> Result<u64> {
        let mut v = 0u64;
        for i in 0..10 {
            let b = self.u8(what)?;
            let part = (b & 0x7f) as u64;
            if i == 9 && part > 1 {
                return malformed(format!("{what} does not fit in 64 bits"));
            }
            v |= part << (7 * i);
            if b & 0x80 == 0 {
                // Canonical form only: no redundant trailing zero groups.
                if i > 0 && b == 0 {
                    return malformed(format!("{what} is not minimally encoded"));
                }
                return Ok(v);
            }
        }
        malformed(format!("{what} is longer than 10 bytes"))
    }

    /// Reads ceil(nbits/8) bytes into u64 words; bits past `nbits` must be zero.
    fn bits(&mut self, nbits: u64, what: &'static str) -> Result<Vec<u64>> {
        let nbytes = nbits.div_ceil(8);
        if nbytes > self.remaining() as u64 {
            return Err(Error::Truncated { what });
        }
        let bytes = self.take(nbytes as usize, what)?;
        let mut words = Vec::with_capacity(bytes.len().div_ceil(8));
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            words.push(u64::from_le_bytes(c.try_into().expect("8 bytes")));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut b = [0u8; 8];
            b[..rest.len()].copy_from_slice(rest);
            words.push(u64::from_le_bytes(b));
        }
        if nbits % 64 != 0 {
            if let Some(last) = words.last() {
                if last >> (nbits % 64) != 0 {
                    return malformed(format!("padding bits of the {what} are not zero"));
                }
            }
        }
        Ok(words)
    }
}
