"""TD3 (Fujimoto et al., 2018, "Addressing Function Approximation Error in Actor-Critic
Methods"): the loss on the minibatch a client shares the gradient of.

TD3 learns a deterministic policy pi(s) in [-1, 1]^d (tanh output, the environment's action
box in agent units) and two critics Q1, Q2 on (s, a). One training step on a minibatch is

- critics: minimise mean((Q1(s, a) - y)^2) + mean((Q2(s, a) - y)^2) with the clipped double-Q
  target y = r + gamma (1 - done) min(Q1_t, Q2_t)(s', pi_t(s')) from the target networks;
- actor (every ``policy_delay``-th step): minimise -mean(Q1(s, pi(s))), the deterministic
  policy gradient (Silver et al., 2014), through the critic but updating only the actor.

Both are folded into one scalar loss whose gradient w.r.t. the actor's parameters is the
actor's gradient and w.r.t. the critics' parameters is the critics' gradient (the actor term
sees the critics detached, the TD term never involves the actor's live parameters). This is
the update a client shares. A critic-only step (between delayed actor updates) has no actor
term: the spec knows the training step it is taken at (``iteration``, counted over the run) and
the delay, so the server, which knows both, has the exact loss of every step
(:func:`drivepriv.agents.common.at_step`).

Target policy smoothing (TD3's clipped Gaussian noise on pi_t(s')) is left out: that noise is
the client's private randomness, which a server could not know, so a gradient taken with it
cannot be reproduced by anyone else; the spec is the noiseless target.

The client trains with :class:`TD3LossSpec` and the attacker differentiates the same function
(DESIGN.md section 4); it runs inside ``torch.func.vmap(torch.func.grad(...))``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from drivepriv.agents.common import Batch
from drivepriv.agents.nets import ActorCriticNet, mlp


class TD3Net(ActorCriticNet):
    """TD3's deterministic actor (flattened observation -> action in [-1, 1]^d, a tanh output)
    and twin critics in one module (:class:`~drivepriv.agents.nets.ActorCriticNet`)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_sizes: list[int]) -> None:
        actor = nn.Sequential(mlp(obs_dim, hidden_sizes, act_dim), nn.Tanh())
        super().__init__(actor, mlp(obs_dim + act_dim, hidden_sizes, 1), mlp(obs_dim + act_dim, hidden_sizes, 1), obs_dim, act_dim)

    def forward(self, states: Tensor, actions: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(pi(s) (B, d), Q1(s, a') (B,), Q2(s, a') (B,)) with a' = ``actions`` if given, else pi(s)."""
        s = states.reshape(states.shape[0], -1)
        pi = self.actor(s)
        a = pi if actions is None else actions
        sa = torch.cat([s, a], dim=-1)
        return pi, self.q1(sa)[..., 0], self.q2(sa)[..., 0]


@dataclass(frozen=True)
class TD3LossSpec:
    """TD3's loss on one minibatch, exactly (``batch.actions`` (B, d): the actions taken):

        mean((Q1(s, a) - y)^2) + mean((Q2(s, a) - y)^2) - policy_coef * mean(Q1(s, pi(s)))

    with y = r + gamma (1 - done) min(Q1_t, Q2_t)(s', pi_t(s')) from the detached target
    parameters (r, s' and done stay in the graph: they are the attacker's unknowns), and the
    critics' parameters detached in the actor term. No target policy smoothing (see the module
    docstring).

    Delayed policy updates: the loss is that of training step ``iteration`` (0-based, counted
    over the run), whose actor term is on when ``(iteration + 1) % policy_delay == 0`` (the
    paper's counter: with a delay of 2, steps 1, 3, 5, ...); otherwise the step is critic-only.
    :meth:`at_step` gives a later step's loss.
    """

    gamma: float
    policy_coef: float = 1.0
    policy_delay: int = 1
    iteration: int = 0
    name: str = "td3"
    discrete: ClassVar[bool] = False

    @property
    def actor_coef(self) -> float:
        """The actor term's weight in this step: ``policy_coef``, or 0 between delayed updates."""
        return self.policy_coef if (self.iteration + 1) % self.policy_delay == 0 else 0.0

    def at_step(self, k: int) -> "TD3LossSpec":
        """The loss of the training step ``k`` steps after this one."""
        return self if k == 0 else dataclasses.replace(self, iteration=self.iteration + k)

    def next_value(self, model: nn.Module, params: dict[str, Tensor], target_params: dict[str, Tensor], next_states: Tensor) -> Tensor:
        """min(Q1', Q2')(s', pi'(s')) (B,) from the target networks, detached from the parameters."""
        target = {k: v.detach() for k, v in target_params.items()}
        _, q1_next, q2_next = functional_call(model, target, (next_states,))
        return torch.minimum(q1_next, q2_next)

    def targets(self, model: nn.Module, target_params: dict[str, Tensor], batch: Batch) -> Tensor:
        """Clipped double-Q targets y (B,), detached from the parameters."""
        return batch.rewards + self.gamma * (1.0 - batch.dones) * self.next_value(model, target_params, target_params, batch.next_states)

    def critic_loss(self, model: nn.Module, params: dict[str, Tensor], target_params: dict[str, Tensor], batch: Batch) -> Tensor:
        """The twin critics' TD loss (its gradient reaches only the critics)."""
        _, q1, q2 = functional_call(model, params, (batch.states, batch.actions))
        y = self.targets(model, target_params, batch)
        return ((q1 - y) ** 2).mean() + ((q2 - y) ** 2).mean()

    def actor_loss(self, model: nn.Module, params: dict[str, Tensor], batch: Batch) -> Tensor:
        """-mean Q1(s, pi(s)) with the critics detached (its gradient reaches only the actor)."""
        actor_live = {k: v if k.startswith("actor.") else v.detach() for k, v in params.items()}
        _, q1_pi, _ = functional_call(model, actor_live, (batch.states,))
        return -q1_pi.mean()

    def __call__(self, model: nn.Module, params: dict[str, Tensor], target_params: dict[str, Tensor], batch: Batch) -> Tensor:
        return self.critic_loss(model, params, target_params, batch) + self.actor_coef * self.actor_loss(model, params, batch)

    def gradient(self, model: nn.Module, params: dict[str, Tensor], target_params: dict[str, Tensor], batch: Batch, create_graph: bool = False) -> tuple[Tensor, ...]:
        """Gradient of the loss w.r.t. ``params`` (in ``params`` order)."""
        params = {k: v if v.requires_grad else v.detach().requires_grad_(True) for k, v in params.items()}
        loss = self(model, params, target_params, batch)
        return torch.autograd.grad(loss, tuple(params.values()), create_graph=create_graph)


def td3_act(model: TD3Net, obs: np.ndarray, rng: np.random.Generator, noise_std: float) -> np.ndarray:
    """Exploration action: pi(s) plus N(0, noise_std^2) noise from the client's generator,
    clipped to the action box [-1, 1]^d (float32, shape (d,))."""
    with torch.no_grad():
        pi = model.actor(torch.as_tensor(obs, dtype=torch.float32).reshape(1, -1))[0].double().numpy()
    return np.clip(pi + noise_std * rng.standard_normal(pi.shape), -1.0, 1.0).astype(np.float32)
