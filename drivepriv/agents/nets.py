"""The one MLP builder behind every network of drivepriv (agents and the attacker's learned
priors), and the container of an actor with twin critics (TD3, SAC)."""

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


class ActorCriticNet(nn.Module):
    """An actor and twin critics in one module (one parameter dict travels): ``actor`` reads the
    flattened observation, ``q1`` and ``q2`` the concatenated (observation, action). ``actor``
    is registered first: the first ``nn.Linear`` of ``named_modules()`` is the actor's."""

    actor: nn.Module
    q1: nn.Module
    q2: nn.Module

    def __init__(self, actor: nn.Module, q1: nn.Module, q2: nn.Module, obs_dim: int, act_dim: int) -> None:
        super().__init__()
        self.actor, self.q1, self.q2 = actor, q1, q2
        self.obs_dim = obs_dim
        self.n_actions = act_dim

    @classmethod
    def from_modules(cls, actor: nn.Module, q1: nn.Module, q2: nn.Module, obs_dim: int, act_dim: int) -> "ActorCriticNet":
        """The algorithm's network made of given sub-networks (a user's own, as the audit
        receives them); its forward is the algorithm's."""
        net = cls.__new__(cls)
        ActorCriticNet.__init__(net, actor, q1, q2, obs_dim, act_dim)
        return net
