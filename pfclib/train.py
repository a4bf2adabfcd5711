"""Train a backbone with a Partial FC head, with exact resume.

Run it as a script (one process, or several under a launcher)::

    python -m pfclib.train --config configs/tiny_cpu.yaml
    python -m pfclib.train --config params.yaml --section train --set optim.lr=0.05 --resume auto
    torchrun --standalone --nproc_per_node 2 -m pfclib.train --config configs/tiny_cpu.yaml
    accelerate launch --multi_gpu --num_processes 2 -m pfclib.train --config ...

or call :func:`training_function` from Python or a notebook (one process, no launcher needed).

How a step works, top to bottom (see :func:`training_function`):

1. An ``Accelerator`` is made first (``cpu=True`` when no CUDA is used, so torchrun on CPU gives a
   real gloo group); the backbone and its optimizer go through one ``accelerator.prepare``. The
   head (:class:`pfclib.PartialFC`) is built afterwards, so it sees the process group, and is
   never prepared: its rows are a shard, not a replica. Its optimizer comes from
   ``head.make_optimizer``. One warm-up + polynomial schedule drives both optimizers.
2. Data order is owned here (:class:`DataOrder`): a seeded permutation per epoch; global batch
   ``b`` of an epoch is a contiguous slice of it and rank ``r`` takes the ``r``-th part. The
   position is a single micro-batch counter, so a checkpoint stores it exactly. The horizontal
   flip uses a generator seeded by ``(seed, rank, step, micro-batch)``.
3. One optimizer step = ``gradient_accumulation_steps`` micro-batches; each micro-batch loss is
   divided by that number; DDP synchronises only on the last one. The backbone gradient is
   clipped, then both optimizers step and both schedulers advance.
4. Every ``checkpoint.every`` steps (and at the end) every rank joins
   ``head.full_state_dict(optimizer)`` and the gathering of RNG states; rank 0 writes one file
   atomically. Resume on the same number of processes restores everything bitwise (CPU); on a
   different number the centers and their optimizer rows are re-sharded and the generators are
   re-seeded deterministically from ``(seed, step, rank)``.
5. Rank 0 logs to ``log.csv`` and TensorBoard, shows a tqdm bar, and runs the verification sets
   every ``eval.every`` steps. The final metrics go to ``metrics.json`` and are returned.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn

from pfclib.checkpoint import (
    CHECKPOINT_FORMAT,
    checkpoint_path,
    load_checkpoint,
    prune_checkpoints,
    resolve_resume,
    resume_changes,
    save_checkpoint,
)
from pfclib.config import TrainConfig
from pfclib.io import atomic_path, write_json
from pfclib.schedule import WarmupPolyDecay, make_schedulers, set_step

__all__ = ["DataOrder", "derive_seed", "main", "training_function"]

# Purposes mixed into derived seeds so the streams never coincide.
_SEED_FLIP, _SEED_HEAD_RESHARD, _SEED_TORCH_RESHARD, _SEED_DATA, _SEED_TORCH = 1, 2, 3, 4, 5


def derive_seed(*parts: int) -> int:
    """A 63-bit seed derived from non-negative integers (``numpy.random.SeedSequence``): distinct
    tuples give independent streams, unlike ``seed + rank`` arithmetic."""
    if any(int(p) < 0 for p in parts):
        raise ValueError(f"seed parts must be non-negative integers, got {parts}")
    words = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return ((int(words[0]) << 32) | int(words[1])) & ((1 << 63) - 1)


# ---------------------------------------------------------------------------------------- data order
class DataOrder:
    """Seeded, epoch-aware, rank-sharded order of dataset indices.

    Epoch ``e`` is ``randperm(num_samples)`` drawn from a generator seeded by ``(seed, e)``; it is cut
    into ``num_samples // (batch_size * world_size)`` global micro-batches (the remainder is
    dropped, so every rank always sees ``batch_size`` samples); rank ``r`` takes rows
    ``[r * batch_size, (r + 1) * batch_size)`` of each. Micro-batch ``m`` (counting from the start of
    training, across epochs) is therefore a pure function of ``(seed, m, rank)``.
    """

    def __init__(self, num_samples: int, batch_size: int, world_size: int, seed: int):
        if batch_size < 1 or world_size < 1:
            raise ValueError(f"batch_size and world_size must be >= 1, got {batch_size} and {world_size}")
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.global_batch = self.batch_size * self.world_size
        if self.num_samples < self.global_batch:
            raise ValueError(
                f"the dataset has {self.num_samples} samples, fewer than one global batch "
                f"(batch_size {self.batch_size} x {self.world_size} processes = {self.global_batch})"
            )
        self.batches_per_epoch = self.num_samples // self.global_batch
        self._cache: tuple[int, torch.Tensor] | None = None

    def permutation(self, epoch: int) -> torch.Tensor:
        """The index order of ``epoch`` (int64, ``(num_samples,)``)."""
        if self._cache is None or self._cache[0] != epoch:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, _SEED_DATA, epoch))
            self._cache = (epoch, torch.randperm(self.num_samples, generator=gen))
        return self._cache[1]

    def indices(self, micro_batch: int, rank: int) -> list[int]:
        """Dataset indices of ``rank``'s part of global micro-batch ``micro_batch``."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {rank}")
        epoch, b = divmod(int(micro_batch), self.batches_per_epoch)
        start = b * self.global_batch + rank * self.batch_size
        return self.permutation(epoch)[start : start + self.batch_size].tolist()

    def state(self, micro_batches: int) -> dict[str, int]:
        """A plain dict locating the position after ``micro_batches`` consumed micro-batches."""
        epoch, b = divmod(int(micro_batches), self.batches_per_epoch)
        return {
            "seed": self.seed,
            "num_samples": self.num_samples,
            "global_batch": self.global_batch,
            "micro_batches": int(micro_batches),
            "epoch": epoch,
            "batch_in_epoch": b,
            "samples_in_epoch": b * self.global_batch,
        }

    def position_from(self, state: dict[str, int]) -> int:
        """The micro-batch index to continue from after a checkpoint's ``state``. With the same
        global batch this is exactly the saved position; with a different one (another number of
        processes) it is the first whole batch at or after the saved sample offset in the same epoch."""
        if state["num_samples"] != self.num_samples or state["seed"] != self.seed:
            raise ValueError(
                f"checkpoint data order (num_samples={state['num_samples']}, seed={state['seed']}) does not "
                f"match this run (num_samples={self.num_samples}, seed={self.seed})"
            )
        if state["global_batch"] == self.global_batch:
            return int(state["micro_batches"])
        within = -(-int(state["samples_in_epoch"]) // self.global_batch)  # ceil: never repeat a sample
        if within >= self.batches_per_epoch:
            return (int(state["epoch"]) + 1) * self.batches_per_epoch
        return int(state["epoch"]) * self.batches_per_epoch + within


class _BatchSampler:
    """Index lists of micro-batches ``start .. stop - 1`` for one rank (a DataLoader batch_sampler)."""

    def __init__(self, order: DataOrder, rank: int, start: int, stop: int):
        self.order, self.rank, self.start, self.stop = order, rank, start, stop

    def __iter__(self) -> Iterator[list[int]]:
        for m in range(self.start, self.stop):
            yield self.order.indices(m, self.rank)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


# ------------------------------------------------------------------------------------------- helpers
def _resolve(path: str | os.PathLike) -> Path:
    """Relative paths are taken from the repository root when there is one, else the cwd."""
    p = Path(path)
    if p.is_absolute():
        return p
    try:
        from pfclib.paths import repo_root

        return repo_root() / p
    except FileNotFoundError:
        return Path.cwd() / p


def _export_group_env() -> None:
    """When a process group already exists (e.g. :func:`pfclib.multiproc.run_gloo`, a notebook that
    called ``init_process_group``) but no launcher set the environment, tell accelerate about it;
    otherwise it would treat every process as a lone rank 0."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    defaults = {
        "RANK": dist.get_rank(),
        "WORLD_SIZE": dist.get_world_size(),
        "LOCAL_RANK": dist.get_rank(),
        "LOCAL_WORLD_SIZE": dist.get_world_size(),
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, str(value))


def _make_accelerator(config: TrainConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={config.device!r} but CUDA is not available; use 'cpu' or 'auto'")
    use_cpu = config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available())
    _export_group_env()
    # A notebook may call training_function repeatedly with other settings; accelerate's state is a
    # process-wide singleton that refuses changes, so start from a clean one (the group survives).
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=use_cpu, mixed_precision=config.mixed_precision)
    expected = os.environ.get("WORLD_SIZE")
    if expected is not None and int(expected) != accelerator.num_processes:
        raise RuntimeError(
            f"WORLD_SIZE={expected} but accelerate runs {accelerator.num_processes} process(es) "
            f"({accelerator.distributed_type}); on CPU launch with torchrun or 'accelerate launch --multi_gpu'"
        )
    if dist.is_initialized() and dist.get_world_size() != accelerator.num_processes:
        raise RuntimeError(
            f"the process group has {dist.get_world_size()} ranks but accelerate sees {accelerator.num_processes}"
        )
    return accelerator


def _gather_objects(obj: Any, world_size: int) -> list[Any]:
    if world_size == 1:
        return [obj]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def _broadcast_object(obj: Any, world_size: int) -> Any:
    if world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _head_generator(head: nn.Module) -> torch.Generator:
    """The class sampler's generator of the head (where pfclib.PartialFC keeps it)."""
    for owner in (head, getattr(head, "sampler", None)):
        gen = getattr(owner, "generator", None)
        if isinstance(gen, torch.Generator):
            return gen
    raise AttributeError(f"cannot find the sampling generator of {type(head).__name__}")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


class _CsvLog:
    """Rank-0 CSV log, one row per logged step, flushed as it goes. On resume, rows beyond the
    resumed step (written by the interrupted run after its last checkpoint) are dropped."""

    def __init__(self, path: Path, fields: Sequence[str], resume_step: int | None):
        self.path, self.fields = path, list(fields)
        rows: list[dict[str, str]] = []
        if resume_step is not None and path.is_file():
            with path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step") and int(r["step"]) <= resume_step]
        with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.fields, restval="", extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        self._file = path.open("a", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=self.fields, restval="", extrasaction="ignore")

    def write(self, row: dict[str, Any]) -> None:
        self._writer.writerow(row)
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _saved_lr(ckpt: dict[str, Any], step: int) -> float:
    """The backbone's learning rate at ``step`` under the schedule a checkpoint was trained with."""
    try:
        saved = ckpt["scheduler"][0]
        return float(saved["base_lrs"][0] * WarmupPolyDecay(**saved["lr_lambdas"][0])(step))
    except (KeyError, IndexError, TypeError):
        return float("nan")


def _build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    o = config.optim
    params = [p for p in model.parameters() if p.requires_grad]
    if o.optimizer == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


def _total_steps(config: TrainConfig, order: DataOrder) -> int:
    if config.max_steps is not None:
        return config.max_steps
    micro = config.num_epochs * order.batches_per_epoch
    return max(1, math.ceil(micro / config.optim.gradient_accumulation_steps))


def _load_verification_sets(config: TrainConfig) -> list[tuple[str, Any]]:
    from pfclib.data import load_verification

    sets, seen = [], set()
    for path in config.eval.verification:
        vset = load_verification(_resolve(path), image_size=config.image_size)
        vset.check_usable(config.eval.nfolds)  # before training, not at the first evaluation
        name = getattr(vset, "name", None) or Path(path).stem
        base, i = name, 1
        while name in seen:
            i += 1
            name = f"{base}_{i}"
        seen.add(name)
        sets.append((name, vset))
    return sets


def _verify(accelerator, model: nn.Module, vsets, config: TrainConfig) -> dict[str, dict]:
    """Verification on rank 0 (the backbone is replicated), results broadcast to every rank."""
    from pfclib import eval as pfe

    results: dict[str, dict] = {}
    if accelerator.is_main_process and vsets:
        net = accelerator.unwrap_model(model)
        was_training = net.training
        net.eval()
        try:
            for name, vset in vsets:
                res = pfe.evaluate_verification(
                    net,
                    vset,
                    batch_size=config.eval.batch_size,
                    flip=config.eval.flip,
                    nfolds=config.eval.nfolds,
                )
                results[name] = _jsonable(res)
        finally:
            net.train(was_training)
    return _broadcast_object(results, accelerator.num_processes)


# ------------------------------------------------------------------------------------ the training run
def training_function(
    config: TrainConfig | dict[str, Any], callback: Callable[[str, dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Train as ``config`` says; return the final metrics (same dict on every rank).

    ``callback(event, info)``, when given, is called on every rank with ``event`` ``"start"`` (after
    any resume, before the first step), ``"step"`` (after each optimizer step) and ``"end"``;
    ``info`` holds ``step`` (steps completed), ``model`` (the un-wrapped backbone), ``head``,
    ``optimizers`` (backbone, head) and, for ``"step"``, ``loss``. Use it to record extra
    statistics from a notebook; raising from it aborts the run like a kill (no final checkpoint).

    Returns a dict with ``steps`` (optimizer steps completed), ``start_step``, ``total_steps``,
    ``world_size``, ``loss_history`` (per-step loss of this run, from ``start_step``), ``final_loss``
    (last step), ``final_loss_avg`` (mean of the last ``min(10, n)`` steps), ``samples_per_s``
    (images per second over all processes, training time only), ``verification`` (``{set name:
    evaluate_verification result}`` of the last evaluation), ``checkpoint`` (last file written or
    None), ``resumed_from``, ``stopped_early``. Rank 0 also writes it to ``<output_dir>/metrics.json``.
    """
    if isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig or a dict, got {type(config).__name__}")

    from pfclib import models
    from pfclib.data import build_dataset, random_hflip
    from pfclib.head import PartialFC

    accelerator = _make_accelerator(config)
    rank, world = accelerator.process_index, accelerator.num_processes
    device = accelerator.device
    is_main = accelerator.is_main_process
    # torch's global generator (dropout, ...): per rank, from the seed; restored exactly on resume
    torch.manual_seed(derive_seed(config.seed, _SEED_TORCH, rank))
    out_dir = _resolve(config.output_dir)
    o = config.optim
    accum = o.gradient_accumulation_steps
    resume_path = resolve_resume(config.resume, out_dir)
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)

    # ---- data
    data_path = _resolve(config.data.path)
    if config.data.kind == "synthetic" and config.data.generate:
        with accelerator.main_process_first():
            if is_main and not (data_path / "meta.json").is_file():
                from pfclib.data import synthetic

                accelerator.print(f"generating synthetic data into {data_path}")
                synthetic.generate(synthetic.SyntheticConfig(**config.data.generate), data_path)
    dataset = build_dataset(config.data.kind, data_path, image_size=config.image_size)
    num_classes = config.head.num_classes or int(dataset.num_classes)
    if num_classes < int(dataset.num_classes):
        raise ValueError(f"head.num_classes={num_classes} but the dataset has {dataset.num_classes} classes")
    order = DataOrder(len(dataset), config.data.batch_size, world, config.seed)
    total_steps = _total_steps(config, order)

    # ---- backbone (+ DDP through accelerate) and head (never prepared)
    model = models.create(
        config.backbone,
        embedding_size=config.embedding_size,
        image_size=config.image_size,
        seed=config.seed,
        **config.backbone_kwargs,
    )
    backbone_opt_raw = _build_optimizer(model, config)
    model, backbone_opt = accelerator.prepare(model, backbone_opt_raw)
    head = PartialFC(
        num_classes,
        config.embedding_size,
        sample_rate=config.head.sample_rate,
        margin=config.head.margin,
        update=config.head.update,
        chunk_size=config.head.chunk_size,
        track_updates=config.head.track_updates,
        seed=config.seed,
        device=device,
    )
    if head.world_size != world:
        raise RuntimeError(f"the head sees {head.world_size} ranks but accelerate runs {world} processes")
    head_opt = head.make_optimizer(
        o.optimizer,
        lr=o.head_lr if o.head_lr is not None else o.lr,
        momentum=o.momentum,
        weight_decay=o.weight_decay,
        betas=tuple(o.betas),
        eps=o.eps,
    )
    schedule = WarmupPolyDecay(total_steps, min(o.warmup_steps, total_steps), o.power, o.min_lr_ratio)
    schedulers = make_schedulers([backbone_opt_raw, head_opt], schedule)
    peak_lrs = (o.lr, o.head_lr if o.head_lr is not None else o.lr)
    scaler = accelerator.scaler  # a GradScaler for fp16 only

    # ---- resume
    start_step, micro_offset, loss_history_before = 0, 0, 0
    if resume_path is not None:
        ckpt = load_checkpoint(resume_path, map_location="cpu")
        saved_world = int(ckpt.get("world_size", len(ckpt.get("head_rng", [])) or 1))
        applied, refused = resume_changes(ckpt["config"], config.to_dict(), saved_world, world)
        if refused:
            raise ValueError(
                f"cannot resume {resume_path} with these settings changed: {'; '.join(refused)}. They shape "
                "the model, the data or the optimizer state the checkpoint holds: set them back to the "
                "checkpoint's values, or start a new run in another output_dir"
            )
        start_step = int(ckpt["step"])
        accelerator.unwrap_model(model).load_state_dict(ckpt["backbone"])
        backbone_opt_raw.load_state_dict(ckpt["backbone_optimizer"])
        head.load_full_state_dict(ckpt["head"], optimizer=head_opt)
        # The schedule and peak rates are this run's (the checkpoint's unless max_steps, lr, ... were
        # changed above): the schedulers' saved counters are loaded, not their schedule (LambdaLR
        # would write the old parameters into the shared schedule object) nor their peak rates;
        # set_step puts every rate at start_step with LambdaLR's arithmetic, bitwise what an
        # uninterrupted run has.
        for sched, sd in zip(schedulers, ckpt.get("scheduler", [])):
            keep = {k: v for k, v in sd.items() if k not in ("lr_lambdas", "base_lrs")}
            sched.load_state_dict({**keep, "lr_lambdas": [None] * len(sched.lr_lambdas)})
        for sched, peak in zip(schedulers, peak_lrs):
            sched.base_lrs = [peak] * len(sched.optimizer.param_groups)
            for group in sched.optimizer.param_groups:
                group["initial_lr"] = peak
        set_step(schedulers, start_step)
        for line in applied:
            accelerator.print(f"resume: {line} (applied)")
        if applied:
            accelerator.print(
                f"resume: schedule {schedule!r}; backbone lr at step {start_step}: "
                f"{_saved_lr(ckpt, start_step):.6g} under the checkpoint's settings -> {schedulers[0].get_last_lr()[0]:.6g}"
            )
        if scaler is not None and ckpt.get("grad_scaler"):
            scaler.load_state_dict(ckpt["grad_scaler"])
        if saved_world == world:
            _head_generator(head).set_state(ckpt["head_rng"][rank])
            torch.set_rng_state(ckpt["rng"]["torch"][rank])
            cuda_states = ckpt["rng"].get("cuda")
            if cuda_states and device.type == "cuda":
                torch.cuda.set_rng_state(cuda_states[rank], device)
        else:
            _head_generator(head).manual_seed(derive_seed(config.seed, _SEED_HEAD_RESHARD, start_step, rank))
            torch.manual_seed(derive_seed(config.seed, _SEED_TORCH_RESHARD, start_step, rank))
            accelerator.print(
                f"resuming a {saved_world}-process checkpoint on {world} process(es): centers and their optimizer "
                f"rows re-sharded; sampler and torch generators re-seeded from (seed={config.seed}, "
                f"step={start_step}, rank)"
            )
        micro_offset = order.position_from(ckpt["data_state"])
        loss_history_before = len(ckpt.get("metrics", {}).get("loss_history", []))
        accelerator.print(f"resumed from {resume_path} at step {start_step}")
        del ckpt
    elif config.resume is not None:
        accelerator.print(
            f"resume={config.resume!r}: no checkpoint in {out_dir / 'checkpoints'}, starting fresh"
        )

    def micro_index(step: int, micro: int) -> int:
        return micro_offset + (step - start_step) * accum + micro

    end_step = total_steps if config.stop_after is None else min(total_steps, config.stop_after)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=_BatchSampler(
            order, rank, micro_index(start_step, 0), micro_index(max(end_step, start_step), 0)
        ),
        num_workers=config.data.num_workers,
        pin_memory=device.type == "cuda",
        # its own generator: a DataLoader iterator otherwise draws its base seed from the global one
        generator=torch.Generator().manual_seed(derive_seed(config.seed, _SEED_DATA, rank, start_step)),
    )
    batches = iter(loader)

    # ---- logging (rank 0)
    vsets, error = [], None
    if is_main:  # the sets live on rank 0; a bad one stops every rank, before the first step
        try:
            vsets = _load_verification_sets(config)
        except (OSError, ValueError) as exc:
            error = exc
    problem = _broadcast_object(None if error is None else f"{type(error).__name__}: {error}", world)
    if error is not None:
        raise error
    if problem is not None:
        raise ValueError(f"eval.verification failed on rank 0: {problem}")
    vnames = [name for name, _ in vsets]
    csv_log = tb = None
    if is_main:
        accelerator.print(
            f"training {config.backbone} + PartialFC(C={num_classes}, r={config.head.sample_rate}, "
            f"update={config.head.update}) on {world} process(es), device {device}, steps {start_step}->{end_step} "
            f"of {total_steps}, global batch {order.global_batch * accum}"
        )
        if config.log.csv:
            fields = ["step", "epoch", "loss", "lr", "head_lr", "grad_norm", "samples_per_s", "elapsed_s"]
            fields += [f"{n}/{k}" for n in vnames for k in ("acc", "acc_std", "auc")]
            csv_log = _CsvLog(out_dir / "log.csv", fields, start_step if resume_path is not None else None)
        if config.log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            tb = SummaryWriter(
                str(out_dir / "tensorboard"), purge_step=start_step + 1 if resume_path else None
            )
    show_bar = config.log.progress == "on" or (config.log.progress == "auto" and sys.stderr.isatty())
    from tqdm.auto import tqdm

    bar = tqdm(total=end_step, initial=start_step, disable=not (is_main and show_bar), desc="train")

    # ---- checkpoint (collective: every rank joins)
    last_checkpoint: Path | None = None
    loss_history: list[float] = []

    def save(step: int) -> Path:
        full_head = head.full_state_dict(optimizer=head_opt)
        head_rng = _gather_objects(_head_generator(head).get_state(), world)
        torch_rng = _gather_objects(torch.get_rng_state(), world)
        cuda_rng = _gather_objects(torch.cuda.get_rng_state(device), world) if device.type == "cuda" else None
        path = checkpoint_path(out_dir, step)
        if is_main:
            state = {
                "format": CHECKPOINT_FORMAT,
                "config": config.to_dict(),
                "step": step,
                "world_size": world,
                "backbone": accelerator.unwrap_model(model).state_dict(),
                "backbone_optimizer": backbone_opt_raw.state_dict(),
                "scheduler": [s.state_dict() for s in schedulers],
                "head": full_head,
                "head_rng": head_rng,
                "data_state": order.state(micro_index(step, 0)),
                "rng": {"torch": torch_rng, "cuda": cuda_rng},
                "grad_scaler": scaler.state_dict() if scaler is not None else None,
                "metrics": {"loss_history": list(loss_history), "start_step": start_step},
            }
            save_checkpoint(state, path)
            prune_checkpoints(out_dir, config.checkpoint.keep)
        accelerator.wait_for_everyone()
        return path

    def notify(event: str, step: int, **extra: Any) -> None:
        if callback is not None:
            info = {"step": step, "model": accelerator.unwrap_model(model), "head": head}
            callback(event, {**info, "optimizers": (backbone_opt_raw, head_opt), **extra})

    # ---- the loop
    model.train()
    head.train()
    notify("start", start_step)
    verification: dict[str, dict] = {}
    train_time, window_time, window_steps = 0.0, 0.0, 0
    images_per_step = order.global_batch * accum
    step = start_step
    for step in range(start_step, end_step):
        t0 = time.perf_counter()
        step_loss = 0.0
        for micro in range(accum):
            images, labels = next(batches)
            if config.data.hflip:
                gen = torch.Generator().manual_seed(derive_seed(config.seed, _SEED_FLIP, rank, step, micro))
                images = random_hflip(images, gen)
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            sync = micro == accum - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                embeddings = model(images)
                loss = head(embeddings, labels)  # fp32, the global mean over all ranks' samples
                accelerator.backward(loss / accum)
            step_loss += loss.item() / accum
        grad_norm = float("nan")
        if o.grad_clip is not None:
            grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), o.grad_clip))
        if scaler is not None:
            scaler.step(head_opt)  # before backbone_opt.step(), which also calls scaler.update()
        else:
            head_opt.step()
        backbone_opt.step()
        backbone_opt.zero_grad(set_to_none=True)
        head_opt.zero_grad(set_to_none=True)
        lr, head_lr = backbone_opt_raw.param_groups[0]["lr"], head_opt.param_groups[0]["lr"]
        for sched in schedulers:
            sched.step()
        elapsed = time.perf_counter() - t0
        train_time += elapsed
        window_time += elapsed
        window_steps += 1
        loss_history.append(step_loss)
        done = step + 1
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.3g}")
        notify("step", done, loss=step_loss)

        evaluate_now = config.eval.every > 0 and done % config.eval.every == 0
        evaluate_now |= done == total_steps and config.eval.at_end
        if evaluate_now and config.eval.verification:
            verification = _verify(accelerator, model, vsets, config)
        if is_main and (done % config.log.every == 0 or done == end_step or evaluate_now):
            row = {
                "step": done,
                "epoch": f"{micro_index(done, 0) / order.batches_per_epoch:.4f}",
                "loss": f"{step_loss:.6f}",
                "lr": f"{lr:.6g}",
                "head_lr": f"{head_lr:.6g}",
                "grad_norm": f"{grad_norm:.6g}",
                "samples_per_s": f"{images_per_step * window_steps / max(window_time, 1e-9):.2f}",
                "elapsed_s": f"{train_time:.3f}",
            }
            if evaluate_now:
                for name, res in verification.items():
                    for k in ("acc", "acc_std", "auc"):
                        if k in res:
                            row[f"{name}/{k}"] = f"{float(res[k]):.6f}"
            if csv_log is not None:
                csv_log.write(row)
            if tb is not None:
                tb.add_scalar("train/loss", step_loss, done)
                tb.add_scalar("train/lr", lr, done)
                tb.add_scalar("train/samples_per_s", float(row["samples_per_s"]), done)
                if evaluate_now:
                    for name, res in verification.items():
                        for k in ("acc", "auc"):
                            if k in res:
                                tb.add_scalar(f"verification/{name}/{k}", float(res[k]), done)
            window_time, window_steps = 0.0, 0
        save_now = config.checkpoint.every > 0 and done % config.checkpoint.every == 0
        save_now |= done == total_steps and config.checkpoint.at_end
        if save_now:
            last_checkpoint = save(done)
    bar.close()
    notify("end", max(end_step, start_step))
    steps_done = end_step if end_step > start_step else start_step
    stopped_early = steps_done < total_steps

    metrics = {
        "steps": steps_done,
        "start_step": start_step,
        "total_steps": total_steps,
        "world_size": world,
        "global_batch": images_per_step,
        "loss_history": loss_history,
        "loss_history_offset": loss_history_before,
        "final_loss": loss_history[-1] if loss_history else None,
        "final_loss_avg": float(np.mean(loss_history[-10:])) if loss_history else None,
        "samples_per_s": images_per_step * len(loss_history) / train_time if train_time > 0 else None,
        "train_time_s": train_time,
        "verification": verification,
        "checkpoint": str(last_checkpoint) if last_checkpoint is not None else None,
        "resumed_from": str(resume_path) if resume_path is not None else None,
        "stopped_early": stopped_early,
    }
    if is_main:
        if csv_log is not None:
            csv_log.close()
        if tb is not None:
            tb.close()
        write_json(out_dir / "metrics.json", _jsonable(metrics))
        summary = f"done: step {steps_done}/{total_steps}"
        if loss_history:
            summary += f", loss {loss_history[0]:.4f} -> {loss_history[-1]:.4f}"
        for name, res in verification.items():
            summary += f", {name} acc {res.get('acc', float('nan')):.4f}"
        accelerator.print(summary)
    accelerator.wait_for_everyone()
    return metrics


# ------------------------------------------------------------------------------------------------- CLI
def _parse_set(items: Sequence[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects key=value (e.g. optim.lr=0.05), got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command line: ``--config FILE [--section KEY] [--set key=value ...] [--resume PATH|auto]``."""
    parser = argparse.ArgumentParser(prog="python -m pfclib.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML file with a TrainConfig")
    parser.add_argument(
        "--section", default=None, help="(dotted) key of the config inside the file, e.g. train"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value (dotted key, YAML value), e.g. --set optim.lr=0.05; repeatable",
    )
    parser.add_argument(
        "--resume", default=None, help="a checkpoint path, or 'auto' for the newest in output_dir"
    )
    args = parser.parse_args(argv)
    config = TrainConfig.from_yaml(args.config, section=args.section)
    overrides = _parse_set(args.overrides)
    if args.resume is not None:
        overrides["resume"] = args.resume
    if overrides:
        config = config.replace(**overrides)
    return training_function(config)


if __name__ == "__main__":
    main()
