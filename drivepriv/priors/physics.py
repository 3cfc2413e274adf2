"""Physics transition prior: a differentiable torch model of how highway-env moves vehicles over one policy period.

This reimplements, in torch, what one ``env.step(action)`` does to the ego vehicle
(highway-env 1.12, ``AbstractEnv._simulate``):

* ``n = simulation_frequency // policy_frequency`` substeps of ``dt = 1 / simulation_frequency``;
* on the first substep ``DiscreteMetaAction.act`` -> ``MDPVehicle.act(meta_action)`` changes the
  target speed (FASTER / SLOWER: ``speed_to_index(speed) +- 1``, clipped) or the target lane
  (``ControlledVehicle.act``: LANE_LEFT / LANE_RIGHT pick lane ``id -+ 1`` of the same road
  segment, clipped, kept only if ``AbstractLane.is_reachable_from``: not forbidden,
  ``|lateral| <= 2 width`` and ``0 <= s < length + 5``);
* on every substep ``Road.act`` -> ``ControlledVehicle.act()`` (``follow_road``, then
  ``steering_control`` and ``speed_control``) and ``Road.step`` -> ``Vehicle.step(dt)``
  (``clip_actions``, kinematic bicycle with ``beta = arctan(tan(delta) / 2)``, explicit Euler).

Assumptions (the observation does not carry the controller's internal state):

* the ego's current target speed is the target speed closest to its current speed
  (``MDPVehicle.speed_to_index(speed)``), and its current target lane is the lane closest to
  it (``RoadNetwork.get_closest_lane_index(position, heading)``). Both are exact when the
  previous meta action has settled; right after a lane change or a speed change they can be
  off (the controllers have a 0.6 s time constant against a 1 s policy period);
* at the end of a lane, ``follow_road`` continues on the next lane chosen like
  ``RoadNetwork.next_lane`` without a route (same lane id when the next road has as many
  lanes, else the closest lane; among several next roads the closest one, ties to the first).
  The roundabout's ego follows a planned route instead, so at branching nodes this can differ;
* the ego is not crashed (a crash overrides the controls with braking).

Neighbours (rows 1..) are modelled as ``ControlledVehicle``s that keep their speed
(``target_speed = speed``, no IDM braking) and their closest lane (no MOBIL lane change),
stepped with the same controllers and bicycle model, then expressed relative to the
predicted ego. highway-env re-sorts neighbour rows by distance in the next observation
(``order="sorted"``) and vehicles enter or leave the perception range, so the row
correspondence between ``predict``'s output and the real next observation is approximate:
the prior is mainly about the ego row.

Everything discrete (lane choices, speed indices, lane switches at lane ends) is decided
without gradient; everything continuous (positions, headings, speeds, the action mixture) is
differentiable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from drivepriv.envs.codec import ObservationCodec
from drivepriv.priors.road import RoadGeometry, _segment_u

# highway_env.vehicle.kinematics.Vehicle
VEHICLE_LENGTH_M = 5.0
MAX_SPEED_MPS = 40.0
MIN_SPEED_MPS = -40.0
# highway_env.vehicle.controller.ControlledVehicle
TAU_ACC_S = 0.6
TAU_HEADING_S = 0.2
TAU_LATERAL_S = 0.6
TAU_PURSUIT_S = 0.5 * TAU_HEADING_S
KP_A_PER_S = 1.0 / TAU_ACC_S
KP_HEADING_PER_S = 1.0 / TAU_HEADING_S
KP_LATERAL_PER_S = 1.0 / TAU_LATERAL_S
MAX_STEERING_ANGLE_RAD = np.pi / 3
# highway_env.vehicle.controller.MDPVehicle
DEFAULT_TARGET_SPEEDS_MPS = (20.0, 25.0, 30.0)
# highway_env.envs.common.action.DiscreteMetaAction.ACTIONS_ALL
DEFAULT_ACTIONS = ("LANE_LEFT", "IDLE", "LANE_RIGHT", "FASTER", "SLOWER")
# highway_env.utils.not_zero
_NOT_ZERO_EPS = 1e-2
# arcsin is kept off +-1 so its gradient stays finite where highway-env clips to +-1
_ASIN_LIMIT = 1.0 - 1e-9


def _not_zero(x: Tensor) -> Tensor:
    """highway_env.utils.not_zero: ``x`` if ``|x| > eps`` else ``eps`` (sign lost, as there)."""
    return torch.where(x.abs() > _NOT_ZERO_EPS, x, torch.full_like(x, _NOT_ZERO_EPS))


def _wrap_to_pi(x: Tensor) -> Tensor:
    """highway_env.utils.wrap_to_pi, smooth form."""
    return torch.atan2(torch.sin(x), torch.cos(x))



@dataclass(frozen=True)
class _LaneTable:
    """Every lane's polyline segments, padded to M segments: arrays (L, M[, 2]) (float64).

    Same segment model as :class:`~drivepriv.priors.road.RoadGeometry`: segment from ``c0`` to
    ``c0 + dc``, lateral axis ``n0 + u dn``, centre line bowing ``4 bulge u (1 - u)`` along it,
    ``s = s0 + u ds``, heading ``h0 + u dh``; the first / last segments extend past the ends.
    """

    c0: Tensor
    dc: Tensor
    n0: Tensor
    dn: Tensor
    bulge: Tensor
    s0: Tensor
    ds: Tensor
    h0: Tensor
    dh: Tensor
    u_lo: Tensor
    u_hi: Tensor
    valid: Tensor  # (L, M) bool
    n_seg: Tensor  # (L,) long


def _lane_table(road: RoadGeometry) -> _LaneTable:
    """The road's segment columns (``RoadGeometry``'s own tensors) gathered per lane and padded.

    Padding rows (``valid`` False) have unit ``dc`` and ``ds`` and are never selected.
    """
    T = road._tensors(torch.float64, torch.device("cpu"))
    idx = T.seg_index  # (L, M); padding points one past the last segment
    total = T.c0.shape[0]
    valid = idx < total
    pads = {"c0": 0.0, "dc": 1.0, "n0": 0.0, "dn": 0.0, "bulge": 0.0, "s0": 0.0, "ds": 1.0, "h0": 0.0, "dh": 0.0, "u_lo": 0.0, "u_hi": 1.0}
    cols = {}
    for key, pad in pads.items():
        col = getattr(T, key)
        cols[key] = torch.cat([col, torch.full_like(col[:1], pad)])[idx]
    return _LaneTable(**cols, valid=valid, n_seg=valid.sum(1))


class KinematicPrior:
    """Differentiable one-policy-step transition model of highway-env (ego: exact controllers).

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
    ) -> None:
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
        self._table = _lane_table(road)
        self._lane_index = {tuple(lane.index): k for k, lane in enumerate(road.lanes)}
        self._next_lane = self._next_lanes()
        self._ego_next_lane = self._next_lanes(ego_destination) if ego_destination else self._next_lane
        self._ego_route_lane = self._route_lanes(ego_destination)
        self._side = self._side_lanes()

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
        return cls(codec, road, dict(base.config), actions=names, target_speeds_mps=speeds, **kwargs)

    # ------------------------------------------------------------------------------------
    # Lane topology (static, numpy)

    def _next_lanes(self, destination: str | None = None) -> np.ndarray:
        """(L,) index of the lane ``follow_road`` continues on (``RoadNetwork.next_lane``).

        Without ``destination`` as highway-env without a route: the next road whose lane is
        closest to the lane's end. With it, only next roads from which ``destination`` can be
        reached by the fewest roads (a shortest-path route) are candidates. The lane itself
        where no road leaves its end node.
        """
        lanes = self.road.lanes
        by_road: dict[tuple[str, str], list[int]] = {}
        for k, lane in enumerate(lanes):
            by_road.setdefault((lane.index[0], lane.index[1]), []).append(k)
        hops: dict[str, int] = {}
        if destination is not None:  # breadth-first search backwards from the destination
            hops[destination] = 0
            frontier = [destination]
            while frontier:
                node = frontier.pop(0)
                for f, t in by_road:
                    if t == node and f not in hops:
                        hops[f] = hops[node] + 1
                        frontier.append(f)
        nxt = np.arange(len(lanes))
        for k, lane in enumerate(lanes):
            _from, _to, _id = lane.index
            end = torch.as_tensor(np.asarray(lane.points[-1], dtype=np.float64))[None]
            with torch.no_grad():
                dist = self.road.lane_distances(end)[0].numpy()
            best, best_d = None, np.inf
            on_route = [t for (f, t) in by_road if f == _to and t in hops]
            min_hops = min((hops[t] for t in on_route), default=None)
            for (f, t), ks in by_road.items():
                if f != _to or (min_hops is not None and hops.get(t) != min_hops):
                    continue
                ks_sorted = sorted(ks, key=lambda j: lanes[j].index[2])
                if len(ks_sorted) == len(by_road[(_from, _to)]):
                    j = next((j for j in ks_sorted if lanes[j].index[2] == _id), ks_sorted[0])
                else:
                    j = min(ks_sorted, key=lambda j: dist[j])
                if dist[j] < best_d:
                    best, best_d = j, dist[j]
            if best is not None:
                nxt[k] = best
        return nxt

    def _route_lanes(self, destination: str | None) -> np.ndarray:
        """(L,) for each lane, the lane of a sibling road (same start node) on the route to ``destination``.

        Where roads branch (a roundabout exit and the ring) their lanes overlap at the start, so
        the closest lane may be off the ego's route; its target lane is then the route's road
        (same lane id if it has it, else its last lane). Identity without a destination.
        """
        lanes = self.road.lanes
        out = np.arange(len(lanes))
        if destination is None:
            return out
        nxt = self._next_lanes(destination)
        for k, lane in enumerate(lanes):
            # the road the route takes from this lane's start node: where its predecessors lead
            preds = [j for j, ln in enumerate(lanes) if ln.index[1] == lane.index[0]]
            routed = {lanes[nxt[j]].index[:2] for j in preds if nxt[j] != j}
            if len(routed) == 1 and lane.index[:2] not in routed:
                road = routed.pop()
                ids = sorted(ln.index[2] for ln in lanes if ln.index[:2] == road)
                _id = lane.index[2] if lane.index[2] in ids else ids[-1]
                out[k] = self._lane_index[(*road, _id)]
        return out

    def _side_lanes(self) -> np.ndarray:
        """(L, 2) lane index for LANE_LEFT (id - 1) and LANE_RIGHT (id + 1), clipped to the road's lanes."""
        lanes = self.road.lanes
        out = np.zeros((len(lanes), 2), dtype=np.int64)
        for k, lane in enumerate(lanes):
            _from, _to, _id = lane.index
            ids = [ln.index[2] for ln in lanes if ln.index[0] == _from and ln.index[1] == _to]
            lo, hi = min(ids), max(ids)
            out[k, 0] = self._lane_index[(_from, _to, int(np.clip(_id - 1, lo, hi)))]
            out[k, 1] = self._lane_index[(_from, _to, int(np.clip(_id + 1, lo, hi)))]
        return out

    # ------------------------------------------------------------------------------------
    # Lane frame on one chosen lane per element (torch)

    def _lane_frame(self, xy: Tensor, lane: Tensor) -> tuple[Tensor, Tensor]:
        """(s_m, signed lateral_m) of ``xy`` (N, 2) on lane ``lane`` (N,): ``AbstractLane.local_coordinates``."""
        T = self._table
        c0, dc, n0, dn = T.c0[lane], T.dc[lane], T.n0[lane], T.dn[lane]  # (N, M, 2)
        with torch.no_grad():
            q = xy.detach()[:, None, :]
            u = _segment_u(q, c0, dc, n0, dn)
            lo, hi = T.u_lo[lane], T.u_hi[lane]
            u_in = torch.clamp(torch.minimum(torch.maximum(u, lo), hi), min=-1e6, max=1e6)
            d = torch.sqrt(((q - c0 - u_in[..., None] * dc) ** 2).sum(-1))
            outside = (u < lo - 1e-9) | (u > hi + 1e-9) | ~torch.isfinite(u) | ~T.valid[lane]
            score = d + outside.to(d.dtype) * 1e9 + (~T.valid[lane]).to(d.dtype) * 1e12
            seg = score.argmin(-1, keepdim=True)  # (N, 1)

        def pick(x: Tensor) -> Tensor:
            if x.dim() == 3:
                return torch.gather(x, 1, seg[..., None].expand(-1, 1, x.shape[-1])).squeeze(1)
            return torch.gather(x, 1, seg).squeeze(1)

        c0s, dcs, n0s, dns = pick(c0), pick(dc), pick(n0), pick(dn)
        u = _segment_u(xy, c0s, dcs, n0s, dns)
        u = torch.minimum(torch.maximum(u, pick(T.u_lo[lane])), pick(T.u_hi[lane]))
        a = xy - (c0s + u[..., None] * dcs)
        axis = n0s + u[..., None] * dns
        axis = axis / torch.sqrt((axis**2).sum(-1, keepdim=True) + 1e-12)
        lateral = (a * axis).sum(-1) - 4.0 * pick(T.bulge[lane]) * u * (1.0 - u)
        s = pick(T.s0[lane]) + u * pick(T.ds[lane])
        return s, lateral

    def _heading_at(self, s: Tensor, lane: Tensor) -> Tensor:
        """``AbstractLane.heading_at(s)`` on lane ``lane``: piecewise linear in s, extended past the ends."""
        T = self._table
        s0, ds, h0, dh = T.s0[lane], T.ds[lane], T.h0[lane], T.dh[lane]  # (N, M)
        with torch.no_grad():
            inside = (s.detach()[:, None] >= s0) & T.valid[lane]
            seg = (inside.long().sum(-1) - 1).clamp(min=0)
            seg = torch.minimum(seg, T.n_seg[lane] - 1)[:, None]
        u = (s - torch.gather(s0, 1, seg).squeeze(1)) / torch.gather(ds, 1, seg).squeeze(1)
        return torch.gather(h0, 1, seg).squeeze(1) + u * torch.gather(dh, 1, seg).squeeze(1)

    def _length(self, lane: Tensor) -> Tensor:
        T = self._table
        return T.s0[lane, T.n_seg[lane] - 1] + T.ds[lane, T.n_seg[lane] - 1]

    def _reachable(self, xy: Tensor, lane: Tensor) -> Tensor:
        """``AbstractLane.is_reachable_from``: not forbidden, |lateral| <= 2 width, 0 <= s < length + 5."""
        with torch.no_grad():
            s, lat = self._lane_frame(xy.detach(), lane)
            forbidden = torch.as_tensor([ln.forbidden for ln in self.road.lanes])[lane]
            width = torch.as_tensor([ln.width_m for ln in self.road.lanes], dtype=xy.dtype)[lane]
            return (~forbidden) & (lat.abs() <= 2 * width) & (s >= 0) & (s < self._length(lane) + VEHICLE_LENGTH_M)

    # ------------------------------------------------------------------------------------
    # Dynamics

    def _integrate(
        self, xy: Tensor, heading: Tensor, speed: Tensor, target_speed: Tensor, lane: Tensor, ego: bool = False
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``n_substeps`` of ``ControlledVehicle.act()`` + ``Vehicle.step(dt)`` for N vehicles (float64)."""
        nxt = torch.as_tensor(self._ego_next_lane if ego else self._next_lane)
        dt = self.dt_s
        half_l = VEHICLE_LENGTH_M / 2.0
        for _ in range(self.n_substeps):
            # ControlledVehicle.follow_road: switch lane when past length - VEHICLE_LENGTH / 2
            with torch.no_grad():
                s_now, _ = self._lane_frame(xy.detach(), lane)
                lane = torch.where(s_now > self._length(lane) - VEHICLE_LENGTH_M / 2.0, nxt[lane], lane)
            # ControlledVehicle.steering_control
            s, lat = self._lane_frame(xy, lane)
            future_heading = self._heading_at(s + speed * TAU_PURSUIT_S, lane)
            lat_speed_cmd = -KP_LATERAL_PER_S * lat
            heading_cmd = torch.asin(torch.clamp(lat_speed_cmd / _not_zero(speed), -_ASIN_LIMIT, _ASIN_LIMIT))
            heading_ref = future_heading + torch.clamp(heading_cmd, -np.pi / 4, np.pi / 4)
            rate_cmd = KP_HEADING_PER_S * _wrap_to_pi(heading_ref - heading)
            slip = torch.asin(torch.clamp(half_l / _not_zero(speed) * rate_cmd, -_ASIN_LIMIT, _ASIN_LIMIT))
            steering = torch.clamp(torch.atan(2.0 * torch.tan(slip)), -MAX_STEERING_ANGLE_RAD, MAX_STEERING_ANGLE_RAD)
            # ControlledVehicle.speed_control + Vehicle.clip_actions
            acc = KP_A_PER_S * (target_speed - speed)
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
            s_now, _ = self._lane_frame(xy.detach(), lane)
            ahead = torch.as_tensor(self._ego_next_lane)[lane]
            lane = torch.where(s_now > self._length(lane) - VEHICLE_LENGTH_M / 2.0, ahead, lane)
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

        # Ego: one integration per meta action, mixed by the action probabilities.
        A = len(self.actions)
        tgt_speed, tgt_lane = self._ego_targets(xy[:, 0], heading[:, 0], speed[:, 0])  # (B, A)
        e_xy, e_h, e_v = self._integrate(
            xy[:, 0, None, :].expand(B, A, 2).reshape(B * A, 2),
            heading[:, 0, None].expand(B, A).reshape(-1),
            speed[:, 0, None].expand(B, A).reshape(-1),
            tgt_speed.reshape(-1),
            tgt_lane.reshape(-1),
            ego=True,
        )
        ego_rows = self._rows(e_xy, e_h, e_v, world.new_ones(B * A), has_h).reshape(B, A, -1)
        ego = (action_probs[..., None] * ego_rows).sum(1)  # (B, F)

        out = [ego[:, None, :]]
        if V > 1:
            n_xy, n_h, n_v = xy[:, 1:].reshape(-1, 2), heading[:, 1:].reshape(-1), speed[:, 1:].reshape(-1)
            lane = self._closest_lane(n_xy, n_h)
            p_xy, p_h, p_v = self._integrate(n_xy, n_h, n_v, n_v, lane)  # keep speed (no IDM)
            pres = world[:, 1:, c.index("presence")].reshape(-1)
            out.append(self._rows(p_xy, p_h, p_v, pres, has_h).reshape(B, V - 1, -1))
        return torch.cat(out, 1)

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
        """Predicted next observation (B, V, F), normalised, from states (B, V, F) normalised and action_probs (B, A).

        The ego row is the probability-weighted mixture of the per-action predictions; the
        neighbour rows (independent of the action) are relative to that mixed ego, presence kept.
        """
        if action_probs.shape[-1] != len(self.actions):
            raise ValueError(f"action_probs has {action_probs.shape[-1]} actions, the prior models {len(self.actions)}")
        dtype = states.dtype
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
        return norm.to(dtype)
