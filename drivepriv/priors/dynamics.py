"""Learned transition prior: a small network fitted on the attacker's own rollouts of the public simulator.

The attacker knows the simulator (it is public), so it can drive it itself, with its own
seeds, and learn ``s' = f(s, a)`` in the observation space. This is RGIA's transition
regularizer for simulators without a closed-form model; drivepriv's physics prior replaces
it where the kinematics are known.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from drivepriv.agents.nets import mlp
from drivepriv.config import DynamicsPriorConfig, EnvConfig
from drivepriv.envs import make_env
from drivepriv.seeding import derive_seed, numpy_rng

log = logging.getLogger(__name__)


@dataclass
class Rollouts:
    """Transitions the attacker collected itself (never a client's)."""

    states: np.ndarray  # (N, *obs_shape)
    actions: np.ndarray  # (N,) indices, or (N, d) continuous action values
    rewards: np.ndarray  # (N,)
    next_states: np.ndarray  # (N, *obs_shape)
    dones: np.ndarray  # (N,)

    def __len__(self) -> int:
        return len(self.actions)

    @property
    def continuous(self) -> bool:
        return self.actions.ndim == 2

    def action_inputs(self, n_actions: int) -> Tensor:
        """Actions as the models take them: one-hot (N, A), or the (N, d) values."""
        a = torch.as_tensor(self.actions)
        return a.float() if self.continuous else nn.functional.one_hot(a, n_actions).float()


def collect_rollouts(env_cfg: EnvConfig, steps: int, seed: int, progress: bool = False) -> Rollouts:
    """Drive the public simulator with uniformly random actions for ``steps`` steps
    (continuous actions uniform in [-1, 1])."""
    from tqdm.auto import tqdm

    env = make_env(env_cfg)
    rng = numpy_rng(seed, "attacker", "rollouts")
    discrete = hasattr(env.action_space, "n")
    n_actions = int(env.action_space.n) if discrete else int(np.prod(env.action_space.shape))
    episode = 0
    obs, _ = env.reset(seed=derive_seed(seed, "attacker", "episode", episode))
    S, A, R, S2, D = [], [], [], [], []
    for _ in tqdm(range(steps), desc="attacker rollouts", unit="step", disable=not progress, leave=False):
        a = int(rng.integers(n_actions)) if discrete else rng.uniform(-1.0, 1.0, n_actions).astype(np.float32)
        obs2, r, terminated, truncated, _ = env.step(a)
        S.append(obs)
        A.append(a)
        R.append(r)
        S2.append(obs2)
        D.append(float(terminated))
        obs = obs2
        if terminated or truncated:
            episode += 1
            obs, _ = env.reset(seed=derive_seed(seed, "attacker", "episode", episode))
    env.close()
    return Rollouts(
        np.asarray(S, np.float32),
        np.asarray(A, np.int64 if discrete else np.float32),
        np.asarray(R, np.float32),
        np.asarray(S2, np.float32),
        np.asarray(D, np.float32),
    )



class LearnedDynamics(nn.Module):
    """MLP ``(s, a) -> s'`` on normalised observations; predicts the change ``s' - s``."""

    def __init__(self, obs_shape: tuple[int, ...], n_actions: int, hidden_sizes: list[int]) -> None:
        super().__init__()
        self.obs_shape = tuple(obs_shape)
        self.n_actions = n_actions
        d = int(np.prod(obs_shape))
        self.net = mlp(d + n_actions, hidden_sizes, d)

    def forward(self, states: Tensor, action_probs: Tensor) -> Tensor:
        """(B, *obs_shape), (B, A) probabilities or (B, d) values -> predicted next states."""
        flat = states.reshape(states.shape[0], -1)
        delta = self.net(torch.cat([flat, action_probs], dim=-1))
        return (flat + delta).reshape(states.shape)


class LearnedReward(nn.Module):
    """MLP ``(s, a, s', done) -> r``: the reward prior where no closed form is known (MetaDrive)."""

    def __init__(self, obs_shape: tuple[int, ...], n_actions: int, hidden_sizes: list[int]) -> None:
        super().__init__()
        d = int(np.prod(obs_shape))
        self.net = mlp(2 * d + n_actions + 1, hidden_sizes, 1)

    def forward(self, states: Tensor, actions: Tensor, next_states: Tensor, dones: Tensor) -> Tensor:
        n = states.shape[0]
        x = torch.cat([states.reshape(n, -1), actions, next_states.reshape(n, -1), dones.reshape(n, 1)], dim=-1)
        return self.net(x)[..., 0]


def _fit(model: nn.Module, inputs: tuple[Tensor, ...], target: Tensor, cfg: DynamicsPriorConfig, rng: np.random.Generator) -> tuple[float, Tensor]:
    """Adam on the mean squared error, 90/10 split; returns the validation MSE and the validation indices."""
    n = len(target)
    perm = rng.permutation(n)
    n_val = max(1, n // 10)
    val, train = perm[:n_val], perm[n_val:]
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    batch = 64
    for _ in range(cfg.epochs):
        order = train[rng.permutation(len(train))]
        for i in range(0, len(order), batch):
            idx = torch.as_tensor(order[i : i + batch])
            loss = ((model(*(x[idx] for x in inputs)) - target[idx]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    v = torch.as_tensor(val)
    with torch.no_grad():
        mse_val = float(((model(*(x[v] for x in inputs)) - target[v]) ** 2).mean())
    return mse_val, v


def fit_dynamics(data: Rollouts, n_actions: int, cfg: DynamicsPriorConfig, seed: int) -> tuple[LearnedDynamics, dict[str, float]]:
    """Fit the transition model (90/10 split by the attacker's own seed); returns the model and its errors."""
    torch.manual_seed(derive_seed(seed, "attacker", "dynamics-init"))
    rng = numpy_rng(seed, "attacker", "dynamics-fit")
    model = LearnedDynamics(data.states.shape[1:], n_actions, cfg.hidden_sizes)
    s = torch.as_tensor(data.states)
    a = data.action_inputs(n_actions)
    s2 = torch.as_tensor(data.next_states)
    mse_val, v = _fit(model, (s, a), s2, cfg, rng)
    mse_copy = float(((s[v] - s2[v]) ** 2).mean())
    stats = {"val_mse": mse_val, "val_mse_copy_baseline": mse_copy, "samples": float(len(data))}
    log.info("learned dynamics: validation MSE %.2e (copy-state baseline %.2e) on %d samples", mse_val, mse_copy, len(data))
    return model, stats


def fit_reward(data: Rollouts, n_actions: int, cfg: DynamicsPriorConfig, seed: int) -> tuple[LearnedReward, dict[str, float]]:
    """Fit the learned reward prior on the attacker's rollouts; returns the model and its errors."""
    torch.manual_seed(derive_seed(seed, "attacker", "reward-init"))
    rng = numpy_rng(seed, "attacker", "reward-fit")
    model = LearnedReward(data.states.shape[1:], n_actions, cfg.hidden_sizes)
    inputs = (torch.as_tensor(data.states), data.action_inputs(n_actions), torch.as_tensor(data.next_states), torch.as_tensor(data.dones))
    r = torch.as_tensor(data.rewards)
    mse_val, v = _fit(model, inputs, r, cfg, rng)
    stats = {"reward_val_mse": mse_val, "reward_val_var": float(r[v].var()) if len(v) > 1 else float("nan")}
    log.info("learned reward: validation MSE %.2e (variance %.2e)", mse_val, stats["reward_val_var"])
    return model, stats
