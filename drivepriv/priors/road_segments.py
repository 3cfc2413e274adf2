"""Lane segment tables and the segment math behind :class:`~drivepriv.priors.road.RoadGeometry`'s torch queries.

Every lane's centre-line polyline becomes segments (flattened over all lanes in
:class:`_LaneTensors`, gathered per lane in :class:`_LaneTable`); :func:`_segment_fit` scores
how well a segment fits a point and :func:`_segment_frame` gives the point's frame on its
chosen segment. One piece of code for the road's queries on every lane and on one given lane
per point (the physics prior's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from drivepriv.priors.road import Lane

#: Added under square roots so that gradients stay finite on the lane centre line (m^2).
_SQRT_EPS_M2 = 1e-12


@dataclass(frozen=True)
class _LaneTensors:
    """Every lane's polyline segments, flattened: arrays (S[, 2]) over all S segments.

    Segment k runs from point ``c0`` to ``c0 + dc`` as ``u`` goes from 0 to 1, and the centre
    line bows ``4 bulge u (1 - u)`` out of it along the lateral axis. The lateral axis,
    longitudinal coordinate and heading are interpolated linearly in ``u`` (``n0 + u dn``,
    ``s0 + u ds``, ``h0 + u dh``). ``u_lo`` / ``u_hi`` bound ``u`` (-inf / +inf on the first /
    last segment of a lane, which extend past the lane's ends). ``seg_index`` (L, M) lists each
    lane's segments, padded with S (a column of +inf scores).
    """

    c0: Tensor
    dc: Tensor
    bulge: Tensor
    n0: Tensor
    dn: Tensor
    s0: Tensor
    ds: Tensor
    h0: Tensor
    dh: Tensor
    u_lo: Tensor
    u_hi: Tensor
    seg_index: Tensor
    length: Tensor
    half_width: Tensor
    open_start: Tensor
    open_end: Tensor


def _build_tensors(lanes: tuple[Lane, ...], dtype: torch.dtype, device: torch.device) -> _LaneTensors:
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("c0", "dc", "bulge", "n0", "dn", "s0", "ds", "h0", "dh", "u_lo", "u_hi")}
    n_seg = max(len(lane.points) - 1 for lane in lanes)
    total = sum(len(lane.points) - 1 for lane in lanes)
    seg_index = np.full((len(lanes), n_seg), total, dtype=np.int64)  # padding: the +inf column
    first = 0
    for i, lane in enumerate(lanes):
        pts = np.asarray(lane.points, dtype=np.float64)
        s, h = lane.stations()
        n = lane.lateral_axes()
        m = len(pts) - 1
        cols["c0"].append(pts[:-1])
        cols["dc"].append(np.diff(pts, axis=0))
        cols["bulge"].append(np.zeros(m) if lane.bulges_m is None else np.asarray(lane.bulges_m, dtype=np.float64))
        cols["n0"].append(n[:-1])
        cols["dn"].append(np.diff(n, axis=0))
        cols["s0"].append(s[:-1])
        cols["ds"].append(np.diff(s))
        cols["h0"].append(h[:-1])
        cols["dh"].append(np.diff(h))
        lo, hi = np.zeros(m), np.ones(m)
        lo[0], hi[-1] = -np.inf, np.inf
        cols["u_lo"].append(lo)
        cols["u_hi"].append(hi)
        seg_index[i, :m] = np.arange(first, first + m)
        first += m

    def t(a) -> Tensor:
        return torch.as_tensor(np.asarray(a, dtype=np.float64), dtype=dtype, device=device)

    return _LaneTensors(
        **{k: t(np.concatenate(v)) for k, v in cols.items()},
        seg_index=torch.as_tensor(seg_index, device=device),
        length=t([lane.length_m for lane in lanes]),
        half_width=t([lane.width_m / 2.0 for lane in lanes]),
        open_start=t([float(lane.open_start) for lane in lanes]),
        open_end=t([float(lane.open_end) for lane in lanes]),
    )


@dataclass(frozen=True)
class _LaneTable:
    """:class:`_LaneTensors`' segment columns gathered per lane and padded to M segments: (L, M[, 2]).

    Padding entries (``valid`` False) have unit ``dc`` and ``ds`` and are never selected;
    ``n_seg`` (L,) counts each lane's segments.
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


def _build_lane_table(T: _LaneTensors) -> _LaneTable:
    idx = T.seg_index  # (L, M); padding points one past the last segment
    total = T.c0.shape[0]
    valid = idx < total
    pads = {"c0": 0.0, "dc": 1.0, "n0": 0.0, "dn": 0.0, "bulge": 0.0, "s0": 0.0, "ds": 1.0, "h0": 0.0, "dh": 0.0, "u_lo": 0.0, "u_hi": 1.0}
    cols = {}
    for key, pad in pads.items():
        col = getattr(T, key)
        cols[key] = torch.cat([col, torch.full_like(col[:1], pad)])[idx]
    return _LaneTable(**cols, valid=valid, n_seg=valid.sum(1))


def _cross(a: Tensor, b: Tensor) -> Tensor:
    return a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]


def _segment_u(q: Tensor, c0: Tensor, dc: Tensor, n0: Tensor, dn: Tensor) -> Tensor:
    """``u`` such that ``q`` lies on the lateral axis at ``c0 + u dc`` (direction ``n0 + u dn``).

    Solves ``cross(q - c0 - u dc, n0 + u dn) = 0`` (linear on straight and sine lanes, whose
    lateral axis is constant; quadratic on arcs) and keeps the root nearest the segment.
    """
    a = q - c0
    k0 = _cross(a, n0)
    k1 = _cross(a, dn) - _cross(dc, n0)
    k2 = -_cross(dc, dn)
    disc = torch.clamp(k1 * k1 - 4.0 * k2 * k0, min=1e-18)
    sgn = torch.where(k1 >= 0, torch.ones_like(k1), -torch.ones_like(k1))
    den = k1 + sgn * torch.sqrt(disc)
    den = torch.where(den.abs() < 1e-12, sgn * 1e-12, den)
    return -2.0 * k0 / den


def _segment_fit(q: Tensor, c0: Tensor, dc: Tensor, n0: Tensor, dn: Tensor, u_lo: Tensor, u_hi: Tensor) -> tuple[Tensor, Tensor]:
    """How well each segment fits ``q`` (no gradient wanted): its distance to the clamped foot
    point, and whether ``q``'s parameter falls outside ``[u_lo, u_hi]`` (or is not finite)."""
    u = _segment_u(q, c0, dc, n0, dn)
    u_in = torch.clamp(torch.minimum(torch.maximum(u, u_lo), u_hi), min=-1e6, max=1e6)
    d = torch.sqrt(((q - c0 - u_in[..., None] * dc) ** 2).sum(-1))
    outside = (u < u_lo - 1e-9) | (u > u_hi + 1e-9) | ~torch.isfinite(u)
    return d, outside


def _segment_frame(
    q: Tensor, c0: Tensor, dc: Tensor, n0: Tensor, dn: Tensor, u_lo: Tensor, u_hi: Tensor, bulge: Tensor, s0: Tensor, ds: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``q``'s frame on its chosen segment (differentiable): ``(u, a, axis, along, s)``.

    ``u`` clamped to ``[u_lo, u_hi]``; ``a`` from the chord point to ``q``; ``axis`` the unit
    lateral axis; ``along`` the signed lateral offset from the centre line (the chord plus a
    parabolic bulge: exact to second order on arcs, and continuing them past the lane's ends);
    ``s`` the longitudinal coordinate.
    """
    u = _segment_u(q, c0, dc, n0, dn)
    u = torch.minimum(torch.maximum(u, u_lo), u_hi)
    a = q - (c0 + u[..., None] * dc)
    axis = n0 + u[..., None] * dn
    axis = axis / torch.sqrt((axis**2).sum(-1, keepdim=True) + _SQRT_EPS_M2)
    along = (a * axis).sum(-1) - 4.0 * bulge * u * (1.0 - u)
    return u, a, axis, along, s0 + u * ds
