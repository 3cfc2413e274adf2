"""The types that cross the federation's boundaries, shared by both engines, the curious
strategy, the attacks' inputs and the metrics: what the server sees (:class:`ServerView`), what
a client sends (:class:`ClientUpdate`), the truth kept apart for the metrics
(:class:`GroundTruth`) and what a federation run returns (:class:`FederationResult`).

A neutral module: it imports no engine, so the engines (:mod:`~drivepriv.federation.inprocess`,
:mod:`~drivepriv.federation.flower`) and the Flower strategy import it, not each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
    loss: LossSpec  # the LossSpec the client trained with (DQNLossSpec, PPOLossSpec, TD3LossSpec)

    def gradient(self) -> tuple[torch.Tensor, ...]:
        """The shared gradient (FedSGD); under FedAvg -delta/lr: the sum of the K local gradients
        (exactly the gradient for K = 1)."""
        return strategy(self.strategy).gradient(self.payload, self.lr)


@dataclass
class GroundTruth:
    """The client's true minibatch(es) behind one update. Metrics only: attacks never see it."""

    round: int
    client: int
    batches: list[dict[str, np.ndarray]]
    #: (episode id, step) of every transition, per local step.
    origins: list[np.ndarray]
    #: Continuous actions: the batches' actions are (B, d) values, not one-hot rows.
    continuous: bool = False


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
