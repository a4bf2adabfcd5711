"""What every notebook does at its end: save figures and a metrics JSON, and check them.

The one job of this module is a notebook's outputs: :func:`save_figure`, :func:`save_metrics` (with
:func:`to_records` turning tables into JSON-ready rows), :func:`check_metrics` (the last cell's
assertion) and :func:`headline` (one row of the README's results table, with a verdict from
:data:`VERDICTS`). Keeping this here (not in copied cells) means every stage writes its outputs the
same way: atomically, with finite numbers only, and a final check that cannot pass on an empty file.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pfclib.io import atomic_path, write_json

if TYPE_CHECKING:
    import pandas as pd


def _finite_leaves(obj: Any, prefix: str = "") -> list[tuple[str, float]]:
    """Flatten nested dicts/lists to (dotted key, number) pairs."""
    out: list[tuple[str, float]] = []
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            out += _finite_leaves(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            out += _finite_leaves(v, f"{prefix}[{i}]")
    elif isinstance(obj, bool) or obj is None or isinstance(obj, str):
        pass
    elif isinstance(obj, int | float):
        out.append((prefix, float(obj)))
    else:
        raise TypeError(
            f"metric {prefix!r} has type {type(obj).__name__}; expected numbers, strings, dicts, lists"
        )
    return out


def save_metrics(path: str | os.PathLike, metrics: Mapping[str, Any]) -> Path:
    """Write ``metrics`` as JSON atomically after checking every number is finite."""
    leaves = _finite_leaves(metrics)
    if not leaves:
        raise ValueError(f"metrics for {path} contain no numbers: {metrics!r}")
    bad = [k for k, v in leaves if not math.isfinite(v)]
    if bad:
        raise ValueError(f"non-finite metrics {bad} for {path}")
    write_json(path, dict(metrics))
    return Path(path)


def check_metrics(path: str | os.PathLike, required: list[str] | None = None) -> dict[str, Any]:
    """Load a metrics file and assert it exists, has numbers, all finite, and the ``required`` dotted keys."""
    path = Path(path)
    if not path.is_file():
        raise AssertionError(f"metrics file {path} was not written")
    metrics = json.loads(path.read_text())
    leaves = dict(_finite_leaves(metrics))
    assert leaves, f"{path} holds no numbers"
    bad = [k for k, v in leaves.items() if not math.isfinite(v)]
    assert not bad, f"{path}: non-finite values at {bad}"
    missing = [
        k
        for k in (required or [])
        if k not in leaves and not any(x.startswith((k + ".", k + "[")) for x in leaves)
    ]
    assert not missing, f"{path}: missing metrics {missing}"
    return metrics


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save a matplotlib figure (PNG or SVG by suffix) atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    return path


VERDICTS = (
    "reproduced",
    "not reproduced",
    "partly reproduced",
    "inconclusive",
    "extrapolated",
    "control failed",
    "smoke test",
)
"""The verdicts a headline may carry. ``"extrapolated"``: the claim concerns a scale not measured
here, and a figure extrapolated from the measured ones agrees with it (the row's ``measured``
text says from what); it is weaker than ``"reproduced"``. ``"control failed"``: the experiment's
positive control did not show a resolved loss, so the instrument is not shown to see and no verdict
is given. ``"smoke test"``: a tiny run (the notebooks' defaults, nbval) that gives no verdict."""


def headline(claim: str, paper: str, measured: str, verdict: str) -> dict[str, str]:
    """One row of the README's results table. ``measured`` must be formatted from measured values
    by the notebook; ``verdict`` is one of :data:`VERDICTS`."""
    if verdict not in VERDICTS:
        raise ValueError(f"verdict must be one of {VERDICTS}, got {verdict!r}")
    return {"claim": claim, "paper": paper, "measured": measured, "verdict": verdict}


def to_records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows of ``df`` as JSON-ready dicts (for ``save_metrics``): numpy scalars become Python numbers,
    NaN becomes ``None`` (a missing value, e.g. the interval of a single seed), categories strings."""
    out = []
    for row in df.to_dict("records"):
        clean = {}
        for key, value in row.items():
            if isinstance(value, np.generic):
                value = value.item()
            if isinstance(value, float) and not math.isfinite(value):
                value = None
            elif not isinstance(value, (int, float, str, bool)) and value is not None:
                value = str(value)
            clean[str(key)] = value
        out.append(clean)
    return out


ACCURACY_UNIT = "verification acc %"
"""The unit of a comparison's value unless its ``unit`` says otherwise (fractions shown x 100)."""


def comparison_text(
    row: Mapping[str, Any], level: str, treatment: str, baseline: str, unit: str = ACCURACY_UNIT
) -> str:
    """The ``measured`` cell of a headline from one row of :func:`pfcrepro.stats.judge`: both arms'
    value, the paired difference with its interval, the number of seeds and the resolution of the
    design (interval half-width), prefixed by the instrument ``level`` (e.g. ``"features,
    C=100,000"`` or ``"images, C=2,000"``). Values are fractions shown in points (x 100); ``unit``
    names what they measure (verification accuracy unless told, e.g. ``"FNMR gain, %"``)."""
    if not unit or not isinstance(unit, str):
        raise ValueError(f"unit must be a non-empty string naming the measured value, got {unit!r}")
    if math.isfinite(row["low"]):
        interval = f"95% CI [{100 * row['low']:+.2f}, {100 * row['high']:+.2f}]"
        resolves = f", resolves +-{100 * row['half_width']:.2f} pp"
    else:
        interval, resolves = "(one seed: no interval)", ""
    return (
        f"[{level}] {baseline} {100 * row['baseline']:.2f} vs {treatment} {100 * row['treatment']:.2f} "
        f"({unit}); diff {100 * row['mean']:+.2f} pp, {interval}, {int(row['n'])} seeds{resolves}"
    )


def claim_headlines(
    judged: pd.DataFrame, comparisons: list[Mapping[str, Any]], level: str, skip_missing: bool = False
) -> list[dict[str, str]]:
    """Headline rows for the claims of a judged design (:func:`pfcrepro.stats.judge`).

    Every comparison that carries ``claim`` and ``paper`` texts becomes one row: the measured cell
    by :func:`comparison_text` (arms named by the ``method`` of treatment and baseline, prefixed by
    ``level``, in the comparison's ``unit`` if it has one), the verdict from ``judged``.
    Comparisons without a ``claim`` (controls, secondary contrasts) are left out of the README but
    stay in the notebook's table. ``skip_missing``: leave out the claims ``judged`` has no row for,
    as ``judge(..., skip_missing=True)`` left out the comparisons a smaller design does not run; by
    default a missing row is an error.
    """
    rows = []
    by_name = {r["name"]: r for r in judged.to_dict("records")}
    for comp in comparisons:
        if "claim" not in comp:
            continue
        if "paper" not in comp:
            raise ValueError(f"comparison {comp['name']!r} has a claim but no 'paper' text")
        if comp["name"] not in by_name:
            if skip_missing:
                continue
            raise ValueError(
                f"claim {comp['name']!r} has no judged row (judged: {sorted(by_name)}); "
                "pass skip_missing=True if this design does not run it"
            )
        row = by_name[comp["name"]]
        names = [" ".join(str(v) for v in comp[side].values()) for side in ("treatment", "baseline")]
        rows.append(
            headline(
                comp["claim"],
                comp["paper"],
                comparison_text(row, level, *names, unit=comp.get("unit", ACCURACY_UNIT)),
                row["verdict"],
            )
        )
    return rows
