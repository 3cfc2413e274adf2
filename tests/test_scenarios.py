"""Every scenario of the catalogue runs end to end with --quick, through the real command line."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from drivepriv.cli import main
from drivepriv.scenarios import load_scenario, scenario_catalogue

SCENARIOS = sorted(scenario_catalogue())


def test_catalogue_has_metadrive_and_control_tasks(capsys):
    assert main(["scenarios"]) == 0
    listed = capsys.readouterr().out
    backends = {name: load_scenario(name).env.backend for name in SCENARIOS}
    assert sum(b == "metadrive" for b in backends.values()) >= 6
    assert sum(b == "control" for b in backends.values()) >= 4
    for name in SCENARIOS:
        assert name in listed


@pytest.mark.parametrize("name", SCENARIOS)
def test_quick_run(name, tmp_path):
    assert main(["eval", "--scenario", name, "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    (run_dir,) = (tmp_path / name).iterdir()
    assert (run_dir / "report.html").is_file()
    metrics = pd.read_csv(run_dir / "metrics.csv")
    cfg = load_scenario(name)
    assert set(metrics["attack"]) == set(cfg.attack.attacks)
    head = "ego_pos_err_m" if "ego_pos_err_m" in metrics else "state_rmse"
    assert metrics[head].map(math.isfinite).all()
    assert metrics["reward_abs_err"].map(math.isfinite).all()
    if cfg.env.backend == "metadrive":  # the objects the lidar sees, in metres, lead the verdict with the lane and the speed
        assert "lidar_objects_err_m" in metrics
        leakage = pd.read_csv(run_dir / "leakage.csv")
        assert list(dict.fromkeys(leakage["feature"]))[:5] == ["lateral", "speed", "heading", "lidar objects", "lidar"]
        assert (leakage["feature"] == "action").sum() == len(set(metrics["attack"]))  # the taken action; the observed one is "last action"
