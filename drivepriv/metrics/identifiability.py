"""How much of a batch the update can determine at all: the ceiling beside every score.

Two transitions that take the same action and share every ReLU pattern of the network give
gradients that depend on them only through their TD-error-weighted sum (every layer's input is
affine in the state on a common cell): the update provably cannot split them, whatever the
attack (see :mod:`drivepriv.attacks.exact`). This module counts, with the truth (so on the
metrics side only), the transitions whose (action, patterns) no other transition of the batch
shares: an upper bound on what any attack can recover exactly from the update.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from drivepriv.attacks.exact import Chain


def separable_transitions(model: nn.Module, params: dict[str, Tensor], states: np.ndarray, actions: np.ndarray | None) -> float:
    """The number of transitions whose action and ReLU patterns (at ``params``) no other one
    shares; NaN for networks that are not ReLU chains or for continuous actions."""
    try:
        chain = Chain(model, params, {k: torch.zeros_like(v) for k, v in params.items()})
    except (ValueError, KeyError):
        return float("nan")
    if not chain.piecewise_linear or actions is None or np.asarray(actions).ndim != 1:
        return float("nan")
    x = torch.as_tensor(np.asarray(states, dtype=np.float64).reshape(len(states), -1))
    if x.shape[1] != chain.in_dim:
        return float("nan")
    _, pre = chain.forward(x)
    patterns = torch.cat([(z > 0) for z in pre[:-1]], dim=1).numpy()
    keys = [(int(a), p.tobytes()) for a, p in zip(np.asarray(actions), patterns)]
    counts: dict[tuple[int, bytes], int] = {}
    for k in keys:
        counts[k] = counts.get(k, 0) + 1
    return float(sum(1 for k in keys if counts[k] == 1))
