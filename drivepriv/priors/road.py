"""Road geometry read from a scenario's public road network: lane centre lines as polylines.

Lanes are sampled into polylines (straight lanes: their two end points; curved lanes: every
``step_m`` metres), so the same code serves the straight lanes of merge and highway and the
curved lanes of roundabout and intersection.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Lane:
    """One lane: its index in the road network, centre-line polyline (N, 2) in metres, width."""

    index: tuple[str, str, int]
    points: np.ndarray
    width_m: float
    forbidden: bool = False


@dataclass(frozen=True)
class RoadGeometry:
    """All lanes of a road network."""

    lanes: tuple[Lane, ...]

    @classmethod
    def from_network(cls, network, step_m: float = 2.0) -> "RoadGeometry":
        """Sample every lane of a highway-env ``RoadNetwork``."""
        from highway_env.road.lane import StraightLane

        lanes = []
        for _from, to_dict in network.graph.items():
            for _to, lane_list in to_dict.items():
                for i, lane in enumerate(lane_list):
                    if type(lane) is StraightLane:  # SineLane subclasses StraightLane
                        s = np.array([0.0, lane.length])
                    else:
                        n = max(2, int(np.ceil(lane.length / step_m)) + 1)
                        s = np.linspace(0.0, lane.length, n)
                    pts = np.array([lane.position(float(si), 0.0) for si in s], dtype=np.float64)
                    lanes.append(
                        Lane(
                            index=(_from, _to, i),
                            points=pts,
                            width_m=float(lane.width_at(0.0)),
                            forbidden=bool(getattr(lane, "forbidden", False)),
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
