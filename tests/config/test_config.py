"""Every configuration error names the file, the key and what was expected; exit code 2, no traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

from drivepriv.scenarios import load_scenario, scenario_catalogue
from drivepriv.config import RunConfig, apply_overrides, config_from_dict, parse_override
from drivepriv.errors import ConfigError


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "drivepriv", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    return p


def test_catalogue_loads():
    names = set(scenario_catalogue())
    assert {"merge", "highway", "roundabout", "intersection"} <= names
    for name in names:
        cfg = load_scenario(name)
        assert cfg.name == name and cfg.description


def test_unknown_key_did_you_mean(tmp_path):
    p = write(tmp_path, "federation:\n  clinets: 3\n")
    with pytest.raises(ConfigError) as e:
        load_scenario(str(p))
    msg = str(e.value)
    assert str(p) in msg and "clinets" in msg and "Did you mean 'clients'" in msg


def test_wrong_type(tmp_path):
    p = write(tmp_path, "federation:\n  batch_size: eight\n")
    with pytest.raises(ConfigError, match=r"federation\.batch_size: expected an integer, got str 'eight'"):
        load_scenario(str(p))


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("federation:\n  clients: 0\n", r"federation\.clients: expected an integer >= 1, got 0"),
        ("federation:\n  batch_size: -4\n", r"federation\.batch_size: expected an integer >= 1, got -4"),
        ("federation:\n  gamma: 1.5\n", r"federation\.gamma: expected a discount in \[0, 1\]"),
        ("federation:\n  strategy: fedprox\n", r"federation\.strategy: expected one of 'fedsgd', 'fedavg'"),
        ("attack:\n  weights: {dynamcs: 1.0}\n", r"Did you mean 'dynamics'"),
        ("env:\n  observation:\n    features: [presence, x, y, vx, vy, speed]\n", r"unknown feature 'speed'"),
    ],
)
def test_impossible_values(tmp_path, text, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_scenario(str(write(tmp_path, text)))


def test_nested_merge_keeps_defaults():
    cfg = config_from_dict({"env": {"observation": {"features_range": {"x": [-300, 300]}}}})
    rng = cfg.env.observation.features_range
    assert rng["x"] == [-300.0, 300.0] and rng["y"] == [-20.0, 20.0]  # y not dropped by a shallow merge


def test_set_overrides():
    cfg = apply_overrides(RunConfig(), [parse_override("federation.clients=7"), parse_override("attack.attacks=[dlg]")])
    assert cfg.federation.clients == 7 and cfg.attack.attacks == ["dlg"]
    with pytest.raises(ConfigError, match="unknown key 'client'"):
        apply_overrides(RunConfig(), [parse_override("federation.client=7")])


@pytest.mark.parametrize(
    "args, expect",
    [
        (["eval", "--scenario", "mrege"], "unknown scenario 'mrege'. Did you mean 'merge'? Known scenarios:"),
        (["eval", "--scenario", "merge", "--clients", "0"], "federation.clients: expected an integer >= 1, got 0"),
        (["eval", "--scenario", "merge", "--batch-size", "-1"], "federation.batch_size: expected an integer >= 1, got -1"),
        (["eval", "--scenario", "merge", "--set", "federation.lr=fast"], "federation.lr: expected a number"),
        (["eval", "--scenario", "merge", "--attacks", "rgia,dgl"], "unknown attack 'dgl'. Did you mean 'dlg'?"),
        (["eval", "--scenario", "merge", "--set", "env.config.durration=3"], "unknown highway-env key 'durration'"),
        (["eval", "--scenario", "nope.yaml"], "scenario file nope.yaml does not exist"),
    ],
)
def test_cli_errors_exit_2_without_traceback(tmp_path, args, expect):
    r = run_cli(*args, "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert expect in r.stderr
    assert "Traceback" not in r.stderr
    # nothing was written: errors come before any work starts
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*"))


def test_cli_yaml_error_names_file(tmp_path):
    p = write(tmp_path, "federation:\n  clients: 0\n")
    r = run_cli("eval", "--scenario", str(p), cwd=tmp_path)
    assert r.returncode == 2 and str(p) in r.stderr and "federation.clients" in r.stderr


def test_attacked_rounds_all_and_every():
    from drivepriv.federation.inprocess import resolve_attacked

    cfg = apply_overrides(load_scenario("merge"), [parse_override("attack.rounds=every:50"), parse_override("attack.clients=[1]")])
    assert cfg.attack.round_indices(cfg.federation.rounds) == [0, 50, 100, 150, 199]
    assert resolve_attacked(cfg) == {(r, 1) for r in (0, 50, 100, 150, 199)}
    cfg = apply_overrides(cfg, [parse_override("attack.rounds=all"), parse_override("federation.rounds=3")])
    assert cfg.attack.round_indices(3) == [0, 1, 2]
    cfg = apply_overrides(cfg, [parse_override("attack.rounds=[0, -1]")])
    assert cfg.attack.round_indices(3) == [0, 2]
    for bad in ("every:0", "every:x", "some"):
        with pytest.raises(ConfigError, match="'all' or 'every:N'"):
            apply_overrides(cfg, [parse_override(f"attack.rounds={bad}")])
