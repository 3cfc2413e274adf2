"""Command line: parse arguments, load the configuration, call the pipeline. Thin on purpose."""

from __future__ import annotations

import argparse
import logging
import shlex
import os
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

from drivepriv import __version__
from drivepriv.config import RunConfig, apply_overrides, load_yaml, parse_override
from drivepriv.errors import ConfigError, DriveprivError
from drivepriv.scenarios import load_scenario, scenario_catalogue

if TYPE_CHECKING:
    import pandas as pd

#: --quick: a tiny run for tests and first tries (applied before --set and the explicit options).
QUICK = {
    "federation.clients": 2,
    "federation.rounds": 2,
    "federation.warmup_steps": 12,
    "federation.env_steps_per_round": 4,
    "federation.batch_size": 4,
    "attack.rounds": [-1],
    "attack.iterations": 30,
    "attack.restarts": 2,
    "attack.dynamics.rollout_steps": 40,
    "attack.dynamics.epochs": 5,
    "report.videos": 1,
    "federation.eval_episodes": 2,
}


def build_config(args: argparse.Namespace) -> RunConfig:
    cfg = load_scenario(args.scenario)
    overrides: list[tuple[list[str], Any]] = []
    if args.quick:
        overrides += [(k.split("."), v) for k, v in QUICK.items()]
    cfg = apply_overrides(cfg, overrides, source="--quick") if overrides else cfg
    explicit: list[tuple[list[str], Any]] = [parse_override(s) for s in args.set or []]
    for flag, key in (("seed", "seed"), ("out", "out"), ("clients", "federation.clients"), ("rounds", "federation.rounds"),
                      ("batch_size", "federation.batch_size"), ("engine", "federation.engine"), ("workers", "workers")):
        value = getattr(args, flag, None)
        if value is not None:
            explicit.append((key.split("."), value))
    if args.defense:
        from drivepriv.federation.defenses import parse_defense

        explicit.append((["federation", "defenses"], [parse_defense(d) for d in args.defense]))
    if getattr(args, "attacks", None) is not None:
        explicit.append((["attack", "attacks"], [a.strip() for a in args.attacks.split(",") if a.strip()]))
    if args.clients is not None and not any(k == ["attack", "clients"] for k, _ in explicit):
        explicit.append((["attack", "clients"], [c for c in cfg.attack.clients if c < args.clients]))
    return apply_overrides(cfg, explicit, source="options") if explicit else cfg


def _command(args: argparse.Namespace) -> str:
    return "drivepriv " + " ".join(shlex.quote(a) for a in args.argv)


def _grid(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--grid {text}: expected comma-separated numbers, e.g. --grid 0,0.5,1,2") from None


def cmd_eval(args: argparse.Namespace) -> int:
    from drivepriv.pipeline import run_eval

    cfg = build_config(args)
    t0 = time.perf_counter()
    command = _command(args)
    if args.sweep:
        from drivepriv.sweep import run_sweep

        sweep = run_sweep(cfg, args.sweep, _grid(args.grid), command=command, progress=not args.no_progress, seeds=args.seeds)
        import pandas as pd

        table = pd.read_csv(sweep.table_path)
        cols = ["strength", "seeds", "epsilon", "attack", "error_median", "within_share", "mean_return", "collision_rate"]
        with pd.option_context("display.width", 160, "display.max_columns", 20, "display.precision", 3):
            print(table[cols].to_string(index=False))
        print(f"\n{len(sweep.runs)} runs; {time.perf_counter() - t0:.0f} s")
        print(f"report: {sweep.sweep_dir / 'report.html'}")
        return 0
    if args.grid is not None or args.seeds is not None:
        raise ConfigError("--grid and --seeds need --sweep NAME (--seed sets the seed of a single run)")
    result = run_eval(cfg, command=command, progress=not args.no_progress)
    import pandas as pd

    with pd.option_context("display.width", 160, "display.max_columns", 20, "display.precision", 3):
        print(_tidy_summary(result.metrics).to_string())
    print(f"\nmedians over {result.metrics[['client', 'round']].drop_duplicates().shape[0]} attacked batches, seed {cfg.seed}; "
          f"{time.perf_counter() - t0:.0f} s")
    print(f"{result.verdict.get('headline', '')}")
    print(f"report: {result.run_dir / 'report.html'}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from drivepriv.pipeline import run_train

    cfg = build_config(args)
    t0 = time.perf_counter()
    run_dir, utility = run_train(cfg, command=_command(args), progress=not args.no_progress)
    if utility:
        print(f"final policy over {utility['episodes']:.0f} held-out episodes: return {utility['mean_return']:.2f} "
              f"± {utility['std_return']:.2f}, collision rate {utility['collision_rate']:.0%}")
    print(f"trained {cfg.federation.clients} clients x {cfg.federation.rounds} rounds on the {cfg.federation.engine} engine, "
          f"seed {cfg.seed}; {time.perf_counter() - t0:.0f} s")
    print(f"model: {run_dir / 'model.pt'}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from drivepriv.capture import audit_capture, load_model_factory

    model = load_model_factory(args.model)
    settings = {".".join(k): v for k, v in (parse_override(x) for x in args.set or [])}
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()] if args.attacks else None
    result = audit_capture(args.capture, model, scenario=args.scenario, truth_dir=args.truth, out=args.out, attacks=attacks,
                           settings=settings, command=_command(args), progress=not args.no_progress)
    print(result.verdict.get("headline", ""))
    print(f"report: {result.run_dir / 'report.html'}")
    return 0


def _tidy_summary(metrics: pd.DataFrame) -> pd.DataFrame:
    """Median of the headline metrics per attack, for the terminal."""
    cols = ["ego_pos_err_m", "ego_speed_err_mps", "neighbour_pos_err_m", "action_acc", "reward_abs_err", "next_state_err_m", "dyn_residual_m", "dyn_residual_truth_m"]
    if "state_rmse" in metrics.columns:  # flat observations (MetaDrive, control tasks)
        skip = {"attack", "client", "round", "seed", "batch_size", "local_steps", "grad_distance"}
        cols = [c for c in metrics.columns if c not in skip][:9]
    cols = [("action_abs_err" if c == "action_acc" and "action_acc" not in metrics.columns else c) for c in cols]
    out = metrics.groupby("attack", sort=False)[cols].median()
    out.insert(0, "n", metrics.groupby("attack", sort=False).size())
    return out


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    runs = [Path(r) for r in args.runs]
    if len(runs) == 1 and args.out is None:
        from drivepriv.metrics.run_scores import score_run_dir
        from drivepriv.report.build import build_report

        built = build_report(runs[0], score_run_dir(runs[0]), progress=not args.no_progress)
        print(built.verdict.get("headline", ""))
        print(f"report: {built.path}")
        return 0
    from datetime import datetime, timezone

    from drivepriv.report.compare import write_comparison

    out = Path(args.out) if args.out else Path("reports") / f"compare-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"
    path = write_comparison(runs, out, title=f"drivepriv · {len(runs)} runs compared", command=_command(args))
    print(f"report: {path}")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from pathlib import Path

    from drivepriv.report.replay import replay_run

    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()] if args.attacks else None
    done = replay_run(Path(args.run), batch=args.batch, attacks=attacks, out_dir=Path(args.out) if args.out else None)
    for item in done:
        print(f"{item['label']}: {item['mp4']}  {item['gif']}")
    return 0


def cmd_scenarios(args: argparse.Namespace) -> int:
    for name, path in scenario_catalogue().items():
        data = load_yaml(path)
        print(f"{name:<24} {data.get('description', '')}")
    return 0


def cmd_attacks(args: argparse.Namespace) -> int:
    from drivepriv.attacks import ATTACKS

    for name in ATTACKS:
        print(f"{name:<10} {ATTACKS.get(name).summary}")
    return 0


def cmd_defenses(args: argparse.Namespace) -> int:
    import dataclasses

    from drivepriv.federation.defenses import DEFENSES

    for name in DEFENSES:
        cls = DEFENSES.get(name)
        params = ", ".join(f"{f.name}={f.default:g}" for f in dataclasses.fields(cls))
        sweep = f"  sweep: {cls.strength} over {', '.join(f'{g:g}' for g in cls.grid)}" if cls.grid else ""
        print(f"{name:<12} {cls.summary}" + (f" [{params}]" if params else "") + sweep)
    return 0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's exit code for usage errors is 2 already
        self.print_usage(sys.stderr)
        raise ConfigError(message)


def _run_options(e: argparse.ArgumentParser) -> None:
    """The options eval and train share: which federation, how big, which defenses, which engine."""
    e.add_argument("--scenario", required=True, help="scenario name (see `drivepriv scenarios`) or path to a YAML file")
    e.add_argument("--seed", type=int, help="root seed (default: the scenario's, 0)")
    e.add_argument("--out", help="output root (default reports/); the run goes to OUT/<scenario>/<run-id>/")
    e.add_argument("--clients", type=int, help="number of clients")
    e.add_argument("--rounds", type=int, help="number of federated rounds")
    e.add_argument("--batch-size", type=int, help="minibatch size each client shares a gradient of")
    e.add_argument("--engine", choices=["inprocess", "flower"],
                   help="where the federation runs: inprocess (default) or flower (Flower's simulation engine on Ray; "
                        'needs pip install -e ".[flower]"); same seed, same numbers')
    e.add_argument("--workers", type=int, metavar="N",
                   help="processes the clients, the attacks and the report's figures fan out over (default 0: one per core; 1: one after another); same numbers")
    e.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any configuration key, e.g. --set attack.iterations=800")
    e.add_argument("--defense", action="append", metavar="NAME[:KEY=VALUE,...]",
                   help="apply a defense before the server sees updates (repeatable, applied in order; see `drivepriv defenses`), "
                        "e.g. --defense dpsgd:noise=1.0,clip=1.0 --defense topk:fraction=0.1")
    e.add_argument("--quick", action="store_true", help="a tiny run for tests and first tries")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")


def make_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="drivepriv", description="Privacy evaluation of federated RL for autonomous driving.")
    p.add_argument("--version", action="version", version=f"drivepriv {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    e = sub.add_parser("eval", help="train a federation, attack what the server sees, score and report")
    _run_options(e)
    e.add_argument("--attacks", help="comma-separated attacks (see `drivepriv attacks`), e.g. rgia,dlg")
    e.add_argument("--sweep", metavar="DEFENSE", help="privacy-utility sweep: one run per strength of DEFENSE (e.g. dpsgd), with a table and a plot")
    e.add_argument("--grid", metavar="V1,V2,...", help="the strengths --sweep runs (default: the defense's own grid, see `drivepriv defenses`)")
    e.add_argument("--seeds", type=int, nargs="+", metavar="N", help="--sweep: run every point with each of these seeds (default: --seed)")
    e.set_defaults(func=cmd_eval)
    t = sub.add_parser("train", help="train a federation only: the final global model, training log and utility")
    _run_options(t)
    t.set_defaults(func=cmd_train)
    au = sub.add_parser("audit", help="attack the updates a CuriousStrategy captured in a Flower deployment, score and report")
    au.add_argument("capture", metavar="CAPTURE_DIR", help="the folder strategy.save() wrote (capture.pt)")
    au.add_argument("--scenario", required=True, help="the scenario the clients drove (its observation layout and priors)")
    au.add_argument("--model", required=True, metavar="MODULE:FACTORY", help="the deployment's network: a callable returning the nn.Module, e.g. my_app.task:Net")
    au.add_argument("--truth", metavar="DIR", help="the clients' true minibatches (save_truth files): needed to score the reconstruction")
    au.add_argument("--attacks", help="comma-separated attacks (default: the scenario's)")
    au.add_argument("--out", help="output root (default reports/)")
    au.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a configuration key, e.g. --set attack.iterations=800")
    au.add_argument("--no-progress", action="store_true", help="no progress bars")
    au.set_defaults(func=cmd_audit)
    s = sub.add_parser("scenarios", help="list the scenario catalogue")
    s.set_defaults(func=cmd_scenarios)
    a = sub.add_parser("attacks", help="list the attack catalogue")
    a.set_defaults(func=cmd_attacks)
    r = sub.add_parser("report", help="rebuild a run's report from its saved results, or compare several runs on one page")
    r.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folder(s), e.g. reports/merge/merge-seed0-<time>")
    r.add_argument("--out", help="folder of the comparison page (default reports/compare-<time>)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.set_defaults(func=cmd_report)
    rp = sub.add_parser("replay", help="render a run's reconstructions in the simulator's own renderer beside the truth (MP4 + GIF)")
    rp.add_argument("run", metavar="RUN_DIR", help="a run folder")
    rp.add_argument("--batch", type=int, help="the attacked batch to render (0-based; default: all)")
    rp.add_argument("--attacks", help="comma-separated attacks to show (default: all in the run)")
    rp.add_argument("--out", help="output folder (default RUN_DIR/replay)")
    rp.set_defaults(func=cmd_replay)
    d = sub.add_parser("defenses", help="list the defenses (--defense NAME:KEY=VALUE,...; --sweep NAME)")
    d.set_defaults(func=cmd_defenses)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from drivepriv.seeding import reproducible_torch

    reproducible_torch()
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        args = make_parser().parse_args(argv)
        args.argv = argv
        return args.func(args)
    except DriveprivError as e:
        print(f"drivepriv: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("drivepriv: interrupted; the unfinished run folder is left as <run-id>.incomplete", file=sys.stderr)
        # Exit now with 130: left to the interpreter's shutdown, a library's signal handling
        # turned this into death by SIGINT (exit -2) in 3 of 6 tries. Every file is closed.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)


if __name__ == "__main__":
    raise SystemExit(main())
