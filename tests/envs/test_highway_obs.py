"""drivepriv's pandas-free Kinematics observation gives highway-env's own numbers, bit for bit."""

import pickle

import numpy as np
import pytest

from drivepriv.envs import make_env
from drivepriv.scenarios import load_scenario


@pytest.mark.parametrize("scenario", ["merge", "racetrack"])
def test_fast_observation_equals_highway_env(scenario):
    cfg = load_scenario(scenario)
    env = make_env(cfg.env)
    ref = make_env(cfg.env).env  # the same environment under highway-env's own observation
    assert type(ref.unwrapped.observation_type).__name__ == "KinematicObservation"
    steps = 0
    for ep in range(2):
        obs, _ = env.reset(seed=700 + ep)
        want, _ = ref.reset(seed=700 + ep)
        assert type(env.unwrapped.observation_type).__name__ == "FastKinematicObservation"
        np.testing.assert_array_equal(obs, want)
        rng = np.random.default_rng(ep)
        done = False
        while not done and steps < 40:
            a = int(rng.integers(env.action_space.n)) if hasattr(env.action_space, "n") else rng.uniform(-1, 1, env.action_space.shape)
            obs, r, terminated, truncated, _ = env.step(a)
            want, r_want, *_ = ref.step(a)
            assert obs.dtype == want.dtype == np.float32
            np.testing.assert_array_equal(obs, want)
            assert r == r_want
            done = terminated or truncated
            steps += 1
    # client snapshots pickle the environment (Flower engine): the fast observation survives it
    copy = pickle.loads(pickle.dumps(env))
    a = 0 if hasattr(env.action_space, "n") else np.zeros(env.action_space.shape)
    np.testing.assert_array_equal(copy.step(a)[0], env.step(a)[0])
    env.close()
    ref.close()
