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
      "head": PartialFC.full_state_dict(optimizer),  # all (C, D) centers, per-row optimizer state and
                                                     # the class sampler's generator of every rank
      "data_state": {...},                      # position in the seeded data order
      "rng": {"torch": [per rank], "cuda": [per rank] or None},
      "grad_scaler": state_dict or None,        # fp16 only
      "metrics": {...},                         # loss history so far, for logs
    }

:mod:`pfclib.run_state` assembles this dict from a run and puts a run back from it. Only rank 0
writes (:func:`save_checkpoint` via :func:`pfclib.io.atomic_torch_save`: a crash never
leaves a half-written file); every rank reads the same file with ``torch.load(weights_only=True)``,
so everything stored is tensors and plain Python containers.

Files are ``<output_dir>/checkpoints/ckpt_<step:08d>.pt``; :func:`find_latest` picks the newest,
:func:`prune_checkpoints` keeps the newest K.

Damaged files (a copy cut short, a full disk, a file system that lost data after a crash) are
reported, not fed to the trainer: :func:`load_checkpoint` raises :class:`CorruptCheckpointError`
naming the file and what is wrong with it, and ``resume="auto"`` (:func:`find_latest_valid`) skips
such files, one printed line each, to resume from the newest one that loads. A write killed half-way
leaves only a hidden temporary, which :func:`remove_stale_temp_files` deletes at the start of a run.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pfclib.io import atomic_torch_save, remove_temp_files

__all__ = [
    "CHECKPOINT_FORMAT",
    "REQUIRED_KEYS",
    "CorruptCheckpointError",
    "checkpoint_dir",
    "checkpoint_path",
    "checkpoint_step",
    "find_latest",
    "find_latest_valid",
    "list_checkpoints",
    "load_backbone",
    "load_checkpoint",
    "prune_checkpoints",
    "remove_stale_temp_files",
    "head_folders",
    "load_head",
    "resolve_checkpoint",
    "resolve_resume",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "pfclib-checkpoint/1"
REQUIRED_KEYS = ("format", "config", "step", "backbone", "head")
_NAME = re.compile(r"^ckpt_(\d+)\.pt$")
_HEAD_FOLDER = re.compile(r"^ckpt_(\d+)\.head-[0-9a-f]+$")  # a sharded head: ckpt_<step>.head-<token>/
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format starts with a zip local header


class CorruptCheckpointError(ValueError):
    """A checkpoint file that cannot be used: empty or truncated, garbage, not loadable with
    ``weights_only=True``, not a pfclib checkpoint or missing required keys. The message names the
    file; ``path`` and ``reason`` (what is wrong, one line) are set where there is one file."""

    def __init__(self, message: str, path: Path | None = None, reason: str | None = None):
        super().__init__(message)
        self.path = path
        self.reason = reason


class _UnpicklableCheckpointError(CorruptCheckpointError, pickle.UnpicklingError):
    """Also a pickle.UnpicklingError: what torch.load(weights_only=True) raises for such a file."""


def checkpoint_dir(output_dir: str | os.PathLike) -> Path:
    """The folder holding a run's checkpoints: ``<output_dir>/checkpoints``."""
    return Path(output_dir) / "checkpoints"


def checkpoint_path(output_dir: str | os.PathLike, step: int) -> Path:
    """``<output_dir>/checkpoints/ckpt_<step:08d>.pt``."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return checkpoint_dir(output_dir) / f"ckpt_{step:08d}.pt"


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The step in a checkpoint file's name (``ckpt_<step>.pt``), or None for another name."""
    m = _NAME.match(Path(path).name)
    return int(m.group(1)) if m else None


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


def find_latest_valid(
    output_dir: str | os.PathLike, *, log: Callable[[str], object] | None = None
) -> Path | None:
    """The newest checkpoint of a run that loads, or None when the run has no checkpoint file.

    Files are tried newest first, each read with :func:`load_checkpoint` and ``mmap=True``: the zip
    directory (which a truncated file lacks), the whole pickled structure (``weights_only=True``),
    the format and the required keys are checked, while tensor bytes are mapped rather than read, so
    this costs little even for a large head. Each file that fails is skipped with one line through
    ``log`` (default: printed to stderr) naming it and why. When files exist but none loads, raises
    :class:`CorruptCheckpointError` listing each file tried and its fault.
    """
    if log is None:
        log = _print_stderr
    tried: list[tuple[Path, str]] = []
    for path in reversed(list_checkpoints(output_dir)):
        try:
            load_checkpoint(path, map_location="cpu", mmap=True)
        except CorruptCheckpointError as e:
            reason = e.reason or str(e)
        except FileNotFoundError:
            reason = "vanished while being checked"
        else:
            return path
        tried.append((path, reason))
        log(f"resume: skipping checkpoint {str(path)!r}: it {reason}")
    if not tried:
        return None
    listing = "; ".join(f"{p.name} {reason}" for p, reason in tried)
    raise CorruptCheckpointError(
        f"no checkpoint in {str(checkpoint_dir(output_dir))!r} can be loaded; tried {len(tried)} "
        f"file(s): {listing}. Resume from an intact copy by path, or start afresh without resume"
    )


def _print_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def prune_checkpoints(output_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints; return the deleted paths."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    files = list_checkpoints(output_dir)
    doomed = files[:-keep]
    for p in doomed:
        p.unlink(missing_ok=True)  # the file first: a checkpoint without its file is no checkpoint
        for folder in head_folders(p):
            shutil.rmtree(folder, ignore_errors=True)
    return doomed


def head_folders(checkpoint: str | os.PathLike) -> list[Path]:
    """The sharded-head folders ``ckpt_<step>.head-<token>/`` next to a checkpoint file, of its step."""
    checkpoint = Path(checkpoint)
    prefix = checkpoint.name[: -len(".pt")] + ".head-"
    if not checkpoint.parent.is_dir():
        return []
    return sorted(
        p for p in checkpoint.parent.iterdir() if p.name.startswith(prefix) and _HEAD_FOLDER.match(p.name)
    )


def _referenced_head_folder(checkpoint: Path) -> str | None:
    try:
        head = load_checkpoint(checkpoint, mmap=True, check_shards=False)["head"]
    except (CorruptCheckpointError, FileNotFoundError):
        return None
    return head.get("folder") if isinstance(head, dict) else None


def remove_stale_temp_files(output_dir: str | os.PathLike) -> list[Path]:
    """Delete the temporaries of checkpoint writes killed half-way (``.ckpt_<step>.pt.<8 chars>.tmp``
    in ``<output_dir>/checkpoints``, see :func:`pfclib.io.atomic_path`); return the deleted paths.

    Also deletes sharded-head folders ``ckpt_<step>.head-<token>/`` that no checkpoint file refers
    to (a save killed before its checkpoint file was written, or one replaced by a later save of the
    same step). Checkpoints and every other file are left alone. Safe at the start of a run, on the one process
    that writes checkpoints (rank 0) and before its first save, provided no other job writes into
    the folder: hold the folder's :class:`pfclib.io.RunLock` first.
    """
    removed = remove_temp_files(checkpoint_dir(output_dir), target=_NAME)
    folder = checkpoint_dir(output_dir)
    if folder.is_dir():  # sharded heads whose checkpoint file was never written (or was replaced)
        for sub in sorted(folder.iterdir()):
            if not (sub.is_dir() and (m := _HEAD_FOLDER.match(sub.name))):
                continue
            owner = checkpoint_path(output_dir, int(m.group(1)))
            if not owner.is_file() or _referenced_head_folder(owner) != sub.name:
                shutil.rmtree(sub, ignore_errors=True)
                removed.append(sub)
    return removed


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint file to read for ``path``: a checkpoint file as given, or the newest
    ``ckpt_<step>.pt`` of a run folder (``<output_dir>``, or its ``checkpoints/`` folder).

    Raises FileNotFoundError naming ``path`` when it does not exist or is a folder without
    checkpoints. Used wherever a trained backbone is read (``pfclib.eval``, ``pfclib.embed``,
    ``pfclib.export``, the trainer's ``init_from``).
    """
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        latest = find_latest(path) or (find_latest(path.parent) if path.name == "checkpoints" else None)
        if latest is None:
            raise FileNotFoundError(
                f"{str(path)!r} is a folder without checkpoints: expected a checkpoint file or a run "
                f"folder holding {checkpoint_dir(path).name}/ckpt_<step>.pt"
            )
        return latest
    raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist (expected a file or a run folder)")


def resolve_resume(
    resume: str | os.PathLike | None,
    output_dir: str | os.PathLike,
    *,
    log: Callable[[str], object] | None = None,
) -> Path | None:
    """Map a ``resume`` setting to a file: None -> None; ``"auto"`` -> the newest checkpoint in
    ``output_dir`` that loads (None when there is none yet, so a first run and its restarts share one
    command); a folder -> the same in that run folder (or its ``checkpoints/``), which must hold
    checkpoints; a file -> that file, which must exist and load.

    ``"auto"`` and folders skip damaged newer files with one line each through ``log`` (default:
    stderr) and raise :class:`CorruptCheckpointError` when none loads (:func:`find_latest_valid`).
    An explicitly named file is never swapped for another: if it is damaged, its
    :class:`CorruptCheckpointError` is raised here, before the run builds anything.
    """
    if resume is None:
        return None
    if str(resume) == "auto":
        return find_latest_valid(output_dir, log=log)
    path = Path(resume)
    if path.is_dir():
        run = path.parent if path.name == "checkpoints" and not list_checkpoints(path) else path
        if not list_checkpoints(run):
            raise FileNotFoundError(f"resume folder {str(path)!r} holds no ckpt_<step>.pt checkpoint")
        return find_latest_valid(run, log=log)
    if not path.is_file():
        raise FileNotFoundError(f"resume checkpoint {str(path)!r} does not exist")
    load_checkpoint(path, map_location="cpu", mmap=True)  # raises CorruptCheckpointError naming it
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


def load_checkpoint(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    *,
    mmap: bool = False,
    check_shards: bool = True,
) -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)`` (no code runs) and check its format.

    Raises FileNotFoundError when ``path`` does not exist, and :class:`CorruptCheckpointError` (a
    ValueError) naming the file and its fault when it is empty or truncated, garbage, not loadable
    with ``weights_only=True`` (then also a ``pickle.UnpicklingError``), not a pfclib checkpoint, or
    missing required keys. With ``mmap`` the tensors' bytes are memory-mapped instead of read
    (``torch.load(mmap=True)``; zip-format files only, any other is read as usual).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        use_mmap = mmap and _read_head(path) == _ZIP_MAGIC
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=use_mmap)
    except Exception as e:
        reason = _damage(path)
        if reason is None and isinstance(e, OSError | MemoryError):
            raise  # an I/O or memory failure, not the file's content
        raise _unreadable(path, reason, e) from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        reason = f"is not a pfclib checkpoint: expected format {CHECKPOINT_FORMAT!r}, got {got!r}"
        raise CorruptCheckpointError(f"{str(path)!r} {reason}", path, reason)
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        reason = f"is missing key(s) {missing}"
        raise CorruptCheckpointError(f"checkpoint {str(path)!r} {reason}", path, reason)
    if check_shards:
        reason = _shard_damage(path, state["head"])
        if reason is not None:
            raise CorruptCheckpointError(f"checkpoint {str(path)!r} {reason}", path, reason)
    return state


def _shard_damage(path: Path, head: Any) -> str | None:
    """What is wrong with the head shards a checkpoint refers to (missing, or not the size written)."""
    from pfclib.head_state import SHARDED_FORMAT

    if not (isinstance(head, dict) and head.get("format") == SHARDED_FORMAT):
        return None
    folder = path.parent / str(head["folder"])
    for entry in head["shards"]:
        shard = folder / entry["file"]
        if not shard.is_file():
            return f"refers to head shard {str(shard)!r}, which does not exist"
        size = shard.stat().st_size
        if size != entry["bytes"]:
            return (
                f"refers to head shard {str(shard)!r} of {entry['bytes']} bytes, but it has {size} (damaged)"
            )
    return None


def load_head(path: str | os.PathLike) -> dict[str, Any]:
    """The whole head of a checkpoint (or run folder) as one full state on the CPU (the format of
    :meth:`pfclib.PartialFC.full_state_dict`), whether it was saved whole or sharded."""
    from pfclib.head_state import SHARDED_FORMAT, read_sharded_state

    path = resolve_checkpoint(path)
    head = load_checkpoint(path, map_location="cpu")["head"]
    if head.get("format") == SHARDED_FORMAT:
        return read_sharded_state(head, path.parent / head["folder"])
    return head


def _read_head(path: Path, n: int = 4) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def _damage(path: Path) -> str | None:
    """What is structurally wrong with a checkpoint file (one line), or None when its zip archive
    looks whole (or the file cannot be read at all)."""
    try:
        size = path.stat().st_size
        head = _read_head(path)
    except OSError:
        return None
    if size == 0:
        return "is truncated (empty: 0 bytes, as an interrupted write or copy leaves it)"
    if head != _ZIP_MAGIC:
        return f"is corrupt: {size} bytes without the zip header torch.save writes (garbage, or another kind of file)"
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except Exception as e:  # BadZipFile, OSError, EOFError, ...: whatever a damaged directory raises
        return (
            f"is truncated or corrupt: its zip directory, written last, cannot be read ({size} bytes; "
            f"{type(e).__name__}: {_first_line(e)})"
        )
    if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return "is corrupt: its zip archive holds no data.pkl"
    return None


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else "(no message)"


def _unreadable(path: Path, reason: str | None, e: Exception) -> CorruptCheckpointError:
    if reason is not None:
        return CorruptCheckpointError(f"checkpoint {str(path)!r} {reason}", path, reason)
    if isinstance(e, pickle.UnpicklingError):  # torch's message: advice, then the unpickler's error
        lines = str(e).splitlines()
        detail = next((x.strip() for x in lines if "WeightsUnpickler error" in x), _first_line(e))
        reason = (
            "cannot be loaded with weights_only=True (corrupt, or holding objects other than tensors "
            f"and plain containers): {detail}"
        )
        return _UnpicklableCheckpointError(f"checkpoint {str(path)!r} {reason}", path, reason)
    reason = f"could not be read, it may be corrupt: {type(e).__name__}: {_first_line(e)}"
    return CorruptCheckpointError(f"checkpoint {str(path)!r} {reason}", path, reason)


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
RESUME_PER_RUN = ("resume", "stop_after", "output_dir", "init_from")  # this invocation only: never compared
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
    seed, the precision): resuming with them changed is an error. ``resume``, ``stop_after``,
    ``output_dir`` and ``init_from`` (used only when a run starts) are not compared; keys the checkpoint's config lacks
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
