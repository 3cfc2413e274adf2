"""drivepriv: privacy evaluation of federated reinforcement learning for autonomous driving."""

__version__ = "0.1.0"
