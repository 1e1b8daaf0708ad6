//! Whole experts: one safetensors file whose 1-D `U8` tensors are compressed streams and whose
//! other tensors are kept exactly (docs/FORMAT.md, "The expert file").
//!
//! The file is opened once and memory-mapped (or held in memory), its header is parsed and checked
//! by the safetensors crate, and a whole-expert decode parses every stream and decodes all of them
//! in one parallel pass ([`crate::codec::decode_many`]).

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use rayon::prelude::*;
use safetensors::tensor::{Dtype, SafeTensors, View};

use crate::codec::Compressed;
use crate::error::{Error, Result};

/// The bytes of an expert file: mapped from disk or owned.
enum Storage {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Storage {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Storage::Mapped(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// One tensor of the file: its safetensors dtype, shape and absolute byte range.
#[derive(Clone, Debug)]
pub struct Entry {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub start: usize,
    pub end: usize,
}

/// A parsed expert file. The header is checked once (offsets contiguous, inside the data,
/// consistent with dtypes and shapes); streams are parsed when they are asked for.
pub struct ExpertFile {
    storage: Storage,
    entries: HashMap<String, Entry>,
    metadata: HashMap<String, String>,
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
    /// Maps the file at `path`. I/O errors come back as they are, for the caller to report.
    pub fn open(path: &Path) -> std::io::Result<Result<ExpertFile>> {
        let f = std::fs::File::open(path)?;
        if f.metadata()?.len() == 0 {
            return Ok(Err(bad_file("the file is empty")));
        }
        // SAFETY: the map is read-only; a file changed by another process while mapped can
        // give wrong bytes, which every stream's checksum and every length check then reject.
        let map = unsafe { memmap2::Mmap::map(&f)? };
        Ok(Self::parse(Storage::Mapped(map)))
    }

    /// Takes bytes already in memory.
    pub fn from_vec(data: Vec<u8>) -> Result<ExpertFile> {
        Self::parse(Storage::Owned(data))
    }

    fn parse(storage: Storage) -> Result<ExpertFile> {
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
                    start,
                    end,
                },
            );
        }
        let metadata = md.metadata().clone().unwrap_or_default();
        Ok(ExpertFile {
            storage,
            entries,
            metadata,
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

    /// The raw bytes of tensor `key`.
    pub fn tensor_bytes(&self, key: &str) -> Result<&[u8]> {
        let e = self.entry(key)?;
        self.storage
            .get(e.start..e.end)
            .ok_or_else(|| bad_file(format!("tensor {key:?} points past the data")))
    }

    /// Parses the compressed stream stored under `key` (a 1-D U8 tensor).
    pub fn stream(&self, key: &str) -> Result<Compressed> {
        let e = self.entry(key)?;
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
    /// A compressed stream, serialised only when it is written.
    Stream(&'a Compressed),
    /// A tensor kept exactly: its dtype, shape and little-endian bytes.
    Raw {
        dtype: Dtype,
        shape: Vec<usize>,
        data: &'a [u8],
    },
}

struct PayloadView<'a> {
    payload: &'a Payload<'a>,
    shape: Vec<usize>,
}

impl View for PayloadView<'_> {
    fn dtype(&self) -> Dtype {
        match self.payload {
            Payload::Stream(_) => Dtype::U8,
            Payload::Raw { dtype, .. } => *dtype,
        }
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        match self.payload {
            Payload::Stream(c) => Cow::Owned(c.to_bytes()),
            Payload::Raw { data, .. } => Cow::Borrowed(data),
        }
    }
    fn data_len(&self) -> usize {
        match self.payload {
            Payload::Stream(c) => c.nbytes(),
            Payload::Raw { data, .. } => data.len(),
        }
    }
}

/// Serialises an expert file: each stream is turned into bytes as it is written, so the peak
/// is the output plus one stream.
pub fn serialize_expert(
    items: &[(String, Payload<'_>)],
    metadata: HashMap<String, String>,
) -> Result<Vec<u8>> {
    let mut views = Vec::with_capacity(items.len());
    for (name, p) in items {
        let shape = match p {
            Payload::Stream(c) => vec![c.nbytes()],
            Payload::Raw {
                dtype, shape, data, ..
            } => {
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
                shape.clone()
            }
        };
        views.push((name.as_str(), PayloadView { payload: p, shape }));
    }
    safetensors::tensor::serialize(views, Some(metadata))
        .map_err(|e| Error::InvalidArgument(e.to_string()))
}
