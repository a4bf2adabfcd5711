"""Training checkpoints: one plain dict per file, written atomically, loaded without executing code.

Layout (format ``"pfclib-checkpoint/1"``)::

    {
      "format": "pfclib-checkpoint/1",
      "config": TrainConfig.to_dict(),          # has "backbone", "embedding_size", "image_size"
      "step": int,                              # optimizer steps completed
      "world_size": int,                        # processes of the run that wrote it
      "backbone": state_dict,                   # the un-wrapped backbone (no DDP prefix)
      "backbone_optimizer": optimizer.state_dict(),
      "scheduler": [LambdaLR.state_dict(), ...],   # backbone's, head's
      "head": PartialFC.full_state_dict(optimizer),  # all (C, D) centers + per-row optimizer state
      "head_rng": [generator state per rank],   # the class samplers' generators (uint8 tensors)
      "data_state": {...},                      # position in the seeded data order
      "rng": {"torch": [per rank], "cuda": [per rank] or None},
      "grad_scaler": state_dict or None,        # fp16 only
      "metrics": {...},                         # loss history so far, for logs
    }

Only rank 0 writes (:func:`save_checkpoint` via :func:`pfclib.io.atomic_torch_save`: a crash never
leaves a half-written file); every rank reads the same file with ``torch.load(weights_only=True)``,
so everything stored is tensors and plain Python containers.

Files are ``<output_dir>/checkpoints/ckpt_<step:08d>.pt``; :func:`find_latest` picks the newest,
:func:`prune_checkpoints` keeps the newest K.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pfclib.io import atomic_torch_save

__all__ = [
    "CHECKPOINT_FORMAT",
    "REQUIRED_KEYS",
    "checkpoint_dir",
    "checkpoint_path",
    "find_latest",
    "list_checkpoints",
    "load_backbone",
    "load_checkpoint",
    "prune_checkpoints",
    "resolve_resume",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "pfclib-checkpoint/1"
REQUIRED_KEYS = ("format", "config", "step", "backbone", "head")
_NAME = re.compile(r"^ckpt_(\d+)\.pt$")


def checkpoint_dir(output_dir: str | os.PathLike) -> Path:
    """The folder holding a run's checkpoints: ``<output_dir>/checkpoints``."""
    return Path(output_dir) / "checkpoints"


def checkpoint_path(output_dir: str | os.PathLike, step: int) -> Path:
    """``<output_dir>/checkpoints/ckpt_<step:08d>.pt``."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return checkpoint_dir(output_dir) / f"ckpt_{step:08d}.pt"


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint files of a run, oldest first (by step number in the name)."""
    folder = checkpoint_dir(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name)) and p.is_file()]
    return [p for _, p in sorted(found)]


def find_latest(output_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint of a run, or None when it has none."""
    files = list_checkpoints(output_dir)
    return files[-1] if files else None


def prune_checkpoints(output_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints; return the deleted paths."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    files = list_checkpoints(output_dir)
    doomed = files[:-keep]
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed


def resolve_resume(resume: str | os.PathLike | None, output_dir: str | os.PathLike) -> Path | None:
    """Map a ``resume`` setting to a file: None -> None; ``"auto"`` -> the newest checkpoint in
    ``output_dir`` (None when there is none yet, so a first run and its restarts share one command);
    a path -> that path, which must exist (a folder means its newest checkpoint)."""
    if resume is None:
        return None
    if str(resume) == "auto":
        return find_latest(output_dir)
    path = Path(resume)
    if path.is_dir():
        latest = find_latest(path) or (find_latest(path.parent) if path.name == "checkpoints" else None)
        if latest is None:
            raise FileNotFoundError(f"resume folder {str(path)!r} holds no ckpt_<step>.pt checkpoint")
        return latest
    if not path.is_file():
        raise FileNotFoundError(f"resume checkpoint {str(path)!r} does not exist")
    return path


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` (a checkpoint dict, see module doc) atomically; return the path.

    Call it on one process only (rank 0); gathering every rank's shards is the caller's job.
    """
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise ValueError(f"checkpoint is missing key(s) {missing}; required: {list(REQUIRED_KEYS)}")
    if state["format"] != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint format must be {CHECKPOINT_FORMAT!r}, got {state['format']!r}")
    path = Path(path)
    atomic_torch_save(state, path)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)`` (no code runs) and check its format."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            f"{str(path)!r} is not a pfclib checkpoint: expected format {CHECKPOINT_FORMAT!r}, got {got!r}"
        )
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise ValueError(f"checkpoint {str(path)!r} is missing key(s) {missing}")
    return state


def load_backbone(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the trained backbone of a checkpoint: ``(model in eval mode, config dict)``.

    The network comes from ``pfclib.models.create(config["backbone"], config["embedding_size"],
    config["image_size"], **config["backbone_kwargs"])`` and its weights are loaded strictly.
    """
    from pfclib import models

    state = load_checkpoint(path, map_location=map_location)
    config = state["config"]
    for key in ("backbone", "embedding_size", "image_size"):
        if key not in config:
            raise ValueError(f"checkpoint {str(path)!r}: its config lacks {key!r} (keys: {sorted(config)})")
    model = models.create(
        config["backbone"],
        embedding_size=config["embedding_size"],
        image_size=config["image_size"],
        **config.get("backbone_kwargs", {}),
    )
    model.load_state_dict(state["backbone"], strict=True)
    model.to(map_location)
    model.eval()
    return model, config


# ------------------------------------------------------------------------------ resume policy
# What a resumed run takes from the new config, by dotted key (see resume_changes).
RESUME_PER_RUN = ("resume", "stop_after", "output_dir")  # how this invocation runs: never reported
RESUME_APPLIED = (
    "max_steps",  # the schedule is rebuilt over the new total (extending a run continues its decay)
    "num_epochs",
    "optim.lr",  # new peak rates: the schedule's multiplier at the current step times the new peak
    "optim.head_lr",
    "optim.warmup_steps",
    "optim.power",
    "optim.min_lr_ratio",
    "optim.grad_clip",
    "device",
    "data.num_workers",
)
RESUME_APPLIED_SECTIONS = ("log.", "eval.", "checkpoint.")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def resume_changes(
    saved: dict[str, Any], current: dict[str, Any], saved_world: int = 1, world: int = 1
) -> tuple[list[str], list[str]]:
    """Compare a checkpoint's config with the config of the run resuming it.

    Returns ``(applied, refused)``: one ``"key: old -> new"`` line per changed setting. *Applied*
    settings (the schedule's length and shape, peak learning rates, gradient clipping, device,
    loader workers, logging, evaluation and checkpoint frequency) take the new value and are to be
    printed. *Refused* ones would silently change what the checkpoint's state means (the model, the
    head, the data and its order, the optimizer's kind and hyper-parameters held in its state, the
    seed, the precision): resuming with them changed is an error. ``resume``, ``stop_after`` and
    ``output_dir`` belong to the invocation and are not compared; keys the checkpoint's config lacks
    (written by an older version) are not either. ``data.batch_size`` is per process: resuming on
    another number of processes (``saved_world`` -> ``world``) may change it as long as the global
    batch (per process x processes) stays the same.
    """
    old, new = _flatten(saved), _flatten(current)
    applied, refused = [], []
    for key in sorted(new):
        if key not in old or old[key] == new[key] or key.split(".")[0] in RESUME_PER_RUN:
            continue
        line = f"{key}: {old[key]!r} -> {new[key]!r}"
        if key == "data.batch_size":
            same = old[key] * saved_world == new[key] * world
            line += f" per process on {saved_world} -> {world} process(es): global batch {old[key] * saved_world} -> {new[key] * world}"
            (applied if same else refused).append(line)
        elif key in RESUME_APPLIED or key.startswith(RESUME_APPLIED_SECTIONS):
            applied.append(line)
        else:
            refused.append(line)
    for key in sorted(set(old) - set(new)):  # e.g. a dict-valued setting that lost a key
        if key.split(".")[0] not in RESUME_PER_RUN and not key.startswith(RESUME_APPLIED_SECTIONS):
            refused.append(f"{key}: {old[key]!r} -> (unset)")
    return applied, refused
