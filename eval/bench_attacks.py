"""Attack benchmark: every attack, several batch sizes, scenarios and seeds, on the same gradients.

    python eval/bench_attacks.py --scenarios merge highway --batch-sizes 1 2 4 8 16 32 \\
        --attacks analytic dlg idlg ig rgia rgia-k --seeds 0 1 2 [--set KEY=VALUE ...]

For each scenario, seed and batch size a small federation is trained (the scenario's
settings with that batch size; --set overrides them) and the last round's FedSGD gradients of
its clients are attacked by every attack, so all attacks see the same gradients. Writes
<out>/attacks.csv (one row per scenario x batch size x attack x seed x client) and
<out>/attacks.md (median over seeds and clients, with the 25th-75th percentile of the ego
position error; for flat observations, MetaDrive and control tasks, of the state RMSE, with
the dynamics residual: the simulator stepped from the reconstructed (s, a) against the
reconstructed s', and per feature group the share of transitions within the run's tolerance:
1 m, 0.5 m/s, 0.1 rad...; rgia-k's rows with how many transitions it certified per batch),
and prints the tables. An attack written ``rgia[dynamics=0]`` is rgia with
that regularizer weight changed (an ablation row). Rows are appended to
<out>/attacks.partial.<scenario>.csv as they come.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from drivepriv.attacks import make_attack
from drivepriv.config import apply_overrides, parse_override
from drivepriv.federation.inprocess import resolve_attacked
from drivepriv.federation.run import run_federation
from drivepriv.metrics.leakage import DEFAULT_TOLERANCE, UNIT_TOLERANCE
from drivepriv.pipeline import DynamicsResidual, attack_input, build_priors, score_any
from drivepriv.scenarios import load_scenario
from drivepriv.seeding import derive_seed

SMALL_FEDERATION = {"federation.clients": 2, "federation.rounds": 3, "attack.rounds": [-1]}


def parse_variant(name: str, weights: dict[str, float]) -> tuple[str, dict[str, float]]:
    """``rgia[dynamics=0]`` -> ("rgia", weights with dynamics 0): an ablation row of its own."""
    if "[" not in name:
        return name, weights
    base, rest = name.split("[", 1)
    out = dict(weights)
    for item in rest.rstrip("]").split(","):
        key, value = item.split("=")
        out[key.strip()] = float(value)
    return base, out


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
                residual_of = DynamicsResidual(cfg, codec)
                for view in fed.views:
                    truth = fed.truths[(view.round, view.client)]
                    inp = attack_input(fed.model, view, priors, tuple(codec.obs_shape), fed.model.n_actions)
                    truth_residual = residual_of(truth.states, truth.actions, truth.next_states)
                    for name in args.attacks:
                        a = cfg.attack
                        base, weights = parse_variant(name, a.weights)
                        rec = make_attack(base, iterations=a.iterations, restarts=a.restarts, lr=a.lr, weights=weights).run(
                            inp, derive_seed(seed, "bench", base, b, view.client)
                        )
                        m, perm = score_any(truth, rec, codec)
                        m["dyn_residual"] = residual_of(rec.states[perm], rec.actions[perm], rec.next_states[perm])
                        m["dyn_residual_truth"] = truth_residual
                        m.update(within_shares(truth, rec, perm, codec))
                        m["certified"] = rec.extra.get("states_found", float("nan"))
                        rows.append({"scenario": scenario, "batch_size": b, "attack": name, "seed": seed, "client": view.client, **m, "time_s": rec.time_s})
                        part = partial.with_name(f"{partial.stem}.{scenario}.csv")  # columns differ by scenario
                        pd.DataFrame(rows[-1:]).to_csv(part, mode="a", header=not part.exists(), index=False)
                        head = "ego_pos_err_m" if "ego_pos_err_m" in m else "state_rmse"
                        print(f"{scenario} B={b} seed={seed} client={view.client} {name}: {head} {m[head]:.3g}, {rec.time_s:.1f} s", file=sys.stderr)
                residual_of.close()
    return pd.DataFrame(rows)


def within_shares(truth, rec, perm: np.ndarray, codec) -> dict[str, float]:
    """Flat observations (MetaDrive, control tasks): per scored feature group, the share of the
    batch's transitions whose error is within the run's tolerance for its unit (the leakage
    table's: 1 m, 0.5 m/s, 0.1 rad, ...; see :mod:`drivepriv.metrics.leakage`), as
    ``<group>_within``. NaN where no transition has anything to score (a lidar that sees no
    object)."""
    if not codec.flat:
        return {}
    n = len(perm)
    t = np.asarray(truth.states).reshape(n, -1)
    r = np.asarray(rec.states)[perm].reshape(n, -1)
    units = codec.scored_groups()
    out = {}
    for g, err in codec.group_errors(t, r).items():
        err = err[np.isfinite(err)]
        tol = UNIT_TOLERANCE.get(units[g], DEFAULT_TOLERANCE)
        out[f"{g}_within"] = float((err <= tol).mean()) if err.size else float("nan")
    return out


def table(df: pd.DataFrame) -> str:
    """Markdown tables: driving scenarios with the Kinematics observation (metres), then the
    scenarios with flat observations (MetaDrive, control tasks: observation units and the
    dynamics residual)."""
    parts = []
    if "ego_pos_err_m" in df.columns and df["ego_pos_err_m"].notna().any():
        parts.append(_kinematics_table(df[df["ego_pos_err_m"].notna()]))
    if "state_rmse" in df.columns and df["state_rmse"].notna().any():
        parts.append(_vector_table(df[df["state_rmse"].notna()]))
    return "\n\n".join(parts)


def _q(x: pd.Series) -> str:
    return f"{x.median():.3g} [{x.quantile(0.25):.3g}, {x.quantile(0.75):.3g}]"


def _action(g: pd.DataFrame) -> str:
    """Discrete: the share of actions recovered; continuous: the median absolute error."""
    if "action_acc" in g and g["action_acc"].notna().any():
        return f"acc. {g['action_acc'].mean():.2f}"
    return f"abs. err. {g['action_abs_err'].median():.3g}"


#: Unit suffixes of the per-feature columns, and how the table writes them.
UNITS = {"_m": "m", "_mps": "m/s", "_rad": "rad", "_radps": "rad/s"}


def _physical(g: pd.DataFrame) -> str:
    """Medians of the per-feature errors in physical units (MetaDrive: lateral position, heading,
    speed, lidar, ...; empty where the scenario has none)."""
    out = []
    for col in g.columns:
        unit = next((u for suffix, u in sorted(UNITS.items(), key=lambda kv: -len(kv[0])) if col.endswith("_err" + suffix)), None)
        if unit and g[col].notna().any() and not col.startswith(("next_", "navigation_radius", "navigation_direction")):
            out.append(f"{col.split('_err')[0].replace('_', ' ')} {g[col].median():.2g} {unit}")
    return "; ".join(out)


def _within(g: pd.DataFrame) -> str:
    """Mean over batches of the share of transitions within tolerance, per feature group (the
    headline groups first; empty for CSVs written before these columns)."""
    cols = [c for c in g.columns if c.endswith("_within") and g[c].notna().any()]
    return "; ".join(f"{c[: -len('_within')].replace('_', ' ')} {g[c].mean():.2f}" for c in cols)


def _certified(g: pd.DataFrame) -> str:
    """Mean number of transitions the attack certified per batch (rgia-k; blank for the others)."""
    return f"{g['certified'].mean():.1f}" if "certified" in g and g["certified"].notna().any() else ""


def _vector_table(df: pd.DataFrame) -> str:
    lines = [
        "| scenario | B | attack | state RMSE [p25, p75] | physical units (medians) | within tolerance (share) | next state RMSE | dynamics residual (truth) | reward err. | action | certified | time (s) | seeds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    order = {s: i for i, s in enumerate(pd.unique(df["scenario"]))}
    df = df.assign(_order=df["scenario"].map(order)).sort_values(["_order", "batch_size"], kind="stable")
    for (scenario, b, attack), g in df.groupby(["scenario", "batch_size", "attack"], sort=False):
        lines.append(
            f"| {scenario} | {b} | {attack} | {_q(g['state_rmse'])} | {_physical(g)} | {_within(g)} | {g['next_state_rmse'].median():.3g} | "
            f"{g['dyn_residual'].median():.3g} ({g['dyn_residual_truth'].median():.2g}) | {g['reward_abs_err'].median():.3g} | "
            f"{_action(g)} | {_certified(g)} | {g['time_s'].median():.2f} | {','.join(str(s) for s in sorted(g['seed'].unique()))} |"
        )
    return "\n".join(lines)


def _kinematics_table(df: pd.DataFrame) -> str:
    lines = [
        "| scenario | B | attack | ego position (m) [p25, p75] | within 1 m | neighbours (m) | next state (m) | reward err. | action | certified | time (s) | seeds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    order = {s: i for i, s in enumerate(pd.unique(df["scenario"]))}
    df = df.assign(_order=df["scenario"].map(order)).sort_values(["_order", "batch_size"], kind="stable")
    for (scenario, b, attack), g in df.groupby(["scenario", "batch_size", "attack"], sort=False):
        e = g["ego_pos_err_m"]
        lines.append(
            f"| {scenario} | {b} | {attack} | {e.median():.3g} [{e.quantile(0.25):.3g}, {e.quantile(0.75):.3g}] | "
            f"{g['ego_within_1m'].mean():.2f} | {g['neighbour_pos_err_m'].median():.3g} | {g['next_state_err_m'].median():.3g} | "
            f"{g['reward_abs_err'].median():.3g} | {_action(g)} | {_certified(g)} | {g['time_s'].median():.2f} | "
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
        for old in out.glob("attacks.partial.*.csv"):
            old.unlink()
        df = run(args, partial)
        for done in out.glob("attacks.partial.*.csv"):
            done.unlink()
    df.to_csv(out / "attacks.csv", index=False)
    md = table(df)
    (out / "attacks.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
