"""merge() and similarity() against peft's merge_utils on the decoded experts and mergekit's
float32 arithmetic, bit for bit where torch sums a stack in order, with and without trimming."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import compeft_rs

merge_utils = pytest.importorskip("peft.utils.merge_utils")
# peft warns on every density >= 1 ("no pruning will be performed"), which is what is meant here.
pytestmark = pytest.mark.filterwarnings("ignore:The density .* no pruning")

# Plain task vectors (no LoRA names): merged entry by entry with the weights as they are. LoRA
# factors get peft's weight split instead; test_peft_parity.py checks those on the model.
SHAPES = {"a.q.weight": (4, 37), "a.v.weight": (29, 4), "b.bias": (130,), "c.conv.weight": (3, 5, 7)}


def make_experts(n, seed, ks, dtype=torch.float32, shapes=SHAPES, shared=0.7, residual=False):
    """n experts whose task vectors share a component (so signs agree and disagree), each at its
    own density and scale: tensors compressed in their own dtype, or with ``residual`` the
    float32 residuals against a zero base."""
    g = torch.Generator().manual_seed(seed)
    common = {name: torch.randn(s, generator=g) for name, s in shapes.items()}
    out = []
    for i in range(n):
        t = {name: (shared * c + torch.randn(c.shape, generator=g)).to(dtype) for name, c in common.items()}
        base = {name: torch.zeros_like(x) for name, x in t.items()} if residual else None
        out.append(compeft_rs.compress_expert(t, ks[i % len(ks)], 0.5 + i, base=base, scale="std", scope="per_tensor"))
    return out


def decoded(experts, name):
    return [e.decode([name], dtype=torch.float32)[name] for e in experts]


def first_kept(t, keep):
    """numpy: the first `keep` nonzero entries of t in row-major order, the rest zeroed."""
    flat = t.reshape(-1).copy()
    nz = np.flatnonzero(flat)
    flat[nz[keep:]] = 0
    return flat.reshape(t.shape)


def mergekit_reference(taus, weights, method, majority, lam):
    """mergekit's generalized task arithmetic (merge_group and get_mask) as it computes merging in
    float32, written out with torch on the deltas (no base)."""
    d = torch.stack([torch.as_tensor(t, dtype=torch.float32) for t in taus])
    w = torch.tensor(weights, dtype=torch.float32).reshape((-1,) + (1,) * (d.dim() - 1))
    wd = d * w
    if method == "task_arithmetic":
        mixed = wd.sum(0)
    else:
        sign = wd.sign()
        tally = wd.sum(0) if majority == "total" else sign.sum(0)
        mask = sign == (tally >= 0).float() * 2 - 1
        mixed = (wd * mask).sum(0)
        den = (w * mask).sum(0)
        den[den == 0] = 1
        mixed = mixed / den
    return scaled(mixed, lam)


def scaled(t, lam):
    """The result times lam as merge() applies it: in float32, never -0.0."""
    return (t * lam if lam != 1 else t) + 0.0


def assert_same(got, want):
    """Equal entry for entry, as float32 bits (so -0.0 and 0.0 differ)."""
    assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape
    bad = (got.view(torch.int32) != want.view(torch.int32)).nonzero()
    assert len(bad) == 0, f"{len(bad)} entries differ, first at {bad[0].tolist()}: {got[tuple(bad[0])]} != {want[tuple(bad[0])]}"


@given(
    n=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1),
    ks=st.lists(st.sampled_from([0.05, 0.1, 0.3, 1.0]), min_size=1, max_size=3),
    weights=st.lists(st.floats(-2.0, 2.0, allow_nan=False).filter(lambda x: abs(x) > 1e-3), min_size=5, max_size=5),
    majority=st.sampled_from(["total", "frequency"]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
)
def test_peft_convention_equals_peft_merge_utils(n, seed, ks, weights, majority, dtype):
    experts = make_experts(n, seed, ks, dtype)
    w = weights[:n]
    ties = compeft_rs.merge(experts, "ties", weights=w, majority_sign=majority)
    ta = compeft_rs.merge(experts, "task_arithmetic", weights=w)
    for name in SHAPES:
        taus = decoded(experts, name)
        want = merge_utils.ties(taus, torch.tensor(w), 1.0, majority)
        torch.testing.assert_close(ties[name], want, rtol=2e-6, atol=1e-6)
        want = merge_utils.task_arithmetic(taus, torch.tensor(w))
        torch.testing.assert_close(ta[name], want, rtol=2e-6, atol=1e-6)
        assert ties[name].dtype == torch.float32 and ties[name].shape == SHAPES[name]


@pytest.mark.parametrize("majority", ["total", "frequency"])
def test_density_above_own_density_equals_peft_pruning(majority):
    experts = make_experts(4, 3, [0.1, 0.2])
    w = [1.0, 0.5, 2.0, 0.7]
    got = compeft_rs.merge(experts, "ties", weights=w, majority_sign=majority, density=0.25)
    for name in SHAPES:
        want = merge_utils.ties(decoded(experts, name), torch.tensor(w), 0.25, majority)
        torch.testing.assert_close(got[name], want, rtol=2e-6, atol=1e-6)


@given(
    n=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
    density=st.floats(0.0, 1.0),
    weights=st.lists(st.floats(-2.0, 2.0, allow_nan=False), min_size=4, max_size=4),
    method=st.sampled_from(["ties", "task_arithmetic"]),
    majority=st.sampled_from(["total", "frequency"]),
    convention=st.sampled_from(["peft", "mergekit"]),
    lam=st.sampled_from([1.0, 0.5, 3.0, -0.75]),
)
def test_against_the_references_with_trimming(n, seed, density, weights, method, majority, convention, lam):
    """Exactly, with the first int(density * numel) kept entries of each tensor (at least 1 for
    mergekit): task arithmetic (one rule, trimmed or not) and TIES equal peft's merge_utils and
    mergekit's float32 arithmetic bit for bit (up to 4 experts, where torch sums a stack in
    order)."""
    experts = make_experts(n, seed, [0.3, 0.6], residual=seed % 2 == 0)
    w = weights[:n]
    got = compeft_rs.merge(experts, method, weights=w, majority_sign=majority, density=density,
                           lam=lam, convention=convention)
    for name, shape in SHAPES.items():
        keep = int(density * int(np.prod(shape)))
        if convention == "mergekit" and density > 0:
            keep = max(1, keep)  # mergekit's magnitude sparsification keeps at least one entry
        tt = [torch.from_numpy(first_kept(t.numpy(), keep)) for t in decoded(experts, name)]
        if convention == "mergekit":
            want = mergekit_reference(tt, w, method, majority, lam)
        elif method == "ties":
            want = scaled(merge_utils.ties(tt, torch.tensor(w), 1.0, majority), lam)
        else:
            want = scaled(merge_utils.task_arithmetic(tt, torch.tensor(w)), lam)
        assert_same(got[name], want)


def one_magnitude_expert(seed, c, shape, dtype=torch.float32):
    """An expert of one tensor whose kept entries (about half, random signs) all have magnitude
    c, so that its scale (the mean kept |x|) is c exactly."""
    g = torch.Generator().manual_seed(seed)
    x = torch.full(shape, c) * torch.randint(-1, 2, shape, generator=g)
    return compeft_rs.compress_expert({"w": x.to(dtype)}, 1.0, scale="mean")


def test_ties_vote_is_float32_as_in_peft():
    """0.1f + 0.2f - 0.3f is exactly 0 in float32 and elects +, as peft's sum over the stacked
    tensors does; in float64 it is -7.5e-9, which elected - (the merge gave -0.30, peft +0.15)."""
    one = lambda v: compeft_rs.compress_expert({"w": torch.tensor([v, 0.0, 0.0])}, 1.0, scale="mean")  # noqa: E731
    experts = [one(0.1), one(0.2), one(-0.3)]
    taus = decoded(experts, "w")
    assert [t[0].item() for t in taus] == [torch.tensor(v).item() for v in (0.1, 0.2, -0.3)]
    for convention in ("peft", "mergekit"):
        got = compeft_rs.merge(experts, "ties", convention=convention)["w"]
        assert_same(got, merge_utils.ties(taus, torch.ones(3), 1.0, "total"))
        assert got[0].item() == pytest.approx(0.15)


@given(
    n=st.integers(1, 8),
    seed=st.integers(0, 2**31 - 1),
    scales=st.lists(st.sampled_from([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.9, 1.0, 1.1]), min_size=8, max_size=8),
    weights=st.lists(st.floats(-2.0, 2.0, allow_nan=False, width=32), min_size=8, max_size=8),
    majority=st.sampled_from(["total", "frequency"]),
)
def test_ties_and_task_arithmetic_equal_peft_bit_for_bit(n, seed, scales, weights, majority):
    """Experts whose scales are decimal fractions, so that the float32 vote ties where a float64
    one does not. Up to 4 experts any shape; more only where torch adds the stack in order (a
    tensor of whole 64-entry vector blocks: torch adds the entries of a last partial block 4
    rows at a time)."""
    shape = (3, 50) if n <= 4 else (4, 64)
    experts = [one_magnitude_expert(seed + i, scales[i], shape) for i in range(n)]
    w = weights[:n]
    taus = decoded(experts, "w")
    got = compeft_rs.merge(experts, "ties", weights=w, majority_sign=majority)["w"]
    # + 0.0: merge writes no -0.0 (peft gives one where the agreeing values are -0.0, a zero
    # weight, or a denormal sum rounds to it).
    assert_same(got, scaled(merge_utils.ties(taus, torch.tensor(w), 1.0, majority), 1.0))
    got = compeft_rs.merge(experts, "task_arithmetic", weights=w)["w"]
    assert_same(got, merge_utils.task_arithmetic(taus, torch.tensor(w)))


def test_task_arithmetic_across_output_ranges_equals_peft():
    """Tensors of three task-arithmetic output ranges (2^17 entries each, the last one short)
    with kept entries on both sides of each boundary, trimmed and not, against peft."""
    n = 2 * (1 << 17) + 1000
    g = torch.Generator().manual_seed(3)
    experts = []
    for i in range(3):
        x = torch.randn(n, generator=g) * 0.01
        for b in (1 << 17, 2 << 17):
            x[b - 2:b + 2] = torch.tensor([1.0, -1.0, 1.0, -1.0]) * (i + 1)
        experts.append(compeft_rs.compress_expert({"w": x}, 0.05, 0.5 + i, scale="std"))
    taus = decoded(experts, "w")
    for b in (1 << 17, 2 << 17):
        assert all(t[b - 1] != 0 and t[b] != 0 for t in taus)
    w = [0.7, -1.3, 0.25]
    got = compeft_rs.merge(experts, "task_arithmetic", weights=w)["w"]
    assert_same(got, merge_utils.task_arithmetic(taus, torch.tensor(w)))
    keep = int(0.03 * n)
    trimmed = [torch.from_numpy(first_kept(t.numpy(), keep)) for t in taus]
    assert all(t[(2 << 17) - 1:].abs().sum() == 0 and t[(1 << 17) - 1] != 0 for t in trimmed)
    got = compeft_rs.merge(experts, "task_arithmetic", weights=w, density=0.03)["w"]
    assert_same(got, merge_utils.task_arithmetic(trimmed, torch.tensor(w)))


def test_mergekit_differs_from_peft_where_weights_matter():
    experts = make_experts(3, 11, [0.5])
    w = [3.0, -1.0, 0.25]
    a = compeft_rs.merge(experts, weights=w, convention="peft")
    b = compeft_rs.merge(experts, weights=w, convention="mergekit")
    assert any(not torch.equal(a[n], b[n]) for n in SHAPES)


def test_ties_break_to_plus_and_zero_scale_experts_have_no_sign():
    x = {"w": torch.tensor([1.0, -1.0, 2.0, 0.0])}
    a = compeft_rs.compress_expert(x, 1.0, scale="mean")
    b = compeft_rs.compress_expert({"w": -x["w"]}, 1.0, scale="mean")
    got = compeft_rs.merge([a, b], "ties")["w"]
    s = a.decode()["w"].abs().max().item()
    # Each entry has one + and one - of the same magnitude: the tally is 0, + is elected.
    assert got.tolist() == [s, s, s, 0.0]
    const = compeft_rs.compress_expert({"w": torch.full((4,), 3.0)}, 1.0, scale="std")
    assert const.decode()["w"].abs().sum() == 0  # sigma 0: decodes to zeros
    got = compeft_rs.merge([const, b], "ties")["w"]
    torch.testing.assert_close(got, b.decode(dtype=torch.float32)["w"])


def test_exact_tensors_are_copied_or_averaged():
    g = torch.Generator().manual_seed(0)
    head = torch.randn(3, 4, generator=g)
    t = lambda: {"x.lora_A.weight": torch.randn(2, 8, generator=g), "head": head}  # noqa: E731
    a = compeft_rs.compress_expert(t(), 0.5, lossless=["head"])
    b = compeft_rs.compress_expert(t(), 0.5, lossless=["head"])
    assert torch.equal(compeft_rs.merge([a, b])["head"], head)
    other = {"x.lora_A.weight": torch.randn(2, 8, generator=g), "head": 2 * head}
    c = compeft_rs.compress_expert(other, 0.5, lossless=["head"])
    got = compeft_rs.merge([a, c], weights=[1.0, 3.0])["head"]
    torch.testing.assert_close(got, (head + 3 * 2 * head) / 4)
    with pytest.raises(ValueError, match="sum to 0"):
        compeft_rs.merge([a, c], weights=[1.0, -1.0])


def test_mismatched_experts_are_clear_errors(tmp_path):
    a, b = make_experts(2, 0, [0.1])
    other = dict(SHAPES, **{"b.bias": (131,)})
    c = make_experts(1, 0, [0.1], shapes=other)[0]
    with pytest.raises(ValueError, match=r"'b.bias' has shape \(131,\) in expert 1 but \(130,\) in expert 0"):
        compeft_rs.merge([a, c])
    d = make_experts(1, 0, [0.1], shapes={k: v for k, v in SHAPES.items() if k != "c.conv.weight"})[0]
    with pytest.raises(ValueError, match="expert 1 lacks 'c.conv.weight'"):
        compeft_rs.merge([a, d])
    t = {n: torch.randn(shape) for n, shape in SHAPES.items()}
    e = compeft_rs.compress_expert(t, 0.1, lossless=["c.conv.weight"])
    msg = "'c.conv.weight' is a delta from theta_init 'zero' in expert 0 but kept exactly in expert 1"
    with pytest.raises(ValueError, match=msg):
        compeft_rs.merge([a, e])
    c.save(tmp_path / "c.cpft.safetensors")
    with pytest.raises(ValueError, match=r"expert 2 \(.*c.cpft.safetensors\)"):
        compeft_rs.similarity([a, b, tmp_path / "c.cpft.safetensors"])
    with pytest.raises(ValueError, match="2 weights for 3 experts"):
        compeft_rs.merge([a, b, a], weights=[1, 2])
    for kw in [dict(method="dare"), dict(majority_sign="sum"), dict(convention="x"), dict(density=1.5),
               dict(lam=float("nan")), dict(weights=[1.0, float("inf")])]:
        with pytest.raises(ValueError):
            compeft_rs.merge([a, b], **kw)
    with pytest.raises(ValueError, match="no experts"):
        compeft_rs.merge([])


def test_similarity_equals_dense_cosine(tmp_path):
    experts = make_experts(5, 7, [0.05, 0.2, 1.0], dtype=torch.float16)
    experts[1].save(tmp_path / "one.cpft.safetensors")
    got = compeft_rs.similarity([experts[0], tmp_path / "one.cpft.safetensors"] + experts[2:])
    vecs = torch.stack([torch.cat([e.decode(dtype=torch.float64)[n].reshape(-1) for n in sorted(SHAPES)])
                        for e in experts])
    unit = vecs / vecs.norm(dim=1, keepdim=True)
    torch.testing.assert_close(got, unit @ unit.T, rtol=1e-12, atol=1e-12)
    assert got.dtype == torch.float64 and got.shape == (5, 5)


class Net(torch.nn.Module):
    def __init__(self, width=40):
        super().__init__()
        self.q = torch.nn.Linear(width, width)
        self.v = torch.nn.Linear(width, width)
        self.classifier = torch.nn.Linear(width, 3)


def peft_expert(seed, k=0.3):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], modules_to_save=["classifier"])
    m = peft.get_peft_model(Net(), cfg)
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.normal_(0, 0.05)
    return compeft_rs.compress_peft(m, k)


def test_compress_returns_an_expert_like_the_inputs():
    experts = [peft_expert(s) for s in (1, 2, 3)]
    merged = compeft_rs.merge(experts, "ties", weights=[1.0, 0.5, 0.25])
    out = compeft_rs.merge(experts, "ties", weights=[1.0, 0.5, 0.25], compress=0.2)
    assert isinstance(out, compeft_rs.CompressedExpert)
    assert out.keys() == experts[0].keys() and out.peft_config == experts[0].peft_config
    assert out.lossless_keys() == experts[0].lossless_keys()
    for n in out.keys():
        assert out.init_of(n) == experts[0].init_of(n) and out.dtype_of(n) == experts[0].dtype_of(n)
    for n in out.compressed_keys():
        m = merged[n].reshape(-1).numpy()
        d = out.decode([n])[n].reshape(-1).numpy()
        kept = np.flatnonzero(d)
        assert len(kept) == min(int(0.2 * m.size + 0.5), np.count_nonzero(m))
        assert np.all(np.sign(d[kept]) == np.sign(m[kept]))
        # the kept entries are the largest of the merge
        assert np.abs(m[kept]).min() >= np.abs(np.delete(m, kept)).max(initial=0)
    for n in out.lossless_keys():
        torch.testing.assert_close(out.lossless(n).float(), merged[n])


def test_cli_merge_writes_an_expert_or_a_peft_folder(tmp_path):
    from compeft_rs.cli import main

    paths = []
    for s in (1, 2):
        paths.append(tmp_path / f"e{s}.cpft.safetensors")
        peft_expert(s).save(paths[-1])
    out = tmp_path / "m.cpft.safetensors"
    assert main(["merge", *map(str, paths), "-o", str(out), "--weights", "1", "2", "-k", "0.1", "-q"]) == 0
    e = compeft_rs.load_expert(out)
    assert e.k == 0.1 and e.keys() == compeft_rs.load_expert(paths[0]).keys()
    assert main(["merge", *map(str, paths), "-o", str(out), "-q"]) == 3  # exists, no --force
    folder = tmp_path / "merged"
    assert main(["merge", *map(str, paths), "-o", str(folder), "--method", "task_arithmetic", "-q"]) == 0
    from safetensors.torch import load_file

    state = load_file(str(folder / "adapter_model.safetensors"))
    want = compeft_rs.merge(paths, "task_arithmetic")
    assert set(state) == set(want)
    for n, t in state.items():
        torch.testing.assert_close(t.float(), want[n])
    assert main(["merge", str(paths[0]), str(tmp_path / "missing.cpft.safetensors"), "-o", str(tmp_path / "x")]) == 4
