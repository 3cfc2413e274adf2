"""The neighbours' longitudinal model of the physics prior: highway-env's ``IDMVehicle`` against the observed front vehicle.

:class:`_IDMNeighbours` is a mixin of :class:`~drivepriv.priors.physics.kinematic.KinematicPrior`;
it reads the prior's ``road``, ``neighbours``, ``neighbour_target``, ``_width``,
``_speed_limit``, ``_obstacles`` and ``_closest_lane``. See the package docstring for the model.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from drivepriv.priors.physics.constants import (
    _ON_LANE_MARGIN_M,
    IDM_ACC_MAX_MPS2,
    IDM_COMFORT_ACC_MAX_MPS2,
    IDM_COMFORT_ACC_MIN_MPS2,
    IDM_DELTA,
    IDM_DISTANCE_WANTED_M,
    IDM_TIME_WANTED_S,
    MAX_SPEED_MPS,
    VEHICLE_LENGTH_M,
    _not_zero,
)


class _IDMNeighbours:
    """IDM front-vehicle search, interaction term, acceleration and target-speed estimate (B scenes, n neighbours)."""

    def _front(self, s_me: Tensor, s_c: Tensor, lat_c: Tensor, lane: Tensor, ok: Tensor) -> tuple[Tensor, Tensor]:
        """``Road.neighbour_vehicles``' front vehicle: index (...) into the candidates and whether there is one.

        ``s_me`` (...) the vehicle's and ``s_c``, ``lat_c`` (..., C) the candidates' local
        coordinates on ``lane`` (...); ``ok`` (..., C) the eligible candidates. A candidate is
        on the lane when ``|lateral| <= width / 2 + 1`` and ``-VEHICLE_LENGTH <= s < length +
        VEHICLE_LENGTH`` (``on_lane(margin=1)``), and ahead when ``s >= s_me``; the nearest wins.
        """
        with torch.no_grad():
            width, length = self._width[lane][..., None], self.road.lane_length_of(lane.reshape(-1)).reshape(lane.shape)[..., None]
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

        s_me = self.road.lane_frame(xy.reshape(-1, 2), cur.reshape(-1))[0].reshape(B, n)
        cand = c_xy[:, None].expand(B, n, C, 2)
        # IDMVehicle.act: while lane_index != target_lane_index, also the front vehicle on the target
        # lane (the larger interaction wins); its gap is still measured along the current lane.
        # Only the few vehicles at a lane end are searched again.
        changing = target_lane != cur
        b, i = changing.nonzero(as_tuple=True)
        with torch.no_grad():  # Road.neighbour_vehicles, a discrete choice: no gradient, so no graph over every pair
            # one lane query for all: rows 0 .. B n - 1 search each vehicle's current lane, the rows
            # after them the changing vehicles' target lanes (the candidates' frames on each
            # searched lane, then the changing vehicles' own frames on their target lanes)
            lanes = torch.cat([cur.reshape(-1), target_lane[b, i]])
            cands = torch.cat([cand.reshape(-1, C, 2), cand[b, i]]).reshape(-1, 2)
            s_q, lat_q = self.road.lane_frame(torch.cat([cands, xy[b, i]]).detach(), torch.cat([lanes.repeat_interleave(C), target_lane[b, i]]))
            k = len(lanes) * C
            s_all = torch.cat([s_me.detach().reshape(-1), s_q[k:]])
            found, has_all = self._front(s_all, s_q[:k].reshape(-1, C), lat_q[:k].reshape(-1, C), lanes, torch.cat([ok.reshape(-1, C), ok[b, i]]))

        # IDMVehicle.acceleration against each row's front vehicle, all rows in one pass: the gap
        # along the current lane (lane_distance_to), the projected desired_gap
        rows = torch.cat([torch.arange(B * n), b * n + i])
        scene = torch.div(rows, n, rounding_mode="floor")
        xy_f, vel_f = c_xy[scene, found], c_vel[scene, found]
        s_f = self.road.lane_frame(xy_f, cur.reshape(-1)[rows])[0]
        gap = s_f - s_me.reshape(-1)[rows]
        v, d = speed.reshape(-1)[rows], direction.reshape(-1, 2)[rows]
        dv = ((v[..., None] * d - vel_f) * d).sum(-1)
        ab = -IDM_COMFORT_ACC_MAX_MPS2 * IDM_COMFORT_ACC_MIN_MPS2
        d_star = IDM_DISTANCE_WANTED_M + v * IDM_TIME_WANTED_S + v * dv / (2.0 * np.sqrt(ab))
        term = torch.where(has_all, (d_star / _not_zero(gap)) ** 2, torch.zeros_like(gap))
        inter = term[: B * n].reshape(B, n)
        if len(b):
            inter = inter.index_put((b, i), torch.maximum(inter[b, i], term[B * n :]))
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
