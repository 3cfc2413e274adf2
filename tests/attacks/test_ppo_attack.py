"""Exact attacks on PPO as clients run it (issue 16): GAE returns, tanh actor-critics, discrete
and continuous actions.

Real federations; the attacker's priors come from its own rollouts (seeds disjoint from the
clients'). On drivepriv's tanh actor-critic the row-space search, polished in double precision,
gives the states; the per-sample output gradients then give each return, advantage and action,
and consecutive transitions of the rollout link (s'_i is the next one's state, and GAE's tail
its advantage), which makes their rewards exact.
"""

from __future__ import annotations

import numpy as np
import torch

from drivepriv.attacks import make_attack
from drivepriv.attacks.ppo import link
from drivepriv.pipeline import score_any
from tests.attacks.cases import federation_case


def _case(name: str, **settings):
    """PPO clients, 3 rounds of 16-step rollouts, B = 8 (``settings`` override)."""
    settings = {"agent.algorithm": "ppo", "federation.env_steps_per_round": 16, **settings}
    priors, truth, inp = federation_case(name, settings.pop("federation.batch_size", 8), rounds=3, **settings)
    return inp, truth, priors


def test_rgia_k_recovers_a_gae_ppo_batch_and_links_consecutive_transitions():
    """Merge, PPO with GAE(0.95), a rollout of 16 steps per round, B = 8: every state certified
    (Gauss-Newton from uniform starts in the observation box), the two transitions whose
    successor is in the batch linked to it, and their rewards exact."""
    inp, truth, priors = _case("merge", **{"agent.gae_lambda": 0.95})
    assert inp.loss.gae_lambda == 0.95 and not inp.continuous
    rec = make_attack("rgia-k", iterations=50, restarts=2).run(inp, seed=0)
    assert rec.extra["states_found"] == 8
    m, perm = score_any(truth, rec, priors.codec)
    assert m["ego_within_1m"] == 1.0 and m["ego_pos_err_m"] < 0.01
    assert (rec.actions[perm] == truth.actions).all()
    # a transition linked to a successor in the batch: s' is that successor's state, and r exact
    states, next_states = rec.states[perm].reshape(8, -1), rec.next_states[perm].reshape(8, -1)
    successor = link(torch.as_tensor(next_states), torch.as_tensor(states)).numpy()
    linked = successor >= 0
    assert linked.sum() == rec.extra["successors_linked"] == 2  # the batch holds two true pairs
    o = truth.origins
    for i in np.flatnonzero(linked):
        j = successor[i]
        assert o[j][0] == o[i][0] and o[j][1] == o[i][1] + 1  # truly the next step of the same episode
    assert np.abs(rec.rewards[perm] - truth.rewards)[linked].max() < 1e-2


def test_continuous_ppo_actions_come_back_raw():
    """Pendulum, PPO with its Gaussian policy (raw actions: PPO stores the draw before the
    environment clips it): analytic on a batch of one gives the state and the action."""
    inp, truth, priors = _case("pendulum", **{"federation.batch_size": 1})
    assert inp.continuous
    rec = make_attack("analytic").run(inp, seed=0)
    assert np.abs(rec.states.reshape(1, -1) - truth.states.reshape(1, -1)).max() < 1e-4
    assert np.abs(rec.actions - truth.actions).max() < 1e-3
