"""A small real federation and the attacker's input for its last recorded update, for the
attack tests (the attacker's priors from its own rollouts, seeds disjoint from the clients')."""

from __future__ import annotations

from drivepriv.config import apply_overrides
from drivepriv.federation.inprocess import resolve_attacked
from drivepriv.federation.run import run_federation
from drivepriv.pipeline import attack_input, build_priors
from drivepriv.scenarios import load_scenario


def federation_case(name: str, batch_size: int, rounds: int = 1, **settings):
    """(priors, truth, attack input) of one client's last update; ``settings`` are --set style
    overrides (``{"agent.gae_lambda": 0.95}``)."""
    small = {
        "federation.clients": 1,
        "federation.rounds": rounds,
        "federation.batch_size": batch_size,
        "federation.warmup_steps": 60,
        "attack.rounds": [-1],
        "attack.clients": [0],
        "attack.dynamics.rollout_steps": 200,
        **settings,
    }
    cfg = apply_overrides(load_scenario(name), [(k.split("."), v) for k, v in small.items()])
    priors, _, _ = build_priors(cfg, progress=False)
    fed = run_federation(cfg, resolve_attacked(cfg), progress=False)
    view = fed.views[-1]
    truth = fed.truths[(view.round, view.client)]
    return priors, truth, attack_input(fed.model, view, priors, tuple(priors.codec.obs_shape), fed.model.n_actions)
