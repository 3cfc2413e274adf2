"""MetaDrive backend: offline worker envs, codec, state penalty and drawings (about 20 s)."""

from __future__ import annotations

import os
import signal
import socket
import urllib.request

import numpy as np
import pytest

pytest.importorskip("metadrive")
torch = pytest.importorskip("torch")

from drivepriv.config import EnvConfig  # noqa: E402
from drivepriv.envs.metadrive import (  # noqa: E402
    MetaDriveWorkerError,
    make_metadrive_env,
    metadrive_codec,
    scenario_for_seed,
)
from drivepriv.envs.metadrive.codec import lidar_angles_rad, lidar_objects, lidar_range_m  # noqa: E402
from drivepriv.errors import ConfigError  # noqa: E402
from drivepriv.priors.metadrive import metadrive_state_penalty, metadrive_state_penalty_terms  # noqa: E402
from drivepriv.report.metadrive import draw_lidar_scene, topdown_frame, write_lidar_video  # noqa: E402


def _cfg(max_episode_steps: int = 0, **config) -> EnvConfig:
    return EnvConfig(backend="metadrive", id="MetaDrive", config=config, max_episode_steps=max_episode_steps)


def _lane_keeping(codec, obs: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    p = codec.to_physical(obs)
    steer = -1.5 * p[codec.index("heading_diff_rad")] - 0.3 * p[codec.index("lane_offset_left_m")] + noise * rng.normal()
    return np.array([np.clip(steer, -1, 1), np.clip(0.4 + 0.3 * rng.normal(), -1, 1)], np.float32)


@pytest.fixture
def no_network(monkeypatch):
    """Fail loudly if this (parent) process touches the network."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:2]!r}")

    original_connect = socket.socket.connect

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            refuse(address)
        return original_connect(self, address)

    monkeypatch.setattr(urllib.request, "urlretrieve", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_config_errors():
    with pytest.raises(ConfigError, match="Did you mean 'traffic_density'"):
        make_metadrive_env(_cfg(trafic_density=0.1))
    with pytest.raises(ConfigError, match="Did you mean 'num_lasers'"):
        make_metadrive_env(_cfg(vehicle_config={"lidar": {"num_laser": 10}}))
    for bad in ({"use_render": True}, {"image_observation": True}):
        with pytest.raises(ConfigError, match="3D assets"):
            make_metadrive_env(_cfg(**bad))
    from metadrive.component.sensors.rgb_camera import RGBCamera

    with pytest.raises(ConfigError, match="3D assets"):
        make_metadrive_env(_cfg(sensors={"rgb_camera": (RGBCamera, 84, 84)}))


def test_scenario_for_seed():
    assert scenario_for_seed(0, 10, 5) == 10
    assert scenario_for_seed(2**63 - 1, 10, 5) == 10 + (2**63 - 1) % 5
    with pytest.raises(ValueError):
        scenario_for_seed(-1, 0, 1)


def test_two_envs_offline_deterministic_decoded(no_network):
    """Two workers at once, no network anywhere, same seed -> same run, codec vs true state, crash."""
    cfg = _cfg(max_episode_steps=0, map="SC", traffic_density=0.2, num_scenarios=3)
    codec = metadrive_codec(cfg)
    a, b = make_metadrive_env(cfg), make_metadrive_env(cfg, render_mode="rgb_array")
    try:
        assert a.pid != b.pid
        assert a._worker.call("network_check") == "forbidden"  # the worker's own guard is on
        assert a.observation_space.shape == (codec.obs_dim,) == (259,)
        assert a.action_space.shape == (2,)
        seed = 2**62 + 12345  # drivepriv's 63-bit seeds are fine
        oa, ia = a.reset(seed=seed)
        ob, ib = b.reset(seed=seed)
        assert ia["scenario"] == ib["scenario"] == scenario_for_seed(seed, 0, 3)
        np.testing.assert_array_equal(oa, ob)
        rng = np.random.default_rng(0)
        errs = []
        for _ in range(40):
            act = _lane_keeping(codec, oa, rng, 0.2)
            oa, ra, ta, tra, _ = a.step(act)
            ob, rb, tb, trb, _ = b.step(act)
            np.testing.assert_array_equal(oa, ob)
            assert (ra, ta, tra) == (rb, tb, trb)
            truth = a.vehicle_truth()
            phys = codec.to_physical(oa.astype(np.float64))
            errs.append([phys[codec.index(n)] - truth[n] for n in ("speed_mps", "heading_diff_rad", "lane_offset_left_m", "border_left_m", "border_right_m")])
            assert abs(phys[codec.index("steering_rad")] - np.radians(40.0) * truth["steering"]) < 1e-5
            if ta or tra:
                break
        errs = np.abs(np.array(errs))
        assert errs[:, 0].max() < 1e-4  # speed (m/s), MetaDrive stores km/h
        assert errs[:, 1].max() < 2e-3  # heading: stored as sin, small angles here
        assert errs[:, 2:].max() < 1e-4  # lane offset and border distances (m)
        assert truth["speed_mps"] > 1.0

        frame = topdown_frame(b)
        assert frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] == 3
        assert a.render() is None

        o2, i2 = a.reset(seed=seed + 1)  # another scenario: another map
        assert i2["scenario"] != ia["scenario"]

        # drive off the road: the episode ends as a crash
        a.reset(seed=seed)
        for _ in range(200):
            _, _, term, trunc, info = a.step([1.0, 1.0])
            if term or trunc:
                break
        assert term and info["crashed"]

        # a dead worker gives a clear error, not a hang
        os.kill(b.pid, signal.SIGKILL)
        with pytest.raises(MetaDriveWorkerError, match="died|gone|closed"):
            b.step([0.0, 0.0])
    finally:
        a.close()
        b.close()
    assert not a._worker.process.is_alive() and a._worker.process.exitcode is not None
    assert not b._worker.process.is_alive() and b._worker.process.exitcode is not None
    with pytest.raises(MetaDriveWorkerError, match="closed"):
        a.reset(seed=0)


def test_state_penalty_zero_on_real_observations():
    """>= 1000 real observations (procedural maps, traffic, noisy lane keeping): every term ~0."""
    cfg = _cfg(max_episode_steps=60, map=3, traffic_density=0.3, num_scenarios=20)
    codec = metadrive_codec(cfg)
    assert codec.road_width_m == pytest.approx(10.5)
    env = make_metadrive_env(cfg)
    rng = np.random.default_rng(1)
    obs_all, truncations = [], 0
    try:
        episode = 0
        while len(obs_all) < 1000:
            obs, _ = env.reset(seed=int(rng.integers(0, 2**63 - 1)))
            obs_all.append(obs)
            for t in range(1, 61):
                obs, _, term, trunc, _ = env.step(_lane_keeping(codec, obs, rng, [0.05, 0.5][episode % 2]))
                obs_all.append(obs)
                if term or trunc:
                    truncations += int(trunc and t == 60)
                    break
            episode += 1
    finally:
        env.close()
    assert truncations >= 1  # max_episode_steps truncates
    x = torch.tensor(np.array(obs_all), dtype=torch.float64)
    terms = metadrive_state_penalty_terms(x, codec)
    assert set(terms) >= {"range", "speed", "steering", "navigation_range", "navigation_bend", "border_sum", "lidar_convex"}
    worst = {k: float(v.max()) for k, v in terms.items()}
    assert max(worst.values()) < 1e-6, worst
    assert int(((x[:, -240:] < 1).sum(-1) > 0).sum()) > 50  # the lidar saw vehicles
    phys = codec.to_physical(np.array(obs_all, np.float64))[:, codec.groups()["lidar"]]
    counts = [len(lidar_objects(p, lidar_angles_rad(codec), lidar_range_m(codec))) for p in phys]
    assert sum(c > 0 for c in counts) > 50 and max(counts) <= 12  # ... as a few separate objects
    # ... and positive on infeasible ones
    bad = x[:10].clone()
    bad[:, codec.index("steering_rad")] = 0.9
    assert (metadrive_state_penalty(bad, codec) > 1.0).all()
    noise = torch.rand_like(x[:10])
    assert (metadrive_state_penalty(noise, codec) > 0).all()
    grad_x = x[:4].clone().requires_grad_(True)
    metadrive_state_penalty(grad_x + 0.01, codec).sum().backward()
    assert torch.isfinite(grad_x.grad).all()


def test_codec_layout():
    codec = metadrive_codec(_cfg(vehicle_config={"lidar": {"num_lasers": 72, "num_others": 2}}))
    groups = codec.groups()
    assert codec.obs_dim == 19 + 2 * 4 + 72
    assert len(groups["lidar"]) == 72 and codec.group_unit("lidar") == "m"
    for g, unit in (("speed", "m/s"), ("heading", "rad"), ("lateral", "m"), ("navigation", "m"), ("steering", "rad")):
        assert codec.group_unit(g) == unit
    zero_speed = codec.to_observation(np.zeros(codec.obs_dim))[codec.index("speed_mps")]
    assert zero_speed == pytest.approx(1 / 81)  # (0 km/h + 1) / (80 + 1)
    assert metadrive_codec(_cfg(map="SyS")).road_width_m is None


def _scan(codec, cars: list[tuple[float, float, float]]) -> np.ndarray:
    """An observation whose lidar is ray-cast against 4.5 m x 2 m cars (x ahead, y left, heading),
    every other feature mid-range."""
    ang, rng_m = lidar_angles_rad(codec), lidar_range_m(codec)
    dist = np.full(len(ang), rng_m)
    for cx, cy, psi in cars:
        c, s_ = np.cos(psi), np.sin(psi)
        # the ray t (cos a, sin a) in the car's frame; slab intersection with |u| <= 2.25, |v| <= 1
        ox, oy = -cx * c - cy * s_, cx * s_ - cy * c
        dx, dy = np.cos(ang) * c + np.sin(ang) * s_, -np.cos(ang) * s_ + np.sin(ang) * c
        with np.errstate(divide="ignore", invalid="ignore"):
            t1, t2 = (-2.25 - ox) / dx, (2.25 - ox) / dx
            t3, t4 = (-1.0 - oy) / dy, (1.0 - oy) / dy
        near = np.maximum(np.minimum(t1, t2), np.minimum(t3, t4))
        far = np.minimum(np.maximum(t1, t2), np.maximum(t3, t4))
        hit = (near <= far) & (near > 0)
        dist = np.where(hit, np.minimum(dist, near), dist)
    obs = np.full(codec.obs_dim, 0.5)
    obs[codec.groups()["lidar"]] = dist / rng_m
    return obs


def test_the_objects_the_lidar_sees_are_placed_and_scored_in_metres():
    codec = metadrive_codec(_cfg())
    ang, rng_m, idx = lidar_angles_rad(codec), lidar_range_m(codec), codec.groups()["lidar"]
    cars = [(12.0, 3.5, 0.0), (-15.0, -3.5, 0.1), (25.0, 0.0, 0.0)]  # the last dead ahead: its run wraps past ray 0
    obs = _scan(codec, cars)
    found = lidar_objects(codec.to_physical(obs)[idx], ang, rng_m)
    assert len(found) == 3
    for cx, cy, _ in cars:  # the centre of each visible outline, within half a car's length of its centre
        assert np.linalg.norm(found - [cx, cy], axis=1).min() <= 2.25 + 1e-9
    assert len(lidar_objects(np.full(len(ang), rng_m), ang, rng_m)) == 0
    assert "lidar_objects" in codec.scored_groups() and codec.scored_groups()["lidar_objects"] == "m"
    # scoring: exact, moved 0.3 m along every ray, missing, and a scan that sees nothing
    moved = obs.copy()
    hit = obs[idx] < 0.999
    moved[np.array(idx)[hit]] += 0.3 / rng_m
    empty = _scan(codec, [])
    truth, rec = np.stack([obs, obs, obs, empty]), np.stack([obs, moved, empty, obs])
    err = codec.group_errors(truth, rec)["lidar_objects"]
    assert err[0] == 0 and 0.25 < err[1] < 0.35 and err[2] == rng_m and np.isnan(err[3]), err
    shifted = _scan(codec, [(cx + 1.0, cy, psi) for cx, cy, psi in cars])
    assert 0.5 < codec.group_errors(obs[None], shifted[None])["lidar_objects"][0] < 1.5
    extra = _scan(codec, cars + [(0.0, -20.0, 0.0)])  # a car that is not there costs the range, shared over 4
    assert codec.group_errors(obs[None], extra[None])["lidar_objects"][0] == pytest.approx(rng_m / 4)


def test_draw_lidar_scene_and_video(tmp_path):
    codec = metadrive_codec(_cfg())
    obs = np.full(codec.obs_dim, 0.5, np.float32)
    obs[codec.index("border_left_m")] = 5.25 / 18
    obs[codec.index("border_right_m")] = 5.25 / 18
    lidar = codec.groups()["lidar"]
    obs[lidar] = 1.0
    obs[lidar[:6]] = 0.2  # something 10 m ahead
    img = draw_lidar_scene(obs, {"attack_a": obs * 0.98, "attack_b": obs}, codec, title="test")
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert img.shape[0] % 2 == 0 and img.shape[1] % 2 == 0
    assert img.shape[1] > 3 * 300  # three panels side by side
    path = write_lidar_video(np.stack([obs] * 3), {"attack_a": np.stack([obs] * 3)}, codec, tmp_path / "v.mp4", fps=5)
    assert path.exists() and path.stat().st_size > 0
