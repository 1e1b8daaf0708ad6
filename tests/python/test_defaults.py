"""The defaults per kind of expert (scope=None): one global threshold for a full fine-tune's
residuals and task vectors, per-tensor top-k for adapters (LoRA, (IA)3), as the accuracy study
chose; what scope=None gives equals the
explicit scope, for every path (dict, PEFT folder, checkpoint, tune, CLI)."""

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


def test_scope_by_kind():
    e = compeft_rs.compress_expert(lora(), 0.1)
    assert e.scope == "per_tensor" and same(e, compeft_rs.compress_expert(lora(), 0.1, scope="per_tensor"))
    ft, base = full()
    f = compeft_rs.compress_expert(ft, 0.1, base=base)
    assert f.scope == "global" and same(f, compeft_rs.compress_expert(ft, 0.1, base=base, scope="global"))
    assert not same(f, compeft_rs.compress_expert(ft, 0.1, base=base, scope="per_tensor"))
    # One threshold: the small residual keeps nothing, the large one all 48 (10% of 480) entries.
    assert (f.stream("b.weight").nnz, f.stream("a.weight").nnz) == (0, 48)
    # Plain task vectors: global too; (IA)3 vectors per tensor; an explicit scope always wins.
    ia3 = {"base_model.model.l.ia3_l": torch.linspace(-1, 1, 40) * 0.1 + 1.0}
    assert compeft_rs.compress_expert(ia3, 0.1).scope == "per_tensor"
    assert compeft_rs.compress_expert({"w": torch.randn(50)}, 0.1).scope == "global"
    assert compeft_rs.compress_expert({"w": torch.randn(50)}, 0.1, scope="per_tensor").scope == "per_tensor"
    # allocate="error" chooses densities per tensor: per-tensor scope whatever the kind.
    assert compeft_rs.compress_expert(ft, 0.1, base=base, allocate="error").scope == "per_tensor"


def test_checkpoint_peft_and_cli_follow_the_same_rule(tmp_path):
    from safetensors.torch import save_file

    from compeft_rs import cli

    ft, base = full()
    save_file(ft, str(tmp_path / "ft.safetensors"))
    save_file(base, str(tmp_path / "base.safetensors"))
    ck = compeft_rs.compress_checkpoint(tmp_path / "ft.safetensors", 0.1, base=tmp_path / "base.safetensors")
    assert ck.scope == "global" and same(ck, compeft_rs.compress_expert(ft, 0.1, base=base))
    out = tmp_path / "r.cpft.safetensors"
    assert cli.main(["compress", str(tmp_path / "ft.safetensors"), "--base", str(tmp_path / "base.safetensors"),
                     "-o", str(out), "-k", "0.1", "-q"]) == 0
    assert compeft_rs.load_expert(out).scope == "global"
    folder = tmp_path / "adapter"
    folder.mkdir()
    save_file(lora(), str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q", "v"], "base_model_name_or_path": "x"}))
    assert compeft_rs.compress_peft(folder, 0.1).scope == "per_tensor"


def test_tune_starts_from_the_kinds_defaults():
    ft, base = full()
    taus = {n: ft[n] - base[n] for n in base}
    target = {n: t.numpy().astype(np.float64) for n, t in taus.items()}

    def score(w):
        return -sum(float(((w[n].double().numpy() - target[n]) ** 2).sum()) for n in target)

    res = compeft_rs.tune(taus, score, confidence=None, progress=False)
    assert (res.default.scope, res.default.scale, res.default.alpha) == ("global", "pair", 1.0)
    res = compeft_rs.tune(lora(), lambda w: 0.0, confidence=None, progress=False)
    assert res.default.scope == "per_tensor"
