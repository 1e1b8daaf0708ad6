"""The `compeft` command line tool."""

from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional

import numpy as np

import compeft_rs


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


def cmd_demo(args: argparse.Namespace) -> int:
    """Compresses a synthetic fp16 task vector and prints size, ratio and time."""
    rng = np.random.default_rng(args.seed)
    print(f"compeft-rs {compeft_rs.__version__}: demo on a synthetic fp16 task vector of {args.numel:,} entries")
    tau = (rng.standard_normal(args.numel, dtype=np.float32) * 1e-3).astype(np.float16)
    dense = tau.nbytes
    print(f"{'k':>6} {'bytes':>10} {'bits/param':>10} {'entropy':>8} {'vs fp16':>8} {'encode':>9} {'decode':>9}")
    for k in args.k:
        t0 = time.perf_counter()
        c = compeft_rs.encode(tau, k, alpha=args.alpha)
        blob = c.to_bytes()
        t1 = time.perf_counter()
        back = compeft_rs.CompressedTensor.from_bytes(blob, kind="numpy").decode()
        t2 = time.perf_counter()
        kept = np.count_nonzero(back)
        assert kept == c.nnz, "decoded pattern does not match"
        bound = compeft_rs.entropy_bound_bits(tau.size, k) / tau.size
        print(
            f"{k:>6g} {_fmt_bytes(len(blob)):>10} {8 * len(blob) / tau.size:>10.3f} {bound:>8.3f} "
            f"{dense / len(blob):>7.1f}x {1e3 * (t1 - t0):>7.1f}ms {1e3 * (t2 - t1):>7.1f}ms"
        )
    print(f"dense fp16: {_fmt_bytes(dense)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="compeft",
        description="ComPEFT compression of fine-tuned experts (task vectors) with compeft-rs.",
    )
    p.add_argument("--version", action="version", version=f"compeft-rs {compeft_rs.__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    d = sub.add_parser("demo", help="compress a built-in synthetic task vector and print size, ratio and time")
    d.add_argument("--numel", type=int, default=10_000_000, help="entries in the task vector (default 10M)")
    d.add_argument("-k", type=float, nargs="+", default=[0.05, 0.1, 0.2], help="densities (default 0.05 0.1 0.2)")
    d.add_argument("--alpha", type=float, default=1.0, help="scale multiplier (default 1.0)")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except (ValueError, TypeError, OSError, compeft_rs.CompeftError) as e:
        print(f"compeft: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("compeft: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
