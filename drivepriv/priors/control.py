"""Differentiable transition, reward, termination and state priors for gymnasium's control tasks.

RGIA's priors (DESIGN.md section 2) for ``CartPole-v1``, ``Acrobot-v1``, ``MountainCar-v0``
and ``Pendulum-v1``: the equations of gymnasium 1.4.0 (``gymnasium/envs/classic_control``)
rewritten in torch, batched over (N, D) observations, in the dtype of the input (float64 to
match the simulator's own precision, float32 is within ~1e-6). The simulator's state is
recovered from the observation (angles by ``atan2`` of their cos/sin), stepped, and observed
again, so ``predict(s, one_hot(a))`` equals the simulator's next observation on real data
(checked in ``tests/envs/test_control.py``).

How an attacker sees the discontinuities (the choices below keep ``predict`` *exact* on real
data and give it useful gradients elsewhere):

* **Soft actions** (discrete tasks): ``actions`` is (N, A) probabilities; the prediction is the
  probability-weighted mixture of the next observations under each action. Exact for one-hot
  rows, linear in the probabilities, so the gradient with respect to an action probability is
  the next observation it would produce. Integer (N,) actions are accepted and one-hot encoded.
* **Velocity and position clips** (CartPole none, Acrobot ``MAX_VEL_1/2``, MountainCar
  ``max_speed`` and the track ends, Pendulum ``max_speed``): hard ``torch.clamp``, as the
  simulator; past a bound the clipped component has zero gradient (the simulator does not
  respond there either). :func:`control_state_penalty` keeps reconstructions inside the bounds.
* **MountainCar's left wall** (velocity reset to 0 when the car hits ``min_position`` moving
  left): a hard mask, no gradient through the reset; exact on real data.
* **Acrobot's angle wrapping** (``wrap(theta, -pi, pi)`` after each step) is *not* applied: the
  observation holds only cos/sin of the angles, which are 2 pi periodic, so wrapped and
  unwrapped angles give the same observation and ``predict`` stays smooth. The angles enter
  through ``atan2(sin, cos)``, smooth except at cos = sin = 0 (the state penalty's
  ``angle_norm`` term keeps reconstructions off it; ``atan2`` ignores the pair's norm).
* **Pendulum** never forms its angle in ``predict``: the next (cos, sin) are the normalised
  current pair rotated by ``theta_dot' dt`` (angle addition), smooth everywhere but the origin.
  The reward's ``angle_normalize(theta)^2`` uses ``theta = atan2(sin, cos)`` in [-pi, pi]; its
  square is continuous at +-pi. Agent actions are clipped to [-1, 1] and scaled to torque
  2 a (N m), as drivepriv's clients and gymnasium's ``RescaleAction`` do.
* **Termination**: ``terminated(next_states)`` is the hard test by default (exact); with
  ``temperature > 0`` it is ``sigmoid(margin / temperature)`` of a dimensionless margin
  (positive when terminated), for gradient-based attacks.
* **Rewards** are gymnasium's: CartPole 1 (``sutton_barto_reward``: -done), Acrobot
  ``done - 1``, MountainCar -1, Pendulum ``-(angle_normalize(theta)^2 + 0.1 theta_dot^2 +
  0.001 u^2)`` on the pre-step state and the torque. ``dones`` is the terminated flag (not
  truncation), hard or soft.

Task keyword arguments (``EnvConfig.config``: Pendulum ``g``, MountainCar ``goal_velocity``,
CartPole ``sutton_barto_reward``) are honoured by :func:`control_prior`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from drivepriv.envs.control import ANGLE_PAIRS, check_control_id, control_codec, env_kwargs
from drivepriv.errors import ConfigError, did_you_mean

#: Angle pairs may miss cos^2 + sin^2 = 1 by this much before the state penalty counts it
#: (float32 observations of real angles are off by ~1e-7).
ANGLE_NORM_TOL = 1e-5
_EPS = 1e-12


class ControlPrior:
    """Public knowledge of one control task: transition, reward, termination and feasible states.

    Subclasses implement :meth:`_step` (next observation under one action) and the rest.
    """

    env_id: str = ""
    obs_dim: int = 0
    #: Number of discrete actions (0: continuous).
    n_actions: int = 0
    #: Dimension of a continuous action (agent units, [-1, 1]).
    action_dim: int = 0

    def __init__(self, **config: Any) -> None:
        known = env_kwargs(self.env_id)
        for key in config:
            if key not in known:
                raise ConfigError(
                    f"{self.env_id} prior: unknown task setting '{key}'.{did_you_mean(key, known)} "
                    f"Settings {self.env_id} accepts: {', '.join(known) or 'none'}."
                )
        self.config: dict[str, Any] = {**known, **config}

    # -- actions ---------------------------------------------------------------------
    @property
    def discrete(self) -> bool:
        return self.n_actions > 0

    def action_probs(self, actions: Tensor, like: Tensor) -> Tensor:
        """Discrete tasks: (N,) integer actions or (N, A) probabilities -> (N, A) in ``like``'s dtype."""
        if not self.discrete:
            raise TypeError(f"{self.env_id} has continuous actions; no action probabilities")
        if actions.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
            return torch.nn.functional.one_hot(actions.long(), self.n_actions).to(like.dtype)
        if actions.shape[-1] != self.n_actions:
            raise ValueError(
                f"{self.env_id}: expected (N, {self.n_actions}) action probabilities or (N,) integers, "
                f"got shape {tuple(actions.shape)}"
            )
        return actions.to(like.dtype)

    # -- transition ------------------------------------------------------------------
    def _step(self, states: Tensor, action: Any) -> Tensor:
        raise NotImplementedError

    def predict(self, states: Tensor, actions: Tensor) -> Tensor:
        """Next observation (N, D) from observations (N, D) and actions.

        Discrete tasks: ``actions`` (N, A) probabilities (one-hot for real data) or (N,)
        integers; the result is the probability-weighted mixture of the next observations
        under each action. Continuous tasks: (N, d) agent actions, clipped to [-1, 1].
        """
        if self.discrete:
            p = self.action_probs(actions, states)
            out = 0.0
            for k in range(self.n_actions):
                out = out + p[..., k : k + 1] * self._step(states, k)
            return out
        return self._step(states, actions.to(states.dtype))

    # -- reward and termination ------------------------------------------------------
    def reward(self, states: Tensor, actions: Tensor, next_states: Tensor, dones: Tensor) -> Tensor:
        """The reward (N,) gymnasium returns for (s, a, s', terminated)."""
        raise NotImplementedError

    def termination_margin(self, next_states: Tensor) -> Tensor:
        """(N,) dimensionless margin, > 0 where the task terminates (used by the soft test)."""
        return torch.full(next_states.shape[:-1], -1.0, dtype=next_states.dtype, device=next_states.device)

    def _terminated_hard(self, next_states: Tensor) -> Tensor:
        return self.termination_margin(next_states) > 0

    def terminated(self, next_states: Tensor, temperature: float = 0.0) -> Tensor:
        """(N,) in {0, 1} where the task terminates in ``next_states``; soft
        ``sigmoid(margin / temperature)`` when ``temperature > 0``."""
        if temperature > 0:
            return torch.sigmoid(self.termination_margin(next_states) / temperature)
        return self._terminated_hard(next_states).to(next_states.dtype)

    def state_penalty(self, obs: Tensor) -> Tensor:
        """:func:`control_state_penalty` for this task."""
        return control_state_penalty(obs, self.env_id)


# ---------------------------------------------------------------------------------------
# CartPole-v1


class CartPolePrior(ControlPrior):
    """Cart-pole (Barto, Sutton & Anderson 1983) with gymnasium's explicit Euler step, tau = 0.02 s."""

    env_id = "CartPole-v1"
    obs_dim = 4
    n_actions = 2
    GRAVITY_MPS2 = 9.8
    MASS_CART_KG = 1.0
    MASS_POLE_KG = 0.1
    HALF_POLE_M = 0.5
    FORCE_N = 10.0
    TAU_S = 0.02
    X_LIMIT_M = 2.4
    THETA_LIMIT_RAD = 12 * 2 * math.pi / 360

    def _step(self, states: Tensor, action: Any) -> Tensor:
        x_m, v_mps, th_rad, w_radps = states.unbind(-1)
        force_n = self.FORCE_N if action == 1 else -self.FORCE_N
        m_total = self.MASS_CART_KG + self.MASS_POLE_KG
        ml = self.MASS_POLE_KG * self.HALF_POLE_M
        cos_t, sin_t = torch.cos(th_rad), torch.sin(th_rad)
        # Pole angular and cart accelerations from the cart-pole equations of motion.
        common = (force_n + ml * w_radps**2 * sin_t) / m_total
        denom = self.HALF_POLE_M * (4.0 / 3.0 - self.MASS_POLE_KG * cos_t**2 / m_total)
        alpha = (self.GRAVITY_MPS2 * sin_t - cos_t * common) / denom
        acc = common - ml * alpha * cos_t / m_total
        dt = self.TAU_S
        return torch.stack([x_m + dt * v_mps, v_mps + dt * acc, th_rad + dt * w_radps, w_radps + dt * alpha], -1)

    def reward(self, states: Tensor, actions: Tensor, next_states: Tensor, dones: Tensor) -> Tensor:
        d = dones.to(next_states.dtype)
        if self.config.get("sutton_barto_reward"):
            return -d
        return torch.ones_like(d)

    def termination_margin(self, next_states: Tensor) -> Tensor:
        x = next_states[..., 0].abs() / self.X_LIMIT_M
        th = next_states[..., 2].abs() / self.THETA_LIMIT_RAD
        return torch.maximum(x, th) - 1.0

    def _terminated_hard(self, next_states: Tensor) -> Tensor:
        return (next_states[..., 0].abs() > self.X_LIMIT_M) | (next_states[..., 2].abs() > self.THETA_LIMIT_RAD)


# ---------------------------------------------------------------------------------------
# Acrobot-v1


class AcrobotPrior(ControlPrior):
    """Two-link acrobot (Sutton 1996, "book" dynamics), one RK4 step of dt = 0.2 s."""

    env_id = "Acrobot-v1"
    obs_dim = 6
    n_actions = 3
    DT_S = 0.2
    LINK1_M = 1.0
    COM1_M = 0.5
    COM2_M = 0.5
    MASS1_KG = 1.0
    MASS2_KG = 1.0
    INERTIA = 1.0
    GRAVITY_MPS2 = 9.8
    MAX_VEL1_RADPS = 4 * math.pi
    MAX_VEL2_RADPS = 9 * math.pi
    TORQUES = (-1.0, 0.0, 1.0)

    def _deriv(self, th1: Tensor, th2: Tensor, w1: Tensor, w2: Tensor, torque: float) -> tuple[Tensor, ...]:
        m1, m2, l1, c1, c2, inertia, g = (
            self.MASS1_KG, self.MASS2_KG, self.LINK1_M, self.COM1_M, self.COM2_M, self.INERTIA, self.GRAVITY_MPS2,
        )
        cos2, sin2 = torch.cos(th2), torch.sin(th2)
        h = m2 * l1 * c2  # coupling coefficient
        # Inertia terms of the manipulator equation.
        d11 = m1 * c1**2 + m2 * (l1**2 + c2**2 + 2.0 * l1 * c2 * cos2) + 2.0 * inertia
        d12 = m2 * (c2**2 + l1 * c2 * cos2) + inertia
        # Gravity (cos(x - pi/2) = sin x) and Coriolis terms.
        grav2 = m2 * c2 * g * torch.sin(th1 + th2)
        bias1 = -h * w2**2 * sin2 - 2.0 * h * w2 * w1 * sin2 + (m1 * c1 + m2 * l1) * g * torch.sin(th1) + grav2
        acc2 = (torque + d12 / d11 * bias1 - h * w1**2 * sin2 - grav2) / (m2 * c2**2 + inertia - d12**2 / d11)
        acc1 = -(d12 * acc2 + bias1) / d11
        return w1, w2, acc1, acc2

    def _step(self, states: Tensor, action: Any) -> Tensor:
        torque = self.TORQUES[action]
        y0 = (
            torch.atan2(states[..., 1], states[..., 0]),
            torch.atan2(states[..., 3], states[..., 2]),
            states[..., 4],
            states[..., 5],
        )
        h = self.DT_S
        k1 = self._deriv(*y0, torque)
        k2 = self._deriv(*(y + 0.5 * h * k for y, k in zip(y0, k1)), torque)
        k3 = self._deriv(*(y + 0.5 * h * k for y, k in zip(y0, k2)), torque)
        k4 = self._deriv(*(y + h * k for y, k in zip(y0, k3)), torque)
        th1, th2, w1, w2 = (y + h / 6.0 * (a + 2.0 * b + 2.0 * c + d) for y, a, b, c, d in zip(y0, k1, k2, k3, k4))
        # No angle wrapping: cos/sin are 2 pi periodic (see the module docstring).
        w1 = w1.clamp(-self.MAX_VEL1_RADPS, self.MAX_VEL1_RADPS)
        w2 = w2.clamp(-self.MAX_VEL2_RADPS, self.MAX_VEL2_RADPS)
        return torch.stack([torch.cos(th1), torch.sin(th1), torch.cos(th2), torch.sin(th2), w1, w2], -1)

    def tip_height_m(self, obs: Tensor) -> Tensor:
        """Height (N,) of the tip above the pivot in link lengths: ``-cos th1 - cos(th1 + th2)``."""
        c1, s1, c2, s2 = obs[..., 0], obs[..., 1], obs[..., 2], obs[..., 3]
        return -c1 - (c1 * c2 - s1 * s2)

    def reward(self, states: Tensor, actions: Tensor, next_states: Tensor, dones: Tensor) -> Tensor:
        return dones.to(next_states.dtype) - 1.0

    def termination_margin(self, next_states: Tensor) -> Tensor:
        return self.tip_height_m(next_states) - 1.0


# ---------------------------------------------------------------------------------------
# MountainCar-v0


class MountainCarPrior(ControlPrior):
    """Mountain car (Moore 1990) with gymnasium's discrete push of 0.001 and gravity 0.0025."""

    env_id = "MountainCar-v0"
    obs_dim = 2
    n_actions = 3
    MIN_POSITION_M = -1.2
    MAX_POSITION_M = 0.6
    MAX_SPEED_MPS = 0.07
    GOAL_POSITION_M = 0.5
    FORCE = 0.001
    GRAVITY = 0.0025

    def _step(self, states: Tensor, action: Any) -> Tensor:
        pos, vel = states.unbind(-1)
        vel = vel + (action - 1) * self.FORCE - self.GRAVITY * torch.cos(3.0 * pos)
        vel = vel.clamp(-self.MAX_SPEED_MPS, self.MAX_SPEED_MPS)
        pos = (pos + vel).clamp(self.MIN_POSITION_M, self.MAX_POSITION_M)
        # Inelastic left wall: the car stops there (hard mask, no gradient through the reset).
        at_wall = (pos <= self.MIN_POSITION_M) & (vel < 0)
        vel = torch.where(at_wall, torch.zeros_like(vel), vel)
        return torch.stack([pos, vel], -1)

    def reward(self, states: Tensor, actions: Tensor, next_states: Tensor, dones: Tensor) -> Tensor:
        return torch.full(next_states.shape[:-1], -1.0, dtype=next_states.dtype, device=next_states.device)

    def termination_margin(self, next_states: Tensor) -> Tensor:
        goal_v = float(self.config.get("goal_velocity", 0.0))
        span_pos = self.MAX_POSITION_M - self.MIN_POSITION_M
        return torch.minimum(
            (next_states[..., 0] - self.GOAL_POSITION_M) / span_pos,
            (next_states[..., 1] - goal_v) / (2 * self.MAX_SPEED_MPS),
        )

    def _terminated_hard(self, next_states: Tensor) -> Tensor:
        goal_v = float(self.config.get("goal_velocity", 0.0))
        return (next_states[..., 0] >= self.GOAL_POSITION_M) & (next_states[..., 1] >= goal_v)


# ---------------------------------------------------------------------------------------
# Pendulum-v1


class PendulumPrior(ControlPrior):
    """Inverted pendulum swing-up, semi-implicit Euler with dt = 0.05 s; agent action a -> torque 2 a."""

    env_id = "Pendulum-v1"
    obs_dim = 3
    action_dim = 1
    MAX_SPEED_RADPS = 8.0
    MAX_TORQUE_NM = 2.0
    DT_S = 0.05
    MASS_KG = 1.0
    LENGTH_M = 1.0

    def torque_nm(self, actions: Tensor) -> Tensor:
        """(N, 1) agent actions -> (N,) torque: clip to [-1, 1], scale to [-2, 2] N m."""
        return actions[..., 0].clamp(-1.0, 1.0) * self.MAX_TORQUE_NM

    def _step(self, states: Tensor, action: Any) -> Tensor:
        c, s, w = states.unbind(-1)
        r = torch.sqrt(c**2 + s**2 + _EPS)
        c, s = c / r, s / r
        g = float(self.config.get("g", 10.0))
        m, ell = self.MASS_KG, self.LENGTH_M
        u = self.torque_nm(action)
        w_next = w + (3.0 * g / (2.0 * ell) * s + 3.0 / (m * ell**2) * u) * self.DT_S
        w_next = w_next.clamp(-self.MAX_SPEED_RADPS, self.MAX_SPEED_RADPS)
        dth = w_next * self.DT_S
        cd, sd = torch.cos(dth), torch.sin(dth)
        return torch.stack([c * cd - s * sd, s * cd + c * sd, w_next], -1)

    def reward(self, states: Tensor, actions: Tensor, next_states: Tensor, dones: Tensor) -> Tensor:
        th = torch.atan2(states[..., 1], states[..., 0])  # angle_normalize(theta), in [-pi, pi]
        u = self.torque_nm(actions.to(states.dtype))
        return -(th**2 + 0.1 * states[..., 2] ** 2 + 0.001 * u**2)


_PRIORS: dict[str, type[ControlPrior]] = {
    p.env_id: p for p in (CartPolePrior, AcrobotPrior, MountainCarPrior, PendulumPrior)
}


def control_prior(env_id: str, config: Mapping[str, Any] | None = None) -> ControlPrior:
    """The prior of a control task; ``config`` is ``EnvConfig.config`` (task keyword arguments)."""
    check_control_id(env_id)
    return _PRIORS[env_id](**dict(config or {}))


# ---------------------------------------------------------------------------------------
# State feasibility


def control_state_penalty_terms(obs: Tensor, env_id: str) -> dict[str, Tensor]:
    """Named non-negative terms (N,) of :func:`control_state_penalty`.

    ``bounds``: squared excess over the observation space's finite bounds (positions,
    velocities, cos/sin in [-1, 1]); ``angle_norm``: ``(cos^2 + sin^2 - 1)^2`` per angle pair,
    past a dead band of :data:`ANGLE_NORM_TOL` so float32 observations of real angles score 0.
    """
    codec = control_codec(env_id)
    if obs.shape[-1] != codec.obs_dim:
        raise ValueError(f"{env_id}: expected observations (N, {codec.obs_dim}), got shape {tuple(obs.shape)}")
    lo = torch.tensor([f.low for f in codec.features], dtype=obs.dtype, device=obs.device)
    hi = torch.tensor([f.high for f in codec.features], dtype=obs.dtype, device=obs.device)
    zero = torch.zeros((), dtype=obs.dtype, device=obs.device)
    below = torch.where(torch.isfinite(lo), torch.relu(lo - obs), zero)
    above = torch.where(torch.isfinite(hi), torch.relu(obs - hi), zero)
    terms = {"bounds": (below**2 + above**2).sum(-1)}
    norm = torch.zeros(obs.shape[:-1], dtype=obs.dtype, device=obs.device)
    for cos_name, sin_name in ANGLE_PAIRS[env_id].values():
        c, s = obs[..., codec.index(cos_name)], obs[..., codec.index(sin_name)]
        norm = norm + torch.relu((c**2 + s**2 - 1.0).abs() - ANGLE_NORM_TOL) ** 2
    terms["angle_norm"] = norm
    return terms


def control_state_penalty(obs: Tensor, env_id: str) -> Tensor:
    """(N,) non-negative penalty, 0 on every observation the task can emit (see :func:`control_state_penalty_terms`)."""
    return sum(control_state_penalty_terms(obs, env_id).values())  # type: ignore[return-value]
