//! Bit-level writer and strict reader over little-endian u64 words, LSB first.
//!
//! The reader never reads past the number of bits it was given: a code that runs off the end is an
//! error, not an endless stream of zeros.

use crate::error::{Error, Result};

/// Appends bits LSB-first into u64 words.
#[derive(Default, Debug, Clone)]
pub(crate) struct BitWriter {
    words: Vec<u64>,
    cur: u64,
    fill: u32,
}

impl BitWriter {
    #[cfg(test)]
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_capacity_bits(bits: usize) -> Self {
        BitWriter {
            words: Vec::with_capacity(bits / 64 + 1),
            cur: 0,
            fill: 0,
        }
    }

    #[inline]
    pub fn len(&self) -> u64 {
        self.words.len() as u64 * 64 + self.fill as u64
    }

    /// Writes the low `n` bits of `v` (`n` <= 64; higher bits of `v` must be zero).
    #[inline(always)]
    pub fn write(&mut self, v: u64, n: u32) {
        debug_assert!(n <= 64);
        debug_assert!(n == 64 || v >> n == 0);
        if n == 0 {
            return;
        }
        self.cur |= v << self.fill;
        let total = self.fill + n;
        if total >= 64 {
            self.words.push(self.cur);
            self.cur = if self.fill == 0 {
                0
            } else {
                v >> (64 - self.fill)
            };
            self.fill = total - 64;
        } else {
            self.fill = total;
        }
    }

    #[inline(always)]
    pub fn write_bit(&mut self, bit: bool) {
        self.write(bit as u64, 1);
    }

    /// `q` zero bits followed by a one bit.
    #[inline(always)]
    pub fn write_unary(&mut self, mut q: u64) {
        while q >= 64 {
            self.write(0, 64);
            q -= 64;
        }
        if q < 63 {
            self.write(1u64 << q, q as u32 + 1);
        } else {
            self.write(0, 63);
            self.write(1, 1);
        }
    }

    /// Rice code of `g` with parameter `b`: quotient in unary, then the `b` low bits.
    #[inline(always)]
    pub fn write_rice(&mut self, g: u64, b: u32) {
        self.write_unary(g >> b);
        if b > 0 {
            self.write(g & ((1u64 << b) - 1), b);
        }
    }

    /// Appends the first `len` bits of `words`.
    pub fn append(&mut self, words: &[u64], len: u64) {
        let full = (len / 64) as usize;
        if self.fill == 0 {
            self.words.extend_from_slice(&words[..full]);
        } else {
            for &w in &words[..full] {
                self.write(w, 64);
            }
        }
        let rest = (len % 64) as u32;
        if rest > 0 {
            self.write(words[full] & ((1u64 << rest) - 1), rest);
        }
    }

    /// The words (the last one zero-padded) and the length in bits.
    pub fn finish(mut self) -> (Vec<u64>, u64) {
        let len = self.len();
        if self.fill > 0 {
            self.words.push(self.cur);
        }
        (self.words, len)
    }
}

/// Reads bits LSB-first from `words`, never past `end`.
pub(crate) struct BitReader<'a> {
    words: &'a [u64],
    pos: u64,
    end: u64,
}

impl<'a> BitReader<'a> {
    /// `end` must not exceed `words.len() * 64` (checked by the caller when parsing).
    pub fn new(words: &'a [u64], start: u64, end: u64) -> Self {
        BitReader {
            words,
            pos: start,
            end,
        }
    }

    #[inline]
    pub fn pos(&self) -> u64 {
        self.pos
    }

    /// Up to 64 bits starting at `pos`; bits beyond the words read as zero.
    #[inline(always)]
    fn peek(&self) -> u64 {
        let i = (self.pos / 64) as usize;
        let off = (self.pos % 64) as u32;
        let lo = self.words.get(i).copied().unwrap_or(0) >> off;
        if off == 0 {
            lo
        } else {
            lo | (self.words.get(i + 1).copied().unwrap_or(0) << (64 - off))
        }
    }

    #[inline(always)]
    pub fn read(&mut self, n: u32) -> Result<u64> {
        if n == 0 {
            return Ok(0);
        }
        if self.end - self.pos < n as u64 {
            return Err(Error::Truncated { what: "gap codes" });
        }
        let w = self.peek();
        self.pos += n as u64;
        Ok(if n == 64 { w } else { w & ((1u64 << n) - 1) })
    }

    #[inline(always)]
    pub fn read_unary(&mut self) -> Result<u64> {
        let mut q = 0u64;
        loop {
            let avail = self.end - self.pos;
            if avail == 0 {
                return Err(Error::Truncated { what: "gap codes" });
            }
            let valid = avail.min(64);
            let tz = self.peek().trailing_zeros() as u64;
            if tz < valid {
                self.pos += tz + 1;
                return Ok(q + tz);
            }
            q += valid;
            self.pos += valid;
        }
    }

    #[inline(always)]
    pub fn read_rice(&mut self, b: u32) -> Result<u64> {
        let q = self.read_unary()?;
        if b > 0 && q > (u64::MAX >> b) {
            return Err(Error::Malformed("a gap code overflows 64 bits".into()));
        }
        let r = self.read(b)?;
        Ok((q << b) | r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_read_roundtrip_mixed_widths() {
        let mut w = BitWriter::new();
        let vals: Vec<(u64, u32)> = (0..500u64)
            .map(|i| {
                let n = (i * 7 % 65) as u32;
                let v = if n == 0 {
                    0
                } else {
                    i.wrapping_mul(0x9E3779B97F4A7C15) >> (64 - n)
                };
                (v, n)
            })
            .collect();
        for &(v, n) in &vals {
            w.write(v, n);
        }
        let (words, len) = w.finish();
        let mut r = BitReader::new(&words, 0, len);
        for &(v, n) in &vals {
            assert_eq!(r.read(n).unwrap(), v);
        }
        assert!(r.read(1).is_err());
    }

    #[test]
    fn rice_roundtrip_and_strict_end() {
        for b in [0u32, 1, 3, 7, 20] {
            let gaps = [0u64, 1, 5, 63, 64, 65, 200, 1000, 70_000];
            let mut w = BitWriter::new();
            for &g in &gaps {
                w.write_rice(g, b);
            }
            let (words, len) = w.finish();
            let mut r = BitReader::new(&words, 0, len);
            for &g in &gaps {
                assert_eq!(r.read_rice(b).unwrap(), g);
            }
            assert_eq!(r.pos(), len);
            assert!(r.read_unary().is_err(), "reading past the end must fail");
        }
    }

    #[test]
    fn append_unaligned() {
        let mut a = BitWriter::new();
        a.write(0b101, 3);
        let mut b = BitWriter::new();
        for i in 0..200u64 {
            b.write(i & 1, 1);
        }
        let (bw, bl) = b.finish();
        a.append(&bw, bl);
        let (aw, al) = a.finish();
        assert_eq!(al, 203);
        let mut r = BitReader::new(&aw, 0, al);
        assert_eq!(r.read(3).unwrap(), 0b101);
        for i in 0..200u64 {
            assert_eq!(r.read(1).unwrap(), i & 1);
        }
    }
}
