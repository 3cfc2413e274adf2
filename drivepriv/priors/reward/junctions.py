"""highway-env's roundabout and intersection rewards, differentiable (see :mod:`drivepriv.priors.reward`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from drivepriv.envs.codec import ObservationCodec
from drivepriv.priors.reward.base import DEFAULT_TEMPERATURE_M, RewardFunction, lmap, log, lane_on_road, register_reward, soft_step
from drivepriv.priors.road import RoadGeometry


@register_reward
class RoundaboutReward(RewardFunction):
    """``RoundaboutEnv._reward`` (highway_env/envs/roundabout_env.py), differentiable.

    Terms (``RoundaboutEnv._rewards``), on the state after the step:

    - ``collision_reward`` = ego crashed = ``done``: roundabout terminates only on a crash
      (``_is_terminated`` is ``vehicle.crashed``), so this is exact.
    - ``high_speed_reward`` = ``MDPVehicle.get_speed_index(ego) / (DEFAULT_TARGET_SPEEDS.size - 1)``.
      The ego is an ``MDPVehicle``, so this is its ``speed_index`` (the index of its *target*
      speed among the action's ``target_speeds``, by default [0, 8, 16] m/s) divided by 2
      (``MDPVehicle.DEFAULT_TARGET_SPEEDS`` = linspace(20, 30, 3) has 3 entries, whatever the
      configured target speeds). ``speed_index`` is not observed; it is inferred as
      ``speed_to_index(speed of the next state)`` = clip(round((v - t_0) / (t_-1 - t_0) (n - 1)), 0, n - 1),
      speed = vx cos_h + vy sin_h. This is exact when the speed has converged to within half a
      target-speed step of the target, which the speed controller (a = (target - v) / 0.6 s, one
      policy period of 1 s at 15 Hz leaves 17 % of the gap) guarantees for the one-step index
      changes of FASTER / SLOWER, *unless the ego crashed*: a crashed vehicle brakes with
      a = -v for the rest of the period, so on ``done`` transitions the speed index can be
      underestimated (the crash flag is exact there, so only this term can be off).
      Soft: a sum of sigmoid steps at the half-way speeds (``temperature`` read as m/s).
    - ``lane_change_reward`` = P(action in {0, 2}) (LANE_LEFT, LANE_RIGHT).
    - ``on_road_reward`` = ``ego.on_road`` (the ego on its closest lane, see :func:`~drivepriv.priors.reward.base.lane_on_road`).

    reward = Σ_i config[i] * term_i (weights from the env config, absent ones 0), mapped by
    lmap(., [collision_reward, high_speed_reward], [0, 1]) when ``normalize_reward``, then
    multiplied by ``on_road_reward``.
    """

    env_ids = ("roundabout-v0",)
    TERMS = ("collision_reward", "high_speed_reward", "lane_change_reward", "on_road_reward")
    #: ``MDPVehicle.DEFAULT_TARGET_SPEEDS.size``: the divisor of the high-speed term is this minus 1.
    DEFAULT_TARGET_SPEEDS_SIZE = 3
    #: ``DiscreteMetaAction`` target speeds when the configuration gives none (m/s).
    FALLBACK_TARGET_SPEEDS_MPS = (20.0, 25.0, 30.0)

    def __init__(self, codec: ObservationCodec, road: RoadGeometry, config: dict[str, Any]) -> None:
        super().__init__(codec, road, config)
        self.weights = {name: float(self.config.get(name, 0) or 0) for name in self.TERMS}
        self.normalize = bool(self.config.get("normalize_reward", True))
        action_cfg = self.config.get("action", {}) or {}
        speeds = action_cfg.get("target_speeds")
        self.target_speeds_mps = tuple(float(v) for v in (speeds if speeds is not None else self.FALLBACK_TARGET_SPEEDS_MPS))

    def speed_index(self, speed: Tensor, temperature: float) -> Tensor:
        """``MDPVehicle.speed_to_index`` of ``speed`` (m/s), a sum of (soft) steps."""
        t = self.target_speeds_mps
        n = len(t)
        if n < 2:
            return torch.zeros_like(speed)
        step = (t[-1] - t[0]) / (n - 1)
        # round(x) with x = (v - t0) / step counts the half-way points k - 1/2 (k = 1..n-1) below x.
        return sum((soft_step(speed - (t[0] + (k - 0.5) * step), temperature) for k in range(1, n)), torch.zeros_like(speed))

    def components(
        self, next_world: Tensor, action_probs: Tensor, done: Tensor, temperature: float = DEFAULT_TEMPERATURE_M
    ) -> dict[str, Tensor]:
        ego = next_world[..., 0, :]
        xy = self.xy_m(ego)
        coords = self.road.lane_local_coordinates(xy)  # once, for the closest lane and on-road
        weights = self.road.closest_lane_weights(xy, self.heading_rad(ego), temperature, coords)  # (B, L)
        speed = self.codec.speed(ego)
        high_speed = self.speed_index(speed, temperature) / (self.DEFAULT_TARGET_SPEEDS_SIZE - 1)
        n_actions = action_probs.shape[-1]
        lane_change = sum((action_probs[..., a] for a in (0, 2) if a < n_actions), torch.zeros_like(speed))
        return {
            "collision_reward": done * torch.ones_like(speed),
            "high_speed_reward": high_speed,
            "lane_change_reward": lane_change,
            "on_road_reward": lane_on_road(self, xy, weights, temperature, coords),
        }

    def combine(self, terms: dict[str, Tensor]) -> Tensor:
        w = self.weights
        total = sum(w[name] * terms[name] for name in self.TERMS)
        if self.normalize:
            total = lmap(total, (w["collision_reward"], w["high_speed_reward"]), (0.0, 1.0))
        return total * terms["on_road_reward"]


@register_reward
class IntersectionReward(RewardFunction):
    """``IntersectionEnv._reward`` / ``_agent_reward`` (highway_env/envs/intersection_env.py), differentiable.

    One controlled vehicle (the ego; ``_reward`` averages ``_agent_reward`` over the controlled
    vehicles, and only the ego is observed). Terms (``_agent_rewards``), on the state after the step:

    - ``arrived_reward`` = ``has_arrived(ego)``: the ego's closest lane (position and heading,
      ``Vehicle.on_state_update``) is an exit lane (``"il" in lane_index[0] and "o" in
      lane_index[1]``) and its longitudinal coordinate there is >= 25 m. Soft: the closest-lane
      weights of the exit lanes times a sigmoid step of s - 25.
    - ``collision_reward`` = ego crashed. Not observed; intersection terminates on a crash, on
      arrival, or (``offroad_terminal``) off the road, so crashed = done * (1 - arrived)
      [* on_road with ``offroad_terminal``]. A crash in the step that also arrives (or leaves the
      road) is counted as no crash; the *reward* is still exact there, since an arrival replaces
      the weighted sum by ``arrived_reward`` and off-road multiplies it by 0.
    - ``high_speed_reward`` = clip(lmap(speed, reward_speed_range, [0, 1]), 0, 1), speed =
      vx cos_h + vy sin_h (``vehicle.speed``; intersection uses the speed, not a speed index).
    - ``on_road_reward`` = ``ego.on_road`` (see :func:`~drivepriv.priors.reward.base.lane_on_road`).

    reward = arrived_reward if arrived else Σ_i config[i] * term_i; times on_road_reward; then
    lmap(., [collision_reward, arrived_reward], [0, 1]) when ``normalize_reward`` (applied after
    the on-road product, as in ``_agent_reward``). Soft: the arrival blends the two branches.
    """

    env_ids = ("intersection-v0", "intersection-v1")
    TERMS = ("collision_reward", "high_speed_reward", "arrived_reward", "on_road_reward")
    #: ``IntersectionEnv.has_arrived``'s default ``exit_distance`` (m).
    EXIT_DISTANCE_M = 25.0

    def __init__(self, codec: ObservationCodec, road: RoadGeometry, config: dict[str, Any]) -> None:
        super().__init__(codec, road, config)
        self.weights = {name: float(self.config.get(name, 0) or 0) for name in self.TERMS}
        lo, hi = self.config.get("reward_speed_range", (7.0, 9.0))
        self.speed_range_mps = (float(lo), float(hi))
        self.normalize = bool(self.config.get("normalize_reward", False))
        self.offroad_terminal = bool(self.config.get("offroad_terminal", False))
        self._exit_lane = [float("il" in str(lane.index[0]) and "o" in str(lane.index[1])) for lane in road.lanes]
        if int(self.config.get("controlled_vehicles", 1) or 1) != 1:
            log.warning(
                "intersection reward: %s controlled vehicles; the reward averages over all of them but only "
                "the ego is observed, the prior uses the ego alone",
                self.config.get("controlled_vehicles"),
            )

    def components(
        self, next_world: Tensor, action_probs: Tensor, done: Tensor, temperature: float = DEFAULT_TEMPERATURE_M
    ) -> dict[str, Tensor]:
        ego = next_world[..., 0, :]
        xy = self.xy_m(ego)
        coords = self.road.lane_local_coordinates(xy)  # once, for the closest lane and on-road
        weights = self.road.closest_lane_weights(xy, self.heading_rad(ego), temperature, coords)  # (B, L)
        c = coords
        exit_lane = torch.tensor(self._exit_lane, dtype=next_world.dtype, device=next_world.device)
        arrived = (weights * exit_lane * soft_step(c.s_m - self.EXIT_DISTANCE_M, temperature)).sum(-1)
        on_road = lane_on_road(self, xy, weights, temperature, coords)
        speed = self.codec.speed(ego)
        high_speed = torch.clamp(lmap(speed, self.speed_range_mps, (0.0, 1.0)), 0.0, 1.0)
        crashed = done * (1.0 - arrived)
        if self.offroad_terminal:
            crashed = crashed * on_road
        return {
            "collision_reward": crashed,
            "high_speed_reward": high_speed,
            "arrived_reward": arrived,
            "on_road_reward": on_road,
        }

    def combine(self, terms: dict[str, Tensor]) -> Tensor:
        w = self.weights
        total = sum(w[name] * terms[name] for name in self.TERMS)
        arrived = terms["arrived_reward"]
        total = arrived * w["arrived_reward"] + (1.0 - arrived) * total
        total = total * terms["on_road_reward"]
        if self.normalize:
            total = lmap(total, (w["collision_reward"], w["arrived_reward"]), (0.0, 1.0))
        return total
