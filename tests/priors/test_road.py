"""RoadGeometry's differentiable lane queries against highway-env's own (merge and roundabout)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from drivepriv.config import EnvConfig, RunConfig
from drivepriv.envs.highway import make_env
from drivepriv.priors.road import RoadGeometry


def _env_and_road(env_cfg: EnvConfig):
    env = make_env(env_cfg)
    env.reset(seed=0)
    return env, RoadGeometry.from_env(env)


@pytest.fixture(scope="module")
def merge():
    env, road = _env_and_road(RunConfig().env)
    yield env, road
    env.close()


@pytest.fixture(scope="module")
def roundabout():
    env, road = _env_and_road(EnvConfig(id="roundabout-v0", max_episode_steps=0))
    yield env, road
    env.close()


def _hw_lanes(env, road: RoadGeometry) -> list:
    net = env.unwrapped.road.network
    return [net.get_lane(lane.index) for lane in road.lanes]


def _sample_near_lanes(lanes: list, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Points around random lanes: (xy, heading, lane number, inside [0, length])."""
    rng = np.random.default_rng(seed)
    xy, heading, which, inside = [], [], [], []
    for _ in range(n):
        k = int(rng.integers(len(lanes)))
        lane = lanes[k]
        s = rng.uniform(-3.0, lane.length + 3.0)
        xy.append(lane.position(s, rng.uniform(-3.0, 3.0)))
        heading.append(lane.heading_at(s) + rng.normal(0.0, 0.3))
        which.append(k)
        inside.append(0.0 <= s <= lane.length)
    return np.array(xy), np.array(heading), np.array(which), np.array(inside)


@pytest.mark.parametrize("scenario", ["merge", "roundabout"])
def test_lane_distances_match_highway_env(scenario: str, request) -> None:
    """distance_with_heading on every lane: exact on straight lanes; on curved lanes (2 m
    polyline) within 1 cm inside the lane, and within 10 cm up to 3 m past its ends (where the
    polyline's parabolic continuation and highway-env's arc part)."""
    from highway_env.road.lane import StraightLane

    env, road = request.getfixturevalue(scenario)
    lanes = _hw_lanes(env, road)
    xy, heading, which, inside = _sample_near_lanes(lanes, 400, seed=1)
    ours = road.lane_distances(torch.tensor(xy), torch.tensor(heading)).numpy()
    ref = np.array([[lane.distance_with_heading(p, h) for lane in lanes] for p, h in zip(xy, heading)])
    err = np.abs(ours - ref)
    straight = np.array([type(lane) is StraightLane for lane in lanes])
    assert err[:, straight].max() <= 1e-6
    # The lane each point was drawn around (curved lanes): chord error inside, more past the ends.
    own = err[np.arange(len(xy)), which]
    curved = ~straight[which]
    if curved.any():
        assert own[curved & inside].max() <= 0.01, own[curved & inside].max()
        assert own[curved].max() <= 0.1, own[curved].max()
    # Without heading: highway-env's plain distance.
    ours_nh = road.lane_distances(torch.tensor(xy), None).numpy()
    ref_nh = np.array([[lane.distance(p) for lane in lanes] for p in xy])
    assert np.abs(ours_nh - ref_nh)[:, straight].max() <= 1e-6
    # The closest lane of the sampled points.
    agree = (ours.argmin(1) == ref.argmin(1)).mean()
    assert agree >= 0.99, agree


@pytest.mark.parametrize("scenario", ["merge", "roundabout"])
def test_closest_lane_matches_get_closest_lane_index(scenario: str, request) -> None:
    """On real vehicle positions and headings, the hard closest lane is highway-env's."""
    env, road = request.getfixturevalue(scenario)
    rng = np.random.default_rng(0)
    positions, headings, truth = [], [], []
    episode = 0
    env.reset(seed=episode)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(40):
            _, _, terminated, truncated, _ = env.step(int(rng.integers(env.action_space.n)))
            base = env.unwrapped
            for v in base.road.vehicles:
                positions.append(np.array(v.position, dtype=float))
                headings.append(float(v.heading))
                truth.append(base.road.network.get_closest_lane_index(v.position, v.heading))
            if terminated or truncated:
                episode += 1
                env.reset(seed=episode)
    xy = torch.tensor(np.array(positions))
    h = torch.tensor(np.array(headings))
    hard = road.closest_lane_weights(xy, h, temperature=0.0)
    ours = [road.lanes[int(k)].index for k in hard.argmax(-1)]
    mismatches = [(o, t) for o, t in zip(ours, truth) if tuple(o) != tuple(t)]
    assert not mismatches, f"{len(mismatches)}/{len(truth)} mismatches, e.g. {mismatches[:3]}"
    soft = road.closest_lane_weights(xy, h, temperature=0.05)
    assert torch.allclose(soft.sum(-1), torch.ones(len(truth), dtype=soft.dtype))
    assert (soft.argmax(-1) == hard.argmax(-1)).float().mean() >= 0.99


def test_offroad_zero_on_lanes_positive_off_road(merge, roundabout) -> None:
    for env, road in (merge, roundabout):
        lanes = _hw_lanes(env, road)
        on = np.array([lane.position(f * lane.length, 0.0) for lane in lanes for f in (0.0, 0.3, 0.7, 1.0)])
        assert road.offroad_m(torch.tensor(on)).abs().max() <= 1e-6
        edge = np.array([lane.position(0.5 * lane.length, 0.99 * lane.width_at(0) / 2) for lane in lanes])
        assert road.offroad_m(torch.tensor(edge)).max() <= 1e-6
    _, road = merge
    # merge: the highway's left lane is centred on y = 0 (width 4 m): 12 m to its left is 10 m off.
    off = torch.tensor([[100.0, -12.0], [300.0, -12.0]], requires_grad=True)
    out = road.offroad_m(off.double())
    assert torch.allclose(out, torch.full((2,), 10.0, dtype=torch.float64), atol=1e-9)
    out.sum().backward()
    assert torch.isfinite(off.grad).all() and off.grad.abs().sum() > 0


def test_lane_queries_are_differentiable(merge) -> None:
    _, road = merge
    xy = torch.tensor([[50.0, 1.0], [250.0, 9.0], [200.0, 12.0], [0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    heading = torch.tensor([0.1, -0.2, 0.0, 0.0], dtype=torch.float64, requires_grad=True)
    d = road.lane_distances(xy, heading)
    w = road.closest_lane_weights(xy, heading, temperature=0.5)
    assert d.shape == (4, road.n_lanes) and w.shape == (4, road.n_lanes)
    (d.sum() + (w * road.lane_ids(w)).sum() + road.offroad_m(xy).sum()).backward()
    assert torch.isfinite(xy.grad).all() and torch.isfinite(heading.grad).all()
    assert xy.grad.abs().sum() > 0 and heading.grad.abs().sum() > 0
