"""Local RL algorithms and their loss specifications (shared by clients and attacker)."""

from drivepriv.agents.dqn import Batch, DQNLossSpec, QNetwork, ReplayBuffer

__all__ = ["Batch", "DQNLossSpec", "QNetwork", "ReplayBuffer"]
