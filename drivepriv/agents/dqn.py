"""Deep Q-Network (Mnih et al., 2015, "Human-level control through deep reinforcement learning").

The client trains with :class:`DQNLossSpec` and the attacker differentiates the very same
function, so the attack can never silently target a different objective from the one the
client optimised (DESIGN.md section 4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

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


@dataclass
class Batch:
    """A minibatch of transitions in observation space.

    ``actions`` is a (B, A) matrix of action probabilities (one-hot for real data, soft for a
    reconstruction); ``dones`` is the termination flag in [0, 1] (not truncation).
    """

    states: Tensor  # (B, V, F)
    actions: Tensor  # (B, A)
    rewards: Tensor  # (B,)
    next_states: Tensor  # (B, V, F)
    dones: Tensor  # (B,)

    def __len__(self) -> int:
        return self.states.shape[0]

    def detach(self) -> "Batch":
        return Batch(*(t.detach().clone() for t in (self.states, self.actions, self.rewards, self.next_states, self.dones)))

    def numpy(self) -> dict[str, np.ndarray]:
        return {
            "states": self.states.detach().cpu().numpy(),
            "actions": self.actions.detach().cpu().numpy(),
            "rewards": self.rewards.detach().cpu().numpy(),
            "next_states": self.next_states.detach().cpu().numpy(),
            "dones": self.dones.detach().cpu().numpy(),
        }


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


class ReplayBuffer:
    """A ring buffer of transitions, sampled with the client's own generator.

    Discrete actions are stored as indices and sampled one-hot (``n_actions`` columns);
    continuous actions (``continuous=True``) as (d,) vectors of ``n_actions`` values, raw.
    """

    def __init__(self, capacity: int, obs_shape: tuple[int, ...], n_actions: int, continuous: bool = False) -> None:
        self.capacity = capacity
        self.n_actions = n_actions
        self.continuous = continuous
        self.states = np.zeros((capacity, *obs_shape), dtype=np.float32)
        self.next_states = np.zeros((capacity, *obs_shape), dtype=np.float32)
        self.actions = np.zeros((capacity, n_actions), dtype=np.float32) if continuous else np.zeros(capacity, dtype=np.int64)
        self.rewards = np.zeros(capacity, dtype=np.float32)
        self.dones = np.zeros(capacity, dtype=np.float32)
        #: (episode id, step in episode) of each transition, kept for trip stitching by metrics.
        self.origin = np.zeros((capacity, 2), dtype=np.int64)
        self.size = 0
        self._next = 0

    def add(self, s: np.ndarray, a, r: float, s2: np.ndarray, done: bool, episode: int, step: int) -> None:
        i = self._next
        self.states[i], self.actions[i], self.rewards[i] = s, a, r
        self.next_states[i], self.dones[i] = s2, float(done)
        self.origin[i] = (episode, step)
        self._next = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int, rng: np.random.Generator, recent: int | None = None) -> tuple[Batch, np.ndarray]:
        """A minibatch (without replacement) and the buffer indices it came from; with
        ``recent``, only from the last ``recent`` transitions added (on-policy algorithms)."""
        if recent is None:
            idx = rng.choice(self.size, size=batch_size, replace=False)
        else:
            recent = min(recent, self.size)
            back = rng.choice(recent, size=batch_size, replace=False)
            idx = (self._next - 1 - back) % self.capacity
        acts = torch.as_tensor(self.actions[idx])
        batch = Batch(
            states=torch.as_tensor(self.states[idx]),
            actions=acts if self.continuous else nn.functional.one_hot(acts, self.n_actions).float(),
            rewards=torch.as_tensor(self.rewards[idx]),
            next_states=torch.as_tensor(self.next_states[idx]),
            dones=torch.as_tensor(self.dones[idx]),
        )
        return batch, idx


def epsilon_at(step: int, start: float, end: float, decay_steps: int) -> float:
    """Linear epsilon schedule."""
    if decay_steps <= 0:
        return end
    frac = min(1.0, step / decay_steps)
    return start + frac * (end - start)
