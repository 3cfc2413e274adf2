"""Run one scenario over several seeds and print a results table with medians and spread.

    python eval/seeds.py --scenario merge --seeds 0 1 2 [--set KEY=VALUE ...]

Writes reports/eval/<scenario>-seeds.csv (every row of every run) and a markdown table
(median over all attacked batches of all seeds, with the 25th-75th percentile range and
the per-seed medians), and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from drivepriv.cli import QUICK, load_scenario
from drivepriv.config import apply_overrides, parse_override
from drivepriv.pipeline import run_eval

HEADLINE = ["ego_pos_err_m", "ego_speed_err_mps", "neighbour_pos_err_m", "action_acc", "reward_abs_err", "next_state_err_m", "dyn_residual_m", "dyn_residual_truth_m"]


def table(rows: pd.DataFrame) -> str:
    lines = ["| attack | metric | median | p25-p75 | per-seed medians |", "| --- | --- | --- | --- | --- |"]
    for attack, g in rows.groupby("attack", sort=False):
        for m in HEADLINE:
            per_seed = g.groupby("seed")[m].median()
            lines.append(
                f"| {attack} | {m} | {g[m].median():.3g} | {g[m].quantile(0.25):.3g}-{g[m].quantile(0.75):.3g} | "
                + ", ".join(f"s{s}: {v:.3g}" for s, v in per_seed.items())
                + " |"
            )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenario", default="merge")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="reports/eval")
    args = p.parse_args()
    frames, extras = [], []
    for seed in args.seeds:
        cfg = load_scenario(args.scenario)
        overrides = [(k.split("."), v) for k, v in QUICK.items()] if args.quick else []
        overrides += [parse_override(s) for s in args.set] + [(["seed"], seed), (["out"], args.out)]
        cfg = apply_overrides(cfg, overrides)
        result = run_eval(cfg, command=" ".join(sys.argv), progress=False)
        frames.append(result.metrics)
        print(f"seed {seed}: {result.run_dir}", file=sys.stderr)
        utility = json.loads((result.run_dir / "privacy_utility.json").read_text()).get("utility", {})
        trips_path = result.run_dir / "trips_summary.csv"
        trips = pd.read_csv(trips_path) if trips_path.is_file() else pd.DataFrame({"attack": result.metrics["attack"].unique()})
        for _, t in trips.iterrows():
            extras.append({"seed": seed, "attack": t["attack"], "mean_return": utility.get("mean_return"), "collision_rate": utility.get("collision_rate"),
                           **{k: t.get(k) for k in ("trips", "longest", "link_precision", "link_recall", "ade_median_m", "fde_median_m", "reid_rate", "chance")}})
    rows = pd.concat(frames, ignore_index=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows.to_csv(out / f"{args.scenario}-seeds.csv", index=False)
    md = table(rows)
    if extras:
        ex = pd.DataFrame(extras)
        ex.to_csv(out / f"{args.scenario}-seeds-utility-trips.csv", index=False)
        cols = list(ex.columns)
        lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
        lines += ["| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in r) + " |" for r in ex.itertuples(index=False)]
        md += "\n\nUtility of the trained policy and trips, per seed:\n\n" + "\n".join(lines)
    (out / f"{args.scenario}-seeds.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
