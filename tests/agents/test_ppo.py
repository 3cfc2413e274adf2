"""Actor-critic: PPO gradients built by hand (not with drivepriv's loss code) and inverted."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from drivepriv.agents.common import Batch
from drivepriv.agents.dqn import QNetwork
from drivepriv.agents.ppo import PPOLossSpec
from drivepriv.attacks import AttackInput, Priors, make_attack
from drivepriv.config import RunConfig
from drivepriv.envs import make_codec
from tests.attacks.test_attacks import attacker_prior_states
from tests.envs.test_codec import real_observations

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
    priors = Priors(codec=make_codec(RunConfig().env), prior_states=attacker_prior_states(seed))
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


# --- continuous actions (diagonal Gaussian policy with a state-independent log std) ---------

from torch.func import grad, vmap  # noqa: E402

from drivepriv.agents.ppo import ActorCritic, gae_next_advantages, ppo_act  # noqa: E402


def continuous_case(batch_size: int = 5, d: int = 2, seed: int = 0):
    """A continuous actor-critic (35 -> 32 -> 32 -> d + 1) and a random batch (raw actions)."""
    torch.manual_seed(seed)
    model = ActorCritic(35, d, [32, 32], continuous=True, log_std_init=-0.3)
    with torch.no_grad():
        model.log_std.copy_(torch.tensor([-0.3, 0.4][:d]))  # differing per dimension
    g = torch.Generator().manual_seed(seed + 1)
    s, s2 = torch.randn(batch_size, 5, 7, generator=g), torch.randn(batch_size, 5, 7, generator=g)
    a = 1.5 * torch.randn(batch_size, d, generator=g)  # raw: may lie outside [-1, 1]
    r = torch.rand(batch_size, generator=g)
    done = torch.tensor([0.0, 1.0] + [0.0] * (batch_size - 2))
    return model, Batch(s, a, r, s2, done)


def continuous_ppo_gradient_by_hand(model: ActorCritic, b: Batch, old: ActorCritic, lam: float = 0.0, clip: float = 0.2, normalize: bool = False) -> tuple[torch.Tensor, ...]:
    """PPO's clipped-surrogate gradient with plain tensors and torch.distributions as the
    reference: returns and advantages from the old parameters, the GAE tail lam * A_next."""
    model.zero_grad()
    out = model(b.states)
    mu, v = out[:, :-1], out[:, -1]
    with torch.no_grad():
        old_out = old(b.states)
        tail = 0.0 if b.adv_next is None else lam * b.adv_next
        ret = b.rewards + GAMMA * (1 - b.dones) * (old(b.next_states)[:, -1] + tail)
        adv = ret - old_out[:, -1]
        if normalize:
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        old_logp = torch.distributions.Normal(old_out[:, :-1], old.log_std.exp()).log_prob(b.actions).sum(-1)
    dist = torch.distributions.Normal(mu, model.log_std.exp())
    ratio = torch.exp(dist.log_prob(b.actions).sum(-1) - old_logp)
    surrogate = torch.min(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
    loss = -surrogate.mean() + VF * ((v - ret) ** 2).mean() - ENT * dist.entropy().sum(-1).mean()
    loss.backward()
    return tuple(p.grad.detach().clone() for p in model.parameters())


@pytest.mark.parametrize("lam, normalize", [(0.0, False), (0.95, True)])
def test_continuous_ppo_loss_spec_matches_the_hand_written_gradient(lam, normalize):
    model, b = continuous_case(batch_size=8)
    b.adv_next = torch.randn(8, generator=torch.Generator().manual_seed(5))
    old = copy.deepcopy(model)
    with torch.no_grad():
        for p in old.parameters():
            p.add_(0.05 * torch.randn_like(p))  # a later local step: the ratio is not 1, some are clipped
    expected = continuous_ppo_gradient_by_hand(model, b, old, lam=lam, normalize=normalize)
    params = {k: v.detach() for k, v in model.named_parameters()}
    old_params = {k: v.detach() for k, v in old.named_parameters()}
    spec = PPOLossSpec(gamma=GAMMA, vf_coef=VF, ent_coef=ENT, continuous=True, gae_lambda=lam, normalize_advantages=normalize)
    with torch.no_grad():
        ratio = torch.exp(spec.log_prob_and_entropy(params, model(b.states)[:, :-1], b.actions)[0] - spec.log_prob_and_entropy(old_params, old(b.states)[:, :-1], b.actions)[0])
    assert ((ratio - 1).abs() > 0.2).any() and ((ratio - 1).abs() < 0.2).any()  # both branches of the clip
    ours = spec.gradient(model, params, old_params, b)
    assert [k for k in params] == [k for k, _ in model.named_parameters()]
    for name, x, y in zip(params, ours, expected):
        assert torch.allclose(x, y, atol=1e-5), name
    assert ours[list(params).index("log_std")].abs().sum() > 0


def test_gae_tails_match_the_sum_of_discounted_td_errors():
    """A_next from the recursion equals the next transition's advantage written as the sum
    sum_l (gamma lambda)^l delta_{t+1+l} within its episode, cut at a termination."""
    rng = np.random.default_rng(0)
    n, gamma, lam = 12, 0.9, 0.8
    v, v2, r = rng.normal(size=n), rng.normal(size=n), rng.normal(size=n)
    d = np.zeros(n)
    d[4] = 1.0  # terminated: transition 5 starts a new episode
    follows = np.ones(n, dtype=bool)
    follows[[4, 8, n - 1]] = False  # 8: truncated (a new episode starts at 9); n - 1: the segment ends
    got = gae_next_advantages(v, v2, r, d, follows, gamma, lam)
    delta = r + gamma * (1 - d) * v2 - v

    def advantage(t):
        total, scale = 0.0, 1.0
        while True:
            total += scale * delta[t]
            if not follows[t] or d[t]:
                return total
            scale *= gamma * lam
            t += 1

    want = [advantage(t + 1) if follows[t] and not d[t] else 0.0 for t in range(n)]
    assert np.allclose(got, want, atol=1e-6)
    assert got[4] == 0.0 and got[8] == 0.0 and got[n - 1] == 0.0


def test_actor_critic_layout():
    model = ActorCritic(35, 3, [16], continuous=True)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert next(model.net.children()) is linears[0] and linears[0].bias is not None
    assert linears[-1].out_features == 4 and model.n_actions == 3 and model.obs_dim == 35
    assert torch.allclose(model.log_std, torch.full((3,), -0.5))
    assert model(torch.zeros(2, 5, 7)).shape == (2, 4)
    discrete = ActorCritic(35, 5, [16], continuous=False)
    assert not hasattr(discrete, "log_std") and discrete(torch.zeros(2, 35)).shape == (2, 6)
    assert PPOLossSpec(0.9).discrete and not PPOLossSpec(0.9, continuous=True).discrete


def _vmapped_gradient(spec, model, params, b: Batch, restarts: int) -> tuple[torch.Tensor, ...]:
    """The attack engine's batched call: vmap over restarts of grad over the parameters."""
    stacked = [t.detach()[None].repeat(restarts, *[1] * t.dim()) for t in (b.states, b.actions, b.rewards, b.next_states, b.dones)]
    for t in stacked:
        t.requires_grad_(True)
    g = vmap(lambda *bb: tuple(grad(lambda p: spec(model, p, params, Batch(*bb)))(params).values()))(*stacked)
    # the attacker differentiates a gradient distance w.r.t. the dummy batch
    sum(x.pow(2).sum() for x in g).backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in stacked[:3])
    return g


def test_vmap_grad_runs_on_both_ppo_specs():
    model, b = continuous_case()
    params = {k: v.detach() for k, v in model.named_parameters()}
    spec = PPOLossSpec(gamma=GAMMA, vf_coef=VF, ent_coef=ENT, continuous=True)
    g = _vmapped_gradient(spec, model, params, b, restarts=3)
    for x, y in zip(g, spec.gradient(model, params, params, b)):
        assert x.shape[0] == 3 and torch.allclose(x[1], y, atol=1e-6)

    discrete = ActorCritic(35, 5, [32], continuous=False)
    db = Batch(b.states, nn.functional.one_hot(torch.arange(5) % 5, 5).float(), b.rewards, b.next_states, b.dones)
    dparams = {k: v.detach() for k, v in discrete.named_parameters()}
    dspec = PPOLossSpec(gamma=GAMMA, vf_coef=VF, ent_coef=ENT)
    g = _vmapped_gradient(dspec, discrete, dparams, db, restarts=2)
    for x, y in zip(g, dspec.gradient(discrete, dparams, dparams, db)):
        assert torch.allclose(x[0], y, atol=1e-6)


def test_ppo_act_is_reproducible():
    model, b = continuous_case(d=2)
    obs = b.states[0].numpy()
    draws = [[ppo_act(model, obs, np.random.default_rng(7), continuous=True) for _ in range(2)] for _ in range(2)]
    assert np.array_equal(draws[0][0], draws[1][0]) and draws[0][0].shape == (2,) and draws[0][0].dtype == np.float32
    rng = np.random.default_rng(3)
    many = np.stack([ppo_act(model, obs, rng, continuous=True) for _ in range(400)])
    with torch.no_grad():
        mean = model(b.states[:1])[0, :-1].numpy()
    assert np.abs(many.mean(0) - mean).max() < 0.25  # centred on the mean ...
    assert np.abs(many.std(0) - model.log_std.exp().detach().numpy()).max() < 0.2  # ... with exp(log_std)
    discrete = ActorCritic(35, 5, [16], continuous=False)
    seq = [[ppo_act(discrete, obs, rng_, continuous=False) for _ in range(10)] for rng_ in (np.random.default_rng(1), np.random.default_rng(1))]
    assert seq[0] == seq[1] and all(isinstance(x, int) and 0 <= x < 5 for x in seq[0])
