"""drivepriv.parallel: jobs fanned out over forked workers give what the serial loop gives."""

import logging
import os
import signal

import numpy as np
import pytest

from drivepriv.errors import DriveprivError
from drivepriv.parallel import Background, fan_out, resolve_workers


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


def test_a_background_job_runs_in_another_process_beside_this_one():
    big = np.arange(10.0)  # inherited by the child, not pickled
    job = Background(lambda scale: (float(big.sum() * scale), os.getpid()), 2.0, workers=2)
    here = sum(range(1000))  # this process goes on meanwhile
    value, pid = job.result()
    assert value == 90.0 and pid != os.getpid() and here == 499500
    assert job.result() == (value, pid), "the result is kept, not recomputed"
    inline = Background(lambda: os.getpid(), workers=1)
    assert inline.result() == os.getpid(), "workers=1 runs the job here, inside result()"


def test_a_background_jobs_exception_reaches_the_caller():
    def fails():
        raise ValueError("bad rollout seed")

    with pytest.raises(ValueError, match="bad rollout seed"):
        Background(fails, workers=2).result()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGSEGV])
def test_a_background_job_whose_process_died_is_run_here_and_says_how_it_died(caplog, sig):
    parent = os.getpid()

    def dies_in_the_child(x):
        if os.getpid() != parent:
            os.kill(os.getpid(), sig)
        return x * 2, os.getpid()

    job = Background(dies_in_the_child, 21, workers=2)
    with caplog.at_level(logging.WARNING, logger="drivepriv.parallel"):
        assert job.result() == (42, parent)
    assert f"dies_in_the_child died ({sig.name}" in caplog.text and "running it in this process instead" in caplog.text
    assert job._proc is None and job.result() == (42, parent)


def test_leaving_the_with_block_early_stops_the_background_job():
    import time

    with Background(time.sleep, 60, workers=2) as job:
        proc = job._proc
        assert proc.is_alive()
    assert not proc.is_alive() and job._proc is None
