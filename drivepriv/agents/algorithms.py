"""The local algorithms a client can run, behind one small interface the federation uses.

Each algorithm says how a client acts, which minibatch it shares the gradient of (a replay
sample, or the round's own rollout for on-policy PPO), which parameters the loss bootstraps
from (a target network, or the current parameters) and which :class:`LossSpec` it trains
with. The federation never imports a specific algorithm; the attacker gets the same LossSpec.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from gymnasium import spaces
from torch import nn

from drivepriv.agents.common import Batch, ReplayBuffer
from drivepriv.agents.dqn import DQNLossSpec, QNetwork, epsilon_at
from drivepriv.agents.ppo import ActorCritic, PPOLossSpec, gae_next_advantages, ppo_act
from drivepriv.agents.sac import SACLossSpec, SACNet, sac_act
from drivepriv.agents.td3 import TD3LossSpec, TD3Net, td3_act
from drivepriv.config import RunConfig
from drivepriv.errors import ConfigError
from drivepriv.registry import Registry


@dataclass(frozen=True)
class ActionSpec:
    """The environment's actions as the agents see them: ``n`` discrete actions, or a box of
    ``n`` continuous values in [-1, 1]."""

    n: int
    continuous: bool

    @classmethod
    def of(cls, space: spaces.Space) -> "ActionSpec":
        if isinstance(space, spaces.Discrete):
            return cls(int(space.n), False)
        if isinstance(space, spaces.Box):
            return cls(int(np.prod(space.shape)), True)
        raise ConfigError(f"unsupported action space {space}: drivepriv's agents take Discrete or Box actions")

    def describe(self) -> str:
        return f"{self.n} continuous values" if self.continuous else f"{self.n} discrete actions"


class LocalAlgorithm:
    """How a client acts and what it shares; see the module docstring."""

    name = ""
    #: Which action kinds the algorithm handles.
    discrete_ok = True
    continuous_ok = True
    #: On-policy: the minibatch comes from the round's own rollout, bootstrapped from the
    #: current parameters (no target network).
    on_policy = False

    def __init__(self, cfg: RunConfig, obs_dim: int, actions: ActionSpec) -> None:
        kind = "continuous" if actions.continuous else "discrete"
        if (actions.continuous and not self.continuous_ok) or (not actions.continuous and not self.discrete_ok):
            fits = ", ".join(n for n in ALGORITHMS if (ALGORITHMS.get(n).continuous_ok if actions.continuous else ALGORITHMS.get(n).discrete_ok))
            raise ConfigError(
                f"agent.algorithm: {self.name} does not handle {kind} actions, and scenario '{cfg.name}' has "
                f"{actions.describe()}; use one of: {fits} (--set agent.algorithm=...)"
            )
        self.cfg = cfg
        self.obs_dim = obs_dim
        self.actions = actions

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def loss_spec(self):
        raise NotImplementedError

    def act(self, model: nn.Module, obs: np.ndarray, rng: np.random.Generator, env_steps: int):
        """The action to store (raw) for observation ``obs``."""
        raise NotImplementedError

    def minibatches(self, buffer: ReplayBuffer, rollout_steps: int, model: nn.Module, params: dict[str, torch.Tensor], local_steps: int, rng: np.random.Generator) -> Callable[[int], tuple[Batch, np.ndarray]]:
        """``draw(step)``: the minibatch of local step ``step`` and its buffer indices. Off-policy:
        a fresh replay sample each step. ``rollout_steps``: the environment steps the client just
        collected with the global policy (``model`` holding ``params``)."""
        return lambda step: buffer.sample(self.cfg.federation.batch_size, rng)

    def distinct_steps(self, local_steps: int) -> int:
        """How many of the ``local_steps`` minibatches hold distinct transitions (the truth the
        metrics keep: the first that many)."""
        return local_steps

    def client_loss(self, spec, rng: np.random.Generator):
        """The loss a client trains one local step with: ``spec`` itself, or (SAC) ``spec``
        with the step's private noise drawn from the client's generator ``rng``; the server
        keeps ``spec``."""
        return spec

    def greedy(self, model: nn.Module, obs: np.ndarray):
        """The policy's action without exploration (for measuring the trained policy's utility)."""
        raise NotImplementedError

    def env_action(self, action):
        """What the environment gets: continuous actions clipped to [-1, 1]."""
        if self.actions.continuous:
            return np.clip(np.asarray(action, dtype=np.float32), -1.0, 1.0)
        return int(action)


ALGORITHMS: Registry[type[LocalAlgorithm]] = Registry("algorithm")


@ALGORITHMS.register("dqn")
class DQN(LocalAlgorithm):
    """DQN (Mnih et al., 2015): epsilon-greedy on a Q-network, replay, target network."""

    name = "dqn"
    continuous_ok = False

    def build_model(self) -> nn.Module:
        return QNetwork(self.obs_dim, self.actions.n, self.cfg.agent.hidden_sizes)

    def loss_spec(self) -> DQNLossSpec:
        return DQNLossSpec(gamma=self.cfg.federation.gamma)

    def act(self, model, obs, rng, env_steps):
        a = self.cfg.agent
        if rng.random() < epsilon_at(env_steps, a.epsilon_start, a.epsilon_end, a.epsilon_decay_steps):
            return int(rng.integers(self.actions.n))
        return self.greedy(model, obs)

    def greedy(self, model, obs):
        with torch.no_grad():
            return int(model(torch.as_tensor(obs[None], dtype=torch.float32)).argmax(-1).item())


@ALGORITHMS.register("ppo")
class PPO(LocalAlgorithm):
    """PPO (Schulman et al., 2017) on-policy, as clients run it: each round, returns and
    advantages by GAE(lambda) over the round's own rollout at the global parameters, then
    ``agent.ppo_epochs`` passes over the rollout, each in a fresh random order, in minibatches of
    ``federation.batch_size`` (see PPOLossSpec). FedSGD shares the gradient of the first
    minibatch; FedAvg the delta after all passes (``local_steps / ppo_epochs`` minibatches each)."""

    name = "ppo"
    on_policy = True

    def __init__(self, cfg: RunConfig, obs_dim: int, actions: ActionSpec) -> None:
        super().__init__(cfg, obs_dim, actions)
        fed, epochs = cfg.federation, cfg.agent.ppo_epochs
        if epochs > 1 and fed.strategy != "fedavg":
            raise ConfigError(f"agent.ppo_epochs: {epochs} passes over the rollout need a FedAvg update (FedSGD shares one gradient); use --set federation.strategy=fedavg or agent.ppo_epochs=1")
        if fed.strategy == "fedavg" and fed.local_steps % epochs:
            raise ConfigError(f"agent.ppo_epochs: {epochs} passes must divide federation.local_steps ({fed.local_steps}): each pass takes local_steps / ppo_epochs minibatches")
        per_pass = self.distinct_steps(fed.local_steps if fed.strategy == "fedavg" else 1)
        if per_pass * fed.batch_size > fed.env_steps_per_round:
            raise ConfigError(
                f"PPO: a pass over the rollout takes {per_pass} minibatches of {fed.batch_size}, more than the "
                f"{fed.env_steps_per_round} steps a client collects per round; raise federation.env_steps_per_round "
                f"to at least {per_pass * fed.batch_size} or lower local_steps / ppo_epochs"
            )

    def build_model(self) -> nn.Module:
        return ActorCritic(self.obs_dim, self.actions.n, self.cfg.agent.hidden_sizes, continuous=self.actions.continuous)

    def loss_spec(self) -> PPOLossSpec:
        a = self.cfg.agent
        return PPOLossSpec(
            gamma=self.cfg.federation.gamma, vf_coef=a.vf_coef, ent_coef=a.ent_coef, continuous=self.actions.continuous,
            gae_lambda=a.gae_lambda, clip_range=a.clip_range, normalize_advantages=a.normalize_advantages, epochs=a.ppo_epochs,
        )

    def distinct_steps(self, local_steps: int) -> int:
        return max(1, local_steps // self.cfg.agent.ppo_epochs)

    def minibatches(self, buffer, rollout_steps, model, params, local_steps, rng):
        """The round's rollout (oldest first) with each transition's A_next from GAE at the global
        parameters; the update trains on M x B of its transitions (all of them where the rollout
        is M x B long; M = local_steps / ppo_epochs), each pass in a fresh random order: local
        step e * M + j takes the j-th minibatch of pass e."""
        B, per_pass = self.cfg.federation.batch_size, self.distinct_steps(local_steps)
        segment = buffer.recent(rollout_steps)
        adv_next = self.gae(buffer, segment, model, params) if self.cfg.agent.gae_lambda > 0 else None
        chosen = rng.permutation(len(segment))[: per_pass * B]
        orders: dict[int, np.ndarray] = {0: chosen}

        def draw(step: int) -> tuple[Batch, np.ndarray]:
            epoch, j = divmod(step, per_pass)
            if epoch not in orders:
                orders[epoch] = chosen[rng.permutation(len(chosen))]
            rows = orders[epoch][j * B : (j + 1) * B]
            return buffer.take(segment[rows], None if adv_next is None else adv_next[rows]), segment[rows]

        return draw

    def gae(self, buffer: ReplayBuffer, segment: np.ndarray, model: nn.Module, params: dict[str, torch.Tensor]) -> np.ndarray:
        """Each transition's A_next over the rollout ``segment`` (buffer indices, oldest first)."""
        spec = self.loss_spec()
        with torch.no_grad():
            _, v = spec.heads(model, params, torch.as_tensor(buffer.states[segment]))
            _, v_next = spec.heads(model, params, torch.as_tensor(buffer.next_states[segment]))
        origin = buffer.origin[segment]
        follows = np.zeros(len(segment), dtype=bool)
        follows[:-1] = (origin[1:, 0] == origin[:-1, 0]) & (origin[1:, 1] == origin[:-1, 1] + 1)
        return gae_next_advantages(v.double().numpy(), v_next.double().numpy(), buffer.rewards[segment].astype(np.float64), buffer.dones[segment], follows, spec.gamma, spec.gae_lambda)

    def act(self, model, obs, rng, env_steps):
        return ppo_act(model, obs, rng, self.actions.continuous)

    def greedy(self, model, obs):
        """The mode: the most probable action, or the Gaussian's mean."""
        with torch.no_grad():
            out = model(torch.as_tensor(obs, dtype=torch.float32)[None])[0][:-1]
        return out.numpy().astype(np.float32) if self.actions.continuous else int(out.argmax().item())


@ALGORITHMS.register("td3")
class TD3(LocalAlgorithm):
    """TD3 (Fujimoto et al., 2018): deterministic actor with Gaussian exploration noise, twin
    critics, replay and target networks; shares the critics' TD gradient and the actor's."""

    name = "td3"
    discrete_ok = False

    def build_model(self) -> nn.Module:
        return TD3Net(self.obs_dim, self.actions.n, self.cfg.agent.hidden_sizes)

    def loss_spec(self) -> TD3LossSpec:
        """The loss of training step 0 (:func:`~drivepriv.agents.common.at_step` gives later steps')."""
        return TD3LossSpec(gamma=self.cfg.federation.gamma, policy_delay=self.cfg.agent.policy_delay)

    def act(self, model, obs, rng, env_steps):
        a = self.cfg.agent
        # uniform random actions while the epsilon schedule says "explore" (warm-up)
        if rng.random() < epsilon_at(env_steps, a.epsilon_start, a.epsilon_end, a.epsilon_decay_steps) - a.epsilon_end:
            return rng.uniform(-1.0, 1.0, self.actions.n).astype(np.float32)
        return self.explore(model, obs, rng)

    def explore(self, model, obs, rng) -> np.ndarray:
        """The policy's exploring action once the warm-up is over."""
        return td3_act(model, obs, rng, self.cfg.agent.exploration_noise)

    def greedy(self, model, obs):
        with torch.no_grad():
            return model.actor(torch.as_tensor(obs, dtype=torch.float32).reshape(1, -1))[0].numpy().astype(np.float32)


@ALGORITHMS.register("sac")
class SAC(TD3):
    """SAC (Haarnoja et al., 2018): squashed Gaussian actor, twin critics, target critics,
    replay, fixed entropy temperature; shares the critics' soft TD gradient and the actor's.
    Warms up as TD3 does (uniform actions), then samples its own policy."""

    name = "sac"

    def build_model(self) -> nn.Module:
        return SACNet(self.obs_dim, self.actions.n, self.cfg.agent.hidden_sizes)

    def loss_spec(self) -> SACLossSpec:
        return SACLossSpec(gamma=self.cfg.federation.gamma, alpha=self.cfg.agent.entropy_alpha)

    def client_loss(self, spec: SACLossSpec, rng: np.random.Generator) -> SACLossSpec:
        return dataclasses.replace(spec, noise_seed=int(rng.integers(2**31 - 1)))

    def explore(self, model, obs, rng) -> np.ndarray:
        return sac_act(model, obs, rng)

    def greedy(self, model, obs):
        """The mean action tanh(mu)."""
        with torch.no_grad():
            return model(torch.as_tensor(obs, dtype=torch.float32).reshape(1, -1))[0][0].numpy().astype(np.float32)


def make_algorithm(cfg: RunConfig, obs_dim: int, action_space: spaces.Space) -> LocalAlgorithm:
    return ALGORITHMS.get(cfg.agent.algorithm)(cfg, obs_dim, ActionSpec.of(action_space))
