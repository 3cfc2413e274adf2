"""drivepriv.parallel: jobs fanned out over forked workers give what the serial loop gives."""

import os
import signal

import numpy as np
import pytest

from drivepriv.errors import DriveprivError
from drivepriv.parallel import fan_out, resolve_workers


def _square_with_pid(x):
    return x * x, os.getpid()


def test_results_in_item_order_from_other_processes():
    big = np.arange(1000.0)  # inherited by the forked workers, not pickled
    calls = []
    out = fan_out(lambda k: (float(big[k] ** 2), os.getpid()), list(range(0, 1000, 37)), workers=2, done=lambda: calls.append(1))
    assert [v for v, _ in out] == [float(k * k) for k in range(0, 1000, 37)]
    assert len(calls) == len(out)
    assert {pid for _, pid in out} - {os.getpid()}, "the jobs ran in worker processes"
    serial = fan_out(lambda k: float(big[k] ** 2), list(range(0, 1000, 37)), workers=1)
    assert serial == [v for v, _ in out]


def test_one_worker_runs_here_and_workers_are_capped_by_jobs():
    assert {pid for _, pid in fan_out(_square_with_pid, [1, 2, 3], workers=1)} == {os.getpid()}
    assert resolve_workers(8, 3) == 3 and resolve_workers(0, 1) == 1 and resolve_workers(0, 100) >= 1


def test_a_jobs_exception_reaches_the_caller():
    def job(k):
        if k == 3:
            raise ValueError("bad item 3")
        return k

    with pytest.raises(ValueError, match="bad item 3"):
        fan_out(job, range(6), workers=2)


def test_a_killed_worker_is_a_clear_error_not_a_hang():
    def job(k):
        if k == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return k

    with pytest.raises(DriveprivError, match="worker process died.*--workers 1"):
        fan_out(job, range(4), workers=2)
