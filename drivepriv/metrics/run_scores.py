"""The metrics stage's run-level scores: everything scored beyond the per-batch rows of
metrics.csv, computed once from the matched reconstructions and the per-batch metrics, before
the report renders them: leakage per feature, leakage by attacked round, trips and
re-identification, and the verdict in plain words.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from drivepriv.envs import make_codec
from drivepriv.metrics.leakage import feature_leakage, leakage_by_round, verdict
from drivepriv.metrics.trips import trips_for_run
from drivepriv.results import BatchRecord, load_batches, load_run_config, read_csv


@dataclass
class RunScores:
    """A run's scores beyond metrics.csv (written as leakage.csv, rounds.csv, trips.csv and
    trips_summary.csv)."""

    leakage: pd.DataFrame
    by_round: pd.DataFrame
    #: None where there are no trips to build (no positions in the observation, or no per-client batches)
    trips: pd.DataFrame | None
    trips_summary: pd.DataFrame | None
    trips_help: dict[str, str] = field(default_factory=dict)
    verdict: dict = field(default_factory=dict)


def score_run(metrics: pd.DataFrame, records: list[BatchRecord], codec) -> RunScores:
    """Every run-level score from metrics.csv's rows and the saved batches."""
    leakage = feature_leakage(records, codec)
    trips, trips_summary, trips_help = compute_trips(records, codec)
    by_round = leakage_by_round(metrics)
    return RunScores(leakage, by_round, trips, trips_summary, trips_help, verdict(leakage, trips_summary, by_round))


def compute_trips(records: list[BatchRecord], codec) -> tuple[pd.DataFrame | None, pd.DataFrame | None, dict[str, str]]:
    """Trips and re-identification (observations with positions, e.g. highway-env Kinematics, and per-client batches)."""
    per_client = [r for r in records if r.client >= 0]
    if not codec.has_positions or not per_client:
        return None, None, {}
    result = trips_for_run(per_client, codec)
    return result.trips, result.summary, dict(result.help)


def write_scores(run_dir: Path, scores: RunScores) -> None:
    """leakage.csv, trips.csv and trips_summary.csv (where there are trips), rounds.csv."""
    run_dir = Path(run_dir)
    scores.leakage.to_csv(run_dir / "leakage.csv", index=False, float_format="%.6g")
    if scores.trips is not None:
        scores.trips.to_csv(run_dir / "trips.csv", index=False, float_format="%.6g")
        scores.trips_summary.to_csv(run_dir / "trips_summary.csv", index=False, float_format="%.6g")
    scores.by_round.to_csv(run_dir / "rounds.csv", index=False, float_format="%.6g")


def score_run_dir(run_dir: Path) -> RunScores:
    """The scores of a finished run folder, from its saved results (``drivepriv report`` rescoring
    a run without training or attacking anything); written beside them."""
    cfg = load_run_config(run_dir)
    scores = score_run(read_csv(Path(run_dir) / "metrics.csv"), load_batches(run_dir), make_codec(cfg.env))
    write_scores(run_dir, scores)
    return scores


__all__ = ["RunScores", "compute_trips", "score_run", "score_run_dir", "write_scores"]
