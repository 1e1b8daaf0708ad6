"""The example Flower app (examples/federated) as a real deployment on localhost: a SuperLink and two
SuperNodes (insecure mode), each its own process tree, the run submitted with ``flwr run`` and
followed with ``flwr ls`` until it finishes. The ClientApps reply through compeft_mod and the
ServerApp aggregates with CompeftFedAvg; the run's history must show compressed uplink bytes.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("flwr")
pytest.importorskip("peft")

APP = Path(__file__).resolve().parents[2] / "examples" / "federated"
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def free_ports(n):
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def healthy(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=0.5) as r:
            return r.status == 200
    except Exception:  # noqa: BLE001 - not up yet
        return False


def tree(pid):
    """pid's descendants (the SuperLink starts its SuperExec in a session of its own)."""
    children = {}
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                ppid = int(Path(f"/proc/{e}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(e))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def stop(proc):
    if proc.poll() is not None:
        return
    pids = tree(proc.pid)
    for p in reversed(pids):
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    for p in [proc.pid] + pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=5)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the process tree is read from /proc")
def test_example_app_runs_on_a_localhost_deployment():
    for exe in ("flwr", "flower-superlink", "flower-supernode", "flower-superexec", "flwr-serverapp",
                "flwr-clientapp"):
        if not (BIN / exe).exists():
            pytest.skip(f"{exe} not installed beside {sys.executable}")
    tmp = Path(tempfile.mkdtemp(prefix="cfd-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLWR_", "RAY_"))}
    env.update({
        # SuperLink and SuperNodes start flower-superexec, flwr-serverapp and flwr-clientapp from PATH.
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        # The app runs in this environment; the SuperLink would otherwise `uv sync` a fresh one.
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "OMP_NUM_THREADS": "1",
    })
    procs, logs = [], []

    def start(name, cmd):
        home = tmp / "home" / name
        home.mkdir(parents=True)
        log = open(tmp / f"{name}.log", "wb")  # noqa: SIM115 - closed in finally
        logs.append(log)
        p = subprocess.Popen(cmd, env={**env, "FLWR_HOME": str(home)}, cwd=tmp, stdout=log,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        procs.append((name, p))
        return p

    def wait_up(name, proc, port):
        deadline = time.monotonic() + 60
        while not healthy(port):
            assert proc.poll() is None, f"{name} exited: {(tmp / f'{name}.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"{name} did not come up on port {port}"
            time.sleep(0.2)

    out = tmp / "history.json"
    try:
        link_port, *node_ports = free_ports(3)
        link = start("superlink", [str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1",
                                   "--port", str(link_port), "--disable-runtime-dependency-installation"])
        wait_up("superlink", link, link_port)
        for i, port in enumerate(node_ports):
            node = start(f"supernode{i}", [
                str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                "--host", "127.0.0.1", "--port", str(port),
                "--node-config", f"partition-id={i} num-partitions={len(node_ports)}"])
            wait_up(f"supernode{i}", node, port)
        cli = {**env, "FLWR_HOME": str(tmp / "home" / "cli")}
        Path(cli["FLWR_HOME"]).mkdir(parents=True)
        Path(cli["FLWR_HOME"], "config.toml").write_text(
            f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n')

        def flwr(*args):
            r = subprocess.run([str(BIN / "flwr"), *args, "--format", "json"], env=cli, cwd=tmp,
                               capture_output=True, text=True, timeout=120)
            try:
                return json.loads(r.stdout[r.stdout.index("{"):])
            except ValueError:
                raise AssertionError(f"flwr {args[0]}: rc={r.returncode}\n{r.stdout}\n{r.stderr}") from None

        # A copy of the app: `flwr run` may rewrite the pyproject.toml it is given.
        app = tmp / "app"
        shutil.copytree(APP, app, ignore=shutil.ignore_patterns("__pycache__", "study.py"))
        # Error feedback and the compressed broadcast: the nodes' state must survive between rounds.
        config = (f"num-server-rounds=2 per-client=32 local-epochs=1 test-size=32 error-feedback=true "
                  f"downlink-k=0.2 out='{out}'")
        started = flwr("run", str(app), "local", "--run-config", config)
        assert started.get("success"), started
        run_id = started["run-id"]
        deadline = time.monotonic() + 400
        status = ""
        while time.monotonic() < deadline:
            for name, p in procs:
                assert p.poll() is None, f"{name} died: {(tmp / f'{name}.log').read_text()[-3000:]}"
            status = flwr("ls", "local", "--run-id", str(run_id))["runs"][0]["status"]
            if status.startswith("finished"):
                break
            time.sleep(1)
        assert status == "finished:completed", (status, (tmp / "superlink.log").read_text()[-4000:])
        history = json.loads(out.read_text())
        assert [h["round"] for h in history] == [0, 1, 2]
        for h in history[1:]:
            assert set(h["accuracy"]) == {"movies", "amazon", "tweets"}
            # Two nodes' compressed updates, well under the dense float32 replies.
            assert 0 < h["uplink-bytes"] * 20 < h["uplink-dense-bytes"], h
        # Round 1 broadcasts the model; round 2 a compressed difference from the nodes' views (and
        # the nodes add the residuals error feedback kept from round 1).
        assert history[1]["downlink-bytes"] > 5 * history[2]["downlink-bytes"] > 0, history
    finally:
        for _, p in reversed(procs):
            stop(p)
        for log in logs:
            log.close()
        shutil.rmtree(tmp, ignore_errors=True)
