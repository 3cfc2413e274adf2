"""highway-env's merge and highway rewards, differentiable (see :mod:`drivepriv.priors.reward`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from drivepriv.envs.codec import ObservationCodec
from drivepriv.priors.reward.base import DEFAULT_TEMPERATURE_M, VEHICLE_LENGTH_M, RewardFunction, lmap, log, lane_on_road, register_reward, soft_step
from drivepriv.priors.road import RoadGeometry


@register_reward
class MergeReward(RewardFunction):
    """``MergeEnv._reward`` (highway_env/envs/merge_env.py), differentiable.

    Terms, on the state after the step:

    - ``collision_reward`` = ego crashed. ``crashed`` is not observed; merge terminates on a
      crash or when the ego passes x = 370 m, so crashed = done * [ego x <= 370] (a sigmoid
      step when soft). A crash in the very step that passes x = 370 is counted as no crash.
    - ``right_lane_reward`` = ego ``lane_index[2]``: the closest lane (position and heading,
      highway-env's ``get_closest_lane_index``) weighted by :meth:`RoadGeometry.closest_lane_weights`.
    - ``high_speed_reward`` = lmap(ego speed, reward_speed_range, [0, 1]) (not clipped), with
      speed = vx cos_h + vy sin_h.
    - ``lane_change_reward`` = P(action in {0, 2}) (LANE_LEFT, LANE_RIGHT).
    - ``merging_speed_reward`` = sum over vehicles on lane ("b", "c", 2) of
      (target_speed - speed) / target_speed. That lane is ``forbidden``: highway traffic and the
      ego never change onto it, so only the on-ramp vehicle of ``_make_vehicles`` gets there,
      and its target speed is 30 m/s (``MERGING_TARGET_SPEED_MPS``). Observed neighbour rows
      count, weighted by presence and by their probability of being on that lane; vehicles
      outside the observation (beyond 200 m, or not among the ``vehicles_count - 1`` nearest)
      cannot be counted, nor can the ego (never on that lane in practice).

    reward = lmap(sum_i w_i term_i, [collision + merging_speed, high_speed + right_lane], [0, 1]),
    weights read from the environment's configuration.
    """

    env_ids = ("merge-v0", "merge-v1")
    #: x (m) past which merge-v0 terminates (``MergeEnv._is_terminated``).
    END_X_M = 370.0
    #: Lane of the merging term (``MergeEnv._rewards``).
    MERGING_LANE = ("b", "c", 2)
    #: Target speed (m/s) that ``MergeEnv._make_vehicles`` gives the on-ramp vehicle.
    MERGING_TARGET_SPEED_MPS = 30.0
    TERMS = ("collision_reward", "right_lane_reward", "high_speed_reward", "lane_change_reward", "merging_speed_reward")

    def __init__(self, codec: ObservationCodec, road: RoadGeometry, config: dict[str, Any]) -> None:
        super().__init__(codec, road, config)
        self.weights = {name: float(self.config.get(name, 0.0)) for name in self.TERMS}
        lo, hi = self.config.get("reward_speed_range", (20.0, 30.0))
        self.speed_range_mps = (float(lo), float(hi))
        try:
            self._merging_lane: int | None = road.lane_position(self.MERGING_LANE)
        except KeyError:
            self._merging_lane = None
            log.warning("merge reward: the road has no lane %s; the merging-speed term is left out", self.MERGING_LANE)
        x_hi = codec.ranges.get("x", (0.0, float("inf")))[1]
        if x_hi <= self.END_X_M:
            log.warning(
                "merge reward: the observation clips x at %.0f m, below the end of the road (%.0f m): "
                "crashes cannot be told from reaching the end, every termination counts as a crash",
                x_hi,
                self.END_X_M,
            )

    def components(
        self, next_world: Tensor, action_probs: Tensor, done: Tensor, temperature: float = DEFAULT_TEMPERATURE_M
    ) -> dict[str, Tensor]:
        ego = next_world[..., 0, :]
        x = ego[..., self.codec.index("x")]
        crashed = done * soft_step(self.END_X_M - x, temperature)
        weights = self.lane_weights(next_world, temperature)  # (B, V, L)
        right_lane = (weights[..., 0, :] * self.road.lane_ids(next_world)).sum(-1)
        speed = self.codec.speed(next_world)  # (B, V)
        high_speed = lmap(speed[..., 0], self.speed_range_mps, (0.0, 1.0))
        n_actions = action_probs.shape[-1]
        lane_change = sum((action_probs[..., a] for a in (0, 2) if a < n_actions), torch.zeros_like(x))
        if self._merging_lane is None:
            merging = torch.zeros_like(x)
        else:
            on_lane = weights[..., 1:, self._merging_lane] * self.feature(next_world, "presence")[..., 1:]
            v0 = self.MERGING_TARGET_SPEED_MPS
            merging = (on_lane * (v0 - speed[..., 1:]) / v0).sum(-1)
        return {
            "collision_reward": crashed,
            "right_lane_reward": right_lane,
            "high_speed_reward": high_speed,
            "lane_change_reward": lane_change,
            "merging_speed_reward": merging,
        }

    def combine(self, terms: dict[str, Tensor]) -> Tensor:
        w = self.weights
        total = sum(w[name] * terms[name] for name in self.TERMS)
        lo = w["collision_reward"] + w["merging_speed_reward"]
        hi = w["high_speed_reward"] + w["right_lane_reward"]
        return lmap(total, (lo, hi), (0.0, 1.0))


@register_reward
class HighwayReward(RewardFunction):
    """``HighwayEnv._reward`` (highway_env/envs/highway_env.py), differentiable.

    Terms, on the state after the step:

    - ``collision_reward`` = ego crashed = done (highway terminates only on a crash), or
      done * on_road when ``offroad_terminal`` is set (an off-road termination counts as no crash).
    - ``right_lane_reward`` = target lane id / (lanes on that road - 1). highway-env uses the
      ego's *target* lane (``target_lane_index``), which is not observed; the closest lane of the
      next state stands in for it. They differ while a lane change is still under way at the
      end of the step, and when it was asked for towards a lane that does not exist (rare after
      the 1 s policy period of highway and highway-fast).
    - ``high_speed_reward`` = clip(lmap(forward speed, reward_speed_range, [0, 1]), 0, 1), forward
      speed = speed * cos(heading) = vx.
    - ``on_road_reward`` = the ego is on its closest lane (``on_lane``: |lateral| <= width/2,
      -5 m <= s < length + 5 m).

    reward = Σ w_i term_i, mapped by lmap(., [collision, high_speed + right_lane], [0, 1]) when
    ``normalize_reward``, then multiplied by ``on_road_reward``.
    """

    env_ids = ("highway-v0", "highway-fast-v0")
    TERMS = ("collision_reward", "right_lane_reward", "high_speed_reward", "on_road_reward")
    #: ``AbstractLane.VEHICLE_LENGTH``: the on-lane test's margin past the lane's ends (m).
    VEHICLE_LENGTH_M = VEHICLE_LENGTH_M

    def __init__(self, codec: ObservationCodec, road: RoadGeometry, config: dict[str, Any]) -> None:
        super().__init__(codec, road, config)
        self.weights = {name: float(self.config.get(name, 0.0)) for name in self.TERMS}
        lo, hi = self.config.get("reward_speed_range", (20.0, 30.0))
        self.speed_range_mps = (float(lo), float(hi))
        self.normalize = bool(self.config.get("normalize_reward", True))
        self.offroad_terminal = bool(self.config.get("offroad_terminal", False))
        counts: dict[tuple[str, str], int] = {}
        for lane in road.lanes:
            counts[lane.index[:2]] = counts.get(lane.index[:2], 0) + 1
        self._right_lane_value = [lane.index[2] / max(counts[lane.index[:2]] - 1, 1) for lane in road.lanes]

    def components(
        self, next_world: Tensor, action_probs: Tensor, done: Tensor, temperature: float = DEFAULT_TEMPERATURE_M
    ) -> dict[str, Tensor]:
        ego = next_world[..., 0, :]
        xy = self.xy_m(ego)
        heading = self.heading_rad(ego)
        coords = self.road.lane_local_coordinates(xy)  # once, for the closest lane and on-road
        weights = self.road.closest_lane_weights(xy, heading, temperature, coords)  # (B, L)
        value = torch.tensor(self._right_lane_value, dtype=next_world.dtype, device=next_world.device)
        right_lane = (weights * value).sum(-1)
        forward = ego[..., self.codec.index("vx")]
        high_speed = torch.clamp(lmap(forward, self.speed_range_mps, (0.0, 1.0)), 0.0, 1.0)
        on_road = lane_on_road(self, xy, weights, temperature, coords)
        crashed = done * on_road if self.offroad_terminal else done
        return {
            "collision_reward": crashed,
            "right_lane_reward": right_lane,
            "high_speed_reward": high_speed,
            "on_road_reward": on_road,
        }

    def combine(self, terms: dict[str, Tensor]) -> Tensor:
        w = self.weights
        total = sum(w[name] * terms[name] for name in self.TERMS)
        if self.normalize:
            total = lmap(total, (w["collision_reward"], w["high_speed_reward"] + w["right_lane_reward"]), (0.0, 1.0))
        return total * terms["on_road_reward"]
