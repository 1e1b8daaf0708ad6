"""Scale rules (python/compeft_rs/_scale.py) against plain numpy: the kept signs from the reference
top-k, the scale from sums over the data, the pair rule from the dense product B @ A."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from reference import reference_sigma, reference_signs

import compeft_rs
from compeft_rs import _core


def _rule(rule, tau, signs):
    kept = np.abs(tau[signs != 0])
    if kept.size == 0:
        return 0.0
    return {
        "std": reference_sigma(tau),
        "mean": kept.mean(),
        "norm": np.sqrt((tau**2).sum()) / np.sqrt(kept.size),
        "proj": (tau**2).sum() / kept.sum(),
    }[rule]


def _pair(draw_seed, r, d_in, d_out, b_scale):
    g = np.random.default_rng(draw_seed)
    a = g.standard_normal((r, d_in))
    b = g.standard_normal((d_out, r)) * b_scale
    return a, b


@given(seed=st.integers(0, 2**32 - 1), r=st.integers(1, 6), d_in=st.integers(2, 40), d_out=st.integers(2, 40),
       k=st.sampled_from([0.05, 0.1, 0.3, 1.0]), alpha=st.sampled_from([0.5, 1.0, 3.0]),
       rule=st.sampled_from(["std", "mean", "norm", "proj"]))
def test_per_tensor_rules_match_numpy(seed, r, d_in, d_out, k, alpha, rule):
    a, b = _pair(seed, r, d_in, d_out, 0.01)
    sd = {"m.lora_A.weight": torch.from_numpy(a), "m.lora_B.weight": torch.from_numpy(b)}
    e = compeft_rs.compress_expert(sd, k, alpha, scale=rule, gauge="as_trained")
    for name, tau in (("m.lora_A.weight", a), ("m.lora_B.weight", b)):
        signs = reference_signs(tau, k).reshape(tau.shape)
        s = e.stream(name)
        assert s.scale == pytest.approx(alpha * _rule(rule, tau, signs), rel=1e-9, abs=1e-300)
        got = e.decode([name])[name].numpy()
        np.testing.assert_array_equal(np.sign(got), signs)


@given(seed=st.integers(0, 2**32 - 1), r=st.integers(1, 6), d_in=st.integers(2, 40), d_out=st.integers(2, 40),
       k=st.sampled_from([0.05, 0.1, 0.3]), alpha=st.sampled_from([0.5, 1.0, 3.0]))
def test_pair_rule_keeps_the_products_norm(seed, r, d_in, d_out, k, alpha):
    a, b = _pair(seed, r, d_in, d_out, 0.01)
    sd = {"x.lora_A.weight": torch.from_numpy(a), "x.lora_B.weight": torch.from_numpy(b)}
    e = compeft_rs.compress_expert(sd, k, alpha, scale="pair", gauge="as_trained")
    assert (e.scope, e.scale) == ("per_tensor", "pair")
    sa_, sb_ = (reference_signs(t, k).reshape(t.shape) for t in (a, b))
    # A keeps its norm scale; B's makes ||s_A s_B Bt At|| = alpha^2 ||BA||.
    s_a = alpha * _rule("norm", a, sa_)
    assert e.stream("x.lora_A.weight").scale == pytest.approx(s_a, rel=1e-9)
    q = sb_.astype(np.float64) @ sa_.astype(np.float64)
    s_b = e.stream("x.lora_B.weight").scale
    if np.abs(q).sum() > 0:
        assert s_a * s_b * np.linalg.norm(q) == pytest.approx(alpha**2 * np.linalg.norm(b @ a), rel=1e-9)
    else:  # the signs cancel in the product: B keeps its own norm scale
        assert s_b == pytest.approx(alpha * _rule("norm", b, sb_), rel=1e-9, abs=1e-300)
    dec = e.decode()
    np.testing.assert_array_equal(np.sign(dec["x.lora_B.weight"].numpy()), sb_)


@given(seed=st.integers(0, 2**32 - 1), r=st.integers(1, 6), d_in=st.integers(2, 300), d_out=st.integers(2, 300),
       k=st.sampled_from([0.05, 0.1, 0.3]), alpha=st.sampled_from([0.5, 1.0, 3.0]),
       dtype=st.sampled_from(["float16", "bfloat16"]))
def test_pair_rule_on_half_factors(seed, r, d_in, d_out, k, alpha, dtype):
    a, b = _pair(seed, r, d_in, d_out, 0.01)
    ta, tb = (torch.from_numpy(x).to(getattr(torch, dtype)) for x in (a, b))
    a, b = ta.double().numpy(), tb.double().numpy()  # the factors' exact values
    e = compeft_rs.compress_expert({"x.lora_A.weight": ta, "x.lora_B.weight": tb}, k, alpha, scale="pair",
                                   gauge="as_trained")
    sa_, sb_ = (reference_signs(t, k).reshape(t.shape) for t in (a, b))
    s_a = alpha * _rule("norm", a, sa_)
    assert e.stream("x.lora_A.weight").scale == pytest.approx(s_a, rel=1e-9)
    q = sb_.astype(np.float64) @ sa_.astype(np.float64)
    s_b = e.stream("x.lora_B.weight").scale
    if np.abs(q).sum() == 0:
        assert s_b == pytest.approx(alpha * _rule("norm", b, sb_), rel=1e-9, abs=1e-300)
        return
    # ||BA||^2 comes from Gram matrices summed in f32 (half products are exact in f32; each
    # accumulator lane adds 16 of them per chunk, then f64): every Gram entry is within
    # 16 * 2^-24 < 2^-19 of its sum of |products|, so ||BA||^2 is within 2 * 2^-19 of
    # sum_ij ((|B||A|)_ij)^2, and the scale, a square root, within half that relatively.
    want = np.linalg.norm(b @ a)
    bound = (np.abs(b) @ np.abs(a)) ** 2
    rel = 1.05 * 2.0**-19 * bound.sum() / want**2 + 1e-9
    assert s_a * s_b * np.linalg.norm(q) == pytest.approx(alpha**2 * want, rel=rel)


@given(seed=st.integers(0, 2**32 - 1), r=st.integers(1, 6), d_in=st.integers(2, 40), d_out=st.integers(2, 40),
       k=st.sampled_from([0.05, 0.1, 0.3, 1.0]), alpha=st.sampled_from([0.5, 1.0, 3.0]))
def test_pair_proj_rule_projects_the_product_on_itself(seed, r, d_in, d_out, k, alpha):
    a, b = _pair(seed, r, d_in, d_out, 0.01)
    sd = {"x.lora_A.weight": torch.from_numpy(a), "x.lora_B.weight": torch.from_numpy(b)}
    e = compeft_rs.compress_expert(sd, k, alpha, scale="pair_proj", gauge="as_trained")
    sa_, sb_ = (reference_signs(t, k).reshape(t.shape) for t in (a, b))
    # A keeps its proj scale; B's makes <s_A s_B Bt At, BA> = alpha^2 ||BA||^2.
    s_a = alpha * _rule("proj", a, sa_)
    assert e.stream("x.lora_A.weight").scale == pytest.approx(s_a, rel=1e-9)
    ba = b @ a
    q = sb_.astype(np.float64) @ sa_.astype(np.float64)
    cross = float((q * ba).sum())
    s_b = e.stream("x.lora_B.weight").scale
    if cross > 1e-6 * np.linalg.norm(q) * np.linalg.norm(ba):
        assert s_a * s_b * cross == pytest.approx(alpha**2 * (ba**2).sum(), rel=1e-9)
    elif cross <= 0 and np.any(q):
        # The kept signs' product opposes B A (or cancels to rounding): pair's norm instead.
        assert s_a * s_b * np.linalg.norm(q) == pytest.approx(alpha**2 * np.linalg.norm(ba), rel=1e-9)
    elif not np.any(q):  # the kept signs cancel in the product: B keeps its own proj scale
        assert s_b == pytest.approx(alpha * _rule("proj", b, sb_), rel=1e-9, abs=1e-300)
    np.testing.assert_array_equal(np.sign(e.decode()["x.lora_B.weight"].numpy()), sb_)


@given(seed=st.integers(0, 2**32 - 1), r=st.integers(1, 6), d_in=st.integers(2, 300), d_out=st.integers(2, 300),
       k=st.sampled_from([0.05, 0.1, 0.3]), dtype=st.sampled_from(["float16", "bfloat16", "float32"]))
def test_default_lora_compression_projects_the_adapter_on_itself(seed, r, d_in, d_out, k, dtype):
    """What the model applies, measured on the dense products: the defaults (balanced gauge,
    pair_proj) decode to factors whose product's projection on the trained B A is B A."""
    a, b = _pair(seed, r, d_in, d_out, 0.01)
    ta, tb = (torch.from_numpy(x).to(getattr(torch, dtype)) for x in (a, b))
    a, b = ta.double().numpy(), tb.double().numpy()  # the factors' exact values
    e = compeft_rs.compress_expert({"x.lora_A.weight": ta, "x.lora_B.weight": tb}, k)
    assert (e.scale, e.gauge) == ("pair_proj", "balanced")
    dec = e.decode(dtype=torch.float64)
    got = dec["x.lora_B.weight"].numpy() @ dec["x.lora_A.weight"].numpy()
    ba = b @ a
    cross = float((got * ba).sum())
    if not np.any(got):
        return
    if cross <= 1e-6 * np.linalg.norm(got) * np.linalg.norm(ba):
        # The kept signs' product opposes B A (tiny factors, one kept entry each): the norm.
        assert np.linalg.norm(got) == pytest.approx(np.linalg.norm(ba), rel=1e-2)
        return
    # ||BA||^2 comes from Grams summed in f32 (see test_pair_rule_on_half_factors); the balanced
    # factors are cast back to the dtype, and the scales stored in f32: a few 2^-24 more.
    bound = ((np.abs(b) @ np.abs(a)) ** 2).sum() / (ba**2).sum()
    rel = 1.05 * 2 * 2.0**-19 * bound + 1e-6
    if dtype != "float32":  # the balanced factors rounded to 8 or 11 bits
        rel += 2.0 ** (-7 if dtype == "bfloat16" else -10)
    assert cross == pytest.approx((ba**2).sum(), rel=rel)


def test_pair_norms_refuses_factors_that_do_not_fit():
    a, b = np.ones((4, 10)), np.ones((6, 4))
    ca, cb = compeft_rs.encode(a, 0.5)._stream, compeft_rs.encode(b, 0.5)._stream
    ok = (a.reshape(-1), "float64", (4, 10), b.reshape(-1), "float64", (6, 4), ca, cb)
    # BA is 6 x 10 fours; the kept signs are A's first 2 rows and B's first 3 (ties to the lower
    # index), so their product is 3 x 10 twos.
    assert _core.pair_norms([ok], ["p"]) == [(960.0, 120.0)]
    bad = [
        ((4, 9), "holds 40 entries"),  # A's data is not 4 x 9
        ((5, 8), "not a factor pair"),  # A's rows are not B's columns
    ]
    for shape, msg in bad:
        item = ok[:2] + (shape,) + ok[3:]
        with pytest.raises(ValueError, match=f"pair 'x.lora_A / x.lora_B': .*{msg}"):
            _core.pair_norms([item], ["x.lora_A / x.lora_B"])
    with pytest.raises(ValueError, match="stream of 24 entries"):
        _core.pair_norms([ok[:6] + (cb, cb)], ["p"])
    with pytest.raises(ValueError, match="pair 'p', A: array element type"):
        _core.pair_norms([(a.reshape(-1), "float32") + ok[2:]], ["p"])


@pytest.mark.parametrize("rule,alone", [("pair", "norm"), ("pair_proj", "proj")])
def test_pair_rule_is_matched_by_segment_and_spares_lonely_factors(rule, alone):
    g = np.random.default_rng(0)
    sd = {
        "m.0.lora_A.weight": torch.from_numpy(g.standard_normal((4, 30))),
        "m.0.lora_B.weight": torch.from_numpy(g.standard_normal((20, 4)) * 0.01),
        # No partner (its B is missing): keeps the per-tensor scale.
        "m.1.lora_A.weight": torch.from_numpy(g.standard_normal((4, 30))),
        # Embedding factors pair with each other.
        "e.lora_embedding_A.default": torch.from_numpy(g.standard_normal((4, 50))),
        "e.lora_embedding_B.default": torch.from_numpy(g.standard_normal((16, 4)) * 0.01),
    }
    pair = compeft_rs.compress_expert(sd, 0.2, scale=rule, gauge="as_trained")
    single = compeft_rs.compress_expert(sd, 0.2, scale=alone, gauge="as_trained")
    for n in sd:
        changed = pair.stream(n).scale != single.stream(n).scale
        assert changed == (n in ("m.0.lora_B.weight", "e.lora_embedding_B.default")), n


def test_global_std_is_the_papers_algorithm():
    g = np.random.default_rng(1)
    sd = {f"t{i}": g.standard_normal(50 + i) for i in range(3)}
    e = compeft_rs.compress_expert(sd, 0.1, 2.0, scope="global", scale="std")
    flat = np.concatenate([sd[n] for n in sorted(sd)])
    signs = reference_signs(flat, 0.1)
    off = 0
    for n in sorted(sd):
        d = sd[n].size
        assert e.stream(n).scale == pytest.approx(2.0 * reference_sigma(flat), rel=1e-12)
        np.testing.assert_array_equal(np.sign(e.decode([n])[n].numpy()), signs[off:off + d])
        off += d


@pytest.mark.parametrize("rule", ["mean", "norm", "proj"])
def test_global_data_free_rules_use_all_kept_entries(rule):
    g = np.random.default_rng(2)
    sd = {f"t{i}": g.standard_normal(40 + 7 * i) * (i + 1) for i in range(3)}
    e = compeft_rs.compress_expert(sd, 0.2, 1.5, scope="global", scale=rule)
    flat = np.concatenate([sd[n] for n in sorted(sd)])
    want = 1.5 * _rule(rule, flat, reference_signs(flat, 0.2))
    for n in sd:
        assert e.stream(n).scale == pytest.approx(want, rel=1e-12)


def test_scale_rule_is_stored_and_checked(tmp_path):
    sd = {"a.lora_A.weight": torch.randn(4, 16), "a.lora_B.weight": torch.randn(16, 4)}
    e = compeft_rs.compress_expert(sd, 0.25, scale="norm")
    e.save(tmp_path / "e.safetensors")
    assert compeft_rs.load_expert(tmp_path / "e.safetensors").scale == "norm"
    with pytest.raises(ValueError, match="scale must be one of"):
        compeft_rs.compress_expert(sd, 0.25, scale="sigma")


@given(values=st.lists(st.integers(-6, 6), min_size=1, max_size=400),
       dtype=st.sampled_from(["float16", "bfloat16", "float32", "float64"]),
       k=st.sampled_from([0.01, 0.1, 0.5, 1.0]), rule=st.sampled_from(["mean", "norm", "proj"]))
def test_encode_one_tensor_with_a_data_free_scale(values, dtype, k, rule):
    # Small multiples of 1/4: exact in every dtype, with many ties.
    tau = np.array(values, dtype=np.float64) / 4
    t = torch.from_numpy(tau).to(getattr(torch, dtype))
    c = compeft_rs.encode(t, k, 2.0, scale=rule)
    signs = reference_signs(tau, k)
    assert c.scale == pytest.approx(2.0 * _rule(rule, tau, signs), rel=1e-9, abs=1e-300)
    np.testing.assert_array_equal(np.sign(c.decode(dtype="float64").numpy()), signs)


@pytest.mark.parametrize("rule", ["pair", "pair_proj"])
def test_encode_refuses_the_pair_rule_for_one_tensor(rule):
    with pytest.raises(ValueError, match="for one tensor"):
        compeft_rs.encode(torch.ones(4), 0.5, scale=rule)


def test_pair_proj_takes_the_signs_norm_only_for_pairs_near_its_cut(monkeypatch):
    """pair_proj needs ||S_B S_A|| only to decide its cosine cut, and skips it for pairs whose
    cross term clears the cut with the bound nnz_A * nnz_B: here the cross term of pair x is
    made rounding noise (1e-20), so x, and only x, has its signs' norm computed and gets pair's
    norm scale; pair y keeps the projection."""
    from compeft_rs import _scale

    (a, b), (c, d) = _pair(1, 4, 30, 20, 0.01), _pair(2, 4, 30, 20, 0.01)
    sd = {"x.lora_A.weight": torch.from_numpy(a), "x.lora_B.weight": torch.from_numpy(b),
          "y.lora_A.weight": torch.from_numpy(c), "y.lora_B.weight": torch.from_numpy(d)}
    real_cross, real_norms, asked = _scale._pair_cross, _scale._pair_norms, []
    monkeypatch.setattr(_scale, "_pair_cross", lambda items, labels: [
        1e-20 if label.startswith("x.") else v for label, v in zip(labels, real_cross(items, labels))])
    monkeypatch.setattr(_scale, "_pair_norms", lambda items, labels: asked.extend(labels) or real_norms(items, labels))
    dec = compeft_rs.compress_expert(sd, 0.3, scale="pair_proj", gauge="as_trained").decode()
    assert asked == ["x.lora_A.weight / x.lora_B.weight"]
    px = dec["x.lora_B.weight"].numpy() @ dec["x.lora_A.weight"].numpy()
    py = dec["y.lora_B.weight"].numpy() @ dec["y.lora_A.weight"].numpy()
    assert np.linalg.norm(px) == pytest.approx(np.linalg.norm(b @ a), rel=1e-9)  # pair's norm rule
    assert float((py * (d @ c)).sum()) == pytest.approx(float(((d @ c) ** 2).sum()), rel=1e-9)  # projection
