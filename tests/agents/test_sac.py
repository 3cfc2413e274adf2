"""SAC (issue 16 item 2): the LossSpec against a hand-written implementation, the client's
private noise kept from the server, and the exact attack on its critics."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import torch
from torch import nn

from drivepriv.agents.common import Batch
from drivepriv.agents.sac import SACLossSpec, SACNet


def hand_written_sac_gradient(net: nn.Module, target: nn.Module, batch: Batch, gamma: float, alpha: float, eps_next, eps) -> list:
    """SAC's update written out with torch.distributions, on copies of ``net``'s ``actor``,
    ``q1`` and ``q2`` (any modules: a user's own too); gradients in actor, q1, q2 order."""
    actor, q1, q2 = (copy.deepcopy(m) for m in (net.actor, net.q1, net.q2))
    s, a = batch.states.flatten(1), batch.actions
    s2 = batch.next_states.flatten(1)

    def policy(x, e):
        mu, log_std = actor(x).chunk(2, -1)
        std = log_std.clamp(-20, 2).exp()
        u = mu + std * e
        logp = torch.distributions.Normal(mu, std).log_prob(u).sum(-1) - torch.log(1 - torch.tanh(u) ** 2).sum(-1)
        return torch.tanh(u), logp

    with torch.no_grad():
        a2, logp2 = policy(s2, eps_next)
        sa2 = torch.cat([s2, a2], 1)
        v2 = torch.minimum(target.q1(sa2), target.q2(sa2))[:, 0] - alpha * logp2
        y = batch.rewards + gamma * (1 - batch.dones) * v2
    sa = torch.cat([s, a], 1)
    critic_loss = nn.functional.mse_loss(q1(sa)[:, 0], y) + nn.functional.mse_loss(q2(sa)[:, 0], y)
    critic_grads = torch.autograd.grad(critic_loss, list(q1.parameters()) + list(q2.parameters()))
    a_pi, logp = policy(s, eps)
    sa_pi = torch.cat([s, a_pi], 1)
    for p in list(q1.parameters()) + list(q2.parameters()):
        p.requires_grad_(False)
    actor_loss = (alpha * logp - torch.minimum(q1(sa_pi), q2(sa_pi))[:, 0]).mean()
    actor_grads = torch.autograd.grad(actor_loss, list(actor.parameters()))
    return list(actor_grads) + list(critic_grads)


def test_sac_loss_spec_matches_a_hand_written_sac():
    torch.manual_seed(0)
    net, target = SACNet(6, 2, [16, 16]), SACNet(6, 2, [16, 16])
    B = 5
    batch = Batch(torch.randn(B, 2, 3), torch.rand(B, 2) * 2 - 1, torch.randn(B), torch.randn(B, 2, 3), torch.tensor([0.0, 0, 1, 0, 0]))
    spec = SACLossSpec(gamma=0.97, alpha=0.3, noise_seed=11)
    eps_next, eps = spec.noise(batch)
    assert eps is not None and eps_next.shape == (B, 2) and not torch.equal(eps, eps_next)
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    target_params = {k: v.detach().clone() for k, v in target.named_parameters()}
    ours = spec.gradient(net, params, target_params, batch)
    theirs = hand_written_sac_gradient(net, target, batch, 0.97, 0.3, eps_next, eps)
    assert len(ours) == len(theirs) == len(params)
    for (k, _), g, h in zip(net.named_parameters(), ours, theirs):
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-6, msg=k)
    # the server's spec has no noise: the policy's mean, a different (but deterministic) loss
    server = dataclasses.replace(spec, noise_seed=None)
    assert server.noise(batch) == (None, None)
    g0 = server.gradient(net, params, target_params, batch)
    assert not torch.allclose(g0[0], ours[0]) and torch.equal(g0[-1], server.gradient(net, params, target_params, batch)[-1])


def test_sac_federation_client_noise_stays_with_the_client_and_rgia_k_recovers_the_batch():
    from drivepriv.attacks import make_attack
    from drivepriv.config import apply_overrides
    from drivepriv.federation.inprocess import resolve_attacked
    from drivepriv.federation.run import run_federation
    from drivepriv.pipeline import attack_input, build_priors, score_any
    from drivepriv.scenarios import load_scenario

    small = {"agent.algorithm": "sac", "federation.clients": 1, "federation.rounds": 2, "federation.batch_size": 8,
             "federation.warmup_steps": 60, "attack.rounds": [-1], "attack.dynamics.rollout_steps": 200}
    cfg = apply_overrides(load_scenario("pendulum"), [(k.split("."), v) for k, v in small.items()])
    priors, _, _ = build_priors(cfg, progress=False)
    fed = run_federation(cfg, resolve_attacked(cfg), progress=False)
    view = fed.views[-1]
    assert isinstance(view.loss, SACLossSpec) and view.loss.noise_seed is None  # the server never sees the client's draws
    truth = fed.truths[(view.round, view.client)]
    inp = attack_input(fed.model, view, priors, tuple(priors.codec.obs_shape), fed.model.n_actions)
    rec = make_attack("rgia-k").run(inp, seed=0)
    assert rec.extra["states_found"] == 8
    m, perm = score_any(truth, rec, priors.codec)
    assert m["state_rmse"] < 1e-4 and m["action_abs_err"] < 1e-4, m
    assert np.all(np.abs(rec.actions) <= 1.0)
