"""RGIA's regularizers (DESIGN.md section 2), registered by name and switched on by their weight.

Each maps a decoded dummy batch with a leading restart dimension (R, B, ...) and the public
priors to a (R,) penalty. Terms are expressed in physical units where possible so their
weights are comparable: metres, m/s, and reward units.
"""

from __future__ import annotations

import torch
from torch import Tensor

from drivepriv.agents.common import Batch
from drivepriv.attacks.base import Priors
from drivepriv.attacks.engine import REGULARIZERS


def _flat(x: Tensor, tail: int) -> tuple[Tensor, tuple[int, ...]]:
    lead = x.shape[: x.dim() - tail]
    return x.reshape(-1, *x.shape[x.dim() - tail :]), tuple(lead)


@REGULARIZERS.register("state")
def state_regularizer(b: Batch, priors: Priors) -> Tensor:
    """States and next states inside the feasible set (bounds, presence, on the road, speeds)."""
    if priors.state_penalty is None:
        return torch.zeros(b.states.shape[0])
    tail = len(priors.codec.obs_shape)
    s, lead = _flat(b.states, tail)
    s2, _ = _flat(b.next_states, tail)
    both = priors.state_penalty(torch.cat([s, s2]))  # one call: the penalty is row by row
    pen = both[: len(s)] + both[len(s) :]
    return pen.reshape(lead).mean(-1)


@REGULARIZERS.register("reward")
def reward_regularizer(b: Batch, priors: Priors) -> Tensor:
    """Squared difference between r and the scenario's reward function on (s, a, s', done)."""
    if priors.reward is None:
        return torch.zeros(b.states.shape[0])
    tail = len(priors.codec.obs_shape)
    s, lead = _flat(b.states, tail)
    s2, _ = _flat(b.next_states, tail)
    a, _ = _flat(b.actions, 1)
    d = b.dones.reshape(-1)
    r_model = priors.reward(s, a, s2, d)
    return ((b.rewards.reshape(-1) - r_model) ** 2).reshape(lead).mean(-1)


def _transition_penalty(model, b: Batch, priors: Priors) -> Tensor:
    """Distance between s' and a transition model's f(s, a), in the codec's physical units."""
    tail = len(priors.codec.obs_shape)
    s, lead = _flat(b.states, tail)
    s2, _ = _flat(b.next_states, tail)
    a, _ = _flat(b.actions, 1)
    return priors.codec.transition_distance(model(s, a), s2).reshape(lead).mean(-1)


@REGULARIZERS.register("dynamics")
def dynamics_regularizer(b: Batch, priors: Priors) -> Tensor:
    """s' consistent with the transition model learned from the attacker's own rollouts."""
    if priors.dynamics is None:
        return torch.zeros(b.states.shape[0])
    return _transition_penalty(priors.dynamics, b, priors)


@REGULARIZERS.register("physics")
def physics_regularizer(b: Batch, priors: Priors) -> Tensor:
    """s' consistent with the simulator's closed-form vehicle kinematics (drivepriv's addition)."""
    if priors.physics is None:
        return torch.zeros(b.states.shape[0])
    return _transition_penalty(priors.physics, b, priors)
