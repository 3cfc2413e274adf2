"""Containers shared by every local algorithm and by the attacker (no algorithm code here).

:class:`Batch` is a minibatch of transitions in observation space (what a client trains on and
what an attack reconstructs), :class:`ReplayBuffer` the client's store of transitions, and
:class:`LossSpec` what DQN's, PPO's and TD3's loss specifications have in common: the one
function a client trains with and the attacker differentiates (DESIGN.md section 4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn


@dataclass
class Batch:
    """A minibatch of transitions in observation space.

    ``actions`` is a (B, A) matrix of action probabilities (one-hot for real data, soft for a
    reconstruction); ``dones`` is the termination flag in [0, 1] (not truncation).
    ``adv_next`` (PPO with GAE only) is the advantage of the transition that follows each one in
    the client's rollout: what PPO's return needs beyond the transition itself.
    """

    states: Tensor  # (B, V, F)
    actions: Tensor  # (B, A)
    rewards: Tensor  # (B,)
    next_states: Tensor  # (B, V, F)
    dones: Tensor  # (B,)
    adv_next: Tensor | None = None  # (B,)

    def __len__(self) -> int:
        return self.states.shape[0]

    def detach(self) -> "Batch":
        return Batch(*(None if t is None else t.detach().clone() for t in (self.states, self.actions, self.rewards, self.next_states, self.dones, self.adv_next)))

    def numpy(self) -> dict[str, np.ndarray]:
        return {
            "states": self.states.detach().cpu().numpy(),
            "actions": self.actions.detach().cpu().numpy(),
            "rewards": self.rewards.detach().cpu().numpy(),
            "next_states": self.next_states.detach().cpu().numpy(),
            "dones": self.dones.detach().cpu().numpy(),
        }


class LossSpec(Protocol):
    """A local algorithm's loss on one minibatch (``DQNLossSpec``, ``PPOLossSpec``, ``TD3LossSpec``).

    The client trains with it and the attacker differentiates the very same function, so the
    attack can never silently target a different objective from the one the client optimised.
    """

    @property
    def name(self) -> str:
        """The algorithm's name (``"dqn"``, ``"ppo"``, ``"td3"``)."""
        ...

    @property
    def discrete(self) -> bool:
        """Whether the actions are discrete (``batch.actions`` is a (B, A) probability matrix)."""
        ...

    def __call__(self, model: nn.Module, params: dict[str, Tensor], target_params: dict[str, Tensor], batch: Batch) -> Tensor:
        """The scalar loss of ``model`` at ``params`` (target network ``target_params``) on ``batch``."""
        ...

    def gradient(self, model: nn.Module, params: dict[str, Tensor], target_params: dict[str, Tensor], batch: Batch, create_graph: bool = False) -> tuple[Tensor, ...]:
        """Gradient of the loss w.r.t. ``params`` (in ``params`` order)."""
        ...


def at_step(spec: LossSpec, k: int) -> LossSpec:
    """The loss of the training step ``k`` steps after ``spec``'s own. Only TD3's changes from step
    to step (its delayed actor term, :meth:`~drivepriv.agents.td3.TD3LossSpec.at_step`); every
    other algorithm's loss is the same at every step."""
    step = getattr(spec, "at_step", None)
    return spec if step is None else step(k)


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

    def sample(self, batch_size: int, rng: np.random.Generator) -> tuple[Batch, np.ndarray]:
        """A minibatch (without replacement) and the buffer indices it came from."""
        idx = rng.choice(self.size, size=batch_size, replace=False)
        return self.take(idx), idx

    def recent(self, n: int) -> np.ndarray:
        """The buffer indices of the last ``n`` transitions added, oldest first."""
        n = min(n, self.size)
        return (self._next - n + np.arange(n)) % self.capacity

    def take(self, idx: np.ndarray, adv_next: np.ndarray | None = None) -> Batch:
        """The transitions at buffer indices ``idx`` as a minibatch (discrete actions one-hot)."""
        acts = torch.as_tensor(self.actions[idx])
        return Batch(
            states=torch.as_tensor(self.states[idx]),
            actions=acts if self.continuous else nn.functional.one_hot(acts, self.n_actions).float(),
            rewards=torch.as_tensor(self.rewards[idx]),
            next_states=torch.as_tensor(self.next_states[idx]),
            dones=torch.as_tensor(self.dones[idx]),
            adv_next=None if adv_next is None else torch.as_tensor(adv_next),
        )
