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
import pickle

import numpy as np
import pandas as pd
import torch

from drivepriv.agents.algorithms import LocalAlgorithm, make_algorithm
from drivepriv.agents.common import Batch, ReplayBuffer, at_step
from drivepriv.config import RunConfig
from drivepriv.envs import make_env
from drivepriv.federation.defenses import DefenseStack, PrivacyAccountant
from drivepriv.federation.strategies import strategy
from drivepriv.federation.types import ClientResult, ClientUpdate, FederationResult, GroundTruth, ServerView
from drivepriv.seeding import derive_seed, numpy_rng, torch_generator

log = logging.getLogger(__name__)


def episode_seed(root: int, client: int, episode: int) -> int:
    """The environment seed of a client's episode (its traffic; for MetaDrive, its map)."""
    return derive_seed(root, "client", client, "episode", episode)


class Client:
    """One vehicle / fleet: its own environment, seeds, replay buffer and exploration."""

    def __init__(self, cid: int, cfg: RunConfig, obs_shape: tuple[int, ...], algorithm: LocalAlgorithm, env=None) -> None:
        """A new client; with ``env`` (an environment in mid-episode, see :meth:`restore`), it
        takes that environment as it is instead of making and resetting one."""
        self.cid = cid
        self.cfg = cfg
        self.env = make_env(cfg.env) if env is None else env
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
        self.obs = self.env.reset(seed=episode_seed(cfg.seed, cid, 0))[0] if env is None else None

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

    def train_round(
        self,
        rnd: int,
        model: torch.nn.Module,
        params: dict[str, torch.Tensor],
        target_params: dict[str, torch.Tensor],
        stack: DefenseStack,
        record_truth: bool,
    ) -> ClientResult:
        """One round: collect with the global policy (``model`` holds ``params``), train locally
        (one gradient under FedSGD, K SGD steps under FedAvg), apply the client-side defenses."""
        fed = self.cfg.federation
        algorithm = self.algorithm
        loss_spec = algorithm.loss_spec()
        dp = stack.dpsgd
        # the warm-up comes with a client's first round (round 0 unless client sampling skipped it)
        steps = fed.env_steps_per_round + (fed.warmup_steps if self.env_steps == 0 else 0)
        self.collect(model, steps)
        rng = numpy_rng(self.cfg.seed, "client", self.cid, "round", rnd, "minibatch")
        batches: list[dict[str, np.ndarray]] = []
        origins: list[np.ndarray] = []
        rates: list[float] = []
        shared = strategy(fed.strategy)
        local_steps = shared.unrolled_steps(fed.local_steps)
        # off-policy: a replay sample per step; on-policy: minibatches of the round's own rollout
        draw = algorithm.minibatches(self.buffer, steps, model, params, local_steps, rng)
        pool = min(steps, self.buffer.size) if algorithm.on_policy else self.buffer.size  # DP-SGD's sampling rate
        distinct = algorithm.distinct_steps(local_steps)  # PPO's later passes repeat the first's transitions

        def local_gradient(at: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, ...]:
            batch, idx = draw(step)
            if step < distinct:
                batches.append(batch.numpy())
                origins.append(self.buffer.origin[idx].copy())
            spec = algorithm.client_loss(at_step(loss_spec, rnd * local_steps + step), rng)
            if dp is None:
                return spec.gradient(model, at, target_params, batch)
            rates.append(fed.batch_size / pool)
            per_sample = [spec.gradient(model, at, target_params, _row(batch, i)) for i in range(len(batch))]
            return dp.privatize(per_sample, torch_generator(self.cfg.seed, "dpsgd", self.cid, rnd, step))

        payload = shared.local_payload(params, fed.local_steps, fed.lr, local_gradient)
        payload = stack.apply(payload, torch_generator(self.cfg.seed, "defense", self.cid, rnd))
        last = self.finished_returns[-5:]
        row = {
            "round": rnd,
            "client": self.cid,
            "env_steps": self.env_steps,
            "episodes": self.episode,
            "mean_return_last5": float(np.mean(last)) if last else float("nan"),
            "crash_rate_last5": float(np.mean(self.crashes[-5:])) if self.crashes else float("nan"),
        }
        truth = GroundTruth.from_minibatches(rnd, self.cid, batches, origins, algorithm.actions.continuous) if record_truth else None
        return ClientResult(ClientUpdate(self.cid, payload, row, rates), truth)

    def snapshot(self) -> tuple[dict[str, np.ndarray], dict[str, object]]:
        """The client's state as arrays and plain values (for engines that keep no process per
        client, e.g. Flower's); :meth:`restore` rebuilds the client from it."""
        n = self.buffer.size
        b = self.buffer
        arrays = {k: getattr(b, k)[:n].copy() for k in ("states", "next_states", "actions", "rewards", "dones", "origin")}
        arrays["obs"] = np.array(self.obs, copy=True)
        try:  # highway-env and the control tasks pickle (9 kB, under 1 ms); MetaDrive's worker does not
            arrays["env"] = np.frombuffer(pickle.dumps(self.env), dtype=np.uint8)
        except Exception:  # noqa: BLE001 - any simulator that cannot be pickled is replayed instead
            pass
        meta = {
            "size": n,
            "next": b._next,
            "env_steps": self.env_steps,
            "episode": self.episode,
            "episode_step": self.episode_step,
            "episode_return": self.episode_return,
            "finished_returns": list(self.finished_returns),
            "crashes": [bool(c) for c in self.crashes],
            "rng": self.rng.bit_generator.state,
        }
        return arrays, meta

    @classmethod
    def restore(cls, cid: int, cfg: RunConfig, obs_shape: tuple[int, ...], algorithm: LocalAlgorithm, arrays: dict[str, np.ndarray], meta: dict) -> "Client":
        """Rebuild a client from :meth:`snapshot`: the buffer, counters and generator are copied;
        the environment is unpickled where it could be pickled, else reset to the current
        episode's seed and the episode's actions so far (from the buffer) are replayed; either
        way it must land on the saved observation."""
        pickled = "env" in arrays
        env = pickle.loads(arrays["env"].tobytes()) if pickled else make_env(cfg.env)
        c = cls(cid, cfg, obs_shape, algorithm, env=env)
        b = c.buffer
        n = int(meta["size"])
        for k in ("states", "next_states", "actions", "rewards", "dones", "origin"):
            getattr(b, k)[:n] = arrays[k]
        b.size, b._next = n, int(meta["next"])
        c.env_steps, c.episode, c.episode_step = int(meta["env_steps"]), int(meta["episode"]), int(meta["episode_step"])
        c.episode_return = float(meta["episode_return"])
        c.finished_returns = [float(x) for x in meta["finished_returns"]]
        c.crashes = [bool(x) for x in meta["crashes"]]
        c.rng.bit_generator.state = meta["rng"]
        if c.episode_step > b.size:
            raise RuntimeError(f"client {cid}: its current episode ({c.episode_step} steps) is longer than its replay buffer; cannot restore it")
        if pickled:  # the simulator as it was, mid-episode
            c.obs = arrays["obs"].copy()
            return c
        obs, _ = c.env.reset(seed=episode_seed(cfg.seed, cid, c.episode))
        for i in range(c.episode_step):
            j = (b._next - c.episode_step + i) % b.capacity
            if tuple(b.origin[j]) != (c.episode, i):
                raise RuntimeError(f"client {cid}: buffer row {j} is not step {i} of episode {c.episode}; cannot restore it")
            obs, *_ = c.env.step(algorithm.env_action(b.actions[j]))
        if not np.array_equal(np.asarray(obs), arrays["obs"]):
            raise RuntimeError(
                f"client {cid}: replaying episode {c.episode} did not reproduce the saved observation "
                f"(the simulator is not deterministic under reset(seed) and the same actions)"
            )
        c.obs = obs
        return c

    def close(self) -> None:
        self.env.close()


class ClientGroup:
    """Some of the federation's clients in this process, with their own copy of the global
    network: the in-process engine's clients, or one worker process's share of them
    (:mod:`drivepriv.federation.workers`)."""

    def __init__(self, cfg: RunConfig, obs_shape: tuple[int, ...], algorithm: LocalAlgorithm, cids: list[int]) -> None:
        self.clients = {i: Client(i, cfg, obs_shape, algorithm) for i in cids}
        with torch.random.fork_rng():  # the global generator stays as the server left it
            self.model = algorithm.build_model()
        self.stack = DefenseStack.from_specs(cfg.federation.defenses)

    def train_round(self, rnd: int, params, target_params, record: dict[int, bool]) -> list[ClientResult]:
        """One round of the clients in ``record`` (the round's sample, each with whether its
        truth is recorded) that are in this group, in client order."""
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                p.copy_(params[name])
        return [c.train_round(rnd, self.model, params, target_params, self.stack, record[i]) for i, c in self.clients.items() if i in record]

    def close(self) -> None:
        for c in self.clients.values():
            c.close()


def _row(batch: Batch, i: int) -> Batch:
    return Batch(*(None if t is None else t[i : i + 1] for t in (batch.states, batch.actions, batch.rewards, batch.next_states, batch.dones, batch.adv_next)))


class Server:
    """The server: global model and target network, optimiser, privacy accounting, and the
    record of what it saw for the attacked (round, client) pairs. It holds no ground truth (the
    engine's :class:`~drivepriv.federation.recorder.TruthRecorder` does). Engines (in-process,
    Flower) move the messages; the server logic is this one class."""

    def __init__(self, cfg: RunConfig, algorithm: LocalAlgorithm, attacked: set[tuple[int, int]]) -> None:
        fed = cfg.federation
        self.cfg = cfg
        self.algorithm = algorithm
        self.attacked = attacked
        self.stack = DefenseStack.from_specs(fed.defenses)
        dp = self.stack.dpsgd
        self.accountant = PrivacyAccountant(dp, fed.clients) if dp is not None else None
        torch.manual_seed(derive_seed(cfg.seed, "model-init"))
        self.model = algorithm.build_model()
        self.target = copy.deepcopy(self.model)
        self.loss_spec = algorithm.loss_spec()
        if fed.server_optimizer == "adam":
            self.opt: torch.optim.Optimizer = torch.optim.Adam(self.model.parameters(), lr=fed.lr)
        else:
            self.opt = torch.optim.SGD(self.model.parameters(), lr=fed.lr)
        self.views: list[ServerView] = []
        self.rows: list[dict[str, float]] = []

    def records(self, rnd: int, client: int) -> bool:
        """Whether the client's minibatch behind this round's update is kept for the metrics."""
        if self.stack.secagg:
            return any(r == rnd for r, _ in self.attacked)
        return (rnd, client) in self.attacked

    def broadcast(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The global parameters and the parameters clients bootstrap from (the target network;
        on-policy algorithms: the parameters that collect the data)."""
        params = {k: v.detach().clone() for k, v in self.model.named_parameters()}
        source = self.model if self.algorithm.on_policy else self.target
        return params, {k: v.detach().clone() for k, v in source.named_parameters()}

    def view(self, rnd: int, client: int, params, target_params, payload, batch_size: int) -> ServerView:
        fed = self.cfg.federation
        loss = at_step(self.loss_spec, rnd * strategy(fed.strategy).unrolled_steps(fed.local_steps))  # the round's first step
        return ServerView(rnd, client, fed.strategy, params, target_params, payload, batch_size, fed.local_steps, fed.lr, loss)

    def receive(self, rnd: int, params, target_params, updates: list[ClientUpdate], record: bool = True) -> None:
        """Account, record (unless the engine's own strategy records) and aggregate one round's
        updates, in client order whatever order they arrived in; then step the global model."""
        fed = self.cfg.federation
        updates = sorted(updates, key=lambda u: u.client)
        for u in updates:
            for q in u.dp_rates:
                self.accountant.step(u.client, q)
            self.rows.append(u.row)
            if record and not self.stack.secagg and self.records(rnd, u.client):
                self.views.append(self.view(rnd, u.client, params, target_params, u.payload, fed.batch_size))
        mean = [torch.stack(ps).mean(0) for ps in zip(*(u.payload for u in updates))]
        # secure aggregation: the server sees the sum (here its mean) alone
        if record and self.stack.secagg and any(self.records(rnd, u.client) for u in updates):
            self.views.append(self.view(rnd, -1, params, target_params, tuple(m.clone() for m in mean), len(updates) * fed.batch_size))
        strategy(fed.strategy).server_step(self.model, self.opt, mean)
        if (rnd + 1) % fed.target_update_rounds == 0:
            self.target.load_state_dict(self.model.state_dict())

    def result(self, views: list[ServerView] | None = None) -> FederationResult:
        final = {k: v.detach().clone() for k, v in self.model.named_parameters()}
        privacy: dict[str, object] = {"defenses": self.stack.describe()}
        dp = self.stack.dpsgd
        if dp is not None:
            privacy.update(epsilon=self.accountant.epsilon(), delta=dp.delta, noise_multiplier=dp.noise, clip=dp.clip, accountant="opacus RDP")
        return FederationResult(
            model=self.model,
            views=self.views if views is None else views,
            truths={},
            training=pd.DataFrame(self.rows),
            final_params=final,
            privacy=privacy,
            algorithm=self.algorithm,
        )


def setup(cfg: RunConfig) -> tuple[tuple[int, ...], LocalAlgorithm]:
    """The observation shape and the local algorithm of a scenario (from a probe environment)."""
    probe = make_env(cfg.env)
    obs_shape = probe.observation_space.shape
    algorithm = make_algorithm(cfg, int(np.prod(obs_shape)), probe.action_space)
    probe.close()
    return obs_shape, algorithm


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


def sampled_clients(cfg: RunConfig, rnd: int) -> list[int]:
    """The clients that train in round ``rnd`` (all of them unless ``federation.fraction`` < 1),
    in client order: a function of the root seed and the round alone, so both engines and the
    attack plan agree on it before anything runs."""
    fed = cfg.federation
    if fed.fraction >= 1.0:
        return list(range(fed.clients))
    k = min(fed.clients, max(fed.min_clients, int(fed.fraction * fed.clients)))
    rng = numpy_rng(cfg.seed, "client-sample", rnd)
    return sorted(int(c) for c in rng.choice(fed.clients, size=k, replace=False))


def resolve_attacked(cfg: RunConfig) -> set[tuple[int, int]]:
    """The (round, client) pairs the configuration asks to attack, among the clients sampled in
    each round (the server sees no update from the others)."""
    r = cfg.federation.rounds
    rounds = cfg.attack.round_indices(r)
    clients = set(cfg.attack.clients or range(cfg.federation.clients))
    return {(rnd, c) for rnd in rounds for c in sampled_clients(cfg, rnd) if c in clients}


__all__ = ["Client", "ClientGroup", "Server", "evaluate_policy", "resolve_attacked", "sampled_clients", "setup"]
