"""Serving benchmark: swapping a compressed LoRA expert into a live model, against peft's ways.

A Llama-7B-shaped adapter slot (32 layers, 4096 wide, r=16 on q/k/v/o, fp16: 16.8M parameters)
in a PeftModel whose base weights are allocated but never touched (no forward pass is timed).
Side by side, in one run (best of --repeat, files in the page cache):

- compeft_rs.load_into from the expert file, and from an ExpertStore's in-memory cache;
- peft's dense swap of the same adapter: safetensors load_file + set_peft_model_state_dict;
- the naive compressed path: decode to a dense dict + set_peft_model_state_dict;
- peft's load_adapter of the dense PEFT folder (a new adapter slot each time);
- experts held per GB of RAM (bytes a store's cache holds per expert against a dense fp16 state
  dict's tensor bytes), over 20 experts;
- a cold CompeftResolver.resolve_lora (materialises the PEFT folder) and a warm one.

    python benches/serve.py [--repeat 5] [--json bench-results/serve.json]
"""

import argparse
import asyncio
import gc
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

import compeft_rs
from _timing import best_of


def llama_like(layers, width, r, dtype=torch.float16):
    """A PeftModel with a 7B-shaped LoRA slot; base weights allocated, uninitialised, untouched."""
    import peft

    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
                setattr(self, m, torch.nn.Linear(width, width, bias=False, device="meta", dtype=dtype))

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = Attn()

    class Inner(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(Layer() for _ in range(layers))

    class Top(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Inner()

    base = Top().to_empty(device="cpu")
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = peft.get_peft_model(base, cfg).to(dtype)
    model.peft_config["default"].base_model_name_or_path = "llama-7b-shaped"  # what vLLM would serve
    return model


def adapter_of(model, seed):
    """Trained-looking fp16 adapter weights for the model's slot."""
    import peft

    g = torch.Generator().manual_seed(seed)
    sd = peft.get_peft_model_state_dict(model)
    return {n: (torch.randn(t.shape, generator=g) * (0.01 if "lora_A" in n else 0.002)).half() for n, t in sd.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("-r", type=int, default=16)
    ap.add_argument("-k", type=float, default=0.1)
    ap.add_argument("--json", default="bench-results/serve.json")
    args = ap.parse_args()
    import peft
    from safetensors.torch import load_file

    tmp = Path(tempfile.mkdtemp(prefix="compeft-serve-"))
    try:
        model = llama_like(args.layers, args.width, args.r)
        sd = adapter_of(model, 0)
        params = sum(t.numel() for t in sd.values())
        config = compeft_rs._peft._config_dict(model.peft_config["default"])
        expert = compeft_rs.compress_expert(sd, args.k, peft_config=config)
        path = tmp / "e.cpft.safetensors"
        expert.save(path)
        dense_dir = tmp / "dense"
        compeft_rs.save_peft(expert, dense_dir)  # the decoded adapter as a plain PEFT folder
        dense_file = dense_dir / "adapter_model.safetensors"
        store = compeft_rs.ExpertStore(tmp / "store")
        store.put("e", expert)
        cached = store.get("e")

        for _ in range(2):  # page cache and first touch for every path
            compeft_rs.load_into(model, path)
            peft.set_peft_model_state_dict(model, load_file(str(dense_file)))
        r = args.repeat
        t_into_file = best_of(lambda: compeft_rs.load_into(model, path), r)
        t_into_cache = best_of(lambda: compeft_rs.load_into(model, cached), r)
        t_dense = best_of(lambda: peft.set_peft_model_state_dict(model, load_file(str(dense_file))), r)
        t_naive = best_of(lambda: peft.set_peft_model_state_dict(model, compeft_rs.load_expert(path).apply()), r)
        slots = iter(range(10_000))

        def load_adapter():
            name = f"slot{next(slots)}"
            model.load_adapter(str(dense_dir), adapter_name=name)
            model.delete_adapter(name)

        t_load_adapter = best_of(load_adapter, max(1, r // 2))
        # Swapped-in weights are the expert's: checked once, outside the timing.
        compeft_rs.load_into(model, cached)
        got = peft.get_peft_model_state_dict(model)
        want = expert.apply()
        assert all(torch.equal(got[n], want[n]) for n in want)

        # Experts per GB of RAM: the bytes a store's cache holds per expert (its file's bytes, in
        # one buffer owned by the Rust core) against a dense fp16 state dict's tensor bytes.
        # Counted, not read off the process RSS: the allocator reuses freed memory, so RSS deltas
        # of a few MB per expert are not reliable.
        n_hold = 20
        many = compeft_rs.ExpertStore(tmp / "many", cache_bytes=1 << 40)
        for i in range(n_hold):
            many.put(f"e{i}", compeft_rs.compress_expert(adapter_of(model, i + 1), args.k, peft_config=config))
        fresh = compeft_rs.ExpertStore(tmp / "many", cache_bytes=1 << 40)
        held = [fresh.get(f"e{i}") for i in range(n_hold)]
        comp_rss = sum(e.nbytes for e in held) / n_hold
        dense_held = [load_file(str(dense_file)) for _ in range(n_hold)]
        dense_rss = sum(t.nbytes for d in dense_held for t in d.values()) / n_hold
        del held, dense_held, many, fresh
        gc.collect()

        from compeft_rs.vllm import CompeftResolver

        resolver = CompeftResolver(store, tmp / "peft-cache")
        t0 = time.perf_counter()
        req = asyncio.run(resolver.resolve_lora("llama-7b-shaped", "e"))
        t_cold = time.perf_counter() - t0
        assert req is not None
        t_warm = best_of(lambda: asyncio.run(resolver.resolve_lora("llama-7b-shaped", "e")), r)

        res = dict(
            layers=args.layers, width=args.width, r=args.r, k=args.k, params=params,
            compressed_bytes=path.stat().st_size, dense_fp16_bytes=dense_file.stat().st_size,
            load_into_file_s=t_into_file, load_into_store_cache_s=t_into_cache,
            peft_dense_swap_s=t_dense, naive_decode_then_set_s=t_naive, peft_load_adapter_s=t_load_adapter,
            load_into_file_vs_dense_swap=t_dense / t_into_file, load_into_cache_vs_dense_swap=t_dense / t_into_cache,
            compressed_resident_bytes_per_expert=comp_rss, dense_resident_bytes_per_expert=dense_rss,
            experts_per_gb_compressed=1e9 / comp_rss, experts_per_gb_dense=1e9 / dense_rss,
            experts_per_gb_ratio=dense_rss / comp_rss, resolve_cold_s=t_cold, resolve_warm_s=t_warm,
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"7B-shaped LoRA slot ({args.layers} layers x {args.width}, r={args.r}, fp16, {params:,} params), "
          f"k={args.k}: file {res['compressed_bytes']:,} B vs dense {res['dense_fp16_bytes']:,} B")
    print(f"{'swap path':<50} {'time':>10} {'vs peft dense swap':>19}")
    for label, key in (("compeft_rs.load_into(model, file)", "load_into_file_s"),
                       ("compeft_rs.load_into(model, store.get(name))", "load_into_store_cache_s"),
                       ("peft: load_file + set_peft_model_state_dict", "peft_dense_swap_s"),
                       ("naive: load_expert().apply() + set_peft_model_state_dict", "naive_decode_then_set_s"),
                       ("peft: load_adapter(dense folder)", "peft_load_adapter_s")):
        print(f"{label:<50} {res[key] * 1e3:>8.1f}ms {res['peft_dense_swap_s'] / res[key]:>18.2f}x")
    print(f"experts per GB of RAM: compressed {res['experts_per_gb_compressed']:.0f} "
          f"({res['compressed_resident_bytes_per_expert'] / 1e6:.2f} MB each), dense fp16 "
          f"{res['experts_per_gb_dense']:.1f} ({res['dense_resident_bytes_per_expert'] / 1e6:.1f} MB each): "
          f"{res['experts_per_gb_ratio']:.1f}x")
    print(f"CompeftResolver.resolve_lora: cold {t_cold * 1e3:.0f} ms (materialises the folder), warm {t_warm * 1e3:.1f} ms")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(res, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
