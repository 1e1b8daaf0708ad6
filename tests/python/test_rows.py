"""The row-coded golomb layout (docs/FORMAT.md, encoding 2) against numpy: the kept pattern is the
reference top-k, the bytes read back by a reader written from the spec (reference.read_row_coded),
and every layout of a tensor decodes to the same values."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import compeft_rs
from reference import pattern_of, read_row_coded, reference_signs, reference_sigma

# Rows of very different densities, many of them empty, as in a fine-tune's embeddings.
ROW_SCALES = [0.0, 0.0, 0.01, 1.0, 30.0]


@st.composite
def row_tensors(draw):
    rows = draw(st.integers(0, 40))
    cols = draw(st.integers(1, 70))
    lead = draw(st.sampled_from([(), (2,)])) if rows % 2 == 0 and rows else ()
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    scales = rng.choice(ROW_SCALES, size=(rows, 1))
    x = (rng.standard_normal((rows, cols)) * scales).astype(np.float32)
    if lead:
        x = x.reshape(lead + (rows // lead[0], cols))
    return x


def check_layout(c, x, k):
    """c encodes x at k: the reference pattern, decoded values sign * scale."""
    values = x.astype(np.float64).reshape(-1)
    want = reference_signs(values, k)
    assert np.array_equal(pattern_of(c), want)
    dense = c.decode(dtype=np.float64).reshape(-1)
    assert np.array_equal(dense, want * c.scale)
    again = compeft_rs.CompressedTensor.from_bytes(c.to_bytes(), framework="np")
    assert again.to_bytes() == c.to_bytes() and again.row_length == c.row_length


@given(x=row_tensors(), k=st.sampled_from([1.0, 0.5, 0.1, 0.03, 1e-3]))
def test_row_layout_round_trips_against_numpy(x, k):
    c = compeft_rs.encode(x, k)
    assert c.scale == pytest.approx(reference_sigma(x), rel=1e-12, abs=0.0)
    check_layout(c, x, k)
    plain = c.to_golomb(layout="plain")
    rows = c.to_golomb(layout="rows")
    assert plain.row_length is None and plain.rice_param is not None
    assert rows.row_length == x.shape[-1] and rows.rice_param is None
    for s in (plain, rows, c.to_bitmask()):
        check_layout(s, x, k)
    # The spec's reader sees the same pattern and the counts of numpy's rows.
    want = reference_signs(x.astype(np.float64).reshape(-1), k)
    got, cols, counts = read_row_coded(rows.to_bytes())
    assert np.array_equal(got, want)
    assert np.array_equal(counts, (want.reshape(-1, cols) != 0).sum(axis=1))
    # The encoder keeps the smaller layout (rows only for two or more dimensions and rows), and
    # every path to golomb gives its bytes.
    if x.shape[-1] < x.size and c.nnz:
        assert c.nbytes == min(plain.nbytes, rows.nbytes)
        assert c.row_length == (x.shape[-1] if rows.nbytes < plain.nbytes else None)
    else:
        assert c.to_bytes() == plain.to_bytes()
    for s in (plain, rows, c.to_bitmask()):
        assert s.to_golomb().to_bytes() == c.to_bytes()


@pytest.mark.parametrize(
    "shape,kept_rows",
    [((0, 5), []), ((6, 9), []), ((1, 300), [0]), ((300, 1), [3, 4, 200]), ((50, 64), [7]),
     ((3, 4, 64), [0, 11])],
    ids=["no-rows", "all-empty", "one-row", "one-column", "one-nonempty-row", "3-d"],
)
def test_row_layout_edges(shape, kept_rows):
    x = np.zeros(shape, np.float32)
    flat = x.reshape(-1, shape[-1])
    for r in kept_rows:
        flat[r] = np.linspace(-1.0, 1.0, shape[-1]) + 0.01
    rows = compeft_rs.encode(x, 0.1).to_golomb(layout="rows")
    check_layout(rows, x, 0.1)
    if x.size:
        got, _, counts = read_row_coded(rows.to_bytes())
        assert np.array_equal(got, pattern_of(rows))
        assert set(np.flatnonzero(counts)) <= set(kept_rows)


def test_rows_of_no_entries_cannot_be_coded_by_rows():
    c = compeft_rs.encode(np.zeros((3, 0), np.float32), 0.1)
    with pytest.raises(ValueError, match="no rows of 0 entries"):
        c.to_golomb(layout="rows")
    assert c.to_golomb().to_bytes() == c.to_bytes()
    with pytest.raises(ValueError, match="layout"):
        c.to_golomb(layout="columns")


def test_untouched_rows_make_the_encoder_code_by_rows():
    """A residual whose rows are mostly untouched (an embedding fine-tuned on a small vocabulary)
    is stored by rows, well below one Rice parameter over the tensor, and decodes the same."""
    rng = np.random.default_rng(0)
    x = np.zeros((3000, 384), np.float32)
    touched = rng.choice(3000, 600, replace=False)
    x[touched] = rng.standard_normal((600, 384)) * rng.uniform(0.2, 3.0, (600, 1))
    c = compeft_rs.encode(torch.from_numpy(x), 0.1)
    plain = c.to_golomb(layout="plain")
    assert c.row_length == 384
    assert c.nbytes < 0.85 * plain.nbytes
    want = reference_signs(x.reshape(-1), 0.1).reshape(x.shape)
    assert torch.equal(c.decode(), torch.from_numpy(want * np.float32(c.scale)))
    assert np.array_equal(read_row_coded(c.to_bytes())[0], reference_signs(x.reshape(-1), 0.1))


def test_row_coded_experts_decode_merge_and_read_like_plain(tmp_path):
    """Whole-expert paths over row-coded streams: the file, decode, task arithmetic and TIES give
    what the plain layout of the same streams gives."""
    rng = np.random.default_rng(1)
    tensors = {}
    for i in range(3):
        x = np.zeros((500, 96), np.float32)
        x[rng.choice(500, 80, replace=False)] = rng.standard_normal((80, 96))
        tensors[f"layer.{i}.weight"] = torch.from_numpy(x)
    experts = [compeft_rs.compress_expert({n: t * (1 + j) + 0.001 * j for n, t in tensors.items()}, 0.1, scope="per_tensor")
               for j in range(2)]
    assert all(experts[0].stream(n).row_length == 96 for n in tensors)
    path = tmp_path / "e.safetensors"
    experts[0].save(path)
    loaded = compeft_rs.load_expert(path)
    for n in tensors:
        s = loaded.stream(n)
        assert s.row_length == 96
        want = reference_signs(tensors[n].numpy().reshape(-1), 0.1).reshape(500, 96)
        assert torch.equal(s.decode(), torch.from_numpy(want * np.float32(s.scale)))
    # Merging on the streams equals peft's merge_utils on the ternary tensors built by the numpy
    # reference (signs of the top-k) and each stream's scale.
    from peft.utils import merge_utils

    w = torch.tensor([1.0, 0.5])
    ta = compeft_rs.merge(experts, method="task_arithmetic", weights=[1.0, 0.5])
    ties = compeft_rs.merge(experts, method="ties", weights=[1.0, 0.5])
    for n in tensors:
        dense = []
        for j, e in enumerate(experts):
            x = (tensors[n] * (1 + j) + 0.001 * j).numpy().reshape(-1)
            want = reference_signs(x, 0.1).reshape(500, 96) * np.float32(e.stream(n).scale)
            dense.append(torch.from_numpy(want.astype(np.float32)))
        torch.testing.assert_close(ta[n], merge_utils.task_arithmetic(dense, w), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(ties[n], merge_utils.ties(dense, w, density=1.0), rtol=1e-6, atol=1e-7)
