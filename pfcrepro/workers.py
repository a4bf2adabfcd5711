"""Independent jobs side by side in worker processes, each with its share of the CPU cores.

The one job of this module is :func:`run_jobs`, used by the trial runner
(:func:`pfcrepro.trials.run_trials`) and the feature-level designs
(:func:`pfcrepro.features.run_design`). The runs of a notebook's design are small: a tiny CNN at
32 px or an MLP over 64-dimensional features. Such a run does not keep two threads busy, so on two
cores two one-thread runs side by side finish about 1.4 times sooner than the same two runs one
after the other on two threads (measured on this project's 2-core machine for both kinds).

A run's numbers depend on its thread count (the order of float sums), not on which process ran it:
a one-thread worker gives exactly the numbers of the same run made in this process on one thread.
Keep the worker count fixed within one design so that its arms are trained alike.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from typing import Any

__all__ = ["available_cores", "run_jobs", "threads_per_worker"]


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def threads_per_worker(workers: int) -> int:
    """The threads each of ``workers`` processes gets: an equal share of the cores, at least one."""
    return max(1, available_cores() // workers)


def _init_worker(threads: int) -> None:
    import torch

    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def run_jobs(
    fn: Callable[..., Any],
    jobs: Sequence[tuple],
    workers: int = 1,
    on_done: Callable[[int, Any], None] | None = None,
    names: Sequence[str] | None = None,
) -> list[Any]:
    """``[fn(*job) for job in jobs]``, in ``workers`` processes at once; results in the order of ``jobs``.

    Args:
        fn: the job; with ``workers > 1`` it must be importable (defined at module level), and its
            arguments and result picklable.
        jobs: one argument tuple per call.
        workers: ``1`` runs the jobs one after another in this process, with its threads as they
            are. More starts that many fresh (spawned) processes with :func:`threads_per_worker`
            threads each; a process takes the next job when it finishes one.
        on_done: called in this process as ``on_done(index, result)`` when a job finishes (in the
            order they finish), e.g. to log progress or build a table row.
        names: one name per job for the error message (default: the index).

    Raises:
        ValueError: ``workers`` is not a positive integer, or ``names`` does not match ``jobs``.
        Exception: whatever a job raised, of its own type, with a note naming the job. In workers,
            the jobs not yet started are then cancelled and the ones running are let finish.
    """
    if isinstance(workers, bool) or int(workers) != workers or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    if names is not None and len(names) != len(jobs):
        raise ValueError(f"names must have one entry per job: {len(names)} names for {len(jobs)} jobs")
    label = (lambda i: names[i]) if names is not None else str
    results: list[Any] = [None] * len(jobs)

    def done(i: int, value: Any) -> None:
        results[i] = value
        if on_done is not None:
            on_done(i, value)

    if workers == 1 or len(jobs) < 2:
        for i, job in enumerate(jobs):
            try:
                value = fn(*job)
            except Exception as exc:
                exc.add_note(f"in job {label(i)}")
                raise
            done(i, value)
        return results
    pool = ProcessPoolExecutor(
        max_workers=min(int(workers), len(jobs)),
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(threads_per_worker(int(workers)),),
    )
    try:
        futures = {pool.submit(fn, *job): i for i, job in enumerate(jobs)}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for future in finished:
                i = futures[future]
                try:
                    value = future.result()
                except Exception as exc:
                    exc.add_note(f"in job {label(i)} (worker process)")
                    raise
                done(i, value)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return results
