"""The Flower engine: drivepriv's clients and server on Flower's simulation engine (Ray).

The same :class:`~drivepriv.federation.inprocess.Client` (environment, replay buffer, local
algorithm, client-side defenses) runs inside a Flower ``ClientApp``; the same
:class:`~drivepriv.federation.inprocess.Server` (aggregation in client order, optimiser, target
network, privacy accounting) runs behind a Flower strategy in the ``ServerApp``; and what the
server sees is recorded by :class:`~drivepriv.federation.curious.CuriousStrategy`, the wrapper
that audits any Flower deployment. Messages (message API, Flower 1.42):

- server -> client: ``arrays`` (global parameters), ``target`` (the parameters the client
  bootstraps from), ``config`` (``server-round``, ``record-truth``: the clients whose minibatch
  the metrics will need); sent to the round's sampled clients only (with
  ``federation.fraction`` < 1 a query first asks each node which client it holds);
- client -> server: ``arrays`` (its payload: the gradient under FedSGD, the parameter delta
  under FedAvg, after its defenses), ``metrics`` (``client``, ``num-examples``, its
  training.csv row, DP-SGD sample rates) and ``where`` (the Ray node it ran on).

A Ray worker lost mid-round is restarted by Ray and the round sent again
(``federation.flower_retries``, :class:`_RetryingGrid`); the attacks after training run as Ray
tasks on the same cluster when ``federation.ray_address`` is set
(:func:`drivepriv.parallel.ray_fan_out`).

A client's ground truth never travels to the server: the client writes it to the engine's
truth folder (:func:`~drivepriv.federation.flower_support.save_truth`; on a multi-node cluster
``federation.flower_truth_dir``, a folder every node shares), from which the engine keeps it
for the metrics; the attacks never see it. Flower builds a ClientApp per message, in whichever Ray worker is free, so a client
keeps its state in its ``context.state`` (replay buffer, counters, generator, and the simulator:
pickled where it pickles, highway-env and the control tasks; MetaDrive's is restored by
replaying the current episode's actions from its seed) and, as a shortcut, in a bounded cache
of the worker process that is valid only while it holds the latest round.

Same seed, same numbers as the in-process engine (tests/federation/test_flower.py): replies are put back
in client order before aggregating, and every random stream is derived from stable ids.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from drivepriv.config import RunConfig
from drivepriv.errors import ConfigError, DriveprivError
from drivepriv.federation.defenses import DefenseStack
from drivepriv.federation.flower_support import LOST_WORKER, load_truth, quiet_flower, require_flower, write_truth
from drivepriv.federation.inprocess import Client, Server, sampled_clients, setup
from drivepriv.federation.strategies import STRATEGIES
from drivepriv.federation.recorder import TruthRecorder
from drivepriv.federation.types import ClientResult, ClientUpdate, FederationResult
from drivepriv.seeding import reproducible_torch

require_flower()

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import Strategy  # noqa: E402

from drivepriv.federation.curious import CuriousStrategy, tensors  # noqa: E402

log = logging.getLogger(__name__)

_STATE_ARRAYS = "drivepriv.client.arrays"
_STATE_META = "drivepriv.client.meta"


# ---------------------------------------------------------------------------- client side
@dataclass
class _Cached:
    round: int
    client: Client
    model: torch.nn.Module


#: Per worker process: (run id, client id) -> the client as it was after its last round, the
#: most recently used last. Bounded: a worker that served thousands of clients keeps only the
#: latest (about 1.5 MB each on merge); the others are rebuilt from their context.state.
_CLIENTS: dict[tuple[str, int], _Cached] = {}
CACHE_CLIENTS = 128
_SETUPS: dict[str, tuple[RunConfig, tuple[int, ...], object, DefenseStack]] = {}


def _setup(run_id: str, cfg: RunConfig):
    if run_id not in _SETUPS:
        reproducible_torch()  # as in-process
        _SETUPS[run_id] = (cfg, *setup(cfg), DefenseStack.from_specs(cfg.federation.defenses))
    return _SETUPS[run_id]


def _client(run_id: str, cid: int, rnd: int, context: Context, cfg: RunConfig, obs_shape, algorithm) -> _Cached:
    """The client as it was after round rnd - 1: from this worker's cache if current, else
    rebuilt from its context.state (or new, in round 0)."""
    state = context.state
    done = int(state.config_records[_STATE_META]["round"]) if _STATE_META in state.config_records else -1
    if done >= rnd:
        raise RuntimeError(f"client {cid}: asked for round {rnd} but its state is after round {done}")
    if cfg.federation.fraction >= 1.0:
        for key in [k for k, e in _CLIENTS.items() if k[0] == run_id and e.round < rnd - 1]:
            _CLIENTS.pop(key).client.close()  # every client trains every round: these are stale for good
    cached = _CLIENTS.pop((run_id, cid), None)
    if cached is not None and cached.round == done:
        _CLIENTS[(run_id, cid)] = cached  # most recently used
        return cached
    if cached is not None:
        cached.client.close()
    while len(_CLIENTS) >= CACHE_CLIENTS:
        _CLIENTS.pop(next(iter(_CLIENTS))).client.close()
    model = algorithm.build_model()
    if done < 0:
        client = Client(cid, cfg, obs_shape, algorithm)
    else:
        arrays = {k: v.numpy() for k, v in state.array_records[_STATE_ARRAYS].items()}
        meta = json.loads(state.config_records[_STATE_META]["meta"])
        client = Client.restore(cid, cfg, obs_shape, algorithm, arrays, meta)
    cached = _CLIENTS[(run_id, cid)] = _Cached(done, client, model)
    return cached


def _train(msg: Message, context: Context, run_id: str, run_cfg: RunConfig, truth_dir: str) -> Message:
    cfg, obs_shape, algorithm, stack = _setup(run_id, run_cfg)
    cid = int(context.node_config["partition-id"])
    config = msg.content.config_records["config"]
    rnd = int(config["server-round"]) - 1
    entry = _client(run_id, cid, rnd, context, cfg, obs_shape, algorithm)
    params = tensors(msg.content.array_records["arrays"])
    target = tensors(msg.content.array_records["target"])
    with torch.no_grad():
        for name, p in entry.model.named_parameters():
            p.copy_(params[name])
    record = cid in list(config["record-truth"])
    result = entry.client.train_round(rnd, entry.model, params, target, stack, record)
    update = result.update
    if result.truth is not None:  # to the engine's truth folder, never in the message to the server
        write_truth(truth_dir, result.truth)
    entry.round = rnd
    arrays, meta = entry.client.snapshot()
    context.state[_STATE_ARRAYS] = _array_record(arrays)
    context.state[_STATE_META] = ConfigRecord({"round": rnd, "meta": json.dumps(meta)})
    metrics = {"client": cid, "num-examples": cfg.federation.batch_size * cfg.federation.local_steps}
    metrics.update({k: float(v) for k, v in update.row.items() if k not in ("round", "client")})
    if update.dp_rates:
        metrics["dp-rates"] = [float(q) for q in update.dp_rates]
    names = list(params)
    content = RecordDict(
        {
            "arrays": ArrayRecord(torch_state_dict=dict(zip(names, update.payload))),
            "metrics": MetricRecord(metrics),
            "where": ConfigRecord({"ray-node": _ray_node()}),
        }
    )
    return Message(content=content, reply_to=msg)


def _ray_node() -> str:
    """The Ray node this ClientApp runs on (run.json's ``cluster``: the nodes that trained)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def _array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    from flwr.app import Array

    rec = ArrayRecord()
    for k, v in arrays.items():
        rec[k] = Array(np.ascontiguousarray(v))
    return rec


def client_app(run_id: str, cfg: RunConfig, truth_dir: str) -> ClientApp:
    """drivepriv's client as a Flower ClientApp (one per simulated node, partition id = client id)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return _train(msg, context, run_id, cfg, truth_dir)

    @app.query()
    def query(msg: Message, context: Context) -> Message:  # which client this node holds
        return Message(content=RecordDict({"metrics": MetricRecord({"client": int(context.node_config["partition-id"])})}), reply_to=msg)

    return app


# ---------------------------------------------------------------------------- server side
class TruthMissing(ConfigError):
    """A client wrote its minibatch where the driver cannot read it (another node's disk)."""


class ClientFailed(DriveprivError):
    """A client's round failed on Flower: its ClientApp raised, or its Ray worker was lost more
    often than ``federation.flower_retries`` allows."""


class DrivePrivStrategy(Strategy):
    """drivepriv's server (:class:`~drivepriv.federation.inprocess.Server`) as a Flower strategy:
    the round's sampled clients train (every client unless ``federation.fraction`` < 1); the
    replies are aggregated in client order."""

    def __init__(self, server: Server, truth_dir: str, bar=None) -> None:
        self.server = server
        self.truth_dir = truth_dir
        self.recorder = TruthRecorder(aggregate=server.stack.secagg)
        self.bar = bar
        self._sent: dict[int, tuple[dict, dict]] = {}
        #: The Ray nodes whose workers trained a client (run.json's ``cluster``).
        self.nodes: set[str] = set()
        #: client id -> Flower node id, asked once when clients are sampled.
        self._node_of: dict[int, int] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        rnd = server_round - 1
        n = self.server.cfg.federation.clients
        nodes = _wait_for_nodes(grid, n)
        params, target = self.server.broadcast()
        self._sent[rnd] = (params, target)
        sampled = sampled_clients(self.server.cfg, rnd)
        record = [c for c in sampled if self.server.records(rnd, c)]
        if len(sampled) < n:  # only the sampled clients' nodes get the round's message
            if not self._node_of:
                self._node_of = _clients_of(grid, nodes)
            nodes = [self._node_of[c] for c in sampled]
        content = RecordDict(
            {
                "arrays": ArrayRecord(torch_state_dict=params),
                "target": ArrayRecord(torch_state_dict=target),
                "config": ConfigRecord({"server-round": server_round, "record-truth": record or [-1]}),
            }
        )
        return [Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node) for node in nodes]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rnd = server_round - 1
        params, target = self._sent.pop(rnd)
        names = list(params)
        results = []
        for msg in replies:
            if msg.has_error():
                raise _client_failed(rnd, msg, self.server.cfg.federation.flower_retries)
            m = msg.content.metric_records["metrics"]
            cid = int(m["client"])
            if "where" in msg.content.config_records:
                self.nodes.add(str(msg.content.config_records["where"]["ray-node"]))
            arrays = tensors(msg.content.array_records["arrays"])
            row = {"round": rnd, "client": cid, "env_steps": int(m["env_steps"]), "episodes": int(m["episodes"]),
                   "mean_return_last5": float(m["mean_return_last5"]), "crash_rate_last5": float(m["crash_rate_last5"])}
            truth = None
            if self.server.records(rnd, cid):
                truth = load_truth(self.truth_dir, rnd, cid)
                if truth is None:
                    raise TruthMissing(
                        f"round {rnd}: client {cid}'s ground truth is not in {self.truth_dir}; on a multi-node Ray "
                        f"cluster set federation.flower_truth_dir to a folder every node shares"
                    )
            results.append(ClientResult(ClientUpdate(cid, tuple(arrays[k] for k in names), row, list(m.get("dp-rates", []))), truth))
        updates = self.recorder.record(rnd, results)  # the truths stay with the engine
        want = sampled_clients(self.server.cfg, rnd)
        if sorted(u.client for u in updates) != want:
            raise ClientFailed(f"round {rnd}: clients {sorted(u.client for u in updates)} replied, of the {len(want)} sampled {want}")
        self.server.receive(rnd, params, target, updates, record=False)
        if self.bar is not None:
            self.bar.update(1)
        new, _ = self.server.broadcast()
        return ArrayRecord(torch_state_dict=new), MetricRecord({"clients": len(updates)})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return []  # utility is measured once, on the final model (pipeline)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        log.info("drivepriv server: %d clients, %s", self.server.cfg.federation.clients, self.server.cfg.federation.strategy)


def _lost_worker(reply: Message) -> bool:
    return reply.has_error() and any(k in reply.error.reason for k in LOST_WORKER)


class _RetryingGrid:
    """A Grid that sends a message again, up to ``retries`` times, when the reply says the Ray
    worker running it was lost. Flower keeps a node's context only from a reply, so the rerun
    starts from the client's state before the round: the same numbers as without the loss."""

    def __init__(self, grid: Grid, retries: int) -> None:
        self._grid = grid
        self.retries = retries

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        sent = {m.metadata.dst_node_id: m for m in messages}
        replies = list(self._grid.send_and_receive(list(sent.values()), timeout=timeout))
        for attempt in range(1, self.retries + 1):
            lost = [r.metadata.src_node_id for r in replies if _lost_worker(r)]
            if not lost:
                break
            log.warning("%d client(s) lost their Ray worker mid-round (restarted by Ray); sending them the round again (retry %d of %d)", len(lost), attempt, self.retries)
            again = [Message(content=sent[n].content, message_type=sent[n].metadata.message_type, dst_node_id=n) for n in lost]
            replies = [r for r in replies if not _lost_worker(r)] + list(self._grid.send_and_receive(again, timeout=timeout))
        return replies


def _client_failed(rnd: int, msg: Message, retries: int) -> ClientFailed:
    reason = msg.error.reason
    node = msg.metadata.src_node_id
    if _lost_worker(msg):
        return ClientFailed(
            f"round {rnd}: the Ray worker training Flower node {node}'s client was lost (killed, out of memory, or its "
            f"node left the cluster) and federation.flower_retries={retries} restarts did not bring it back: {reason}. "
            "The run stopped before its report; raise federation.flower_retries, give the workers more memory, "
            "or run with --engine inprocess"
        )
    return ClientFailed(f"round {rnd}: Flower node {node}'s client failed: {reason}")


def _clients_of(grid: Grid, nodes: list[int]) -> dict[int, int]:
    """Ask every node which client (partition) it holds: client id -> node id."""
    ask = [Message(content=RecordDict({"config": ConfigRecord({})}), message_type=MessageType.QUERY, dst_node_id=node) for node in nodes]
    out = {}
    for reply in grid.send_and_receive(ask):
        if reply.has_error():
            raise ClientFailed(f"Flower node {reply.metadata.src_node_id} did not say which client it holds: {reply.error.reason}")
        out[int(reply.content.metric_records["metrics"]["client"])] = reply.metadata.src_node_id
    if sorted(out) != list(range(len(nodes))):
        raise ClientFailed(f"the Flower nodes hold clients {sorted(out)}, expected 0..{len(nodes) - 1}")
    return out


def _wait_for_nodes(grid: Grid, n: int, timeout_s: float = 120.0) -> list[int]:
    start = time.monotonic()
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= n:
            return nodes
        if time.monotonic() - start > timeout_s:
            raise DriveprivError(f"only {len(nodes)} of {n} Flower nodes connected after {timeout_s:.0f} s")
        time.sleep(0.2)


def run_flower(cfg: RunConfig, attacked: set[tuple[int, int]], progress: bool = True) -> FederationResult:
    """Train the federation on Flower's simulation engine; the same result as
    :func:`~drivepriv.federation.run.run_federation` with ``engine: inprocess``."""
    from flwr.simulation import run_simulation

    fed = cfg.federation
    obs_shape, algorithm = setup(cfg)
    server = Server(cfg, algorithm, attacked)
    run_id = uuid.uuid4().hex
    init_args: dict[str, object] = {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": False}
    if fed.ray_address:
        init_args["address"] = fed.ray_address
    else:
        init_args["num_cpus"] = os.cpu_count() or 1
    # Ray restarts a lost worker (Flower passes these on as the actor's options) and _RetryingGrid
    # sends the lost round's message again (max_task_retries would rerun it too, but also reruns
    # the actors' own exit at the end, with a warning each).
    resources = {"num_cpus": fed.flower_client_cpus, "num_gpus": 0.0, "max_restarts": fed.flower_retries}
    backend = {"client_resources": resources, "init_args": init_args}
    if fed.flower_truth_dir:
        Path(fed.flower_truth_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="drivepriv-truth-", dir=fed.flower_truth_dir or None) as truth_dir:
        bar = tqdm(total=fed.rounds, desc="train (flower)", unit="round", disable=not progress, leave=False)
        # the server's view is recorded by the same wrapper that audits any Flower deployment
        strategy = DrivePrivStrategy(server, truth_dir, bar)
        curious = CuriousStrategy(
            strategy,
            loss=server.loss_spec,
            payload=STRATEGIES.get(fed.strategy).payload_kind,
            lr=fed.lr,
            local_steps=fed.local_steps,
            batch_size=fed.batch_size,
            rounds=sorted({r for r, _ in attacked}),
            clients=sorted({c for _, c in attacked}),
            aggregate_only=server.stack.secagg,
        )
        app = ServerApp()
        failure: list[BaseException] = []

        @app.main()
        def main(grid: Grid, context: Context) -> None:
            try:
                params, _ = server.broadcast()
                curious.start(_RetryingGrid(grid, fed.flower_retries), ArrayRecord(torch_state_dict=params), num_rounds=fed.rounds)
            except BaseException as e:  # noqa: BLE001 - handed back to the caller below
                failure.append(e)
                raise

        quiet = quiet_flower()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                run_simulation(server_app=app, client_app=client_app(run_id, cfg, truth_dir), num_supernodes=fed.clients, backend_config=backend)
        finally:
            quiet()
            bar.close()
            _shutdown_ray()
        if failure:
            raise failure[0]
        done = len({row["round"] for row in server.rows})
        if done != fed.rounds:
            raise DriveprivError(f"the Flower simulation stopped after {done} of {fed.rounds} rounds (see Flower's log above)")
    result = dataclasses.replace(server.result(views=curious.views), truths=strategy.recorder.truths)
    result.cluster = {"engine": "flower", "ray_address": fed.ray_address or "local", "client_nodes": len(strategy.nodes)}
    return result


def _shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


__all__ = ["DrivePrivStrategy", "client_app", "run_flower"]
