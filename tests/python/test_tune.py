"""compeft_rs.tune: grid over (k, alpha), selection reused per k, model left as found."""

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
    assert len(r.points) == 8 == len(calls)
    assert r.best == max(r.points, key=lambda p: p.score)
    # The chosen expert is the compressed expert at the best point.
    e = r.expert
    assert (e.k, e.alpha) == (r.best.k, r.best.alpha)
    assert evaluate(e.apply()) == pytest.approx(r.best.score, rel=1e-6)
    # A point's score equals evaluating a fresh compression at that (k, alpha).
    p = next(p for p in r.points if p.k == 0.5 and p.alpha == 2)
    assert evaluate(compeft_rs.compress_expert(target, 0.5, 2, scope="global", scale="std").apply()) == pytest.approx(p.score, rel=1e-6)
    # Bytes depend on k only.
    assert len({p.nbytes for p in r.points if p.k == 0.1}) == 1


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
    assert len(r.points) == 2 and r.expert.peft_config is not None
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
