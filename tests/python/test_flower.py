"""compeft_rs.flower against a plain numpy statement of FedAvg over ComPEFT-compressed updates.

Flower's own strategy loop (Strategy.start) drives the rounds through an in-process Grid
(examples/federated/compeft_federated/local_grid.py); the clients are numpy "training" functions
the reference replays exactly. The reference compresses with tests/python/reference.py (top-k signs,
ties to the lower index) and the norm scale ||u|| / sqrt(nnz), averages with FedAvg's weights
(num-examples) and keeps the error-feedback residual as the issue states it.
"""

import re
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

flwr = pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402

import compeft_rs  # noqa: E402
from compeft_rs.flower import STYPE, CompeftFedAvg, compeft_mod, make_compeft_mod  # noqa: E402
from reference import reference_signs  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "federated"))
from compeft_federated.local_grid import LocalGrid  # noqa: E402

# "edge" has exactly min_size (256) entries: compressed; "bias" goes dense.
SHAPES = {"lora_A": (8, 96), "lora_B": (96, 8), "head": (2, 130), "edge": (16, 16), "bias": (2,)}


def initial(seed=0):
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal(s) * 0.1).astype(np.float32) for k, s in SHAPES.items()}


def client_step(node, rnd, sent):
    """A node's "training": a step towards its own target plus heavy-tailed noise, float32."""
    rng = np.random.default_rng(1000 * node + rnd)
    out = {}
    for k, v in sent.items():
        target = np.random.default_rng(node).standard_normal(v.shape).astype(np.float32)
        noise = rng.standard_t(3, v.shape).astype(np.float32) * np.float32(0.01)
        out[k] = (v + np.float32(0.3) * (target - v) + noise).astype(np.float32)
    return out


def examples_of(node):
    return 10 * node + 3


def numpy_app(mods, step=client_step):
    app = ClientApp(mods=mods)

    @app.train()
    def train(msg, ctx):
        sent = {k: a.numpy() for k, a in msg.content["arrays"].items()}
        rnd = int(msg.content["config"]["server-round"])
        reply = step(ctx.node_id, rnd, sent)
        return Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in reply.items()}),
                                   "metrics": MetricRecord({"num-examples": examples_of(ctx.node_id)})}),
                       reply_to=msg)

    return app


def run(strategy, app, nodes, rounds, start=None):
    grid = LocalGrid(app, nodes)
    arrays = ArrayRecord({k: Array(v) for k, v in (start or initial()).items()})
    history = []

    def keep(r, arrs):
        history.append({k: a.numpy() for k, a in arrs.items()})

    result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=rounds, evaluate_fn=keep)
    return grid, result, history


def reference_compress(u, k):
    """(decoded float32 update) by the plain statement: signs of the top-k, scale ||u||/sqrt(nnz)."""
    signs = reference_signs(u, k).reshape(u.shape)
    nnz = int(np.count_nonzero(signs))
    if nnz == 0:
        return np.zeros_like(u)
    scale = float(np.linalg.norm(u.astype(np.float64))) / np.sqrt(nnz)
    return signs.astype(np.float32) * np.float32(scale)


def reference_fedavg(nodes, rounds, k, error_feedback, min_size=256, start=None, skip=()):
    x = start or initial()
    residual = {n: {} for n in range(1, nodes + 1)}
    history = [x]
    for rnd in range(1, rounds + 1):
        acc = {key: np.zeros(v.shape, np.float64) for key, v in x.items()}
        total = sum(examples_of(n) for n in range(1, nodes + 1) if (n, rnd) not in skip)
        for n in range(1, nodes + 1):
            if (n, rnd) in skip:
                continue
            reply = client_step(n, rnd, x)
            w = examples_of(n) / total
            for key, v in reply.items():
                u = v - x[key]
                if v.size < min_size:
                    acc[key] += w * u
                    continue
                if error_feedback and key in residual[n]:
                    u = u + residual[n][key]
                c = reference_compress(u, k)
                residual[n][key] = u - c
                acc[key] += w * c
        x = {key: (x[key] + acc[key]).astype(np.float32) for key in x}
        history.append(x)
    return history


def close(a, b):
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)


@settings(max_examples=12)
@given(k=st.sampled_from([0.02, 0.1, 0.3, 1.0]), error_feedback=st.booleans(), nodes=st.integers(2, 4),
       rounds=st.integers(1, 4))
def test_matches_numpy_fedavg_of_compressed_updates(k, error_feedback, nodes, rounds):
    app = numpy_app([make_compeft_mod(k, error_feedback=error_feedback)])
    grid, _, history = run(CompeftFedAvg(fraction_evaluate=0.0, min_available_nodes=nodes), app, nodes, rounds)
    assert grid.errors == []
    want = reference_fedavg(nodes, rounds, k, error_feedback)
    assert len(history) == len(want)
    for got, ref in zip(history, want):
        close(got, ref)


def recorder(log):
    """A mod outside compeft_mod: what each node sent (decoded) and its bytes, per round."""
    def mod(msg, ctx, call_next):
        reply = call_next(msg, ctx)
        rnd = int(msg.content["config"]["server-round"])
        for key, arr in reply.content["arrays"].items():
            value = compeft_rs.decode(arr.data, framework="np") if arr.stype == STYPE else None
            log.append((ctx.node_id, rnd, key, value, len(arr.data)))
        return reply
    return mod


def test_error_feedback_carries_what_was_dropped():
    # Over the rounds, what a node sent plus its residual is the sum of its true updates.
    log, true = [], {}

    def step(node, rnd, sent):
        reply = client_step(node, rnd, sent)
        for key, v in reply.items():
            true[node, key] = true.get((node, key), 0) + (v - sent[key])
        return reply

    app = numpy_app([recorder(log), make_compeft_mod(0.05, error_feedback=True)], step)
    grid, _, _ = run(CompeftFedAvg(fraction_evaluate=0.0, min_available_nodes=2), app, 2, 3)
    for node in (1, 2):
        state = grid.contexts[node].state["compeft-rs.residual"]
        assert set(state.keys()) == {"lora_A", "lora_B", "head", "edge"}  # bias (2 entries) goes dense
        for key, residual in state.items():
            sent = sum(v for n, _, k, v, _ in log if n == node and k == key)
            np.testing.assert_allclose(sent + residual.numpy(), true[node, key], rtol=1e-5, atol=1e-5)
            assert np.abs(residual.numpy()).sum() > 0


def test_uplink_bytes_are_what_the_nodes_sent():
    log = []
    strategy = CompeftFedAvg(fraction_evaluate=0.0, min_available_nodes=3)
    _, result, _ = run(strategy, numpy_app([recorder(log), compeft_mod]), 3, 2)
    for rnd in (1, 2):
        assert result.train_metrics_clientapp[rnd]["uplink-bytes"] == sum(b for _, r, _, _, b in log if r == rnd)


def test_failed_replies_leave_the_others_averaged_as_fedavg():
    def step(node, rnd, sent):
        if (node, rnd) == (2, 1):
            raise RuntimeError("node 2 lost power")
        return client_step(node, rnd, sent)

    grid, _, history = run(CompeftFedAvg(fraction_evaluate=0.0, min_available_nodes=3, min_train_nodes=3),
                           numpy_app([compeft_mod], step), 3, 2)
    assert len(grid.errors) == 1 and "lost power" in grid.errors[0]
    for got, ref in zip(history, reference_fedavg(3, 2, 0.1, False, skip={(2, 1)})):
        close(got, ref)


def test_integer_buffers_average_and_round_like_fedavg():
    # num_batches_tracked-like counters: equal weights, each node adds 7: the mean is 7 (in float64,
    # 7/3 + 7/3 + 7/3 is 6.999999999999999: truncated, it would be 6).
    def step(node, rnd, sent):
        return {"steps": sent["steps"] + 7, "w": client_step(node, rnd, {"w": sent["w"]})["w"]}

    weights = {1: 5, 2: 5, 3: 5}
    app = ClientApp(mods=[compeft_mod])

    @app.train()
    def train(msg, ctx):
        sent = {k: a.numpy() for k, a in msg.content["arrays"].items()}
        reply = {k: Array(v) for k, v in step(ctx.node_id, 1, sent).items()}
        return Message(RecordDict({"arrays": ArrayRecord(reply),
                                   "metrics": MetricRecord({"num-examples": weights[ctx.node_id]})}), reply_to=msg)

    start = {"steps": np.array([0, 2 ** 25 + 1], np.int64), "w": np.zeros((16, 16), np.float32)}
    _, _, history = run(CompeftFedAvg(fraction_evaluate=0.0, min_available_nodes=3), app, 3, 1, start=start)
    assert history[-1]["steps"].dtype == np.int64
    assert history[-1]["steps"].tolist() == [7, 2 ** 25 + 8]


def test_sampled_nodes_and_evaluation_under_downlink():
    # Half the nodes train and half evaluate each round: nodes without the latest view get it dense,
    # and every node decodes what it is sent (no errors), for both message kinds.
    import random

    random.seed(0)
    app = numpy_app([compeft_mod])
    seen = []

    @app.evaluate()
    def evaluate(msg, ctx):
        x = {k: a.numpy() for k, a in msg.content["arrays"].items()}
        seen.append(sorted(x) == sorted(SHAPES))
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1, "acc": 0.5})}), reply_to=msg)

    strategy = CompeftFedAvg(fraction_train=0.5, fraction_evaluate=0.5, min_available_nodes=4, min_train_nodes=2,
                             min_evaluate_nodes=2, downlink_k=0.2)
    grid, result, _ = run(strategy, app, 4, 4)
    assert grid.errors == [] and seen and all(seen)
    for rnd in range(1, 5):
        assert strategy.traffic[rnd].replies == 2
        assert result.evaluate_metrics_clientapp[rnd]["downlink-bytes"] == strategy.traffic[rnd].down_evaluate > 0


def ternary_step(node, rnd, sent):
    """Updates of +-c on every entry, exactly representable: compression at k = 1 loses nothing."""
    rng = np.random.default_rng(100 * node + rnd)
    c = np.float32(2.0 ** -(node + 2))
    return {k: v + c * np.where(rng.random(v.shape) < 0.5, -1, 1).astype(np.float32) for k, v in sent.items()}


@pytest.mark.parametrize("scale", ["norm", "mean", "proj"])
def test_k1_on_ternary_updates_equals_flowers_fedavg(scale):
    start = {k: (np.round(v * 16) / 16).astype(np.float32) for k, v in initial().items() if v.size >= 64}
    start["lora_A"] = start["lora_A"][:, :8]  # 64 entries: ||u|| / sqrt(64) is exact in binary
    dense = run(FedAvg(fraction_evaluate=0.0, min_available_nodes=3), numpy_app([], ternary_step), 3, 3,
                start=start)[2]
    mod = make_compeft_mod(1.0, scale=scale, min_size=0)
    ours = run(CompeftFedAvg(fraction_evaluate=0.0, min_available_nodes=3), numpy_app([mod], ternary_step), 3, 3,
               start=start)[2]
    for got, ref in zip(ours, dense):
        close(got, ref)


def test_uplink_bytes_reported_and_20x_under_fp16():
    shapes = {"A": (16, 4096), "B": (4096, 16)}

    def step(node, rnd, sent):
        rng = np.random.default_rng(node * 7 + rnd)
        return {k: v + rng.standard_normal(v.shape).astype(np.float32) * np.float32(1e-3) for k, v in sent.items()}

    strategy = CompeftFedAvg(fraction_evaluate=0.0, min_available_nodes=3)
    start = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    _, result, _ = run(strategy, numpy_app([compeft_mod], step), 3, 2, start=start)
    fp16 = 3 * sum(np.prod(s) for s in shapes.values()) * 2
    for rnd in (1, 2):
        m = result.train_metrics_clientapp[rnd]
        t = strategy.traffic[rnd]
        assert t.replies == 3
        assert fp16 / t.up >= 20, fp16 / t.up
        assert m["uplink-dense-bytes"] >= 2 * fp16  # float32 replies as np.save'd
        # Three dense float32 broadcasts (np.save adds a header per array).
        assert m["downlink-bytes"] == m["downlink-dense-bytes"] == t.down
        assert 2 * fp16 < t.down < 2 * fp16 + 3 * 2 * 256


def test_stock_fedavg_gets_a_clear_error_from_the_mod():
    grid, result, _ = run(FedAvg(fraction_evaluate=0.0, min_available_nodes=2), numpy_app([compeft_mod]), 2, 1)
    assert len(grid.errors) == 2
    assert all("CompeftFedAvg" in e and "ServerApp" in e for e in grid.errors)
    assert result.train_metrics_clientapp == {}


def test_stock_fedavg_names_the_strategy_when_it_meets_compressed_arrays():
    arr = Array(dtype="float32", shape=(4,), stype=STYPE, data=b"")
    with pytest.raises(TypeError, match="CompeftFedAvg"):
        arr.numpy()


def renamed(node, rnd, sent):
    out = client_step(node, rnd, sent)
    out["extra"] = out.pop("head")
    return out


def reshaped(node, rnd, sent):
    out = client_step(node, rnd, sent)
    out["head"] = out["head"].reshape(-1)
    return out


def retyped(node, rnd, sent):
    out = client_step(node, rnd, sent)
    out["head"] = out["head"].astype(np.float64)
    return out


@pytest.mark.parametrize("step, message", [
    (renamed, "'extra' is not among the arrays the server sent"),
    (reshaped, r"'head' is float32 \(260,\) but the server sent float32 \(2, 130\)"),
    (retyped, r"'head' is float64 \(2, 130\) but the server sent float32 \(2, 130\)"),
])
def test_mismatched_replies_are_refused_by_the_mod(step, message):
    grid, result, _ = run(CompeftFedAvg(fraction_evaluate=0.0, min_available_nodes=2),
                          numpy_app([compeft_mod], step), 2, 1)
    assert len(grid.errors) == 2 and all(re.search(message, e) for e in grid.errors), grid.errors
    assert result.arrays is None or len(result.arrays) == 0


def forged(bad):
    """A ClientApp without the mod that sends a stream of its own making for 'head'."""
    def step(node, rnd, sent):
        return client_step(node, rnd, sent)

    app = ClientApp()

    @app.train()
    def train(msg, ctx):
        sent = {k: a.numpy() for k, a in msg.content["arrays"].items()}
        reply = {k: Array(v) for k, v in step(ctx.node_id, 1, sent).items()}
        reply["head"] = bad(sent["head"])
        return Message(RecordDict({"arrays": ArrayRecord(reply), "metrics": MetricRecord({"num-examples": 1})}),
                       reply_to=msg)

    return app


@pytest.mark.parametrize("bad, message", [
    (lambda h: Array(dtype="float32", shape=h.shape, stype=STYPE,
                     data=compeft_rs.encode(np.ones(7, np.float32), 0.5).to_bytes()),
     r"node \d+'s update of 'head' is float32 \(7,\); the server sent float32 \(2, 130\)"),
    (lambda h: Array(dtype="float32", shape=h.shape, stype=STYPE, data=b"not a stream"),
     r"node \d+'s update of 'head' is not a valid compeft-rs stream"),
    (lambda h: Array(dtype="float32", shape=h.shape, stype="pickle", data=b""),
     r"node \d+'s reply has array 'head' of unknown stype 'pickle'"),
])
def test_forged_updates_are_refused_by_the_strategy(bad, message):
    with pytest.raises(compeft_rs.CompeftError, match=message):
        run(CompeftFedAvg(fraction_evaluate=0.0, min_available_nodes=2), forged(bad), 2, 1)


def test_dense_replies_average_as_fedavg():
    # Without the mod, CompeftFedAvg is FedAvg.
    dense = run(FedAvg(fraction_evaluate=0.0, min_available_nodes=3), numpy_app([]), 3, 2)[2]
    ours = run(CompeftFedAvg(fraction_evaluate=0.0, min_available_nodes=3), numpy_app([]), 3, 2)[2]
    for got, ref in zip(ours, dense):
        close(got, ref)


def reference_downlink(nodes, rounds, k, dk, up_min_size):
    """Both directions compressed: every node holds the view v; the server sends compress(x - v)."""
    x = initial()
    v = None
    residual = {n: {} for n in range(1, nodes + 1)}
    total = sum(examples_of(n) for n in range(1, nodes + 1))
    history = [x]
    for rnd in range(1, rounds + 1):
        if v is None:
            v = dict(x)
        else:
            v = {key: (v[key] + reference_compress(x[key] - v[key], dk)).astype(np.float32)
                 if x[key].size >= 256 else x[key] for key in x}
        acc = {key: np.zeros(a.shape, np.float64) for key, a in x.items()}
        for n in range(1, nodes + 1):
            reply = client_step(n, rnd, v)
            w = examples_of(n) / total
            for key, val in reply.items():
                u = val - v[key]
                acc[key] += w * (u if val.size < up_min_size else reference_compress(u, k))
        x = {key: (x[key] + acc[key]).astype(np.float32) for key in x}
        history.append(x)
    return history


@pytest.mark.parametrize("up_min_size", [256, 1000])
def test_downlink_compression_matches_reference_and_saves_bytes(up_min_size):
    # up_min_size 1000: 'head' and 'edge' come back dense, as updates from the view the node holds.
    strategy = CompeftFedAvg(fraction_evaluate=0.0, min_available_nodes=3, downlink_k=0.2)
    grid, _, history = run(strategy, numpy_app([make_compeft_mod(0.1, min_size=up_min_size)]), 3, 3)
    assert grid.errors == []
    for got, ref in zip(history, reference_downlink(3, 3, 0.1, 0.2, up_min_size)):
        close(got, ref)
    # Round 1 is dense (no view yet); later rounds send compressed differences.
    assert strategy.traffic[1].down == strategy.traffic[1].down_dense
    assert strategy.traffic[3].down * 5 < strategy.traffic[3].down_dense


def test_lost_view_is_a_clear_error():
    strategy = CompeftFedAvg(fraction_evaluate=0.0, min_available_nodes=2, downlink_k=0.2)
    grid = LocalGrid(numpy_app([compeft_mod]), 2)

    def lose_state(rnd, arrays):
        if rnd == 1:  # after round 1: node 1 forgets the view it was sent
            del grid.contexts[1].state["compeft-rs.view"], grid.contexts[1].state["compeft-rs.view-id"]

    arrays = ArrayRecord({k: Array(v) for k, v in initial().items()})
    strategy.start(grid=grid, initial_arrays=arrays, num_rounds=3, evaluate_fn=lose_state)
    assert len(grid.errors) == 1 and "holds no broadcast" in grid.errors[0], grid.errors
    # Not confirmed in round 2, node 1 is sent the dense view in round 3 and takes part again.
    assert strategy.traffic[3].replies == 2


@pytest.mark.parametrize("kwargs, message", [
    (dict(k=0.0), "density k must be a fraction in"),
    (dict(k=0.1, scale="max"), "scale must be one of"),
    (dict(k=0.1, min_size=-1), "min_size must be an int"),
])
def test_mod_settings_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_compeft_mod(**kwargs)


def test_strategy_settings_are_checked():
    with pytest.raises(ValueError, match="density k must be a fraction"):
        CompeftFedAvg(downlink_k=2.0)
    with pytest.raises(ValueError, match="downlink_scale must be one of"):
        CompeftFedAvg(downlink_scale="median")


def test_arrays_size_mod_outside_reports_the_compressed_bytes(caplog):
    from flwr.clientapp.mod import arrays_size_mod

    strategy = CompeftFedAvg(fraction_evaluate=0.0, min_available_nodes=2)
    with caplog.at_level("INFO", logger="flwr"):
        grid, _, _ = run(strategy, numpy_app([arrays_size_mod, make_compeft_mod(0.1, min_size=0)]), 2, 1)
    assert grid.errors == []
    sent = [int(m) for m in re.findall(r"Total array elements sent: (\d+) bytes", caplog.text)]
    # Flower's count: the arrays' data plus their keys' characters.
    assert len(sent) == 2 and sum(sent) == strategy.traffic[1].up + 2 * sum(map(len, SHAPES)), caplog.text[-2000:]


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_full_model_dtypes(dtype):
    # A full model's float16 or float64 arrays: updates in float32 (float64 for float64), the global
    # model kept in its dtype; a scalar goes dense.
    start = {k: v.astype(dtype) for k, v in initial().items()}
    start["scalar"] = np.array(0.5, dtype=dtype)

    def step(node, rnd, sent):
        out = client_step(node, rnd, {k: v for k, v in sent.items() if k != "scalar"})
        out = {k: v.astype(dtype) for k, v in out.items()}
        out["scalar"] = np.array(0.25 * node, dtype=dtype)
        return out

    grid, _, history = run(CompeftFedAvg(fraction_evaluate=0.0, min_available_nodes=2),
                           numpy_app([make_compeft_mod(1.0, min_size=0)], step), 2, 1, start=start)
    assert grid.errors == []
    x = history[-1]
    assert all(v.dtype == dtype for v in x.values())
    w = np.array([examples_of(1), examples_of(2)], np.float64) / (examples_of(1) + examples_of(2))
    assert x["scalar"] == pytest.approx(0.5 + w[0] * (0.25 - 0.5) + w[1] * (0.5 - 0.5), rel=1e-3)
    kind = np.float64 if dtype == np.float64 else np.float32
    for key in SHAPES:
        want = start[key].astype(kind) + sum(
            wi * reference_compress(step(n, 1, start)[key].astype(kind) - start[key].astype(kind), 1.0)
            for n, wi in zip((1, 2), w))
        np.testing.assert_allclose(x[key].astype(np.float64), want, rtol=2e-3 if dtype == np.float16 else 1e-6,
                                   atol=1e-3 if dtype == np.float16 else 1e-7, err_msg=key)


def test_the_callers_config_is_left_alone():
    from flwr.app import ConfigRecord

    cfg = ConfigRecord({"lr": 0.1})
    strategy = CompeftFedAvg(fraction_evaluate=0.0, min_available_nodes=2)
    grid = LocalGrid(numpy_app([compeft_mod]), 2)
    strategy.start(grid=grid, initial_arrays=ArrayRecord({k: Array(v) for k, v in initial().items()}),
                   num_rounds=1, train_config=cfg)
    assert dict(cfg) == {"lr": 0.1} and grid.errors == []
