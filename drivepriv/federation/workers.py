"""The in-process engine's clients spread over forked worker processes, one group of clients
per core.

Each worker owns its clients for the whole run: their environments, replay buffers and
generators stay where they are, and a round moves only the global parameters out and the
clients' results (update: payload and training row; truth for the recorded rounds) back. A client's round
depends on nothing but its own state and the parameters it is sent, so the federation trains
to the same numbers as with the clients one after another in one process (tests/test_cli.py
compares training.csv and metrics.csv byte for byte).

Worker processes are forked (the configuration and the local algorithm are inherited, not
pickled); where the platform cannot fork, or one worker would do, the engine keeps its clients
in its own process.
"""

from __future__ import annotations

import multiprocessing
import traceback

from drivepriv.config import RunConfig
from drivepriv.errors import DriveprivError
from drivepriv.federation.inprocess import ClientGroup
from drivepriv.federation.types import ClientResult
from drivepriv.parallel import init_worker


def _serve(conn, cfg: RunConfig, obs_shape: tuple[int, ...], algorithm, cids: list[int]) -> None:
    init_worker()
    group = None
    try:
        group = ClientGroup(cfg, obs_shape, algorithm, cids)
        while True:
            msg = conn.recv()
            if msg[0] == "close":
                break
            _, rnd, params, target_params, record = msg
            conn.send(("ok", group.train_round(rnd, params, target_params, record)))
    except EOFError:  # the engine went away
        pass
    except BaseException as e:  # noqa: BLE001 - the engine re-raises it
        try:
            conn.send(("error", e, traceback.format_exc()))
        except Exception:  # noqa: BLE001 - e.g. an exception that does not pickle
            conn.send(("error", RuntimeError(f"{type(e).__name__}: {e}"), traceback.format_exc()))
    finally:
        if group is not None:
            group.close()
        conn.close()


class ClientWorkers:
    """``workers`` processes, client ``i`` in worker ``i % workers``, each holding a
    :class:`~drivepriv.federation.inprocess.ClientGroup`; ``train_round`` and ``close`` as
    the group's, across the workers."""

    def __init__(self, cfg: RunConfig, obs_shape: tuple[int, ...], algorithm, workers: int) -> None:
        ctx = multiprocessing.get_context("fork")
        ids = list(range(cfg.federation.clients))
        self.groups = [ids[k::workers] for k in range(workers)]
        self.conns, self.procs = [], []
        for k, cids in enumerate(self.groups):
            parent, child = ctx.Pipe()
            # not a daemon: a client's simulator may start processes of its own (MetaDrive's
            # worker). A worker whose engine is gone reads end-of-file and exits.
            proc = ctx.Process(target=_serve, args=(child, cfg, obs_shape, algorithm, cids), name=f"drivepriv-clients-{k}")
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)

    def train_round(self, rnd: int, params, target_params, record: dict[int, bool]) -> list[ClientResult]:
        for conn in self.conns:
            try:
                conn.send(("round", rnd, params, target_params, record))
            except (BrokenPipeError, OSError):
                pass  # the worker is gone: its error (or its death) is read below
        results: list[ClientResult] = []
        for conn, proc, cids in zip(self.conns, self.procs, self.groups):
            try:
                status, *rest = conn.recv()
            except (EOFError, OSError):
                proc.join(5)
                raise DriveprivError(
                    f"the worker process of clients {cids} died in round {rnd} (exit code {proc.exitcode}; killed, or out of memory). "
                    "Run with --workers 1 to keep every client in one process."
                ) from None
            if status == "error":
                exc, tb = rest
                raise exc from RuntimeError(f"in the worker process of clients {cids}:\n{tb}")
            results += rest[0]
        return sorted(results, key=lambda r: r.update.client)

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(("close",))
            except (BrokenPipeError, OSError):
                pass
        for proc in self.procs:
            proc.join(30)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        for conn in self.conns:
            conn.close()
