"""Federated aggregation benchmark: CompeftFedAvg on compressed replies against Flower's FedAvg on
the dense replies it would otherwise get.

One round of --clients replies of a Llama-7B-shaped LoRA (32 layers, 4096 wide, r=16 on q/k/v/o:
256 float32 arrays, 16.8M parameters), side by side in one run (best of --repeat):

- Flower's ``FedAvg.aggregate_train`` on the dense replies (the float32 arrays as Flower sends
  them: np.save bytes, read back with ``Array.numpy()``, weighted by num-examples);
- ``CompeftFedAvg.aggregate_train`` on the same clients' updates compressed by compeft_mod's
  defaults (k = 0.1, norm scale): the weighted mean by task arithmetic on the streams, added to the
  global model.

Both include Flower's reply checks and return a new global ArrayRecord. Also reported: the bytes
of one reply each way and against float16.

    python benches/federated.py [--clients 10] [--repeat 3] [--json bench-results/federated.json]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

import compeft_rs
from compeft_rs.flower import STYPE, CompeftFedAvg
from _timing import best_of

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "federated"))
from compeft_federated.local_grid import LocalGrid  # noqa: E402


def lora_shapes(layers, width, r):
    shapes = {}
    for i in range(layers):
        for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
            p = f"base_model.model.model.layers.{i}.self_attn.{m}"
            shapes[f"{p}.lora_A.weight"] = (r, width)
            shapes[f"{p}.lora_B.weight"] = (width, r)
    return shapes


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--k", type=float, default=0.1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    shapes = lora_shapes(args.layers, args.width, args.rank)
    rng = np.random.default_rng(0)
    base = {n: (rng.standard_normal(s) * 0.01).astype(np.float32) for n, s in shapes.items()}
    arrays = ArrayRecord({n: Array(v) for n, v in base.items()})
    grid = LocalGrid(None, args.clients)  # sets Flower's task identity; node ids 1..clients
    dense_replies, compressed_replies = [], []
    t0 = time.perf_counter()
    fedavg, ours = FedAvg(), CompeftFedAvg()
    for strategy, replies, compress in ((fedavg, dense_replies, False), (ours, compressed_replies, True)):
        sent = list(strategy.configure_train(1, arrays, ConfigRecord(), grid))
        for i, msg in enumerate(sent):
            msg.metadata.__dict__["_message_id"] = f"m{i}"
            g = np.random.default_rng(100 + msg.metadata.dst_node_id)
            rec = ArrayRecord()
            for n, v in base.items():
                update = g.standard_normal(v.shape, dtype=np.float32) * np.float32(1e-3)
                if compress:
                    c = compeft_rs.encode(update, args.k, scale="norm")
                    rec[n] = Array(dtype="float32", shape=v.shape, stype=STYPE, data=c.to_bytes())
                else:
                    rec[n] = Array(v + update)
            metrics = MetricRecord({"num-examples": 100 + 10 * msg.metadata.dst_node_id})
            replies.append(Message(RecordDict({"arrays": rec, "metrics": metrics}), reply_to=msg))
    print(f"built {args.clients} replies each way in {time.perf_counter() - t0:.0f}s")

    t_dense = best_of(lambda: fedavg.aggregate_train(1, dense_replies), args.repeat)
    t_ours = best_of(lambda: ours.aggregate_train(1, compressed_replies), args.repeat)
    # Same round, same clients: the two global models differ by the compression only.
    a = fedavg.aggregate_train(1, dense_replies)[0]
    b = ours.aggregate_train(1, compressed_replies)[0]
    assert set(a.keys()) == set(b.keys())

    numel = sum(int(np.prod(s)) for s in shapes.values())
    up_dense = sum(len(x.data) for x in dense_replies[0].content["arrays"].values())
    up_ours = sum(len(x.data) for x in compressed_replies[0].content["arrays"].values())
    res = {
        "clients": args.clients, "arrays": len(shapes), "parameters": numel, "k": args.k,
        "fedavg_dense_s": t_dense, "compeft_s": t_ours, "speedup": t_dense / t_ours,
        "reply_bytes_fp32": up_dense, "reply_bytes_compeft": up_ours,
        "ratio_vs_fp32": up_dense / up_ours, "ratio_vs_fp16": numel * 2 / up_ours,
    }
    print(f"{args.clients} replies of {numel / 1e6:.1f}M parameters ({len(shapes)} arrays):")
    print(f"  Flower FedAvg, dense float32 replies : {1e3 * t_dense:8.1f} ms")
    print(f"  CompeftFedAvg, compressed replies    : {1e3 * t_ours:8.1f} ms   ({res['speedup']:.1f}x faster)")
    print(f"  one reply: {up_dense / 1e6:.1f} MB dense float32, {up_ours / 1e6:.2f} MB compressed "
          f"({res['ratio_vs_fp32']:.0f}x smaller; {res['ratio_vs_fp16']:.0f}x against float16)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
