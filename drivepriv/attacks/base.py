"""What an attack receives (the server's view plus public priors) and what it returns.

The attacker's input is built only from what an FL server sees: the global and target
parameters it sent, the loss specification and hyper-parameters it prescribed, the shared
payload, and public knowledge of the simulator. The ground truth never enters here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from drivepriv.agents.common import Batch, LossSpec
from drivepriv.envs.codec import ObservationCodec
from drivepriv.envs.vector import VectorCodec
from drivepriv.registry import Registry


class RewardPrior(Protocol):
    """``r(s, a, s', done)`` on observations (N, *obs_shape), actions (N, A) and dones (N,)."""

    def __call__(self, states: Tensor, actions: Tensor, next_states: Tensor, dones: Tensor) -> Tensor: ...


@dataclass
class Priors:
    """Public knowledge of the task: observation codec, road, reward function, transition model.

    ``reward``, ``dynamics``, ``physics`` and ``state_penalty`` may be None where a scenario has none; the
    regularizer is then switched off. ``prior_states`` are observations from the attacker's own
    rollouts of the public simulator (used to initialise the optimisation).
    """

    codec: ObservationCodec | VectorCodec
    road: object | None = None
    reward: RewardPrior | None = None
    dynamics: nn.Module | None = None
    #: Closed-form kinematics of the simulator, ``(s, action_probs) -> s'`` (normalised), if known.
    physics: Callable[[Tensor, Tensor], Tensor] | None = None
    state_penalty: Callable[[Tensor], Tensor] | None = None
    prior_states: np.ndarray | None = None


@dataclass
class AttackInput:
    """One client's update as the server sees it, with the public priors."""

    model: nn.Module  # the architecture the server distributed (parameters are passed apart)
    params: dict[str, Tensor]
    target_params: dict[str, Tensor]
    #: FedSGD: the gradient. FedAvg: -delta / lr, the sum of the K local gradients (exact for K=1).
    gradient: tuple[Tensor, ...]
    loss: LossSpec  # DQNLossSpec, PPOLossSpec or TD3LossSpec: discrete is its action kind
    batch_size: int  # transitions per local step
    obs_shape: tuple[int, ...]
    n_actions: int  # discrete: actions; continuous: action dimension (a PPO network has one output more: the value)
    priors: Priors
    #: FedAvg with K > 1 local SGD steps: the observed parameter delta and the local step size;
    #: the engine then unrolls the K steps on K dummy minibatches.
    local_steps: int = 1
    local_lr: float = 0.0
    delta: tuple[Tensor, ...] | None = None

    @property
    def continuous(self) -> bool:
        """Continuous actions: the batch's actions are (B, d) values, not (B, A) probabilities."""
        return not getattr(self.loss, "discrete", True)

    @property
    def n_transitions(self) -> int:
        """How many transitions are behind the update (K x B)."""
        return self.batch_size * self.local_steps


@dataclass
class Reconstruction:
    """A reconstructed minibatch in observation space, and what it cost."""

    attack: str
    states: np.ndarray  # (B, *obs_shape) as observed
    action_probs: np.ndarray  # (B, A) probabilities; continuous actions: (B, d) values
    rewards: np.ndarray  # (B,)
    next_states: np.ndarray  # (B, V, F) normalised
    dones: np.ndarray  # (B,)
    objective: float = float("nan")
    grad_distance: float = float("nan")
    time_s: float = float("nan")
    extra: dict[str, float] = field(default_factory=dict)
    continuous: bool = False

    @property
    def actions(self) -> np.ndarray:
        """(B,) action indices, or the (B, d) action values of continuous actions."""
        return self.action_probs if self.continuous else self.action_probs.argmax(-1)


class Attack:
    """Base class: ``run(inp, seed) -> Reconstruction``. Subclasses cite their paper."""

    name: str = ""
    summary: str = ""
    #: The continuous-action algorithms the attack handles ("*": all of them). iDLG reads discrete
    #: actions off the last layer and handles none; analytic and rgia-k read TD3's and SAC's
    #: critics and PPO's Gaussian mean.
    continuous_algorithms: tuple[str, ...] = ("*",)

    @classmethod
    def supports(cls, algorithm: str, continuous: bool) -> bool:
        """Whether the attack handles the local algorithm ``algorithm`` (with continuous actions or not)."""
        return not continuous or "*" in cls.continuous_algorithms or algorithm in cls.continuous_algorithms

    def __init__(self, **settings: object) -> None:
        self.settings = settings

    def run(self, inp: AttackInput, seed: int) -> Reconstruction:
        raise NotImplementedError


ATTACKS: Registry[type[Attack]] = Registry("attack")


def lstsq(a: Tensor, b: Tensor) -> Tensor:
    """Least-squares (minimum-norm) solution of ``a x = b``, batched as torch's, reproducible.

    LAPACK's SVD-based driver (gelsd). torch's CPU default, gelsy (pivoted QR), gives results
    that differ in the last bits with the address of its input (measured: the same matrix
    copied to 64 offsets 64 bytes apart), so an attack's outcome depended on what the worker
    process had allocated before it (rgia-k's states moved by 1e-5 m between runs of one seed);
    gelsd, gelss and gels gave the same bits at every offset."""
    return torch.linalg.lstsq(a, b, driver="gelsd").solution


def gradient_distance(g: tuple[Tensor, ...], target: tuple[Tensor, ...], kind: str) -> Tensor:
    """Distance between two gradients given as tuples; leading dims (restarts) are kept.

    ``l2``: squared L2; ``cosine``: 1 - cosine similarity; ``rel_l2``: squared L2 over the
    target's squared norm (scale-free).
    """
    lead = g[0].shape[: g[0].dim() - target[0].dim()]
    flat = torch.cat([x.reshape(*lead, -1) for x in g], dim=-1)
    tflat = torch.cat([t.reshape(-1) for t in target])
    if kind == "l2":
        return ((flat - tflat) ** 2).sum(-1)
    if kind == "rel_l2":
        return ((flat - tflat) ** 2).sum(-1) / (tflat**2).sum().clamp_min(1e-30)
    if kind == "cosine":
        return 1.0 - (flat * tflat).sum(-1) / (flat.norm(dim=-1) * tflat.norm()).clamp_min(1e-30)
    raise ValueError(f"unknown gradient distance {kind!r}")


@dataclass
class MergeState:
    """Where :func:`one_per_direction` stands after the first ``rows`` rows: the rows kept so
    far and how many rows each took (resuming from it gives what one pass over all rows gives)."""

    rows: int = 0
    cand: list[int] = field(default_factory=list)
    hits: list[int] = field(default_factory=list)


def one_per_direction(u: Tensor, same: float, block: int = 1024, state: MergeState | None = None, mark: int | None = None) -> tuple[list[int], list[int], MergeState | None]:
    """One term per direction, in order: each unit row of ``u`` joins the earlier kept row it
    is most parallel to where ``|cos| >= same`` (the first of several that tie), else it is kept.
    Returns the kept rows, how many rows each took, and the state after the first ``mark`` rows
    (None without ``mark``). ``state``: resume after its rows, the first rows of ``u``.

    Every pair is screened in float32, in one product per block of rows (against the rows kept
    before the block, and within it), and the pairs within twice the float32 product's worst
    rounding of ``same`` are compared in float64, each on its own (so the result does not depend
    on where blocks start); the loop over a block's rows only picks among those. (A FedAvg
    update's noise loosens the column test: 42,853 terms from 9,549 points on a highway update,
    K = 3, 40,480 of them kept, which a row-by-row loop merged in more than 17 minutes.)"""
    st = MergeState() if state is None else MergeState(state.rows, list(state.cand), list(state.hits))
    cand, hits = st.cand, st.hits
    u32 = u.float()
    margin = 2.0 * (u.shape[1] + 2) * 2.0**-24  # twice the worst rounding of a float32 product of unit rows
    snap = None
    starts = list(range(st.rows, len(u), block))
    if mark is not None and st.rows < mark < len(u):
        starts = sorted(set(starts) | {mark})
    for b, start in enumerate(starts):
        if start == mark:
            snap = MergeState(start, list(cand), list(hits))
        stop = starts[b + 1] if b + 1 < len(starts) else len(u)
        rows, n = u[start:stop], stop - start
        j_old, best_old = [-1] * n, [-1.0] * n
        if cand:  # the kept rows' most parallel one, per row of the block (-1: none near)
            kept_t = torch.tensor(cand)
            i_near, j_near = torch.nonzero((u32[start:stop] @ u32[kept_t].T).abs() >= same - margin, as_tuple=True)
            if len(i_near):
                c = (rows[i_near] * u[kept_t[j_near]]).sum(1).abs()
                best = torch.full((n,), -1.0, dtype=c.dtype).scatter_reduce(0, i_near, c, "amax")
                top = c == best[i_near]
                first = torch.full((n,), len(cand), dtype=torch.long).scatter_reduce(0, i_near[top], j_near[top], "amin")
                for i in torch.unique(i_near).tolist():
                    j_old[i], best_old[i] = int(first[i]), float(best[i])
        # pairs within the block, each row with the earlier ones near it (in order)
        i_in, k_in = torch.nonzero(torch.tril((u32[start:stop] @ u32[start:stop].T).abs(), -1) >= same - margin, as_tuple=True)
        c_in = (rows[i_in] * rows[k_in]).sum(1).abs().tolist()
        near: dict[int, list[tuple[int, float]]] = {}
        for i, k, c in zip(i_in.tolist(), k_in.tolist(), c_in):
            near.setdefault(i, []).append((k, c))
        at: dict[int, int] = {}  # the block's kept rows: index in cand
        for i in range(n):
            j, best = j_old[i], best_old[i]
            for k, c in near.get(i, ()):
                if k in at and c > best:  # ties go to the earlier row
                    j, best = at[k], c
            if best >= same:
                hits[j] += 1
            else:
                at[i] = len(cand)
                cand.append(start + i)
                hits.append(1)
    if mark is not None and snap is None and mark >= len(u):
        snap = MergeState(len(u), list(cand), list(hits))
    return cand, hits, snap


def independent_rows(C: Tensor, order: list[int], r: int) -> list[int] | None:
    """The first r rows of C, in ``order``, that are linearly independent (or None)."""
    picked: list[int] = []
    for i in order:
        trial = picked + [i]
        if full_rank(C[trial]):
            picked = trial
            if len(picked) == r:
                return picked
    return None


def full_rank(M: Tensor) -> bool:
    """The rows of M are linearly independent (to a relative 1e-6)."""
    sv = torch.linalg.svdvals(M)
    return len(sv) == len(M) and float(sv[-1]) > 1e-6 * float(sv[0])


def linear_layers(model: nn.Module) -> list[str]:
    """The names of the model's ``nn.Linear`` layers, in ``named_modules`` order."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def group_rows(rows: Tensor, rel: float = 1e-4) -> tuple[list[Tensor], list[int]]:
    """Rows grouped in order: each joins the first group whose first row lies within
    ``rel * (1 + |first row|)`` of it. The groups' first rows and their sizes (a first-layer
    unit that one sample alone reaches gives that sample's input, so such units agree)."""
    reps: list[Tensor] = []
    counts: list[int] = []
    for c in rows:
        for k, r in enumerate(reps):
            if torch.norm(c - r) <= rel * (1.0 + torch.norm(r)):
                counts[k] += 1
                break
        else:
            reps.append(c)
            counts.append(1)
    return reps, counts


def recover_inputs(gw: Tensor, gb: Tensor, batch_size: int, prior_states: np.ndarray | None, seed: int) -> np.ndarray:
    """Inputs of a linear layer from its weight and bias gradients.

    Every unit j with a non-zero bias gradient gives a candidate ``gw[j] / gb[j]``. Units that
    only one sample activates give that sample's input exactly, so candidates that agree across
    several units are the inputs; mixtures from units shared by several samples do not repeat.
    """
    scale = gb.abs().max()
    if scale == 0:
        raise ValueError("the first layer's bias gradient is zero: nothing to recover")
    units = torch.nonzero(gb.abs() > 1e-9 * scale).flatten()
    units = units[torch.argsort(gb[units].abs(), descending=True)]
    reps, counts = group_rows(gw[units] / gb[units, None])
    order = np.argsort(-np.asarray(counts), kind="stable")
    chosen = [reps[k] for k in order[:batch_size] if counts[k] >= 2 or batch_size == 1]
    out = [c.float().numpy() for c in chosen]
    rng = np.random.default_rng(seed)
    while len(out) < batch_size:  # not enough single-sample units: fill from the prior
        if prior_states is not None and len(prior_states):
            out.append(prior_states[rng.integers(len(prior_states))].reshape(-1))
        else:
            out.append(reps[order[len(out) % len(reps)]].float().numpy())
    return np.stack(out[:batch_size])


def closed_form_reconstruction(inp: AttackInput, batch: Batch, name: str) -> Reconstruction:
    """A batch computed in closed form, as a :class:`Reconstruction` with its relative L2
    gradient distance to the update (the attacker's own check; continuous actions are kept as
    values, discrete ones as the (B, A) probabilities)."""
    p = {k: v.detach().requires_grad_(True) for k, v in inp.params.items()}
    dist = float(gradient_distance(inp.loss.gradient(inp.model, p, inp.target_params, batch), tuple(inp.gradient), "rel_l2"))
    return Reconstruction(
        attack=name,
        states=batch.states.detach().numpy().astype(np.float32),
        action_probs=batch.actions.detach().numpy(),
        rewards=batch.rewards.detach().numpy(),
        next_states=batch.next_states.detach().numpy(),
        dones=batch.dones.detach().numpy(),
        objective=dist,
        grad_distance=dist,
        continuous=inp.continuous,
    )


def output_gradients(h: Tensor, g_weight: Tensor, g_bias: Tensor) -> Tensor:
    """Per-sample gradients of a last linear layer's outputs (B, O), by least squares: the layer's
    weight and bias gradients are ``sum_i g_i [h_i, 1]`` over the samples' inputs h (B, H)."""
    design = torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype)], dim=1)  # (B, H+1)
    rhs = torch.cat([g_weight, g_bias[:, None]], dim=1)  # (O, H+1)
    return lstsq(design.T, rhs.T)
