"""The base of every reward prior: the soft decisions, the :class:`RewardFunction` interface and
the registry by environment id (see :mod:`drivepriv.priors.reward`)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from drivepriv.priors.road import LaneCoordinates, RoadGeometry
from drivepriv.envs.codec import ObservationCodec
from drivepriv.registry import Registry

log = logging.getLogger(__name__)

#: Default softness (m) of the closest-lane and step decisions of the soft rewards.
DEFAULT_TEMPERATURE_M = 0.25
#: ``AbstractLane.VEHICLE_LENGTH``: the on-lane test's margin past the lane's ends (m).
VEHICLE_LENGTH_M = 5.0


def soft_step(x: Tensor, temperature: float) -> Tensor:
    """Heaviside step ``[x >= 0]``; a sigmoid of width ``temperature`` when it is positive."""
    if temperature <= 0.0:
        return (x >= 0).to(x.dtype)
    return torch.sigmoid(x / temperature)


def lmap(v: Tensor, x: tuple[float, float], y: tuple[float, float]) -> Tensor:
    """highway-env's ``utils.lmap``: linear map of ``v`` from range ``x`` to range ``y`` (no clipping)."""
    return y[0] + (v - x[0]) * (y[1] - y[0]) / (x[1] - x[0])


class RewardFunction:
    """A scenario's reward as a differentiable function of (next_world, action_probs, done).

    Subclasses implement :meth:`components` (highway-env's ``_rewards``: named terms) and
    :meth:`combine` (``_reward``: the weighted, normalised sum).
    """

    #: Environment ids this reward reproduces (set by the subclasses).
    env_ids: tuple[str, ...] = ()

    def __init__(self, codec: ObservationCodec, road: RoadGeometry, config: dict[str, Any]) -> None:
        self.codec = codec
        self.road = road
        self.config = dict(config)
        self._has_heading = "cos_h" in codec.features and "sin_h" in codec.features

    def __call__(
        self, next_world: Tensor, action_probs: Tensor, done: Tensor, temperature: float = DEFAULT_TEMPERATURE_M
    ) -> Tensor:
        """(B,) reward of each transition; ``temperature <= 0`` evaluates it exactly."""
        return self.combine(self.components(next_world, action_probs, done, temperature))

    def components(
        self, next_world: Tensor, action_probs: Tensor, done: Tensor, temperature: float = DEFAULT_TEMPERATURE_M
    ) -> dict[str, Tensor]:
        """The named reward terms (as in highway-env's ``info["rewards"]``), each (B,)."""
        raise NotImplementedError

    def combine(self, terms: dict[str, Tensor]) -> Tensor:
        """The scalar reward from the named terms."""
        raise NotImplementedError

    # Helpers on decoded world rows -------------------------------------------------------

    def feature(self, world: Tensor, name: str) -> Tensor:
        """(..., V) one feature of every row."""
        return world[..., self.codec.index(name)]

    def heading_rad(self, world: Tensor) -> Tensor | None:
        """(..., V) heading of every row from (cos_h, sin_h); None when the layout has no heading."""
        if not self._has_heading:
            return None
        return torch.atan2(self.feature(world, "sin_h"), self.feature(world, "cos_h"))

    def xy_m(self, world: Tensor) -> Tensor:
        """(..., V, 2) world positions."""
        return torch.stack([self.feature(world, "x"), self.feature(world, "y")], -1)

    def lane_weights(self, world: Tensor, temperature: float) -> Tensor:
        """(..., V, n_lanes) soft closest lane (highway-env ``lane_index``) of every row."""
        return self.road.closest_lane_weights(self.xy_m(world), self.heading_rad(world), temperature)


REWARDS: Registry[type[RewardFunction]] = Registry("reward function")


def register_reward(cls: type[RewardFunction]) -> type[RewardFunction]:
    for env_id in cls.env_ids:
        REWARDS.register(env_id)(cls)
    return cls


def lane_on_road(reward: RewardFunction, xy: Tensor, weights: Tensor, temperature: float, coords: LaneCoordinates | None = None) -> Tensor:
    """(B,) highway-env ``vehicle.on_road`` = ``lane.on_lane(position)`` on the closest lane.

    ``on_lane``: |lateral| <= width / 2 and -VEHICLE_LENGTH <= s < length + VEHICLE_LENGTH
    (VEHICLE_LENGTH = 5 m), evaluated on every lane and weighted by the closest-lane weights
    ``weights`` (B, L) (``vehicle.lane`` is the closest lane, by position and heading, set by
    ``Vehicle.on_state_update`` at the end of every simulation frame).
    """
    road = reward.road
    c = road.lane_local_coordinates(xy) if coords is None else coords
    margin = VEHICLE_LENGTH_M
    on_lane = (
        soft_step(road.lane_widths_m(xy) / 2.0 - c.lateral_abs_m, temperature)
        * soft_step(c.s_m + margin, temperature)
        * soft_step(road.lane_lengths_m(xy) + margin - c.s_m, temperature)
    )
    return (weights * on_lane).sum(-1)
