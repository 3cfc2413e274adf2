"""Batches whose inputs are nearly affinely dependent, as consecutive transitions of one drive
are on MetaDrive (a batch of 16 differs in 15 of 261 features there): the critics' first layer
has less rank than the batch, and the deeper layers alone leave the search fewer conditions than
input coordinates. The exact search then moves within the first layer's row space, and a point
one critic certifies must pass the other's column test (issue 16).

A TD3 actor-critic built here, an update from the client's own loss (TD3LossSpec); the attacker
reads only the model, its parameters, the update and the observation box.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from drivepriv.agents.common import Batch
from drivepriv.agents.td3 import TD3LossSpec, TD3Net
from drivepriv.attacks import actor_critic, exact
from drivepriv.attacks.base import AttackInput
from drivepriv.attacks.chain import Chain, Search

OBS, ACT, B = 80, 2, 12


def dependent_case(seed: int = 0, n: int = B, spread: float = 0.15, width: int = 64) -> tuple[AttackInput, np.ndarray]:
    """(attack input, true critic inputs (n, OBS + ACT)): states on a 3-dimensional affine
    subspace of the 80-dimensional box, so the critics' inputs span 5 dimensions for n samples."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = TD3Net(OBS, ACT, [width, width])
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    base = rng.uniform(-0.5, 0.5, OBS)
    span = rng.normal(0.0, spread, (3, OBS))
    states = (base + rng.uniform(-1.0, 1.0, (n, 3)) @ span).astype(np.float32)
    actions = rng.uniform(-1.0, 1.0, (n, ACT)).astype(np.float32)
    batch = Batch(torch.as_tensor(states), torch.as_tensor(actions), torch.as_tensor(rng.normal(0.0, 1.0, n).astype(np.float32)),
                  torch.as_tensor(np.clip(states + 0.01, -1.0, 1.0)), torch.zeros(n))
    loss = TD3LossSpec(gamma=0.99)
    grad = loss.gradient(model, params, params, batch)
    box = SimpleNamespace(codec=SimpleNamespace(box=lambda: (-np.ones(OBS, np.float32), np.ones(OBS, np.float32))))
    inp = AttackInput(model, params, params, grad, loss, n, (OBS,), ACT, box)
    return inp, np.concatenate([states, actions], 1)


def test_the_deeper_layers_alone_leave_a_continuum_and_the_first_layer_closes_it():
    inp, truth = dependent_case()
    g = dict(zip(inp.params, inp.gradient))
    chain = Chain(inp.model.q1, actor_critic.sub_dict(inp.params, "q1"), actor_critic.sub_dict(g, "q1"))
    search = Search(chain, [layer.grad_matrix for layer in chain.layers], B)
    assert search.rank[0] == 6  # 5 input dimensions (+ the bias) for 12 samples
    corank = sum(search.proj[k].shape[0] - search.row[k].shape[0] for k in search.deep)
    assert corank < chain.in_dim  # without the first layer: fewer conditions than coordinates
    assert 0 in search.row and search.N.shape[0] == search.rank[0] - 1  # the search moves within it
    res = exact.recover_exact(inp.model.q1, actor_critic.sub_dict(inp.params, "q1"), actor_critic.sub_dict(g, "q1"), B, (-np.ones(OBS + ACT), np.ones(OBS + ACT)), seed=0, restarts=256)
    found = torch.cdist(torch.as_tensor(truth, dtype=torch.float64), torch.as_tensor(res.states, dtype=torch.float64)).min(1).values
    assert int((found < 1e-4).sum()) >= B // 2, found  # one critic alone


def test_both_critics_certify_the_whole_batch_and_nothing_else():
    inp, truth = dependent_case()
    xs, targets, _ = actor_critic.exact_inputs(inp, seed=0, restarts=256)
    assert len(xs) == B and len(targets) == B
    err = torch.cdist(torch.as_tensor(xs, dtype=torch.float64), torch.as_tensor(truth, dtype=torch.float64)).min(1).values
    assert float(err.max()) < 1e-4, err


def test_a_transition_left_uncertified_is_what_the_rest_of_the_update_gives():
    """Peeled of the others' exact contributions, the first layer's update is one sample's term:
    every unit's ratio is that sample's input, and the candidates give it back."""
    inp, truth = dependent_case()
    xs, targets, _ = actor_critic.exact_inputs(inp, seed=0, restarts=256)
    assert len(xs) == B
    for j in (0, B - 1):
        others = np.delete(np.arange(B), j)
        cands = actor_critic.update_candidates(inp, xs[others], targets[others], 1)
        assert cands.shape == (1, OBS + ACT)
        assert np.abs(cands[0] - xs[j]).max() < 1e-3, np.abs(cands[0] - xs[j]).max()
    # nothing certified: mixtures of the batch's inputs, in the box, as many as asked for
    cands = actor_critic.update_candidates(inp, xs[:0], targets[:0], B)
    assert 0 < len(cands) <= B and np.all(np.abs(cands) <= 1.0 + 2e-3)
