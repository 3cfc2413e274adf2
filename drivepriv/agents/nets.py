"""The one MLP builder behind every network of drivepriv (agents and the attacker's learned priors)."""

from __future__ import annotations

from torch import nn


def mlp(in_dim: int, hidden_sizes: list[int], out_dim: int, activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """``Linear -> activation`` per hidden width, then a ``Linear`` to ``out_dim``. The first
    module is an ``nn.Linear`` with bias (the closed-form attacks rely on it)."""
    layers: list[nn.Module] = []
    width = in_dim
    for h in hidden_sizes:
        layers += [nn.Linear(width, h), activation()]
        width = h
    layers.append(nn.Linear(width, out_dim))
    return nn.Sequential(*layers)
