"""Local RL algorithms and their loss specifications (shared by clients and attacker)."""

from drivepriv.agents.dqn import Batch, DQNLossSpec, QNetwork, ReplayBuffer
from drivepriv.agents.ppo import PPOLossSpec

__all__ = ["Batch", "DQNLossSpec", "PPOLossSpec", "QNetwork", "ReplayBuffer"]
