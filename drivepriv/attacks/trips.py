"""Trip linking and re-identification, the attacker's side: what a server can do with the
transitions it reconstructed from one client's updates, reading reconstructions, senders and
round numbers only (never the ground truth; :mod:`drivepriv.metrics.trips` scores the result).

1. *Pool.* Per attack and per client, every reconstructed transition of every attacked update
   of that client (the server knows who sent each update in which round; in FedSGD one update
   is one minibatch).
2. *State cost.* Two observations are compared in physical units (see :class:`TripTolerance`):
   for highway-env Kinematics, the ego position (m), the ego velocity (m/s) and the
   neighbours (an order-invariant Chamfer distance between present neighbours' world positions,
   m, plus a share of ``neighbour_pos_m`` per vehicle one side has and the other has not). Each
   error is divided by its tolerance and the cost is the largest ratio: cost <= 1 means "the
   same observation within every tolerance". Flat observations (MetaDrive, control tasks) use
   the RMS over the codec's feature groups of each group's RMS difference in physical units,
   divided by ``vector_rms``.
3. *Duplicates.* The replay buffer can hand the same transition to several rounds. Two
   transitions from different updates are merged when both their s and their s' agree (cost
   <= 1), greedily from the closest pair, never merging two rows of one update (a minibatch is
   drawn without replacement; under FedAvg one update holds K minibatches, and a transition
   that two of them share stays unmerged). A merged transition's ego track is the mean of its copies.
4. *Links.* i -> j when the reconstructed s'_i matches the reconstructed s_j (cost <= 1):
   candidate links are accepted greedily from the smallest cost, each transition keeping at
   most one successor and one predecessor, and a link that would close a cycle is refused.
5. *Trips* are the resulting chains (a transition with no link is a trip of one).

**Re-identification, leave-one-round-out.** Attributing a trip built from a client's own pool
with that client's other rounds would be circular: any same-client transition of another round
that matched the trip has already been linked into it (and so removed from the reference),
while other clients' transitions never were candidates. The protocol is therefore: for every
attacked round r, the updates of round r lose their sender (as if that round had gone through
an anonymising channel; the server still knows which transitions came in one update); the
updates of every other attacked round keep theirs. Each anonymous update is chained on its own
into *fragments* (steps 3-5 within the update), and each fragment is attributed to the client
whose labelled reconstructions of the other rounds contain the state nearest to any of the
fragment's states (s to s, s' to s, s to s', s' to s': a duplicate or a link across rounds).
Reported: the share of fragments attributed to their true sender, the chance level (1 / the
number of candidate clients), how many fragments had any reference, how many were attributed
on evidence (nearest reference within tolerance) and how often that evidence was right, and
the same attribution for whole updates (nearest over all the update's transitions).

"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from drivepriv.envs.codec import ObservationCodec
from drivepriv.envs.vector import VectorCodec

Codec = ObservationCodec | VectorCodec
_INF = np.inf


@dataclass(frozen=True)
class TripTolerance:
    """How close two reconstructed observations must be to count as the same one.

    The defaults are set from public knowledge of the simulator, not from any truth: in
    highway-env merge every episode starts from the same ego state and nearly the same traffic,
    so two different episodes at the same step differ by only a few metres (often the ego not
    at all, only the neighbours); a tolerance must sit well below that spread. Measured on a
    12-round merge run with rgia-k (see the summary of ``tolerance_sweep``): at these defaults
    link precision 0.86, recall 0.60; at 4x (2 m, 2 m/s, 4 m) precision falls to 0.47 and half
    the merged duplicates are different transitions.
    """

    #: ego position (m)
    ego_pos_m: float = 0.5
    #: ego velocity vector (m/s)
    ego_speed_mps: float = 0.5
    #: mean distance between present neighbours and their nearest counterpart (m, both ways)
    neighbour_pos_m: float = 1.0
    #: flat observations: RMS over feature groups of each group's RMS difference (physical units)
    vector_rms: float = 0.5

    def __post_init__(self) -> None:
        for k in ("ego_pos_m", "ego_speed_mps", "neighbour_pos_m", "vector_rms"):
            if not getattr(self, k) > 0:
                raise ValueError(f"TripTolerance.{k}: expected a positive tolerance, got {getattr(self, k)}")


@dataclass
class ReconPool:
    """The attacker's view of one attack: reconstructed transitions and who sent them when.

    Nothing here comes from the ground truth; ``record``/``row`` only index the updates.
    """

    client: np.ndarray  # (N,) sender of the update
    round: np.ndarray  # (N,) round of the update
    record: np.ndarray  # (N,) index of the update (BatchRecord) the row came from
    row: np.ndarray  # (N,) row within that update
    states: np.ndarray  # (N, *obs_shape) normalised observations
    next_states: np.ndarray


def attacker_pool(updates: list[tuple[int, int, dict[str, dict[str, np.ndarray]]]], attack: str) -> ReconPool:
    """Gather one attack's reconstructions from ``updates``, one ``(sender, round, recon)`` per
    attacked update (``recon``: attack name -> reconstructed arrays), in the order that indexes
    ``ReconPool.record``; what the server knows of each update and nothing else."""
    parts = []
    for k, (client, rnd, recon) in enumerate(updates):
        if attack not in recon:
            continue
        rec = recon[attack]
        n = len(rec["states"])
        parts.append((np.full(n, client), np.full(n, rnd), np.full(n, k), np.arange(n), rec["states"], rec["next_states"]))
    if not parts:
        raise ValueError(f"no reconstruction by attack '{attack}' in these updates")
    cols = list(zip(*parts))
    return ReconPool(*(np.concatenate(c).astype(np.int64) for c in cols[:4]), *(np.concatenate(c).astype(np.float64) for c in cols[4:]))


@dataclass
class Features:
    """Decoded observations: physical arrays the state cost compares."""

    ego_pos: np.ndarray | None = None  # (N, 2) m
    ego_vel: np.ndarray | None = None  # (N, 2) m/s
    nb_pos: np.ndarray | None = None  # (N, K, 2) world frame, m
    nb_mask: np.ndarray | None = None  # (N, K) present
    flat: np.ndarray | None = None  # (N, D) physical (flat observations)

    def take(self, idx: np.ndarray) -> "Features":
        return Features(*(None if a is None else a[idx] for a in (self.ego_pos, self.ego_vel, self.nb_pos, self.nb_mask, self.flat)))


def features(obs: np.ndarray, codec: Codec) -> Features:
    """Physical features of observations (N, *obs_shape); presence rounded, the ego always present."""
    obs = np.asarray(obs, dtype=np.float64)
    if not codec.has_positions:
        return Features(flat=codec.to_physical(obs.reshape(len(obs), -1)))
    missing = [f for f in ("presence", "x", "y") if f not in codec.features]
    if missing:
        raise ValueError(f"trip reconstruction needs the Kinematics features {missing}; add them to env.observation.features")
    o = obs.reshape(len(obs), *codec.obs_shape).copy()
    p = codec.index("presence")
    o[..., p] = (o[..., p] > 0.5).astype(o.dtype)
    o[..., 0, p] = 1.0
    w = codec.decode_world(o)
    ix, iy = codec.index("x"), codec.index("y")
    vel = None
    if "vx" in codec.features and "vy" in codec.features:
        vel = w[:, 0, [codec.index("vx"), codec.index("vy")]]
    return Features(w[:, 0, [ix, iy]], vel, w[:, 1:, [ix, iy]], o[:, 1:, p] > 0.5)


def state_cost(a: Features, b: Features, tol: TripTolerance, codec: Codec) -> np.ndarray:
    """(na, nb) cost in tolerance units (<= 1: the same observation within every tolerance); inf for NaN."""
    if a.flat is not None:
        total = 0.0
        groups = codec.groups() if isinstance(codec, VectorCodec) else {"all": list(range(a.flat.shape[1]))}
        for idx in groups.values():
            total = total + ((a.flat[:, None, idx] - b.flat[None, :, idx]) ** 2).mean(-1)
        cost = np.sqrt(total / len(groups)) / tol.vector_rms
    else:
        cost = np.linalg.norm(a.ego_pos[:, None] - b.ego_pos[None], axis=-1) / tol.ego_pos_m
        if a.ego_vel is not None:
            cost = np.maximum(cost, np.linalg.norm(a.ego_vel[:, None] - b.ego_vel[None], axis=-1) / tol.ego_speed_mps)
        cost = np.maximum(cost, _neighbour_cost(a, b, tol.neighbour_pos_m) / tol.neighbour_pos_m)
    return np.where(np.isfinite(cost), cost, _INF)


def _neighbour_cost(a: Features, b: Features, penalty_m: float) -> np.ndarray:
    """Symmetric Chamfer distance (m) between present neighbours, order-invariant, plus
    ``penalty_m`` x the share of vehicles one side has in excess of the other."""
    d = np.linalg.norm(a.nb_pos[:, None, :, None] - b.nb_pos[None, :, None, :], axis=-1)  # (na, nb, K, K)
    ma, mb = a.nb_mask[:, None, :, None], b.nb_mask[None, :, None, :]
    d = np.where(ma & mb, d, _INF)
    na, nb = a.nb_mask.sum(1)[:, None], b.nb_mask.sum(1)[None, :]
    near_a, near_b = d.min(3), d.min(2)  # each present a-row to its nearest b-row, and back
    near_a = np.where(np.isinf(near_a), penalty_m, near_a)  # the other side has no vehicle at all
    near_b = np.where(np.isinf(near_b), penalty_m, near_b)
    sa = np.where(a.nb_mask[:, None, :], near_a, 0.0).sum(-1)
    sb = np.where(b.nb_mask[None, :, :], near_b, 0.0).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        chamfer = np.where(na + nb > 0, (sa + sb) / np.maximum(na + nb, 1), 0.0)
    return chamfer + penalty_m * np.abs(na - nb) / np.maximum(np.maximum(na, nb), 1)


class UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        self.parent[self.find(j)] = self.find(i)


@dataclass
class Chains:
    """Trips of one pool: clusters of duplicate rows, and chains of clusters."""

    clusters: list[list[int]]  # row indices (into the pool subset) of each merged transition
    trips: list[list[int]]  # cluster indices of each trip, in driving order
    link_costs: list[list[float]]  # cost of each link of each trip
    duplicate_pairs: list[tuple[int, int]] = field(default_factory=list)  # rows merged, as pairs


def build_chains(s: Features, s2: Features, record: np.ndarray, tol: TripTolerance, codec: Codec) -> Chains:
    """Merge duplicates, then link s'_i -> s_j greedily (one successor and one predecessor each,
    no cycles). ``s``/``s2``: features of one pool's states and next states; ``record``: the
    update each row came from (rows of one update are never merged)."""
    n = len(record)
    c_ss, c_nn, c_ns = state_cost(s, s, tol, codec), state_cost(s2, s2, tol, codec), state_cost(s2, s, tol, codec)
    # duplicates
    dup = np.maximum(c_ss, c_nn)
    dup[record[:, None] == record[None, :]] = _INF
    uf = UnionFind(n)
    records_of = {i: {int(record[i])} for i in range(n)}
    pairs = []
    dup[np.tril_indices(n)] = _INF  # each unordered pair once
    for i, j in _candidates(dup):
        a, b = uf.find(i), uf.find(j)
        if a == b or records_of[a] & records_of[b]:
            continue
        uf.union(a, b)
        records_of[a] |= records_of.pop(b)
        pairs.append((i, j))
    roots = sorted({uf.find(i) for i in range(n)})
    label = {r: k for k, r in enumerate(roots)}
    clusters: list[list[int]] = [[] for _ in roots]
    for i in range(n):
        clusters[label[uf.find(i)]].append(i)
    # links between merged transitions: the best link between any copies
    k = len(clusters)
    lk = np.full((k, k), _INF)
    for a, ma in enumerate(clusters):
        row = c_ns[ma].min(0)
        for b, mb in enumerate(clusters):
            if a != b:
                lk[a, b] = row[mb].min()
    succ, pred = [-1] * k, [-1] * k
    chain = UnionFind(k)
    for a, b in _candidates(lk):
        if succ[a] >= 0 or pred[b] >= 0 or chain.find(a) == chain.find(b):
            continue
        succ[a], pred[b] = b, a
        chain.union(a, b)
    trips, costs = [], []
    for head in range(k):
        if pred[head] >= 0:
            continue
        trip, cost = [head], []
        while succ[trip[-1]] >= 0:
            cost.append(float(lk[trip[-1], succ[trip[-1]]]))
            trip.append(succ[trip[-1]])
        trips.append(trip)
        costs.append(cost)
    return Chains(clusters, trips, costs, pairs)


def _candidates(cost: np.ndarray) -> list[tuple[int, int]]:
    """(i, j) with cost <= 1, from the smallest cost (ties in index order)."""
    i, j = np.nonzero(cost <= 1.0)
    order = np.lexsort((j, i, cost[i, j]))
    return [(int(i[o]), int(j[o])) for o in order]


@dataclass
class Attribution:
    """The attacker's guess of one anonymous fragment's sender."""

    client: int  # -1: no reference
    cost: float  # cost to the nearest labelled reference (tolerance units)
    candidates: int  # clients with any reference


def attribute(frag: Features, ref: Features, ref_client: np.ndarray, tol: TripTolerance, codec: Codec) -> Attribution:
    """Attribute a fragment (its s and s' features stacked) to the client owning the nearest
    labelled reference state (``ref``: s and s' of the other rounds' rows, ``ref_client``)."""
    clients = np.unique(ref_client)
    if len(clients) == 0 or len(frag.ego_pos if frag.flat is None else frag.flat) == 0:
        return Attribution(-1, float("nan"), 0)
    nearest = state_cost(frag, ref, tol, codec).min(0)
    best = np.array([nearest[ref_client == c].min() for c in clients])
    if not np.isfinite(best).any():
        return Attribution(-1, float("nan"), len(clients))
    k = int(np.argmin(best))
    return Attribution(int(clients[k]), float(best[k]), len(clients))


def stack_features(a: Features, b: Features) -> Features:
    return Features(*(None if x is None else np.concatenate([x, y]) for x, y in zip(_fields(a), _fields(b))))


def _fields(f: Features) -> tuple:
    return (f.ego_pos, f.ego_vel, f.nb_pos, f.nb_mask, f.flat)
