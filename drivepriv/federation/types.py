"""The types that cross the federation's boundaries, shared by both engines, the curious
strategy, the attacks' inputs and the metrics: what the server sees (:class:`ServerView`), what
a client sends (:class:`ClientUpdate`), the truth kept apart for the metrics
(:class:`GroundTruth`) and what a federation run returns (:class:`FederationResult`).

A neutral module: it imports no engine, so the engines (:mod:`~drivepriv.federation.inprocess`,
:mod:`~drivepriv.federation.flower`) and the Flower strategy import it, not each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from drivepriv.agents.common import LossSpec
from drivepriv.federation.strategies import strategy

if TYPE_CHECKING:
    from drivepriv.agents.algorithms import LocalAlgorithm


@dataclass
class ServerView:
    """Everything the server knows about one client's update in one round (and nothing more)."""

    round: int
    client: int
    strategy: str
    params: dict[str, torch.Tensor]
    target_params: dict[str, torch.Tensor]
    #: FedSGD: the gradient; FedAvg: the parameter delta. One tensor per parameter, params order.
    payload: tuple[torch.Tensor, ...]
    batch_size: int
    local_steps: int
    lr: float
    loss: LossSpec  # the algorithm's LossSpec as the server prescribed it (DQNLossSpec, PPOLossSpec, TD3LossSpec, SACLossSpec)

    def gradient(self) -> tuple[torch.Tensor, ...]:
        """The shared gradient (FedSGD); under FedAvg -delta/lr: the sum of the K local gradients
        (exactly the gradient for K = 1)."""
        return strategy(self.strategy).gradient(self.payload, self.lr)


#: The arrays of a transition, in the order a minibatch holds them.
TRANSITION_FIELDS = ("states", "actions", "rewards", "next_states", "dones")


@dataclass
class GroundTruth:
    """The client's true transitions behind one update, the one truth type from the engine to the
    report. Metrics only: no attack ever receives one.

    The K local minibatches of a FedAvg update are concatenated in the order the client trained
    on them (K = 1 under FedSGD): local step ``s`` is rows ``s * n / K`` to ``(s + 1) * n / K``.
    Observation-space arrays; ``actions`` are indices (discrete) or (n, d) values (continuous).
    Under secure aggregation (client -1) each local step holds every client's minibatch."""

    round: int
    client: int
    states: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    next_states: np.ndarray
    dones: np.ndarray
    #: (n, 2): episode id and step of each transition within the client's experience.
    origins: np.ndarray
    #: Local SGD steps behind the update, each on n / local_steps consecutive rows.
    local_steps: int = 1

    @classmethod
    def from_minibatches(cls, rnd: int, client: int, batches: list[dict[str, np.ndarray]], origins: list[np.ndarray], continuous: bool) -> GroundTruth:
        """From the minibatches as a client trains on them (``Batch.numpy()``: discrete actions
        as one-hot rows), one per local step, with each minibatch's (episode, step) origins."""
        cat = {k: np.concatenate([b[k] for b in batches]) for k in TRANSITION_FIELDS}
        if not continuous:
            cat["actions"] = cat["actions"].argmax(-1)
        return cls(rnd, client, **cat, origins=np.concatenate(origins).astype(np.int64).reshape(-1, 2), local_steps=len(batches))

    @property
    def continuous(self) -> bool:
        return np.ndim(self.actions) == 2

    def __len__(self) -> int:
        return len(self.rewards)

    def arrays(self) -> dict[str, np.ndarray]:
        """The transition arrays by name (TRANSITION_FIELDS)."""
        return {k: getattr(self, k) for k in TRANSITION_FIELDS}

    def step(self, s: int) -> GroundTruth:
        """The transitions of local step ``s`` alone."""
        n = len(self) // self.local_steps
        rows = slice(s * n, (s + 1) * n)
        return replace(self, **{k: v[rows] for k, v in self.arrays().items()}, origins=self.origins[rows], local_steps=1)


@dataclass
class FederationResult:
    model: torch.nn.Module
    views: list[ServerView]
    truths: dict[tuple[int, int], GroundTruth]
    training: pd.DataFrame
    final_params: dict[str, torch.Tensor] = field(default_factory=dict)
    #: The defenses applied and, under DP-SGD, the privacy spent (epsilon at delta).
    privacy: dict[str, object] = field(default_factory=dict)
    algorithm: LocalAlgorithm | None = None
    #: Where it ran, for run.json (Flower: the Ray address and how many nodes trained clients).
    cluster: dict[str, object] = field(default_factory=dict)


@dataclass
class ClientUpdate:
    """What one client sends the server in one round, and nothing more."""

    client: int
    payload: tuple[torch.Tensor, ...]
    #: One row of training.csv (the client's own progress).
    row: dict[str, float]
    #: DP-SGD: the sample rate of each local step, for the server's privacy accountant.
    dp_rates: list[float] = field(default_factory=list)


@dataclass
class ClientResult:
    """What one client produced in one round, as the engine receives it: the update it sends the
    server and, apart from it, the true minibatch(es) behind it (only when the round is attacked),
    which the engine's :class:`~drivepriv.federation.recorder.TruthRecorder` keeps for the
    metrics before the update reaches the server."""

    update: ClientUpdate
    truth: GroundTruth | None = None
