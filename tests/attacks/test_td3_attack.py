"""Exact attacks on TD3 (issue 16): the critics read (s, a), so the update carries every
transition's state and action.

The cases are real federations (Pendulum, highway-env's racetrack); the attacker's priors are
built from its own rollouts (seeds disjoint from the clients'), and the exact search does not
read them at all: the tests below also run it with no prior states.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from drivepriv.agents.common import Batch
from drivepriv.attacks import make_attack
from drivepriv.attacks.actor_critic import critics, reads_actions
from drivepriv.config import apply_overrides
from drivepriv.errors import ConfigError
from drivepriv.pipeline import check_supported, score_any
from drivepriv.scenarios import load_scenario
from tests.attacks.cases import federation_case


def _errors(truth, rec, codec) -> tuple[float, float, float]:
    """After matching: the largest state error (observation units) and action error, and the
    share of rewards within 1e-2."""
    _, perm = score_any(truth, rec, codec)
    n = len(truth)
    s_err = float(np.abs(truth.states.reshape(n, -1) - rec.states[perm].reshape(n, -1)).max())
    a_err = float(np.abs(truth.actions - rec.actions[perm]).max())
    r_ok = float((np.abs(truth.rewards - rec.rewards[perm]) < 1e-2).mean())
    return s_err, a_err, r_ok


def test_pendulum_batch_of_8_is_recovered_exactly_with_no_prior_states():
    priors, truth, inp = federation_case("pendulum", 8)
    assert reads_actions(inp) and critics(inp.model) == ["q1", "q2"]
    blind = replace(inp, priors=replace(priors, prior_states=None))  # the search reads no rollout
    rec = make_attack("rgia-k").run(blind, seed=0)
    assert rec.continuous and rec.extra["states_found"] == 8
    m, _ = score_any(truth, rec, priors.codec)
    assert m["state_rmse"] <= 1e-3 and m["action_abs_err"] <= 1e-2, m
    s_err, a_err, r_ok = _errors(truth, rec, priors.codec)
    assert s_err < 1e-4 and a_err < 1e-4 and r_ok == 1.0, (s_err, a_err, r_ok)
    assert np.all(np.abs(rec.actions) <= 1.0)  # in the action box the actor outputs


def test_a_trained_critic_pair_is_recovered_by_peeling_one_into_the_other():
    """After 30 rounds one critic alone certifies only part of the batch (its last hidden layer
    has lost rank); the other's certified samples, peeled off, leave it the rank room."""
    priors, truth, inp = federation_case("pendulum", 8, rounds=30)
    rec = make_attack("rgia-k").run(inp, seed=0)
    assert rec.extra["states_found"] == 8
    s_err, a_err, r_ok = _errors(truth, rec, priors.codec)
    assert s_err < 1e-4 and a_err < 1e-4 and r_ok == 1.0, (s_err, a_err, r_ok)


def test_a_critic_only_step_of_delayed_td3_is_recovered_exactly():
    """TD3 with the paper's delayed actor (policy_delay 2): round 0's gradient has no actor term
    (the server's view says so, and the shared actor gradient is exactly zero); the critics still
    carry every (s, a), so the batch is recovered as in an actor step."""
    priors, truth, inp = federation_case("pendulum", 8, **{"agent.policy_delay": 2})
    assert inp.loss.actor_coef == 0.0
    actor = [g for name, g in zip(inp.params, inp.gradient) if name.startswith("actor.")]
    assert actor and all(g.abs().max() == 0 for g in actor)
    rec = make_attack("rgia-k").run(inp, seed=0)
    assert rec.extra["states_found"] == 8
    s_err, a_err, r_ok = _errors(truth, rec, priors.codec)
    assert s_err < 1e-4 and a_err < 1e-4 and r_ok == 1.0, (s_err, a_err, r_ok)


def test_a_transition_merged_into_another_takes_the_certified_one():
    """Two identical transitions give one term: seven are certified, and the eighth takes a
    certified transition (the one with the largest TD error), not one of the attacker's own
    prior states."""
    priors, truth, inp = federation_case("pendulum", 8)
    rows = np.r_[0:7, 0]
    batch = Batch(*(torch.as_tensor(np.asarray(getattr(truth, f))[rows]) for f in ("states", "actions", "rewards", "next_states", "dones")))
    merged = replace(inp, gradient=inp.loss.gradient(inp.model, inp.params, inp.target_params, batch))
    rec = make_attack("rgia-k").run(merged, seed=0)
    assert rec.extra["states_found"] == 7
    flat = rec.states.reshape(8, -1)
    for i in rows:  # every transition, the repeated one too, is among the reconstructions
        assert np.abs(flat - truth.states[i].reshape(-1)).max(1).min() < 1e-4, i
    true = truth.states.reshape(8, -1)
    for x in flat:  # ... and the eighth reconstruction is a certified one again
        assert np.abs(true - x).max(1).min() < 1e-4


def test_racetrack_egos_within_a_metre_and_analytic_exact_for_one_transition():
    priors, truth, inp = federation_case("racetrack", 8)
    rec = make_attack("rgia-k").run(inp, seed=0)
    m, _ = score_any(truth, rec, priors.codec)
    assert m["ego_within_1m"] == 1.0 and m["action_abs_err"] < 1e-3, m
    priors, truth, inp = federation_case("racetrack", 1)
    rec = make_attack("analytic").run(inp, seed=0)
    s_err, a_err, _ = _errors(truth, rec, priors.codec)
    assert s_err < 1e-4 and a_err < 1e-4


def test_attacks_that_read_discrete_actions_are_refused_for_td3():
    cfg = apply_overrides(load_scenario("pendulum"), [(["attack", "attacks"], ["idlg"])])
    with pytest.raises(ConfigError, match="rgia-k"):
        check_supported(cfg)
    check_supported(apply_overrides(load_scenario("pendulum"), [(["attack", "attacks"], ["rgia-k", "analytic"])]))
