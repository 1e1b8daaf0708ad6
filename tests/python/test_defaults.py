"""The defaults per kind of expert (scope=None, scale=None), as the accuracy study chose: LoRA
per tensor with the pair_proj rule in the balanced gauge, a full fine-tune's residuals and task
vectors per tensor with pair_proj (= proj), (IA)3 vectors under one global threshold with the
pair (= norm) rule; what the defaults give equals the explicit choice, for every path (dict, PEFT
folder, checkpoint, tune, CLI)."""

import json

import numpy as np
import torch

import compeft_rs


def lora(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"base_model.model.q.lora_A.weight": torch.randn(4, 32, generator=g),
            "base_model.model.q.lora_B.weight": torch.randn(32, 4, generator=g) * 0.01,
            "base_model.model.v.lora_A.weight": torch.randn(4, 32, generator=g) * 3,
            "base_model.model.v.lora_B.weight": torch.randn(32, 4, generator=g)}


def full(seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {"a.weight": torch.randn(16, 20, generator=g), "b.weight": torch.randn(8, 20, generator=g)}
    # Residuals of very different sizes: one threshold and per-tensor top-k keep different entries.
    ft = {"a.weight": base["a.weight"] + 0.1 * torch.randn(16, 20, generator=g),
          "b.weight": base["b.weight"] + 0.001 * torch.randn(8, 20, generator=g),
          "head.weight": torch.randn(2, 20, generator=g)}
    return ft, base


def same(a, b):
    return all(a.stream(n) == b.stream(n) for n in a.compressed_keys()) and a.compressed_keys() == b.compressed_keys()


def test_scope_and_scale_by_kind():
    e = compeft_rs.compress_expert(lora(), 0.1)
    assert (e.scope, e.scale, e.gauge) == ("per_tensor", "pair_proj", "balanced")
    assert same(e, compeft_rs.compress_expert(lora(), 0.1, scope="per_tensor", scale="pair_proj", gauge="balanced"))
    assert not same(e, compeft_rs.compress_expert(lora(), 0.1, gauge="as_trained"))
    ft, base = full()
    f = compeft_rs.compress_expert(ft, 0.1, base=base)
    assert (f.scope, f.scale) == ("per_tensor", "pair_proj")
    assert same(f, compeft_rs.compress_expert(ft, 0.1, base=base, scope="per_tensor", scale="proj"))
    assert not same(f, compeft_rs.compress_expert(ft, 0.1, base=base, scope="global"))
    # Per tensor: each residual keeps its own 10%, the small one too.
    assert (f.stream("b.weight").nnz, f.stream("a.weight").nnz) == (16, 32)
    # (IA)3 vectors: one threshold and the norm rule; plain task vectors per tensor; an explicit
    # choice always wins.
    ia3 = {"base_model.model.l.ia3_l": torch.linspace(-1, 1, 40) * 0.1 + 1.0,
           "base_model.model.m.ia3_l": torch.linspace(-1, 1, 60) * 0.01 + 1.0}
    i = compeft_rs.compress_expert(ia3, 0.1)
    assert (i.scope, i.scale) == ("global", "pair")
    assert same(i, compeft_rs.compress_expert(ia3, 0.1, scope="global", scale="norm"))
    assert (i.stream("base_model.model.l.ia3_l").nnz, i.stream("base_model.model.m.ia3_l").nnz) == (10, 0)
    assert compeft_rs.compress_expert({"w": torch.randn(50)}, 0.1).scope == "per_tensor"
    assert compeft_rs.compress_expert({"w": torch.randn(50)}, 0.1, scope="global").scope == "global"
    assert compeft_rs.compress_expert(ia3, 0.1, scale="proj").scale == "proj"
    # allocate="error" chooses densities per tensor: per-tensor scope whatever the kind.
    assert compeft_rs.compress_expert(ia3, 0.1, allocate="error").scope == "per_tensor"


def test_checkpoint_peft_and_cli_follow_the_same_rule(tmp_path):
    from safetensors.torch import save_file

    from compeft_rs import cli

    ft, base = full()
    save_file(ft, str(tmp_path / "ft.safetensors"))
    save_file(base, str(tmp_path / "base.safetensors"))
    ck = compeft_rs.compress_checkpoint(tmp_path / "ft.safetensors", 0.1, base=tmp_path / "base.safetensors")
    assert (ck.scope, ck.scale) == ("per_tensor", "pair_proj") and same(ck, compeft_rs.compress_expert(ft, 0.1, base=base))
    out = tmp_path / "r.cpft.safetensors"
    assert cli.main(["compress", str(tmp_path / "ft.safetensors"), "--base", str(tmp_path / "base.safetensors"),
                     "-o", str(out), "-k", "0.1", "-q"]) == 0
    assert (compeft_rs.load_expert(out).scope, compeft_rs.load_expert(out).scale) == ("per_tensor", "pair_proj")
    folder = tmp_path / "adapter"
    folder.mkdir()
    save_file(lora(), str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q", "v"], "base_model_name_or_path": "x"}))
    p = compeft_rs.compress_peft(folder, 0.1)
    assert (p.scope, p.scale, p.gauge) == ("per_tensor", "pair_proj", "balanced")
    out = tmp_path / "a.cpft.safetensors"
    assert cli.main(["compress", str(folder), "-o", str(out), "-k", "0.1", "-q"]) == 0
    assert same(compeft_rs.load_expert(out), p)


def test_tune_starts_from_the_kinds_defaults():
    ft, base = full()
    taus = {n: ft[n] - base[n] for n in base}
    target = {n: t.numpy().astype(np.float64) for n, t in taus.items()}

    def score(w):
        return -sum(float(((w[n].double().numpy() - target[n]) ** 2).sum()) for n in target)

    res = compeft_rs.tune(taus, score, confidence=None, progress=False)
    assert (res.default.scope, res.default.scale, res.default.alpha) == ("per_tensor", "pair_proj", 1.0)
    res = compeft_rs.tune(lora(), lambda w: 0.0, confidence=None, progress=False)
    assert (res.default.scope, res.default.scale) == ("per_tensor", "pair_proj")
    assert (res.points[0].scope, res.points[0].scale, res.points[0].nbytes) == (
        "per_tensor", "pair_proj", compeft_rs.compress_expert(lora(), 0.1).nbytes)
    ia3 = {"base_model.model.l.ia3_l": torch.linspace(-1, 1, 40) * 0.1 + 1.0}
    res = compeft_rs.tune(ia3, lambda w: 0.0, confidence=None, progress=False)
    assert (res.default.scope, res.default.scale) == ("global", "pair")
