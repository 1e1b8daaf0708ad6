"""Model outputs against peft's: the same model built the peft way (a PeftModel loaded from the
decoded folder with peft's own from_pretrained / load_adapter / add_weighted_adapter) and our way
(load_peft, load_into, merge), compared on random inputs. Tensor-by-tensor checks of our code
against itself missed a scaling that load_into ignored and merge weights applied twice."""

import copy

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import compeft_rs  # noqa: E402
from compeft_rs._lora import module_scaling  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)


class Net(torch.nn.Module):
    def __init__(self, width=24):
        super().__init__()
        self.q = torch.nn.Linear(width, width)
        self.v = torch.nn.Linear(width, width)
        self.classifier = torch.nn.Linear(width, 3)

    def forward(self, x):
        return self.classifier(torch.tanh(self.v(torch.tanh(self.q(x)))))


def gpt2_base():
    """A tiny GPT-2 (Conv1D layers, so fan_in_fan_out), random weights, nothing downloaded."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=64, n_positions=16,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2Model(cfg).eval()


def net_base():
    torch.manual_seed(0)
    return Net().eval()


BASES = {"net": net_base, "gpt2": gpt2_base}


def inputs(kind):
    g = torch.Generator().manual_seed(123)
    if kind == "gpt2":
        return {"input_ids": torch.randint(0, 64, (3, 10), generator=g)}
    return {"x": torch.randn(5, 24, generator=g)}


def outputs(model, kind):
    with torch.no_grad():
        out = model(**inputs(kind))
    return out.last_hidden_state if kind == "gpt2" else out


# (base kind, LoraConfig kwargs): the configurations whose scaling or layout peft treats specially.
CONFIGS = {
    "alpha32": ("net", dict(r=4, lora_alpha=32, target_modules=["q", "v"])),
    "alpha8": ("net", dict(r=4, lora_alpha=8, target_modules=["q", "v"])),
    "rslora": ("net", dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q", "v"])),
    "patterns": ("net", dict(r=4, lora_alpha=8, target_modules=["q", "v"], rank_pattern={"v": 2},
                             alpha_pattern={"q": 64})),
    "dora": ("net", dict(r=4, lora_alpha=16, use_dora=True, target_modules=["q", "v"])),
    "modules_to_save": ("net", dict(r=4, lora_alpha=16, target_modules=["q"], modules_to_save=["classifier"])),
    "gpt2": ("gpt2", dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
}


def trained(kind, cfg_kwargs, seed):
    """A PeftModel whose adapter looks trained (B no longer zero), distinct per seed."""
    base = BASES[kind]()
    m = peft.get_peft_model(base, peft.LoraConfig(**cfg_kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return m.eval()


def expert_of(name, seed=1, k=0.3):
    kind, kw = CONFIGS[name]
    return compeft_rs.compress_peft(trained(kind, kw, seed), k)


def peft_reference(kind, folder, adapter_name="default"):
    """The model as peft builds it from a PEFT folder."""
    return peft.PeftModel.from_pretrained(BASES[kind](), str(folder), adapter_name=adapter_name).eval()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_load_peft_gives_what_peft_gives_from_the_decoded_folder(name, tmp_path):
    kind, _ = CONFIGS[name]
    e = expert_of(name)
    folder = compeft_rs.save_peft(e, tmp_path / "adapter")
    ref = outputs(peft_reference(kind, folder), kind)
    ours = outputs(compeft_rs.load_peft(BASES[kind](), e), kind)
    torch.testing.assert_close(ours, ref, **TOL)
    # ... and the adapter does something: the comparison is not between two base models.
    assert (ref - outputs(BASES[kind](), kind)).abs().max() > 1e-3


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_load_into_a_slot_made_with_the_same_config_gives_peft_outputs(name, tmp_path):
    kind, kw = CONFIGS[name]
    e = expert_of(name, seed=1)
    ref = outputs(peft_reference(kind, compeft_rs.save_peft(e, tmp_path / "adapter")), kind)
    slot = trained(kind, kw, seed=7)  # the same config, other weights in it
    compeft_rs.load_into(slot, e)
    torch.testing.assert_close(outputs(slot, kind), ref, **TOL)


def test_load_into_several_adapters_swaps_one_and_leaves_the_other(tmp_path):
    kind, kw = CONFIGS["alpha32"]
    e1, e2 = expert_of("alpha32", seed=1), expert_of("alpha32", seed=2)
    f1, f2 = compeft_rs.save_peft(e1, tmp_path / "a1"), compeft_rs.save_peft(e2, tmp_path / "a2")
    ref = peft_reference(kind, f1, "first")
    ref.load_adapter(str(f2), adapter_name="second")
    model = trained(kind, kw, seed=9)
    model.add_adapter("second", peft.LoraConfig(**kw))
    compeft_rs.load_into(model, e1, "default")
    compeft_rs.load_into(model, e2, "second")
    for ours, theirs in (("default", "first"), ("second", "second")):
        model.set_adapter(ours)
        ref.set_adapter(theirs)
        torch.testing.assert_close(outputs(model, kind), outputs(ref, kind), **TOL)


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("expert_name,slot_kwargs,field", [
    ("alpha32", CONFIGS["alpha8"][1], "scaling"),                                       # lora_alpha
    ("alpha8", CONFIGS["rslora"][1], "scaling"),                                        # use_rslora
    ("alpha8", dict(CONFIGS["alpha8"][1], alpha_pattern={"q": 64}), "scaling"),         # alpha_pattern
    ("alpha8", dict(CONFIGS["alpha8"][1], r=4, rank_pattern={"q": 4}, lora_alpha=8), None),  # same scaling
    # peft sets fan_in_fan_out=True itself for Conv1D layers (with a warning): the same slot.
    ("gpt2", dict(CONFIGS["gpt2"][1], fan_in_fan_out=False), None),
])
def test_load_into_refuses_a_slot_that_scales_the_expert_differently(expert_name, slot_kwargs, field, tmp_path):
    kind, _ = CONFIGS[expert_name]
    e = expert_of(expert_name)
    with pytest.warns(UserWarning) if kind == "gpt2" else _nothing():
        slot = trained(kind, slot_kwargs, seed=7)
    if field is None:  # a pattern that changes nothing is accepted, and gives peft's outputs
        compeft_rs.load_into(slot, e)
        ref = outputs(peft_reference(kind, compeft_rs.save_peft(e, tmp_path / "adapter")), kind)
        torch.testing.assert_close(outputs(slot, kind), ref, **TOL)
        return
    before = params(slot)
    with pytest.raises(ValueError, match=field):
        compeft_rs.load_into(slot, e)
    after = params(slot)
    assert all(torch.equal(before[n], after[n]) for n in before), "a refused swap wrote parameters"


def test_load_into_ignores_a_fan_in_fan_out_that_peft_itself_resets(tmp_path):
    """peft sets each layer's fan_in_fan_out from its type (False for Linear, True for Conv1D) and
    an unmerged forward never reads it: an expert whose config says otherwise gives peft's
    outputs, and is not refused."""
    import json

    kind, kw = CONFIGS["alpha8"]
    folder = tmp_path / "adapter"
    trained(kind, kw, seed=1).save_pretrained(str(folder))
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["fan_in_fan_out"] = True
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    e = compeft_rs.compress_peft(folder, 0.3)
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        ref = outputs(peft_reference(kind, compeft_rs.save_peft(e, tmp_path / "decoded")), kind)
    slot = trained(kind, kw, seed=7)
    compeft_rs.load_into(slot, e)
    torch.testing.assert_close(outputs(slot, kind), ref, **TOL)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_load_into_refuses_a_merged_slot_and_unmerge_then_swap_restores_the_base(tmp_path):
    kind, kw = CONFIGS["alpha32"]
    base_weights = {n: p.detach().clone() for n, p in net_base().named_parameters()}
    e = expert_of("alpha32", seed=1)
    slot = trained(kind, kw, seed=7)
    slot.merge_adapter()
    before = params(slot)
    with pytest.raises(ValueError, match="unmerge_adapter"):
        compeft_rs.load_into(slot, e)
    assert all(torch.equal(before[n], p) for n, p in params(slot).items())
    slot.unmerge_adapter()
    compeft_rs.load_into(slot, e)
    ref = outputs(peft_reference(kind, compeft_rs.save_peft(e, tmp_path / "adapter")), kind)
    torch.testing.assert_close(outputs(slot, kind), ref, **TOL)
    slot.merge_adapter()  # merged with the new expert: the same outputs, and the base comes back whole
    torch.testing.assert_close(outputs(slot, kind), ref, **TOL)
    slot.unmerge_adapter()
    for n, p in slot.get_base_model().named_parameters():
        if "lora_" not in n:
            key = n.replace(".base_layer", "")
            torch.testing.assert_close(p.detach(), base_weights[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["alpha32", "rslora", "patterns", "gpt2"])
def test_module_scaling_is_the_scaling_peft_gives_each_layer(name):
    kind, kw = CONFIGS[name]
    m = trained(kind, kw, seed=1)
    cfg = m.peft_config["default"].to_dict()
    seen = 0
    for mod_name, mod in m.base_model.model.named_modules():
        if isinstance(getattr(mod, "scaling", None), dict) and "default" in mod.scaling:
            assert module_scaling(cfg, mod_name) == pytest.approx(mod.scaling["default"], rel=1e-12), mod_name
            seen += 1
    assert seen >= 2


# --- merging LoRA experts: our merge against peft's add_weighted_adapter on the decoded experts ---

def merged_by_peft(kind, folders, weights, combination_type, **kw):
    ref = peft_reference(kind, folders[0], "e0")
    for i, f in enumerate(folders[1:], 1):
        ref.load_adapter(str(f), adapter_name=f"e{i}")
    ref.add_weighted_adapter([f"e{i}" for i in range(len(folders))], list(weights), "merged",
                             combination_type=combination_type, **kw)
    ref.set_adapter("merged")
    return outputs(ref, kind)


def merged_by_us(kind, experts, weights, method, tmp_path, **kw):
    """compeft_rs.merge_peft -> a PEFT folder -> peft's from_pretrained."""
    folder = compeft_rs.merge_peft(experts, tmp_path / "merged", method, weights=weights, **kw)
    return outputs(peft_reference(kind, folder), kind)


@pytest.mark.parametrize("weights", [(1.0,), (0.5,), (-1.0,), (1.0, 1.0), (0.7, -0.4), (2.0, 0.5, -1.5)])
@pytest.mark.parametrize("name", ["alpha32", "patterns", "gpt2"])
def test_task_arithmetic_of_lora_experts_gives_add_weighted_adapter_linear(name, weights, tmp_path):
    kind, _ = CONFIGS[name]
    experts = [expert_of(name, seed=s) for s in range(1, len(weights) + 1)]
    folders = [compeft_rs.save_peft(e, tmp_path / f"a{i}") for i, e in enumerate(experts)]
    ref = merged_by_peft(kind, folders, weights, "linear")
    ours = merged_by_us(kind, experts, weights, "task_arithmetic", tmp_path)
    torch.testing.assert_close(ours, ref, **TOL)


def test_a_single_expert_at_weight_w_scales_its_update_by_w(tmp_path):
    kind, _ = CONFIGS["alpha32"]
    e = expert_of("alpha32")
    base = outputs(net_base(), kind)
    full = outputs(compeft_rs.load_peft(net_base(), e), kind) - base
    for w in (0.5, -1.0):
        got = merged_by_us(kind, [e], [w], "task_arithmetic", tmp_path / str(w)) - base
        # The adapter here acts on a nonlinear net, so compare the first layer's update instead.
        merged = compeft_rs.merge([e], "task_arithmetic", weights=[w])
        dense = e.apply()
        name = "base_model.model.q.lora_{}.weight"
        ba = merged[name.format("B")] @ merged[name.format("A")]
        want = w * (dense[name.format("B")].float() @ dense[name.format("A")].float())
        torch.testing.assert_close(ba, want, **TOL)
        assert not torch.allclose(got, full, atol=1e-4)


@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.7, 0.3), (1.0, 0.5, 0.8)])
def test_ties_of_lora_experts_gives_add_weighted_adapter_ties(weights, tmp_path):
    kind, _ = CONFIGS["alpha32"]
    experts = [expert_of("alpha32", seed=s) for s in range(1, len(weights) + 1)]
    folders = [compeft_rs.save_peft(e, tmp_path / f"a{i}") for i, e in enumerate(experts)]
    ref = merged_by_peft(kind, folders, weights, "ties", density=1.0)
    ours = merged_by_us(kind, experts, weights, "ties", tmp_path)
    torch.testing.assert_close(ours, ref, **TOL)


def test_merging_experts_with_different_scalings_is_refused_unless_rescaled(tmp_path):
    kind, _ = CONFIGS["alpha32"]
    e32, e8 = expert_of("alpha32", seed=1), expert_of("alpha8", seed=2)
    with pytest.raises(ValueError, match="rescale=True"):
        compeft_rs.merge([e32, e8], "task_arithmetic")
    folders = [compeft_rs.save_peft(e, tmp_path / f"a{i}") for i, e in enumerate([e32, e8])]
    ref = merged_by_peft(kind, folders, (1.0, -0.5), "linear")
    ours = merged_by_us(kind, [e32, e8], (1.0, -0.5), "task_arithmetic", tmp_path, rescale=True)
    torch.testing.assert_close(ours, ref, **TOL)


def test_rescaled_merge_with_patterns_gives_scaling_one_per_module(tmp_path):
    """peft's add_weighted_adapter drops rank_pattern (and its shapes); ours keeps each module's rank
    and gives every module scaling 1, so the merged update equals the weighted sum of each
    expert's scaling * B @ A for a single expert."""
    import json

    from safetensors.torch import load_file

    e = expert_of("patterns", seed=3)
    folder = compeft_rs.merge_peft([e], tmp_path / "m", "task_arithmetic", weights=[0.5], rescale=True)
    config = json.loads((folder / "adapter_config.json").read_text())
    merged = {n: t.float() for n, t in load_file(str(folder / "adapter_model.safetensors")).items()}
    dense = e.apply()
    for mod in ("q", "v"):
        a = merged[f"base_model.model.{mod}.lora_A.weight"]
        b = merged[f"base_model.model.{mod}.lora_B.weight"]
        assert module_scaling(config, mod) == 1.0
        want = 0.5 * module_scaling(e.peft_config, mod) * (
            dense[f"base_model.model.{mod}.lora_B.weight"].float() @ dense[f"base_model.model.{mod}.lora_A.weight"].float())
        torch.testing.assert_close(b @ a, want, **TOL)


def test_merge_compress_keeps_a_config_that_matches_the_factors(tmp_path):
    """compress= on a rescaled merge stores the merged config (scaling 1), not the first expert's."""
    e32, e8 = expert_of("alpha32", seed=1), expert_of("alpha8", seed=2)
    c = compeft_rs.merge([e32, e8], "task_arithmetic", rescale=True, compress=0.5)
    assert c.peft_config["lora_alpha"] == c.peft_config["r"] and not c.peft_config.get("use_rslora")


def test_cli_merge_writes_a_folder_peft_loads_with_the_weighted_update(tmp_path):
    from compeft_rs.cli import main

    kind, _ = CONFIGS["alpha32"]
    experts = [expert_of("alpha32", seed=s) for s in (1, 2)]
    files = [str(e.save(tmp_path / f"e{i}.cpft.safetensors")) for i, e in enumerate(experts)]
    folders = [compeft_rs.save_peft(e, tmp_path / f"a{i}") for i, e in enumerate(experts)]
    assert main(["merge", *files, "-o", str(tmp_path / "out"), "--method", "task_arithmetic",
                 "--weights", "0.5", "-1", "-q"]) == 0
    ref = merged_by_peft(kind, folders, (0.5, -1.0), "linear")
    torch.testing.assert_close(outputs(peft_reference(kind, tmp_path / "out"), kind), ref, **TOL)


def test_full_task_vectors_merge_like_peft_task_arithmetic_on_the_model():
    """A full fine-tune's residuals merged with weights: base + merged, run as a model, equals base +
    peft's task_arithmetic of the decoded residuals."""
    from peft.utils.merge_utils import task_arithmetic

    base = net_base()
    base_sd = {n: t.detach().clone() for n, t in base.state_dict().items()}
    experts, taus = [], []
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        ft = {n: t + 0.1 * torch.randn(t.shape, generator=g) for n, t in base_sd.items()}
        e = compeft_rs.compress_expert(ft, k=0.3, base=base_sd)
        experts.append(e)
        taus.append({n: t - base_sd[n] for n, t in e.apply(base_sd).items()})
    w = [0.6, -0.8]
    merged = compeft_rs.merge(experts, "task_arithmetic", weights=w)
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    ours.load_state_dict({n: base_sd[n] + merged[n] for n in base_sd})
    theirs.load_state_dict({n: base_sd[n] + task_arithmetic([t[n] for t in taus], torch.tensor(w)) for n in base_sd})
    torch.testing.assert_close(outputs(ours, "net"), outputs(theirs, "net"), **TOL)


def test_rescaled_merge_of_one_rslora_expert_is_that_expert(tmp_path):
    """peft's add_weighted_adapter keeps use_rslora with lora_alpha = r, so its merge of one rsLoRA
    expert at weight 1 applies sqrt(r) times the expert's update; ours gives the expert back."""
    kind, _ = CONFIGS["rslora"]
    e = expert_of("rslora", seed=1)
    own = outputs(compeft_rs.load_peft(net_base(), e), kind)
    for rescale in (False, True):
        got = merged_by_us(kind, [e], [1.0], "task_arithmetic", tmp_path / str(rescale), rescale=rescale)
        torch.testing.assert_close(got, own, **TOL)
    peft_way = merged_by_peft(kind, [compeft_rs.save_peft(e, tmp_path / "a")], [1.0], "linear")
    assert (peft_way - own).abs().max() > 1e-2  # peft's own defect, documented in README


class OneLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(24, 24)

    def forward(self, x):
        return self.q(x)


def test_lora_bias_takes_the_whole_weight_in_a_merge(tmp_path):
    """lora_B's bias (lora_bias=True) is added as scaling * bias, not one of two factors: merged at
    weight w, the layer's update is w times the expert's, bias included."""
    torch.manual_seed(0)
    base = OneLayer().eval()
    m = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q"],
                                                                 lora_bias=True))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    e = compeft_rs.compress_peft(m, 0.3)
    assert any(n.endswith("lora_B.bias") for n in e.compressed_keys())
    x = torch.randn(5, 24, generator=g)
    with torch.no_grad():
        update = compeft_rs.load_peft(copy.deepcopy(base), e)(x) - base(x)
        for w in (0.5, -1.0):
            folder = compeft_rs.merge_peft([e], tmp_path / str(w), "task_arithmetic", weights=[w])
            got = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()(x) - base(x)
            torch.testing.assert_close(got, w * update, **TOL)


def test_rescale_needs_adapter_configs():
    g = torch.Generator().manual_seed(0)
    sd = {"x.lora_A.weight": torch.randn(2, 8, generator=g), "x.lora_B.weight": torch.randn(8, 2, generator=g)}
    e = compeft_rs.compress_expert(sd, 0.5)
    with pytest.raises(ValueError, match="rescale=True needs"):
        compeft_rs.merge([e, e], "task_arithmetic", rescale=True)
    with pytest.raises(ValueError, match="not made from a PEFT adapter"):
        compeft_rs.merge_peft([e, e], "/nonexistent/out", "task_arithmetic")


def test_a_replaced_layer_holding_the_same_parameters_is_checked_again():
    """load_into keeps the slot's layers between calls; a layer replaced by another module that
    holds the same parameters (so the parameter map still matches) must be seen."""
    kind, kw = CONFIGS["alpha32"]
    e = expert_of("alpha32", seed=1)
    slot = trained(kind, kw, seed=7)
    compeft_rs.load_into(slot, e)  # the slot's layers are cached now
    inner = slot.base_model.model
    old = inner.q  # kept alive: the cache must not rely on a dead reference to notice
    twin = copy.copy(old)  # same parameter objects, its own scaling
    twin.scaling = {"default": 99.0}
    inner.q = twin
    with pytest.raises(ValueError, match="scaling"):
        compeft_rs.load_into(slot, e)
    assert old.scaling["default"] == 8.0


def test_merge_peft_refuses_an_existing_folder_before_merging(tmp_path, monkeypatch):
    e = expert_of("alpha32")
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(compeft_rs._merge, "_merge", lambda *a, **k: pytest.fail("merged before the check"))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        compeft_rs.merge_peft([e], out, "task_arithmetic")
