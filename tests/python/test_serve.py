"""Serving: in-place swaps into a live PeftModel (the expert store: test_store.py; the vLLM resolver:
test_vllm.py)."""

import pytest
import torch

peft = pytest.importorskip("peft")

import compeft_rs  # noqa: E402
from compeft_rs import _serve  # noqa: E402


class Net(torch.nn.Module):
    def __init__(self, width=48):
        super().__init__()
        self.q = torch.nn.Linear(width, width)
        self.v = torch.nn.Linear(width, width)
        self.classifier = torch.nn.Linear(width, 3)

    def forward(self, x):
        return self.classifier(self.v(self.q(x)))


def peft_model(r=8, targets=("q", "v"), seed=0, dtype=torch.float32, adapters=("default",)):
    torch.manual_seed(seed)
    base = Net().to(dtype)
    cfg = peft.LoraConfig(r=r, lora_alpha=16, target_modules=list(targets), modules_to_save=["classifier"])
    m = peft.get_peft_model(base, cfg, adapter_name=adapters[0])
    for a in adapters[1:]:
        m.add_adapter(a, cfg)
    m = m.to(dtype)  # peft makes adapter weights float32 whatever the base; serving casts them
    # Trained-looking adapters: B no longer zero, distinct per adapter.
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.normal_(0, 0.05)
    return m


def an_expert(r=8, targets=("q", "v"), seed=5, k=0.3):
    m = peft_model(r=r, targets=targets, seed=seed)
    return compeft_rs.compress_peft(m, k)


def adapter_state(m, name):
    return {n: t.detach().clone() for n, t in peft.get_peft_model_state_dict(m, adapter_name=name).items()}


def snapshot(m):
    return {n: (p.data_ptr(), p.detach().clone()) for n, p in m.named_parameters()}


def test_load_into_writes_in_place_and_leaves_other_adapters_alone():
    m = peft_model(adapters=("default", "other"))
    before = snapshot(m)
    other = adapter_state(m, "other")
    e = an_expert()
    assert compeft_rs.load_into(m, e, adapter_name="default") == "default"
    after = snapshot(m)
    assert set(after) == set(before)  # no new parameters
    assert all(after[n][0] == before[n][0] for n in before)  # same storage
    want = e.apply()
    got = adapter_state(m, "default")
    assert set(got) == set(want)
    for n in want:
        assert torch.equal(got[n], want[n]), n
    for n, t in adapter_state(m, "other").items():
        assert torch.equal(t, other[n]), n
    # The head (modules_to_save) changed, the base weights did not.
    assert not torch.equal(after["base_model.model.classifier.modules_to_save.default.weight"][1],
                           before["base_model.model.classifier.modules_to_save.default.weight"][1])
    for n in before:
        if "lora_" not in n and "modules_to_save" not in n:
            assert torch.equal(after[n][1], before[n][1]), n
    # The active adapter is the default target, and a path works as well as an expert.
    m.set_adapter("other")


def test_load_into_the_active_adapter_from_a_file(tmp_path):
    m = peft_model(adapters=("default", "other"))
    m.set_adapter("other")
    e = an_expert(seed=9)
    e.save(tmp_path / "e.cpft.safetensors")
    keep = adapter_state(m, "default")
    assert compeft_rs.load_into(m, tmp_path / "e.cpft.safetensors") == "other"
    got = adapter_state(m, "other")
    for n, t in e.apply().items():
        assert torch.equal(got[n], t)
    for n, t in adapter_state(m, "default").items():
        assert torch.equal(t, keep[n])


def test_repeated_swaps_follow_the_model_as_it_changes():
    # load_into keeps the adapter's parameter map between calls; every change to the model that
    # replaces a parameter, its data or the adapter must reach the next swap.
    m = peft_model(adapters=("default", "other"))
    e1, e2 = an_expert(seed=1), an_expert(seed=2)

    def loaded(e, name="default"):
        got, want = adapter_state(m, name), e.apply()
        assert set(got) == set(want)
        return all(torch.equal(got[n], want[n].to(got[n].dtype)) for n in want)

    compeft_rs.load_into(m, e1)
    assert loaded(e1)
    # A parameter replaced by a new one while the old one lives on elsewhere.
    lora_a = m.base_model.model.q.lora_A["default"]
    old = lora_a.weight
    lora_a.weight = torch.nn.Parameter(torch.zeros_like(old))
    compeft_rs.load_into(m, e2)
    assert loaded(e2)
    assert torch.equal(old.detach(), e1.apply()["base_model.model.q.lora_A.weight"])
    # A module on the way replaced by a new one (its parameters new too).
    lora_b = m.base_model.model.q.lora_B
    old_b = lora_b["default"]
    lora_b["default"] = torch.nn.Linear(old_b.in_features, old_b.out_features, bias=False)
    compeft_rs.load_into(m, e1)
    assert loaded(e1)
    assert torch.equal(old_b.weight.detach(), e2.apply()["base_model.model.q.lora_B.weight"])
    # Module.to swaps every parameter's data in place.
    m.to(torch.float16)
    compeft_rs.load_into(m, e1)
    assert loaded(e1)
    # The adapter deleted and added again under the same name: all new parameters.
    cfg = m.peft_config["default"]
    m.set_adapter("other")
    m.delete_adapter("default")
    m.add_adapter("default", cfg)
    compeft_rs.load_into(m, e2, adapter_name="default")
    assert loaded(e2)
    # The same config object changed and the adapter added again with it: DoRA magnitudes that
    # the expert lacks are refused, not left at their initial values.
    cfg = m.peft_config["default"]
    m.set_adapter("other")
    m.delete_adapter("default")
    cfg.use_dora = True
    m.add_adapter("default", cfg)
    with pytest.raises(ValueError, match="not in the expert"):
        compeft_rs.load_into(m, e2, adapter_name="default")
    cfg.use_dora = False
    m.delete_adapter("default")
    m.add_adapter("default", cfg)
    compeft_rs.load_into(m, e2, adapter_name="default")
    assert loaded(e2)
    # Another adapter slot of the same model.
    compeft_rs.load_into(m, e1, adapter_name="other")
    assert loaded(e1, "other") and loaded(e2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_load_into_half_models_matches_set_peft_model_state_dict(dtype):
    e = an_expert()
    m1, m2 = peft_model(dtype=dtype), peft_model(dtype=dtype)
    compeft_rs.load_into(m1, e)
    peft.set_peft_model_state_dict(m2, e.apply())
    a, b = adapter_state(m1, "default"), adapter_state(m2, "default")
    for n in a:
        assert a[n].dtype == dtype and torch.equal(a[n], b[n]), n


@pytest.mark.parametrize("bad", ["rank", "targets", "adapter"])
def test_mismatches_write_nothing(bad):
    m = peft_model()
    before = snapshot(m)
    if bad == "rank":
        e, match = an_expert(r=4), "rank 4 in the expert, 8 in the adapter"
    elif bad == "targets":
        e, match = an_expert(targets=("q",)), "not in the expert"
    else:
        e, match = an_expert(), "no adapter 'nope'"
    with pytest.raises(ValueError, match=match):
        compeft_rs.load_into(m, e, adapter_name="nope" if bad == "adapter" else None)
    for n, (ptr, t) in snapshot(m).items():
        assert ptr == before[n][0] and torch.equal(t, before[n][1]), n


def test_load_into_refuses_a_full_fine_tune():
    m = peft_model()
    sd = adapter_state(m, "default")
    base = {n: torch.zeros_like(t) for n, t in sd.items()}
    e = compeft_rs.compress_expert(sd, 0.3, base=base)
    with pytest.raises(ValueError, match="full fine-tune"):
        compeft_rs.load_into(m, e)


def test_ia3_vectors_load_as_one_plus_tau():
    torch.manual_seed(0)
    cfg = peft.IA3Config(target_modules=["q", "v"], feedforward_modules=["v"])
    m = peft.get_peft_model(Net(), cfg)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "ia3_l" in n:
                p.add_(0.1 * torch.randn_like(p))
    e = compeft_rs.compress_peft(m, 0.5)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "ia3_l" in n:
                p.fill_(1.0)
    compeft_rs.load_into(m, e)
    got = adapter_state(m, "default")
    for n, t in e.apply().items():
        assert torch.equal(got[n], t), n


def test_device_expansion_in_chunks_equals_the_decoder(monkeypatch):
    # The CUDA path's chunked expansion, run on the CPU with chunks that split the tensor.
    monkeypatch.setattr(_serve, "DEVICE_CHUNK", 64)
    x = torch.randn(37, 29)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        c = compeft_rs.encode(x.to(dtype), 0.2)
        out = torch.full((37, 29), 7.0, dtype=dtype)
        _serve._expand_into(c._stream, out)
        assert torch.equal(out, c.decode()), dtype


def test_load_into_needs_a_peft_model():
    with pytest.raises(TypeError, match="PeftModel"):
        compeft_rs.load_into(Net(), an_expert())
