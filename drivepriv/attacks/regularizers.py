"""RGIA's regularizers (DESIGN.md section 2), registered by name and switched on by their weight.

Each maps a decoded dummy batch with a leading restart dimension (R, B, ...) and the public
priors to a (R,) penalty. Terms are expressed in physical units where possible so their
weights are comparable: metres, m/s, and reward units.
"""

from __future__ import annotations

import torch
from torch import Tensor

from drivepriv.agents.dqn import Batch
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
    s, lead = _flat(b.states, 2)
    s2, _ = _flat(b.next_states, 2)
    pen = priors.state_penalty(s) + priors.state_penalty(s2)
    return pen.reshape(lead).mean(-1)


@REGULARIZERS.register("reward")
def reward_regularizer(b: Batch, priors: Priors) -> Tensor:
    """Squared difference between r and the scenario's reward function on (s', a, done)."""
    if priors.reward is None:
        return torch.zeros(b.states.shape[0])
    s2, lead = _flat(b.next_states, 2)
    a, _ = _flat(b.actions, 1)
    d = b.dones.reshape(-1)
    r_model = priors.reward(priors.codec.decode_world(s2), a, d)
    return ((b.rewards.reshape(-1) - r_model) ** 2).reshape(lead).mean(-1)


#: Physical features compared by the transition regularizer, with their unit scale.
_DYN_FEATURES = {"x": 1.0, "y": 1.0, "vx": 1.0, "vy": 1.0, "cos_h": 10.0, "sin_h": 10.0}


def _transition_penalty(model, b: Batch, priors: Priors) -> Tensor:
    """Squared distance (m, m/s; headings x10) between s' and a transition model's f(s, a)."""
    s, lead = _flat(b.states, 2)
    s2, _ = _flat(b.next_states, 2)
    a, _ = _flat(b.actions, 1)
    codec = priors.codec
    pred_norm = model(s, a)
    pred = codec.to_physical(pred_norm)
    phys = codec.to_physical(s2)
    idx = [codec.index(f) for f in _DYN_FEATURES if f in codec.features]
    w = torch.tensor([_DYN_FEATURES[codec.features[i]] for i in idx])
    diff = ((phys[..., idx] - pred[..., idx]) * w) ** 2  # (N, V, k)
    pres = codec.index("presence")
    presence_err = (s2[..., pres] - pred_norm[..., pres]) ** 2
    per = diff.sum(-1).mean(-1) + presence_err.mean(-1)
    return per.reshape(lead).mean(-1)


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
