"""merge(..., convention="mergekit") against mergekit itself: its generalized task arithmetic
(TIES with "sum" and "count" consensus, normalize on; task arithmetic) run by mergekit's own code on
the decoded experts, and a merged model's outputs against the model mergekit builds from the same
base and fine-tunes."""

import dataclasses
import itertools
import math
import struct
from fractions import Fraction

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import compeft_rs

# mergekit's in-memory API (merge_tensors, merge_state_dicts) came with mergekit 0.1.5.
mk_api = pytest.importorskip("mergekit.merge_methods.api", reason="needs mergekit>=0.1.5 (the test extra)")
from mergekit.merge_methods import get as mk_get  # noqa: E402
from mergekit.merge_methods.generalized_task_arithmetic import ConsensusMethod  # noqa: E402

EPS = torch.finfo(torch.float32).eps
# mergekit registers TIES with the "sum" consensus only; its "count" consensus is the same merge
# class with the other consensus (what mergekit's legacy `--naive-count` selects).
MK_METHODS = {
    ("ties", "total"): mk_get("ties"),
    ("ties", "frequency"): dataclasses.replace(mk_get("ties"), consensus_method=ConsensusMethod.count,
                                               method_name="ties_count"),
    ("task_arithmetic", "total"): mk_get("task_arithmetic"),
    ("task_arithmetic", "frequency"): mk_get("task_arithmetic"),
}


def fine_tunes(shapes, n, seed, ks, shared=0.7):
    """A base checkpoint and n full fine-tunes of it whose residuals share a component (so signs
    agree and disagree), each compressed at its own density."""
    g = torch.Generator().manual_seed(seed)
    names = [f"layer{i}.weight" for i in range(len(shapes))]
    base = {n: torch.randn(s, generator=g) for n, s in zip(names, shapes)}
    common = {n: torch.randn(s, generator=g) for n, s in zip(names, shapes)}
    experts = []
    for i in range(n):
        ft = {n: base[n] + 0.1 * (i + 1) * (shared * common[n] + torch.randn(b.shape, generator=g))
              for n, b in base.items()}
        experts.append(compeft_rs.compress_expert(ft, ks[i % len(ks)], base=base))
    return base, experts


def mergekit_merge(taus, weights, method, majority, lam, density=None):
    """mergekit's merge of task vectors taus, in their dtype (float32): its base is zero, so the
    deltas it takes are taus exactly."""
    params = {"weight": list(weights), "lambda": lam, "normalize": method == "ties"}
    if method == "ties" and density is not None:
        params["density"] = density
    zero = torch.zeros_like(taus[0])
    return mk_api.merge_tensors([zero, *taus], MK_METHODS[method, majority], base_index=0, parameters=params)


def torch_tail(numel, n):
    """How many trailing (row-major) entries torch's ``sum(dim=0)`` over a stack of n tensors adds
    in another order than stream order, at most: none for up to 4 rows (at::native's cascade sum
    adds them in order from 0); from 5 rows on, the entries after its last whole block of 4
    vectors (32 entries with AVX2 kernels, at most 64) are added 4 rows at a time, ((r0 + r4) +
    r1) + ... for 5."""
    return 0 if n <= 4 else numel % 64


def f32(x):
    """x rounded to float32."""
    return struct.unpack("f", struct.pack("f", x))[0]


def divisor_condition(weights):
    """The condition of TIES's divisor, a float32 sum of the agreeing weights, under reordering:
    max over subsets of sum |w| / |sum w| (the weights rounded to float32, as mergekit's weight
    tensor holds them), the factor by which a change of summation order can move the sum relative
    to its rounding; 0 where every such sum is exact (multiples of 1/8), inf where one is exactly
    0 (divided by 1 in one order, by a rounding residue in another)."""
    w = [x for x in map(f32, weights) if x != 0]
    if all((x * 8).is_integer() for x in w):
        return 0.0
    cond = 0.0
    for r in range(2, len(w) + 1):
        for sub in itertools.combinations(w, r):
            total = sum(map(Fraction, sub))
            cond = max(cond, math.inf if total == 0 else float(sum(abs(Fraction(x)) for x in sub) / abs(total)))
    return cond


shape = st.lists(st.integers(1, 40), min_size=1, max_size=3).map(tuple)
# Weights: multiples of 1/8 (exact in float32 sums) or any float (tiny ones round to 0 or to a
# subnormal in float32, as in mergekit's weight tensor; an expert weighted to 0 has no vote in
# either).
weight = st.one_of(st.integers(-16, 16).map(lambda i: i / 8), st.floats(-2.0, 2.0, allow_nan=False))


@given(
    shapes=st.lists(shape, min_size=1, max_size=3),
    n=st.sampled_from([3, 2, 4, 5, 1]),
    seed=st.integers(0, 2**31 - 1),
    ks=st.lists(st.sampled_from([0.05, 0.1, 0.3, 1.0]), min_size=1, max_size=3),
    weights=st.lists(weight, min_size=5, max_size=5),
    method=st.sampled_from(["ties", "task_arithmetic"]),
    majority=st.sampled_from(["total", "frequency"]),
    lam=st.sampled_from([1.0, 0.5, -1.0, 3.0]),
    trim=st.none() | st.floats(0.0, 1.0),
)
def test_equals_mergekit(shapes, n, seed, ks, weights, method, majority, lam, trim):
    """Bit for bit what mergekit gives merging the decoded float32 experts (in float32, as it runs
    on float32 models), for any weights: both take the same float32 products and sum them in the
    same order. From 5 experts on, the entries torch adds in another order (torch_tail) are
    compared to the rounding that order can move."""
    w = weights[:n]
    cond = divisor_condition(w)
    # Only for 5 experts, on those last entries: a divisor (sum of agreeing weights) that is
    # exactly 0 in one order and a rounding residue in another divides by 1 in one and by ~1e-8 in
    # the other; neither means anything.
    assume(n <= 4 or method == "task_arithmetic" or cond < math.inf)
    base, experts = fine_tunes(shapes, n, seed, ks)
    taus = {name: [e.decode([name], dtype=torch.float32)[name] for e in experts] for name in base}
    density = None
    if trim is not None:
        # Trimmed only at or above every expert's own density: below it, every kept entry of a
        # stream ties in magnitude, and which ones survive is each side's tie order (row-major
        # here, torch's unstable argsort in mergekit); test_trim_keeps_as_many_as_mergekit
        # checks what does not depend on it. mergekit keeps max(1, int(density * numel)).
        own = max(int(torch.count_nonzero(t)) / t.numel() for ts in taus.values() for t in ts)
        density = own + trim * (1.0 - own)
        assume(all(max(1, int(density * t.numel())) >= int(torch.count_nonzero(t))
                   for ts in taus.values() for t in ts))
    got = compeft_rs.merge(experts, method, weights=w, majority_sign=majority, density=density, lam=lam,
                           convention="mergekit")
    assert sorted(got) == sorted(base)
    for name, ts in taus.items():
        assert got[name].dtype == torch.float32 and got[name].shape == base[name].shape
        want = mergekit_merge(ts, w, method, majority, lam, density)
        assert want.dtype == torch.float32
        g, m = got[name].reshape(-1), want.reshape(-1)
        body = g.numel() - torch_tail(g.numel(), n)
        torch.testing.assert_close(g[:body], m[:body], rtol=0, atol=0)
        # Bits, not only values: neither gives -0.0 (merge() adds + 0.0, mergekit adds a zero base).
        assert torch.equal(g[:body].view(torch.int32), m[:body].view(torch.int32))
        if body == g.numel():
            continue
        # Each side's float32 sums round by at most (n - 1) half-ulps of the sum of the
        # magnitudes: relative to sum |w_i tau_i| for task arithmetic (its terms cancel), to the
        # value for TIES's agreeing sum, and to the divisor's condition for its divisor. (A TIES
        # tally within that rounding of 0 could elect differently in the two orders; random
        # scales put none there: in a probe of 600 random merges, 342 had such entries, 89 were
        # not bit-equal there, all within 0.13 of this bound.)
        if method == "task_arithmetic":
            bound = abs(lam) * sum(abs(f32(x)) * t.abs().max().item() for x, t in zip(w, ts))
            torch.testing.assert_close(g[body:], m[body:], rtol=0, atol=8 * EPS * bound)
        else:
            torch.testing.assert_close(g[body:], m[body:], rtol=8 * EPS * (1 + cond), atol=0)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(16, 48)
        self.norm = torch.nn.LayerNorm(48)
        self.down = torch.nn.Linear(48, 8)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.norm(self.up(x))))


@pytest.mark.parametrize("method,majority", [("ties", "total"), ("ties", "frequency"), ("task_arithmetic", "total")])
def test_merged_model_outputs_equal_mergekit(method, majority):
    """What a user does with mergekit: the base model and the fine-tunes (decoded from their
    compressed experts) merged by mergekit.merge_state_dicts; the same merge by compeft_rs is
    the base plus merge()'s task vector. Unequal weights, one negative."""
    torch.manual_seed(0)
    base_model = Net()
    base = {n: t.detach().clone() for n, t in base_model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    common = {n: torch.randn(t.shape, generator=g) for n, t in base.items()}
    experts = []
    for i, k in enumerate([0.1, 0.3, 0.2]):
        ft = {n: b + 0.05 * (0.7 * common[n] + torch.randn(b.shape, generator=g)) for n, b in base.items()}
        experts.append(compeft_rs.compress_expert(ft, k, base=base))
    weights, lam = [1.0, -0.4, 0.7], 0.9
    models = {"base": base, **{f"e{i}": e.apply(base) for i, e in enumerate(experts)}}
    params = {"weight": {f"e{i}": w for i, w in enumerate(weights)}, "lambda": lam, "normalize": method == "ties"}
    want = mk_api.merge_state_dicts(models, MK_METHODS[method, majority], base="base", parameters=params)

    tau = compeft_rs.merge(experts, method, weights=weights, majority_sign=majority, lam=lam, convention="mergekit")
    ours = {n: base[n] + tau[n] for n in base}
    assert sorted(want) == sorted(ours)
    for n in base:
        # mergekit's deltas are (base + tau) - base in float32: tau to within an ulp of the base.
        torch.testing.assert_close(ours[n], want[n], rtol=1e-5, atol=1e-6)
    x = torch.randn(64, 16, generator=g)
    merged, theirs = Net(), Net()
    merged.load_state_dict(ours)
    theirs.load_state_dict(want)
    with torch.no_grad():
        out, ref = merged(x), theirs(x)
        assert (out - base_model(x)).abs().max() > 1e-2  # the merge changes the model
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("density", [0.01, 0.02, 0.05, 0.07, 0.5])
@pytest.mark.parametrize("w", [1.0, -2.5])
def test_trim_keeps_as_many_as_mergekit(density, w):
    """Below an expert's own density both keep int(density * numel) entries of the one magnitude;
    which ones (and so their signs) is each side's tie order, so only the magnitudes kept by one
    expert are compared."""
    _, (e,) = fine_tunes([(13, 11), (130,)], 1, 5, [0.6])
    got = compeft_rs.merge([e], "ties", weights=[w], density=density, convention="mergekit")
    for name, t in e.decode(dtype=torch.float32).items():
        assert int(density * t.numel()) >= 1
        want = mergekit_merge([t], [w], "ties", "total", 1.0, density)
        assert int(torch.count_nonzero(got[name])) == int(torch.count_nonzero(want)) == int(density * t.numel())
        torch.testing.assert_close(got[name].abs().reshape(-1).sort().values,
                                   want.abs().reshape(-1).sort().values, rtol=0, atol=0)


def constant(*values):
    """One expert per value: a 4-entry tensor every entry of which decodes to that float32 value."""
    return [compeft_rs.compress_expert({"w": torch.full((4,), float(v))}, 1.0, scale="mean") for v in values]


def decoded(experts):
    return [e.decode(dtype=torch.float32)["w"] for e in experts]


def one_entry():
    """An expert whose 130-entry tensor keeps one entry: which one survives a trim cannot depend
    on a tie order."""
    x = torch.zeros(130)
    x[17] = 2.0
    return compeft_rs.compress_expert({"w": x}, 1 / 130, scale="mean")


# Where merge() once parted from mergekit (each test checks first what mergekit gives, so that it
# cannot pass for another reason).
def test_vote_tie_in_float32_elects_as_mergekit():
    # The vote on values 0.1f, 0.2f, -0.3f: their float32 sum is exactly 0, which elects + (a
    # float64 tally, -7.5e-9, elected -).
    experts = constant(0.1, 0.2, -0.3)
    want = mergekit_merge(decoded(experts), [1.0] * 3, "ties", "total", 1.0)
    torch.testing.assert_close(want, torch.full((4,), 0.15))
    got = compeft_rs.merge(experts, "ties", convention="mergekit")["w"]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_agreeing_weights_summing_to_zero_divide_by_one_as_mergekit():
    # Weights 0.1, 0.2, -0.3 on +1, +1, -1: every weighted entry is +, so all three agree; their
    # float32 sum is exactly 0, so mergekit divides by 1 (a float64 sum, 5.6e-17, divided by it).
    experts = constant(1.0, 1.0, -1.0)
    w = [0.1, 0.2, -0.3]
    want = mergekit_merge(decoded(experts), w, "ties", "total", 1.0)
    torch.testing.assert_close(want, torch.full((4,), 0.6))
    got = compeft_rs.merge(experts, "ties", weights=w, convention="mergekit")["w"]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("density", [0.001, 0.005])
def test_density_under_one_entry_keeps_one_as_mergekit(density):
    """mergekit's magnitude sparsification keeps max(1, int(density * numel)) entries for any
    density > 0: a density under 1/numel keeps one entry (peft's pruning, and so convention="peft",
    keeps none)."""
    e = one_entry()
    (t,) = decoded([e])
    assert int(torch.count_nonzero(t)) == 1 and int(density * t.numel()) == 0
    want = mergekit_merge([t], [1.0], "ties", "total", 1.0, density)
    torch.testing.assert_close(want, t, rtol=0, atol=0)
    got = compeft_rs.merge([e], "ties", density=density, convention="mergekit")["w"]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not compeft_rs.merge([e], "ties", density=density)["w"].any()
