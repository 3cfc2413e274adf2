"""What each simulator's public knowledge gives the attacker's priors: the entry points that
:class:`drivepriv.envs.backends.Backend` names as ``priors``.

Each builder takes ``(env config, env, codec, continuous actions)`` (the env reset at the
attacker's road seed) and returns :class:`BackendPriors`; what it leaves None
(``reward``, ``dynamics``) the pipeline learns from the attacker's own rollouts.

- highway-env: road geometry, the reward function and vehicle kinematics in closed form
  (Kinematics observation); the flattened goal observation (parking) gets its box only.
- gymnasium control tasks: their exact equations (transition, reward) stand for both
  transition priors.
- MetaDrive (Bullet physics): the observation's feasibility constraints; transition and
  reward models learned.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from drivepriv.priors.physics import KinematicPrior
from drivepriv.priors.reward import ObservationReward, make_reward
from drivepriv.priors.road import RoadGeometry
from drivepriv.priors.state import box_penalty, state_penalty

if TYPE_CHECKING:
    from drivepriv.config import EnvConfig

log = logging.getLogger(__name__)


@dataclass
class BackendPriors:
    """A backend's contribution to the attacker's priors (None: learned from its rollouts)."""

    state_penalty: Callable[[Any], Any]
    road: RoadGeometry | None = None
    reward: Callable[..., Any] | None = None
    physics: Callable[..., Any] | None = None
    dynamics: Callable[..., Any] | None = None


def physics_prior(env, codec, road):
    """The closed-form kinematic prior's ``predict``, or None where it does not apply."""
    try:
        return KinematicPrior.from_env(env, codec, road).predict
    except (ValueError, NotImplementedError) as e:
        log.info("no physics prior for %s: %s", env.spec.id if env.spec else env, e)
        return None


def box_priors(env_cfg: "EnvConfig", env, codec, continuous: bool) -> BackendPriors:
    """Only the observation's box; reward and transition learned (any flat observation)."""
    return BackendPriors(lambda obs: box_penalty(obs, codec))


def highway_priors(env_cfg: "EnvConfig", env, codec, continuous: bool) -> BackendPriors:
    """highway-env: road, reward function and kinematics in closed form (Kinematics observation);
    the flattened goal observation (parking): :func:`box_priors`."""
    if not codec.has_positions:
        return box_priors(env_cfg, env, codec, continuous)
    road = RoadGeometry.from_env(env)
    fn = make_reward(env_cfg, env)
    reward = ObservationReward(fn, codec) if fn is not None else None
    physics = physics_prior(env, codec, road) if not continuous else None
    return BackendPriors(lambda obs: state_penalty(obs, codec, road), road=road, reward=reward, physics=physics)


def control_priors(env_cfg: "EnvConfig", env, codec, continuous: bool) -> BackendPriors:
    """gymnasium control tasks: the exact transition and reward."""
    from drivepriv.priors.control import control_prior, control_state_penalty

    exact = control_prior(env_cfg.id, env_cfg.config)
    return BackendPriors(lambda obs: control_state_penalty(obs, env_cfg.id), reward=exact.reward, physics=exact.predict, dynamics=exact.predict)


def metadrive_priors(env_cfg: "EnvConfig", env, codec, continuous: bool) -> BackendPriors:
    """MetaDrive: the lidar-and-state observation's feasibility; reward and transition learned."""
    from drivepriv.priors.metadrive import metadrive_state_penalty

    return BackendPriors(lambda obs: metadrive_state_penalty(obs, codec))


__all__ = ["BackendPriors", "box_priors", "control_priors", "highway_priors", "metadrive_priors", "physics_prior"]
