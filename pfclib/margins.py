"""Margins: how the cosine of each row's own class becomes its logit.

A margin maps a cosine matrix ``cos`` (N, k) and each row's target column ``target`` (N,)
(-1 when the row's class is not among these k columns) to logits ``s * f(cos)``:

* target entries get the margin: ``s * target_cosine(c)``;
* with ``filter_threshold=t`` (inter-class filtering), negatives with ``cos > t`` are set to 0
  without gradient — they stay in the softmax denominator, as ``exp(0)``;
* every other entry is ``s * cos``.

Margins are frozen dataclasses: plain, comparable, and rebuilt from a config with :func:`create`
(``create(m.to_dict()) == m``).

ArcFace gradient, two named variants:

* ``"arcface"`` (:class:`ArcFace`, ``straight_through=False``): the textbook gradient, the
  derivative of ``cos(θ + m)`` w.r.t. ``c = cos θ``: ``cos m + sin m · c / sin θ``. It is infinite
  at ``c = ±1``; the denominator is floored at ``SIN_FLOOR`` so it stays finite. The floor only
  changes the derivative when ``sin θ < 1e-4``; there the normalisation's own Jacobian (which
  vanishes like ``sin θ``) already keeps the gradient reaching the embedding bounded.
* ``"arcface_st"`` (``straight_through=True``): the reference implementation's choice, the margin
  is applied without gradient, so ``d logit / d c = s`` for the target too.

``θ + m > π`` (``c < cos(π - m)``): ``cos(θ + m)`` would turn back up, rewarding a worse angle.
For those targets the margin continues as ``c - (1 - cos m)`` (a CosFace margin equal to the
penalty at ``θ + m = π``): continuous, increasing in ``c``, with derivative 1. The combined margin
``cos(m1·θ + m2) - m3`` is continued the same way beyond ``m1·θ + m2 = π``.

Per-row margins (:class:`AdaFace`, :class:`NPCFace`) need information about the whole row, not
only its target cosine: the embedding's norm, or sums over the row's negatives on every rank. They
receive it as a :class:`RowContext` (per-row tensors, built once per forward by the head, see
:attr:`Margin.needs_norms` / :attr:`Margin.needs_negatives`) through the optional ``ctx``
argument of :meth:`Margin.__call__`. Margins that need neither (ArcFace, CosFace, combined,
softmax) never get a context and run exactly the code they ran before.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

SIN_FLOOR = 1e-4
"""Floor of ``sin θ`` in the textbook angular-margin derivative (keeps it finite at ``cos = ±1``)."""


def _check_field_types(margin: Margin) -> None:
    """Every field of a margin has the type its annotation says: a real number (not a bool or a
    string such as ``"0.5"``), ``None`` where allowed, a bool for ``straight_through``."""
    for f in dataclasses.fields(margin):  # type: ignore[arg-type]
        value = getattr(margin, f.name)
        annotation = str(f.type)
        if f.type in (bool, "bool"):
            ok, expected = isinstance(value, bool), "a bool (true or false)"
        else:
            optional = "None" in annotation
            ok = (value is None and optional) or (
                isinstance(value, numbers.Real) and not isinstance(value, bool)
            )
            expected = "a real number" + (" or None" if optional else "")
        if not ok:
            raise TypeError(
                f"margin {margin.name!r}: {f.name} must be {expected}, got {type(value).__name__}: {value!r}"
            )


def _check_scale_and_filter(s: float, filter_threshold: float | None) -> None:
    if not (math.isfinite(s) and s > 0):
        raise ValueError(f"scale s must be a finite positive number, got {s!r}")
    if filter_threshold is not None and not (-1.0 < filter_threshold <= 1.0):
        raise ValueError(f"filter_threshold must be in (-1, 1] or None, got {filter_threshold!r}")


@dataclass(frozen=True)
class RowContext:
    """Per-row margin parameters of one forward (every field ``(N,)`` or None), detached.

    * ``m2``: additive angular margin of the row's target, ``cos(θ + m2)`` (may be negative);
    * ``m3``: additive cosine margin of the row's target, subtracted after the angular one;
    * ``threshold``: negatives of the row with ``cos > threshold`` are *hard* and get the margin's
      :meth:`hard_negative_logit` instead of ``cos``.
    """

    m2: Tensor | None = None
    m3: Tensor | None = None
    threshold: Tensor | None = None

    def take(self, rows: Tensor) -> RowContext:
        """The context of the rows ``rows`` (an index tensor)."""
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        return RowContext(pick(self.m2), pick(self.m3), pick(self.threshold))


class Margin:
    """Base class. Subclasses are dataclasses with fields ``s`` and ``filter_threshold`` and
    implement :meth:`target_cosine`.

    Per-row margins set :attr:`needs_norms` (the head calls :meth:`norm_context` with the
    embeddings' norms once per forward) or :attr:`needs_negatives` (the head's path calls
    :meth:`hardness_threshold` on each row's target cosine and :meth:`negative_context` with
    per-row sums over the hard negatives of all ranks); their :meth:`target_cosine` then takes the
    rows' :class:`RowContext`."""

    name: ClassVar[str] = ""
    needs_norms: ClassVar[bool] = False
    needs_negatives: ClassVar[bool] = False
    s: float
    filter_threshold: float | None

    def target_cosine(self, cos_target: Tensor) -> Tensor:
        """The margin-modified (unscaled) cosine of the target entries; shape as ``cos_target``.
        (Per-row margins take a second argument, the :class:`RowContext` of these entries' rows.)"""
        raise NotImplementedError

    def initial_state(self) -> dict[str, float]:
        """Running state the head keeps for this margin as buffers ``margin_<key>`` (none by default)."""
        return {}

    def norm_context(self, norms: Tensor, state: Mapping[str, Tensor], update: bool) -> RowContext:
        """Per-row context from the norms ``(N,)`` of the gathered embeddings (``needs_norms``)."""
        raise NotImplementedError

    def hardness_threshold(self, cos_target: Tensor) -> Tensor:
        """Per-row threshold of hard negatives from the target cosines (``needs_negatives``)."""
        raise NotImplementedError

    def negative_context(self, threshold: Tensor, hard_sum: Tensor, hard_count: Tensor) -> RowContext:
        """Per-row context from each row's threshold and the sum and number of its hard negatives'
        cosines over every rank (``needs_negatives``)."""
        raise NotImplementedError

    def hard_negative_logit(self, cos: Tensor) -> Tensor:
        """The (unscaled) logit of a hard negative (``needs_negatives``)."""
        raise NotImplementedError

    def hard_negative_slope(self) -> float:
        """The derivative of :meth:`hard_negative_logit` w.r.t. the cosine (an affine map's slope)."""
        raise NotImplementedError

    def target_values(self, cos_target: Tensor, ctx: RowContext | None, rows: Tensor) -> Tensor:
        """:meth:`target_cosine` of the target entries of rows ``rows`` (with their context, if any)."""
        if ctx is None:
            return self.target_cosine(cos_target)
        return self.target_cosine(cos_target, ctx.take(rows))  # type: ignore[call-arg]

    def __call__(self, cos: Tensor, target: Tensor, ctx: RowContext | None = None) -> Tensor:
        """Logits ``(N, k)`` from cosines ``(N, k)`` in [-1, 1] and target columns ``(N,)`` (int64, -1 =
        none); ``ctx`` the rows' :class:`RowContext` (per-row margins only). Returns a new tensor;
        ``cos`` is not modified."""
        if cos.dim() != 2 or target.shape != cos.shape[:1]:
            raise ValueError(
                f"expected cos (N, k) and target (N,), got {tuple(cos.shape)} and {tuple(target.shape)}"
            )
        if ctx is None and (self.needs_norms or self.needs_negatives):
            raise ValueError(f"margin {self.name!r} needs a per-row context (ctx); the head builds it")
        rows = (target >= 0).nonzero().squeeze(1)
        cols = target[rows]
        logits = cos * self.s
        if ctx is not None and ctx.threshold is not None:
            hard = hard_negatives(cos.detach(), ctx.threshold, rows, cols)
            logits = torch.where(hard, self.hard_negative_logit(cos) * self.s, logits)
        if self.filter_threshold is not None:
            noisy = cos.detach() > self.filter_threshold
            noisy[rows, cols] = False
            logits = logits.masked_fill(noisy, 0.0)
        if rows.numel() > 0:
            logits = logits.index_put((rows, cols), self.target_values(cos[rows, cols], ctx, rows) * self.s)
        return logits

    def to_dict(self) -> dict[str, Any]:
        """A plain dict ``{"name": ..., **fields}`` that :func:`create` turns back into this margin."""
        return {"name": self.name, **dataclasses.asdict(self)}  # type: ignore[call-overload]


class _AngularTarget(torch.autograd.Function):
    """``cos(m1·θ + m2) - m3`` with ``θ = arccos c``, continued linearly beyond ``m1·θ + m2 = π``,
    with the safe textbook derivative."""

    @staticmethod
    def forward(ctx, c: Tensor, m1: float, m2: float, m3: float) -> Tensor:
        theta = torch.acos(c.clamp(-1.0, 1.0))
        theta_max = (math.pi - m2) / m1  # where m1·θ + m2 reaches π
        inside = theta <= theta_max
        value = torch.cos(m1 * theta + m2)
        if theta_max < math.pi:
            tail = c - (math.cos(theta_max) + 1.0)
            value = torch.where(inside, value, tail)
        ctx.save_for_backward(theta, inside)
        ctx.m1, ctx.m2 = m1, m2
        return value - m3

    @staticmethod
    def backward(ctx, grad: Tensor):
        theta, inside = ctx.saved_tensors
        m1, m2 = ctx.m1, ctx.m2
        slope = m1 * torch.sin(m1 * theta + m2) / torch.sin(theta).clamp(min=SIN_FLOOR)
        slope = torch.where(inside, slope, torch.ones_like(slope))
        return grad * slope, None, None, None


def angular_target(c: Tensor, m1: float, m2: float, m3: float, straight_through: bool = False) -> Tensor:
    """``cos(m1·arccos(c) + m2) - m3`` (continued past π, see module doc) for cosines ``c`` in [-1, 1].

    ``straight_through=True`` returns the same value with derivative 1 w.r.t. ``c``.
    """
    if straight_through:
        with torch.no_grad():
            value = _AngularTarget.apply(c, m1, m2, m3)
        return c + (value - c.detach())  # the correction carries no graph: d/dc = 1
    return _AngularTarget.apply(c, m1, m2, m3)


def hard_negatives(cos: Tensor, threshold: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """Bool ``(N, k)``: entries with ``cos > threshold[row]`` that are not the row's target
    (``rows``, ``cols``: the target entries in these columns)."""
    hard = cos > threshold[:, None]
    hard[rows, cols] = False
    return hard


class _RowAngularTarget(torch.autograd.Function):
    """``cos(θ + m2) - m3`` with per-entry margins ``m2``, ``m3`` (tensors shaped as ``c``, no
    gradient), continued linearly with slope 1 where ``θ + m2`` leaves ``[0, π]``: beyond π as
    ``c + cos m2 - 1`` (the value -1 at ``θ + m2 = π``, as :class:`ArcFace`), below 0 (only for
    ``m2 < 0``) as ``c - cos m2 + 1`` (the value 1 at ``θ + m2 = 0``). Continuous and increasing
    in ``c``; the derivative inside is ``sin(θ + m2) / max(sin θ, SIN_FLOOR)``."""

    @staticmethod
    def forward(ctx, c: Tensor, m2: Tensor, m3: Tensor) -> Tensor:
        theta = torch.acos(c.clamp(-1.0, 1.0))
        phi = theta + m2
        above, below = phi > math.pi, phi < 0.0
        value = torch.cos(phi)
        value = torch.where(above, c + torch.cos(m2) - 1.0, value)
        value = torch.where(below, c - torch.cos(m2) + 1.0, value)
        ctx.save_for_backward(theta, phi, above | below)
        return value - m3

    @staticmethod
    def backward(ctx, grad: Tensor):
        theta, phi, outside = ctx.saved_tensors
        slope = torch.sin(phi) / torch.sin(theta).clamp(min=SIN_FLOOR)
        slope = torch.where(outside, torch.ones_like(slope), slope)
        return grad * slope, None, None


def row_angular_target(c: Tensor, m2: Tensor, m3: Tensor | None = None) -> Tensor:
    """``cos(arccos(c) + m2) - m3`` with per-entry margins (see :class:`_RowAngularTarget`)."""
    m2 = m2.to(c.dtype).detach()
    m3 = torch.zeros_like(c) if m3 is None else m3.to(c.dtype).detach()
    return _RowAngularTarget.apply(c, m2, m3)


def _check_real(
    margin: Margin, field: str, lo: float, hi: float, closed_lo: bool = True, closed_hi: bool = True
) -> None:
    value = getattr(margin, field)
    ok = (
        math.isfinite(value)
        and (value >= lo if closed_lo else value > lo)
        and (value <= hi if closed_hi else value < hi)
    )
    if not ok:
        interval = f"{'[' if closed_lo else '('}{lo}, {hi}{']' if closed_hi else ')'}"
        raise ValueError(f"margin {margin.name!r}: {field} must be in {interval}, got {value!r}")


@dataclass(frozen=True)
class AdaFace(Margin):
    """AdaFace (Kim, Jain, Liu, "AdaFace: Quality Adaptive Margin for Face Recognition", CVPR 2022):
    a per-sample margin set by the embedding's norm ``||z||`` (a proxy of image quality).

    For each row, with ``n = clip(||z||, 0.001, 100)`` the norm of the gathered embedding before its
    normalisation (detached: no gradient flows through the margin)::

        μ ← α·mean_B(n) + (1 - α)·μ          σ ← α·std_B(n) + (1 - α)·σ      (update first ...)
        ẑ = clip((n - μ) / (σ + ε) · h, -1, 1)                               (... then use)
        g_angle = -m·ẑ,   g_add = m·ẑ + m
        target logit = s · (cos(θ_y + g_angle) - g_add),  every other logit s·cos θ_j

    ``mean_B``/``std_B`` are the mean and the unbiased standard deviation (as ``torch.std``; 0 for a
    single row) of the clipped norms of the *global* batch: the head gathers every rank's
    embeddings, so every rank computes the same statistics from the same rows in the same order
    and no collective is needed. ``μ``, ``σ`` are exponential moving averages kept by the head as
    buffers ``margin_batch_mean`` and ``margin_batch_std`` (in ``state_dict()``); they are updated
    in every training-mode forward (also one under ``torch.no_grad()``; never in ``eval()`` mode),
    **before** they are used (the paper's code does the same), so a step's own statistics already
    enter its margins. ``ε = eps`` keeps the ratio finite when ``σ = 0``
    (the paper's code adds ``1e-3`` the same way).

    Defaults are the paper's: ``m = 0.4``, ``h = 0.333``, ``s = 64``; momentum ``α = 0.01``,
    initial ``μ = 20``, ``σ = 100``, norm clip ``[0.001, 100]`` and ``ε = 1e-3`` as in the paper's
    code. Where ``θ_y + g_angle`` leaves ``[0, π]`` the value is continued linearly (continuous,
    increasing in ``cos θ_y``; see :class:`_RowAngularTarget`) instead of the paper code's clipping
    of the cosine to ``±(1 - 1e-3)``; the derivative is the textbook one, floored as ArcFace's.
    """

    name: ClassVar[str] = "adaface"
    needs_norms: ClassVar[bool] = True
    s: float = 64.0
    m: float = 0.4
    h: float = 0.333
    alpha: float = 0.01
    mean_init: float = 20.0
    std_init: float = 100.0
    norm_min: float = 0.001
    norm_max: float = 100.0
    eps: float = 1e-3
    filter_threshold: float | None = None

    def __post_init__(self) -> None:
        _check_field_types(self)
        _check_scale_and_filter(self.s, self.filter_threshold)
        _check_real(self, "m", 0.0, math.pi / 2)
        _check_real(self, "h", 0.0, math.inf, closed_lo=False, closed_hi=False)
        _check_real(self, "alpha", 0.0, 1.0, closed_lo=False)
        _check_real(self, "norm_min", 0.0, math.inf, closed_hi=False)
        _check_real(self, "norm_max", self.norm_min, math.inf, closed_lo=False, closed_hi=False)
        _check_real(self, "mean_init", -math.inf, math.inf, closed_lo=False, closed_hi=False)
        _check_real(self, "std_init", 0.0, math.inf, closed_hi=False)
        _check_real(self, "eps", 0.0, math.inf, closed_lo=False, closed_hi=False)

    def initial_state(self) -> dict[str, float]:
        return {"batch_mean": self.mean_init, "batch_std": self.std_init}

    def norm_context(self, norms: Tensor, state: Mapping[str, Tensor], update: bool) -> RowContext:
        """``g_angle`` (as ``m2``) and ``g_add`` (as ``m3``) per row from the norms ``(N,)``; with
        ``update`` the moving averages in ``state`` (``batch_mean``, ``batch_std``) move first."""
        with torch.no_grad():
            n = norms.detach().clamp(self.norm_min, self.norm_max)
            mean, std = state["batch_mean"], state["batch_std"]
            if update:
                batch_std = n.std() if n.numel() > 1 else n.new_zeros(())
                mean.mul_(1.0 - self.alpha).add_(n.mean().to(mean.dtype), alpha=self.alpha)
                std.mul_(1.0 - self.alpha).add_(batch_std.to(std.dtype), alpha=self.alpha)
            z = ((n - mean.to(n.dtype)) / (std.to(n.dtype) + self.eps) * self.h).clamp(-1.0, 1.0)
            return RowContext(m2=-self.m * z, m3=self.m * z + self.m)

    def target_cosine(self, cos_target: Tensor, ctx: RowContext | None = None) -> Tensor:
        if ctx is None or ctx.m2 is None:
            raise ValueError("AdaFace needs the rows' context (their norms); the head builds it")
        return row_angular_target(cos_target, ctx.m2, ctx.m3)


@dataclass(frozen=True)
class NPCFace(Margin):
    """NPCFace (Zeng, Shi, Du, Wang, Lei, Mei, "NPCFace: Negative-Positive Collaborative Training
    for Large-scale Face Recognition", arXiv:2007.10172, 2020): hard negatives get an enlarged
    logit and the positive margin of a sample grows with its hard negatives (the collaboration).

    For row i with target cosine ``cos θ_y`` and negatives ``cos θ_j`` (j ≠ y)::

        hard:      M_ij = 1  if  cos θ_j > cos(θ_y + m)     (else 0; no gradient)
        negative:  s·(t·cos θ_j + α)  if M_ij = 1,   s·cos θ_j  otherwise
        margin:    m_i = m0 + m1 · Σ_j M_ij cos θ_j / Σ_j M_ij      (m_i = m0 when no hard
                                                                     negative; no gradient)
        positive:  s·cos(θ_y + m_i)

    Defaults ``m = 0.5`` (the hardness test), ``m0 = 0.4``, ``m1 = 0.2``, ``t = 1.1``,
    ``α = 0.2``, ``s = 64`` are those of the implementation published with the paper by its
    authors (FaceX-Zoo). That implementation keeps ``cos θ_y`` unchanged where it is ``<= 0``; here
    ``cos(θ + m)`` is used everywhere and continued linearly beyond ``θ + m = π`` like
    :class:`ArcFace` (continuous, increasing), for the hardness test as for the positive logit.

    Distributed and sampled: the hardness test and the sums over j span **every rank's columns**
    (the threshold ``cos(θ_y + m)`` is all-reduced from the rank owning the target, the per-row
    sum and count of hard negatives are all-reduced over the head's process group), and with
    ``sample_rate < 1`` only the **sampled** negatives count (the others are not in the softmax).
    Cost over ArcFace: two all-reduces of ``O(N)`` and one ``(N, k)`` pass (the chunked path: an
    extra pass of matrix products over the chunks).

    With ``filter_threshold`` the inter-class filter wins: a filtered negative's logit is 0 whether
    it is hard or not, and it still counts in the hardness sums.
    """

    name: ClassVar[str] = "npcface"
    needs_negatives: ClassVar[bool] = True
    s: float = 64.0
    m: float = 0.5
    m0: float = 0.4
    m1: float = 0.2
    t: float = 1.1
    alpha: float = 0.2
    filter_threshold: float | None = None

    def __post_init__(self) -> None:
        _check_field_types(self)
        _check_scale_and_filter(self.s, self.filter_threshold)
        _check_real(self, "m", 0.0, math.pi, closed_hi=False)
        _check_real(self, "m0", 0.0, math.pi, closed_hi=False)
        _check_real(self, "m1", 0.0, math.inf, closed_hi=False)
        if self.m0 - self.m1 < 0.0 or self.m0 + self.m1 >= math.pi:
            raise ValueError(
                f"margin 'npcface': m_i = m0 + m1·(mean hard cosine in [-1, 1]) must stay in [0, pi), "
                f"got m0={self.m0!r}, m1={self.m1!r}"
            )
        _check_real(self, "t", 0.0, math.inf, closed_lo=False, closed_hi=False)
        _check_real(self, "alpha", -math.inf, math.inf, closed_lo=False, closed_hi=False)

    def hardness_threshold(self, cos_target: Tensor) -> Tensor:
        with torch.no_grad():
            return angular_target(cos_target.detach(), 1.0, self.m, 0.0)

    def negative_context(self, threshold: Tensor, hard_sum: Tensor, hard_count: Tensor) -> RowContext:
        m_i = self.m0 + self.m1 * hard_sum / hard_count.clamp(min=1.0)
        return RowContext(m2=m_i.detach(), threshold=threshold.detach())

    def hard_negative_logit(self, cos: Tensor) -> Tensor:
        return cos * self.t + self.alpha

    def hard_negative_slope(self) -> float:
        return self.t

    def target_cosine(self, cos_target: Tensor, ctx: RowContext | None = None) -> Tensor:
        if ctx is None or ctx.m2 is None:
            raise ValueError("NPCFace needs the rows' context (their hard negatives); the head builds it")
        return row_angular_target(cos_target, ctx.m2)


@dataclass(frozen=True)
class CombinedMargin(Margin):
    """``cos(m1·θ + m2) - m3`` (insightface's combined margin; m1 = SphereFace, m2 = ArcFace,
    m3 = CosFace). ``straight_through`` selects the reference gradient (see module doc)."""

    name: ClassVar[str] = "combined"
    s: float = 64.0
    m1: float = 1.0
    m2: float = 0.5
    m3: float = 0.0
    filter_threshold: float | None = None
    straight_through: bool = False

    def __post_init__(self) -> None:
        _check_field_types(self)
        _check_scale_and_filter(self.s, self.filter_threshold)
        if not (math.isfinite(self.m1) and self.m1 > 0):
            raise ValueError(f"m1 must be a finite positive number, got {self.m1!r}")
        if not 0.0 <= self.m2 < math.pi:
            raise ValueError(f"m2 must be in [0, pi), got {self.m2!r}")
        if not math.isfinite(self.m3):
            raise ValueError(f"m3 must be finite, got {self.m3!r}")

    def target_cosine(self, cos_target: Tensor) -> Tensor:
        return angular_target(cos_target, self.m1, self.m2, self.m3, self.straight_through)


@dataclass(frozen=True)
class ArcFace(Margin):
    """``cos(θ + m)`` (additive angular margin, m = 0.5). ``straight_through=False`` is the
    textbook gradient (name ``"arcface"``), ``True`` the reference implementation's
    (name ``"arcface_st"``)."""

    name: ClassVar[str] = "arcface"
    s: float = 64.0
    m: float = 0.5
    filter_threshold: float | None = None
    straight_through: bool = False

    def __post_init__(self) -> None:
        _check_field_types(self)
        _check_scale_and_filter(self.s, self.filter_threshold)
        if not 0.0 <= self.m < math.pi:
            raise ValueError(f"ArcFace margin m must be in [0, pi), got {self.m!r}")

    def target_cosine(self, cos_target: Tensor) -> Tensor:
        return angular_target(cos_target, 1.0, self.m, 0.0, self.straight_through)


@dataclass(frozen=True)
class CosFace(Margin):
    """``cos θ - m`` (additive cosine margin, m = 0.4)."""

    name: ClassVar[str] = "cosface"
    s: float = 64.0
    m: float = 0.4
    filter_threshold: float | None = None

    def __post_init__(self) -> None:
        _check_field_types(self)
        _check_scale_and_filter(self.s, self.filter_threshold)
        if not math.isfinite(self.m):
            raise ValueError(f"CosFace margin m must be finite, got {self.m!r}")

    def target_cosine(self, cos_target: Tensor) -> Tensor:
        return cos_target - self.m


@dataclass(frozen=True)
class NormSoftmax(Margin):
    """No margin: ``s · cos`` for every class (normalised softmax), the baseline of margin ablations."""

    name: ClassVar[str] = "softmax"
    s: float = 64.0
    filter_threshold: float | None = None

    def __post_init__(self) -> None:
        _check_field_types(self)
        _check_scale_and_filter(self.s, self.filter_threshold)

    def target_cosine(self, cos_target: Tensor) -> Tensor:
        return cos_target


_REGISTRY: dict[str, tuple[type[Margin], dict[str, Any]]] = {
    "arcface": (ArcFace, {}),
    "arcface_st": (ArcFace, {"straight_through": True}),
    "cosface": (CosFace, {}),
    "combined": (CombinedMargin, {}),
    "softmax": (NormSoftmax, {}),
    "adaface": (AdaFace, {}),
    "npcface": (NPCFace, {}),
}


def list_margins() -> list[str]:
    """Names accepted by :func:`create`."""
    return sorted(_REGISTRY)


def create(spec: Margin | str | Mapping[str, Any]) -> Margin:
    """Build a margin from a name (defaults), a dict ``{"name": ..., **params}`` or a Margin (returned as is).

    >>> create({"name": "arcface", "m": 0.5, "filter_threshold": 0.4})
    ArcFace(s=64.0, m=0.5, filter_threshold=0.4, straight_through=False)
    """
    if isinstance(spec, Margin):
        return spec
    if isinstance(spec, str):
        name, params = spec, {}
    elif isinstance(spec, Mapping):
        params = dict(spec)
        if "name" not in params:
            raise ValueError(
                f"margin dict needs a 'name' key (one of {list_margins()}), got keys {sorted(params)}"
            )
        name = params.pop("name")
    else:
        raise TypeError(f"margin must be a Margin, a name or a dict, got {type(spec).__name__}: {spec!r}")
    if name not in _REGISTRY:
        raise ValueError(f"unknown margin {name!r}; expected one of {list_margins()}")
    cls, defaults = _REGISTRY[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for margin {name!r}; accepted: {sorted(fields)}")
    return cls(**{**defaults, **params})
