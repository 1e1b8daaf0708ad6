//! One error type for the whole crate. Every fallible path returns it; nothing panics on bad input.

use thiserror::Error;

/// What went wrong. Argument errors are the caller's to fix; the rest describe a stream that
/// cannot be trusted (corrupt, truncated, from a newer version, or too large to decode here).
#[derive(Debug, Clone, PartialEq, Error)]
pub enum Error {
    /// A bad argument (density, alpha, shape, dtype, encoding). The message says what to pass.
    #[error("{0}")]
    InvalidArgument(String),
    /// The input holds a NaN or an infinity; the index is the flat (row-major) position.
    #[error("input contains NaN or Inf at flat index {index}; clean the task vector (e.g. torch.nan_to_num) before compressing")]
    NonFinite { index: u64 },
    /// The byte string ends before a field it announces.
    #[error("truncated stream: it ends inside the {what}")]
    Truncated { what: &'static str },
    /// The byte string is not a compeft stream at all.
    #[error("not a compeft stream (bad magic bytes); expected it to start with b\"CPFT\"")]
    BadMagic,
    /// Written by a newer format version than this library reads.
    #[error("unsupported format version {0}; this library reads version 1, upgrade compeft-rs to read newer streams")]
    UnsupportedVersion(u8),
    /// The stored CRC32 does not match the bytes: they were altered after writing.
    #[error("checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): the stream is corrupt")]
    ChecksumMismatch { stored: u32, computed: u32 },
    /// A field or the payload is inconsistent with the rest of the stream.
    #[error("malformed stream: {0}")]
    Malformed(String),
    /// A size field is beyond what this library accepts.
    #[error("{what} is {value}, above the limit of {limit}")]
    TooLarge {
        what: &'static str,
        value: u64,
        limit: u64,
    },
    /// An allocation for the output could not be made.
    #[error("out of memory: could not allocate {bytes} bytes for the output")]
    OutOfMemory { bytes: u64 },
}

impl Error {
    /// True for errors caused by the caller's arguments rather than by stream contents.
    pub fn is_argument_error(&self) -> bool {
        matches!(self, Error::InvalidArgument(_) | Error::NonFinite { .. })
    }
}

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn malformed<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error::Malformed(msg.into()))
}

/// A zeroed vector of `n` items, or `OutOfMemory` instead of aborting the process.
pub(crate) fn try_zeroed<T: Clone + Default>(n: usize) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| Error::OutOfMemory {
        bytes: (n as u64).saturating_mul(std::mem::size_of::<T>() as u64),
    })?;
    v.resize(n, T::default());
    Ok(v)
}
