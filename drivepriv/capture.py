"""Auditing a Flower deployment: attack what a
:class:`~drivepriv.federation.curious.CuriousStrategy` captured, score it against the clients'
own record of their minibatches (:func:`~drivepriv.federation.flower_support.save_truth`) and
write the report (``drivepriv audit CAPTURE --model MODULE:FACTORY``). The model is the
deployment's own network, wrapped as :mod:`drivepriv.audit` wraps a user's model.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from torch import nn

from drivepriv.agents.dqn import DQNLossSpec
from drivepriv.agents.ppo import PPOLossSpec
from drivepriv.audit import _FlatInput, _check_model, _scenario
from drivepriv.config import RunConfig, apply_overrides
from drivepriv.errors import ConfigError
from drivepriv.federation.strategies import strategy


def load_model_factory(spec: str) -> nn.Module:
    """``package.module:Factory`` -> ``Factory()``, the deployment's (untrained) network."""
    module, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:  # as `python -m` does: the app's package from where you stand
        sys.path.insert(0, os.getcwd())
    if not module or not attr:
        raise ConfigError(f"--model {spec!r}: expected MODULE:FACTORY, e.g. my_app.task:Net (a callable returning the nn.Module)")
    try:
        factory = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"--model {spec!r}: cannot import it ({e}); is the app's package on the Python path (PYTHONPATH=...)?") from None
    try:
        model = factory()
    except Exception as e:  # noqa: BLE001 - the user's code: say what failed, without a traceback
        raise ConfigError(f"--model {spec!r}: calling it failed ({type(e).__name__}: {e}); it must build the network with no arguments") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"--model {spec!r}: returned {type(model).__name__}, not a torch nn.Module")
    return model


def capture_truths(views: list, truth_dir: str | Path) -> dict:
    """The recorded minibatches behind each captured update, keyed by (round, client): the
    client's own file, or under secure aggregation (client -1) all the round's files merged.
    Checked against the capture's local steps and batch size."""
    from drivepriv.federation.flower_support import load_truth
    from drivepriv.federation.recorder import merge_truths

    truths = {}
    for v in views:
        if v.client == -1:  # secure aggregation: every client's minibatch of the round
            files = sorted(Path(truth_dir).glob(f"r{v.round}-c*.npz"), key=lambda f: int(f.stem.split("-c")[1]))
            parts = [load_truth(truth_dir, v.round, int(f.stem.split("-c")[1])) for f in files]
            t = merge_truths(v.round, parts) if parts else None
        else:
            t = load_truth(truth_dir, v.round, v.client)
        if t is None:
            raise ConfigError(f"{truth_dir}: no truth for round {v.round}, client {v.client} (file r{v.round}-c{'*' if v.client == -1 else v.client}.npz)")
        if t.local_steps != v.local_steps or len(t) != v.batch_size * v.local_steps:
            raise ConfigError(
                f"{truth_dir}: round {v.round}, client {v.client}: the recorded truth has {t.local_steps} minibatch(es) and {len(t)} "
                f"transitions, but the capture says {v.local_steps} local step(s) of {v.batch_size}; check batch_size/local_steps"
            )
        truths[(v.round, v.client)] = t
    return truths


def audit_capture(
    capture: str | Path | list,
    model: nn.Module,
    scenario: str | RunConfig = "merge",
    truth_dir: str | Path | None = None,
    out: str | Path | None = None,
    attacks: list[str] | None = None,
    settings: dict[str, Any] | None = None,
    command: str = "",
    progress: bool = True,
):
    """Attack what a :class:`~drivepriv.federation.curious.CuriousStrategy` captured in a Flower
    deployment, score it against the clients' own record of their minibatches, and write the
    same report as ``drivepriv eval`` (``<out>/<scenario>/audit-<scenario>-seed<seed>-<time>/``).

    Args:
        capture: the folder ``strategy.save()`` wrote, or the strategy's ``views``.
        model: the deployment's network (its parameter names are those in the capture).
        scenario: the scenario the clients drove: observation layout, road, reward, dynamics.
        truth_dir: where the audited clients wrote their minibatches
            (:func:`drivepriv.federation.flower_support.save_truth`). The attacks never read it.
    """
    from drivepriv.pipeline import attack_and_report, check_supported, start_run

    cfg = _scenario(scenario, settings)
    overrides: list = []
    if out is not None:
        overrides.append((["out"], str(out)))
    if attacks:
        overrides.append((["attack", "attacks"], list(attacks)))
    cfg = apply_overrides(cfg, overrides, source="audit") if overrides else cfg
    if isinstance(capture, (str, Path)):
        from drivepriv.federation.curious import load_capture

        views = load_capture(capture)
    else:
        views = list(capture)
    if not views:
        raise ConfigError("the capture holds no client update: were the watched rounds (CuriousStrategy rounds=...) run?")
    losses = {type(v.loss) for v in views}
    if losses - {DQNLossSpec, PPOLossSpec}:
        raise ConfigError(f"the capture's loss {', '.join(t.__name__ for t in losses)} is not one the audit supports (DQNLossSpec, PPOLossSpec)")
    algorithm = "ppo" if isinstance(views[0].loss, PPOLossSpec) else "dqn"
    n_actions, continuous = _check_model(model, cfg, algorithm)
    if continuous:
        raise ConfigError(f"scenario '{cfg.name}' has continuous actions; the audit of a capture supports discrete actions (DQN, PPO): invert each captured update with drivepriv.audit.invert_gradients")
    shapes = {k: tuple(p.shape) for k, p in model.named_parameters()}
    for v in views:
        got = {k: tuple(t.shape) for k, t in v.params.items()}
        if got != shapes:
            diff = [k for k in dict.fromkeys([*shapes, *got]) if shapes.get(k) != got.get(k)]
            raise ConfigError(
                f"round {v.round}, client {v.client}: the captured arrays are not the model's parameters "
                f"(differ at {', '.join(f'{k}: capture {got.get(k)}, model {shapes.get(k)}' for k in diff[:3])}); pass the deployment's network with --model"
            )
        if v.client == -1 and strategy(v.strategy).unrolled_steps(v.local_steps) > 1:
            raise ConfigError("a secure-aggregation capture of K-step FedAvg deltas cannot be attacked (the mean is no client's unrolled training)")
    if truth_dir is None:
        raise ConfigError(
            "scoring needs the clients' true minibatches (--truth DIR, written by the audited clients with save_truth); "
            "to reconstruct without scoring, use drivepriv.audit.invert_gradients on each captured update"
        )
    truths = capture_truths(views, truth_dir)
    cfg = apply_overrides(cfg, [(["agent", "algorithm"], algorithm)], source="audit")
    check_supported(cfg)
    wrapped = _FlatInput(copy.deepcopy(model), n_actions)
    inner = lambda d: {"inner." + k: v for k, v in d.items()}  # noqa: E731 - the wrapper's parameter names
    views = [dataclasses.replace(v, params=inner(v.params), target_params=inner(v.target_params)) for v in views]
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    work, final_dir = start_run(cfg, command, f"audit-{cfg.name}-seed{cfg.seed}-{stamp}", f"drivepriv audit (scenario {cfg.name})")
    (work / "audit.json").write_text(json.dumps({"views": len(views), "truth_dir": str(truth_dir), "model": type(model).__name__}, indent=2))
    return attack_and_report(cfg, wrapped, views, truths, work, final_dir, progress)
