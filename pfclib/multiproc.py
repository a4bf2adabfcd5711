"""Run a function in W CPU processes joined by a gloo process group.

Used by the multi-process tests (two processes must equal one), the benchmarks (per-rank memory
of model parallelism) and notebooks. It is the in-Python equivalent of
``torchrun --standalone --nproc_per_node W``: no fixed port (a file rendezvous in a temporary
folder), ``OMP_NUM_THREADS=1`` per process by default, and every rank's return value is
collected. A failure on any rank is re-raised with that rank's traceback.
"""

from __future__ import annotations

import os
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(
    rank: int,
    world_size: int,
    init_file: str,
    out_dir: str,
    threads: int,
    fn: Callable,
    args: tuple,
    kwargs: dict,
) -> None:
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    result_path = Path(out_dir) / f"rank{rank}.pt"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        value = fn(rank, world_size, *args, **kwargs)
        torch.save({"ok": True, "value": value}, result_path)
    except BaseException:  # noqa: BLE001 - reported to the parent with its traceback
        torch.save({"ok": False, "error": traceback.format_exc()}, result_path)
        raise
    finally:
        dist.destroy_process_group()


def run_gloo(
    fn: Callable[..., Any], world_size: int, *args: Any, threads: int = 1, **kwargs: Any
) -> list[Any]:
    """Call ``fn(rank, world_size, *args, **kwargs)`` in ``world_size`` spawned processes inside an
    initialised gloo group; return the list of per-rank results (they must be picklable by
    ``torch.save``). ``fn`` must be importable (defined at module level)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    with tempfile.TemporaryDirectory(prefix="pfclib-gloo-") as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        try:
            mp.spawn(
                _worker,
                args=(world_size, init_file, tmp, threads, fn, args, kwargs),
                nprocs=world_size,
                join=True,
            )
        except mp.ProcessRaisedException as exc:
            errors = []
            for r in range(world_size):
                p = Path(tmp) / f"rank{r}.pt"
                if p.exists():
                    rec = torch.load(p, weights_only=False)
                    if not rec["ok"]:
                        errors.append(f"--- rank {r} ---\n{rec['error']}")
            raise RuntimeError("distributed run failed:\n" + "\n".join(errors or [str(exc)])) from None
        results = []
        for r in range(world_size):
            rec = torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False)
            results.append(rec["value"])
        return results
