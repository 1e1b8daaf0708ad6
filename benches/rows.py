"""Issue 18: the row-coded golomb layout against the bounds, zstd and NNCodec, on a full fine-tune and
a LoRA adapter.

    python benches/rows.py [--task movies] [--k 0.1] [--repeat 5] [--nncodec auto|off|PYTHON]

Two experts, compressed with the library's defaults at k:
- a full fine-tune residual of the bundled all-MiniLM-L6-v2 (every weight, 300 steps of Adam on one
  of the sentiment sets; made once and cached by benches/adaptive_candidates.py);
- a LoRA adapter shaped like one on q/k/v/o of a 7B model (r = 16, 32 layers, 256 tensors).

For each, bits per parameter of: our streams (the encoder's choice of layout), the same streams in
the plain layout (one Rice parameter per tensor), the i.i.d. entropy bound at each tensor's
density, the adaptive bound (adaptive_bound_bits: per-row or per-column KT code lengths, plus a
sign bit each), zstd -19 of the int8 ternary, and NNCodec 2.1.3 (Fraunhofer's implementation of
ISO/IEC 15938-17, DeepCABAC with row skipping) on the same int8 ternary, lossless (checked).
Times, each the sum over tensors of the best of --repeat runs: encode (`encode(x, k)` of the 2-D
tensor, which may code by rows, against the same tensor flattened to 1-D, which never does: the
plain Rice encoder on the same entries) and decode (`decode()` of our stream against the plain
stream), and NNCodec's encode and decode of the same ternary.

NNCodec needs numpy < 2: with --nncodec auto the script makes a virtual environment for it once
(~/.cache/compeft-rs/nncodec-venv, `pip install nncodec==2.1.3 "numpy<2"`) and drives it through
a subprocess; --nncodec PYTHON uses that interpreter instead, --nncodec off skips it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

import numpy as np
import torch

import compeft_rs
from _timing import best_of

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adaptive_candidates import residual, zstd_bits  # noqa: E402
from bench import lora_expert  # noqa: E402

CACHE = Path(os.environ.get("COMPEFT_DATA", Path.home() / ".cache" / "compeft-rs"))

# Runs inside NNCodec's environment: encodes and decodes every int8 array of an .npz, checks the
# round trip, prints {name: [bytes, encode s, decode s]} as JSON.
NNC_WORKER = r"""
import json, sys, tempfile, time
import numpy as np
from nncodec import tensor as nt
arrays = np.load(sys.argv[1])
out = {}
with tempfile.TemporaryDirectory() as tmp:
    for name in arrays.files:
        x = arrays[name]
        t0 = time.perf_counter()
        bs = nt.encode(x, args={"results": tmp, "tensor_id": "0"})
        t1 = time.perf_counter()
        y = np.asarray(nt.decode(bs, tensor_id="0"))
        t2 = time.perf_counter()
        if not np.array_equal(y.reshape(x.shape), x):
            sys.exit(f"NNCodec did not give back {name}")
        out[name] = [len(bs), t1 - t0, t2 - t1]
print(json.dumps(out))
"""


def nncodec_python(choice: str) -> str | None:
    if choice == "off":
        return None
    if choice != "auto":
        return choice
    env = CACHE / "nncodec-venv"
    py = env / "bin" / "python"
    if not py.exists():
        print(f"making {env} for NNCodec (once)", file=sys.stderr)
        venv.create(env, with_pip=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "nncodec==2.1.3", "numpy<2"], check=True)
    return str(py)


def run_nncodec(py: str, ternary: dict[str, np.ndarray]) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory() as tmp:
        npz = Path(tmp) / "t.npz"
        np.savez(npz, **{str(i): t for i, t in enumerate(ternary.values())})
        worker = Path(tmp) / "worker.py"
        worker.write_text(NNC_WORKER)
        res = subprocess.run([py, str(worker), str(npz)], capture_output=True, text=True, cwd=tmp)
        if res.returncode != 0:
            raise SystemExit(f"NNCodec failed:\n{res.stderr[-2000:]}")
        got = json.loads(res.stdout.strip().splitlines()[-1])
    return {name: got[str(i)] for i, name in enumerate(ternary)}


def measure(label: str, tensors: dict[str, torch.Tensor], k: float, repeat: int, nnc: str | None) -> dict:
    expert = compeft_rs.compress_expert(tensors, k)
    names = expert.compressed_keys()
    r = dict(params=0, ours=0.0, plain=0.0, iid=0.0, adaptive=0.0, zstd=0.0, nncodec=0.0, by_rows=0,
             enc=0.0, enc_plain=0.0, dec=0.0, dec_plain=0.0, nnc_enc=0.0, nnc_dec=0.0)
    ternary = {}
    # Collected once here and not between the hundreds of small timed calls (see best_of).
    gc.collect()
    gc.disable()
    for name in names:
        c = expert.stream(name)
        plain = c.to_golomb(layout="plain")
        t = np.sign(c.decode(dtype=torch.float32).numpy()).astype(np.int8)
        ternary[name] = t
        r["params"] += c.numel
        r["ours"] += 8 * c.nbytes
        r["plain"] += 8 * plain.nbytes
        r["by_rows"] += c.row_length is not None
        r["iid"] += compeft_rs.entropy_bound_bits(c.numel, c.density) if c.nnz else 0.0
        r["adaptive"] += compeft_rs.adaptive_bound_bits(c)
        r["zstd"] += zstd_bits(t)
        x = tensors[name].float()
        flat = x.reshape(-1)
        r["enc"] += best_of(lambda: compeft_rs.encode(x, k), repeat, collect=False)
        r["enc_plain"] += best_of(lambda: compeft_rs.encode(flat, k), repeat, collect=False)
        r["dec"] += best_of(lambda: c.decode(dtype=torch.float32), repeat, collect=False)
        r["dec_plain"] += best_of(lambda: plain.decode(dtype=torch.float32), repeat, collect=False)
    gc.enable()
    if nnc is not None:
        for name, (nbytes, te, td) in run_nncodec(nnc, ternary).items():
            r["nncodec"] += 8 * nbytes
            r["nnc_enc"] += te
            r["nnc_dec"] += td
    r["label"] = label
    r["tensors"] = len(names)
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="movies", choices=["movies", "amazon", "tweets"])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--k", type=float, default=0.1)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--nncodec", default="auto", help="auto (make a venv once), off, or a python with nncodec")
    args = ap.parse_args()
    torch.set_num_threads(1)
    nnc = nncodec_python(args.nncodec)

    init, ft = residual(args.task, args.steps)
    full = {n: (ft[n].float() - init[n].float()) for n in ft if n in init and ft[n].is_floating_point()}
    runs = [
        measure(f"MiniLM full fine-tune ({args.task}, {args.steps} steps)", full, args.k, args.repeat, nnc),
        measure("7B-shaped LoRA (r=16, q/k/v/o)", {n: t.float() for n, t in lora_expert(32, 4096).items()},
                args.k, args.repeat, nnc),
    ]
    print(f"k = {args.k}; bits per parameter (x the adaptive bound); times summed over tensors, best of "
          f"{args.repeat}, one torch thread, compeft on all cores")
    cols = [("ours", "ours"), ("plain Rice", "plain"), ("i.i.d. bound", "iid"), ("adaptive bound", "adaptive"),
            ("zstd -19", "zstd")] + ([("NNCodec", "nncodec")] if nnc else [])
    for r in runs:
        p = r["params"]
        print(f"\n{r['label']}: {r['tensors']} tensors, {p:,} params, {r['by_rows']} coded by rows")
        for title, key in cols:
            print(f"  {title:15s} {r[key] / p:.4f} bits/param  ({r[key] / r['adaptive']:.3f}x adaptive, "
                  f"{r[key] / r['iid']:.3f}x i.i.d.)")
        print(f"  encode: {1e3 * r['enc']:.1f} ms vs plain Rice {1e3 * r['enc_plain']:.1f} ms "
              f"({r['enc'] / r['enc_plain']:.2f}x)")
        print(f"  decode: {1e3 * r['dec']:.1f} ms vs plain Rice {1e3 * r['dec_plain']:.1f} ms "
              f"({r['dec'] / r['dec_plain']:.2f}x)")
        if nnc:
            print(f"  NNCodec: encode {1e3 * r['nnc_enc']:.0f} ms ({r['nnc_enc'] / r['enc']:.0f}x ours), "
                  f"decode {1e3 * r['nnc_dec']:.0f} ms ({r['nnc_dec'] / r['dec']:.0f}x ours); "
                  f"ours is {100 * (1 - r['ours'] / r['nncodec']):+.1f}% smaller")


if __name__ == "__main__":
    main()
