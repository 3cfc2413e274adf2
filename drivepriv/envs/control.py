"""gymnasium's classic control tasks as a drivepriv backend (``EnvConfig.backend = "control"``).

Four tasks, from gymnasium 1.4.0 (``gymnasium/envs/classic_control``):

=================  ========================================================  ====================
id                 observation (named features, physical units)              actions
=================  ========================================================  ====================
``CartPole-v1``    x (m), x_dot (m/s), theta (rad), theta_dot (rad/s)        Discrete(2)
``Acrobot-v1``     cos1, sin1, cos2, sin2, theta1_dot, theta2_dot (rad/s)    Discrete(3)
``MountainCar-v0`` position (m), velocity (m/s)                              Discrete(3)
``Pendulum-v1``    cos, sin, theta_dot (rad/s)                               Box(-1, 1, (1,))
=================  ========================================================  ====================

Every observation is already in physical units (codec scale 1, offset 0). Pendulum's torque
in [-2, 2] N m is exposed as an agent action in [-1, 1] (gymnasium's ``RescaleAction``:
torque = 2 * action); drivepriv's clients clip actions to [-1, 1] before stepping.

:class:`ControlStepper` steps the *real* simulator from any observation (it sets the
simulator's internal state from the observation): the ground truth of the transition prior,
and the "dynamics residual" metric (how far a reconstructed next state is from what the
simulator does from the reconstructed state and action).
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.wrappers import RescaleAction

from drivepriv.config import EnvConfig
from drivepriv.envs.vector import VectorCodec, VectorFeature
from drivepriv.errors import ConfigError, did_you_mean

log = logging.getLogger(__name__)

#: The control tasks drivepriv supports (gymnasium ids).
CONTROL_TASKS: tuple[str, ...] = ("CartPole-v1", "Acrobot-v1", "MountainCar-v0", "Pendulum-v1")
#: Tasks with a continuous action, exposed as Box(-1, 1).
CONTINUOUS_TASKS: tuple[str, ...] = ("Pendulum-v1",)
#: Pendulum-v1 ``max_torque`` (N m): agent action a in [-1, 1] -> torque 2 a.
PENDULUM_MAX_TORQUE_NM = 2.0

_RENDER_MODES = (None, "rgb_array", "human")


def check_control_id(env_id: str, where: str = "env.id") -> None:
    """Raise :class:`ConfigError` unless ``env_id`` is one of :data:`CONTROL_TASKS`."""
    if env_id not in CONTROL_TASKS:
        raise ConfigError(
            f"{where}: unknown control task '{env_id}'.{did_you_mean(env_id, CONTROL_TASKS)} "
            f"The control backend supports: {', '.join(CONTROL_TASKS)}."
        )


def env_kwargs(env_id: str) -> dict[str, Any]:
    """The keyword arguments the task's gymnasium class accepts (``render_mode`` excluded), with defaults."""
    check_control_id(env_id)
    entry = gym.spec(env_id).entry_point
    cls = gym.envs.registration.load_env_creator(entry) if isinstance(entry, str) else entry
    out: dict[str, Any] = {}
    for name, p in inspect.signature(cls.__init__).parameters.items():
        if name in ("self", "render_mode") or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        out[name] = p.default
    return out


def validate_control_config(cfg: EnvConfig, where: str = "env") -> None:
    """Check the id and the ``config`` keys of a control :class:`EnvConfig`; raise :class:`ConfigError`."""
    if cfg.backend != "control":
        raise ConfigError(f"{where}.backend: expected 'control' for a gymnasium control task, got '{cfg.backend}'")
    check_control_id(cfg.id, f"{where}.id")
    known = env_kwargs(cfg.id)
    for key in cfg.config:
        if key == "render_mode":
            raise ConfigError(
                f"{where}.config.render_mode: the render mode is not a configuration key; "
                "drivepriv sets it where it renders (make_control_env(..., render_mode=...))."
            )
        if key not in known:
            listing = ", ".join(known) if known else "none"
            raise ConfigError(
                f"{where}.config: unknown key '{key}' for {cfg.id}.{did_you_mean(key, known)} "
                f"Keys {cfg.id} accepts: {listing}."
            )
    if cfg.max_episode_steps < 0:
        raise ConfigError(f"{where}.max_episode_steps: expected an integer >= 0, got {cfg.max_episode_steps}")


def make_control_env(cfg: EnvConfig, render_mode: str | None = None) -> gym.Env:
    """Build the gymnasium control task of ``cfg``.

    ``cfg.config`` holds keyword arguments of the task's class (e.g. ``g`` for Pendulum-v1,
    ``goal_velocity`` for MountainCar-v0, ``sutton_barto_reward`` for CartPole-v1); unknown
    ones raise :class:`ConfigError` with a "did you mean". ``cfg.max_episode_steps`` truncates
    episodes (0: the task's own limit). Continuous actions are exposed as Box(-1, 1).
    ``render_mode="rgb_array"`` works headless (pygame draws to an off-screen surface).
    """
    validate_control_config(cfg)
    if render_mode not in _RENDER_MODES:
        raise ConfigError(f"render_mode: expected one of {_RENDER_MODES}, got {render_mode!r}")
    kwargs: dict[str, Any] = dict(cfg.config)
    if cfg.max_episode_steps > 0:
        kwargs["max_episode_steps"] = cfg.max_episode_steps
    env = gym.make(cfg.id, render_mode=render_mode, **kwargs)
    if cfg.id in CONTINUOUS_TASKS:
        env = RescaleAction(env, np.float32(-1.0), np.float32(1.0))
    log.debug("made %s (config %s, max_episode_steps %s)", cfg.id, cfg.config, cfg.max_episode_steps)
    return env


# ---------------------------------------------------------------------------------------
# Observation codecs


@functools.cache
def _bounds(env_id: str) -> tuple[np.ndarray, np.ndarray]:
    space = gym.make(env_id).observation_space
    return np.asarray(space.low, dtype=np.float64), np.asarray(space.high, dtype=np.float64)


_LAYOUT: dict[str, tuple[tuple[str, str, str], ...]] = {
    # name, unit, group
    "CartPole-v1": (("x", "m", ""), ("x_dot", "m/s", ""), ("theta", "rad", ""), ("theta_dot", "rad/s", "")),
    "Acrobot-v1": (
        ("cos1", "", "link1"),
        ("sin1", "", "link1"),
        ("cos2", "", "link2"),
        ("sin2", "", "link2"),
        ("theta1_dot", "rad/s", ""),
        ("theta2_dot", "rad/s", ""),
    ),
    # MountainCar's units are nominal: gymnasium calls them position and velocity, one step = one time unit.
    "MountainCar-v0": (("position", "m", ""), ("velocity", "m/s", "")),
    "Pendulum-v1": (("cos", "", "angle"), ("sin", "", "angle"), ("theta_dot", "rad/s", "")),
}

#: Angle groups: group name -> (cos feature, sin feature). Scored as an angle (rad) by :func:`state_errors`.
ANGLE_PAIRS: dict[str, dict[str, tuple[str, str]]] = {
    "CartPole-v1": {},
    "Acrobot-v1": {"link1": ("cos1", "sin1"), "link2": ("cos2", "sin2")},
    "MountainCar-v0": {},
    "Pendulum-v1": {"angle": ("cos", "sin")},
}


@functools.cache
def control_codec(env_id: str) -> VectorCodec:
    """The codec of a control task's observation: every element named, with unit, group and bounds.

    The observations are physical already (scale 1, offset 0). ``low``/``high`` are the
    observation space's bounds (CartPole's velocities are unbounded: +-inf). cos/sin pairs
    share a group (``link1``, ``link2``, ``angle``) so the metrics can report one angle error.
    """
    check_control_id(env_id)
    low, high = _bounds(env_id)
    feats = tuple(
        VectorFeature(name=n, unit=u, low=float(lo), high=float(hi), group=g)
        for (n, u, g), lo, hi in zip(_LAYOUT[env_id], low, high, strict=True)
    )
    return VectorCodec(features=feats)


# ---------------------------------------------------------------------------------------
# Internal state <-> observation


def obs_to_state(env_id: str, obs: np.ndarray) -> np.ndarray:
    """The simulator's internal state (float64) from observations (..., D) -> (..., S).

    CartPole and MountainCar: the observation itself. Acrobot: (theta1, theta2, theta1_dot,
    theta2_dot) with the angles from ``atan2(sin, cos)`` in [-pi, pi] (the simulator wraps them
    the same way). Pendulum: (theta, theta_dot) with theta = ``atan2(sin, cos)`` (the simulator
    does not wrap theta, but only its cos/sin and ``angle_normalize(theta)`` are ever used).
    """
    check_control_id(env_id)
    o = np.asarray(obs, dtype=np.float64)
    if env_id in ("CartPole-v1", "MountainCar-v0"):
        return o.copy()
    if env_id == "Acrobot-v1":
        return np.stack(
            [np.arctan2(o[..., 1], o[..., 0]), np.arctan2(o[..., 3], o[..., 2]), o[..., 4], o[..., 5]], axis=-1
        )
    return np.stack([np.arctan2(o[..., 1], o[..., 0]), o[..., 2]], axis=-1)


def _wrap_angle(x: np.ndarray) -> np.ndarray:
    return (x + math.pi) % (2.0 * math.pi) - math.pi


#: Which entries of :func:`obs_to_state` are angles (compared modulo 2 pi).
_STATE_ANGLES: dict[str, tuple[int, ...]] = {
    "CartPole-v1": (),  # theta is bounded (|theta| < 0.42 rad), never wraps
    "Acrobot-v1": (0, 1),
    "MountainCar-v0": (),
    "Pendulum-v1": (0,),
}


def state_distance(env_id: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distance (...,) between two observations (..., D) over the physical state.

    The state is :func:`obs_to_state`: angles compared as angles (difference wrapped to
    [-pi, pi], rad), other entries in their own units (m, m/s, rad/s), all in one sum of squares.
    """
    sa, sb = obs_to_state(env_id, a), obs_to_state(env_id, b)
    d = sa - sb
    for i in _STATE_ANGLES[env_id]:
        d[..., i] = _wrap_angle(d[..., i])
    return np.sqrt((d**2).sum(-1))


class ControlStepper:
    """Step the real gymnasium simulator once from any observation.

    ``step(obs, action)`` sets the simulator's internal state from ``obs``
    (:func:`obs_to_state`) and calls ``env.step(action)`` through the same wrappers as
    :func:`make_control_env` (Pendulum: agent action in [-1, 1], clipped here). Exact on real
    observations up to the float32 rounding of the observation (the simulator keeps float64).
    """

    def __init__(self, env_cfg: EnvConfig) -> None:
        validate_control_config(env_cfg)
        self.env_id = env_cfg.id
        # No time limit: the stepper may step one env any number of times.
        cfg = EnvConfig(backend="control", id=env_cfg.id, config=dict(env_cfg.config), max_episode_steps=0)
        self.env = make_control_env(cfg)
        self.env.reset(seed=0)
        self.continuous = env_cfg.id in CONTINUOUS_TASKS

    def _set_state(self, obs: np.ndarray) -> None:
        u = self.env.unwrapped
        state = obs_to_state(self.env_id, obs)
        if self.env_id == "MountainCar-v0":
            u.state = (float(state[0]), float(state[1]))
        else:
            u.state = state
        if self.env_id == "CartPole-v1":
            u.steps_beyond_terminated = None  # no "stepping after termination" warning

    def _action(self, action: Any) -> Any:
        if self.continuous:
            return np.clip(np.asarray(action, dtype=np.float32).reshape(-1), -1.0, 1.0)
        a = np.asarray(action)
        if a.ndim > 0:  # probabilities / one-hot
            a = a.argmax(-1)
        return int(a)

    def step(self, obs: np.ndarray, action: Any) -> np.ndarray:
        """Next observation (D,) float32 from observation (D,) and action (int, or (d,) in [-1, 1])."""
        self._set_state(np.asarray(obs))
        next_obs, *_ = self.env.step(self._action(action))
        return np.asarray(next_obs, dtype=np.float32)

    def step_batch(self, states: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """:meth:`step` over a batch: (N, D), (N,) or (N, d) or (N, A) one-hot -> (N, D)."""
        states = np.asarray(states)
        actions = np.asarray(actions)
        if len(states) != len(actions):
            raise ValueError(f"states and actions differ in length: {len(states)} vs {len(actions)}")
        return np.stack([self.step(s, a) for s, a in zip(states, actions)]) if len(states) else states.astype(np.float32)

    def residual(self, states: np.ndarray, actions: np.ndarray, next_states: np.ndarray) -> np.ndarray:
        """Dynamics residual (N,): :func:`state_distance` between ``next_states`` and the simulator's
        next states from (``states``, ``actions``). 0 (to float32 rounding) on real transitions.

        Discrete actions: ints (N,) or probability rows (N, A) (argmax taken); Pendulum: (N, 1) in [-1, 1].
        """
        sim = self.step_batch(states, actions)
        return state_distance(self.env_id, np.asarray(next_states), sim)

    def close(self) -> None:
        self.env.close()
