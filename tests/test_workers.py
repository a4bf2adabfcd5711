"""pfcrepro.workers: independent jobs in worker processes, results in the order of the jobs."""

import os

import pytest

from pfcrepro import workers


def _job(x, fail_on=None):
    """Module level, so a spawned worker can import it; reports where and how it ran."""
    import torch

    if x == fail_on:
        raise KeyError(f"job {x} refuses")
    return {"square": x * x, "pid": os.getpid(), "threads": torch.get_num_threads()}


def test_threads_per_worker_shares_the_cores():
    cores = workers.available_cores()
    assert cores >= 1
    assert workers.threads_per_worker(1) == cores
    assert workers.threads_per_worker(2) == max(1, cores // 2)
    assert workers.threads_per_worker(10 * cores) == 1


@pytest.mark.parametrize("n", [1, 2])
def test_run_jobs_returns_results_in_job_order_and_reports_each(n):
    seen = []
    out = workers.run_jobs(_job, [(x,) for x in range(5)], workers=n, on_done=lambda i, r: seen.append(i))
    assert [r["square"] for r in out] == [0, 1, 4, 9, 16]
    assert sorted(seen) == [0, 1, 2, 3, 4]
    pids = {r["pid"] for r in out}
    if n == 1:  # in this process, its threads untouched
        assert pids == {os.getpid()}
    else:  # fresh processes with their share of the cores
        assert os.getpid() not in pids and 1 <= len(pids) <= 2
        assert {r["threads"] for r in out} == {workers.threads_per_worker(2)}


@pytest.mark.parametrize("n", [1, 2])
def test_run_jobs_reraises_a_failed_job_with_its_name(n):
    with pytest.raises(KeyError, match="job 3 refuses") as info:
        workers.run_jobs(_job, [(x, 3) for x in range(5)], workers=n, names=[f"x={x}" for x in range(5)])
    assert any("in job x=3" in note for note in info.value.__notes__)


def test_run_jobs_rejects_bad_arguments():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="workers must be a positive integer"):
            workers.run_jobs(_job, [(1,)], workers=bad)
    with pytest.raises(ValueError, match="2 names for 3 jobs"):
        workers.run_jobs(_job, [(1,), (2,), (3,)], names=["a", "b"])
    assert workers.run_jobs(_job, [], workers=2) == []
