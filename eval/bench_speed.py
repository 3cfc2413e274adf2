"""Speed of the main job: `drivepriv eval --scenario merge` with its work fanned out over the
machine's cores (``--workers 0``, the default) against everything in one process
(``--workers 1``), in calibration units.

    python eval/bench_speed.py [--scenario merge] [--workers 1 0] [--repeats 1] [--out reports/bench_speed]

Each run is a fresh `drivepriv eval` subprocess, the settings alternating within each repeat.
Per run: the wall time of the whole command (Python start-up and imports included), the
seconds of each stage from the run's run.json (training, the attacker's priors, the attacks,
scoring, the report) and the sha256 of metrics.csv and training.csv, which must be the same for
every run (the fan-out changes when results arrive, never what they are).

Calibration units: the wall time over the time of a fixed pure-Python loop of 20M multiply-adds
(``s += i * i``, best of 3), timed in this session before the runs and again after them (the
mean of the two is the unit), so machines that differ by 3x give comparable figures.

Writes <out>/runs.csv, <out>/summary.md (the table printed) and <out>/machine.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd


def calibration_loop() -> float:
    """Seconds of 20M pure-Python multiply-adds, best of 3."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        s = 0
        for i in range(20_000_000):
            s += i * i
        best = min(best, time.perf_counter() - t0)
    return best


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def one_run(scenario: str, workers: int, out: Path, extra: list[str]) -> dict:
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "drivepriv", "eval", "--scenario", scenario, "--workers", str(workers), "--out", str(out), "--no-progress", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    run_dir = max((p for p in (out / scenario).iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    info = json.loads((run_dir / "run.json").read_text())
    return {
        "workers": workers,
        "wall_s": wall,
        **{f"{k}_s": v for k, v in info.get("stage_seconds", {}).items()},
        "metrics_sha": _sha(run_dir / "metrics.csv"),
        "training_sha": _sha(run_dir / "training.csv"),
        "run_dir": str(run_dir),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", default="merge")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 0], help="settings of --workers to compare (0: one per core)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", default="reports/bench_speed")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to drivepriv eval")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extra = [a for kv in args.set for a in ("--set", kv)]

    unit_before = calibration_loop()
    rows = []
    for rep in range(args.repeats):
        for w in args.workers:
            row = {"repeat": rep, **one_run(args.scenario, w, out / "runs", extra)}
            rows.append(row)
            print(f"repeat {rep}, --workers {w}: {row['wall_s']:.0f} s", flush=True)
    unit_after = calibration_loop()
    unit = (unit_before + unit_after) / 2
    runs = pd.DataFrame(rows)
    runs["calibration_units"] = runs["wall_s"] / unit
    runs.to_csv(out / "runs.csv", index=False, float_format="%.4g")

    stages = [c for c in runs.columns if c.endswith("_s") and c != "wall_s"]
    med = runs.groupby("workers", sort=False)[["wall_s", "calibration_units", *stages]].median()
    serial = med.loc[1, "wall_s"] if 1 in med.index else float("nan")
    lines = [
        f"`drivepriv eval --scenario {args.scenario}`, {args.repeats} repeat(s), {os.cpu_count()} cores; "
        f"calibration loop {unit_before:.2f} s before, {unit_after:.2f} s after",
        "",
        "| --workers | wall (s) | calibration units | speed-up over --workers 1 | " + " | ".join(s[:-2] + " (s)" for s in stages) + " |",
        "| --- | --- | --- | --- | " + " | ".join("---" for _ in stages) + " |",
    ]
    for w, r in med.iterrows():
        lines.append(f"| {w} | {r['wall_s']:.0f} | {r['calibration_units']:.0f} | {serial / r['wall_s']:.2f} | " + " | ".join(f"{r[s]:.1f}" for s in stages) + " |")
    same = runs["metrics_sha"].nunique() == 1 and runs["training_sha"].nunique() == 1
    lines += ["", f"metrics.csv and training.csv identical across all {len(runs)} runs: {'yes' if same else 'NO'}"]
    text = "\n".join(lines)
    print(text)
    (out / "summary.md").write_text(text + "\n")
    (out / "machine.json").write_text(json.dumps({
        "cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(), "loadavg": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "calibration_s": [unit_before, unit_after], "command": " ".join(sys.argv),
    }, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
