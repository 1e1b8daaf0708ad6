"""The vLLM resolver: the resolving itself (compeft_rs._resolve, no vllm needed: these run wherever
the test extra is installed), then vLLM's classes around it where vllm imports."""

import asyncio
import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")

import compeft_rs  # noqa: E402
from compeft_rs import _resolve  # noqa: E402
from compeft_rs._resolve import Limits, resolve  # noqa: E402
from test_store import BASE, an_expert, base_model, folders, offline, same_weights  # noqa: E402,F401

pytestmark = pytest.mark.filterwarnings("ignore:Could not find a config file in tiny/net")


@pytest.fixture
def store(tmp_path):
    s = compeft_rs.ExpertStore(tmp_path / "s")
    s.put("math", an_expert())
    return s


def refused(caplog, store, base, name, cache, limits=None, match=""):
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="compeft_rs.vllm"):
        folder, why = resolve(store, base, name, cache_dir=cache, limits=limits)
    assert folder is None and why
    assert match in why, why
    assert any(repr(name) in r.getMessage() and why in r.getMessage() for r in caplog.records), caplog.text
    return why


# -- resolving, without vllm --------------------------------------------------------------------


def test_resolve_answers_the_folder_of_a_lora_expert_of_the_served_model(store, tmp_path):
    folder, why = resolve(store, BASE, "math", cache_dir=tmp_path / "c")
    assert why == "" and folder == tmp_path / "c" / store.content_hash("math")[:32]
    x = torch.randn(8, 48, generator=torch.Generator().manual_seed(1))
    theirs = peft.PeftModel.from_pretrained(base_model(), str(folder)).eval()
    ours = compeft_rs.load_peft(base_model(), store["math"]).eval()
    with torch.no_grad():
        assert torch.equal(theirs(x), ours(x))


def test_resolve_refuses_another_base_model_and_what_is_not_there(store, tmp_path, caplog):
    cache = tmp_path / "c"
    refused(caplog, store, "some/other-model", "math", cache, match="names base model 'tiny/net', not the served "
                                                                    "'some/other-model'")
    refused(caplog, store, BASE, "unknown", cache, match="no expert of that name")
    refused(caplog, store, BASE, "../etc", cache, match="not a valid expert name")
    assert not cache.exists()


def test_resolve_never_raises(store, tmp_path, caplog):
    cache = tmp_path / "c"
    root = Path(store.root)
    (root / "junk.cpft.safetensors").write_bytes(b"not an expert at all")
    why = refused(caplog, store, BASE, "junk", cache)
    assert "CompeftError" in why and str(root / "junk.cpft.safetensors") in why
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(root / "foreign.cpft.safetensors"))  # a safetensors file, not ours
    refused(caplog, store, BASE, "foreign", cache, match="CompeftError")
    ia3 = peft.get_peft_model(base_model(), peft.IA3Config(target_modules=["q", "v"], feedforward_modules=[]))
    store.put("ia3", compeft_rs.compress_peft(ia3, 0.5))
    refused(caplog, store, BASE, "ia3", cache, match="IA3 adapter; vLLM serves LoRA adapters only")
    store.put("full", compeft_rs.compress_expert({"w": torch.randn(4, 4)}, 0.5))
    refused(caplog, store, BASE, "full", cache, match="not made from a PEFT adapter")
    assert not cache.exists()
    (tmp_path / "file").write_text("x")  # the cache folder cannot be made: the write fails
    refused(caplog, store, BASE, "math", tmp_path / "file" / "c", match="Error")
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # root can give a folder to another user
        theirs = tmp_path / "theirs"
        theirs.mkdir()
        os.chown(theirs, 12345, 12345)
        refused(caplog, store, BASE, "math", theirs, match="PermissionError: cache folder")
        assert list(theirs.iterdir()) == []


def test_the_expert_checked_is_the_one_written(store, tmp_path, caplog, monkeypatch):
    """An expert replaced in the store between the check and the write: the folder holds the
    expert that was checked, never the replacement (which was not)."""
    checked = store["math"]
    other = an_expert(seed=9)
    intruder = compeft_rs.compress_expert(other.apply(), 0.5, peft_config=dict(
        other.peft_config, base_model_name_or_path="some/other-model"))
    store.put("intruder", intruder)
    refused(caplog, store, BASE, "intruder", tmp_path / "c", match="names base model 'some/other-model'")
    real = _resolve._refusal

    def swap_after_the_check(*args):
        why = real(*args)
        store.put("math", intruder, overwrite=True)
        return why

    monkeypatch.setattr(_resolve, "_refusal", swap_after_the_check)
    folder, why = resolve(store, BASE, "math", cache_dir=tmp_path / "c")
    assert why == "" and store["math"].to_bytes() == intruder.to_bytes()
    assert folder.name == hashlib.sha256(checked.to_bytes()).hexdigest()[:32]
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == BASE
    from safetensors.torch import load_file

    assert same_weights(load_file(str(folder / "adapter_model.safetensors")), checked.apply())


def huge_rank_expert(r=8192, width=16):
    """A LoRA expert declaring rank r whose file is tiny: nothing kept (k ~ 0)."""
    cfg = peft.LoraConfig(r=r, lora_alpha=16, target_modules=["q"])
    m = peft.get_peft_model(base_model(width=width), cfg)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_" in n:
                p.zero_()
    return compeft_rs.compress_peft(m, 1e-9)


def test_limits_are_checked_from_the_headers_before_anything_is_decoded(store, tmp_path, caplog, monkeypatch):
    cache = tmp_path / "c"
    big = huge_rank_expert()
    assert big.nbytes < 2000 and big.peft_config["r"] == 8192
    store.put("big", big)
    decoded = []
    monkeypatch.setattr(compeft_rs.CompressedExpert, "apply", lambda *a, **k: decoded.append(1))
    refused(caplog, store, BASE, "big", cache, match="r = 8192, above the limit of 512 (COMPEFT_MAX_RANK)")
    # The shapes are checked too, whatever the config says.
    lying = dict(big.peft_config, r=8)
    e = compeft_rs.compress_expert({"base_model.model.q.lora_A.weight": torch.zeros(1024, 16),
                                    "base_model.model.q.lora_B.weight": torch.zeros(16, 1024)}, 1e-9,
                                   peft_config=lying)
    store.put("lying", e)
    refused(caplog, store, BASE, "lying", cache, match="has rank 1024, above the limit of 512")
    refused(caplog, store, BASE, "math", cache, limits=Limits(max_entries=100), match="above the limit of 100 "
                                                                                     "(COMPEFT_MAX_ENTRIES)")
    assert decoded == [] and not cache.exists()
    monkeypatch.undo()
    folder, why = resolve(store, BASE, "lying", cache_dir=cache, limits=Limits(max_rank=1024))
    assert why == "" and folder.is_dir()


def lora_pairs(rank, width, layers, dtype, k):
    """A LoRA expert with ``layers`` q pairs of the given rank and width, random values kept at k."""
    g = torch.Generator().manual_seed(0)
    t = {}
    for i in range(layers):
        t[f"base_model.model.layers.{i}.q.lora_A.weight"] = torch.randn(rank, width, generator=g).to(dtype)
        t[f"base_model.model.layers.{i}.q.lora_B.weight"] = torch.randn(width, rank, generator=g).to(dtype)
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": 16, "target_modules": ["q"], "base_model_name_or_path": BASE}
    return compeft_rs.compress_expert(t, k, peft_config=cfg)


def test_a_tiny_file_cannot_write_a_huge_folder(store, tmp_path, caplog, monkeypatch):
    """Rank and entries within their limits, but nothing kept: a ~1 KB file that would write
    19 MB is refused from its headers, nothing decoded; real sparse experts are served."""
    cache = tmp_path / "c"
    bomb = lora_pairs(8, 600_000, 1, torch.float32, 1e-9)
    dense = 2 * 8 * 600_000 * 4
    assert bomb.nbytes < 2000 and dense > 4096 * bomb.nbytes
    store.put("bomb", bomb)
    decoded = []
    monkeypatch.setattr(compeft_rs.CompressedExpert, "apply", lambda *a, **k: decoded.append(1))
    why = refused(caplog, store, BASE, "bomb", cache, match="above the limit of 4,096 times (COMPEFT_MAX_EXPANSION)")
    assert f"would hold {dense:,} bytes" in why and f"its {bomb.nbytes:,}-byte file" in why
    assert decoded == [] and not cache.exists()
    monkeypatch.undo()
    # fp16 and float32 LoRA factors at k = 0.001 fit the default (600x and 1200x here, where headers
    # weigh more than in a 7B-sized expert: 1100x and 2200x).
    for dtype in (torch.float16, torch.float32):
        store.put("sparse", lora_pairs(16, 2048, 8, dtype, 0.001), overwrite=True)
        folder, why = resolve(store, BASE, "sparse", cache_dir=cache)
        assert why == "" and folder.is_dir()
    # The bound is on the folder's tensor bytes per file byte: just under this expert's ratio refuses it.
    e = lora_pairs(16, 2048, 8, torch.float32, 0.001)
    ratio = sum(2 * 16 * 2048 * 4 for _ in range(8)) / e.nbytes
    store.put("f32", e)
    refused(caplog, store, BASE, "f32", cache, limits=Limits(max_expansion=int(ratio)), match="COMPEFT_MAX_EXPANSION")
    assert resolve(store, BASE, "f32", cache_dir=cache, limits=Limits(max_expansion=int(ratio) + 1))[0] is not None


def test_limits_from_the_environment(monkeypatch):
    assert Limits.from_env({}) == Limits(max_rank=512, max_entries=1 << 31, cache_max_bytes=10 << 30,
                                         max_expansion=4096)
    env = {"COMPEFT_MAX_RANK": "64", "COMPEFT_MAX_ENTRIES": "1_000_000", "COMPEFT_CACHE_MAX_BYTES": "4096",
           "COMPEFT_MAX_EXPANSION": "100"}
    assert Limits.from_env(env) == Limits(max_rank=64, max_entries=1_000_000, cache_max_bytes=4096,
                                          max_expansion=100)
    monkeypatch.setenv("COMPEFT_MAX_RANK", "16")
    assert Limits.from_env().max_rank == 16
    for var, bad in [("COMPEFT_MAX_RANK", "0"), ("COMPEFT_MAX_ENTRIES", "lots"), ("COMPEFT_CACHE_MAX_BYTES", "-1"),
                     ("COMPEFT_MAX_EXPANSION", "0")]:
        with pytest.raises(ValueError, match=f"{var}='{bad}' is not a positive whole number"):
            Limits.from_env({var: bad})


def test_the_resolver_cache_is_bounded(store, tmp_path):
    for i in range(3):
        store.put(f"e{i}", an_expert(seed=10 + i))
    cache = tmp_path / "c"
    got = [resolve(store, BASE, f"e{i}", cache_dir=cache, limits=Limits(cache_max_bytes=1))[0] for i in range(3)]
    assert folders(cache) == [got[-1].name]


def test_from_env_refuses_a_missing_store(tmp_path):
    with pytest.raises(LookupError, match="COMPEFT_STORE is not set"):
        _resolve.from_env({})
    with pytest.raises(FileNotFoundError, match="COMPEFT_STORE='.*typo': there is no expert store"):
        _resolve.from_env({"COMPEFT_STORE": str(tmp_path / "typo")})
    assert not (tmp_path / "typo").exists()
    (tmp_path / "s").mkdir()
    with pytest.raises(ValueError, match="COMPEFT_MAX_RANK"):
        _resolve.from_env({"COMPEFT_STORE": str(tmp_path / "s"), "COMPEFT_MAX_RANK": "x"})
    store, cache, limits = _resolve.from_env({"COMPEFT_STORE": str(tmp_path / "s"), "COMPEFT_CACHE_DIR": "/c",
                                              "COMPEFT_MAX_ENTRIES": "7"})
    assert store.root == str(tmp_path / "s") and cache == "/c" and limits.max_entries == 7


def test_lora_int_id_is_the_same_in_every_process_and_changes_with_the_content(store, tmp_path):
    folder, _ = resolve(store, BASE, "math", cache_dir=tmp_path / "c")
    i = _resolve.lora_int_id("math", folder)
    code = f"from pathlib import Path; from compeft_rs._resolve import lora_int_id; print(lora_int_id('math', Path({str(folder)!r})))"
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                             env=dict(os.environ, PYTHONHASHSEED=seed)).stdout
        assert int(out) == i
    assert 0 < i < 2**63
    store.put("math", an_expert(seed=11), overwrite=True)
    again, _ = resolve(store, BASE, "math", cache_dir=tmp_path / "c")
    assert again != folder and _resolve.lora_int_id("math", again) != i


# -- vLLM's classes -----------------------------------------------------------------------------


@pytest.fixture
def vllm_registry(monkeypatch):
    try:  # vllm may be missing, or installed without a dependency it imports
        from vllm.lora.resolver import LoRAResolverRegistry
    except ImportError as ex:
        pytest.skip(f"vllm's resolver API does not import here: {ex}")

    monkeypatch.setattr(LoRAResolverRegistry, "resolvers", {})  # this test's registrations only
    for var in ("COMPEFT_STORE", "COMPEFT_CACHE_DIR", "COMPEFT_CACHE_MAX_BYTES", "COMPEFT_MAX_RANK",
                "COMPEFT_MAX_ENTRIES", "COMPEFT_MAX_EXPANSION"):
        monkeypatch.delenv(var, raising=False)
    return LoRAResolverRegistry


def test_vllm_resolver(store, tmp_path, vllm_registry):
    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver

    from compeft_rs import vllm as cv

    r = cv.CompeftResolver(store, tmp_path / "cache")
    assert isinstance(r, LoRAResolver) and r.limits == Limits()
    assert asyncio.run(r.resolve_lora(BASE, "unknown")) is None
    assert asyncio.run(r.resolve_lora(BASE, "../etc")) is None
    assert asyncio.run(r.resolve_lora("some/other-model", "math")) is None
    req = asyncio.run(r.resolve_lora(BASE, "math"))
    assert isinstance(req, LoRARequest) and req.lora_name == "math" and req.lora_int_id > 0
    assert req.base_model_name == BASE
    from safetensors.torch import load_file

    assert same_weights(load_file(f"{req.lora_path}/adapter_model.safetensors"), store["math"].apply())
    # Stable across calls, new when the content changes.
    assert asyncio.run(r.resolve_lora(BASE, "math")).lora_int_id == req.lora_int_id
    store.put("math", an_expert(seed=11), overwrite=True)
    assert asyncio.run(r.resolve_lora(BASE, "math")).lora_int_id != req.lora_int_id
    # Nothing raises into vLLM.
    (Path(store.root) / "junk.cpft.safetensors").write_bytes(b"junk")
    store.put("big", huge_rank_expert())
    assert asyncio.run(r.resolve_lora(BASE, "junk")) is None
    assert asyncio.run(r.resolve_lora(BASE, "big")) is None
    with pytest.raises(FileNotFoundError, match="no expert store"):
        cv.CompeftResolver(tmp_path / "typo")


def test_vllm_register_from_the_environment(store, tmp_path, monkeypatch, vllm_registry, caplog):
    from compeft_rs import vllm as cv

    monkeypatch.setenv(cv.ENV_STORE, store.root)
    monkeypatch.setenv(cv.ENV_CACHE_DIR, str(tmp_path / "cache2"))
    monkeypatch.setenv(cv.ENV_MAX_RANK, "64")
    cv.register()
    reg = vllm_registry.get_resolver(cv.RESOLVER_NAME)
    assert isinstance(reg, cv.CompeftResolver) and reg.store.names() == ["math"] and reg.limits.max_rank == 64
    assert asyncio.run(reg.resolve_lora(BASE, "math")).lora_path.startswith(str(tmp_path / "cache2"))


@pytest.mark.parametrize("env, match", [
    ({"COMPEFT_STORE": "{tmp}/typo"}, "there is no expert store"),
    ({"COMPEFT_STORE": "{tmp}/s", "COMPEFT_MAX_ENTRIES": "many"}, "COMPEFT_MAX_ENTRIES='many'"),
    ({}, "COMPEFT_STORE is not set"),
])
def test_vllm_register_refuses_a_bad_environment(store, tmp_path, monkeypatch, vllm_registry, caplog, env, match):
    from compeft_rs import vllm as cv

    for k, v in env.items():
        monkeypatch.setenv(k, v.format(tmp=tmp_path))
    with caplog.at_level(logging.WARNING, logger="compeft_rs.vllm"):
        cv.register()  # logs, does not raise: vLLM calls plugins outside any error handling
    assert cv.RESOLVER_NAME not in vllm_registry.get_supported_resolvers()
    assert match in caplog.text and "resolver" in caplog.text
    assert not (tmp_path / "typo").exists()


def test_vllm_reads_the_materialised_folder(tmp_path):
    try:  # needs a few of vllm's dependencies besides the package itself (see .ci/run)
        from vllm.lora.peft_helper import PEFTHelper
    except ImportError as ex:
        pytest.skip(f"vllm's PEFTHelper does not import here: {ex}")
    e = an_expert(r=4)
    store = compeft_rs.ExpertStore(tmp_path / "s")
    store.put("x", e)
    folder = store.materialize("x", tmp_path / "c")
    helper = PEFTHelper.from_local_dir(str(folder), max_position_embeddings=None)
    assert helper.r == 4 and helper.lora_alpha == e.peft_config["lora_alpha"]
    assert sorted(helper.target_modules) == sorted(e.peft_config["target_modules"])


def test_vllm_is_not_imported_by_the_package():
    code = "import sys, compeft_rs; assert 'vllm' not in sys.modules, 'vllm imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def entry_points_of(group):
    from importlib.metadata import entry_points

    eps = entry_points()
    # Python 3.9 returns a dict of groups; select() (and entry_points(group=...)) came in 3.10.
    return eps.select(group=group) if hasattr(eps, "select") else eps.get(group, [])


def test_resolver_entry_point_is_declared():
    eps = [ep for ep in entry_points_of("vllm.general_plugins") if ep.name == "compeft"]
    assert [ep.value for ep in eps] == ["compeft_rs.vllm:register"]


def test_entry_points_of_reads_the_dict_of_python_3_9(monkeypatch):
    import importlib.metadata

    ep = importlib.metadata.EntryPoint("compeft", "compeft_rs.vllm:register", "vllm.general_plugins")
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda: {"vllm.general_plugins": (ep,)})
    assert list(entry_points_of("vllm.general_plugins")) == [ep] and list(entry_points_of("other")) == []
