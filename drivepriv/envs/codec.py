"""Observation codec: normalised Kinematics observation <-> physical units (m, m/s, rad).

highway-env's Kinematics observation is a (vehicles, features) array. Row 0 is the ego in
absolute world coordinates; rows 1.. are the nearest vehicles, with x, y, vx, vy relative to
the ego (``absolute=False``) and absolute headings (cos_h, sin_h). Features with a range are
mapped linearly from [low, high] onto [-1, 1] and clipped; missing rows are all zeros.

The codec works on numpy arrays and torch tensors alike (only arithmetic), so the attacks'
priors and the metrics share it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import numpy as np

Array = TypeVar("Array")

#: Clipped values sit at +-1 exactly; anything this close counts as clipped.
CLIP_TOL = 1e-6


@dataclass(frozen=True)
class ObservationCodec:
    """Decode and encode one scenario's observation layout."""

    features: tuple[str, ...]
    vehicles_count: int
    ranges: dict[str, tuple[float, float]]

    kind = "kinematics"
    #: Rows carry positions in metres (the ego's absolute, neighbours' relative to it): road
    #: geometry, the simulator's ego step, trips' ADE/FDE and per-feature leakage in m apply.
    has_positions = True
    #: Not one flat vector of named features: scored per vehicle row (:mod:`drivepriv.metrics.scores`).
    flat = False
    #: Unit suffix of the distance columns (``dyn_residual_m``): the residual is an ego distance in m.
    distance_suffix = "_m"

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def obs_shape(self) -> tuple[int, int]:
        return (self.vehicles_count, self.n_features)

    def box(self) -> tuple[np.ndarray, np.ndarray]:
        """(low, high) of every observation element: the observation is clipped to [-1, 1]."""
        return -np.ones(self.obs_shape, dtype=np.float32), np.ones(self.obs_shape, dtype=np.float32)

    #: Physical features the transition distance compares, with their weight (headings x10:
    #: a unit of cos/sin is as wrong as 10 m).
    TRANSITION_FEATURES = {"x": 1.0, "y": 1.0, "vx": 1.0, "vy": 1.0, "cos_h": 10.0, "sin_h": 10.0}

    def transition_distance(self, pred: Array, actual: Array) -> Array:
        """Squared distance (N,) between predicted and actual next observations (N, V, F):
        per row, the weighted squared error in m and m/s summed over features, averaged over
        rows, plus the squared presence error."""
        import torch

        p, a = self.to_physical(pred), self.to_physical(actual)
        idx = [self.index(f) for f in self.TRANSITION_FEATURES if f in self.features]
        w = torch.tensor([self.TRANSITION_FEATURES[self.features[i]] for i in idx], dtype=pred.dtype)
        diff = ((a[..., idx] - p[..., idx]) * w) ** 2
        pres = self.index("presence")
        presence_err = (actual[..., pres] - pred[..., pres]) ** 2
        return diff.sum(-1).mean(-1) + presence_err.mean(-1)

    @property
    def obs_dim(self) -> int:
        return self.vehicles_count * self.n_features

    def index(self, feature: str) -> int:
        return self.features.index(feature)

    def _scale_offset(self) -> tuple[np.ndarray, np.ndarray]:
        """phys = norm * scale + offset, per feature (identity for features without a range)."""
        scale = np.ones(self.n_features)
        offset = np.zeros(self.n_features)
        for i, f in enumerate(self.features):
            if f in self.ranges:
                lo, hi = self.ranges[f]
                scale[i] = (hi - lo) / 2.0
                offset[i] = (hi + lo) / 2.0
        return scale, offset

    def to_physical(self, obs: Array) -> Array:
        """(..., V, F) normalised -> (..., V, F) physical, rows as observed (neighbours ego-relative).

        Rows with presence 0 are returned as zeros, as the environment writes them.
        """
        scale, offset = self._like(obs)
        phys = obs * scale + offset
        pres = obs[..., self.index("presence")][..., None]
        return phys * _row_mask(pres, self.index("presence"), self.n_features, obs)

    def to_normalised(self, phys: Array) -> Array:
        """Inverse of :meth:`to_physical` (without clipping)."""
        scale, offset = self._like(phys)
        norm = (phys - offset) / scale
        pres = phys[..., self.index("presence")][..., None]
        return norm * _row_mask(pres, self.index("presence"), self.n_features, phys)

    def to_world(self, phys: Array) -> Array:
        """Make neighbour rows absolute: add the ego's x, y, vx, vy to present neighbour rows."""
        p = self.index("presence")
        idx = [self.index(f) for f in ("x", "y", "vx", "vy")]
        out = phys.copy() if isinstance(phys, np.ndarray) else phys.clone()
        out[..., 1:, idx] = phys[..., 1:, idx] + phys[..., 0:1, idx] * phys[..., 1:, p : p + 1]
        return out

    def decode_world(self, obs: Array) -> Array:
        """Normalised observation -> physical units with every row in world coordinates."""
        return self.to_world(self.to_physical(obs))

    def clipped(self, obs: np.ndarray) -> np.ndarray:
        """Boolean mask (..., V, F) of ranged features that sit at the clip boundary."""
        mask = np.zeros(obs.shape, dtype=bool)
        for f in self.ranges:
            i = self.index(f)
            mask[..., i] = np.abs(obs[..., i]) >= 1.0 - CLIP_TOL
        pres = obs[..., self.index("presence")] > 0.5
        return mask & pres[..., None]

    def speed(self, phys: Array) -> Array:
        """Signed speed (m/s) of each row; uses the heading when the layout has it."""
        vx, vy = phys[..., self.index("vx")], phys[..., self.index("vy")]
        if "cos_h" in self.features and "sin_h" in self.features:
            return vx * phys[..., self.index("cos_h")] + vy * phys[..., self.index("sin_h")]
        return (vx**2 + vy**2) ** 0.5

    def _like(self, ref: Array) -> tuple[Array, Array]:
        scale, offset = self._scale_offset()
        if isinstance(ref, np.ndarray):
            return scale.astype(ref.dtype), offset.astype(ref.dtype)
        import torch

        return (
            torch.as_tensor(scale, dtype=ref.dtype, device=ref.device),
            torch.as_tensor(offset, dtype=ref.dtype, device=ref.device),
        )


def _row_mask(pres: Array, p: int, n_features: int, ref: Array) -> Array:
    """Mask that keeps present rows, and keeps the presence column itself everywhere."""
    if isinstance(ref, np.ndarray):
        keep = np.zeros(n_features, dtype=ref.dtype)
    else:
        import torch

        keep = torch.zeros(n_features, dtype=ref.dtype, device=ref.device)
    keep[p] = 1.0
    return pres + (1.0 - pres) * keep
