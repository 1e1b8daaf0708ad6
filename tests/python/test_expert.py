"""Whole experts against a plain numpy statement of global and per-tensor ComPEFT."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open

import compeft_rs
from compeft_rs import CompeftError
from reference import pattern_of, reference_sigma, reference_signs


def reference_expert(taus, k, alpha, scope):
    """name -> dense float64 reconstruction; global: one threshold/sigma over sorted names."""
    names = sorted(taus)
    out = {}
    if scope == "global":
        flat = np.concatenate([taus[n].reshape(-1) for n in names]) if names else np.zeros(0)
        signs = reference_signs(flat, k)
        scale = alpha * reference_sigma(flat)
        off = 0
        for n in names:
            size = taus[n].size
            out[n] = (signs[off : off + size] * scale).reshape(taus[n].shape), signs[off : off + size]
            off += size
    else:
        for n in names:
            s = reference_signs(taus[n], k)
            out[n] = (s * alpha * reference_sigma(taus[n])).reshape(taus[n].shape), s
    return out


def f64(t):
    return t.to(torch.float64).numpy()


@given(
    sizes=st.lists(st.tuples(st.integers(0, 40), st.integers(1, 30)), min_size=1, max_size=6),
    k=st.floats(0.01, 1.0),
    scope=st.sampled_from(["global", "per_tensor"]),
    seed=st.integers(0, 10_000),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
)
def test_expert_matches_reference(sizes, k, scope, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    sd = {f"layer.{i}.lora_{'AB'[i % 2]}.weight": (torch.randn(r, c, generator=g) * (i + 1)).to(dtype)
          for i, (r, c) in enumerate(sizes)}
    e = compeft_rs.compress_expert(sd, k, 1.5, scope=scope)
    ref = reference_expert({n: f64(t) for n, t in sd.items()}, k, 1.5, scope)
    for n, t in sd.items():
        c = e.stream(n)
        assert np.array_equal(pattern_of(c), ref[n][1])
        dec = e[n]
        assert dec.dtype == t.dtype and dec.shape == t.shape
        if scope == "global" and c.numel:
            scales = {e.stream(m).scale for m in sd if e.stream(m).numel}
            assert len(scales) == 1
    back = compeft_rs.CompressedExpert.from_bytes(e.to_bytes())
    assert back.keys() == e.keys()
    for n in sd:
        assert torch.equal(back[n], e[n])


def test_save_load_lazy_and_safetensors_compatible(tmp_path):
    sd = {"a.lora_A.weight": torch.randn(8, 64), "a.lora_B.weight": torch.randn(64, 8, dtype=torch.float16),
          "step": torch.tensor([7], dtype=torch.int64)}
    e = compeft_rs.compress_expert(sd, 0.2, scope="global", scale="std")
    path = tmp_path / "expert.safetensors"
    e.save(path)
    # safetensors orders metadata keys freely, so compare contents, not bytes.
    from_bytes = compeft_rs.CompressedExpert.from_bytes(path.read_bytes())
    assert all(from_bytes.stream(n) == e.stream(n) for n in e.compressed_keys())
    with safe_open(str(path), framework="pt") as f:
        # The streams are packed into one tensor; kept tensors sit under their name's position;
        # the names travel once, deflated, in the metadata.
        assert set(f.keys()) == {"streams", "2"}
        assert f.get_tensor("streams").dtype == torch.uint8
        meta = json.loads(f.metadata()["compeft"])
        assert meta["k"] == 0.2 and meta["scope"] == "global" and meta["lossless"] == ["step"]
        names = compeft_rs._expert.unpack_names(meta["names"], 3, "test")
        assert names == sorted(sd)
        assert f.get_tensor(str(names.index("step"))).dtype == torch.int64
    loaded = compeft_rs.load_expert(path)
    assert torch.equal(loaded["step"], sd["step"])
    assert loaded["a.lora_B.weight"].dtype == torch.float16
    assert torch.equal(loaded["a.lora_A.weight"], e["a.lora_A.weight"])
    dec = loaded.decode()
    assert set(dec) == set(sd)
    s = loaded.summary()
    assert s.file_bytes == path.stat().st_size and s.ratio_vs_fp16 > 1
    assert "total: 3 tensors" in str(s)


def test_ia3_and_base_and_apply():
    torch.manual_seed(0)
    ia3 = {"m.ia3_l.weight": 1 + 0.1 * torch.randn(1, 50), "m.lora_A.weight": torch.randn(4, 50)}
    e = compeft_rs.compress_expert(ia3, 0.2, scope="per_tensor", scale="std")
    assert e.init_of("m.ia3_l.weight") == "one" and e.init_of("m.lora_A.weight") == "zero"
    tau = f64(ia3["m.ia3_l.weight"]) - 1
    s = reference_signs(tau, 0.2)
    want = 1 + s * reference_sigma(tau)
    got = e.apply()["m.ia3_l.weight"]
    assert np.allclose(f64(got).reshape(-1), want, rtol=1e-6)

    base = {"w": torch.randn(30, 30), "b": torch.randn(30), "untouched": torch.ones(3)}
    ft = {"w": base["w"] + 0.01 * torch.randn(30, 30), "b": base["b"] + 0.01 * torch.randn(30)}
    e = compeft_rs.compress_expert(ft, 0.1, base=base, scope="global", scale="std")
    ref = reference_expert({n: f64(ft[n]) - f64(base[n]) for n in ft}, 0.1, 1.0, "global")
    out = e.apply(base)
    assert set(out) == set(base) and torch.equal(out["untouched"], base["untouched"])
    for n in ft:
        assert np.allclose(f64(out[n]), f64(base[n]) + ref[n][0], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="pass base"):
        e.apply()


def test_bad_expert_inputs(tmp_path):
    with pytest.raises(ValueError, match="shape"):
        compeft_rs.compress_expert({"w": torch.ones(3, 3)}, 0.1, base={"w": torch.ones(3)})
    # A tensor the base lacks is kept exactly (the plan's rule on every path).
    e = compeft_rs.compress_expert({"w": torch.ones(3), "x": torch.ones(3)}, 0.1, base={"w": torch.ones(3)})
    assert e.lossless_keys() == ["x"] and e.init_of("w") == "base"
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        compeft_rs.compress_expert({"w": torch.ones(3)}, 1.5)
    with pytest.raises(ValueError, match="scope"):
        compeft_rs.compress_expert({"w": torch.ones(3)}, 0.1, scope="layer")
    bad = torch.ones(10)
    bad[3] = float("nan")
    with pytest.raises(ValueError, match="'bad.weight'.*NaN"):
        compeft_rs.compress_expert({"ok": torch.ones(10), "bad.weight": bad}, 0.1)
    with pytest.raises(ValueError, match="'bad.weight'.*NaN"):
        compeft_rs.compress_expert({"bad.weight": bad}, 0.1, scope="per_tensor")
    p = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.ones(3)}, str(p))
    with pytest.raises(CompeftError, match="not a compeft expert"):
        compeft_rs.load_expert(p)
    with pytest.raises(FileNotFoundError):
        compeft_rs.load_expert(tmp_path / "missing.safetensors")


def test_name_list_must_match_the_keys(tmp_path):
    import base64
    import zlib

    from safetensors import safe_open
    from safetensors.torch import save_file

    e = compeft_rs.compress_expert({"a.lora_A.weight": torch.randn(4, 4), "b.lora_A.weight": torch.randn(4, 4)}, 0.5)
    e.save(tmp_path / "good.safetensors")
    with safe_open(str(tmp_path / "good.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        md = f.metadata()
    info = json.loads(md["compeft"])
    for bad in (base64.b64encode(zlib.compress(b'["only-one"]')).decode(), "%%% not base64", "",
                base64.b64encode(zlib.compress(b'{"a": 1}')).decode()):
        info["names"] = bad
        save_file(tensors, str(tmp_path / "x.safetensors"), metadata=dict(md, compeft=json.dumps(info)))
        with pytest.raises(CompeftError):
            compeft_rs.load_expert(tmp_path / "x.safetensors")


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    import os

    e = compeft_rs.compress_expert({"w.lora_A.weight": torch.randn(10, 10)}, 0.1)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        e.save(tmp_path / "out.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_files_of_version_2_still_read(tmp_path):
    """Version 2 stored each stream as its own U8 tensor and the adapter config as JSON text."""
    from safetensors.numpy import save_file

    sd = {"m.lora_A.weight": torch.randn(4, 32), "m.lora_B.weight": torch.randn(32, 4),
          "head.weight": torch.randn(2, 4)}
    config = {"peft_type": "LORA", "r": 4}
    e = compeft_rs.compress_expert(sd, 0.25, peft_config=config)
    names = sorted(sd)
    info = json.loads(e._file.metadata()["compeft"])
    assert info["file_version"] == 3
    info["file_version"] = 2
    tensors = {str(i): np.frombuffer(e.stream(n).to_bytes(), np.uint8) for i, n in enumerate(names)
               if n in e.compressed_keys()}
    tensors[str(names.index("head.weight"))] = sd["head.weight"].numpy()
    path = tmp_path / "v2.safetensors"
    save_file(tensors, str(path), metadata={"format": "compeft", "compeft": json.dumps(info),
                                             "peft_config": json.dumps(config)})
    old = compeft_rs.load_expert(path)
    assert old.peft_config == config
    assert old.keys() == e.keys()
    for n in names:
        assert torch.equal(old[n], e[n])
    assert old.nbytes > e.nbytes
