"""Flower integration: compressed model updates on the wire, aggregated without decoding.

Two pieces, for Flower's message API (``flwr >= 1.20``; ``pip install "compeft-rs[flower]"``):

- :func:`make_compeft_mod` / :data:`compeft_mod`, a ClientApp mod. On a training message it keeps the
  arrays the server sent, runs the client's training (``call_next``), and replies with the *update*
  (reply - sent) of every float array compressed by ComPEFT (the signs of the top-k entries by
  magnitude and one scale), under the same keys. Arrays with fewer than ``min_size`` entries, and
  arrays that are not float, go as they are. With ``error_feedback=True`` what compression dropped
  is kept in the client's ``Context.state`` and added to the next round's update.
- :class:`CompeftFedAvg`, a ``FedAvg`` whose aggregation reads those replies: the weighted mean of
  the updates (weights from ``num-examples``, as FedAvg) is computed by task arithmetic straight
  from the compressed streams and added to the global model. Replies sent without the mod (dense
  arrays) are averaged as FedAvg does. With ``downlink_k`` the broadcast is compressed too. Bytes
  sent up and down are reported in each round's train metrics and kept in ``traffic``.

Flower's stock aggregation cannot read compressed arrays (``Array.numpy()`` refuses them): the mod
checks that the training message came from :class:`CompeftFedAvg` and fails with an error that says
so before any training is done.

>>> from flwr.clientapp import ClientApp
>>> from compeft_rs.flower import CompeftFedAvg, make_compeft_mod
>>> app = ClientApp(mods=[make_compeft_mod(k=0.1)])
>>> strategy = CompeftFedAvg(fraction_evaluate=0.0)

This module imports flwr; ``import compeft_rs`` never does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np

try:
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.serverapp.strategy import FedAvg
except ImportError as e:  # pragma: no cover - exercised only without flwr
    raise ImportError(
        "compeft_rs.flower needs Flower's message API (flwr >= 1.20): pip install 'compeft-rs[flower]'"
    ) from e

from ._core import CompeftError, Stream
from ._core import encode as _encode
from ._core import merge_streams as _merge_streams
from ._tensor import check_k_alpha

__all__ = ["CompeftFedAvg", "RoundTraffic", "compeft_mod", "make_compeft_mod", "STYPE", "SCALES"]

#: ``Array.stype`` of a compressed update; Flower's ``Array.numpy()`` quotes it when it refuses one.
STYPE = "compeft-rs.update (aggregate with compeft_rs.flower.CompeftFedAvg)"
#: The broadcast's compressed arrays: a difference from the view the node holds.
DOWNLINK_STYPE = "compeft-rs.downlink (decoded by compeft_rs.flower.compeft_mod)"
#: ConfigRecord key CompeftFedAvg sets in every message it sends: the wire version.
CONFIG_KEY = "compeft-rs"
#: ConfigRecord key of a compressed broadcast: the id of the view its differences apply to.
BASE_KEY = "compeft-rs.base"
#: ConfigRecord key of any broadcast under downlink_k: the id of the view it makes.
VIEW_KEY = "compeft-rs.view"
WIRE_VERSION = 1
SCALES = ("norm", "proj", "std", "mean")
_NUMPY = "numpy.ndarray"
_RESIDUAL = "compeft-rs.residual"
_VIEW = "compeft-rs.view"
_VIEW_ID = "compeft-rs.view-id"


def _float_kind(a: np.ndarray) -> Optional[np.dtype]:
    """The dtype an update of ``a`` is computed in, or None when ``a`` is not float."""
    if a.dtype == np.float64:
        return np.dtype(np.float64)
    if a.dtype.kind == "f":
        return np.dtype(np.float32)
    return None


def _compress(update: np.ndarray, k: float, scale: str) -> Tuple[Stream, bytes]:
    flat = np.ascontiguousarray(update).reshape(-1)
    s = _encode(flat, flat.dtype.name, list(update.shape), k, 1.0, "golomb", scale)
    return s, s.to_bytes()


def _decoded(stream: Stream, dtype: np.dtype) -> np.ndarray:
    out = np.empty(tuple(stream.shape), dtype=dtype)
    stream.decode_into(out.reshape(-1), dtype.name)
    return out


def _is_train(msg: Message) -> bool:
    return msg.metadata.message_type.split(".")[0] == "train"


def _configs(content: RecordDict) -> Dict[str, Any]:
    merged: Dict[str, Any] = {}
    for rec in content.config_records.values():
        merged.update(rec)
    return merged


def _state_arrays(state: RecordDict, key: str) -> Dict[str, np.ndarray]:
    rec = state.get(key)
    return {} if rec is None else {n: a.numpy() for n, a in rec.items()}


def _inflate_downlink(msg: Message, ctx: Any) -> None:
    """Replaces a compressed broadcast by the arrays it stands for (the node's view plus the
    differences) and remembers the new view; a dense broadcast under downlink_k is remembered."""
    cfg = _configs(msg.content)
    if VIEW_KEY not in cfg:
        return
    view_id = int(cfg[VIEW_KEY])
    base = cfg.get(BASE_KEY)
    held = _state_arrays(ctx.state, _VIEW)
    held_id = int(ctx.state[_VIEW_ID]["id"]) if _VIEW_ID in ctx.state else None
    if base is not None and int(base) != held_id:
        raise CompeftError(
            f"the server sent differences from its broadcast {int(base)} but this node holds "
            f"{'no broadcast' if held_id is None else f'broadcast {held_id}'} (its state was lost?); the "
            "server sends it the whole model next round, once this refusal has reached it"
        )
    for name, rec in msg.content.array_records.items():
        out = ArrayRecord()
        for key, arr in rec.items():
            if arr.stype == DOWNLINK_STYPE:
                s = Stream.from_bytes(arr.data)
                ref = held.get(key)
                if ref is None or tuple(ref.shape) != tuple(s.shape):
                    raise CompeftError(f"the broadcast's array {key!r} has no counterpart in this node's view")
                value = (ref.astype(_float_kind(ref)) + _decoded(s, _float_kind(ref))).astype(ref.dtype)
            else:
                value = arr.numpy()
            held[key] = value
            out[key] = Array(value)
        msg.content[name] = out
    ctx.state[_VIEW] = ArrayRecord({k: Array(v) for k, v in held.items()})
    ctx.state[_VIEW_ID] = ConfigRecord({"id": view_id})


def make_compeft_mod(k: float = 0.1, *, error_feedback: bool = False, scale: str = "norm",
                     min_size: int = 256) -> Callable[[Message, Any, Callable], Message]:
    """A ClientApp mod that replies to training messages with compressed updates.

    Args:
        k: density of the compressed update, in (0, 1]: the fraction of each array's entries whose
            sign is sent.
        error_feedback: keep what compression dropped (update - decoded update) in the client's
            ``Context.state`` and add it to the next round's update. Off by default: in our study
            (README, Federated) it did not help at these rounds.
        scale: the one magnitude sent per array: "norm" (the update's L2 norm kept, the default),
            "proj" (its projection on the update kept), "std" (the paper's sigma) or "mean" (mean
            magnitude of the kept entries, as STC).
        min_size: arrays with fewer entries go as they are (a classifier's bias is not worth a
            stream's header).

    Place it last in ``ClientApp(mods=[...])`` if other mods need the dense arrays, and
    ``arrays_size_mod`` before it to log the compressed size. The ServerApp must run
    :class:`CompeftFedAvg`.
    """
    k, _ = check_k_alpha(k, 1.0)
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 0:
        raise ValueError(f"min_size must be an int >= 0, got {min_size!r}")

    def compeft_mod(msg: Message, ctx: Any, call_next: Callable[[Message, Any], Message]) -> Message:
        if msg.has_content():
            _inflate_downlink(msg, ctx)
        if not _is_train(msg) or not msg.has_content():
            return call_next(msg, ctx)
        version = _configs(msg.content).get(CONFIG_KEY)
        if version is not None and version != WIRE_VERSION:
            raise CompeftError(
                f"the server speaks compeft-rs wire version {version} and this node {WIRE_VERSION}: "
                "install the same compeft-rs version on the server and the nodes"
            )
        if version is None:
            raise CompeftError(
                "compeft_mod replies with compressed updates, which only compeft_rs.flower.CompeftFedAvg "
                "can aggregate, and this training message did not come from it: run CompeftFedAvg in the "
                "ServerApp (it is a FedAvg) or remove compeft_mod from the ClientApp's mods"
            )
        records = msg.content.array_records
        sent_by_record = {name: {key: arr.numpy() for key, arr in rec.items()} for name, rec in records.items()}
        reply = call_next(msg, ctx)
        if reply.has_error() or not reply.has_content():
            return reply
        residual = _state_arrays(ctx.state, _RESIDUAL) if error_feedback else {}
        for name, rec in list(reply.content.array_records.items()):
            # The reply's record of the same name, or the one record sent under another name.
            sent = sent_by_record.get(name, next(iter(sent_by_record.values())) if len(sent_by_record) == 1 else {})
            out = ArrayRecord()
            for key, arr in rec.items():
                value = arr.numpy()
                kind = _float_kind(value)
                if kind is None or value.ndim == 0 or value.size < max(min_size, 1):
                    out[key] = arr
                    continue
                base = sent.get(key)
                if base is None:
                    raise CompeftError(
                        f"the reply's array {key!r} is not among the arrays the server sent, so it has no "
                        "update to compress; reply with the keys you received"
                    )
                if base.shape != value.shape or base.dtype != value.dtype:
                    raise CompeftError(
                        f"the reply's array {key!r} is {value.dtype} {value.shape} but the server sent "
                        f"{base.dtype} {base.shape}; reply with the dtype and shape you were sent"
                    )
                update = value.astype(kind) - base.astype(kind)
                if key in residual and residual[key].shape == update.shape:
                    update += residual[key].astype(kind)
                stream, data = _compress(update, k, scale)
                if error_feedback:
                    residual[key] = update - _decoded(stream, kind)
                out[key] = Array(dtype=str(value.dtype), shape=tuple(value.shape), stype=STYPE, data=data)
            reply.content[name] = out
        if error_feedback:
            ctx.state[_RESIDUAL] = ArrayRecord({n: Array(v) for n, v in residual.items()})
        return reply

    compeft_mod.__doc__ = f"compeft_mod(k={k}, error_feedback={error_feedback}, scale={scale!r}, min_size={min_size})"
    return compeft_mod


#: The mod with its default settings (k = 0.1, norm scale, no error feedback).
compeft_mod = make_compeft_mod()


@dataclass
class RoundTraffic:
    """Bytes of one round's arrays: sent to the nodes (``down``: train and evaluate messages;
    ``down_evaluate``: the evaluate messages' share) and received from them (``up``), with what
    Flower's dense numpy arrays of the same tensors would have taken (``*_dense``)."""

    down: int = 0
    down_dense: int = 0
    down_evaluate: int = 0
    up: int = 0
    up_dense: int = 0
    replies: int = 0


def _dense_nbytes(arr: Array) -> int:
    """Bytes of the array as Flower's numpy serialisation sends it (np.save, header included)."""
    if arr.stype == _NUMPY:
        return len(arr.data)
    n = math.prod(arr.shape) * np.dtype(arr.dtype).itemsize
    return n + 128  # np.save's header, 128 bytes for shapes like these


class CompeftFedAvg(FedAvg):
    """FedAvg over compressed updates: the weighted mean of the replies' updates computed from the
    compressed streams (task arithmetic, float32) and added to the global model.

    Takes FedAvg's arguments, plus:

    Args:
        downlink_k: compress the broadcast too, at this density (off by default). Each node that
            replied to the previous broadcast is sent the difference between the model and the view
            it holds, compressed; the others the view itself, dense. What the compression drops
            stays in the next difference (the view follows the model).
        downlink_scale: the scale rule of the broadcast's compression (see make_compeft_mod).
        min_size: under downlink_k, arrays with fewer entries are broadcast as they are.

    The nodes' ClientApp must use :func:`make_compeft_mod`; replies without it (dense arrays) are
    averaged as FedAvg does. Each round's train metrics carry ``uplink-bytes``,
    ``uplink-dense-bytes``, ``downlink-bytes`` and ``downlink-dense-bytes`` of its training
    messages (dense: Flower's numpy arrays of the same tensors), its evaluate metrics the
    ``downlink-bytes`` of the evaluate broadcast; :attr:`traffic` keeps them per round (reset by
    ``start``).

    The update average is computed in float32 (as Flower's FedAvg averages float32 models), also for
    float64 arrays; integer arrays are averaged in float64 and rounded. Under ``downlink_k`` the
    nodes train from (and federated evaluation scores) the view, the compressed model; a node gets
    compressed differences only if it acknowledged the previous broadcast, so the saving is for
    nodes that take part round after round (cross-silo); with sampled participation most messages
    carry the dense view.
    """

    def __init__(self, *args: Any, downlink_k: Optional[float] = None, downlink_scale: str = "norm",
                 min_size: int = 256, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 0:
            raise ValueError(f"min_size must be an int >= 0, got {min_size!r}")
        self.min_size = min_size
        if downlink_k is not None:
            downlink_k, _ = check_k_alpha(downlink_k, 1.0)
        if downlink_scale not in SCALES:
            raise ValueError(f"downlink_scale must be one of {SCALES}, got {downlink_scale!r}")
        self.downlink_k = downlink_k
        self.downlink_scale = downlink_scale
        self.traffic: Dict[int, RoundTraffic] = {}
        self._base: Optional[Dict[str, np.ndarray]] = None
        self._view: Optional[Dict[str, np.ndarray]] = None
        self._view_id = 0
        self._node_view: Dict[int, int] = {}
        self._pending: Dict[int, int] = {}

    def summary(self) -> None:
        super().summary()
        from flwr.supercore import log
        from logging import INFO

        log(INFO, "\t└──> compeft-rs: compressed updates, downlink_k=%s", self.downlink_k)

    # -- sending ----------------------------------------------------------------------------
    def _broadcast(self, server_round: int, messages: Iterable[Message], arrays: ArrayRecord,
                   model: Optional[Dict[str, np.ndarray]] = None, evaluate: bool = False) -> List[Message]:
        """The messages as sent (marker set; under downlink_k rebuilt per node); ``model`` is
        ``arrays`` deserialised, when the caller already has it."""
        messages = list(messages)
        t = self.traffic.setdefault(server_round, RoundTraffic())
        before = t.down
        dense_bytes = sum(_dense_nbytes(a) for a in arrays.values())
        if self.downlink_k is None or not messages:
            for m in messages:
                m.content[self.configrecord_key][CONFIG_KEY] = WIRE_VERSION
            t.down += dense_bytes * len(messages)
            t.down_dense += dense_bytes * len(messages)
            if evaluate:
                t.down_evaluate += t.down - before
            return messages
        if model is None:
            model = {key: a.numpy() for key, a in arrays.items()}
        base_id, base = self._view_id, self._view
        view: Dict[str, np.ndarray] = {}
        diffs: Dict[str, Array] = {}
        for key, value in model.items():
            kind = _float_kind(value)
            ref = None if base is None else base.get(key)
            if (kind is None or ref is None or ref.shape != value.shape or value.ndim == 0
                    or value.size < max(self.min_size, 1)):
                view[key] = value
                continue
            stream, data = _compress(value.astype(kind) - ref.astype(kind), self.downlink_k, self.downlink_scale)
            view[key] = (ref.astype(kind) + _decoded(stream, kind)).astype(value.dtype)
            diffs[key] = Array(dtype=str(value.dtype), shape=tuple(value.shape), stype=DOWNLINK_STYPE, data=data)
        self._view, self._view_id = view, base_id + 1
        dense = ArrayRecord({key: Array(v) for key, v in view.items()})
        small = ArrayRecord({key: diffs.get(key, dense[key]) for key in view})
        out = []
        for m in messages:
            node = m.metadata.dst_node_id
            fresh = base is not None and self._node_view.get(node) == base_id
            rec = small if fresh else dense
            config = ConfigRecord(dict(m.content[self.configrecord_key]))
            config[CONFIG_KEY] = WIRE_VERSION
            config[VIEW_KEY] = self._view_id
            if fresh:
                config[BASE_KEY] = base_id
            content = RecordDict({self.arrayrecord_key: rec, self.configrecord_key: config})
            out.append(Message(content, node, m.metadata.message_type, ttl=m.metadata.ttl,
                               group_id=m.metadata.group_id))
            self._pending[node] = self._view_id
            nbytes = sum(len(a.data) for a in rec.values())
            t.down += nbytes
            t.down_dense += dense_bytes
        if evaluate:
            t.down_evaluate += t.down - before
        return out

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Any) -> Iterable[Message]:
        """FedAvg's, with the marker the mod checks; the broadcast compressed under downlink_k."""
        # A copy: FedAvg puts the caller's ConfigRecord into every message, and the marker is ours.
        messages = super().configure_train(server_round, arrays, ConfigRecord(dict(config)), grid)
        # Deserialised once: the downlink difference and the aggregation both start from it.
        self._base = {key: a.numpy() for key, a in arrays.items()}
        sent = self._broadcast(server_round, messages, arrays, self._base)
        if self.downlink_k is not None:
            self._sent_view = dict(self._view or {})
        return sent

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Any) -> Iterable[Message]:
        """FedAvg's; under downlink_k the broadcast is compressed as for training."""
        messages = super().configure_evaluate(server_round, arrays, ConfigRecord(dict(config)), grid)
        return self._broadcast(server_round, messages, arrays, evaluate=True)

    def _confirm(self, replies: List[Message]) -> None:
        """Nodes that replied hold the view they were sent."""
        for m in replies:
            node = m.metadata.src_node_id
            if not m.has_error() and node in self._pending:
                self._node_view[node] = self._pending[node]

    # -- receiving --------------------------------------------------------------------------
    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> Tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        """The global model plus the weighted mean of the replies' updates, and the replies'
        metrics (FedAvg's aggregation) with this round's bytes."""
        replies = list(replies)
        self._confirm(replies)
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        if self._base is None:
            raise CompeftError("aggregate_train needs the arrays of configure_train: call it first")
        contents = [m.content for m in valid]
        weights = [float(next(iter(c.metric_records.values()))[self.weighted_by_key]) for c in contents]
        total = sum(weights)
        if not total > 0:
            raise CompeftError(f"the replies' '{self.weighted_by_key}' sum to {total}; FedAvg needs a positive total")
        weights = [w / total for w in weights]
        records = [next(iter(c.array_records.values())) for c in contents]
        origin = self._sent_view if self.downlink_k is not None else self._base
        arrays = self._average(records, weights, [m.metadata.src_node_id for m in valid], origin)
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        t = self.traffic.setdefault(server_round, RoundTraffic())
        t.replies = len(valid)
        t.up = sum(len(a.data) for r in records for a in r.values())
        t.up_dense = sum(_dense_nbytes(a) for r in records for a in r.values())
        for name, v in (("uplink-bytes", t.up), ("uplink-dense-bytes", t.up_dense),
                        ("downlink-bytes", t.down), ("downlink-dense-bytes", t.down_dense)):
            metrics[name] = int(v)
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Optional[MetricRecord]:
        """FedAvg's, with the bytes of this round's evaluate broadcast (``downlink-bytes``)."""
        replies = list(replies)
        self._confirm(replies)
        metrics = super().aggregate_evaluate(server_round, replies)
        t = self.traffic.get(server_round)
        if metrics is not None and t is not None:
            metrics["downlink-bytes"] = int(t.down_evaluate)
        return metrics

    def start(self, *args: Any, **kwargs: Any) -> Any:
        """FedAvg's ``start``; a new run starts with no views and no traffic recorded."""
        self.traffic = {}
        self._base, self._view, self._view_id = None, None, 0
        self._node_view, self._pending = {}, {}
        return super().start(*args, **kwargs)

    def _average(self, records: List[ArrayRecord], weights: List[float], nodes: List[int],
                 origin: Dict[str, np.ndarray]) -> ArrayRecord:
        """base + sum_i w_i * update_i, key by key; an update is a compressed stream (relative to
        what node i was sent, ``origin``) or a dense reply minus ``origin``."""
        base = self._base
        assert base is not None
        sums: Dict[str, np.ndarray] = {}
        dense: Dict[str, np.ndarray] = {}
        groups: Dict[Tuple[int, ...], List[str]] = {}
        streams: Dict[str, List[Stream]] = {}
        for key in records[0].keys():
            if key not in base:
                raise CompeftError(f"the replies carry array {key!r}, which the server did not send")
            ref = base[key]
            # Integer buffers (step counters) are averaged in float64 and rounded back.
            kind = _float_kind(ref) or np.dtype(np.float64)
            which: List[int] = []
            for i, rec in enumerate(records):
                arr = rec[key]
                if arr.stype == STYPE:
                    streams.setdefault(key, []).append(self._stream(arr, key, nodes[i], ref))
                    which.append(i)
                elif arr.stype == _NUMPY:
                    value = arr.numpy()
                    if value.shape != ref.shape:
                        raise CompeftError(
                            f"node {nodes[i]}'s reply has array {key!r} of shape {value.shape}; the server sent {ref.shape}"
                        )
                    acc = dense.setdefault(key, np.zeros(ref.shape, dtype=kind))
                    start = origin.get(key, ref)
                    diff = value.astype(kind, copy=False) - start.astype(kind, copy=False)
                    acc += diff * kind.type(weights[i])
                else:
                    raise CompeftError(f"node {nodes[i]}'s reply has array {key!r} of unknown stype {arr.stype!r}")
            if which:
                groups.setdefault(tuple(which), []).append(key)
        for which, keys in groups.items():
            # Written in place: the merge overwrites its float32 outputs.
            outs = [np.empty(base[key].shape, dtype=np.float32) for key in keys]
            _merge_streams([streams[key] for key in keys], keys, [weights[i] for i in which], outs,
                           "task_arithmetic", "total", "peft", None, 1.0)
            sums.update(zip(keys, outs))
        result = ArrayRecord()
        for key, ref in base.items():
            delta = sums.get(key)
            if key in dense:
                delta = dense[key] if delta is None else dense[key] + delta
            if delta is None:
                result[key] = Array(ref)
            elif ref.dtype == delta.dtype:
                delta += ref
                result[key] = Array(delta)
            elif _float_kind(ref) is None:
                result[key] = Array(np.asarray(np.rint(ref.astype(np.float64) + delta).astype(ref.dtype)))
            else:
                # float16 models are updated in float32.
                kind = _float_kind(ref)
                result[key] = Array(np.asarray((ref.astype(kind) + delta).astype(ref.dtype)))
        return result

    @staticmethod
    def _stream(arr: Array, key: str, node: int, ref: np.ndarray) -> Stream:
        try:
            s = Stream.from_bytes(arr.data)
        except CompeftError as e:
            raise CompeftError(f"node {node}'s update of {key!r} is not a valid compeft-rs stream: {e}") from e
        if tuple(s.shape) != tuple(ref.shape) or tuple(arr.shape) != tuple(ref.shape) or arr.dtype != str(ref.dtype):
            raise CompeftError(
                f"node {node}'s update of {key!r} is {arr.dtype} {tuple(s.shape)}; the server sent "
                f"{ref.dtype} {tuple(ref.shape)}"
            )
        return s
