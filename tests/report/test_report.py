"""Report stage: batch figure, replay video (H.264), HTML page and the summary table."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from drivepriv.report import (
    DEFAULT_METRIC_HELP,
    ReportContext,
    SceneBatch,
    draw_batch_figure,
    render_report,
    summarise,
    summary_stats,
    write_replay_video,
)
from drivepriv.report.html import iter_links
from drivepriv.report.plots import ATTACK_RGB, select_transitions

FEATURES = ("presence", "x", "y", "vx", "vy", "cos_h", "sin_h")
ACTIONS = ("LANE_LEFT", "IDLE", "LANE_RIGHT", "FASTER", "SLOWER")


@pytest.fixture(scope="module")
def road():
    from drivepriv.config import RunConfig
    from drivepriv.envs import make_env
    from drivepriv.priors.road import RoadGeometry

    return RoadGeometry.from_env(make_env(RunConfig().env))


def make_scene(batch: int = 3, vehicles: int = 4, features: tuple[str, ...] = FEATURES, seed: int = 0) -> SceneBatch:
    """Plausible merge traffic (x 100..300 m, lanes y = 0 / 4 m), rgia close to it, dlg far and soft."""
    rng = np.random.default_rng(seed)
    fi = {f: i for i, f in enumerate(features)}
    s = np.zeros((batch, vehicles, len(features)))
    for b in range(batch):
        ego_x = rng.uniform(100, 300)
        for j in range(vehicles - (b % 2)):  # odd transitions have an absent last row
            x = ego_x if j == 0 else ego_x + rng.uniform(-40, 40)
            s[b, j, [fi["presence"], fi["x"], fi["y"], fi["vx"], fi["vy"]]] = [1, x, rng.choice([0.0, 4.0]), rng.uniform(20, 28), 0]
            if "cos_h" in fi:
                s[b, j, fi["cos_h"]] = 1.0
    s2 = s.copy()
    s2[..., fi["x"]] += s[..., fi["vx"]] * 1.0 * s[..., fi["presence"]]

    def noisy(a: np.ndarray, sigma: float, soft: bool) -> np.ndarray:
        r = a.copy()
        r[..., [fi["x"], fi["y"]]] += rng.normal(0, sigma, r[..., [fi["x"], fi["y"]]].shape)
        if soft:
            r[..., fi["presence"]] = np.clip(r[..., fi["presence"]] + rng.normal(0, 0.3, r.shape[:2]), 0, 1)
        return r

    recon = {"rgia": (noisy(s, 0.5, False), noisy(s2, 0.5, False)), "dlg": (noisy(s, 5.0, True), noisy(s2, 5.0, True))}
    actions = rng.integers(0, len(ACTIONS), batch)
    return SceneBatch(
        label="client 0 · round 11", features=features, truth_states=s, truth_next_states=s2, recon=recon,
        actions=actions, recon_actions={"rgia": actions.copy(), "dlg": (actions + 1) % len(ACTIONS)}, action_names=ACTIONS,
    )


@pytest.fixture(scope="module")
def artefacts(road, tmp_path_factory) -> dict[str, Path]:
    """One figure and one video in a run directory, shared by the tests below."""
    run = tmp_path_factory.mktemp("run")
    scene = make_scene()
    fig = draw_batch_figure(scene, road, run / "figures" / "batch_0.png")
    vid = write_replay_video(scene, road, run / "videos" / "batch_0.mp4", fps=10, frames_per_transition=5)
    return {"run": run, "figure": fig, "video": vid}


def test_figure_is_written_and_shows_the_reconstructions(artefacts):
    import imageio.v2 as imageio

    path = artefacts["figure"]
    assert path.exists() and path.stat().st_size > 20_000
    img = imageio.imread(path)[..., :3].astype(int)
    assert img.shape[0] > 400 and img.shape[1] > 800
    assert img.std() > 10  # not a blank canvas
    for rgb in ATTACK_RGB[:2]:  # both attacks' outline colours are drawn
        assert (np.abs(img - np.array(rgb)).sum(axis=-1) < 30).sum() > 50


def test_select_transitions_caps_and_spreads():
    assert select_transitions(5, 8) == [0, 1, 2, 3, 4]
    idx = select_transitions(32, 8)
    assert len(idx) == 8 and idx[0] == 0 and idx[-1] == 31


def test_video_is_h264_with_the_expected_frames(artefacts):
    import imageio.v2 as imageio
    import imageio_ffmpeg

    path = artefacts["video"]
    assert path.exists() and 1_000 < path.stat().st_size < 2_000_000
    reader = imageio.get_reader(path)
    frames = [f for f in reader]
    reader.close()
    assert len(frames) == 3 * 5
    h, w, _ = frames[0].shape
    assert h % 2 == 0 and w % 2 == 0
    assert frames[0].std() > 10 and not np.array_equal(frames[0], frames[4])  # things move within a transition
    info = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True, text=True).stderr
    stream = next(line for line in info.splitlines() if "Video:" in line)
    assert "h264" in stream and "yuv420p" in stream


def test_video_without_heading_features(road, tmp_path):
    import imageio.v2 as imageio

    scene = make_scene(batch=2, features=("presence", "x", "y", "vx", "vy"), seed=1)
    path = write_replay_video(scene, road, tmp_path / "v.mp4", frames_per_transition=3)
    reader = imageio.get_reader(path)
    assert sum(1 for _ in reader) == 6
    reader.close()


def test_scene_batch_rejects_mismatched_shapes():
    scene = make_scene()
    with pytest.raises(ValueError, match="reconstruction 'bad'"):
        SceneBatch("x", FEATURES, scene.truth_states, scene.truth_next_states, {"bad": (scene.truth_states[:1], scene.truth_states)})
    with pytest.raises(ValueError, match="'vy' is required"):
        SceneBatch("x", ("presence", "x", "y", "vx"), scene.truth_states[..., :4], scene.truth_next_states[..., :4], {})


def metrics_frame() -> pd.DataFrame:
    return pd.DataFrame({
        "attack": ["rgia"] * 5 + ["dlg"] * 2,
        "client": [0, 1, 2, 3, 0, 0, 1],
        "round": [0] * 7,
        "seed": [0] * 7,
        "ego_pos_err_m": [1.0, 2.0, 3.0, 4.0, np.nan, 10.0, 20.0],
        "action_acc": [1.0, 1.0, 0.5, 1.0, 1.0, np.nan, np.nan],
    })


def test_summarise_median_and_iqr_nan_safe():
    m = metrics_frame()
    stats = summary_stats(m)
    assert list(stats.index) == ["rgia", "dlg"]  # order of first appearance
    assert stats.loc["rgia", ("ego_pos_err_m", "median")] == pytest.approx(2.5)
    assert stats.loc["rgia", ("ego_pos_err_m", "p25")] == pytest.approx(1.75)
    assert stats.loc["rgia", ("ego_pos_err_m", "p75")] == pytest.approx(3.25)
    assert stats.loc["rgia", ("ego_pos_err_m", "count")] == 4
    assert stats.loc["dlg", ("ego_pos_err_m", "median")] == pytest.approx(15.0)
    assert ("client", "median") not in stats.columns  # identifiers are not metrics

    table = summarise(m)
    assert list(table.columns) == ["n", "ego_pos_err_m", "action_acc"]
    assert table.loc["rgia", "n"] == "5"
    assert table.loc["rgia", "ego_pos_err_m"] == "2.5 [1.75, 3.25] (n=4)"
    assert table.loc["rgia", "action_acc"] == "1 [1, 1]"
    assert table.loc["dlg", "ego_pos_err_m"] == "15 [12.5, 17.5]"
    assert table.loc["dlg", "action_acc"] == "—"
    assert list(summarise(m, metrics=["action_acc"]).columns) == ["n", "action_acc"]
    with pytest.raises(KeyError, match="nope"):
        summarise(m, metrics=["nope"])


def test_report_html_is_self_contained_and_escaped(artefacts):
    run = artefacts["run"]
    evil = "<script>alert(1)</script>"
    ctx = ReportContext(
        title="drivepriv · merge",
        scenario=f"merge {evil}",
        description=f"Highway merge. {evil}",
        settings={"clients": "4", "rounds": "12", "strategy": "fedsgd", "note": evil},
        threat_model=["Honest-but-curious server.", "It knows the model, the loss and the simulator."],
        summary=summarise(metrics_frame()),
        metric_help=DEFAULT_METRIC_HELP,
        batches=[{"label": f"client 0 · round 11 {evil}", "figure": "figures/batch_0.png", "video": "videos/batch_0.mp4"},
                 {"label": "no media", "figure": None, "video": None}],
        reproducibility={"command": "drivepriv eval --scenario merge --seed 0", "seed": "0"},
        notes=["synthetic data"],
    )
    path = render_report(run, ctx)
    assert path == run / "report.html"
    html = path.read_text(encoding="utf-8")

    assert evil not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<script" not in html.lower()
    assert "<table" in html and ">rgia<" in html and "2.5" in html and "[1.75, 3.25] (n=4)" in html
    assert 'type="video/mp4"' in html and "<video controls muted playsinline preload=\"metadata\">" in html
    links = [link for link in iter_links(html) if not link.startswith("#")]
    assert "figures/batch_0.png" in links and "videos/batch_0.mp4" in links
    for link in links:
        assert "://" not in link and not link.startswith("/"), link  # no network, no absolute paths
        assert (run / link).exists(), link
    assert not re.search(r"<link[^>]+stylesheet|@import", html)  # CSS is inline
