"""Seed statistics and verdicts: the one job of this module is to say, from the runs of several seeds,
how large an effect is and whether a claim of the paper held.

* :func:`mean_interval`, :func:`summarise` (mean and Student-t interval over seeds) and
  :func:`paired_difference` (a treatment minus a baseline, paired on the seed);
* :func:`superiority_verdict` and :func:`equivalence_verdict` turn an interval into one of
  :data:`pfcrepro.report.VERDICTS` by a criterion the notebook states in its prose; "not
  reproduced" only when the interval excludes the claim;
* :func:`control_passed` (did a change known to hurt show a resolved loss?) and :func:`resolution`
  (the interval half-width and the minimum detectable effect of a paired design);
* :func:`judge`: a design's controls and claims in one table, with no verdict when a control fails.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "mean_interval",
    "summarise",
    "paired_difference",
    "superiority_verdict",
    "equivalence_verdict",
    "control_passed",
    "resolution",
    "judge",
    "COMPARISON_KINDS",
]


def mean_interval(
    values: Sequence[float] | np.ndarray, confidence: float = 0.95
) -> tuple[float, float, float]:
    """Mean and two-sided Student-t confidence interval of the mean of ``values`` (float64).

    Returns ``(mean, low, high)``. With one value the interval is ``(nan, nan)``: a single seed says
    nothing about the spread. Non-finite values raise, because an interval over them would be
    silently wrong.
    """
    from scipy import stats

    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("mean_interval needs at least one value, got none")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"mean_interval got non-finite values: {x.tolist()}")
    mean = float(x.mean())
    if x.size == 1:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf(0.5 + confidence / 2, df=x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return mean, mean - half, mean + half


def summarise(
    df: pd.DataFrame, value: str, by: str | Sequence[str], confidence: float = 0.95
) -> pd.DataFrame:
    """Mean and confidence interval of column ``value`` over the rows of each group of ``by``.

    Returns one row per group (in order of first appearance) with the ``by`` columns and ``n``,
    ``mean``, ``std`` (``ddof=1``; NaN for one row), ``low``, ``high`` (the interval of
    :func:`mean_interval`) and ``half_width``.
    """
    by = [by] if isinstance(by, str) else list(by)
    missing = [c for c in [value, *by] if c not in df.columns]
    if missing:
        raise KeyError(f"columns {missing} not in the table; it has {list(df.columns)}")
    rows = []
    for key, group in df.groupby(by, sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        x = group[value].to_numpy(dtype=np.float64)
        mean, low, high = mean_interval(x, confidence)
        rows.append(
            {
                **dict(zip(by, key)),
                "n": int(x.size),
                "mean": mean,
                "std": float(x.std(ddof=1)) if x.size > 1 else float("nan"),
                "low": low,
                "high": high,
                "half_width": (high - low) / 2,
            }
        )
    return pd.DataFrame(rows)


def paired_difference(
    df: pd.DataFrame,
    value: str,
    column: str,
    treatment: Any,
    baseline: Any,
    pair_on: str = "seed",
    by: str | Sequence[str] | None = None,
    confidence: float = 0.95,
) -> pd.DataFrame:
    """``value`` of the ``treatment`` level minus that of the ``baseline`` level of ``column``, paired.

    Rows of the two levels are matched on ``pair_on`` (the seed: same initialisation and data order)
    and, when given, on the ``by`` columns (one result row per group). Pairing removes the variance
    that the two arms share, so the interval is that of the per-seed differences.

    Returns:
        One row per ``by`` group with ``n`` (matched pairs), ``mean``, ``low``, ``high`` of the
        difference (:func:`mean_interval`), and ``treatment`` / ``baseline`` (the mean of each arm
        over the matched pairs).

    Raises:
        ValueError: when a level is absent, a (group, pair) appears twice in an arm, or no pair matches.
    """
    by = [] if by is None else ([by] if isinstance(by, str) else list(by))
    keys = [*by, pair_on]
    missing = [c for c in [value, column, *keys] if c not in df.columns]
    if missing:
        raise KeyError(f"columns {missing} not in the table; it has {list(df.columns)}")
    arms = {}
    for name, level in (("treatment", treatment), ("baseline", baseline)):
        arm = df[df[column] == level]
        if arm.empty:
            raise ValueError(
                f"{column}={level!r} ({name}) has no rows; levels: {list(pd.unique(df[column]))}"
            )
        if arm.duplicated(keys).any():
            raise ValueError(f"{column}={level!r} has several rows for the same {keys}; cannot pair them")
        arms[name] = arm[[*keys, value]]
    merged = arms["treatment"].merge(arms["baseline"], on=keys, suffixes=("_t", "_b"))
    if merged.empty:
        raise ValueError(f"no {keys} combination appears under both {treatment!r} and {baseline!r}")
    groups = merged.groupby(by, sort=False) if by else [((), merged)]
    rows = []
    for key, group in groups:
        key = key if isinstance(key, tuple) else (key,)
        t = group[f"{value}_t"].to_numpy(dtype=np.float64)
        b = group[f"{value}_b"].to_numpy(dtype=np.float64)
        mean, low, high = mean_interval(t - b, confidence)
        rows.append(
            {
                **dict(zip(by, key)),
                "n": int(t.size),
                "mean": mean,
                "low": low,
                "high": high,
                "treatment": float(t.mean()),
                "baseline": float(b.mean()),
            }
        )
    return pd.DataFrame(rows)


def superiority_verdict(mean: float, low: float, high: float, relevant: float = 0.0) -> str:
    """Verdict for a claim "the treatment is better than the baseline" from the interval of the
    paired difference (treatment - baseline).

    ``relevant`` (>= 0) is the smallest improvement that would count as the claimed effect (the
    paper's effects are several points; a notebook states its own value). The verdict says
    "not reproduced" only when the data exclude the claim, never merely because the mean is <= 0:

    * ``"reproduced"``: the interval lies above 0 and reaches ``relevant`` (``low > 0`` and
      ``high > relevant``): the improvement is resolved;
    * ``"partly reproduced"``: the interval lies above 0 but below ``relevant``: a resolved
      improvement, smaller than the claimed one;
    * ``"not reproduced"``: the interval lies at or below ``relevant`` and reaches 0 or below
      (``high <= relevant`` and ``low <= 0``): every improvement of the claimed size is excluded;
    * ``"inconclusive"``: the interval contains 0 and reaches above ``relevant``, or is undefined
      (one seed).
    """
    if not math.isfinite(mean):
        raise ValueError(f"mean must be finite, got {mean!r}")
    if not (math.isfinite(relevant) and relevant >= 0):
        raise ValueError(f"relevant must be a finite number >= 0, got {relevant!r}")
    if not (math.isfinite(low) and math.isfinite(high)):
        return "inconclusive"
    if low > high:
        raise ValueError(f"interval must have low <= high, got [{low!r}, {high!r}]")
    if low > 0:
        return "reproduced" if high > relevant else "partly reproduced"
    if high <= relevant:
        return "not reproduced"
    return "inconclusive"


def control_passed(low: float, high: float) -> bool:
    """Whether a positive control worked: a change known to hurt must show a *resolved* loss, i.e. the
    whole interval of its paired difference (control - baseline) lies below zero. An undefined
    interval (one seed) is not a pass."""
    return bool(math.isfinite(low) and math.isfinite(high) and high < 0)


def resolution(
    differences: Sequence[float] | np.ndarray, confidence: float = 0.95, power: float = 0.8
) -> dict[str, float]:
    """How small an effect a paired design can see, from its per-seed differences.

    Returns ``n``, ``sd`` (of the differences, ``ddof=1``), ``half_width`` (of the Student-t
    ``confidence`` interval: the precision of the estimate) and ``mde`` -- the minimum detectable
    effect, ``(t_{(1+confidence)/2} + t_{power}) * sd / sqrt(n)`` with ``n - 1`` degrees of freedom:
    a true difference this large is resolved (interval excludes 0) with probability ``power``.
    Needs at least two differences.
    """
    from scipy import stats as sps

    x = np.asarray(differences, dtype=np.float64).ravel()
    if x.size < 2:
        raise ValueError(f"resolution needs at least 2 paired differences, got {x.size}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"resolution got non-finite differences: {x.tolist()}")
    if not (0.0 < confidence < 1.0 and 0.0 < power < 1.0):
        raise ValueError(f"confidence and power must be in (0, 1), got {confidence!r} and {power!r}")
    sd = float(x.std(ddof=1))
    se = sd / math.sqrt(x.size)
    df = x.size - 1
    t_a = float(sps.t.ppf(0.5 + confidence / 2, df))
    return {
        "n": int(x.size),
        "sd": sd,
        "half_width": t_a * se,
        "mde": (t_a + float(sps.t.ppf(power, df))) * se,
    }


def equivalence_verdict(mean: float, low: float, high: float, margin: float) -> str:
    """Verdict for a claim "the difference is negligible": equivalence within ``±margin``.

    * ``"reproduced"``: the whole interval lies inside ``(-margin, margin)``;
    * ``"not reproduced"``: the whole interval lies outside it (below ``-margin`` or above ``margin``);
    * ``"inconclusive"``: the interval straddles a bound, or is undefined (one seed).
    """
    if margin <= 0:
        raise ValueError(f"margin must be > 0, got {margin!r}")
    if not math.isfinite(mean):
        raise ValueError(f"mean must be finite, got {mean!r}")
    if not (math.isfinite(low) and math.isfinite(high)):
        return "inconclusive"
    if -margin < low and high < margin:
        return "reproduced"
    if high <= -margin or low >= margin:
        return "not reproduced"
    return "inconclusive"


COMPARISON_KINDS = ("control", "superiority", "equivalence")


def judge(
    runs: pd.DataFrame,
    value: str,
    comparisons: Sequence[Mapping[str, Any]],
    pair_on: str = "seed",
    confidence: float = 0.95,
    smoke: bool = False,
    skip_missing: bool = False,
) -> pd.DataFrame:
    """Paired comparisons of a design, each with its interval, resolution and verdict.

    Args:
        runs: one row per run, with the columns named in the comparisons, ``pair_on`` and ``value``.
        value: the measured column (e.g. ``"acc"``).
        comparisons: each a mapping with ``name``; ``kind`` (one of :data:`COMPARISON_KINDS`);
            ``treatment`` and ``baseline``, each ``{column: level}`` selecting one arm (e.g.
            ``{"condition": "flip40", "method": "full FC"}``); ``relevant`` (superiority: the
            smallest improvement that counts as the claimed effect) or ``margin`` (equivalence); and
            optionally ``controls``, the names of the controls that validate this claim (default:
            every control of the design).
        smoke: a smoke test (tiny defaults): every verdict is ``"smoke test"``.
        skip_missing: leave out comparisons with an arm that has no run (a smaller design sharing
            the comparison list, e.g. the image-level one); by default that is an error.

    Rules:
        * ``control``: a change known to hurt; it *passes* when its interval lies below 0
          (:func:`control_passed`). If a claim's control fails, the instrument has not shown it can
          see an effect and the claim's verdict is ``"control failed"`` (no verdict).
        * ``superiority``: :func:`superiority_verdict` with ``relevant``.
        * ``equivalence``: :func:`equivalence_verdict` with ``margin``.

    Returns:
        One row per comparison: ``name``, ``kind``, ``n`` (pairs), ``treatment``, ``baseline`` (arm
        means), ``mean``, ``low``, ``high`` (the difference and its interval), ``half_width`` and
        ``mde`` (:func:`resolution`; NaN for one pair), ``verdict`` (claims) or ``passed`` (controls).
    """
    rows = []
    kept = []
    for comp in comparisons:
        kind = comp.get("kind")
        if kind not in COMPARISON_KINDS:
            raise ValueError(
                f"comparison {comp.get('name')!r}: kind must be one of {COMPARISON_KINDS}, got {kind!r}"
            )
        arms = {}
        for side in ("treatment", "baseline"):
            sel = comp.get(side)
            if not isinstance(sel, Mapping) or not sel:
                raise ValueError(f"comparison {comp.get('name')!r}: {side} must be a mapping column -> level")
            mask = np.ones(len(runs), dtype=bool)
            for column, level in sel.items():
                if column not in runs.columns:
                    raise KeyError(
                        f"comparison {comp.get('name')!r}: column {column!r} not in the runs table"
                    )
                mask &= (runs[column] == level).to_numpy()
            arm = runs[mask]
            if arm.empty and skip_missing:
                break
            if arm.empty:
                raise ValueError(f"comparison {comp.get('name')!r}: no run matches {side} {dict(sel)}")
            if arm[pair_on].duplicated().any():
                raise ValueError(
                    f"comparison {comp.get('name')!r}: {side} {dict(sel)} has several runs per {pair_on}"
                )
            arms[side] = arm.set_index(pair_on)[value]
        if len(arms) < 2:
            continue
        kept.append(comp)
        common = arms["treatment"].index.intersection(arms["baseline"].index)
        if common.empty:
            raise ValueError(f"comparison {comp.get('name')!r}: no {pair_on} appears in both arms")
        t = arms["treatment"].loc[common].to_numpy(np.float64)
        b = arms["baseline"].loc[common].to_numpy(np.float64)
        mean, low, high = mean_interval(t - b, confidence)
        res = resolution(t - b, confidence) if t.size > 1 else {"half_width": math.nan, "mde": math.nan}
        row = {
            "name": comp["name"],
            "kind": kind,
            "n": int(t.size),
            "treatment": float(t.mean()),
            "baseline": float(b.mean()),
            "mean": mean,
            "low": low,
            "high": high,
            "half_width": res["half_width"],
            "mde": res["mde"],
            "passed": None,
            "verdict": None,
        }
        if kind == "control":
            row["passed"] = control_passed(low, high)
        elif kind == "superiority":
            row["verdict"] = superiority_verdict(mean, low, high, float(comp.get("relevant", 0.0)))
        else:
            if "margin" not in comp:
                raise ValueError(f"comparison {comp.get('name')!r}: an equivalence needs a margin")
            row["verdict"] = equivalence_verdict(mean, low, high, float(comp["margin"]))
        rows.append(row)
    if not rows:
        raise ValueError("no comparison of the list has runs in both arms")
    out = pd.DataFrame(rows)
    passed = {r.name: bool(r.passed) for r in out.itertuples() if r.kind == "control"}
    for i, comp in enumerate(kept):
        if comp["kind"] == "control":
            continue
        if smoke:
            out.loc[i, "verdict"] = "smoke test"
            continue
        needed = comp.get("controls", list(passed))
        unknown = [c for c in needed if c not in passed]
        if unknown:
            raise ValueError(
                f"comparison {comp['name']!r} names controls {unknown} that are not in the design"
            )
        if not all(passed[c] for c in needed):
            out.loc[i, "verdict"] = "control failed"
    return out
