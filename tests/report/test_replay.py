"""`drivepriv replay`'s engine: the simulator's own renderer, truth beside reconstructions."""

import re
import shutil
import subprocess
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image

from drivepriv.cli import main
from drivepriv.errors import ConfigError
from drivepriv.federation.types import GroundTruth
from drivepriv.results import BatchRecord, load_batches, save_batches
from drivepriv.scenarios import load_scenario

REPO = Path(__file__).resolve().parents[2]


def _quick_run(out: Path, scenario: str) -> Path:
    rc = main(["eval", "--scenario", scenario, "--quick", "--out", str(out), "--no-progress",
               "--set", "report.videos=0", "--set", "report.figures=false"])
    assert rc == 0
    (run_dir,) = [p.parent for p in out.rglob("reconstructions.npz")]
    return run_dir


@pytest.fixture(scope="module")
def merge_run(tmp_path_factory) -> Path:
    return _quick_run(tmp_path_factory.mktemp("merge"), "merge")


def _probe(path: Path) -> str:
    return subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True, text=True).stderr


def _frames(path: Path) -> list[np.ndarray]:
    import imageio.v2 as imageio

    with imageio.get_reader(path, format="FFMPEG") as r:
        return [np.asarray(f) for f in r]


def test_replay_merge_writes_h264_and_gif(merge_run, tmp_path):
    records = load_batches(merge_run)
    out = tmp_path / "replay"
    results = replay_run_checked(merge_run, out)
    assert [r["batch"] for r in results] == list(range(len(records)))
    for r, rec in zip(results, records):
        assert r["label"] == rec.label and r["mp4"].parent == out and r["gif"].parent == out
        probe = _probe(r["mp4"])
        assert "Video: h264" in probe and "Baseline" in probe and "yuv420p" in probe, probe
        w, h = map(int, re.search(r"yuv420p[^,]*, (\d+)x(\d+)", probe).groups())
        assert w % 2 == 0 and h % 2 == 0 and w >= 480 and h >= 3 * 150  # truth + rgia + dlg panels, stacked
        frames = _frames(r["mp4"])
        assert len(frames) == r["frames"] == 2 * len(rec.truth)  # s and s' of every transition
        assert not np.array_equal(frames[0], frames[1])
        gif = Image.open(r["gif"])
        assert r["gif"].stat().st_size < 2_000_000 and gif.n_frames > 1 and gif.size[0] <= 360
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left

    one = replay_run_checked(merge_run, tmp_path / "one", batch=1, attacks=["rgia"])
    assert len(one) == 1 and one[0]["batch"] == 1
    w1 = int(re.search(r"yuv420p[^,]*, \d+x(\d+)", _probe(one[0]["mp4"])).group(1))
    assert w1 < h  # two panels instead of three


def replay_run_checked(run_dir: Path, out: Path, **kw) -> list[dict]:
    from drivepriv.report.replay import replay_run

    return replay_run(run_dir, out_dir=out, **kw)


def _blob_centre(img: np.ndarray, rgb: tuple[int, int, int], tol: int = 12) -> np.ndarray | None:
    mask = (np.abs(img[:, :, :3].astype(int) - np.array(rgb)) <= tol).all(-1)
    ij = np.argwhere(mask)
    return ij.mean(0)[::-1] if len(ij) > 20 else None  # (x, y) pixels


def test_highway_panels_show_vehicles_where_the_states_say(merge_run):
    """The ego (green) and a neighbour (blue) are drawn at their decoded positions; a state
    with the ego moved 10 m ahead draws it 10 m x scaling further right (camera on the truth)."""
    from highway_env.vehicle.graphics import VehicleGraphics

    from drivepriv.report.replay_render import HighwayRenderer

    cfg = load_scenario(str(merge_run / "config.yaml"))
    rec = load_batches(merge_run)[0]
    backend = HighwayRenderer(cfg)
    try:
        codec = backend.codec
        state = np.asarray(rec.truth.states[0])
        world = codec.decode_world(state)
        backend.begin(state, rec.client, 0, 0)
        img, _ = backend.panel(state, True, (0, 0, 0))
        surface = backend.viewer.sim_surface
        xy = [codec.index("x"), codec.index("y")]
        ego_px = np.array(surface.pos2pix(*world[0, xy]))
        green = _blob_centre(img, VehicleGraphics.EGO_COLOR)
        assert green is not None and np.abs(green - ego_px).max() <= 3
        assert np.abs(ego_px - np.array(img.shape[1::-1]) / 2).max() <= 1  # the view is centred on the true ego
        seen = [j for j in range(1, len(world)) if world[j, codec.index("presence")] > 0.5 and surface.is_visible(world[j, xy])]
        assert seen, "the first merge state has a neighbour in view"
        blue_px = np.array(surface.pos2pix(*world[seen[0], xy]))
        y, x = blue_px[1], blue_px[0]
        assert (np.abs(img[y, x].astype(int) - np.array(VehicleGraphics.BLUE)) <= 12).all()

        moved = state.copy()
        lo, hi = codec.ranges["x"]
        moved[0, codec.index("x")] += 10.0 / ((hi - lo) / 2)  # ego 10 m ahead (normalised units)
        img2, notes = backend.panel(moved, False, (200, 0, 0))
        green2 = _blob_centre(img2, VehicleGraphics.EGO_COLOR)
        assert green2 is not None
        np.testing.assert_allclose(green2 - green, [10 * surface.scaling, 0], atol=2)
        assert notes == []
        far = state.copy()
        far[0, codec.index("x")] = 0.9  # hundreds of metres away: said in the title
        _, notes = backend.panel(far, False, (200, 0, 0))
        assert notes and "off view" in notes[0]
    finally:
        backend.close()


def test_bad_inputs_raise_config_errors(merge_run, tmp_path):
    from drivepriv.report.replay import replay_run

    n = len(load_batches(merge_run))
    for bad in (n, -1, 99):
        with pytest.raises(ConfigError, match=f"from 0 to {n - 1}"):
            replay_run(merge_run, batch=bad, out_dir=tmp_path / "x")
    with pytest.raises(ConfigError, match="Did you mean 'rgia'"):
        replay_run(merge_run, attacks=["rgiaa"], out_dir=tmp_path / "x")
    with pytest.raises(ConfigError, match="not a drivepriv run folder"):
        replay_run(tmp_path / "nothing-here")
    damaged = tmp_path / "damaged"
    shutil.copytree(merge_run, damaged)
    (damaged / "reconstructions.npz").write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="cannot be read"):
        replay_run(damaged)
    (damaged / "reconstructions.npz").unlink()
    shutil.copy(merge_run / "reconstructions.npz", damaged)
    (damaged / "config.yaml").unlink()
    with pytest.raises(ConfigError, match="config.yaml"):
        replay_run(damaged)


def test_interrupted_replay_leaves_no_files(merge_run, tmp_path, monkeypatch):
    import drivepriv.report.media as media
    import drivepriv.report.replay as replay

    calls = {"n": 0}
    real = replay.compose

    def compose(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(replay, "compose", compose)
    out = tmp_path / "replay"
    with pytest.raises(KeyboardInterrupt):
        replay.replay_run(merge_run, out_dir=out)
    assert list(out.iterdir()) == []

    def broken_gif(frames, path, fps):
        return media.atomic(path, lambda tmp: (tmp.write_bytes(b"GIF8"), 1 / 0))

    monkeypatch.setattr(replay, "compose", real)
    monkeypatch.setattr(replay, "write_gif", broken_gif)
    with pytest.raises(ZeroDivisionError):
        replay.replay_run(merge_run, batch=0, out_dir=out)
    assert [p.name for p in out.iterdir()] == ["b0-c0-r1.mp4"]  # the finished MP4, nothing half-written


def test_replay_cartpole(tmp_path):
    from drivepriv.report.replay import replay_run
    from drivepriv.report.replay_render import ControlRenderer

    run_dir = _quick_run(tmp_path / "runs", "cartpole")
    (r0, *_) = replay_run(run_dir, batch=0, out_dir=tmp_path / "replay")
    assert "Video: h264" in _probe(r0["mp4"]) and Image.open(r0["gif"]).n_frames > 1

    backend = ControlRenderer(load_scenario(str(run_dir / "config.yaml")))
    try:  # the cart is drawn where x says: moving it 1 m moves the cart's pixels
        s = np.array([0.0, 0.0, 0.05, 0.0], np.float32)
        backend.begin(s, 0, 0, 0)
        a, _ = backend.panel(s, True, (0, 0, 0))
        b, _ = backend.panel(s + np.array([1.0, 0, 0, 0], np.float32), False, (0, 0, 0))
        cart = lambda img: np.argwhere((img[:, :, :3] < 30).all(-1))[:, 1].mean()  # noqa: E731  (black cart)
        scale = a.shape[1] / 4.8  # gymnasium draws x in [-2.4, 2.4] across the width
        assert abs(cart(b) - cart(a) - scale) < 3
    finally:
        backend.close()


def _lane_keeping(codec, obs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    p = codec.to_physical(obs.astype(np.float64))
    steer = -1.5 * p[codec.index("heading_diff_rad")] - 0.3 * p[codec.index("lane_offset_left_m")] + 0.3 * rng.normal()
    return np.array([np.clip(steer, -1, 1), 0.8], np.float32)


def test_replay_metadrive_localises_the_ego(tmp_path):
    """Real MetaDrive observations: the replay places the true ego within 0.5 m of where it
    was (the observation has no absolute position), and writes the videos. About 12 s."""
    from drivepriv.envs import make_codec, make_env
    from drivepriv.report.replay import replay_run
    from drivepriv.report.replay_metadrive import MetaDriveRenderer, client_episode_seed

    cfg = load_scenario("metadrive-ramp")
    codec = make_codec(cfg.env)
    env = make_env(cfg.env)
    rng = np.random.default_rng(0)
    states, nexts, truths, origins = [], [], [], []
    try:
        for episode in (0, 1):
            obs, _ = env.reset(seed=client_episode_seed(cfg, 0, episode))
            for step in range(45):
                t = env.vehicle_truth()  # where the ego is when it observes obs
                obs2, *_ = env.step(_lane_keeping(codec, obs, rng))
                if step % 11 == 10:
                    states.append(obs), nexts.append(obs2), truths.append((t["x_m"], t["y_m"])), origins.append((episode, step))
                obs = obs2
    finally:
        env.close()
    truths = np.array(truths)

    backend = MetaDriveRenderer(cfg)
    try:
        errors = []
        for s, (episode, step), xy in zip(states, origins, truths):
            backend.begin(s, 0, episode, step)
            errors.append(np.hypot(*(backend.truth_xy - xy)))
        assert max(errors) < 0.5, errors
    finally:
        backend.close()

    B = len(states)
    truth = GroundTruth(1, 0, np.array(states), np.zeros((B, 2), np.float32), np.zeros(B, np.float32), np.array(nexts), np.zeros(B, np.float32), np.array(origins))
    noisy = {k: np.clip(getattr(truth, k) + 0.02 * rng.normal(size=getattr(truth, k).shape), 0, 1).astype(np.float32) for k in ("states", "next_states")}
    rec = BatchRecord(truth, {"noisy": {**noisy, "actions": truth.actions, "rewards": truth.rewards}})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_batches(run_dir, [rec])
    shutil.copy(REPO / "scenarios" / "metadrive-ramp.yaml", run_dir / "config.yaml")
    (r,) = replay_run(run_dir, max_transitions=3)
    assert r["mp4"] == run_dir / "replay" / "b0-c0-r1.mp4" and r["frames"] == 6
    assert "Video: h264" in _probe(r["mp4"]) and Image.open(r["gif"]).n_frames > 1
