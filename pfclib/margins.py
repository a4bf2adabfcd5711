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


class Margin:
    """Base class. Subclasses are dataclasses with fields ``s`` and ``filter_threshold`` and
    implement :meth:`target_cosine`."""

    name: ClassVar[str] = ""
    s: float
    filter_threshold: float | None

    def target_cosine(self, cos_target: Tensor) -> Tensor:
        """The margin-modified (unscaled) cosine of the target entries; shape as ``cos_target``."""
        raise NotImplementedError

    def __call__(self, cos: Tensor, target: Tensor) -> Tensor:
        """Logits ``(N, k)`` from cosines ``(N, k)`` in [-1, 1] and target columns ``(N,)`` (int64, -1 =
        none). Returns a new tensor; ``cos`` is not modified."""
        if cos.dim() != 2 or target.shape != cos.shape[:1]:
            raise ValueError(
                f"expected cos (N, k) and target (N,), got {tuple(cos.shape)} and {tuple(target.shape)}"
            )
        rows = (target >= 0).nonzero().squeeze(1)
        cols = target[rows]
        logits = cos * self.s
        if self.filter_threshold is not None:
            noisy = cos.detach() > self.filter_threshold
            noisy[rows, cols] = False
            logits = logits.masked_fill(noisy, 0.0)
        if rows.numel() > 0:
            logits = logits.index_put((rows, cols), self.target_cosine(cos[rows, cols]) * self.s)
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
