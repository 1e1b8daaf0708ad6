"""The balanced gauge of LoRA pairs (compeft_rs._gauge, compress_expert(gauge=...)): the stored
factors change, the adapter does not. Checked against the SVD of the dense product in numpy."""

import doctest
import json

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import compeft_rs
from compeft_rs import _gauge
from compeft_rs._gauge import balance, balance_pair


def factors(seed, r, m, n, scale_a, scale_b, dead):
    """A (r x n) and B (m x r) in float64; ``dead`` columns of B zero (a rank-deficient pair)."""
    g = np.random.default_rng(seed)
    a = g.standard_normal((r, n)) * scale_a
    b = g.standard_normal((m, r)) * scale_b
    b[:, :min(dead, r - 1)] = 0.0  # at least one live column: B A = 0 has its own test
    return a, b


def reference_singular_values(a, b):
    """The r singular values of the dense product (zeros past min(m, n))."""
    s = np.linalg.svd(b @ a, compute_uv=False)
    r = a.shape[0]
    return np.pad(s, (0, max(0, r - s.size)))[:r]


pairs = st.tuples(
    st.integers(0, 2**32 - 1),
    st.integers(1, 8),
    st.integers(1, 64),
    st.integers(1, 64),
    st.sampled_from([1e-3, 0.02, 1.0, 30.0]),
    st.sampled_from([1e-4, 0.01, 1.0]),
    st.integers(0, 3),
)


@given(pairs)
def test_balanced_float64_keeps_the_product_and_balances_the_grams(p):
    a, b = factors(*p)
    a2, b2 = balance_pair(a, b)
    assert a2.shape == a.shape and b2.shape == b.shape and a2.dtype == b2.dtype == np.float64
    prod = b @ a
    s = reference_singular_values(a, b)
    tol = 1e-10 * s[0]
    np.testing.assert_allclose(b2 @ a2, prod, rtol=1e-10, atol=tol)
    # Equal Grams, both the diagonal of the product's singular values.
    np.testing.assert_allclose(a2 @ a2.T, np.diag(s), rtol=1e-10, atol=tol)
    np.testing.assert_allclose(b2.T @ b2, np.diag(s), rtol=1e-10, atol=tol)


@pytest.mark.parametrize("dtype,unit", [(torch.float16, 2.0**-11), (torch.bfloat16, 2.0**-8)])
@given(p=pairs)
def test_balanced_half_factors_keep_the_product_within_their_rounding(dtype, unit, p):
    seed, r, m, n, _, _, dead = p
    a64, b64 = factors(seed, r, m, n, 0.02, 0.01, dead)  # trained-LoRA magnitudes, no subnormals
    A, B = torch.from_numpy(a64).to(dtype), torch.from_numpy(b64).to(dtype)
    A2, B2 = balance_pair(A, B)
    assert (A2.dtype, B2.dtype, A2.shape, B2.shape) == (dtype, dtype, A.shape, B.shape)
    a, b = A.double().numpy(), B.double().numpy()
    a2, b2 = A2.double().numpy(), B2.double().numpy()
    # Each balanced entry is rounded once to the half type (relative error <= unit, plus half
    # the subnormal spacing below the normal range), so each product entry moves by at most about
    # 2 * unit * (|B'| |A'|) and the subnormal terms from the exact B A.
    tiny = torch.finfo(dtype).smallest_normal * unit
    bound = (2.5 * unit * (np.abs(b2) @ np.abs(a2))
             + tiny * (np.abs(b2).sum(1, keepdims=True) + np.abs(a2).sum(0, keepdims=True)) + 1e-300)
    assert np.all(np.abs(b2 @ a2 - b @ a) <= bound)


def test_zero_b_as_freshly_initialised_is_left_unchanged():
    a = torch.randn(4, 32)
    b = torch.zeros(16, 4)
    a2, b2 = balance_pair(a, b)
    assert a2 is a and b2 is b
    a2, b2 = balance_pair(b.T.contiguous(), a.T.contiguous())  # A = 0 too
    assert torch.equal(a2, b.T) and torch.equal(b2, a.T)


def test_rank_one_pair():
    a = np.array([[3.0, 4.0]])      # 1 x 2, norm 5
    b = np.array([[0.0], [2.0]])    # 2 x 1, norm 2: S = 10
    a2, b2 = balance_pair(a, b)
    np.testing.assert_allclose(b2 @ a2, b @ a, rtol=1e-12)
    np.testing.assert_allclose(a2 @ a2.T, [[10.0]], rtol=1e-12)
    np.testing.assert_allclose(b2.T @ b2, [[10.0]], rtol=1e-12)


def test_other_shapes_are_left_as_they_are():
    conv_a, conv_b = torch.randn(4, 3, 3, 3), torch.randn(8, 4, 1, 1)
    assert balance_pair(conv_a, conv_b) == (conv_a, conv_b)
    a, b = torch.randn(4, 10), torch.randn(10, 3)  # ranks differ
    assert balance_pair(a, b) == (a, b)
    nan_a = torch.full((2, 5), float("nan"))
    assert balance_pair(nan_a, torch.randn(5, 2))[0] is nan_a


def test_balance_rewrites_lora_pairs_only_and_keeps_types_and_devices():
    g = torch.Generator().manual_seed(0)
    sd = {
        "m.q.lora_A.weight": torch.randn(4, 24, generator=g),
        "m.q.lora_B.weight": torch.randn(24, 4, generator=g) * 0.01,
        "m.e.lora_embedding_A": torch.randn(4, 50, generator=g, dtype=torch.float64),
        "m.e.lora_embedding_B": torch.randn(16, 4, generator=g, dtype=torch.float64),
        "m.lone.lora_A.weight": torch.randn(4, 24, generator=g),  # no partner
        "m.classifier.weight": torch.randn(3, 24, generator=g),
        "np.lora_A.weight": np.ones((2, 6), np.float32),
        "np.lora_B.weight": np.arange(8, dtype=np.float32).reshape(4, 2),
    }
    out = balance(sd)
    assert set(out) == set(sd)
    for n in ("m.lone.lora_A.weight", "m.classifier.weight"):
        assert out[n] is sd[n]
    for a, b in (("m.q.lora_A.weight", "m.q.lora_B.weight"), ("m.e.lora_embedding_A", "m.e.lora_embedding_B")):
        assert not torch.equal(out[a], sd[a])
        assert out[a].dtype == sd[a].dtype and out[a].device == sd[a].device
        torch.testing.assert_close(out[b] @ out[a], sd[b] @ sd[a], rtol=1e-5, atol=1e-6)
    assert isinstance(out["np.lora_A.weight"], np.ndarray) and out["np.lora_A.weight"].dtype == np.float32
    np.testing.assert_allclose(out["np.lora_B.weight"] @ out["np.lora_A.weight"],
                               sd["np.lora_B.weight"] @ sd["np.lora_A.weight"], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_factors_on_a_gpu_come_back_on_it():
    a, b = torch.randn(4, 32, device="cuda"), torch.randn(16, 4, device="cuda")
    a2, b2 = balance_pair(a, b)
    assert a2.device == a.device and b2.device == b.device
    torch.testing.assert_close(b2 @ a2, b @ a, rtol=1e-4, atol=1e-5)


def test_docstring_examples():
    result = doctest.testmod(_gauge)
    assert result.attempted > 0 and result.failed == 0


# -- compression ---------------------------------------------------------------------------

def lora_sd(seed=0, dtype=torch.float32):
    """Factors shaped like a trained LoRA: A near its Kaiming-uniform init, B small."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for mod, (d_out, d_in) in {"q": (48, 40), "v": (48, 40), "o": (40, 48)}.items():
        bound = 1 / np.sqrt(d_in)
        sd[f"m.{mod}.lora_A.weight"] = ((torch.rand(8, d_in, generator=g) * 2 - 1) * bound).to(dtype)
        sd[f"m.{mod}.lora_B.weight"] = (torch.randn(d_out, 8, generator=g) * 0.01).to(dtype)
    return sd


@pytest.mark.parametrize("scale,scope", [("pair", "per_tensor"), ("std", "global"), ("norm", "per_tensor"),
                                         ("pair_proj", "per_tensor")])
def test_balanced_compression_is_the_compression_of_the_balanced_factors(scale, scope):
    sd = lora_sd()
    e = compeft_rs.compress_expert(sd, 0.1, scale=scale, scope=scope, gauge="balanced")
    ref = compeft_rs.compress_expert(balance(sd), 0.1, scale=scale, scope=scope, gauge="as_trained")
    assert e.gauge == "balanced" and ref.gauge == "as_trained"
    got, want = e.decode(), ref.decode()
    assert set(got) == set(sd)
    for n in sd:
        assert torch.equal(got[n], want[n]), n
    # ... and it is not the as-trained compression.
    plain = compeft_rs.compress_expert(sd, 0.1, scale=scale, scope=scope, gauge="as_trained").decode()
    assert not torch.equal(plain["m.q.lora_A.weight"], got["m.q.lora_A.weight"])


def canonical(data):
    """An expert file's header (its compeft metadata parsed) and data bytes: the writer's
    metadata key order is not fixed from one call to the next, the content is."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header["__metadata__"]["compeft"] = json.loads(header["__metadata__"]["compeft"])
    return header, data[8 + n:]


def test_balanced_is_the_default_and_as_trained_records_nothing(tmp_path):
    sd = lora_sd(dtype=torch.float16)
    e = compeft_rs.compress_expert(sd, 0.1, gauge="as_trained")
    assert canonical(compeft_rs.compress_expert(sd, 0.1, gauge="balanced").to_bytes()) == canonical(
        compeft_rs.compress_expert(sd, 0.1).to_bytes())
    assert canonical(e.to_bytes()) != canonical(compeft_rs.compress_expert(sd, 0.1).to_bytes())
    e.save(tmp_path / "a.cpft")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "a.cpft"), "pt") as f:
        assert "gauge" not in json.loads(f.metadata()["compeft"])
    # A file without the field (as every file written before it) reads as compressed as trained.
    assert compeft_rs.load_expert(tmp_path / "a.cpft").gauge == "as_trained"


def test_balanced_gauge_is_recorded_and_survives_a_round_trip(tmp_path):
    e = compeft_rs.compress_expert(lora_sd(), 0.1, gauge="balanced")
    e.save(tmp_path / "b.cpft")
    back = compeft_rs.load_expert(tmp_path / "b.cpft")
    assert back.gauge == "balanced"
    assert all(torch.equal(x, y) for x, y in zip(back.decode().values(), e.decode().values()))


def test_balanced_gauge_leaves_other_tensors_and_unpaired_factors_alone():
    sd = lora_sd()
    sd["m.head.weight"] = torch.randn(3, 40)
    sd["m.lone.lora_A.weight"] = torch.randn(8, 40)
    sd["m.fresh.lora_A.weight"], sd["m.fresh.lora_B.weight"] = torch.randn(8, 40), torch.zeros(40, 8)
    e = compeft_rs.compress_expert(sd, 0.1, gauge="balanced")
    ref = compeft_rs.compress_expert(sd, 0.1, gauge="as_trained")
    assert torch.equal(e.lossless("m.head.weight"), ref.lossless("m.head.weight"))
    for n in ("m.lone.lora_A.weight", "m.fresh.lora_A.weight", "m.fresh.lora_B.weight"):
        assert torch.equal(e[n], ref[n]), n


@pytest.mark.parametrize("bad", ["balance", "svd", None, ""])
def test_a_bad_gauge_names_the_choices(bad):
    with pytest.raises(ValueError, match="'as_trained', 'balanced'"):
        compeft_rs.compress_expert(lora_sd(), 0.1, gauge=bad)
    with pytest.raises(ValueError, match="'as_trained', 'balanced'"):
        compeft_rs.tune(lora_sd(), lambda w: 0.0, gauge=bad, progress=False)


def test_tune_compresses_every_point_in_the_gauge_asked_for():
    sd = lora_sd()
    for gauge in ("balanced", "as_trained"):
        res = compeft_rs.tune(sd, lambda w: 0.0, scopes=("per_tensor",), scales=("pair_proj",), alphas=(1.0,),
                              gauge=gauge, progress=False)
        assert res.expert.gauge == gauge
        want = compeft_rs.compress_expert(sd, 0.1, gauge=gauge)
        assert canonical(res.expert.to_bytes()) == canonical(want.to_bytes())


# -- the adapter a user sees ---------------------------------------------------------------

def test_balanced_adapter_gives_the_same_outputs_in_a_peft_model():
    peft = pytest.importorskip("peft")
    from test_peft_parity import CONFIGS, outputs, trained

    # fan_in_fan_out (GPT-2's Conv1D stores the factors transposed) and per-module ranks too.
    for name in ("alpha8", "dora", "gpt2", "patterns"):
        kind, kw = CONFIGS[name]
        model = trained(kind, kw, seed=1)
        before = outputs(model, kind)
        sd = peft.get_peft_model_state_dict(model)
        balanced = balance(sd)
        assert any(not torch.equal(balanced[n], sd[n]) for n in sd)
        peft.set_peft_model_state_dict(model, balanced)
        after = outputs(model, kind)
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)


def test_compress_peft_takes_the_gauge():
    peft = pytest.importorskip("peft")
    from test_peft_parity import CONFIGS, trained

    kind, kw = CONFIGS["alpha8"]
    model = trained(kind, kw, seed=1)
    e = compeft_rs.compress_peft(model, 0.1, gauge="balanced")
    sd = {n: t.detach().cpu() for n, t in peft.get_peft_model_state_dict(model).items()}
    ref = compeft_rs.compress_expert(balance(sd), 0.1, gauge="as_trained")
    assert e.gauge == "balanced" and compeft_rs.compress_peft(model, 0.1).gauge == "balanced"
    assert all(torch.equal(e[n], ref[n]) for n in e.compressed_keys())
    assert compeft_rs.compress_peft(model, 0.1, gauge="as_trained").gauge == "as_trained"
    with pytest.raises(ValueError, match="gauge must be one of"):
        compeft_rs.compress_peft(model, 0.1, gauge="nope")


@pytest.mark.parametrize("as_torch", [False, True])
def test_a_pair_whose_balanced_factors_overflow_their_dtype_is_left_as_given(as_torch):
    # A = [60000, 60000], B = [60000]: the product's one singular value is 60000^2 sqrt(2), so
    # B' = S^1/2 = 71,352 is above float16's 65,504 (A' = S^1/2 / sqrt(2) per entry would fit).
    a = np.full((1, 2), 60000.0, dtype=np.float16)
    b = np.full((1, 1), 60000.0, dtype=np.float16)
    if as_torch:
        a, b = torch.from_numpy(a), torch.from_numpy(b)
    a2, b2 = balance_pair(a, b)
    assert a2 is a and b2 is b


def test_many_pairs_at_once_are_each_pair_balanced(monkeypatch):
    """balance_pairs batches the well-conditioned CPU pairs (Rust Grams and products, numpy's
    r x r decompositions, grouped by rank) and takes the others one by one: ranks 3, 4 and 16,
    every dtype, a pair mixing two, torch and numpy, a rank-deficient pair, a zero one, one with
    fewer rows than its rank, one whose balanced factors overflow float16 and a conv pair in one
    call, each against the SVD of its own dense product; only the pairs that need it go one by
    one."""
    g = np.random.default_rng(5)
    want = []
    specs = [(4, 40, 30, torch.float16), (3, 50, 20, torch.float32), (16, 300, 260, torch.bfloat16),
             (4, 40, 30, torch.float64), (16, 300, 260, torch.float16), (3, 8, 9, np.float32),
             (4, 2, 30, torch.float32), (4, 40, 30, (torch.float32, torch.float16)), (4, 40, 30, np.float64)]
    for i, (r, m, n, dtype) in enumerate(specs):
        a64, b64 = g.standard_normal((r, n)) * 0.02, g.standard_normal((m, r)) * 0.01
        if i == 3:
            b64[:, 1] = 0.0  # rank-deficient: one by one, in float64
        if i == 8:
            b64[:] = 0.0     # B A = 0: left as it is
        if isinstance(dtype, tuple):
            want.append((torch.from_numpy(a64).to(dtype[0]), torch.from_numpy(b64).to(dtype[1])))
        elif isinstance(dtype, torch.dtype):
            want.append((torch.from_numpy(a64).to(dtype), torch.from_numpy(b64).to(dtype)))
        else:
            want.append((a64.astype(dtype), b64.astype(dtype)))
    # As in test_a_pair_whose_balanced_factors_overflow...: B' = 71,352 > 65,504.
    overflow = (torch.full((1, 2), 60000.0, dtype=torch.float16), torch.full((1, 1), 60000.0, dtype=torch.float16))
    conv = (torch.randn(4, 3, 3, 3), torch.randn(8, 4, 1, 1))
    one_by_one = []
    single = _gauge._balance_pair64
    monkeypatch.setattr(_gauge, "_balance_pair64", lambda A, B: one_by_one.append((A, B)) or single(A, B))
    got = _gauge.balance_pairs(want + [overflow, conv])
    # Rank-deficient, fewer rows than the rank, zero and conv; the overflowing pair is batched.
    assert sorted(id(p[0]) for p in one_by_one) == sorted([id(want[i][0]) for i in (6, 3, 8)] + [id(conv[0])])
    assert got[-1] == conv and got[-2][0] is overflow[0] and got[-2][1] is overflow[1]
    assert got[-3][0] is want[-1][0] and got[-3][1] is want[-1][1]
    for (A, B), (A2, B2) in zip(want[:-1], got[:-3]):
        assert type(A2) is type(A) and (A2.dtype, B2.dtype) == (A.dtype, B.dtype)
        assert A2.shape == A.shape and B2.shape == B.shape
        a, b = np.asarray(torch.as_tensor(A).double()), np.asarray(torch.as_tensor(B).double())
        a2, b2 = np.asarray(torch.as_tensor(A2).double()), np.asarray(torch.as_tensor(B2).double())
        units = []
        for X in (A, B):
            finfo = torch.finfo(X.dtype) if isinstance(X, torch.Tensor) else np.finfo(X.dtype)
            # One rounding to the dtype; float64 goes through QR, SVD and products instead.
            units.append(2.0**-40 if finfo.bits == 64 else finfo.eps / 2)
        unit = max(units)
        bound = 4 * unit * (np.abs(b2) @ np.abs(a2)) + 1e-300
        assert np.all(np.abs(b2 @ a2 - b @ a) <= bound)
        # Balanced: both Grams the diagonal of the product's singular values, to the factors'
        # rounding and the f32 sums of their Grams (and a pair with fewer rows than its rank:
        # zero beyond them).
        s = reference_singular_values(a, b)
        tol = 8 * max(unit, 2.0**-22) * s[0] * max(a.shape[0], 4)
        np.testing.assert_allclose(a2 @ a2.T, np.diag(s), atol=tol)
        np.testing.assert_allclose(b2.T @ b2, np.diag(s), atol=tol)


def test_batched_transforms_are_the_single_pair_gram_path():
    """_transforms (batched over pairs) against _balanced_from_grams (one pair) on the same
    float64 factors: T_B and T_A agree, up to the common sign of each singular pair."""
    g = np.random.default_rng(2)
    facs = [(g.standard_normal((r, 40)) * 0.03, g.standard_normal((50, r)) * 0.01) for r in (4, 4, 4)]
    ga = np.stack([a @ a.T for a, _ in facs])
    gb = np.stack([b.T @ b for _, b in facs])
    for (a, b), t in zip(facs, _gauge._transforms(ga, gb)):
        a2, b2, _ = _gauge._balanced_from_grams(a, b)
        ta, tb = t
        sign = np.sign(np.sum((ta @ a) * a2, axis=1))
        np.testing.assert_allclose(ta @ a, a2 * sign[:, None], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(b @ tb, b2 * sign[None, :], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(tb @ ta, np.eye(4), atol=1e-9)
    # Not finite, or too ill-conditioned: None, for the one-by-one path.
    bad = _gauge._transforms(np.stack([np.full((2, 2), np.nan), np.diag([1.0, 1e-9])]), np.stack([np.eye(2)] * 2))
    assert bad == [None, None]


def test_batched_and_single_pair_paths_agree_on_a_trained_shaped_adapter():
    """The batched path (Rust + numpy) against the one-pair float64 path of the same pairs:
    the same balanced factors up to the half type's rounding and the f32 sums of the Grams."""
    sd = lora_sd(dtype=torch.float16)
    pairs = [(sd[f"m.{mod}.lora_A.weight"], sd[f"m.{mod}.lora_B.weight"]) for mod in ("q", "v")]
    for (A, B), (A2, B2) in zip(pairs, _gauge.balance_pairs(pairs)):
        a2, b2, _ = _gauge._balanced64(A.double().numpy(), B.double().numpy())
        # Each SVD pair (u_i, v_i) is fixed up to a common sign: align before comparing.
        sign = np.sign(np.sum(a2 * A2.double().numpy(), axis=1))
        np.testing.assert_allclose(A2.double().numpy(), a2 * sign[:, None], rtol=0, atol=2e-3 * np.abs(a2).max())
        np.testing.assert_allclose(B2.double().numpy(), b2 * sign[None, :], rtol=0, atol=2e-3 * np.abs(b2).max())
