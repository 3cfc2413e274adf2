"""Deep Q-Network (Mnih et al., 2015, "Human-level control through deep reinforcement learning").

The client trains with :class:`DQNLossSpec` and the attacker differentiates the very same
function, so the attack can never silently target a different objective from the one the
client optimised (DESIGN.md section 4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.func import functional_call

from drivepriv.agents.common import Batch
from drivepriv.agents.nets import mlp


class QNetwork(nn.Module):
    """MLP Q-network on the flattened observation; the first layer is ``nn.Linear`` with bias."""

    def __init__(self, obs_dim: int, n_actions: int, hidden_sizes: list[int]) -> None:
        super().__init__()
        self.net = mlp(obs_dim, hidden_sizes, n_actions)
        self.obs_dim = obs_dim
        self.n_actions = n_actions

    def forward(self, obs: Tensor) -> Tensor:
        return self.net(obs.reshape(obs.shape[0], -1))


@dataclass(frozen=True)
class DQNLossSpec:
    """The DQN TD loss, exactly: mean over the batch of
    ``smooth_l1(Q(s)[a], r + gamma * (1 - done) * max_a' Q_target(s')[a'])``, target detached.
    """

    gamma: float
    name: str = "dqn"
    #: DQN acts on a discrete action set (actions in the batch are (B, A) probabilities).
    discrete: ClassVar[bool] = True

    def __call__(self, model: nn.Module, params: dict[str, Tensor], target_params: dict[str, Tensor], batch: Batch) -> Tensor:
        q = functional_call(model, params, (batch.states,))
        q_sa = (q * batch.actions).sum(-1)
        # The target network is detached: y does not depend on theta. For the attacker, y still
        # depends on the unknown r, s' and done, so it stays in the attacker's graph.
        target = {k: v.detach() for k, v in target_params.items()}
        q_next = functional_call(model, target, (batch.next_states,))
        y = batch.rewards + self.gamma * (1.0 - batch.dones) * q_next.max(-1).values
        return nn.functional.smooth_l1_loss(q_sa, y)

    def gradient(self, model: nn.Module, params: dict[str, Tensor], target_params: dict[str, Tensor], batch: Batch, create_graph: bool = False) -> tuple[Tensor, ...]:
        """Gradient of the loss w.r.t. ``params`` (in ``params`` order)."""
        params = {k: v if v.requires_grad else v.detach().requires_grad_(True) for k, v in params.items()}
        loss = self(model, params, target_params, batch)
        return torch.autograd.grad(loss, tuple(params.values()), create_graph=create_graph)


def epsilon_at(step: int, start: float, end: float, decay_steps: int) -> float:
    """Linear epsilon schedule."""
    if decay_steps <= 0:
        return end
    frac = min(1.0, step / decay_steps)
    return start + frac * (end - start)
