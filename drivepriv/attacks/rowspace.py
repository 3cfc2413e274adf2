"""States of a minibatch from the row spaces of every hidden layer's gradient.

For a linear layer ``z = W a + b`` the gradient is ``[dL/dW | dL/db] = sum_i delta_i [a_i, 1]``:
its rows span the inputs ``[a_i, 1]`` of that layer, one per transition (at most n of them).
This holds for every linear layer of the network, not only the first. A candidate state x is
consistent with the update when, at every linear layer but the last, its own layer input
``[a_l(x), 1]`` lies in that layer's row space. The first layer's condition is linear in x (an
affine subspace of dimension n - 1, see :class:`~drivepriv.attacks.engine.StateSubspace`); the
deeper layers' conditions are not, and they are what singles out the n samples within it.

We minimise the summed relative residual of x outside those row spaces from many starts at once
(one batched forward pass per step), keep the starts that reach zero residual, and pick n
distinct ones. Starts converge to the true samples with residuals at float precision. The
gradient cannot tell two transitions apart that take the same action and share every ReLU
pattern: points on the line through them are consistent too. Among consistent points we
therefore keep the extreme ones (greedy maximum-volume selection), which are the samples
themselves. Under FedAvg with K > 1 local steps the deeper layers' row spaces hold the layer
inputs at K slightly different parameter vectors: the first layer's condition stays exact, the
others become approximate, and the threshold adapts to the best residual reached.

Nothing here uses the truth: only the model, the update and the public prior states.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from drivepriv.attacks.base import AttackInput
from drivepriv.attacks.engine import first_layer_subspace


@dataclass
class RowSpaceResult:
    states: np.ndarray  # (n, V*F) normalised observations, flattened
    #: How many of the n states were found as consistent points (the first ``found`` rows);
    #: the rest are the nearest-to-consistent points left, or prior states.
    found: int
    #: Residual of each returned state (inf for prior states).
    residuals: np.ndarray


def layer_row_spaces(inp: AttackInput) -> dict[str, Tensor]:
    """Orthonormal basis (n, d+1) of the row space of ``[dW | db]`` for each linear layer
    but the last, keyed by module name (double precision)."""
    g = dict(zip(inp.params, inp.gradient))
    names = [n for n, m in inp.model.named_modules() if isinstance(m, nn.Linear)]
    spaces = {}
    for name in names[:-1]:
        if f"{name}.bias" not in g:
            continue
        m = torch.cat([g[f"{name}.weight"].double(), g[f"{name}.bias"].double()[:, None]], dim=1)
        _, sv, vh = torch.linalg.svd(m, full_matrices=False)
        rank = int(min(inp.n_transitions, int((sv > 1e-9 * sv[0]).sum())))
        spaces[name] = vh[:rank]
    return spaces


class _Residual:
    """Summed relative distance of each candidate's layer inputs from the layers' row spaces."""

    def __init__(self, inp: AttackInput, spaces: dict[str, Tensor]) -> None:
        self.inp, self.spaces = inp, spaces
        self.modules = dict(inp.model.named_modules())

    def __call__(self, x: Tensor, layers: list[str]) -> Tensor:
        feats: dict[str, Tensor] = {}
        hooks = [
            self.modules[name].register_forward_hook(lambda m, i, o, name=name: feats.__setitem__(name, i[0]))
            for name in layers
        ]
        try:
            functional_call(self.inp.model, self.inp.params, (x.reshape(-1, *self.inp.obs_shape),))
        finally:
            for h in hooks:
                h.remove()
        total = x.new_zeros(x.shape[0], dtype=torch.float64)
        for name in layers:
            a = feats[name].reshape(x.shape[0], -1).double()
            a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], dim=1)
            q = self.spaces[name]
            total = total + ((a - (a @ q.T) @ q) ** 2).sum(-1) / (a**2).sum(-1)
        return total


def recover_states(
    inp: AttackInput,
    seed: int,
    restarts: int = 1024,
    iterations: int = 300,
    lr: float = 0.01,
    starts: np.ndarray | None = None,
) -> RowSpaceResult:
    """The n states behind the update (see the module docstring).

    Half of the starts move within the first layer's affine subspace (few coordinates: best
    for small batches), half in the full observation space (more robust for large ones).
    ``starts`` (m, V*F) are extra starting points, e.g. the analytic attack's candidates.
    """
    n = inp.n_transitions
    d = int(np.prod(inp.obs_shape))
    spaces = layer_row_spaces(inp)
    layers = list(spaces)
    residual = _Residual(inp, spaces)
    space = first_layer_subspace(inp)
    prior = inp.priors.prior_states
    if space.dim == 0:  # one transition: the first layer alone gives it exactly
        x = space.p[None]
        return RowSpaceResult(x.numpy().copy(), 1, residual(x, layers).numpy())
    if len(layers) < 2:
        # one hidden layer: every point of the first layer's subspace is consistent, and
        # nothing here singles out the samples
        if starts is None:
            starts = np.asarray(prior)[:n] if prior is not None and len(prior) >= n else np.zeros((n, d))
        return RowSpaceResult(np.asarray(starts, dtype=np.float32).reshape(n, -1), 0, np.full(n, np.inf))
    gen = torch.Generator().manual_seed(seed)
    if prior is not None and len(prior):
        pool = torch.as_tensor(np.asarray(prior, dtype=np.float32)).reshape(len(prior), -1)
        x0 = pool[torch.randint(len(pool), (restarts,), generator=gen)]
    else:
        x0 = torch.randn(restarts, d, generator=gen) * 0.5
    if starts is not None and len(starts):
        x0 = torch.cat([torch.as_tensor(starts, dtype=torch.float32).reshape(len(starts), -1), x0])[:restarts]
    half = restarts // 2
    z = space.from_states(x0[:half]).clone().requires_grad_(True)
    x = x0[half:].clone().requires_grad_(True)
    deeper = layers[1:]

    def candidates() -> tuple[Tensor, Tensor]:
        xs = torch.cat([space.to_states(z), x])
        # within the subspace the first layer's condition holds by construction
        r_sub = residual(xs[:half], deeper)
        r_full = residual(xs[half:], layers)
        return xs, torch.cat([r_sub, r_full])

    opt = torch.optim.Adam([z, x], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iterations, eta_min=lr * 1e-3)
    for _ in range(iterations):
        opt.zero_grad()
        _, r = candidates()
        r.sum().backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        xs, _ = candidates()
        # score every point by the full condition, first layer included
        r = residual(xs, layers)
    return _select(xs.detach().double(), r, n, prior, seed)


def _select(xs: Tensor, r: Tensor, n: int, prior: np.ndarray | None, seed: int) -> RowSpaceResult:
    """n distinct consistent points, extreme ones first; the rest filled in (see RowSpaceResult)."""
    finite = torch.isfinite(r)
    best = float(r[finite].min()) if finite.any() else float("inf")
    threshold = max(1e-9, 100.0 * best)
    ok = torch.nonzero(finite & (r <= threshold)).flatten()
    ok = ok[torch.argsort(r[ok])]
    # cluster: a point joins the first (lower-residual) representative within tolerance
    reps: list[int] = []
    for i in ok.tolist():
        if not reps or torch.cdist(xs[i][None], xs[reps]).min() > 1e-4 * (1.0 + xs[i].norm()):
            reps.append(i)
    chosen: list[int] = []
    if reps:
        pts = torch.cat([xs[reps], torch.ones(len(reps), 1, dtype=xs.dtype)], dim=1)
        # greedy maximum volume: start from the point farthest from the centroid, then add the
        # point farthest from the affine span of those chosen
        centre = pts.mean(0)
        chosen.append(int((pts - centre).norm(dim=1).argmax()))
        while len(chosen) < min(n, len(reps)):
            basis, _ = torch.linalg.qr(pts[chosen].T)  # (d+1, k)
            rest = pts - (pts @ basis) @ basis.T
            dist = rest.norm(dim=1)
            dist[chosen] = -1.0
            j = int(dist.argmax())
            if dist[j] <= 1e-6 * (1.0 + pts[j].norm()):
                break
            chosen.append(j)
    picked = [reps[j] for j in chosen]
    found = len(picked)
    # Fill in: the lowest-residual points that are not the ones chosen (nearly consistent),
    # then the prior.
    for i in torch.argsort(torch.where(finite, r, torch.full_like(r, float("inf")))).tolist():
        if len(picked) >= n or not torch.isfinite(r[i]):
            break
        near = bool(picked) and bool(torch.cdist(xs[i][None], xs[picked]).min() <= 1e-3 * (1.0 + xs[i].norm()))
        if not near:
            picked.append(i)
    states = [xs[i].float().numpy() for i in picked]
    resid = [float(r[i]) for i in picked]
    rng = np.random.default_rng(seed)
    while len(states) < n:
        if prior is not None and len(prior):
            states.append(np.asarray(prior[rng.integers(len(prior))], dtype=np.float32).reshape(-1))
        else:
            states.append(np.zeros(xs.shape[1], dtype=np.float32))
        resid.append(float("inf"))
    return RowSpaceResult(np.stack(states), found, np.asarray(resid))
