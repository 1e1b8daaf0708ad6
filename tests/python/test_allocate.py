"""Per-tensor densities under a byte budget (compress_expert(allocate="error")): never larger than
the uniform density, never a larger error of what the model applies, the error measured here
plainly in numpy on the dense products."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import compeft_rs
from compeft_rs._allocate import _pair_error, density_grid, pick_densities


def lora_expert(seed, layers=4, r=4, width=48, spread=3.0):
    """LoRA factors whose products differ in size from layer to layer (where one density for every
    pair is not the best use of the bytes), plus a head kept exactly."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(layers):
        for m in ("q", "v"):
            p = f"base_model.model.l{i}.{m}"
            sd[f"{p}.lora_A.weight"] = torch.randn(r, width, generator=g) * spread ** (i % 3)
            sd[f"{p}.lora_B.weight"] = torch.randn(width, r, generator=g) * 1e-2 * spread ** ((layers - i) % 2)
    return sd


CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q", "v"],
          "alpha_pattern": {"l0.q": 32}}


def scaling(name):
    return 32 / 4 if ".l0.q." in name else 8 / 4


def product_error(sd, weights):
    """Sum over pairs of ||scaling (B~A~ - BA)||_F^2, on the dense products in float64 numpy."""
    total = 0.0
    for n in sd:
        if ".lora_A." not in n:
            continue
        nb = n.replace("lora_A", "lora_B")
        a, b = sd[n].double().numpy(), sd[nb].double().numpy()
        a2, b2 = weights[n].double().numpy(), weights[nb].double().numpy()
        total += scaling(n) ** 2 * float(((b2 @ a2 - b @ a) ** 2).sum())
    return total


def stream_bytes(e):
    return sum(e.stream(n).nbytes for n in e.compressed_keys())


@given(st.integers(0, 2**16), st.sampled_from([0.05, 0.1, 0.3]), st.sampled_from(["pair", "norm", "std"]))
def test_error_allocation_fits_the_bytes_and_lowers_the_product_error(seed, k, scale):
    sd = lora_expert(seed)
    uni = compeft_rs.compress_expert(sd, k, scale=scale, peft_config=CONFIG)
    err = compeft_rs.compress_expert(sd, k, scale=scale, peft_config=CONFIG, allocate="error")
    assert (uni.allocate, err.allocate) == ("uniform", "error")
    assert stream_bytes(err) <= stream_bytes(uni)
    assert product_error(sd, err.apply()) <= product_error(sd, uni.apply()) * (1 + 1e-9)
    grid = density_grid(k)
    for n in err.compressed_keys():
        if ".lora_A." not in n:
            continue
        a, b = err.stream(n), err.stream(n.replace("lora_A", "lora_B"))
        # Both factors of a pair (equal sizes here) at one density of the grid.
        assert a.nnz == b.nnz
        assert min(abs(a.density - g) for g in grid) <= 1.0 / a.numel, (n, a.density, grid)


def test_uneven_pairs_move_density_to_the_large_products():
    sd = lora_expert(0, layers=6, spread=10.0)
    uni = compeft_rs.compress_expert(sd, 0.1, peft_config=CONFIG)
    err = compeft_rs.compress_expert(sd, 0.1, peft_config=CONFIG, allocate="error")
    # A strictly better choice than uniform exists here, and it is found.
    assert product_error(sd, err.apply()) < 0.9 * product_error(sd, uni.apply())
    dens = {n: err.stream(n).density for n in err.compressed_keys()}
    assert len(set(round(d, 3) for d in dens.values())) > 1
    # The pair with the largest product gets at least the density of the smallest.
    norms = {n: float((sd[n.replace("lora_A", "lora_B")].double() @ sd[n].double()).norm() * scaling(n))
             for n in sd if ".lora_A." in n}
    big, small = max(norms, key=norms.get), min(norms, key=norms.get)
    assert dens[big] >= dens[small]


@given(st.integers(0, 2**16), st.integers(1, 6), st.integers(1, 30), st.integers(1, 30))
def test_pair_error_from_grams_is_the_dense_error(seed, r, m, n):
    g = np.random.default_rng(seed)
    a, b = g.standard_normal((r, n)), g.standard_normal((m, r))
    a2, b2 = np.sign(a) * 0.5 * (g.random((r, n)) < 0.5), np.sign(b) * 0.01 * (g.random((m, r)) < 0.5)
    want = float(((b2 @ a2 - b @ a) ** 2).sum())
    got = _pair_error(*(torch.from_numpy(x) for x in (a, b, a2, b2)))
    assert got == pytest.approx(want, rel=1e-9, abs=1e-9)


costs = st.lists(
    st.lists(st.tuples(st.integers(1, 50), st.floats(0, 100)), min_size=3, max_size=3), min_size=1, max_size=4)


@given(costs)
def test_picks_fit_the_budget_and_never_add_error(cost):
    # Bytes increase and errors decrease with density, as for real streams (in any other order
    # the uniform choice may lie off the Lagrangian's hull: it is then kept).
    cost = [sorted((b, e) for b, e in zip(sorted(b for b, _ in c), sorted((e for _, e in c), reverse=True)))
            for c in cost]
    picks = pick_densities(cost, 1)
    budget = sum(c[1][0] for c in cost)
    assert sum(c[i][0] for c, i in zip(cost, picks)) <= budget
    assert sum(c[i][1] for c, i in zip(cost, picks)) <= sum(c[1][1] for c in cost)
    # One unit: the best choice within the budget (brute force).
    if len(cost) == 1:
        best = min(e for b, e in cost[0] if b <= budget)
        assert cost[0][picks[0]][1] == best


def test_uniform_is_kept_when_the_lagrangian_choice_is_worse():
    # One unit: (bytes, error) at three densities; k's point (20, 90) lies above the hull from
    # (10, 100) to (30, 10), so the Lagrangian choice within 20 bytes is (10, 100).
    assert pick_densities([[(10, 100.0), (20, 90.0), (30, 10.0)]], 1) == [1]


def test_scaling_weights_the_pairs():
    # Four identical pairs; alpha_pattern gives l0.q four times the others' scaling, so its
    # product's error counts 16 times: it gets more density than its identical twins.
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(4, 48, generator=g), torch.randn(48, 4, generator=g) * 1e-2
    sd = {}
    for i in range(2):
        for m in ("q", "v"):
            sd[f"base_model.model.l{i}.{m}.lora_A.weight"] = a.clone()
            sd[f"base_model.model.l{i}.{m}.lora_B.weight"] = b.clone()
    e = compeft_rs.compress_expert(sd, 0.1, peft_config=CONFIG, allocate="error")
    d = {n: e.stream(n).density for n in e.compressed_keys()}
    assert d["base_model.model.l0.q.lora_A.weight"] > d["base_model.model.l1.v.lora_A.weight"]


def test_other_tensors_full_fine_tune_and_checkpoint(tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    base = {f"w{i}": torch.randn(32, 40, generator=g) for i in range(4)}
    ft = {n: t + torch.randn(t.shape, generator=g) * 0.01 * (i + 1) ** 2 for i, (n, t) in enumerate(base.items())}
    ft["head"] = torch.randn(2, 40, generator=g)
    uni = compeft_rs.compress_expert(ft, 0.1, base=base, scope="per_tensor")
    err = compeft_rs.compress_expert(ft, 0.1, base=base, allocate="error")
    assert err.scope == "per_tensor"

    def residual_error(e):
        w = e.apply(base=base)
        return sum(float(((w[n].double() - ft[n].double()) ** 2).sum()) for n in base)

    assert stream_bytes(err) <= stream_bytes(uni)
    assert residual_error(err) < residual_error(uni)
    assert torch.equal(err.apply(base=base)["head"], ft["head"])
    save_file(ft, str(tmp_path / "ft.safetensors"))
    save_file(base, str(tmp_path / "base.safetensors"))
    ck = compeft_rs.compress_checkpoint(tmp_path / "ft.safetensors", 0.1, base=tmp_path / "base.safetensors",
                                        allocate="error")
    assert ck.allocate == "error"
    for n in err.compressed_keys():
        assert ck.stream(n) == err.stream(n)


def test_alpha_multiplies_the_scales_of_one_allocation():
    sd = lora_expert(3)
    one = compeft_rs.compress_expert(sd, 0.1, peft_config=CONFIG, allocate="error")
    two = compeft_rs.compress_expert(sd, 0.1, 2.0, peft_config=CONFIG, allocate="error")
    for n in one.compressed_keys():
        a, b = one.stream(n), two.stream(n)
        assert np.array_equal(a.decode() != 0, b.decode() != 0)
        assert b.scale == pytest.approx(2 * a.scale, rel=1e-12)


def test_recorded_in_the_file_and_old_files_read_uniform(tmp_path):
    sd = lora_expert(2)
    e = compeft_rs.compress_expert(sd, 0.1, allocate="error", gauge="balanced")
    p = e.save(tmp_path / "e.cpft.safetensors")
    back = compeft_rs.load_expert(p)
    assert (back.allocate, back.gauge) == ("error", "balanced")
    uni = compeft_rs.compress_expert(sd, 0.1)
    from safetensors import safe_open

    with safe_open(str(uni.save(tmp_path / "u.cpft.safetensors")), "np") as f:
        assert "allocate" not in json.loads(f.metadata()["compeft"])
    assert compeft_rs.load_expert(tmp_path / "u.cpft.safetensors").allocate == "uniform"


def test_bad_arguments_say_what_to_pass():
    sd = lora_expert(0)
    with pytest.raises(ValueError, match="allocate must be one of 'uniform', 'error'"):
        compeft_rs.compress_expert(sd, 0.1, allocate="greedy")
    with pytest.raises(ValueError, match='needs scope="per_tensor"'):
        compeft_rs.compress_expert(sd, 0.1, scope="global", allocate="error")
    # A bitmask's size does not depend on its density: no budget to spend.
    with pytest.raises(ValueError, match='needs encoding="golomb"'):
        compeft_rs.compress_expert(sd, 0.1, encoding="bitmask", allocate="error")
    with pytest.raises(ValueError, match='needs scope="per_tensor"'):
        compeft_rs.tune(sd, lambda w: 0.0, scopes=("global",), allocate="error", progress=False)


def test_conv_embedding_bias_and_single_tensors():
    """Conv LoRA (A: r x c x kh x kw, B: out x r x 1 x 1), embedding LoRA, lora_B's bias and an
    (IA)3-like vector in one expert: each unit's error is what the model applies, measured here
    on dense products in numpy."""
    g = torch.Generator().manual_seed(11)
    sd = {
        "base_model.model.conv.lora_A.weight": torch.randn(4, 3, 3, 3, generator=g),
        "base_model.model.conv.lora_B.weight": torch.randn(8, 4, 1, 1, generator=g) * 0.1,
        "base_model.model.emb.lora_embedding_A": torch.randn(4, 50, generator=g) * 3,
        "base_model.model.emb.lora_embedding_B": torch.randn(16, 4, generator=g) * 0.1,
        "base_model.model.q.lora_A.weight": torch.randn(4, 30, generator=g),
        "base_model.model.q.lora_B.weight": torch.randn(30, 4, generator=g) * 0.01,
        "base_model.model.q.lora_B.bias": torch.randn(30, generator=g) * 0.1,
    }
    config = dict(CONFIG, lora_bias=True)
    uni = compeft_rs.compress_expert(sd, 0.1, peft_config=config)
    err = compeft_rs.compress_expert(sd, 0.1, peft_config=config, allocate="error")

    def applied_error(w):
        total = 0.0
        for m, a_key, b_key in (("conv", "lora_A.weight", "lora_B.weight"),
                                ("emb", "lora_embedding_A", "lora_embedding_B"),
                                ("q", "lora_A.weight", "lora_B.weight")):
            p = f"base_model.model.{m}."
            a, b = sd[p + a_key].double().numpy(), sd[p + b_key].double().numpy()
            a2, b2 = w[p + a_key].double().numpy(), w[p + b_key].double().numpy()
            prod = b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)
            prod2 = b2.reshape(b2.shape[0], -1) @ a2.reshape(a2.shape[0], -1)
            total += 2.0 ** 2 * float(((prod2 - prod) ** 2).sum())
        bias = sd["base_model.model.q.lora_B.bias"].double().numpy()
        bias2 = w["base_model.model.q.lora_B.bias"].double().numpy()
        return total + 2.0 ** 2 * float(((bias2 - bias) ** 2).sum())

    assert stream_bytes(err) <= stream_bytes(uni)
    assert applied_error(err.apply()) <= applied_error(uni.apply()) * (1 + 1e-9)
    for m, a_key, b_key in (("conv", "lora_A.weight", "lora_B.weight"), ("emb", "lora_embedding_A", "lora_embedding_B")):
        p = f"base_model.model.{m}."
        assert err.stream(p + a_key).density == pytest.approx(err.stream(p + b_key).density, abs=0.05)


def test_file_is_at_most_a_few_bytes_larger():
    for seed in range(3):
        sd = lora_expert(seed, layers=6, spread=10.0)
        uni = compeft_rs.compress_expert(sd, 0.1, peft_config=CONFIG)
        err = compeft_rs.compress_expert(sd, 0.1, peft_config=CONFIG, allocate="error")
        assert stream_bytes(err) <= stream_bytes(uni)
        assert err.nbytes <= uni.nbytes + 100


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_factors():
    sd = {n: t.cuda() for n, t in lora_expert(1).items()}
    on_gpu = compeft_rs.compress_expert(sd, 0.1, peft_config=CONFIG, allocate="error")
    on_cpu = compeft_rs.compress_expert({n: t.cpu() for n, t in sd.items()}, 0.1, peft_config=CONFIG,
                                        allocate="error")
    for n in on_cpu.compressed_keys():
        assert on_gpu.stream(n) == on_cpu.stream(n)


def test_tune_returns_the_allocation_it_scored():
    sd = lora_expert(4)
    res = compeft_rs.tune(sd, lambda w: -product_error(sd, w), allocate="error", scales=("pair", "norm"),
                          confidence=None, progress=False)
    assert {p.scope for p in res.points} == {"per_tensor"}
    assert res.expert.allocate == "error"
    b = res.best
    assert b.alpha != 1.0  # the case where alpha and the allocation meet
    again = compeft_rs.compress_expert(sd, b.k, scale=b.scale, allocate="error")
    assert [res.expert.stream(n).nnz for n in sorted(sd)] == [again.stream(n).nnz for n in sorted(sd)]
    # The expert returned scores what its point scored.
    assert -product_error(sd, res.expert.apply()) == pytest.approx(res.best.score, rel=1e-6)


def test_cli_allocate(tmp_path):
    from compeft_rs import cli

    peft = pytest.importorskip("peft")
    del peft
    from safetensors.torch import save_file

    folder = tmp_path / "adapter"
    folder.mkdir()
    sd = lora_expert(5)
    save_file(sd, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(dict(CONFIG, base_model_name_or_path="x")))
    out = tmp_path / "e.cpft.safetensors"
    assert cli.main(["compress", str(folder), "-o", str(out), "-k", "0.1", "--allocate", "error", "-q"]) == 0
    assert compeft_rs.load_expert(out).allocate == "error"
