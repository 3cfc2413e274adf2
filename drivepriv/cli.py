"""Command line: parse arguments, load the configuration, call the pipeline. Thin on purpose."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from typing import Any

from drivepriv import __version__
from drivepriv.config import RunConfig, apply_overrides, load_yaml, parse_override
from drivepriv.errors import ConfigError, DriveprivError
from drivepriv.scenarios import load_scenario, scenario_catalogue

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
}


def build_config(args: argparse.Namespace) -> RunConfig:
    cfg = load_scenario(args.scenario)
    overrides: list[tuple[list[str], Any]] = []
    if args.quick:
        overrides += [(k.split("."), v) for k, v in QUICK.items()]
    cfg = apply_overrides(cfg, overrides, source="--quick") if overrides else cfg
    explicit: list[tuple[list[str], Any]] = [parse_override(s) for s in args.set or []]
    for flag, key in (("seed", "seed"), ("out", "out"), ("clients", "federation.clients"), ("rounds", "federation.rounds"), ("batch_size", "federation.batch_size")):
        value = getattr(args, flag)
        if value is not None:
            explicit.append((key.split("."), value))
    if args.attacks is not None:
        explicit.append((["attack", "attacks"], [a.strip() for a in args.attacks.split(",") if a.strip()]))
    if args.clients is not None and not any(k == ["attack", "clients"] for k, _ in explicit):
        explicit.append((["attack", "clients"], [c for c in cfg.attack.clients if c < args.clients]))
    return apply_overrides(cfg, explicit, source="options") if explicit else cfg


def cmd_eval(args: argparse.Namespace) -> int:
    from drivepriv.pipeline import run_eval, tidy_summary

    cfg = build_config(args)
    t0 = time.perf_counter()
    command = "drivepriv " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    result = run_eval(cfg, command=command, progress=not args.no_progress)
    import pandas as pd

    with pd.option_context("display.width", 160, "display.max_columns", 20, "display.precision", 3):
        print(tidy_summary(result.metrics).to_string())
    print(f"\nmedians over {result.metrics[['client', 'round']].drop_duplicates().shape[0]} attacked batches, seed {cfg.seed}; "
          f"{time.perf_counter() - t0:.0f} s")
    print(f"report: {result.run_dir / 'report.html'}")
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


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's exit code for usage errors is 2 already
        self.print_usage(sys.stderr)
        raise ConfigError(message)


def make_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="drivepriv", description="Privacy evaluation of federated RL for autonomous driving.")
    p.add_argument("--version", action="version", version=f"drivepriv {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    e = sub.add_parser("eval", help="train a federation, attack what the server sees, score and report")
    e.add_argument("--scenario", required=True, help="scenario name (see `drivepriv scenarios`) or path to a YAML file")
    e.add_argument("--seed", type=int, help="root seed (default: the scenario's, 0)")
    e.add_argument("--out", help="output root (default reports/); the run goes to OUT/<scenario>/<run-id>/")
    e.add_argument("--clients", type=int, help="number of clients")
    e.add_argument("--rounds", type=int, help="number of federated rounds")
    e.add_argument("--batch-size", type=int, help="minibatch size each client shares a gradient of")
    e.add_argument("--attacks", help="comma-separated attacks (see `drivepriv attacks`), e.g. rgia,dlg")
    e.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any configuration key, e.g. --set attack.iterations=800")
    e.add_argument("--quick", action="store_true", help="a tiny run for tests and first tries")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    e.set_defaults(func=cmd_eval)
    s = sub.add_parser("scenarios", help="list the scenario catalogue")
    s.set_defaults(func=cmd_scenarios)
    a = sub.add_parser("attacks", help="list the attack catalogue")
    a.set_defaults(func=cmd_attacks)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import torch

    # One intra-op thread: two runs with the same seed then give the same numbers (with two,
    # reductions split differently and rgia-k's choice among float-identical candidates moved
    # its error by 1e-5 m between runs); the attacks' many small operations lose nothing.
    torch.set_num_threads(1)
    try:
        args = make_parser().parse_args(argv)
        return args.func(args)
    except DriveprivError as e:
        print(f"drivepriv: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("drivepriv: interrupted; the unfinished run folder is left as <run-id>.incomplete", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
