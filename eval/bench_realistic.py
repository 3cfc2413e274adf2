"""Attacks where real fleets train: trained networks, larger batches, narrow layers, FedAvg.

    python eval/bench_realistic.py --scenarios merge highway --after 0 50 100 200 --widths 64 256 \\
        --batch-sizes 8 16 32 64 --local-steps 1 3 5 10 --attacks rgia-k analytic rgia dlg ig \\
        --seeds 0 1 2 [--set KEY=VALUE ...] [--out reports/bench_realistic]

Per scenario, seed and width (the Q-network's two hidden layers) the scenario's own
federation is trained (its settings, DQN, FedSGD) for max(--after) rounds. After N rounds
(N in --after) each client in --clients computes, from its own replay buffer at that round
(what the global policy drove, with its exploration), one update per cell on the current
global network: the FedSGD gradient of a minibatch of B transitions for B in --batch-sizes,
and the FedAvg delta after K local SGD steps (each on a fresh minibatch of --fedavg-batch
transitions, lr = the scenario's) for K in --local-steps. Every attack inverts the same
updates with the attacker's own priors (rollouts on seeds disjoint from the clients'). A
"chance" row scores n of those prior states drawn at random, matched to the truth like every
attack's: what "within 1 m" reaches without reading the update at all. The cells' minibatches come from a generator of their own, so the federation trains exactly as
the scenario does.

Writes <out>/realistic.csv (one row per cell x attack x seed x client: the share of egos within
1 m, the median ego error, the time per attack, the identifiability ceiling: the share of the
transitions that no other one merges with, drivepriv.metrics.identifiability, an upper bound,
and the update's first-layer rank) and <out>/realistic.md (per cell and attack, by round: the
share within 1 m over seeds and clients with its spread across seeds, and beside it the
ceiling and the rank over the transitions), and prints the table. Rows are
appended to <out>/realistic.partial.csv as they come; --tables-from joins CSVs of separate runs.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from drivepriv.attacks import make_attack
from drivepriv.attacks.catalogue import complete_from_states
from drivepriv.config import apply_overrides, parse_override
from drivepriv.federation.inprocess import Client, Server, setup
from drivepriv.federation.strategies import STRATEGIES
from drivepriv.federation.types import GroundTruth, ServerView
from drivepriv.metrics.identifiability import determined_transitions, separable_transitions
from drivepriv.pipeline import attack_input, build_priors, score_any, update_rank
from drivepriv.scenarios import load_scenario
from drivepriv.seeding import derive_seed, numpy_rng


def cells(args: argparse.Namespace) -> list[tuple[str, int, int]]:
    """(strategy, minibatch size, local steps) of every update a client computes per round."""
    out = [("fedsgd", b, 1) for b in args.batch_sizes]
    return out + [("fedavg", args.fedavg_batch, k) for k in args.local_steps]


def client_update(client: Client, server: Server, params, target_params, strategy: str, b: int, k: int, rng) -> tuple[ServerView, GroundTruth]:
    """One update of ``client`` on the global ``params`` from its replay buffer, as its
    local training would compute it (the strategy's local_payload), and the transitions behind it."""
    loss_spec = server.loss_spec
    batches, origins = [], []

    def local_gradient(at, step):
        batch, idx = client.buffer.sample(b, rng)
        batches.append(batch.numpy())
        origins.append(client.buffer.origin[idx].copy())
        return loss_spec.gradient(server.model, at, target_params, batch)

    lr = server.cfg.federation.lr
    payload = STRATEGIES.get(strategy).local_payload(params, k, lr, local_gradient)
    view = ServerView(-1, client.cid, strategy, params, target_params, payload, b, k, lr, loss_spec)
    return view, GroundTruth.from_minibatches(-1, client.cid, batches, origins, continuous=False)


def chance(inp, seed: int):
    """What a guess from the attacker's own rollouts scores: n of its prior states drawn at
    random, the rest in closed form, matched to the truth like every attack's. The floor that
    "within 1 m" reaches without reading the update."""
    t0 = time.perf_counter()
    prior = inp.priors.prior_states
    rng = np.random.default_rng(seed)
    rec = complete_from_states(inp, prior[rng.choice(len(prior), inp.n_transitions, replace=len(prior) < inp.n_transitions)], "chance")
    rec.time_s = time.perf_counter() - t0
    return rec


def run_one(scenario: str, seed: int, width: int, args: argparse.Namespace, priors, partial: Path) -> list[dict]:
    cfg = load_scenario(scenario)
    sets = [parse_override(s) for s in args.set] + [(["seed"], seed), (["agent", "hidden_sizes"], [width, width])]
    cfg = apply_overrides(cfg, sets)
    if cfg.agent.algorithm != "dqn" or cfg.federation.strategy != "fedsgd":
        raise SystemExit(f"bench_realistic: {scenario} trains {cfg.agent.algorithm}/{cfg.federation.strategy}; the bench needs a DQN scenario trained with FedSGD")
    obs_shape, algorithm = setup(cfg)
    server = Server(cfg, algorithm, set())
    clients = [Client(i, cfg, obs_shape, algorithm) for i in range(cfg.federation.clients)]
    attacked = [c for c in clients if c.cid in args.clients]
    rows: list[dict] = []
    a = cfg.attack
    try:
        for rnd in range(max(args.after) + 1):
            params, target_params = server.broadcast()
            updates = [c.train_round(rnd, server.model, params, target_params, server.stack, False).update for c in clients]
            if rnd in args.after:  # the clients' buffers now hold this round's driving too
                for c in attacked:
                    for strategy, b, k in cells(args):
                        rng = numpy_rng(seed, "bench-realistic", c.cid, rnd, strategy, b, k)
                        view, truth = client_update(c, server, params, target_params, strategy, b, k, rng)
                        inp = attack_input(server.model, view, priors, obs_shape, algorithm.actions.n)
                        n = len(truth.actions)
                        ceiling = separable_transitions(server.model, view.params, truth.states, truth.actions) / n
                        # FedSGD only: a FedAvg delta's terms come from K parameter versions
                        determined = determined_transitions(server.model, view.params, truth.states, truth.actions) / n if STRATEGIES.get(strategy).payload_kind == "gradient" else float("nan")
                        rank = update_rank(inp)
                        for name in [*args.attacks, *(["chance"] if args.chance else [])]:
                            attack_seed = derive_seed(seed, "bench-realistic", name, rnd, c.cid, strategy, b, k)
                            if name == "chance":
                                rec = chance(inp, attack_seed)
                            else:
                                attack = make_attack(name, iterations=a.iterations, restarts=a.restarts, lr=a.lr, weights=a.weights)
                                rec = attack.run(inp, attack_seed)
                            m, _ = score_any(truth, rec, priors.codec)
                            row = {
                                "scenario": scenario, "width": width, "after": rnd, "strategy": strategy, "batch_size": b,
                                "local_steps": k, "n": n, "attack": name, "seed": seed, "client": c.cid,
                                "ego_within_1m": m["ego_within_1m"], "ego_pos_err_m": m["ego_pos_err_m"],
                                "identifiable": ceiling, "determined": determined, "update_rank": rank,
                                "states_certified": rec.extra.get("states_found", float("nan")), "time_s": rec.time_s,
                            }
                            rows.append(row)
                            pd.DataFrame([row]).to_csv(partial, mode="a", header=not partial.exists(), index=False)
                            print(
                                f"{scenario} w={width} after {rnd} seed {seed} client {c.cid} {strategy} B={b} K={k} {name}: "
                                f"{m['ego_within_1m']:.2f} within 1 m (ceiling {ceiling:.2f}), {rec.time_s:.1f} s",
                                file=sys.stderr,
                                flush=True,
                            )
            server.receive(rnd, params, target_params, updates)
    finally:
        for c in clients:
            c.close()
    return rows


def run(args: argparse.Namespace, partial: Path) -> pd.DataFrame:
    rows: list[dict] = []
    for scenario in args.scenarios:
        for seed in args.seeds:
            cfg = apply_overrides(load_scenario(scenario), [parse_override(s) for s in args.set] + [(["seed"], seed)])
            priors, _, _ = build_priors(cfg, progress=False)  # the attacker's: seeds disjoint from the clients'
            for width in args.widths:
                rows += run_one(scenario, seed, width, args, priors, partial)
    return pd.DataFrame(rows)


def update_label(strategy: str, b: int, k: int) -> str:
    return f"FedSGD B={b}" if strategy == "fedsgd" else f"FedAvg K={k} B={b}"


def table(df: pd.DataFrame) -> str:
    """Per scenario, width, update and attack: by round, the share of egos within 1 m (mean over
    seeds and clients; in brackets the lowest and highest seed mean), the ceiling (the share of
    transitions no other one merges with: same action and every ReLU pattern; FedSGD: and the
    share the update determines, see drivepriv.metrics.identifiability) and the terms (the
    first layer's rank over the transitions: how many separate rank-one terms the update
    carries per transition); the median ego error and time per attack over all rounds."""
    rounds = sorted(df["after"].unique())
    head = ["scenario", "width", "update", "attack"] + [f"after {r}: within 1 m [seeds] (ceiling, determined, terms)" for r in rounds]
    head += ["median ego error (m)", "time (s)", "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    df = df.assign(_cell=list(zip(df["strategy"].map({"fedsgd": 0, "fedavg": 1}), df["batch_size"], df["local_steps"])))
    attack_order = {n: i for i, n in enumerate(pd.unique(df["attack"]))}
    df = df.assign(_a=df["attack"].map(attack_order)).sort_values(["scenario", "width", "_cell", "_a"], kind="stable")
    for (scenario, width, _, _), g in df.groupby(["scenario", "width", "_cell", "_a"], sort=False):
        first = g.iloc[0]
        row = [scenario, str(width), update_label(first["strategy"], first["batch_size"], first["local_steps"]), first["attack"]]
        for r in rounds:
            h = g[g["after"] == r]
            if h.empty:
                row.append("")
                continue
            by_seed = h.groupby("seed")["ego_within_1m"].mean()
            terms = (h["update_rank"] / h["n"]).mean()
            det = h["determined"].mean() if "determined" in h else float("nan")  # CSVs from before the column
            det_s = "-" if np.isnan(det) else f"{det:.2f}"
            row.append(f"{h['ego_within_1m'].mean():.2f} [{by_seed.min():.2f}, {by_seed.max():.2f}] ({h['identifiable'].mean():.2f}, {det_s}, {terms:.2f})")
        row += [f"{g['ego_pos_err_m'].median():.3g}", f"{g['time_s'].median():.2f}", ",".join(str(s) for s in sorted(g["seed"].unique()))]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenarios", nargs="+", default=["merge", "highway"])
    p.add_argument("--after", type=int, nargs="+", default=[0, 50, 100, 200], help="attack the global network after these many rounds")
    p.add_argument("--widths", type=int, nargs="+", default=[64, 256])
    p.add_argument("--batch-sizes", type=int, nargs="*", default=[8, 16, 32, 64], help="FedSGD minibatch sizes")
    p.add_argument("--local-steps", type=int, nargs="*", default=[1, 3, 5, 10], help="FedAvg local steps (none: no FedAvg cells)")
    p.add_argument("--fedavg-batch", type=int, default=8, help="FedAvg minibatch size of each local step")
    p.add_argument("--attacks", nargs="*", default=["rgia-k", "analytic", "rgia", "dlg", "ig"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--no-chance", dest="chance", action="store_false", help="leave out the chance row (prior states drawn at random)")
    p.add_argument("--clients", type=int, nargs="+", default=[0, 1], help="the clients whose updates are attacked")
    p.add_argument("--set", action="append", default=[], help="scenario overrides KEY=VALUE (e.g. attack.iterations=60)")
    p.add_argument("--out", default="reports/bench_realistic")
    p.add_argument("--tables-from", nargs="+", default=None, metavar="CSV", help="combine these CSVs instead of running")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.tables_from:
        df = pd.concat([pd.read_csv(f) for f in args.tables_from], ignore_index=True)
    else:
        partial = out / "realistic.partial.csv"
        partial.unlink(missing_ok=True)
        df = run(args, partial)
        partial.unlink(missing_ok=True)
    df.to_csv(out / "realistic.csv", index=False, float_format="%.6g")
    md = table(df)
    (out / "realistic.md").write_text(f"{time.perf_counter() - t0:.0f} s; {' '.join(sys.argv[1:])}\n\n{md}\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
