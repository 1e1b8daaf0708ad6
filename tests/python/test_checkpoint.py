"""Sharded full fine-tunes: compress the residual, apply it back with the same sharding, bounded
memory; and the CLI's handling of bad input."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from reference import reference_sigma, reference_signs

CLI = [sys.executable, "-m", "compeft_rs.cli"]


def make_checkpoint(folder, tensors, shards):
    """Writes `tensors` into `shards` files with a model.safetensors.index.json."""
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in part}, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text("{}")


@pytest.fixture
def pair(tmp_path):
    g = torch.Generator().manual_seed(3)
    base = {f"layers.{i}.w": torch.randn(64, 48, generator=g).to(torch.bfloat16 if i % 2 else torch.float32)
            for i in range(6)}
    base["embed"] = torch.randn(100, 16, generator=g, dtype=torch.float16)
    base["position_ids"] = torch.arange(10)
    ft = {n: (t.float() + 0.01 * torch.randn(t.shape, generator=g)).to(t.dtype) if t.is_floating_point() else t
          for n, t in base.items()}
    make_checkpoint(tmp_path / "base", base, 3)
    make_checkpoint(tmp_path / "ft", ft, 3)
    return tmp_path, base, ft


def run(args):
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True)


def test_sharded_round_trip(pair):
    tmp, base, ft = pair
    r = run(["compress", tmp / "ft", "--base", tmp / "base", "-o", tmp / "res.safetensors", "-k", "0.1", "-q",
             "--scope", "global", "--scale", "std"])
    assert r.returncode == 0, r.stderr
    r = run(["apply", tmp / "res.safetensors", "--base", tmp / "base", "-o", tmp / "out", "-q"])
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp / "out").iterdir()) == sorted(p.name for p in (tmp / "base").iterdir())
    # Independent reference: global ComPEFT of the float32 residuals in sorted name order.
    names = sorted(n for n in ft if ft[n].is_floating_point())
    taus = {n: (ft[n].double() - base[n].double()).numpy() for n in names}
    taus32 = {n: (ft[n].float() - base[n].float()).double().numpy() for n in names}
    flat = np.concatenate([taus32[n].reshape(-1) for n in names])
    signs, scale = reference_signs(flat, 0.1), reference_sigma(flat)
    out = {}
    for f in (tmp / "out").glob("*.safetensors"):
        out.update(load_file(str(f)))
    off = 0
    for n in names:
        size = taus[n].size
        want = (base[n].float() + torch.from_numpy(signs[off:off + size].reshape(taus[n].shape) * np.float32(scale)).float()).to(base[n].dtype)
        off += size
        assert out[n].dtype == base[n].dtype
        assert torch.equal(out[n], want), n
    assert torch.equal(out["position_ids"], base["position_ids"])


def test_memory_stays_bounded(tmp_path):
    """16 shards of 8 MB (base and fine-tune: 256 MB in all): the peak RSS added by compressing
    stays below a few shards."""
    script = textwrap.dedent(f"""
        import json, resource, torch
        from pathlib import Path
        from safetensors.torch import save_file
        import compeft_rs
        root = Path({str(tmp_path)!r})
        g = torch.Generator().manual_seed(0)
        for kind in ("base", "ft"):
            (root / kind).mkdir()
            wm = {{}}
            for i in range(16):
                t = {{f"l{{i}}.{{j}}": torch.randn(512, 2048, generator=g) for j in range(2)}}
                save_file(t, str(root / kind / f"s{{i}}.safetensors"))
                wm.update({{n: f"s{{i}}.safetensors" for n in t}})
                del t
            (root / kind / "model.safetensors.index.json").write_text(json.dumps({{"weight_map": wm}}))
        import gc; gc.collect()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        e = compeft_rs.compress_checkpoint(root / "ft", 0.1, base=root / "base")
        e.save(root / "res.safetensors")
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({{"added_kb": after - before, "file": (root / "res.safetensors").stat().st_size}}))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    shard_kb = 8 * 1024
    assert res["added_kb"] < 4 * shard_kb, res  # 256 MB were read
    assert res["file"] < 64 * 1024 * 1024 / 20


def test_cli_bad_inputs(pair):
    tmp, base, ft = pair
    out = tmp / "o.safetensors"

    def fails(args, code, msg):
        r = run(args)
        assert r.returncode == code, (r.returncode, r.stderr)
        assert msg in r.stderr and "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
        assert not out.exists()

    fails(["compress", tmp / "missing", "-o", out, "-k", "0.1"], 4, "does not exist")
    (tmp / "empty").mkdir()
    fails(["compress", tmp / "empty", "-o", out, "-k", "0.1"], 4, "no .safetensors files")
    fails(["compress", tmp / "ft", "-o", out, "-k", "20"], 1, "k=0.2")
    fails(["compress", tmp / "ft", "-o", out, "-k", "0"], 1, "(0, 1]")
    save_file({"layers.0.w": torch.ones(3, 3)}, str(tmp / "wrong.safetensors"))
    fails(["compress", tmp / "ft", "--base", tmp / "wrong.safetensors", "-o", out, "-k", "0.1"], 1, "shape")
    nan = {"w": torch.tensor([1.0, float("nan")])}
    save_file(nan, str(tmp / "nan.safetensors"))
    fails(["compress", tmp / "nan.safetensors", "-o", out, "-k", "0.5"], 1, "NaN")
    save_file({"ids": torch.arange(5), "mask": torch.ones(3, dtype=torch.bool)}, str(tmp / "ints.safetensors"))
    fails(["compress", tmp / "ints.safetensors", "-o", out, "-k", "0.5"], 1, "supported dtype")
    (tmp / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    fails(["inspect", tmp / "garbage.safetensors"], 5, "corrupt")
    fails(["apply", tmp / "garbage.safetensors", "--base", tmp / "base", "-o", out], 5, "corrupt")
    # A compressed file cut short, and one with flipped bits in a stream.
    r = run(["compress", tmp / "ft", "-o", tmp / "good.safetensors", "-k", "0.1", "-q"])
    assert r.returncode == 0, r.stderr
    data = (tmp / "good.safetensors").read_bytes()
    (tmp / "cut.safetensors").write_bytes(data[: len(data) // 2])
    fails(["inspect", tmp / "cut.safetensors"], 5, "corrupt")
    flipped = bytearray(data)
    flipped[-20] ^= 0xFF
    (tmp / "flip.safetensors").write_bytes(bytes(flipped))
    fails(["decompress", tmp / "flip.safetensors", "-o", out], 5, "corrupt")
    # An existing output is kept unless --force.
    fails(["compress", tmp / "ft", "-o", tmp / "good.safetensors", "-k", "0.1"], 3, "--force")
    r = run(["compress", tmp / "ft", "-o", tmp / "good.safetensors", "-k", "0.2", "--force", "-q"])
    assert r.returncode == 0
    # An expert made without a base is not a residual; a residual needs its own base.
    fails(["apply", tmp / "good.safetensors", "--base", tmp / "base", "-o", out], 1, "without --base")
    r = run(["compress", tmp / "ft", "--base", tmp / "base", "-o", tmp / "res.safetensors", "-k", "0.1", "-q",
             "--scope", "global", "--scale", "std"])
    assert r.returncode == 0, r.stderr
    fails(["apply", tmp / "res.safetensors", "--base", tmp / "wrong.safetensors", "-o", out], 1, "lacks")


def test_cli_inspect_and_help(pair):
    tmp, _, _ = pair
    r = run(["compress", tmp / "ft", "--base", tmp / "base", "-o", tmp / "r.safetensors", "-k", "0.1", "-q"])
    assert r.returncode == 0, r.stderr
    r = run(["inspect", tmp / "r.safetensors"])
    assert r.returncode == 0 and "bits/param" in r.stdout and "entropy bound" in r.stdout
    assert "exact" in r.stdout  # position_ids
    r = run(["--help"])
    assert r.returncode == 0 and "compress" in r.stdout and "inspect" in r.stdout
    r = run([])
    assert r.returncode == 2
