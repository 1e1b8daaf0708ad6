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
    /// The stream declares more entries than the decode limit allows (see
    /// [`crate::set_max_numel`]): a guard against a few bytes asking for gigabytes.
    #[error("the stream declares {numel} entries, above the decode limit of {limit}; if it comes from a source you trust, raise the limit (compeft_rs.set_max_numel in Python, compeft::set_max_numel in Rust)")]
    LimitExceeded { numel: u64, limit: u64 },
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

/// A zeroed vector of `n` words, or `OutOfMemory` instead of aborting the process. The memory
/// comes zeroed from the allocator (calloc: fresh pages are not touched), so under overcommit a
/// large request fails here or costs only the pages later written, instead of being zero-filled
/// into an out-of-memory kill.
pub(crate) fn try_zeroed(n: usize) -> Result<Vec<u64>> {
    let oom = || Error::OutOfMemory {
        bytes: (n as u64).saturating_mul(8),
    };
    if n == 0 {
        return Ok(Vec::new());
    }
    let layout = std::alloc::Layout::array::<u64>(n).map_err(|_| oom())?;
    // SAFETY: layout has a nonzero size; a non-null pointer from alloc_zeroed with u64's layout
    // holds n initialized (all-zero) u64 values, and the Vec takes ownership with that layout.
    unsafe {
        let p = std::alloc::alloc_zeroed(layout) as *mut u64;
        if p.is_null() {
            return Err(oom());
        }
        Ok(Vec::from_raw_parts(p, n, n))
    }
}
