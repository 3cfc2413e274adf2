"""Trip reconstruction and re-identification: what a server learns by chaining the transitions
it reconstructed from one client's updates, and whether it can tell whose trips they are.

A single reconstructed transition (s, a, r, s') is a snapshot. Chained together, snapshots
become trips: where a vehicle drove, when, next to whom. This module measures that threat in
two steps, keeping the attacker's side (everything that builds chains and attributions) apart
from the scoring side (the only code that reads the ground truth).

**Attacker side (reads only reconstructions, client ids and round numbers).**

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

**Scoring side (reads the truth).** Rows of a reconstruction are already matched to the true
transitions (``drivepriv.results``). A link is correct when its two transitions are consecutive
steps of one true episode of the client (each merged transition standing for the true
transition most of its copies came from); link recall counts the true consecutive pairs
present in the pool. ADE is the mean ego position error (m) over a trip's positions s_1 ...
s_n, s'_n against the true ego positions of the matched true transitions (a merged
transition's error is the mean over its copies), FDE the error of s'_n. ADE/FDE need absolute
positions: for flat observations they are NaN and the summary says why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from drivepriv.envs.codec import ObservationCodec
from drivepriv.envs.vector import VectorCodec
from drivepriv.results import BatchRecord

log = logging.getLogger(__name__)

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


# --------------------------------------------------------------------------- attacker side


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


def attacker_pool(records: list[BatchRecord], attack: str) -> ReconPool:
    """Gather one attack's reconstructions; reads ``client``, ``round`` and ``recon`` only."""
    parts = []
    for k, r in enumerate(records):
        if attack not in r.recon:
            continue
        rec = r.recon[attack]
        n = len(rec["states"])
        parts.append((np.full(n, r.client), np.full(n, r.round), np.full(n, k), np.arange(n), rec["states"], rec["next_states"]))
    if not parts:
        raise ValueError(f"no reconstruction by attack '{attack}' in these records")
    cols = list(zip(*parts))
    return ReconPool(*(np.concatenate(c).astype(np.int64) for c in cols[:4]), *(np.concatenate(c).astype(np.float64) for c in cols[4:]))


@dataclass
class _Features:
    """Decoded observations: physical arrays the state cost compares."""

    ego_pos: np.ndarray | None = None  # (N, 2) m
    ego_vel: np.ndarray | None = None  # (N, 2) m/s
    nb_pos: np.ndarray | None = None  # (N, K, 2) world frame, m
    nb_mask: np.ndarray | None = None  # (N, K) present
    flat: np.ndarray | None = None  # (N, D) physical (flat observations)

    def take(self, idx: np.ndarray) -> "_Features":
        return _Features(*(None if a is None else a[idx] for a in (self.ego_pos, self.ego_vel, self.nb_pos, self.nb_mask, self.flat)))


def features(obs: np.ndarray, codec: Codec) -> _Features:
    """Physical features of observations (N, *obs_shape); presence rounded, the ego always present."""
    obs = np.asarray(obs, dtype=np.float64)
    if not codec.has_positions:
        return _Features(flat=codec.to_physical(obs.reshape(len(obs), -1)))
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
    return _Features(w[:, 0, [ix, iy]], vel, w[:, 1:, [ix, iy]], o[:, 1:, p] > 0.5)


def state_cost(a: _Features, b: _Features, tol: TripTolerance, codec: Codec) -> np.ndarray:
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


def _neighbour_cost(a: _Features, b: _Features, penalty_m: float) -> np.ndarray:
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


class _UnionFind:
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


def build_chains(s: _Features, s2: _Features, record: np.ndarray, tol: TripTolerance, codec: Codec) -> Chains:
    """Merge duplicates, then link s'_i -> s_j greedily (one successor and one predecessor each,
    no cycles). ``s``/``s2``: features of one pool's states and next states; ``record``: the
    update each row came from (rows of one update are never merged)."""
    n = len(record)
    c_ss, c_nn, c_ns = state_cost(s, s, tol, codec), state_cost(s2, s2, tol, codec), state_cost(s2, s, tol, codec)
    # duplicates
    dup = np.maximum(c_ss, c_nn)
    dup[record[:, None] == record[None, :]] = _INF
    uf = _UnionFind(n)
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
    chain = _UnionFind(k)
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


def attribute(frag: _Features, ref: _Features, ref_client: np.ndarray, tol: TripTolerance, codec: Codec) -> Attribution:
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


def _stack(a: _Features, b: _Features) -> _Features:
    return _Features(*(None if x is None else np.concatenate([x, y]) for x, y in zip(_fields(a), _fields(b))))


def _fields(f: _Features) -> tuple:
    return (f.ego_pos, f.ego_vel, f.nb_pos, f.nb_mask, f.flat)


# --------------------------------------------------------------------------- scoring side


@dataclass
class TripResult:
    """Trips, re-identification and their summary for every attack of a run."""

    #: one row per attack x client x trip (trips of one transition included)
    trips: pd.DataFrame
    #: one row per attack x anonymous fragment of the leave-one-round-out re-identification
    reid: pd.DataFrame
    #: one row per attack
    summary: pd.DataFrame
    #: column -> one-line explanation with units (all three tables)
    help: dict[str, str]


TRIP_HELP = {
    "attack": "attack whose reconstructions were chained",
    "client": "sender of the updates (trips: known to the server; reid: the true sender, hidden from the attacker)",
    "trip": "trip id within the attack and client",
    "transitions": "transitions in the trip, duplicates merged",
    "samples": "reconstructed rows in the trip, duplicates counted",
    "rounds": "rounds the trip's rows came from",
    "n_rounds": "number of distinct rounds the trip spans",
    "links": "links in the trip (transitions - 1)",
    "correct_links": "links joining consecutive steps of one true episode",
    "max_link_cost": "largest link cost in the trip (tolerance units; <= 1 by construction)",
    "ade_m": "mean ego position error over s_1..s_n, s'_n against the true positions (m)",
    "fde_m": "ego position error of the trip's last position s'_n (m)",
    "round": "held-out round whose senders were hidden",
    "fragment": "fragment id within the anonymous update (a trip built inside one update)",
    "attributed": "client the attacker attributed the fragment to (-1: no reference)",
    "correct": "attributed client is the true sender",
    "cost": "cost to the nearest labelled reference of another round (tolerance units; <= 1: a duplicate or link)",
    "evidence": "nearest reference within tolerance (cost <= 1)",
    "candidates": "clients with labelled references in the other rounds",
    "pool_rows": "reconstructed rows pooled (all clients, rounds)",
    "merged_transitions": "distinct transitions after merging duplicates",
    "duplicate_merges": "pairs of rows merged as the same transition sampled twice",
    "duplicate_precision": "share of merged pairs that are truly the same transition",
    "duplicate_recall": "share of true duplicate pairs in the pool that were merged",
    "trips": "trips of two or more transitions",
    "singletons": "transitions left unlinked (trips of one)",
    "mean_length": "mean transitions per trip (trips of two or more)",
    "longest": "transitions in the longest trip",
    "cross_round_trips": "trips spanning two or more rounds",
    "link_precision": "share of links that join true consecutive steps",
    "link_recall": "share of the true consecutive pairs present in the pool that were linked",
    "true_pairs": "true consecutive pairs present in the pool",
    "ade_median_m": "median ADE over trips of two or more transitions (m)",
    "fde_median_m": "median FDE over trips of two or more transitions (m)",
    "ade_all_median_m": "median ADE over every trip, singletons included (m)",
    "reid_rate": "share of anonymous fragments with a reference attributed to their true sender",
    "chance": "chance level of reid_rate (mean of 1 / candidate clients)",
    "n_attributed": "fragments with any labelled reference (the denominator of reid_rate)",
    "n_fragments": "fragments of the anonymous updates, all held-out rounds",
    "reid_evidence_n": "fragments whose nearest reference is within tolerance",
    "reid_evidence_rate": "share of those attributed to their true sender",
    "reid_update_rate": "share of whole anonymous updates attributed to their true sender",
    "n_updates": "anonymous updates with any reference",
    "note": "why a column is NaN",
    "scale": "tolerance_sweep: multiple of the default tolerances",
}


def trips_for_run(records: list[BatchRecord], codec: Codec, tolerance: TripTolerance | None = None, attacks: list[str] | None = None) -> TripResult:
    """Chain every attack's reconstructions into trips, score them and re-identify them (module doc)."""
    tol = tolerance or TripTolerance()
    if attacks is None:
        attacks = list(dict.fromkeys(a for r in records for a in r.recon))
    truth = _truth_pool(records, codec)
    trip_rows, reid_rows, summary = [], [], []
    for attack in attacks:
        pool = attacker_pool(records, attack)
        fs, fn = features(pool.states, codec), features(pool.next_states, codec)
        rows, stats = _score_trips(attack, pool, fs, fn, truth, tol, codec)
        reid = _reidentify(attack, pool, fs, fn, tol, codec)
        trip_rows += rows
        reid_rows += reid
        summary.append({"attack": attack, **stats, **_reid_summary(reid)})
        log.debug("trips %s: %d rows, %d links, %d trips of 2+", attack, stats["pool_rows"], stats["links"], stats["trips"])
    trips = pd.DataFrame(trip_rows, columns=["attack", "client", "trip", "transitions", "samples", "rounds", "n_rounds", "links", "correct_links", "max_link_cost", "ade_m", "fde_m"])
    reid = pd.DataFrame(reid_rows, columns=["attack", "client", "round", "fragment", "transitions", "attributed", "correct", "cost", "evidence", "candidates"])
    note = "" if codec.has_positions else "ADE/FDE need absolute positions; a flat observation has none"
    summary_df = pd.DataFrame(summary).assign(note=note)
    return TripResult(trips, reid, summary_df, dict(TRIP_HELP))


def tolerance_sweep(records: list[BatchRecord], codec: Codec, scales=(0.1, 0.25, 0.5, 1.0, 2.0, 4.0), base: TripTolerance | None = None) -> pd.DataFrame:
    """The summary at every multiple ``scale`` of the ``base`` tolerances (one row per scale x attack):
    how link precision and recall, ADE and re-identification trade off against the tolerance."""
    base = base or TripTolerance()
    out = []
    for k in scales:
        tol = TripTolerance(base.ego_pos_m * k, base.ego_speed_mps * k, base.neighbour_pos_m * k, base.vector_rms * k)
        out.append(trips_for_run(records, codec, tol).summary.assign(scale=k))
    return pd.concat(out, ignore_index=True)


def trips_for_run_dir(run_dir: str | Path, tolerance: TripTolerance | None = None) -> TripResult:
    """:func:`trips_for_run` on a ``drivepriv eval`` run folder (config.yaml + reconstructions.npz)."""
    from drivepriv.envs import make_codec
    from drivepriv.results import load_batches
    from drivepriv.scenarios import load_scenario

    run_dir = Path(run_dir)
    cfg = load_scenario(str(run_dir / "config.yaml"))
    return trips_for_run(load_batches(run_dir), make_codec(cfg.env), tolerance)


@dataclass
class _Truth:
    origin: dict[tuple[int, int], tuple[int, int]]  # (record, row) -> (episode, step)
    pos: dict[tuple[int, int], np.ndarray]  # (record, row) -> true ego x, y of s
    next_pos: dict[tuple[int, int], np.ndarray]


def _truth_pool(records: list[BatchRecord], codec: Codec) -> _Truth:
    t = _Truth({}, {}, {})
    for k, r in enumerate(records):
        for i, o in enumerate(np.asarray(r.origins)):
            t.origin[(k, i)] = (int(o[0]), int(o[1]))
        if codec.has_positions:
            ps, pn = features(r.truth["states"], codec).ego_pos, features(r.truth["next_states"], codec).ego_pos
            for i in range(len(ps)):
                t.pos[(k, i)], t.next_pos[(k, i)] = ps[i], pn[i]
    return t


def _score_trips(attack, pool, fs, fn, truth: _Truth, tol, codec) -> tuple[list[dict], dict]:
    rows, links, correct, dup_pairs, dup_correct, true_dups = [], 0, 0, 0, 0, 0
    covered, true_pairs = set(), set()
    kin = codec.has_positions
    for client in np.unique(pool.client):
        idx = np.nonzero(pool.client == client)[0]
        ch = build_chains(fs.take(idx), fn.take(idx), pool.record[idx], tol, codec)
        key = [(int(pool.record[i]), int(pool.row[i])) for i in idx]
        origin = [truth.origin[q] for q in key]
        present = set(origin)
        true_pairs |= {(client, e, s) for e, s in present if (e, s + 1) in present}
        true_dups += sum(origin[a] == origin[b] and key[a][0] != key[b][0] for a in range(len(idx)) for b in range(a + 1, len(idx)))
        for cl in ch.clusters:  # every pair of rows inside a merged transition
            dup_pairs += len(cl) * (len(cl) - 1) // 2
            dup_correct += sum(origin[a] == origin[b] for x, a in enumerate(cl) for b in cl[x + 1 :])
        mode = [_mode([origin[m] for m in cl]) for cl in ch.clusters]  # the true transition a merged one stands for
        for t, (trip, cost) in enumerate(zip(ch.trips, ch.link_costs)):
            ok = [mode[a][0] == mode[b][0] and mode[b][1] == mode[a][1] + 1 for a, b in zip(trip, trip[1:])]
            covered |= {(client, *mode[a]) for (a, _), g in zip(zip(trip, trip[1:]), ok) if g}
            links += len(ok)
            correct += sum(ok)
            members = [m for c in trip for m in ch.clusters[c]]
            rounds = sorted({int(pool.round[idx[m]]) for m in members})
            ade, fde = _trip_errors(trip, ch.clusters, idx, key, fs, fn, truth) if kin else (float("nan"), float("nan"))
            rows.append(
                {
                    "attack": attack, "client": int(client), "trip": t, "transitions": len(trip), "samples": len(members),
                    "rounds": ",".join(map(str, rounds)), "n_rounds": len(rounds), "links": len(ok), "correct_links": int(sum(ok)),
                    "max_link_cost": max(cost) if cost else float("nan"), "ade_m": ade, "fde_m": fde,
                }
            )  # fmt: skip
    df = pd.DataFrame(rows)
    long = df[df.transitions >= 2]
    stats = {
        "pool_rows": len(pool.client),
        "merged_transitions": int(df.transitions.sum()),
        "duplicate_merges": dup_pairs,
        "duplicate_precision": dup_correct / dup_pairs if dup_pairs else float("nan"),
        "duplicate_recall": dup_correct / true_dups if true_dups else float("nan"),
        "trips": len(long),
        "singletons": int((df.transitions == 1).sum()),
        "mean_length": float(long.transitions.mean()) if len(long) else float("nan"),
        "longest": int(df.transitions.max()),
        "cross_round_trips": int((long.n_rounds >= 2).sum()),
        "links": links,
        "link_precision": correct / links if links else float("nan"),
        "link_recall": len(covered & true_pairs) / len(true_pairs) if true_pairs else float("nan"),
        "true_pairs": len(true_pairs),
        "ade_median_m": float(long.ade_m.median()) if len(long) else float("nan"),
        "fde_median_m": float(long.fde_m.median()) if len(long) else float("nan"),
        "ade_all_median_m": float(df.ade_m.median()),
    }
    return rows, stats


def _mode(items: list) -> tuple:
    """Most frequent item (the first seen on a tie)."""
    return max(dict.fromkeys(items), key=items.count)


def _trip_errors(trip, clusters, idx, key, fs: _Features, fn: _Features, truth: _Truth) -> tuple[float, float]:
    """ADE and FDE (m) of one trip: positions s of each transition then s' of the last; a merged
    transition is placed at the mean of its copies and scored against each copy's truth."""
    errs = []
    for pos, c in enumerate(trip):
        rows = clusters[c]
        fused = fs.ego_pos[idx[rows]].mean(0)
        errs.append(np.mean([np.linalg.norm(fused - truth.pos[key[m]]) for m in rows]))
        if pos == len(trip) - 1:
            fused = fn.ego_pos[idx[rows]].mean(0)
            errs.append(np.mean([np.linalg.norm(fused - truth.next_pos[key[m]]) for m in rows]))
    return float(np.mean(errs)), float(errs[-1])


def _reidentify(attack, pool: ReconPool, fs: _Features, fn: _Features, tol, codec) -> list[dict]:
    """Leave-one-round-out attribution of each anonymous update's fragments (module doc).
    Uses the pool (attacker side) only; the true sender is added to each row for scoring."""
    rows = []
    for rnd in np.unique(pool.round):
        ref = np.nonzero(pool.round != rnd)[0]
        ref_f = _stack(fs.take(ref), fn.take(ref))
        ref_client = np.concatenate([pool.client[ref], pool.client[ref]])
        for rec in np.unique(pool.record[pool.round == rnd]):
            upd = np.nonzero(pool.record == rec)[0]
            ch = build_chains(fs.take(upd), fn.take(upd), pool.record[upd], tol, codec)
            whole = attribute(_stack(fs.take(upd), fn.take(upd)), ref_f, ref_client, tol, codec)
            sender = int(pool.client[upd[0]])
            for f, trip in enumerate(ch.trips):
                members = upd[[m for c in trip for m in ch.clusters[c]]]
                att = attribute(_stack(fs.take(members), fn.take(members)), ref_f, ref_client, tol, codec)
                rows.append(
                    {
                        "attack": attack, "client": sender, "round": int(rnd), "fragment": f, "transitions": len(trip),
                        "attributed": att.client, "correct": att.client == sender if att.client >= 0 else float("nan"),
                        "cost": att.cost, "evidence": bool(att.cost <= 1.0), "candidates": att.candidates,
                        "_update": int(rec), "_update_correct": whole.client == sender if whole.client >= 0 else float("nan"),
                    }
                )  # fmt: skip
    return rows


def _reid_summary(rows: list[dict]) -> dict:
    df = pd.DataFrame(rows)
    if df.empty:
        df = pd.DataFrame(columns=["correct", "candidates", "evidence", "_update", "_update_correct"])
    att = df[df.candidates > 0].dropna(subset=["correct"])
    ev = att[att.evidence]
    upd = df.drop_duplicates("_update").dropna(subset=["_update_correct"])
    for row in rows:  # internal columns, not part of the table
        row.pop("_update", None)
        row.pop("_update_correct", None)
    return {
        "n_fragments": len(df),
        "n_attributed": len(att),
        "reid_rate": float(att.correct.astype(float).mean()) if len(att) else float("nan"),
        "chance": float((1.0 / att.candidates).mean()) if len(att) else float("nan"),
        "reid_evidence_n": len(ev),
        "reid_evidence_rate": float(ev.correct.astype(float).mean()) if len(ev) else float("nan"),
        "n_updates": len(upd),
        "reid_update_rate": float(upd._update_correct.astype(float).mean()) if len(upd) else float("nan"),
    }


def main(argv: list[str] | None = None) -> None:
    """``python -m drivepriv.metrics.trips RUN_DIR [--csv OUT_DIR]``: print the per-attack summary."""
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--csv", type=Path, help="also write trips.csv, trips_reid.csv and trips_summary.csv here")
    ap.add_argument("--ego-pos-m", type=float, default=TripTolerance.ego_pos_m)
    ap.add_argument("--ego-speed-mps", type=float, default=TripTolerance.ego_speed_mps)
    ap.add_argument("--neighbour-pos-m", type=float, default=TripTolerance.neighbour_pos_m)
    args = ap.parse_args(argv)
    tol = TripTolerance(args.ego_pos_m, args.ego_speed_mps, args.neighbour_pos_m)
    res = trips_for_run_dir(args.run_dir, tol)
    with pd.option_context("display.width", 250, "display.max_columns", 50):
        print(res.summary.T.to_string(header=False) if len(res.summary) == 1 else res.summary.set_index("attack").T.to_string())
    if args.csv:
        args.csv.mkdir(parents=True, exist_ok=True)
        res.trips.to_csv(args.csv / "trips.csv", index=False, float_format="%.4g")
        res.reid.to_csv(args.csv / "trips_reid.csv", index=False, float_format="%.4g")
        res.summary.to_csv(args.csv / "trips_summary.csv", index=False, float_format="%.4g")


if __name__ == "__main__":
    main()
