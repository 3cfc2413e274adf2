"""Scoring a reconstruction against the ground truth, in physical units, after order-invariant matching.

The reconstructed batch comes back in an arbitrary order (the gradient of a mean loss is
invariant to permutations of the batch), so reconstructed transitions are first matched to
true ones by a minimum-cost assignment on the decoded states, then scored.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from drivepriv.envs.codec import ObservationCodec
from drivepriv.federation.types import GroundTruth

#: One-line explanations of the metrics, with units (shown in the report).
METRIC_HELP = {
    "ego_pos_err_m": "distance between reconstructed and true ego position in s (m)",
    "ego_within_1m": "share of transitions whose ego position is within 1 m",
    "ego_speed_err_mps": "absolute error of the ego's speed in s (m/s)",
    "neighbour_pos_err_m": "position error of neighbours present in s, world frame, rows matched by position (m)",
    "presence_acc": "share of vehicle rows whose presence (there or not) is right",
    "action_acc": "share of transitions whose action is right",
    "reward_abs_err": "absolute error of the reward",
    "next_state_err_m": "mean position error over vehicles present in s' (ego and neighbours, m)",
    "dyn_residual_m": "ego position in the reconstructed s' vs. the simulator stepped from the reconstructed (s, a) (m)",
    "dyn_residual_truth_m": "the same residual for the true transition: the floor set by unobserved simulator state (m)",
    "grad_distance": "attacker's gradient distance at the end (relative squared L2)",
    "time_s": "wall time of the attack (s)",
}


def match_transitions(truth_states: np.ndarray, rec_states: np.ndarray, codec: ObservationCodec) -> np.ndarray:
    """Permutation ``perm`` so that ``rec[perm[i]]`` is matched to ``truth[i]``.

    Cost: distance between decoded world-frame ego positions and speeds, plus the
    normalised-observation distance as a tie-breaker. Invariant to the order of either batch.
    """
    t = codec.decode_world(truth_states)
    r = codec.decode_world(rec_states)
    ix, iy, ivx, ivy = (codec.index(f) for f in ("x", "y", "vx", "vy"))
    pos = np.linalg.norm(t[:, None, 0, [ix, iy]] - r[None, :, 0, [ix, iy]], axis=-1)
    vel = np.linalg.norm(t[:, None, 0, [ivx, ivy]] - r[None, :, 0, [ivx, ivy]], axis=-1)
    obs = np.linalg.norm((truth_states[:, None] - rec_states[None]).reshape(len(t), len(r), -1), axis=-1)
    cost = pos + vel + 1e-3 * obs
    rows, cols = linear_sum_assignment(cost)
    perm = np.empty(len(t), dtype=np.int64)
    perm[rows] = cols
    return perm


def _neighbour_errors(t: np.ndarray, r: np.ndarray, codec: ObservationCodec) -> tuple[float, float]:
    """Mean world-position error of present true neighbours (rows matched by position), and presence accuracy."""
    errs, count_acc = neighbour_error_list(t, r, codec)
    return (float(np.mean(errs)) if len(errs) else float("nan")), count_acc


def neighbour_error_list(t: np.ndarray, r: np.ndarray, codec: ObservationCodec) -> tuple[np.ndarray, float]:
    """World-position error (m) of every present true neighbour (rows matched by position, an
    assignment per transition), and the share of transitions whose neighbour count is right."""
    p, ix, iy = codec.index("presence"), codec.index("x"), codec.index("y")
    errs, correct, total = [], 0, 0
    for ti, ri in zip(t, r):
        tp = ti[1:, p] > 0.5
        rp = ri[1:, p] > 0.5
        correct += int((tp.sum() == rp.sum()))
        total += 1
        tpos = ti[1:, [ix, iy]][tp]
        rpos = ri[1:, [ix, iy]][rp]
        if len(tpos) == 0:
            continue
        if len(rpos) == 0:
            rpos = ri[:1, [ix, iy]]  # nothing reconstructed: measure against the reconstructed ego
        cost = np.linalg.norm(tpos[:, None] - rpos[None], axis=-1)
        rows, cols = linear_sum_assignment(cost)
        e = np.full(len(tpos), np.nan)
        e[rows] = cost[rows, cols]
        missing = np.isnan(e)
        if missing.any():  # more true neighbours than reconstructed: the nearest one counts
            e[missing] = cost[missing].min(axis=1)
        errs.extend(e.tolist())
    return np.asarray(errs, dtype=float), correct / max(total, 1)


def _present_position_error(t: np.ndarray, r: np.ndarray, codec: ObservationCodec) -> float:
    """Mean position error over vehicles present in the true observation (ego + matched neighbours)."""
    ix, iy = codec.index("x"), codec.index("y")
    ego = np.linalg.norm(t[:, 0, [ix, iy]] - r[:, 0, [ix, iy]], axis=-1)
    neigh, _ = _neighbour_errors(t, r, codec)
    n_present = (t[:, 1:, codec.index("presence")] > 0.5).sum()
    if n_present == 0 or np.isnan(neigh):
        return float(ego.mean())
    return float((ego.sum() + neigh * n_present) / (len(ego) + n_present))


def score(truth: GroundTruth, rec_states: np.ndarray, rec_actions: np.ndarray, rec_rewards: np.ndarray, rec_next_states: np.ndarray, codec: ObservationCodec) -> tuple[dict[str, float], np.ndarray]:
    """Metrics of one reconstruction (after matching) and the matching permutation."""
    perm = match_transitions(truth.states, rec_states, codec)
    rs, ra, rr, rn = rec_states[perm], rec_actions[perm], rec_rewards[perm], rec_next_states[perm]
    t = codec.decode_world(truth.states)
    r = codec.decode_world(_hard_presence(rs, codec))
    tn = codec.decode_world(truth.next_states)
    rnw = codec.decode_world(_hard_presence(rn, codec))
    ix, iy = codec.index("x"), codec.index("y")
    ego_err = np.linalg.norm(t[:, 0, [ix, iy]] - r[:, 0, [ix, iy]], axis=-1)
    speed_err = np.abs(codec.speed(t[:, 0]) - codec.speed(r[:, 0]))
    neigh_err, _ = _neighbour_errors(t, r, codec)
    p = codec.index("presence")
    presence_acc = float(((t[..., p] > 0.5) == (r[..., p] > 0.5)).mean())
    metrics = {
        "ego_pos_err_m": float(np.median(ego_err)),
        "ego_within_1m": float((ego_err <= 1.0).mean()),
        "ego_speed_err_mps": float(np.median(speed_err)),
        "neighbour_pos_err_m": neigh_err,
        "presence_acc": presence_acc,
        **(
            {"action_abs_err": float(np.mean(np.abs(ra - truth.actions)))}
            if np.ndim(truth.actions) == 2
            else {"action_acc": float((ra == truth.actions).mean())}
        ),
        "reward_abs_err": float(np.mean(np.abs(rr - truth.rewards))),
        "next_state_err_m": _present_position_error(tn, rnw, codec),
    }
    return metrics, perm


def _hard_presence(obs: np.ndarray, codec: ObservationCodec) -> np.ndarray:
    """Round the presence flag (a reconstruction's is soft) so absent rows decode to nothing."""
    out = obs.copy()
    p = codec.index("presence")
    out[..., p] = (out[..., p] > 0.5).astype(out.dtype)
    out[..., 0, p] = 1.0
    return out
