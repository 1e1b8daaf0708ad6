"""Whole-expert decode and load benchmark (issue 21's table): Llama-7B- and 70B-shaped LoRA experts
(r=16 on q/k/v/o; 32 layers 4096 wide: 256 tensors, 16.8M parameters; 80 layers 8192 wide: 640
tensors, 84M), fp16, compressed at k=0.1 with the defaults. Side by side in one run, best of
--repeat, each after a garbage collection:

- decode: ``CompressedExpert.decode()`` of an expert already read, against zero-filling the same
  tensors (``torch.empty(shape, dtype).fill_(0)`` per tensor: the floor for writing them);
- load and read once: ``load_expert(path).decode()`` and one read of every tensor (a copy into
  a preallocated fp16 tensor of its shape, as loading weights into a model does), against
  safetensors' ``load_file`` of the dense fp16 file (in the page cache) and the same read.
  ``load_file`` returns views of the memory-mapped file (their data pointers sit at the file's
  offsets): it copies nothing, and the read is where the dense file's pages are touched;
- load into existing tensors: ``load_expert(path).decode_into(dst)`` (the tensors of a model's
  weights, or buffers reused from one expert to the next) against the same ``load_file`` + copy
  into ``dst``: the same end state, without new tensors; and the floor of the row above for any
  decode into new tensors: zero-filling them plus the same read;
- compress: ``compress_expert(sd, 0.1)`` with its defaults (per-tensor, pair_proj, balanced
  gauge) against the torch way per tensor (the authors' code: kthvalue threshold, mask, sign, std),
  and the same with the factors as trained and the ``pair`` rule (the defaults before the
  fidelity study), to show what the balanced gauge and ``pair_proj`` cost.

    python benches/decode.py [--repeat 20] [--json bench-results/decode.json]
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

import compeft_rs
from _timing import best_of

sys.path.insert(0, str(Path(__file__).parent))
from bench import lora_expert, torch_way_per_tensor  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("-k", type=float, default=0.1)
    ap.add_argument("--json", default="bench-results/decode.json")
    args = ap.parse_args()
    from safetensors.torch import load_file, save_file

    res = {"config": vars(args), "threads": torch.get_num_threads(), "rows": []}
    print(f"{'expert':<11} {'what':<34} {'compeft':>10} {'baseline':>10} {'ratio':>7}  baseline")
    with tempfile.TemporaryDirectory() as tmp:
        for label, layers, width in (("7B-shaped", 32, 4096), ("70B-shaped", 80, 8192)):
            sd = lora_expert(layers, width)
            shapes = [(tuple(t.shape), t.dtype) for t in sd.values()]
            dense = Path(tmp) / f"{label}.safetensors"
            save_file(sd, str(dense))
            e = compeft_rs.compress_expert(sd, args.k)
            path = Path(tmp) / f"{label}.cpft.safetensors"
            e.save(path)
            loaded = compeft_rs.load_expert(path)
            dst = {n: torch.empty_like(t) for n, t in sd.items()}

            def read_once(tensors):
                for n, t in tensors.items():
                    dst[n].copy_(t)

            def row(what, ours, theirs, note):
                r = {"expert": label, "what": what, "compeft_s": ours, "baseline_s": theirs,
                     "ratio": theirs / ours, "baseline": note}
                res["rows"].append(r)
                print(f"{label:<11} {what:<34} {ours * 1e3:8.2f}ms {theirs * 1e3:8.2f}ms {theirs / ours:6.2f}x  {note}")

            load_file(str(dense)), loaded.decode()  # page cache and allocator warm
            zero = best_of(lambda: [torch.empty(s, dtype=d).fill_(0) for s, d in shapes], args.repeat)
            dec = best_of(lambda: loaded.decode(), args.repeat)
            row("decode (x = zero-fill / decode)", dec, zero, "zero-fill the same tensors")
            dense_read = best_of(lambda: read_once(load_file(str(dense))), args.repeat)
            ours_read = best_of(lambda: read_once(compeft_rs.load_expert(path).decode()), args.repeat)
            row("load and read once", ours_read, dense_read, "load_file(dense fp16) + the same read")
            # What no decode into new tensors can beat: writing them (zero-fill) and the same read.
            floor = best_of(lambda: read_once({n: torch.empty(s, dtype=d).fill_(0)
                                               for n, (s, d) in zip(sd, shapes)}), args.repeat)
            row("  floor: zero-fill + the same read", floor, dense_read, "load_file(dense fp16) + the same read")
            # Loading into existing tensors (a model's weights): the same end state, dst written.
            ours_into = best_of(lambda: compeft_rs.load_expert(path).decode_into(dst), args.repeat)
            row("load into existing tensors", ours_into, dense_read, "load_file(dense fp16) + copy into them")
            lf = best_of(lambda: load_file(str(dense)), args.repeat)
            print(f"{'':<11} (load_file alone, views of the mapped file: {lf * 1e3:.2f} ms; "
                  f"load_expert alone: {best_of(lambda: compeft_rs.load_expert(path), args.repeat) * 1e3:.2f} ms)")
            reps = max(1, args.repeat // 5)
            comp = best_of(lambda: compeft_rs.compress_expert(sd, args.k), reps)
            torch_way = best_of(lambda: torch_way_per_tensor(sd, args.k), reps)
            row("compress (defaults)", comp, torch_way, "the torch way per tensor")
            # The defaults before the fidelity study (factors as trained, norm-matched pairs).
            plain = best_of(lambda: compeft_rs.compress_expert(sd, args.k, gauge="as_trained", scale="pair"), reps)
            row("  compress (as_trained, pair)", plain, torch_way, "the torch way per tensor")
            del sd, e, loaded, dst
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(res, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
