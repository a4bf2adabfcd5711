"""Train a backbone with a Partial FC head, with exact resume.

Run it as a script (one process, or several under a launcher)::

    python -m pfclib.train --config configs/tiny_cpu.yaml
    python -m pfclib.train --config params.yaml --section train --set optim.lr=0.05 --resume auto
    torchrun --standalone --nproc_per_node 2 -m pfclib.train --config configs/tiny_cpu.yaml
    accelerate launch --multi_gpu --num_processes 2 -m pfclib.train --config ...

or call :func:`training_function` from Python or a notebook (one process, no launcher needed).

:func:`training_function` reads top to bottom:

1. **Set-up.** An ``Accelerator`` (``cpu=True`` when no CUDA is used, so torchrun on CPU gives a
   real gloo group); the data set and its order (:class:`pfclib.data.order.DataOrder`: a seeded
   permutation per epoch, global micro-batch ``m`` a pure function of ``(seed, m, rank)``); the
   backbone and its optimizer through one ``accelerator.prepare`` (DDP); the head
   (:class:`pfclib.PartialFC`), built afterwards so it sees the process group and never prepared
   (its rows are a shard, not a replica), with its optimizer from ``head.make_optimizer``; one
   warm-up + polynomial schedule for both optimizers.
2. **Start.** Resume from a checkpoint (:func:`pfclib.run_state.restore`: bitwise on the same
   number of processes, re-sharded on another), or take another run's backbone (``init_from``), or
   start fresh.
3. **The loop.** One optimizer step = ``gradient_accumulation_steps`` micro-batches, each loss
   divided by that number, DDP synchronising on the last one; a non-finite loss stops the run
   (nothing after the last good checkpoint is written); the backbone gradient is clipped; both
   optimizers step, both schedules advance. With ``quality.enabled`` (CR-FIQA, :mod:`pfclib.quality`)
   each micro-batch's loss adds ``quality.weight`` times the SmoothL1 loss of a linear quality
   branch on the embeddings against the certainty ratio of the head's forward (no gradient); the
   branch is the backbone optimizer's second parameter group, its gradient averaged over the
   ranks by hand (it is not in DDP). Every ``eval.every`` steps rank 0 scores the
   verification sets; every ``checkpoint.every`` steps all ranks join
   :func:`pfclib.run_state.capture` and rank 0 writes one file atomically.
4. **Report** (:class:`pfclib.logs.TrainLog`, rank 0): ``log.csv``, TensorBoard, a tqdm bar on a
   terminal or plain lines elsewhere, ``metrics.json`` and a closing summary.

Paths: in a config file relative paths are taken from the file's folder; on the command line
(``--set data.path=...``) from the current folder; in a config given as a dict, from the current folder.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn

from pfclib.checkpoint import (
    load_checkpoint,
    remove_stale_temp_files,
    resolve_resume,
)
from pfclib.config import TrainConfig
from pfclib.data.order import BatchSampler, DataOrder
from pfclib.io import RunLock, write_json
from pfclib.logs import TrainLog
from pfclib.run_state import RunParts, broadcast_object, restore, save
from pfclib.schedule import WarmupPolyDecay, make_schedulers
from pfclib.seeding import SEED_DATA, SEED_FLIP, SEED_QUALITY, SEED_TORCH, derive_seed

__all__ = ["DataOrder", "derive_seed", "main", "training_function"]


# ------------------------------------------------------------------------------------------- helpers
def _resolve(path: str | os.PathLike) -> Path:
    """A path as the trainer uses it: relative paths are taken from the current folder."""
    return Path(path).expanduser().absolute()


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
    if use_cpu and config.mixed_precision == "fp16":
        raise ValueError(
            f"mixed_precision='fp16' needs a CUDA device (fp16 autocast with a gradient scaler), but this run "
            f"is on the CPU (device={config.device!r}); set mixed_precision to 'bf16' or 'no'"
        )
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


def _build_optimizer(
    model: nn.Module, config: TrainConfig, quality: nn.Module | None = None
) -> torch.optim.Optimizer:
    """The backbone's optimizer; the quality branch, when there is one, is its second parameter
    group (same rate, schedule, momentum and weight decay, as a layer of the backbone would be)."""
    o = config.optim
    params: Any = [p for p in model.parameters() if p.requires_grad]
    if quality is not None:
        params = [{"params": params}, {"params": list(quality.parameters())}]
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
    return broadcast_object(results, accelerator.num_processes)


def _verification_warnings(config: TrainConfig, data_path: Path) -> list[str]:
    """Why the evaluation of a run on one's own data would say nothing about it, if it would."""
    kind = config.data.kind
    if kind == "synthetic":
        return []
    make = (
        f"make pairs from held-out identities of your data with `python -m pfclib.data.pairs --data {data_path} "
        f"--kind {kind} --out pairs.bin` and set eval.verification to it"
    )
    if not config.eval.verification:
        return [
            f"data.kind={kind!r} and eval.verification names no verification set: this run reports its loss only; {make}"
        ]
    out = []
    for v in config.eval.verification:
        p = _resolve(v)
        if (p.parent / "meta.json").is_file() and p.parent != data_path:
            out.append(
                f"eval.verification {str(p)!r} holds the pairs of a synthetic data set, unrelated to the "
                f"{kind} data at {data_path}: its scores say nothing about this model on your identities; {make}"
            )
    return out


def _init_backbone(model: nn.Module, config: TrainConfig, num_classes: int) -> str:
    """Load the backbone weights of another run (``init_from``) into ``model``; return the notice."""
    from pfclib.checkpoint import resolve_checkpoint

    path = resolve_checkpoint(_resolve(config.init_from))
    ckpt = load_checkpoint(path, map_location="cpu")
    saved = ckpt["config"]
    wrong = [
        f"{key} {saved.get(key, {} if key == 'backbone_kwargs' else None)!r} there, {getattr(config, key)!r} here"
        for key in ("backbone", "embedding_size", "image_size", "backbone_kwargs")
        if saved.get(key, {} if key == "backbone_kwargs" else None) != getattr(config, key)
    ]
    if wrong:
        raise ValueError(
            f"init_from {str(path)!r}: its backbone does not fit this run ({'; '.join(wrong)}); set these "
            "to the checkpoint's values to fine-tune from it"
        )
    model.load_state_dict(ckpt["backbone"], strict=True)
    return (
        f"init_from: backbone weights of {path} (step {int(ckpt['step'])}, trained with "
        f"{ckpt['head'].get('num_classes', '?')} classes); a new head for {num_classes} classes, new optimizers"
    )


def _quality_loss(head: nn.Module, quality: nn.Module, embeddings: torch.Tensor, config: TrainConfig):
    """This rank's CR-FIQA loss: SmoothL1 between the branch's prediction on the embeddings and the
    certainty ratio of the head's forward just done (collective; :mod:`pfclib.quality`)."""
    from pfclib.quality import certainty_ratio, quality_loss

    cr = certainty_ratio(head, embeddings, eps=config.quality.eps).cr
    return quality_loss(quality(embeddings), cr, beta=config.quality.beta)


def _global_mean(x: torch.Tensor, world: int) -> float:
    """Collective: the mean over ranks of a scalar."""
    if world > 1:
        x = x.detach().double().clone()
        dist.all_reduce(x)
        x /= world
    return float(x)


def _average_gradients(module: nn.Module, world: int) -> None:
    """Collective: each parameter's gradient averaged over ranks (what DDP does for the backbone)."""
    for p in module.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= world


def _due(done: int, every: int, total_steps: int, at_end: bool) -> bool:
    return (every > 0 and done % every == 0) or (done == total_steps and at_end)


def _all_finite(x: torch.Tensor, world: int) -> bool:
    """Collective: True when ``x`` is finite on every rank (so that all ranks stop together)."""
    flag = torch.isfinite(x).all().to(torch.int32)
    if world > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag)


def _diverged(step: int, what: str, last_checkpoint: Path | None) -> FloatingPointError:
    where = (
        f"the last checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint of this run yet"
    )
    return FloatingPointError(
        f"training diverged at step {step}: {what}; stopped before anything else was written ({where}). "
        "Lower optim.lr / optim.head_lr, raise optim.warmup_steps or set optim.grad_clip, then resume "
        "from that checkpoint or start again"
    )


# ------------------------------------------------------------------------------------ the training run
def training_function(
    config: TrainConfig | dict[str, Any], callback: Callable[[str, dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Train as ``config`` says; return the final metrics (same dict on every rank).

    ``callback(event, info)``, when given, is called on every rank with ``event`` ``"start"`` (after
    any resume, before the first step), ``"step"`` (after each optimizer step) and ``"end"``;
    ``info`` holds ``step`` (steps completed), ``model`` (the un-wrapped backbone), ``head``,
    ``optimizers`` (backbone, head), with ``quality.enabled`` ``quality`` (the
    :class:`pfclib.quality.QualityBranch`) and, for ``"step"``, ``loss``. Use it to record extra
    statistics from a notebook; raising from it aborts the run like a kill (no final checkpoint).

    Returns a dict with ``steps`` (optimizer steps completed), ``start_step``, ``total_steps``,
    ``world_size``, ``loss_history`` (per-step loss of this run, from ``start_step``), ``final_loss``
    (last step), ``final_loss_avg`` (mean of the last ``min(10, n)`` steps), ``samples_per_s``
    (images per second over all processes, training time only), ``verification`` (``{set name:
    evaluate_verification result}`` of the last evaluation), ``checkpoint`` (last file written or
    None), ``resumed_from``, ``stopped_early``. Rank 0 also writes it to ``<output_dir>/metrics.json``.

    Raises ``FloatingPointError`` when the loss or the weights become NaN or infinite (on every rank,
    before any further checkpoint is written).
    """
    if isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig or a dict, got {type(config).__name__}")
    accelerator = _make_accelerator(config)
    out_dir = _resolve(config.output_dir)
    # One run per output folder: rank 0 holds <output_dir>/.lock for the whole run (released on any
    # exit, by the kernel if the process dies); every rank learns whether it got it.
    lock, problem = None, None
    if accelerator.is_main_process:
        try:
            lock = RunLock(out_dir).acquire()
        except (RuntimeError, OSError) as exc:
            problem = str(exc)
    problem = broadcast_object(problem, accelerator.num_processes)
    if problem is not None:
        raise RuntimeError(problem)
    try:
        return _run(config, callback, accelerator, out_dir)
    finally:
        if lock is not None:
            lock.release()


def _run(config: TrainConfig, callback, accelerator, out_dir: Path) -> dict[str, Any]:
    """The body of :func:`training_function`, while this run holds its output folder."""
    from pfclib import models
    from pfclib.data import build_dataset, random_hflip
    from pfclib.head import PartialFC

    # ---- 1. set-up: processes, data, backbone (+ DDP), head, optimizers, schedule
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    is_main, say = accelerator.is_main_process, accelerator.print
    torch.manual_seed(derive_seed(config.seed, SEED_TORCH, rank))  # dropout etc.; restored on resume
    if is_main:
        for leftover in remove_stale_temp_files(out_dir):  # safe: no other run writes here
            say(f"removed {leftover}, left by an interrupted checkpoint write")
    resume_path = resolve_resume(config.resume, out_dir, log=say)

    data_path = _resolve(config.data.path)
    if config.data.kind == "synthetic" and config.data.generate:
        with accelerator.main_process_first():
            if is_main and not (data_path / "meta.json").is_file():
                from pfclib.data import synthetic

                say(f"generating synthetic data into {data_path}")
                synthetic.generate(synthetic.SyntheticConfig(**config.data.generate), data_path)
    dataset = build_dataset(config.data.kind, data_path, image_size=config.image_size)
    num_classes = config.head.num_classes or int(dataset.num_classes)
    if num_classes < int(dataset.num_classes):
        raise ValueError(f"head.num_classes={num_classes} but the dataset has {dataset.num_classes} classes")
    order = DataOrder(len(dataset), config.data.batch_size, world, config.seed)
    total_steps = _total_steps(config, order)

    o, accum = config.optim, config.optim.gradient_accumulation_steps
    model = models.create(
        config.backbone,
        embedding_size=config.embedding_size,
        image_size=config.image_size,
        seed=config.seed,
        **config.backbone_kwargs,
    )
    quality = None
    if config.quality.enabled:  # CR-FIQA's quality branch (pfclib.quality); None costs nothing
        from pfclib.quality import QualityBranch

        quality = QualityBranch(config.embedding_size, seed=derive_seed(config.seed, SEED_QUALITY)).to(device)
    backbone_opt_raw = _build_optimizer(model, config, quality)
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
        sub_centers=config.head.sub_centers,
        dim_sample_rate=config.head.dim_sample_rate,
    )
    if head.world_size != world:
        raise RuntimeError(f"the head sees {head.world_size} ranks but accelerate runs {world} processes")
    head_lr = o.head_lr if o.head_lr is not None else o.lr
    head_opt = head.make_optimizer(
        o.optimizer,
        lr=head_lr,
        momentum=o.momentum,
        weight_decay=o.weight_decay,
        betas=tuple(o.betas),
        eps=o.eps,
    )
    schedule = WarmupPolyDecay(total_steps, min(o.warmup_steps, total_steps), o.power, o.min_lr_ratio)
    schedulers = make_schedulers([backbone_opt_raw, head_opt], schedule)
    parts = RunParts(
        config,
        world,
        rank,
        device,
        accelerator.unwrap_model(model),
        backbone_opt_raw,
        head,
        head_opt,
        schedulers,
        order,
        accelerator.scaler,
        quality,
    )

    # ---- 2. start: resume this run, or take another run's backbone, or start fresh
    start_step, micro_offset, history_offset = 0, 0, 0
    if resume_path is not None:
        ckpt = load_checkpoint(resume_path, map_location="cpu")
        micro_offset = restore(parts, ckpt, resume_path, (o.lr, head_lr), say)
        start_step = int(ckpt["step"])
        history_offset = len(ckpt.get("metrics", {}).get("loss_history", []))
        say(f"resumed from {resume_path} at step {start_step}")
        del ckpt
    else:
        if config.resume is not None:
            say(f"resume={config.resume!r}: no checkpoint in {out_dir / 'checkpoints'}, starting fresh")
        if config.init_from is not None:
            say(_init_backbone(parts.model, config, num_classes))

    def micro_index(step: int, micro: int = 0) -> int:
        return micro_offset + (step - start_step) * accum + micro

    end_step = total_steps if config.stop_after is None else min(total_steps, config.stop_after)
    batches = iter(
        torch.utils.data.DataLoader(
            dataset,
            batch_sampler=BatchSampler(
                order, rank, micro_index(start_step), micro_index(max(end_step, start_step))
            ),
            num_workers=config.data.num_workers,
            pin_memory=device.type == "cuda",
            # its own generator: a DataLoader iterator otherwise draws its base seed from the global one
            generator=torch.Generator().manual_seed(derive_seed(config.seed, SEED_DATA, rank, start_step)),
        )
    )

    # ---- verification sets (rank 0; a bad one stops every rank before the first step) and the log
    vsets, error = [], None
    if is_main:
        try:
            vsets = _load_verification_sets(config)
        except (OSError, ValueError) as exc:
            error = exc
    problem = broadcast_object(None if error is None else f"{type(error).__name__}: {error}", world)
    if error is not None:
        raise error
    if problem is not None:
        raise ValueError(f"eval.verification failed on rank 0: {problem}")
    images_per_step = order.global_batch * accum
    log = TrainLog(
        config,
        out_dir,
        active=is_main,
        vnames=[name for name, _ in vsets],
        start_step=start_step,
        end_step=end_step,
        total_steps=total_steps,
        resumed=resume_path is not None,
        images_per_step=images_per_step,
        extra_losses=["quality_loss"] if quality is not None else [],
    )
    log.say(
        f"training {config.backbone} + PartialFC(C={num_classes:,}, r={config.head.sample_rate}, "
        f"update={config.head.update}) on {world} process(es), device {device}, steps {start_step}->{end_step} "
        f"of {total_steps}, global batch {images_per_step}, output {out_dir}"
    )
    for text in _verification_warnings(config, data_path):
        log.warn(text)

    def notify(event: str, step: int, **extra: Any) -> None:
        if callback is not None:
            info = {
                "step": step,
                "model": parts.model,
                "head": head,
                "optimizers": (backbone_opt_raw, head_opt),
            }
            if quality is not None:
                info["quality"] = quality
            callback(event, {**info, **extra})

    # ---- 3. the loop
    loss_history: list[float] = []
    quality_history: list[float] = []
    last_checkpoint: Path | None = None
    verification: dict[str, dict] = {}
    train_time = 0.0
    try:  # a run that stops with an error still closes its log files
        model.train()
        head.train()
        notify("start", start_step)
        for step in range(start_step, end_step):
            t0 = time.perf_counter()
            step_loss = step_quality = 0.0
            for micro in range(accum):
                images, labels = next(batches)
                if config.data.hflip:
                    flips = torch.Generator().manual_seed(
                        derive_seed(config.seed, SEED_FLIP, rank, step, micro)
                    )
                    images = random_hflip(images, flips)
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                with contextlib.nullcontext() if micro == accum - 1 else accelerator.no_sync(model):
                    embeddings = model(images)
                    if not _all_finite(embeddings, world):
                        raise _diverged(
                            step + 1, "the backbone's embeddings hold NaN or inf", last_checkpoint
                        )
                    loss = head(embeddings, labels)  # fp32, the global mean over all ranks' samples
                    total = loss
                    if quality is not None:  # + lambda * SmoothL1(q(x), CR), CR without gradient
                        q_loss = _quality_loss(head, quality, embeddings, config)
                        total = loss + config.quality.weight * q_loss
                        step_quality += _global_mean(q_loss.detach(), world) / accum
                    accelerator.backward(total / accum)
                step_loss += loss.item() / accum
            if not (math.isfinite(step_loss) and math.isfinite(step_quality)):  # the same on every rank
                what = f"the loss is {step_loss}" + (
                    f", the quality loss {step_quality}" if quality is not None else ""
                )
                raise _diverged(step + 1, f"{what} (the mean over all processes)", last_checkpoint)
            if quality is not None and world > 1:  # not in DDP: average its gradient by hand
                _average_gradients(quality, world)
            grad_norm = float("nan")
            if o.grad_clip is not None:
                clipped = (
                    model.parameters() if quality is None else [*model.parameters(), *quality.parameters()]
                )
                grad_norm = float(accelerator.clip_grad_norm_(clipped, o.grad_clip))
            if accelerator.scaler is not None:
                accelerator.scaler.step(head_opt)  # before backbone_opt.step(), which calls scaler.update()
            else:
                head_opt.step()
            backbone_opt.step()
            backbone_opt.zero_grad(set_to_none=True)
            head_opt.zero_grad(set_to_none=True)
            lr, lr_head = backbone_opt_raw.param_groups[0]["lr"], head_opt.param_groups[0]["lr"]
            for sched in schedulers:
                sched.step()
            seconds = time.perf_counter() - t0
            train_time += seconds
            loss_history.append(step_loss)
            if quality is not None:
                quality_history.append(step_quality)
            done = step + 1
            notify("step", done, loss=step_loss)

            evaluated = None
            if _due(done, config.eval.every, total_steps, config.eval.at_end) and config.eval.verification:
                verification = evaluated = _verify(accelerator, model, vsets, config)
            log.step(
                done,
                loss=step_loss,
                lr=lr,
                head_lr=lr_head,
                grad_norm=grad_norm,
                epoch=micro_index(done) / order.batches_per_epoch,
                seconds=seconds,
                verification=evaluated,
                extra={"quality_loss": step_quality} if quality is not None else None,
            )
            if _due(done, config.checkpoint.every, total_steps, config.checkpoint.at_end):
                metrics_so_far = {"loss_history": list(loss_history), "start_step": start_step}
                last_checkpoint = save(parts, out_dir, done, micro_index(done), metrics_so_far)
    except BaseException:
        log.close()
        raise
    notify("end", max(end_step, start_step))

    # ---- 4. report
    steps_done = max(end_step, start_step)
    metrics = {
        "steps": steps_done,
        "start_step": start_step,
        "total_steps": total_steps,
        "world_size": world,
        "global_batch": images_per_step,
        "loss_history": loss_history,
        "loss_history_offset": history_offset,
        **({"quality_loss_history": quality_history} if quality is not None else {}),
        "final_loss": loss_history[-1] if loss_history else None,
        "final_loss_avg": float(np.mean(loss_history[-10:])) if loss_history else None,
        "samples_per_s": images_per_step * len(loss_history) / train_time if train_time > 0 else None,
        "train_time_s": train_time,
        "verification": verification,
        "checkpoint": str(last_checkpoint) if last_checkpoint is not None else None,
        "resumed_from": str(resume_path) if resume_path is not None else None,
        "stopped_early": steps_done < total_steps,
    }
    log.close()
    if is_main:
        write_json(out_dir / "metrics.json", _jsonable(metrics))
        log.summary(metrics, out_dir / "metrics.json", [_resolve(v) for v in config.eval.verification])
    accelerator.wait_for_everyone()
    return metrics


# ------------------------------------------------------------------------------------------------- CLI
def _parse_set(items: Sequence[str]) -> dict[str, Any]:
    """``key=value`` pairs, each value read as YAML, except that only ``true``/``false`` are
    booleans: ``--set mixed_precision=no`` or ``log.progress=off`` mean the words (YAML 1.1 would read
    them as false), and a word given for a true/false setting is refused by the config's type check."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects key=value (e.g. optim.lr=0.05), got {item!r}")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, bool) and value.strip().lower() not in ("true", "false"):
            parsed = value.strip()
        out[key.strip()] = parsed
    return out


_UNITS = {
    "data.batch_size": "images per process",
    "head.sample_rate": "r in (0, 1]",
    "head.update": "dense|sparse",
    "optim.optimizer": "sgd|adamw",
    "optim.warmup_steps": "steps",
    "optim.grad_clip": "L2 norm",
    "eval.every": "steps",
    "eval.batch_size": "images",
    "log.every": "steps",
    "log.progress": "auto|on|off",
    "checkpoint.every": "steps",
    "checkpoint.keep": "files",
    "max_steps": "optimizer steps",
    "mixed_precision": "no|fp16|bf16",
    "image_size": "pixels",
    "quality.weight": "lambda",
}


def _epilog() -> str:
    """The config keys by section (from the dataclasses, so the list cannot go stale), backbones, data kinds."""
    import dataclasses

    from pfclib import models
    from pfclib.data import DATASET_KINDS

    def keys(cls: type, prefix: str) -> str:
        out = []
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(f.type) or f.name in sections:
                continue
            unit = _UNITS.get(prefix + f.name)
            out.append(f"{f.name} ({unit})" if unit else f.name)
        return " ".join(out)

    import typing

    hints = typing.get_type_hints(TrainConfig)
    sections = [f.name for f in dataclasses.fields(TrainConfig) if dataclasses.is_dataclass(hints[f.name])]
    lines = ["config keys (pfclib.config documents each; every 'every' and *_steps counts optimizer steps):"]
    lines.append(f"  {'top level:':12s} {keys(TrainConfig, '')}")
    for name in sections:
        lines.append(f"  {name + ':':12s} {keys(hints[name], name + '.')}")
    lines += [
        f"backbones:    {' '.join(models.list_models())}",
        f"data kinds:   {' '.join(DATASET_KINDS)}",
        "paths:        relative paths in the config file are taken from its folder, those given with",
        "              --set or --resume from the current folder",
        "examples:     configs/tiny_cpu.yaml (synthetic, CPU), configs/example_folder.yaml,",
        "              configs/example_hf.yaml, configs/example_recordio.yaml",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command line: ``--config FILE [--section KEY] [--set key=value ...] [--resume PATH|auto]``."""
    parser = argparse.ArgumentParser(
        prog="python -m pfclib.train",
        description=__doc__.splitlines()[0],
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        required=True,
        help="YAML file with a training config (relative paths inside: from its folder)",
    )
    parser.add_argument(
        "--section",
        default=None,
        help="(dotted) key of the config inside the file, e.g. train for params.yaml",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value (dotted key, YAML value), e.g. --set optim.lr=0.05 or "
        "--set data.path=faces (relative to the current folder); repeatable",
    )
    parser.add_argument(
        "--resume",
        default=None,
        help="continue a run: a checkpoint file, or 'auto' for the newest checkpoint in output_dir (a fresh "
        "start when there is none)",
    )
    args = parser.parse_args(argv)
    config = TrainConfig.from_yaml(args.config, section=args.section)
    overrides = _parse_set(args.overrides)
    if args.resume is not None:
        overrides["resume"] = args.resume
    if overrides:
        # the file's paths are absolute by now (from its folder): what is still relative came from here
        config = config.replace(**overrides).resolve_paths(Path.cwd())
    return training_function(config)


if __name__ == "__main__":
    main()
