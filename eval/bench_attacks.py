"""Attack benchmark: every attack, several batch sizes, scenarios and seeds, on the same gradients.

    python eval/bench_attacks.py --scenarios merge highway --batch-sizes 1 2 4 8 16 32 \\
        --attacks analytic dlg idlg ig rgia rgia-k --seeds 0 1 2 [--set KEY=VALUE ...]

For each scenario, seed and batch size a small federation is trained (the scenario's
settings with that batch size; --set overrides them) and the last round's FedSGD gradients of
its clients are attacked by every attack, so all attacks see the same gradients. Writes
<out>/attacks.csv (one row per scenario x batch size x attack x seed x client) and
<out>/attacks.md (median over seeds and clients, with the 25th-75th percentile of the ego
position error), and prints the table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from drivepriv.attacks import make_attack
from drivepriv.config import apply_overrides, parse_override
from drivepriv.federation.inprocess import resolve_attacked, run_federation
from drivepriv.metrics.scores import score
from drivepriv.pipeline import _truth, attack_input, build_priors
from drivepriv.scenarios import load_scenario
from drivepriv.seeding import derive_seed

SMALL_FEDERATION = {"federation.clients": 2, "federation.rounds": 3, "attack.rounds": [-1]}


def run(args: argparse.Namespace, partial: Path) -> pd.DataFrame:
    rows: list[dict] = []
    for scenario in args.scenarios:
        priors_by_seed: dict[int, object] = {}
        # batch sizes outermost: an interrupted run has every seed of the sizes it finished
        for b in args.batch_sizes:
            for seed in args.seeds:
                cfg = load_scenario(scenario)
                overrides = [(k.split("."), v) for k, v in SMALL_FEDERATION.items()]
                overrides += [parse_override(s) for s in args.set] + [(["seed"], seed), (["federation", "batch_size"], b)]
                cfg = apply_overrides(cfg, overrides)
                if seed not in priors_by_seed:  # the attacker's priors do not depend on the batch size
                    priors_by_seed[seed], _, _ = build_priors(cfg, progress=False)
                priors = priors_by_seed[seed]
                fed = run_federation(cfg, resolve_attacked(cfg), progress=False)
                codec = priors.codec
                for view in fed.views:
                    truth = _truth(fed.truths[(view.round, view.client)])
                    inp = attack_input(fed.model, view, priors, (codec.vehicles_count, codec.n_features), fed.model.n_actions)
                    for name in args.attacks:
                        a = cfg.attack
                        rec = make_attack(name, iterations=a.iterations, restarts=a.restarts, lr=a.lr, weights=a.weights).run(
                            inp, derive_seed(seed, "bench", name, b, view.client)
                        )
                        m, _ = score(truth, rec.states, rec.actions, rec.rewards, rec.next_states, codec)
                        rows.append({"scenario": scenario, "batch_size": b, "attack": name, "seed": seed, "client": view.client, **m, "time_s": rec.time_s})
                        pd.DataFrame(rows[-1:]).to_csv(partial, mode="a", header=len(rows) == 1, index=False)
                        print(f"{scenario} B={b} seed={seed} client={view.client} {name}: ego {m['ego_pos_err_m']:.3g} m, {rec.time_s:.1f} s", file=sys.stderr)
    return pd.DataFrame(rows)


def table(df: pd.DataFrame) -> str:
    lines = [
        "| scenario | B | attack | ego position (m) [p25, p75] | within 1 m | neighbours (m) | next state (m) | reward err. | action acc. | time (s) | seeds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    order = {s: i for i, s in enumerate(pd.unique(df["scenario"]))}
    df = df.assign(_order=df["scenario"].map(order)).sort_values(["_order", "batch_size"], kind="stable")
    for (scenario, b, attack), g in df.groupby(["scenario", "batch_size", "attack"], sort=False):
        e = g["ego_pos_err_m"]
        lines.append(
            f"| {scenario} | {b} | {attack} | {e.median():.3g} [{e.quantile(0.25):.3g}, {e.quantile(0.75):.3g}] | "
            f"{g['ego_within_1m'].mean():.2f} | {g['neighbour_pos_err_m'].median():.3g} | {g['next_state_err_m'].median():.3g} | "
            f"{g['reward_abs_err'].median():.3g} | {g['action_acc'].mean():.2f} | {g['time_s'].median():.2f} | "
            f"{','.join(str(s) for s in sorted(g['seed'].unique()))} |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenarios", nargs="+", default=["merge", "highway"])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--attacks", nargs="+", default=["analytic", "dlg", "idlg", "ig", "rgia", "rgia-k"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--out", default="reports/eval")
    p.add_argument("--tables-from", nargs="+", default=None, metavar="CSV", help="combine these CSVs instead of running")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.tables_from:
        df = pd.concat([pd.read_csv(f) for f in args.tables_from], ignore_index=True)
    else:
        partial = out / "attacks.partial.csv"
        partial.unlink(missing_ok=True)
        df = run(args, partial)
        partial.unlink()
    df.to_csv(out / "attacks.csv", index=False)
    md = table(df)
    (out / "attacks.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
