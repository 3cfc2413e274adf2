"""SAC (Haarnoja et al., 2018, "Soft Actor-Critic Algorithms and Applications",
arXiv 1812.05905) with a fixed entropy temperature: the loss on the minibatch a client shares
the gradient of.

The policy is a squashed Gaussian: the actor outputs the mean and the log standard deviation
(clamped to [-20, 2]) of u, and the action is a = tanh(u) in [-1, 1]^d, with
``log pi(a|s) = log N(u; mu, sigma) - sum log(1 - tanh(u)^2)``. Two critics Q1, Q2 read
(s, a). One training step on a minibatch is

- critics: minimise mean((Q1(s, a) - y)^2) + mean((Q2(s, a) - y)^2) with the soft target
  y = r + gamma (1 - done) (min(Q1', Q2')(s', a') - alpha log pi(a'|s')), a' ~ pi(.|s') from the
  current actor (detached), Q' the target critics;
- actor: minimise mean(alpha log pi(a~|s) - min(Q1, Q2)(s, a~)) with a~ = tanh(mu + sigma eps)
  reparameterised and the critics detached.

The temperature alpha is prescribed by the server (known to it). The noise eps of a' and a~ is
the client's own randomness: a client's spec carries ``noise_seed`` (drawn from its private
generator, step by step); the server's spec has none, and then eps = 0 (the policy's mean):
no server can reproduce a client's draws. The critics' gradients do not depend on the actor's
noise, and the attack on them (:mod:`drivepriv.attacks.actor_critic`) recovers each y exactly
whatever a' was; only the reward it derives from y carries the unknown a'.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from drivepriv.agents.common import Batch
from drivepriv.agents.nets import ActorCriticNet, mlp

LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0


def squashed_gaussian(out: Tensor, noise: Tensor | None) -> tuple[Tensor, Tensor]:
    """(action tanh(mu + sigma eps) (B, d), its log-probability (B,)) from the actor's (B, 2d)
    output (mean, then log std); ``noise`` None: eps = 0."""
    mu, log_std = out.chunk(2, dim=-1)
    log_std = log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)
    eps = torch.zeros_like(mu) if noise is None else noise
    u = mu + log_std.exp() * eps
    log_n = (-0.5 * eps**2 - log_std - 0.5 * math.log(2.0 * math.pi)).sum(-1)
    # log(1 - tanh(u)^2), stably: 2 (log 2 - u - softplus(-2u))
    log_jac = (2.0 * (math.log(2.0) - u - nn.functional.softplus(-2.0 * u))).sum(-1)
    return torch.tanh(u), log_n - log_jac


class SACNet(ActorCriticNet):
    """SAC's actor (flattened observation -> mean, then log std, of the pre-squash Gaussian: 2d
    values) and twin critics in one module (:class:`~drivepriv.agents.nets.ActorCriticNet`)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_sizes: list[int]) -> None:
        actor = mlp(obs_dim, hidden_sizes, 2 * act_dim)
        super().__init__(actor, mlp(obs_dim + act_dim, hidden_sizes, 1), mlp(obs_dim + act_dim, hidden_sizes, 1), obs_dim, act_dim)

    def forward(self, states: Tensor, actions: Tensor | None = None, noise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(a~ (B, d), Q1(s, a') (B,), Q2(s, a') (B,), log pi(a~|s) (B,)) with a~ the policy's
        action under ``noise`` (None: the mean) and a' = ``actions`` if given, else a~."""
        s = states.reshape(states.shape[0], -1)
        pi, logp = squashed_gaussian(self.actor(s), noise)
        a = pi if actions is None else actions
        sa = torch.cat([s, a], dim=-1)
        return pi, self.q1(sa)[..., 0], self.q2(sa)[..., 0], logp


@dataclass(frozen=True)
class SACLossSpec:
    """SAC's loss on one minibatch, exactly (``batch.actions`` (B, d): the actions taken):

        mean((Q1(s, a) - y)^2) + mean((Q2(s, a) - y)^2) + mean(alpha log pi(a~|s) - min(Q1, Q2)(s, a~))

    with y = r + gamma (1 - done) (min(Q1', Q2')(s', a') - alpha log pi(a'|s')) (target critics,
    current actor, all detached), the critics detached in the actor term (see the module
    docstring for the noise).
    """

    gamma: float
    alpha: float = 0.2
    #: The client's noise for this step (a seed of its private generator); None: eps = 0.
    noise_seed: int | None = None
    name: str = "sac"
    discrete: ClassVar[bool] = False

    def noise(self, batch: Batch) -> tuple[Tensor | None, Tensor | None]:
        """eps for a' (next states) and for a~ (states), (B, d) each, or None."""
        if self.noise_seed is None:
            return None, None
        gen = torch.Generator().manual_seed(int(self.noise_seed))
        shape = (2, len(batch), batch.actions.shape[-1])
        eps = torch.randn(shape, generator=gen, dtype=batch.states.dtype)
        return eps[0], eps[1]

    def next_value(self, model: nn.Module, params: dict[str, Tensor], target_params: dict[str, Tensor], next_states: Tensor, noise: Tensor | None = None) -> Tensor:
        """The soft value of s' (B,): min(Q1', Q2')(s', a') - alpha log pi(a'|s'), detached
        from the parameters (a' from the current actor, the critics' targets)."""
        live = {k: v.detach() for k, v in params.items()}
        a2, _, _, logp2 = functional_call(model, live, (next_states,), {"noise": noise})
        target = {k: (v if k.startswith("actor.") else target_params[k]).detach() for k, v in params.items()}
        _, q1, q2, _ = functional_call(model, target, (next_states, a2))
        return torch.minimum(q1, q2) - self.alpha * logp2

    def targets(self, model: nn.Module, params: dict[str, Tensor], target_params: dict[str, Tensor], batch: Batch, noise: Tensor | None = None) -> Tensor:
        """Soft targets y (B,); r, s' and done stay in the graph (the attacker's unknowns)."""
        return batch.rewards + self.gamma * (1.0 - batch.dones) * self.next_value(model, params, target_params, batch.next_states, noise)

    def __call__(self, model: nn.Module, params: dict[str, Tensor], target_params: dict[str, Tensor], batch: Batch) -> Tensor:
        eps_next, eps = self.noise(batch)
        _, q1, q2, _ = functional_call(model, params, (batch.states, batch.actions))
        y = self.targets(model, params, target_params, batch, eps_next)
        critic = ((q1 - y) ** 2).mean() + ((q2 - y) ** 2).mean()
        actor_live = {k: v if k.startswith("actor.") else v.detach() for k, v in params.items()}
        _, q1_pi, q2_pi, logp = functional_call(model, actor_live, (batch.states,), {"noise": eps})
        return critic + (self.alpha * logp - torch.minimum(q1_pi, q2_pi)).mean()

    def gradient(self, model: nn.Module, params: dict[str, Tensor], target_params: dict[str, Tensor], batch: Batch, create_graph: bool = False) -> tuple[Tensor, ...]:
        """Gradient of the loss w.r.t. ``params`` (in ``params`` order)."""
        params = {k: v if v.requires_grad else v.detach().requires_grad_(True) for k, v in params.items()}
        loss = self(model, params, target_params, batch)
        return torch.autograd.grad(loss, tuple(params.values()), create_graph=create_graph)


def sac_act(model: SACNet, obs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A sample of the policy, tanh(mu + sigma eps) with eps from the client's generator
    (float32, shape (d,))."""
    with torch.no_grad():
        out = model.actor(torch.as_tensor(obs, dtype=torch.float32).reshape(1, -1))
        eps = torch.as_tensor(rng.standard_normal(model.n_actions), dtype=torch.float32)[None]
        a, _ = squashed_gaussian(out, eps)
    return a[0].numpy().astype(np.float32)
