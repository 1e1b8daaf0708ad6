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
//! assert_eq!(c.nnz, 100);
//! let back = compeft::Compressed::from_bytes(&c.to_bytes()).unwrap();
//! assert_eq!(back, c);
//! ```

mod bits;
pub mod codec;
pub mod dtype;
pub mod error;
pub mod expert;
pub mod format;
pub mod golomb;
pub mod popcount;
pub mod selection;

#[cfg(feature = "python")]
mod python;

pub use codec::{decode_many, BitmaskBody, Body, Compressed, Encoding, GolombBody};
pub use dtype::{DType, Tensor, TensorMut};
pub use error::{Error, Result};
pub use popcount::{cosine, dot, hamming};
pub use selection::{select, KeySpace, Selector, Threshold};

use selection::check_alpha;

/// Compresses one tensor on its own (per-tensor scope): keeps floor(k*d + 0.5) entries of largest
/// magnitude (ties to the lower index, zeros never), with scale alpha * std(tensor).
pub fn compress(
    t: Tensor<'_>,
    shape: &[u64],
    k: f64,
    alpha: f64,
    encoding: Encoding,
) -> Result<Compressed> {
    check_alpha(alpha)?;
    codec::check_shape(shape, t.len() as u64)?;
    let (thr, sigma) = selection::select_one(t, k)?;
    let mut ties = thr.ties;
    codec::compress_with_threshold(t, shape, &thr, &mut ties, alpha * sigma, encoding)
}

/// Compresses many tensors, each on its own (per-tensor scope), in parallel across tensors: an
/// expert of hundreds of small tensors in one call. On an error the index of the tensor comes
/// with it.
pub fn compress_many(
    tensors: &[(Tensor<'_>, &[u64])],
    k: f64,
    alpha: f64,
    encoding: Encoding,
) -> std::result::Result<Vec<Compressed>, (Option<usize>, Error)> {
    use rayon::prelude::*;
    check_alpha(alpha).map_err(|e| (None, e))?;
    tensors
        .par_iter()
        .enumerate()
        .map(|(i, (t, shape))| compress(*t, shape, k, alpha, encoding).map_err(|e| (Some(i), e)))
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
            codec::compress_with_threshold(*t, shape, &thr, &mut ties, scale, encoding)
                .map_err(|e| (Some(i), e))
        })
        .collect()
}
