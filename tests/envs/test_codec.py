"""Observation codec: round trip in physical units on real observations, and clipping detection."""

import numpy as np
import torch

from drivepriv.config import RunConfig
from drivepriv.envs import make_codec, make_env


def real_observations(n: int = 40, seed: int = 0, policy=None) -> np.ndarray:
    """n observations of merge driven by ``policy`` (rng -> action; default uniformly random),
    from environment seeds seed, seed + k, ... (k < n)."""
    env = make_env(RunConfig().env)
    obs, _ = env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    out = [obs]
    while len(out) < n:
        obs, _, term, trunc, _ = env.step(int(rng.integers(5)) if policy is None else int(policy(rng)))
        out.append(obs)
        if term or trunc:
            obs, _ = env.reset(seed=seed + len(out))
    env.close()
    return np.stack(out)


def test_round_trip_physical_units():
    codec = make_codec(RunConfig().env)
    obs = real_observations()
    phys = codec.to_physical(obs)
    assert np.allclose(codec.to_normalised(phys), obs, atol=1e-6)
    # the ego starts on lane 1 of merge at x = 30 m, y = 4 m, 30 m/s, heading 0
    first = codec.decode_world(obs[:1])[0]
    assert np.allclose(first[0, :5], [1, 30.0, 4.0, 30.0, 0.0], atol=1e-3)
    # torch gives the same numbers, and stays differentiable
    t = torch.tensor(obs, requires_grad=True)
    w = codec.decode_world(t)
    assert np.allclose(w.detach().numpy(), codec.decode_world(obs), atol=1e-4)
    w.sum().backward()
    assert torch.isfinite(t.grad).all()


def test_world_frame_matches_simulator():
    cfg = RunConfig()
    env = make_env(cfg.env)
    codec = make_codec(cfg.env)
    obs, _ = env.reset(seed=3)
    for _ in range(5):
        obs, *_ = env.step(1)
    world = codec.decode_world(obs)
    base = env.unwrapped
    positions = np.array([v.position for v in base.road.vehicles])
    for row in world[world[:, 0] > 0.5]:
        d = np.linalg.norm(positions - row[1:3], axis=1).min()
        assert d < 1e-3, f"decoded vehicle at {row[1:3]} is {d:.4f} m from any simulated vehicle"
    env.close()


def test_merge_ranges_never_clip():
    codec = make_codec(RunConfig().env)
    obs = real_observations(80, seed=1)
    assert not codec.clipped(obs).any(), "a scenario's ranges must keep every observed value invertible"
    clipped = obs.copy()
    clipped[0, 0, 1] = 1.0
    assert codec.clipped(clipped)[0, 0, 1]
