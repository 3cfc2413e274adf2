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
5. **Completion.** Once r directions of the first layer's column space are known (r its rank),
   the inputs follow by least squares (SPEAR's completion, :func:`_complete_first_layer`). A
   trained network needs it most: most first-layer units are dead or always on across a batch
   and the samples that share an action also share the deeper patterns, so the last hidden
   layer separates only k < r groups, its row space holds group sums (no condition on one
   sample: only layers at the largest rank are searched) and the directions come from an
   enumeration instead (:func:`_pattern_directions`): the k groups from that layer's
   directions, the few units that vary inside a group from the first layer's column basis,
   every on/off pattern of those. A chosen set is certified when its terms, each taken with the
   patterns it was found with, reproduce every layer's gradient of the update (on one ReLU
   cell each layer's input is affine in the input, so a term's weighted sums follow from its
   row alone); each term whose input then lies in its own cell is a sample. Terms that do not
   (samples of one term whose weights have both signs) are what the update cannot split.

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

    def __init__(self, chain: Chain, grads: list[Tensor], n: int, floor: float = 1e-7, one_hot: bool = False, tol: float = 1e-9) -> None:
        self.chain = chain
        self.n_out = chain.layers[-1].weight.shape[0]
        #: every sample's output gradient lies along one output (DQN: dL/dQ is non-zero at the
        #: action taken only), so each output's own direction is tested, not their mixtures
        self.one_hot = one_hot
        #: the certification tolerance (squared relative residual) one-hot residuals are scaled to
        self.tol = tol
        L = len(chain.layers)
        self.svd = [torch.linalg.svd(g, full_matrices=False) for g in grads[: L - 1]]
        #: rank of every hidden layer's gradient: how many distinct rank-one terms it carries
        #: above the payload's noise floor (relative to the original gradient's largest singular value)
        self.rank = [_rank(sv, n, floor * float(self.svd[0][1][0]) / max(float(sv[0]), 1e-300)) for _, sv, _ in self.svd]
        self.grads = grads
        # row spaces of the hidden layers with rank room (not the output layer: its output
        # gradients are not independent, e.g. one-hot for DQN)
        # A layer's row space holds each sample's own input only where its output gradients
        # are independent (rank = the samples the update separates anywhere). Where samples
        # share their action and that layer's patterns onward, their output gradients there are
        # parallel and the row space holds only their weighted sums, not each input: such a
        # layer is no condition on one sample (a trained network's last hidden layer, often).
        room = [self.rank[k] for k, (_, _, vh) in enumerate(self.svd) if 0 < self.rank[k] < vh.shape[1]]
        self.separated = max(room, default=0)
        self.row = {k: vh[: self.rank[k]] for k, (_, _, vh) in enumerate(self.svd) if 0 < self.rank[k] < vh.shape[1] and self.rank[k] == self.separated}
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
        return self.pattern_maps([(z > 0).double() for z in pre[:-1]], k)

    def pattern_maps(self, masks: list[Tensor], k: int) -> Tensor:
        """``output_maps`` for given ReLU patterns: ``masks[j]`` (R, H_j) the on/off pattern of
        hidden layer j (only layers k and deeper are read)."""
        layers = self.chain.layers
        D = layers[-1].weight.T.expand(masks[-1].shape[0], -1, -1)
        for j in range(len(layers) - 2, k - 1, -1):
            D = masks[j][..., None] * D
            if j > k:
                D = torch.einsum("ih,rio->rho", layers[j].weight, D)
        return D

    def column_test(self, x: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """For each x: the smallest relative residual, over output gradients g, of the layer-k
        output gradient its patterns allow (``output_maps``) outside layer k's column space;
        that g (unit norm) and the direction it gives (R, H_k)."""
        return self._rayleigh(self.output_maps(x, k), k)

    def _rayleigh(self, D: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
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

    def directions(self, x: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """Candidate output gradients of each x at layer k: residuals (R, c), output gradients
        g (R, c, O) and the directions they give (R, c, H_k). One-hot outputs: each output on
        its own (c = O; two samples in one cell that took different actions give one candidate
        each, where the Rayleigh quotient would return a mixture); otherwise the best g (c = 1)."""
        return self.map_directions(self.output_maps(x, k), k)

    def map_directions(self, D: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """``directions`` for given maps D (R, H_k, O)."""
        if not self.one_hot:
            r, g, u = self._rayleigh(D, k)
            return r[:, None], g[:, None], u[:, None]
        U = self.col(k)
        W = U.T @ D  # (R, rank, O): the directions' coordinates in the column basis
        G = D - U @ W
        u2 = (D**2).sum(1).clamp_min(1e-300)
        # A term with a small singular value has a direction the payload's rounding blurs more
        # (by about noise / sigma_i): each coordinate's share of the tolerance follows it, so
        # the weak terms of a batch (small TD errors) pass the test they would fail at float
        # resolution, and the strong ones are held to it.
        _, sv, _ = self.svd[k]
        noise = float(sv[self.rank[k]]) if self.rank[k] < len(sv) else 0.0
        blur = ((W * (10.0 * noise / sv[: self.rank[k]].clamp_min(1e-300))[:, None]) ** 2).sum(1) / u2
        r = (G**2).sum(1) / u2 * (self.tol / (self.tol + blur))
        eye = torch.eye(D.shape[2], dtype=torch.float64).expand(D.shape[0], -1, -1)
        return r, eye, D.transpose(1, 2)


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
    one_hot: bool = False,
) -> ExactResult:
    """Up to n states certified from the update (see the module docstring).

    ``gradient`` is keyed like ``params`` (FedSGD: the gradient; FedAvg with one local step:
    -delta / lr). ``box`` (low, high) bounds the observation (flattened); starts are drawn in it.
    ``starts`` (m, d) are extra starting points. ``one_hot``: every sample's output gradient
    is non-zero at one output only (DQN's TD loss). Deterministic for a given seed.
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
    # every candidate point seen, for the first-layer completion; first the inputs the first
    # layer's gradient gives unit by unit (``dL/dW_j / dL/db_j``: weighted sums of the samples'
    # inputs, so on a trained network most lie among them, in cells the samples share)
    pool: list[Tensor] = [_unit_ratios(grads[0])]
    enumerated: Terms | None = None
    for rounds in range(1, max_rounds + 1):
        if remaining == 0:
            break
        search = _Search(chain, grads, remaining, floor, one_hot, tol)
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
        if rounds == 1:
            enumerated = _pattern_directions(first, pool[0], tol)
            stats["patterns_enumerated"] = float(len(enumerated))
        complete = _complete_first_layer(first, torch.cat(pool + found_x), tol, gen, dirs=enumerated)
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


def _pattern_directions(search: _Search, points: Tensor, tol: float, max_flips: int = 12) -> Terms:
    """Directions of the first layer's rank-one terms enumerated from ReLU patterns, for updates
    whose samples share most of their patterns (a trained network: most units dead or always on
    across the batch, a few cut through it). Returns the candidate terms (unit directions in the
    column space, with the patterns and output each comes from).

    The term of sample i has direction ``u_i = D(m_i) g_i``: the map its patterns give (see
    ``pattern_maps``) times its output gradient. Where the last hidden layer separates only
    k < r groups of samples (same action and deeper patterns; their output gradients there are
    parallel), that layer is disaggregated first: its k directions are enumerated from the
    deeper patterns of the attacker's points and the actions, and solving for its inputs gives
    each group's weighted sum of first-layer outputs, whose zeros are the units off for the whole
    group. Inside a group, only the units whose rows of the first layer's column basis lie off
    the k-dimensional subspace the other units' rows share (a robust fit: they stand out by
    orders of magnitude) can differ between samples; every on/off pattern of those is a
    candidate, kept where its direction lies in the column space. The samples' patterns are
    among them; what else passes (pattern combinations) the completion sorts out."""
    r, last = search.rank[0], search.last_hidden
    k = search.rank[last]
    none = Terms.empty(search)
    if r == 0 or 0 not in search.row or not 0 < k < r or not len(points):
        return none
    U = search.col(0)
    norms = U.norm(dim=1)
    live = norms > 1e-9 * norms.max()
    within = torch.zeros(len(U), dtype=torch.bool)
    within[torch.nonzero(live).flatten()[_off_subspace(U[live] / norms[live, None], k)]] = True
    _, pre = search.chain.forward(points)
    masks = [(z > 0).double() for z in pre[:-1]]
    groups = _groups(search, masks, tol) if last == 1 else []
    if not groups:  # the points' shared first-layer pattern, every deeper pattern and output
        first = masks[0].mean(0) > 0.5
        within |= masks[0].any(0).bool() & ~masks[0].all(0).bool() & live
        deeper = torch.unique(torch.cat(masks[1:], dim=1), dim=0)[:8]
        groups = [(first, list(torch.split(row, [m.shape[1] for m in masks[1:]])), None) for row in deeper]
    found = []
    for on, deep, action in groups:
        units = torch.nonzero(within & on).flatten()
        if len(units) > max_flips:
            continue
        flips = torch.cartesian_prod(*([torch.tensor([0.0, 1.0], dtype=torch.float64)] * len(units))).reshape(-1, len(units)) if len(units) else torch.zeros(1, 0, dtype=torch.float64)
        first = on.double().expand(len(flips), -1).clone()
        first[:, units] = flips
        masks_f = [first] + [d.expand(len(flips), -1) for d in deep]
        D = search.pattern_maps(masks_f, 0)
        if action is not None:
            D = D[..., action : action + 1]
        res, g, u = search.map_directions(D, 0)
        if action is not None:  # the one output, as a full output gradient
            g = torch.zeros(*g.shape[:2], search.n_out, dtype=torch.float64).index_fill_(2, torch.tensor([action]), 1.0)
        f, c = torch.nonzero(res < tol, as_tuple=True)
        u = u[f, c]
        found.append(Terms(u / u.norm(dim=1, keepdim=True).clamp_min(1e-300), [m[f] for m in masks_f], g[f, c]))
    return Terms.cat(found) if found else none


def _groups(search: _Search, masks: list[Tensor], tol: float) -> list[tuple[Tensor, list[Tensor], int | None]]:
    """The k groups the last hidden layer (here the second) separates, as (first-layer units on
    for some sample of the group, [the group's second-layer pattern], its output or None): its
    k directions from the points' second-layer patterns, then its inputs by least squares
    (each row a weighted sum of the group's first-layer outputs: zero where the whole group is
    off). Empty unless exactly k independent directions are found."""
    k = search.rank[1]
    patterns = torch.unique(masks[1], dim=0)
    res, _, u = search.map_directions(search.pattern_maps([masks[0][:1].expand(len(patterns), -1), patterns], 1), 1)
    which, outs = torch.nonzero(res < tol, as_tuple=True)
    dirs: list[Tensor] = []
    keys: list[tuple[int, int]] = []
    for p, o in zip(which.tolist(), outs.tolist()):
        v = u[p, o] / u[p, o].norm()
        if all(float((v @ w).abs()) < 1.0 - 1e-6 for w in dirs):
            dirs.append(v)
            keys.append((p, o))
    if len(dirs) != k or not _full_rank(torch.stack(dirs)):
        return []
    rows = lstsq(torch.stack(dirs).T, search.grads[1])  # (k, H_1 + 1): t_g [sum of outputs, count]
    mean = rows[:, :-1] / torch.where(rows[:, -1:].abs() < 1e-300, torch.ones_like(rows[:, -1:]), rows[:, -1:])
    out = []
    for (p, o), h in zip(keys, mean):
        on = h.abs() > 1e-6 * h.abs().max().clamp_min(1e-300)
        out.append((on, [patterns[p][None]], o if search.one_hot else None))
    return out


def _off_subspace(rows: Tensor, k: int, iterations: int = 5, trials: int = 64) -> Tensor:
    """Indices of the rows (m, r) that lie off the k-dimensional subspace most rows lie in.
    The few rows off it can carry the largest norms and would pull a plain fit towards them,
    so the first fit is the span of k rows that most rows lie near (random draws, fixed seed);
    then iterated fits on the rows below the widest gap (at least 100x) in their residuals."""
    if len(rows) <= k:
        return torch.zeros(0, dtype=torch.long)
    rng = np.random.default_rng(0)
    best, inside = -1, torch.ones(len(rows), dtype=torch.bool)
    for _ in range(trials):
        q, _ = torch.linalg.qr(rows[torch.as_tensor(rng.choice(len(rows), k, replace=False))].T)
        near = (rows - (rows @ q) @ q.T).norm(dim=1) < 1e-3
        if int(near.sum()) > best:
            best, inside = int(near.sum()), near
    if best <= k:
        inside = torch.ones(len(rows), dtype=torch.bool)
    for _ in range(iterations):
        _, _, vh = torch.linalg.svd(rows[inside], full_matrices=False)
        q = vh[:k].T
        res = torch.log10((rows - (rows @ q) @ q.T).norm(dim=1).clamp_min(1e-300))
        srt, _ = torch.sort(res)
        half = len(srt) // 2  # the rows off the subspace are a minority
        gaps = srt[half + 1 :] - srt[half:-1]
        if not len(gaps) or float(gaps.max()) < 2.0:
            return torch.zeros(0, dtype=torch.long)
        cut = float(srt[half + int(gaps.argmax())])
        new = res <= cut
        if bool((new == inside).all()):
            break
        inside = new
    return torch.nonzero(~inside).flatten()


def _unit_ratios(g: Tensor) -> Tensor:
    """``g[j, :-1] / g[j, -1]`` for the units j whose bias gradient is not zero."""
    b = g[:, -1]
    units = torch.nonzero(b.abs() > 1e-9 * b.abs().max().clamp_min(1e-300)).flatten()
    return g[units, :-1] / b[units, None]


def _newton_certified(search: _Search, x: Tensor, tol: float, limit: int) -> list[tuple[Tensor, Tensor]]:
    """Newton fixed points with zero residual in every row space, whose output gradient passes
    the last hidden layer's column test; chosen pairwise biorthogonal (module docstring)."""
    if search.rank[search.last_hidden] == 0 or not search.deep:
        # without a deeper row space every point of the first layer's subspace is a fixed point:
        # nothing to certify one point by (the completion alone can)
        return []
    r_row = search.residuals(x)
    ok = torch.isfinite(r_row) & (r_row < tol)
    if not bool(ok.any()):
        return []
    x, r_row = x[ok], r_row[ok]
    r_col, g_dir, _ = search.column_test(x, search.last_hidden)
    ok = r_col < tol
    return _select(search, x[ok], g_dir[ok], r_row[ok] + r_col[ok], limit, max(1e-4, 10.0 * tol**0.5))


def _complete_first_layer(search: _Search, x: Tensor, tol: float, gen: torch.Generator | None = None, swaps: int = 300, dirs: Terms | None = None) -> list[tuple[Tensor, Tensor]]:
    """SPEAR's completion: once the output-gradient directions of all r rank-one terms of the
    first layer's gradient are known (from candidates whose patterns pass the first layer's
    column test), the inputs follow by least squares, ``[t_i x_i, t_i] = (U^+ M)_i``; every
    solved input must reproduce, through its own patterns, the direction it was solved from.

    Trained networks give more candidate directions than terms: where samples differ in a few
    units, pattern combinations such as ``m_k + m_l - m_i`` give directions inside the column
    space that no sample has. A local search then picks r of them (most often hit first) and
    swaps out those whose solved inputs fail the check, until every one passes (or ``swaps``
    tries). Returns all r terms where a set passes and reproduces the update; else the terms
    that passed in the best set that reproduces it (the rest are merged samples), else the
    first set that passed without reproducing the deeper layers, else nothing."""
    r = search.rank[0]
    if r == 0 or 0 not in search.row:
        return []
    terms = Terms.of_points(search, x, tol)
    if dirs is not None:
        terms = Terms.cat([dirs, terms])
    same = 1.0 - max(1e-6, tol)
    cand: list[int] = []  # one term per direction
    hits: list[int] = []
    for t, v in enumerate(terms.u):
        if cand:
            c = (terms.u[cand] @ v).abs()
            j = int(c.argmax())
            if float(c[j]) >= same:
                hits[j] += 1
                continue
        cand.append(t)
        hits.append(1)
    if len(cand) < r:
        return []
    terms = terms.take(torch.tensor(cand))
    C = terms.u  # (c, H)
    order = sorted(range(len(cand)), key=lambda i: -hits[i])
    chosen = _independent(C, order, r)
    if chosen is None:
        return []
    rng = np.random.default_rng(0 if gen is None else int(torch.randint(2**31 - 1, (1,), generator=gen)))
    deep_tol = 1e-5 * max(1.0, (tol / 1e-9) ** 0.5)
    fallback: list[tuple[Tensor, Tensor]] = []  # the first set whose every term passed its own test
    partial: list[tuple[Tensor, Tensor]] = []  # the terms that passed in the best set that reproduces the update
    for _ in range(max(1, swaps)):
        U = C[chosen].T  # (H, r)
        W = lstsq(U, search.grads[0])  # (r, d+1): rows t_i [x_i, 1]
        scale = W[:, -1]
        xs = W[:, :-1] / torch.where(scale.abs() < 1e-300, torch.ones_like(scale), scale)[:, None]
        r_all, g_all, u_all = search.directions(xs, 0)
        # each solved input's candidate that is closest to its slot's direction
        cos_all = torch.einsum("rch,hr->rc", u_all / u_all.norm(dim=2, keepdim=True).clamp_min(1e-300), U)
        pick = torch.where(r_all < tol, cos_all.abs(), cos_all.abs() - 2.0).argmax(1)
        at = torch.arange(r)
        r2, g_dir, u2, cos = r_all[at, pick], g_all[at, pick], u_all[at, pick], cos_all[at, pick]
        good = (r2 < tol) & (cos.abs() > same) & (scale.abs() >= 1e-300)
        # output gradient at its scale: delta_i = t_i U_i, U_i = sign * D(x_i) g_dir_i / |D(x_i) g_dir_i|
        g = g_dir * (scale * torch.sign(cos) / u2.norm(dim=1))[:, None]
        # The chosen terms, each with the patterns and output it was found with, must
        # reproduce every layer's gradient of the update, not only the first layer's (which
        # they do by construction): directions of pattern combinations give inputs that can
        # each lie in their slot's cell, off the samples, and pass the per-term test. A set
        # that does is the update's decomposition; each term whose input lies in its own cell
        # is a sample. One that does not is a weighted sum of samples the update cannot split
        # (one term, weights of both signs: the point lies outside their cell).
        if _terms_residual(search, terms.take(torch.tensor(chosen)), W) < deep_tol:
            if bool(good.all()):
                return [(xs[i], g[i]) for i in range(r)]
            if int(good.sum()) > len(partial):
                partial = [(xs[i], g[i]) for i in torch.nonzero(good).flatten().tolist()]
        elif bool(good.all()):
            # kept unless a set that reproduces every layer turns up (terms of samples whose
            # directions nearly coincide leave more than the payload's noise in the deeper
            # layers: the first layer's rank merges them)
            fallback = fallback or [(xs[i], g[i]) for i in range(r)]
            good[:] = False
        # A chosen direction that no sample has (a pattern combination) still solves to a true
        # input: the slot of u' = u_k + u_l - u_i (one action, patterns adding up) solves to
        # x_i, and x_i's own direction is u_i. Where a solved input passes the column test with
        # a direction other than its slot's, that direction takes the slot (a fixed-point step).
        moved = False
        for i in torch.nonzero((r2 < tol) & (cos.abs() <= same)).flatten().tolist():
            v = u2[i] / u2[i].norm()
            c = (C @ v).abs()
            j = int(c.argmax())
            if float(c[j]) < same:
                terms = Terms.cat([terms, Terms.of_points(search, xs[i : i + 1], tol, keep=(pick[i : i + 1], v[None]))])
                C = terms.u
                hits.append(0)
                j = len(C) - 1
            keep = chosen[:i] + chosen[i + 1 :]
            if j not in chosen and _full_rank(C[keep + [j]]):
                chosen[i] = j
                moved = True
        if moved:
            continue
        if len(C) == r:
            return fallback or partial
        # swap one failing member for an unused candidate that keeps the set independent
        order = sorted(range(len(C)), key=lambda i: -hits[i])
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
            return fallback or partial
    return fallback or partial


@dataclass
class Terms:
    """Candidate rank-one terms of the first layer's gradient: unit directions u (c, H), the
    ReLU patterns they come from (one (c, H_l) tensor per hidden layer) and the output
    gradient g (c, O, unit scale) the patterns map to u."""

    u: Tensor
    masks: list[Tensor]
    g: Tensor

    @staticmethod
    def empty(search: _Search) -> "Terms":
        hidden = [layer.weight.shape[0] for layer in search.chain.layers[:-1]]
        z = torch.zeros(0, dtype=torch.float64)
        return Terms(z.new_zeros(0, hidden[0]), [z.new_zeros(0, h) for h in hidden], z.new_zeros(0, search.n_out))

    @staticmethod
    def cat(parts: list["Terms"]) -> "Terms":
        return Terms(torch.cat([p.u for p in parts]), [torch.cat(m) for m in zip(*[p.masks for p in parts])], torch.cat([p.g for p in parts]))

    def __len__(self) -> int:
        return len(self.u)

    def take(self, idx: Tensor) -> "Terms":
        return Terms(self.u[idx], [m[idx] for m in self.masks], self.g[idx])

    @staticmethod
    def of_points(search: _Search, x: Tensor, tol: float, keep: tuple[Tensor, Tensor] | None = None) -> "Terms":
        """The terms points x give at the first layer (``directions``) that pass its column
        test; ``keep`` (candidate index per point, direction) takes the given ones instead."""
        _, pre = search.chain.forward(x)
        masks = [(z > 0).double() for z in pre[:-1]]
        r, g, u = search.directions(x, 0)
        if keep is not None:
            p = torch.arange(len(x))
            return Terms(keep[1], masks, g[p, keep[0]])
        p, c = torch.nonzero(r < tol, as_tuple=True)
        u = u[p, c]
        return Terms(u / u.norm(dim=1, keepdim=True).clamp_min(1e-300), [m[p] for m in masks], g[p, c])


def _terms_residual(search: _Search, terms: Terms, W: Tensor) -> float:
    """The largest relative residual, over layers, of every layer's gradient of the update
    that the first layer's terms (directions ``terms.u``, rows ``W`` (r, d+1) of the
    least-squares solution) give when each term is taken as samples that share its patterns and
    output: on one ReLU cell every layer's input is affine in the input, so the term's weighted
    sums ``sum_s c_s [a_l(x_s), 1]`` follow from its row alone, whatever the samples' weights."""
    deltas, A = term_system(search.chain, terms.masks, terms.g)
    scale = torch.sign((deltas[0] * terms.u).sum(1)) / deltas[0].norm(dim=1).clamp_min(1e-300)
    y = W * scale[:, None]  # sum_s c_s [x_s, 1] for each term
    worst = 0.0
    for delta, a, grad in zip(deltas, A, search.grads):
        worst = max(worst, float((grad - delta.T @ torch.einsum("mkd,md->mk", a, y)).norm()) / max(float(grad.norm()), 1e-300))
    return worst


def term_system(chain: Chain, masks: list[Tensor], g: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """The update as a linear map of c terms' weighted sums ``y_j = sum_s c_s [x_s, 1]``, each
    term a class of samples sharing its ReLU patterns ``masks`` (one (c, H_l) tensor per hidden
    layer) and output gradient direction ``g`` (c, O): layer l's gradient is
    ``sum_j delta_l[j] (A_l[j] y_j)^T``. Returns ``delta_l`` (c, out_l), the output gradient
    mapped to layer l's output, and ``A_l`` (c, in_l + 1, d + 1), the affine map (on the term's
    cell) from ``[x, 1]`` to ``[layer l's input, 1]``."""
    layers = chain.layers
    c, d1 = len(g), chain.in_dim + 1
    deltas = [g]
    for j in range(len(layers) - 2, -1, -1):
        deltas.insert(0, masks[j] * (deltas[0] @ layers[j + 1].weight))
    A = [torch.eye(d1, dtype=torch.float64).expand(c, -1, -1)]
    one = torch.zeros(c, 1, d1, dtype=torch.float64)
    one[:, 0, -1] = 1.0
    for j, layer in enumerate(layers[:-1]):
        step = torch.cat([layer.weight, layer.bias[:, None]], dim=1)  # (H, in + 1)
        A.append(torch.cat([masks[j][..., None] * torch.einsum("hk,mkd->mhd", step, A[-1]), one], dim=1))
    return deltas, A


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
