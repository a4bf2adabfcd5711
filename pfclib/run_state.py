"""What a training checkpoint holds and how a run is put back from one.

:func:`capture` assembles the checkpoint of a run at a step (collective: every rank takes part, rank
0 receives the dict) and :func:`restore` loads one into a freshly built run. The file format and the
file handling (atomic writes, listing, pruning, safe loading) are :mod:`pfclib.checkpoint`'s.

A checkpoint (format ``pfclib-checkpoint/1``) holds: ``config`` (the run's :class:`TrainConfig` as a
dict), ``step`` (optimizer steps completed), ``world_size``, ``backbone`` and ``backbone_optimizer``
(state dicts), ``scheduler`` (one state dict per optimizer), ``head`` (the whole head and its
optimizer state, :meth:`pfclib.PartialFC.full_state_dict`, including the class sampler's generator
of every rank), ``data_state`` (:meth:`pfclib.data.order.DataOrder.state`), ``rng`` (torch's global
generator, and CUDA's, of every rank), ``grad_scaler`` and ``metrics`` (the loss history); with
``quality.enabled`` also ``quality`` (the state dict of :class:`pfclib.quality.QualityBranch`, whose
optimizer state is the backbone optimizer's second parameter group).

Restore policy. With the same number of processes everything is put back bitwise, so a resumed run
continues exactly as an uninterrupted one (on CPU). With another number the centers and their
optimizer rows are re-sharded, the data continue at the first whole batch at or after the saved
sample offset, and the sampler and torch generators are re-seeded from ``(seed, step, rank)``.
The schedule and peak learning rates are the new config's (see :func:`pfclib.checkpoint.resume_changes`
for what may change on resume).
"""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pfclib import head_state
from pfclib.checkpoint import (
    CHECKPOINT_FORMAT,
    checkpoint_path,
    head_folders,
    prune_checkpoints,
    resume_changes,
    save_checkpoint,
)
from pfclib.config import TrainConfig
from pfclib.data.order import DataOrder
from pfclib.io import atomic_torch_save
from pfclib.schedule import WarmupPolyDecay, set_step
from pfclib.seeding import SEED_HEAD_RESHARD, SEED_TORCH_RESHARD, derive_seed

__all__ = ["RunParts", "broadcast_object", "capture", "check_finite", "gather_objects", "restore", "save"]


@dataclass
class RunParts:
    """The stateful pieces of a run, as the trainer builds them."""

    config: TrainConfig
    world: int
    rank: int
    device: torch.device
    model: nn.Module  # the un-wrapped backbone
    backbone_opt: torch.optim.Optimizer  # the un-wrapped optimizer
    head: nn.Module
    head_opt: torch.optim.Optimizer
    schedulers: Sequence[torch.optim.lr_scheduler.LambdaLR]
    order: DataOrder
    scaler: Any = None  # a GradScaler for fp16, else None
    quality: nn.Module | None = None  # the CR-FIQA branch (quality.enabled), else None


def gather_objects(obj: Any, world_size: int) -> list[Any]:
    """``obj`` of every rank, in rank order (collective)."""
    if world_size == 1:
        return [obj]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, world_size: int) -> Any:
    """Rank 0's ``obj`` on every rank (collective)."""
    if world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_finite(parts: RunParts, step: int) -> None:
    """Collective: raise ``FloatingPointError`` on every rank if any rank's backbone parameters or
    head centers hold NaN or inf, so that a diverged run never writes (and then prunes towards)
    poisoned checkpoints."""
    bad = [name for name, p in parts.model.named_parameters() if not bool(torch.isfinite(p).all())]
    if not bool(torch.isfinite(parts.head.weight).all()):
        bad.append(f"head centers (rank {parts.rank})")
    if parts.quality is not None:
        bad += [
            f"quality.{n}" for n, p in parts.quality.named_parameters() if not bool(torch.isfinite(p).all())
        ]
    everyone = [b for rank_bad in gather_objects(bad, parts.world) for b in rank_bad]
    if everyone:
        shown = ", ".join(everyone[:5]) + (f" and {len(everyone) - 5} more" if len(everyone) > 5 else "")
        raise FloatingPointError(
            f"training diverged before step {step}: non-finite values in {shown}; no checkpoint was "
            "written at this step. Lower optim.lr / optim.head_lr, raise optim.warmup_steps or set "
            "optim.grad_clip, then resume from the last checkpoint or start again"
        )


def capture(
    parts: RunParts, step: int, micro_batches: int, metrics: dict[str, Any], head: dict[str, Any]
) -> dict[str, Any] | None:
    """Collective (every rank calls it): the checkpoint of the run after ``step`` optimizer steps and
    ``micro_batches`` consumed micro-batches, with ``head`` (a full state or a sharded manifest);
    the dict on rank 0, ``None`` on the others."""
    torch_rng = gather_objects(torch.get_rng_state(), parts.world)
    cuda = parts.device.type == "cuda"
    cuda_rng = gather_objects(torch.cuda.get_rng_state(parts.device), parts.world) if cuda else None
    if parts.rank != 0:
        return None
    extra = {"quality": parts.quality.state_dict()} if parts.quality is not None else {}
    return {
        **extra,
        "format": CHECKPOINT_FORMAT,
        "config": parts.config.to_dict(),
        "step": step,
        "world_size": parts.world,
        "backbone": parts.model.state_dict(),
        "backbone_optimizer": parts.backbone_opt.state_dict(),
        "scheduler": [s.state_dict() for s in parts.schedulers],
        "head": head,
        "data_state": parts.order.state(micro_batches),
        "rng": {"torch": torch_rng, "cuda": cuda_rng},
        "grad_scaler": parts.scaler.state_dict() if parts.scaler is not None else None,
        "metrics": metrics,
    }


def _write_shards(parts: RunParts, path: Path) -> dict[str, Any]:
    """Collective: every rank writes its rows of the head (and of its optimizer state) into
    ``<ckpt>.head-<token>/rank_<r>.pt``, atomically; returns the manifest (every rank)."""
    token = broadcast_object(secrets.token_hex(4) if parts.rank == 0 else None, parts.world)
    name = f"{path.name[: -len('.pt')]}.head-{token}"
    folder = path.parent / name
    entry, error = None, None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"rank_{parts.rank:05d}.pt"
        atomic_torch_save(head_state.shard_state_dict(parts.head, parts.head_opt), target)
        end = parts.head.start + parts.head.n_local
        entry = {"file": target.name, "start": parts.head.start, "end": end, "bytes": target.stat().st_size}
    except Exception as exc:  # every rank must hear of it, or the others would wait forever
        error = f"rank {parts.rank}: {type(exc).__name__}: {exc}"
    results = gather_objects((entry, error), parts.world)
    errors = [e for _, e in results if e is not None]
    if errors:
        if parts.rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
        raise RuntimeError(f"writing the head shards of {path} failed: {'; '.join(errors)}")
    return head_state.sharded_manifest(parts.head, [e for e, _ in results], name)


def save(parts: RunParts, out_dir: Path, step: int, micro_batches: int, metrics: dict[str, Any]) -> Path:
    """Collective: write the checkpoint of ``step`` as ``config.checkpoint.layout`` says, then keep
    the newest ``config.checkpoint.keep``; return its path (every rank).

    ``"sharded"``: each rank writes its own rows and their optimizer state (no gathering, extra host
    memory per rank at most one shard copied off the device), then rank 0 writes the checkpoint file
    with everything else and the list of shards, last: a checkpoint exists only once all its shards
    do, so a kill at any moment leaves the previous one intact (stray shards are removed by
    :func:`pfclib.checkpoint.remove_stale_temp_files`). Every rank must see the same folder.
    ``"single"``: the whole head is gathered into the one file (the full ``(C, D)`` matrix on every
    rank's host: for small heads and for moving a checkpoint around as one file).

    Before anything is written, a non-finite weight anywhere stops every rank with
    ``FloatingPointError`` (see :func:`check_finite`)."""
    path = checkpoint_path(out_dir, step)
    if parts.config.checkpoint.layout == "sharded":
        parts.head.sync()
        check_finite(parts, step)
        head = _write_shards(parts, path)
    else:
        head = parts.head.full_state_dict(optimizer=parts.head_opt)  # syncs lazy updates first
        check_finite(parts, step)
    state = capture(parts, step, micro_batches, metrics, head)
    error = None
    if parts.rank == 0:
        try:
            save_checkpoint(state, path)
            keep = head.get("folder")
            for old in head_folders(path):  # an earlier save of this step, now replaced
                if old.name != keep:
                    shutil.rmtree(old, ignore_errors=True)
            prune_checkpoints(out_dir, parts.config.checkpoint.keep)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
    error = broadcast_object(error, parts.world)
    if error is not None:
        raise RuntimeError(f"writing checkpoint {path} failed on rank 0: {error}")
    return path


def saved_world_size(ckpt: dict[str, Any]) -> int:
    """The number of processes a checkpoint was written by."""
    if "world_size" in ckpt:
        return int(ckpt["world_size"])
    return len(ckpt["head"].get("generator_states") or ckpt.get("head_rng") or [None])


def saved_lr(ckpt: dict[str, Any], step: int) -> float:
    """The backbone's learning rate at ``step`` under the schedule a checkpoint was trained with."""
    try:
        saved = ckpt["scheduler"][0]
        return float(saved["base_lrs"][0] * WarmupPolyDecay(**saved["lr_lambdas"][0])(step))
    except (KeyError, IndexError, TypeError):
        return float("nan")


def restore(
    parts: RunParts, ckpt: dict[str, Any], path: Path, peak_lrs: Sequence[float], say: Callable[[str], None]
) -> int:
    """Put the run of ``parts`` back to the checkpoint ``ckpt`` read from ``path`` (on every rank); return the
    micro-batch position to continue from. Settings that may not change on resume are refused with a
    ``ValueError`` naming them; applied changes are reported through ``say``."""
    config, world, rank = parts.config, parts.world, parts.rank
    saved_world = saved_world_size(ckpt)
    applied, refused = resume_changes(ckpt["config"], config.to_dict(), saved_world, world)
    if refused:
        raise ValueError(
            f"cannot resume with these settings changed: {'; '.join(refused)}. They shape the model, the "
            "data or the optimizer state the checkpoint holds: set them back to the checkpoint's values, "
            "or start a new run in another output_dir"
        )
    if parts.quality is not None and ckpt.get("quality") is None:
        raise ValueError(
            f"cannot resume from {path} with quality.enabled=true: that checkpoint was trained without the "
            "quality branch. Set quality.enabled back to false, or start a new run in another output_dir"
        )
    step = int(ckpt["step"])
    parts.model.load_state_dict(ckpt["backbone"])
    if parts.quality is not None:
        parts.quality.load_state_dict(ckpt["quality"])
    parts.backbone_opt.load_state_dict(ckpt["backbone_optimizer"])
    # restores the sampler's generator of this rank too when the world size is unchanged
    if ckpt["head"].get("format") == head_state.SHARDED_FORMAT:  # only the shards with this rank's rows
        folder = Path(path).parent / ckpt["head"]["folder"]
        head_state.load_sharded_state(parts.head, ckpt["head"], folder, optimizer=parts.head_opt)
    else:
        parts.head.load_full_state_dict(ckpt["head"], optimizer=parts.head_opt)
    # The schedule and peak rates are this run's (the checkpoint's unless max_steps, lr, ... changed):
    # the schedulers' saved counters are loaded, not their schedule (LambdaLR would write the old
    # parameters into the shared schedule object) nor their peak rates; set_step puts every rate at
    # `step` with LambdaLR's arithmetic, bitwise what an uninterrupted run has.
    for sched, sd in zip(parts.schedulers, ckpt.get("scheduler", [])):
        keep = {k: v for k, v in sd.items() if k not in ("lr_lambdas", "base_lrs")}
        sched.load_state_dict({**keep, "lr_lambdas": [None] * len(sched.lr_lambdas)})
    for sched, peak in zip(parts.schedulers, peak_lrs):
        sched.base_lrs = [peak] * len(sched.optimizer.param_groups)
        for group in sched.optimizer.param_groups:
            group["initial_lr"] = peak
    set_step(parts.schedulers, step)
    for line in applied:
        say(f"resume: {line} (applied)")
    if applied:
        say(
            f"resume: schedule {parts.schedulers[0].lr_lambdas[0]!r}; backbone lr at step {step}: "
            f"{saved_lr(ckpt, step):.6g} under the checkpoint's settings -> {parts.schedulers[0].get_last_lr()[0]:.6g}"
        )
    if parts.scaler is not None and ckpt.get("grad_scaler"):
        parts.scaler.load_state_dict(ckpt["grad_scaler"])
    if saved_world == world:
        torch.set_rng_state(ckpt["rng"]["torch"][rank])
        cuda_states = ckpt["rng"].get("cuda")
        if cuda_states and parts.device.type == "cuda":
            torch.cuda.set_rng_state(cuda_states[rank], parts.device)
    else:
        parts.head.generator.manual_seed(derive_seed(config.seed, SEED_HEAD_RESHARD, step, rank))
        torch.manual_seed(derive_seed(config.seed, SEED_TORCH_RESHARD, step, rank))
        say(
            f"resuming a {saved_world}-process checkpoint on {world} process(es): centers and their optimizer "
            f"rows re-sharded; sampler and torch generators re-seeded from (seed={config.seed}, step={step}, rank)"
        )
    return parts.order.position_from(ckpt["data_state"])
