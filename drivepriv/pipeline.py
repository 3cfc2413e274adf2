"""eval: train the federation, attack what the server saw, score against the truth, report. Top to bottom."""

from __future__ import annotations

import copy
import json
import logging
import platform
import shutil
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from drivepriv.attacks import AttackInput, Priors, Reconstruction, make_attack
from drivepriv.config import RunConfig, dump_yaml
from drivepriv.envs import make_codec, make_env
from drivepriv.envs.highway import action_names
from drivepriv.federation.inprocess import GroundTruth, ServerView, resolve_attacked, run_federation
from drivepriv.metrics.dynamics import SimulatorStepper
from drivepriv.metrics.scores import METRIC_HELP, Truth, score
from drivepriv.priors.dynamics import collect_rollouts, fit_dynamics
from drivepriv.priors.physics import KinematicPrior
from drivepriv.priors.reward import make_reward
from drivepriv.priors.road import RoadGeometry
from drivepriv.priors.state import state_penalty
from drivepriv.seeding import derive_seed, seed_everything

log = logging.getLogger(__name__)

#: Columns of metrics.csv that are identical for identical seeds (timings go to timings.csv).
METRIC_COLUMNS = [
    "ego_pos_err_m",
    "ego_within_1m",
    "ego_speed_err_mps",
    "neighbour_pos_err_m",
    "presence_acc",
    "action_acc",
    "reward_abs_err",
    "next_state_err_m",
    "dyn_residual_m",
    "dyn_residual_truth_m",
    "grad_distance",
]

THREAT_MODEL = [
    "An honest-but-curious server receives each client's update (FedSGD: the gradient of its DQN TD loss on one minibatch).",
    "It knows what any FL server knows: the global and target networks it sent, the loss and hyper-parameters it prescribed, and the public simulator (road, observation layout, reward function).",
    "It never sees the clients' data. Attacks receive only that view; the ground truth is used by the metrics alone.",
]


@dataclass
class RunResult:
    run_dir: Path
    metrics: pd.DataFrame
    summary: pd.DataFrame


def check_supported(cfg: RunConfig) -> None:
    """Fail before any work starts on combinations this version cannot attack."""
    for name in cfg.attack.attacks:
        make_attack(name)  # unknown names fail here with a did-you-mean
    make_env(cfg.env).close()  # unknown environment ids and highway-env keys fail here


def library_versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("drivepriv", "torch", "numpy", "gymnasium", "highway-env", "pandas", "scipy", "matplotlib", "imageio", "imageio-ffmpeg", "Jinja2", "PyYAML"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def build_priors(cfg: RunConfig, progress: bool) -> tuple[Priors, dict[str, float], RoadGeometry]:
    """The attacker's public knowledge: codec, road, reward function, state feasibility and a
    transition model fitted on its own rollouts (its own seeds, never a client's)."""
    codec = make_codec(cfg.env)
    env = make_env(cfg.env)
    env.reset(seed=derive_seed(cfg.seed, "attacker", "road"))
    road = RoadGeometry.from_env(env)
    reward = make_reward(cfg.env, env)
    physics = physics_prior(env, codec, road)
    log.info("attacker: driving the public simulator for %d steps to fit its transition prior", cfg.attack.dynamics.rollout_steps)
    rollouts = collect_rollouts(cfg.env, cfg.attack.dynamics.rollout_steps, cfg.seed, progress=progress)
    n_actions = int(env.action_space.n)
    env.close()
    dynamics, stats = fit_dynamics(rollouts, n_actions, cfg.attack.dynamics, cfg.seed)
    priors = Priors(
        codec=codec,
        road=road,
        reward=reward,
        dynamics=dynamics,
        physics=physics,
        state_penalty=lambda obs: state_penalty(obs, codec, road),
        prior_states=rollouts.states,
    )
    return priors, stats, road


def physics_prior(env, codec, road):
    """The closed-form kinematic prior's ``predict``, or None where it does not apply."""
    try:
        return KinematicPrior.from_env(env, codec, road).predict
    except (ValueError, NotImplementedError) as e:
        log.info("no physics prior for %s: %s", env.spec.id if env.spec else env, e)
        return None


def attack_input(model: torch.nn.Module, view: ServerView, priors: Priors, obs_shape: tuple[int, int], n_actions: int) -> AttackInput:
    """The attacker's input for one update: the server's view and public priors, nothing else."""
    return AttackInput(
        model=copy.deepcopy(model),
        params=view.params,
        target_params=view.target_params,
        gradient=view.gradient(),
        loss=view.loss,
        batch_size=view.batch_size,
        obs_shape=obs_shape,
        n_actions=n_actions,
        priors=priors,
        local_steps=view.local_steps if view.strategy == "fedavg" else 1,
        local_lr=view.lr,
        delta=view.payload if view.strategy == "fedavg" else None,
    )


def _truth(gt: GroundTruth) -> Truth:
    """All transitions behind the update (the K local minibatches of FedAvg, concatenated)."""
    cat = {k: np.concatenate([b[k] for b in gt.batches]) for k in gt.batches[0]}
    return Truth(cat["states"], cat["actions"].argmax(-1), cat["rewards"], cat["next_states"], cat["dones"])


def run_eval(cfg: RunConfig, command: str = "", progress: bool = True) -> RunResult:
    """Train, attack, score and report. Output goes to ``<out>/<scenario>/<run-id>/``; while the
    run is in progress the folder is named ``<run-id>.incomplete``."""
    check_supported(cfg)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    run_id = f"{cfg.name}-seed{cfg.seed}-{stamp}"
    final_dir = Path(cfg.out) / cfg.name / run_id
    work = final_dir.with_name(run_id + ".incomplete")
    work.mkdir(parents=True, exist_ok=False)
    (work / "config.yaml").write_text(dump_yaml(cfg))
    (work / "versions.json").write_text(json.dumps(library_versions(), indent=2))

    seed_everything(cfg.seed)
    # The networks are small: a second thread buys almost nothing and, on a shared 2-core
    # machine, thread contention made torch many times slower. One thread is also reproducible.
    torch.set_num_threads(1)
    attacked = resolve_attacked(cfg)
    fed = run_federation(cfg, attacked, progress=progress)
    fed.training.to_csv(work / "training.csv", index=False)

    priors, dyn_stats, road = build_priors(cfg, progress)
    codec = priors.codec
    obs_shape = (codec.vehicles_count, codec.n_features)
    n_actions = fed.model.n_actions
    stepper = SimulatorStepper(make_env(cfg.env), codec)
    names = action_names(stepper.env)

    rows, timings, scenes = [], [], []
    views = sorted(fed.views, key=lambda v: (v.round, v.client))
    bar = tqdm(total=len(views) * len(cfg.attack.attacks), desc="attack", unit="attack", disable=not progress, leave=False)
    for view in views:
        truth = _truth(fed.truths[(view.round, view.client)])
        inp = attack_input(fed.model, view, priors, obs_shape, n_actions)
        truth_residual = stepper.ego_residual_m(truth.states, truth.actions, truth.next_states)
        recs: dict[str, tuple[Reconstruction, np.ndarray]] = {}
        for name in cfg.attack.attacks:
            attack = make_attack(name, iterations=cfg.attack.iterations, restarts=cfg.attack.restarts, lr=cfg.attack.lr, weights=cfg.attack.weights)
            rec = attack.run(inp, derive_seed(cfg.seed, "attack", name, view.round, view.client))
            m, perm = score(truth, rec.states, rec.actions, rec.rewards, rec.next_states, codec)
            residual = stepper.ego_residual_m(rec.states[perm], rec.actions[perm], rec.next_states[perm])
            m["dyn_residual_m"] = float(np.median(residual))
            m["dyn_residual_truth_m"] = float(np.median(truth_residual))
            m["grad_distance"] = rec.grad_distance
            rows.append({"attack": name, "client": view.client, "round": view.round, "seed": cfg.seed, "batch_size": view.batch_size, "local_steps": inp.local_steps, **m})
            timings.append({"attack": name, "client": view.client, "round": view.round, "seed": cfg.seed, "time_s": rec.time_s})
            recs[name] = (rec, perm)
            bar.update(1)
        scenes.append((view, truth, recs))
    bar.close()
    stepper.env.close()

    metrics = pd.DataFrame(rows, columns=["attack", "client", "round", "seed", "batch_size", "local_steps", *METRIC_COLUMNS])
    metrics.to_csv(work / "metrics.csv", index=False, float_format="%.6g")
    pd.DataFrame(timings).to_csv(work / "timings.csv", index=False, float_format="%.4g")
    (work / "attacker.json").write_text(json.dumps({"dynamics_prior": dyn_stats}, indent=2))

    summary = _write_report(cfg, work, metrics, pd.DataFrame(timings), scenes, road, codec, names, command, progress)
    shutil.move(str(work), str(final_dir))
    return RunResult(final_dir, metrics, summary)


def _write_report(cfg, work, metrics, timings, scenes, road, codec, names, command: str, progress: bool) -> pd.DataFrame:
    from drivepriv.report import ReportContext, SceneBatch, draw_batch_figure, render_report, summarise, write_replay_video

    batches = []
    for k, (view, truth, recs) in enumerate(tqdm(scenes, desc="report", unit="batch", disable=not progress, leave=False)):
        label = f"client {view.client} · round {view.round}"
        scene = SceneBatch(
            label=label,
            features=codec.features,
            truth_states=codec.decode_world(truth.states),
            truth_next_states=codec.decode_world(truth.next_states),
            recon={n: (codec.decode_world(r.states[p]), codec.decode_world(r.next_states[p])) for n, (r, p) in recs.items()},
            actions=truth.actions,
            recon_actions={n: r.actions[p] for n, (r, p) in recs.items()},
            action_names=names,
        )
        stem = f"c{view.client}-r{view.round}"
        fig = draw_batch_figure(scene, road, work / "figures" / f"{stem}.png") if cfg.report.figures else None
        vid = write_replay_video(scene, road, work / "videos" / f"{stem}.mp4", fps=cfg.report.fps) if k < cfg.report.videos else None
        batches.append(
            {
                "label": label,
                "figure": str(fig.relative_to(work)) if fig else None,
                "video": str(vid.relative_to(work)) if vid else None,
            }
        )
    with_time = metrics.merge(timings, on=["attack", "client", "round", "seed"])
    summary = summarise(with_time, group="attack", metrics=[*METRIC_COLUMNS, "time_s"])
    fed = cfg.federation
    context = ReportContext(
        title=f"drivepriv · {cfg.name}",
        scenario=cfg.name,
        description=cfg.description,
        settings={
            "environment": cfg.env.id,
            "federation": f"{fed.clients} clients, {fed.rounds} rounds, {fed.strategy}, batch {fed.batch_size}",
            "local algorithm": f"{cfg.agent.algorithm} (gamma {fed.gamma}, lr {fed.lr})",
            "attacks": ", ".join(cfg.attack.attacks),
            "attacked": f"rounds {sorted({r % fed.rounds for r in cfg.attack.rounds})}, clients {cfg.attack.clients or 'all'}",
            "attack budget": f"{cfg.attack.iterations} iterations x {cfg.attack.restarts} restarts",
            "seed": str(cfg.seed),
        },
        threat_model=THREAT_MODEL,
        summary=summary,
        metric_help=METRIC_HELP | {"time_s": "wall time of the attack (s)"},
        batches=batches,
        reproducibility={
            "command": command or f"drivepriv eval --scenario {cfg.name} --seed {cfg.seed}",
            "seed": str(cfg.seed),
            "config": "config.yaml",
            "versions": "versions.json",
            "metrics": "metrics.csv",
        },
    )
    render_report(work, context)
    return summary


def tidy_summary(metrics: pd.DataFrame) -> pd.DataFrame:
    """Median of the headline metrics per attack, for the terminal."""
    cols = ["ego_pos_err_m", "ego_speed_err_mps", "neighbour_pos_err_m", "action_acc", "reward_abs_err", "next_state_err_m", "dyn_residual_m", "dyn_residual_truth_m"]
    out = metrics.groupby("attack", sort=False)[cols].median()
    out.insert(0, "n", metrics.groupby("attack", sort=False).size())
    return out
