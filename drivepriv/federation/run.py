"""Which engine trains the federation: one entry point for the pipeline, the benchmarks and the
tests, so that neither engine imports the other."""

from __future__ import annotations

import dataclasses

from tqdm.auto import tqdm

from drivepriv.config import RunConfig
from drivepriv.federation.inprocess import ClientGroup, Server, resolve_attacked, sampled_clients, setup
from drivepriv.federation.recorder import TruthRecorder
from drivepriv.federation.types import FederationResult
from drivepriv.federation.workers import ClientWorkers
from drivepriv.parallel import resolve_workers


def run_federation(cfg: RunConfig, attacked: set[tuple[int, int]], progress: bool = True) -> FederationResult:
    """Train the federation; record server views and ground truth for ``attacked`` (round, client) pairs.

    Defenses (``federation.defenses``) act where a real deployment applies them: DP-SGD on
    each local step's per-sample gradients, update defenses on the payload before it leaves
    the client, secure aggregation on what the server is shown (then one view per attacked
    round, client -1, holding the mean of all clients' updates over their N x B transitions).

    ``federation.engine``: ``inprocess`` runs the clients on this machine, spread over
    ``workers`` forked processes (:mod:`drivepriv.federation.workers`; one: in this process, one
    after another);
    ``flower`` runs the same clients and server on Flower's simulation engine
    (:mod:`drivepriv.federation.flower`)."""
    if cfg.federation.engine == "flower":
        from drivepriv.federation.flower import run_flower  # Flower is an optional extra

        return run_flower(cfg, attacked, progress=progress)
    return _run_inprocess(cfg, attacked, progress=progress)


def _run_inprocess(cfg: RunConfig, attacked: set[tuple[int, int]], progress: bool = True) -> FederationResult:
    """The in-process engine: the clients on this machine, spread over ``workers`` forked
    processes (:mod:`drivepriv.federation.workers`; one: in this process, one after another)."""
    obs_shape, algorithm = setup(cfg)
    server = Server(cfg, algorithm, attacked)
    recorder = TruthRecorder(aggregate=server.stack.secagg)  # the engine's, out of the server's reach
    n = cfg.federation.clients
    workers = resolve_workers(cfg.workers, n)
    if workers > 1:  # the clients spread over worker processes: the same numbers, sooner
        clients: ClientGroup | ClientWorkers = ClientWorkers(cfg, obs_shape, algorithm, workers)
    else:
        clients = ClientGroup(cfg, obs_shape, algorithm, list(range(n)))
    try:
        for rnd in tqdm(range(cfg.federation.rounds), desc="train", unit="round", disable=not progress, leave=False):
            params, target_params = server.broadcast()
            results = clients.train_round(rnd, params, target_params, {c: server.records(rnd, c) for c in sampled_clients(cfg, rnd)})
            server.receive(rnd, params, target_params, recorder.record(rnd, results))
    finally:
        clients.close()
    return dataclasses.replace(server.result(), truths=recorder.truths)


__all__ = ["resolve_attacked", "run_federation"]
