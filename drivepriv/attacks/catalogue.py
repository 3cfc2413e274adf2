"""The attack catalogue (DESIGN.md section 3): one registry, one engine."""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from drivepriv.attacks.base import ATTACKS, Attack, AttackInput, Reconstruction, closed_form_reconstruction, linear_layers, output_gradients, recover_inputs
from drivepriv.attacks.engine import EngineSettings, run_engine
from drivepriv.agents.common import Batch
from drivepriv.attacks import actor_critic, exact, ppo, rowspace
from drivepriv.seeding import derive_seed


@ATTACKS.register("analytic")
class AnalyticAttack(Attack):
    """Closed-form recovery from the layer gradients (no optimisation).

    The input of a first linear layer with bias is ``dL/dW_j / dL/db_j`` for any unit j that
    only one sample activates (exact for a batch of one; Phong et al., 2017, "Privacy-preserving
    deep learning via additively homomorphic encryption"; Fowl et al., 2022, "Robbing the Fed").
    Actions and TD errors follow from the last layer's gradient (iDLG: Zhao et al., 2020),
    the next state from the transition prior, and the reward from the TD target.
    """

    name = "analytic"
    continuous_algorithms = ("td3", "sac", "ppo")
    summary = "closed form: first-layer input from weight/bias gradients, action and TD target from the last layer"

    def run(self, inp: AttackInput, seed: int) -> Reconstruction:
        t0 = time.perf_counter()
        if actor_critic.reads_actions(inp):  # TD3: the critic's first layer reads (s, a)
            rec = actor_critic.complete(inp, actor_critic.analytic_inputs(inp, seed), self.name)
        else:
            rec = complete_from_states(inp, analytic_states(inp, seed), self.name)
        rec.time_s = time.perf_counter() - t0
        return rec


def analytic_states(inp: AttackInput, seed: int) -> np.ndarray:
    """The (B, V, F) states the first linear layer's weight and bias gradients give in closed
    form (see :func:`~drivepriv.attacks.base.recover_inputs`). Under FedAvg with K > 1 local steps, -delta/lr sums
    gradients taken at K slightly different parameters: inputs stay exact where one sample
    drives a unit, the rest is an approximation."""
    first = linear_layers(inp.model)[0]
    g = dict(zip(inp.params, inp.gradient))
    gw, gb = g[f"{first}.weight"].double(), g[f"{first}.bias"].double()
    return recover_inputs(gw, gb, inp.n_transitions, inp.priors.prior_states, seed).reshape(inp.n_transitions, *inp.obs_shape)


def complete_from_states(inp: AttackInput, states: np.ndarray, name: str) -> Reconstruction:
    """Given the states (B, V, F), the rest in closed form: the per-sample gradients of the
    network's outputs from the last layer's gradient (least squares on the penultimate
    activations), hence the action and the TD error (DQN) or the advantage and return (PPO);
    the next state from the transition prior; the reward from the TD target or return (from
    the reward prior where the DQN's Huber loss saturates)."""
    B = inp.n_transitions
    last = linear_layers(inp.model)[-1]
    g = dict(zip(inp.params, inp.gradient))
    x = torch.as_tensor(states, dtype=torch.float32)
    # Penultimate activations of the states, then the per-sample output gradients.
    feats: dict[str, Tensor] = {}
    handle = dict(inp.model.named_modules())[last].register_forward_hook(lambda m, i, o: feats.__setitem__("h", i[0]))
    with torch.no_grad():
        out = functional_call(inp.model, inp.params, (x,))
    handle.remove()
    h = feats["h"].double()  # (B, H)
    gwl, gbl = g[f"{last}.weight"].double(), g[f"{last}.bias"].double()  # (O, H), (O,)
    coef = output_gradients(h, gwl, gbl)  # (B, O): dL/d output_ik
    if ppo.is_ppo(inp):
        return ppo.complete(inp, x, out, coef, name)
    dyn = inp.priors.physics or inp.priors.dynamics
    dones = torch.zeros(B)
    actions = coef.abs().argmax(-1)
    td_raw = inp.batch_size * coef[torch.arange(B), actions]  # huber'(q - y) = clamp(q - y, -1, 1)
    saturated = td_raw.abs() >= 1.0 - 1e-6  # |q - y| >= 1: the gradient gives only the sign
    target = out[torch.arange(B), actions] - td_raw.clamp(-1.0, 1.0).float()
    probs = nn.functional.one_hot(actions, inp.n_actions).float()
    with torch.no_grad():
        next_states = dyn(x, probs) if dyn is not None else x.clone()
        v_next = functional_call(inp.model, inp.target_params, (next_states,)).max(-1).values
        rewards = target - inp.loss.gamma * (1.0 - dones) * v_next
        if inp.priors.reward is not None and bool(saturated.any()):
            # where the TD error saturates the Huber loss, the target is unknown: take the
            # reward the scenario's reward function gives the predicted next state
            prior_r = inp.priors.reward(x, probs, next_states, dones).float()
            rewards = torch.where(saturated, prior_r, rewards)
    return closed_form_reconstruction(inp, Batch(x, probs, rewards, next_states, dones), name)


class _EngineAttack(Attack):
    """An attack that is a configuration of the shared engine."""

    def engine_settings(self, inp: AttackInput) -> EngineSettings:
        raise NotImplementedError

    def run(self, inp: AttackInput, seed: int) -> Reconstruction:
        return run_engine(inp, self.engine_settings(inp), seed, self.name)

    def _common(self) -> dict:
        keys = ("iterations", "restarts", "lr")
        return {k: self.settings[k] for k in keys if k in self.settings}


@ATTACKS.register("dlg")
class DLGAttack(_EngineAttack):
    """Deep Leakage from Gradients (Zhu, Liu and Han, NeurIPS 2019): L2 gradient distance,
    L-BFGS, every unknown free, no priors. Baseline."""

    name = "dlg"
    summary = "Deep Leakage from Gradients: L2 gradient matching, L-BFGS, no priors (baseline)"

    def engine_settings(self, inp: AttackInput) -> EngineSettings:
        c = self._common()
        c.pop("lr", None)
        return EngineSettings(**c, optimizer="lbfgs", distance="l2", init="normal")


@ATTACKS.register("idlg")
class IDLGAttack(_EngineAttack):
    """Improved DLG (Zhao, Mopuri and Bilen, 2020, "iDLG: Improved Deep Leakage from
    Gradients"): DLG with the label (here: the action) read off the last layer's bias gradient
    first. For DQN the output-bias gradient of a batch of one is non-zero only at the action
    taken, so the action is exact; for larger batches it says which actions occur but not for
    which transition, and the actions stay free. For PPO the action's entry of the logits' bias
    gradient is the one whose sign differs from all others. Baseline."""

    name = "idlg"
    continuous_algorithms = ()
    summary = "iDLG: DLG with the action recovered from the last layer's gradient first (baseline)"

    def engine_settings(self, inp: AttackInput) -> EngineSettings:
        c = self._common()
        c.pop("lr", None)
        fixed = None
        if inp.n_transitions == 1:
            last = linear_layers(inp.model)[-1]
            g_bias = dict(zip(inp.params, inp.gradient))[f"{last}.bias"]
            if ppo.is_ppo(inp):
                # logits' gradient -A (e_a - pi): the action's entry has the sign of no other
                sign = torch.sign(g_bias[: inp.n_actions])
                odd = torch.nonzero(sign != torch.sign(sign.sum())).flatten()
                fixed = np.array([int(odd[0])]) if len(odd) == 1 else None
            else:
                fixed = np.array([int(g_bias.abs().argmax())])
        return EngineSettings(**c, optimizer="lbfgs", distance="l2", init="normal", fixed_actions=fixed)


@ATTACKS.register("ig")
class InvertingGradientsAttack(_EngineAttack):
    """Inverting Gradients (Geiping et al., NeurIPS 2020): cosine gradient distance, Adam,
    box constraints on the observation. Baseline."""

    name = "ig"
    summary = "Inverting Gradients: cosine gradient matching, Adam, box constraints (baseline)"

    def engine_settings(self, inp: AttackInput) -> EngineSettings:
        return EngineSettings(**self._common(), optimizer="adam", distance="cosine", init="normal", box=True)


@ATTACKS.register("rgia")
class RGIAAttack(_EngineAttack):
    """Regularization Gradient Inversion Attack (He, 2025, "Gradient Inversion in Federated
    Reinforcement Learning", arXiv 2512.00303): gradient matching plus state-feasibility, reward
    and transition-dynamics regularizers built from public prior knowledge of the task. Our
    formulation: DESIGN.md section 2. Initialised from the attacker's own simulator rollouts."""

    name = "rgia"
    summary = "RGIA: gradient matching + state, reward and learned-dynamics regularizers"

    #: The regularizers this attack uses (the paper's three).
    terms: tuple[str, ...] = ("state", "reward", "dynamics")

    def weights(self, inp: AttackInput) -> dict[str, float]:
        given = dict(self.settings.get("weights") or {"state": 1.0, "reward": 1.0, "dynamics": 0.1, "physics": 1.0})
        return {k: w for k, w in given.items() if k in self.terms}

    def engine_settings(self, inp: AttackInput) -> EngineSettings:
        weights = self.weights(inp)
        return EngineSettings(
            **self._common(), optimizer="adam", distance="rel_l2", init="prior", box=True, weights=weights
        )


@ATTACKS.register("rgia-k")
class RGIAKAttack(RGIAAttack):
    """drivepriv's attack: the batch recovered exactly from the algebra of the update, the rest
    in closed form, RGIA's objective (He, 2025) only where nothing could be certified.

    Every linear layer's gradient is a sum of rank-one terms, one per transition (the first
    layer's case is the analytic recovery of Phong et al., 2017; disaggregating them is SPEAR's,
    Dimitrov et al., 2024): :mod:`drivepriv.attacks.exact` searches, certifies, peels and
    completes them from starts anywhere in the observation box, independent of where the
    attacker's own rollouts drove. Actions and TD errors then follow from the last layer by
    least squares, the next state from the closed-form kinematics of the simulator (the learned
    model elsewhere), the reward from the TD target or, where the Huber loss saturates, from the
    reward prior. Transitions the update provably merges (same action and every ReLU pattern)
    take their term. Where no state is certified, the row-space search
    (:mod:`drivepriv.attacks.rowspace`) and the engine's refinement with the state, reward and
    kinematic regularizers take over, the states confined to the first-layer gradient's
    subspace."""

    name = "rgia-k"
    continuous_algorithms = ("td3", "sac", "ppo")
    summary = "drivepriv: the batch recovered exactly from the update's rank-one structure (search, certify, peel, complete), closed-form rest, RGIA refinement only where nothing is certified"

    def weights(self, inp: AttackInput) -> dict[str, float]:
        given = dict(self.settings.get("weights") or {"state": 1.0, "reward": 1.0, "dynamics": 0.1, "physics": 1.0})
        keep = ("state", "reward", "physics") if inp.priors.physics is not None else ("state", "reward", "dynamics")
        return {k: w for k, w in given.items() if k in keep}

    def engine_settings(self, inp: AttackInput) -> EngineSettings:
        settings = super().engine_settings(inp)
        settings.subspace = True
        return settings

    def run(self, inp: AttackInput, seed: int) -> Reconstruction:
        """States recovered exactly from the update's algebra (:mod:`drivepriv.attacks.exact`,
        started anywhere in the observation box; the analytic candidates and a few of the
        attacker's own rollout states are added as starts, which only speeds it up), the rest in
        closed form. Where the update is explained by fewer terms than transitions, the missing
        transitions are merged into terms the update provably cannot split (same action and
        every ReLU pattern); they take the term they are merged into. Where it is not explained,
        the row-space search gives the missing states; where nothing was certified, the
        regularised refinement then runs as in RGIA."""
        t0 = time.perf_counter()
        if actor_critic.reads_actions(inp):
            return self._run_critics(inp, seed, t0)
        n, D = inp.n_transitions, int(np.prod(inp.obs_shape))
        analytic = analytic_states(inp, seed).reshape(n, -1)
        starts = [analytic]
        prior = inp.priors.prior_states
        if prior is not None and len(prior):
            rng = np.random.default_rng(derive_seed(seed, "attack", self.name, "starts"))
            starts.append(np.asarray(prior, dtype=np.float32).reshape(len(prior), -1)[rng.choice(len(prior), min(64, len(prior)), replace=False)])
        low, high = inp.priors.codec.box()
        res = exact.recover_exact(
            inp.model,
            inp.params,
            dict(zip(inp.params, inp.gradient)),
            n,
            (np.asarray(low).reshape(-1), np.asarray(high).reshape(-1)),
            derive_seed(seed, "attack", self.name, "exact"),
            starts=np.concatenate(starts),
            restarts=int(self.settings.get("search_restarts", 512)),
            one_hot=not ppo.is_ppo(inp),  # DQN: dL/dQ is non-zero at the action taken only
            sample_output_grad=float("inf") if ppo.is_ppo(inp) else 1.0 / inp.batch_size,  # DQN's Huber loss: |dL/dQ| <= 1 / B
            one_step=inp.local_steps == 1,
        )
        k = len(res.states)
        explained = k > 0 and res.residual_norm < 1e-3
        if k == n or explained:
            # merged transitions take the terms with the largest output gradients first
            order = np.argsort(-np.abs(res.output_grads).sum(1), kind="stable")
            fill = [res.states[order[i % k]] for i in range(n - k)]
            states = np.concatenate([res.states, np.asarray(fill, dtype=np.float32).reshape(-1, res.states.shape[1])])
        else:
            found = rowspace.recover_states(
                inp,
                derive_seed(seed, "attack", self.name, "rowspace"),
                restarts=int(self.settings.get("search_restarts", 1024)),
                iterations=int(self.settings.get("search_iterations", 300)),
                starts=np.concatenate([res.states.reshape(k, -1), analytic]) if k else analytic,
            )
            new = [s for s in found.states if not k or np.min(np.linalg.norm(res.states - s, axis=1)) > 1e-4 * (1.0 + np.linalg.norm(s))]
            new += list(found.states)[: max(0, n - k - len(new))]  # short: repeat the search's own
            states = np.concatenate([res.states.reshape(k, D), np.asarray(new[: n - k], dtype=np.float32).reshape(-1, D)])
            if not k:  # smooth activations (PPO's tanh): the row spaces certify the polished states
                k = min(found.certified, n)
        start = complete_from_states(inp, states.reshape(n, *inp.obs_shape), self.name)
        if k > 0:
            # Every transition accounted for by the update: the rest is closed form, and gradient
            # matching has nothing left to add. Where only some are certified, refining would
            # move the certified states too (measured: a batch of 16 with 15 certified fell
            # from 15 egos within 1 m to 5); the others keep the search's closed-form states.
            rec = start
        else:
            settings = self.engine_settings(inp)
            settings.init_from = start
            settings.lr *= 0.1  # refine: small steps around a closed-form start
            # small steps move little: a quarter of the budget (the kinematic prior is the cost)
            settings.iterations = int(self.settings.get("refine_iterations", max(1, settings.iterations // 4)))
            rec = run_engine(inp, settings, seed, self.name)
        rec.time_s = time.perf_counter() - t0
        rec.extra["states_found"] = float(k)
        rec.extra["update_rank"] = float(res.stats.get("rank_first_layer", 0.0))
        return rec

    def _run_critics(self, inp: AttackInput, seed: int, t0: float) -> Reconstruction:
        """TD3 and SAC: each transition's (s, a) recovered exactly from a critic's update
        (:mod:`drivepriv.attacks.actor_critic`), the rest in closed form. The transitions not
        certified take the inputs the rest of the update gives unit by unit
        (:func:`~drivepriv.attacks.actor_critic.update_candidates`), then the certified ones; where
        the update gives neither, the analytic candidates and the regularised refinement."""
        n = inp.n_transitions
        analytic = actor_critic.analytic_inputs(inp, seed)
        found, targets, stats = actor_critic.exact_inputs(inp, derive_seed(seed, "attack", self.name, "exact"), int(self.settings.get("search_restarts", 512)), starts=analytic)
        k = len(found)
        given = actor_critic.update_candidates(inp, found, targets, n - k)
        extra = given if k else np.concatenate([given, analytic.reshape(n, -1)])  # nothing certified: complete with the analytic ones
        rec = actor_critic.complete(inp, actor_critic.fill(found, extra, n), self.name, targets)
        if k == 0 and not len(given):
            settings = self.engine_settings(inp)
            settings.subspace = False  # the first layer is the actor's: its subspace holds s, not a
            settings.init_from = rec
            settings.lr *= 0.1
            settings.iterations = int(self.settings.get("refine_iterations", max(1, settings.iterations // 4)))
            rec = run_engine(inp, settings, seed, self.name)
        rec.time_s = time.perf_counter() - t0
        rec.extra["states_found"] = float(k)
        rec.extra["update_rank"] = float(stats.get("rank_first_layer", 0.0))
        return rec


def make_attack(name: str, **settings: object) -> Attack:
    return ATTACKS.get(name)(**settings)
