"""Validate the physics transition prior (drivepriv.priors.physics) on real highway-env transitions.

    python eval/physics_validation.py --scenarios merge highway roundabout --steps 400 [--seed 0] [--out reports/physics_validation]

For each scenario: drive the simulator with seeded uniformly random actions, predict the next
observation from (s, a) with :class:`KinematicPrior` (one-hot action probabilities), and
measure, in physical units:

* the ego's one-step position error (m) and speed error (m/s);
* the neighbours' position error (m, world coordinates), each observed neighbour against the
  *same vehicle* in the real next observation (identities read from the simulator by this
  script only, never by the prior; a neighbour that leaves the observation is not scored),
  for both neighbour models of the prior (``"constant"``: speed keeping; ``"idm"``: IDM
  against the observed front vehicle). Also the subset the prior can model: the vehicle's real
  front vehicle (``Road.neighbour_vehicles``) is observed (or the ego, an obstacle, or none),
  and it is not changing lane (MOBIL) at s or s';
* the older metric, each predicted neighbour against the nearest real neighbour row.

Transitions in which the ego crashed are left out (a crash overrides the controls) and counted.
Writes ``<out>/<scenario>_cdf.png`` (CDFs of ego and neighbour position errors) and
``<out>/summary.md`` (median / p90 / max per scenario and neighbour model), and prints the table.
"""

from __future__ import annotations

import argparse
import itertools
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from drivepriv.cli import load_scenario
from drivepriv.envs.highway import make_codec, make_env
from drivepriv.priors.physics import KinematicPrior
from drivepriv.priors.road import RoadGeometry
from drivepriv.seeding import derive_seed, numpy_rng

NEIGHBOUR_MODELS = ("constant", "idm")
#: errors below this are drawn at it on the log-scale CDFs (the ego is often exact)
_CDF_FLOOR_M = 1e-5


@dataclass
class Transitions:
    """Real transitions (s, a, s') of one scenario, crashes left out.

    ``ids`` / ``next_ids`` (N, V) identify the vehicle of each row of s / s' (0 for an empty
    row; the ego row is not identified); ``modelled`` (N, V) marks the neighbour rows of s whose
    front vehicle is observed and which are not changing lane (evaluation-side ground truth).
    """

    states: np.ndarray  # (N, V, F) normalised
    actions: np.ndarray  # (N,)
    next_states: np.ndarray  # (N, V, F) normalised
    prev_actions: np.ndarray  # (N,) the action before (-1 at an episode start)
    n_crashed: int
    ids: np.ndarray  # (N, V) int64
    next_ids: np.ndarray  # (N, V) int64
    modelled: np.ndarray  # (N, V) bool


def _observed(env) -> list:
    """The vehicles of the observation's neighbour rows, in row order (``KinematicObservation.observe``)."""
    base = env.unwrapped
    ot = base.observation_type
    vs = base.road.close_objects_to(
        ot.observer_vehicle,
        base.PERCEPTION_DISTANCE,
        count=ot.vehicles_count - 1,
        see_behind=ot.see_behind,
        sort=ot.order == "sorted",
        vehicles_only=not ot.include_obstacles,
    )
    return list(vs[-ot.vehicles_count + 1 :]) if vs else []


_UIDS = itertools.count(1)


def _uid(v) -> int:
    """A stable id for a simulator vehicle (``id()`` can be reused once a vehicle is removed)."""
    if not hasattr(v, "_drivepriv_uid"):
        v._drivepriv_uid = next(_UIDS)
    return v._drivepriv_uid


def _changing_lane(v) -> bool:
    """A MOBIL lane change in progress: target lane on the same road as the current lane, another id."""
    lane, target = getattr(v, "lane_index", None), getattr(v, "target_lane_index", None)
    return bool(lane and target and tuple(lane[:2]) == tuple(target[:2]) and lane[2] != target[2])


def _snapshot(env, n_rows: int) -> tuple[np.ndarray, np.ndarray, dict[int, bool]]:
    """(ids (V,), leader observed (V,), lane change by id) of the current observation."""
    from highway_env.vehicle.objects import Obstacle

    base = env.unwrapped
    vs = _observed(env)
    seen = {_uid(v) for v in vs} | {_uid(base.vehicle)}
    ids = np.zeros(n_rows, dtype=np.int64)
    leader_ok = np.zeros(n_rows, dtype=bool)
    for i, v in enumerate(vs[: n_rows - 1], start=1):
        ids[i] = _uid(v)
        front, _ = base.road.neighbour_vehicles(v, v.lane_index)
        leader_ok[i] = front is None or isinstance(front, Obstacle) or _uid(front) in seen
    return ids, leader_ok, {_uid(v): _changing_lane(v) for v in vs}


def collect(scenario: str, steps: int, seed: int = 0) -> tuple[Transitions, KinematicPrior]:
    """Drive ``scenario`` with seeded random actions; return the transitions and a prior built from the env."""
    cfg = load_scenario(scenario)
    env = make_env(cfg.env)
    codec = make_codec(cfg.env)
    V = codec.vehicles_count
    rng = numpy_rng(seed, "physics-validation", scenario)
    episode = 0
    obs, _ = env.reset(seed=derive_seed(seed, "physics-validation", scenario, episode))
    prior = KinematicPrior.from_env(env, codec, RoadGeometry.from_env(env))
    snap = _snapshot(env, V)
    n_actions = int(env.action_space.n)
    S, A, S2, P, I, I2, M = [], [], [], [], [], [], []
    prev, crashed = -1, 0
    for _ in range(steps):
        a = int(rng.integers(n_actions))
        obs2, _, terminated, truncated, info = env.step(a)
        snap2 = _snapshot(env, V)
        if info.get("crashed", False):
            crashed += 1
        else:
            ids, leader_ok, changing = snap
            no_change = np.array([not (changing.get(k, False) or snap2[2].get(k, False)) for k in ids])
            S.append(obs)
            A.append(a)
            S2.append(obs2)
            P.append(prev)
            I.append(ids)
            I2.append(snap2[0])
            M.append(leader_ok & no_change & (ids != 0))
        obs, prev, snap = obs2, a, snap2
        if terminated or truncated:
            episode += 1
            obs, _ = env.reset(seed=derive_seed(seed, "physics-validation", scenario, episode))
            prev, snap = -1, _snapshot(env, V)
    env.close()
    tr = Transitions(np.array(S), np.array(A), np.array(S2), np.array(P), crashed, np.array(I), np.array(I2), np.array(M))
    return tr, prior


def errors(prior: KinematicPrior, tr: Transitions, chunk: int = 64) -> dict[str, np.ndarray]:
    """Ego position / speed errors; neighbour position errors, same vehicle and nearest row.

    ``neigh_pos_m`` (same vehicle) comes with ``neigh_modelled`` (bool, same length): the
    vehicle's front vehicle was observed and it was not changing lane.
    """
    probs = torch.nn.functional.one_hot(torch.as_tensor(tr.actions), len(prior.actions)).float()
    s = torch.as_tensor(tr.states, dtype=torch.float32)
    with torch.no_grad():
        pred = torch.cat([prior.predict(s[i : i + chunk], probs[i : i + chunk]) for i in range(0, len(s), chunk)]).double()
    codec = prior.codec
    pw = codec.decode_world(pred).numpy()
    tw = codec.decode_world(torch.as_tensor(tr.next_states, dtype=torch.float64)).numpy()
    ix, iy, ip = codec.index("x"), codec.index("y"), codec.index("presence")
    ego_pos = np.hypot(pw[:, 0, ix] - tw[:, 0, ix], pw[:, 0, iy] - tw[:, 0, iy])
    ego_speed = np.abs(codec.speed(pw[:, 0]) - codec.speed(tw[:, 0]))
    nearest, same, modelled = [], [], []
    for b in range(len(pw)):
        true_xy = tw[b, 1:][tw[b, 1:, ip] > 0.5][:, [ix, iy]]
        pred_xy = pw[b, 1:][pw[b, 1:, ip] > 0.5][:, [ix, iy]]
        if len(true_xy) and len(pred_xy):
            d = np.linalg.norm(pred_xy[:, None] - true_xy[None], axis=-1)
            nearest.extend(d.min(1).tolist())
        for i in range(1, pw.shape[1]):
            k = tr.ids[b, i]
            if k == 0 or pw[b, i, ip] < 0.5:
                continue
            j = np.flatnonzero(tr.next_ids[b] == k)
            if len(j):
                same.append(float(np.hypot(pw[b, i, ix] - tw[b, j[0], ix], pw[b, i, iy] - tw[b, j[0], iy])))
                modelled.append(bool(tr.modelled[b, i]))
    return {
        "ego_pos_m": ego_pos,
        "ego_speed_mps": ego_speed,
        "neigh_pos_m": np.array(same),
        "neigh_modelled": np.array(modelled, dtype=bool),
        "neigh_nearest_pos_m": np.array(nearest),
    }


def _stats(x: np.ndarray) -> str:
    if len(x) == 0:
        return "- | - | -"
    return " | ".join(f"{v:.3g}" for v in (np.median(x), np.percentile(x, 90), np.max(x)))


def plot_cdf(path: Path, scenario: str, results: dict[str, dict[str, np.ndarray]]) -> None:
    """CDFs of the ego and neighbour (same vehicle) position errors, one line per neighbour model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))

    def cdf(x: np.ndarray, **kw) -> None:
        if len(x):
            xs = np.sort(np.maximum(x, _CDF_FLOOR_M))
            ax.step(xs, np.arange(1, len(xs) + 1) / len(xs), where="post", **kw)

    any_model = next(iter(results.values()))
    cdf(any_model["ego_pos_m"], color="k", label=f"ego (n={len(any_model['ego_pos_m'])})")
    colors = {"constant": "tab:orange", "idm": "tab:blue"}
    for model, e in results.items():
        n = len(e["neigh_pos_m"])
        cdf(e["neigh_pos_m"], color=colors.get(model), label=f"neighbours, {model} (n={n})")
        label = f"neighbours, {model}, leader observed, no lane change"
        cdf(e["neigh_pos_m"][e["neigh_modelled"]], color=colors.get(model), ls="--", label=label)
    ax.set_xscale("log")
    ax.set_xlabel(f"one-step position error (m; below {_CDF_FLOOR_M:g} m drawn at {_CDF_FLOOR_M:g})")
    ax.set_ylabel("fraction of predictions")
    ax.set_title(f"Physics prior on real transitions: {scenario}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenarios", nargs="+", default=["merge", "highway", "roundabout"])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("reports/physics_validation"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    lines = [
        f"Physics prior one-step errors on real transitions ({args.steps} random-action steps per scenario, seed {args.seed}; "
        "ego-crash transitions left out). Position errors in m: median | p90 | max. Neighbours: each observed "
        "neighbour against the same vehicle in the next observation; 'modelled' = its real front vehicle is "
        "observed and it is not changing lane (MOBIL). The ego prediction does not depend on the neighbour model.",
        "",
        "| scenario | neighbours | n (crashed) | ego pos: median | p90 | max | ego speed m/s: median | p90 | max "
        "| neighbour pos (n): median | p90 | max | modelled neighbours (n): median | p90 | max | nearest-row metric: median | p90 | max |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for scenario in args.scenarios:
        t0 = time.perf_counter()
        tr, prior = collect(scenario, args.steps, args.seed)
        t1 = time.perf_counter()
        results = {}
        for model in NEIGHBOUR_MODELS:
            e = errors(prior.with_neighbours(model), tr)
            results[model] = e
            nm = e["neigh_pos_m"][e["neigh_modelled"]]
            lines.append(
                f"| {scenario} | {model} | {len(tr.actions)} ({tr.n_crashed}) | {_stats(e['ego_pos_m'])} | {_stats(e['ego_speed_mps'])} "
                f"| ({len(e['neigh_pos_m'])}) {_stats(e['neigh_pos_m'])} | ({len(nm)}) {_stats(nm)} | {_stats(e['neigh_nearest_pos_m'])} |"
            )
        t2 = time.perf_counter()
        plot_cdf(args.out / f"{scenario}_cdf.png", scenario, results)
        print(f"{scenario}: collect {t1 - t0:.1f} s, predict (both models) {t2 - t1:.1f} s", flush=True)
    table = "\n".join(lines)
    command = f"python eval/physics_validation.py --scenarios {' '.join(args.scenarios)} --steps {args.steps} --seed {args.seed}"
    (args.out / "summary.md").write_text(f"# Physics prior validation\n\n{table}\n\nCommand: `{command}`\n")
    print(table)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
