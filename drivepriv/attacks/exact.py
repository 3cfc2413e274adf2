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
   combinations of two samples with the same first-layer pattern). DQN's output gradients are
   one-hot and at most 1 / B (the Huber loss), so each output is tested on its own and a term's
   scale (step 3) must stay within that bound and, where the first layer holds every term,
   agree with its scale there. Points that fail only these DQN tests are peeled tentatively
   where nothing is certified: the next rounds search elsewhere, nothing is certified from them.
3. **Selection and scale.** True samples i != k satisfy ``[a_k, 1] M^+ delta_i = 0`` at the
   last hidden layer (M = that layer's gradient): the rank-one terms are biorthogonal under
   the pseudo-inverse, and ``1 / ([a_i, 1] M^+ delta_i)`` is the scale of sample i's output
   gradient. Certified points are chosen greedily under that condition.
4. **Peeling.** Each chosen sample's exact contribution to every layer's gradient (its own
   gradient, from x_i and its output gradient) is subtracted; the rest is a smaller batch whose
   layers have more rank room, searched again.
   Each round's estimates carry the earlier rounds' errors, and where the last samples then
   fail their tests, all the terms are solved together from the original update
   (:func:`_certify_jointly`) and certified as a set.
5. **Completion.** Once r directions of the first layer's column space are known (r its rank),
   the inputs follow by least squares (SPEAR's completion, :func:`drivepriv.attacks.completion.complete_first_layer`). A
   trained network needs it most: most first-layer units are dead or always on across a batch
   and the samples that share an action also share the deeper patterns, so the last hidden
   layer separates only k < r groups, its row space holds group sums (no condition on one
   sample: only layers at the largest rank are searched) and the directions come from an
   enumeration instead (:func:`drivepriv.attacks.completion.pattern_directions`): the k groups from that layer's
   directions, the few units that vary inside a group from the first layer's column basis,
   every on/off pattern of those. A chosen set is certified when its terms, each taken with the
   patterns it was found with, reproduce every layer's gradient of the update (on one ReLU
   cell each layer's input is affine in the input, so a term's weighted sums follow from its
   row alone); each term whose input then lies in its own cell is a sample. Terms that do not
   (samples of one term whose weights have both signs) are what the update cannot split.
6. **Dependent terms.** Where a unit flips inside several groups of samples that share an
   action, the groups' terms differ by the same direction and the first layer carries fewer
   independent terms than classes of samples: no r terms decompose the update. The candidate
   terms are then solved together at every layer, the superfluous ones dropped, and the
   terms that set of terms determines (no direction of its kernel moves them) are certified
   (:func:`drivepriv.attacks.completion.complete_dependent`).

What the update provably cannot separate (two transitions with the same action and every ReLU
pattern, or duplicates) shows as a rank deficit; :func:`drivepriv.attacks.chain.layer_ranks` measures it, and
:mod:`drivepriv.metrics.identifiability` counts, with the truth, the transitions it leaves apart.

Nothing here uses the truth: only the model, the parameters, the update and the observation box.
"""


from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from drivepriv.attacks.base import full_rank, lstsq
from drivepriv.attacks.chain import Chain, Search, term_system
from drivepriv.attacks.completion import Terms, complete_dependent, complete_first_layer, deep_tolerance, pattern_directions


@dataclass
class ExactResult:
    """States certified from the update (normalised observations, flattened), their output
    gradients and the residual budget of what is left."""

    states: np.ndarray  # (k, d) certified states, k <= n
    output_grads: np.ndarray  # (k, O) dL/d(output) of each certified state, exact scale
    residual_norm: float  # relative norm of the gradient left after peeling every certified sample
    rounds: int = 0
    stats: dict[str, float] = field(default_factory=dict)



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
    every_layer: bool = False,
    sample_output_grad: float = float("inf"),
    one_step: bool = True,
) -> ExactResult:
    """Up to n states certified from the update (see the module docstring).

    ``gradient`` is keyed like ``params`` (FedSGD: the gradient; FedAvg with one local step:
    -delta / lr). ``box`` (low, high) bounds the observation (flattened); starts are drawn in it.
    ``starts`` (m, d) are extra starting points. ``one_hot``: every sample's output gradient
    is non-zero at one output only (DQN's TD loss). ``every_layer``: the search's conditions
    include the row spaces of the layers below the largest rank (``Search``); with one-hot
    outputs, where the recovery certifies nothing without them and such a layer has at least
    half that rank, it is run again with them. ``sample_output_grad``: the largest output gradient
    (max norm) of one sample (DQN's Huber loss: ``1 / B``). A term of the last hidden layer, where
    its scale is read, merges at most ``n - r + 1`` samples (r: the larger of that layer's and the
    first layer's rank), so a Newton point whose exact scale exceeds that many samples' is no sample. ``one_step``: the update is
    one gradient (FedSGD, or FedAvg with one local step), so each term has one scale at every
    layer; under several local steps the layers hold terms at different parameters and DQN's
    tests (one output, the bound, one scale) are not applied. Deterministic for a given seed.
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
    tentative = 0  # terms peeled tentatively (not certified) to move the search
    stats: dict[str, float] = {"every_layer": 1.0} if every_layer else {}
    rounds = 0
    first: Search | None = None
    # every candidate point seen, for the first-layer completion; first the inputs the first
    # layer's gradient gives unit by unit (``dL/dW_j / dL/db_j``: weighted sums of the samples'
    # inputs, so on a trained network most lie among them, in cells the samples share)
    pool: list[Tensor] = [_unit_ratios(grads[0])]
    enumerated: Terms | None = None
    last: tuple[Search, Tensor] | None = None  # the last round's search and Newton points
    completed = False
    memo: dict = {}  # the completion's terms and merge of the pool so far (it only grows)
    for rounds in range(1, max_rounds + 1):
        if remaining - tentative <= 0:
            break
        search = Search(chain, grads, remaining - tentative, floor, one_hot, tol, every_layer)
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
        last = (search, x_newton)
        # pattern candidates: the Newton points, and points of this round's first-layer subspace
        probe = low + (high - low) * torch.rand(probes if rounds == 1 else restarts, chain.in_dim, generator=gen, dtype=torch.float64)
        pool += [x_newton, search.project(torch.cat([x0, probe]))]
        if rounds == 1:
            enumerated = pattern_directions(first, pool[0], tol)
            stats["patterns_enumerated"] = float(len(enumerated))
        complete = complete_first_layer(first, torch.cat(pool + found_x), tol, gen, dirs=enumerated, memo=memo, stable=sum(len(p) for p in pool))
        if complete:
            # all of the update's first-layer terms at once, from the original gradient
            stats[f"round{rounds}_completed"] = float(len(complete))
            found_x = [torch.stack([c[0] for c in complete])]
            found_g = [torch.stack([c[1] for c in complete])]
            grads = _peeled(chain, [layer.grad_matrix for layer in chain.layers], found_x[0], found_g[0])
            completed = True
            break
        # DQN's own tests need one gradient: under several local steps the deeper layers hold
        # terms at other parameters, and the tests reject true samples (measured: merge, FedAvg
        # K = 2, B = 8, after 4 rounds: 4 of 8 certified in the first round instead of 8, 3x the time)
        dqn_tests = one_hot and one_step
        # A term's scale is measured at the last hidden layer: a term there merges at most
        # n - r + 1 samples, r that layer's rank (or the first layer's, where it is the larger).
        # Where the last hidden layer separates every sample, no term exceeds one sample's 1 / B
        # (measured: untrained 256-wide merge, B = 32, seed 1, ranks 30 and 32: points 0.022 and
        # 0.0057 from every sample were certified at 1.5 and 1.7 / B, under the first layer's
        # bound of 3 / B). SCALE_TOL of slack: a saturated sample's scale is 1 / B to rounding.
        merged = n - max(first.rank[0], first.rank[first.last_hidden]) + 1
        bound = sample_output_grad * merged * (1.0 + SCALE_TOL) if dqn_tests else float("inf")
        chosen = _newton_certified(search, x_newton, tol, remaining - tentative, bound, dqn=dqn_tests)
        certified = bool(chosen)
        if not chosen and dqn_tests:
            # Nothing certified, and the pool gave no completion: points that pass the tests with
            # a mixture of outputs (no DQN sample) or beyond the Huber scale are peeled
            # tentatively, so that the next round's search lands in other cells. Their points only
            # join the completion's pool; nothing is certified from them. (Measured on untrained
            # 64-wide networks, B = 8, seeds 1, 2 and 5: the completion then finds all 8.)
            chosen = _newton_certified(search, x_newton, tol, remaining - tentative)
        if not chosen:
            break
        xs = torch.stack([c[0] for c in chosen])
        gs = torch.stack([c[1] for c in chosen])
        grads = _peeled(chain, grads, xs, gs)
        if not certified:
            stats[f"round{rounds}_tentative"] = float(len(chosen))
            tentative += len(chosen)
            pool.append(xs)
            continue
        stats[f"round{rounds}_found"] = float(len(chosen))
        found_x.append(xs)
        found_g.append(gs)
        remaining -= len(chosen)
    if tentative and not completed:  # what is left of the update: the certified terms' only
        grads = [layer.grad_matrix.clone() for layer in chain.layers]
        if found_x:
            grads = _peeled(chain, grads, torch.cat(found_x), torch.cat(found_g))
    if one_hot and remaining and not completed and first is not None and first.rank[0] < n:
        # No r terms decompose the update: its terms may be dependent at the first layer. Where
        # a set of candidate terms that reproduces every layer's gradient determines more terms
        # than peeling certified, they replace what peeling found (on trained-like networks
        # some Newton points pass their own tests off the samples). One-hot outputs (DQN)
        # only: on TD3's critics (metadrive-ramp's default run, seed 0) this and the
        # every-layer search below moved two batches from 7 and 0 certified to 3 and 3.
        dependent = complete_dependent(first, torch.cat(pool), tol, enumerated)
        if len(dependent) > sum(len(x) for x in found_x):
            stats["dependent"] = float(len(dependent))
            found_x, found_g = [torch.stack([c[0] for c in dependent])], [torch.stack([c[1] for c in dependent])]
            grads = _peeled(chain, [layer.grad_matrix for layer in chain.layers], found_x[0], found_g[0])
            completed = True
    if remaining and found_x and not completed and first is not None and last is not None:
        joint = _certify_jointly(first, torch.cat(found_x), torch.cat(found_g), *last, n, tol)
        if joint is not None:
            stats["joint"] = float(len(joint[0]))
            found_x, found_g = [joint[0]], [joint[1]]
            grads = _peeled(chain, [layer.grad_matrix for layer in chain.layers], joint[0], joint[1])
    left = float(torch.sqrt(sum((g**2).sum() for g in grads))) / max(total_norm, 1e-300)
    if not found_x:
        if one_hot and not every_layer and first is not None and any(first.separated / 2 <= r < vh.shape[1] and k not in first.row for k, (r, (_, _, vh)) in enumerate(zip(first.rank, first.svd))):
            # Measured: an untrained 64-wide network, B = 8 and 16, a pair sharing the last
            # hidden layer's pattern and action; the other samples satisfy its row space too.
            # Not where that layer's rank is below half the largest (most samples in groups:
            # merge B = 32 after 50 rounds, 5 of 12, certified nothing either way in twice the time).
            return recover_exact(model, params, gradient, n, box, seed, starts, restarts, iterations, max_rounds, tol, probes, one_hot, True, sample_output_grad, one_step)
        return empty
    return ExactResult(torch.cat(found_x).float().numpy(), torch.cat(found_g).numpy(), left, rounds, stats)



def _certify_jointly(first: Search, xs: Tensor, gs: Tensor, search: Search, x_new: Tensor, n: int, tol: float) -> tuple[Tensor, Tensor] | None:
    """Every term of the update at once, where peeling stopped short of n: the certified points
    ``xs`` (k, d) with their output gradients ``gs``, and for the rest the last round's Newton
    points ``x_new`` (the smallest row and column residuals first, distinct), re-solved together
    from the original update at a hidden layer whose gradient separates all n terms.

    Each peeling round's estimates carry the errors of the earlier rounds' (the remainder is the
    update less their contributions), and the last samples' columns drift past the certification
    tolerance (measured: merge, B = 32, round 0: the last sample's remainder 1.5e-3 off its true
    term, a certified neighbour's output gradient off by 1.4e-3). At a layer of rank n the terms'
    output-gradient directions ``delta_i`` (from each point's patterns and output direction) are
    independent, so ``M = sum_i delta_i [t_i a_i, t_i]`` solves for every ``(t_i, a_i)`` at once,
    and on each point's cell ``a_i`` is affine in ``x_i``. The set is certified when every point
    keeps its patterns and the terms reproduce every layer's gradient of the update (the
    completion's test, :func:`drivepriv.attacks.completion.complete_first_layer`). Returns the
    points and their output gradients at scale, or None."""
    chain = first.chain
    hidden = [k for k in range(len(chain.layers) - 2, -1, -1) if first.rank[k] == n]
    if not hidden or len(xs) >= n:
        return None
    k = hidden[0]
    # the rest: the last round's Newton points, the smallest row and column residuals first,
    # distinct (the remainder they were found in carries the earlier rounds' errors, so none
    # need pass its tests: the joint solve and its check decide)
    r_row = search.residuals(x_new)
    cand = x_new[torch.isfinite(r_row)]
    dirs = gs / gs.norm(dim=1, keepdim=True).clamp_min(1e-300)
    if len(cand):
        r_col, g_dir, _ = search.directions(cand, search.last_hidden)
        best = r_col.argmin(1)
        at = torch.arange(len(cand))
        picked: list[int] = []
        for i in torch.argsort(r_row[torch.isfinite(r_row)] + r_col[at, best], stable=True).tolist():
            near = torch.cat([xs, cand[picked]])
            if torch.cdist(cand[i][None], near).min() > 1e-4 * (1.0 + cand[i].norm()):
                picked.append(i)
            if len(xs) + len(picked) == n:
                break
        xs = torch.cat([xs, cand[picked]])
        dirs = torch.cat([dirs, g_dir[at, best][picked]])
    if search.one_hot:  # each output on its own: the Rayleigh quotient's small mixtures are noise
        dirs = torch.nn.functional.one_hot(dirs.abs().argmax(1), dirs.shape[1]).double() * torch.sign(dirs.gather(1, dirs.abs().argmax(1, keepdim=True)))
    _, pre = chain.forward(xs)
    masks = [(z > 0) for z in pre[:-1]]
    # the scales: at layer k the terms' columns are independent
    delta = (search.output_maps(xs, k) @ dirs[..., None])[..., 0]  # (m, H_k), unit output gradients
    if not full_rank(delta):
        return None  # two terms this layer cannot tell apart
    Y = lstsq(delta.T, chain.layers[k].grad_matrix)  # (m, in_k + 1): rows t_i [a_i, 1]
    t = Y[:, -1]
    if bool((t.abs() < 1e-300).any()):
        return None
    g = dirs * t[:, None]
    # the inputs from the first layer, M_1 = sum_i delta_i [x_i, 1]^T with every delta_i now at
    # its scale, where its columns are independent too (measured on the case above: median
    # 1.3e-6 from the samples, against 4.4e-6 for the peeled points)
    d0 = (search.output_maps(xs, 0) @ g[..., None])[..., 0]
    if full_rank(d0):
        Y0 = lstsq(d0.T, chain.layers[0].grad_matrix)
        x = Y0[:, :-1] / Y0[:, -1:]
    else:  # from layer k's inputs: on each point's cell [a_k, 1] = A_k [x, 1]
        A = term_system(chain, masks, g)[1][k]
        x = lstsq(A[:, :-1, :-1], (Y[:, :-1] / t[:, None] - A[:, :-1, -1])[..., None])[..., 0]
    _, pre_x = chain.forward(x)
    if any(bool(((z > 0) != m).any()) for z, m in zip(pre_x[:-1], masks)):
        return None  # a point left its cell
    rest = _peeled(chain, [layer.grad_matrix for layer in chain.layers], x, g)
    deep_tol = deep_tolerance(tol)
    if any(float(r.norm()) > deep_tol * max(float(layer.grad_matrix.norm()), 1e-300) for r, layer in zip(rest, chain.layers)):
        return None
    return x, g



def _peeled(chain: Chain, grads: list[Tensor], xs: Tensor, gs: Tensor) -> list[Tensor]:
    """Each layer's ``[dW | db]`` in ``grads`` less the exact contributions of the samples xs
    whose output gradients are gs (peeling)."""
    contrib = chain.per_sample_gradients(xs, gs)
    return [g - torch.cat([cw, cb[:, None]], dim=1) for g, (cw, cb) in zip(grads, contrib)]


def _unit_ratios(g: Tensor) -> Tensor:
    """``g[j, :-1] / g[j, -1]`` for the units j whose bias gradient is not zero."""
    b = g[:, -1]
    units = torch.nonzero(b.abs() > 1e-9 * b.abs().max().clamp_min(1e-300)).flatten()
    return g[units, :-1] / b[units, None]



#: How far a certified term's scale at the first layer may differ from the last hidden layer's
#: (relative). Measured on untrained merge networks: the samples' agree to 4.4e-4 or better
#: (64 wide, B = 16; 256 wide: 1e-5), a point 0.11 from every sample (64 wide, B = 8, seed 5)
#: is 5 % off.
SCALE_TOL = 1e-2


def _newton_certified(search: Search, x: Tensor, tol: float, limit: int, max_output_grad: float = float("inf"), dqn: bool = False) -> list[tuple[Tensor, Tensor]]:
    """Newton fixed points with zero residual in every row space, whose output gradient passes
    the last hidden layer's column test; chosen pairwise biorthogonal (module docstring).
    ``dqn``: DQN's own tests, each output on its own and the term's scale at the first layer
    (see :func:`_select`); otherwise the best mixture of outputs."""
    if search.rank[search.last_hidden] == 0 or not search.deep:
        # without a deeper row space every point of the first layer's subspace is a fixed point:
        # nothing to certify one point by (the completion alone can)
        return []
    r_row = search.residuals(x)
    ok = torch.isfinite(r_row) & (r_row < tol)
    if not bool(ok.any()):
        return []
    x, r_row = x[ok], r_row[ok]
    if dqn:
        # DQN: a sample's output gradient is non-zero at its action only, so each output is
        # tested on its own. The best mixture passes at points that are no sample (measured: an
        # untrained 64-wide merge network, B = 16, seed 3: five points certified, 0.01 to 0.3
        # from every sample, with output gradients on all five actions).
        r_all, g_all, _ = search.directions(x, search.last_hidden)
        best = r_all.argmin(1)
        at = torch.arange(len(x))
        r_col, g_dir = r_all[at, best], g_all[at, best]
    else:
        r_col, g_dir, _ = search.column_test(x, search.last_hidden)
    ok = r_col < tol
    # a sample's term has one scale at every layer: where the first layer holds every term
    # (its rank the batch's), its scale there must agree with the last hidden layer's
    same_scale = dqn and search.rank[0] >= limit
    return _select(search, x[ok], g_dir[ok], r_row[ok] + r_col[ok], limit, max(1e-4, 10.0 * tol**0.5), max_output_grad, same_scale)



def _select(search: Search, x: Tensor, g_dir: Tensor, resid: Tensor, limit: int, apart: float = 1e-4, max_output_grad: float = float("inf"), same_scale: bool = False) -> list[tuple[Tensor, Tensor]]:
    """Distinct certified points, pairwise biorthogonal under the last hidden layer's
    pseudo-inverse, with their output gradients at their exact scale. ``same_scale``: a point
    whose term's scale at the first layer differs from it by more than :data:`SCALE_TOL` is
    no sample."""
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
    agrees = torch.ones(len(x), dtype=torch.bool)
    if same_scale:
        v0 = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
        d0 = (search.output_maps(x, 0) @ g_dir[..., None])[..., 0]
        own0 = ((v0 @ search.pinv(0)) * d0).sum(1)
        agrees = (own0 / own.where(own.abs() > 1e-300, torch.ones_like(own)) - 1.0).abs() <= SCALE_TOL
    chosen: list[int] = []
    for i in sorted(range(len(x)), key=lambda i: (int(conflicts[i]), float(resid[i]))):
        if own[i].abs() < 1e-300 or not agrees[i] or float((g_dir[i] / own[i]).abs().max()) > max_output_grad:
            continue
        if all(scale[i, j] <= apart and scale[j, i] <= apart for j in chosen):
            chosen.append(i)
        if len(chosen) == limit:
            break
    # output gradient at its exact scale: M = sum_i t_i delta_i v_i^T with t_i = 1 / (v_i M^+ delta_i)
    return [(x[i], g_dir[i] / own[i]) for i in chosen]



__all__ = ["ExactResult", "recover_exact"]
