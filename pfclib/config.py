"""One configuration object per training job: :class:`TrainConfig`.

A ``TrainConfig`` is a tree of plain dataclasses. It is read from YAML (a file of its own, or one
section of ``params.yaml``) or from a plain dict (a papermill parameters cell), and written back
as a plain dict (stored in every checkpoint). Files are parsed with ``yaml.safe_load`` only:
configuration is data, never code.

Unknown keys are errors, named together with the valid ones, so a typo (``lr_warmup`` for
``warmup_steps``) cannot silently fall back to a default. Values are type-checked against the
annotations (an ``int`` is accepted where a ``float`` is expected, a ``bool`` never where a number
is) and each section validates its ranges in ``__post_init__``.

Sizes and units: ``data.batch_size`` is per process and per micro-batch; one optimizer *step*
consumes ``batch_size * world_size * gradient_accumulation_steps`` images. Every ``every`` /
``max_steps`` / ``warmup_steps`` counts optimizer steps.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

__all__ = [
    "CheckpointConfig",
    "DataConfig",
    "EvalConfig",
    "HeadConfig",
    "LogConfig",
    "OptimConfig",
    "QualityConfig",
    "TrainConfig",
    "apply_overrides",
]

_OPTIMIZERS = ("sgd", "adamw")
_MIXED_PRECISION = ("no", "fp16", "bf16")
_UPDATES = ("dense", "sparse")


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


@dataclass
class DataConfig:
    """Training data. ``kind``/``path``/``image_size`` go to :func:`pfclib.data.build_dataset`."""

    kind: str = "synthetic"  # synthetic | recordio | folder | imagefolder_hf | hf
    path: str = "scratch/data/tiny"  # relative: from the config file's folder (see TrainConfig.resolve_paths)
    batch_size: int = 32  # images per process per micro-batch
    num_workers: int = 0  # DataLoader workers; 0 keeps CPU runs simplest (order is exact either way)
    hflip: bool = True  # random horizontal flip, p = 0.5, seeded by (seed, rank, step, micro-batch)
    # For kind == "synthetic": keyword arguments of pfclib.data.synthetic.SyntheticConfig; when set and
    # `path` holds no dataset yet, the main process generates it there before training.
    generate: dict | None = None

    def __post_init__(self) -> None:
        _require(self.batch_size >= 1, f"data.batch_size must be >= 1, got {self.batch_size}")
        _require(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")
        _require(bool(self.path), "data.path must be a non-empty path")


@dataclass
class HeadConfig:
    """The Partial FC head (:class:`pfclib.PartialFC`)."""

    num_classes: int | None = None  # None: the dataset's num_classes
    sample_rate: float = 1.0  # r in (0, 1]; 1.0 is pure model parallelism
    margin: str | dict = "arcface"  # a name or a dict for pfclib.margins.create
    update: str = "dense"  # dense (reference semantics) | sparse (only sampled rows change)
    chunk_size: int | None = None
    track_updates: bool = False
    sub_centers: int = 1  # K centers per class (Sub-center ArcFace, paper default 3); 1: the plain head
    dim_sample_rate: float = 1.0  # q in (0, 1]: embedding dimensions kept per step (Unicom); 1.0: all

    def __post_init__(self) -> None:
        _require(0.0 < self.sample_rate <= 1.0, f"head.sample_rate must be in (0, 1], got {self.sample_rate}")
        _require(
            isinstance(self.sub_centers, int)
            and not isinstance(self.sub_centers, bool)
            and self.sub_centers >= 1,
            f"head.sub_centers must be a positive integer, got {self.sub_centers!r}",
        )
        _require(
            isinstance(self.dim_sample_rate, int | float)
            and not isinstance(self.dim_sample_rate, bool)
            and 0.0 < self.dim_sample_rate <= 1.0,
            f"head.dim_sample_rate must be a number in (0, 1], got {self.dim_sample_rate!r}",
        )
        _require(self.update in _UPDATES, f"head.update must be one of {list(_UPDATES)}, got {self.update!r}")
        from pfclib import margins  # checked here, not when the head is built after the data are opened

        try:
            margins.create(self.margin)
        except (TypeError, ValueError, KeyError) as exc:
            raise ValueError(f"head.margin: {exc}") from exc
        _require(
            self.num_classes is None or self.num_classes >= 1,
            f"head.num_classes must be None or >= 1, got {self.num_classes}",
        )
        _require(
            self.chunk_size is None or self.chunk_size >= 1,
            f"head.chunk_size must be None or >= 1, got {self.chunk_size}",
        )


@dataclass
class OptimConfig:
    """Both optimizers (backbone and head) and the shared learning-rate schedule."""

    optimizer: str = "sgd"  # sgd | adamw, for backbone and head alike
    lr: float = 0.1  # peak learning rate of the backbone
    head_lr: float | None = None  # peak learning rate of the head; None: same as lr
    momentum: float = 0.9  # SGD only
    weight_decay: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW only
    eps: float = 1e-8  # AdamW only
    warmup_steps: int = 0  # linear warm-up from lr/warmup_steps to lr
    power: float = 2.0  # polynomial decay exponent after warm-up
    min_lr_ratio: float = 0.0  # the decay ends at lr * min_lr_ratio
    grad_clip: float | None = 5.0  # max global L2 norm of the backbone gradient; None: no clipping
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step (the loss is divided by it)

    def __post_init__(self) -> None:
        _require(
            self.optimizer in _OPTIMIZERS,
            f"optim.optimizer must be one of {list(_OPTIMIZERS)}, got {self.optimizer!r}",
        )
        _require(0 < self.lr < float("inf"), f"optim.lr must be a finite number > 0, got {self.lr}")
        _require(
            self.head_lr is None or 0 < self.head_lr < float("inf"),
            f"optim.head_lr must be None or a finite number > 0, got {self.head_lr}",
        )
        _require(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _require(len(self.betas) == 2, f"optim.betas must have two entries, got {self.betas}")
        _require(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        _require(self.power >= 0, f"optim.power must be >= 0, got {self.power}")
        _require(
            0.0 <= self.min_lr_ratio <= 1.0, f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}"
        )
        _require(
            self.grad_clip is None or self.grad_clip > 0,
            f"optim.grad_clip must be None or > 0, got {self.grad_clip}",
        )
        _require(
            self.gradient_accumulation_steps >= 1,
            f"optim.gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}",
        )


@dataclass
class EvalConfig:
    """Periodic verification on held-out pairs (``.bin`` files or synthetic pairs folders)."""

    verification: list[str] = field(default_factory=list)  # paths for pfclib.data.load_verification
    every: int = 0  # evaluate every N optimizer steps; 0: only at the end
    at_end: bool = True
    batch_size: int = 256
    flip: bool = True  # embed image + its mirror (the standard protocol)
    nfolds: int = 10

    def __post_init__(self) -> None:
        _require(self.every >= 0, f"eval.every must be >= 0, got {self.every}")
        _require(self.batch_size >= 1, f"eval.batch_size must be >= 1, got {self.batch_size}")
        _require(self.nfolds >= 2, f"eval.nfolds must be >= 2, got {self.nfolds}")


@dataclass
class LogConfig:
    """Rank-0 logging: CSV, TensorBoard and a tqdm progress bar."""

    every: int = 10  # log a row every N optimizer steps (the last step is always logged)
    csv: bool = True  # <output_dir>/log.csv
    tensorboard: bool = True  # <output_dir>/tensorboard
    progress: str = "auto"  # auto (only on a terminal) | on | off

    def __post_init__(self) -> None:
        _require(self.every >= 1, f"log.every must be >= 1, got {self.every}")
        _require(
            self.progress in ("auto", "on", "off"),
            f"log.progress must be one of ['auto', 'on', 'off'], got {self.progress!r}",
        )


@dataclass
class CheckpointConfig:
    """Checkpoints: one file per save, ``<output_dir>/checkpoints/ckpt_<step>.pt``, written atomically."""

    every: int = 0  # save every N optimizer steps; 0: only at the end
    at_end: bool = True
    keep: int = 2  # keep the newest K checkpoint files
    # sharded: each rank writes its own rows of the head (no gathering: scales to any C); single:
    # one file holding the whole head (small heads, one file to move around). Both resume anywhere.
    layout: str = "sharded"

    def __post_init__(self) -> None:
        _require(self.every >= 0, f"checkpoint.every must be >= 0, got {self.every}")
        _require(
            self.layout in ("sharded", "single"),
            f"checkpoint.layout must be 'sharded' or 'single', got {self.layout!r}",
        )
        _require(self.keep >= 1, f"checkpoint.keep must be >= 1, got {self.keep}")


@dataclass
class QualityConfig:
    """CR-FIQA's quality branch (:mod:`pfclib.quality`): a linear layer on the embedding regressing
    each training sample's certainty ratio. Off by default: no branch, no cost, no checkpoint key."""

    enabled: bool = False
    weight: float = 10.0  # lambda of the total loss margin + lambda * SmoothL1(q, CR); the paper's 10
    beta: float = 0.5  # SmoothL1's beta (the authors' 0.5); 0: plain L1
    eps: float = 1e-9  # CR = CCS / (NNCCS + 1 + eps); the paper's 1e-9

    def __post_init__(self) -> None:
        _require(
            0 < self.weight < float("inf"),
            f"quality.weight must be a finite number > 0 (lambda of the quality loss), got {self.weight}",
        )
        _require(0 <= self.beta < float("inf"), f"quality.beta must be a finite number >= 0, got {self.beta}")
        _require(
            0 <= self.eps < 1,
            f"quality.eps must be in [0, 1) (it keeps NNCCS + 1 + eps above 0), got {self.eps}",
        )


@dataclass
class TrainConfig:
    """Everything one training run reads. ``backbone``, ``embedding_size`` and ``image_size`` are
    top-level keys because checkpoints consumers (:func:`pfclib.checkpoint.load_backbone`, the
    evaluation CLI) rebuild the network from them."""

    output_dir: str = "scratch/train"  # relative: from the config file's folder (see resolve_paths)
    seed: int = 0
    device: str = "auto"  # auto (CUDA if available) | cpu | cuda
    mixed_precision: str = "no"  # no | fp16 | bf16 (the backbone only; the head computes in fp32)
    backbone: str = "iresnet50"  # a pfclib.models registry name
    embedding_size: int = 512
    image_size: int = 112
    backbone_kwargs: dict = field(default_factory=dict)
    max_steps: int | None = None  # total optimizer steps; when None, num_epochs decides
    num_epochs: float | None = None
    # Stop after this many steps as if the process were killed there: no final checkpoint, no final
    # evaluation. Used to test and demonstrate exact resume.
    stop_after: int | None = None
    resume: str | None = None  # None | "auto" (newest checkpoint in output_dir, if any) | a checkpoint path
    # Fine-tuning: start from the backbone of another run (a checkpoint file or a run folder: its newest
    # checkpoint). Only the backbone's weights are taken (same backbone, embedding_size, image_size);
    # the head is new, for this data's classes, and so are the optimizers and the schedule. Ignored
    # when the run resumes from its own checkpoint.
    init_from: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)

    def __post_init__(self) -> None:
        _require(
            self.mixed_precision in _MIXED_PRECISION,
            f"mixed_precision must be one of {list(_MIXED_PRECISION)}, got {self.mixed_precision!r}",
        )
        _require(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}",
        )
        _require(self.seed >= 0, f"seed must be a non-negative int, got {self.seed}")
        _require(self.embedding_size >= 1, f"embedding_size must be >= 1, got {self.embedding_size}")
        _require(self.image_size >= 1, f"image_size must be >= 1, got {self.image_size}")
        _require(
            self.max_steps is not None or self.num_epochs is not None,
            "one of max_steps or num_epochs must be set, got both None",
        )
        _require(
            self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}"
        )
        _require(
            self.num_epochs is None or self.num_epochs > 0, f"num_epochs must be > 0, got {self.num_epochs}"
        )
        _require(
            self.stop_after is None or self.stop_after >= 1, f"stop_after must be >= 1, got {self.stop_after}"
        )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a (nested) plain dict. Missing keys take their defaults; unknown keys raise a
        ``ValueError`` naming them and the valid keys; wrongly typed values raise a ``TypeError``."""
        return _from_dict(cls, data, prefix="")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, section: str | None = None) -> TrainConfig:
        """Read a YAML file with ``yaml.safe_load``. ``section`` selects a (dotted) sub-mapping, e.g.
        ``"train"`` in ``params.yaml``; without it the whole file is the configuration. Relative
        paths in it are taken from the file's folder (:meth:`resolve_paths`), so a config works
        from wherever it is used."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc)
            raise ValueError(f"config file {str(path)!r} is not valid YAML{where}: {problem}") from exc
        if section:
            for part in section.split("."):
                if not isinstance(data, dict) or part not in data:
                    keys = sorted(data) if isinstance(data, dict) else []
                    raise KeyError(
                        f"section {section!r} not found in {str(path)!r} (missing {part!r}; keys: {keys})"
                    )
                data = data[part]
        if not isinstance(data, dict):
            raise TypeError(
                f"config in {str(path)!r} (section {section!r}) must be a mapping, got {type(data).__name__}"
            )
        return cls.from_dict(data).resolve_paths(path.resolve().parent)

    def resolve_paths(self, base: str | os.PathLike) -> TrainConfig:
        """A copy whose relative paths (``output_dir``, ``data.path``, ``eval.verification``,
        ``resume`` unless ``"auto"``, ``init_from``) are made absolute against ``base``; absolute
        ones are kept. :meth:`from_yaml` uses the config file's folder, the command line the current
        folder for ``--set`` values; the trainer takes whatever is still relative from the current
        folder."""
        base = Path(base)

        def fix(p: str | None) -> str | None:
            if p is None or Path(p).expanduser().is_absolute():
                return None if p is None else str(Path(p).expanduser())
            return str(base / p)

        out = dataclasses.replace(
            self,
            output_dir=fix(self.output_dir),
            resume=self.resume if self.resume in (None, "auto") else fix(self.resume),
            init_from=fix(self.init_from),
            data=dataclasses.replace(self.data, path=fix(self.data.path)),
            eval=dataclasses.replace(self.eval, verification=[fix(v) for v in self.eval.verification]),
        )
        return out

    def to_dict(self) -> dict[str, Any]:
        """A nested plain dict (only str/int/float/bool/None/list/dict) that ``from_dict`` reads back."""
        return dataclasses.asdict(self)

    def replace(self, **overrides: Any) -> TrainConfig:
        """A copy with dotted-key overrides applied, e.g. ``cfg.replace(**{"optim.lr": 0.01})``."""
        return TrainConfig.from_dict(apply_overrides(self.to_dict(), overrides))


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of nested ``data`` with ``{"a.b.c": value}`` overrides set (sections created as
    needed). Unknown keys are not checked here; ``TrainConfig.from_dict`` rejects them."""
    out = _deep_copy(data)
    for key, value in overrides.items():
        parts = key.split(".")
        if not all(parts):
            raise ValueError(f"override key {key!r} is not a dotted name like 'optim.lr'")
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ValueError(f"override {key!r}: {part!r} is a value ({child!r}), not a section")
            node = child
        node[parts[-1]] = value
    return out


def _deep_copy(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _deep_copy(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_deep_copy(v) for v in obj]
    return obj


def _from_dict(cls: type, data: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "config"
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise TypeError(f"{where} must be a mapping, got {type(data).__name__}: {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown key(s) {[prefix + str(k) for k in unknown]} in {where}; valid keys: {sorted(fields)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _from_dict(tp, value, prefix=f"{prefix}{name}.")
        else:
            kwargs[name] = _check_type(value, tp, f"{prefix}{name}")
    return cls(**kwargs)


def _check_type(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` (ints widened to float where a float is expected, tuples to lists) or raise."""
    origin = typing.get_origin(tp)
    if origin is Union or origin is types.UnionType:
        errors = []
        for option in typing.get_args(tp):
            try:
                return _check_type(value, option, key)
            except TypeError as exc:
                errors.append(str(exc))
        expected = " or ".join(_type_name(t) for t in typing.get_args(tp))
        raise TypeError(
            f"{key} must be {expected}, got {type(value).__name__}: {value!r}{_yaml_hint(value, typing.get_args(tp))}"
        )
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            return _deep_copy(value)
    elif tp is list or origin is list:
        if isinstance(value, list | tuple):
            (item_tp,) = typing.get_args(tp) or (Any,)
            if item_tp is Any:
                return list(value)
            return [_check_type(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    else:  # pragma: no cover - a field type this parser does not know
        raise TypeError(f"{key}: unsupported annotation {tp!r}")
    raise TypeError(
        f"{key} must be {_type_name(tp)}, got {type(value).__name__}: {value!r}{_yaml_hint(value, (tp,))}"
    )


def _yaml_hint(value: Any, expected: tuple) -> str:
    """The YAML 1.1 trap behind a wrong type, if it is one: ``1e-3`` (no dot) is read as a string,
    ``off``/``on``/``yes``/``no`` as booleans."""
    if isinstance(value, str) and float in expected:
        try:
            number = float(value)
        except ValueError:
            return ""
        fixed = f"{number:.1e}" if "e" in value.lower() and "." not in value else repr(number)
        return f" (YAML reads {value} as text; write it with a dot, e.g. {fixed}, or as a decimal)"
    if isinstance(value, bool) and str in expected:
        return " (YAML reads unquoted off/on/yes/no as booleans: quote the word, e.g. 'off')"
    return ""


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", None) or str(tp)
