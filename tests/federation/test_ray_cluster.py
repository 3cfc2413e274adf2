"""drivepriv on a real multi-node Ray cluster (issue 17), started and stopped by the tests.

Two Ray nodes on this machine, a head and a worker node (``ray start --head`` and ``ray start
--address``, separate process groups, one CPU each, so Flower's two client workers land on
different nodes), joined with ``federation.ray_address``; the clients' truth goes to a folder
both share (``federation.flower_truth_dir``). Shown:

- the federation trains on both nodes and the attacks run as Ray tasks on both, and
  metrics.csv and training.csv are byte for byte the in-process engine's;
- a Ray worker killed in the middle of a client's round: Ray restarts it, the round is sent
  again from the client's state before it, and the run ends with the same numbers; with
  ``federation.flower_retries=0`` it stops instead, exit code 2, a clear error, no report;
- nothing of the cluster is left running afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from drivepriv.cli import main

pytest.importorskip("flwr", reason='the Flower extra is not installed (pip install -e ".[flower]")')
ray = pytest.importorskip("ray")

RAY = str(Path(sys.executable).with_name("ray"))
ARGS = ["--scenario", "merge", "--quick", "--clients", "3", "--attacks", "rgia-k,dlg", "--no-progress"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _groups() -> dict[int, int]:
    """pid -> process group of every process on this machine."""
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                out[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[2])
            except (OSError, IndexError, ValueError):
                pass
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


class Cluster:
    """A head and a worker Ray node, each ``ray start --block`` in its own process group (every
    Ray process of a node, its workers included, stays in that group), so stopping kills the
    groups and checking finds anything left."""

    def __init__(self, tmp: Path) -> None:
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        self.logs = tmp
        self.nodes: list[subprocess.Popen] = []
        # Ray's unix sockets must have short paths
        self.temp = tempfile.mkdtemp(prefix="dpray-", dir="/tmp")
        common = ["--block", "--num-cpus=1", "--object-store-memory=150000000", "--disable-usage-stats"]
        self._start("head", [RAY, "start", "--head", f"--port={self.port}", f"--temp-dir={self.temp}", "--include-dashboard=false",
                             f"--dashboard-port={_free_port()}", f"--ray-client-server-port={_free_port()}", *common])
        self._wait(1)
        self._start("worker", [RAY, "start", f"--address={self.address}", *common])
        self._wait(2)

    def _start(self, name: str, argv: list[str]) -> None:
        log = open(self.logs / f"ray-{name}.log", "w")
        self.nodes.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True))

    def _wait(self, n: int, timeout_s: float = 90.0) -> None:
        code = f"import ray; ray.init(address={self.address!r}, log_to_driver=False); print(sum(x['Alive'] for x in ray.nodes()))"
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            if any(p.poll() is not None for p in self.nodes):
                break
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=self.env, timeout=60)
            if r.returncode == 0 and r.stdout.strip().splitlines()[-1:] == [str(n)]:
                return
            time.sleep(1.0)
        logs = "\n".join(p.read_text()[-2000:] for p in sorted(self.logs.glob("ray-*.log")))
        self.stop()
        pytest.fail(f"the Ray cluster did not reach {n} nodes:\n{logs}")

    @property
    def groups(self) -> set[int]:
        return {p.pid for p in self.nodes}

    def busy_client_worker(self) -> int | None:
        """A Ray worker of this cluster now running a client's round (Ray names the process)."""
        for pid, group in _groups().items():
            if group in self.groups and _cmdline(pid).startswith("ray::ClientAppActor.run"):
                return pid
        return None

    def left_running(self) -> list[str]:
        return [f"{pid} {_cmdline(pid)[:80]}" for pid, g in _groups().items() if g in self.groups]

    def stop(self) -> None:
        for sig, wait_s in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
            for p in self.nodes:
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait_s
            while self.left_running() and time.monotonic() < deadline:
                time.sleep(0.2)
            if not self.left_running():
                break
        for p in self.nodes:
            p.wait(timeout=10)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("ray"))
    try:
        yield c
    finally:
        c.stop()
        left = c.left_running()
        assert not left, f"processes of the test's Ray cluster still running: {left}"


@pytest.fixture(scope="module")
def inprocess_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("inprocess")
    assert main(["eval", *ARGS, "--out", str(out)]) == 0
    return _run_dir(out)


def _run_dir(out: Path) -> Path:
    (run,) = (out / "merge").iterdir()
    return run


def _on_cluster(cluster: Cluster, out: Path, *extra: str) -> int:
    return main(["eval", *ARGS, "--engine", "flower", "--set", f"federation.ray_address={cluster.address}",
                 "--set", f"federation.flower_truth_dir={out / 'truth'}", "--out", str(out), *extra])


def _same_results(a: Path, b: Path) -> None:
    for name in ("metrics.csv", "training.csv"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_two_ray_nodes_train_and_attack_with_the_inprocess_numbers(cluster, inprocess_run, tmp_path):
    assert _on_cluster(cluster, tmp_path) == 0
    run = _run_dir(tmp_path)
    _same_results(run, inprocess_run)
    where = json.loads((run / "run.json").read_text())["cluster"]
    assert where == {"engine": "flower", "ray_address": cluster.address, "client_nodes": 2, "attack_nodes": 2}


class Killer(threading.Thread):
    """SIGKILLs the first of the cluster's workers seen running a client's round."""

    def __init__(self, cluster: Cluster) -> None:
        super().__init__(daemon=True)
        self.cluster = cluster
        self.killed: int | None = None
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            pid = self.cluster.busy_client_worker()
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                self.killed = pid
                return
            time.sleep(0.005)


def _with_a_kill(cluster: Cluster, out: Path, *extra: str) -> tuple[int, int | None]:
    killer = Killer(cluster)
    killer.start()
    try:
        rc = _on_cluster(cluster, out, *extra)
    finally:
        killer.stopped.set()
        killer.join()
    return rc, killer.killed


def test_a_killed_ray_worker_is_restarted_and_its_round_rerun_with_the_same_numbers(cluster, inprocess_run, tmp_path, capfd, caplog):
    rc, killed = _with_a_kill(cluster, tmp_path)
    err = capfd.readouterr().err
    assert killed is not None, "no client round was seen running on the cluster"
    assert rc == 0, err[-3000:]
    assert "sending them the round again" in caplog.text
    _same_results(_run_dir(tmp_path), inprocess_run)


def test_without_retries_a_killed_ray_worker_stops_the_run_with_exit_code_2(cluster, tmp_path, capfd):
    rc, killed = _with_a_kill(cluster, tmp_path, "--set", "federation.flower_retries=0")
    err = capfd.readouterr().err
    assert killed is not None
    assert rc == 2
    assert "Ray worker" in err and "federation.flower_retries" in err and "Traceback" not in err
    (run,) = (tmp_path / "merge").iterdir()
    assert run.name.endswith(".incomplete") and not (run / "report.html").exists()
