//! Whole experts: one safetensors file whose compressed streams are packed into one 1-D `U8`
//! tensor (file version 3; earlier versions stored each stream as its own `U8` tensor) and whose
//! other tensors are kept exactly (docs/FORMAT.md, "The expert file").
//!
//! The file is read into memory once (never mapped: see [`ExpertFile::open`]), its header is
//! parsed and checked by the safetensors crate, and a whole-expert decode parses every stream and
//! decodes all of them in one parallel pass ([`crate::codec::decode_many`]).

use std::borrow::Cow;
use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;

use rayon::prelude::*;
use safetensors::tensor::{Dtype, SafeTensors, View};

use crate::codec::Compressed;
use crate::error::{Error, Result};
use crate::pack::{write_pack, Pack};

/// The safetensors key of the stream pack. Stream keys are the decimal positions of the
/// tensor names, so this never clashes with one.
pub const PACK_KEY: &str = "streams";

/// One tensor of the file: its safetensors dtype, shape and where its bytes are. A packed
/// stream shows as a 1-D `U8` tensor of its header and payload bytes.
#[derive(Clone, Debug)]
pub struct Entry {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub at: Location,
    pub nbytes: usize,
}

#[derive(Clone, Debug)]
pub enum Location {
    /// A safetensors tensor: its absolute byte range in the file.
    Tensor { start: usize, end: usize },
    /// Stream `i` of the pack.
    Packed(usize),
}

/// A parsed expert file. The header is checked once (offsets contiguous, inside the data,
/// consistent with dtypes and shapes); streams are parsed when they are asked for.
pub struct ExpertFile {
    storage: Vec<u8>,
    entries: HashMap<String, Entry>,
    metadata: HashMap<String, String>,
    /// The stream pack and its absolute byte range, when the file has one.
    pack: Option<(Pack, Range<usize>)>,
}

fn bad_file(e: impl std::fmt::Display) -> Error {
    Error::Malformed(format!("not a readable safetensors file: {e}"))
}

/// The safetensors name of a dtype ("F16", "U8", ...).
pub fn dtype_name(d: Dtype) -> String {
    serde_json::to_value(d)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("{d:?}"))
}

/// Parses a safetensors dtype name.
pub fn parse_dtype(name: &str) -> Result<Dtype> {
    serde_json::from_value(serde_json::Value::String(name.to_owned()))
        .map_err(|_| Error::InvalidArgument(format!("unknown safetensors dtype {name:?}")))
}

impl ExpertFile {
    /// Reads the file at `path` into memory. I/O errors come back as they are, for the caller
    /// to report.
    ///
    /// Read, not mapped: a mapped file truncated by another process kills this one with SIGBUS
    /// at the next read of a lost page, and a byte changed in place would be read after the
    /// checksums were verified. A copy is what was verified, whatever happens to the file; it
    /// costs 0.03 ms for a rank-16 LoRA of a 7B model (1.2 MB, from the page cache), as long as
    /// mapping it and touching its pages (docs/FORMAT.md, "Reading").
    pub fn open(path: &Path) -> std::io::Result<Result<ExpertFile>> {
        let data = std::fs::read(path)?;
        if data.is_empty() {
            return Ok(Err(bad_file("the file is empty")));
        }
        Ok(Self::parse(data))
    }

    /// Takes bytes already in memory.
    pub fn from_vec(data: Vec<u8>) -> Result<ExpertFile> {
        Self::parse(data)
    }

    fn parse(storage: Vec<u8>) -> Result<ExpertFile> {
        let (n, md) = SafeTensors::read_metadata(&storage).map_err(bad_file)?;
        let base = n
            .checked_add(8)
            .ok_or_else(|| bad_file("header too large"))?;
        let mut entries = HashMap::new();
        for (name, info) in md.tensors() {
            let (s, e) = info.data_offsets;
            let (start, end) = match (base.checked_add(s), base.checked_add(e)) {
                (Some(a), Some(b)) if a <= b && b <= storage.len() => (a, b),
                _ => return Err(bad_file(format!("tensor {name:?} points past the data"))),
            };
            entries.insert(
                name,
                Entry {
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    at: Location::Tensor { start, end },
                    nbytes: end - start,
                },
            );
        }
        let mut pack = None;
        if let Some(e) = entries.remove(PACK_KEY) {
            let Location::Tensor { start, end } = e.at else {
                unreachable!("safetensors entries are tensors")
            };
            if e.dtype != Dtype::U8 || e.shape.len() != 1 {
                return Err(Error::Malformed(format!(
                    "the stream pack should be a 1-D U8 tensor but is {} {:?}",
                    dtype_name(e.dtype),
                    e.shape
                )));
            }
            let p = Pack::parse(&storage[start..end])?;
            for (i, pe) in p.entries().iter().enumerate() {
                let nbytes = p.stream_nbytes(i);
                let old = entries.insert(
                    pe.key.clone(),
                    Entry {
                        dtype: Dtype::U8,
                        shape: vec![nbytes],
                        at: Location::Packed(i),
                        nbytes,
                    },
                );
                if old.is_some() {
                    return Err(Error::Malformed(format!(
                        "key {:?} is both in the stream pack and elsewhere in the file",
                        pe.key
                    )));
                }
            }
            pack = Some((p, start..end));
        }
        let metadata = md.metadata().clone().unwrap_or_default();
        Ok(ExpertFile {
            storage,
            entries,
            metadata,
            pack,
        })
    }

    /// The whole file.
    pub fn bytes(&self) -> &[u8] {
        &self.storage
    }

    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    pub fn entries(&self) -> &HashMap<String, Entry> {
        &self.entries
    }

    fn entry(&self, key: &str) -> Result<&Entry> {
        self.entries
            .get(key)
            .ok_or_else(|| Error::Malformed(format!("the file has no tensor {key:?}")))
    }

    /// The raw bytes of tensor `key` (not of a packed stream).
    pub fn tensor_bytes(&self, key: &str) -> Result<&[u8]> {
        let e = self.entry(key)?;
        let Location::Tensor { start, end } = e.at else {
            return Err(Error::InvalidArgument(format!(
                "{key:?} is a compressed stream in the pack, not a tensor kept exactly"
            )));
        };
        self.storage
            .get(start..end)
            .ok_or_else(|| bad_file(format!("tensor {key:?} points past the data")))
    }

    /// Parses the compressed stream stored under `key` (in the pack, or a 1-D U8 tensor).
    pub fn stream(&self, key: &str) -> Result<Compressed> {
        let e = self.entry(key)?;
        if let (Location::Packed(i), Some((p, range))) = (&e.at, &self.pack) {
            return p.stream(&self.storage[range.clone()], *i);
        }
        if e.dtype != Dtype::U8 || e.shape.len() != 1 {
            return Err(Error::Malformed(format!(
                "tensor {key:?} should hold a compressed stream (1-D U8) but is {} {:?}",
                dtype_name(e.dtype),
                e.shape
            )));
        }
        Compressed::from_bytes(self.tensor_bytes(key)?)
    }

    /// Parses the streams under `keys` in parallel. On an error the index into `keys` comes
    /// with it.
    pub fn streams(&self, keys: &[&str]) -> std::result::Result<Vec<Compressed>, (usize, Error)> {
        keys.par_iter()
            .enumerate()
            .map(|(i, k)| self.stream(k).map_err(|e| (i, e)))
            .collect()
    }
}

/// What one tensor of a new expert file holds.
pub enum Payload<'a> {
    /// A compressed stream, written into the file's stream pack.
    Stream(&'a Compressed),
    /// A tensor kept exactly: its dtype, shape and little-endian bytes.
    Raw {
        dtype: Dtype,
        shape: Vec<usize>,
        data: &'a [u8],
    },
}

struct RawView<'a> {
    dtype: Dtype,
    shape: Vec<usize>,
    data: &'a [u8],
}

impl View for RawView<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Serialises an expert file (version 3): the streams packed into one tensor under
/// [`PACK_KEY`], each raw tensor as itself.
pub fn serialize_expert(
    items: &[(String, Payload<'_>)],
    metadata: HashMap<String, String>,
) -> Result<Vec<u8>> {
    let packed: Vec<(&str, &Compressed)> = items
        .iter()
        .filter_map(|(name, p)| match p {
            Payload::Stream(c) => Some((name.as_str(), *c)),
            Payload::Raw { .. } => None,
        })
        .collect();
    let pack = if packed.is_empty() {
        None
    } else {
        Some(write_pack(&packed)?)
    };
    let mut views = Vec::with_capacity(items.len() + 1);
    if let Some(p) = &pack {
        views.push((
            PACK_KEY,
            RawView {
                dtype: Dtype::U8,
                shape: vec![p.len()],
                data: p,
            },
        ));
    }
    for (name, p) in items {
        let Payload::Raw { dtype, shape, data } = p else {
            continue;
        };
        if name == PACK_KEY {
            return Err(Error::InvalidArgument(format!(
                "{PACK_KEY:?} is reserved for the stream pack"
            )));
        }
        let numel = shape.iter().try_fold(1usize, |a, &s| a.checked_mul(s));
        let want = numel
            .and_then(|n| n.checked_mul(dtype.bitsize()))
            .map(|b| b / 8);
        if want != Some(data.len()) {
            return Err(Error::InvalidArgument(format!(
                "tensor {name:?}: {} bytes for a {} tensor of shape {shape:?}",
                data.len(),
                dtype_name(*dtype)
            )));
        }
        views.push((
            name.as_str(),
            RawView {
                dtype: *dtype,
                shape: shape.clone(),
                data,
            },
        ));
    }
    let bytes = safetensors::tensor::serialize(views, Some(metadata))
        .map_err(|e| Error::InvalidArgument(e.to_string()))?;
    Ok(canonical_header(bytes))
}

/// The file with its JSON header's keys in sorted order. safetensors writes the metadata map in
/// the iteration order of a `HashMap`, which is random per map, so one expert saved twice gave
/// two byte strings (and two content hashes). The same keys and values in another order have
/// the same length, so the header keeps its size and padding and every offset stays valid.
fn canonical_header(mut bytes: Vec<u8>) -> Vec<u8> {
    let Some(n) = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
    else {
        return bytes;
    };
    let Some(header) = bytes.get(8..8 + n) else {
        return bytes;
    };
    // serde_json's map is a BTreeMap: parsing sorts the keys.
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(header) else {
        return bytes;
    };
    let Ok(sorted) = serde_json::to_vec(&value) else {
        return bytes;
    };
    if sorted.len() <= n {
        // The rest of the header is the spaces safetensors pads it with.
        bytes[8..8 + sorted.len()].copy_from_slice(&sorted);
        bytes[8 + sorted.len()..8 + n].fill(b' ');
    }
    bytes
}
