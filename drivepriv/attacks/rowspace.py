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
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from drivepriv.attacks.base import AttackInput
from drivepriv.attacks.chain import Chain
from drivepriv.attacks.engine import first_layer_subspace


@dataclass
class RowSpaceResult:
    states: np.ndarray  # (n, V*F) normalised observations, flattened
    #: How many of the n states were found as consistent points (the first ``found`` rows);
    #: the rest are the nearest-to-consistent points left, or prior states.
    found: int
    #: Residual of each returned state (inf for prior states).
    residuals: np.ndarray
    #: Smooth activations only: how many of the first ``found`` rows the row spaces certify
    #: (residual at their float precision, :data:`CERTIFIED`) after :func:`polish`.
    certified: int = 0


#: The summed relative residual at which a polished point is a sample: the row spaces of a
#: float32 gradient hold the samples' layer inputs to about 1e-6 (measured on PPO's tanh
#: actor-critic, merge, B = 8, FedSGD: the samples at 1e-14 to 3e-12, points 6e-3 to 1e-2 from
#: one at 3e-10 to 9e-10; under FedAvg with 16 local steps the polished points stop at 1e-7 to
#: 1e-6, centimetres to metres from any sample).
CERTIFIED = 1e-11
#: How many candidates per transition are polished at a time, the best first, and how many
#: times (fewer where n distinct samples are certified sooner).
POLISHED = 4
POLISH_ROUNDS = 4
#: Smooth activations: Gauss-Newton starts drawn uniformly in the observation box (8 per
#: transition where that is more).
BOX_STARTS = 64


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
    xs = xs.detach().double()
    chain = Chain(inp.model, inp.params, dict(zip(inp.params, inp.gradient)))
    if not chain.piecewise_linear:
        # smooth activations: Gauss-Newton converges onto the samples, to the float precision of
        # the row spaces, from starts anywhere in the observation box (measured on merge, B = 8:
        # 64 of 64 uniform starts, projected on the first layer's subspace, reach a sample, and
        # all 8 samples are among them) and from the search's best candidates
        low, high = (torch.as_tensor(np.asarray(b, dtype=np.float32).reshape(-1)) for b in inp.priors.codec.box())
        uniform = low + (high - low) * torch.rand(max(BOX_STARTS, 8 * n), d, generator=gen)
        smooth = row_space_residual(inp, spaces, chain)
        xb, rb = polish(smooth, space.to_states(space.from_states(uniform)).double())
        xs, r = torch.cat([xb, xs]), torch.cat([rb, r.double()])
        done = torch.zeros(len(xs), dtype=torch.bool)
        done[: len(xb)] = True
        for _ in range(POLISH_ROUNDS):  # until n distinct samples are certified
            best = _distinct(xs, torch.where(done, torch.full_like(r, float("inf")), r), int(POLISHED * n))
            if not len(best):
                break
            xs[best], r[best] = polish(smooth, xs[best])
            done[best] = True
            certified = len(_distinct(xs, torch.where(r <= CERTIFIED, r, torch.full_like(r, float("inf"))), n))
            if certified >= n or certified == 0:  # all found, or the row spaces certify no point at all
                break
        # the polished points alone: an unpolished one within the threshold is millimetres off
        result = _select(xs, torch.where(done, r, torch.full_like(r, float("inf"))), n, prior, seed)
        result.certified = int((result.residuals[: result.found] <= CERTIFIED).sum())
        return result
    return _select(xs, r, n, prior, seed)


def _distinct(xs: Tensor, r: Tensor, m: int) -> Tensor:
    """The indices of up to m candidates, the lowest residual first, each 1e-3 (relative) away
    from those before it (many starts converge to one point)."""
    order = torch.argsort(torch.where(torch.isfinite(r), r, torch.full_like(r, float("inf"))), stable=True)
    order = order[torch.isfinite(r[order])]
    chosen: list[int] = []
    for i in order.tolist():
        if not chosen or torch.cdist(xs[i][None], xs[chosen]).min() > 1e-3 * (1.0 + xs[i].norm()):
            chosen.append(i)
            if len(chosen) == m:
                break
    return torch.as_tensor(chosen, dtype=torch.long)


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


def row_space_residual(inp: AttackInput, spaces: dict[str, Tensor], chain: Chain) -> Callable[[Tensor], Tensor]:
    """The residual vector of one candidate x (d,), in double precision: at every layer with a
    row space, the part of its layer input ``[a_l(x), 1]`` outside that space, relative to the
    input's norm (its squared norm is the search's summed relative distance). A pure function of
    x, for :func:`torch.func.jacrev`; the network's activation is its first one."""
    act = next(m for m in inp.model.modules() if isinstance(m, (nn.Tanh, nn.Sigmoid, nn.ELU, nn.GELU, nn.LeakyReLU, nn.ReLU)))
    projectors = {k: torch.eye(spaces[n].shape[1], dtype=torch.float64) - spaces[n].T @ spaces[n] for k, n in enumerate(chain.names) if n in spaces}

    def residual(x: Tensor) -> Tensor:
        h, parts = x, []
        for k, layer in enumerate(chain.layers[:-1]):
            if k in projectors:
                a = torch.cat([h, h.new_ones(1)])
                parts.append(projectors[k] @ a / a.norm())
            h = act(layer.weight @ h + layer.bias)
        return torch.cat(parts)

    return residual


def polish(residual: Callable[[Tensor], Tensor], xs: Tensor, iterations: int = 20) -> tuple[Tensor, Tensor]:
    """Gauss-Newton on the row-space conditions of every layer (``residual``, see
    :func:`row_space_residual`), in double precision: candidates ``xs`` (m, d) near true samples
    converge to them quadratically. For networks with smooth activations (PPO's tanh), where the
    exact module's piecewise-linear search does not apply and the search above stops at about
    1e-3 of the truth. Returns the points and their residuals (the same summed relative distance
    as the search's)."""
    jac = torch.func.vmap(torch.func.jacrev(residual))
    res = torch.func.vmap(residual)
    x = xs.double().clone()
    r = res(x)
    scales = torch.tensor([1.0, 0.5, 0.25, 0.125, 0.0625], dtype=torch.float64)
    for _ in range(iterations):
        # Gauss-Newton step (minimum norm: the residual is flat along some directions), the
        # longest of a few fractions of it that lowers the residual
        step = torch.linalg.lstsq(jac(x), -r[..., None], driver="gelsd").solution[..., 0]
        trial = x[:, None, :] + scales[None, :, None] * step[:, None, :]  # (m, T, d)
        r_trial = res(trial.reshape(-1, x.shape[1])).reshape(len(x), len(scales), -1)
        cost = (r_trial**2).sum(-1)
        k = cost.argmin(1)
        better = cost[torch.arange(len(x)), k] < (r**2).sum(-1)
        if not bool(better.any()):
            break
        x = torch.where(better[:, None], trial[torch.arange(len(x)), k], x)
        r = torch.where(better[:, None], r_trial[torch.arange(len(x)), k], r)
    return x, (r**2).sum(-1)
