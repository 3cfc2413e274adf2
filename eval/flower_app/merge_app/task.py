"""The deployment's own model and local training: plain PyTorch, no drivepriv training code.

The clients drive highway-env's merge-v0 with drivepriv's merge observation settings (taken
from ``drivepriv.audit.make_env``, so the auditor's scenario describes what they saw), fill a
fresh buffer each round with epsilon-greedy steps of the global Q-network and take
``local-steps`` plain SGD steps of the DQN TD loss on minibatches of ``batch-size``, with the
global model of the round as the target network. That loss is the one the auditor names
(``DQNLossSpec``): mean over the batch of smooth_l1(Q(s)[a], r + gamma (1 - done) max Q_target(s')).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch import nn


class Net(nn.Module):
    """Q-network: the flattened merge observation (5 vehicles x 7 features) -> 5 action values."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(35, 128)
        self.fc2 = nn.Linear(128, 128)
        self.out = nn.Linear(128, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1)
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def seed_of(*ids: object) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, ids)).encode()).digest()[:4], "little") & 0x7FFFFFFF


def td_loss(net: nn.Module, target: nn.Module, s, a, r, s2, d, gamma: float) -> torch.Tensor:
    q_sa = (net(s) * a).sum(-1)
    with torch.no_grad():
        y = r + gamma * (1.0 - d) * target(s2).max(-1).values
    return nn.functional.smooth_l1_loss(q_sa, y)


def collect(net: Net, steps: int, epsilon: float, seed: int):
    """``steps`` transitions of epsilon-greedy driving; returns arrays and (episode, step) origins."""
    from drivepriv.audit import make_env

    rng = np.random.default_rng(seed)
    episode, step = 0, 0
    env = make_env("merge", seed=seed_of(seed, "episode", episode))
    obs, _ = env.reset(seed=seed_of(seed, "episode", episode))
    rows = []
    for _ in range(steps):
        if rng.random() < epsilon:
            action = int(rng.integers(5))
        else:
            with torch.no_grad():
                action = int(net(torch.as_tensor(obs[None], dtype=torch.float32)).argmax(-1).item())
        obs2, reward, terminated, truncated, _ = env.step(action)
        rows.append((obs, action, float(reward), obs2, float(terminated), episode, step))
        obs, step = obs2, step + 1
        if terminated or truncated:
            episode, step = episode + 1, 0
            obs, _ = env.reset(seed=seed_of(seed, "episode", episode))
    env.close()
    s, a, r, s2, d, ep, st = zip(*rows)
    return {
        "states": np.asarray(s, dtype=np.float32),
        "actions": np.eye(5, dtype=np.float32)[list(a)],
        "rewards": np.asarray(r, dtype=np.float32),
        "next_states": np.asarray(s2, dtype=np.float32),
        "dones": np.asarray(d, dtype=np.float32),
    }, np.stack([ep, st], axis=1).astype(np.int64)
