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

import logging
from typing import Any

import torch
from torch import Tensor

from drivepriv.config import EnvConfig
from drivepriv.envs.codec import ObservationCodec
from drivepriv.priors.road import LaneCoordinates, RoadGeometry
from drivepriv.registry import Registry

log = logging.getLogger(__name__)

#: Default softness (m) of the closest-lane and step decisions of the soft rewards.
DEFAULT_TEMPERATURE_M = 0.25


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


def _register(cls: type[RewardFunction]) -> type[RewardFunction]:
    for env_id in cls.env_ids:
        REWARDS.register(env_id)(cls)
    return cls


@_register
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


@_register
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
    VEHICLE_LENGTH_M = 5.0

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
        on_road = _on_road(self, xy, weights, temperature, coords)
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


def _on_road(reward: RewardFunction, xy: Tensor, weights: Tensor, temperature: float, coords: LaneCoordinates | None = None) -> Tensor:
    """(B,) highway-env ``vehicle.on_road`` = ``lane.on_lane(position)`` on the closest lane.

    ``on_lane``: |lateral| <= width / 2 and -VEHICLE_LENGTH <= s < length + VEHICLE_LENGTH
    (VEHICLE_LENGTH = 5 m), evaluated on every lane and weighted by the closest-lane weights
    ``weights`` (B, L) (``vehicle.lane`` is the closest lane, by position and heading, set by
    ``Vehicle.on_state_update`` at the end of every simulation frame).
    """
    road = reward.road
    c = road.lane_local_coordinates(xy) if coords is None else coords
    margin = HighwayReward.VEHICLE_LENGTH_M
    on_lane = (
        soft_step(road.lane_widths_m(xy) / 2.0 - c.lateral_abs_m, temperature)
        * soft_step(c.s_m + margin, temperature)
        * soft_step(road.lane_lengths_m(xy) + margin - c.s_m, temperature)
    )
    return (weights * on_lane).sum(-1)


@_register
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
    - ``on_road_reward`` = ``ego.on_road`` (the ego on its closest lane, see :func:`_on_road`).

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
            "on_road_reward": _on_road(self, xy, weights, temperature, coords),
        }

    def combine(self, terms: dict[str, Tensor]) -> Tensor:
        w = self.weights
        total = sum(w[name] * terms[name] for name in self.TERMS)
        if self.normalize:
            total = lmap(total, (w["collision_reward"], w["high_speed_reward"]), (0.0, 1.0))
        return total * terms["on_road_reward"]


@_register
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
    - ``on_road_reward`` = ``ego.on_road`` (see :func:`_on_road`).

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
        on_road = _on_road(self, xy, weights, temperature, coords)
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
