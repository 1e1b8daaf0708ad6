"""decode(encode(x)) against the numpy reference, over dtypes, shapes, k, alpha and encodings."""

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import compeft_rs
from reference import pattern_of, reference_sigma, reference_signs, target_count

NP_DTYPES = [np.float16, np.float32, np.float64]
TORCH_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]

shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=24)
densities = st.one_of(st.sampled_from([1.0, 0.5, 0.1, 0.05, 1e-3]), st.floats(1e-4, 1.0))
alphas = st.one_of(st.just(1.0), st.floats(0.01, 20.0))
encodings = st.sampled_from(["golomb", "bitmask"])


def elements(dtype):
    # Either continuous values or a few repeated magnitudes that force ties and zeros.
    width = np.dtype(dtype).itemsize * 8
    bound = {16: 1000.0, 32: 1e6, 64: 1e100}[width]
    cont = st.floats(-bound, bound, allow_nan=False, allow_infinity=False, width=width)
    ties = st.sampled_from([0.0, -0.0, 0.5, -0.5, 1.0, -1.0, 2.0])
    return st.one_of(cont, ties)


def sigma_tolerance(values_f64, alpha):
    """Absolute slack for sigma, scaled to the data: for a constant array the exact sigma is 0
    (which the library returns) while numpy's two-pass std leaves rounding noise of about
    1e-16 * max|x|."""
    return alpha * 1e-12 * float(np.max(np.abs(values_f64), initial=0.0))


def check(c, values_f64, k, alpha, out, out_dtype_np):
    """Compares a CompressedTensor and its decoded output with the reference."""
    signs = reference_signs(values_f64, k)
    assert np.array_equal(pattern_of(c), signs)
    assert c.nnz == int(np.count_nonzero(signs))
    assert c.nnz <= target_count(k, values_f64.size)
    if np.count_nonzero(values_f64) >= target_count(k, values_f64.size):
        assert c.nnz == target_count(k, values_f64.size)
    assert c.scale == pytest.approx(alpha * reference_sigma(values_f64), rel=1e-9, abs=sigma_tolerance(values_f64, alpha))
    # Decoded value: sign * scale rounded f64 -> f32 -> dtype (the cast torch performs).
    if out_dtype_np == np.float64:
        expected = signs * c.scale
    else:
        with np.errstate(over="ignore"):
            s = np.float32(c.scale).astype(out_dtype_np)
        expected = signs.astype(out_dtype_np) * s
    got = np.asarray(out).reshape(-1)
    assert np.array_equal(got, expected)


@given(data=st.data(), dtype=st.sampled_from(NP_DTYPES), shape=shapes, k=densities, alpha=alphas, enc=encodings)
def test_numpy_roundtrip(data, dtype, shape, k, alpha, enc):
    x = data.draw(hnp.arrays(dtype, shape, elements=elements(dtype)))
    v = x.astype(np.float64).reshape(-1)
    assume(np.isfinite(reference_sigma(v) * alpha))
    c = compeft_rs.encode(x, k, alpha, encoding=enc)
    assert c.shape == x.shape and c.encoding == enc and c.dtype == x.dtype
    out = c.decode()
    assert isinstance(out, np.ndarray) and out.shape == x.shape and out.dtype == x.dtype
    check(c, v, k, alpha, out, dtype)
    # Serialisation keeps everything, and both routes of decode agree.
    back = compeft_rs.CompressedTensor.from_bytes(c.to_bytes(), framework="np")
    assert back == c and len(c.to_bytes()) == c.nbytes
    assert np.array_equal(compeft_rs.decode(c), out)
    assert np.array_equal(back.decode(), out)


@given(data=st.data(), dtype=st.sampled_from(TORCH_DTYPES), shape=shapes, k=densities, enc=encodings)
def test_torch_roundtrip(data, dtype, shape, k, enc):
    # Values that every dtype can hold.
    base = data.draw(hnp.arrays(np.float32, shape, elements=elements(np.float16)))
    x = torch.from_numpy(base).to(dtype)
    v = x.to(torch.float64).numpy().reshape(-1)
    c = compeft_rs.encode(x, k, encoding=enc)
    out = c.decode()
    assert isinstance(out, torch.Tensor) and out.dtype == dtype and tuple(out.shape) == tuple(x.shape)
    signs = reference_signs(v, k)
    assert np.array_equal(pattern_of(c), signs)
    assert c.scale == pytest.approx(reference_sigma(v), rel=1e-9, abs=sigma_tolerance(v, 1.0))
    # torch's own cast of the scale gives the same value bits.
    s = torch.tensor(c.scale, dtype=torch.float64).to(dtype)
    expected = torch.from_numpy(signs.astype(np.float64)).to(dtype) * s
    assert torch.equal(out.reshape(-1), expected)
    # Decoding to another dtype.
    out32 = c.decode(dtype=torch.float32)
    assert out32.dtype == torch.float32
    assert torch.equal(out32.reshape(-1), torch.from_numpy(signs.astype(np.float32)) * np.float32(c.scale))


def test_bytes_default_kind_is_torch_when_imported():
    c = compeft_rs.encode(np.arange(10, dtype=np.float32), 0.3)
    out = compeft_rs.decode(c.to_bytes())
    assert isinstance(out, torch.Tensor)
    assert isinstance(compeft_rs.decode(bytearray(c.to_bytes()), dtype="float64"), torch.Tensor)


def test_empty_and_zero_d():
    for x in (np.zeros((0, 4), np.float32), torch.zeros(3, 0, dtype=torch.bfloat16)):
        c = compeft_rs.encode(x, 0.1)
        assert c.numel == 0 and c.nnz == 0 and c.density == 0.0
        assert tuple(c.decode().shape) == tuple(x.shape)
    c = compeft_rs.encode(np.float32(-2.5), 0.1)
    assert c.shape == () and c.nnz == 1
    assert c.decode().item() == -2.5  # d = 1: sigma = |x|


def test_all_zero_input_keeps_nothing():
    c = compeft_rs.encode(np.zeros(100, np.float32), 0.5)
    assert c.nnz == 0 and c.scale == 0.0
    assert not c.decode().any()


def test_non_contiguous_and_strided_inputs():
    x = torch.randn(40, 30)
    t = x.t()  # non-contiguous view
    c = compeft_rs.encode(t, 0.2)
    assert np.array_equal(pattern_of(c), reference_signs(t.contiguous().numpy().astype(np.float64), 0.2))
    a = np.random.default_rng(0).standard_normal((50, 50))[::2, ::3]
    c = compeft_rs.encode(a, 0.2)
    assert np.array_equal(pattern_of(c), reference_signs(a.astype(np.float64), 0.2))


def test_big_endian_numpy_input():
    a = np.random.default_rng(1).standard_normal(300).astype(">f4")
    c = compeft_rs.encode(a, 0.1)
    assert np.array_equal(pattern_of(c), reference_signs(a.astype(np.float64), 0.1))


def test_contiguous_cpu_input_is_not_copied(monkeypatch):
    # The flat array handed to Rust shares memory with the caller's tensor.
    from compeft_rs import _arrays

    x = torch.randn(1000, dtype=torch.bfloat16)
    arr, *_ = _arrays.flat_input(x)
    assert arr.ctypes.data == x.data_ptr()
    a = np.ones(100, np.float32)
    arr, *_ = _arrays.flat_input(a)
    assert arr.ctypes.data == a.ctypes.data


def test_requires_grad_tensor():
    x = torch.randn(100, requires_grad=True)
    assert compeft_rs.encode(x, 0.1).nnz == 10


def test_pickle_roundtrip():
    import pickle

    c = compeft_rs.encode(torch.randn(64, 8), 0.1)
    d = pickle.loads(pickle.dumps(c))
    assert d == c and torch.equal(d.decode(), c.decode())


def test_constant_float64_input_sigma_is_exactly_zero():
    # The input hypothesis once found: numpy's std leaves ~1e-20 of rounding, the exact sigma is 0.
    x = np.full(21, 0.0001)
    c = compeft_rs.encode(x, 0.5)
    assert c.scale == 0.0
    check(c, x, 0.5, 1.0, c.decode(), np.float64)
