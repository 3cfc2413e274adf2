"""eval: train the federation, attack what the server saw, score against the truth, report. Top to bottom."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from drivepriv.agents.algorithms import ActionSpec, make_algorithm
from drivepriv.attacks import ATTACKS, AttackInput, Priors, Reconstruction, make_attack
from drivepriv.attacks.actor_critic import critics, reads_actions, sub_dict
from drivepriv.attacks.chain import layer_ranks
from drivepriv.config import RunConfig, dump_yaml
from drivepriv.envs import backend_of, make_codec, make_env
from drivepriv.errors import ConfigError
from drivepriv.federation.defenses import DefenseStack
from drivepriv.federation.inprocess import evaluate_policy, resolve_attacked
from drivepriv.federation.run import run_federation
from drivepriv.federation.strategies import strategy
from drivepriv.federation.types import GroundTruth, ServerView
from drivepriv.metrics.identifiability import determined_transitions, separable_transitions
from drivepriv.metrics.run_scores import score_run_dir
from drivepriv.metrics.scores import score
from drivepriv.metrics.vector import score_vector, vector_metric_columns
from drivepriv.parallel import Background, fan_out, ray_fan_out
from drivepriv.report.build import build_report
from drivepriv.results import BatchRecord, save_batches
from drivepriv.priors.dynamics import Rollouts, collect_rollouts, fit_dynamics, fit_reward
from drivepriv.priors.road import RoadGeometry
from drivepriv.seeding import derive_seed, reproducible_torch, seed_everything

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

#: Columns every backend's metrics.csv ends with: what the update can determine (the truth-side
#: ceiling of :mod:`drivepriv.metrics.identifiability` and the update's first-layer rank) and how
#: many states the attack certified from it (rgia-k; NaN for the others).
IDENTIFIABILITY_COLUMNS = ["identifiable", "determined", "update_rank", "states_certified"]

@dataclass
class RunResult:
    run_dir: Path
    metrics: pd.DataFrame
    summary: pd.DataFrame
    verdict: dict


def resolve_config(cfg: RunConfig) -> RunConfig:
    """The configuration as the run uses it, decided once before anything runs: the defenses
    built from their specs (unknown names and parameters fail here, with a did-you-mean) and
    their configuration rewrites applied (``batch`` sets the minibatch size, ``local_steps``
    FedAvg's), then validated again. Every command that runs a federation starts from it."""
    try:
        stack = DefenseStack.from_specs(cfg.federation.defenses)
    except ConfigError as e:
        raise ConfigError(f"federation.defenses: {e}") from None
    out = stack.configure(cfg)
    try:
        out.validate("")
    except ConfigError as e:
        raise ConfigError(f"with the defenses {stack.describe()}: {str(e).lstrip('.')}") from None
    return out


def check_supported(cfg: RunConfig, attacks: bool = True) -> None:
    """Fail before any work starts on combinations this version cannot run (or, with
    ``attacks``, cannot attack)."""
    env = make_env(cfg.env)  # unknown environment ids and simulator keys fail here
    try:
        obs_dim = int(np.prod(env.observation_space.shape))
        algorithm = make_algorithm(cfg, obs_dim, env.action_space)  # algorithm vs action space
    finally:
        env.close()
    if cfg.federation.engine == "flower":
        from drivepriv.federation.flower_support import require_flower

        require_flower()  # says which install command to run
    for name in cfg.attack.attacks if attacks else []:
        attack = make_attack(name)  # unknown names fail here with a did-you-mean
        continuous, algo = algorithm.actions.continuous, cfg.agent.algorithm
        if not attack.supports(algo, continuous):
            ok = [n for n in ATTACKS.names() if ATTACKS.get(n).supports(algo, continuous)]
            raise ConfigError(
                f"attack.attacks: '{name}' does not attack {algo}'s continuous actions (it reads discrete actions off the "
                f"network's last layer, or needs critics that read (s, a)); scenario '{cfg.name}' trains {algo}: use "
                f"{', '.join(ok)} (--attacks ...)"
            )
    fed = cfg.federation
    if attacks and DefenseStack.from_specs(fed.defenses).secagg and strategy(fed.strategy).unrolled_steps(fed.local_steps) > 1:
        raise ConfigError(
            "defense secagg with FedAvg over several local steps: the sum of K-step deltas is not one client's "
            "unrolled training, which the attacks model; use federation.strategy=fedsgd or local_steps=1"
        )
    if attacks and not resolve_attacked(cfg):
        raise ConfigError(
            f"federation.fraction={fed.fraction:g}: none of the attacked clients ({cfg.attack.clients or 'all'}) is sampled "
            f"in the attacked rounds ({cfg.attack.round_indices(fed.rounds)}), so the server sees none of their updates; "
            "attack more rounds (attack.rounds: all) or more clients (attack.clients: [])"
        )
    if algorithm.on_policy and fed.env_steps_per_round < fed.batch_size:
        raise ConfigError(
            f"federation.env_steps_per_round ({fed.env_steps_per_round}) must be at least batch_size ({fed.batch_size}) "
            f"for {cfg.agent.algorithm}: an on-policy client draws its minibatch from the round's own rollout"
        )


def library_versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("drivepriv", "torch", "numpy", "gymnasium", "highway-env", "metadrive-simulator", "pandas", "scipy", "matplotlib", "imageio", "imageio-ffmpeg", "Jinja2", "PyYAML", "opacus"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def attacker_rollouts(cfg: RunConfig, progress: bool = False) -> Rollouts:
    """The attacker's own drive in the public simulator (its own seeds, never a client's)."""
    return collect_rollouts(cfg.env, cfg.attack.dynamics.rollout_steps, cfg.seed, progress=progress)


def build_priors(cfg: RunConfig, progress: bool, rollouts: Rollouts | None = None) -> tuple[Priors, dict[str, float], RoadGeometry | None]:
    """The attacker's public knowledge: codec, road, reward function, state feasibility and a
    transition model fitted on its own rollouts (:func:`attacker_rollouts`, or ``rollouts``
    when they were driven beforehand).

    What the simulator gives in closed form comes from its backend's ``priors``
    (:mod:`drivepriv.priors.backends`: highway-env's road, reward function and kinematics;
    the control tasks' exact equations; MetaDrive's feasibility constraints); a reward or
    transition model it does not give is learned from the attacker's rollouts."""
    codec = make_codec(cfg.env)
    env = make_env(cfg.env)
    env.reset(seed=derive_seed(cfg.seed, "attacker", "road"))
    actions = ActionSpec.of(env.action_space)
    try:
        known = backend_of(cfg.env).load("priors")(cfg.env, env, codec, actions.continuous)
    finally:
        env.close()
    road, reward, dynamics, physics = known.road, known.reward, known.dynamics, known.physics
    stats: dict[str, float] = {}
    if rollouts is None:
        log.info("attacker: driving the public simulator for %d steps to fit its transition prior", cfg.attack.dynamics.rollout_steps)
        rollouts = attacker_rollouts(cfg, progress)
    if dynamics is None:
        dynamics, stats = fit_dynamics(rollouts, actions.n, cfg.attack.dynamics, cfg.seed)
    if reward is None:  # no closed form (MetaDrive, racetrack, parking): learned from the rollouts
        reward, reward_stats = fit_reward(rollouts, actions.n, cfg.attack.dynamics, cfg.seed)
        stats.update(reward_stats)
    priors = Priors(
        codec=codec,
        road=road,
        reward=reward,
        dynamics=dynamics,
        physics=physics,
        state_penalty=known.state_penalty,
        prior_states=rollouts.states,
    )
    return priors, stats, road


def attack_input(model: torch.nn.Module, view: ServerView, priors: Priors, obs_shape: tuple[int, ...], n_actions: int) -> AttackInput:
    """The attacker's input for one update: the server's view and public priors, nothing else.

    PPO's FedAvg update of E passes over the same M minibatches (E x M local steps) is modelled,
    to first order in the step size, as M local steps at E times the rate: the attacks look for
    the M x B distinct transitions, and -delta / (lr E) sums one gradient per minibatch."""
    shared = strategy(view.strategy)
    steps = shared.unrolled_steps(view.local_steps)
    passes = getattr(view.loss, "epochs", 1) if steps > 1 else 1
    return AttackInput(
        model=copy.deepcopy(model),
        params=view.params,
        target_params=view.target_params,
        gradient=view.gradient() if passes == 1 else tuple(g / passes for g in view.gradient()),
        loss=view.loss,
        batch_size=view.batch_size,
        obs_shape=obs_shape,
        n_actions=n_actions,
        priors=priors,
        local_steps=steps // passes,
        local_lr=view.lr * passes,
        delta=shared.delta(view.payload),
    )


def update_rank(inp: AttackInput) -> float:
    """How many distinct rank-one terms the update's first linear layer carries (an actor-critic:
    its first critic's, which reads (s, a)); NaN where that network is not a chain of biased
    linear layers."""
    model, params, gradient = inp.model, inp.params, dict(zip(inp.params, inp.gradient))
    if reads_actions(inp):
        name = critics(model)[0]
        model, params, gradient = getattr(model, name), sub_dict(params, name), sub_dict(gradient, name)
    try:
        ranks = layer_ranks(model, params, gradient, inp.n_transitions)
    except (ValueError, KeyError):
        return float("nan")
    return float(next(iter(ranks.values())))


def metric_columns(codec, continuous: bool) -> list[str]:
    """metrics.csv's columns for a scenario's observation codec."""
    if codec.flat:
        return vector_metric_columns(codec, continuous) + IDENTIFIABILITY_COLUMNS
    cols = list(METRIC_COLUMNS)
    return [("action_abs_err" if c == "action_acc" and continuous else c) for c in cols] + IDENTIFIABILITY_COLUMNS


def score_any(truth: GroundTruth, rec: Reconstruction, codec) -> tuple[dict[str, float], np.ndarray]:
    """Score a reconstruction with the codec's metrics (Kinematics or flat observations)."""
    if codec.flat:
        return score_vector(truth, rec.states, rec.actions, rec.rewards, rec.next_states, codec)
    return score(truth, rec.states, rec.actions, rec.rewards, rec.next_states, codec)


class DynamicsResidual:
    """The simulator stepped from a (reconstructed) (s, a), compared with the given s', by the
    backend's stepper (highway-env: ego position in m; control tasks: physical state distance).
    Where the backend has none (MetaDrive's Bullet state cannot be set from an observation;
    highway-env's continuous actions or goal observation): NaN."""

    def __init__(self, cfg: RunConfig, codec) -> None:
        self.stepper = backend_of(cfg.env).residual(cfg.env, codec)
        self.fn = None if self.stepper is None else self.stepper.residual

    def __call__(self, states: np.ndarray, actions: np.ndarray, next_states: np.ndarray) -> float:
        if self.fn is None:
            return float("nan")
        return float(np.median(self.fn(states, actions, next_states)))

    def close(self) -> None:
        if self.stepper is not None:
            self.stepper.close()


def start_run(cfg: RunConfig, command: str, run_id: str | None, default_command: str) -> tuple[Path, Path]:
    """Create ``<out>/<scenario>/<run-id>.incomplete`` with config.yaml, versions.json and
    run.json; return (work folder, final folder)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    run_id = run_id or f"{cfg.name}-seed{cfg.seed}-{stamp}"
    final_dir = Path(cfg.out) / cfg.name / run_id
    work = final_dir.with_name(run_id + ".incomplete")
    work.mkdir(parents=True, exist_ok=False)
    (work / "config.yaml").write_text(dump_yaml(cfg))
    (work / "versions.json").write_text(json.dumps(library_versions(), indent=2))
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    (work / "run.json").write_text(json.dumps({"run_id": run_id, "command": command or default_command, "seed": cfg.seed, "started": started}, indent=2))
    seed_everything(cfg.seed)
    reproducible_torch()
    return work, final_dir


def train_federation(cfg: RunConfig, work: Path, progress: bool, attacked: set[tuple[int, int]] | None = None):
    """Train (in-process or on Flower; server views recorded for ``attacked``, by default the
    configuration's) and write training.csv."""
    fed = run_federation(cfg, resolve_attacked(cfg) if attacked is None else attacked, progress=progress)
    fed.training.to_csv(work / "training.csv", index=False)
    if fed.cluster:  # where it ran (not part of the results)
        info = json.loads((work / "run.json").read_text())
        (work / "run.json").write_text(json.dumps({**info, "cluster": fed.cluster}, indent=2))
    return fed


def write_privacy_utility(work: Path, privacy: dict, utility: dict) -> None:
    """privacy_utility.json: the privacy the defenses spent and the trained policy's utility."""
    (work / "privacy_utility.json").write_text(json.dumps({"privacy": privacy, "utility": utility}, indent=2))


def run_train(cfg: RunConfig, command: str = "", progress: bool = True, run_id: str | None = None) -> tuple[Path, dict]:
    """Train the federation only: training.csv, privacy_utility.json, the final global model
    (model.pt: its state_dict) and the reproducibility files. Returns (run folder, utility)."""
    cfg = resolve_config(cfg)
    check_supported(cfg, attacks=False)
    work, final_dir = start_run(cfg, command, run_id, f"drivepriv train --scenario {cfg.name} --seed {cfg.seed}")
    fed = train_federation(cfg, work, progress, attacked=set())
    utility = evaluate_policy(cfg, fed.model, fed.algorithm, cfg.federation.eval_episodes)
    write_privacy_utility(work, fed.privacy, utility)
    torch.save(fed.model.state_dict(), work / "model.pt")
    shutil.move(str(work), str(final_dir))
    return final_dir, utility


def run_eval(cfg: RunConfig, command: str = "", progress: bool = True, run_id: str | None = None) -> RunResult:
    """Train, attack, score and report. Output goes to ``<out>/<scenario>/<run-id>/``; while the
    run is in progress the folder is named ``<run-id>.incomplete``."""
    cfg = resolve_config(cfg)
    check_supported(cfg)
    work, final_dir = start_run(cfg, command, run_id, f"drivepriv eval --scenario {cfg.name} --seed {cfg.seed}")
    t0 = time.perf_counter()
    # The attacker drives its own rollouts while the federation trains (they need nothing from
    # it), and the trained policy's utility episodes run beside the attacks: the same numbers
    # as one after another (each seeds its own streams), with the second core busy.
    with Background(attacker_rollouts, cfg, workers=cfg.workers) as rollouts:
        fed = train_federation(cfg, work, progress)
        stages = {"train": time.perf_counter() - t0}
        if cfg.federation.engine == "flower" and not cfg.federation.ray_address:
            # Processes forked from one that has just run Ray on this machine died at random (CI:
            # the attacks' workers and the utility episodes, 4 of 7 runs of the Flower report
            # test): the rest of a local Flower run stays in this process, one job after another.
            cfg = dataclasses.replace(cfg, workers=1)
        with Background(evaluate_policy, cfg, fed.model, fed.algorithm, cfg.federation.eval_episodes, workers=cfg.workers) as utility:
            return attack_and_report(cfg, fed.model, fed.views, fed.truths, work, final_dir, progress, stages, rollouts, (fed.privacy, utility))


def attack_and_report(
    cfg: RunConfig,
    model: torch.nn.Module,
    views: list[ServerView],
    truths: dict[tuple[int, int], GroundTruth],
    work: Path,
    final_dir: Path,
    progress: bool = True,
    stages: dict[str, float] | None = None,
    rollouts: Background | None = None,
    privacy_utility: tuple[dict, Background] | None = None,
) -> RunResult:
    """Attack every server view (the attacker's input: the view and public priors), score each
    reconstruction against its client's truth, save and report; then give ``work`` its final name.

    ``model`` is the network the views' parameters belong to (any module whose first layer is
    ``nn.Linear``); ``truths`` is keyed by (round, client) and read by the metrics only.
    ``stages``: seconds already spent (e.g. training), written to run.json's ``stage_seconds``
    with the attacker's priors, the attacks and the report. ``rollouts``: the attacker's
    rollouts, driven beforehand (:func:`attacker_rollouts`). ``privacy_utility``: the privacy
    spent and the (pending) utility episodes, written to privacy_utility.json before the report."""
    stages = dict(stages or {})
    t0 = time.perf_counter()
    priors, dyn_stats, road = build_priors(cfg, progress, rollouts.result() if rollouts is not None else None)
    stages["priors"] = time.perf_counter() - t0
    codec = priors.codec
    obs_shape = tuple(codec.obs_shape)
    n_actions = model.n_actions
    residual_of = DynamicsResidual(cfg, codec)
    continuous = any(t.continuous for t in truths.values())
    columns = metric_columns(codec, continuous)
    suffix = codec.distance_suffix

    views = sorted(views, key=lambda v: (v.round, v.client))
    inputs = [attack_input(model, view, priors, obs_shape, n_actions) for view in views]
    jobs = [(k, name) for k in range(len(views)) for name in cfg.attack.attacks]

    def run_job(job: tuple[int, str]) -> Reconstruction:
        k, name = job
        attack = make_attack(name, iterations=cfg.attack.iterations, restarts=cfg.attack.restarts, lr=cfg.attack.lr, weights=cfg.attack.weights)
        return attack.run(inputs[k], derive_seed(cfg.seed, "attack", name, views[k].round, views[k].client))

    bar = tqdm(total=len(jobs), desc="attack", unit="attack", disable=not progress, leave=False)
    # every attack seeds itself from (seed, attack, round, client): the same numbers whichever
    # worker runs it (drivepriv.parallel)
    t0 = time.perf_counter()
    fed = cfg.federation
    if fed.engine == "flower" and fed.ray_address:  # on the cluster the federation trained on
        out, nodes = ray_fan_out(run_job, jobs, fed.ray_address, done=lambda: bar.update(1), retries=fed.flower_retries)
        cluster = {"attack_nodes": len(nodes)}
    else:
        out, cluster = fan_out(run_job, jobs, cfg.workers, done=lambda: bar.update(1)), {}
    results = dict(zip(jobs, out))
    stages["attacks"] = time.perf_counter() - t0
    t0 = time.perf_counter()

    def score_batch(k: int) -> tuple[list[dict], list[dict], BatchRecord]:
        """Every attack's reconstruction of update ``k`` against its client's truth (metrics only)."""
        view, inp = views[k], inputs[k]
        truth = truths[(view.round, view.client)]
        truth_residual = residual_of(truth.states, truth.actions, truth.next_states)
        ceiling = {
            "identifiable": separable_transitions(model, view.params, truth.states, None if continuous else truth.actions),
            # FedSGD only: a FedAvg delta's terms come from K parameter versions
            "determined": determined_transitions(model, view.params, truth.states, None if continuous else truth.actions) if strategy(view.strategy).payload_kind == "gradient" else float("nan"),
            "update_rank": update_rank(inp),
        }
        rows, timings = [], []
        recs: dict[str, tuple[Reconstruction, np.ndarray]] = {}
        for name in cfg.attack.attacks:
            rec = results[(k, name)]
            m, perm = score_any(truth, rec, codec)
            m["dyn_residual" + suffix] = residual_of(rec.states[perm], rec.actions[perm], rec.next_states[perm])
            m["dyn_residual_truth" + suffix] = truth_residual
            m["grad_distance"] = rec.grad_distance
            m.update(ceiling, states_certified=rec.extra.get("states_found", float("nan")))
            rows.append({"attack": name, "client": view.client, "round": view.round, "seed": cfg.seed, "batch_size": view.batch_size, "local_steps": inp.local_steps, **m})
            timings.append({"attack": name, "client": view.client, "round": view.round, "seed": cfg.seed, "time_s": rec.time_s})
            recs[name] = (rec, perm)
        record = BatchRecord(
            truth, {n: {"states": r.states[p], "actions": r.actions[p], "rewards": r.rewards[p], "next_states": r.next_states[p]} for n, (r, p) in recs.items()}
        )
        return rows, timings, record

    # scoring steps the simulator from every reconstruction (the dynamics residual): one batch per
    # worker, each step from a freshly reset simulator, so the same numbers in any process
    scored = fan_out(score_batch, range(len(views)), cfg.workers)
    rows = [r for batch_rows, _, _ in scored for r in batch_rows]
    timings = [t for _, batch_timings, _ in scored for t in batch_timings]
    records: list[BatchRecord] = [record for _, _, record in scored]
    bar.close()
    residual_of.close()

    metrics = pd.DataFrame(rows, columns=["attack", "client", "round", "seed", "batch_size", "local_steps", *columns])
    metrics.to_csv(work / "metrics.csv", index=False, float_format="%.6g")
    pd.DataFrame(timings).to_csv(work / "timings.csv", index=False, float_format="%.4g")
    save_batches(work, records)
    (work / "attacker.json").write_text(json.dumps({"dynamics_prior": dyn_stats}, indent=2))

    if privacy_utility is not None:
        privacy, utility = privacy_utility
        write_privacy_utility(work, privacy, utility.result())
    # leakage, by round, trips, the verdict: scored from the saved results before the report
    # renders them, exactly as `drivepriv report` rescores a run folder later
    scores = score_run_dir(work)
    stages["scoring"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    built = build_report(work, scores, progress=progress)
    stages["report"] = time.perf_counter() - t0
    info = json.loads((work / "run.json").read_text())
    info["stage_seconds"] = {k: round(v, 2) for k, v in stages.items()}  # wall time, not part of the results
    if cluster:
        info["cluster"] = {**info.get("cluster", {}), **cluster}
    (work / "run.json").write_text(json.dumps(info, indent=2))
    shutil.move(str(work), str(final_dir))
    return RunResult(final_dir, metrics, built.summary, built.verdict)
