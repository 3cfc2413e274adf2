"""Independent jobs (the attacks on the recorded updates, the report's per-batch media) fanned
out over the machine's cores, and single jobs run beside the main work (:class:`Background`:
the attacker's rollouts while the federation trains, the trained policy's utility episodes
while the attacks run).

The workers are forked from the calling process, so a job's inputs (networks, priors, the
attacker's rollouts) reach them without being pickled; only each job's result travels back.
Every job seeds its own random streams (:func:`drivepriv.seeding.derive_seed`), so the results
do not depend on which worker ran which job, nor in what order: the same numbers as one after
another, byte for byte (tests/test_parallel.py).

On a Ray cluster (``--engine flower`` with ``federation.ray_address``) :func:`ray_fan_out` runs
the same jobs as Ray tasks across the cluster's nodes instead: the job function and its inputs
are pickled once into Ray's object store, each task seeds itself as above, and a task whose
worker is lost is rerun by Ray (tests/federation/test_ray_cluster.py).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Sequence, TypeVar

from drivepriv.errors import DriveprivError
from drivepriv.seeding import reproducible_torch

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

#: The fan-out in progress: the job function and its items, inherited by the forked workers.
_JOBS: tuple[Callable, Sequence] | None = None


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity; os.cpu_count() where unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_workers(workers: int, jobs: int) -> int:
    """How many processes run ``jobs`` jobs: ``workers`` (0: one per available core), at most
    one per job, at least one; one where the platform cannot fork."""
    if "fork" not in multiprocessing.get_all_start_methods():
        return 1
    n = available_cores() if workers <= 0 else workers
    return max(1, min(n, jobs))


def init_worker() -> None:
    """Set up a forked worker process: Ctrl-C reaches the whole process group, and the parent
    stops the workers and reports it once; torch as in the parent's run."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    reproducible_torch()


def _call(i: int):
    fn, items = _JOBS
    return fn(items[i])


def fan_out(fn: Callable[[T], R], items: Sequence[T], workers: int = 0, done: Callable[[], None] | None = None) -> list[R]:
    """``[fn(item) for item in items]``, run by ``resolve_workers(workers, len(items))``
    processes; ``done()`` is called in this process as each job finishes. One worker (or a
    platform that cannot fork) runs the jobs here, one after another."""
    global _JOBS
    n = resolve_workers(workers, len(items))
    if n == 1:
        out = []
        for item in items:
            out.append(fn(item))
            if done:
                done()
        return out
    if _JOBS is not None:
        raise RuntimeError("fan_out is not reentrant: a fan-out is already running in this process")
    _JOBS = (fn, items)
    try:
        pool = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("fork"), initializer=init_worker)
        try:
            futures = {pool.submit(_call, i): i for i in range(len(items))}
            results: list = [None] * len(items)
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for f in finished:
                    results[futures[f]] = f.result()  # a job's own exception is raised here, as in the serial loop
                    if done:
                        done()
        except BaseException:  # a job failed, or Ctrl-C: stop the others now, start no more
            for proc in list((getattr(pool, "_processes", None) or {}).values()):
                proc.terminate()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        return results
    except BrokenProcessPool as e:
        raise DriveprivError(
            f"a worker process died while running {len(items)} jobs on {n} processes (killed, or out of memory): {e}. "
            "Run with --workers 1 to run them one after another in this process, with less memory."
        ) from None
    finally:
        _JOBS = None


def _death(exitcode: int | None) -> str:
    """How a child process ended, from its exit code, in words."""
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"{name}: killed, or out of memory" if -exitcode == signal.SIGKILL else name
    return f"exit code {exitcode}"


class Background:
    """``fn(*args)`` started now in a forked process, beside whatever this process does next;
    :meth:`result` waits for it and returns its value (or raises its exception).

    The child inherits ``fn`` and ``args`` (nothing is pickled on the way in; only the result
    travels back), ignores Ctrl-C as the fan-out workers do, and is stopped when the ``with``
    block is left early. ``fn`` must seed its own random streams, as every drivepriv job does:
    then its result does not depend on the process it ran in. With ``workers=1`` (everything
    one after another) or where the platform cannot fork, ``fn`` runs inside :meth:`result`,
    in this process. So it does where the child died before sending its result back (killed,
    or a library's state inherited across the fork gone bad), with a warning that says how it
    died: the same value either way."""

    def __init__(self, fn: Callable[..., R], *args, workers: int = 0) -> None:
        self._fn, self._args = fn, args
        self._proc = self._conn = None
        self._done = False
        self._value = None
        if resolve_workers(workers, 2) > 1:
            ctx = multiprocessing.get_context("fork")
            self._conn, child = ctx.Pipe(duplex=False)
            self._proc = ctx.Process(target=self._child, args=(child,), name=f"drivepriv-{getattr(fn, '__name__', 'job')}")
            self._proc.start()
            child.close()

    def _child(self, conn) -> None:
        init_worker()
        try:
            msg = ("ok", self._fn(*self._args))
        except BaseException as e:  # noqa: BLE001 -- handed to the parent, raised there
            msg = ("error", e)
        try:
            conn.send(msg)
        except Exception as e:  # an unpicklable result or exception
            conn.send(("error", RuntimeError(f"{type(msg[1]).__name__}: {msg[1]} (could not be sent back: {e})")))
        conn.close()

    def result(self) -> R:
        if not self._done:
            got = self._receive() if self._proc is not None else None
            self._value = got[0] if got is not None else self._fn(*self._args)
            self._done = True
        return self._value

    def _receive(self) -> tuple[R] | None:
        """The child's value (as a 1-tuple; its exception is raised here), or None where it died
        before sending anything back (then :meth:`result` runs the job here)."""
        try:
            kind, value = self._conn.recv()
        except EOFError:
            self._proc.join()
            log.warning(
                "the background process running %s died (%s); running it in this process instead",
                getattr(self._fn, "__name__", "a job"),
                _death(self._proc.exitcode),
            )
            self.cancel()
            return None
        self._proc.join()
        self._conn.close()
        self._proc = None
        if kind == "error":
            raise value
        return (value,)

    def cancel(self) -> None:
        """Stop the child (if it still runs) without waiting for its result."""
        if self._proc is not None:
            self._proc.terminate()
            self._proc.join()
            self._conn.close()
            self._proc = None

    def __enter__(self) -> "Background":
        return self

    def __exit__(self, *exc) -> None:
        self.cancel()


def _ray_job(fn: Callable, item) -> tuple[object, str]:
    """One job as a Ray task (set up as a forked worker is), and the node it ran on."""
    import ray

    reproducible_torch()
    return fn(item), ray.get_runtime_context().get_node_id()


def ray_fan_out(fn: Callable[[T], R], items: Sequence[T], address: str, done: Callable[[], None] | None = None, retries: int = 2) -> tuple[list[R], set[str]]:
    """``[fn(item) for item in items]`` as Ray tasks (one CPU each) on the cluster at
    ``address``; also the Ray nodes that ran them. ``fn`` and what it refers to are pickled
    once (cloudpickle), so every node must have drivepriv installed. A task whose worker is lost
    is rerun up to ``retries`` times, then its error is raised; Ctrl-C cancels the tasks."""
    import ray

    # the workers see this process's import path, as Flower's own workers do (a checkout run in place)
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])}}
    ray.init(address=address, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False, runtime_env=env)
    try:
        task = ray.remote(num_cpus=1, max_retries=retries)(_ray_job)
        fn_ref = ray.put(fn)
        refs = [task.remote(fn_ref, item) for item in items]
        index = {ref: i for i, ref in enumerate(refs)}
        results: list = [None] * len(items)
        nodes: set[str] = set()
        pending = list(refs)
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                for ref in ready:
                    try:
                        results[index[ref]], node = ray.get(ref)
                    except ray.exceptions.RayTaskError as e:  # the job's own exception, as in the serial loop
                        raise e.as_instanceof_cause() from None
                    except ray.exceptions.RayError as e:
                        raise DriveprivError(
                            f"a Ray task died {retries + 1} times while running {len(items)} jobs on the cluster at {address} "
                            f"(killed, out of memory, or its node left): {e}. Run without federation.ray_address to run them on this machine."
                        ) from None
                    nodes.add(node)
                    if done:
                        done()
        except BaseException:  # a job failed, or Ctrl-C: cancel the rest
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        return results, nodes
    finally:
        ray.shutdown()
