"""Local RL algorithms and their loss specifications (shared by clients and attacker)."""

from drivepriv.agents.common import Batch, LossSpec, ReplayBuffer
from drivepriv.agents.dqn import DQNLossSpec, QNetwork
from drivepriv.agents.ppo import PPOLossSpec

__all__ = ["Batch", "DQNLossSpec", "LossSpec", "PPOLossSpec", "QNetwork", "ReplayBuffer"]
