"""Trip reconstruction and re-identification: what a server learns by chaining the transitions
it reconstructed from one client's updates, and whether it can tell whose trips they are.

A single reconstructed transition (s, a, r, s') is a snapshot. Chained together, snapshots
become trips: where a vehicle drove, when, next to whom. This module measures that threat in
two steps, keeping the attacker's side (everything that builds chains and attributions) apart
from the scoring side (the only code that reads the ground truth).

The attacker's side (pooling, linking, attribution) is :mod:`drivepriv.attacks.trips`; this
module runs it on a run's reconstructions and scores what it built against the truth.

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from drivepriv.attacks.trips import Codec, Features, ReconPool, TripTolerance, attacker_pool, attribute, build_chains, features, stack_features
from drivepriv.results import BatchRecord

log = logging.getLogger(__name__)


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
    true_pos = _true_positions(records, codec) if codec.has_positions else []
    trip_rows, reid_rows, summary = [], [], []
    for attack in attacks:
        pool = attacker_pool([(r.client, r.round, r.recon) for r in records], attack)
        fs, fn = features(pool.states, codec), features(pool.next_states, codec)
        rows, stats = _score_trips(attack, pool, fs, fn, records, true_pos, tol, codec)
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


#: Per record, the true ego (x, y) of every s and of every s' (kinematic codecs), for ADE and FDE.
TruePositions = list[tuple[np.ndarray, np.ndarray]]


def _true_positions(records: list[BatchRecord], codec: Codec) -> TruePositions:
    return [(features(r.truth.states, codec).ego_pos, features(r.truth.next_states, codec).ego_pos) for r in records]


def _score_trips(attack, pool, fs, fn, records: list[BatchRecord], true_pos: TruePositions, tol, codec) -> tuple[list[dict], dict]:
    rows, links, correct, dup_pairs, dup_correct, true_dups = [], 0, 0, 0, 0, 0
    covered, true_pairs = set(), set()
    kin = codec.has_positions
    for client in np.unique(pool.client):
        idx = np.nonzero(pool.client == client)[0]
        ch = build_chains(fs.take(idx), fn.take(idx), pool.record[idx], tol, codec)
        key = [(int(pool.record[i]), int(pool.row[i])) for i in idx]
        origin = [tuple(int(v) for v in records[k].truth.origins[i]) for k, i in key]
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
            ade, fde = _trip_errors(trip, ch.clusters, idx, key, fs, fn, true_pos) if kin else (float("nan"), float("nan"))
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


def _trip_errors(trip, clusters, idx, key, fs: Features, fn: Features, true_pos: TruePositions) -> tuple[float, float]:
    """ADE and FDE (m) of one trip: positions s of each transition then s' of the last; a merged
    transition is placed at the mean of its copies and scored against each copy's truth."""
    errs = []
    for pos, c in enumerate(trip):
        rows = clusters[c]
        fused = fs.ego_pos[idx[rows]].mean(0)
        errs.append(np.mean([np.linalg.norm(fused - true_pos[key[m][0]][0][key[m][1]]) for m in rows]))
        if pos == len(trip) - 1:
            fused = fn.ego_pos[idx[rows]].mean(0)
            errs.append(np.mean([np.linalg.norm(fused - true_pos[key[m][0]][1][key[m][1]]) for m in rows]))
    return float(np.mean(errs)), float(errs[-1])


def _reidentify(attack, pool: ReconPool, fs: Features, fn: Features, tol, codec) -> list[dict]:
    """Leave-one-round-out attribution of each anonymous update's fragments (module doc).
    Uses the pool (attacker side) only; the true sender is added to each row for scoring."""
    rows = []
    for rnd in np.unique(pool.round):
        ref = np.nonzero(pool.round != rnd)[0]
        ref_f = stack_features(fs.take(ref), fn.take(ref))
        ref_client = np.concatenate([pool.client[ref], pool.client[ref]])
        for rec in np.unique(pool.record[pool.round == rnd]):
            upd = np.nonzero(pool.record == rec)[0]
            ch = build_chains(fs.take(upd), fn.take(upd), pool.record[upd], tol, codec)
            whole = attribute(stack_features(fs.take(upd), fn.take(upd)), ref_f, ref_client, tol, codec)
            sender = int(pool.client[upd[0]])
            for f, trip in enumerate(ch.trips):
                members = upd[[m for c in trip for m in ch.clusters[c]]]
                att = attribute(stack_features(fs.take(members), fn.take(members)), ref_f, ref_client, tol, codec)
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
