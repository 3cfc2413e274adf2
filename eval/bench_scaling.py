"""Scaling benchmark: wall time and peak memory of training the federation, in-process against Flower.

    python eval/bench_scaling.py --clients 10 50 100 --rounds 3 --repeats 3 [--scenario merge] \\
        [--engines inprocess flower] [--set KEY=VALUE ...] [--out reports/bench_scaling]

What it measures: ``run_federation`` alone (training, no attack, no report) of the scenario's
federation with the ``--quick`` settings (drivepriv.cli.QUICK: small warm-up, environment steps
and batch), for each number of clients, on ``federation.engine=inprocess`` (the clients spread
over one forked worker process per core, drivepriv's ``workers`` default; ``--set workers=1``
keeps them one after another in one process) and ``federation.engine=flower`` (Flower's
simulation engine on Ray, one actor per ``federation.flower_client_cpus`` CPUs). Every measurement is a fresh subprocess
(``bench_scaling.py --one ...``), so no memory, import cache or Ray state carries over; the
engines alternate within each repeat. Per case:

- ``wall_s``: seconds of the ``run_federation`` call in the child (Python start-up and imports
  excluded; they are ``process_s`` in runs.csv), median over repeats with [min-max];
- ``first_round_s``: from the call to the end of round 0 (for Flower: Ray start-up, actor and
  node start, round 0); ``s_per_round``: mean of the later rounds (the end of round 0 to the end of
  the last round, over rounds - 1; needs rounds >= 2); ``teardown_s``: the end of the last round
  to the return (Flower: simulation and Ray shutdown); ``ray_init_s``: the ``ray.init`` call
  alone; ``flower_overhead_s`` (flower rows): flower's first_round_s minus in-process's, an
  estimate of what starting Flower and Ray adds to round 0, plus teardown_s;
- ``peak_rss_tree_mb``: the peak over time of the summed RSS of the child and all its
  descendants (for Flower: Ray's GCS, raylet, its agents and the ClientApp actor workers),
  sampled every ``--interval`` s with psutil by the parent (a process reparented away from the
  tree, once seen, is still counted). RSS counts shared pages (libraries, Ray's shared-memory
  object store) once per process that maps them, so the sum over-counts; ``peak_pss_tree_mb``
  (runs.csv / summary.csv, sampled every ``--pss-every`` samples) splits shared pages between
  the processes that map them and is the fairer total; ``peak_rss_shmem_tree_mb`` (same
  sampling) is the summed shared-memory part of RSS (RssShmem: /dev/shm pages such as Ray's
  object store);
- ``peak_rss_driver_mb``: the child (driver) process's own peak, ``ru_maxrss`` read in the
  child at the end (Flower's ServerApp and its strategy run in a thread of this process);
- ``same_params``: sha256 of the final global parameters, compared over both engines and all
  repeats of the case: ``yes`` when all are identical.

MB here are MiB (2**20 bytes). Writes <out>/runs.csv (one row per run), <out>/summary.csv,
<out>/summary.md (the table printed), <out>/machine.json (CPU count, memory, versions of
torch/flwr/ray/highway-env, git commit, load average, date, command, the peak-memory breakdown by
process kind of every run), and every child's log in <out>/logs/. Rows are appended to
<out>/runs.partial.csv as they come. A process of the tree still alive 1 s after its child has
exited (an orphaned Ray worker) is killed by its pid and counted in runs.csv's leftover_procs.

How long: on 2 shared cores (load average 2-4 from other work), merge, 3 rounds, 3 repeats of
10/50/100 clients took 9 minutes (in-process 4, 16 and 30 s per run; Flower 20, 33 and 61 s, of
which about 4 s are ray.init and 2 s shutdown); ``--clients 4 --rounds 2 --repeats 1`` is a
smoke run of about 30 s.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import psutil

MIB = 2**20
ENV = {"OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0", "SDL_VIDEODRIVER": "offscreen", "SDL_AUDIODRIVER": "dummy"}


# ---------------------------------------------------------------------------- the child: one run
def params_hash(params: dict) -> str:
    """sha256 over the final parameters (name, dtype, shape and bytes, names sorted)."""
    h = hashlib.sha256()
    for name in sorted(params):
        t = params[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def one(args: argparse.Namespace) -> int:
    """Train once on one engine and write the timings, the driver's peak RSS and the parameters' hash."""
    import resource

    t_process = time.perf_counter()
    from drivepriv.cli import build_config, make_parser
    from drivepriv.federation import inprocess
    from drivepriv.federation.inprocess import resolve_attacked
    from drivepriv.federation.run import run_federation

    argv = ["eval", "--scenario", args.scenario, "--quick", "--clients", str(args.clients[0]), "--rounds", str(args.rounds)]
    for s in [f"federation.engine={args.engine}", *args.set]:
        argv += ["--set", s]
    cfg = build_config(make_parser().parse_args(argv))

    # timing hooks (this process only): the end of each round, and ray.init
    round_ends: dict[int, float] = {}
    receive = inprocess.Server.receive

    def timed_receive(self, rnd, *a, **kw):
        out = receive(self, rnd, *a, **kw)
        round_ends[int(rnd)] = time.perf_counter()
        return out

    inprocess.Server.receive = timed_receive
    ray_init: list[float] = []
    if args.engine == "flower":
        import ray

        init = ray.init

        def timed_init(*a, **kw):
            t = time.perf_counter()
            try:
                return init(*a, **kw)
            finally:
                ray_init.append(time.perf_counter() - t)

        ray.init = timed_init

    t0 = time.perf_counter()
    result = run_federation(cfg, resolve_attacked(cfg), progress=False)
    t1 = time.perf_counter()
    ends = [round_ends[r] for r in sorted(round_ends)]
    rounds = len(ends)
    out = {
        "engine": args.engine,
        "clients": cfg.federation.clients,
        "rounds": cfg.federation.rounds,
        "rounds_timed": rounds,
        "wall_s": t1 - t0,
        "first_round_s": ends[0] - t0 if ends else float("nan"),
        "s_per_round": (ends[-1] - ends[0]) / (rounds - 1) if rounds >= 2 else float("nan"),
        "teardown_s": t1 - ends[-1] if ends else float("nan"),
        "ray_init_s": sum(ray_init) if ray_init else float("nan"),
        "import_s": t0 - t_process,
        "peak_rss_driver_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MIB,  # Linux: KiB
        "params_sha256": params_hash(result.final_params),
        "training_rows": len(result.training),
    }
    Path(args.result).write_text(json.dumps(out, indent=1))
    return 0


# ---------------------------------------------------------------------------- the parent: sampling
def kind(p: psutil.Process, driver: int) -> str:
    """What a process of the tree is (for the peak-memory breakdown)."""
    if p.pid == driver:
        return "driver"
    try:
        cmd = " ".join(p.cmdline())
        name = p.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return "gone"
    for key in ("raylet", "gcs_server"):
        if key in name or key in cmd:
            return key
    if cmd.startswith("ray::"):
        return cmd.split()[0]  # ray::ClientAppActor (the Flower workers), ray::IDLE, ray::DashboardAgent...
    for key in ("log_monitor", "dashboard", "runtime_env", "monitor.py"):
        if key in cmd:
            return "ray " + key
    return name or "other"


class TreeSampler(threading.Thread):
    """Samples the summed RSS (and every ``pss_every`` samples the summed PSS) of a process and
    all its descendants; a process once seen is kept until it exits, even if reparented."""

    def __init__(self, pid: int, interval: float, pss_every: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval, self.pss_every = pid, interval, pss_every
        self.stop = threading.Event()
        self.known: dict[int, psutil.Process] = {}
        self.peak_rss = 0
        self.peak_pss = 0
        self.peak_shmem = 0
        self.peak_driver = 0
        self.peak_breakdown: dict[str, float] = {}
        self.peak_procs = 0
        self.samples = 0
        self.max_procs = 0

    def _procs(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.pid)
            for p in [root, *root.children(recursive=True)]:
                self.known.setdefault(p.pid, p)
        except psutil.NoSuchProcess:
            pass
        alive = []
        for pid, p in list(self.known.items()):
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
            else:
                del self.known[pid]
        return alive

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.sample()
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                pass
            self.stop.wait(self.interval)

    def sample(self) -> None:
        procs = self._procs()
        total, by_kind = 0, {}
        for p in procs:
            try:
                rss = p.memory_info().rss
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                continue
            total += rss
            k = kind(p, self.pid)
            by_kind[k] = by_kind.get(k, 0) + rss
            if p.pid == self.pid:
                self.peak_driver = max(self.peak_driver, rss)
        self.max_procs = max(self.max_procs, len(procs))
        if total > self.peak_rss:
            self.peak_rss, self.peak_procs = total, len(procs)
            self.peak_breakdown = {k: round(v / MIB, 1) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])}
        if self.pss_every and self.samples % self.pss_every == 0:
            pss = shmem = 0
            for p in procs:
                try:
                    pss += p.memory_full_info().pss
                    shmem += rss_shmem(p.pid)
                except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied, OSError):
                    continue
            self.peak_pss = max(self.peak_pss, pss)
            self.peak_shmem = max(self.peak_shmem, shmem)
        self.samples += 1


def rss_shmem(pid: int) -> int:
    """The shared-memory part of a process's RSS (RssShmem: tmpfs / shm pages, where Ray's object
    store lives), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssShmem:"):
            return int(line.split()[1]) * 1024
    return 0


def warnings_in(log: str) -> list[str]:
    """The distinct warning lines of a child's log (colour codes removed)."""
    import re

    seen: list[str] = []
    for line in log.splitlines():
        clean = re.sub(r"\x1b\[[0-9;]*m", "", line).strip()
        if ("WARNING" in clean or "Warning" in clean or "warning" in clean) and clean not in seen:
            seen.append(clean)
    return seen


def run_case(args: argparse.Namespace, engine: str, clients: int, rep: int, out: Path) -> dict:
    """One measurement in a fresh subprocess, sampled from here."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    tag = f"{engine}-c{clients}-r{args.rounds}-rep{rep}"
    result = logs / f"{tag}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, os.path.abspath(__file__), "--one", "--engine", engine, "--clients", str(clients), "--rounds", str(args.rounds), "--scenario", args.scenario, "--result", str(result)]
    for s in args.set:
        cmd += ["--set", s]
    env = {**os.environ, **ENV}
    log_path = logs / f"{tag}.log"
    load_before = os.getloadavg()[0]  # the machine is shared: other work shows here
    t = time.perf_counter()
    with open(log_path, "w") as log:
        child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        sampler = TreeSampler(child.pid, args.interval, args.pss_every)
        sampler.start()
        try:
            rc = child.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            rc = None
            child.kill()
            child.wait()
        sampler.stop.set()
        sampler.join()
    process_s = time.perf_counter() - t
    # processes of the tree that outlived the child (e.g. Ray's) are ours: end them, by id, and say so
    time.sleep(1.0)
    leftover = [p for p in sampler.known.values() if p.pid != child.pid and p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    left_names = [kind(p, child.pid) for p in leftover]
    for p in leftover:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    log_text = log_path.read_text(errors="replace")
    row = {"engine": engine, "clients": clients, "rounds": args.rounds, "repeat": rep, "rc": rc, "process_s": process_s, "loadavg_1m_before": load_before}
    if rc == 0 and result.is_file():
        row.update(json.loads(result.read_text()))
    else:
        row["error"] = "timeout" if rc is None else (log_text.strip().splitlines() or ["?"])[-1][:300]
    row.update(
        peak_rss_tree_mb=sampler.peak_rss / MIB,
        peak_pss_tree_mb=sampler.peak_pss / MIB if args.pss_every else float("nan"),
        peak_rss_shmem_tree_mb=sampler.peak_shmem / MIB if args.pss_every else float("nan"),
        peak_rss_driver_sampled_mb=sampler.peak_driver / MIB,
        procs_at_peak=sampler.peak_procs,
        max_procs=sampler.max_procs,
        samples=sampler.samples,
        leftover_procs=len(leftover),
        warnings=len(warnings_in(log_text)),
    )
    row["_breakdown"] = sampler.peak_breakdown
    row["_warnings"] = warnings_in(log_text)
    row["_leftover"] = left_names
    return row


# ---------------------------------------------------------------------------- tables
def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    rows = []
    ok = runs[runs["rc"] == 0] if "rc" in runs else runs
    first_inproc = ok[ok["engine"] == "inprocess"].groupby("clients")["first_round_s"].median()
    for (clients, engine), g in ok.groupby(["clients", "engine"], sort=True):
        case = ok[ok["clients"] == clients]
        hashes = set(case["params_sha256"])
        engines = set(case["engine"])
        if len(engines) < 2:
            same = "n/a (one engine)" if len(hashes) == 1 else f"NO ({len(hashes)} hashes)"
        else:
            same = "yes" if len(hashes) == 1 else f"NO ({len(hashes)} hashes)"
        overhead = float("nan")
        if engine == "flower" and clients in first_inproc.index:
            overhead = g["first_round_s"].median() - first_inproc[clients] + g["teardown_s"].median()
        rows.append(
            {
                "engine": engine,
                "clients": clients,
                "rounds": int(g["rounds"].iloc[0]),
                "repeats": len(g),
                "wall_s": g["wall_s"].median(),
                "wall_s_min": g["wall_s"].min(),
                "wall_s_max": g["wall_s"].max(),
                "s_per_round": g["s_per_round"].median(),
                "first_round_s": g["first_round_s"].median(),
                "teardown_s": g["teardown_s"].median(),
                "ray_init_s": g["ray_init_s"].median(),
                "flower_overhead_s": overhead,
                "peak_rss_tree_mb": g["peak_rss_tree_mb"].median(),
                "peak_pss_tree_mb": g["peak_pss_tree_mb"].median(),
                "peak_rss_shmem_tree_mb": g["peak_rss_shmem_tree_mb"].median(),
                "peak_rss_driver_mb": g["peak_rss_driver_mb"].median(),
                "procs_at_peak": int(g["procs_at_peak"].median()),
                "same_params": same,
                "params_sha256": next(iter(sorted(set(g["params_sha256"]))))[:12],
            }
        )
    order = {"inprocess": 0, "flower": 1}
    df = pd.DataFrame(rows)
    return df.sort_values(["clients", "engine"], key=lambda s: s.map(order) if s.name == "engine" else s, kind="stable").reset_index(drop=True)


def _f(x: float, fmt: str = ".3g") -> str:
    return "-" if x != x else format(x, fmt)


def table(summary: pd.DataFrame, failed: pd.DataFrame | None = None) -> str:
    lines = [
        "| engine | clients | rounds | repeats | wall_s median [min-max] | s_per_round | first_round_s | flower_overhead_s | peak_rss_tree_mb | peak_pss_tree_mb | peak_rss_driver_mb | same_params |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in summary.itertuples(index=False):
        lines.append(
            f"| {r.engine} | {r.clients} | {r.rounds} | {r.repeats} | {r.wall_s:.1f} [{r.wall_s_min:.1f}-{r.wall_s_max:.1f}] | "
            f"{_f(r.s_per_round, '.2f')} | {_f(r.first_round_s, '.2f')} | {_f(r.flower_overhead_s, '.1f')} | {r.peak_rss_tree_mb:.0f} | "
            f"{_f(r.peak_pss_tree_mb, '.0f')} | {r.peak_rss_driver_mb:.0f} | {r.same_params} |"
        )
    notes = [
        "",
        "wall_s: the run_federation call (imports excluded). s_per_round: mean of rounds 2..R. first_round_s: call to end of round 0 "
        "(Flower: incl. Ray start-up). flower_overhead_s: Flower's first_round_s minus in-process's, plus Flower's teardown. "
        "peak_rss_tree_mb: peak of the summed RSS of the child process and all its descendants (Ray's processes included; shared "
        "pages counted once per process). peak_pss_tree_mb: the same with PSS (shared pages split). peak_rss_driver_mb: the "
        "driver process alone (ru_maxrss). MB = MiB. same_params: sha256 of the final parameters identical over both engines and "
        "all repeats.",
    ]
    if failed is not None and len(failed):
        notes.append("")
        notes += [f"FAILED: {r.engine} clients={r.clients} repeat={r.repeat}: {r.error}" for r in failed.itertuples(index=False)]
    return "\n".join(lines + notes)


def machine_info(args: argparse.Namespace) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for pkg in ("torch", "flwr", "ray", "highway-env", "gymnasium", "numpy", "psutil", "drivepriv"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    root = Path(__file__).resolve().parent.parent
    git = {}
    for key, cmd in (("commit", ["git", "rev-parse", "HEAD"]), ("dirty_files", ["git", "status", "--porcelain"])):
        try:
            text = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
            git[key] = text if key == "commit" else len(text.splitlines())
        except (OSError, subprocess.SubprocessError):
            git[key] = None
    return {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([os.path.relpath(sys.argv[0]) if sys.argv else "", *sys.argv[1:]]),
        "cpu_count": os.cpu_count(),
        "cpu_count_physical": psutil.cpu_count(logical=False),
        "cpu_model": _cpu_model(),
        "memory_total_mb": psutil.virtual_memory().total / MIB,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "git": git,
        "env": ENV,
        "loadavg_start": os.getloadavg(),
        "settings": {"scenario": args.scenario, "quick": True, "rounds": args.rounds, "clients": args.clients, "repeats": args.repeats,
                     "engines": args.engines, "set": args.set, "interval_s": args.interval, "pss_every": args.pss_every},
    }


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, nargs="+", default=[10, 50, 100])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--engines", nargs="+", default=["inprocess", "flower"], choices=["inprocess", "flower"])
    p.add_argument("--scenario", default="merge")
    p.add_argument("--set", action="append", default=[], help="KEY=VALUE, after --quick (e.g. federation.flower_client_cpus=2)")
    p.add_argument("--interval", type=float, default=0.2, help="seconds between RSS samples")
    p.add_argument("--pss-every", type=int, default=5, help="sum PSS every N samples (0: never)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds before a run is killed")
    p.add_argument("--out", default="reports/bench_scaling")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # internal: one run, in the child
    p.add_argument("--engine", default="inprocess", help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        return one(args)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = machine_info(args)
    partial = out / "runs.partial.csv"
    partial.unlink(missing_ok=True)
    t_all = time.perf_counter()
    rows, extras = [], []
    for rep in range(args.repeats):
        for clients in args.clients:
            engines = args.engines if rep % 2 == 0 else list(reversed(args.engines))  # alternate who goes first
            for engine in engines:
                row = run_case(args, engine, clients, rep, out)
                extras.append({k: row.pop(k) for k in ("_breakdown", "_warnings", "_leftover")} | {"engine": engine, "clients": clients, "repeat": rep})
                rows.append(row)
                pd.DataFrame([row]).to_csv(partial, mode="a", header=not partial.exists(), index=False)
                status = f"{row['wall_s']:.1f} s" if row["rc"] == 0 else f"FAILED ({row.get('error')})"
                print(f"repeat {rep} {engine} clients={clients}: {status}, tree RSS peak {row['peak_rss_tree_mb']:.0f} MB, "
                      f"driver {row.get('peak_rss_driver_mb', float('nan')):.0f} MB, {row['procs_at_peak']} procs", file=sys.stderr, flush=True)
    runs = pd.DataFrame(rows)
    runs.to_csv(out / "runs.csv", index=False)
    partial.unlink(missing_ok=True)
    ok = runs[runs["rc"] == 0]
    failed = runs[runs["rc"] != 0]
    summary = summarise(ok) if len(ok) else pd.DataFrame()
    summary.to_csv(out / "summary.csv", index=False)
    md = table(summary, failed) if len(summary) else "no run finished"
    (out / "summary.md").write_text(md + "\n")
    info.update(total_s=time.perf_counter() - t_all, loadavg_end=os.getloadavg(), runs=extras)
    (out / "machine.json").write_text(json.dumps(info, indent=1, default=str))
    print(md)
    print(f"\ntotal {info['total_s']:.0f} s; wrote {out}/summary.md, summary.csv, runs.csv, machine.json, logs/", file=sys.stderr)
    return 0 if len(failed) == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
