"""The HTML report: a summary table of the metrics and one page that opens from disk.

``render_report`` fills ``templates/report.html`` (Jinja2, autoescaped: scenario texts come
from configuration files and file names) and writes ``run_dir/report.html``. The page has
no script, no network access and no server: CSS is inline, figures and videos are linked
by paths relative to the run directory.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Sequence

import pandas as pd

log = logging.getLogger(__name__)

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"

#: One-line explanations (with units) of the metrics the pipeline writes.
DEFAULT_METRIC_HELP: dict[str, str] = {
    "ego_pos_err_m": "Distance between reconstructed and real ego position in s (m); lower = less leakage.",
    "ego_speed_err_mps": "Absolute error of the reconstructed ego speed in s (m/s).",
    "neighbour_pos_err_m": "Mean position error over the real neighbour vehicles in s (m).",
    "action_acc": "Fraction of transitions whose action was recovered exactly (0-1); higher = more leakage.",
    "reward_abs_err": "Absolute error of the reconstructed reward (reward units).",
    "next_state_err_m": "Ego position error in the next state s' (m).",
    "dyn_residual_m": "How far the reconstructed s' is from the physics model applied to the reconstructed (s, a) (m).",
    "dyn_residual_truth_m": "The same residual on the real transitions: the model's own error floor (m).",
    "grad_distance": "Final gradient-matching distance reached by the attack (unitless).",
    "time_s": "Wall-clock time of the attack for one batch (s).",
}

#: Columns that identify a row rather than measure it.
ID_COLUMNS = frozenset({"attack", "client", "round", "seed", "batch", "transition", "scenario"})

_UNITS = (("_mps", "m/s"), ("_m", "m"), ("_s", "s"), ("_rad", "rad"), ("_deg", "°"), ("_acc", "fraction"), ("acc", "fraction"))


def unit_of(column: str) -> str:
    """Unit read from a column name's suffix (``ego_pos_err_m`` -> "m"); "" when it has none."""
    for suffix, unit in _UNITS:
        if column.endswith(suffix):
            return unit
    return ""


def format_number(x: Any) -> str:
    """Compact human formatting: 3 significant digits, thousands without exponent, "—" for NaN."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    if math.isnan(v):
        return "—"
    if math.isinf(v):
        return "∞" if v > 0 else "−∞"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if v != 0 and abs(v) < 1e-3:
        return f"{v:.1e}".replace("e-0", "e-")
    return f"{v:.3g}"


def _metric_columns(table: pd.DataFrame, group: str, columns: Sequence[str] | None) -> list[str]:
    if columns is not None:
        missing = [c for c in columns if c not in table.columns]
        if missing:
            raise KeyError(f"summarise: metric column(s) {missing} not in the metrics table; it has {list(table.columns)}")
        return list(columns)
    return [c for c in table.columns if c != group and c not in ID_COLUMNS and pd.api.types.is_numeric_dtype(table[c])]


def summary_stats(table: pd.DataFrame, group: str = "attack", metrics: Sequence[str] | None = None) -> pd.DataFrame:
    """Median, 25th and 75th percentile and count of each metric per ``group`` (NaN-safe).

    Returns one row per group (in order of first appearance) and columns
    ``(metric, stat)`` with stat in ``median, p25, p75, count`` (count: non-NaN values),
    plus ``("n", "rows")``: the number of rows of the group.
    """
    if group not in table.columns:
        raise KeyError(f"summarise: group column '{group}' not in the metrics table; it has {list(table.columns)}")
    cols = _metric_columns(table, group, metrics)
    grouped = table.groupby(group, sort=False)
    out: dict[tuple[str, str], pd.Series] = {("n", "rows"): grouped.size()}
    for c in cols:
        g = pd.to_numeric(table[c], errors="coerce").groupby(table[group], sort=False)
        out[(c, "median")] = g.median()
        out[(c, "p25")] = g.quantile(0.25)
        out[(c, "p75")] = g.quantile(0.75)
        out[(c, "count")] = g.count()
    table = pd.DataFrame(out)
    table.index.name = group
    return table


def summarise(table: pd.DataFrame, group: str = "attack", metrics: Sequence[str] | None = None) -> pd.DataFrame:
    """Formatted summary for the report: one row per ``group``, cells "median [p25, p75]".

    ``table`` is the pipeline's metrics table (one row per attack x client x round x seed).
    ``metrics`` (the columns to summarise) defaults to every numeric column that is not an identifier. The first
    column ``n`` is the number of rows per group; a cell computed from fewer non-NaN values
    says so ("(n=3)"); a metric with no value at all is "—".
    """
    stats = summary_stats(table, group, metrics)
    cols = [c for c in dict.fromkeys(c for c, _ in stats.columns) if c != "n"]
    out = pd.DataFrame(index=stats.index)
    out["n"] = stats[("n", "rows")].astype(int).astype(str)
    for c in cols:
        cells = []
        for key in stats.index:
            med, lo, hi, cnt = (stats.at[key, (c, s)] for s in ("median", "p25", "p75", "count"))
            n = int(stats.at[key, ("n", "rows")])
            if cnt == 0:
                cells.append("—")
                continue
            cell = f"{format_number(med)} [{format_number(lo)}, {format_number(hi)}]"
            cells.append(cell + (f" (n={int(cnt)})" if cnt < n else ""))
        out[c] = cells
    return out


@dataclass
class ReportContext:
    """Everything the report page shows. Paths in ``batches`` are relative to the run directory."""

    title: str
    scenario: str
    description: str
    settings: dict[str, str]
    threat_model: list[str]
    summary: pd.DataFrame
    metric_help: dict[str, str]
    batches: list[dict]
    reproducibility: dict[str, str]
    notes: Sequence[str] = ()
    #: Shown in the header; filled with the current UTC time when empty.
    generated: str = ""
    #: The opening in plain words: {"level", "headline", "sentences"} (see metrics.leakage.verdict).
    verdict: dict | None = None
    #: Per-feature leakage (metrics.leakage.LEAKAGE_COLUMNS), one row per attack x feature.
    leakage: pd.DataFrame | None = None
    #: Trip reconstruction and re-identification, one row per attack, and its column help.
    trips: pd.DataFrame | None = None
    trips_help: dict[str, str] = field(default_factory=dict)
    #: (label, value) rows: defenses, privacy spent, utility of the trained policy.
    privacy_utility: Sequence[tuple[str, str]] = ()
    #: Figure of leakage by attacked round (relative path), where several rounds were attacked.
    rounds_figure: str | None = None


def _rel(run_dir: Path, p: Any, what: str) -> tuple[str | None, bool]:
    """A link relative to ``run_dir`` (posix) and whether the file exists; absolute paths inside run_dir are made relative."""
    if p is None or p == "":
        return None, False
    path = Path(p)
    if path.is_absolute():
        try:
            path = path.relative_to(run_dir.resolve())
        except ValueError:
            try:
                path = path.relative_to(run_dir)
            except ValueError:
                log.warning("report: %s %s lies outside the run directory %s; the link will break if it moves", what, p, run_dir)
                return path.as_uri(), path.exists()
    exists = (run_dir / path).exists()
    if not exists:
        log.warning("report: %s %s does not exist under %s", what, path, run_dir)
    return PurePosixPath(*path.parts).as_posix(), exists


def _looks_like_file(run_dir: Path, value: str) -> bool:
    if not value or len(value) > 300 or "\n" in value or value.startswith(("/", "http:", "https:")):
        return False
    try:
        return (run_dir / value).is_file()
    except (OSError, ValueError):
        return False


def _table(summary: pd.DataFrame, metric_help: dict[str, str]) -> dict[str, Any]:
    """Headers and rows for the template from a (formatted or numeric) summary DataFrame."""
    has_index = not isinstance(summary.index, pd.RangeIndex) or summary.index.name is not None
    index_name = str(summary.index.name or "attack")
    headers = []
    if has_index:
        headers.append({"name": index_name, "parts": [index_name], "unit": "", "help": "", "key": True})
    for c in summary.columns:
        name = " / ".join(map(str, c)) if isinstance(c, tuple) else str(c)
        help_ = metric_help.get(name, "Rows summarised per attack." if name == "n" else "")
        headers.append({"name": name, "parts": name.split("_"), "unit": unit_of(name), "help": help_, "key": False})
    rows = []
    for key, rec in zip(summary.index, summary.itertuples(index=False)):
        cells = [_cell(v if isinstance(v, str) else format_number(v)) for v in rec]
        rows.append(([{"main": str(key), "sub": ""}] if has_index else []) + cells)
    return {"headers": headers, "rows": rows}


def _leakage_table(leakage: pd.DataFrame | None) -> dict[str, Any] | None:
    """Feature rows x attack columns; each cell: the share within tolerance, then the median [IQR]."""
    if leakage is None or leakage.empty:
        return None
    attacks = list(dict.fromkeys(leakage["attack"]))
    rows = []
    for feature in dict.fromkeys(leakage["feature"]):
        sub = leakage[leakage["feature"] == feature]
        first = sub.iloc[0]
        unit = str(first["unit"])
        tol = float(first["tolerance"])
        exact = tol == 0
        crit = "exact" if exact else f"≤ {format_number(tol)} {unit}".rstrip()
        cells = []
        for a in attacks:
            r = sub[sub["attack"] == a]
            if r.empty or int(r.iloc[0]["n"]) == 0:
                cells.append({"main": "—", "sub": "", "high": False})
                continue
            r = r.iloc[0]
            share = float(r["within"])
            err = "" if exact else f"median {format_number(r['median'])} [{format_number(r['p25'])}, {format_number(r['p75'])}] {unit}".rstrip()
            cells.append({"main": f"{100 * share:.0f}%", "sub": err, "high": share >= 0.5})
        rows.append({"feature": str(feature), "criterion": crit, "cells": cells})
    return {"attacks": [str(a) for a in attacks], "rows": rows}


def _cell(text: str) -> dict[str, str]:
    """Split "median [p25, p75] (n=k)" into the median and the rest, shown smaller on a second line."""
    main, sep, rest = text.partition(" [")
    return {"main": main, "sub": (sep.strip() + rest) if sep else ""}


def render_report(run_dir: Path, context: ReportContext) -> Path:
    """Write ``run_dir/report.html`` from the Jinja2 template and return its path."""
    import jinja2

    from drivepriv import __version__

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    batches = []
    for i, b in enumerate(context.batches):
        fig, fig_ok = _rel(run_dir, b.get("figure"), "figure")
        vid, vid_ok = _rel(run_dir, b.get("video"), "video")
        batches.append({
            "label": str(b.get("label", f"batch {i + 1}")),
            "figure": fig, "figure_ok": fig_ok, "video": vid, "video_ok": vid_ok,
            "caption": str(b.get("caption", "") or ""),
            "anchor": f"batch-{i + 1}",
        })
    repro = [
        {"key": str(k), "value": str(v), "link": _looks_like_file(run_dir, str(v))}
        for k, v in context.reproducibility.items()
    ]
    used_help = {k: v for k, v in context.metric_help.items() if k in {str(c) for c in context.summary.columns}}
    trips = None
    if context.trips is not None and not context.trips.empty:
        trips = _table(context.trips.set_index("attack"), context.trips_help)
    page = env.get_template("report.html").render(
        title=context.title,
        scenario=context.scenario,
        description=context.description,
        settings=[(str(k), str(v)) for k, v in context.settings.items()],
        threat_model=[str(t) for t in context.threat_model],
        table=_table(context.summary, context.metric_help),
        metric_help=used_help,
        batches=batches,
        reproducibility=repro,
        notes=[str(n) for n in context.notes],
        verdict=context.verdict,
        leakage=_leakage_table(context.leakage),
        trips=trips,
        trips_help={k: v for k, v in context.trips_help.items() if context.trips is not None and k in context.trips.columns},
        privacy_utility=[(str(k), str(v)) for k, v in context.privacy_utility],
        rounds_figure=_rel(run_dir, context.rounds_figure, "rounds figure")[0] if context.rounds_figure else None,
        generated=context.generated or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        version=__version__,
    )
    out = run_dir / "report.html"
    out.write_text(page, encoding="utf-8")
    log.info("wrote report %s (%d batches)", out, len(batches))
    return out


def iter_links(html: str) -> Iterable[str]:
    """``src``/``href`` values of a page (used by the tests to check that relative links resolve)."""
    import re

    return re.findall(r'(?:src|href)="([^"]+)"', html)


__all__ = [
    "DEFAULT_METRIC_HELP",
    "ReportContext",
    "format_number",
    "iter_links",
    "render_report",
    "summarise",
    "summary_stats",
    "unit_of",
]
