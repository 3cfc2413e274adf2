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

Neighbours (rows 1..) are modelled as highway-env's ``IDMVehicle`` (the ``other_vehicles_type``
of merge-v0, highway(-fast)-v0 and roundabout-v0) with ``neighbours="idm"`` (the default):

* lateral: ``follow_road`` + ``steering_control`` on their closest lane, as for the ego, but
  **no MOBIL lane changes** (``change_lane_policy``): a neighbour that starts or is in the middle
  of a lane change is predicted to keep (return to) its closest lane. Without a route, at lane
  ends they continue as ``RoadNetwork.next_lane`` picks (the roundabout's vehicles follow
  random, unobservable routes);
* longitudinal: ``IDMVehicle.acceleration`` exactly (``COMFORT_ACC_MAX`` 3, ``COMFORT_ACC_MIN``
  -5, ``DISTANCE_WANTED`` 10 m, ``TIME_WANTED`` 1.5 s, ``DELTA`` 4, target speed clipped to
  ``[0, speed limit]`` of the current lane, projected ``desired_gap``, the result clipped to
  ``+-ACC_MAX`` = 6), recomputed on every substep against the front vehicle of
  ``Road.neighbour_vehicles(self, lane_index)``: the nearest vehicle ahead (``s_front >= s``)
  whose position is on the neighbour's current (closest) lane (``on_lane`` with a 1 m margin),
  gap ``lane_distance_to`` along that lane; while the closest lane differs from the followed
  lane (at lane ends) the minimum of the two lanes' commands, as ``IDMVehicle.act`` does;
* the **front vehicle comes from the observation only**: the other observed rows (present)
  and the ego (its predicted trajectory, so a follower reacts to the ego braking or cutting
  in), plus the scenario's static obstacles (public road layout, e.g. merge-v0's
  obstacle at the ramp's end). **Vehicles that are not observed cannot be modelled**: where
  a neighbour's real leader is outside the observation (highway: 4 of ~20 vehicles are
  observed), it is predicted to drive on a free road, and unobserved vehicles never brake it;
* the **target speed is estimated**: highway-env draws each vehicle's target speed once, at
  its creation (its initial speed, ``ControlledVehicle.target_speed = speed``; merge-v0's ramp
  vehicle 30 m/s), and keeps it; the observation carries only the current speed. With
  ``neighbour_target="equilibrium"`` (default) the target speed is the one at which the
  vehicle's IDM acceleration is 0 in the observed state, ``v / (1 - (d*/d)^2)^(1/DELTA)``
  against its observed front vehicle (the observed speed on a free road), capped at the lane's
  speed limit (also where ``d* >= d``: the vehicle brakes whatever its target). This assumes
  that the vehicle has settled behind its leader; with ``"observed"`` the target speed is the
  observed speed (a follower then always brakes). Either way ``IDMVehicle.acceleration``
  clips it to ``[0, speed limit]`` of the current lane (the lanes' ``speed_limit`` is public
  road data: merge-v0 20 m/s, so its 29-32 m/s vehicles brake). Measured on real transitions
  (eval/physics_validation.py) "equilibrium" beats "observed" in merge, highway and
  roundabout; the true target speed would make merge's neighbours exact. ``DELTA`` is
  ``IDMVehicle.DELTA`` = 4; ``randomize_behavior`` draws it per vehicle in [3.5, 4.5]
  (highway, roundabout), unobservable; merge-v0 keeps 4;
* ``neighbour_vehicles_connected_lanes`` (the ``ConnectedLane*`` environments) is not modelled:
  the front vehicle is searched on the current lane only (highway-env's default).

Measured one-step neighbour position errors (eval/physics_validation.py, 400 random-action
steps, seed 0; each neighbour against the same vehicle next step; median / p90, m): merge
0.27 / 2.8 with constant speed, 7e-6 / 0.75 with IDM; highway 0.062 / 1.07 -> 0.059 / 0.66
(most of its leaders are unobserved); roundabout 6e-4 / 2.3 -> 5e-4 / 1.9 (its large errors
are route choices at exits and MOBIL lane changes). Where the target speeds are known (not to
an attacker) IDM reproduces highway-env: to float32 rounding on a test scene, and merge's p90
drops to 6e-4 m.

``neighbours="constant"`` is the simpler model used before: ``ControlledVehicle``s that keep
their speed (``target_speed = speed``, no IDM braking) and their closest lane.

Neighbours are stepped together with the ego, substep by substep. The ego is integrated once
per meta action; the neighbours once, seeing the ego at its probability-weighted position and
velocity (exact for a one-hot action; for a soft mixture the ego they react to is the mixture,
as the predicted ego row is). Their rows are then expressed relative to the predicted ego.
highway-env re-sorts neighbour rows by distance in the next observation (``order="sorted"``)
and vehicles enter or leave the perception range, so the row correspondence between
``predict``'s output and the real next observation is approximate.

Everything discrete (lane choices, speed indices, lane switches at lane ends, which vehicle
is in front) is decided without gradient; everything continuous (positions, headings, speeds,
gaps, the action mixture) is differentiable.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from drivepriv.envs.codec import ObservationCodec
from drivepriv.priors.road import RoadGeometry, _segment_u

log = logging.getLogger(__name__)

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
# highway_env.vehicle.behavior.IDMVehicle (longitudinal policy)
IDM_ACC_MAX_MPS2 = 6.0
IDM_COMFORT_ACC_MAX_MPS2 = 3.0
IDM_COMFORT_ACC_MIN_MPS2 = -5.0
IDM_DISTANCE_WANTED_M = 5.0 + VEHICLE_LENGTH_M
IDM_TIME_WANTED_S = 1.5
IDM_DELTA = 4.0
# highway_env.road.road.Road.neighbour_vehicles: on_lane(margin=1)
_ON_LANE_MARGIN_M = 1.0
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
        self._table = _lane_table(road)
        self._lane_index = {tuple(lane.index): k for k, lane in enumerate(road.lanes)}
        self._next_lane = self._next_lanes()
        self._ego_next_lane = self._next_lanes(ego_destination) if ego_destination else self._next_lane
        self._ego_route_lane = self._route_lanes(ego_destination)
        self._side = self._side_lanes()

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
        M = T.valid.shape[1]
        m = int(T.n_seg[lane].max()) if lane.numel() else 1  # padding past every lane's last segment is never chosen
        with torch.no_grad():
            c0, dc, n0, dn = T.c0[lane, :m], T.dc[lane, :m], T.n0[lane, :m], T.dn[lane, :m]  # (N, m, 2)
            valid = T.valid[lane, :m]
            q = xy.detach()[:, None, :]
            u = _segment_u(q, c0, dc, n0, dn)
            lo, hi = T.u_lo[lane, :m], T.u_hi[lane, :m]
            u_in = torch.clamp(torch.minimum(torch.maximum(u, lo), hi), min=-1e6, max=1e6)
            d = torch.sqrt(((q - c0 - u_in[..., None] * dc) ** 2).sum(-1))
            outside = (u < lo - 1e-9) | (u > hi + 1e-9) | ~torch.isfinite(u) | ~valid
            score = d + outside.to(d.dtype) * 1e9 + (~valid).to(d.dtype) * 1e12
            flat = lane * M + score.argmin(-1)  # (N,) the chosen segment in the (L * M) table

        def pick(x: Tensor) -> Tensor:
            return x.reshape(-1, *x.shape[2:])[flat]

        c0s, dcs, n0s, dns = pick(T.c0), pick(T.dc), pick(T.n0), pick(T.dn)
        u = _segment_u(xy, c0s, dcs, n0s, dns)
        u = torch.minimum(torch.maximum(u, pick(T.u_lo)), pick(T.u_hi))
        a = xy - (c0s + u[..., None] * dcs)
        axis = n0s + u[..., None] * dns
        axis = axis / torch.sqrt((axis**2).sum(-1, keepdim=True) + 1e-12)
        lateral = (a * axis).sum(-1) - 4.0 * pick(T.bulge) * u * (1.0 - u)
        s = pick(T.s0) + u * pick(T.ds)
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
                s_now, _ = self._lane_frame(flat_xy.detach(), lane)
                ahead = torch.where(is_ego, nxt_ego[lane], nxt[lane])
                lane = torch.where(s_now > self._length(lane) - VEHICLE_LENGTH_M / 2.0, ahead, lane)
            # ControlledVehicle.steering_control
            s, lat = self._lane_frame(flat_xy, lane)
            future_heading = self._heading_at(s + flat_v * TAU_PURSUIT_S, lane)
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

    def _front(self, s_me: Tensor, s_c: Tensor, lat_c: Tensor, lane: Tensor, ok: Tensor) -> tuple[Tensor, Tensor]:
        """``Road.neighbour_vehicles``' front vehicle: index (...) into the candidates and whether there is one.

        ``s_me`` (...) the vehicle's and ``s_c``, ``lat_c`` (..., C) the candidates' local
        coordinates on ``lane`` (...); ``ok`` (..., C) the eligible candidates. A candidate is
        on the lane when ``|lateral| <= width / 2 + 1`` and ``-VEHICLE_LENGTH <= s < length +
        VEHICLE_LENGTH`` (``on_lane(margin=1)``), and ahead when ``s >= s_me``; the nearest wins.
        """
        with torch.no_grad():
            width, length = self._width[lane][..., None], self._length(lane.reshape(-1)).reshape(lane.shape)[..., None]
            on_lane = (lat_c.abs() <= width / 2.0 + _ON_LANE_MARGIN_M) & (s_c >= -VEHICLE_LENGTH_M) & (s_c < length + VEHICLE_LENGTH_M)
            ahead = ok & on_lane & (s_c >= s_me[..., None])
            score = torch.where(ahead, s_c, torch.full_like(s_c, np.inf))
            return score.argmin(-1), ahead.any(-1)

    def _idm_interaction(
        self, ego_xy: Tensor, ego_vel: Tensor, xy: Tensor, heading: Tensor, speed: Tensor, target_lane: Tensor, present: Tensor
    ) -> tuple[Tensor, Tensor]:
        """IDM's interaction term ``(desired_gap / gap)^2`` (B, n) of n neighbours, and their lanes' speed limits.

        ``ego_xy``, ``ego_vel`` (B, 2); the neighbours' ``xy`` (B, n, 2), the others (B, n).
        Front-vehicle candidates: the ego, the present neighbours and the static obstacles. 0
        without a front vehicle. Where the closest lane differs from ``target_lane`` the larger
        of the two lanes' terms (``IDMVehicle.act``'s minimum acceleration).
        """
        B, n = speed.shape
        direction = torch.stack([torch.cos(heading), torch.sin(heading)], -1)
        obstacles = self._obstacles.to(xy.dtype)[None].expand(B, -1, 2)
        c_xy = torch.cat([ego_xy[:, None], xy, obstacles], 1)  # (B, C, 2)
        c_vel = torch.cat([ego_vel[:, None], speed[..., None] * direction, torch.zeros_like(obstacles)], 1)  # Vehicle.velocity
        C = c_xy.shape[1]
        ok = torch.cat([present.new_ones(B, 1), present, present.new_ones(B, C - n - 1)], 1)[:, None, :]
        ok = ok & (torch.arange(C)[None, :] != torch.arange(1, n + 1)[:, None])  # (B, n, C): not itself
        ok = ok.expand(B, n, C)
        # Vehicle.on_state_update: lane_index is the closest lane; IDM looks for the front vehicle there
        cur = self._closest_lane(xy.reshape(-1, 2), heading.reshape(-1)).reshape(B, n)

        def on(lane: Tensor, xy_me: Tensor, cand: Tensor, ok_: Tensor) -> tuple[Tensor, Tensor]:
            """``Road.neighbour_vehicles`` on ``lane`` (m,) for vehicles at ``xy_me`` (m, 2) among ``cand`` (m, C, 2)."""
            with torch.no_grad():  # a discrete choice: no gradient, so no graph over every pair
                s_me = self._lane_frame(xy_me.detach(), lane)[0]
                s_c, lat_c = self._lane_frame(cand.detach().reshape(-1, 2), lane.repeat_interleave(C))
                return self._front(s_me, s_c.reshape(-1, C), lat_c.reshape(-1, C), lane, ok_)

        def interaction(front: Tensor, has: Tensor) -> Tensor:
            # IDMVehicle.acceleration: gap along the current lane (lane_distance_to), projected desired_gap
            idx = front[..., None, None].expand(B, n, 1, 2)
            xy_f = torch.gather(c_xy[:, None].expand(B, n, C, 2), 2, idx).squeeze(2)
            vel_f = torch.gather(c_vel[:, None].expand(B, n, C, 2), 2, idx).squeeze(2)
            s_f = self._lane_frame(xy_f.reshape(-1, 2), cur.reshape(-1))[0].reshape(B, n)
            gap = s_f - s_me
            dv = ((speed[..., None] * direction - vel_f) * direction).sum(-1)
            ab = -IDM_COMFORT_ACC_MAX_MPS2 * IDM_COMFORT_ACC_MIN_MPS2
            d_star = IDM_DISTANCE_WANTED_M + speed * IDM_TIME_WANTED_S + speed * dv / (2.0 * np.sqrt(ab))
            return torch.where(has, (d_star / _not_zero(gap)) ** 2, torch.zeros_like(gap))

        s_me = self._lane_frame(xy.reshape(-1, 2), cur.reshape(-1))[0].reshape(B, n)
        cand = c_xy[:, None].expand(B, n, C, 2)
        front, has = (x.reshape(B, n) for x in on(cur.reshape(-1), xy.reshape(-1, 2), cand.reshape(-1, C, 2), ok.reshape(-1, C)))
        inter = interaction(front, has)
        # IDMVehicle.act: while lane_index != target_lane_index, also the front vehicle on the target
        # lane (the larger interaction wins); its gap is still measured along the current lane.
        # Only the few vehicles at a lane end are searched again.
        changing = target_lane != cur
        if bool(changing.any()):
            b, i = changing.nonzero(as_tuple=True)
            front_t, has_t = on(target_lane[b, i], xy[b, i], cand[b, i], ok[b, i])
            alt_front, alt_has = front.clone(), has.clone()
            alt_front[b, i], alt_has[b, i] = front_t, has_t
            inter = torch.where(changing, torch.maximum(inter, interaction(alt_front, alt_has)), inter)
        return inter, self._speed_limit.to(xy.dtype)[cur]

    def _idm_acceleration(
        self,
        ego_xy: Tensor,
        ego_vel: Tensor,
        xy: Tensor,
        heading: Tensor,
        speed: Tensor,
        target_speed: Tensor,
        target_lane: Tensor,
        present: Tensor,
    ) -> Tensor:
        """(B, n) ``IDMVehicle.act``'s acceleration command (``IDMVehicle.acceleration``, clipped to ``ACC_MAX``)."""
        inter, limit = self._idm_interaction(ego_xy, ego_vel, xy, heading, speed, target_lane, present)
        v0 = torch.minimum(torch.clamp(target_speed, min=0.0), limit)  # clipped to [0, lane.speed_limit]
        free = 1.0 - (torch.clamp(speed, min=0.0) / _not_zero(v0).abs()) ** IDM_DELTA
        return torch.clamp(IDM_COMFORT_ACC_MAX_MPS2 * (free - inter), -IDM_ACC_MAX_MPS2, IDM_ACC_MAX_MPS2)

    def _closest_lane(self, xy: Tensor, heading: Tensor) -> Tensor:
        """``RoadNetwork.get_closest_lane_index(position, heading)`` (hard, no gradient)."""
        with torch.no_grad():
            return self.road.lane_distances(xy.detach(), heading.detach()).argmin(-1)

    def _speed_to_index(self, speed: Tensor) -> Tensor:
        """``MDPVehicle.speed_to_index``: index of the closest target speed (uniform grid)."""
        ts = self.target_speeds_mps
        x = (speed.detach() - ts[0]) / (ts[-1] - ts[0])
        return torch.clamp(torch.round(x * (ts.size - 1)), 0, ts.size - 1).long()

    def _neighbour_target_speed(self, xy: Tensor, heading: Tensor, speed: Tensor, lane: Tensor, present: Tensor) -> Tensor:
        """(B, n) the neighbours' IDM target speeds (see the module docstring), from (B, 1 + n) rows and (B, n) lanes."""
        if self.neighbour_target == "observed" or self.neighbours != "idm":
            return speed[:, 1:]
        # equilibrium: the target speed at which the IDM acceleration is 0 now, capped at the speed limit
        ego_vel = speed[:, 0, None] * torch.stack([torch.cos(heading[:, 0]), torch.sin(heading[:, 0])], -1)
        inter, limit = self._idm_interaction(xy[:, 0], ego_vel, xy[:, 1:], heading[:, 1:], speed[:, 1:], lane, present)
        cap = torch.clamp(limit, max=MAX_SPEED_MPS)
        v = torch.clamp(speed[:, 1:], min=0.0)
        v0 = v * (1.0 - torch.clamp(inter, max=1.0 - 1e-3)) ** (-1.0 / IDM_DELTA)
        return torch.where(inter < 1.0 - 1e-3, torch.minimum(v0, cap), cap)

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
