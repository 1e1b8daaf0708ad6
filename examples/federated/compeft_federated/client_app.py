"""The ClientApp: local LoRA training on this node's partition; compeft_mod compresses the reply.

Run config (pyproject.toml, ``flwr run --run-config``): ``compress`` (false: dense FedAvg replies),
``k``, ``error-feedback``, ``scale``, ``per-client``, ``local-epochs``, ``lr``. Node config:
``partition-id`` and ``num-partitions`` (the simulation engine sets them; a SuperNode gets them with
``--node-config``).
"""

from __future__ import annotations

import functools

from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from compeft_rs.flower import make_compeft_mod

from . import task


@functools.lru_cache(maxsize=None)
def _mod(k: float, error_feedback: bool, scale: str):
    return make_compeft_mod(k, error_feedback=error_feedback, scale=scale)


def compress_updates(msg: Message, ctx: Context, call_next):
    """compeft_mod with the run's settings (mods are built before the run config is known)."""
    cfg = ctx.run_config
    if not cfg.get("compress", True):
        return call_next(msg, ctx)
    mod = _mod(float(cfg.get("k", 0.1)), bool(cfg.get("error-feedback", False)), str(cfg.get("scale", "norm")))
    return mod(msg, ctx, call_next)


app = ClientApp(mods=[compress_updates])


@functools.lru_cache(maxsize=None)
def _data(cid: int, n: int, per_client: int):
    return task.tokenize(*task.client_data(cid, n, per_client))


@app.train()
def train(msg: Message, ctx: Context) -> Message:
    cid = int(ctx.node_config["partition-id"])
    n = int(ctx.node_config["num-partitions"])
    cfg = ctx.run_config
    data = _data(cid, n, int(cfg.get("per-client", 96)))
    task.set_weights({k: v.numpy() for k, v in msg.content["arrays"].items()})
    server_round = int(msg.content["config"].get("server-round", 1))
    loss = task.train(data, epochs=int(cfg.get("local-epochs", 1)), lr=float(cfg.get("lr", 2e-3)),
                      seed=1000 * server_round + cid)
    arrays = ArrayRecord({k: Array(v) for k, v in task.get_weights().items()})
    metrics = MetricRecord({"train-loss": loss, "num-examples": len(data[2])})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)
