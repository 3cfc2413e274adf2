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

from drivepriv.attacks.chain import Chain, term_gram, term_kernel, term_system


def _pattern_classes(model: nn.Module, params: dict[str, Tensor], states: np.ndarray, actions: np.ndarray | None):
    """The chain, every hidden layer's ReLU pattern of each transition and its (action,
    patterns) classes (members in batch order); None for networks that are not ReLU chains,
    continuous actions or states that do not fit the network."""
    try:
        chain = Chain(model, params, {k: torch.zeros_like(v) for k, v in params.items()})
    except (ValueError, KeyError):
        return None
    if not chain.piecewise_linear or actions is None or np.asarray(actions).ndim != 1:
        return None
    x = torch.as_tensor(np.asarray(states, dtype=np.float64).reshape(len(states), -1))
    if x.shape[1] != chain.in_dim:
        return None
    _, pre = chain.forward(x)
    masks = [(z > 0).double() for z in pre[:-1]]
    classes: dict[tuple[int, bytes], list[int]] = {}
    for i, (a, *m_s) in enumerate(zip(np.asarray(actions), *masks)):
        classes.setdefault((int(a), torch.cat(m_s).bool().numpy().tobytes()), []).append(i)
    return chain, masks, list(classes.values())


def separable_transitions(model: nn.Module, params: dict[str, Tensor], states: np.ndarray, actions: np.ndarray | None) -> float:
    """The number of transitions whose action and ReLU patterns (at ``params``) no other one
    shares; NaN for networks that are not ReLU chains or for continuous actions."""
    found = _pattern_classes(model, params, states, actions)
    if found is None:
        return float("nan")
    return float(sum(1 for members in found[2] if len(members) == 1))


def determined_transitions(model: nn.Module, params: dict[str, Tensor], states: np.ndarray, actions: np.ndarray | None, tol: float = 1e-6) -> float:
    """The transitions the update determines, a tighter upper bound than
    :func:`separable_transitions`: those whose (action, patterns) no other one shares and whose
    rank-one terms no other batch with the same patterns can change without changing the update.

    With every sample's patterns fixed, the update is linear in the terms' weighted sums
    ``y_j = sum_s c_s [x_s, 1]`` (one term per (action, patterns) class, ``c_s`` its output
    gradient's scale, free since the TD target is): layer l's gradient is
    ``sum_j delta_l^j (A_l^j y_j)^T``, with ``delta_l^j`` the class's output gradient mapped to
    layer l and ``A_l^j`` the affine map its patterns give from the input to layer l's input.
    A direction in that map's kernel that moves ``y_j`` moves sample j (inside its cell) and
    leaves the update as it is: j is then provably not determined. Measured on the kernel of the
    column-normalised Gram matrix, at relative singular values below ``tol``. NaN where
    :func:`separable_transitions` is."""
    found = _pattern_classes(model, params, states, actions)
    if found is None:
        return float("nan")
    chain, masks, classes = found
    reps = torch.as_tensor([members[0] for members in classes])
    g = torch.zeros(len(reps), chain.layers[-1].weight.shape[0], dtype=torch.float64)
    g[torch.arange(len(reps)), torch.as_tensor(np.asarray(actions))[reps]] = 1.0
    deltas, A = term_system(chain, [m[reps] for m in masks], g)
    moved = term_kernel(term_gram(deltas, A), len(reps), tol)
    return float(sum(1 for c, members in enumerate(classes) if len(members) == 1 and float(moved[c]) < 1e-3))
