"""The privacy-utility sweep: ``drivepriv eval --scenario merge --sweep dpsgd``.

For each strength of one defense (its registry grid, or ``--grid``), a full evaluation run:
the federation trains with the defense, the attacks invert what the server saw, the final
policy's utility is measured on held-out episodes. The sweep folder holds every run (each with
its own report) and one page with the table (sweep.csv) and the trade-off plot.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from datetime import datetime, timezone
from pathlib import Path

from drivepriv.config import RunConfig, apply_overrides
from drivepriv.errors import ConfigError
from drivepriv.federation.defenses import DEFENSES

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SweepResult:
    sweep_dir: Path
    runs: list[Path]
    table_path: Path


def sweep_grid(defense: str, grid: list[float] | None) -> tuple[str, list[float]]:
    """The strength parameter and the values a sweep of ``defense`` runs (weakest first)."""
    cls = DEFENSES.get(defense)
    if not cls.strength:
        raise ConfigError(f"--sweep {defense}: this defense has no strength to vary; run it once with --defense {defense}")
    values = list(grid) if grid else list(cls.grid)
    if not values:
        raise ConfigError(f"--grid: expected at least one value for {defense}'s {cls.strength}")
    return cls.strength, values


def run_sweep(cfg: RunConfig, defense: str, grid: list[float] | None = None, command: str = "", progress: bool = True,
              seeds: list[int] | None = None) -> SweepResult:
    """Run one evaluation per strength and seed (default: the configuration's seed), plus the
    baseline without the defense; write the sweep's tables, plot and page."""
    from drivepriv.pipeline import check_supported, resolve_config, run_eval
    from drivepriv.report.compare import write_comparison

    strength, values = sweep_grid(defense, grid)
    points: list[tuple[float | None, RunConfig]] = [(None, cfg)]  # the baseline: without the swept defense
    for v in values:  # every point's configuration is checked before any work starts
        spec = {"name": defense, strength: v}
        point = apply_overrides(cfg, [(["federation", "defenses"], [*cfg.federation.defenses, spec])], source=f"--sweep {defense} ({strength}={v:g})")
        try:
            resolve_config(point)
        except ConfigError as e:
            raise ConfigError(f"--sweep {defense} ({strength}={v:g}): {e}") from None
        points.append((v, point))
    check_supported(resolve_config(points[0][1]))
    seeds = list(dict.fromkeys(seeds or [cfg.seed]))
    if any(s < 0 for s in seeds):
        raise ConfigError(f"--seeds: expected integers >= 0, got {seeds}")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    sweep_id = f"{cfg.name}-sweep-{defense}-seed{'-'.join(map(str, seeds))}-{stamp}"
    final = Path(cfg.out) / cfg.name / sweep_id
    work = final.with_name(sweep_id + ".incomplete")
    work.mkdir(parents=True, exist_ok=False)
    runs = []
    total = len(points) * len(seeds)
    for i, (v, point) in enumerate(points):
        for seed in seeds:
            what = (f"without {defense}" if v is None else f"{strength} = {v:g}") + f", seed {seed}"
            log.info("sweep %s: %s (%d/%d)", defense, what, len(runs) + 1, total)
            if progress:
                print(f"sweep {defense}: {what} ({len(runs) + 1}/{total})", flush=True)
            run_cfg = dataclasses.replace(point, out=str(work / "runs"), seed=seed)
            run_id = (f"{i:02d}-baseline" if v is None else f"{i:02d}-{strength}={v:g}") + f"-seed{seed}"
            res = run_eval(run_cfg, command=command, progress=progress, run_id=run_id)
            runs.append(res.run_dir)
    notes = [
        f"Each point is a full run with the defense {defense} at {strength} = value, on top of {cfg.federation.defenses or 'no other defense'}; "
        f"seeds {', '.join(map(str, seeds))} at every point (per seed the same clients, traffic and attack seeds).",
        "ε is DP-SGD's (ε, δ) guarantee per client from Opacus's RDP accountant; ∞ where no noise is added; — for defenses without a guarantee.",
    ]
    notes.insert(0, f"The first row is the baseline: the same run without {defense} (drawn as dashed lines in the plot).")
    write_comparison(runs, work, title=f"drivepriv · {cfg.name} · sweep over {defense} {strength}", table_name="sweep.csv", notes=notes, command=command)
    # the run folders moved with the sweep: their links are relative, so they still resolve
    shutil.move(str(work), str(final))
    runs = [final / "runs" / cfg.name / r.name for r in runs]
    return SweepResult(final, runs, final / "sweep_summary.csv")


__all__ = ["SweepResult", "run_sweep", "sweep_grid"]
