"""Merging benchmark: compeft_rs.merge / similarity on compressed experts against the torch ways.

Llama-7B-shaped LoRA experts (32 layers, 4096 wide, r=16 on q/k/v/o: 256 tensors, 16.8M
parameters, fp16, compressed at k=0.1 with the defaults). Side by side, in one run (best of
--repeat):

- TIES and task arithmetic over --experts experts: compeft_rs.merge from the compressed experts in
  memory, and from their files; peft.utils.merge_utils.ties / task_arithmetic per tensor on the
  same experts already decoded to dense float32 in memory, with the factor weights peft's
  add_weighted_adapter gives them (sqrt(w) on lora_A and lora_B, as compeft_rs.merge; density 1:
  no extra trim; the decode is not timed);
- the N x N cosine matrix of --sim-experts experts: compeft_rs.similarity against torch on the
  dense float32 experts (rows normalised, one matrix product; the decode is not timed).

    python benches/merge.py [--repeat 3] [--json bench-results/merge.json]
"""

import argparse
import gc
import json
import tempfile
import time
import warnings
from pathlib import Path

import torch

import compeft_rs
from _timing import best_of


def lora_expert(seed, layers, width, r):
    g = torch.Generator().manual_seed(seed)
    t = {}
    for i in range(layers):
        for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
            p = f"base_model.model.model.layers.{i}.self_attn.{m}"
            t[f"{p}.lora_A.weight"] = (torch.randn(r, width, generator=g) / width**0.5).half()
            t[f"{p}.lora_B.weight"] = (torch.randn(width, r, generator=g) * 1e-3).half()
    return t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--sim-experts", type=int, default=100, help="experts in the cosine matrix (0: skip it)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--k", type=float, default=0.1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default="bench-results/merge.json")
    args = ap.parse_args()
    from peft.utils import merge_utils

    warnings.filterwarnings("ignore", message="The density")
    n_sim = max(args.sim_experts, args.experts)  # the merged experts are the first ones
    t0 = time.perf_counter()
    experts = [compeft_rs.compress_expert(lora_expert(s, args.layers, args.width, args.r), args.k)
               for s in range(n_sim)]
    names = experts[0].compressed_keys()
    params = sum(experts[0].stream(n).numel for n in names)
    print(f"{n_sim} experts of {len(names)} tensors, {params / 1e6:.1f}M params, "
          f"{experts[0].nbytes / 1e6:.2f} MB each compressed ({time.perf_counter() - t0:.0f}s to make)")
    res = {"config": vars(args), "params": params, "tensors": len(names), "compressed_bytes": experts[0].nbytes,
           "threads": torch.get_num_threads(), "rows": []}

    def row(what, ours, theirs, note):
        r = {"what": what, "compeft_s": ours, "torch_s": theirs, "speedup": theirs / ours, "baseline": note}
        res["rows"].append(r)
        print(f"{what:<48} compeft {ours * 1e3:8.1f} ms  {note} {theirs * 1e3:8.1f} ms  {theirs / ours:5.1f}x")

    few = experts[: args.experts]
    dense = [e.decode(dtype=torch.float32) for e in few]
    w = [1.0 / (i + 1) for i in range(len(few))]
    wt = torch.tensor(w).sqrt()  # every tensor here is a LoRA factor: add_weighted_adapter's split
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, e in enumerate(few):
            paths.append(Path(tmp) / f"e{i}.cpft.safetensors")
            e.save(paths[-1])
        for method in ("ties", "task_arithmetic"):
            ours = best_of(lambda: compeft_rs.merge(few, method, weights=w), args.repeat)
            ours_files = best_of(lambda: compeft_rs.merge(paths, method, weights=w), args.repeat)
            if method == "ties":
                theirs = best_of(lambda: {n: merge_utils.ties([d[n] for d in dense], wt, 1.0) for n in names},
                                 args.repeat)
            else:
                theirs = best_of(lambda: {n: merge_utils.task_arithmetic([d[n] for d in dense], wt) for n in names},
                                 args.repeat)
            row(f"{method}, {len(few)} experts, in memory", ours, theirs, f"peft {method} on dense fp32")
            row(f"{method}, {len(few)} experts, from files", ours_files, theirs, f"peft {method} on dense fp32")
        # The results agree (the tests check this on many cases; here a guard on the benchmark).
        a = compeft_rs.merge(few, "ties", weights=w)
        b = {n: merge_utils.ties([d[n] for d in dense], wt, 1.0) for n in names[:4]}
        assert all(torch.allclose(a[n], b[n], rtol=1e-5, atol=1e-7) for n in b)
    del dense
    gc.collect()

    if args.sim_experts:
        similarity_rows(experts, names, params, n_sim, args, row, res)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(res, indent=2))
    print(f"wrote {args.json}")


def similarity_rows(experts, names, params, n_sim, args, row, res):
    ours = best_of(lambda: compeft_rs.similarity(experts), args.repeat)
    x = torch.empty(n_sim, params, dtype=torch.float32)
    for i, e in enumerate(experts):
        d = e.decode(dtype=torch.float32)
        torch.cat([d[n].reshape(-1) for n in names], out=x[i])
    del d

    def dense_cos():
        xn = x / x.norm(dim=1, keepdim=True)
        return xn @ xn.T

    theirs = best_of(dense_cos, args.repeat)
    err = (compeft_rs.similarity(experts) - dense_cos().double()).abs().max().item()
    row(f"similarity, {n_sim} x {n_sim}", ours, theirs, "torch dense fp32")
    res["similarity_max_abs_diff"] = err
    print(f"similarity: largest difference to the dense fp32 result {err:.1e}")


if __name__ == "__main__":
    main()
