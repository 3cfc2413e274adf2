"""PPO's loss on the minibatch a client shares the gradient of (Schulman et al., 2017,
"Proximal Policy Optimization Algorithms"), for discrete and continuous actions.

The network is one MLP whose last layer outputs the policy head then the state value:
- discrete actions: A action logits, then the value (A + 1 outputs);
- continuous actions: the mean of a diagonal Gaussian over the d action dimensions, then the
  value (d + 1 outputs), with a state-independent log standard deviation ``log_std`` (d,)
  stored as a parameter of the network (the usual PPO parametrisation, e.g. stable-baselines3
  and cleanrl's ``ppo_continuous_action``).

The client trains with :class:`PPOLossSpec` and the attacker differentiates the same function
(DESIGN.md section 4). The loss is written to run inside ``torch.func.vmap(torch.func.grad(...))``
over the attacker's restarts: no in-place ops, no ``.item()``, no data-dependent control flow,
and the Gaussian log-density written out by hand (no ``torch.distributions``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from drivepriv.agents.common import Batch
from drivepriv.agents.nets import mlp

_LOG_2PI = math.log(2.0 * math.pi)


class ActorCritic(nn.Module):
    """PPO's actor-critic: one MLP (tanh hidden units) on the flattened observation.

    The first module is ``nn.Linear`` with bias and the last ``nn.Linear`` gives all the
    outputs (``n_actions`` policy outputs, then the value): the attacker's closed-form attacks
    read the state from the first layer and the per-sample output gradients from the last.
    With ``continuous=True`` the network also holds ``log_std`` (``n_actions``,), the
    state-independent log standard deviation of the Gaussian policy.
    """

    def __init__(self, obs_dim: int, n_actions: int, hidden_sizes: list[int], continuous: bool, log_std_init: float = -0.5) -> None:
        super().__init__()
        self.net = mlp(obs_dim, hidden_sizes, n_actions + 1, activation=nn.Tanh)
        if continuous:
            self.log_std = nn.Parameter(torch.full((n_actions,), float(log_std_init)))
        self.obs_dim = obs_dim
        self.n_actions = n_actions
        self.continuous = continuous

    def forward(self, obs: Tensor) -> Tensor:
        """(B, n_actions + 1): the policy outputs (logits or Gaussian mean), then the value."""
        return self.net(obs.reshape(obs.shape[0], -1))


def gaussian_log_prob(actions: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    """log N(actions; mean, diag(exp(log_std))^2), summed over the last (action) dimension."""
    z = (actions - mean) * torch.exp(-log_std)
    return (-0.5 * z**2 - log_std - 0.5 * _LOG_2PI).sum(-1)


def gaussian_entropy(log_std: Tensor) -> Tensor:
    """Entropy of a diagonal Gaussian: sum over d of log_std + (1 + log 2 pi) / 2."""
    return (log_std + 0.5 * (1.0 + _LOG_2PI)).sum(-1)


@dataclass(frozen=True)
class PPOLossSpec:
    """PPO's loss on one minibatch of a local update, exactly as a client runs it: the mean over
    the minibatch of

        -min(ratio_i A_i, clip(ratio_i, 1 - clip_range, 1 + clip_range) A_i)
          + vf_coef * (V(s_i) - R_i)^2 - ent_coef * H(pi(.|s_i))

    where ``params`` are the parameters being trained and ``target_params`` the round's
    parameters theta_old, with which the client collected its rollout and computed, once, its
    returns and advantages (both detached):

    - ratio_i = pi(a_i|s_i) / pi_old(a_i|s_i) (1 in value on an update's first local step);
    - the GAE return (Schulman et al., 2016, "High-dimensional continuous control using
      generalized advantage estimation") R_i = r_i + gamma (1 - done_i) (V_old(s'_i) + lambda
      A_next_i), where A_next_i is the advantage of the transition that follows i in the client's
      rollout (``batch.adv_next``; 0 where the episode or the rollout ends, and for lambda = 0:
      the one-step return);
    - the advantage A_i = R_i - V_old(s_i), normalised over the minibatch (zero mean, unit
      standard deviation) with ``normalize_advantages``.

    One update runs ``epochs`` passes over the rollout in minibatches (see
    :class:`~drivepriv.agents.algorithms.PPO`); the server prescribes all of these.

    ``continuous=False``: pi is the softmax of the logits and ``batch.actions`` (B, A) holds
    action probabilities (one-hot for real data). ``continuous=True``: pi is the diagonal
    Gaussian N(mean(s), exp(log_std)^2) with ``log_std`` taken from ``params["log_std"]``, and
    ``batch.actions`` (B, d) holds the sampled actions, raw (before the environment clips them
    to [-1, 1]), as PPO stores them.

    Returns and advantages are unknowns of the attacker, tied to the reward, the next state and
    (lambda > 0) the next transition's advantage by this definition: consecutive transitions of
    a rollout are linked through s'_i = s_{i+1} and A_next_i = A_{i+1}.
    """

    gamma: float
    vf_coef: float = 0.5
    ent_coef: float = 0.0
    continuous: bool = False
    gae_lambda: float = 0.0
    clip_range: float = 0.2
    normalize_advantages: bool = False
    #: Passes over the round's rollout in one FedAvg update (the minibatches per pass: the local
    #: steps over ``epochs``).
    epochs: int = 1
    name: str = "ppo"

    @property
    def discrete(self) -> bool:
        """Whether the actions are discrete (``batch.actions`` is a probability vector)."""
        return not self.continuous

    def heads(self, model: nn.Module, params: dict[str, Tensor], states: Tensor) -> tuple[Tensor, Tensor]:
        """(policy outputs (.., A) -- logits, or the Gaussian mean --, value (..,)) of the actor-critic."""
        out = functional_call(model, params, (states,))
        return out[..., :-1], out[..., -1]

    def returns(self, model: nn.Module, target_params: dict[str, Tensor], batch: Batch) -> Tensor:
        """GAE returns r + gamma (1 - done) (V_old(s') + lambda A_next), detached from the parameters
        (one-step returns where ``batch.adv_next`` is None or lambda is 0)."""
        target = {k: v.detach() for k, v in target_params.items()}
        _, v_next = self.heads(model, target, batch.next_states)
        if batch.adv_next is not None and self.gae_lambda > 0:
            v_next = v_next + self.gae_lambda * batch.adv_next
        return batch.rewards + self.gamma * (1.0 - batch.dones) * v_next

    def advantages(self, returns: Tensor, old_value: Tensor) -> Tensor:
        """A = R - V_old(s), normalised over the minibatch with ``normalize_advantages``."""
        adv = returns - old_value
        if self.normalize_advantages and adv.shape[-1] > 1:
            adv = (adv - adv.mean(-1, keepdim=True)) / (adv.std(-1, keepdim=True) + 1e-8)
        return adv

    def log_prob_and_entropy(self, params: dict[str, Tensor], policy_out: Tensor, actions: Tensor) -> tuple[Tensor, Tensor]:
        """(log pi(a_i|s_i) (B,), entropy H(pi(.|s_i)) (B,)) from the policy head's outputs."""
        if self.continuous:
            log_std = params["log_std"]
            logp_a = gaussian_log_prob(actions, policy_out, log_std)
            entropy = gaussian_entropy(log_std).expand_as(logp_a)  # state-independent
            return logp_a, entropy
        logp = torch.log_softmax(policy_out, -1)
        return (logp * actions).sum(-1), -(logp.exp() * logp).sum(-1)

    def __call__(self, model: nn.Module, params: dict[str, Tensor], target_params: dict[str, Tensor], batch: Batch) -> Tensor:
        policy_out, value = self.heads(model, params, batch.states)
        old = {k: v.detach() for k, v in target_params.items()}
        old_out, old_value = self.heads(model, old, batch.states)
        ret = self.returns(model, target_params, batch)
        # detached from theta (the attacker's unknowns r, s', done stay in the graph)
        adv = self.advantages(ret, old_value)
        logp_a, entropy = self.log_prob_and_entropy(params, policy_out, batch.actions)
        old_logp_a, _ = self.log_prob_and_entropy(old, old_out, batch.actions)
        ratio = torch.exp(logp_a - old_logp_a.detach())
        clipped = torch.clamp(ratio, 1.0 - self.clip_range, 1.0 + self.clip_range)
        policy = -torch.minimum(ratio * adv, clipped * adv).mean()
        value_loss = ((value - ret) ** 2).mean()
        return policy + self.vf_coef * value_loss - self.ent_coef * entropy.mean()

    def gradient(self, model: nn.Module, params: dict[str, Tensor], target_params: dict[str, Tensor], batch: Batch, create_graph: bool = False) -> tuple[Tensor, ...]:
        """Gradient of the loss w.r.t. ``params`` (in ``params`` order)."""
        params = {k: v if v.requires_grad else v.detach().requires_grad_(True) for k, v in params.items()}
        loss = self(model, params, target_params, batch)
        return torch.autograd.grad(loss, tuple(params.values()), create_graph=create_graph)


def gae_next_advantages(values: np.ndarray, next_values: np.ndarray, rewards: np.ndarray, dones: np.ndarray, follows: np.ndarray, gamma: float, lam: float) -> np.ndarray:
    """For a rollout segment in time order, each transition's A_next: the GAE advantage of the
    transition after it (0 where ``follows[t]`` is False: the episode ended, or the segment).

    ``values``, ``next_values``: V_old(s_t), V_old(s'_t); ``follows[t]``: transition t + 1
    continues transition t's episode. The recursion (Schulman et al., 2016):
    delta_t = r_t + gamma (1 - d_t) V(s'_t) - V(s_t), A_t = delta_t + gamma lambda (1 - d_t) A_{t+1}.
    """
    n = len(rewards)
    adv = np.zeros(n + 1, dtype=np.float64)
    nxt = np.zeros(n, dtype=np.float64)
    for t in range(n - 1, -1, -1):
        nxt[t] = adv[t + 1] if (follows[t] and not dones[t]) else 0.0
        delta = rewards[t] + gamma * (1.0 - dones[t]) * next_values[t] - values[t]
        adv[t] = delta + gamma * lam * (1.0 - dones[t]) * nxt[t]
    return nxt.astype(np.float32)


def ppo_act(model: nn.Module, obs: np.ndarray, rng: np.random.Generator, continuous: bool) -> int | np.ndarray:
    """Sample an action from the current policy with the client's numpy generator.

    Discrete: an action index drawn from the softmax of the logits. Continuous: a (d,) float32
    draw from N(mean(s), exp(log_std)^2), returned raw (not clipped: PPO stores the raw action;
    the environment gets it clipped to [-1, 1]).
    """
    with torch.no_grad():
        out = model(torch.as_tensor(obs, dtype=torch.float32)[None])[0]
    policy_out = out[:-1].double().numpy()
    if continuous:
        std = np.exp(model.log_std.detach().double().numpy())
        return (policy_out + std * rng.standard_normal(policy_out.shape)).astype(np.float32)
    p = np.exp(policy_out - policy_out.max())
    return int(rng.choice(len(p), p=p / p.sum()))
