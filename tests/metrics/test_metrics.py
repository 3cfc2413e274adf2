"""Matching and scoring: permutation invariance, zero error on the truth, units."""

import numpy as np

from drivepriv.config import RunConfig
from drivepriv.envs import make_codec
from drivepriv.federation.types import GroundTruth
from drivepriv.metrics.scores import match_transitions, score
from tests.envs.test_codec import real_observations


def as_truth(states, actions, rewards, next_states) -> GroundTruth:
    """A test batch as the metrics receive it (one local step, no termination, origins 0..n-1)."""
    n = len(rewards)
    origins = np.stack([np.zeros(n, np.int64), np.arange(n)], 1)
    return GroundTruth(0, 0, states, actions, rewards, next_states, np.zeros(n, np.float32), origins)


def make_truth(n=8):
    obs = real_observations(n + 1, seed=5)
    rng = np.random.default_rng(0)
    return as_truth(obs[:-1], rng.integers(0, 5, n), rng.normal(size=n).astype(np.float32), obs[1:])


def test_truth_scores_zero():
    codec = make_codec(RunConfig().env)
    t = make_truth()
    m, perm = score(t, t.states, t.actions, t.rewards, t.next_states, codec)
    assert list(perm) == list(range(len(perm)))
    assert m["ego_pos_err_m"] < 1e-4 and m["next_state_err_m"] < 1e-4 and m["neighbour_pos_err_m"] < 1e-4
    assert m["action_acc"] == 1.0 and m["reward_abs_err"] == 0.0 and m["ego_within_1m"] == 1.0


def test_permutation_invariance():
    codec = make_codec(RunConfig().env)
    t = make_truth()
    rng = np.random.default_rng(1)
    noisy = t.states + rng.normal(scale=1e-3, size=t.states.shape).astype(np.float32)
    noisy[..., 0] = t.states[..., 0]
    base, _ = score(t, noisy, t.actions, t.rewards, t.next_states, codec)
    perm = rng.permutation(len(noisy))
    shuffled, p = score(t, noisy[perm], t.actions[perm], t.rewards[perm], t.next_states[perm], codec)
    assert np.array_equal(perm[p], np.arange(len(perm)))
    for k in base:
        assert np.isclose(base[k], shuffled[k], equal_nan=True), k


def test_errors_in_metres():
    codec = make_codec(RunConfig().env)
    t = make_truth()
    shifted = codec.to_normalised(codec.to_physical(t.states) + np.array([0, 2.0, 0, 0, 0, 0, 0], np.float32) * np.eye(5, 1).T[0][:, None][None])
    # ego row shifted by 2 m along x (neighbour rows are ego-relative, so they move with it)
    m, _ = score(t, shifted, t.actions, t.rewards, t.next_states, codec)
    assert abs(m["ego_pos_err_m"] - 2.0) < 1e-3
    assert abs(m["neighbour_pos_err_m"] - 2.0) < 1e-3
    assert match_transitions(t.states, shifted, codec).tolist() == list(range(len(shifted)))


def test_leakage_by_round_and_the_verdicts_range():
    import pandas as pd

    from drivepriv.metrics.leakage import LEAKAGE_COLUMNS, leakage_by_round, verdict

    metrics = pd.DataFrame({
        "attack": ["rgia-k", "rgia-k", "rgia-k", "dlg", "dlg", "dlg"],
        "client": [0, 1, 0, 0, 1, 0],
        "round": [0, 0, 9, 0, 0, 9],
        "batch_size": [8, 8, 8, 8, 8, 8],
        "local_steps": [1, 1, 1, 1, 1, 1],
        "ego_within_1m": [1.0, 0.5, 0.25, 0.0, 0.0, 0.0],
        "ego_pos_err_m": [1e-5, 2.0, 30.0, 100.0, 90.0, 80.0],
        "identifiable": [8, 8, 3, 8, 8, 3],
        "states_certified": [8, 4, 1, None, None, None],
    })
    table = leakage_by_round(metrics)
    assert list(table["attack"]) == ["rgia-k", "rgia-k", "dlg", "dlg"]  # attacks in the run's order
    first = table.iloc[0]
    assert first["round"] == 0 and first["transitions"] == 16 and first["ego_within_1m"] == 0.75
    assert first["identifiable"] == 16 and first["states_certified"] == 12
    assert table.iloc[1]["ego_pos_err_m"] == 30.0 and np.isnan(table.iloc[2]["states_certified"])
    leakage = pd.DataFrame([["rgia-k", "ego position", "m", 1.0, 0.58, 2.0, 0.0, 30.0, 24], ["dlg", "ego position", "m", 1.0, 0.0, 90.0, 80.0, 100.0, 24]], columns=LEAKAGE_COLUMNS)
    lines = verdict(leakage, None, table)["sentences"]
    assert any("Across the 2 attacked rounds (0 to 9), the ego is within 1 m in 25% (round 9) to 75% (round 0)" in s for s in lines), lines
