"""Road geometry read from a scenario's public road network: lane centre lines as polylines.

Lanes are sampled into polylines (straight lanes: their two end points; curved lanes: every
``step_m`` metres), so the same code serves the straight lanes of merge and highway and the
curved lanes of roundabout and intersection.

The torch methods (:meth:`RoadGeometry.lane_local_coordinates`, :meth:`RoadGeometry.lane_distances`,
:meth:`RoadGeometry.closest_lane_weights`, :meth:`RoadGeometry.offroad_m`) are differentiable
reimplementations of highway-env's lane queries (``AbstractLane.local_coordinates``,
``distance_with_heading``, ``RoadNetwork.get_closest_lane_index``, ``on_lane``), evaluated on
the polylines. Each polyline segment carries the lane's lateral axis at its ends and how far
the centre line bows out of it at its middle, so they are exact on straight lanes (up to float
rounding) and, with the default 2 m step, within about 1e-4 m on ``SineLane`` and
``CircularLane`` inside the lane and a few centimetres up to 3 m past a curved lane's ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from drivepriv.priors.road_segments import (
    _SQRT_EPS_M2,
    _build_lane_table,
    _build_tensors,
    _cross,
    _LaneTable,
    _LaneTensors,
    _segment_fit,
    _segment_frame,
)


@dataclass(frozen=True)
class Lane:
    """One lane: its index in the road network, centre-line polyline (N, 2) in metres, width.

    ``s_m`` holds the lane's own longitudinal coordinate at each polyline point (highway-env's
    ``s``; for a ``SineLane`` it runs along the chord, not the curve), ``headings_rad`` the lane
    heading there (unwrapped), ``lateral_dirs`` (N, 2) the lane's lateral axis there (unit), and
    ``bulges_m`` (N - 1,) how far the centre line bows out of each segment at its middle, along
    the lateral axis (0 on straight lanes). ``open_start`` / ``open_end``: no lane of the network
    leads into the start / out of the end, so vehicles enter there, or keep driving straight
    past it. The optional arrays are derived from the points when absent.
    """

    index: tuple[str, str, int]
    points: np.ndarray
    width_m: float
    forbidden: bool = False
    s_m: np.ndarray | None = None
    headings_rad: np.ndarray | None = None
    open_start: bool = False
    open_end: bool = False
    lateral_dirs: np.ndarray | None = None
    bulges_m: np.ndarray | None = None

    @property
    def length_m(self) -> float:
        """The lane's length in its own longitudinal coordinate (highway-env ``lane.length``)."""
        if self.s_m is not None:
            return float(self.s_m[-1])
        return float(np.linalg.norm(np.diff(self.points, axis=0), axis=1).sum())

    def stations(self) -> tuple[np.ndarray, np.ndarray]:
        """(s_m, headings_rad) at the polyline points, derived from the points when not stored."""
        seg = np.diff(self.points, axis=0)
        s = self.s_m if self.s_m is not None else np.concatenate([[0.0], np.cumsum(np.linalg.norm(seg, axis=1))])
        if self.headings_rad is not None:
            return s, self.headings_rad
        h = np.arctan2(seg[:, 1], seg[:, 0])
        return s, np.unwrap(np.concatenate([h, h[-1:]]))

    def lateral_axes(self) -> np.ndarray:
        """(N, 2) unit lateral axis at each point (highway-env's d position / d lateral).

        Derived from the polyline (perpendicular, averaged at inner points) when not stored.
        """
        if self.lateral_dirs is not None:
            return np.asarray(self.lateral_dirs, dtype=np.float64)
        seg = np.diff(self.points, axis=0)
        perp = np.stack([-seg[:, 1], seg[:, 0]], axis=1)
        perp /= np.maximum(np.linalg.norm(perp, axis=1, keepdims=True), 1e-12)
        n = np.concatenate([perp[:1], (perp[:-1] + perp[1:]) / 2.0, perp[-1:]])
        return n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)


class LaneCoordinates(NamedTuple):
    """Local coordinates of points on every lane, each (..., n_lanes)."""

    s_m: Tensor  #: longitudinal coordinate (highway-env ``s``), extrapolated past the ends
    lateral_abs_m: Tensor  #: |lateral offset| from the centre line
    heading_rad: Tensor  #: lane heading at ``s_m``


@dataclass(frozen=True)
class RoadGeometry:
    """All lanes of a road network."""

    lanes: tuple[Lane, ...]

    @classmethod
    def from_network(cls, network, step_m: float = 2.0) -> "RoadGeometry":
        """Sample every lane of a highway-env ``RoadNetwork``."""
        from highway_env.road.lane import StraightLane

        has_in = {to for to_dict in network.graph.values() for to in to_dict}
        has_out = {_from for _from, to_dict in network.graph.items() if any(to_dict.values())}
        lanes = []
        for _from, to_dict in network.graph.items():
            for _to, lane_list in to_dict.items():
                for i, lane in enumerate(lane_list):
                    length = float(lane.length)
                    if type(lane) is StraightLane:  # SineLane subclasses StraightLane
                        s = np.array([0.0, length])
                    else:
                        n = max(2, int(np.ceil(length / step_m)) + 1)
                        s = np.linspace(0.0, length, n)
                    pts = np.array([lane.position(float(si), 0.0) for si in s], dtype=np.float64)
                    headings = np.unwrap(np.array([float(lane.heading_at(float(si))) for si in s]))
                    axes = np.array([lane.position(float(si), 1.0) for si in s], dtype=np.float64) - pts
                    axes /= np.maximum(np.linalg.norm(axes, axis=1, keepdims=True), 1e-12)
                    mid = np.array([lane.position(float(si), 0.0) for si in (s[:-1] + s[1:]) / 2.0])
                    mid_axes = axes[:-1] + axes[1:]
                    mid_axes /= np.maximum(np.linalg.norm(mid_axes, axis=1, keepdims=True), 1e-12)
                    bulges = ((mid - (pts[:-1] + pts[1:]) / 2.0) * mid_axes).sum(-1)
                    lanes.append(
                        Lane(
                            index=(_from, _to, i),
                            points=pts,
                            width_m=float(lane.width_at(0.0)),
                            forbidden=bool(getattr(lane, "forbidden", False)),
                            s_m=s,
                            headings_rad=headings,
                            open_start=_from not in has_in,
                            open_end=_to not in has_out,
                            lateral_dirs=axes,
                            bulges_m=bulges,
                        )
                    )
        return cls(lanes=tuple(lanes))

    @classmethod
    def from_env(cls, env, step_m: float = 2.0) -> "RoadGeometry":
        """Road geometry of a (reset) environment; resets it with seed 0 first if it has no road."""
        base = env.unwrapped
        if getattr(base, "road", None) is None:
            env.reset(seed=0)
        return cls.from_network(base.road.network, step_m)

    def bounds(self, margin_m: float = 0.0) -> tuple[float, float, float, float]:
        """(x_min, x_max, y_min, y_max) of all lane centre lines, widened by ``margin_m``."""
        pts = np.concatenate([lane.points for lane in self.lanes])
        return (
            float(pts[:, 0].min() - margin_m),
            float(pts[:, 0].max() + margin_m),
            float(pts[:, 1].min() - margin_m),
            float(pts[:, 1].max() + margin_m),
        )

    # ------------------------------------------------------------------------------------
    # Differentiable lane queries (torch)

    @property
    def n_lanes(self) -> int:
        return len(self.lanes)

    def lane_position(self, index: tuple[str, str, int]) -> int:
        """Position of the lane ``index`` (e.g. ``("b", "c", 2)``) along the lane axis of the queries."""
        for k, lane in enumerate(self.lanes):
            if tuple(lane.index) == tuple(index):
                return k
        raise KeyError(f"no lane {index!r} in this road (lanes: {[lane.index for lane in self.lanes]})")

    def lane_ids(self, like: Tensor) -> Tensor:
        """(n_lanes,) the third element of each lane index (``lane_index[2]``), as ``like``'s dtype."""
        return torch.tensor([float(lane.index[2]) for lane in self.lanes], dtype=like.dtype, device=like.device)

    def lane_lengths_m(self, like: Tensor) -> Tensor:
        """(n_lanes,) each lane's length (highway-env ``lane.length``), as ``like``'s dtype and device."""
        return self._tensors(like.dtype, like.device).length

    def lane_widths_m(self, like: Tensor) -> Tensor:
        """(n_lanes,) each lane's width, as ``like``'s dtype and device."""
        return 2.0 * self._tensors(like.dtype, like.device).half_width

    def _tensors(self, dtype: torch.dtype, device: torch.device) -> _LaneTensors:
        cache = self.__dict__.get("_torch_cache")
        if cache is None:
            cache = {}
            object.__setattr__(self, "_torch_cache", cache)  # frozen dataclass: cache lazily
        key = (dtype, str(device))
        if key not in cache:
            cache[key] = _build_tensors(self.lanes, dtype, device)
        return cache[key]

    def _lane_table(self) -> _LaneTable:
        """The per-lane view of the float64 CPU segment table (cached)."""
        T = self._tensors(torch.float64, torch.device("cpu"))  # creates the cache
        cache = self.__dict__["_torch_cache"]
        if "lane_table" not in cache:
            cache["lane_table"] = _build_lane_table(T)
        return cache["lane_table"]

    # Queries on one given lane per point (float64, as the physics prior needs)

    def lane_frame(self, xy: Tensor, lane: Tensor) -> tuple[Tensor, Tensor]:
        """(s_m, signed lateral_m) of ``xy`` (N, 2) on lane ``lane`` (N,): ``AbstractLane.local_coordinates``.

        As :meth:`lane_local_coordinates` (same segments, same choice of segment), on one lane
        per point; the lateral offset is signed along the lane's lateral axis (highway-env's sign).
        """
        T = self._lane_table()
        M = T.valid.shape[1]
        with torch.no_grad():
            # a lane of one segment leaves nothing to choose: only the points on longer lanes are
            # scored, on as many segments as the longest of those has (padding is never chosen)
            n_seg = T.n_seg[lane]
            flat = lane * M  # (N,) the chosen segment in the (L * M) table
            at = torch.nonzero(n_seg > 1).flatten()
            if len(at):
                ln, m = lane[at], int(n_seg[at].max())
                valid = T.valid[ln, :m]
                d, outside = _segment_fit(xy.detach()[at, None, :], T.c0[ln, :m], T.dc[ln, :m], T.n0[ln, :m], T.dn[ln, :m], T.u_lo[ln, :m], T.u_hi[ln, :m])
                score = d + (outside | ~valid).to(d.dtype) * 1e9 + (~valid).to(d.dtype) * 1e12
                flat = flat.index_add(0, at, score.argmin(-1))

        def pick(x: Tensor) -> Tensor:
            return x.reshape(-1, *x.shape[2:])[flat]

        _, _, _, lateral, s = _segment_frame(
            xy, pick(T.c0), pick(T.dc), pick(T.n0), pick(T.dn), pick(T.u_lo), pick(T.u_hi), pick(T.bulge), pick(T.s0), pick(T.ds)
        )
        return s, lateral

    def lane_heading_at(self, s: Tensor, lane: Tensor) -> Tensor:
        """``AbstractLane.heading_at(s)`` on lane ``lane`` (N,): piecewise linear in s, extended past the ends."""
        T = self._lane_table()
        s0, ds, h0, dh = T.s0[lane], T.ds[lane], T.h0[lane], T.dh[lane]  # (N, M)
        with torch.no_grad():
            inside = (s.detach()[:, None] >= s0) & T.valid[lane]
            seg = (inside.long().sum(-1) - 1).clamp(min=0)
            seg = torch.minimum(seg, T.n_seg[lane] - 1)[:, None]
        u = (s - torch.gather(s0, 1, seg).squeeze(1)) / torch.gather(ds, 1, seg).squeeze(1)
        return torch.gather(h0, 1, seg).squeeze(1) + u * torch.gather(dh, 1, seg).squeeze(1)

    def lane_length_of(self, lane: Tensor) -> Tensor:
        """Length (m) of lane ``lane`` (any shape of lane positions), float64."""
        T = self._lane_table()
        return T.s0[lane, T.n_seg[lane] - 1] + T.ds[lane, T.n_seg[lane] - 1]

    def lane_local_coordinates(self, xy: Tensor) -> LaneCoordinates:
        """Local coordinates of world points ``xy`` (..., 2) on every lane (highway-env ``local_coordinates``).

        On each polyline segment the lane's lateral axis is interpolated between its end
        points and ``q`` is placed on the axis through it (highway-env's own construction: the
        chord normal on a ``SineLane``, the radius on an arc); the lateral offset is measured
        along that axis from the centre line, modelled as the chord plus a parabolic bulge.
        The segment is the one whose parameter falls inside it with the smallest offset (else
        the nearest); the first and last segments extend past the lane's ends, so ``s_m`` runs
        below 0 and above the length there. Gradients flow through the chosen segment.
        """
        T = self._tensors(xy.dtype, xy.device)
        with torch.no_grad():
            q = xy.detach()[..., None, :]  # (..., 1, 2)
            d, outside = _segment_fit(q, T.c0, T.dc, T.n0, T.dn, T.u_lo, T.u_hi)  # (..., S)
            score = d + outside.to(d.dtype) * 1e9
            score = torch.cat([score, torch.full_like(score[..., :1], float("inf"))], -1)
            k = score[..., T.seg_index].argmin(-1, keepdim=True)  # (..., L, 1)
            seg = torch.gather(T.seg_index.expand(k.shape[:-1] + T.seg_index.shape[-1:]), -1, k).squeeze(-1)

        q = xy[..., None, :]  # (..., 1, 2)
        u, a, axis, along, s = _segment_frame(  # (..., L)
            q, T.c0[seg], T.dc[seg], T.n0[seg], T.dn[seg], T.u_lo[seg], T.u_hi[seg], T.bulge[seg], T.s0[seg], T.ds[seg]
        )
        across = _cross(a, axis)  # 0 unless u was clamped (a point far from the lane)
        lateral = torch.sqrt(along**2 + across**2 + _SQRT_EPS_M2)
        heading = T.h0[seg] + u * T.dh[seg]
        return LaneCoordinates(s_m=s, lateral_abs_m=lateral, heading_rad=heading)

    def lane_distances(self, xy: Tensor, heading: Tensor | None = None, heading_weight: float = 1.0, coords: LaneCoordinates | None = None) -> Tensor:
        """(..., n_lanes) highway-env's ``AbstractLane.distance_with_heading`` to every lane.

        ``|lateral| + max(s - length, 0) + max(-s, 0) + heading_weight * |wrap(heading - lane heading at s)|``
        (metres plus radians); without ``heading`` the heading term is dropped (``distance``).
        ``coords``: ``lane_local_coordinates(xy)`` where the caller has it already.
        """
        c = self.lane_local_coordinates(xy) if coords is None else coords
        T = self._tensors(xy.dtype, xy.device)
        dist = c.lateral_abs_m + torch.relu(c.s_m - T.length) + torch.relu(-c.s_m)
        if heading is not None:
            diff = heading[..., None] - c.heading_rad
            dist = dist + heading_weight * torch.atan2(torch.sin(diff), torch.cos(diff)).abs()
        return dist

    def closest_lane_weights(self, xy: Tensor, heading: Tensor | None, temperature: float, coords: LaneCoordinates | None = None) -> Tensor:
        """(..., n_lanes) softmax(-lane_distances / temperature): a soft ``get_closest_lane_index``.

        ``temperature`` is in metres (of lane distance); ``temperature <= 0`` returns the hard
        one-hot of highway-env's argmin (ties go to the first lane in network order, as there).
        """
        d = self.lane_distances(xy, heading, coords=coords)
        if temperature <= 0.0:
            return torch.nn.functional.one_hot(d.argmin(-1), d.shape[-1]).to(d.dtype)
        return torch.softmax(-d / temperature, dim=-1)

    def offroad_m(self, xy: Tensor) -> Tensor:
        """(...) metres outside the drivable area (0 on any lane).

        ``relu(min over lanes of (|lateral| + beyond-ends - width/2))``. Ends with no
        connecting lane (``open_start`` / ``open_end``) do not count: highway-env vehicles enter
        there, or keep driving straight past the last lane.
        """
        c = self.lane_local_coordinates(xy)
        T = self._tensors(xy.dtype, xy.device)
        beyond = (1.0 - T.open_end) * torch.relu(c.s_m - T.length) + (1.0 - T.open_start) * torch.relu(-c.s_m)
        return torch.relu((c.lateral_abs_m + beyond - T.half_width).min(-1).values)
