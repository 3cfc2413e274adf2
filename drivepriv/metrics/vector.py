"""Scoring reconstructions of flat observations (MetaDrive, control tasks) in physical units.

As for the Kinematics observation (:mod:`drivepriv.metrics.scores`), reconstructed transitions
are first matched to the true ones (minimum-cost assignment on the states: the gradient of a
mean loss does not say in which order the batch was), then each feature group of the codec is
scored in its own unit: metres of lidar range, m/s of speed, radians of pole angle...
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from drivepriv.envs.vector import VectorCodec
from drivepriv.federation.types import GroundTruth

_SUFFIX = {"m": "_m", "m/s": "_mps", "rad": "_rad", "rad/s": "_radps", "": ""}


def group_column(group: str, unit: str) -> str:
    """Metric column of a feature group, e.g. ``speed_err_mps``."""
    return f"{group}_err{_SUFFIX.get(unit, '_' + unit.replace('/', 'p'))}"


def vector_metric_columns(codec: VectorCodec, continuous: bool) -> list[str]:
    """The metric columns of a scenario with this codec, in report order."""
    groups = [group_column(g, unit) for g, unit in codec.scored_groups().items()]
    action = "action_abs_err" if continuous else "action_acc"
    return ["state_rmse", *groups, action, "reward_abs_err", "next_state_rmse", "dyn_residual", "dyn_residual_truth", "grad_distance"]


def vector_metric_help(codec: VectorCodec) -> dict[str, str]:
    out = {
        "state_rmse": "root mean squared error over the state's elements, in observation units",
        "action_acc": "share of transitions whose action is right",
        "action_abs_err": "mean absolute error of the continuous action (actions in [-1, 1])",
        "reward_abs_err": "absolute error of the reward",
        "next_state_rmse": "root mean squared error of the next state, in observation units",
        "dyn_residual": "reconstructed s' vs. the simulator stepped from the reconstructed (s, a), physical units",
        "dyn_residual_truth": "the same residual for the true transition (the simulator's floor)",
        "grad_distance": "attacker's gradient distance at the end (relative squared L2)",
    }
    for g, unit in codec.scored_groups().items():
        out[group_column(g, unit)] = codec.group_help(g)
    return out


def match_vector(truth_states: np.ndarray, rec_states: np.ndarray) -> np.ndarray:
    """Permutation ``perm`` so that ``rec[perm[i]]`` is matched to ``truth[i]`` (Euclidean cost)."""
    t = truth_states.reshape(len(truth_states), -1)
    r = rec_states.reshape(len(rec_states), -1)
    cost = np.linalg.norm(t[:, None] - r[None], axis=-1)
    rows, cols = linear_sum_assignment(np.nan_to_num(cost, nan=1e12, posinf=1e12))
    perm = np.empty(len(t), dtype=np.int64)
    perm[rows] = cols
    return perm


def score_vector(truth: GroundTruth, rec_states, rec_actions, rec_rewards, rec_next_states, codec: VectorCodec) -> tuple[dict[str, float], np.ndarray]:
    """Metrics of one reconstruction (after matching) and the matching permutation."""
    perm = match_vector(truth.states, rec_states)
    rs, ra, rr, rn = rec_states[perm], rec_actions[perm], rec_rewards[perm], rec_next_states[perm]
    t = truth.states.reshape(len(perm), -1)
    continuous = np.asarray(truth.actions).ndim == 2
    m: dict[str, float] = {"state_rmse": float(np.median(np.sqrt(((t - rs.reshape(t.shape)) ** 2).mean(-1))))}
    units = codec.scored_groups()
    for g, err in codec.group_errors(t, rs.reshape(t.shape)).items():
        err = err[np.isfinite(err)]
        m[group_column(g, units[g])] = float(np.median(err)) if err.size else float("nan")
    if continuous:
        m["action_abs_err"] = float(np.mean(np.abs(np.asarray(ra, dtype=np.float64) - truth.actions)))
    else:
        m["action_acc"] = float((np.asarray(ra) == truth.actions).mean())
    m["reward_abs_err"] = float(np.mean(np.abs(rr - truth.rewards)))
    tn = truth.next_states.reshape(len(perm), -1)
    m["next_state_rmse"] = float(np.median(np.sqrt(((tn - rn.reshape(tn.shape)) ** 2).mean(-1))))
    return m, perm
