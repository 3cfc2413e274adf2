"""The run configuration's typed dataclasses, with their defaults and their validation (see
:mod:`drivepriv.config`)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from drivepriv.errors import ConfigError, did_you_mean

#: Features of the Kinematics observation that drivepriv decodes into physical units.
KNOWN_FEATURES = ("presence", "x", "y", "vx", "vy", "cos_h", "sin_h")


@dataclass(frozen=True)
class ObservationConfig:
    """highway-env Kinematics observation: ego row absolute, neighbour rows ego-relative.

    ``KinematicsGoal`` (parking) is highway-env's own goal observation, flattened: the ego's
    x, y, vx, vy, cos_h, sin_h as observed, as achieved and as desired; the other keys do not
    apply to it.
    """

    type: Literal["Kinematics", "KinematicsGoal"] = "Kinematics"
    vehicles_count: int = 5
    features: list[str] = field(default_factory=lambda: list(KNOWN_FEATURES))
    #: Physical range mapped onto [-1, 1] per feature. Choose it so nothing the agent sees
    #: is clipped (clipped values cannot be inverted).
    features_range: dict[str, list[float]] = field(
        default_factory=lambda: {"x": [-500.0, 500.0], "y": [-20.0, 20.0], "vx": [-80.0, 80.0], "vy": [-80.0, 80.0]}
    )
    see_behind: bool = True
    include_obstacles: bool = False

    def validate(self, where: str) -> None:
        if self.vehicles_count < 1:
            raise ConfigError(f"{where}.vehicles_count: expected an integer >= 1, got {self.vehicles_count}")
        for name in self.features:
            if name not in KNOWN_FEATURES:
                raise ConfigError(
                    f"{where}.features: unknown feature '{name}'.{did_you_mean(name, KNOWN_FEATURES)} "
                    f"Known: {', '.join(KNOWN_FEATURES)}."
                )
        for required in ("presence", "x", "y", "vx", "vy"):
            if required not in self.features:
                raise ConfigError(f"{where}.features: '{required}' is required (positions and speeds are decoded from it)")
        for name, rng in self.features_range.items():
            if name not in ("x", "y", "vx", "vy"):
                raise ConfigError(f"{where}.features_range: only x, y, vx, vy take a range, got '{name}'")
            if len(rng) != 2 or not rng[0] < rng[1]:
                raise ConfigError(f"{where}.features_range.{name}: expected [low, high] with low < high, got {rng}")
        missing = [k for k in ("x", "y", "vx", "vy") if k not in self.features_range]
        if missing:
            raise ConfigError(f"{where}.features_range: missing range for {', '.join(missing)}")


@dataclass(frozen=True)
class EnvConfig:
    """The simulator: backend, environment id and its overrides.

    ``highway``: a highway-env id with drivepriv's Kinematics observation (``observation``).
    ``metadrive``: MetaDrive's lidar-and-state observation, offline, one engine per worker
    process; ``id`` is ``MetaDrive`` and ``config`` holds MetaDrive's own keys (map, traffic...).
    ``control``: a gymnasium classic control task (CartPole-v1, Acrobot-v1, MountainCar-v0,
    Pendulum-v1).
    """

    backend: Literal["highway", "metadrive", "control"] = "highway"
    id: str = "merge-v0"
    observation: ObservationConfig = field(default_factory=ObservationConfig)
    #: Other configuration keys of the backend (checked against the environment's own defaults).
    config: dict[str, Any] = field(default_factory=dict)
    #: Truncate episodes after this many policy steps (0: the environment's own limit).
    max_episode_steps: int = 60

    def validate(self, where: str) -> None:
        self.observation.validate(f"{where}.observation")
        if self.max_episode_steps < 0:
            raise ConfigError(f"{where}.max_episode_steps: expected an integer >= 0, got {self.max_episode_steps}")


@dataclass(frozen=True)
class AgentConfig:
    """The local algorithm and its network.

    ``dqn``: MLP Q-network, target network, replay buffer, epsilon-greedy (discrete actions).
    ``ppo``: actor-critic MLP (logits or Gaussian mean, then the value), on-policy: the shared
    minibatch comes from the round's own rollout (discrete or continuous actions).
    ``td3``: deterministic actor and twin critics with target networks, replay buffer, Gaussian
    exploration noise (continuous actions).
    ``sac``: squashed Gaussian actor and twin critics with target critics, replay buffer, fixed
    entropy temperature ``entropy_alpha`` (continuous actions).
    """

    algorithm: Literal["dqn", "ppo", "td3", "sac"] = "dqn"
    hidden_sizes: list[int] = field(default_factory=lambda: [256, 256])
    buffer_size: int = 5000
    epsilon_start: float = 1.0
    epsilon_end: float = 0.05
    epsilon_decay_steps: int = 400
    #: PPO: weight of the value loss and of the entropy bonus.
    vf_coef: float = 0.5
    ent_coef: float = 0.0
    #: PPO: GAE's lambda (0: one-step returns; 0.95 is the usual choice), the clipping range of
    #: the probability ratio, whether advantages are normalised per minibatch, and the passes
    #: over the round's rollout in one FedAvg update (its local steps are ``ppo_epochs`` passes
    #: of ``local_steps / ppo_epochs`` minibatches).
    gae_lambda: float = 0.0
    clip_range: float = 0.2
    normalize_advantages: bool = False
    ppo_epochs: int = 1
    #: TD3: standard deviation of the Gaussian exploration noise (actions in [-1, 1]).
    exploration_noise: float = 0.2
    #: TD3: the actor's term is in every ``policy_delay``-th training step (the paper's delayed
    #: policy update uses 2); the steps between are critic-only. Steps are counted over the
    #: whole run: local step k of round r is step r * local_steps + k (FedSGD: step r).
    policy_delay: int = 1
    #: SAC: the entropy temperature alpha (fixed; the server prescribes it).
    entropy_alpha: float = 0.2

    def validate(self, where: str) -> None:
        if not self.hidden_sizes or any(h < 1 for h in self.hidden_sizes):
            raise ConfigError(f"{where}.hidden_sizes: expected a non-empty list of positive widths, got {self.hidden_sizes}")
        if self.buffer_size < 1:
            raise ConfigError(f"{where}.buffer_size: expected an integer >= 1, got {self.buffer_size}")
        for key in ("epsilon_start", "epsilon_end"):
            v = getattr(self, key)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"{where}.{key}: expected a probability in [0, 1], got {v}")
        for key in ("vf_coef", "ent_coef", "exploration_noise", "entropy_alpha"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{where}.{key}: expected a number >= 0, got {getattr(self, key)}")
        if not 0.0 <= self.gae_lambda <= 1.0:
            raise ConfigError(f"{where}.gae_lambda: expected GAE's lambda in [0, 1] (0: one-step returns), got {self.gae_lambda}")
        if self.clip_range <= 0:
            raise ConfigError(f"{where}.clip_range: expected a positive clipping range (PPO's usual: 0.2), got {self.clip_range}")
        if self.ppo_epochs < 1:
            raise ConfigError(f"{where}.ppo_epochs: expected an integer >= 1, got {self.ppo_epochs}")
        if self.policy_delay < 1:
            raise ConfigError(f"{where}.policy_delay: expected an integer >= 1 (1: the actor in every step; TD3's paper: 2), got {self.policy_delay}")
        if self.policy_delay > 1 and self.algorithm != "td3":
            raise ConfigError(f"{where}.policy_delay: delayed actor updates are TD3's, and the algorithm is {self.algorithm}; use --set {where}.algorithm=td3 or {where}.policy_delay=1")


@dataclass(frozen=True)
class FederationConfig:
    """Clients, rounds and what they share (FedSGD gradients or FedAvg parameter deltas)."""

    clients: int = 4
    rounds: int = 12
    strategy: Literal["fedsgd", "fedavg"] = "fedsgd"
    #: Local SGD steps per round under FedAvg (FedSGD always shares one gradient).
    local_steps: int = 1
    batch_size: int = 8
    lr: float = 1e-3
    gamma: float = 0.99
    server_optimizer: Literal["adam", "sgd"] = "adam"
    #: Environment steps each client collects before the first round.
    warmup_steps: int = 60
    #: Environment steps each client collects in each round.
    env_steps_per_round: int = 20
    #: Copy the global network into the target network every this many rounds.
    target_update_rounds: int = 4
    #: Defenses applied before the server sees an update, in order (see ``drivepriv defenses``):
    #: e.g. ``[{name: dpsgd, noise: 1.0, clip: 1.0}, {name: topk, fraction: 0.1}]``.
    defenses: list[dict[str, Any]] = field(default_factory=list)
    #: Utility: greedy episodes of the final global policy on held-out seeds (0: skip).
    eval_episodes: int = 10
    #: Client sampling (FedAvg's C, McMahan et al., 2017): each round
    #: ``max(min_clients, int(fraction * clients))`` clients train and send an update, drawn
    #: from the root seed and the round alone (same seed, same sample, on both engines); the
    #: others keep their state until they are next sampled. 1.0: every client every round.
    fraction: float = 1.0
    min_clients: int = 1
    #: Where the federation runs: ``inprocess`` (the clients on this machine, over ``workers``
    #: processes) or ``flower`` (the same clients and server on Flower's simulation engine, on Ray; needs
    #: ``pip install -e ".[flower]"``). Same seed, same numbers (tests/federation/test_flower.py).
    engine: Literal["inprocess", "flower"] = "inprocess"
    #: Flower engine: CPUs each client takes (Ray schedules as many clients at once as fit).
    flower_client_cpus: float = 1.0
    #: Flower engine: the Ray cluster to join ("auto": the running cluster, see docs/flower.md);
    #: empty: start a local Ray with this machine's CPUs.
    ray_address: str = ""
    #: Flower engine: where clients write their ground truth for the metrics (never sent to the
    #: server); empty: a temporary folder on this machine. On a multi-node cluster: a folder
    #: every node shares.
    flower_truth_dir: str = ""
    #: Flower engine: how often Ray restarts a client's worker that was lost (killed, out of
    #: memory) and reruns the round it was training, from the client's state before that round
    #: (the same numbers); 0: the run stops with an error instead.
    flower_retries: int = 2

    def validate(self, where: str) -> None:
        for key in ("clients", "rounds", "local_steps", "batch_size", "target_update_rounds"):
            v = getattr(self, key)
            if v < 1:
                raise ConfigError(f"{where}.{key}: expected an integer >= 1, got {v}")
        for key in ("warmup_steps", "env_steps_per_round", "eval_episodes", "flower_retries"):
            v = getattr(self, key)
            if v < 0:
                raise ConfigError(f"{where}.{key}: expected an integer >= 0, got {v}")
        if self.lr <= 0:
            raise ConfigError(f"{where}.lr: expected a positive learning rate, got {self.lr}")
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError(f"{where}.fraction: expected the share of clients sampled per round, in (0, 1], got {self.fraction}")
        if not 1 <= self.min_clients <= self.clients:
            raise ConfigError(f"{where}.min_clients: expected 1 to clients ({self.clients}), got {self.min_clients}")
        if self.flower_client_cpus <= 0:
            raise ConfigError(f"{where}.flower_client_cpus: expected a positive number of CPUs, got {self.flower_client_cpus}")
        if self.engine == "flower" and not self.ray_address and self.flower_client_cpus > (os.cpu_count() or 1):
            raise ConfigError(
                f"{where}.flower_client_cpus: {self.flower_client_cpus} CPUs per client, but this machine has {os.cpu_count()}; "
                f"no client could be scheduled (use at most {os.cpu_count()}, or join a cluster with federation.ray_address)"
            )
        if not 0.0 <= self.gamma <= 1.0:
            raise ConfigError(f"{where}.gamma: expected a discount in [0, 1], got {self.gamma}")
        if self.warmup_steps + self.env_steps_per_round < self.batch_size:
            raise ConfigError(
                f"{where}: warmup_steps + env_steps_per_round ({self.warmup_steps} + {self.env_steps_per_round}) "
                f"must be at least batch_size ({self.batch_size}) so a client can fill its first minibatch"
            )


@dataclass(frozen=True)
class DynamicsPriorConfig:
    """The learned transition prior, fitted on the attacker's own rollouts of the public simulator."""

    rollout_steps: int = 800
    epochs: int = 60
    hidden_sizes: list[int] = field(default_factory=lambda: [256, 256])
    lr: float = 1e-3

    def validate(self, where: str) -> None:
        if self.rollout_steps < 2:
            raise ConfigError(f"{where}.rollout_steps: expected an integer >= 2, got {self.rollout_steps}")
        if self.epochs < 1:
            raise ConfigError(f"{where}.epochs: expected an integer >= 1, got {self.epochs}")


@dataclass(frozen=True)
class AttackConfig:
    """Which attacks run, on which rounds and clients, and how hard they optimise."""

    attacks: list[str] = field(default_factory=lambda: ["rgia", "dlg"])
    #: Rounds to attack: a list (0-based; negative counts from the last round), ``all``, or
    #: ``every:N`` (rounds 0, N, 2N, ... and the last one).
    rounds: list[int] | str = field(default_factory=lambda: [0, -1])
    #: Clients to attack (empty: all).
    clients: list[int] = field(default_factory=list)
    iterations: int = 400
    restarts: int = 4
    lr: float = 0.05
    #: Regularizer weights (0 switches a term off). rgia uses state, reward and the learned
    #: dynamics; rgia-k uses physics in place of dynamics where the scenario has it. Measured on
    #: merge: dynamics 0.1 beats 1.0 (the learned model's own error then dominates gradient matching).
    weights: dict[str, float] = field(default_factory=lambda: {"state": 1.0, "reward": 1.0, "dynamics": 0.1, "physics": 1.0})
    dynamics: DynamicsPriorConfig = field(default_factory=DynamicsPriorConfig)

    def round_indices(self, total: int) -> list[int]:
        """The attacked rounds, sorted, for a federation of ``total`` rounds."""
        if self.rounds == "all":
            return list(range(total))
        if isinstance(self.rounds, str):  # every:N, first and last included
            return sorted({*range(0, total, int(self.rounds.split(":")[1])), total - 1})
        return sorted({k % total for k in self.rounds})

    def validate(self, where: str) -> None:
        if not self.attacks:
            raise ConfigError(f"{where}.attacks: expected at least one attack name")
        for key in ("iterations", "restarts"):
            v = getattr(self, key)
            if v < 1:
                raise ConfigError(f"{where}.{key}: expected an integer >= 1, got {v}")
        if self.lr <= 0:
            raise ConfigError(f"{where}.lr: expected a positive step size, got {self.lr}")
        if not self.rounds:
            raise ConfigError(f"{where}.rounds: expected at least one round to attack")
        if isinstance(self.rounds, str):
            stride = self.rounds.partition("every:")[2]
            ok = self.rounds == "all" or (self.rounds.startswith("every:") and stride.isdigit() and int(stride) >= 1)
            if not ok:
                raise ConfigError(
                    f"{where}.rounds: expected a list of rounds, 'all' or 'every:N' with N >= 1 (e.g. every:50), got {self.rounds!r}"
                )
        for name, w in self.weights.items():
            known = ("state", "reward", "dynamics", "physics")
            if name not in known:
                raise ConfigError(
                    f"{where}.weights: unknown regularizer '{name}'.{did_you_mean(name, known)} Known: {', '.join(known)}."
                )
            if w < 0:
                raise ConfigError(f"{where}.weights.{name}: expected a weight >= 0, got {w}")
        self.dynamics.validate(f"{where}.dynamics")


@dataclass(frozen=True)
class ReportConfig:
    """What the report shows."""

    figures: bool = True
    #: At most this many attacked batches get a replay video (0: none).
    videos: int = 2
    fps: int = 15

    def validate(self, where: str) -> None:
        if self.videos < 0:
            raise ConfigError(f"{where}.videos: expected an integer >= 0, got {self.videos}")
        if self.fps < 1:
            raise ConfigError(f"{where}.fps: expected an integer >= 1, got {self.fps}")


@dataclass(frozen=True)
class RunConfig:
    """Everything one run needs. Resolved (seed materialised) and written to config.yaml."""

    name: str = "merge"
    description: str = ""
    seed: int = 0
    out: str = "reports"
    #: Processes the in-process engine's clients, the attacks and the report's per-batch figures
    #: and videos fan out over: 0, one per available core; 1, everything one after another in
    #: this process. The numbers do not depend on it.
    workers: int = 0
    env: EnvConfig = field(default_factory=EnvConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def validate(self, where: str = "config") -> None:
        if self.seed < 0:
            raise ConfigError(f"{where}.seed: expected an integer >= 0, got {self.seed}")
        if self.workers < 0:
            raise ConfigError(f"{where}.workers: expected 0 (one process per core) or a number of processes >= 1, got {self.workers}")
        self.env.validate(f"{where}.env")
        self.agent.validate(f"{where}.agent")
        self.federation.validate(f"{where}.federation")
        self.attack.validate(f"{where}.attack")
        self.report.validate(f"{where}.report")
        n = self.federation.clients
        for c in self.attack.clients:
            if not 0 <= c < n:
                raise ConfigError(f"{where}.attack.clients: client {c} does not exist (clients are 0..{n - 1})")
        r = self.federation.rounds
        for k in [] if isinstance(self.attack.rounds, str) else self.attack.rounds:
            if not -r <= k < r:
                raise ConfigError(f"{where}.attack.rounds: round {k} does not exist (rounds are 0..{r - 1}, or -1..-{r})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
