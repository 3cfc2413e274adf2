"""Exact batch recovery from the algebra of the update (rgia-k's core), independent of priors.

For every linear layer ``z = W a + b`` of an MLP, the shared gradient is a sum of rank-one
terms, one per transition: ``[dL/dW | dL/db] = sum_i delta_i [a_i, 1]^T`` with ``a_i`` the
layer's input and ``delta_i = dL/dz_i``. With n transitions behind the update, the rows of that
matrix span the n inputs ``[a_i, 1]`` (its row space) and its columns span the n output
gradients ``delta_i`` (its column space), wherever the layer has rank room (n below its
width). This is the structure SPEAR (Dimitrov et al., 2024, "SPEAR: Exact Gradient Inversion of
Batches in Federated Learning", arXiv 2403.03945) disaggregates; we use it this way:

1. **Search.** A state x is consistent with the update when, at every layer with rank room,
   its own layer input ``[a_l(x), 1]`` lies in that layer's row space. On each cell of the
   network's ReLU arrangement (every unit's on/off pattern fixed) the layer inputs are affine in
   x, so the condition is a linear least-squares problem: from the current x, fix its
   patterns, solve for the x that satisfies the linearised conditions exactly, repeat
   (an active-set Newton method on a piecewise-linear system). A true sample is a fixed point
   with zero residual. The first layer's condition is linear everywhere: where it has room the
   search moves within that affine subspace (n - 1 coordinates). Many starts run as one
   batched problem; they are drawn uniformly in the observation box (the attacker's own
   rollouts and other attacks' candidates may be added, to speed it up; success does not depend
   on them, see the tests).
2. **Certification.** A point is certified when its residual is at float precision in every
   row space *and* the output gradient its own ReLU pattern allows at the last hidden layer,
   ``(W_L^T g) * relu'(z_{L-1}(x))`` for some output gradient g, lies in that layer's column
   space. The second test rejects the points that the row spaces alone cannot (affine
   combinations of two samples with the same first-layer pattern).
3. **Selection and scale.** True samples i != k satisfy ``[a_k, 1] M^+ delta_i = 0`` at the
   last hidden layer (M = that layer's gradient): the rank-one terms are biorthogonal under
   the pseudo-inverse, and ``1 / ([a_i, 1] M^+ delta_i)`` is the scale of sample i's output
   gradient. Certified points are chosen greedily under that condition.
4. **Peeling.** Each chosen sample's exact contribution to every layer's gradient (its own
   gradient, from x_i and its output gradient) is subtracted; the rest is a smaller batch whose
   layers have more rank room, searched again.

What the update provably cannot separate (two transitions with the same action and every ReLU
pattern, or duplicates) shows as a rank deficit; :func:`layer_ranks` measures it, and
:mod:`drivepriv.metrics.identifiability` counts, with the truth, the transitions it leaves apart.

Nothing here uses the truth: only the model, the parameters, the update and the observation box.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from drivepriv.attacks.base import lstsq


@dataclass
class Layer:
    """One ``nn.Linear`` of the chain, in double precision, with its gradient."""

    weight: Tensor  # (out, in)
    bias: Tensor  # (out,)
    g_weight: Tensor
    g_bias: Tensor

    @property
    def grad_matrix(self) -> Tensor:
        return torch.cat([self.g_weight, self.g_bias[:, None]], dim=1)


@dataclass
class ExactResult:
    """States certified from the update (normalised observations, flattened), their output
    gradients and the residual budget of what is left."""

    states: np.ndarray  # (k, d) certified states, k <= n
    output_grads: np.ndarray  # (k, O) dL/d(output) of each certified state, exact scale
    residual_norm: float  # relative norm of the gradient left after peeling every certified sample
    rounds: int = 0
    stats: dict[str, float] = field(default_factory=dict)


class Chain:
    """An MLP as the attacker sees it: ``Linear -> activation -> ... -> Linear``.

    Built from a module whose linear layers, in ``named_modules`` order, form one chain fed by
    the flattened observation (drivepriv's Q-networks and PPO's actor-critic; any
    ``nn.Sequential`` MLP). Activations must be ReLU for the exact method (piecewise linear).
    """

    def __init__(self, model: nn.Module, params: dict[str, Tensor], gradient: dict[str, Tensor]) -> None:
        mods = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.ReLU, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.GELU, nn.Sigmoid))]
        self.layers: list[Layer] = []
        self.names: list[str] = []
        self.piecewise_linear = True
        for name, m in mods:
            if isinstance(m, nn.Linear):
                if f"{name}.bias" not in params:
                    raise ValueError(f"layer {name} has no bias: the exact recovery needs biased linear layers")
                self.layers.append(
                    Layer(
                        params[f"{name}.weight"].detach().double(),
                        params[f"{name}.bias"].detach().double(),
                        gradient[f"{name}.weight"].detach().double(),
                        gradient[f"{name}.bias"].detach().double(),
                    )
                )
                self.names.append(name)
            elif not isinstance(m, nn.ReLU):
                self.piecewise_linear = False
        for a, b in zip(self.layers, self.layers[1:]):
            if a.weight.shape[0] != b.weight.shape[1]:
                raise ValueError("the model's linear layers do not form one chain")

    @property
    def in_dim(self) -> int:
        return self.layers[0].weight.shape[1]

    def forward(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Inputs of every linear layer and every hidden pre-activation, for x (R, d)."""
        inputs, pre = [x], []
        h = x
        for k, layer in enumerate(self.layers):
            z = h @ layer.weight.T + layer.bias
            if k == len(self.layers) - 1:
                return inputs, pre + [z]
            pre.append(z)
            h = torch.relu(z)
            inputs.append(h)
        raise AssertionError

    def per_sample_gradients(self, x: Tensor, g_out: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Summed (weight, bias) gradient contributions of samples x (k, d) whose output
        gradients are g_out (k, O): backpropagation through the fixed network."""
        inputs, pre = self.forward(x)
        delta = g_out
        out: list[tuple[Tensor, Tensor]] = []
        for k in range(len(self.layers) - 1, -1, -1):
            out.append((delta.T @ inputs[k], delta.sum(0)))
            if k:
                delta = (delta @ self.layers[k].weight) * (pre[k - 1] > 0).double()
        return out[::-1]


def _affine_subspace(v: Tensor) -> tuple[Tensor, Tensor]:
    """``x = p + z @ N``: the x with ``[x, 1]`` in the span of the rows of v (k, d+1)."""
    last = v[:, -1]
    c0 = last / (last @ last)
    p = (c0 @ v)[:-1]
    k = v.shape[0]
    q, _ = torch.linalg.qr(torch.cat([last[:, None], torch.eye(k, dtype=v.dtype)], dim=1))
    return p, (q[:, 1:k].T @ v)[:, :-1]


def _rank(sv: Tensor, cap: int, rel: float = 1e-7) -> int:
    """Numerical rank at float32 resolution (the client computed its gradient in float32)."""
    if not len(sv) or float(sv[0]) <= 0.0:
        return 0
    return int(min(cap, int((sv > rel * sv[0]).sum())))


class _Search:
    """One peeling round: the layers' spaces at their numerical ranks, the batched active-set
    Newton search and the certification tests (see the module docstring)."""

    def __init__(self, chain: Chain, grads: list[Tensor], n: int, floor: float = 1e-7) -> None:
        self.chain = chain
        L = len(chain.layers)
        self.svd = [torch.linalg.svd(g, full_matrices=False) for g in grads[: L - 1]]
        #: rank of every hidden layer's gradient: how many distinct rank-one terms it carries
        #: above the payload's noise floor (relative to the original gradient's largest singular value)
        self.rank = [_rank(sv, n, floor * float(self.svd[0][1][0]) / max(float(sv[0]), 1e-300)) for _, sv, _ in self.svd]
        self.grads = grads
        # row spaces of the hidden layers with rank room (not the output layer: its output
        # gradients are not independent, e.g. one-hot for DQN)
        self.row = {k: vh[: self.rank[k]] for k, (_, _, vh) in enumerate(self.svd) if 0 < self.rank[k] < vh.shape[1]}
        d = chain.in_dim
        if 0 in self.row:
            self.p, self.N = _affine_subspace(self.row[0])
        else:
            self.p, self.N = torch.zeros(d, dtype=torch.float64), torch.eye(d, dtype=torch.float64)
        self.deep = [k for k in self.row if k > 0]
        self.proj = {k: torch.eye(v.shape[1], dtype=torch.float64) - v.T @ v for k, v in self.row.items()}
        self.last_hidden = L - 2

    def col(self, k: int) -> Tensor:
        u, _, _ = self.svd[k]
        return u[:, : self.rank[k]]

    def pinv(self, k: int) -> Tensor:
        """Pseudo-inverse of layer k's gradient at its numerical rank (noise is not inverted)."""
        u, sv, vh = self.svd[k]
        r = self.rank[k]
        return vh[:r].T @ torch.diag(1.0 / sv[:r]) @ u[:, :r].T

    def project(self, x: Tensor) -> Tensor:
        """x projected onto the first layer's affine subspace (if it has one)."""
        z = lstsq(self.N.T, (x - self.p).T).T
        return self.p + z @ self.N

    def residuals(self, x: Tensor) -> Tensor:
        """Summed relative residual of each x's layer inputs outside the row spaces (R,)."""
        inputs, _ = self.chain.forward(x)
        total = torch.zeros(x.shape[0], dtype=torch.float64)
        for k in self.row:
            a = torch.cat([inputs[k], torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
            total = total + ((a @ self.proj[k]) ** 2).sum(1) / (a**2).sum(1)
        return total

    def newton(self, x0: Tensor, iterations: int) -> Tensor:
        """Fixed-pattern least-squares steps from x0 (R, d); returns the final points."""
        z = lstsq(self.N.T, (x0 - self.p).T).T
        if not self.deep:
            return self.p + z @ self.N
        layers = self.chain.layers
        for _ in range(iterations):
            x = self.p + z @ self.N
            inputs, pre = self.chain.forward(x)
            # layer inputs as affine maps of z on the current cell: a_k = J_k z + c_k
            J = self.N.T.expand(x.shape[0], -1, -1)  # d(x)/dz: (R, d, k)
            c = self.p.expand(x.shape[0], -1)
            rows, rhs = [], []
            for k in range(1, max(self.deep) + 1):
                mask = (pre[k - 1] > 0).double()
                W, b = layers[k - 1].weight, layers[k - 1].bias
                J = mask[..., None] * torch.einsum("ij,rjk->rik", W, J)
                c = mask * (c @ W.T + b)
                if k in self.row:
                    P = self.proj[k]
                    a_norm = (inputs[k].norm(dim=1, keepdim=True) ** 2 + 1.0).sqrt()[..., None]  # scale-free rows
                    rows.append(torch.einsum("ij,rjk->rik", P[:, :-1], J) / a_norm)
                    rhs.append(-(c @ P[:-1] + P[-1]) / a_norm[..., 0])
            A = torch.cat(rows, dim=1)
            y = torch.cat(rhs, dim=1)
            step = lstsq(A, y[..., None])[..., 0]
            bad = ~torch.isfinite(step).all(1)
            z = torch.where(bad[:, None], z, step)
        return self.p + z @ self.N

    def output_maps(self, x: Tensor, k: int) -> Tensor:
        """(R, H_k, O): the linear map from an output gradient g to the gradient of layer k's
        output that x's own ReLU patterns give, ``diag(m_k) W_{k+1}^T ... diag(m_{L-1}) W_L^T``."""
        _, pre = self.chain.forward(x)
        layers = self.chain.layers
        D = layers[-1].weight.T.expand(x.shape[0], -1, -1)
        for j in range(len(layers) - 2, k - 1, -1):
            D = (pre[j] > 0).double()[..., None] * D
            if j > k:
                D = torch.einsum("ih,rio->rho", layers[j].weight, D)
        return D

    def column_test(self, x: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """For each x: the smallest relative residual, over output gradients g, of the layer-k
        output gradient its patterns allow (``output_maps``) outside layer k's column space;
        that g (unit norm) and the direction it gives (R, H_k)."""
        D = self.output_maps(x, k)
        U = self.col(k)
        G = D - U @ (U.T @ D)  # D outside the column space (U is H x rank: cheaper than U U^T D)
        # generalised Rayleigh quotient min_g |G g|^2 / |D g|^2
        O = D.shape[2]
        a = G.transpose(1, 2) @ G
        b = D.transpose(1, 2) @ D
        b = b + 1e-12 * torch.diagonal(b, dim1=1, dim2=2).mean(1)[:, None, None] * torch.eye(O, dtype=torch.float64) + 1e-300
        inv = torch.linalg.inv(torch.linalg.cholesky(b))
        evals, evecs = torch.linalg.eigh(inv @ a @ inv.transpose(1, 2))
        g = (inv.transpose(1, 2) @ evecs[..., :1])[..., 0]
        g = g / g.norm(dim=1, keepdim=True)
        return evals[:, 0].clamp_min(0.0), g, (D @ g[..., None])[..., 0]


def recover_exact(
    model: nn.Module,
    params: dict[str, Tensor],
    gradient: dict[str, Tensor],
    n: int,
    box: tuple[np.ndarray, np.ndarray],
    seed: int,
    starts: np.ndarray | None = None,
    restarts: int = 512,
    iterations: int = 20,
    max_rounds: int = 6,
    tol: float = 1e-9,
    probes: int = 8192,
) -> ExactResult:
    """Up to n states certified from the update (see the module docstring).

    ``gradient`` is keyed like ``params`` (FedSGD: the gradient; FedAvg with one local step:
    -delta / lr). ``box`` (low, high) bounds the observation (flattened); starts are drawn in it.
    ``starts`` (m, d) are extra starting points. Deterministic for a given seed.
    """
    chain = Chain(model, params, gradient)
    n_out = chain.layers[-1].weight.shape[0]
    empty = ExactResult(np.zeros((0, chain.in_dim), np.float32), np.zeros((0, n_out)), 1.0)
    if not chain.piecewise_linear or len(chain.layers) < 2:
        return empty
    # The payload's own resolution: singular values past the n-th are rounding noise (float32
    # gradients: about 1e-8 of the largest; a FedAvg delta, new minus old parameters in float32,
    # far more). Ranks and tolerances follow it.
    sv = torch.linalg.svdvals(chain.layers[0].grad_matrix)
    noise = float(sv[n] / sv[0]) if n < len(sv) and float(sv[0]) > 0 else 0.0
    floor = max(1e-7, 10.0 * noise)
    tol = max(tol, min(1e-4, (200.0 * noise) ** 2))
    gen = torch.Generator().manual_seed(seed)
    grads = [layer.grad_matrix.clone() for layer in chain.layers]
    total_norm = float(torch.sqrt(sum((g**2).sum() for g in grads)))
    low = torch.as_tensor(np.asarray(box[0], dtype=np.float64).reshape(-1)).clamp(-10.0, 10.0)
    high = torch.as_tensor(np.asarray(box[1], dtype=np.float64).reshape(-1)).clamp(-10.0, 10.0)
    extra = None if starts is None or not len(starts) else torch.as_tensor(np.asarray(starts, dtype=np.float64).reshape(len(starts), -1))
    found_x: list[Tensor] = []
    found_g: list[Tensor] = []
    remaining = n
    stats: dict[str, float] = {}
    rounds = 0
    first: _Search | None = None
    pool: list[Tensor] = []  # every candidate point seen, for the first-layer completion
    for rounds in range(1, max_rounds + 1):
        if remaining == 0:
            break
        search = _Search(chain, grads, remaining, floor)
        if search.rank[0] == 0:
            break
        if first is None:
            first = search
            stats["rank_first_layer"] = float(search.rank[0])
            stats["rank_last_hidden"] = float(search.rank[-1])
            stats["noise_rel"] = noise
        x0 = low + (high - low) * torch.rand(restarts, chain.in_dim, generator=gen, dtype=torch.float64)
        if extra is not None and rounds == 1:
            x0 = torch.cat([extra, x0])
        x_newton = search.newton(x0, iterations)
        # pattern candidates: the Newton points, and points of this round's first-layer subspace
        probe = low + (high - low) * torch.rand(probes if rounds == 1 else restarts, chain.in_dim, generator=gen, dtype=torch.float64)
        pool += [x_newton, search.project(torch.cat([x0, probe]))]
        complete = _complete_first_layer(first, torch.cat(pool + found_x), tol, gen)
        if complete:
            # all of the update's first-layer terms at once, from the original gradient
            stats[f"round{rounds}_completed"] = float(len(complete))
            found_x = [torch.stack([c[0] for c in complete])]
            found_g = [torch.stack([c[1] for c in complete])]
            grads = [layer.grad_matrix.clone() for layer in chain.layers]
            contrib = chain.per_sample_gradients(found_x[0], found_g[0])
            grads = [g - torch.cat([cw, cb[:, None]], dim=1) for g, (cw, cb) in zip(grads, contrib)]
            break
        chosen = _newton_certified(search, x_newton, tol, remaining)
        if not chosen:
            break
        stats[f"round{rounds}_found"] = float(len(chosen))
        xs = torch.stack([c[0] for c in chosen])
        gs = torch.stack([c[1] for c in chosen])
        found_x.append(xs)
        found_g.append(gs)
        contrib = chain.per_sample_gradients(xs, gs)
        grads = [g - torch.cat([cw, cb[:, None]], dim=1) for g, (cw, cb) in zip(grads, contrib)]
        remaining -= len(chosen)
    left = float(torch.sqrt(sum((g**2).sum() for g in grads))) / max(total_norm, 1e-300)
    if not found_x:
        return empty
    return ExactResult(torch.cat(found_x).float().numpy(), torch.cat(found_g).numpy(), left, rounds, stats)


def _newton_certified(search: _Search, x: Tensor, tol: float, limit: int) -> list[tuple[Tensor, Tensor]]:
    """Newton fixed points with zero residual in every row space, whose output gradient passes
    the last hidden layer's column test; chosen pairwise biorthogonal (module docstring)."""
    if search.rank[search.last_hidden] == 0:
        return []
    r_row = search.residuals(x)
    ok = torch.isfinite(r_row) & (r_row < tol)
    if not bool(ok.any()):
        return []
    x, r_row = x[ok], r_row[ok]
    r_col, g_dir, _ = search.column_test(x, search.last_hidden)
    ok = r_col < tol
    return _select(search, x[ok], g_dir[ok], r_row[ok] + r_col[ok], limit, max(1e-4, 10.0 * tol**0.5))


def _complete_first_layer(search: _Search, x: Tensor, tol: float, gen: torch.Generator | None = None, swaps: int = 300) -> list[tuple[Tensor, Tensor]]:
    """SPEAR's completion: once the output-gradient directions of all r rank-one terms of the
    first layer's gradient are known (from candidates whose patterns pass the first layer's
    column test), the inputs follow by least squares, ``[t_i x_i, t_i] = (U^+ M)_i``; every
    solved input must reproduce, through its own patterns, the direction it was solved from.

    Trained networks give more candidate directions than terms: where samples differ in a few
    units, pattern combinations such as ``m_k + m_l - m_i`` give directions inside the column
    space that no sample has. A local search then picks r of them (most often hit first) and
    swaps out those whose solved inputs fail the check, until every one passes (or ``swaps``
    tries). Returns nothing unless all r terms pass."""
    r = search.rank[0]
    if r == 0 or 0 not in search.row:
        return []
    r_col, _, u = search.column_test(x, 0)
    ok = torch.nonzero(r_col < tol).flatten()
    u = u[ok] / u[ok].norm(dim=1, keepdim=True)
    same = 1.0 - max(1e-6, tol)
    cand: list[Tensor] = []
    hits: list[int] = []
    for v in u:
        if cand:
            c = (torch.stack(cand) @ v).abs()
            j = int(c.argmax())
            if float(c[j]) >= same:
                hits[j] += 1
                continue
        cand.append(v)
        hits.append(1)
    if len(cand) < r:
        return []
    C = torch.stack(cand)  # (c, H)
    order = sorted(range(len(cand)), key=lambda i: -hits[i])
    chosen = _independent(C, order, r)
    if chosen is None:
        return []
    rng = np.random.default_rng(0 if gen is None else int(torch.randint(2**31 - 1, (1,), generator=gen)))
    for _ in range(max(1, swaps)):
        U = C[chosen].T  # (H, r)
        W = lstsq(U, search.grads[0])  # (r, d+1): rows t_i [x_i, 1]
        scale = W[:, -1]
        xs = W[:, :-1] / torch.where(scale.abs() < 1e-300, torch.ones_like(scale), scale)[:, None]
        r2, g_dir, u2 = search.column_test(xs, 0)
        cos = (u2 / u2.norm(dim=1, keepdim=True) * U.T).sum(1)
        good = (r2 < tol) & (cos.abs() > same) & (scale.abs() >= 1e-300)
        if bool(good.all()):
            # output gradient at its scale: delta_i = t_i U_i, U_i = sign * D(x_i) g_dir_i / |D(x_i) g_dir_i|
            g = g_dir * (scale * torch.sign(cos) / u2.norm(dim=1))[:, None]
            return [(xs[i], g[i]) for i in range(r)]
        if len(cand) == r:
            return []
        # swap one failing member for an unused candidate that keeps the set independent
        bad = [chosen[i] for i in torch.nonzero(~good).flatten().tolist()]
        out = bad[int(rng.integers(len(bad)))]
        unused = [i for i in order if i not in chosen]
        rng.shuffle(unused)
        keep = [i for i in chosen if i != out]
        # keep is independent (a subset of an independent set), so only the new row is tested
        for j in unused:
            if _full_rank(C[keep + [j]]):
                chosen = keep + [j]
                break
        else:
            return []
    return []


def _independent(C: Tensor, order: list[int], r: int) -> list[int] | None:
    """The first r rows of C, in ``order``, that are linearly independent (or None)."""
    picked: list[int] = []
    for i in order:
        trial = picked + [i]
        if _full_rank(C[trial]):
            picked = trial
            if len(picked) == r:
                return picked
    return None


def _full_rank(M: Tensor) -> bool:
    """The rows of M are linearly independent (to a relative 1e-6)."""
    sv = torch.linalg.svdvals(M)
    return float(sv[-1]) > 1e-6 * float(sv[0])


def _select(search: _Search, x: Tensor, g_dir: Tensor, resid: Tensor, limit: int, apart: float = 1e-4) -> list[tuple[Tensor, Tensor]]:
    """Distinct certified points, pairwise biorthogonal under the last hidden layer's
    pseudo-inverse, with their output gradients at their exact scale."""
    if not len(x):
        return []
    chain = search.chain
    order = torch.argsort(resid)
    reps: list[int] = []
    for i in order.tolist():
        if not reps or torch.cdist(x[i][None], x[reps]).min() > 1e-6 * (1.0 + x[i].norm()):
            reps.append(i)
    x, g_dir, resid = x[reps], g_dir[reps], resid[reps]
    inputs, pre = chain.forward(x)
    k = search.last_hidden
    v = torch.cat([inputs[k], torch.ones(len(x), 1, dtype=x.dtype)], dim=1)  # rows [a_i, 1]
    u = (g_dir @ chain.layers[-1].weight) * (pre[-2] > 0).double()  # columns delta_i (direction)
    cross = v @ search.pinv(k) @ u.T  # (c, c): [a_c, 1] M^+ delta_k
    own = torch.diagonal(cross)
    scale = cross.abs() / (own.abs()[:, None] * own.abs()[None, :]).sqrt().clamp_min(1e-300)
    conflicts = (scale > apart).sum(1) - 1
    chosen: list[int] = []
    for i in sorted(range(len(x)), key=lambda i: (int(conflicts[i]), float(resid[i]))):
        if own[i].abs() < 1e-300:
            continue
        if all(scale[i, j] <= apart and scale[j, i] <= apart for j in chosen):
            chosen.append(i)
        if len(chosen) == limit:
            break
    # output gradient at its exact scale: M = sum_i t_i delta_i v_i^T with t_i = 1 / (v_i M^+ delta_i)
    return [(x[i], g_dir[i] / own[i]) for i in chosen]


def layer_ranks(model: nn.Module, params: dict[str, Tensor], gradient: dict[str, Tensor], n: int) -> dict[str, int]:
    """Per linear layer, how many distinct rank-one terms its gradient carries at float32
    resolution (at most n, the transitions behind the update; fewer where the update merges
    transitions it cannot split)."""
    chain = Chain(model, params, gradient)
    return {name: _rank(torch.linalg.svdvals(layer.grad_matrix), n) for name, layer in zip(chain.names, chain.layers)}
