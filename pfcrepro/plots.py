"""Figures shared by the claim notebooks: one job, drawing a design's judged comparisons.

:func:`forest` draws the table of :func:`pfcrepro.stats.judge`: one line per comparison, its paired
difference and interval in accuracy points, the zero line, and the equivalence margin or relevant
effect as a shaded band, so a reader sees at a glance which intervals exclude what.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

__all__ = ["forest"]


def forest(ax: Any, judged: pd.DataFrame, title: str = "", band: float | None = None) -> Any:
    """Draw ``judged`` (from :func:`pfcrepro.stats.judge`) on the matplotlib axes ``ax``.

    Differences are shown in accuracy points (x 100). Controls are drawn in grey, claims in blue;
    ``band`` (a fraction, e.g. the equivalence margin) shades ``[-band, +band]``.
    """
    if judged.empty:
        raise ValueError("forest needs at least one comparison")
    y = np.arange(len(judged))[::-1]
    for yi, row in zip(y, judged.itertuples()):
        colour = "0.45" if row.kind == "control" else "tab:blue"
        if np.isfinite(row.low) and np.isfinite(row.high):
            ax.plot([100 * row.low, 100 * row.high], [yi, yi], color=colour, lw=2.5)
        ax.plot([100 * row.mean], [yi], "o", color=colour, ms=7)
        label = (
            "passed"
            if row.kind == "control" and row.passed
            else ("FAILED" if row.kind == "control" else row.verdict)
        )
        ax.annotate(
            f"  {label}",
            (100 * (row.high if np.isfinite(row.high) else row.mean), yi),
            va="center",
            fontsize=8,
        )
    if band:
        ax.axvspan(-100 * band, 100 * band, color="tab:green", alpha=0.12, lw=0)
    ax.axvline(0.0, color="k", lw=0.8)
    ax.set_yticks(y, [f"{r.name} ({r.kind})" for r in judged.itertuples()])
    ax.set_xlabel("paired difference, accuracy points (treatment - baseline), 95% CI")
    if title:
        ax.set_title(title)
    return ax
