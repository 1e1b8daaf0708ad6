"""The expert as one unit: the one plan per tensor on every path, the whole-expert decode, and
the cases the expert-core review found (each test fails on the code before it)."""

import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import compeft_rs
from compeft_rs import CompeftError
from reference import pattern_of, reference_sigma, reference_signs

peft = pytest.importorskip("peft")
CLI = [sys.executable, "-m", "compeft_rs"]


def run(args, cwd=None):
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, cwd=cwd)


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 12)
        self.head = torch.nn.Linear(12, 3)

    def forward(self, x):
        return self.head(self.lin(x))


def tiny_peft(**lora):
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=4, target_modules=["lin"], **lora)
    model = peft.get_peft_model(Tiny(), cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p))
    return model


# -- one plan for every path -------------------------------------------------------------------

DORA = "base_model.model.lin.lora_magnitude_vector"
HEAD = "base_model.model.head.weight"


def dora_state_dict():
    g = torch.Generator().manual_seed(1)
    return {
        "base_model.model.lin.lora_A.weight": torch.randn(4, 16, generator=g),
        "base_model.model.lin.lora_B.weight": torch.randn(12, 4, generator=g),
        DORA: torch.tensor([0.54, 0.60, 0.66, 0.52] * 3),
        HEAD: torch.randn(3, 12, generator=g),
    }


def test_dora_magnitudes_and_heads_kept_exactly_on_every_path(tmp_path):
    sd = dora_state_dict()
    save_file(sd, str(tmp_path / "adapter_model.safetensors"))
    results = {
        "dict": compeft_rs.compress_expert(sd, 0.3),
        "file": compeft_rs.compress_expert(tmp_path / "adapter_model.safetensors", 0.3),
        "checkpoint": compeft_rs.compress_checkpoint(tmp_path / "adapter_model.safetensors", 0.3),
    }
    r = run(["compress", tmp_path / "adapter_model.safetensors", "-o", tmp_path / "c.safetensors", "-k", "0.3", "-q"])
    assert r.returncode == 0, r.stderr
    results["cli"] = compeft_rs.load_expert(tmp_path / "c.safetensors")
    seen = {}
    compeft_rs.tune(sd, lambda w: seen.update(w) or 0.0, ks=(0.3,), alphas=(1.0,), progress=False)
    for path, e in results.items():
        assert e.lossless_keys() == sorted([DORA, HEAD]), path
        assert torch.equal(e[DORA], sd[DORA]) and torch.equal(e[HEAD], sd[HEAD]), path
    assert torch.equal(seen[DORA], sd[DORA]) and torch.equal(seen[HEAD], sd[HEAD])


def test_dora_in_a_peft_folder(tmp_path):
    model = tiny_peft(use_dora=True)
    model.save_pretrained(tmp_path / "a")
    sd = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    mags = [n for n in sd if "lora_magnitude_vector" in n]
    assert mags
    e = compeft_rs.compress_peft(tmp_path / "a", 0.1)
    assert set(mags) <= set(e.lossless_keys())
    for n in mags:
        assert torch.equal(e[n], sd[n])


@pytest.mark.parametrize("name,method", [
    ("m.lin.hada_w1_a", "LoHa"), ("m.lin.lokr_w1", "LoKr"), ("m.lin.vera_lambda_b", "VeRA"),
    ("m.lin.oft_r", "OFT"), ("m.lin.lora_E", "AdaLoRA"),
])
def test_unknown_adapter_tensors_are_refused(name, method):
    sd = {"m.lin.lora_A.weight": torch.randn(4, 8), name: torch.randn(4, 4)}
    with pytest.raises(ValueError, match=method):
        compeft_rs.compress_expert(sd, 0.1)


def test_unsupported_peft_configs_are_refused(tmp_path):
    sd = {"m.lin.lora_A.weight": torch.randn(4, 8), "m.lin.lora_B.weight": torch.randn(8, 4)}
    with pytest.raises(ValueError, match="LOHA is not supported"):
        compeft_rs.compress_expert(sd, 0.1, peft_config={"peft_type": "LOHA"})
    for init in ("pissa", "pissa_niter_4", "olora", "loftq"):
        with pytest.raises(ValueError, match="do not start from 0"):
            compeft_rs.compress_expert(sd, 0.1, peft_config={"peft_type": "LORA", "init_lora_weights": init})
    # The folder path reads the same config.
    save_file(sd, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "init_lora_weights": "olora"}))
    r = run(["compress", tmp_path, "-o", tmp_path / "o.safetensors", "-k", "0.1"])
    assert r.returncode == 1 and "do not start from 0" in r.stderr and "Traceback" not in r.stderr


def test_names_match_on_segments_not_substrings():
    # "flora_Ax" contains "lora_A" but is not a LoRA factor: in an adapter it is kept exactly.
    sd = {"m.lin.lora_A.weight": torch.randn(4, 8), "m.flora_Ax.weight": torch.randn(3, 3),
          "m.ia3_lx": torch.randn(3)}
    e = compeft_rs.compress_expert(sd, 0.5)
    assert e.lossless_keys() == ["m.flora_Ax.weight", "m.ia3_lx"]
    assert e.init_of("m.lin.lora_A.weight") == "zero"


# -- the listed cases -------------------------------------------------------------------------

def test_tune_uses_the_active_adapter_and_leaves_others_alone():
    model = tiny_peft()
    model.add_adapter("other", peft.LoraConfig(r=4, target_modules=["lin"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".other." in n:
                p.copy_(torch.randn_like(p) * 3)
    model.set_adapter("other")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(5, 16)
    res = compeft_rs.tune(model, lambda m: float(m(x).abs().sum()), ks=(0.5,), alphas=(0.5, 1.0, 4.0),
                          scopes=("global",), scales=("std",), progress=False)
    # The grid's three points (tune adds the defaults' point, per_tensor/pair, when the grid
    # lacks it): alpha changes the scored adapter.
    assert len({p.score for p in res.points if p.scope == "global"}) == 3
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n  # both adapters as they were
    b = res.best
    want = compeft_rs.compress_peft(model, 0.5, b.alpha, adapter_name="other", scope=b.scope, scale=b.scale)
    for n in want.compressed_keys():
        assert want.stream(n) == res.expert.stream(n)


def test_apply_checkpoint_refuses_an_expert_made_without_base(tmp_path):
    base = {"w": torch.randn(8, 8)}
    save_file(base, str(tmp_path / "base.safetensors"))
    e = compeft_rs.compress_expert({"w": torch.randn(8, 8)}, 0.5)  # a task vector from 0
    with pytest.raises(ValueError, match="without --base"):
        compeft_rs.apply_checkpoint(e, tmp_path / "base.safetensors", tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def make_sharded(folder, tensors, shards):
    folder.mkdir(parents=True)
    names = sorted(tensors)
    wm = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in names[i::shards]}, str(folder / fname))
        wm.update({n: fname for n in names[i::shards]})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 0},
                                                                     "weight_map": wm}))


def test_tensors_the_base_lacks_round_trip_through_apply(tmp_path):
    g = torch.Generator().manual_seed(2)
    base = {f"l{i}.w": torch.randn(16, 8, generator=g) for i in range(4)}
    ft = {n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in base.items()}
    ft["classifier.weight"] = torch.randn(3, 8, generator=g)  # a new head
    make_sharded(tmp_path / "base", base, 2)
    make_sharded(tmp_path / "ft", ft, 2)
    e = compeft_rs.compress_checkpoint(tmp_path / "ft", 0.2, base=tmp_path / "base")
    assert e.lossless_keys() == ["classifier.weight"]
    e.save(tmp_path / "r.safetensors")
    compeft_rs.apply_checkpoint(tmp_path / "r.safetensors", tmp_path / "base", tmp_path / "out")
    out = {}
    for f in (tmp_path / "out").glob("*.safetensors"):
        out.update(load_file(str(f)))
    assert torch.equal(out["classifier.weight"], ft["classifier.weight"])
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["classifier.weight"] in {p.name for p in (tmp_path / "out").iterdir()}
    assert set(index["weight_map"]) == set(ft)
    # The same rule for the in-memory path.
    e2 = compeft_rs.compress_expert(ft, 0.2, base=base)
    assert e2.lossless_keys() == ["classifier.weight"]


def test_decompress_force_never_deletes_foreign_files(tmp_path):
    model = tiny_peft()
    model.save_pretrained(tmp_path / "a")
    r = run(["compress", tmp_path / "a", "-o", tmp_path / "e.safetensors", "-k", "0.2", "-q"])
    assert r.returncode == 0, r.stderr
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    r = run(["decompress", tmp_path / "e.safetensors", "-o", mine, "--force"])
    assert r.returncode == 3 and "notes.txt" in r.stderr
    assert (mine / "notes.txt").read_text() == "precious" and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    # The current folder is refused too, whatever it holds.
    work = tmp_path / "work"
    work.mkdir()
    r = run(["decompress", tmp_path / "e.safetensors", "-o", ".", "--force"], cwd=work)
    assert r.returncode != 0 and "current folder" in r.stderr
    assert work.exists()
    # A previous output of the tool is replaced, and nothing is left beside it.
    out = tmp_path / "out"
    for _ in range(2):
        r = run(["decompress", tmp_path / "e.safetensors", "-o", out, "--force", "-q"])
        assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_outputs_get_the_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        e = compeft_rs.compress_expert({"a.lora_A.weight": torch.randn(4, 4)}, 0.5)
        e.save(tmp_path / "e.safetensors")
        model = tiny_peft()
        compeft_rs.save_peft(compeft_rs.compress_peft(model, 0.5), tmp_path / "folder")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "e.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "folder" / "adapter_model.safetensors").stat().st_mode) == 0o644


def test_outputs_are_fsynced_with_their_folder(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    e = compeft_rs.compress_expert({"a.lora_A.weight": torch.randn(4, 4)}, 0.5)
    e.save(tmp_path / "e.safetensors")
    assert str(tmp_path) in synced  # the folder, after the rename
    assert any(s.startswith(str(tmp_path / ".e.safetensors.")) for s in synced)  # the file, before it


def test_names_with_newlines_and_unicode_round_trip(tmp_path):
    sd = {"a\nb.lora_A.weight": torch.randn(4, 4), "ünï.lora_B.weight": torch.randn(4, 4), "": torch.randn(2)}
    e = compeft_rs.compress_expert(sd, 0.5)
    e.save(tmp_path / "e.safetensors")
    back = compeft_rs.load_expert(tmp_path / "e.safetensors")
    assert back.keys() == sorted(sd)
    for n in sd:
        assert torch.equal(back[n], e[n])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_apply_adds_in_float32_and_matches_apply_checkpoint(tmp_path, dtype):
    g = torch.Generator().manual_seed(4)
    base = {"w": torch.randn(256, 256, generator=g).to(dtype)}
    ft = {"w": (base["w"].float() + 0.05 * torch.randn(256, 256, generator=g)).to(dtype)}
    e = compeft_rs.compress_expert(ft, 0.1, base=base)
    tau32 = e.decode(dtype="float32")["w"]
    want = (base["w"].float() + tau32).to(dtype)
    got = e.apply(base)["w"]
    assert got.dtype == dtype and torch.equal(got, want)
    save_file(base, str(tmp_path / "base.safetensors"))
    compeft_rs.apply_checkpoint(e, tmp_path / "base.safetensors", tmp_path / "out.safetensors")
    assert torch.equal(load_file(str(tmp_path / "out.safetensors"))["w"], want)


# -- global selection in sorted name order, ties across tensors -------------------------------

def tied_tensors():
    # Every magnitude is 1 or 2, so the threshold is tied across tensors and the sorted name
    # order decides which of the tied entries are kept.
    g = torch.Generator().manual_seed(5)
    names = ["z.w", "m.w", "a.w", "q.w"]
    return {n: (torch.randint(1, 3, (6, 5), generator=g) * (2 * torch.randint(0, 2, (6, 5), generator=g) - 1))
            .float() for n in names}


def global_reference(taus, k):
    names = sorted(taus)
    flat = np.concatenate([taus[n].double().numpy().reshape(-1) for n in names])
    signs, off, out = reference_signs(flat, k), 0, {}
    for n in names:
        out[n] = signs[off:off + taus[n].numel()]
        off += taus[n].numel()
    return out, reference_sigma(flat)


def test_global_scope_orders_ties_by_sorted_name_not_insertion():
    taus = tied_tensors()
    ref, sigma = global_reference(taus, 0.55)
    e = compeft_rs.compress_expert(taus, 0.55, scope="global", scale="std")  # inserted z, m, a, q
    for n in taus:
        assert np.array_equal(pattern_of(e.stream(n)), ref[n]), n
        assert e.stream(n).scale == pytest.approx(sigma, rel=1e-12)


def test_checkpoint_global_scope_orders_ties_by_sorted_name_not_shard(tmp_path):
    taus = tied_tensors()
    ref, _ = global_reference(taus, 0.55)
    (tmp_path / "ck").mkdir()
    # Shard files sort as z, m, a, q: the shard order is not the name order.
    wm = {}
    for i, n in enumerate(["z.w", "m.w", "a.w", "q.w"]):
        save_file({n: taus[n]}, str(tmp_path / "ck" / f"s{i}.safetensors"))
        wm[n] = f"s{i}.safetensors"
    (tmp_path / "ck" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    e = compeft_rs.compress_checkpoint(tmp_path / "ck", 0.55, scope="global", scale="std")
    for n in taus:
        assert np.array_equal(pattern_of(e.stream(n)), ref[n]), n


def test_apply_checkpoint_starts_ia3_vectors_from_one(tmp_path):
    base = {"m.ia3_l": torch.full((40,), 3.0), "m.w": torch.ones(4)}
    save_file(base, str(tmp_path / "base.safetensors"))
    ia3 = {"m.ia3_l": 1 + 0.1 * torch.randn(40, generator=torch.Generator().manual_seed(6))}
    e = compeft_rs.compress_expert(ia3, 0.25)
    assert e.init_of("m.ia3_l") == "one"
    compeft_rs.apply_checkpoint(e, tmp_path / "base.safetensors", tmp_path / "out.safetensors")
    got = load_file(str(tmp_path / "out.safetensors"))
    tau = e.decode(dtype="float32")["m.ia3_l"]
    assert torch.equal(got["m.ia3_l"], 1.0 + tau) and torch.equal(got["m.w"], base["m.w"])


# -- the whole-expert decode ------------------------------------------------------------------

def test_whole_expert_decode_matches_each_tensor_and_the_reference(tmp_path):
    g = torch.Generator().manual_seed(7)
    sd = {}
    for i, dt in enumerate([torch.float16, torch.bfloat16, torch.float32, torch.float64] * 3):
        r, c = (i % 5) * 37 + 1, 4096 // (i + 1)
        sd[f"layer.{i}.lora_{'AB'[i % 2]}.weight"] = torch.randn(r, c, generator=g).to(dt)
    sd["layer.0.empty.lora_A.weight"] = torch.zeros(0, 3)
    sd["step"] = torch.tensor([3], dtype=torch.int64)
    for scope in ("global", "per_tensor"):
        e = compeft_rs.compress_expert(sd, 0.1, scope=scope)
        e.save(tmp_path / "e.safetensors")
        loaded = compeft_rs.load_expert(tmp_path / "e.safetensors")
        whole = loaded.decode()
        assert list(whole) == sorted(sd)
        for n, t in sd.items():
            assert whole[n].dtype == t.dtype and whole[n].shape == t.shape, n
            if n == "step":
                assert torch.equal(whole[n], t)
                continue
            c = loaded.stream(n)
            assert torch.equal(whole[n], c.decode()), n
            want = reference_signs(t.double().numpy(), 0.1) if scope == "per_tensor" else pattern_of(c)
            assert np.array_equal(np.sign(whole[n].double().numpy().reshape(-1)), want), n
        # Other dtypes and a subset, in one call.
        sub = loaded.decode(["layer.3.lora_B.weight", "step"], dtype=torch.float64)
        assert sub["layer.3.lora_B.weight"].dtype == torch.float64 and sub["step"].dtype == torch.int64
        # Decoded tensors are disjoint views: writing one leaves the others as they were.
        whole["layer.0.lora_A.weight"].fill_(7)
        assert torch.equal(whole["layer.4.lora_A.weight"], loaded.stream("layer.4.lora_A.weight").decode())
        # safetensors accepts them as they are.
        save_file(loaded.decode(), str(tmp_path / "dense.safetensors"))


def test_bytes_and_file_experts_agree_and_save_is_the_same_bytes(tmp_path):
    e = compeft_rs.compress_expert(dora_state_dict(), 0.2, scope="per_tensor")
    e.save(tmp_path / "e.safetensors")
    data = (tmp_path / "e.safetensors").read_bytes()
    assert data == e.to_bytes() and e.nbytes == len(data) == e.summary().file_bytes
    from_bytes = compeft_rs.CompressedExpert.from_bytes(data)
    loaded = compeft_rs.load_expert(tmp_path / "e.safetensors")
    for n in e.keys():
        assert torch.equal(from_bytes[n], loaded[n]) and torch.equal(e[n], loaded[n])


def test_hostile_expert_files_give_clean_errors(tmp_path):
    e = compeft_rs.compress_expert(dora_state_dict(), 0.2)
    data = e.to_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    # A header whose offsets point past the data.
    bad = dict(header)
    key = next(k for k in bad if k != "__metadata__")
    bad[key] = dict(bad[key], data_offsets=[0, 10**9])
    h = json.dumps(bad).encode()
    h += b" " * (-len(h) % 8)
    (tmp_path / "lie.safetensors").write_bytes(len(h).to_bytes(8, "little") + h + data[8 + n:])
    with pytest.raises(CompeftError, match="lie.safetensors"):
        compeft_rs.load_expert(tmp_path / "lie.safetensors")
    # Metadata that is not JSON.
    bad = dict(header, __metadata__=dict(header["__metadata__"], compeft="{not json"))
    h = json.dumps(bad).encode()
    h += b" " * (-len(h) % 8)
    (tmp_path / "md.safetensors").write_bytes(len(h).to_bytes(8, "little") + h + data[8 + n:])
    with pytest.raises(CompeftError, match="corrupt compeft metadata"):
        compeft_rs.load_expert(tmp_path / "md.safetensors")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(CompeftError):
        compeft_rs.load_expert(tmp_path / "empty.safetensors")
    with pytest.raises(CompeftError):
        compeft_rs.CompressedExpert.from_bytes(data[: len(data) // 2])


def with_metadata(data, **fields):
    """The file `data` with `__metadata__` fields replaced (the header rewritten and re-padded)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header["__metadata__"] = dict(header["__metadata__"], **fields)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return len(h).to_bytes(8, "little") + h + data[8 + n:]


def test_deflate_bombs_in_the_metadata_fail_fast_naming_the_bound(tmp_path):
    """The name list and adapter config are zlib data: a few kB that inflate to 64 MiB are refused
    once past 1 KiB per tensor + 1 MiB, without holding the 64 MiB (zlib alone expands 1032x)."""
    import base64
    import tracemalloc
    import zlib

    e = compeft_rs.compress_peft(tiny_peft(), 0.5)
    data = e.to_bytes()
    info = json.loads(e._file.metadata()["compeft"])
    count = len(e.keys())
    bomb = base64.b64encode(zlib.compress(b" " * (64 << 20), 9)).decode()
    assert len(bomb) < 100_000
    limit = 1024 * count + (1 << 20)
    for field, value in [("compeft", json.dumps(dict(info, names=bomb))), ("peft_config", bomb)]:
        path = tmp_path / f"{field}.cpft.safetensors"
        path.write_bytes(with_metadata(data, **{field: value}))
        tracemalloc.start()
        try:
            with pytest.raises(CompeftError, match=f"inflates past {limit} bytes, the most a file of {count} tensors"):
                compeft_rs.load_expert(path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 3 * limit, (field, peak)
    # A zlib stream that ends early is corrupt, as zlib.decompress says; bytes after its end are
    # ignored, as zlib.decompress ignores them.
    names = base64.b64decode(info["names"])
    for raw, ok in [(names[:-3], False), (names + b"tail", True)]:
        md = json.dumps(dict(info, names=base64.b64encode(raw).decode()))
        if ok:
            compeft_rs.CompressedExpert.from_bytes(with_metadata(data, compeft=md))
        else:
            with pytest.raises(CompeftError, match="truncated"):
                compeft_rs.CompressedExpert.from_bytes(with_metadata(data, compeft=md))
    # The writer refuses what a reader would: a config beyond the bound.
    with pytest.raises(ValueError, match="adapter config takes .* a reader accepts"):
        compeft_rs.compress_expert(dora_state_dict(), 0.5, peft_config={"x": "y" * (2 << 20)})
    # The stream pack's index (raw deflate, inflated in Rust) is bounded the same way: 32 bytes
    # per deflated byte + 2 per payload byte + 64 KiB (FORMAT.md, "The stream pack").
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    z = c.compress(bytes(64 << 20)) + c.flush()
    assert 1 << 14 <= len(z) < 1 << 21  # its length is a 3-byte varint
    pack = b"CPFK\x01\x01" + bytes([len(z) & 0x7F | 0x80, len(z) >> 7 & 0x7F | 0x80, len(z) >> 14]) + z
    pack += zlib.crc32(pack).to_bytes(4, "little")
    header = {"streams": {"dtype": "U8", "shape": [len(pack)], "data_offsets": [0, len(pack)]},
              "__metadata__": {"format": "compeft"}}
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path = tmp_path / "pack.cpft.safetensors"
    path.write_bytes(len(h).to_bytes(8, "little") + h + pack)
    with pytest.raises(CompeftError, match=f"pack.cpft.safetensors: .*index inflates past {32 * len(z) + (64 << 10)} bytes"):
        compeft_rs.load_expert(path)


CHANGE_AFTER_LOAD = r"""
import sys, torch, compeft_rs
path, change = sys.argv[1], sys.argv[2]
e = compeft_rs.load_expert(path)
data = open(path, "rb").read()
want = compeft_rs.CompressedExpert.from_bytes(data).decode()
n = 8 + int.from_bytes(data[:8], "little")
with open(path, "r+b") as f:
    if change == "truncate":
        f.truncate(64)
    else:  # every byte after the header changed in place, the length kept
        f.seek(n)
        f.write(bytes(b ^ 0xA5 for b in data[n:]))
got = e.decode()
print("same" if all(torch.equal(got[k], want[k]) for k in want) else "different")
"""


@pytest.mark.parametrize("change", ["truncate", "rewrite"])
def test_a_loaded_expert_does_not_see_later_changes_to_its_file(tmp_path, change):
    """load_expert reads the file: truncating it afterwards killed a process that had it mapped
    (SIGBUS), and bytes changed in place were decoded after the checksum had passed. Run in a
    subprocess so that a crash is a failure, not the end of the test run."""
    g = torch.Generator().manual_seed(2)
    t = {f"base_model.model.l{i}.lora_A.weight": torch.randn(256, 1024, generator=g) for i in range(4)}
    t.update(dora_state_dict())
    path = tmp_path / "e.cpft.safetensors"
    compeft_rs.compress_expert(t, 0.3, lossless=[HEAD]).save(path)
    assert path.stat().st_size > 16 * 4096
    r = subprocess.run([sys.executable, "-c", CHANGE_AFTER_LOAD, str(path), change], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "same", (r.returncode, r.stdout, r.stderr[-2000:])


def test_cli_maps_every_error_to_one_line(tmp_path):
    (tmp_path / "f").write_text("x")
    r = run(["compress", tmp_path / "f" / "sub", "-o", tmp_path / "o", "-k", "0.1"])
    assert r.returncode == 4 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    e = compeft_rs.compress_expert({"a.lora_A.weight": torch.randn(4, 4)}, 0.5)
    e.save(tmp_path / "e.safetensors")
    r = run(["compress", tmp_path / "e.safetensors", "-o", tmp_path, "-k", "0.1"])  # a folder as output
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    for sub in ("compress", "decompress", "apply", "inspect", "demo"):
        h = run([sub, "--help"])
        assert h.returncode == 0 and len(h.stdout.split("\n\n")[1]) > 40, sub  # a description


def test_framework_is_explicit():
    c = compeft_rs.encode(np.arange(10, dtype=np.float32), 0.3)
    assert isinstance(compeft_rs.decode(c.to_bytes()), torch.Tensor)
    assert isinstance(compeft_rs.decode(c.to_bytes(), framework="np"), np.ndarray)
    assert isinstance(compeft_rs.CompressedTensor.from_bytes(c.to_bytes(), framework="np").decode(), np.ndarray)
    with pytest.raises(ValueError, match="framework"):
        compeft_rs.decode(c.to_bytes(), framework="tf")
    with pytest.raises(TypeError):
        c.decode("float64")  # dtype is keyword-only


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("dtypes", {"a.lora_A.weight": "float99"}, "'dtypes' gives tensor 'a.lora_A.weight'"),
        ("dtypes", {"a.lora_A.weight": "int8"}, "'dtypes' gives tensor 'a.lora_A.weight'"),
        ("dtypes", {"nope": "float16"}, "'dtypes' names tensor 'nope'"),
        ("init", {"nope": "base"}, "'init' names tensor 'nope'"),
        ("init", {"a.lora_A.weight": "weird"}, "'init' gives tensor 'a.lora_A.weight'"),
        ("default_init", "weird", "default_init"),
        ("k", "x", "density k"),
        ("k", 0, "density k"),
        ("alpha", float("nan"), "alpha"),
        ("lossless", ["c.weight", "nope"], "'lossless' names tensor 'nope'"),
        ("lossless", [], "'c.weight' should be a compressed stream"),
    ],
)
def test_metadata_that_lies_is_refused_naming_file_and_tensor(tmp_path, field, value, message):
    e = compeft_rs.compress_expert(
        {"a.lora_A.weight": torch.randn(4, 8), "b.lora_B.weight": torch.randn(8, 4).half(), "c.weight": torch.randn(3)},
        0.5,
        lossless=["c.weight"],
    )
    data = e.to_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    info = json.loads(header["__metadata__"]["compeft"])
    info[field] = value
    header["__metadata__"] = dict(header["__metadata__"], compeft=json.dumps(info))
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path = tmp_path / "lies.safetensors"
    path.write_bytes(len(h).to_bytes(8, "little") + h + data[8 + n :])
    with pytest.raises(CompeftError, match="lies.safetensors") as err:
        compeft_rs.load_expert(path)
    assert message in str(err.value)
