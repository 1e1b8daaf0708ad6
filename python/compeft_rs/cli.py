"""The `compeft` command line tool."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

import numpy as np

import compeft_rs
from compeft_rs._scale import SCALES


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
        back = compeft_rs.CompressedTensor.from_bytes(blob, framework="np").decode()
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


def _check_out(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; pass --force to replace it")


def cmd_compress(args: argparse.Namespace) -> int:
    from ._checkpoint import compress_checkpoint
    from ._peft import compress_peft, is_peft_folder

    src, out = Path(args.src), Path(args.output)
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist")
    _check_out(out, args.force)
    t0 = time.perf_counter()
    if src.is_dir() and is_peft_folder(src):
        if args.base is not None:
            raise ValueError("--base is for full fine-tunes; a PEFT adapter is compressed on its own")
        gauge = {} if args.gauge is None else {"gauge": args.gauge}  # None: compress_peft's default
        expert = compress_peft(src, args.k, args.alpha, scope=args.scope, scale=args.scale, encoding=args.encoding,
                               allocate=args.allocate, **gauge)
        kind = "PEFT adapter"
    else:
        if args.gauge is not None:
            raise ValueError("--gauge rewrites LoRA factor pairs: it is for PEFT adapter folders")
        expert = compress_checkpoint(
            src, args.k, args.alpha, base=args.base, scope=args.scope, scale=args.scale, encoding=args.encoding,
            progress=not args.quiet, allocate=args.allocate,
        )
        kind = "checkpoint residual" if args.base else "tensors"
    expert.save(out)
    if not args.quiet:
        s = expert.summary()
        print(
            f"compressed {kind} {src} -> {out}: {len(expert)} tensors, {s.file_bytes:,} B "
            f"({s.bits_per_param:.3f} bits/param), {s.ratio_vs_fp16:.1f}x smaller than fp16, "
            f"{time.perf_counter() - t0:.2f}s"
        )
    return 0


def cmd_decompress(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from ._expert import load_expert
    from ._io import atomic_file
    from ._peft import save_peft

    expert = load_expert(args.src)
    out = Path(args.output)
    if expert.peft_config is not None:
        save_peft(expert, out, overwrite=args.force)
        what = f"PEFT adapter folder {out}"
    else:
        target = out / "task_vector.safetensors"
        _check_out(target, args.force)
        tau = expert.decode()
        atomic_file(target, lambda tmp: save_file(tau, str(tmp), metadata={"format": "pt"}))
        what = f"task vector {target}"
    if not args.quiet:
        print(f"decompressed {args.src} -> {what}")
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from ._checkpoint import apply_checkpoint

    out = Path(args.output)
    apply_checkpoint(args.src, args.base, out, overwrite=args.force, progress=not args.quiet)
    if not args.quiet:
        print(f"applied {args.src} onto {args.base} -> {out}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from ._expert import load_expert
    from ._merge import merge, merge_peft

    out = Path(args.output)
    to_file = out.name.endswith(".safetensors")
    if to_file:
        _check_out(out, args.force)
    elif args.k is not None:
        raise ValueError("-k compresses the result: give an OUT ending in .safetensors")
    experts = [load_expert(p) for p in args.src]
    if not to_file and any(e.peft_config is None for e in experts):
        raise ValueError("a PEFT folder needs experts made from PEFT adapters; "
                         "give an OUT ending in .safetensors for a compressed expert")
    t0 = time.perf_counter()
    opts = dict(weights=args.weights, majority_sign=args.majority_sign, density=args.density, lam=args.lam,
                convention=args.convention, rescale=args.rescale)
    if to_file:
        k = args.k if args.k is not None else experts[0].k
        result = merge(experts, args.method, compress=k, **opts)
        result.save(out)
        what = f"compressed expert {out} (k={k:g}, {result.nbytes:,} B)"
    else:
        merge_peft(experts, out, args.method, overwrite=args.force, **opts)
        what = f"PEFT adapter folder {out}"
    if not args.quiet:
        print(f"merged {len(experts)} experts ({args.method}) -> {what}, {time.perf_counter() - t0:.2f}s")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from ._expert import load_expert

    expert = load_expert(args.src)
    print(repr(expert))
    print(expert.summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="compeft",
        description="ComPEFT compression of fine-tuned experts (task vectors) with compeft-rs. "
        "Compressed experts are single safetensors files.",
    )
    p.add_argument("--version", action="version", version=f"compeft-rs {compeft_rs.__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def common(sp: argparse.ArgumentParser, force: bool = True) -> None:
        if force:
            sp.add_argument("--force", action="store_true", help="replace the output if it exists")
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress bars or summary")

    c = sub.add_parser(
        "compress",
        help="compress a PEFT adapter folder, a safetensors file or a (sharded) checkpoint folder",
        description="Compress SRC into one file. SRC is a PEFT adapter folder (LoRA/(IA)3), a "
        "safetensors file, or a checkpoint folder (sharded with model.safetensors.index.json or "
        "not); with --base, the residual SRC - BASE of a full fine-tune is compressed.",
    )
    c.add_argument("src", metavar="SRC")
    c.add_argument("-o", "--output", required=True, metavar="OUT", help="the compressed file to write")
    c.add_argument("-k", type=float, required=True, metavar="K",
                   help="density in (0, 1], e.g. 0.1 (with --allocate error, the density whose size is the budget)")
    c.add_argument("--alpha", type=float, default=1.0, metavar="A", help="scale multiplier (default 1.0)")
    c.add_argument("--scope", choices=["per_tensor", "global"], default=None,
                   help="top k of each tensor or one threshold over all tensors (default: global for (IA)3 "
                        "adapters, per_tensor for everything else)")
    c.add_argument("--scale", choices=list(SCALES), default=None,
                   help="how each tensor's one magnitude is chosen, times --alpha (default: pair_proj, each "
                        "LoRA product's projection on B.A is B.A and other tensors' on themselves; pair, the "
                        "L2 norm, for (IA)3; --scope global --scale std is the paper's Algorithm 1)")
    c.add_argument("--encoding", choices=["golomb", "bitmask"], default="golomb")
    c.add_argument("--allocate", choices=["uniform", "error"], default="uniform",
                   help="density k for every tensor (default), or per tensor / LoRA pair the density that "
                        "minimises the error of what the model applies, within the stream bytes of k everywhere "
                        "(k then sets the size; the overall density may differ)")
    c.add_argument("--gauge", choices=["as_trained", "balanced"], default=None,
                   help="PEFT adapters: compress each LoRA pair in the gauge of its product's SVD (balanced, "
                        "the default: the same adapter, other factors), or the factors as trained")
    c.add_argument("--base", metavar="BASE", help="base checkpoint (file or folder) of a full fine-tune")
    common(c)
    c.set_defaults(func=cmd_compress)

    d = sub.add_parser(
        "decompress",
        help="rebuild a PEFT adapter folder, or write the task vector as safetensors",
        description="Rebuild from a compressed file: a PEFT adapter folder that "
        "peft.PeftModel.from_pretrained loads, or OUT_DIR/task_vector.safetensors.",
    )
    d.add_argument("src", metavar="SRC")
    d.add_argument("-o", "--output", required=True, metavar="OUT_DIR")
    common(d)
    d.set_defaults(func=cmd_decompress)

    a = sub.add_parser(
        "apply",
        help="write base + decompressed residual as a checkpoint with the base's sharding",
        description="Write BASE + the residual in SRC (an expert compressed with --base) as a checkpoint "
        "with BASE's sharding: a file for a file, a folder with the same shards, index and config files "
        "for a folder. Tensors kept exactly are written as stored.",
    )
    a.add_argument("src", metavar="SRC")
    a.add_argument("--base", required=True, metavar="BASE", help="the base checkpoint (file or folder)")
    a.add_argument("-o", "--output", required=True, metavar="OUT")
    common(a)
    a.set_defaults(func=cmd_apply)

    i = sub.add_parser(
        "inspect",
        help="per-tensor and total sizes, density, bits/param, entropy bound",
        description="Print each tensor of a compressed expert (shape, density or 'exact', bytes, bits/param, "
        "ratio against fp16) and the totals, against the fp16 safetensors file and the entropy bound.",
    )
    i.add_argument("src", metavar="SRC")
    i.set_defaults(func=cmd_inspect)

    g = sub.add_parser(
        "merge",
        help="merge compressed experts (TIES or task arithmetic) without decoding them",
        description="Merge the experts SRC... on their compressed form. OUT ending in .safetensors gets "
        "the merge compressed again (at -k, default the first expert's k); any other OUT becomes a PEFT "
        "adapter folder, for PEFT experts. LoRA factors are weighted as peft's add_weighted_adapter does "
        "(a weight w scales the update B @ A by w); experts whose LoRA scalings differ need --rescale.",
    )
    g.add_argument("src", metavar="SRC", nargs="+")
    g.add_argument("-o", "--output", required=True, metavar="OUT")
    g.add_argument("--method", choices=["ties", "task_arithmetic"], default="ties")
    g.add_argument("--weights", type=float, nargs="+", metavar="W", help="one per expert (default 1 each)")
    g.add_argument("--majority-sign", choices=["total", "frequency"], default="total",
                   help="what the TIES election sums (default total)")
    g.add_argument("--density", type=float, metavar="D", help="trim each tensor to this density first")
    g.add_argument("--lam", type=float, default=1.0, help="multiplies the result (default 1)")
    g.add_argument("--convention", choices=["peft", "mergekit"], default="peft",
                   help="peft's merge_utils (default) or mergekit's weighting")
    g.add_argument("--rescale", action="store_true",
                   help="fold each LoRA expert's scaling into its factors (result: lora_alpha = r), "
                   "for experts whose lora_alpha/r/rsLoRA/patterns differ")
    g.add_argument("-k", type=float, metavar="K", help="density of the compressed result")
    common(g)
    g.set_defaults(func=cmd_merge)

    m = sub.add_parser(
        "demo",
        help="compress a built-in synthetic task vector and print size, ratio and time",
        description="Compress a synthetic fp16 task vector at a few densities and print bytes, bits/param "
        "against the entropy bound, the ratio against fp16 and encode/decode times.",
    )
    m.add_argument("--numel", type=int, default=10_000_000, help="entries in the task vector (default 10M)")
    m.add_argument("-k", type=float, nargs="+", default=[0.05, 0.1, 0.2], help="densities (default 0.05 0.1 0.2)")
    m.add_argument("--alpha", type=float, default=1.0, help="scale multiplier (default 1.0)")
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(func=cmd_demo)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Runs the CLI; every error is one line on stderr and an exit code (COMPEFT_DEBUG=1 shows
    the traceback instead)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except Exception as e:
        if os.environ.get("COMPEFT_DEBUG"):
            raise
        code = _exit_code(e)
        msg = f"corrupt or unreadable input: {e}" if code == 5 else str(e)
        if code == 1 and not isinstance(e, (ValueError, TypeError, KeyError, OSError)):
            msg = f"{type(e).__name__}: {e}"
        print(f"compeft: error: {' '.join(msg.split())}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print("compeft: interrupted", file=sys.stderr)
        return 130


def _exit_code(e: Exception) -> int:
    """1 bad argument or data, 3 output exists, 4 input missing, 5 corrupt input."""
    if isinstance(e, FileExistsError):
        return 3
    if isinstance(e, (FileNotFoundError, NotADirectoryError)):
        return 4
    if isinstance(e, compeft_rs.CompeftError) or type(e).__name__ == "SafetensorError":
        return 5
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
