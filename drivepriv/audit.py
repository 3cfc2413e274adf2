"""Audit API: what do the gradients of *your* federated RL system give away?

For users who run their own FRL system, without drivepriv's training loop::

    from drivepriv.audit import make_env, invert_gradients, invert_update, decode_observations
    env = make_env("merge", seed=0)          # the environment whose observations the priors expect
    rec = invert_gradients(model, gradients, scenario="merge", algorithm="dqn", batch_size=8)
    decode_observations("merge", rec.states)  # DataFrame in physical units

``algorithm="dqn"`` means exactly: the mean over the batch of
``smooth_l1(Q(s)[a], r + gamma * (1 - done) * max_a' Q_target(s')[a'])``, target detached,
where Q takes the flattened observation. ``algorithm="ppo"`` means PPO's loss at the first
minibatch of an update with one-step returns (:class:`drivepriv.agents.ppo.PPOLossSpec`): the
model is an actor-critic with A + 1 outputs, the A action logits then the value; on continuous
actions, d + 1 outputs (the d Gaussian means, then the value) and a parameter ``log_std`` (d,)
on the model, the state-independent log standard deviation (``rec.actions``: the raw draws).
The model may be any ``nn.Module`` whose first layer is ``nn.Linear`` (any widths and activations).

``algorithm="td3"`` (continuous actions) means exactly TD3's loss
(:class:`drivepriv.agents.td3.TD3LossSpec`): ``mean((Q1(s, a) - y)^2) + mean((Q2(s, a) - y)^2)
- policy_coef * mean(Q1(s, actor(s)))`` with ``y = r + gamma (1 - done) min(Q1', Q2')(s',
actor'(s'))`` from the target model (detached) and the critics detached in the actor's term.
The model has submodules ``actor`` (flattened observation -> action in [-1, 1]^d), ``q1`` and
``q2`` (concatenated (flattened observation, action) -> one value); the audit uses them, not the
model's own forward. ``rec.actions`` are then the (B, d) actions in that box.
``algorithm="sac"``: the same submodules, the actor giving the mean, then the log standard
deviation, of the pre-tanh Gaussian (2d values), and SAC's loss with the fixed temperature
``alpha`` (:class:`drivepriv.agents.sac.SACLossSpec`); the client's sampling noise is its own,
so the audit evaluates the policy's terms at the mean action.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Sequence

import gymnasium as gym
import numpy as np
import pandas as pd
import torch
from torch import nn

from drivepriv.agents.dqn import DQNLossSpec
from drivepriv.agents.ppo import PPOLossSpec
from drivepriv.agents.sac import SACLossSpec, SACNet
from drivepriv.agents.td3 import TD3LossSpec, TD3Net
from drivepriv.attacks import ATTACKS, AttackInput, make_attack
from drivepriv.config import RunConfig, apply_overrides
from drivepriv.envs import make_codec
from drivepriv.envs import make_env as _make_env
from drivepriv.errors import ConfigError
from drivepriv.scenarios import load_scenario

SUPPORTED_ALGORITHMS = ("dqn", "ppo", "td3", "sac")
#: The sub-networks of an actor-critic model (``algorithm="td3"`` or ``"sac"``).
ACTOR_CRITIC = ("actor", "q1", "q2")


@dataclass
class AuditReconstruction:
    """A reconstructed minibatch, in the environment's (normalised) observation space."""

    attack: str
    states: np.ndarray  # (B, V, F)
    actions: np.ndarray  # (B,) ints; continuous actions (TD3): (B, d) values in [-1, 1]
    action_probs: np.ndarray  # (B, A); continuous actions: the (B, d) values again
    rewards: np.ndarray  # (B,)
    next_states: np.ndarray  # (B, V, F)
    dones: np.ndarray  # (B,)
    grad_distance: float


class _FlatInput(nn.Module):
    """Feeds the flattened observation to a user's model (which sees (B, V*F))."""

    def __init__(self, inner: nn.Module, n_actions: int) -> None:
        super().__init__()
        self.inner = inner
        self.n_actions = n_actions
        if isinstance(getattr(inner, "log_std", None), nn.Parameter):
            self.log_std = inner.log_std  # PPO's Gaussian policy: the loss reads params["log_std"]

    def from_inner(self, name: str) -> str:
        """The user's name of this wrapper's parameter ``name``."""
        return name[len("inner.") :] if name.startswith("inner.") else name

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.inner(obs.reshape(obs.shape[0], -1))


def _scenario(scenario: str | RunConfig, settings: dict[str, Any] | None) -> RunConfig:
    cfg = scenario if isinstance(scenario, RunConfig) else load_scenario(scenario)
    if settings:
        cfg = apply_overrides(cfg, [(k.split("."), v) for k, v in settings.items()], source="settings")
    return cfg


def make_env(scenario: str | RunConfig, seed: int = 0) -> gym.Env:
    """The scenario's environment, reset with ``seed``: the observations the priors expect."""
    env = _make_env(_scenario(scenario, None).env)
    env.reset(seed=seed)
    return env


def decode_observations(scenario: str | RunConfig, observations: np.ndarray) -> pd.DataFrame:
    """Observations (B, V, F), (V, F) or flattened (B, V*F) -> one row per transition and
    vehicle, world frame, SI units.

    Columns: transition, vehicle (0 is the ego), present, x_m, y_m, vx_mps, vy_mps, speed_mps,
    and heading_rad where the observation has cos_h/sin_h. Absent vehicles are left out.
    """
    codec = make_codec(_scenario(scenario, None).env)
    obs = np.asarray(observations, dtype=np.float32)
    if obs.ndim == 2 and obs.shape[1] == codec.vehicles_count * codec.n_features and obs.shape != (codec.vehicles_count, codec.n_features):
        obs = obs.reshape(len(obs), codec.vehicles_count, codec.n_features)  # flattened, as a model sees them
    if obs.ndim == 2:
        obs = obs[None]
    if obs.shape[1:] != (codec.vehicles_count, codec.n_features):
        raise ConfigError(
            f"observations of shape {obs.shape} do not fit the scenario's layout "
            f"(B, {codec.vehicles_count}, {codec.n_features}): features {', '.join(codec.features)}"
        )
    world = codec.decode_world(obs)
    speed = codec.speed(world)
    rows = []
    for b in range(world.shape[0]):
        for v in range(world.shape[1]):
            w = world[b, v]
            present = bool(obs[b, v, codec.index("presence")] > 0.5)
            if not present:
                continue
            row = {
                "transition": b,
                "vehicle": v,
                "present": present,
                "x_m": float(w[codec.index("x")]),
                "y_m": float(w[codec.index("y")]),
                "vx_mps": float(w[codec.index("vx")]),
                "vy_mps": float(w[codec.index("vy")]),
                "speed_mps": float(speed[b, v]),
            }
            if "cos_h" in codec.features and "sin_h" in codec.features:
                row["heading_rad"] = float(np.arctan2(w[codec.index("sin_h")], w[codec.index("cos_h")]))
            rows.append(row)
    return pd.DataFrame(rows)


def _check_actor_critic(model: nn.Module, cfg: RunConfig, algorithm: str) -> int:
    """TD3, SAC: the action dimension, after checking the model's actor and critics fit the scenario."""
    missing = [n for n in ACTOR_CRITIC if not isinstance(getattr(model, n, None), nn.Module)]
    actor_out = "action in [-1, 1]^d" if algorithm == "td3" else "the mean, then the log std, of the pre-tanh Gaussian (2d values)"
    if missing:
        raise ConfigError(
            f"model: algorithm='{algorithm}' needs submodules actor (flattened observation -> {actor_out}), q1 and q2 "
            f"(concatenated (observation, action) -> one value); {', '.join(missing)} missing"
        )
    stray = [k for k, _ in model.named_parameters() if k.split(".")[0] not in ACTOR_CRITIC]
    if stray:
        raise ConfigError(f"model: parameters outside actor, q1 and q2 ({', '.join(stray[:3])}): the {algorithm} loss has no place for them")
    env = _make_env(cfg.env)
    space = env.action_space
    env.close()
    if hasattr(space, "n") or len(space.shape) != 1:
        raise ConfigError(f"scenario '{cfg.name}' has discrete actions; algorithm='{algorithm}' needs a continuous (Box) action space")
    obs_dim, d = make_codec(cfg.env).obs_dim, int(space.shape[0])
    want = {"actor": (obs_dim, d if algorithm == "td3" else 2 * d), "q1": (obs_dim + d, 1), "q2": (obs_dim + d, 1)}
    for name, (n_in, n_out) in want.items():
        linears = [m for m in getattr(model, name).modules() if isinstance(m, nn.Linear)]
        if not linears or linears[0].bias is None or linears[0].in_features != n_in or linears[-1].out_features != n_out:
            raise ConfigError(
                f"model.{name}: expected an MLP of biased nn.Linear layers from {n_in} inputs to {n_out} output(s) on "
                f"'{cfg.name}' ({obs_dim} observation values, {d} action dimensions)"
            )
    return d


def _check_model(model: nn.Module, cfg: RunConfig, algorithm: str) -> tuple[int, bool]:
    """The model's action count (continuous: action dimension) and whether the actions are
    continuous, after checking the model fits the scenario and the algorithm."""
    if algorithm in ("td3", "sac"):
        return _check_actor_critic(model, cfg, algorithm), True
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    first = next((m for m in model.modules() if not list(m.children())), None)
    if not linears or first is not linears[0] or linears[0].bias is None:
        raise ConfigError("model: the first layer must be nn.Linear with a bias (an MLP on the flattened observation)")
    codec = make_codec(cfg.env)
    if linears[0].in_features != codec.obs_dim:
        raise ConfigError(
            f"model: the first layer takes {linears[0].in_features} inputs, but the scenario's observation has "
            f"{codec.obs_dim} ({codec.vehicles_count} vehicles x {codec.n_features} features)"
        )
    n_actions = linears[-1].out_features - (1 if algorithm == "ppo" else 0)
    env = _make_env(cfg.env)
    space = env.action_space
    env.close()
    if not hasattr(space, "n"):
        if algorithm != "ppo":
            raise ConfigError(f"scenario '{cfg.name}' has continuous actions; algorithm='{algorithm}' needs discrete ones (use td3, sac or ppo)")
        d = int(np.prod(space.shape))
        log_std = getattr(model, "log_std", None)
        if n_actions != d or not isinstance(log_std, nn.Parameter) or tuple(log_std.shape) != (d,):
            raise ConfigError(
                f"model: algorithm='ppo' on '{cfg.name}' ({d} continuous action dimensions) needs a last layer with {d + 1} "
                f"outputs (the {d} Gaussian means, then the value) and a parameter log_std of shape ({d},) on the model "
                f"(the state-independent log standard deviation); got {linears[-1].out_features} outputs"
                + ("" if isinstance(log_std, nn.Parameter) else " and no log_std parameter")
            )
        return n_actions, True
    env_actions = int(space.n)
    if n_actions != env_actions:
        want = f"{env_actions + 1} (the {env_actions} action logits, then the value)" if algorithm == "ppo" else str(env_actions)
        raise ConfigError(
            f"model: the last layer has {linears[-1].out_features} outputs, but for algorithm='{algorithm}' on "
            f"'{cfg.name}' it must have {want}: {env_actions} actions"
        )
    return n_actions, False


def _check_attack(attack: str, algorithm: str, continuous: bool) -> None:
    """A clear error where ``attack`` does not handle ``algorithm``'s actions (an unknown name:
    the registry's did-you-mean)."""
    if not ATTACKS.get(attack).supports(algorithm, continuous):
        ok = [n for n in ATTACKS.names() if ATTACKS.get(n).supports(algorithm, True)]
        raise ConfigError(f"attack '{attack}' reads discrete actions off the last layer; for algorithm='{algorithm}' use one of: {', '.join(ok)}")


def invert_gradients(
    model: nn.Module,
    gradients: Sequence[torch.Tensor],
    scenario: str | RunConfig = "merge",
    algorithm: str = "dqn",
    batch_size: int = 8,
    target_model: nn.Module | None = None,
    gamma: float = 0.99,
    attack: str = "rgia",
    seed: int = 0,
    settings: dict[str, Any] | None = None,
    vf_coef: float = 0.5,
    ent_coef: float = 0.0,
    policy_coef: float = 1.0,
    alpha: float = 0.2,
) -> AuditReconstruction:
    """Reconstruct the minibatch behind one shared gradient.

    Args:
        model: the Q-network the server sent (any module whose first layer is ``nn.Linear``; it
            receives the flattened observation).
        gradients: one tensor per model parameter, in ``model.parameters()`` order.
        scenario: a scenario name or YAML path: the environment the client drove.
        algorithm: the loss the client used (``"dqn"``, ``"ppo"``, ``"td3"`` or ``"sac"``, see the module docstring).
        batch_size: number of transitions behind the gradient.
        target_model: the target network (defaults to a copy of ``model``).
        gamma: the discount the client used.
        attack: an attack of ``drivepriv attacks``.
        seed: the attacker's seed (its own simulator rollouts, restarts).
        settings: configuration overrides, e.g. ``{"attack.iterations": 800}``.
        vf_coef, ent_coef: PPO's value-loss and entropy coefficients (``algorithm="ppo"``).
        policy_coef: TD3's weight of the actor's term (1; 0 for a critic-only step between
            delayed actor updates).
        alpha: SAC's entropy temperature (``algorithm="sac"``).
    """
    return _invert(model, gradients, "gradients", scenario, algorithm, batch_size, 1, 0.0, False, target_model, gamma, attack, seed, settings, (vf_coef, ent_coef, policy_coef, alpha, 1, 0))


def invert_update(
    model: nn.Module,
    update: Sequence[torch.Tensor],
    scenario: str | RunConfig = "merge",
    algorithm: str = "dqn",
    batch_size: int = 8,
    local_steps: int = 1,
    lr: float = 0.01,
    target_model: nn.Module | None = None,
    gamma: float = 0.99,
    attack: str = "rgia-k",
    seed: int = 0,
    same_batch: bool = False,
    settings: dict[str, Any] | None = None,
    vf_coef: float = 0.5,
    ent_coef: float = 0.0,
    policy_coef: float = 1.0,
    alpha: float = 0.2,
    policy_delay: int = 1,
    first_step: int = 0,
) -> AuditReconstruction:
    """Reconstruct the transitions behind one FedAvg update.

    ``update`` is the parameter delta (new minus old, one tensor per parameter in
    ``model.parameters()`` order) after ``local_steps`` plain SGD steps at ``lr`` on the loss of
    ``algorithm``, each on a fresh minibatch of ``batch_size`` transitions: the result holds all
    ``local_steps * batch_size`` of them (states of shape (K*B, V, F)). With
    ``same_batch=True`` every step used the same minibatch: the result holds its
    ``batch_size`` transitions, inverted from the update's mean gradient ``-update / (K lr)``
    (exact for one step; for several, the K gradients differ by the drift of the parameters,
    of order lr). TD3 with delayed actor updates: the actor's term is in the local steps k with
    ``(first_step + k + 1) % policy_delay == 0`` (``first_step``: the client's training steps
    before this update; ``drivepriv.agents.td3.TD3LossSpec``). Other arguments as
    :func:`invert_gradients`.
    """
    if local_steps < 1:
        raise ConfigError(f"local_steps: expected an integer >= 1, got {local_steps}")
    if policy_delay < 1 or first_step < 0:
        raise ConfigError(f"policy_delay, first_step: expected an integer >= 1 and one >= 0, got {policy_delay} and {first_step}")
    if not lr > 0:
        raise ConfigError(f"lr: expected the clients' positive local step size, got {lr}")
    return _invert(model, update, "update", scenario, algorithm, batch_size, local_steps, lr, same_batch, target_model, gamma, attack, seed, settings, (vf_coef, ent_coef, policy_coef, alpha, policy_delay, first_step))


def _invert(model, payload, what, scenario, algorithm, batch_size, local_steps, lr, same_batch, target_model, gamma, attack, seed, settings, coefs) -> AuditReconstruction:
    """invert_gradients (``what="gradients"``) and invert_update (``what="update"``)."""
    vf_coef, ent_coef, policy_coef, alpha, policy_delay, first_step = coefs
    if algorithm not in SUPPORTED_ALGORITHMS:
        raise ConfigError(f"algorithm '{algorithm}' is not supported; supported: {', '.join(SUPPORTED_ALGORITHMS)}")
    if batch_size < 1:
        raise ConfigError(f"batch_size: expected an integer >= 1, got {batch_size}")
    _check_attack(attack, algorithm, algorithm in ("td3", "sac"))  # continuous PPO: once the scenario is known
    params = list(model.parameters())
    if len(payload) != len(params):
        raise ConfigError(f"{what}: expected {len(params)} tensors (one per model parameter), got {len(payload)}")
    for i, (p, g) in enumerate(zip(params, payload)):
        if tuple(g.shape) != tuple(p.shape):
            raise ConfigError(f"{what}[{i}]: expected shape {tuple(p.shape)} like the parameter, got {tuple(g.shape)}")
        if not bool(torch.isfinite(torch.as_tensor(g)).all()):
            raise ConfigError(f"{what}[{i}]: contains NaN or infinite values; pass the {what} exactly as the client computed it")

    from drivepriv.pipeline import build_priors  # the same public priors as drivepriv eval

    cfg = _scenario(scenario, settings)
    cfg = apply_overrides(cfg, [(["seed"], seed)], source="seed")
    codec = make_codec(cfg.env)
    n_actions, continuous = _check_model(model, cfg, algorithm)
    payload = tuple(torch.as_tensor(g).detach().float() for g in payload)
    if algorithm in ("td3", "sac"):
        loss = TD3LossSpec(gamma=gamma, policy_coef=policy_coef, policy_delay=policy_delay, iteration=first_step) if algorithm == "td3" else SACLossSpec(gamma=gamma, alpha=alpha)
        net = TD3Net if algorithm == "td3" else SACNet
        wrapped, target = (net.from_modules(m.actor, m.q1, m.q2, codec.obs_dim, n_actions) for m in (copy.deepcopy(model), copy.deepcopy(target_model if target_model is not None else model)))
        by_name = dict(zip((k for k, _ in model.named_parameters()), payload))
        payload = tuple(by_name[k] for k, _ in wrapped.named_parameters())  # in the order TD3's loss reads them
    else:
        _check_attack(attack, algorithm, continuous)
        loss = DQNLossSpec(gamma=gamma) if algorithm == "dqn" else PPOLossSpec(gamma=gamma, vf_coef=vf_coef, ent_coef=ent_coef, continuous=continuous)
        wrapped = _FlatInput(copy.deepcopy(model), n_actions)
        target = _FlatInput(copy.deepcopy(target_model if target_model is not None else model), n_actions)
        by_name = dict(zip((k for k, _ in model.named_parameters()), payload))
        payload = tuple(by_name[wrapped.from_inner(k)] for k, _ in wrapped.named_parameters())  # log_std first
    priors, _, _ = build_priors(cfg, progress=False)
    fedavg = what == "update"
    steps = 1 if same_batch else local_steps
    if not fedavg:
        gradient = payload
    elif same_batch:
        gradient = tuple(-d / (lr * local_steps) for d in payload)
    else:
        gradient = tuple(-d / lr for d in payload)
    inp = AttackInput(
        model=wrapped,
        params={k: v.detach().clone() for k, v in wrapped.named_parameters()},
        target_params={k: v.detach().clone() for k, v in target.named_parameters()},
        gradient=gradient,
        loss=loss,
        batch_size=batch_size,
        obs_shape=tuple(codec.obs_shape),
        n_actions=n_actions,
        priors=priors,
        local_steps=steps,
        local_lr=lr if steps > 1 else 0.0,
        delta=payload if steps > 1 else None,
    )
    a = cfg.attack
    rec = make_attack(attack, iterations=a.iterations, restarts=a.restarts, lr=a.lr, weights=a.weights).run(inp, seed)
    return AuditReconstruction(
        attack=attack,
        states=rec.states,
        actions=rec.actions,
        action_probs=rec.action_probs,
        rewards=rec.rewards,
        next_states=rec.next_states,
        dones=rec.dones,
        grad_distance=rec.grad_distance,
    )
