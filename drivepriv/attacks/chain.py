"""The network as the exact recovery sees it (:mod:`drivepriv.attacks.exact`): the chain of
linear layers with their gradients in double precision, the numerical ranks of the update's
layers, one peeling round's search (the layers' row and column spaces, the batched active-set
Newton steps, the certification tests) and the update as a linear map of its terms' weighted
sums (:func:`term_system`, read by the completion and by
:mod:`drivepriv.metrics.identifiability`).

Nothing here uses the truth: only the model, the parameters and the update.
"""

from __future__ import annotations

from dataclasses import dataclass

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



class Search:
    """One peeling round: the layers' spaces at their numerical ranks, the batched active-set
    Newton search and the certification tests (see the module docstring)."""

    def __init__(self, chain: Chain, grads: list[Tensor], n: int, floor: float = 1e-7, one_hot: bool = False, tol: float = 1e-9, every_layer: bool = False) -> None:
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
        # ``every_layer``: the layers below that rank too. Their row spaces still hold the
        # input of every sample whose output gradient no other sample's parallels there (one
        # pair of an untrained 64-wide network's batch sharing the last hidden layer's pattern
        # and action takes that layer out otherwise, and with it every condition beyond the
        # first layer's subspace): a condition on those samples, not on the merged ones.
        room = [self.rank[k] for k, (_, _, vh) in enumerate(self.svd) if 0 < self.rank[k] < vh.shape[1]]
        self.separated = max(room, default=0)
        self.row = {k: vh[: self.rank[k]] for k, (_, _, vh) in enumerate(self.svd) if 0 < self.rank[k] < vh.shape[1] and (every_layer or self.rank[k] == self.separated)}
        d = chain.in_dim
        _, _, vh0 = self.svd[0]
        corank = sum(vh.shape[1] - self.rank[k] for k, (_, _, vh) in enumerate(self.svd) if k in self.row and k > 0)
        if 0 not in self.row and 0 < self.rank[0] < vh0.shape[1] and corank < d:
            # The deeper row spaces alone leave a continuum of fixed points (fewer conditions
            # than input coordinates: MetaDrive's 261 inputs against 256-wide layers), so no
            # sample could be found or certified in the whole input space. The first layer's
            # lower rank then comes from inputs that are nearly affinely dependent (consecutive
            # transitions of one drive differ in few features), not only from shared patterns,
            # and the samples lie in its row space: the search moves within it.
            self.row[0] = vh0[: self.rank[0]]
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
        """Fixed-pattern least-squares steps from x0 (R, d); returns the final points. A point
        stops where its step no longer moves it (a fixed point on its cell)."""
        z = lstsq(self.N.T, (x0 - self.p).T).T
        if not self.deep or not self.N.shape[0]:
            return self.p + z @ self.N
        layers = self.chain.layers
        # the first layer's input is affine in z everywhere: a_1 = mask * (W_1 N^T z + W_1 p + b_1)
        first_J = layers[0].weight @ self.N.T
        first_c = self.p @ layers[0].weight.T + layers[0].bias
        moving = torch.arange(len(z))
        for _ in range(iterations):
            zm = z[moving]
            x = self.p + zm @ self.N
            inputs, pre = self.chain.forward(x)
            R = len(zm)
            # layer inputs as affine maps of z on the current cell: a_k = J_k z + c_k
            rows, rhs = [], []
            for k in range(1, max(self.deep) + 1):
                mask = (pre[k - 1] > 0).double()
                if k == 1:
                    J, c = mask[..., None] * first_J, mask * first_c
                else:
                    W, b = layers[k - 1].weight, layers[k - 1].bias
                    J = mask[..., None] * torch.einsum("ij,rjk->rik", W, J)
                    c = mask * (c @ W.T + b)
                if k in self.row:
                    # the residual outside the row space, (I - V^T V) [a, 1], with V's few
                    # orthonormal rows (cheaper than the full projector)
                    V = self.row[k]
                    a_norm = (inputs[k].norm(dim=1, keepdim=True) ** 2 + 1.0).sqrt()[..., None]  # scale-free rows
                    Ja = torch.cat([J, torch.zeros(R, 1, J.shape[2], dtype=J.dtype)], dim=1)
                    rows.append((Ja - torch.einsum("ji,rjk->rik", V, torch.einsum("ij,rjk->rik", V[:, :-1], J))) / a_norm)
                    ca = torch.cat([c, torch.ones(R, 1, dtype=c.dtype)], dim=1)
                    rhs.append(-(ca - (ca @ V.T) @ V) / a_norm[..., 0])
            A = torch.cat(rows, dim=1)
            y = torch.cat(rhs, dim=1)
            step = lstsq(A, y[..., None])[..., 0]
            bad = ~torch.isfinite(step).all(1)
            step = torch.where(bad[:, None], zm, step)
            z = z.index_copy(0, moving, step)
            moving = moving[(step - zm).norm(dim=1) > 1e-12 * (1.0 + zm.norm(dim=1))]
            if not len(moving):
                break
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



def term_grams(deltas: list[Tensor], A: list[Tensor]) -> list[Tensor]:
    """Per layer, the Gram matrix (c (d+1), c (d+1)) of :func:`term_system`'s map to that
    layer's gradient."""
    c, _, d1 = A[0].shape
    return [torch.einsum("pq,pki,qkj->piqj", delta @ delta.T, a, a).reshape(c * d1, c * d1) for delta, a in zip(deltas, A)]


def term_gram(deltas: list[Tensor], A: list[Tensor]) -> Tensor:
    """The Gram matrix (c (d+1), c (d+1)) of :func:`term_system`'s map (all layers)."""
    grams = term_grams(deltas, A)
    return sum(grams[1:], grams[0])


def term_kernel(gram: Tensor, c: int, tol: float) -> Tensor:
    """Per term, how far its block moves along the kernel of the column-normalised Gram matrix
    (relative singular values below ``tol``): (c,), zero where the update determines it."""
    scale = gram.diagonal().clamp_min(1e-300).rsqrt()
    evals, evecs = torch.linalg.eigh(scale[:, None] * gram * scale[None, :])
    kernel = evecs[:, evals < (tol**2) * evals[-1].clamp_min(1e-300)]
    moved = kernel.reshape(c, -1, kernel.shape[1]).norm(dim=(1, 2)) if kernel.shape[1] else torch.zeros(c, dtype=torch.float64)
    return moved



def layer_ranks(model: nn.Module, params: dict[str, Tensor], gradient: dict[str, Tensor], n: int) -> dict[str, int]:
    """Per linear layer, how many distinct rank-one terms its gradient carries at float32
    resolution (at most n, the transitions behind the update; fewer where the update merges
    transitions it cannot split)."""
    chain = Chain(model, params, gradient)
    return {name: _rank(torch.linalg.svdvals(layer.grad_matrix), n) for name, layer in zip(chain.names, chain.layers)}
