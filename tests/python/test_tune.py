"""compeft_rs.tune: grid over (k, alpha), selection reused per k, model left as found."""

import numpy as np
import pytest
import torch

import compeft_rs
from compeft_rs._tune import TunePoint, pareto_front


def test_tune_dict_finds_the_best_alpha():
    torch.manual_seed(0)
    target = {"w.lora_A.weight": torch.randn(16, 32), "w.lora_B.weight": torch.randn(32, 16)}
    calls = []

    def evaluate(weights):
        calls.append(1)
        # Negative squared error to the uncompressed weights: higher is better.
        return -sum(float(((weights[n] - target[n]) ** 2).sum()) for n in target)

    r = compeft_rs.tune(target, evaluate, ks=(0.1, 0.5), alphas=(0.25, 1, 2, 4), scopes=("global",), scales=("std",),
                        progress=False)
    # The grid's 8 points and the defaults (per_tensor, pair_proj, k=0.1, alpha 1), always evaluated first.
    assert len(r.points) == 9 == len(calls)
    assert (r.points[0].scope, r.points[0].scale, r.points[0].alpha) == ("per_tensor", "pair_proj", 1.0) == \
        (r.default.scope, r.default.scale, r.default.alpha)
    assert r.best == max(r.points, key=lambda p: p.score) and r.noise is None
    # The chosen expert is the compressed expert at the best point.
    e = r.expert
    assert (e.k, e.alpha) == (r.best.k, r.best.alpha)
    assert evaluate(e.apply()) == pytest.approx(r.best.score, rel=1e-6)
    # A point's score equals evaluating a fresh compression at that (k, alpha).
    p = next(p for p in r.points if p.k == 0.5 and p.alpha == 2)
    assert evaluate(compeft_rs.compress_expert(target, 0.5, 2, scope="global", scale="std").apply()) == pytest.approx(p.score, rel=1e-6)
    # Bytes depend on k only.
    assert len({p.nbytes for p in r.points if p.k == 0.1 and p.scope == "global"}) == 1


def test_default_tune_searches_scopes_and_scale_rules():
    g = torch.Generator().manual_seed(3)
    target = {"w.lora_A.weight": torch.randn(8, 40, generator=g), "w.lora_B.weight": torch.randn(40, 8, generator=g) / 30,
              "v.ia3_l.weight": 1 + torch.randn(1, 40, generator=g) / 10}
    dense = {n: t.double() for n, t in target.items()}

    def evaluate(weights):  # negative error of the product B.A and of the (IA)3 vector
        prod = weights["w.lora_B.weight"].double() @ weights["w.lora_A.weight"].double()
        want = dense["w.lora_B.weight"] @ dense["w.lora_A.weight"]
        return -float(((prod - want) ** 2).sum() + ((weights["v.ia3_l.weight"].double() - dense["v.ia3_l.weight"]) ** 2).sum())

    r = compeft_rs.tune(target, evaluate, progress=False)
    combos = {(p.scope, p.scale) for p in r.points}
    assert combos == {(s, c) for s in ("per_tensor", "global") for c in compeft_rs._scale.SCALES}
    assert {p.k for p in r.points} == {0.1}
    assert {p.alpha for p in r.points if p.scale == "std"} == {1, 2, 4, 8, 16, 32}
    assert 1.0 in {p.alpha for p in r.points if p.scale == "pair"}
    # Every point scores what a fresh compression at its (scope, scale, alpha) scores: alpha
    # multiplies every stored scale, the pair rule's included.
    for p in r.points:
        e = compeft_rs.compress_expert(target, p.k, p.alpha, scope=p.scope, scale=p.scale)
        assert evaluate(e.apply()) == pytest.approx(p.score, rel=1e-6), p
    e = r.expert
    assert (e.scope, e.scale, e.alpha) == (r.best.scope, r.best.scale, r.best.alpha)


def test_pareto_front():
    pts = [TunePoint(0.1, 1, 0.80, 100), TunePoint(0.2, 1, 0.79, 200), TunePoint(0.3, 1, 0.85, 300),
           TunePoint(0.05, 1, 0.70, 50)]
    assert [p.nbytes for p in pareto_front(pts)] == [50, 100, 300]


def test_tune_peft_model_restores_weights():
    peft = pytest.importorskip("peft")

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.lin(x)

    torch.manual_seed(0)
    model = peft.get_peft_model(Tiny(), peft.LoraConfig(r=2, target_modules=["lin"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(4, 8)

    def evaluate(m):
        assert m is model
        return float(m(x).sum())

    r = compeft_rs.tune(model, evaluate, ks=(0.5,), alphas=(1, 3), scopes=("global",), scales=("std",), progress=False)
    assert len(r.points) == 3 and r.expert.peft_config is not None  # the grid's 2 and the defaults
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    with pytest.raises(RuntimeError):
        compeft_rs.tune(model, lambda m: (_ for _ in ()).throw(RuntimeError("boom")), ks=(0.5,), alphas=(1,),
                        progress=False)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_densities_share_one_histogram_and_equal_separate_runs(scope):
    from compeft_rs._expert import compress_expert_densities

    g = torch.Generator().manual_seed(4)
    sd = {"a.lora_A.weight": torch.randn(8, 300, generator=g), "a.lora_B.weight": torch.randn(300, 8, generator=g) / 9,
          "b.ia3_l.weight": 1 + torch.randn(1, 77, generator=g) / 5, "c.lora_A.weight": torch.zeros(0, 4)}
    ks = (0.05, 0.1, 0.5, 1.0)
    many = compress_expert_densities(sd, ks, 2.0, scope=scope)
    for k in ks:
        one = compeft_rs.compress_expert(sd, k, 2.0, scope=scope)
        assert many[k].keys() == one.keys()
        for n in one.compressed_keys():
            assert many[k].stream(n) == one.stream(n), (k, n)
        assert all(torch.equal(many[k].apply()[n], one.apply()[n]) for n in sd)


# --- Keeping the defaults unless a candidate beats them by more than the validation noise ---

N_VAL = 300


def _tiny_expert():
    g = torch.Generator().manual_seed(11)
    return {"w.lora_A.weight": torch.randn(4, 16, generator=g), "w.lora_B.weight": torch.randn(16, 4, generator=g) / 4,
            "v.lora_A.weight": torch.randn(4, 12, generator=g), "v.lora_B.weight": torch.randn(12, 4, generator=g) / 4}


def _same(a, b):
    return all(torch.allclose(a[n].float(), b[n].float(), rtol=1e-5, atol=1e-7) for n in b)


class BernoulliValidation:
    """Per-example 0/1 correctness: the defaults and every candidate right with probability 0.8,
    except ``better`` (a (scope, scale, alpha) point), right with probability ``p_better``.
    Each point gets its own draws, so equal-mean points differ by sampling noise only. The
    defaults' draws (seed 10) score exactly 0.8, their true rate: with a chance-low default any
    candidate can look better, and the rule lets one through in up to 5% of such searches
    (0.95 confidence; 3% measured over 200 simulated 35-candidate searches on 300 examples)."""

    def __init__(self, expert, better=None, p_better=0.8, n=N_VAL, p_default=0.8, p_other=0.8):
        self.n, self.p_better, self.p_default, self.p_other, self.calls = n, p_better, p_default, p_other, 0
        self.default = compeft_rs.compress_expert(expert, 0.1, 1.0, scope="per_tensor", scale="pair_proj").apply()
        self.better = None
        if better is not None:
            scope, scale, alpha = better
            self.better = compeft_rs.compress_expert(expert, 0.1, alpha, scope=scope, scale=scale).apply()

    def __call__(self, weights):
        self.calls += 1
        if _same(weights, self.default):
            seed, p = 10, self.p_default
        elif self.better is not None and _same(weights, self.better):
            seed, p = 1, self.p_better
        else:
            seed, p = 100 + self.calls, self.p_other
        return (np.random.default_rng(seed).random(self.n) < p).astype(np.float64)


def test_noise_only_candidates_keep_the_defaults():
    expert = _tiny_expert()
    # Plain argmax over 42 equal-mean points picks a candidate: that is the overfitting.
    argmax = compeft_rs.tune(expert, BernoulliValidation(expert), confidence=None, progress=False)
    assert len(argmax.points) == 42 and argmax.noise is None
    assert argmax.best != argmax.default and argmax.best.score > argmax.default.score
    r = compeft_rs.tune(expert, BernoulliValidation(expert), progress=False)
    d = r.default
    assert (d.scope, d.scale, d.k, d.alpha) == ("per_tensor", "pair_proj", 0.1, 1.0)
    assert r.points[0] == d and d.noise is None
    assert r.best == d
    assert (r.expert.scope, r.expert.scale, r.expert.k, r.expert.alpha) == ("per_tensor", "pair_proj", 0.1, 1.0)
    # Same scores as the argmax run (same draws), so the best candidate is the same one.
    assert [p.score for p in r.points] == [p.score for p in argmax.points]
    top = max(r.points[1:], key=lambda p: (p.score, -p.nbytes))
    assert r.noise == top.noise
    # It fell short of its margin; the margin is a few standard errors of a paired difference
    # of two independent Bernoulli(0.8) draws (sd 0.566 per example).
    se = (2 * 0.8 * 0.2 / N_VAL) ** 0.5
    assert top.score - d.score <= r.noise
    assert 2 * se < r.noise < 4.5 * se
    assert all(p.noise is not None for p in r.points[1:])
    assert "bootstrap" in r.rule and "Bonferroni over 41" in r.rule
    t = r.table()
    assert "noise: " in t and "defaults: per_tensor/pair_proj k=0.1 alpha=1" in t and "(kept)" in t


def test_a_clearly_better_candidate_wins():
    expert = _tiny_expert()
    better = ("global", "std", 4.0)
    r = compeft_rs.tune(expert, BernoulliValidation(expert, better, p_better=0.95), progress=False)
    assert (r.best.scope, r.best.scale, r.best.alpha) == better
    assert r.best.score - r.default.score > r.noise == r.best.noise > 0
    assert (r.expert.scope, r.expert.scale, r.expert.alpha) == better
    # A 0.05 gain on 300 examples is within the noise of a 41-candidate search: the defaults stay.
    r = compeft_rs.tune(expert, BernoulliValidation(expert, better, p_better=0.85), progress=False)
    assert r.best == r.default



def test_candidates_are_tested_against_the_defaults_not_each_other():
    expert = _tiny_expert()
    # The defaults are right 90% of the time, one candidate 80%, the rest 60%: that candidate
    # clearly beats the other candidates, never the defaults.
    better = ("global", "std", 4.0)
    r = compeft_rs.tune(expert, BernoulliValidation(expert, better, p_better=0.8, p_default=0.9, p_other=0.6),
                        progress=False)
    assert r.best == r.default and r.default.score > 0.85
    top = max(r.points[1:], key=lambda p: p.score)
    assert (top.scope, top.scale, top.alpha) == better and r.noise == top.noise
    # Each margin is measured on the difference to the defaults: it is a few standard errors
    # of that difference, and every candidate fell short of it.
    for p in r.points[1:]:
        assert p.score - r.default.score < 0 < p.noise < 0.15, p


def test_bootstrap_is_reproducible_and_seeded():
    expert = _tiny_expert()
    a = compeft_rs.tune(expert, BernoulliValidation(expert), progress=False)
    b = compeft_rs.tune(expert, BernoulliValidation(expert), progress=False)
    assert a.points == b.points and a.best == b.best and a.noise == b.noise
    c = compeft_rs.tune(expert, BernoulliValidation(expert), progress=False, seed=1)
    assert [p.score for p in c.points] == [p.score for p in a.points]
    assert [p.noise for p in c.points] != [p.noise for p in a.points]


def test_bootstrap_quantile_matches_a_plain_loop():
    from compeft_rs._tune import _bootstrap_lower

    rng = np.random.default_rng(5)
    diffs = rng.normal(0.02, 0.3, size=(3, 40))
    q = 0.05 / 3
    got = _bootstrap_lower(diffs, q, seed=7)
    # Reference: the same Generator stream, one resample at a time, the mean of the drawn
    # differences, then the lower order statistic at q.
    resamples = max(1000, int(np.ceil(25 / q)))
    draws = np.random.Generator(np.random.PCG64(7)).integers(0, 40, size=(resamples, 40))
    for j in range(3):
        means = np.sort([diffs[j, row].mean() for row in draws])
        assert got[j] == pytest.approx(means[int(np.floor(q * (resamples - 1)))], abs=1e-12)
        assert got[j] < diffs[j].mean()


def test_float_callback_is_argmax_or_uses_the_declared_noise():
    expert = _tiny_expert()
    dense = {n: t.double() for n, t in expert.items()}

    def evaluate(weights):  # a plain float, higher is better
        return -sum(float(((weights[n].double() - dense[n]) ** 2).sum()) for n in dense)

    r = compeft_rs.tune(expert, evaluate, progress=False)
    assert r.best == max(r.points, key=lambda p: (p.score, -p.nbytes))
    assert r.noise is None and "no noise estimate" in r.rule and "noise: none" in r.table()
    assert r.default == r.points[0] and all(p.noise is None for p in r.points)
    gap = r.best.score - r.default.score
    assert gap > 0
    kept = compeft_rs.tune(expert, evaluate, noise=gap * 1.01, progress=False)
    assert kept.best == kept.default and kept.noise == pytest.approx(gap * 1.01)
    won = compeft_rs.tune(expert, evaluate, noise=gap * 0.99, progress=False)
    assert won.best.score == r.best.score and won.best != won.default
    # A tensor or numpy scalar is a number too.
    r2 = compeft_rs.tune(expert, lambda w: torch.tensor(evaluate(w)), ks=(0.5,), alphas=(1, 2), scopes=("global",),
                         scales=("norm",), progress=False)
    assert r2.noise is None and len(r2.points) == 3


def test_defaults_are_evaluated_even_outside_the_grid():
    expert = _tiny_expert()
    seen = []

    def evaluate(weights):
        seen.append(1)
        return torch.ones(10)  # per-example, all tied: nothing can beat the defaults

    r = compeft_rs.tune(expert, evaluate, ks=(0.2, 0.5), alphas=(2.0,), scopes=("global",), scales=("std",),
                        progress=False)
    assert len(r.points) == 3 == len(seen)
    assert (r.default.scope, r.default.scale, r.default.k, r.default.alpha) == ("per_tensor", "pair_proj", 0.2, 1.0)
    assert r.best == r.default == r.points[0]
    assert r.noise == 0.0  # identical scores: no difference, no spread
    # The library's k = 0.1 is the defaults' k whenever the grid has it, wherever it is listed.
    r = compeft_rs.tune(expert, evaluate, ks=(0.05, 0.1), alphas=(1.0, 2.0), scopes=("per_tensor",),
                        scales=("pair_proj",), progress=False)
    assert len(r.points) == 4
    assert (r.default.scope, r.default.scale, r.default.k, r.default.alpha) == ("per_tensor", "pair_proj", 0.1, 1.0)
    assert r.best == r.default == r.points[0]


def test_bad_return_values_are_clear_errors():
    expert = _tiny_expert()
    small = dict(ks=(0.5,), alphas=(1, 2), scopes=("global",), scales=("norm",), progress=False)
    sizes = iter([300, 299, 300])
    with pytest.raises(ValueError, match="300 per-example scores at the first point and 299"):
        compeft_rs.tune(expert, lambda w: np.ones(next(sizes)), **small)
    with pytest.raises(ValueError, match="NaN or infinite"):
        compeft_rs.tune(expert, lambda w: np.array([1.0, float("nan")]), **small)
    with pytest.raises(ValueError, match="NaN or infinite"):
        compeft_rs.tune(expert, lambda w: float("nan"), **small)
    kinds = iter([np.ones(4), 0.5, 0.5])
    with pytest.raises(ValueError, match="return the same kind"):
        compeft_rs.tune(expert, lambda w: next(kinds), **small)
    with pytest.raises(ValueError, match="1-d"):
        compeft_rs.tune(expert, lambda w: np.ones((2, 3)), **small)
    with pytest.raises(ValueError, match="a number"):
        compeft_rs.tune(expert, lambda w: "accuracy", **small)
    with pytest.raises(ValueError, match="confidence"):
        compeft_rs.tune(expert, lambda w: 1.0, confidence=1.5, **small)
    with pytest.raises(ValueError, match="noise"):
        compeft_rs.tune(expert, lambda w: 1.0, noise=-1, **small)
