"""Lane topology of the physics prior (static, numpy): where ``follow_road`` continues, the ego's route, side lanes.

Functions of the road's lanes (:class:`~drivepriv.priors.road.RoadGeometry`); ``lane_index``
maps a lane index ``(from, to, id)`` to its position in ``road.lanes``.
"""

from __future__ import annotations

import numpy as np
import torch

from drivepriv.priors.road import RoadGeometry


def next_lanes(road: RoadGeometry, destination: str | None = None) -> np.ndarray:
    """(L,) index of the lane ``follow_road`` continues on (``RoadNetwork.next_lane``).

    Without ``destination`` as highway-env without a route: the next road whose lane is
    closest to the lane's end. With it, only next roads from which ``destination`` can be
    reached by the fewest roads (a shortest-path route) are candidates. The lane itself
    where no road leaves its end node.
    """
    lanes = road.lanes
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
            dist = road.lane_distances(end)[0].numpy()
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

def route_lanes(road: RoadGeometry, lane_index: dict[tuple, int], destination: str | None) -> np.ndarray:
    """(L,) for each lane, the lane of a sibling road (same start node) on the route to ``destination``.

    Where roads branch (a roundabout exit and the ring) their lanes overlap at the start, so
    the closest lane may be off the ego's route; its target lane is then the route's road
    (same lane id if it has it, else its last lane). Identity without a destination.
    """
    lanes = road.lanes
    out = np.arange(len(lanes))
    if destination is None:
        return out
    nxt = next_lanes(road, destination)
    for k, lane in enumerate(lanes):
        # the road the route takes from this lane's start node: where its predecessors lead
        preds = [j for j, ln in enumerate(lanes) if ln.index[1] == lane.index[0]]
        routed = {lanes[nxt[j]].index[:2] for j in preds if nxt[j] != j}
        if len(routed) == 1 and lane.index[:2] not in routed:
            routed_road = routed.pop()
            ids = sorted(ln.index[2] for ln in lanes if ln.index[:2] == routed_road)
            _id = lane.index[2] if lane.index[2] in ids else ids[-1]
            out[k] = lane_index[(*routed_road, _id)]
    return out

def side_lanes(road: RoadGeometry, lane_index: dict[tuple, int]) -> np.ndarray:
    """(L, 2) lane index for LANE_LEFT (id - 1) and LANE_RIGHT (id + 1), clipped to the road's lanes."""
    lanes = road.lanes
    out = np.zeros((len(lanes), 2), dtype=np.int64)
    for k, lane in enumerate(lanes):
        _from, _to, _id = lane.index
        ids = [ln.index[2] for ln in lanes if ln.index[0] == _from and ln.index[1] == _to]
        lo, hi = min(ids), max(ids)
        out[k, 0] = lane_index[(_from, _to, int(np.clip(_id - 1, lo, hi)))]
        out[k, 1] = lane_index[(_from, _to, int(np.clip(_id + 1, lo, hi)))]
    return out
