"""Batched restarts against the same restarts run one after another.

    python eval/bench_restarts.py [--restarts 8] [--iterations 100] [--repeats 5]

One real merge minibatch (B=8) and the default Q-network (35-256-256-5); the RGIA objective
with its state, reward and transition priors. Batched: one engine run with R restarts as one
vmapped problem. Sequential: R engine runs with one restart each. The two are interleaved
``repeats`` times on the same machine; the medians and their ratio are printed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from drivepriv.agents.common import Batch
from drivepriv.agents.dqn import DQNLossSpec, QNetwork
from drivepriv.attacks import AttackInput, Priors
from drivepriv.attacks.engine import EngineSettings, run_engine
from drivepriv.config import RunConfig
from drivepriv.envs import make_codec, make_env
from drivepriv.priors.dynamics import LearnedDynamics
from drivepriv.priors.reward import ObservationReward, make_reward
from drivepriv.priors.road import RoadGeometry
from drivepriv.priors.state import state_penalty


def merge_input(batch_size: int = 8) -> AttackInput:
    cfg = RunConfig()
    env = make_env(cfg.env)
    codec = make_codec(cfg.env)
    obs, _ = env.reset(seed=0)
    rng = np.random.default_rng(0)
    S, A, R, S2 = [], [], [], []
    while len(S) < batch_size + 32:
        a = int(rng.integers(5))
        obs2, r, term, trunc, _ = env.step(a)
        S.append(obs), A.append(a), R.append(r), S2.append(obs2)
        obs = obs2 if not (term or trunc) else env.reset(seed=len(S))[0]
    road = RoadGeometry.from_env(env)
    torch.manual_seed(0)
    model = QNetwork(codec.obs_dim, 5, [256, 256])
    params = {k: v.detach() for k, v in model.named_parameters()}
    batch = Batch(
        torch.as_tensor(np.array(S[:batch_size])),
        torch.nn.functional.one_hot(torch.as_tensor(A[:batch_size]), 5).float(),
        torch.as_tensor(np.array(R[:batch_size], dtype=np.float32)),
        torch.as_tensor(np.array(S2[:batch_size])),
        torch.zeros(batch_size),
    )
    spec = DQNLossSpec(gamma=0.99)
    priors = Priors(
        codec=codec,
        road=road,
        reward=ObservationReward(make_reward(cfg.env, env), codec),
        dynamics=LearnedDynamics((5, 7), 5, [256, 256]).requires_grad_(False),
        state_penalty=lambda o: state_penalty(o, codec, road),
        prior_states=np.array(S[batch_size:]),
    )
    return AttackInput(model, params, params, spec.gradient(model, params, params, batch), spec, batch_size, (5, 7), 5, priors)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--restarts", type=int, default=8)
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    inp = merge_input()
    weights = {"state": 1.0, "reward": 1.0, "dynamics": 0.1}

    def settings(r: int) -> EngineSettings:
        return EngineSettings(iterations=args.iterations, restarts=r, lr=0.05, distance="rel_l2", init="prior", box=True, weights=weights)

    run_engine(inp, settings(1), 0, "warmup")
    batched, sequential = [], []
    for rep in range(args.repeats):
        t = time.perf_counter()
        run_engine(inp, settings(args.restarts), rep, "rgia")
        batched.append(time.perf_counter() - t)
        t = time.perf_counter()
        for r in range(args.restarts):
            run_engine(inp, settings(1), 1000 * rep + r, "rgia")
        sequential.append(time.perf_counter() - t)
    mb, ms = statistics.median(batched), statistics.median(sequential)
    print(f"| restarts | iterations | batched (s, median of {args.repeats}) | sequential (s) | speed-up |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| {args.restarts} | {args.iterations} | {mb:.2f} | {ms:.2f} | {ms / mb:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
