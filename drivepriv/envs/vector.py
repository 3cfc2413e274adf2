"""Codec for flat observation vectors (MetaDrive's lidar-and-state observation, gymnasium's
control tasks, highway-env's goal observation): named features with physical units.

Each element i of the observation maps to physical units by ``phys_i = obs_i * scale_i +
offset_i``. Features are gathered in groups (``speed``, ``lidar``, ``theta`` ...): the metrics
report one error per group in the group's unit, and the transition regularizer compares
next states group by group in those units, so its weights mean the same across tasks.

Works on numpy arrays and torch tensors alike (only arithmetic and indexing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import numpy as np

Array = TypeVar("Array")


@dataclass(frozen=True)
class VectorFeature:
    """One element of a flat observation."""

    name: str
    #: Physical unit of ``obs * scale + offset``: "m", "m/s", "rad", "rad/s", "" (none).
    unit: str = ""
    scale: float = 1.0
    offset: float = 0.0
    #: Range of the *observation* value the simulator can emit (before decoding).
    low: float = -math.inf
    high: float = math.inf
    #: Features of one group are scored together (defaults to the feature's own name).
    group: str = ""

    @property
    def group_name(self) -> str:
        return self.group or self.name


@dataclass(frozen=True)
class VectorCodec:
    """Decode a flat observation (D,) into physical units, group by group."""

    features: tuple[VectorFeature, ...]
    #: Feasible box used to project reconstructions where a feature is unbounded (+-this).
    unbounded_box: float = 10.0

    kind = "vector"
    #: No vehicle rows with positions in metres: trips' ADE/FDE and road geometry do not apply.
    has_positions = False
    #: One flat vector of named features, scored group by group (:mod:`drivepriv.metrics.vector`).
    flat = True
    #: Unit suffix of the distance columns: none (the residual is a distance over mixed units).
    distance_suffix = ""
    #: The scored groups the report's verdict names first, in this order (the rest follow in
    #: observation order).
    headline: ClassVar[tuple[str, ...]] = ()

    @property
    def obs_shape(self) -> tuple[int]:
        return (len(self.features),)

    @property
    def obs_dim(self) -> int:
        return len(self.features)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features)

    def index(self, name: str) -> int:
        return self.names.index(name)

    def groups(self) -> dict[str, list[int]]:
        """Group name -> indices of its features, in observation order."""
        out: dict[str, list[int]] = {}
        for i, f in enumerate(self.features):
            out.setdefault(f.group_name, []).append(i)
        return out

    def group_unit(self, group: str) -> str:
        return self.features[self.groups()[group][0]].unit

    def _scale_offset(self, ref: Array) -> tuple[Array, Array]:
        scale = np.array([f.scale for f in self.features])
        offset = np.array([f.offset for f in self.features])
        if isinstance(ref, np.ndarray):
            return scale.astype(ref.dtype), offset.astype(ref.dtype)
        import torch

        return torch.as_tensor(scale, dtype=ref.dtype, device=ref.device), torch.as_tensor(offset, dtype=ref.dtype, device=ref.device)

    def to_physical(self, obs: Array) -> Array:
        """(..., D) observation -> (..., D) physical values."""
        scale, offset = self._scale_offset(obs)
        return obs * scale + offset

    def to_observation(self, phys: Array) -> Array:
        """Inverse of :meth:`to_physical` (no clipping)."""
        scale, offset = self._scale_offset(phys)
        return (phys - offset) / scale

    def box(self) -> tuple[np.ndarray, np.ndarray]:
        """(low, high) per element in observation units; unbounded sides get +-``unbounded_box``."""
        lo = np.array([f.low if math.isfinite(f.low) else -self.unbounded_box for f in self.features], dtype=np.float32)
        hi = np.array([f.high if math.isfinite(f.high) else self.unbounded_box for f in self.features], dtype=np.float32)
        return lo, hi

    def scored_groups(self) -> dict[str, str]:
        """The groups the metrics score (:meth:`group_errors`) and their units: every feature
        group (a codec may add groups of its own, e.g. MetaDrive's lidar objects)."""
        return {g: self.group_unit(g) for g in self.groups()}

    def group_help(self, group: str) -> str:
        """What the metric column of a scored group measures."""
        unit = self.scored_groups()[group]
        return f"mean absolute error of {group} in s" + (f" ({unit})" if unit else " (observation units)")

    def group_errors(self, truth: np.ndarray, rec: np.ndarray) -> dict[str, np.ndarray]:
        """Per scored group, the per-transition mean absolute error in the group's unit (NaN
        where a transition has nothing to score). (N, D) -> {group: (N,)}."""
        t, r = self.to_physical(truth), self.to_physical(rec)
        return {g: np.abs(t[..., idx] - r[..., idx]).mean(-1) for g, idx in self.groups().items()}

    def transition_distance(self, pred: Array, actual: Array) -> Array:
        """Squared distance (..., ) between two observations in physical units, each group's
        mean squared error summed over groups (so a 240-ray lidar weighs as much as the speed)."""
        p, a = self.to_physical(pred), self.to_physical(actual)
        total = 0.0
        for idx in self.groups().values():
            total = total + ((p[..., idx] - a[..., idx]) ** 2).mean(-1)
        return total
