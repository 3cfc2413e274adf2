"""SPEAR's completion of the first layer's terms and the enumeration of term directions from
ReLU patterns (:mod:`drivepriv.attacks.exact`, step 5 of its docstring): once the output-gradient
directions of all the first layer's rank-one terms are known, the inputs follow by least
squares; a chosen set is certified when its terms, each with the patterns it was found with,
reproduce every layer's gradient of the update.

Nothing here uses the truth: only the model, the parameters and the update.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from drivepriv.attacks.base import full_rank, independent_rows, lstsq, one_per_direction
from drivepriv.attacks.chain import Search, term_grams, term_kernel, term_system


def pattern_directions(search: Search, points: Tensor, tol: float, max_flips: int = 12) -> Terms:
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
        deeper = torch.cat([deeper, _last_layer_flips(search, deeper, tol)])
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



def _last_layer_flips(search: Search, deeper: Tensor, tol: float, limit: int = 8) -> Tensor:
    """Deeper patterns (rows of every hidden layer's pattern but the first, concatenated) with
    one unit of the last hidden layer flipped, kept where the direction they give there lies in
    that layer's column space for some output: a sample whose last-layer pattern no point of the
    attacker's shares (measured: round 199 of the default merge run, one unit off for one
    sample of a batch) has its term among them. Spurious flips pass too (a unit whose basis
    vector lies in the column space passes with every output); the completion sorts them out."""
    last = search.last_hidden
    H = search.chain.layers[last].weight.shape[0]
    if last == 0 or not len(deeper) or search.rank[last] == 0:
        return deeper[:0]
    flips = deeper[:, None, :].repeat(1, H, 1)  # (R, H, width of the deeper rows)
    units = torch.arange(H)
    flips[:, units, deeper.shape[1] - H + units] = 1.0 - flips[:, units, deeper.shape[1] - H + units]
    flips = flips.reshape(-1, deeper.shape[1])
    lastmask = flips[:, -H:]
    res, _, _ = search.map_directions(search.pattern_maps([lastmask] * (last + 1), last), last)
    new = torch.unique(flips[(res < tol).any(1)], dim=0)
    known = (new[:, None, :] == deeper[None]).all(2).any(1)
    return new[~known][:limit]



def _groups(search: Search, masks: list[Tensor], tol: float) -> list[tuple[Tensor, list[Tensor], int | None]]:
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
    if len(dirs) != k or not full_rank(torch.stack(dirs)):
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



def complete_first_layer(search: Search, x: Tensor, tol: float, gen: torch.Generator | None = None, swaps: int = 300, dirs: Terms | None = None, memo: dict | None = None, stable: int = 0) -> list[tuple[Tensor, Tensor]]:
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
    first set that passed without reproducing the deeper layers, else nothing.

    ``memo`` (one dict across the calls on one search) with ``stable``: the first ``stable``
    points of x lead every later call's x too, so their terms and merge are kept and not done
    again (the peeling rounds' pool only grows: 37,000 to 56,000 terms on a highway FedAvg
    update, merged again in each of five rounds)."""
    r = search.rank[0]
    if r == 0 or 0 not in search.row:
        return []
    head, state, done = dirs if dirs is not None else Terms.empty(search), None, 0
    if memo and memo["search"] is search and memo["done"] <= stable and torch.equal(memo["x"], x[: memo["done"]]):
        head, state, done = memo["terms"], memo["state"], memo["done"]
    mid = Terms.of_points(search, x[done:stable], tol) if stable > done else Terms.empty(search)
    terms = Terms.cat([head, mid, Terms.of_points(search, x[stable:], tol)])  # done <= stable
    same = 1.0 - max(1e-6, tol)
    cand, hits, snap = one_per_direction(terms.u, same, state=state, mark=len(head) + len(mid))
    if memo is not None:
        memo.update(search=search, done=stable, x=x[:stable], terms=Terms.cat([head, mid]), state=snap)
    if len(cand) < r:
        return []
    terms = terms.take(torch.tensor(cand))
    C = terms.u  # (c, H)
    order = sorted(range(len(cand)), key=lambda i: -hits[i])
    chosen = independent_rows(C, order, r)
    if chosen is None:
        return []
    rng = np.random.default_rng(0 if gen is None else int(torch.randint(2**31 - 1, (1,), generator=gen)))
    deep_tol = deep_tolerance(tol)
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
        movers = torch.nonzero((r2 < tol) & (cos.abs() <= same)).flatten().tolist()
        vs = [u2[i] / u2[i].norm() for i in movers]
        known = len(C)
        c_known = (C @ torch.stack(vs, 1)).abs() if movers else None  # C read once, not per mover
        for col, (i, v) in enumerate(zip(movers, vs)):
            c = c_known[:, col] if len(C) == known else torch.cat([c_known[:, col], (C[known:] @ v).abs()])
            j = int(c.argmax())
            if float(c[j]) < same:
                terms = terms.put(len(C), Terms.of_points(search, xs[i : i + 1], tol, keep=(pick[i : i + 1], v[None])))
                C = terms.u[: len(C) + 1]
                hits.append(0)
                j = len(C) - 1
            keep = chosen[:i] + chosen[i + 1 :]
            if j not in chosen and full_rank(C[keep + [j]]):
                chosen[i] = j
                moved = True
        if moved:
            continue
        if len(C) == r:
            return fallback or partial
        # swap one failing member for an unused candidate that keeps the set independent
        if len(order) < len(C):  # terms appended since (no hits: they sort last, in turn)
            order = sorted(range(len(C)), key=lambda i: -hits[i])
        bad = [chosen[i] for i in torch.nonzero(~good).flatten().tolist()]
        out = bad[int(rng.integers(len(bad)))]
        taken = set(chosen)
        unused = [i for i in order if i not in taken]
        rng.shuffle(unused)
        keep = [i for i in chosen if i != out]
        # keep is independent (a subset of an independent set), so only the new row is tested
        for j in unused:
            if full_rank(C[keep + [j]]):
                chosen = keep + [j]
                break
        else:
            return fallback or partial
    return fallback or partial



def complete_dependent(search: Search, x: Tensor, tol: float, dirs: Terms | None = None, max_terms: int = 32) -> list[tuple[Tensor, Tensor]]:
    """The terms the update determines where its first-layer terms are linearly dependent
    (more classes of samples than the first layer's rank), so that no r of them decompose it
    and :func:`complete_first_layer` finds nothing.

    Measured on a trained merge network (round 199 of the default run): one unit flips inside
    two groups of samples that share an action, so the groups' terms differ by the same
    direction and six terms span five dimensions. With every candidate term's patterns and
    output fixed, the update is linear in the terms' weighted sums ``y_j = sum_s c_s [x_s, 1]``
    (:func:`~drivepriv.attacks.chain.term_system`), at every layer: the deeper layers tell the
    dependent terms apart where the first cannot. The candidates (the points' terms and the
    enumerated ``dirs``) are solved together by least squares; where they reproduce every
    layer's gradient of the update, candidates are dropped one at a time (the least hit first)
    while the rest still do as well, down to a set none of which can go. On that set, a term no
    direction of the map's kernel moves is determined (as
    :func:`drivepriv.metrics.identifiability.determined_transitions` counts with the truth);
    where its input ``y_j[:-1] / y_j[-1]`` lies in the cell of the patterns it was taken with, it
    is a sample (a merged class of samples whose weights have both signs lies outside it).
    Returns those samples with their output gradients at scale (empty where the candidates do
    not reproduce the update)."""
    if search.rank[0] == 0:
        return []
    terms = Terms.of_points(search, x, tol)
    if dirs is not None:
        terms = Terms.cat([dirs, terms])
    # one candidate per (patterns, output): two terms' first-layer directions can agree to 1e-6
    # where a deeper layer tells them apart (a flip of `_last_layer_flips`: merge, round 199)
    _, inverse, hits_t = torch.unique(torch.cat(terms.masks + [terms.g], dim=1), dim=0, return_inverse=True, return_counts=True)
    first = torch.full((len(hits_t),), len(terms), dtype=torch.long).scatter_reduce(0, inverse, torch.arange(len(terms)), "amin")
    order = torch.argsort(first)
    terms, hits = terms.take(first[order]), hits_t[order].tolist()
    c = len(terms)
    if c <= search.rank[0] or c > max_terms:
        return []
    chain = search.chain
    deltas, A = term_system(chain, terms.masks, terms.g)
    d1 = chain.in_dim + 1
    grams = term_grams(deltas, A)
    rhs = [torch.einsum("pk,kq,pqd->pd", delta, g, a).reshape(-1) for delta, g, a in zip(deltas, search.grads, A)]
    sq = [float((g**2).sum()) for g in search.grads]
    deep_tol = deep_tolerance(tol)

    def solve(keep: list[int]) -> tuple[Tensor, Tensor, float]:
        idx = (torch.tensor(keep)[:, None] * d1 + torch.arange(d1)).reshape(-1)
        sub = [gr[idx][:, idx] for gr in grams]  # each layer's Gram matrix on the kept terms
        G = sum(sub)
        b = sum(r[idx] for r in rhs)
        scale = G.diagonal().clamp_min(1e-300).rsqrt()
        evals, evecs = torch.linalg.eigh(scale[:, None] * G * scale[None, :])
        on = evals > 1e-12 * evals[-1].clamp_min(1e-300)
        y = scale * (evecs[:, on] @ ((evecs[:, on].T @ (scale * b)) / evals[on]))
        worst = max(
            max(s2 - 2.0 * float(y @ r[idx]) + float(y @ (gs @ y)), 0.0) ** 0.5 / max(s2**0.5, 1e-300)
            for gs, r, s2 in zip(sub, rhs, sq)
        )
        return y.reshape(len(keep), d1), G, worst

    keep = list(range(c))
    y, G, worst = solve(keep)
    if worst > deep_tol:
        return []
    # a candidate goes where the rest reproduce the update as well as all of them do (a true
    # term with a small weight can sit within the tolerance of the update, not of that fit)
    bound = min(deep_tol, 1.1 * worst + 1e-8)
    for t in sorted(range(c), key=lambda i: hits[i]):  # stable: the least hit first
        trial = [i for i in keep if i != t]
        if len(trial) < search.rank[0]:
            break
        y2, G2, w2 = solve(trial)
        if w2 <= bound:
            keep, y, G = trial, y2, G2
    moved = term_kernel(G, len(keep), 1e-6)
    t_scale = y[:, -1]
    xs = y[:, :-1] / torch.where(t_scale.abs() < 1e-300, torch.ones_like(t_scale), t_scale)[:, None]
    _, pre = chain.forward(xs)
    found = []
    for j, term in enumerate(keep):
        in_cell = all(bool(((z[j] > 0).double() == m[term]).all()) for z, m in zip(pre[:-1], terms.masks))
        if float(moved[j]) < 1e-3 and in_cell and float(t_scale[j].abs()) >= 1e-300:
            found.append((xs[j], terms.g[term] * t_scale[j]))
    return found



@dataclass
class Terms:
    """Candidate rank-one terms of the first layer's gradient: unit directions u (c, H), the
    ReLU patterns they come from (one (c, H_l) tensor per hidden layer) and the output
    gradient g (c, O, unit scale) the patterns map to u."""

    u: Tensor
    masks: list[Tensor]
    g: Tensor

    @staticmethod
    def empty(search: Search) -> "Terms":
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

    def put(self, n: int, new: "Terms") -> "Terms":
        """These terms with ``new`` written over rows n onwards (rows from n on are spare): the
        tensors are written in place, doubled first where full, so that appending one term at a
        time costs amortised constant time (a highway FedAvg update's completion appended 1,648
        times to 40,000 candidates, 200 s of concatenation)."""
        out = self
        if n + len(new) > len(self):
            more = max(len(self), len(new))
            out = Terms.cat([self, Terms(self.u.new_zeros(more, self.u.shape[1]), [m.new_zeros(more, m.shape[1]) for m in self.masks], self.g.new_zeros(more, *self.g.shape[1:]))])
        out.u[n : n + len(new)] = new.u
        for m, m_new in zip(out.masks, new.masks):
            m[n : n + len(new)] = m_new
        out.g[n : n + len(new)] = new.g
        return out

    @staticmethod
    def of_points(search: Search, x: Tensor, tol: float, keep: tuple[Tensor, Tensor] | None = None) -> "Terms":
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



def deep_tolerance(tol: float) -> float:
    """The largest relative residual, per layer, of an update that a set of terms explains:
    1e-5 at float32 resolution (certification tolerance ``tol`` = 1e-9), looser as the
    payload's noise loosens ``tol``."""
    return 1e-5 * max(1.0, (tol / 1e-9) ** 0.5)



def _terms_residual(search: Search, terms: Terms, W: Tensor) -> float:
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
