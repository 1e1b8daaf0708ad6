//! PyO3 bindings: the extension module `compeft_rs._core`. The Python package wraps it; users
//! never import it directly. Long work runs with the GIL released (`py.detach`).

use numpy::{
    BorrowError, Element, IntoPyArray, PyArray1, PyArrayDyn, PyArrayMethods, PyReadonlyArray1,
    PyReadwriteArray, PyReadwriteArrayDyn,
};
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyMemoryError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyTuple};
use std::collections::HashMap;
use std::path::PathBuf;

use crate::codec::{Body, Compressed, Encoding};
use crate::dtype::{DType, Tensor, TensorMut};
use crate::error::Error;
use crate::expert::{
    dtype_name, parse_dtype as parse_st_dtype, serialize_expert, ExpertFile, Payload,
};
use crate::golomb::{entropy_bound_bits, expected_bits_per_nonzero, rice_parameter};
use crate::selection::{KeySpace, Selector, Threshold};
use crate::Scale;

create_exception!(
    _core,
    CompeftError,
    PyException,
    "A compressed stream is corrupt, truncated, of an unknown version, or too large to decode."
);

create_exception!(
    _core,
    DecodeLimitError,
    CompeftError,
    "A stream declares more entries than compeft_rs.get_max_numel() allows."
);

/// The Python exception for an error: ValueError for the caller's arguments, MemoryError,
/// DecodeLimitError, CompeftError for untrusted bytes.
fn py_error(e: &Error, msg: String) -> PyErr {
    match e {
        Error::OutOfMemory { .. } => PyMemoryError::new_err(msg),
        Error::LimitExceeded { .. } => DecodeLimitError::new_err(msg),
        _ if e.is_argument_error() => PyValueError::new_err(msg),
        _ => CompeftError::new_err(msg),
    }
}

fn to_py(e: Error) -> PyErr {
    py_error(&e, e.to_string())
}

/// A 1-D contiguous input array: u16 holds float16 or bfloat16 bits (told apart by the dtype name).
#[derive(FromPyObject)]
enum InArray<'py> {
    U16(PyReadonlyArray1<'py, u16>),
    F32(PyReadonlyArray1<'py, f32>),
    F64(PyReadonlyArray1<'py, f64>),
}

/// An output array of any shape, C-contiguous (u16 holds float16 or bfloat16 bits). Taken
/// unborrowed: [`writable`] borrows it, with an error instead of rust-numpy's panic for an array
/// that is read-only or already borrowed.
#[derive(FromPyObject)]
enum OutArray<'py> {
    U16(Bound<'py, PyArrayDyn<u16>>),
    F32(Bound<'py, PyArrayDyn<f32>>),
    F64(Bound<'py, PyArrayDyn<f64>>),
}

/// An [`OutArray`] borrowed for writing.
enum OutBorrow<'py> {
    U16(PyReadwriteArrayDyn<'py, u16>),
    F32(PyReadwriteArrayDyn<'py, f32>),
    F64(PyReadwriteArrayDyn<'py, f64>),
}

fn not_contiguous(_: impl std::fmt::Debug) -> PyErr {
    PyValueError::new_err("array must be C-contiguous")
}

/// Borrows an output array for writing. rust-numpy's `readwrite()` panics (a PanicException,
/// not an Exception) for a read-only array or one already borrowed in this call (the same array,
/// or a view of its memory, passed twice); these are errors in the caller's arguments.
fn writable<'py, T: Element, D: numpy::ndarray::Dimension>(
    a: &Bound<'py, numpy::PyArray<T, D>>,
    what: &str,
) -> PyResult<PyReadwriteArray<'py, T, D>> {
    a.try_readwrite().map_err(|e| match e {
        BorrowError::NotWriteable => PyValueError::new_err(format!(
            "{what} is read-only; pass a writeable array (for example a copy: np.array(out))"
        )),
        _ => PyValueError::new_err(format!(
            "{what} shares memory with another array of this call (the same array, or a view \
             of it, passed twice); pass a separate array for each output"
        )),
    })
}

fn borrow_out<'py>(o: &OutArray<'py>, what: &str) -> PyResult<OutBorrow<'py>> {
    Ok(match o {
        OutArray::U16(a) => OutBorrow::U16(writable(a, what)?),
        OutArray::F32(a) => OutBorrow::F32(writable(a, what)?),
        OutArray::F64(a) => OutBorrow::F64(writable(a, what)?),
    })
}

fn tensor_of<'a>(a: &'a InArray<'_>, dtype: DType) -> PyResult<Tensor<'a>> {
    Ok(match (a, dtype) {
        (InArray::U16(x), DType::F16) => Tensor::F16(x.as_slice().map_err(not_contiguous)?),
        (InArray::U16(x), DType::BF16) => Tensor::BF16(x.as_slice().map_err(not_contiguous)?),
        (InArray::F32(x), DType::F32) => Tensor::F32(x.as_slice().map_err(not_contiguous)?),
        (InArray::F64(x), DType::F64) => Tensor::F64(x.as_slice().map_err(not_contiguous)?),
        _ => {
            return Err(PyValueError::new_err(format!(
                "array element type does not match dtype {}",
                dtype.name()
            )))
        }
    })
}

fn tensor_mut<'a>(o: &'a mut OutBorrow<'_>, dtype: DType) -> PyResult<TensorMut<'a>> {
    Ok(match (o, dtype) {
        (OutBorrow::U16(x), DType::F16) => {
            TensorMut::F16(x.as_slice_mut().map_err(not_contiguous)?)
        }
        (OutBorrow::U16(x), DType::BF16) => {
            TensorMut::BF16(x.as_slice_mut().map_err(not_contiguous)?)
        }
        (OutBorrow::F32(x), DType::F32) => {
            TensorMut::F32(x.as_slice_mut().map_err(not_contiguous)?)
        }
        (OutBorrow::F64(x), DType::F64) => {
            TensorMut::F64(x.as_slice_mut().map_err(not_contiguous)?)
        }
        _ => {
            return Err(PyValueError::new_err(format!(
                "output array element type does not match dtype {}",
                dtype.name()
            )))
        }
    })
}

/// An error about one of several named tensors: the name leads the message.
fn named_error(names: &[String], (i, e): (Option<usize>, Error)) -> PyErr {
    match i.and_then(|i| names.get(i)) {
        Some(n) => py_error(&e, format!("tensor '{n}': {e}")),
        None => to_py(e),
    }
}

fn parse_dtype(name: &str) -> PyResult<DType> {
    DType::from_name(name).map_err(to_py)
}

fn parse_scale(name: &str) -> PyResult<Scale> {
    match name {
        "std" => Ok(Scale::Std),
        "mean" => Ok(Scale::KeptMean),
        "norm" => Ok(Scale::Norm),
        "proj" => Ok(Scale::Proj),
        _ => Err(PyValueError::new_err(format!(
            "unknown scale rule {name:?}; use \"std\" (alpha * std, the paper's), \"mean\" \
             (mean |x| of the kept entries), \"norm\" (||x|| / sqrt(nnz)) or \"proj\" \
             (||x||^2 / sum of the kept |x|)"
        ))),
    }
}

fn parse_encoding(name: &str) -> PyResult<Encoding> {
    Encoding::from_name(name).map_err(to_py)
}

/// The positive and negative masks of a stream, as uint64 words.
type MaskArrays<'py> = (Bound<'py, PyArray1<u64>>, Bound<'py, PyArray1<u64>>);

/// One compressed tensor (the Rust side of `compeft_rs.CompressedTensor`).
#[pyclass(module = "compeft_rs._core", name = "Stream", frozen)]
pub struct PyStream {
    inner: Compressed,
}

#[pymethods]
impl PyStream {
    /// Parses and checks a byte string; raises CompeftError if it is not a valid stream.
    #[staticmethod]
    fn from_bytes(py: Python<'_>, data: &[u8]) -> PyResult<PyStream> {
        let inner = py.detach(|| Compressed::from_bytes(data)).map_err(to_py)?;
        Ok(PyStream { inner })
    }

    fn to_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        let v = py.detach(|| self.inner.to_bytes());
        PyBytes::new(py, &v)
    }

    #[getter]
    fn dtype(&self) -> &'static str {
        self.inner.dtype.name()
    }

    #[getter]
    fn shape<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, self.inner.shape.iter().copied())
    }

    #[getter]
    fn numel(&self) -> u64 {
        self.inner.numel
    }

    #[getter]
    fn nnz(&self) -> u64 {
        self.inner.nnz
    }

    #[getter]
    fn scale(&self) -> f64 {
        self.inner.scale
    }

    #[getter]
    fn encoding(&self) -> &'static str {
        self.inner.encoding().name()
    }

    #[getter]
    fn nbytes(&self) -> usize {
        self.inner.nbytes()
    }

    /// The Rice parameter b of a plain golomb stream, None for a bitmask or a row-coded one
    /// (each row has its own).
    #[getter]
    fn rice_param(&self) -> Option<u8> {
        match &self.inner.body {
            Body::Golomb(g) if g.rows.is_none() => Some(g.rice_b),
            _ => None,
        }
    }

    /// Entries per row of a row-coded golomb stream, None otherwise.
    #[getter]
    fn row_length(&self) -> Option<u64> {
        match &self.inner.body {
            Body::Golomb(g) => g.rows.as_ref().map(|r| r.cols),
            Body::Bitmask(_) => None,
        }
    }

    /// Decodes into `out`, a contiguous 1-D array of numel entries (uint16 holds the bits of
    /// float16/bfloat16, named by `dtype`).
    fn decode_into(&self, py: Python<'_>, out: OutArray<'_>, dtype: &str) -> PyResult<()> {
        let mut out = borrow_out(&out, "the output array")?;
        let t = tensor_mut(&mut out, parse_dtype(dtype)?)?;
        let c = &self.inner;
        py.detach(|| c.decode_into(t)).map_err(to_py)
    }

    /// The same stream with another scale (finite and >= 0): every kept entry decodes to
    /// sign * scale.
    fn with_scale(&self, py: Python<'_>, scale: f64) -> PyResult<PyStream> {
        let inner = py.detach(|| self.inner.with_scale(scale)).map_err(to_py)?;
        Ok(PyStream { inner })
    }

    fn to_bitmask(&self, py: Python<'_>) -> PyResult<PyStream> {
        let inner = py.detach(|| self.inner.to_bitmask()).map_err(to_py)?;
        Ok(PyStream { inner })
    }

    /// The same ternary vector in the golomb encoding: "auto" the smaller layout (as the
    /// encoder chooses), "plain" one Rice parameter over the tensor, "rows" coded by rows of the
    /// last dimension.
    #[pyo3(signature = (layout = "auto"))]
    fn to_golomb(&self, py: Python<'_>, layout: &str) -> PyResult<PyStream> {
        let c = &self.inner;
        let inner = match layout {
            "auto" => py.detach(|| c.to_golomb()),
            "plain" => py.detach(|| c.to_plain_golomb()),
            "rows" => py.detach(|| c.to_row_golomb()),
            _ => {
                return Err(PyValueError::new_err(format!(
                    "layout must be \"auto\", \"plain\" or \"rows\", got {layout:?}"
                )))
            }
        }
        .map_err(to_py)?;
        Ok(PyStream { inner })
    }

    /// The positive and negative bitmasks as uint64 words (bit i of word w is entry 64*w + i).
    fn masks<'py>(&self, py: Python<'py>) -> PyResult<MaskArrays<'py>> {
        let m = py
            .detach(|| self.inner.masks().map(|m| m.into_owned()))
            .map_err(to_py)?;
        Ok((m.pos.into_pyarray(py), m.neg.into_pyarray(py)))
    }

    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        other
            .cast::<PyStream>()
            .map(|o| o.get().inner == self.inner)
            .unwrap_or(false)
    }
}

/// Streaming global selection over tensors that are fed one at a time, level after level (for
/// checkpoints that never sit in memory at once). Feed the same tensors in the same order on
/// every level until `finish_level()` returns True.
#[pyclass(module = "compeft_rs._core", name = "Selector")]
pub struct PySelector {
    inner: Selector,
}

#[pymethods]
impl PySelector {
    #[new]
    fn new(dtypes: Vec<String>, d: u64, k: f64) -> PyResult<PySelector> {
        let dts = dtypes
            .iter()
            .map(|s| parse_dtype(s))
            .collect::<PyResult<Vec<_>>>()?;
        let inner = Selector::new(KeySpace::for_dtypes(dts), d, k).map_err(to_py)?;
        Ok(PySelector { inner })
    }

    fn feed(&mut self, py: Python<'_>, data: InArray<'_>, dtype: &str) -> PyResult<()> {
        let t = tensor_of(&data, parse_dtype(dtype)?)?;
        let inner = &mut self.inner;
        py.detach(|| inner.feed(t)).map_err(to_py)
    }

    /// A selector for density `k` sharing the first-level histogram fed so far.
    fn with_density(&self, k: f64) -> PyResult<PySelector> {
        Ok(PySelector {
            inner: self.inner.with_density(k).map_err(to_py)?,
        })
    }

    fn finish_level(&mut self) -> PyResult<bool> {
        self.inner.finish_level().map_err(to_py)
    }

    #[getter]
    fn done(&self) -> bool {
        self.inner.is_done()
    }

    /// The unbiased std of everything fed on the first level.
    #[getter]
    fn sigma(&self) -> f64 {
        self.inner.sigma()
    }

    /// L2 norm of everything fed in the first level.
    #[getter]
    fn norm(&self) -> f64 {
        self.inner.spread().norm
    }

    /// How many entries are kept in all.
    #[getter]
    fn target(&self) -> u64 {
        self.inner.target()
    }

    fn threshold(&self) -> PyResult<PyThreshold> {
        self.inner
            .threshold()
            .map(|t| PyThreshold { inner: t })
            .ok_or_else(|| {
                PyValueError::new_err(
                    "the selection is not finished; feed every tensor and call finish_level()",
                )
            })
    }
}

/// The outcome of a Selector, passed to `encode_with_threshold`.
#[pyclass(module = "compeft_rs._core", name = "Threshold", frozen)]
pub struct PyThreshold {
    inner: Threshold,
}

#[pymethods]
impl PyThreshold {
    /// Entries equal to the threshold that are kept (in feed order).
    #[getter]
    fn ties(&self) -> u64 {
        self.inner.ties
    }
}

/// Compresses one tensor with a threshold from a Selector. `ties_left` starts at
/// `threshold.ties`; pass the returned value to the next tensor, in feed order.
#[pyfunction]
#[pyo3(signature = (data, dtype, shape, threshold, ties_left, scale, encoding))]
#[allow(clippy::too_many_arguments)]
fn encode_with_threshold(
    py: Python<'_>,
    data: InArray<'_>,
    dtype: &str,
    shape: Vec<u64>,
    threshold: &PyThreshold,
    ties_left: u64,
    scale: f64,
    encoding: &str,
) -> PyResult<(PyStream, u64)> {
    let (dtype, encoding) = (parse_dtype(dtype)?, parse_encoding(encoding)?);
    let t = tensor_of(&data, dtype)?;
    let mut ties = ties_left;
    let thr = threshold.inner;
    let inner = py
        .detach(|| {
            crate::encode::compress_with_threshold(t, &shape, &thr, &mut ties, scale, encoding)
        })
        .map_err(to_py)?;
    Ok((PyStream { inner }, ties))
}

/// Sum of |x| over the entries of `data` that `threshold` keeps, `ties_taken` of its tied
/// entries among them (as `encode_with_threshold` took them).
#[pyfunction]
fn kept_abs_sum(
    py: Python<'_>,
    data: InArray<'_>,
    dtype: &str,
    threshold: &PyThreshold,
    ties_taken: u64,
) -> PyResult<f64> {
    let t = tensor_of(&data, parse_dtype(dtype)?)?;
    let thr = threshold.inner;
    py.detach(|| crate::kept_abs_sum(t, &thr, ties_taken))
        .map_err(to_py)
}

/// Compresses one tensor (per-tensor scope).
#[pyfunction]
#[pyo3(signature = (data, dtype, shape, k, alpha, encoding, scale="std"))]
#[allow(clippy::too_many_arguments)]
fn encode(
    py: Python<'_>,
    data: InArray<'_>,
    dtype: &str,
    shape: Vec<u64>,
    k: f64,
    alpha: f64,
    encoding: &str,
    scale: &str,
) -> PyResult<PyStream> {
    let (dtype, encoding, scale) = (
        parse_dtype(dtype)?,
        parse_encoding(encoding)?,
        parse_scale(scale)?,
    );
    let t = tensor_of(&data, dtype)?;
    let inner = py
        .detach(|| crate::compress_scaled(t, &shape, k, alpha, scale, encoding))
        .map_err(to_py)?;
    Ok(PyStream { inner })
}

/// Compresses many tensors, each on its own (per-tensor scope), in one call: parallel across
/// tensors, the GIL released once. `items` holds (name, data, dtype, shape).
#[pyfunction]
#[pyo3(signature = (items, k, alpha, encoding, scale="std"))]
fn encode_many(
    py: Python<'_>,
    items: Vec<(String, InArray<'_>, String, Vec<u64>)>,
    k: f64,
    alpha: f64,
    encoding: &str,
    scale: &str,
) -> PyResult<Vec<PyStream>> {
    let (encoding, scale) = (parse_encoding(encoding)?, parse_scale(scale)?);
    let mut tensors = Vec::with_capacity(items.len());
    for (_, a, dt, _) in &items {
        tensors.push(tensor_of(a, parse_dtype(dt)?)?);
    }
    let pairs: Vec<(Tensor<'_>, &[u64])> = tensors
        .iter()
        .zip(&items)
        .map(|(t, it)| (*t, it.3.as_slice()))
        .collect();
    let names: Vec<String> = items.iter().map(|it| it.0.clone()).collect();
    let out = py
        .detach(|| crate::compress_many(&pairs, k, alpha, scale, encoding))
        .map_err(|e| named_error(&names, e))?;
    Ok(out.into_iter().map(|inner| PyStream { inner }).collect())
}

/// Decodes many streams into their outputs in one parallel pass (GIL released once). `names`
/// label errors; `dtypes` name each output's type.
#[pyfunction]
fn decode_streams(
    py: Python<'_>,
    streams: Vec<Bound<'_, PyStream>>,
    names: Vec<String>,
    outs: Vec<OutArray<'_>>,
    dtypes: Vec<String>,
) -> PyResult<()> {
    if streams.len() != outs.len() || streams.len() != dtypes.len() || streams.len() != names.len()
    {
        return Err(PyValueError::new_err(
            "streams, names, outputs and dtypes differ in length",
        ));
    }
    let mut borrows = Vec::with_capacity(outs.len());
    for (o, n) in outs.iter().zip(&names) {
        borrows.push(borrow_out(o, &format!("the output for tensor '{n}'"))?);
    }
    let mut views = Vec::with_capacity(outs.len());
    for (o, d) in borrows.iter_mut().zip(&dtypes) {
        views.push(tensor_mut(o, parse_dtype(d)?)?);
    }
    let jobs: Vec<(&Compressed, TensorMut<'_>)> =
        streams.iter().map(|s| &s.get().inner).zip(views).collect();
    py.detach(|| crate::decode_many(jobs))
        .map_err(|(i, e)| named_error(&names, (Some(i), e)))
}

/// One LoRA pair for [`pair_norms`]: A's data, dtype and (rows, cols), B's the same, then the
/// streams compressed from A and from B.
type PairItem<'py> = (
    InArray<'py>,
    String,
    (usize, usize),
    InArray<'py>,
    String,
    (usize, usize),
    Bound<'py, PyStream>,
    Bound<'py, PyStream>,
);

/// One LoRA pair's factors: A's data, dtype and (rows, cols), then B's the same.
type FactorItem<'py> = (
    InArray<'py>,
    String,
    (usize, usize),
    InArray<'py>,
    String,
    (usize, usize),
);

/// Checks that there is one name per pair.
fn one_name_each(pairs: usize, names: &[String]) -> PyResult<()> {
    if names.len() != pairs {
        return Err(PyValueError::new_err(format!(
            "{pairs} pairs but {} names; pass one name per pair",
            names.len()
        )));
    }
    Ok(())
}

/// One factor of pair `n` (`which`: "A" or "B") as a view of its array.
fn factor_of<'a>(
    py: Python<'_>,
    (x, dtype, (rows, cols)): (&'a InArray<'_>, &str, (usize, usize)),
    n: &str,
    which: &str,
) -> PyResult<crate::pair::Factor<'a>> {
    let label = |e: PyErr| PyValueError::new_err(format!("pair '{n}', {which}: {}", e.value(py)));
    let data = tensor_of(x, parse_dtype(dtype).map_err(label)?).map_err(label)?;
    Ok(crate::pair::Factor { data, rows, cols })
}

/// The factors (A, B) of one item of [`FactorItem`]'s layout (the first six fields of a
/// [`PairItem`] too); `n` labels errors.
fn factors_of<'a>(
    py: Python<'_>,
    a: (&'a InArray<'_>, &str, (usize, usize)),
    b: (&'a InArray<'_>, &str, (usize, usize)),
    n: &str,
) -> PyResult<(crate::pair::Factor<'a>, crate::pair::Factor<'a>)> {
    Ok((factor_of(py, a, n, "A")?, factor_of(py, b, n, "B")?))
}

/// The pairs of `items` as [`crate::pair::Pair`]s, views of the arrays and streams they hold;
/// `names` label errors (one per pair).
fn pairs_of<'a>(
    py: Python<'_>,
    items: &'a [PairItem<'_>],
    names: &[String],
) -> PyResult<Vec<crate::pair::Pair<'a>>> {
    one_name_each(items.len(), names)?;
    let mut pairs = Vec::with_capacity(items.len());
    for (it, n) in items.iter().zip(names) {
        let (a, b) = factors_of(py, (&it.0, &it.1, it.2), (&it.3, &it.4, it.5), n)?;
        pairs.push(crate::pair::Pair {
            a,
            b,
            signs_a: &it.6.get().inner,
            signs_b: &it.7.get().inner,
        });
    }
    Ok(pairs)
}

/// A per-pair error from the parallel pass, labelled with the pair's name.
fn pair_error(names: &[String], (i, e): (usize, Error)) -> PyErr {
    let n = names.get(i).map_or("?", String::as_str);
    py_error(&e, format!("pair '{n}': {e}"))
}

/// ||BA||^2 of LoRA pairs (A: r x n, B: m x r), from the dense factors and from the kept signs
/// of their streams, as (dense, signs) per pair: through r x r Gram matrices, in one parallel
/// pass with the GIL released. `names` label errors (one per pair).
#[pyfunction]
fn pair_norms(
    py: Python<'_>,
    items: Vec<PairItem<'_>>,
    names: Vec<String>,
) -> PyResult<Vec<(f64, f64)>> {
    let pairs = pairs_of(py, &items, &names)?;
    let out = py
        .detach(|| crate::pair::pair_norms_many(&pairs))
        .map_err(|e| pair_error(&names, e))?;
    Ok(out.into_iter().map(|p| (p.dense, p.signs)).collect())
}

/// ||BA||^2 of LoRA pairs from the factors alone (`pair_norms`'s dense values, the same
/// numbers, without the sign Grams), in one parallel pass with the GIL released. Items and
/// names as for [`pair_norms`].
#[pyfunction]
fn pair_dense_norms(
    py: Python<'_>,
    items: Vec<PairItem<'_>>,
    names: Vec<String>,
) -> PyResult<Vec<f64>> {
    let pairs = pairs_of(py, &items, &names)?;
    py.detach(|| crate::pair::pair_dense_norms_many(&pairs))
        .map_err(|e| pair_error(&names, e))
}

/// <S_B S_A, B A> of LoRA pairs (the kept signs' product against the factors' product, for the
/// pair_proj rule), through r x r cross-Grams over the kept entries, in one parallel pass with
/// the GIL released. Items and names as for [`pair_norms`].
#[pyfunction]
fn pair_cross(py: Python<'_>, items: Vec<PairItem<'_>>, names: Vec<String>) -> PyResult<Vec<f64>> {
    let pairs = pairs_of(py, &items, &names)?;
    py.detach(|| crate::pair::pair_cross_many(&pairs))
        .map_err(|e| pair_error(&names, e))
}

/// The r x r Grams (A A^T, B^T B) of LoRA pairs, for the balanced gauge, in one parallel pass
/// with the GIL released: one flat float64 array, each pair's A A^T then its B^T B (r x r,
/// row-major), pair after pair. `names` label errors (one per pair).
#[pyfunction]
fn gauge_grams<'py>(
    py: Python<'py>,
    items: Vec<FactorItem<'_>>,
    names: Vec<String>,
) -> PyResult<Bound<'py, PyArray1<f64>>> {
    one_name_each(items.len(), &names)?;
    let mut pairs = Vec::with_capacity(items.len());
    for (it, n) in items.iter().zip(&names) {
        pairs.push(factors_of(
            py,
            (&it.0, &it.1, it.2),
            (&it.3, &it.4, it.5),
            n,
        )?);
    }
    let grams = py
        .detach(|| crate::gauge::grams_many(&pairs))
        .map_err(|e| pair_error(&names, e))?;
    let flat: Vec<f64> = grams
        .into_iter()
        .flat_map(|(ga, gb)| ga.into_iter().chain(gb))
        .collect();
    Ok(flat.into_pyarray(py))
}

/// Rewrites LoRA pairs into a gauge: A' = T_A A and B' = B T_B into `outs` (one (A', B') per
/// pair, of the factors' sizes and dtypes), in one parallel pass with the GIL released.
/// `transforms` holds each pair's T_A then T_B (r x r, row-major), pair after pair. Returns,
/// per pair, whether every output entry is finite (if not, keep the pair as it was).
#[pyfunction]
fn gauge_apply(
    py: Python<'_>,
    items: Vec<FactorItem<'_>>,
    transforms: PyReadonlyArray1<'_, f64>,
    outs: Vec<(OutArray<'_>, OutArray<'_>)>,
    names: Vec<String>,
) -> PyResult<Vec<bool>> {
    one_name_each(items.len(), &names)?;
    if outs.len() != items.len() {
        return Err(PyValueError::new_err(format!(
            "{} pairs but {} outputs; pass one (A', B') per pair",
            items.len(),
            outs.len()
        )));
    }
    let t = transforms.as_slice().map_err(not_contiguous)?;
    let mut borrows = Vec::with_capacity(outs.len());
    for ((oa, ob), n) in outs.iter().zip(&names) {
        borrows.push((
            borrow_out(oa, &format!("the output for A of pair '{n}'"))?,
            borrow_out(ob, &format!("the output for B of pair '{n}'"))?,
        ));
    }
    let mut jobs = Vec::with_capacity(items.len());
    let mut at = 0usize;
    for ((it, (oa, ob)), n) in items.iter().zip(borrows.iter_mut()).zip(&names) {
        let (a, b) = factors_of(py, (&it.0, &it.1, it.2), (&it.3, &it.4, it.5), n)?;
        let rr = a.rows.saturating_mul(a.rows);
        let end = at
            .checked_add(rr.saturating_mul(2))
            .filter(|&e| e <= t.len())
            .ok_or_else(|| {
                PyValueError::new_err(format!(
                    "transforms end before pair '{n}'; pass T_A and T_B (r x r each) for every pair"
                ))
            })?;
        let (ta, tb) = t[at..end].split_at(rr);
        at = end;
        let label = |e: PyErr| PyValueError::new_err(format!("pair '{n}': {}", e.value(py)));
        jobs.push(crate::gauge::Job {
            a,
            b,
            ta,
            tb,
            out_a: tensor_mut(oa, a.data.dtype()).map_err(label)?,
            out_b: tensor_mut(ob, b.data.dtype()).map_err(label)?,
        });
    }
    if at != t.len() {
        return Err(PyValueError::new_err(format!(
            "transforms hold {} entries but the pairs take {at}; pass T_A and T_B (r x r each) \
             for every pair",
            t.len()
        )));
    }
    py.detach(|| crate::gauge::apply_many(jobs))
        .map_err(|e| pair_error(&names, e))
}

/// An expert file, read into memory: its safetensors header parsed and checked once.
#[pyclass(module = "compeft_rs._core", name = "ExpertFile", frozen)]
pub struct PyExpertFile {
    inner: ExpertFile,
}

#[pymethods]
impl PyExpertFile {
    /// Reads the file at `path` (OSError if it cannot be read, CompeftError if it is not a
    /// readable safetensors file).
    #[staticmethod]
    fn open(py: Python<'_>, path: PathBuf) -> PyResult<PyExpertFile> {
        let inner = py.detach(|| ExpertFile::open(&path))?.map_err(to_py)?;
        Ok(PyExpertFile { inner })
    }

    /// Parses bytes (copied once).
    #[staticmethod]
    fn from_bytes(py: Python<'_>, data: &[u8]) -> PyResult<PyExpertFile> {
        let v = data.to_vec();
        let inner = py.detach(|| ExpertFile::from_vec(v)).map_err(to_py)?;
        Ok(PyExpertFile { inner })
    }

    /// Builds a new expert file in memory from compressed streams, tensors kept exactly as
    /// (key, safetensors dtype, shape, uint8 bytes), and the `__metadata__` strings.
    #[staticmethod]
    fn build(
        py: Python<'_>,
        streams: Vec<(String, Bound<'_, PyStream>)>,
        raws: Vec<(String, String, Vec<usize>, PyReadonlyArray1<'_, u8>)>,
        metadata: HashMap<String, String>,
    ) -> PyResult<PyExpertFile> {
        let mut items: Vec<(String, Payload<'_>)> = Vec::with_capacity(streams.len() + raws.len());
        for (k, s) in &streams {
            items.push((k.clone(), Payload::Stream(&s.get().inner)));
        }
        for (k, dt, shape, data) in &raws {
            items.push((
                k.clone(),
                Payload::Raw {
                    dtype: parse_st_dtype(dt).map_err(to_py)?,
                    shape: shape.clone(),
                    data: data.as_slice().map_err(not_contiguous)?,
                },
            ));
        }
        let inner = py
            .detach(|| serialize_expert(&items, metadata).and_then(ExpertFile::from_vec))
            .map_err(to_py)?;
        Ok(PyExpertFile { inner })
    }

    /// Size of the file in bytes.
    #[getter]
    fn nbytes(&self) -> usize {
        self.inner.bytes().len()
    }

    /// The `__metadata__` strings.
    fn metadata<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (k, v) in self.inner.metadata() {
            d.set_item(k, v)?;
        }
        Ok(d)
    }

    /// key -> (safetensors dtype, shape, nbytes) for every tensor of the file.
    fn entries<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (k, e) in self.inner.entries() {
            let shape = PyTuple::new(py, e.shape.iter().copied())?;
            d.set_item(k, (dtype_name(e.dtype), shape, e.nbytes))?;
        }
        Ok(d)
    }

    /// The compressed stream under `key`.
    fn stream(&self, py: Python<'_>, key: &str) -> PyResult<PyStream> {
        let inner = py.detach(|| self.inner.stream(key)).map_err(to_py)?;
        Ok(PyStream { inner })
    }

    /// Copies the bytes of tensor `key` into `out` (a uint8 array of exactly that size).
    fn read_raw(&self, py: Python<'_>, key: &str, out: Bound<'_, PyArray1<u8>>) -> PyResult<()> {
        let src = self.inner.tensor_bytes(key).map_err(to_py)?;
        let mut out = writable(&out, "the output array")?;
        let dst = out.as_slice_mut().map_err(not_contiguous)?;
        if dst.len() != src.len() {
            return Err(PyValueError::new_err(format!(
                "output holds {} bytes, tensor {key:?} {}",
                dst.len(),
                src.len()
            )));
        }
        py.detach(|| dst.copy_from_slice(src));
        Ok(())
    }

    /// Parses the streams under `keys` in one parallel pass, the GIL released once.
    fn streams(&self, py: Python<'_>, keys: Vec<String>) -> PyResult<Vec<PyStream>> {
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let inner = &self.inner;
        let parsed = py
            .detach(|| inner.streams(&refs))
            .map_err(|(i, e)| named_error(&keys, (Some(i), e)))?;
        Ok(parsed.into_iter().map(|inner| PyStream { inner }).collect())
    }

    /// Writes the file's bytes to `path` (the caller syncs and renames it).
    fn write_to(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        let data = self.inner.bytes();
        py.detach(|| std::fs::write(&path, data))?;
        Ok(())
    }

    fn to_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.inner.bytes())
    }
}

#[pyfunction]
fn dot(py: Python<'_>, a: &PyStream, b: &PyStream) -> PyResult<f64> {
    py.detach(|| crate::dot(&a.inner, &b.inner)).map_err(to_py)
}

#[pyfunction]
fn cosine(py: Python<'_>, a: &PyStream, b: &PyStream) -> PyResult<f64> {
    py.detach(|| crate::cosine(&a.inner, &b.inner))
        .map_err(to_py)
}

#[pyfunction]
fn hamming(py: Python<'_>, a: &PyStream, b: &PyStream) -> PyResult<u64> {
    py.detach(|| crate::hamming(&a.inner, &b.inner))
        .map_err(to_py)
}

/// Merges tensor by tensor (`groups[t]`: tensor t of every expert) into float32 outputs, in one
/// parallel pass with the GIL released; `names` label errors.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (groups, names, weights, outs, method, election, convention, density, lam))]
fn merge_streams(
    py: Python<'_>,
    groups: Vec<Vec<Bound<'_, PyStream>>>,
    names: Vec<String>,
    weights: Vec<f64>,
    outs: Vec<Bound<'_, PyArrayDyn<f32>>>,
    method: &str,
    election: &str,
    convention: &str,
    density: Option<f64>,
    lam: f64,
) -> PyResult<()> {
    use crate::merge::{Convention, Election, MergeSpec, Method};
    let method = match method {
        "ties" => Method::Ties,
        "task_arithmetic" => Method::TaskArithmetic,
        m => return Err(PyValueError::new_err(format!("unknown merge method {m:?}"))),
    };
    let election = match election {
        "total" => Election::Total,
        "frequency" => Election::Frequency,
        m => {
            return Err(PyValueError::new_err(format!(
                "unknown majority_sign {m:?}"
            )))
        }
    };
    let convention = match convention {
        "peft" => Convention::Peft,
        "mergekit" => Convention::Mergekit,
        m => return Err(PyValueError::new_err(format!("unknown convention {m:?}"))),
    };
    if groups.len() != outs.len() || groups.len() != names.len() {
        return Err(PyValueError::new_err(
            "groups, names and outputs differ in length",
        ));
    }
    let spec = MergeSpec {
        method,
        election,
        convention,
        density,
        lam,
    };
    let refs: Vec<Vec<&Compressed>> = groups
        .iter()
        .map(|g| g.iter().map(|s| &s.get().inner).collect())
        .collect();
    let mut borrows = Vec::with_capacity(outs.len());
    for (o, n) in outs.iter().zip(&names) {
        borrows.push(writable(o, &format!("the output for tensor '{n}'"))?);
    }
    let mut views = Vec::with_capacity(outs.len());
    for o in borrows.iter_mut() {
        views.push(o.as_slice_mut().map_err(not_contiguous)?);
    }
    py.detach(|| crate::merge::merge_many(&refs, &weights, &spec, views))
        .map_err(|(i, e)| named_error(&names, (Some(i), e)))
}

/// The N x N cosine matrix (row-major, float64) of experts given as lists of streams.
#[pyfunction]
fn similarity<'py>(
    py: Python<'py>,
    experts: Vec<Vec<Bound<'py, PyStream>>>,
) -> PyResult<Bound<'py, PyArray1<f64>>> {
    let refs: Vec<Vec<&Compressed>> = experts
        .iter()
        .map(|e| e.iter().map(|s| &s.get().inner).collect())
        .collect();
    let m = py
        .detach(|| crate::merge::similarity(&refs))
        .map_err(to_py)?;
    Ok(m.into_pyarray(py))
}

/// b* for nnz nonzeros among d entries.
#[pyfunction(name = "rice_parameter")]
fn py_rice_parameter(nnz: u64, d: u64) -> u8 {
    rice_parameter(nnz, d)
}

/// Expected golomb payload bits (gaps and signs) for nnz independent positions among d.
#[pyfunction]
fn expected_golomb_bits(nnz: u64, d: u64) -> f64 {
    if nnz == 0 || d == 0 {
        return 0.0;
    }
    nnz as f64 * expected_bits_per_nonzero(nnz as f64 / d as f64, rice_parameter(nnz, d))
}

/// The entropy bound in bits of a ternary vector of d entries at density k.
#[pyfunction(name = "entropy_bound_bits")]
fn py_entropy_bound_bits(d: u64, k: f64) -> f64 {
    entropy_bound_bits(d, k)
}

/// The largest number of entries a parsed stream may declare (default 2^32).
#[pyfunction]
fn get_max_numel() -> u64 {
    crate::max_numel()
}

/// Sets the limit of get_max_numel() for this process and returns the previous one.
#[pyfunction]
fn set_max_numel(n: u64) -> PyResult<u64> {
    crate::set_max_numel(n).map_err(to_py)
}

/// The popcount kernel picked for this CPU ("avx2", "popcnt" or "scalar").
#[pyfunction]
fn popcount_kernel() -> &'static str {
    match crate::popcount::best_kernel() {
        crate::popcount::Kernel::Avx2 => "avx2",
        crate::popcount::Kernel::Popcnt => "popcnt",
        crate::popcount::Kernel::Scalar => "scalar",
    }
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyStream>()?;
    m.add_class::<PySelector>()?;
    m.add_class::<PyThreshold>()?;
    m.add_function(wrap_pyfunction!(encode_with_threshold, m)?)?;
    m.add("CompeftError", m.py().get_type::<CompeftError>())?;
    m.add("DecodeLimitError", m.py().get_type::<DecodeLimitError>())?;
    m.add_function(wrap_pyfunction!(get_max_numel, m)?)?;
    m.add_function(wrap_pyfunction!(set_max_numel, m)?)?;
    m.add("FORMAT_VERSION", crate::format::VERSION)?;
    m.add_function(wrap_pyfunction!(encode, m)?)?;
    m.add_function(wrap_pyfunction!(encode_many, m)?)?;
    m.add_function(wrap_pyfunction!(kept_abs_sum, m)?)?;
    m.add_function(wrap_pyfunction!(decode_streams, m)?)?;
    m.add_function(wrap_pyfunction!(pair_norms, m)?)?;
    m.add_function(wrap_pyfunction!(pair_dense_norms, m)?)?;
    m.add_function(wrap_pyfunction!(pair_cross, m)?)?;
    m.add_function(wrap_pyfunction!(gauge_grams, m)?)?;
    m.add_function(wrap_pyfunction!(gauge_apply, m)?)?;
    m.add_class::<PyExpertFile>()?;
    m.add_function(wrap_pyfunction!(dot, m)?)?;
    m.add_function(wrap_pyfunction!(cosine, m)?)?;
    m.add_function(wrap_pyfunction!(hamming, m)?)?;
    m.add_function(wrap_pyfunction!(merge_streams, m)?)?;
    m.add_function(wrap_pyfunction!(similarity, m)?)?;
    m.add_function(wrap_pyfunction!(py_rice_parameter, m)?)?;
    m.add_function(wrap_pyfunction!(expected_golomb_bits, m)?)?;
    m.add_function(wrap_pyfunction!(py_entropy_bound_bits, m)?)?;
    m.add_function(wrap_pyfunction!(popcount_kernel, m)?)?;
    Ok(())
}
