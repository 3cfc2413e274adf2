"""Differentiable reimplementations of the simulators' reward functions, by environment id.

RGIA's reward regularizer (DESIGN.md section 2) compares a reconstructed reward with the
scenario's own reward function evaluated on the reconstructed next state, action and done
flag. The reward is public knowledge: it is the simulator's source code, with the weights
of the environment's public configuration (``env.unwrapped.config``), so scenario overrides
are honoured.

Every reward function takes

- ``next_world`` (B, V, F): the next observation decoded to physical units with every row in
  world coordinates (``codec.decode_world(next_obs)``); highway-env computes the reward after
  the step, on the next state;
- ``action_probs`` (B, A): a probability vector over the discrete actions (one-hot for real data);
- ``done`` (B,): the terminated flag in [0, 1] (not truncation);
- ``temperature`` (metres): the softness of the discrete decisions (closest lane, crash test,
  on-road test). ``temperature <= 0`` is the exact, hard evaluation (argmin, step functions),
  which matches highway-env on real transitions; positive values give useful gradients.

Discrete quantities the simulator keeps but does not observe are inferred from the
observation; each reward class states how and what it cannot see.
"""

from __future__ import annotations

from drivepriv.config import EnvConfig
from drivepriv.priors.reward.base import DEFAULT_TEMPERATURE_M, REWARDS, RewardFunction, lmap, log, soft_step
from drivepriv.priors.reward.highway import HighwayReward, MergeReward
from drivepriv.priors.reward.junctions import IntersectionReward, RoundaboutReward
from drivepriv.priors.road import RoadGeometry


def make_reward(env_cfg: EnvConfig, env) -> RewardFunction | None:
    """The reward prior of the scenario's environment, or None when drivepriv has none for it yet.

    The weights come from ``env.unwrapped.config`` (so scenario overrides are honoured) and the
    road from the environment's road network (the env is reset with seed 0 if it has none).
    """
    if env_cfg.id not in REWARDS:
        log.info("no reward prior for %s (known: %s); the reward regularizer is off", env_cfg.id, ", ".join(REWARDS.names()))
        return None
    from drivepriv.envs.highway import make_codec

    cls = REWARDS.get(env_cfg.id)
    road = RoadGeometry.from_env(env)
    return cls(make_codec(env_cfg), road, env.unwrapped.config)


class ObservationReward:
    """A scenario's reward as a prior on observations: ``r(s, a, s', done)`` (normalised
    Kinematics observations), the reward function applied to the decoded next state."""

    def __init__(self, reward: RewardFunction, codec) -> None:
        self.reward = reward
        self.codec = codec

    def __call__(self, states, action_probs, next_states, dones):
        return self.reward(self.codec.decode_world(next_states), action_probs, dones)


__all__ = [
    "DEFAULT_TEMPERATURE_M", "REWARDS", "HighwayReward", "IntersectionReward", "MergeReward", "ObservationReward",
    "RewardFunction", "RoundaboutReward", "lmap", "make_reward", "soft_step",
]
