//! The stream pack of an expert file (file version 3, docs/FORMAT.md "The stream pack"): every
//! compressed tensor of an expert in one byte string, the stream headers together and deflated,
//! the payloads after them, one checksum over all.
//!
//! A small LoRA adapter has dozens of streams of a few hundred bytes; as separate safetensors
//! tensors each paid ~60 bytes of header JSON plus ~35 bytes of its own header and checksum,
//! about a quarter of the file. Packed, the repeated header fields deflate to a few bytes each.

use std::ops::Range;

use crate::codec::Compressed;
use crate::error::{malformed, Error, Result};
use crate::format::{put_varint, Reader};

pub const PACK_MAGIC: &[u8; 4] = b"CPFK";
pub const PACK_VERSION: u8 = 1;
/// magic, version, count, index length, crc.
const PACK_MIN_LEN: usize = 4 + 1 + 1 + 1 + 4;
/// Deflate level for the header index: the index is small, so the best ratio costs nothing.
const LEVEL: u8 = 9;

/// The most bytes an index may inflate to, given its deflated size and the bytes of payload
/// after it. Per stream the index holds a key (the decimal position of a tensor name), a head
/// (encoding, dtype, shape, counts, scale: 20 to 60 bytes for tensors of up to 8 dimensions),
/// two lengths and, for golomb, one block-index entry of at most 20 bytes per block of at least
/// 64 nonzeros, whose payload takes at least 16 bytes. So the entries that grow with a stream
/// are at most 1.25 times its payload, and the fixed part, about 30 to 70 bytes a stream,
/// deflates to no less than about 2.3 bytes (every key differs): at most 12.5 times, measured
/// on experts of thousands of empty streams. Deflate itself expands up to 1032 times, so
/// without this bound a 0.4 MB file asked for 385 MB before its index was found wrong.
pub fn index_limit(deflated: usize, payload: usize) -> usize {
    deflated
        .saturating_mul(32)
        .saturating_add(payload.saturating_mul(2))
        .saturating_add(64 << 10)
}

/// One stream of a parsed pack: its key, its header (inside the inflated index) and payload
/// (inside the pack's bytes).
#[derive(Clone, Debug)]
pub struct PackEntry {
    pub key: String,
    pub head: Range<usize>,
    pub payload: Range<usize>,
}

/// Serialises streams, each under a key, into one pack. Refuses (`InvalidArgument`) only an
/// index that readers would refuse, above [`index_limit`]: no real expert comes near it.
pub fn write_pack(items: &[(&str, &Compressed)]) -> Result<Vec<u8>> {
    let mut index = Vec::new();
    let mut payload_len = 0usize;
    let mut head = Vec::new();
    for (key, c) in items {
        put_varint(&mut index, key.len() as u64);
        index.extend_from_slice(key.as_bytes());
        head.clear();
        c.write_head(&mut head);
        put_varint(&mut index, head.len() as u64);
        index.extend_from_slice(&head);
        put_varint(&mut index, c.payload_nbytes() as u64);
        payload_len += c.payload_nbytes();
    }
    let z = miniz_oxide::deflate::compress_to_vec(&index, LEVEL);
    if index.len() > index_limit(z.len(), payload_len) {
        return Err(Error::InvalidArgument(format!(
            "the stream pack index of {} streams inflates to {} bytes, above the {} a reader \
             accepts for {} deflated bytes and {payload_len} bytes of payload; store fewer empty \
             tensors or shorter keys",
            items.len(),
            index.len(),
            index_limit(z.len(), payload_len),
            z.len()
        )));
    }
    let mut out = Vec::with_capacity(PACK_MIN_LEN + 20 + z.len() + payload_len);
    out.extend_from_slice(PACK_MAGIC);
    out.push(PACK_VERSION);
    put_varint(&mut out, items.len() as u64);
    put_varint(&mut out, z.len() as u64);
    out.extend_from_slice(&z);
    for (_, c) in items {
        let before = out.len();
        c.write_payload(&mut out);
        debug_assert_eq!(out.len() - before, c.payload_nbytes());
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// A parsed pack: the inflated header index and where each stream's parts lie.
#[derive(Debug)]
pub struct Pack {
    index: Vec<u8>,
    entries: Vec<PackEntry>,
}

impl Pack {
    /// Checks the magic, version and checksum of `data` and reads its index; every range is
    /// checked against the bytes present. Payload ranges are relative to `data`.
    pub fn parse(data: &[u8]) -> Result<Pack> {
        if data.len() < 4 || &data[..4] != PACK_MAGIC {
            return malformed("the stream pack does not start with b\"CPFK\"");
        }
        if data.len() < PACK_MIN_LEN {
            return Err(Error::Truncated {
                what: "stream pack",
            });
        }
        if data[4] != PACK_VERSION {
            return malformed(format!(
                "stream pack version {} is not known to this library (it reads {PACK_VERSION}); \
                 upgrade compeft-rs",
                data[4]
            ));
        }
        let (body, crc_bytes) = data.split_at(data.len() - 4);
        let stored = u32::from_le_bytes(crc_bytes.try_into().expect("4 bytes"));
        let computed = crc32fast::hash(body);
        if stored != computed {
            return Err(Error::ChecksumMismatch { stored, computed });
        }
        let mut r = Reader { data: body, pos: 5 };
        let count = r.varint("stream count")?;
        let zlen = r.varint("index length")?;
        if zlen > r.remaining() as u64 {
            return Err(Error::Truncated {
                what: "stream pack index",
            });
        }
        let z = r.take(zlen as usize, "stream pack index")?;
        // What a real index can hold for these bytes (see index_limit), checked as it inflates.
        let limit = index_limit(z.len(), r.remaining());
        if count > (limit / 3) as u64 {
            return malformed(format!(
                "stream pack announces {count} streams, more than its {} bytes can index",
                data.len()
            ));
        }
        let index = miniz_oxide::inflate::decompress_to_vec_with_limit(z, limit).map_err(|e| {
            if e.status == miniz_oxide::inflate::TINFLStatus::HasMoreOutput {
                Error::Malformed(format!(
                    "the stream pack index inflates past {limit} bytes, the most that {} \
                     deflated bytes and {} bytes of payload can index (32 per deflated byte, 2 \
                     per payload byte, plus 64 KiB)",
                    z.len(),
                    r.remaining()
                ))
            } else {
                Error::Malformed(format!("the stream pack index does not inflate: {e}"))
            }
        })?;
        // Each entry takes at least 3 bytes, so a valid count is bounded by the index.
        if count > (index.len() / 3) as u64 {
            return malformed(format!(
                "stream pack announces {count} streams in a {}-byte index",
                index.len()
            ));
        }
        let mut entries = Vec::with_capacity(count as usize);
        let mut ir = Reader {
            data: &index,
            pos: 0,
        };
        let mut at = r.pos;
        for _ in 0..count {
            let klen = ir.varint("stream key length")?;
            if klen > ir.remaining() as u64 {
                return Err(Error::Truncated {
                    what: "stream pack index",
                });
            }
            let key = std::str::from_utf8(ir.take(klen as usize, "stream key")?)
                .map_err(|_| Error::Malformed("a stream key is not UTF-8".into()))?
                .to_owned();
            let hlen = ir.varint("stream header length")?;
            if hlen > ir.remaining() as u64 {
                return Err(Error::Truncated {
                    what: "stream pack index",
                });
            }
            let head = ir.pos..ir.pos + hlen as usize;
            ir.pos = head.end;
            let plen = ir.varint("payload length")?;
            if plen > (body.len() - at) as u64 {
                return Err(Error::Truncated {
                    what: "stream pack payloads",
                });
            }
            let payload = at..at + plen as usize;
            at = payload.end;
            entries.push(PackEntry { key, head, payload });
        }
        if ir.remaining() != 0 {
            return malformed(format!(
                "{} unexpected bytes after the stream pack index",
                ir.remaining()
            ));
        }
        if at != body.len() {
            return malformed(format!(
                "{} unexpected bytes after the stream pack payloads",
                body.len() - at
            ));
        }
        Ok(Pack { index, entries })
    }

    pub fn entries(&self) -> &[PackEntry] {
        &self.entries
    }

    /// Parses stream `i`, whose payload lies in `data` (the bytes given to [`Pack::parse`]).
    pub fn stream(&self, data: &[u8], i: usize) -> Result<Compressed> {
        let e = &self.entries[i];
        let payload = data
            .get(e.payload.clone())
            .ok_or_else(|| Error::Malformed("stream pack payload out of range".into()))?;
        Compressed::from_parts(&self.index[e.head.clone()], payload)
    }

    /// The bytes stream `i` takes in the pack: its header and payload.
    pub fn stream_nbytes(&self, i: usize) -> usize {
        let e = &self.entries[i];
        e.head.len() + e.payload.len()
    }
}
