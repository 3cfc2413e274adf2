"""The one optimisation engine behind every gradient-matching attack.

A dummy batch is parametrised for R restarts at once; the per-restart gradients are computed
in one batched call (``torch.func.vmap`` over ``torch.func.grad``); the objective is the
gradient distance plus registered, weighted regularizers; the best restart is chosen by the
attacker's own objective, never by the truth.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import Tensor
from torch.func import grad, vmap

from drivepriv.agents.common import Batch, at_step
from drivepriv.attacks.base import AttackInput, Priors, Reconstruction, gradient_distance
from drivepriv.registry import Registry
from drivepriv.seeding import derive_seed

log = logging.getLogger(__name__)

#: A regularizer maps (decoded batch with leading restart dim, priors) -> (R,) penalty.
Regularizer = Callable[[Batch, Priors], Tensor]
REGULARIZERS: Registry[Regularizer] = Registry("regularizer")


@dataclass
class EngineSettings:
    iterations: int = 400
    restarts: int = 4
    lr: float = 0.05
    optimizer: str = "adam"  # "adam" or "lbfgs"
    distance: str = "l2"  # see gradient_distance
    weights: dict[str, float] = field(default_factory=dict)  # regularizer name -> weight (0: off)
    init: str = "normal"  # "normal" (N(0,1), as DLG) or "prior" (attacker's own rollouts)
    box: bool = False  # project states into the observation box [-1, 1] after each step
    fixed_actions: np.ndarray | None = None  # (B,) actions recovered beforehand (iDLG)
    #: Start every restart from this reconstruction (restart 0 exactly, the others perturbed).
    init_from: Reconstruction | None = None
    init_noise: float = 0.02
    #: Confine states to the affine subspace that the first linear layer's gradient reveals
    #: (see :class:`StateSubspace`); the optimisation then moves only within it.
    subspace: bool = False


class StateSubspace:
    """The inputs of a first linear layer lie in the row space of its gradient.

    With ``z_i = W x_i + b``, ``[dL/dW | dL/db] = sum_i delta_i [x_i, 1]`` (delta_i = dL/dz_i), so
    every ``[x_i, 1]`` lies in the span U of that (h x (d+1)) matrix's rows, of dimension at most
    the batch size. Parametrise ``x = p + z N`` with ``[p, 1]`` in U and the rows of N spanning
    the directions of U with a zero last coordinate: B-1 free coordinates per state instead of
    d, and none at all for a batch of one (then ``x = p`` exactly).
    """

    def __init__(self, g_weight: Tensor, g_bias: Tensor, max_rank: int, rel_tol: float = 1e-5) -> None:
        m = torch.cat([g_weight.double(), g_bias.double()[:, None]], dim=1)  # (h, d+1)
        _, sv, vh = torch.linalg.svd(m, full_matrices=False)
        rank = int(min(max_rank, int((sv > rel_tol * sv[0]).sum())))
        u = vh[:rank]  # (k, d+1), orthonormal rows
        last = u[:, -1]
        c0 = last / (last @ last)
        self.p = (c0 @ u)[:-1].float()  # (d,)
        # directions within U with zero last coordinate: orthonormal complement of `last` in R^k
        q, _ = torch.linalg.qr(torch.cat([last[:, None], torch.eye(rank, dtype=last.dtype)], dim=1))
        null = q[:, 1:rank].T  # (k-1, k)
        self.n = (null @ u)[:, :-1].float()  # (k-1, d)
        self.dim = rank - 1

    def to_states(self, z: Tensor) -> Tensor:
        return self.p + z @ self.n

    def from_states(self, x: Tensor) -> Tensor:
        """Least-squares coordinates of ``x`` (projection onto the subspace). The rows of N are
        orthonormal (orthonormal combinations of U's rows whose last coordinate is zero), so the
        least-squares solution is ``(x - p) N^T``: a product, where LAPACK's float32 solver gave
        results that differed from call to call on the same input (the row-space search, and so
        rgia-k's fallback, moved between two runs of the same seed)."""
        if self.dim == 0:
            return x.new_zeros(*x.shape[:-1], 0)
        return (x - self.p) @ self.n.T


@dataclass
class _Vars:
    states: Tensor  # (R, B, *obs_shape)
    action_logits: Tensor  # (R, B, A) logits; continuous actions: (R, B, d) values
    rewards: Tensor  # (R, B)
    next_states: Tensor  # (R, B, *obs_shape)
    done_logits: Tensor  # (R, B)

    def tensors(self) -> list[Tensor]:
        return [self.states, self.action_logits, self.rewards, self.next_states, self.done_logits]


def _decode(v: _Vars, fixed_actions: Tensor | None, space: StateSubspace | None, obs_shape: tuple[int, ...], continuous: bool = False) -> Batch:
    if fixed_actions is not None:
        actions = fixed_actions.expand_as(v.action_logits)
    elif continuous:
        actions = v.action_logits
    else:
        actions = torch.softmax(v.action_logits, -1)
    states = v.states if space is None else space.to_states(v.states).reshape(*v.states.shape[:2], *obs_shape)
    return Batch(states, actions, v.rewards, v.next_states, torch.sigmoid(v.done_logits))


def first_layer_subspace(inp: AttackInput) -> StateSubspace:
    """The state subspace revealed by the gradient of the model's first ``nn.Linear``."""
    first = next(name for name, m in inp.model.named_modules() if isinstance(m, torch.nn.Linear))
    g = dict(zip(inp.params, inp.gradient))
    return StateSubspace(g[f"{first}.weight"], g[f"{first}.bias"], inp.n_transitions)


def _init_vars(inp: AttackInput, s: EngineSettings, gen: torch.Generator) -> _Vars:
    R, B, A = s.restarts, inp.n_transitions, inp.n_actions
    shape = tuple(inp.obs_shape)
    prior = inp.priors.prior_states
    if s.init == "prior" and prior is not None and len(prior) > 0:
        idx = torch.randint(len(prior), (R, B), generator=gen)
        states = torch.as_tensor(prior)[idx].clone()
        idx2 = torch.randint(len(prior), (R, B), generator=gen)
        next_states = torch.as_tensor(prior)[idx2].clone()
    else:
        states = torch.randn(R, B, *shape, generator=gen)
        next_states = torch.randn(R, B, *shape, generator=gen)
    v = _Vars(
        states=states,
        action_logits=0.1 * torch.randn(R, B, A, generator=gen),
        rewards=0.1 * torch.randn(R, B, generator=gen),
        next_states=next_states,
        done_logits=torch.full((R, B), -3.0),
    )
    if s.init_from is not None:
        rec = s.init_from
        noise = s.init_noise * torch.randn(R, B, *shape, generator=gen)
        noise[0] = 0.0
        v.states = torch.as_tensor(rec.states).expand(R, B, *shape) + noise
        v.next_states = torch.as_tensor(rec.next_states).expand(R, B, *shape).clone()
        acts = torch.as_tensor(rec.action_probs)
        v.action_logits = (acts if inp.continuous else torch.log(acts.clamp_min(1e-3))).expand(R, B, A).clone()
        v.rewards = torch.as_tensor(rec.rewards).expand(R, B).clone()
        v.done_logits = torch.logit(torch.as_tensor(rec.dones).clamp(1e-3, 1 - 1e-3)).expand(R, B).clone()
    return v


def simulate_update(inp: AttackInput, batch: Batch) -> tuple[Tensor, ...]:
    """What the client would have shared for ``batch``: the gradient (one step), or under
    FedAvg the delta after K local SGD steps on consecutive slices of B transitions, computed
    differentiably (in the batch) so the attack can match it."""
    params = {k: p.detach() for k, p in inp.params.items()}
    target_params = {k: p.detach() for k, p in inp.target_params.items()}
    model, loss = inp.model, inp.loss
    if inp.local_steps == 1:
        return tuple(grad(lambda p: loss(model, p, target_params, batch))(params).values())
    if inp.delta is None:
        raise ValueError("an update of several local steps needs the observed delta")
    p, B = params, inp.batch_size
    for k in range(inp.local_steps):
        sl = slice(k * B, (k + 1) * B)
        step = Batch(batch.states[sl], batch.actions[sl], batch.rewards[sl], batch.next_states[sl], batch.dones[sl])
        spec = at_step(loss, k)
        g = grad(lambda q: spec(model, q, target_params, step))(p)
        p = {n: p[n] - inp.local_lr * g[n] for n in p}
    return tuple(p[n] - params[n] for n in params)


def run_engine(inp: AttackInput, settings: EngineSettings, seed: int, name: str) -> Reconstruction:
    """Optimise R restarts of the dummy batch; return the restart with the lowest objective."""
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(derive_seed(seed, "attack", name, "init"))
    v = _init_vars(inp, settings, gen)
    space = first_layer_subspace(inp) if settings.subspace else None
    if space is not None:
        v.states = space.from_states(v.states.reshape(*v.states.shape[:2], -1)).float()
    for t in v.tensors():
        t.requires_grad_(True)
    fixed = None
    continuous = inp.continuous
    low, high = (torch.as_tensor(x) for x in inp.priors.codec.box())
    if settings.fixed_actions is not None and not continuous:
        fixed = torch.nn.functional.one_hot(torch.as_tensor(settings.fixed_actions), inp.n_actions).float()

    target_grad = tuple(t.detach() for t in (inp.delta if inp.local_steps > 1 else inp.gradient))
    batched_gradient = vmap(lambda *b: simulate_update(inp, Batch(*b)))
    active = {k: w for k, w in settings.weights.items() if w > 0}
    regs = {k: REGULARIZERS.get(k) for k in active}

    def objective() -> tuple[Tensor, Tensor]:
        b = _decode(v, fixed, space, inp.obs_shape, continuous)
        g = batched_gradient(b.states, b.actions, b.rewards, b.next_states, b.dones)
        dist = gradient_distance(g, target_grad, settings.distance)
        total = dist
        for k, reg in regs.items():
            total = total + active[k] * reg(b, inp.priors)
        return total, dist

    # Keep, per restart, the iterate with the lowest objective seen (the attacker's own
    # criterion, never the truth): a run can then not end worse than where it started.
    best_total = torch.full((settings.restarts,), float("inf"))
    best = [t.detach().clone() for t in v.tensors()]

    def remember(total: Tensor) -> None:
        with torch.no_grad():
            total = torch.where(torch.isfinite(total), total, torch.full_like(total, float("inf")))
            better = total < best_total
            if better.any():
                best_total[better] = total[better]
                for keep, t in zip(best, v.tensors()):
                    keep[better] = t.detach()[better]

    if settings.optimizer == "lbfgs":
        opt: torch.optim.Optimizer = torch.optim.LBFGS(
            v.tensors(), lr=1.0, max_iter=20, history_size=100, line_search_fn="strong_wolfe"
        )

        def closure() -> Tensor:
            opt.zero_grad()
            total, _ = objective()
            s = total.sum()
            if torch.isfinite(s):
                s.backward()
            return s

        for _ in range(max(1, settings.iterations // 20)):
            try:
                opt.step(closure)
            except IndexError:
                # torch's strong-Wolfe search indexes an empty bracket once the objective is
                # non-finite everywhere it tried (measured: DLG on a FedAvg update of PPO on
                # Pendulum); the best iterate so far is kept
                break
            if settings.box:
                _project(v, low, high, project_states=space is None)
            with torch.no_grad():
                remember(objective()[0])
    else:
        opt = torch.optim.Adam(v.tensors(), lr=settings.lr)
        # Cosine decay to 1/1000 of the step size: coarse search first, then metre-level precision
        # (a normalised unit is hundreds of metres for positions).
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=settings.iterations, eta_min=settings.lr * 1e-3)
        for _ in range(settings.iterations):
            opt.zero_grad()
            total, _ = objective()
            remember(total.detach())
            total.sum().backward()
            opt.step()
            sched.step()
            if settings.box:
                _project(v, low, high, project_states=space is None)

    with torch.no_grad():
        remember(objective()[0])
        for t, keep in zip(v.tensors(), best):
            t.copy_(keep)
        total, dist = objective()
        total = torch.where(torch.isfinite(total), total, torch.full_like(total, float("inf")))
        best = int(total.argmin())
        b = _decode(v, fixed, space, inp.obs_shape, continuous)
    return Reconstruction(
        attack=name,
        states=b.states[best].detach().numpy().copy(),
        action_probs=b.actions[best].detach().numpy().copy(),
        rewards=b.rewards[best].detach().numpy().copy(),
        next_states=b.next_states[best].detach().numpy().copy(),
        dones=b.dones[best].detach().numpy().copy(),
        objective=float(total[best]),
        grad_distance=float(dist[best]),
        time_s=time.perf_counter() - t0,
        extra={"restarts": float(settings.restarts)},
        continuous=continuous,
    )


@torch.no_grad()
def _project(v: _Vars, low: Tensor, high: Tensor, project_states: bool = True) -> None:
    """Project states and next states into the observation's box (the codec's ``box()``)."""
    if project_states:
        v.states.copy_(torch.maximum(torch.minimum(v.states, high), low))
    v.next_states.copy_(torch.maximum(torch.minimum(v.next_states, high), low))
