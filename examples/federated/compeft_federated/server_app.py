"""The ServerApp: FedAvg over compressed updates (CompeftFedAvg), the global model scored on each
task's test split after every round.

Run config: ``num-server-rounds``, ``min-nodes`` (nodes to wait for), ``compress`` (false:
Flower's FedAvg), ``downlink-k`` (0: dense broadcast), ``test-size`` (sentences per task scored),
``out`` (a JSON file for the per-round history, an absolute path; empty: none).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from compeft_rs.flower import CompeftFedAvg

from . import task

app = ServerApp()


def run(grid: Grid, cfg: Dict[str, Any], log=print) -> List[Dict[str, Any]]:
    """Trains for ``num-server-rounds`` rounds on every node; returns one record per round (round 0:
    the initial model) with test accuracy per task and the bytes sent."""
    rounds = int(cfg.get("num-server-rounds", 6))
    # Wait for this many nodes, then train on all that are connected (the simulation engine's
    # num-supernodes, or the SuperNodes started).
    nodes = int(cfg.get("min-nodes", 2))
    if cfg.get("compress", True):
        downlink = float(cfg.get("downlink-k", 0.0))
        strategy: FedAvg = CompeftFedAvg(fraction_evaluate=0.0, min_available_nodes=nodes, min_train_nodes=nodes,
                                         downlink_k=downlink if downlink > 0 else None)
    else:
        strategy = FedAvg(fraction_evaluate=0.0, min_available_nodes=nodes, min_train_nodes=nodes)
    tests = {t: task.tokenize(*task.test_data(t, int(cfg.get("test-size", task.TEST_PER_TASK))))
             for t in task.TASKS}
    history: List[Dict[str, Any]] = []

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        task.set_weights({k: v.numpy() for k, v in arrays.items()})
        acc = {t: task.accuracy(d) for t, d in tests.items()}
        history.append({"round": server_round, "accuracy": acc})
        log(f"round {server_round}: " + " ".join(f"{t} {a:.3f}" for t, a in acc.items()))
        return MetricRecord({f"accuracy-{t}": a for t, a in acc.items()})

    initial = ArrayRecord({k: Array(v) for k, v in task.initial_weights().items()})
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds, evaluate_fn=evaluate,
                            train_config=ConfigRecord({"lr": float(cfg.get("lr", 2e-3))}))
    dense_up = sum(len(a.data) for a in initial.values())
    trained = len(list(grid.get_node_ids()))  # FedAvg's fraction_train=1: every connected node
    for rec in history[1:]:
        r = rec["round"]
        m = result.train_metrics_clientapp.get(r, {})
        rec["train-loss"] = float(m.get("train-loss", float("nan")))
        # FedAvg's replies are the dense numpy arrays: one model's bytes per node.
        rec["uplink-bytes"] = int(m.get("uplink-bytes", dense_up * trained))
        rec["uplink-dense-bytes"] = int(m.get("uplink-dense-bytes", dense_up * trained))
        rec["downlink-bytes"] = int(m.get("downlink-bytes", dense_up * trained))
    return history


@app.main()
def main(grid: Grid, context: Context) -> None:
    history = run(grid, context.run_config)
    out = str(context.run_config.get("out", ""))
    if out:
        Path(out).write_text(json.dumps(history, indent=1))
