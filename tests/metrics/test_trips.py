"""Trip reconstruction and re-identification (drivepriv.metrics.trips): synthetic records whose
truth is known, the attacker side blind to the truth, and one real quick merge run."""

import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from drivepriv.config import RunConfig
from drivepriv.envs import make_codec
from drivepriv.envs.control import control_codec
from drivepriv.federation.types import GroundTruth
from drivepriv.attacks.trips import TripTolerance, attacker_pool, build_chains, features
from drivepriv.metrics.trips import tolerance_sweep, trips_for_run, trips_for_run_dir
from drivepriv.results import BatchRecord

CODEC = make_codec(RunConfig().env)  # merge: 5 vehicles, absolute ego row


def episode_worlds(rng, steps: int, x0: float, lane_y: float) -> np.ndarray:
    """(steps + 1, V, F) physical observations of one episode (neighbours ego-relative, as observed)."""
    f = CODEC.index
    v = CODEC.vehicles_count
    nb_x = x0 + rng.uniform(-40, 60, v - 1)
    nb_y = rng.choice([0.0, 4.0], v - 1)
    nb_v = rng.uniform(18, 28, v - 1)
    ego_v = rng.uniform(22, 30)
    out = np.zeros((steps + 1, v, CODEC.n_features))
    for k in range(steps + 1):
        ex = x0 + ego_v * k
        out[k, :, f("presence")] = 1.0
        out[k, :, f("cos_h")] = 1.0
        out[k, 0, [f("x"), f("y"), f("vx")]] = ex, lane_y, ego_v
        out[k, 1:, f("x")] = nb_x + nb_v * k - ex
        out[k, 1:, f("y")] = nb_y - lane_y
        out[k, 1:, f("vx")] = nb_v - ego_v
    return out


def record_truth(client: int, rnd: int, states: np.ndarray, next_states: np.ndarray, origins: np.ndarray, action: int = 0) -> GroundTruth:
    """The truth of one attacked update (no rewards, no terminations)."""
    n = len(states)
    return GroundTruth(rnd, client, states, np.full(n, action, np.int64), np.zeros(n, np.float32), next_states, np.zeros(n, np.float32), origins)


def noisy(world: np.ndarray, rng, sigma_m: float) -> np.ndarray:
    """Normalised observations of ``world`` with Gaussian noise on positions and speeds (m, m/s)."""
    w = world.copy()
    for name in ("x", "y", "vx", "vy"):
        w[..., CODEC.index(name)] += rng.normal(scale=sigma_m, size=w.shape[:-1]) * w[..., CODEC.index("presence")]
    return CODEC.to_normalised(w).astype(np.float32)


def make_records(sigma_m=0.05, clients=1, episodes=2, steps=6, rounds=3, seed=0, duplicate=False) -> list[BatchRecord]:
    """Each client drives ``episodes`` episodes; its transitions are spread over ``rounds`` updates
    at random; reconstructions are the truth plus ``sigma_m`` of noise."""
    rng = np.random.default_rng(seed)
    records = []
    for c in range(clients):
        trans = []  # (state world, next world, episode, step)
        for e in range(episodes):
            w = episode_worlds(rng, steps, x0=40 + 150 * c + 20 * e, lane_y=4.0 * ((c + e) % 2))
            trans += [(w[k], w[k + 1], e, k) for k in range(steps)]
        order = rng.permutation(len(trans))
        parts = np.array_split(order, rounds)
        if duplicate:  # the replay buffer hands the first update's first transition to the last update too
            parts[-1] = np.append(parts[-1], parts[0][0])
        for r, part in enumerate(parts):
            s = np.stack([trans[i][0] for i in part])
            s2 = np.stack([trans[i][1] for i in part])
            origins = np.array([[trans[i][2], trans[i][3]] for i in part])
            truth = record_truth(c, r, CODEC.to_normalised(s).astype(np.float32), CODEC.to_normalised(s2).astype(np.float32), origins, action=1)
            recon = {"states": noisy(s, rng, sigma_m), "next_states": noisy(s2, rng, sigma_m), "actions": truth.actions, "rewards": truth.rewards}
            records.append(BatchRecord(truth, {"fake": recon}))
    return records


def test_small_noise_recovers_every_trip():
    res = trips_for_run(make_records(sigma_m=0.05), CODEC)
    s = res.summary.iloc[0]
    assert s.trips == 2 and s.singletons == 0 and s.longest == 6
    assert s.link_precision == 1.0 and s.link_recall == 1.0 and s.true_pairs == 10
    assert s.cross_round_trips == 2
    assert 0.01 < s.ade_median_m < 0.15 and s.fde_median_m < 0.3  # ~ the noise (0.05 m per axis)
    assert (res.trips.correct_links == res.trips.links).all()


def test_large_noise_links_nothing():
    res = trips_for_run(make_records(sigma_m=30.0), CODEC)
    s = res.summary.iloc[0]
    assert s.links == 0 and s.trips == 0 and s.singletons == 12 and np.isnan(s.link_precision)
    assert s.link_recall == 0.0 and s.ade_all_median_m > 10


def test_tolerance_controls_linking():
    records = make_records(sigma_m=0.5)
    tight = trips_for_run(records, CODEC, TripTolerance(ego_pos_m=0.1, ego_speed_mps=0.1, neighbour_pos_m=0.1)).summary.iloc[0]
    loose = trips_for_run(records, CODEC, TripTolerance(ego_pos_m=3.0, ego_speed_mps=3.0, neighbour_pos_m=3.0)).summary.iloc[0]
    assert tight.links == 0 and loose.links == 10 and loose.link_precision == 1.0
    with pytest.raises(ValueError, match="positive"):
        TripTolerance(ego_pos_m=0.0)


def test_duplicates_are_merged_and_scored():
    res = trips_for_run(make_records(sigma_m=0.05, duplicate=True), CODEC)
    s = res.summary.iloc[0]
    assert s.pool_rows == 13 and s.merged_transitions == 12 and s.duplicate_merges == 1
    assert s.duplicate_precision == 1.0 and s.duplicate_recall == 1.0
    assert s.link_precision == 1.0 and s.link_recall == 1.0 and s.trips == 2
    assert res.trips.samples.sum() == 13


def test_two_clients_reidentified():
    res = trips_for_run(make_records(sigma_m=0.05, clients=2, rounds=3), CODEC)
    s = res.summary.iloc[0]
    assert s.chance == 0.5 and s.n_attributed == s.n_fragments > 0
    assert s.reid_rate == 1.0 and s.reid_update_rate == 1.0 and s.n_updates == 6
    assert s.reid_evidence_n == s.n_attributed and s.reid_evidence_rate == 1.0
    assert (res.reid.candidates == 2).all() and (res.reid.attributed == res.reid.client).all()
    # one round attacked: no other round to learn the senders from
    one = trips_for_run(make_records(sigma_m=0.05, clients=2, rounds=1), CODEC).summary.iloc[0]
    assert one.n_attributed == 0 and np.isnan(one.reid_rate)


def test_attacker_side_never_reads_the_truth():
    records = make_records(sigma_m=0.1, clients=2, rounds=3, duplicate=True)
    rng = np.random.default_rng(9)
    poisoned = [
        replace(r, truth=replace(r.truth, **{k: rng.normal(size=v.shape).astype(v.dtype) for k, v in r.truth.arrays().items()}, origins=rng.permutation(r.truth.origins)))
        for r in records
    ]
    a, b = trips_for_run(records, CODEC), trips_for_run(poisoned, CODEC)
    assert a.summary.links.iloc[0] > 0 and a.summary.duplicate_merges.iloc[0] > 0  # something to compare
    attacker_cols = ["attack", "client", "trip", "transitions", "samples", "rounds", "links", "max_link_cost"]
    assert a.trips[attacker_cols].equals(b.trips[attacker_cols])
    reid_cols = ["client", "round", "fragment", "transitions", "attributed", "cost", "candidates"]
    assert a.reid[reid_cols].equals(b.reid[reid_cols])
    # and the attacker's pool holds nothing the truth wrote
    pool = attacker_pool([(r.client, r.round, r.recon) for r in records], "fake")
    assert not any(np.shares_memory(x, t) for x in (pool.states, pool.next_states) for r in records for t in (*r.truth.arrays().values(), r.truth.origins))


def test_same_ego_different_traffic_not_confused():
    """merge replays the same ego start every episode: only the neighbours tell episodes apart."""
    rng = np.random.default_rng(3)
    a = episode_worlds(rng, 4, x0=40.0, lane_y=4.0)
    b = a.copy()
    b[:, 1:, CODEC.index("x")] += 3.0  # the same ego, every other vehicle 3 m further on
    obs = lambda w: CODEC.to_normalised(w).astype(np.float32)  # noqa: E731
    records = []
    for e, w in enumerate((a, b)):  # one episode per round, so the two could be taken for duplicates
        truth = record_truth(0, e, obs(w[:-1]), obs(w[1:]), np.array([[e, k] for k in range(4)]))
        records.append(BatchRecord(truth, {"exact": {"states": obs(w[:-1]), "next_states": obs(w[1:])}}))
    res = trips_for_run(records, CODEC).summary.iloc[0]
    assert res.duplicate_merges == 0 and res.links == 6 and res.link_precision == 1.0 and res.trips == 2 and res.longest == 4


def test_tolerance_sweep_rows():
    sweep = tolerance_sweep(make_records(), CODEC, scales=(0.5, 1.0))
    assert list(sweep.scale) == [0.5, 1.0] and (sweep.link_precision == 1.0).all()


def test_chains_never_cycle_and_respect_one_successor():
    # a stationary ego: every s' matches every s, so a naive linker would build cycles
    w = episode_worlds(np.random.default_rng(0), 1, 100.0, 0.0)[:1]
    w[..., CODEC.index("vx")] = 0.0
    obs = CODEC.to_normalised(np.repeat(w, 5, 0)).astype(np.float32)
    f = features(obs, CODEC)
    ch = build_chains(f, f, np.arange(5), TripTolerance(), CODEC)  # 5 updates, so copies could merge
    assert sum(len(c) for c in ch.clusters) == 5
    seen = [c for t in ch.trips for c in t]
    assert sorted(seen) == list(range(len(ch.clusters)))  # each merged transition in exactly one trip


def test_flat_observations_chain_without_metres():
    codec = control_codec("CartPole-v1")
    rng = np.random.default_rng(0)
    x = np.cumsum(rng.normal(scale=0.3, size=(9, 4)), 0)  # a random walk in physical units
    recon = lambda a: (a + rng.normal(scale=0.01, size=a.shape)).astype(np.float32)  # noqa: E731
    records = []
    for r, part in enumerate(np.array_split(rng.permutation(8), 2)):
        truth = record_truth(0, r, x[part].astype(np.float32), x[part + 1].astype(np.float32), np.stack([np.zeros_like(part), part], 1))
        records.append(BatchRecord(truth, {"fake": {"states": recon(x[part]), "next_states": recon(x[part + 1])}}))
    res = trips_for_run(records, codec, TripTolerance(vector_rms=0.05))
    s = res.summary.iloc[0]
    assert s.trips == 1 and s.longest == 8 and s.link_precision == 1.0 and s.link_recall == 1.0
    assert np.isnan(s.ade_median_m) and "absolute positions" in s.note


def test_real_quick_merge_run(tmp_path):
    cmd = [sys.executable, "-m", "drivepriv", "eval", "--scenario", "merge", "--quick", "--out", str(tmp_path), "--no-progress"]
    cmd += ["--set", "report.videos=0", "--set", "attack.rounds=[0,1]", "--attacks", "rgia", "--set", "attack.iterations=10", "--set", "federation.eval_episodes=0"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = trips_for_run_dir(next((tmp_path / "merge").iterdir()))
    s = res.summary.set_index("attack").loc["rgia"]
    assert s.pool_rows == 16 and res.trips.samples.sum() == 16 and s.merged_transitions == res.trips.transitions.sum()
    assert s.chance == 0.5 and s.n_attributed == s.n_fragments and s.n_updates == 4
    assert np.isfinite(res.trips.ade_m).all() and (res.trips.ade_m >= 0).all()
    for df in (res.trips, res.reid, res.summary):
        assert set(df.columns) <= set(res.help), set(df.columns) - set(res.help)
