"""The parent's end of a MetaDrive worker process: one pipe client for every MetaDrive worker.

:class:`WorkerClient` starts a worker (``multiprocessing`` "spawn" context, one ``Pipe``) that
runs :func:`~drivepriv.envs.metadrive.worker.serve_metadrive`, sends ``(command, argument)``
requests, waits for the answers while checking that the worker lives, and stops it (politely,
then by force; always reaped), also on garbage collection and at exit. Used by the proxy
environment and by the MetaDrive replay renderer.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import sys
import weakref
from typing import Any, Callable, Iterator, Sequence

from drivepriv.errors import DriveprivError

#: Seconds to wait for a worker before giving up (it is checked for life every half second).
WORKER_TIMEOUT_S = 300.0


class MetaDriveWorkerError(DriveprivError):
    """The MetaDrive worker process failed or died; the message carries its traceback."""


def _shutdown(process: Any, conn: Any) -> None:
    """Stop a worker: ask politely, then terminate, then kill; always reap it (no zombies)."""
    try:
        if process.is_alive():
            try:
                conn.send(("close", None))
                if conn.poll(5.0):
                    conn.recv()
            except (EOFError, OSError, BrokenPipeError):
                pass
            process.join(5.0)
        if process.is_alive():
            process.terminate()
            process.join(5.0)
        if process.is_alive():
            process.kill()
            process.join(5.0)
    except Exception:  # noqa: BLE001  (interpreter exit: best effort)
        pass
    finally:
        try:
            conn.close()
        except Exception:  # noqa: BLE001
            pass


@contextlib.contextmanager
def _main_module_hidden() -> Iterator[None]:
    """Keep "spawn" from re-running the caller's ``__main__`` in the worker.

    The worker needs nothing from it, and re-running it would import whatever the caller's
    script imports (torch...) or, in a script without an ``if __name__ == "__main__"`` guard,
    create environments recursively.
    """
    main = sys.modules.get("__main__")
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if main is not None and k in main.__dict__}
    try:
        for k in saved:
            if k == "__file__":
                del main.__dict__[k]
            else:
                main.__dict__[k] = None
        yield
    finally:
        if main is not None:
            main.__dict__.update(saved)


class WorkerClient:
    """One MetaDrive worker process and the parent's end of its pipe.

    ``target(conn, *args)`` runs in the worker (a module-level function that calls
    :func:`~drivepriv.envs.metadrive.worker.serve_metadrive`); ``name`` names the process and
    ``label`` the worker in error messages. The worker starts at once; its first reply
    (``recv("start")``) says that its environment exists.
    """

    def __init__(self, target: Callable[..., None], args: Sequence[Any] = (), name: str = "drivepriv-metadrive",
                 label: str = "MetaDrive worker") -> None:
        self.label = label
        ctx = mp.get_context("spawn")
        parent_conn, child_conn = ctx.Pipe()
        self._conn = parent_conn
        self.process = ctx.Process(target=target, args=(child_conn, *args), daemon=True, name=name)
        with _main_module_hidden():
            self.process.start()
        child_conn.close()  # so a dead worker gives EOF instead of a hang
        self._finalizer = weakref.finalize(self, _shutdown, self.process, self._conn)

    @property
    def pid(self) -> int | None:
        """Process id of the worker (None before start)."""
        return self.process.pid

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run (or the client was collected)."""
        return not self._finalizer.alive

    def recv(self, what: str) -> Any:
        """Wait for the worker's reply to ``what`` and return its payload; raise if it failed or died."""
        waited_s = 0.0
        while not self._conn.poll(0.5):
            waited_s += 0.5
            if not self.process.is_alive():
                code = self.process.exitcode
                raise MetaDriveWorkerError(
                    f"{self.label} (pid {self.process.pid}) died during {what} with exit code {code}; "
                    "create a new environment (see the log above for its output)."
                )
            if waited_s >= WORKER_TIMEOUT_S:
                raise MetaDriveWorkerError(f"{self.label} (pid {self.process.pid}) did not answer {what} within {WORKER_TIMEOUT_S:.0f} s")
        try:
            status, payload = self._conn.recv()
        except (EOFError, OSError) as exc:
            raise MetaDriveWorkerError(f"{self.label} (pid {self.process.pid}) closed its pipe during {what}") from exc
        if status != "ok":
            raise MetaDriveWorkerError(f"{self.label} failed during {what}:\n{payload}")
        return payload

    def call(self, cmd: str, arg: Any = None) -> Any:
        """Send ``(cmd, arg)`` and return the worker's reply (see :meth:`recv`)."""
        if self.closed:
            raise MetaDriveWorkerError(f"{cmd}() on a closed MetaDrive environment; create a new one")
        try:
            self._conn.send((cmd, arg))
        except (OSError, BrokenPipeError) as exc:
            raise MetaDriveWorkerError(f"{self.label} (pid {self.process.pid}) is gone; create a new environment") from exc
        return self.recv(cmd)

    def close(self) -> None:
        """Stop the worker process (idempotent; also done on garbage collection and at exit)."""
        self._finalizer()
