"""Validate the physics transition prior (drivepriv.priors.physics) on real highway-env transitions.

    python eval/physics_validation.py --scenarios merge highway roundabout --steps 400 [--seed 0]

For each scenario: drive the simulator with seeded uniformly random actions, predict the next
observation from (s, a) with :class:`KinematicPrior` (one-hot action probabilities), and
measure, in physical units, the ego's one-step position error (m) and speed error (m/s), and
the neighbours' position error (each predicted present neighbour against the nearest present
neighbour of the real next observation, world coordinates). Transitions in which the ego
crashed are left out (a crash overrides the controls) and counted. Prints a markdown table.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np
import torch

from drivepriv.cli import load_scenario
from drivepriv.envs.highway import make_codec, make_env
from drivepriv.priors.physics import KinematicPrior
from drivepriv.priors.road import RoadGeometry
from drivepriv.seeding import derive_seed, numpy_rng


@dataclass
class Transitions:
    """Real transitions (s, a, s') of one scenario, crashes left out."""

    states: np.ndarray  # (N, V, F) normalised
    actions: np.ndarray  # (N,)
    next_states: np.ndarray  # (N, V, F) normalised
    prev_actions: np.ndarray  # (N,) the action before (-1 at an episode start)
    n_crashed: int


def collect(scenario: str, steps: int, seed: int = 0) -> tuple[Transitions, KinematicPrior]:
    """Drive ``scenario`` with seeded random actions; return the transitions and a prior built from the env."""
    cfg = load_scenario(scenario)
    env = make_env(cfg.env)
    codec = make_codec(cfg.env)
    rng = numpy_rng(seed, "physics-validation", scenario)
    episode = 0
    obs, _ = env.reset(seed=derive_seed(seed, "physics-validation", scenario, episode))
    prior = KinematicPrior.from_env(env, codec, RoadGeometry.from_env(env))
    n_actions = int(env.action_space.n)
    S, A, S2, P = [], [], [], []
    prev, crashed = -1, 0
    for _ in range(steps):
        a = int(rng.integers(n_actions))
        obs2, _, terminated, truncated, info = env.step(a)
        if info.get("crashed", False):
            crashed += 1
        else:
            S.append(obs)
            A.append(a)
            S2.append(obs2)
            P.append(prev)
        obs, prev = obs2, a
        if terminated or truncated:
            episode += 1
            obs, _ = env.reset(seed=derive_seed(seed, "physics-validation", scenario, episode))
            prev = -1
    env.close()
    return Transitions(np.array(S), np.array(A), np.array(S2), np.array(P), crashed), prior


def errors(prior: KinematicPrior, tr: Transitions) -> dict[str, np.ndarray]:
    """Per-transition ego position / speed errors and per-neighbour nearest-match position errors."""
    s = torch.as_tensor(tr.states, dtype=torch.float32)
    probs = torch.nn.functional.one_hot(torch.as_tensor(tr.actions), len(prior.actions)).float()
    with torch.no_grad():
        pred = prior.predict(s, probs).double()
    codec = prior.codec
    pw = codec.decode_world(pred).numpy()
    tw = codec.decode_world(torch.as_tensor(tr.next_states, dtype=torch.float64)).numpy()
    ix, iy, ip = codec.index("x"), codec.index("y"), codec.index("presence")
    ego_pos = np.hypot(pw[:, 0, ix] - tw[:, 0, ix], pw[:, 0, iy] - tw[:, 0, iy])
    ego_speed = np.abs(codec.speed(pw[:, 0]) - codec.speed(tw[:, 0]))
    neigh = []
    for b in range(len(pw)):
        true_xy = tw[b, 1:][tw[b, 1:, ip] > 0.5][:, [ix, iy]]
        pred_xy = pw[b, 1:][pw[b, 1:, ip] > 0.5][:, [ix, iy]]
        if len(true_xy) and len(pred_xy):
            d = np.linalg.norm(pred_xy[:, None] - true_xy[None], axis=-1)
            neigh.extend(d.min(1).tolist())
    return {"ego_pos_m": ego_pos, "ego_speed_mps": ego_speed, "neigh_pos_m": np.array(neigh)}


def _stats(x: np.ndarray) -> str:
    if len(x) == 0:
        return "- | - | -"
    return " | ".join(f"{v:.3g}" for v in (np.median(x), np.percentile(x, 90), np.max(x)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenarios", nargs="+", default=["merge", "highway", "roundabout"])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    lines = [
        "| scenario | n (crashed, left out) | ego pos err m: median | p90 | max | ego speed err m/s: median | p90 | max "
        "| ego pos err m, previous action IDLE/none: median | p90 | neighbour pos err m (nearest row): median | p90 | max |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for scenario in args.scenarios:
        tr, prior = collect(scenario, args.steps, args.seed)
        e = errors(prior, tr)
        idle = prior.actions.index("IDLE") if "IDLE" in prior.actions else -2
        settled = (tr.prev_actions == idle) | (tr.prev_actions == -1)
        es = e["ego_pos_m"][settled]
        lines.append(
            f"| {scenario} | {len(tr.actions)} ({tr.n_crashed}) | {_stats(e['ego_pos_m'])} | {_stats(e['ego_speed_mps'])} "
            f"| {np.median(es):.3g} | {np.percentile(es, 90):.3g} | {_stats(e['neigh_pos_m'])} |"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
