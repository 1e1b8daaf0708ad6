"""Dense FedAvg against compressed updates on the same clients and seeds.

    python examples/federated/study.py            # the full study (about 25 minutes on 2 CPU cores)
    python examples/federated/study.py --quick    # the shortened version CI runs (about 3 minutes)

Flower's own strategy loop (``Strategy.start``) runs through an in-process Grid (local_grid.py),
the nodes' ClientApp with its mods exactly as ``flwr run`` runs it; only Ray and the network are left
out, so every setting sees the same clients, data order and dropout draws. Settings: dense FedAvg
(Flower's strategy, float32 replies), and CompeftFedAvg with k = 0.1 and 0.05, with and without
error feedback, and the "proj" scale rule against the default "norm" at k = 0.1. Reported: test accuracy per task after every round,
uplink bytes per round, and a plot of mean accuracy against cumulative uplink bytes.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from compeft_federated import server_app, task  # noqa: E402
from compeft_federated.client_app import app as client_app  # noqa: E402
from compeft_federated.local_grid import LocalGrid  # noqa: E402

NODES = 10
FULL = dict(rounds=6, per_client=96, epochs=2, lr=5e-3, test=300)
QUICK = dict(rounds=3, per_client=48, epochs=2, lr=5e-3, test=120)
SETTINGS = {
    "dense FedAvg": dict(compress=False),
    "k=0.1": dict(k=0.1),
    "k=0.1 + EF": dict(k=0.1, **{"error-feedback": True}),
    "k=0.05": dict(k=0.05),
    "k=0.05 + EF": dict(k=0.05, **{"error-feedback": True}),
    "k=0.1 proj": dict(k=0.1, scale="proj"),
}
QUICK_SETTINGS = ("dense FedAvg", "k=0.1")


def run_setting(name: str, rounds: int, per_client: int, epochs: int, lr: float, test: int, log=print):
    cfg = {"num-server-rounds": rounds, "min-nodes": NODES, "per-client": per_client, "local-epochs": epochs,
           "lr": lr, "test-size": test, "compress": True, **SETTINGS[name]}
    grid = LocalGrid(client_app, NODES, node_config=lambda i: {"partition-id": i, "num-partitions": NODES},
                     run_config=cfg)
    random.seed(0)  # FedAvg samples (and so orders) the nodes with `random`: the same sums every run
    t0 = time.time()
    history = server_app.run(grid, cfg, log=lambda s: log(f"  [{name}] {s}"))
    if grid.errors:
        raise RuntimeError(f"{name}: nodes failed: {grid.errors[:3]}")
    log(f"  [{name}] {time.time() - t0:.0f}s")
    return history


def run(quick: bool, settings=None, log=print, rounds=None):
    shape = dict(QUICK if quick else FULL)
    if rounds:
        shape["rounds"] = rounds
    names = settings or (QUICK_SETTINGS if quick else tuple(SETTINGS))
    return {"nodes": NODES, **shape,
            "settings": {n: run_setting(n, log=log, **shape) for n in names}}


def mean_acc(rec) -> float:
    return sum(rec["accuracy"].values()) / len(rec["accuracy"])


def markdown(res) -> str:
    hist = res["settings"]
    dense = hist.get("dense FedAvg")
    lines = ["| setting | " + " | ".join(task.TASKS) + " | mean | uplink bytes/round | vs fp32 | vs fp16 |",
             "|---|" + "---:|" * (len(task.TASKS) + 4)]
    for name, h in hist.items():
        last = h[-1]
        up = sum(r["uplink-bytes"] for r in h[1:]) / (len(h) - 1)
        dense_up = sum(r["uplink-dense-bytes"] for r in h[1:]) / (len(h) - 1)
        accs = " | ".join(f"{100 * last['accuracy'][t]:.1f}" for t in task.TASKS)
        delta = "" if dense is None or name == "dense FedAvg" else f" ({100 * (mean_acc(last) - mean_acc(dense[-1])):+.1f})"
        lines.append(f"| {name} | {accs} | {100 * mean_acc(last):.1f}{delta} | {up:,.0f} | "
                     f"{dense_up / up:.1f}x | {dense_up / 2 / up:.1f}x |")
    return "\n".join(lines)


def plot(res, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, h in res["settings"].items():
        xs, total = [], 0
        for r in h:
            total += r.get("uplink-bytes", 0)
            xs.append(max(total, 1) / 1e6)
        ax.plot(xs[1:], [100 * mean_acc(r) for r in h[1:]], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("cumulative uplink MB (10 clients)")
    ax.set_ylabel("mean test accuracy (%)")
    ax.set_title(f"FedAvg on Flower, LoRA all-MiniLM-L6-v2, {res['nodes']} clients")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--settings", nargs="*", choices=list(SETTINGS))
    ap.add_argument("--rounds", type=int, help=f"rounds (default {FULL['rounds']}; --quick {QUICK['rounds']})")
    ap.add_argument("--json", default="bench-results/federated_study.json")
    ap.add_argument("--plot", default="docs/federated_study.png")
    args = ap.parse_args()
    res = run(args.quick, args.settings, rounds=args.rounds)
    print(markdown(res))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(res, indent=1))
    plot(res, Path(args.plot))
    print(f"wrote {args.json} and {args.plot}")


if __name__ == "__main__":
    main()
