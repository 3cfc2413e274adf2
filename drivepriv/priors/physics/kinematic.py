"""The physics prior's model: :class:`KinematicPrior`, one policy step of highway-env in torch (see :mod:`drivepriv.priors.physics`)."""

from __future__ import annotations

import copy
import logging
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from drivepriv.envs.codec import ObservationCodec
from drivepriv.priors.physics.constants import (
    _ASIN_LIMIT,
    DEFAULT_ACTIONS,
    DEFAULT_TARGET_SPEEDS_MPS,
    KP_A_PER_S,
    KP_HEADING_PER_S,
    KP_LATERAL_PER_S,
    MAX_SPEED_MPS,
    MAX_STEERING_ANGLE_RAD,
    MIN_SPEED_MPS,
    TAU_PURSUIT_S,
    VEHICLE_LENGTH_M,
    _not_zero,
    _wrap_to_pi,
)
from drivepriv.priors.physics.idm import _IDMNeighbours
from drivepriv.priors.physics.topology import next_lanes, route_lanes, side_lanes
from drivepriv.priors.road import RoadGeometry

log = logging.getLogger(__name__)


class KinematicPrior(_IDMNeighbours):
    """Differentiable one-policy-step transition model of highway-env (ego: exact controllers; neighbours: IDM, no MOBIL).

    Args:
        codec: the scenario's observation codec (normalised <-> physical).
        road: the scenario's road geometry (lanes as polylines).
        env_config: highway-env's public configuration (``env.unwrapped.config``): reads
            ``simulation_frequency``, ``policy_frequency`` and ``action`` (its
            ``target_speeds``, ``longitudinal``, ``lateral``).
        actions: meta-action names in index order (default: from ``env_config["action"]`` as
            ``DiscreteMetaAction`` builds them).
        target_speeds_mps: overrides ``env_config["action"]["target_speeds"]``.
        clip: clip the normalised output to [-1, 1] like the observation does.
        ego_destination: the road-network node the ego's planned route leads to (highway-env
            ``ControlledVehicle.plan_route_to``; e.g. ``"nxs"`` in roundabout-v0). At a branching
            node the ego then continues towards it, as ``RoadNetwork.next_lane`` does with a route.
        neighbours: ``"idm"`` (``IDMVehicle``'s longitudinal control against the observed front
            vehicle; default) or ``"constant"`` (keep the current speed).
        speed_limits_mps: each lane's ``speed_limit`` (same order as ``road.lanes``; None: no
            limit), which clips IDM target speeds. Public road data; ``from_env`` reads it.
        obstacles_xy: positions (m) of the road's static obstacles, which IDM vehicles brake
            for like a stopped vehicle. Public road layout; ``from_env`` reads ``road.objects``.
        neighbour_target: how the neighbours' (unobservable) IDM target speeds are estimated:
            ``"equilibrium"`` (default; IDM acceleration 0 in the observed state) or
            ``"observed"`` (the observed speed). See the module docstring.
    """

    def __init__(
        self,
        codec: ObservationCodec,
        road: RoadGeometry,
        env_config: dict[str, Any],
        actions: Sequence[str] | None = None,
        target_speeds_mps: Sequence[float] | None = None,
        clip: bool = True,
        ego_destination: str | None = None,
        neighbours: str = "idm",
        speed_limits_mps: Sequence[float | None] | None = None,
        obstacles_xy: Sequence[Sequence[float]] | None = None,
        neighbour_target: str = "equilibrium",
    ) -> None:
        if neighbour_target not in ("equilibrium", "observed"):
            raise ValueError(f"neighbour_target must be 'equilibrium' or 'observed', got {neighbour_target!r}")
        self.neighbour_target = neighbour_target
        if neighbours not in ("idm", "constant"):
            raise ValueError(f"neighbours must be 'idm' or 'constant', got {neighbours!r}")
        self.neighbours = neighbours
        limits = [None] * len(road.lanes) if speed_limits_mps is None else list(speed_limits_mps)
        if len(limits) != len(road.lanes):
            raise ValueError(f"speed_limits_mps has {len(limits)} entries, the road has {len(road.lanes)} lanes")
        self._speed_limit = torch.tensor([np.inf if v is None else float(v) for v in limits], dtype=torch.float64)
        self._obstacles = torch.as_tensor(np.asarray(obstacles_xy if obstacles_xy is not None else [], dtype=np.float64).reshape(-1, 2))
        self._width = torch.tensor([ln.width_m for ln in road.lanes], dtype=torch.float64)
        if env_config.get("neighbour_vehicles_connected_lanes", False) and neighbours == "idm":
            log.warning("KinematicPrior: neighbour_vehicles_connected_lanes is not modelled; front vehicles are searched on the current lane")
        self.codec = codec
        self.road = road
        self.clip = clip
        self.simulation_frequency_hz = float(env_config.get("simulation_frequency", 15))
        self.policy_frequency_hz = float(env_config.get("policy_frequency", 1))
        # AbstractEnv._simulate: frames = int(simulation_frequency // policy_frequency)
        self.n_substeps = int(self.simulation_frequency_hz // self.policy_frequency_hz)
        self.dt_s = 1.0 / self.simulation_frequency_hz
        action_cfg = dict(env_config.get("action", {}) or {})
        if action_cfg.get("type", "DiscreteMetaAction") != "DiscreteMetaAction":
            raise ValueError(f"KinematicPrior models DiscreteMetaAction only, got {action_cfg.get('type')!r}")
        speeds = target_speeds_mps if target_speeds_mps is not None else action_cfg.get("target_speeds")
        self.target_speeds_mps = np.asarray(DEFAULT_TARGET_SPEEDS_MPS if speeds is None else speeds, dtype=np.float64)
        if actions is None:
            lon, lat = action_cfg.get("longitudinal", True), action_cfg.get("lateral", True)
            if lon and lat:
                actions = DEFAULT_ACTIONS
            elif lon:
                actions = ("SLOWER", "IDLE", "FASTER")
            else:
                actions = ("LANE_LEFT", "IDLE", "LANE_RIGHT")
        self.actions = tuple(actions)
        self._lane_index = {tuple(lane.index): k for k, lane in enumerate(road.lanes)}
        self._next_lane = next_lanes(road)
        self._ego_next_lane = next_lanes(road, ego_destination) if ego_destination else self._next_lane
        self._ego_route_lane = route_lanes(road, self._lane_index, ego_destination)
        self._side = side_lanes(road, self._lane_index)

    def with_neighbours(self, neighbours: str) -> "KinematicPrior":
        """A copy of this prior with another neighbour model (``"idm"`` or ``"constant"``); tables shared."""
        if neighbours not in ("idm", "constant"):
            raise ValueError(f"neighbours must be 'idm' or 'constant', got {neighbours!r}")
        other = copy.copy(self)
        other.neighbours = neighbours
        return other

    @classmethod
    def from_env(cls, env, codec: ObservationCodec, road: RoadGeometry | None = None, **kwargs: Any) -> "KinematicPrior":
        """Build from a (gymnasium) highway-env environment's public config and action type."""
        base = env.unwrapped
        road = road if road is not None else RoadGeometry.from_env(env)
        at = base.action_type
        names = tuple(at.actions[i] for i in sorted(at.actions)) if isinstance(getattr(at, "actions", None), dict) else None
        speeds = getattr(at, "target_speeds", None)
        route = getattr(getattr(base, "vehicle", None), "route", None)
        if route and "ego_destination" not in kwargs:
            kwargs["ego_destination"] = route[-1][1]  # the scenario's (public) ego destination
        network = base.road.network
        kwargs.setdefault("speed_limits_mps", [getattr(network.get_lane(tuple(ln.index)), "speed_limit", None) for ln in road.lanes])
        if "obstacles_xy" not in kwargs:
            from highway_env.vehicle.objects import Obstacle

            kwargs["obstacles_xy"] = [np.asarray(o.position, dtype=np.float64) for o in base.road.objects if isinstance(o, Obstacle)]
        return cls(codec, road, dict(base.config), actions=names, target_speeds_mps=speeds, **kwargs)

    # ------------------------------------------------------------------------------------
    # Lanes (the road's queries on one given lane per element)

    def _reachable(self, xy: Tensor, lane: Tensor) -> Tensor:
        """``AbstractLane.is_reachable_from``: not forbidden, |lateral| <= 2 width, 0 <= s < length + 5."""
        with torch.no_grad():
            s, lat = self.road.lane_frame(xy.detach(), lane)
            forbidden = torch.as_tensor([ln.forbidden for ln in self.road.lanes])[lane]
            width = torch.as_tensor([ln.width_m for ln in self.road.lanes], dtype=xy.dtype)[lane]
            return (~forbidden) & (lat.abs() <= 2 * width) & (s >= 0) & (s < self.road.lane_length_of(lane) + VEHICLE_LENGTH_M)

    # ------------------------------------------------------------------------------------
    # Dynamics

    def _integrate(
        self,
        xy: Tensor,
        heading: Tensor,
        speed: Tensor,
        target_speed: Tensor,
        lane: Tensor,
        action_probs: Tensor,
        present: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``n_substeps`` of ``Road.act`` + ``Road.step`` for B scenes (float64).

        Columns ``:A`` of ``xy`` (B, A + n, 2) and of the others (B, A + n) are the ego under each
        of the A meta actions (``MDPVehicle``: ``follow_road`` along its route,
        ``steering_control``, ``speed_control``), columns ``A:`` the n neighbours (``IDMVehicle``
        without MOBIL, or speed keeping with ``neighbours="constant"``); ``present`` (B, n) bool.
        The neighbours see the ego at its ``action_probs``-weighted position and velocity.
        """
        B, A = action_probs.shape
        n = speed.shape[1] - A
        is_ego = (torch.arange(A + n) < A).expand(B, A + n).reshape(-1)
        nxt_ego, nxt = torch.as_tensor(self._ego_next_lane), torch.as_tensor(self._next_lane)
        lane = lane.reshape(-1)
        idm = self.neighbours == "idm" and n > 0
        dt = self.dt_s
        half_l = VEHICLE_LENGTH_M / 2.0
        for _ in range(self.n_substeps):
            flat_xy, flat_h, flat_v = xy.reshape(-1, 2), heading.reshape(-1), speed.reshape(-1)
            # ControlledVehicle.follow_road: switch lane when past length - VEHICLE_LENGTH / 2
            with torch.no_grad():
                s_now, _ = self.road.lane_frame(flat_xy.detach(), lane)
                ahead = torch.where(is_ego, nxt_ego[lane], nxt[lane])
                lane = torch.where(s_now > self.road.lane_length_of(lane) - VEHICLE_LENGTH_M / 2.0, ahead, lane)
            # ControlledVehicle.steering_control
            s, lat = self.road.lane_frame(flat_xy, lane)
            future_heading = self.road.lane_heading_at(s + flat_v * TAU_PURSUIT_S, lane)
            lat_speed_cmd = -KP_LATERAL_PER_S * lat
            heading_cmd = torch.asin(torch.clamp(lat_speed_cmd / _not_zero(flat_v), -_ASIN_LIMIT, _ASIN_LIMIT))
            heading_ref = future_heading + torch.clamp(heading_cmd, -np.pi / 4, np.pi / 4)
            rate_cmd = KP_HEADING_PER_S * _wrap_to_pi(heading_ref - flat_h)
            slip = torch.asin(torch.clamp(half_l / _not_zero(flat_v) * rate_cmd, -_ASIN_LIMIT, _ASIN_LIMIT))
            steering = torch.clamp(torch.atan(2.0 * torch.tan(slip)), -MAX_STEERING_ANGLE_RAD, MAX_STEERING_ANGLE_RAD)
            steering = steering.reshape(B, A + n)
            # ControlledVehicle.speed_control (ego; neighbours keeping their speed) or IDM
            acc = KP_A_PER_S * (target_speed - speed)
            if idm:
                direction = torch.stack([torch.cos(heading), torch.sin(heading)], -1)
                w = action_probs[..., None]
                ego_xy, ego_vel = (w * xy[:, :A]).sum(1), (w * speed[:, :A, None] * direction[:, :A]).sum(1)
                acc_idm = self._idm_acceleration(
                    ego_xy, ego_vel, xy[:, A:], heading[:, A:], speed[:, A:], target_speed[:, A:], lane.reshape(B, -1)[:, A:], present
                )
                acc = torch.cat([acc[:, :A], acc_idm], 1)
            # Vehicle.clip_actions
            acc = torch.where(speed > MAX_SPEED_MPS, torch.minimum(acc, MAX_SPEED_MPS - speed), acc)
            acc = torch.where(speed < MIN_SPEED_MPS, torch.maximum(acc, MIN_SPEED_MPS - speed), acc)
            # Vehicle.step: kinematic bicycle, explicit Euler
            beta = torch.atan(0.5 * torch.tan(steering))
            direction = torch.stack([torch.cos(heading + beta), torch.sin(heading + beta)], -1)
            xy = xy + speed[..., None] * direction * dt
            heading = heading + speed * torch.sin(beta) / half_l * dt
            speed = speed + acc * dt
        return xy, heading, speed

    def _closest_lane(self, xy: Tensor, heading: Tensor) -> Tensor:
        """``RoadNetwork.get_closest_lane_index(position, heading)`` (hard, no gradient)."""
        with torch.no_grad():
            return self.road.lane_distances(xy.detach(), heading.detach()).argmin(-1)

    def _speed_to_index(self, speed: Tensor) -> Tensor:
        """``MDPVehicle.speed_to_index``: index of the closest target speed (uniform grid)."""
        ts = self.target_speeds_mps
        x = (speed.detach() - ts[0]) / (ts[-1] - ts[0])
        return torch.clamp(torch.round(x * (ts.size - 1)), 0, ts.size - 1).long()

    def _ego_targets(self, xy: Tensor, heading: Tensor, speed: Tensor) -> tuple[Tensor, Tensor]:
        """(B, A) target speed and target lane after each meta action (``MDPVehicle.act``)."""
        ts = torch.as_tensor(self.target_speeds_mps, dtype=speed.dtype)
        idx = self._speed_to_index(speed)  # assumption: current target = closest target speed
        lane = self._closest_lane(xy, heading)  # assumption: current target lane = closest lane
        lane = torch.as_tensor(self._ego_route_lane)[lane]  # ... on the ego's route
        with torch.no_grad():  # ControlledVehicle.follow_road, run before the meta action
            s_now, _ = self.road.lane_frame(xy.detach(), lane)
            ahead = torch.as_tensor(self._ego_next_lane)[lane]
            lane = torch.where(s_now > self.road.lane_length_of(lane) - VEHICLE_LENGTH_M / 2.0, ahead, lane)
        side = torch.as_tensor(self._side)
        speeds, lanes = [], []
        for name in self.actions:
            if name == "FASTER":
                speeds.append(ts[torch.clamp(idx + 1, max=len(ts) - 1)])
            elif name == "SLOWER":
                speeds.append(ts[torch.clamp(idx - 1, min=0)])
            else:
                speeds.append(ts[idx])
            if name in ("LANE_LEFT", "LANE_RIGHT"):
                cand = side[lane, 0 if name == "LANE_LEFT" else 1]
                lanes.append(torch.where(self._reachable(xy, cand), cand, lane))
            else:
                lanes.append(lane)
        return torch.stack(speeds, -1), torch.stack(lanes, -1)

    def predict_physical(self, world: Tensor, action_probs: Tensor) -> Tensor:
        """(B, V, F) physical, all rows in world coordinates -> same for the next observation (float64)."""
        c = self.codec
        ix, iy, ivx, ivy = (c.index(f) for f in ("x", "y", "vx", "vy"))
        has_h = "cos_h" in c.features and "sin_h" in c.features
        B, V, _ = world.shape
        xy = torch.stack([world[..., ix], world[..., iy]], -1)  # (B, V, 2)
        vx, vy = world[..., ivx], world[..., ivy]
        if has_h:
            heading = torch.atan2(world[..., c.index("sin_h")], world[..., c.index("cos_h")])
            speed = vx * torch.cos(heading) + vy * torch.sin(heading)
        else:
            heading = torch.atan2(vy, vx)
            speed = torch.sqrt(vx**2 + vy**2 + 1e-12)

        # Columns: the ego under each meta action (its targets differ), then the neighbours.
        A = len(self.actions)
        tgt_speed, tgt_lane = self._ego_targets(xy[:, 0], heading[:, 0], speed[:, 0])  # (B, A)
        pres = world[:, 1:, c.index("presence")]
        present = pres > 0.5
        n_lane = self._closest_lane(xy[:, 1:].reshape(-1, 2), heading[:, 1:].reshape(-1)).reshape(B, V - 1)  # no MOBIL
        n_target = self._neighbour_target_speed(xy, heading, speed, n_lane, present)
        p_xy, p_h, p_v = self._integrate(
            torch.cat([xy[:, :1].expand(B, A, 2), xy[:, 1:]], 1),
            torch.cat([heading[:, :1].expand(B, A), heading[:, 1:]], 1),
            torch.cat([speed[:, :1].expand(B, A), speed[:, 1:]], 1),
            torch.cat([tgt_speed, n_target], 1),
            torch.cat([tgt_lane, n_lane], 1),
            action_probs,
            present,
        )
        # Ego: the per-action predictions mixed by the action probabilities.
        ego_rows = self._rows(p_xy[:, :A], p_h[:, :A], p_v[:, :A], world.new_ones(B, A), has_h)
        ego = (action_probs[..., None] * ego_rows).sum(1, keepdim=True)  # (B, 1, F)
        return torch.cat([ego, self._rows(p_xy[:, A:], p_h[:, A:], p_v[:, A:], pres, has_h)], 1)

    def _rows(self, xy: Tensor, heading: Tensor, speed: Tensor, presence: Tensor, has_h: bool) -> Tensor:
        """Assemble physical rows in the codec's feature order; ``Vehicle.velocity`` ignores slip."""
        cols = {
            "presence": presence,
            "x": xy[..., 0],
            "y": xy[..., 1],
            "vx": speed * torch.cos(heading),
            "vy": speed * torch.sin(heading),
        }
        if has_h:
            cols["cos_h"], cols["sin_h"] = torch.cos(heading), torch.sin(heading)
        return torch.stack([cols[f] * (presence if f != "presence" else 1.0) for f in self.codec.features], -1)

    def predict(self, states: Tensor, action_probs: Tensor) -> Tensor:
        """Predicted next observation (..., V, F), normalised, from states (..., V, F) normalised and action_probs (..., A).

        The ego row is the probability-weighted mixture of the per-action predictions; the
        neighbour rows (which react to that mixed ego) are relative to it, presence kept.
        Leading dimensions (batch, restarts) are flattened and restored.
        """
        if action_probs.shape[-1] != len(self.actions):
            raise ValueError(f"action_probs has {action_probs.shape[-1]} actions, the prior models {len(self.actions)}")
        dtype = states.dtype
        lead = states.shape[:-2]
        states = states.reshape(-1, *states.shape[-2:])
        action_probs = action_probs.reshape(-1, action_probs.shape[-1])
        world = self.codec.decode_world(states.to(torch.float64))
        nxt = self.predict_physical(world, action_probs.to(torch.float64))
        # Make neighbour rows ego-relative again (KinematicObservation with absolute=False).
        c = self.codec
        pres = nxt[:, 1:, c.index("presence")]
        rel = nxt.clone()
        for f in ("x", "y", "vx", "vy"):
            i = c.index(f)
            rel[:, 1:, i] = nxt[:, 1:, i] - nxt[:, 0:1, i] * pres
        norm = c.to_normalised(rel)
        if self.clip:
            norm = torch.clamp(norm, -1.0, 1.0)
        return norm.to(dtype).reshape(*lead, *norm.shape[-2:])

    __call__ = predict
