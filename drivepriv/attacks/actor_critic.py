"""Exact attacks on TD3's update: the twin critics read (s, a) (issue 16).

A TD3 critic ``Q(s, a)`` is an MLP whose first linear layer takes the concatenated flattened
state and action. Its weight and bias gradients are the same sum of rank-one terms over the
batch as a Q-network's, with ``[s_i, a_i, 1]`` for the inputs, and the actor's term of the loss
never reaches a critic (the critics are detached there, :class:`~drivepriv.agents.td3.TD3LossSpec`).
So the exact machinery (:mod:`drivepriv.attacks.exact`: search, certify, peel, complete) run on
one critic recovers every transition's state *and* the action it took, whatever the actor's
update (delayed or not). The critic's output gradient of sample i is
``dL/dQ1_i = 2 (Q1_i - y_i) / B``, which gives the TD target ``y_i``; the next state follows from
the transition prior and the reward from the target:
``r_i = y_i - gamma (1 - d_i) min(Q1', Q2')(s'_i, pi'(s'_i))`` with the target networks.

The sub-networks are found by name: ``q1`` and ``q2`` (drivepriv's :class:`~drivepriv.agents.td3.TD3Net`
and the audit's model protocol), each a chain of biased linear layers with ReLU between them.
Nothing here reads the truth.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from drivepriv.agents.common import Batch
from drivepriv.attacks import exact
from drivepriv.attacks.chain import Chain, Search
from drivepriv.attacks.base import AttackInput, Reconstruction, closed_form_reconstruction, group_rows, linear_layers, output_gradients, recover_inputs

#: The sub-networks of an actor-critic that read (s, a), in the order they are tried.
CRITICS = ("q1", "q2")
#: A point one critic certifies must pass the other critic's column test (its output gradient,
#: through its own patterns there, in that layer's column space) to this squared relative
#: residual. Measured on MetaDrive batches of 16: true samples 2e-10 to 2e-8, a point on a true
#: sample's cell that one critic's row spaces cannot tell from it 2e-3.
CROSS_TOL = 1e-5


def critics(model: nn.Module) -> list[str]:
    """The names of the model's critics (sub-networks that read the state and the action)."""
    return [n for n in CRITICS if isinstance(getattr(model, n, None), nn.Module)]


def reads_actions(inp: AttackInput) -> bool:
    """Continuous actions and critics that read them: the update carries each (s, a)."""
    return inp.continuous and bool(critics(inp.model))


def sub_dict(d: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries of a parameter (or gradient) dict under ``prefix.``, with the prefix removed."""
    return {k[len(prefix) + 1 :]: v for k, v in d.items() if k.startswith(prefix + ".")}


def _box(inp: AttackInput) -> tuple[np.ndarray, np.ndarray]:
    """The critic's input box: the observation box, then the action box [-1, 1]^d."""
    low, high = inp.priors.codec.box()
    d = inp.n_actions
    return np.concatenate([np.asarray(low, np.float64).reshape(-1), -np.ones(d)]), np.concatenate([np.asarray(high, np.float64).reshape(-1), np.ones(d)])


def split(inp: AttackInput, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Critic inputs (k, D + d) -> states (k, *obs_shape) and actions (k, d) clipped to the action box."""
    x = np.asarray(x, dtype=np.float32).reshape(len(x), -1)
    D = int(np.prod(inp.obs_shape))
    return x[:, :D].reshape(len(x), *inp.obs_shape), np.clip(x[:, D:], -1.0, 1.0)


def analytic_inputs(inp: AttackInput, seed: int) -> np.ndarray:
    """The (n, D + d) critic inputs the first critic's first layer gives in closed form
    (``dL/dW_j / dL/db_j``; exact for a batch of one, see :func:`drivepriv.attacks.base.recover_inputs`)."""
    name = critics(inp.model)[0]
    first = linear_layers(getattr(inp.model, name))[0]
    g = sub_dict(dict(zip(inp.params, inp.gradient)), name)
    prior = inp.priors.prior_states
    if prior is not None and len(prior):  # the attacker's own states, with a neutral action
        prior = np.concatenate([np.asarray(prior, np.float32).reshape(len(prior), -1), np.zeros((len(prior), inp.n_actions), np.float32)], 1)
    return recover_inputs(g[f"{first}.weight"].double(), g[f"{first}.bias"].double(), inp.n_transitions, prior, seed)


def exact_inputs(inp: AttackInput, seed: int, restarts: int, starts: np.ndarray | None = None, passes: int = 3) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Critic inputs (k, D + d) certified from the update, k <= n, largest TD error first, their
    TD targets (k,) and the search's statistics.

    The critics see the same inputs and the same TD target: a sample certified in one critic,
    with its target ``y = Q(x) - B g / 2`` from its output gradient g there, has a known output
    gradient ``2 (Q'(x) - y) / B`` in the other, so its exact contribution is peeled off the
    other critic's update before that one is searched for the rest (fewer terms, more rank
    room). Critics are searched in turn until a whole pass certifies nothing new. A point one
    critic certifies is kept only if the other's whole update has room for it too (its column
    test, :data:`CROSS_TOL`): where one critic's row spaces are few (inputs nearly dependent),
    points on a sample's cell towards its neighbours pass that critic's tests, and the other
    critic, whose cells differ, rejects them."""
    n, B = inp.n_transitions, inp.batch_size
    g = dict(zip(inp.params, inp.gradient))
    names = critics(inp.model)
    chains = {c: Chain(getattr(inp.model, c), sub_dict(inp.params, c), sub_dict(g, c)) for c in names}
    # each critic's spaces from its whole update, for the other's certified points
    spaces = {c: Search(chains[c], [layer.grad_matrix for layer in chains[c].layers], n) for c in names}
    xs = torch.zeros(0, chains[names[0]].in_dim, dtype=torch.float64)
    ys = torch.zeros(0, dtype=torch.float64)
    stats: dict[str, float] = {}
    idle = 0
    for step in range(passes * len(names)):
        if len(xs) >= n or idle == len(names):
            break
        c = names[step % len(names)]
        chain = chains[c]
        res = exact.recover_exact(getattr(inp.model, c), sub_dict(inp.params, c), _peeled(chain, xs, ys, B), n - len(xs), _box(inp), seed + step, starts=starts, restarts=restarts)
        stats.setdefault("rank_first_layer", res.stats.get("rank_first_layer", 0.0))
        new = torch.as_tensor(res.states, dtype=torch.float64).reshape(-1, chain.in_dim)
        out_g = torch.as_tensor(res.output_grads)
        keep = torch.ones(len(new), dtype=torch.bool)
        if len(xs) and len(new):  # a point certified twice is one sample
            keep &= torch.cdist(new, xs).min(1).values > 1e-4 * (1.0 + new.norm(dim=1))
        for other in names:  # and a sample of one critic is a sample of the other
            if other != c and len(new):
                keep &= spaces[other].column_test(new, spaces[other].last_hidden)[0] < CROSS_TOL
        new, out_g = new[keep], out_g[keep]
        stats[f"{c}_pass{step // len(names)}"] = float(len(new))
        idle = 0 if len(new) else idle + 1
        if len(new):
            xs = torch.cat([xs, new])
            ys = torch.cat([ys, _output(chain, new) - B * out_g[:, 0].double() / 2.0])
    order = torch.argsort(-(_output(chains[names[0]], xs) - ys).abs(), stable=True) if len(xs) else torch.zeros(0, dtype=torch.long)
    return xs[order].float().numpy(), ys[order].numpy(), stats


def _peeled(chain: Chain, xs: Tensor, ys: Tensor, B: int) -> dict[str, Tensor]:
    """The chain's update less the exact contributions of the samples ``xs`` with TD targets
    ``ys`` (output gradients ``2 (Q(x) - y) / B``), by parameter name."""
    contrib = chain.per_sample_gradients(xs, (2.0 * (_output(chain, xs) - ys) / B)[:, None]) if len(xs) else None
    out = {}
    for k, name in enumerate(chain.names):
        gw, gb = chain.layers[k].g_weight, chain.layers[k].g_bias
        if contrib is not None:
            gw, gb = gw - contrib[k][0], gb - contrib[k][1]
        out[f"{name}.weight"], out[f"{name}.bias"] = gw, gb
    return out


def _output(chain: Chain, x: Tensor) -> Tensor:
    """The chain's (one) output at inputs x (k, D), in double precision."""
    _, pre = chain.forward(x)
    return pre[-1][:, 0]


def complete(inp: AttackInput, x: np.ndarray, name: str, targets: np.ndarray | None = None) -> Reconstruction:
    """Given the critic inputs (n, D + d), the rest in closed form: each sample's TD target from
    the first critic's output gradient (least squares on its last layer), the next state from
    the transition prior, the reward from the target.

    ``targets`` (k,): the TD targets of the first k rows, certified with them
    (:func:`exact_inputs`). Those rows keep them, and only the rest of the last layer's gradient
    is solved for the others; their inputs are not certified, so their features there are not
    either, and their rewards come from the reward prior where the attacker has one (the least
    squares on uncertain features can be off by orders of magnitude)."""
    n = inp.n_transitions
    states, actions = (torch.as_tensor(a) for a in split(inp, x))
    critic = critics(inp.model)[0]
    net = getattr(inp.model, critic)
    last = linear_layers(net)[-1]
    feats: dict[str, Tensor] = {}
    handle = dict(net.named_modules())[last].register_forward_hook(lambda m, i, o: feats.__setitem__("h", i[0]))
    with torch.no_grad():
        q1 = functional_call(inp.model, inp.params, (states, actions))[1]
    handle.remove()
    h = feats["h"].double()
    g = sub_dict(dict(zip(inp.params, inp.gradient)), critic)
    k = 0 if targets is None else len(targets)
    coef = torch.zeros(n, dtype=torch.float64)  # dL/dQ1_i = 2 (Q1_i - y_i) / B
    if k:
        coef[:k] = 2.0 * (q1[:k].double() - torch.as_tensor(np.asarray(targets), dtype=torch.float64)) / inp.batch_size
    if k < n:
        gw = g[f"{last}.weight"].double() - coef[None, :k] @ h[:k]
        gb = g[f"{last}.bias"].double() - coef[:k].sum()
        coef[k:] = output_gradients(h[k:], gw, gb)[:, 0]
    target = (q1.double() - coef * inp.batch_size / 2.0).float()
    dones = torch.zeros(n)
    dyn = inp.priors.physics or inp.priors.dynamics
    with torch.no_grad():
        next_states = dyn(states, actions) if dyn is not None else states.clone()
        # TD3: min(Q1', Q2')(s', pi'(s')); SAC: the soft value at the policy's mean action (the
        # client's own noise for a' is unknown to the server)
        rewards = target - inp.loss.gamma * (1.0 - dones) * inp.loss.next_value(inp.model, inp.params, inp.target_params, next_states)
        if targets is not None and k < n and inp.priors.reward is not None:
            rewards[k:] = inp.priors.reward(states[k:], actions[k:], next_states[k:], dones[k:]).reshape(-1)
    return closed_form_reconstruction(inp, Batch(states, actions, rewards, next_states, dones), name)


def update_candidates(inp: AttackInput, found: np.ndarray, targets: np.ndarray, m: int) -> np.ndarray:
    """Up to m critic inputs (m', D + d) for the transitions the critics do not certify, read off
    what the certified ones leave of the first critic's first-layer update.

    Peeled of the certified samples' exact contributions, that layer's gradient is
    ``sum_i delta_ij [x_i, 1]`` over the others only, so each unit's ratio
    ``dL/dW_j / dL/db_j`` is a weighted mean of their inputs: exact where one sample alone
    reaches the unit, a mixture of them otherwise (which keeps every feature the batch shares,
    such as the lane). Units whose peeled bias gradient is at the float32 rounding of the
    update carry nothing and are skipped, and so are ratios outside the input box (weights of
    both signs). Ratios that several units agree on come first (single-sample units), then the
    others farthest from those chosen."""
    name = critics(inp.model)[0]
    chain = Chain(getattr(inp.model, name), sub_dict(inp.params, name), sub_dict(dict(zip(inp.params, inp.gradient)), name))
    full = chain.layers[0].grad_matrix
    xs = torch.as_tensor(np.asarray(found, np.float64).reshape(len(found), chain.in_dim))
    rest = _peeled(chain, xs, torch.as_tensor(np.asarray(targets, np.float64)), inp.batch_size)
    first = chain.names[0]
    g = torch.cat([rest[f"{first}.weight"], rest[f"{first}.bias"][:, None]], dim=1)
    b = g[:, -1]
    live = torch.nonzero(b.abs() > 1e-5 * full[:, -1].abs().max().clamp_min(1e-300)).flatten()
    if m <= 0 or not len(live):
        return np.zeros((0, chain.in_dim), np.float32)
    live = live[torch.argsort(-b[live].abs(), stable=True)]
    ratios = g[live, :-1] / b[live, None]
    low, high = (torch.as_tensor(a) for a in _box(inp))
    span = high - low
    inside = ((ratios >= low - 1e-3 * span) & (ratios <= high + 1e-3 * span)).all(1)
    groups, counts = group_rows(ratios[inside])
    reps = [r.numpy() for r in groups]
    chosen = [reps[k] for k in np.argsort(-np.asarray(counts), kind="stable") if counts[k] >= 2][:m]
    rest_reps = [r for r, c in zip(reps, counts) if c < 2]
    taken = list(xs.numpy()) + chosen
    while len(chosen) < m and rest_reps:
        if taken:
            d = np.min(np.linalg.norm(np.asarray(rest_reps)[:, None, :] - np.asarray(taken)[None], axis=2), axis=1)
            k = int(np.argmax(d))
        else:
            k = 0
        chosen.append(rest_reps.pop(k))
        taken.append(chosen[-1])
    return np.asarray(chosen, np.float32).reshape(len(chosen), chain.in_dim)


def fill(found: np.ndarray, candidates: np.ndarray, n: int) -> np.ndarray:
    """``found`` (k, D) completed to n rows: first the candidates that are none of the found
    ones, then the found ones again (terms the update cannot split take their term)."""
    candidates, found = (np.asarray(a, np.float32) for a in (candidates, found))
    candidates, found = (a.reshape(len(a), int(np.prod(a.shape[1:]))) for a in (candidates, found))
    rows = list(found)
    for c in candidates:
        if len(rows) >= n:
            break
        if not len(found) or np.min(np.linalg.norm(found - c, axis=1)) > 1e-4 * (1.0 + np.linalg.norm(c)):
            rows.append(c)
    k = 0
    while len(rows) < n and len(found):
        rows.append(found[k % len(found)])
        k += 1
    return np.stack(rows[:n])


__all__ = ["CRITICS", "analytic_inputs", "complete", "critics", "exact_inputs", "fill", "reads_actions", "split", "sub_dict", "update_candidates"]
