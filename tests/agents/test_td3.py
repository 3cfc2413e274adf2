"""TD3's shared gradient: checked against an independent implementation, split by network,
batched over restarts, and differentiable in the attacker's unknowns."""

import copy

import numpy as np
import torch
from torch import nn
from torch.func import grad, vmap

from drivepriv.agents.common import Batch, at_step
from drivepriv.agents.dqn import DQNLossSpec
from drivepriv.agents.td3 import TD3LossSpec, TD3Net, td3_act

GAMMA, D = 0.95, 2


def td3_case(batch_size: int = 6, seed: int = 0):
    torch.manual_seed(seed)
    model = TD3Net(35, D, [32, 32])
    target = copy.deepcopy(model)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(seed + 1)
    s, s2 = torch.randn(batch_size, 5, 7, generator=g), torch.randn(batch_size, 5, 7, generator=g)
    a = torch.rand(batch_size, D, generator=g) * 2 - 1
    r = torch.rand(batch_size, generator=g)
    done = torch.tensor([0.0, 1.0] + [0.0] * (batch_size - 2))
    params = {k: v.detach() for k, v in model.named_parameters()}
    target_params = {k: v.detach() for k, v in target.named_parameters()}
    return model, params, target_params, Batch(s, a, r, s2, done)


def td3_gradient_by_hand(model: TD3Net, target: dict[str, torch.Tensor], b: Batch, policy_coef: float) -> dict[str, torch.Tensor]:
    """One TD3 step written out with separate modules, as a client with two optimisers does it."""

    def copy_of(m: nn.Module, prefix: str, source: dict[str, torch.Tensor]) -> nn.Module:
        m = copy.deepcopy(m)
        m.load_state_dict({k[len(prefix) + 1 :]: v for k, v in source.items() if k.startswith(prefix + ".")})
        return m

    live = {k: v.detach() for k, v in model.named_parameters()}
    actor, q1, q2 = (copy_of(getattr(model, n), n, live) for n in ("actor", "q1", "q2"))
    actor_t, q1_t, q2_t = (copy_of(getattr(model, n), n, target) for n in ("actor", "q1", "q2"))
    s, s2 = b.states.flatten(1), b.next_states.flatten(1)
    with torch.no_grad():
        a2 = actor_t(s2)
        y = b.rewards + GAMMA * (1 - b.dones) * torch.min(q1_t(torch.cat([s2, a2], 1)), q2_t(torch.cat([s2, a2], 1)))[:, 0]
    sa = torch.cat([s, b.actions], 1)
    critic_loss = ((q1(sa)[:, 0] - y) ** 2).mean() + ((q2(sa)[:, 0] - y) ** 2).mean()
    critic_loss.backward()
    actor_loss = -q1(torch.cat([s, actor(s)], 1)).mean()
    actor_grads = torch.autograd.grad(policy_coef * actor_loss, list(actor.parameters()))
    out = {f"q1.{k}": p.grad for k, p in q1.named_parameters()} | {f"q2.{k}": p.grad for k, p in q2.named_parameters()}
    return out | {f"actor.{k}": g for (k, _), g in zip(actor.named_parameters(), actor_grads)}


def test_td3_loss_spec_matches_an_independent_implementation():
    model, params, target_params, b = td3_case()
    for coef in (1.0, 0.3):
        expected = td3_gradient_by_hand(model, target_params, b, coef)
        ours = TD3LossSpec(gamma=GAMMA, policy_coef=coef).gradient(model, params, target_params, b)
        assert len(ours) == len(expected) == len(params)
        for name, g in zip(params, ours):
            assert torch.allclose(g, expected[name], atol=1e-6), name


def test_each_term_reaches_only_its_own_network():
    model, params, target_params, b = td3_case()
    spec = TD3LossSpec(gamma=GAMMA)
    critic = grad(lambda p: spec.critic_loss(model, p, target_params, b))(params)
    actor = grad(lambda p: spec.actor_loss(model, p, b))(params)
    full = dict(zip(params, spec.gradient(model, params, target_params, b)))
    for name in params:
        if name.startswith("actor."):
            assert critic[name].abs().max() == 0 and actor[name].abs().max() > 0, name
        else:
            assert actor[name].abs().max() == 0 and critic[name].abs().max() > 0, name
        assert torch.allclose(full[name], critic[name] + actor[name], atol=1e-7)
    # policy_coef=0 is a critic-only step (TD3's delayed policy update)
    critic_only = TD3LossSpec(gamma=GAMMA, policy_coef=0.0).gradient(model, params, target_params, b)
    assert all(g.abs().max() == 0 for n, g in zip(params, critic_only) if n.startswith("actor."))


def test_delayed_actor_updates_leave_the_steps_between_critic_only():
    """With TD3's delay of 2, steps 0, 2, 4, ... are critic-only and steps 1, 3, ... carry the
    actor's term (the paper's counter); the critics' gradient is the same in every step."""
    model, params, target_params, b = td3_case()
    full = TD3LossSpec(gamma=GAMMA).gradient(model, params, target_params, b)
    spec = TD3LossSpec(gamma=GAMMA, policy_delay=2)
    assert [spec.at_step(k).actor_coef for k in range(5)] == [0.0, 1.0, 0.0, 1.0, 0.0]
    assert at_step(spec, 3) == spec.at_step(3) and spec.at_step(3).at_step(1).iteration == 4
    critic_only = dict(zip(params, spec.gradient(model, params, target_params, b)))
    expected = td3_gradient_by_hand(model, target_params, b, 1.0)
    for name, g in zip(params, full):
        assert torch.equal(dict(zip(params, spec.at_step(1).gradient(model, params, target_params, b)))[name], g), name
        if name.startswith("actor."):
            assert critic_only[name].abs().max() == 0 and g.abs().max() > 0, name
        else:
            assert torch.equal(critic_only[name], g) and torch.allclose(g, expected[name], atol=1e-6), name
    dqn = DQNLossSpec(gamma=GAMMA)
    assert at_step(dqn, 7) is dqn  # every other loss is the same at every step


def test_td3_vmap_grad_over_restarts():
    model, params, target_params, b = td3_case(batch_size=3)
    spec = TD3LossSpec(gamma=GAMMA)
    R = 4
    stacked = [t[None].repeat(R, *[1] * t.dim()) + 0.01 * k for k, t in enumerate((b.states, b.actions, b.rewards, b.next_states, b.dones))]
    stacked = [t.detach().requires_grad_(True) for t in stacked]
    g = vmap(lambda *bb: tuple(grad(lambda p: spec(model, p, target_params, Batch(*bb)))(params).values()))(*stacked)
    one = spec.gradient(model, params, target_params, Batch(*(t[2].detach() for t in stacked)))
    for x, y in zip(g, one):
        assert x.shape == (R, *y.shape) and torch.allclose(x[2], y, atol=1e-6)
    sum(x.pow(2).sum() for x in g).backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in stacked)


def test_the_gradient_depends_on_rewards_next_states_and_dones():
    """The attacker optimises r, s' and done: the shared gradient must be differentiable in them."""
    model, params, target_params, b = td3_case()
    unknowns = [b.rewards.clone().requires_grad_(True), b.next_states.clone().requires_grad_(True), b.dones.clone().requires_grad_(True)]
    dummy = Batch(b.states, b.actions, unknowns[0], unknowns[1], unknowns[2])
    g = TD3LossSpec(gamma=GAMMA).gradient(model, params, target_params, dummy, create_graph=True)
    dr, ds2, dd = torch.autograd.grad(sum(x.pow(2).sum() for x in g), unknowns)
    assert dr.abs().min() > 0 and ds2.abs().sum() > 0 and dd.abs().sum() > 0


def test_td3_net_layout_and_action():
    model = TD3Net(35, D, [16])
    first = next(m for m in model.modules() if isinstance(m, nn.Linear))
    assert first is model.actor[0][0] and first.in_features == 35 and first.bias is not None
    assert model.obs_dim == 35 and model.n_actions == D and not TD3LossSpec(GAMMA).discrete
    pi, q1, q2 = model(torch.randn(4, 5, 7))
    assert pi.shape == (4, D) and q1.shape == q2.shape == (4,) and pi.abs().max() <= 1
    with torch.no_grad():
        model.actor[0][-1].bias.fill_(3.0)  # saturate pi near 1 so the noise pushes past the box
    obs = np.random.default_rng(0).standard_normal((5, 7)).astype(np.float32)
    acts = np.stack([td3_act(model, obs, np.random.default_rng(i), noise_std=0.5) for i in range(200)])
    assert acts.shape == (200, D) and acts.dtype == np.float32
    assert acts.min() >= -1 and acts.max() <= 1 and (acts == 1).any() and (acts < 1).any()
    assert np.array_equal(td3_act(model, obs, np.random.default_rng(9), 0.2), td3_act(model, obs, np.random.default_rng(9), 0.2))
