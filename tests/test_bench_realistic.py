"""eval/bench_realistic.py: the extra updates a client computes are the ones its local
training would share, and the tables carry every cell, the chance row and the ceilings."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from drivepriv.agents.common import Batch
from drivepriv.config import apply_overrides
from drivepriv.federation.inprocess import Client, Server, setup
from drivepriv.federation.strategies import strategy
from drivepriv.scenarios import load_scenario
from drivepriv.seeding import numpy_rng

BENCH = Path(__file__).resolve().parents[1] / "eval" / "bench_realistic.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_realistic", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_client_update_is_the_clients_local_run():
    """The bench's FedAvg cell: K SGD steps on fresh minibatches, delta = new minus old, exactly
    as an SGD loop written out here computes it from the same minibatches."""
    bench = _bench()
    cfg = apply_overrides(load_scenario("merge"), [(["seed"], 3), (["federation", "clients"], 1), (["attack", "clients"], [0])])
    obs_shape, algorithm = setup(cfg)
    server = Server(cfg, algorithm, set())
    client = Client(0, cfg, obs_shape, algorithm)
    try:
        params, target_params = server.broadcast()
        client.collect(server.model, 40)
        view, gt = bench.client_update(client, server, params, target_params, "fedavg", 8, 3, numpy_rng(0, "t"))
    finally:
        client.close()
    assert view.strategy == "fedavg" and view.local_steps == 3 and view.batch_size == 8
    assert gt.local_steps == 3 and len(gt) == 24
    lr = cfg.federation.lr
    p = {k: v.clone() for k, v in params.items()}
    for s in range(gt.local_steps):
        b = gt.step(s)
        actions = np.eye(algorithm.actions.n, dtype=np.float32)[b.actions]
        batch = Batch(*(torch.as_tensor(x) for x in (b.states, actions, b.rewards, b.next_states, b.dones)))
        at = {k: v.detach().requires_grad_(True) for k, v in p.items()}
        loss = server.loss_spec(server.model, at, target_params, batch)
        grads = torch.autograd.grad(loss, list(at.values()))
        p = {k: (v - lr * g).detach() for (k, v), g in zip(p.items(), grads)}
    for d, k in zip(view.payload, params):
        torch.testing.assert_close(d, p[k] - params[k], rtol=1e-5, atol=1e-9)
    # FedSGD through the same function: the gradient at the global parameters
    sgd = strategy("fedsgd").local_payload(params, 1, lr, lambda at, step: tuple(torch.ones_like(v) for v in at.values()))
    assert all(bool((g == 1).all()) for g in sgd)


def test_bench_writes_every_cell(tmp_path):
    bench = _bench()
    rc = bench.main(["--scenarios", "merge", "--after", "0", "1", "--widths", "16", "--batch-sizes", "4", "--local-steps", "2", "--fedavg-batch", "4",
                     "--attacks", "analytic", "--seeds", "0", "--clients", "0", "--out", str(tmp_path)])
    assert rc == 0
    df = pd.read_csv(tmp_path / "realistic.csv")
    # 2 rounds x (1 FedSGD + 1 FedAvg cell) x (analytic + chance)
    assert len(df) == 8
    assert set(df["attack"]) == {"analytic", "chance"}
    assert set(df["after"]) == {0, 1} and set(df["width"]) == {16}
    assert set(df.loc[df["strategy"] == "fedavg", "n"]) == {8} and set(df.loc[df["strategy"] == "fedsgd", "n"]) == {4}
    assert df["ego_within_1m"].between(0, 1).all() and df["identifiable"].between(0, 1).all()
    sgd = df[df["strategy"] == "fedsgd"]
    assert (sgd["determined"] <= sgd["identifiable"]).all() and df.loc[df["strategy"] == "fedavg", "determined"].isna().all()
    assert (df["update_rank"] <= df["n"]).all()
    md = (tmp_path / "realistic.md").read_text()
    assert "FedAvg K=2 B=4" in md and "FedSGD B=4" in md and "| chance |" in md
    assert not (tmp_path / "realistic.partial.csv").exists()
