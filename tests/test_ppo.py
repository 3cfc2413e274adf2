"""Actor-critic: PPO gradients built by hand (not with drivepriv's loss code) and inverted."""

import copy

import numpy as np
import torch
from torch import nn

from drivepriv.agents.dqn import Batch, QNetwork
from drivepriv.agents.ppo import PPOLossSpec
from drivepriv.attacks import AttackInput, Priors, make_attack
from drivepriv.config import RunConfig
from drivepriv.envs import make_codec
from tests.test_codec import real_observations

GAMMA, VF, ENT = 0.99, 0.5, 0.01


def ppo_gradient_by_hand(model: nn.Module, s, a, r, s2, d):
    """A client's PPO gradient, written out: ratio 1, one-step returns, no normalisation."""
    model.zero_grad()
    out = model(s)
    logits, v = out[:, :-1], out[:, -1]
    with torch.no_grad():
        ret = r + GAMMA * (1 - d) * model(s2)[:, -1]
    adv = ret - v.detach()
    logp = torch.log_softmax(logits, -1)
    entropy = -(logp.exp() * logp).sum(-1)
    loss = (-adv * logp[torch.arange(len(a)), a]).mean() + VF * ((v - ret) ** 2).mean() - ENT * entropy.mean()
    loss.backward()
    return tuple(p.grad.detach().clone() for p in model.parameters()), ret


def ppo_case(batch_size: int, seed: int = 0, hidden=(64, 64)):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    pool = real_observations(200, seed=seed + 11)
    idx = rng.choice(len(pool) - 1, batch_size, replace=False)
    s, s2 = torch.as_tensor(pool[idx]), torch.as_tensor(pool[idx + 1])
    a = torch.as_tensor(rng.integers(0, 5, batch_size))
    r = torch.as_tensor(rng.uniform(0.2, 0.9, batch_size).astype(np.float32))
    d = torch.zeros(batch_size)
    model = QNetwork(35, 6, list(hidden))  # 5 logits + value
    grads, ret = ppo_gradient_by_hand(model, s, a, r, s2, d)
    params = {k: v.detach() for k, v in model.named_parameters()}
    spec = PPOLossSpec(gamma=GAMMA, vf_coef=VF, ent_coef=ENT)
    priors = Priors(codec=make_codec(RunConfig().env), prior_states=pool)
    inp = AttackInput(copy.deepcopy(model), params, params, grads, spec, batch_size, (5, 7), 5, priors)
    return inp, (s, a, r, s2, d, ret)


def returns_of(inp: AttackInput, rec) -> torch.Tensor:
    """The reconstruction's one-step returns (what the gradient fixes, whatever s' is)."""
    b = Batch(*(torch.as_tensor(t) for t in (rec.states, rec.action_probs, rec.rewards, rec.next_states, rec.dones)))
    return inp.loss.returns(inp.model, inp.target_params, b)


def test_ppo_loss_spec_matches_the_hand_written_gradient():
    inp, (s, a, r, s2, d, _) = ppo_case(4)
    b = Batch(s, nn.functional.one_hot(a, 5).float(), r, s2, d)
    ours = inp.loss.gradient(inp.model, inp.params, inp.target_params, b)
    for x, y in zip(ours, inp.gradient):
        assert torch.allclose(x, y, atol=1e-6)


def test_analytic_recovers_a_ppo_transition():
    for seed in range(3):
        inp, (s, a, r, s2, d, ret) = ppo_case(1, seed=seed)
        rec = make_attack("analytic").run(inp, seed=0)
        assert np.abs(rec.states - s.numpy()).max() < 1e-4
        assert rec.actions[0] == int(a[0])
        assert torch.allclose(returns_of(inp, rec), ret, atol=1e-3)


def test_idlg_reads_the_ppo_action():
    for seed in range(3):
        inp, (_, a, *_) = ppo_case(1, seed=seed)
        rec = make_attack("idlg", iterations=20, restarts=1).run(inp, seed=0)
        assert rec.actions[0] == int(a[0])


def test_rgia_k_recovers_a_ppo_batch_of_eight():
    inp, (s, a, r, s2, d, ret) = ppo_case(8, seed=0, hidden=(256, 256))
    rec = make_attack("rgia-k", iterations=50, restarts=2).run(inp, seed=0)
    assert rec.extra["states_found"] == 8
    # match each reconstructed transition to the true one with the nearest state
    x = torch.as_tensor(rec.states).reshape(8, -1)
    j = torch.cdist(x, s.reshape(8, -1)).argmin(1)
    assert sorted(j.tolist()) == list(range(8))
    assert (x - s.reshape(8, -1)[j]).abs().max() < 1e-3
    assert (torch.as_tensor(rec.actions) == a[j]).all()
    assert torch.allclose(returns_of(inp, rec), ret[j], atol=1e-2)


def test_engine_attacks_run_on_ppo():
    inp, _ = ppo_case(2)
    for name in ("dlg", "ig", "rgia"):
        rec = make_attack(name, iterations=10, restarts=2).run(inp, seed=0)
        assert rec.states.shape == (2, 5, 7) and np.isfinite(rec.grad_distance)


def test_audit_inverts_a_ppo_gradient():
    from drivepriv.audit import invert_gradients

    model = nn.Sequential(nn.Linear(35, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 6))
    obs = real_observations(2, seed=5)
    s, s2 = torch.as_tensor(obs[:1]).flatten(1), torch.as_tensor(obs[1:]).flatten(1)
    grads, _ = ppo_gradient_by_hand(model, s, torch.tensor([2]), torch.tensor([0.5]), s2, torch.zeros(1))
    rec = invert_gradients(model, grads, scenario="merge", algorithm="ppo", batch_size=1, attack="analytic", ent_coef=ENT)
    assert np.abs(rec.states.reshape(1, -1) - s.numpy()).max() < 1e-4
    assert rec.actions[0] == 2
