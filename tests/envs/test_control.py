"""gymnasium control tasks: the torch priors and the stepper against the real simulator."""

from __future__ import annotations

import math
from functools import cache

import numpy as np
import pytest
import torch

from drivepriv.config import EnvConfig
from drivepriv.envs.control import (
    CONTROL_TASKS,
    ControlStepper,
    control_codec,
    make_control_env,
    obs_to_state,
    state_distance,
)
from drivepriv.errors import ConfigError
from drivepriv.priors.control import control_prior, control_state_penalty, control_state_penalty_terms

SEEDS = (0, 1, 2)
STEPS = 300
#: Relative tolerance of the predicted next observation (float32 observations, float64 simulator).
REL_TOL = 1e-5


def _cfg(env_id: str, **kw: object) -> EnvConfig:
    return EnvConfig(backend="control", id=env_id, max_episode_steps=0, **kw)  # type: ignore[arg-type]


def _policy(env_id: str, obs: np.ndarray, rng: np.random.Generator) -> object:
    """Random actions mixed with energy pumping, so rollouts reach the goals, the walls and the clips."""
    pump = rng.random() < 0.7
    if env_id == "CartPole-v1":
        return int(rng.integers(2))
    if env_id == "Acrobot-v1":
        return (2 if obs[5] > 0 else 0) if pump else int(rng.integers(3))
    if env_id == "MountainCar-v0":
        return (2 if obs[1] >= 0 else 0) if pump else int(rng.integers(3))
    a = np.sign(obs[2]) if pump else rng.uniform(-1.0, 1.0)
    return np.array([a if a != 0 else 1.0], dtype=np.float32)


@cache
def rollouts(env_id: str) -> dict[str, np.ndarray]:
    """Real transitions (s, a, r, s', terminated) from several seeds."""
    env = make_control_env(_cfg(env_id))
    rng = np.random.default_rng(123)
    S, A, R, S2, D = [], [], [], [], []
    for seed in SEEDS:
        obs, _ = env.reset(seed=seed)
        for t in range(STEPS):
            a = _policy(env_id, obs, rng)
            nxt, r, term, trunc, _ = env.step(a)
            S.append(obs), A.append(a), R.append(r), S2.append(nxt), D.append(float(term))
            obs = nxt
            if term or trunc:
                obs, _ = env.reset(seed=1000 * seed + t)
    env.close()
    return {"s": np.array(S), "a": np.array(A), "r": np.array(R), "s2": np.array(S2), "d": np.array(D)}


def _actions(env_id: str, a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    prior = control_prior(env_id)
    if prior.discrete:
        return torch.nn.functional.one_hot(torch.as_tensor(a).long(), prior.n_actions).to(dtype)
    return torch.as_tensor(a, dtype=dtype)


@pytest.mark.parametrize("env_id", CONTROL_TASKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_predict_matches_gymnasium(env_id: str, dtype: torch.dtype) -> None:
    data = rollouts(env_id)
    prior = control_prior(env_id)
    pred = prior.predict(torch.as_tensor(data["s"], dtype=dtype), _actions(env_id, data["a"], dtype)).numpy()
    err = np.abs(pred - data["s2"])
    assert np.all(err <= REL_TOL * (1.0 + np.abs(data["s2"]))), f"{env_id}: max error per feature {err.max(0)}"


@pytest.mark.parametrize("env_id", CONTROL_TASKS)
def test_rollouts_cover_the_discontinuities(env_id: str) -> None:
    """The rollouts reach what the prior must get right: terminations, the left wall, the velocity clips."""
    data = rollouts(env_id)
    if env_id in ("CartPole-v1", "Acrobot-v1", "MountainCar-v0"):
        assert data["d"].sum() > 0
    if env_id == "MountainCar-v0":
        wall = (data["s2"][:, 0] <= -1.2 + 1e-6) & (data["s2"][:, 1] == 0)
        assert wall.any()
    if env_id == "Pendulum-v1":
        assert (np.abs(data["s2"][:, 2]) >= 8.0 - 1e-6).any()


@pytest.mark.parametrize("env_id", CONTROL_TASKS)
def test_reward_and_terminated_match(env_id: str) -> None:
    data = rollouts(env_id)
    prior = control_prior(env_id)
    s, s2 = torch.as_tensor(data["s"], dtype=torch.float64), torch.as_tensor(data["s2"], dtype=torch.float64)
    d = torch.as_tensor(data["d"])
    term = prior.terminated(s2).numpy()
    np.testing.assert_array_equal(term, data["d"])
    reward = prior.reward(s, _actions(env_id, data["a"], torch.float64), s2, d).numpy()
    np.testing.assert_allclose(reward, data["r"], rtol=1e-5, atol=1e-5)
    # The soft test agrees with the hard one wherever the margin is clear of the temperature.
    temperature = 1e-3
    soft = prior.terminated(s2, temperature=temperature).numpy()
    clear = np.abs(prior.termination_margin(s2).numpy()) > 10 * temperature
    np.testing.assert_allclose(soft[clear], data["d"][clear], atol=1e-4)


@pytest.mark.parametrize("env_id", CONTROL_TASKS)
def test_state_penalty_zero_on_real_observations(env_id: str) -> None:
    data = rollouts(env_id)
    obs = torch.as_tensor(np.concatenate([data["s"], data["s2"]]))
    assert control_state_penalty(obs, env_id).max().item() == 0.0
    bad = obs.clone()
    bad[:, 0] = 5.0  # past every task's first bound (and off the unit circle)
    pen = control_state_penalty(bad, env_id)
    assert torch.all(pen > 0)


def test_state_penalty_angle_norm() -> None:
    obs = torch.tensor([[0.5, 0.5, 0.0], [0.6, 0.8, 1.0]])
    terms = control_state_penalty_terms(obs, "Pendulum-v1")
    assert terms["angle_norm"][0] > 0 and terms["angle_norm"][1] == 0
    assert torch.all(terms["bounds"] == 0)


@pytest.mark.parametrize("env_id", CONTROL_TASKS)
def test_stepper_reproduces_env_step(env_id: str) -> None:
    data = rollouts(env_id)
    stepper = ControlStepper(_cfg(env_id))
    idx = np.arange(0, len(data["s"]), 3)
    sim = stepper.step_batch(data["s"][idx], data["a"][idx])
    np.testing.assert_allclose(sim, data["s2"][idx], rtol=REL_TOL, atol=REL_TOL)
    res = stepper.residual(data["s"][idx], data["a"][idx], data["s2"][idx])
    assert res.shape == (len(idx),) and res.max() < 1e-5
    # A next state moved by delta in one non-angle feature has a residual of |delta|.
    moved = data["s2"][idx].copy()
    moved[:, -1] += 0.01
    np.testing.assert_allclose(stepper.residual(data["s"][idx], data["a"][idx], moved), 0.01, atol=1e-5)


@pytest.mark.parametrize("env_id", CONTROL_TASKS)
def test_predict_matches_stepper_anywhere(env_id: str) -> None:
    """Off the rollouts: states drawn across the observation box (clips, walls), float64."""
    rng = np.random.default_rng(7)
    codec = control_codec(env_id)
    lo, hi = codec.box()
    n = 200
    obs = rng.uniform(lo, hi, size=(n, codec.obs_dim))
    if env_id == "CartPole-v1":
        obs = obs * np.array([0.5, 0.3, 0.5, 0.3])
    for cos_name, sin_name in {"Acrobot-v1": [("cos1", "sin1"), ("cos2", "sin2")], "Pendulum-v1": [("cos", "sin")]}.get(
        env_id, []
    ):
        th = rng.uniform(-math.pi, math.pi, n)
        obs[:, codec.index(cos_name)], obs[:, codec.index(sin_name)] = np.cos(th), np.sin(th)
    # Half the rows at the bounds of every bounded non-angle feature: the clips and the wall.
    bounded = [i for i, f in enumerate(codec.features) if f.unit and math.isfinite(f.high)]
    half = slice(n // 2, n)
    obs[half, bounded] = 0.99 * hi[bounded] * rng.choice([-1.0, 1.0], size=(n - n // 2, len(bounded)))
    prior = control_prior(env_id)
    acts = rng.integers(prior.n_actions, size=n) if prior.discrete else rng.uniform(-1.5, 1.5, (n, 1))
    stepper = ControlStepper(_cfg(env_id))
    sim = stepper.step_batch(obs, acts)
    pred = prior.predict(torch.as_tensor(obs), _actions(env_id, acts, torch.float64)).numpy()
    np.testing.assert_allclose(pred, sim, rtol=REL_TOL, atol=REL_TOL)
    if env_id != "CartPole-v1":  # (CartPole has no clip)
        velocities = [i for i in bounded if codec.features[i].unit.endswith("/s")]
        clipped = np.isclose(np.abs(sim[:, velocities]), hi[velocities], rtol=1e-6)
        assert clipped.any(), f"{env_id}: no state reached a velocity clip"
    if env_id == "MountainCar-v0":
        assert ((sim[:, 0] <= -1.2 + 1e-6) & (sim[:, 1] == 0)).any(), "no state hit the left wall"


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Acrobot-v1", "MountainCar-v0"])
def test_soft_actions_mix_next_states(env_id: str) -> None:
    data = rollouts(env_id)
    prior = control_prior(env_id)
    s = torch.as_tensor(data["s"][:20], dtype=torch.float64)
    p = torch.softmax(torch.randn(20, prior.n_actions, dtype=torch.float64, generator=torch.Generator().manual_seed(0)), -1)
    mix = prior.predict(s, p)
    each = [prior.predict(s, torch.full((20,), k)) for k in range(prior.n_actions)]
    torch.testing.assert_close(mix, sum(p[:, k : k + 1] * each[k] for k in range(prior.n_actions)))
    with pytest.raises(ValueError, match="action probabilities"):
        prior.predict(s, p[:, :1])


@pytest.mark.parametrize("env_id", CONTROL_TASKS)
def test_predict_is_differentiable(env_id: str) -> None:
    """gradcheck in double, inside the bounds (away from the clips, where the gradient is 0 by design)."""
    data = rollouts(env_id)
    prior = control_prior(env_id)
    inside = np.all(np.abs(data["s2"]) < 0.9 * np.abs(control_codec(env_id).box()[1]), axis=1)
    if env_id == "MountainCar-v0":
        inside &= data["s"][:, 0] > -1.1
    idx = np.flatnonzero(inside)[:6]
    s = torch.as_tensor(data["s"][idx], dtype=torch.float64).requires_grad_()
    a = _actions(env_id, data["a"][idx], torch.float64)
    if not prior.discrete:
        a = (0.5 * a).requires_grad_()  # strictly inside [-1, 1]
    else:
        a = (0.8 * a + 0.2 / prior.n_actions).requires_grad_()  # soft actions
    assert torch.autograd.gradcheck(lambda s_, a_: prior.predict(s_, a_), (s, a), eps=1e-6, atol=1e-5)
    if env_id == "Pendulum-v1":
        assert torch.autograd.gradcheck(
            lambda s_, a_: prior.reward(s_, a_, s_, torch.zeros(len(s_), dtype=s_.dtype)), (s, a), eps=1e-6, atol=1e-5
        )


def test_make_control_env_errors_with_did_you_mean() -> None:
    with pytest.raises(ConfigError, match="Did you mean 'CartPole-v1'"):
        make_control_env(_cfg("CartPole-v0"))
    with pytest.raises(ConfigError, match="Did you mean 'Pendulum-v1'"):
        make_control_env(_cfg("pendulum-v1"))
    with pytest.raises(ConfigError, match="Did you mean 'g'"):
        make_control_env(_cfg("Pendulum-v1", config={"gg": 9.81}))
    with pytest.raises(ConfigError, match="Keys Acrobot-v1 accepts: none"):
        make_control_env(_cfg("Acrobot-v1", config={"dt": 0.1}))
    with pytest.raises(ConfigError, match="render_mode"):
        make_control_env(_cfg("CartPole-v1", config={"render_mode": "human"}))
    with pytest.raises(ConfigError, match="backend"):
        make_control_env(EnvConfig(backend="highway", id="CartPole-v1"))
    with pytest.raises(ConfigError, match="unknown task setting"):
        control_prior("MountainCar-v0", {"goal_velocty": 0.0})


def test_make_control_env_spaces_limits_and_render() -> None:
    env = make_control_env(_cfg("Pendulum-v1"), render_mode="rgb_array")
    assert env.action_space.low.tolist() == [-1.0] and env.action_space.high.tolist() == [1.0]
    obs, _ = env.reset(seed=0)
    assert obs.dtype == np.float32 and obs.shape == (3,)
    frame = env.render()
    assert frame.ndim == 3 and frame.shape[-1] == 3 and frame.dtype == np.uint8
    env.close()
    env = make_control_env(EnvConfig(backend="control", id="CartPole-v1", max_episode_steps=5))
    env.reset(seed=0)
    truncated = [env.step(0)[3] for _ in range(5)]
    assert truncated[-1] and not any(truncated[:-1])
    # Task settings reach the simulator and the prior alike.
    cfg = _cfg("Pendulum-v1", config={"g": 9.81})
    assert make_control_env(cfg).unwrapped.g == 9.81
    assert control_prior("Pendulum-v1", cfg.config).config["g"] == 9.81


def test_codec_names_units_groups_bounds() -> None:
    cp = control_codec("CartPole-v1")
    assert cp.names == ("x", "x_dot", "theta", "theta_dot")
    assert [f.unit for f in cp.features] == ["m", "m/s", "rad", "rad/s"]
    assert math.isinf(cp.features[1].high) and cp.features[0].high == pytest.approx(4.8)
    ac = control_codec("Acrobot-v1")
    assert ac.groups()["link1"] == [0, 1] and ac.groups()["link2"] == [2, 3]
    assert ac.features[5].high == pytest.approx(9 * math.pi)
    assert control_codec("Pendulum-v1").groups()["angle"] == [0, 1]
    mc = control_codec("MountainCar-v0")
    assert mc.names == ("position", "velocity") and mc.features[1].high == pytest.approx(0.07)


def test_obs_to_state_and_angle_distance() -> None:
    obs = np.array([math.cos(3.0), math.sin(3.0), 0.5])
    assert obs_to_state("Pendulum-v1", obs)[0] == pytest.approx(3.0)
    other = np.array([math.cos(-3.0), math.sin(-3.0), 0.5])  # 2 pi - 6 rad away, the short way round
    assert state_distance("Pendulum-v1", obs, other) == pytest.approx(2 * math.pi - 6.0)
