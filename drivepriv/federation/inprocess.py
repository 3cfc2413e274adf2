"""In-process federation: N clients with their own environments, a server that aggregates.

Each round every client collects experience with the current global policy, then shares
either the gradient of its local algorithm's loss (DQN, PPO, TD3: see
:mod:`drivepriv.agents.algorithms`) on one minibatch (FedSGD) or its parameter delta after K
local SGD steps (FedAvg). The server averages and steps. For every attacked (client, round)
the server's view is recorded; the true minibatch is recorded apart, for metrics only.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from drivepriv.agents.algorithms import LocalAlgorithm, make_algorithm
from drivepriv.agents.dqn import Batch, ReplayBuffer
from drivepriv.config import RunConfig
from drivepriv.envs import make_env
from drivepriv.federation.defenses import DefenseStack, PrivacyAccountant
from drivepriv.seeding import derive_seed, numpy_rng, torch_generator

log = logging.getLogger(__name__)


@dataclass
class ServerView:
    """Everything the server knows about one client's update in one round (and nothing more)."""

    round: int
    client: int
    strategy: str
    params: dict[str, torch.Tensor]
    target_params: dict[str, torch.Tensor]
    #: FedSGD: the gradient; FedAvg: the parameter delta. One tensor per parameter, params order.
    payload: tuple[torch.Tensor, ...]
    batch_size: int
    local_steps: int
    lr: float
    loss: object  # the LossSpec the client trained with (DQNLossSpec, PPOLossSpec, TD3LossSpec)

    def gradient(self) -> tuple[torch.Tensor, ...]:
        """The shared gradient (FedSGD); under FedAvg -delta/lr: the sum of the K local gradients
        (exactly the gradient for K = 1)."""
        if self.strategy == "fedsgd":
            return self.payload
        return tuple(-d / self.lr for d in self.payload)


@dataclass
class GroundTruth:
    """The client's true minibatch(es) behind one update. Metrics only: attacks never see it."""

    round: int
    client: int
    batches: list[dict[str, np.ndarray]]
    #: (episode id, step) of every transition, per local step.
    origins: list[np.ndarray]
    #: Continuous actions: the batches' actions are (B, d) values, not one-hot rows.
    continuous: bool = False


@dataclass
class FederationResult:
    model: torch.nn.Module
    views: list[ServerView]
    truths: dict[tuple[int, int], GroundTruth]
    training: pd.DataFrame
    final_params: dict[str, torch.Tensor] = field(default_factory=dict)
    #: The defenses applied and, under DP-SGD, the privacy spent (epsilon at delta).
    privacy: dict[str, object] = field(default_factory=dict)
    algorithm: LocalAlgorithm | None = None


def episode_seed(root: int, client: int, episode: int) -> int:
    """The environment seed of a client's episode (its traffic; for MetaDrive, its map)."""
    return derive_seed(root, "client", client, "episode", episode)


class Client:
    """One vehicle / fleet: its own environment, seeds, replay buffer and exploration."""

    def __init__(self, cid: int, cfg: RunConfig, obs_shape: tuple[int, ...], algorithm: LocalAlgorithm) -> None:
        self.cid = cid
        self.cfg = cfg
        self.env = make_env(cfg.env)
        self.algorithm = algorithm
        self.rng = numpy_rng(cfg.seed, "client", cid)
        acts = algorithm.actions
        self.buffer = ReplayBuffer(cfg.agent.buffer_size, obs_shape, acts.n, continuous=acts.continuous)
        self.env_steps = 0
        self.episode = 0
        self.episode_step = 0
        self.episode_return = 0.0
        self.finished_returns: list[float] = []
        self.crashes: list[bool] = []
        self.obs, _ = self.env.reset(seed=episode_seed(cfg.seed, cid, 0))

    def collect(self, model: torch.nn.Module, steps: int) -> None:
        for _ in range(steps):
            action = self.algorithm.act(model, self.obs, self.rng, self.env_steps)
            obs2, reward, terminated, truncated, info = self.env.step(self.algorithm.env_action(action))
            self.buffer.add(self.obs, action, float(reward), obs2, bool(terminated), self.episode, self.episode_step)
            self.env_steps += 1
            self.episode_step += 1
            self.episode_return += float(reward)
            self.obs = obs2
            if terminated or truncated:
                self.finished_returns.append(self.episode_return)
                self.crashes.append(bool(info.get("crashed", False)))
                self.episode += 1
                self.episode_step = 0
                self.episode_return = 0.0
                self.obs, _ = self.env.reset(seed=episode_seed(self.cfg.seed, self.cid, self.episode))

    def close(self) -> None:
        self.env.close()


def _row(batch: Batch, i: int) -> Batch:
    return Batch(*(t[i : i + 1] for t in (batch.states, batch.actions, batch.rewards, batch.next_states, batch.dones)))


def run_federation(cfg: RunConfig, attacked: set[tuple[int, int]], progress: bool = True) -> FederationResult:
    """Train the federation; record server views and ground truth for ``attacked`` (round, client) pairs.

    Defenses (``federation.defenses``) act where a real deployment applies them: DP-SGD on
    each local step's per-sample gradients, update defenses on the payload before it leaves
    the client, secure aggregation on what the server is shown (then one view per attacked
    round, client -1, holding the mean of all clients' updates over their N x B transitions)."""
    fed = cfg.federation
    stack = DefenseStack.from_specs(fed.defenses)
    dp = stack.dpsgd
    accountant = PrivacyAccountant(dp, fed.clients) if dp is not None else None
    probe = make_env(cfg.env)
    obs_shape = probe.observation_space.shape
    algorithm = make_algorithm(cfg, int(np.prod(obs_shape)), probe.action_space)
    probe.close()

    torch.manual_seed(derive_seed(cfg.seed, "model-init"))
    model = algorithm.build_model()
    target = copy.deepcopy(model)
    loss_spec = algorithm.loss_spec()
    # on-policy: the minibatch is drawn from the round's own rollout
    if fed.server_optimizer == "adam":
        server_opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=fed.lr)
    else:
        server_opt = torch.optim.SGD(model.parameters(), lr=fed.lr)

    clients = [Client(i, cfg, obs_shape, algorithm) for i in range(fed.clients)]
    views: list[ServerView] = []
    truths: dict[tuple[int, int], GroundTruth] = {}
    rows = []
    bar = tqdm(range(fed.rounds), desc="train", unit="round", disable=not progress, leave=False)
    for rnd in bar:
        params = {k: v.detach().clone() for k, v in model.named_parameters()}
        # on-policy algorithms bootstrap from the parameters that collected the data
        source = model if algorithm.on_policy else target
        target_params = {k: v.detach().clone() for k, v in source.named_parameters()}
        payloads = []
        round_truth: list[GroundTruth] = []
        for client in clients:
            steps = fed.env_steps_per_round + (fed.warmup_steps if rnd == 0 else 0)
            client.collect(model, steps)
            rng = numpy_rng(cfg.seed, "client", client.cid, "round", rnd, "minibatch")
            batches, origins = [], []

            def local_gradient(at: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, ...]:
                recent = steps if algorithm.on_policy else None
                batch, idx = client.buffer.sample(fed.batch_size, rng, recent=recent)
                batches.append(batch.numpy())
                origins.append(client.buffer.origin[idx].copy())
                if dp is None:
                    return loss_spec.gradient(model, at, target_params, batch)
                accountant.step(client.cid, fed.batch_size / (recent or client.buffer.size))
                per_sample = [loss_spec.gradient(model, at, target_params, _row(batch, i)) for i in range(len(batch))]
                return dp.privatize(per_sample, torch_generator(cfg.seed, "dpsgd", client.cid, rnd, step))

            if fed.strategy == "fedsgd":
                payload = local_gradient(params, 0)
            else:
                local = {k: v.clone().requires_grad_(True) for k, v in params.items()}
                for step in range(fed.local_steps):
                    grads = local_gradient(local, step)
                    local = {k: (v - fed.lr * g).detach().requires_grad_(True) for (k, v), g in zip(local.items(), grads)}
                payload = tuple((local[k] - params[k]).detach() for k in params)
            payload = tuple(p.detach().clone() for p in payload)
            payload = stack.apply(payload, torch_generator(cfg.seed, "defense", client.cid, rnd))
            payloads.append(payload)
            if stack.secagg:
                if any(r == rnd for r, _ in attacked):
                    round_truth.append(GroundTruth(rnd, client.cid, batches, origins, algorithm.actions.continuous))
            elif (rnd, client.cid) in attacked:
                views.append(
                    ServerView(rnd, client.cid, fed.strategy, params, target_params, payload, fed.batch_size, fed.local_steps, fed.lr, loss_spec)
                )
                truths[(rnd, client.cid)] = GroundTruth(rnd, client.cid, batches, origins, algorithm.actions.continuous)
            recent = client.finished_returns[-5:]
            rows.append(
                {
                    "round": rnd,
                    "client": client.cid,
                    "env_steps": client.env_steps,
                    "episodes": client.episode,
                    "mean_return_last5": float(np.mean(recent)) if recent else float("nan"),
                    "crash_rate_last5": float(np.mean(client.crashes[-5:])) if client.crashes else float("nan"),
                }
            )
        mean = [torch.stack(ps).mean(0) for ps in zip(*payloads)]
        if round_truth:  # secure aggregation: the server sees the sum (here its mean) alone
            n = len(clients)
            views.append(ServerView(rnd, -1, fed.strategy, params, target_params, tuple(m.clone() for m in mean), n * fed.batch_size, fed.local_steps, fed.lr, loss_spec))
            merged = [{k: np.concatenate([t.batches[s][k] for t in round_truth]) for k in round_truth[0].batches[s]} for s in range(len(round_truth[0].batches))]
            merged_origins = [np.concatenate([t.origins[s] for t in round_truth]) for s in range(len(round_truth[0].origins))]
            truths[(rnd, -1)] = GroundTruth(rnd, -1, merged, merged_origins, algorithm.actions.continuous)
        if fed.strategy == "fedsgd":
            server_opt.zero_grad()
            for p, g in zip(model.parameters(), mean):
                p.grad = g.clone()
            server_opt.step()
        else:
            with torch.no_grad():
                for p, d in zip(model.parameters(), mean):
                    p.add_(d)
        if (rnd + 1) % fed.target_update_rounds == 0:
            target.load_state_dict(model.state_dict())
    for c in clients:
        c.close()
    final = {k: v.detach().clone() for k, v in model.named_parameters()}
    privacy: dict[str, object] = {"defenses": stack.describe()}
    if dp is not None:
        privacy.update(epsilon=accountant.epsilon(), delta=dp.delta, noise_multiplier=dp.noise, clip=dp.clip, accountant="opacus RDP")
    return FederationResult(model=model, views=views, truths=truths, training=pd.DataFrame(rows), final_params=final, privacy=privacy, algorithm=algorithm)


def evaluate_policy(cfg: RunConfig, model: torch.nn.Module, algorithm: LocalAlgorithm, episodes: int) -> dict[str, float]:
    """Utility of a trained global policy: its greedy episodes on held-out seeds (no client's).

    Returns the mean and standard deviation of the episode return, the collision rate (share of
    episodes that ended in a crash; NaN where the simulator reports no crashes) and the mean
    episode length."""
    if episodes <= 0:
        return {}
    env = make_env(cfg.env)
    returns, crashes, lengths = [], [], []
    try:
        for e in range(episodes):
            obs, _ = env.reset(seed=derive_seed(cfg.seed, "utility", e))
            total, n, crashed, done = 0.0, 0, None, False
            while not done:
                obs, reward, terminated, truncated, info = env.step(algorithm.env_action(algorithm.greedy(model, obs)))
                total += float(reward)
                n += 1
                done = terminated or truncated
                if "crashed" in info:
                    crashed = bool(crashed) or bool(info["crashed"])
            returns.append(total)
            lengths.append(n)
            crashes.append(float("nan") if crashed is None else float(crashed))
    finally:
        env.close()
    return {
        "episodes": float(episodes),
        "mean_return": float(np.mean(returns)),
        "std_return": float(np.std(returns)),
        "collision_rate": float(np.mean(crashes)),
        "mean_length": float(np.mean(lengths)),
    }


def resolve_attacked(cfg: RunConfig) -> set[tuple[int, int]]:
    """The (round, client) pairs the configuration asks to attack."""
    r = cfg.federation.rounds
    rounds = sorted({k % r for k in cfg.attack.rounds})
    clients = cfg.attack.clients or list(range(cfg.federation.clients))
    return {(rnd, c) for rnd in rounds for c in clients}


__all__ = ["Client", "FederationResult", "GroundTruth", "ServerView", "evaluate_policy", "resolve_attacked", "run_federation"]
