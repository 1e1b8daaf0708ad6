//! compeft: the ComPEFT codec (Yadav et al., arXiv 2311.13171).
//!
//! A task vector tau = theta_ft - theta_init is compressed to the signs of its top-k fraction of
//! entries by magnitude and one scale alpha * std(tau). The ternary vector is stored either as
//! Rice-coded gaps plus sign bits ([`Encoding::Golomb`], for storage and transfer) or as two
//! bitmasks ([`Encoding::Bitmask`], for popcount arithmetic). See docs/FORMAT.md for the bytes.
//!
//! ```
//! use compeft::{compress, Encoding, Tensor};
//! let tau: Vec<f32> = (0..1000).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
//! let c = compress(Tensor::F32(&tau), &[10, 100], 0.1, 1.0, Encoding::Golomb).unwrap();
//! assert_eq!(c.nnz(), 100);
//! let back = compeft::Compressed::from_bytes(&c.to_bytes()).unwrap();
//! assert_eq!(back, c);
//! ```

mod bits;
pub mod codec;
mod convert;
mod decode;
pub mod dtype;
mod encode;
pub mod error;
pub mod expert;
pub mod format;
pub mod gauge;
pub mod golomb;
pub mod merge;
pub mod pack;
pub mod pair;
pub mod popcount;
mod rows;
pub mod selection;
mod unpack;

#[cfg(feature = "python")]
mod python;

pub use codec::{BitmaskBody, Body, Compressed, Encoding, GolombBody, RowCoding};
pub use decode::decode_many;
pub use dtype::{DType, Tensor, TensorMut};
pub use encode::kept_abs_sum;
pub use error::{Error, Result};
pub use merge::{merge_into, merge_many, similarity, Convention, Election, MergeSpec, Method};
pub use pair::{
    pair_cross, pair_cross_many, pair_dense_norm, pair_dense_norms_many, pair_norms,
    pair_norms_many, PairNorms,
};
pub use popcount::{cosine, dot, hamming};
pub use selection::{select, KeySpace, Selector, Threshold};

use selection::check_alpha;

/// Default of [`max_numel`]: 2^32 entries (16 GiB decoded as float32), above any single tensor
/// of today's models.
pub const DEFAULT_MAX_NUMEL: u64 = 1 << 32;

static MAX_NUMEL_PARSED: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(DEFAULT_MAX_NUMEL);

/// The largest number of entries a parsed stream may declare (process-wide). A stream of a few
/// dozen bytes can declare 2^48 zeros; parsing refuses it with [`Error::LimitExceeded`] before
/// anything is allocated for it.
pub fn max_numel() -> u64 {
    MAX_NUMEL_PARSED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Sets [`max_numel`] (at most the format's 2^48) and returns the previous value.
pub fn set_max_numel(n: u64) -> Result<u64> {
    if n > codec::MAX_NUMEL {
        return Err(Error::InvalidArgument(format!(
            "max_numel {n} is above the format's limit of 2^48"
        )));
    }
    Ok(MAX_NUMEL_PARSED.swap(n, std::sync::atomic::Ordering::Relaxed))
}

/// How the one magnitude of a stream is chosen; the stored scale always means "every kept entry
/// decodes to sign * scale".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scale {
    /// alpha * std(tensor), unbiased: the paper's rule.
    Std,
    /// alpha * mean |x| over the kept entries: for alpha = 1 the scale closest to the kept
    /// entries in L2 for their sign pattern.
    KeptMean,
    /// alpha * ||x||_2 / sqrt(nnz): for alpha = 1 the decoded tensor has the L2 norm of the
    /// input.
    Norm,
    /// alpha * ||x||^2 / sum |x| over the kept entries: for alpha = 1 the decoded tensor's
    /// projection on the input is the input (<decoded, x> = ||x||^2).
    Proj,
}

/// Compresses one tensor on its own (per-tensor scope): keeps floor(k*d + 0.5) entries of largest
/// magnitude (ties to the lower index, zeros never), with scale alpha * std(tensor).
pub fn compress(
    t: Tensor<'_>,
    shape: &[u64],
    k: f64,
    alpha: f64,
    encoding: Encoding,
) -> Result<Compressed> {
    compress_scaled(t, shape, k, alpha, Scale::Std, encoding)
}

/// [`compress`] with the scale chosen by `scale`.
pub fn compress_scaled(
    t: Tensor<'_>,
    shape: &[u64],
    k: f64,
    alpha: f64,
    scale: Scale,
    encoding: Encoding,
) -> Result<Compressed> {
    check_alpha(alpha)?;
    codec::check_shape(shape, t.len() as u64)?;
    let (thr, spread) = selection::select_one(t, k)?;
    let mut ties = thr.ties;
    if scale == Scale::Std {
        let s = alpha * spread.sigma;
        return encode::compress_with_threshold(t, shape, &thr, &mut ties, s, encoding);
    }
    // The kept magnitudes' sum comes with the encoding pass where it can (golomb), else from
    // one more pass.
    let summed = matches!(scale, Scale::KeptMean | Scale::Proj);
    let (mut c, sum) = encode::compress_summed(t, shape, &thr, &mut ties, 0.0, encoding, summed)?;
    if c.nnz > 0 {
        let kept = || match sum {
            Some(s) => Ok(s),
            None => encode::kept_abs_sum(t, &thr, thr.ties - ties),
        };
        let per_entry = match scale {
            Scale::KeptMean => kept()? / c.nnz as f64,
            Scale::Norm => spread.norm / (c.nnz as f64).sqrt(),
            _ => spread.norm * spread.norm / kept()?,
        };
        c.scale = alpha * per_entry;
        if !c.scale.is_finite() {
            return Err(Error::InvalidArgument(format!(
                "alpha {alpha} times the {scale:?} scale overflows; use a smaller alpha"
            )));
        }
    }
    Ok(c)
}

/// Compresses many tensors, each on its own (per-tensor scope), in parallel across tensors: an
/// expert of hundreds of small tensors in one call. On an error the index of the tensor comes
/// with it.
pub fn compress_many(
    tensors: &[(Tensor<'_>, &[u64])],
    k: f64,
    alpha: f64,
    scale: Scale,
    encoding: Encoding,
) -> std::result::Result<Vec<Compressed>, (Option<usize>, Error)> {
    use rayon::prelude::*;
    check_alpha(alpha).map_err(|e| (None, e))?;
    tensors
        .par_iter()
        .enumerate()
        .map(|(i, (t, shape))| {
            compress_scaled(*t, shape, k, alpha, scale, encoding).map_err(|e| (Some(i), e))
        })
        .collect()
}

/// Compresses several tensors with one threshold and one sigma over all of them together (global
/// scope), in the order given (which also orders ties). On a NaN or Inf the error carries the
/// index of the offending tensor: `(tensor_index, error)`.
pub fn compress_global(
    tensors: &[(Tensor<'_>, &[u64])],
    k: f64,
    alpha: f64,
    encoding: Encoding,
) -> std::result::Result<Vec<Compressed>, (Option<usize>, Error)> {
    check_alpha(alpha).map_err(|e| (None, e))?;
    for (i, (t, shape)) in tensors.iter().enumerate() {
        codec::check_shape(shape, t.len() as u64).map_err(|e| (Some(i), e))?;
    }
    let space = KeySpace::for_dtypes(tensors.iter().map(|(t, _)| t.dtype()));
    let d = tensors.iter().map(|(t, _)| t.len() as u64).sum();
    let mut s = Selector::new(space, d, k).map_err(|e| (None, e))?;
    loop {
        for (i, (t, _)) in tensors.iter().enumerate() {
            s.feed(*t).map_err(|e| (Some(i), e))?;
        }
        if s.finish_level().map_err(|e| (None, e))? {
            break;
        }
    }
    let thr = s.threshold().expect("finished selector has a threshold");
    let scale = alpha * s.sigma();
    let mut ties = thr.ties;
    tensors
        .iter()
        .enumerate()
        .map(|(i, (t, shape))| {
            encode::compress_with_threshold(*t, shape, &thr, &mut ties, scale, encoding)
                .map_err(|e| (Some(i), e))
        })
        .collect()
}
