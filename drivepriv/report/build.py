"""Build a run's report from its saved results: ``drivepriv eval`` calls it at the end of a run,
``drivepriv report RUN_DIR`` calls it again later, without training or attacking anything.

Reads config.yaml, metrics.csv, timings.csv, reconstructions.npz, privacy_utility.json and
run.json, and renders the scores the metrics stage computed (:mod:`drivepriv.metrics.run_scores`:
leakage, leakage by round, trips, the verdict); writes figures/, videos/ and report.html.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from drivepriv.config import RunConfig
from drivepriv.envs import backend_of, make_codec
from drivepriv.federation.strategies import strategy
from drivepriv.metrics.run_scores import RunScores
from drivepriv.parallel import fan_out
from drivepriv.results import BatchRecord, load_batches, load_run_config, read_csv, read_json

log = logging.getLogger(__name__)

THREAT_MODEL = [
    "An honest-but-curious server receives each client's update (FedSGD: the gradient of its local loss, DQN's TD loss, PPO's or TD3's, on one minibatch).",
    "It knows what any FL server knows: the global and target networks it sent, the loss and hyper-parameters it prescribed, and the public simulator (road, observation layout, reward function).",
    "It never sees the clients' data. Attacks receive only that view; the ground truth is used by the metrics alone.",
]

ID_COLUMNS = ("attack", "client", "round", "seed", "batch_size", "local_steps")

#: The trips summary's columns the report shows (trips_summary.csv has them all).
TRIP_COLUMNS = ["attack", "merged_transitions", "trips", "longest", "cross_round_trips", "link_precision", "link_recall",
                "ade_median_m", "fde_median_m", "reid_rate", "chance", "n_attributed", "reid_update_rate"]


@dataclass
class BuiltReport:
    path: Path
    summary: pd.DataFrame
    verdict: dict
    leakage: pd.DataFrame
    trips: pd.DataFrame | None


def metric_help(codec) -> dict[str, str]:
    from drivepriv.metrics.scores import METRIC_HELP
    from drivepriv.metrics.vector import vector_metric_help

    extra = {"action_abs_err": "mean absolute error of the continuous action (actions in [-1, 1])"}
    return (vector_metric_help(codec) if codec.flat else METRIC_HELP | extra) | {"time_s": "wall time of the attack (s)"}


def _batch_media(run_dir: Path, rec: BatchRecord, figures, with_video: bool) -> dict:
    """Figure and video of one attacked batch (files named after the batch), drawn by the backend's figures."""
    fig, vid = figures.draw(run_dir, rec, with_video)
    return {"label": rec.label, "figure": str(fig.relative_to(run_dir)) if fig else None, "video": str(vid.relative_to(run_dir)) if vid else None}


def _settings(cfg: RunConfig, privacy: dict) -> dict[str, str]:
    fed = cfg.federation
    return {
        "environment": cfg.env.id,
        "federation": f"{fed.clients} clients, {fed.rounds} rounds, {strategy(fed.strategy).describe(fed.local_steps)}, batch {fed.batch_size}",
        "local algorithm": f"{cfg.agent.algorithm} (gamma {fed.gamma}, lr {fed.lr})",
        "simulator": f"{cfg.env.backend} ({cfg.env.id})",
        "defenses": str(privacy.get("defenses", "none")),
        "attacks": ", ".join(cfg.attack.attacks),
        "attacked": f"rounds {cfg.attack.round_indices(fed.rounds)}, clients {cfg.attack.clients or 'all'}",
        "attack budget": f"{cfg.attack.iterations} iterations x {cfg.attack.restarts} restarts",
        "seed": str(cfg.seed),
    }


def privacy_utility_rows(privacy: dict, utility: dict) -> list[tuple[str, str]]:
    """The privacy spent and the trained policy's utility, as (label, value) pairs."""
    rows = [("defenses", str(privacy.get("defenses", "none")))]
    if "epsilon" in privacy:
        eps = float(privacy["epsilon"])
        rows.append(("DP-SGD guarantee", f"(ε = {'∞' if math.isinf(eps) else f'{eps:.3g}'}, δ = {float(privacy['delta']):g}) per client, "
                                          f"noise multiplier {float(privacy['noise_multiplier']):g}, clip {float(privacy['clip']):g} ({privacy.get('accountant', '')})"))
    if utility:
        rows.append(("utility: mean episode return", f"{utility['mean_return']:.3g} ± {utility['std_return']:.2g} (greedy policy, {int(utility['episodes'])} held-out episodes)"))
        cr = utility.get("collision_rate", float("nan"))
        rows.append(("utility: collision rate", "—" if cr is None or not math.isfinite(cr) else f"{100 * cr:.0f}% of episodes"))
        rows.append(("utility: mean episode length", f"{utility['mean_length']:.3g} steps"))
    return rows


def build_report(run_dir: Path, scores: RunScores, progress: bool = False) -> BuiltReport:
    """(Re)build ``run_dir/report.html`` and its figures, videos and tables from saved results and
    the run's scores (the metrics stage's :class:`~drivepriv.metrics.run_scores.RunScores`):
    rendering only, nothing here is scored."""
    from drivepriv.report import ReportContext, render_report, summarise
    from drivepriv.report.plots import plot_by_round

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    metrics = read_csv(run_dir / "metrics.csv")
    timings = read_csv(run_dir / "timings.csv")
    records = load_batches(run_dir)
    info = read_json(run_dir / "run.json")
    pu = read_json(run_dir / "privacy_utility.json")
    privacy, utility = pu.get("privacy", {}), pu.get("utility", {})
    versions = read_json(run_dir / "versions.json")
    codec = make_codec(cfg.env)
    figures = backend_of(cfg.env).load("figures")(cfg, codec)  # reads the public road now, before the fan-out

    leakage, trips_summary, by_round, opening = scores.leakage, scores.trips_summary, scores.by_round, scores.verdict
    rounds_figure = None
    if by_round["round"].nunique() >= 2:
        rounds_figure = plot_by_round(by_round, run_dir / "figures" / "by_round.png").relative_to(run_dir).as_posix()

    bar = tqdm(total=len(records), desc="report", unit="batch", disable=not progress, leave=False)
    batches = fan_out(lambda k: _batch_media(run_dir, records[k], figures, with_video=k < cfg.report.videos), range(len(records)), cfg.workers, done=lambda: bar.update(1))
    bar.close()
    columns = [c for c in metrics.columns if c not in ID_COLUMNS]
    with_time = metrics.merge(timings, on=["attack", "client", "round", "seed"], how="left")
    summary = summarise(with_time, group="attack", metrics=[*columns, "time_s"])
    key_versions = {k: versions[k] for k in ("drivepriv", "python", "torch", "gymnasium", "highway-env", "metadrive-simulator", "opacus") if k in versions}
    context = ReportContext(
        title=f"drivepriv · {cfg.name}",
        scenario=cfg.name,
        description=cfg.description,
        settings=_settings(cfg, privacy),
        threat_model=THREAT_MODEL,
        summary=summary,
        metric_help=metric_help(codec),
        batches=batches,
        reproducibility={
            "command": info.get("command") or f"drivepriv eval --scenario {cfg.name} --seed {cfg.seed}",
            "seed": str(cfg.seed),
            "config": "config.yaml",
            "versions": "versions.json",
            "metrics": "metrics.csv",
            "saved results": "reconstructions.npz",
            "rebuild this page": f"drivepriv report {Path(cfg.out) / cfg.name / info.get('run_id', run_dir.name)}",
            **{f"version: {k}": str(v) for k, v in key_versions.items()},
        },
        verdict=opening,
        leakage=leakage,
        trips=None if trips_summary is None else trips_summary[[c for c in TRIP_COLUMNS if c in trips_summary.columns]],
        trips_help=scores.trips_help,
        privacy_utility=privacy_utility_rows(privacy, utility),
        rounds_figure=rounds_figure,
    )
    path = render_report(run_dir, context)
    return BuiltReport(path, summary, opening, leakage, trips_summary)


__all__ = ["BuiltReport", "THREAT_MODEL", "build_report", "metric_help", "privacy_utility_rows"]
