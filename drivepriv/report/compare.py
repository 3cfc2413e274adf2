"""One page comparing runs (``drivepriv report RUN_A RUN_B ...``) and the privacy-utility
sweep (``drivepriv eval --sweep NAME``), from the runs' saved results.

Per run and attack: the headline leakage (ego position within 1 m and its median error for
highway-env; the state error for flat observations), the privacy spent (DP-SGD's epsilon),
the trained policy's utility (mean return, collision rate) and, where there are trips, their
ADE/FDE and the re-identification rate.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from drivepriv.errors import ConfigError
from drivepriv.results import load_run_config, read_csv, read_json

log = logging.getLogger(__name__)

#: The columns of a comparison table (sweep.csv / compare.csv), in order.
COMPARE_COLUMNS = [
    "run", "scenario", "seed", "defenses", "swept", "strength", "epsilon", "attack", "headline", "unit",
    "error_median", "error_p25", "error_p75", "within_share", "tolerance", "transitions",
    "mean_return", "std_return", "collision_rate", "utility_episodes", "trips", "ade_m", "fde_m", "reid_rate", "reid_chance",
]


def swept(cfg) -> tuple[str | None, float]:
    """The run's last defense that has a strength, and that strength (None, NaN: no such defense)."""
    from drivepriv.federation.defenses import DEFENSES

    for spec in reversed(cfg.federation.defenses):
        cls = DEFENSES.get(spec["name"])
        if cls.strength:
            default = next(f.default for f in dataclasses.fields(cls) if f.name == cls.strength)
            return cls.name, float(spec.get(cls.strength, default))
    return None, float("nan")


def run_rows(run_dir: Path) -> list[dict]:
    """One comparison row per attack of a finished run (read from its saved files)."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    swept_name, strength = swept(cfg)
    leakage_path = run_dir / "leakage.csv"
    if not leakage_path.is_file():
        raise ConfigError(f"{run_dir} has no leakage.csv: rebuild its report first (drivepriv report {run_dir})")
    leakage = read_csv(leakage_path)
    pu = read_json(run_dir / "privacy_utility.json")
    privacy, utility = pu.get("privacy", {}), pu.get("utility", {})
    trips = read_csv(run_dir / "trips_summary.csv") if (run_dir / "trips_summary.csv").is_file() else None
    head = "ego position" if (leakage["feature"] == "ego position").any() else None
    rows = []
    for attack in dict.fromkeys(leakage["attack"]):
        sub = leakage[leakage["attack"] == attack]
        if head is None:  # flat observations: the mean over feature groups (actions and reward excluded)
            groups = sub[~sub["feature"].isin(["action", "action (manoeuvre)", "reward"])]
            r = {"feature": "state (mean over feature groups)", "unit": "", "median": groups["median"].mean(), "p25": groups["p25"].mean(),
                 "p75": groups["p75"].mean(), "within": groups["within"].mean(), "tolerance": float("nan"), "n": int(groups["n"].max())}
        else:
            r = sub[sub["feature"] == head].iloc[0].to_dict()
        t = trips[trips["attack"] == attack].iloc[0].to_dict() if trips is not None and (trips["attack"] == attack).any() else {}
        rows.append({
            "run": run_dir.name,
            "scenario": cfg.name,
            "seed": cfg.seed,
            "defenses": privacy.get("defenses", "none"),
            "swept": swept_name or "",
            "strength": strength,
            "epsilon": privacy.get("epsilon", float("nan")),
            "attack": attack,
            "headline": r["feature"],
            "unit": r["unit"],
            "error_median": r["median"],
            "error_p25": r["p25"],
            "error_p75": r["p75"],
            "within_share": r["within"],
            "tolerance": r["tolerance"],
            "transitions": r["n"],
            "mean_return": utility.get("mean_return", float("nan")),
            "std_return": utility.get("std_return", float("nan")),
            "collision_rate": utility.get("collision_rate", float("nan")),
            "utility_episodes": utility.get("episodes", float("nan")),
            "trips": t.get("trips", float("nan")),
            "ade_m": t.get("ade_median_m", float("nan")),
            "fde_m": t.get("fde_median_m", float("nan")),
            "reid_rate": t.get("reid_rate", float("nan")),
            "reid_chance": t.get("chance", float("nan")),
        })
    return rows


def aggregate(table: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration (scenario, defenses) x attack over its seeds.

    ``error_median`` is the median over seeds of each run's median error; with several seeds
    ``error_lo``/``error_hi`` are the lowest and highest run median (the spread across seeds),
    with one seed the run's 25th/75th percentile over transitions. Utility: the mean over seeds
    of the mean return, ``return_spread`` the standard deviation across seeds (one seed: across
    its episodes), the mean collision rate."""
    keys = ["scenario", "defenses", "swept", "strength", "attack"]
    rows = []
    for key, g in table.groupby(keys, sort=False, dropna=False):
        many = len(g) > 1
        rows.append({
            **dict(zip(keys, key)),
            "seeds": " ".join(str(s) for s in sorted(g["seed"])),
            "runs": len(g),
            "epsilon": g["epsilon"].astype(float).max(),
            "headline": g["headline"].iloc[0],
            "unit": g["unit"].iloc[0],
            "tolerance": g["tolerance"].iloc[0],
            "error_median": g["error_median"].median(),
            "error_lo": g["error_median"].min() if many else g["error_p25"].iloc[0],
            "error_hi": g["error_median"].max() if many else g["error_p75"].iloc[0],
            "within_share": g["within_share"].mean(),
            "mean_return": g["mean_return"].mean(),
            "return_spread": g["mean_return"].std(ddof=0) if many else g["std_return"].iloc[0],
            "collision_rate": g["collision_rate"].mean(),
            "trips": g["trips"].mean(),
            "ade_m": g["ade_m"].median(),
            "fde_m": g["fde_m"].median(),
            "reid_rate": g["reid_rate"].mean(),
            "reid_chance": g["reid_chance"].mean(),
        })
    return pd.DataFrame(rows)


def plot_tradeoff(agg: pd.DataFrame, path: Path, x_label: str, title: str) -> Path:
    """Attack error (median and spread per attack) and utility (mean return, collision rate)
    against the defense strength (a sweep; the baseline without the defense dashed) or the
    configuration (a comparison). ``agg`` is :func:`aggregate`'s table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numeric = agg["strength"].notna().any()
    baseline = agg[agg["strength"].isna()] if numeric else agg.iloc[0:0]
    table = agg[agg["strength"].notna()] if numeric else agg
    labels = list(dict.fromkeys(table["defenses"]))
    xs_of = (lambda d: d["strength"].to_numpy(float)) if numeric else (lambda d: np.array([labels.index(r) for r in d["defenses"]], float))
    several = (agg["runs"] > 1).any()
    spread = "range over seeds" if several else "IQR over transitions"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    unit = str(table["unit"].iloc[0]) if isinstance(table["unit"].iloc[0], str) else ""
    for attack, d in table.groupby("attack", sort=False):
        x = xs_of(d)
        line = ax1.errorbar(x, d["error_median"], yerr=[d["error_median"] - d["error_lo"], d["error_hi"] - d["error_median"]], marker="o", capsize=3, label=f"{attack}")
        base = baseline[baseline["attack"] == attack]
        if not base.empty:
            ax1.axhline(float(base["error_median"].iloc[0]), color=line[0].get_color(), linestyle=":", linewidth=1)
    ax1.set_ylabel(f"attack error: {table['headline'].iloc[0]} ({unit})" if unit else f"attack error: {table['headline'].iloc[0]}")
    ax1.set_yscale("log")
    ax1.set_title(f"privacy: attack error (median, {spread}; higher = more private)", fontsize=9)
    ax1.legend(fontsize=8)
    util = table.drop_duplicates(["defenses"])
    x = xs_of(util)
    ax2.errorbar(x, util["mean_return"], yerr=util["return_spread"], marker="s", color="tab:green", capsize=3, label="mean episode return")
    if not baseline.empty:
        ax2.axhline(float(baseline["mean_return"].iloc[0]), color="tab:green", linestyle=":", linewidth=1, label="without the defense")
    ax2.set_ylabel("mean episode return (± std " + ("across seeds)" if several else "over episodes)"))
    ax2.set_title("utility of the trained policy" + (f" (mean over {int(agg['runs'].max())} seeds)" if several else ""), fontsize=9)
    if util["collision_rate"].notna().any():
        ax3 = ax2.twinx()
        ax3.plot(x, 100 * util["collision_rate"], marker="^", color="tab:red", linestyle="--", label="collision rate")
        if not baseline.empty:
            ax3.axhline(100 * float(baseline["collision_rate"].iloc[0]), color="tab:red", linestyle=":", linewidth=1)
        ax3.set_ylabel("collision rate (% of episodes)", color="tab:red")
        ax3.set_ylim(-5, 105)
    for ax in (ax1, ax2):
        ax.set_xlabel(x_label)
        ax.grid(alpha=0.3)
        if numeric:
            pos = table["strength"].to_numpy(float)
            if (pos > 0).all() and pos.max() / pos.min() > 20:
                ax.set_xscale("log")
            elif (pos >= 0).all() and (pos > 0).any() and pos.max() > 20 * pos[pos > 0].min():
                lin = float(pos[pos > 0].min())
                ax.set_xscale("symlog", linthresh=lin)  # 0 (e.g. clipping without noise) stays on the axis
                ax.set_xlim(-0.3 * lin, pos.max() * 1.5)
        else:
            ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=7)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(v, pct: bool = False) -> str:
    """The report's number format (:func:`drivepriv.report.html.format_number`); shares as percentages."""
    from drivepriv.report.html import format_number

    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return f"{100 * f:.0f}%" if pct and math.isfinite(f) else format_number(f)


def write_comparison(run_dirs: list[Path], out_dir: Path, title: str, table_name: str = "compare.csv",
                     notes: list[str] | None = None, command: str = "") -> Path:
    """Write ``out_dir/report.html`` (the table over seeds, the plot, every run linked), the
    per-run table (``table_name``) and the table over seeds (``<table>_summary.csv``).

    Runs of one sweep (one defense at several strengths, and the baseline without it) are
    drawn against the strength; other runs against their configuration."""
    import datetime as _dt

    import jinja2

    from drivepriv import __version__
    from drivepriv.report.html import TEMPLATE_DIR

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [row for d in run_dirs for row in run_rows(d)]
    table = pd.DataFrame(rows, columns=COMPARE_COLUMNS)
    sweep_names = set(table["swept"]) - {""}
    is_sweep = len(sweep_names) == 1 and table.groupby("defenses")["swept"].first().isin([*sweep_names, ""]).all()
    if not is_sweep:
        table["strength"] = float("nan")
    table.to_csv(out_dir / table_name, index=False, float_format="%.6g")
    agg = aggregate(table)
    if is_sweep:
        agg = agg.sort_values("strength", na_position="first", kind="stable")
    agg.to_csv(out_dir / table_name.replace(".csv", "_summary.csv"), index=False, float_format="%.6g")
    x_label = f"{next(iter(sweep_names))} strength" if is_sweep else "configuration"
    if is_sweep:
        from drivepriv.federation.defenses import DEFENSES

        name = next(iter(sweep_names))
        x_label = f"{name} {DEFENSES.get(name).strength}"
    plot = plot_tradeoff(agg, out_dir / "tradeoff.png", x_label, title) if agg["defenses"].nunique() > 1 else None
    links = {Path(d).name: Path(os.path.relpath(Path(d) / "report.html", out_dir)).as_posix() for d in run_dirs}
    several = bool((agg["runs"] > 1).any())

    def view(r: dict, per_run: bool) -> dict:
        lo, hi = (r["error_p25"], r["error_p75"]) if per_run else (r["error_lo"], r["error_hi"])
        spread = r["std_return"] if per_run else r["return_spread"]
        strength = r["strength"]
        return {
            "run": r.get("run", ""), "link": links.get(r.get("run", ""), ""), "seeds": str(r.get("seed", r.get("seeds", ""))),
            "strength": "" if not is_sweep else ("without" if math.isnan(float(strength)) else _fmt(strength)),
            "defenses": str(r["defenses"]), "epsilon": _fmt(r["epsilon"]), "attack": r["attack"],
            "error": f"{_fmt(r['error_median'])} [{_fmt(lo)}, {_fmt(hi)}]", "within": _fmt(r["within_share"], pct=True),
            "ret": f"{_fmt(r['mean_return'])} ± {_fmt(spread)}", "collision": _fmt(r["collision_rate"], pct=True),
            "ade": _fmt(r["ade_m"]), "fde": _fmt(r["fde_m"]), "reid": _fmt(r["reid_rate"], pct=True), "chance": _fmt(r["reid_chance"], pct=True),
        }

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)), autoescape=True, undefined=jinja2.StrictUndefined)
    head = rows[0] if rows else {"headline": "", "unit": "", "tolerance": float("nan")}
    page = env.get_template("compare.html").render(
        title=title, summary=[view(r, False) for r in agg.to_dict("records")], rows=[view(r, True) for r in rows],
        several=several, plot=plot.name if plot else None, x_label=x_label, sweep=is_sweep,
        headline=head["headline"], unit=head["unit"], tolerance=_fmt(head["tolerance"]), table_name=table_name,
        summary_name=table_name.replace(".csv", "_summary.csv"), notes=notes or [], command=command, version=__version__,
        generated=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )
    path = out_dir / "report.html"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    (out_dir / "runs.json").write_text(json.dumps([str(d) for d in run_dirs], indent=2))
    return path


__all__ = ["COMPARE_COLUMNS", "aggregate", "plot_tradeoff", "run_rows", "swept", "write_comparison"]
