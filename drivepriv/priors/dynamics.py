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

from drivepriv.config import DynamicsPriorConfig, EnvConfig
from drivepriv.envs import make_env
from drivepriv.seeding import derive_seed, numpy_rng

log = logging.getLogger(__name__)


@dataclass
class Rollouts:
    """Transitions the attacker collected itself (never a client's)."""

    states: np.ndarray  # (N, V, F)
    actions: np.ndarray  # (N,)
    rewards: np.ndarray  # (N,)
    next_states: np.ndarray  # (N, V, F)
    dones: np.ndarray  # (N,)

    def __len__(self) -> int:
        return len(self.actions)


def collect_rollouts(env_cfg: EnvConfig, steps: int, seed: int, progress: bool = False) -> Rollouts:
    """Drive the public simulator with uniformly random actions for ``steps`` steps."""
    from tqdm.auto import tqdm

    env = make_env(env_cfg)
    rng = numpy_rng(seed, "attacker", "rollouts")
    n_actions = int(env.action_space.n)
    episode = 0
    obs, _ = env.reset(seed=derive_seed(seed, "attacker", "episode", episode))
    S, A, R, S2, D = [], [], [], [], []
    for _ in tqdm(range(steps), desc="attacker rollouts", unit="step", disable=not progress, leave=False):
        a = int(rng.integers(n_actions))
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
        np.asarray(S, np.float32), np.asarray(A, np.int64), np.asarray(R, np.float32), np.asarray(S2, np.float32), np.asarray(D, np.float32)
    )


class LearnedDynamics(nn.Module):
    """MLP ``(s, a) -> s'`` on normalised observations; predicts the change ``s' - s``."""

    def __init__(self, obs_shape: tuple[int, int], n_actions: int, hidden_sizes: list[int]) -> None:
        super().__init__()
        self.obs_shape = tuple(obs_shape)
        self.n_actions = n_actions
        d = int(np.prod(obs_shape))
        layers: list[nn.Module] = []
        width = d + n_actions
        for h in hidden_sizes:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, d))
        self.net = nn.Sequential(*layers)

    def forward(self, states: Tensor, action_probs: Tensor) -> Tensor:
        """(B, V, F), (B, A) -> predicted next states (B, V, F)."""
        flat = states.reshape(states.shape[0], -1)
        delta = self.net(torch.cat([flat, action_probs], dim=-1))
        return (flat + delta).reshape(states.shape)


def fit_dynamics(data: Rollouts, n_actions: int, cfg: DynamicsPriorConfig, seed: int) -> tuple[LearnedDynamics, dict[str, float]]:
    """Fit the transition model (90/10 split by the attacker's own seed); returns the model and its errors."""
    torch.manual_seed(derive_seed(seed, "attacker", "dynamics-init"))
    rng = numpy_rng(seed, "attacker", "dynamics-fit")
    model = LearnedDynamics(data.states.shape[1:], n_actions, cfg.hidden_sizes)
    s = torch.as_tensor(data.states)
    a = nn.functional.one_hot(torch.as_tensor(data.actions), n_actions).float()
    s2 = torch.as_tensor(data.next_states)
    n = len(data)
    perm = rng.permutation(n)
    n_val = max(1, n // 10)
    val, train = perm[:n_val], perm[n_val:]
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    batch = 64
    for _ in range(cfg.epochs):
        order = train[rng.permutation(len(train))]
        for i in range(0, len(order), batch):
            idx = torch.as_tensor(order[i : i + batch])
            loss = ((model(s[idx], a[idx]) - s2[idx]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        v = torch.as_tensor(val)
        mse_val = float(((model(s[v], a[v]) - s2[v]) ** 2).mean())
        mse_copy = float(((s[v] - s2[v]) ** 2).mean())
    stats = {"val_mse": mse_val, "val_mse_copy_baseline": mse_copy, "samples": float(n)}
    log.info("learned dynamics: validation MSE %.2e (copy-state baseline %.2e) on %d samples", mse_val, mse_copy, n)
    return model, stats
