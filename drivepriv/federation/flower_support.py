"""What the Flower engine and the curious strategy share without importing Flower: the check
that the optional extra is installed, and the ground-truth files of simulated clients."""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path

import numpy as np

from drivepriv.errors import ConfigError
from drivepriv.federation.types import TRANSITION_FIELDS, GroundTruth

FLOWER_VERSION = "1.42.0"
INSTALL = 'pip install -e ".[flower]"  (from a clone; or: pip install "flwr[simulation]==1.42.0")'


#: Environment under which Ray and Flower touch no network (set by drivepriv; export them before `flwr run`).
OFFLINE_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


def require_flower(simulation: bool = True) -> None:
    """Fail with the install command when Flower (and, with ``simulation``, its Ray simulation
    engine) is missing."""
    # drivepriv runs offline: no usage statistics (Ray), telemetry or update check (Flower), and
    # no installation of an app's dependencies by a SuperLink (`flwr run`) at run time. Flower
    # reads these when it is imported, so they are set first.
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    missing = []
    for module in ("flwr", "ray") if simulation else ("flwr",):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ConfigError(
            f"{'the Flower engine needs Flower with its Ray simulation engine' if simulation else 'this needs Flower'}, and {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not installed; install the optional extra: {INSTALL}"
        )


def save_truth(folder: str | Path, rnd: int, client: int, batches: list[dict[str, np.ndarray]], origins: list[np.ndarray], continuous: bool) -> Path:
    """A client's true minibatch(es) behind one update, for the metrics only (never sent to the
    server: a simulated client writes it beside the run, an audited client to its own disk).

    ``batches``: one dict per local step, as the client trained on it (states, actions one-hot
    or continuous values, rewards, next_states, dones); ``origins``: each one's (episode, step)."""
    return write_truth(folder, GroundTruth.from_minibatches(rnd, client, batches, origins, continuous))


def write_truth(folder: str | Path, truth: GroundTruth) -> Path:
    """Write ``folder/r{round}-c{client}.npz`` (atomically: a temporary file, then renamed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {**truth.arrays(), "origins": truth.origins, "local_steps": np.array(truth.local_steps)}
    path = folder / f"r{truth.round}-c{truth.client}.npz"
    tmp = folder / f".r{truth.round}-c{truth.client}.tmp.npz"
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return path


def load_truth(folder: str | Path, rnd: int, client: int) -> GroundTruth | None:
    """The :class:`~drivepriv.federation.types.GroundTruth` written by :func:`save_truth`, or None."""
    path = Path(folder) / f"r{rnd}-c{client}.npz"
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in (*TRANSITION_FIELDS, "origins")}
            return GroundTruth(rnd, client, **arrays, local_steps=int(z["local_steps"]))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
        raise ConfigError(f"{path} is not a truth file written by this drivepriv's save_truth ({e}); run the client app again") from None


#: How Ray words a worker that died under an actor (killed, out of memory, its node gone).
LOST_WORKER = ("RayActorError", "ActorDiedError", "ActorUnavailableError", "OutOfMemoryError", "NodeDiedError")


def quiet_flower():
    """Flower logs every round at INFO, and warns at every call that ``run_simulation`` is
    deprecated in favour of ``flwr run`` (docs/flower.md); keep its errors only (a failed client is
    raised by the strategy), less the lost workers that drivepriv handles. Returns an undo."""
    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    flwr_log.setLevel(logging.ERROR)
    flwr_log.addFilter(_drop_lost_worker)
    return lambda: (flwr_log.setLevel(level), flwr_log.removeFilter(_drop_lost_worker))


def _drop_lost_worker(record: logging.LogRecord) -> bool:
    """Flower logs a lost Ray worker as errors (a preface, the exception, its traceback);
    drivepriv's grid retries it with a warning, or stops with a ClientFailed that carries Ray's
    reason. Flower's other errors are kept."""
    if record.pathname.endswith("raybackend.py"):
        return False  # "An exception was raised when processing a message": the details follow
    if isinstance(record.msg, BaseException):
        return not {c.__name__ for c in type(record.msg).__mro__} & set(LOST_WORKER)
    return not (record.pathname.endswith("vce_api.py") and any(k in record.getMessage() for k in LOST_WORKER))


__all__ = ["FLOWER_VERSION", "INSTALL", "LOST_WORKER", "OFFLINE_ENV", "load_truth", "quiet_flower", "require_flower", "save_truth", "write_truth"]
