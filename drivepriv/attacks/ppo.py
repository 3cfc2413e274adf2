"""PPO's update in closed form, once the states are known (issue 16).

For sample i of a minibatch of B (see :class:`~drivepriv.agents.ppo.PPOLossSpec`; on an update's
first local step the ratio is 1 and nothing is clipped), the per-sample gradients of the
network's outputs are

- the value's: ``2 vf_coef (V(s_i) - R_i) / B``, which gives the return R_i, hence the advantage
  A_i = R_i - V_old(s_i) (normalised over the minibatch where the client normalises);
- discrete actions, the logits': ``-(A_i / B) (e_a - pi_i) - (ent_coef / B) dH/dz``: the action is
  the a whose ``e_a - pi_i`` explains it (one component against all others);
- continuous actions, the Gaussian mean's: ``-(A_i / B) (a_i - mu_i) / sigma^2`` (the entropy
  does not depend on the mean), hence the raw action ``a_i = mu_i - B sigma^2 g_i / A_i``.

The return ties the rest: R_i = r_i + gamma (1 - d_i) (V_old(s'_i) + lambda A_{i+1}). The
transitions of one rollout are linked: where the transition that follows i is in the batch
(its state is where the transition prior puts s'_i, feature by feature, and no other state is), s'_i is its state
and A_{i+1} its advantage, so r_i is exact; elsewhere s'_i comes from the transition prior and,
for lambda > 0, r_i from the reward prior (the return alone cannot tell r_i from lambda A_{i+1}).
Nothing here reads the truth.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call

from drivepriv.agents.common import Batch
from drivepriv.agents.ppo import PPOLossSpec
from drivepriv.attacks.base import AttackInput, Reconstruction, closed_form_reconstruction

#: A successor is linked where the prior's s'_i agrees with its state within this (normalised
#: units) in at least this share of the features that vary across the batch (see :func:`link`).
LINK_TOLERANCE = 1e-3
LINK_SHARE = 0.6
#: ... and no other state of the batch within this much of that share.
LINK_MARGIN = 0.25


def is_ppo(inp: AttackInput) -> bool:
    return isinstance(inp.loss, PPOLossSpec)


def complete(inp: AttackInput, x: Tensor, out: Tensor, coef: Tensor, name: str) -> Reconstruction:
    """The reconstruction from the states ``x`` (n, *obs_shape), the network's outputs at them
    ``out`` (n, O) and the per-sample output gradients ``coef`` (n, O) (see the module docstring)."""
    spec: PPOLossSpec = inp.loss
    B, n = inp.batch_size, len(x)
    with torch.no_grad():
        old_value = functional_call(inp.model, inp.target_params, (x,))[:, -1].double()
    returns = out[:, -1].double() - coef[:, -1] * B / (2.0 * spec.vf_coef)
    adv = returns - old_value
    if inp.continuous:
        actions = continuous_actions(inp, out, coef, spec.advantages(adv, torch.zeros_like(adv)))
    else:
        actions = nn.functional.one_hot(discrete_actions(inp, out, coef), inp.n_actions).float()
    dones = torch.zeros(n)
    dyn = inp.priors.physics or inp.priors.dynamics
    with torch.no_grad():
        predicted = dyn(x, actions) if dyn is not None else x.clone()
    successor = link(predicted, x)
    linked = successor >= 0
    j = successor.clamp(min=0)
    next_states = torch.where(linked.view(-1, *[1] * (x.dim() - 1)), x[j], predicted)
    adv_next = torch.where(linked, adv[j], torch.zeros_like(adv)).float()
    with torch.no_grad():
        v_next = functional_call(inp.model, inp.target_params, (next_states,))[:, -1].double()
        rewards = (returns - spec.gamma * (1.0 - dones.double()) * (v_next + spec.gae_lambda * adv_next.double())).float()
        if spec.gae_lambda > 0 and inp.priors.reward is not None and not bool(linked.all()):
            prior_r = inp.priors.reward(x, actions, next_states, dones).float()
            rewards = torch.where(linked, rewards, prior_r)
    rec = closed_form_reconstruction(inp, Batch(x, actions, rewards, next_states, dones, adv_next), name)
    rec.extra["successors_linked"] = float(linked.sum())
    return rec


def discrete_actions(inp: AttackInput, out: Tensor, coef: Tensor) -> Tensor:
    """(n,) action indices from the logits' per-sample gradients: the a whose ``e_a - pi_i``
    best explains ``-(A_i / B)(e_a - pi_i)`` once the entropy's known term is removed."""
    A = inp.n_actions
    logits = out[:, :A].double().detach().requires_grad_(True)
    logp = torch.log_softmax(logits, -1)
    ent = -(logp.exp() * logp).sum(-1).sum()
    dh = torch.autograd.grad(ent, logits)[0]
    pi = logp.exp().detach()
    g = coef[:, :A] + (inp.loss.ent_coef / inp.batch_size) * dh  # = -(A_i/B)(e_a - pi_i)
    u = torch.eye(A, dtype=pi.dtype)[None] - pi[:, None, :]  # (n, A candidates, A)
    alpha = (u * g[:, None, :]).sum(-1) / (u * u).sum(-1)  # (n, A)
    resid = ((g[:, None, :] - alpha[..., None] * u) ** 2).sum(-1)
    return resid.argmin(-1)


def continuous_actions(inp: AttackInput, out: Tensor, coef: Tensor, adv: Tensor) -> Tensor:
    """(n, d) raw actions from the Gaussian mean's per-sample gradients and the advantages the
    policy term weighs them with; the mean itself where an advantage is 0 (no information)."""
    d = inp.n_actions
    mu = out[:, :d].double()
    var = torch.exp(2.0 * inp.params["log_std"].double())
    safe = torch.where(adv.abs() > 1e-12, adv, torch.ones_like(adv))
    a = mu - inp.batch_size * var * coef[:, :d] / safe[:, None]
    return torch.where((adv.abs() > 1e-12)[:, None], a, mu).float()


def link(predicted: Tensor, states: Tensor) -> Tensor:
    """For each transition, the index of the state in the batch that follows it (-1: none).

    A state follows transition i where it agrees with the prior's next state of i, within
    :data:`LINK_TOLERANCE`, in at least :data:`LINK_SHARE` of the features that vary across the
    batch, and no other state comes within :data:`LINK_MARGIN` of that share; a state follows one
    transition at most (the best match first). Feature by feature, not in norm: a transition
    prior predicts most of the observation well and a few features not at all (highway-env: a
    vehicle that enters the ego's view, or one whose rank by distance changes)."""
    n = len(states)
    best = torch.full((n,), -1, dtype=torch.long)
    if n < 2:
        return best
    p, s = predicted.reshape(n, -1).double(), states.reshape(n, -1).double()
    varying = s.std(0) > 1e-6
    if not bool(varying.any()):
        return best
    close = (p[:, None, varying] - s[None, :, varying]).abs() <= LINK_TOLERANCE
    share = close.double().mean(-1)  # (n predecessors, n candidates)
    share.fill_diagonal_(0.0)
    two = share.topk(2, dim=1)
    first, second = two.values[:, 0], two.values[:, 1]
    ok = (first >= LINK_SHARE) & (first - second >= LINK_MARGIN)
    for i in torch.argsort(-first, stable=True).tolist():
        j = int(two.indices[i, 0])
        if ok[i] and not bool((best == j).any()):
            best[i] = j
    return best


__all__ = ["complete", "continuous_actions", "discrete_actions", "is_ppo", "link"]
