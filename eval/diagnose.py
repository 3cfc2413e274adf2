"""Why an attack recovers a batch or not: the update's identifiability, batch by batch.

Trains a scenario's federation (its own settings, DQN), records every client's update in the
attacked rounds (default: every 50 rounds, first and last included) and, per batch, measures
what decides whether *any* attack can recover it from the update (drivepriv.attacks.exact):

- per hidden layer: the numerical rank of [dW | db] against the batch size, the smallest kept
  singular value and the float32 noise floor (the (B+1)-th singular value), both relative;
- per hidden layer: units dead for the whole batch and units active for all of it;
- the |TD error| spread and the share of transitions that saturate the Huber loss;
- duplicate transitions, and the transitions that share their action and every ReLU pattern
  with another one (the update provably cannot split those: ``identifiable`` counts the rest);
- what rgia-k then certifies and recovers (egos within 1 m).

Writes diagnose.csv and diagnose.md to --out, and prints the table.

    python eval/diagnose.py --scenario merge --seed 0 --out reports/diagnose
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.func import functional_call

from drivepriv.attacks import make_attack
from drivepriv.attacks.chain import Chain, layer_ranks
from drivepriv.config import apply_overrides, parse_override
from drivepriv.federation.inprocess import resolve_attacked
from drivepriv.federation.run import run_federation
from drivepriv.metrics.identifiability import determined_transitions, separable_transitions
from drivepriv.metrics.scores import score
from drivepriv.pipeline import attack_input, build_priors
from drivepriv.scenarios import load_scenario
from drivepriv.seeding import derive_seed, seed_everything


def batch_diagnostics(model, view, truth) -> dict[str, float]:
    """The identifiability figures of one update (see the module docstring)."""
    n = view.batch_size * (view.local_steps if view.strategy == "fedavg" else 1)
    grad = dict(zip(view.params, view.gradient()))
    chain = Chain(model, view.params, grad)
    x = torch.as_tensor(truth.states.reshape(n, -1), dtype=torch.float64)
    _, pre = chain.forward(x)
    out: dict[str, float] = {"n": float(n)}
    ranks = layer_ranks(model, view.params, grad, n)
    for k, (name, layer) in enumerate(zip(chain.names, chain.layers)):
        sv = torch.linalg.svdvals(layer.grad_matrix)
        tag = f"L{k + 1}"
        out[f"{tag}_rank"] = float(ranks[name])
        r = max(1, ranks[name])
        out[f"{tag}_sv_kept_min"] = float(sv[r - 1] / sv[0])
        out[f"{tag}_noise"] = float(sv[n] / sv[0]) if n < len(sv) else float("nan")
        if k < len(chain.layers) - 1:
            active = (pre[k] > 0).numpy()
            out[f"{tag}_dead_units"] = float((~active.any(0)).sum())
            out[f"{tag}_always_on_units"] = float(active.all(0).sum())
    with torch.no_grad():
        s = torch.as_tensor(truth.states)
        q = functional_call(model, view.params, (s,))
        q_next = functional_call(model, view.target_params, (torch.as_tensor(truth.next_states),))
        y = torch.as_tensor(truth.rewards) + view.loss.gamma * (1 - torch.as_tensor(truth.dones)) * q_next.max(-1).values
        td = (q[torch.arange(n), torch.as_tensor(truth.actions)] - y).abs().numpy()
    out["td_abs_min"], out["td_abs_max"] = float(td.min()), float(td.max())
    out["huber_saturated"] = float((td >= 1.0).mean())
    flat = truth.states.reshape(n, -1)
    dist = np.linalg.norm(flat[:, None] - flat[None], axis=-1) + np.eye(n)
    out["duplicate_pairs"] = float((dist < 1e-7).sum() / 2)
    out["identifiable"] = separable_transitions(model, view.params, truth.states, truth.actions)
    out["determined"] = determined_transitions(model, view.params, truth.states, truth.actions)
    return out


def markdown(table: pd.DataFrame) -> str:
    """A GitHub Markdown table, numbers to 3 significant digits."""
    def cell(v) -> str:
        return f"{v:.3g}" if isinstance(v, (float, np.floating)) else str(v)

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", default="merge")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", default="every:50", help="attack.rounds: a list, all or every:N")
    p.add_argument("--set", action="append", default=[], help="further KEY=VALUE overrides")
    p.add_argument("--out", default="reports/diagnose")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False
    cfg = load_scenario(args.scenario)
    sets = [f"seed={args.seed}", f"attack.rounds={args.rounds}", "attack.clients=[]", *args.set]
    cfg = apply_overrides(cfg, [parse_override(s) for s in sets])
    if cfg.agent.algorithm != "dqn":
        print("diagnose: DQN scenarios only (the TD-error figures read a Q-network)", file=sys.stderr)
        return 2
    seed_everything(cfg.seed)
    t0 = time.perf_counter()
    fed = run_federation(cfg, resolve_attacked(cfg), progress=False)
    priors, _, _ = build_priors(cfg, progress=False)
    rows = []
    for view in sorted(fed.views, key=lambda v: (v.round, v.client)):
        truth = fed.truths[(view.round, view.client)]
        row = {"round": view.round, "client": view.client, **batch_diagnostics(fed.model, view, truth)}
        inp = attack_input(copy.deepcopy(fed.model), view, priors, tuple(priors.codec.obs_shape), fed.model.n_actions)
        rec = make_attack("rgia-k").run(inp, derive_seed(cfg.seed, "attack", "rgia-k", view.round, view.client))
        m, _ = score(truth, rec.states, rec.actions, rec.rewards, rec.next_states, priors.codec)
        row.update(certified=rec.extra["states_found"], ego_within_1m=m["ego_within_1m"], ego_err_m=m["ego_pos_err_m"], time_s=rec.time_s)
        rows.append(row)
    table = pd.DataFrame(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "diagnose.csv", index=False, float_format="%.4g")
    cols = ["round", "client", "n", "L1_rank", "L2_rank", "L1_noise", "L1_dead_units", "L1_always_on_units", "L2_dead_units", "L2_always_on_units", "td_abs_min", "td_abs_max", "huber_saturated", "duplicate_pairs", "identifiable", "determined", "certified", "ego_within_1m", "ego_err_m", "time_s"]
    md = markdown(table[[c for c in cols if c in table.columns]])
    (out / "diagnose.md").write_text(f"{args.scenario}, seed {cfg.seed}, rounds {args.rounds}; {time.perf_counter() - t0:.0f} s\n\n{md}\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
