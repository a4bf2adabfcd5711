"""The feature-level experiment: the head's behaviour at many identities, milliseconds per step.

The image-level notebooks train a convolutional backbone on rendered images; on two CPU cores that
limits them to a few thousand identities. The paper's effects live at many identities, where the
classification head dominates. This module is the stand-in that reaches that scale: *features*
instead of images, a small MLP instead of a CNN, and the library's own :class:`pfclib.PartialFC`
head, optimizer and learning-rate schedule unchanged.

**The world** (:class:`FeatureWorld`, :func:`make_world`). Every identity ``c`` has a code
``z_c ~ N(0, I_a)`` (``a = identity_dim``). A sample of identity ``c`` draws a jittered code
``u = z_c + within_std * e`` and a nuisance code ``v ~ N(0, nuisance_std^2 I_b)`` (pose, light:
information that says nothing about the identity). A fixed random two-layer network ``G`` (weights
drawn once from ``seed``) maps ``[u, v]`` to the observed feature ``x = G([u, v])`` in
``R^feature_dim``. Because ``G`` mixes identity and nuisance non-linearly and the nuisance carries
most of the variance, raw features (or an untrained network) verify identities poorly; a backbone
must learn to invert ``G`` and discard ``v`` -- the job a face backbone does on images.

Training identities have a fixed, finite set of samples each (as in the paper, so a flipped label
stays flipped): ``samples_per_class`` each with ``distribution="uniform"`` (the default), or, with
``distribution="power"``, a long tail -- sizes drawn i.i.d. from the truncated discrete power law
``P(n) ∝ n^-power_exponent`` on ``[min_samples, max_samples]`` (from the world's own seeded stream;
the uniform worlds are exactly those made before the option existed). Noise is applied to the
labels only, from its own random stream, so the clean, flipped and conflicted worlds hold *the same
samples*:

* ``flip_fraction``: that fraction of the samples gets a label drawn uniformly from the other classes;
* ``conflict_fraction``: that fraction of the identities is split into ``conflict_splits`` labels
  (the new labels are appended after the clean ones), as when one person is filed under several
  names. An identity needs at least ``conflict_splits`` samples to be split: the split identities
  are drawn from those that have as many, and the fraction is of *those* (all identities of a
  uniform world; with power-law sizes, identities below ``conflict_splits`` samples are never split).

Held-out identities (never trained on) give verification pairs: half genuine, half impostor, in a
random order, scored with :func:`pfclib.eval.evaluate_pairs` (10-fold accuracy, TAR at FAR).

**Training** (:func:`train`). Backbone ``Linear-BN-ReLU, Linear-BN-ReLU, Linear-BN`` to the
embedding; the head is :class:`pfclib.PartialFC` with the given sample rate, margin, update mode and
filter; SGD for both with the warm-up + polynomial schedule of :mod:`pfclib.schedule`. One seed
fixes the backbone initialisation, the head's centers and sampler, and the data order, so two arms
with the same seed differ only in the factor under study (a paired design).
:func:`train_tracked` is the same training with the head's per-class update counters on, and
counts, for chosen classes, the steps in which the class's center actually moved.

What this stand-in is *not*: it has no convolutions, no images and no augmentation; it says how the
head and its sampling treat many classes and noisy labels, and the image-level notebooks say
whether a CNN on images agrees.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

__all__ = [
    "FeatureWorld",
    "World",
    "make_world",
    "identity_sizes",
    "MLPBackbone",
    "TrainSettings",
    "train",
    "train_tracked",
    "evaluate",
    "run_design",
    "describe_world",
]


@dataclasses.dataclass(frozen=True)
class FeatureWorld:
    """Parameters of a feature-level identity world (see the module docstring).

    Attributes:
        num_identities: training identities (classes before any conflict split).
        samples_per_class: fixed training samples per identity (``distribution="uniform"``).
        distribution: ``"uniform"`` (``samples_per_class`` each) or ``"power"`` (sizes i.i.d. from
            ``P(n) ∝ n^-power_exponent`` on ``[min_samples, max_samples]``).
        power_exponent, min_samples, max_samples: the power law (used only with ``"power"``).
        identity_dim, nuisance_dim: sizes of the identity code and the nuisance code.
        feature_dim: size of the observed feature ``x``.
        hidden_dim: width of the generator ``G``'s hidden layer.
        within_std: standard deviation of a sample's identity-code jitter (intra-class variation).
        nuisance_std: standard deviation of the nuisance code.
        heldout_identities, heldout_samples: held-out identities and samples per held-out identity.
        num_pairs: verification pairs (half genuine, half impostor).
        flip_fraction: fraction of training samples whose label is replaced by another class.
        conflict_fraction, conflict_splits: fraction of identities split into that many labels.
        seed: seeds everything in the world; the label noise uses its own stream derived from it.
    """

    num_identities: int = 10_000
    samples_per_class: int = 8
    distribution: str = "uniform"
    power_exponent: float = 1.5
    min_samples: int = 2
    max_samples: int = 100
    identity_dim: int = 32
    nuisance_dim: int = 32
    feature_dim: int = 96
    hidden_dim: int = 256
    within_std: float = 0.6
    nuisance_std: float = 1.5
    heldout_identities: int = 2_000
    heldout_samples: int = 8
    num_pairs: int = 40_000
    flip_fraction: float = 0.0
    conflict_fraction: float = 0.0
    conflict_splits: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        for name in (
            "num_identities",
            "samples_per_class",
            "identity_dim",
            "nuisance_dim",
            "feature_dim",
            "hidden_dim",
        ):
            value = getattr(self, name)
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if int(self.heldout_identities) != self.heldout_identities or self.heldout_identities < 2:
            raise ValueError(f"heldout_identities must be an integer >= 2, got {self.heldout_identities!r}")
        if int(self.heldout_samples) != self.heldout_samples or self.heldout_samples < 2:
            raise ValueError(f"heldout_samples must be an integer >= 2, got {self.heldout_samples!r}")
        if int(self.num_pairs) != self.num_pairs or self.num_pairs < 20 or self.num_pairs % 2:
            raise ValueError(f"num_pairs must be an even integer >= 20, got {self.num_pairs!r}")
        for name in ("within_std", "nuisance_std"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not 0.0 <= self.flip_fraction < 1.0:
            raise ValueError(f"flip_fraction must be in [0, 1), got {self.flip_fraction!r}")
        if not 0.0 <= self.conflict_fraction <= 1.0:
            raise ValueError(f"conflict_fraction must be in [0, 1], got {self.conflict_fraction!r}")
        if self.distribution not in ("uniform", "power"):
            raise ValueError(f"distribution must be 'uniform' or 'power', got {self.distribution!r}")
        if self.distribution == "power":
            for name in ("min_samples", "max_samples"):
                value = getattr(self, name)
                if int(value) != value or value < 1:
                    raise ValueError(f"{name} must be a positive integer, got {value!r}")
            if self.max_samples < self.min_samples:
                raise ValueError(
                    f"max_samples must be >= min_samples={self.min_samples}, got {self.max_samples!r}"
                )
            if not math.isfinite(self.power_exponent):
                raise ValueError(f"power_exponent must be a finite number, got {self.power_exponent!r}")
            most, bound = self.max_samples, "max_samples"
        else:
            most, bound = self.samples_per_class, "samples_per_class"
        if int(self.conflict_splits) != self.conflict_splits or not 2 <= self.conflict_splits <= most:
            raise ValueError(
                f"conflict_splits must be an integer in [2, {bound}={most}], got {self.conflict_splits!r}"
            )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> FeatureWorld:
        """Build from a plain mapping (``params.yaml``); unknown keys are an error that names them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown FeatureWorld fields {unknown}; expected some of {sorted(known)}")
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class World:
    """A generated world: training features and labels, held-out pairs, and the truth.

    Attributes:
        config: the :class:`FeatureWorld` it was made from.
        features: ``(n, feature_dim)`` float32 training features.
        labels: ``(n,)`` int64 training labels (after noise).
        identity: ``(n,)`` int64 true identity of each training sample.
        num_classes: number of labels (identities plus the extra labels of conflict splits).
        flipped: ``(n,)`` bool, the sample's label was flipped.
        pair_a, pair_b: ``(num_pairs, feature_dim)`` float32 features of the two sides of each pair.
        issame: ``(num_pairs,)`` bool, genuine pair.
        pair_identity_a, pair_identity_b: ``(num_pairs,)`` int64 held-out identity of each side
            (for per-identity error rates, :func:`pfclib.eval.opis`).
        sizes: ``(num_classes,)`` int64 training samples per label (after noise), computed.
    """

    config: FeatureWorld
    features: torch.Tensor
    labels: torch.Tensor
    identity: torch.Tensor
    num_classes: int
    flipped: torch.Tensor
    pair_a: torch.Tensor
    pair_b: torch.Tensor
    issame: torch.Tensor
    pair_identity_a: torch.Tensor
    pair_identity_b: torch.Tensor

    @property
    def sizes(self) -> torch.Tensor:
        """``(num_classes,)`` int64: training samples carrying each label (after the label noise)."""
        return torch.bincount(self.labels, minlength=self.num_classes)


def _generator(seed: int, stream: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((int(seed) * 1_000_003 + stream) % (2**63))
    return g


class _Render(nn.Module):
    """The fixed random generator ``G``: ``x = W2 tanh(W1 [u, v] + b1)``, no parameters trained."""

    def __init__(self, cfg: FeatureWorld):
        super().__init__()
        g = _generator(cfg.seed, 1)
        d_in = cfg.identity_dim + cfg.nuisance_dim
        self.w1 = torch.randn(d_in, cfg.hidden_dim, generator=g) * (1.5 / math.sqrt(d_in))
        self.b1 = torch.randn(cfg.hidden_dim, generator=g) * 0.5
        self.w2 = torch.randn(cfg.hidden_dim, cfg.feature_dim, generator=g) / math.sqrt(cfg.hidden_dim)

    def forward(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.tanh(torch.cat([u, v], dim=1) @ self.w1 + self.b1) @ self.w2


def _samples(
    render: _Render, codes: torch.Tensor, per: int | torch.Tensor, cfg: FeatureWorld, g: torch.Generator
):
    """``per`` samples of each code (an int, or ``(len(codes),)`` counts): features ``(sum, F)``,
    code-major order."""
    out = []
    for start in range(0, codes.shape[0], 8192):
        counts = per if isinstance(per, int) else per[start : start + 8192]
        block = codes[start : start + 8192].repeat_interleave(counts, dim=0)
        u = block + cfg.within_std * torch.randn(block.shape, generator=g)
        v = cfg.nuisance_std * torch.randn(block.shape[0], cfg.nuisance_dim, generator=g)
        out.append(render(u, v))
    return torch.cat(out)


def make_world(config: FeatureWorld | Mapping[str, Any]) -> World:
    """Generate the world of ``config`` (deterministic in ``config.seed``; see the module docstring).

    The samples and the held-out pairs depend only on the fields that shape the data (not on the
    noise fields), so worlds differing only in ``flip_fraction`` / ``conflict_fraction`` share them.
    """
    cfg = config if isinstance(config, FeatureWorld) else FeatureWorld.from_dict(config)
    render = _Render(cfg)
    n_id = cfg.num_identities
    sizes = identity_sizes(cfg)
    per: int | torch.Tensor = cfg.samples_per_class if cfg.distribution == "uniform" else sizes
    codes = torch.randn(n_id, cfg.identity_dim, generator=_generator(cfg.seed, 2))
    features = _samples(render, codes, per, cfg, _generator(cfg.seed, 3))
    identity = torch.arange(n_id).repeat_interleave(per)
    labels = identity.clone()

    # Label noise from its own stream: conflict splits first (a property of identities), then flips.
    # Only identities with at least `conflict_splits` samples can be split (all of a uniform world).
    g_noise = _generator(cfg.seed, 4)
    num_classes = n_id
    splits = cfg.conflict_splits
    eligible = torch.nonzero(sizes >= splits).flatten()
    n_conflict = int(round(cfg.conflict_fraction * eligible.numel()))
    if n_conflict:
        split_ids = eligible[torch.randperm(eligible.numel(), generator=g_noise)[:n_conflict]]
        # sample j, j + splits, j + 2 splits, ... (0-based, within its identity) of the t-th split
        # identity moves, for j >= 1, to the extra label n_id + (j - 1) * n_conflict + t
        rank = torch.full((n_id,), -1, dtype=torch.int64)
        rank[split_ids] = torch.arange(n_conflict)
        offsets = torch.cumsum(sizes, 0) - sizes
        position = torch.arange(identity.numel()) - offsets[identity]
        j = position % splits
        t = rank[identity]
        move = (t >= 0) & (j >= 1)
        labels[move] = n_id + (j[move] - 1) * n_conflict + t[move]
        num_classes += (splits - 1) * n_conflict
    flipped = torch.zeros(labels.shape[0], dtype=torch.bool)
    n_flip = int(round(cfg.flip_fraction * labels.shape[0]))
    if n_flip:
        rows = torch.randperm(labels.shape[0], generator=g_noise)[:n_flip]
        shift = torch.randint(1, num_classes, (n_flip,), generator=g_noise)
        labels[rows] = (labels[rows] + shift) % num_classes  # uniform over the other labels
        flipped[rows] = True

    # Held-out identities and balanced pairs, in a random order (the 10 folds are contiguous).
    g_pairs = _generator(cfg.seed, 5)
    m, hp = cfg.heldout_identities, cfg.heldout_samples
    held = _samples(
        render, torch.randn(m, cfg.identity_dim, generator=g_pairs), hp, cfg, _generator(cfg.seed, 6)
    )
    half = cfg.num_pairs // 2
    gen_id = torch.randint(0, m, (half,), generator=g_pairs)
    first = torch.randint(0, hp, (half,), generator=g_pairs)
    second = (first + torch.randint(1, hp, (half,), generator=g_pairs)) % hp
    imp_a = torch.randint(0, m, (half,), generator=g_pairs)
    imp_b = (imp_a + torch.randint(1, m, (half,), generator=g_pairs)) % m
    ia = torch.cat([gen_id * hp + first, imp_a * hp + torch.randint(0, hp, (half,), generator=g_pairs)])
    ib = torch.cat([gen_id * hp + second, imp_b * hp + torch.randint(0, hp, (half,), generator=g_pairs)])
    issame = torch.cat([torch.ones(half, dtype=torch.bool), torch.zeros(half, dtype=torch.bool)])
    order = torch.randperm(cfg.num_pairs, generator=g_pairs)
    return World(
        config=cfg,
        features=features.contiguous(),
        labels=labels,
        identity=identity,
        num_classes=num_classes,
        flipped=flipped,
        pair_a=held[ia[order]].contiguous(),
        pair_b=held[ib[order]].contiguous(),
        issame=issame[order],
        pair_identity_a=ia[order] // hp,
        pair_identity_b=ib[order] // hp,
    )


def identity_sizes(config: FeatureWorld | Mapping[str, Any]) -> torch.Tensor:
    """``(num_identities,)`` int64 training samples per identity of ``config`` (before any label noise).

    ``"uniform"``: ``samples_per_class`` each. ``"power"``: i.i.d. from the truncated discrete power
    law ``P(n) ∝ n^-power_exponent`` on ``[min_samples, max_samples]``, drawn from the world's own
    stream (seeded by ``seed``; no other draw of the world depends on it, so the uniform worlds are
    unchanged by its existence).
    """
    cfg = config if isinstance(config, FeatureWorld) else FeatureWorld.from_dict(config)
    if cfg.distribution == "uniform":
        return torch.full((cfg.num_identities,), cfg.samples_per_class, dtype=torch.int64)
    support = torch.arange(cfg.min_samples, cfg.max_samples + 1, dtype=torch.int64)
    pmf = support.to(torch.float64) ** (-float(cfg.power_exponent))
    draw = torch.multinomial(
        pmf / pmf.sum(), cfg.num_identities, replacement=True, generator=_generator(cfg.seed, 7)
    )
    return support[draw]


class MLPBackbone(nn.Sequential):
    """``Linear-BN-ReLU`` x ``depth``, then ``Linear-BN`` to the embedding (the feature-level backbone)."""

    def __init__(self, in_dim: int, embedding_size: int, width: int = 256, depth: int = 2):
        layers: list[nn.Module] = []
        d = in_dim
        for _ in range(depth):
            layers += [nn.Linear(d, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
            d = width
        layers += [nn.Linear(d, embedding_size, bias=False), nn.BatchNorm1d(embedding_size)]
        super().__init__(*layers)


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """One feature-level training run: backbone, head and optimisation (see :func:`train`).

    ``steps = 0`` evaluates the untrained network (the floor a trained one must clear).
    """

    steps: int = 2_000
    batch_size: int = 256
    embedding_size: int = 64
    width: int = 256
    depth: int = 2
    sample_rate: float = 1.0
    sub_centers: int = 1
    dim_sample_rate: float = 1.0
    eval_dims: tuple[int, ...] = ()
    margin: Mapping[str, Any] | str = dataclasses.field(
        default_factory=lambda: {"name": "cosface", "s": 32.0, "m": 0.3}
    )
    filter_threshold: float | None = None
    update: str = "dense"
    lr: float = 0.1
    head_lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 5.0e-4
    warmup_steps: int = 100
    power: float = 2.0
    seed: int = 0
    threads: int | None = None

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainSettings:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TrainSettings fields {unknown}; expected some of {sorted(known)}")
        return cls(**dict(values))

    def replace(self, **changes: Any) -> TrainSettings:
        return dataclasses.replace(self, **changes)


def evaluate(
    backbone: nn.Module,
    world: World,
    fars: tuple[float, ...] = (1e-3, 1e-4),
    eval_dims: tuple[int, ...] = (),
    opis_levels: tuple[float, ...] = (1e-2, 1e-3),
) -> dict[str, Any]:
    """Verification of the held-out pairs by :func:`pfclib.eval.evaluate_pairs` (eval mode, no grad),
    plus ``opis`` (:func:`pfclib.eval.opis` at ``opis_levels``: how much the per-identity error rates
    at one global threshold vary) and, for each ``d`` in ``eval_dims``, ``acc@{d}d``: the accuracy
    of the embeddings truncated to their first ``d`` dimensions (a compact embedding)."""
    from pfclib.eval import evaluate_pairs, opis, pair_scores

    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        a = torch.cat([backbone(x) for x in world.pair_a.split(8192)])
        b = torch.cat([backbone(x) for x in world.pair_b.split(8192)])
    backbone.train(was_training)
    result = evaluate_pairs(a.numpy(), b.numpy(), world.issame.numpy(), fars=fars)
    levels = [f for f in opis_levels if math.ceil(1.0 / f) <= result["num_impostor"]]
    result["opis"] = None  # too few impostor pairs for every level
    if levels:
        scores = pair_scores(a.numpy(), b.numpy())
        ids = (world.pair_identity_a.numpy(), world.pair_identity_b.numpy())
        result["opis"] = opis(scores, world.issame.numpy(), *ids, far_levels=levels)["opis"]
    for d in eval_dims:
        if not 1 <= int(d) <= a.shape[1]:
            raise ValueError(f"eval_dims entries must be in [1, {a.shape[1]}], got {d!r}")
        cut = evaluate_pairs(a[:, : int(d)].numpy(), b[:, : int(d)].numpy(), world.issame.numpy(), fars=fars)
        result[f"acc@{int(d)}d"] = cut["acc"]
    return result


def _fit(
    world: World,
    s: TrainSettings,
    track_updates: bool = False,
    on_start: Callable[[Any], None] | None = None,
    after_step: Callable[[Any], None] | None = None,
) -> tuple[nn.Module, Any, list[float], float]:
    """The training loop shared by :func:`train` and :func:`train_tracked`.

    Returns ``(backbone, head, losses, train_s)``. ``track_updates`` turns the head's counters on
    (they draw nothing from any random stream, so the run is otherwise the same); ``on_start`` is
    called with the head before the first step, ``after_step`` after every optimizer step (before
    the schedulers step).
    """
    from pfclib import PartialFC
    from pfclib import margins as pmargins
    from pfclib.schedule import WarmupPolyDecay, make_schedulers

    if s.steps < 0 or s.batch_size < 2:
        raise ValueError(f"steps must be >= 0 and batch_size >= 2, got {s.steps} and {s.batch_size}")
    if s.threads is not None:
        torch.set_num_threads(int(s.threads))
    torch.manual_seed(s.seed)
    backbone = MLPBackbone(world.config.feature_dim, s.embedding_size, s.width, s.depth)
    margin = pmargins.create(s.margin)
    if s.filter_threshold is not None:
        margin = pmargins.create({**margin.to_dict(), "filter_threshold": float(s.filter_threshold)})
    head = PartialFC(
        world.num_classes,
        s.embedding_size,
        s.sample_rate,
        margin=margin,
        update=s.update,
        track_updates=track_updates,
        seed=s.seed,
        sub_centers=s.sub_centers,
        dim_sample_rate=s.dim_sample_rate,
    )
    opt_b = torch.optim.SGD(backbone.parameters(), lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    opt_h = head.make_optimizer("sgd", lr=s.head_lr or s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    losses: list[float] = []
    if on_start is not None:
        on_start(head)
    t0 = time.perf_counter()
    if s.steps:
        schedule = WarmupPolyDecay(s.steps, min(s.warmup_steps, s.steps), s.power)
        scheds = make_schedulers([opt_b, opt_h], schedule)
        order = torch.Generator()
        order.manual_seed(s.seed + 7919)
        n = world.labels.shape[0]
        perm, pos = torch.randperm(n, generator=order), 0
        backbone.train()
        for step in range(s.steps):
            if pos + s.batch_size > n:
                perm, pos = torch.randperm(n, generator=order), 0
            idx = perm[pos : pos + s.batch_size]
            pos += s.batch_size
            emb = backbone(world.features[idx])
            if not bool(torch.isfinite(emb).all()):
                raise FloatingPointError(f"the run diverged: non-finite embeddings at step {step} with {s}")
            loss = head(emb, world.labels[idx])
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"the run diverged: loss became {value} at step {step} with {s}")
            losses.append(value)
            loss.backward()
            opt_b.step()
            opt_h.step()
            if after_step is not None:
                after_step(head)
            opt_b.zero_grad(set_to_none=True)
            opt_h.zero_grad(set_to_none=True)
            for sch in scheds:
                sch.step()
    return backbone, head, losses, time.perf_counter() - t0


def _result(
    world: World, s: TrainSettings, backbone: nn.Module, head: Any, losses: list[float], train_s: float
):
    res = evaluate(backbone, world, eval_dims=tuple(s.eval_dims))
    tail = losses[-max(1, len(losses) // 10) :] if losses else [float("nan")]
    return {
        "acc": res["acc"],
        "opis": res.get("opis"),
        **{k: v for k, v in res.items() if k.startswith("acc@")},
        "acc_std": res["acc_std"],
        "auc": res["auc"],
        "tar@1e-3": res["tar_at_far"].get("1e-3"),
        "tar@1e-4": res["tar_at_far"].get("1e-4"),
        "final_loss": float(np.mean(tail)),
        "k": head.num_sampled,
        "num_classes": world.num_classes,
        "steps": s.steps,
        "train_s": train_s,
        "step_ms": 1e3 * train_s / max(s.steps, 1),
    }


def train(world: World, settings: TrainSettings | Mapping[str, Any]) -> dict[str, Any]:
    """Train a backbone and a :class:`pfclib.PartialFC` head on ``world``; score the held-out pairs.

    Returns a flat dict: ``acc``, ``acc_std``, ``auc``, ``tar@1e-3``, ``tar@1e-4`` (None where the
    pairs cannot support the level), ``final_loss`` (mean of the last 10 % of steps), ``k`` (classes
    sampled per step), ``num_classes``, ``steps``, ``train_s`` (seconds), ``step_ms``.

    Raises:
        FloatingPointError: when the embeddings or the loss become non-finite (a diverged run is
            never scored).
    """
    s = settings if isinstance(settings, TrainSettings) else TrainSettings.from_dict(settings)
    return _result(world, s, *_fit(world, s))


DEFAULT_TRACKED = 4096
"""Classes whose center movement :func:`train_tracked` records when not told which: the smallest."""


def train_tracked(
    world: World,
    settings: TrainSettings | Mapping[str, Any],
    track_classes: Sequence[int] | np.ndarray | torch.Tensor | None = None,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """:func:`train` with the head's per-class update counters on, and center movement recorded.

    The run is the one :func:`train` makes with the same arguments (same samples, sampled classes
    and numbers; the counters draw nothing random), plus, per class:

    * ``active``: steps in which the class was a positive of the batch (its center pulled);
    * ``passive``: steps in which it was a sampled negative only (pushed: it received a gradient as
      a negative) -- the head's ``active_updates`` / ``passive_updates``;
    * ``moved``: steps in which the class's center actually changed (exact comparison of its row,
      or with sub-centers any of its K rows, after each optimizer step with its value before it).
      Recorded only for ``track_classes`` (NaN for the others), at the cost of copying those rows
      once per step. ``None`` tracks the
      :data:`DEFAULT_TRACKED` classes with the fewest samples (ties by label): the tail.

    With ``update="dense"`` the optimizer steps the whole center matrix, so momentum and weight
    decay move every row in every step (``moved == steps``), sampled or not -- except where the
    learning rate is so small (the last steps of the polynomial decay, ~1e-6) that an unsampled
    row's float32 update rounds to zero; with ``"sparse"`` only the sampled rows change
    (``moved == active + passive``).

    Returns:
        ``(result, per_class)``: ``result`` as :func:`train`'s, plus ``tracked`` (classes whose
        movement was recorded); ``per_class`` one row per label with ``label``, ``size`` (training
        samples with that label), ``active``, ``passive``, ``moved`` (float, NaN if untracked) and
        ``steps``.
    """
    s = settings if isinstance(settings, TrainSettings) else TrainSettings.from_dict(settings)
    sizes = world.sizes
    if track_classes is None:
        order = np.lexsort((np.arange(world.num_classes), sizes.numpy()))
        tracked = np.sort(order[:DEFAULT_TRACKED])
    else:
        tracked = np.unique(np.asarray(track_classes, dtype=np.int64))
        if tracked.size and (tracked[0] < 0 or tracked[-1] >= world.num_classes):
            raise ValueError(
                f"track_classes must be labels in [0, {world.num_classes}), got "
                f"[{int(tracked[0])}, {int(tracked[-1])}]"
            )
    rows = torch.as_tensor(tracked, dtype=torch.long)
    moved = torch.zeros(rows.numel(), dtype=torch.int64)
    previous: list[torch.Tensor] = []  # the tracked rows before the step about to be taken

    def on_start(head: Any) -> None:
        previous.append(head.class_centers(rows))

    def after_step(head: Any) -> None:  # a class moved when any of its K sub-center rows changed
        current = head.class_centers(rows)
        moved.add_((current != previous[0]).flatten(1).any(dim=1))
        previous[0] = current

    backbone, head, losses, train_s = _fit(
        world, s, track_updates=True, on_start=on_start, after_step=after_step
    )
    result = {**_result(world, s, backbone, head, losses, train_s), "tracked": int(rows.numel())}
    moved_all = np.full(world.num_classes, np.nan)
    moved_all[tracked] = moved.numpy()
    per_class = pd.DataFrame(
        {
            "label": np.arange(world.num_classes),
            "size": sizes.numpy(),
            "active": head.active_updates.numpy(),
            "passive": head.passive_updates.numpy(),
            "moved": moved_all,
            "steps": s.steps,
        }
    )
    return result, per_class


_WORKER_WORLDS: dict[str, World] = {}
"""The worlds a worker process of :func:`run_design` has built, by their fields (one pool's life)."""


def _train_in_worker(fields: Mapping[str, Any], settings: TrainSettings) -> dict[str, Any]:
    key = repr(sorted(FeatureWorld.from_dict(fields).to_dict().items()))
    if key not in _WORKER_WORLDS:
        _WORKER_WORLDS[key] = make_world(fields)
    return train(_WORKER_WORLDS[key], settings)


def run_design(
    worlds: Mapping[str, Mapping[str, Any]],
    arms: Mapping[str, Mapping[str, Any]],
    cells: Sequence[Sequence[str]] | None,
    seeds: Sequence[int],
    base: Mapping[str, Any],
    log: Callable[[str], None] | None = print,
    workers: int = 1,
) -> pd.DataFrame:
    """Train every (world, arm) cell with every seed; one row per run.

    Args:
        worlds: ``{condition name: FeatureWorld fields}``; each world is generated once (once per
            worker process with ``workers > 1``; a world is a pure function of its fields).
        arms: ``{method name: TrainSettings overrides}`` (e.g. ``{"sample_rate": 0.1}``).
        cells: the ``[condition, method]`` pairs to run; ``None`` runs every combination.
        seeds: the seed goes to :attr:`TrainSettings.seed`; runs with one seed share the backbone
            initialisation, the centers' initialisation and the data order (a paired design).
        base: :class:`TrainSettings` fields shared by all runs.
        workers: how many runs train at once (:func:`pfcrepro.workers.run_jobs`): ``1`` in this
            process; more in that many processes, each with its share of the cores. A run's numbers
            depend on its thread count, so keep ``workers`` fixed within one design.

    Returns:
        Columns ``condition``, ``method``, ``seed`` and those of :func:`train`, in the order of
        ``cells`` then ``seeds``.
    """
    from pfcrepro.workers import run_jobs

    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be a non-empty list of distinct integers, got {list(seeds)}")
    cells = [(c, m) for c in worlds for m in arms] if cells is None else [tuple(x) for x in cells]
    for cell in cells:
        if len(cell) != 2 or cell[0] not in worlds or cell[1] not in arms:
            raise ValueError(
                f"cell {list(cell)!r} must be [condition, method] with a condition of {list(worlds)} "
                f"and a method of {list(arms)}"
            )
    runs = [(i, c, m, int(seed)) for i, (c, m) in enumerate(cells) for seed in seeds]
    settings = [TrainSettings.from_dict({**base, **arms[m], "seed": seed}) for _, _, m, seed in runs]
    built: dict[str, World] = {}

    def here(condition: str, s: TrainSettings) -> dict[str, Any]:
        if condition not in built:
            built[condition] = make_world(worlds[condition])
        return train(built[condition], s)

    if workers == 1:
        fn, jobs = here, [(c, s) for (_, c, _, _), s in zip(runs, settings, strict=True)]
    else:
        for c in {c for _, c, _, _ in runs}:
            FeatureWorld.from_dict(worlds[c])  # bad fields are said here, not in a worker
        fn = _train_in_worker
        jobs = [(dict(worlds[c]), s) for (_, c, _, _), s in zip(runs, settings, strict=True)]

    def report(j: int, res: dict[str, Any]) -> None:
        if log is None:
            return
        i, condition, method, seed = runs[j]
        tar = res["tar@1e-3"]
        log(
            f"[cell {i + 1}/{len(cells)}] {condition} / {method} / seed {seed}: acc {res['acc']:.4f} "
            f"TAR@1e-3 {tar if tar is None else round(tar, 4)} ({res['train_s']:.0f} s)"
        )

    names = [f"{c} / {m} / seed {seed}" for _, c, m, seed in runs]
    results = run_jobs(fn, jobs, workers, on_done=report, names=names)
    return pd.DataFrame(
        [
            {"condition": c, "method": m, "seed": seed, **res}
            for (_, c, m, seed), res in zip(runs, results, strict=True)
        ]
    )


def describe_world(world: World) -> dict[str, Any]:
    """Counts of a world, for a notebook's table: classes, identities, samples, flipped samples,
    identities split by conflict, verification pairs and impostor pairs."""
    clean_labels = world.labels[~world.flipped]
    clean_ids = world.identity[~world.flipped]
    split = torch.unique(torch.stack([clean_ids, clean_labels]), dim=1)[0]
    return {
        "classes": world.num_classes,
        "identities": world.config.num_identities,
        "samples": int(world.labels.numel()),
        "flipped samples": int(world.flipped.sum()),
        "conflicted identities": int(
            (torch.bincount(split, minlength=world.config.num_identities) > 1).sum()
        ),
        "verification pairs": int(world.issame.numel()),
        "impostor pairs": int((~world.issame).sum()),
    }
