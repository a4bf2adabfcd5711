"""Shared logic of the claim notebooks: run grids of training runs, summarise seeds, judge claims.

The notebooks under ``notebooks/`` re-measure the paper's claims (SPEC section 2). What they
have in common lives here, so that no notebook copies a cell from another:

* **designs** -- :func:`factorial` builds the cartesian product of named factors (each level a set
  of dotted :class:`~pfclib.config.TrainConfig` overrides) times seeds, as a list of
  :class:`Trial`; :func:`run_trials` trains each one in-process with
  :func:`pfclib.train.training_function` and returns one tidy ``pandas.DataFrame`` row per run
  (:func:`flatten_training_metrics` names the columns);
* **statistics** -- :func:`mean_interval`, :func:`summarise` (mean and Student-t interval over
  seeds) and :func:`paired_difference` (a treatment minus a baseline, paired on the seed);
* **verdicts** -- :func:`superiority_verdict` and :func:`equivalence_verdict` turn an interval into
  one of :data:`pfclib.report.VERDICTS` by a criterion the notebook states in its prose;
* **per-class analysis** -- :func:`class_analysis` (counters, center drift and training-set fit of
  every class, from a checkpoint), :func:`size_buckets`, :func:`updates_by_class_size` (the counters
  aggregated over class-size buckets), :func:`expected_update_rates` (what the sampler implies) and
  :func:`row_angles`;
* **head measurements** -- :func:`measure_head_grid` (peak memory and step time of one rank's head
  per layout: data parallel, model parallel, Partial FC dense/sparse), each point run by
  :func:`measure_in_subprocess` in a fresh interpreter so its peak memory is its own;
* **plumbing** -- :func:`ensure_dataset` (a notebook's synthetic data: built by DVC, or generated at
  tiny defaults) and :func:`to_records` (tables into ``metrics.json``).

Units: accuracies are fractions in [0, 1]; times are seconds unless a column says ``_ms``; memory in
MiB (``_mb``); angles in degrees.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "Trial",
    "factorial",
    "flatten_training_metrics",
    "run_trials",
    "mean_interval",
    "summarise",
    "paired_difference",
    "superiority_verdict",
    "equivalence_verdict",
    "size_buckets",
    "updates_by_class_size",
    "row_angles",
    "expected_update_rates",
    "to_records",
    "measure_in_subprocess",
    "head_layouts",
    "measure_head_grid",
    "ensure_dataset",
    "class_analysis",
]


# --------------------------------------------------------------------------------------------- designs
@dataclasses.dataclass(frozen=True)
class Trial:
    """One training run of a design.

    Attributes:
        tags: the factor levels that identify the run, e.g. ``{"data": "flip40", "method": "PFC r=0.1",
            "seed": 0}``; they become columns of the result table.
        overrides: dotted :class:`~pfclib.config.TrainConfig` keys and values applied on top of the base
            configuration, e.g. ``{"head.sample_rate": 0.1, "seed": 0}``.
    """

    tags: Mapping[str, Any]
    overrides: Mapping[str, Any]

    @property
    def slug(self) -> str:
        """A file-system-safe name built from the tags, e.g. ``data-flip40_method-PFC-r-0.1_seed-0``."""
        parts = [f"{k}-{v}" for k, v in self.tags.items()]
        return re.sub(r"[^A-Za-z0-9._=-]+", "-", "_".join(parts)).strip("-") or "run"


def factorial(
    factors: Mapping[str, Mapping[str, Mapping[str, Any]]],
    seeds: Sequence[int] = (0,),
    seed_key: str = "seed",
) -> list[Trial]:
    """The full factorial design of ``factors`` times ``seeds``.

    Args:
        factors: ``{factor name: {level name: {dotted override: value}}}``, e.g.
            ``{"method": {"full FC": {"head.sample_rate": 1.0}, "PFC r=0.1": {"head.sample_rate": 0.1}}}``.
            Factors are crossed in the given order; levels keep their order.
        seeds: one run per seed and combination of levels; the seed goes to the config key ``seed_key``
            and to the ``seed`` tag.
        seed_key: the dotted config key receiving the seed.

    Returns:
        ``len(seeds) * prod(len(levels))`` trials, seeds varying fastest.

    Raises:
        ValueError: on an empty factor, no seeds, a factor named ``seed``, or two levels of different
            factors setting the same config key to different values (the design would be ambiguous).
    """
    if not seeds:
        raise ValueError("seeds must hold at least one seed, got an empty sequence")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {list(seeds)}")
    for name, levels in factors.items():
        if name == "seed":
            raise ValueError("'seed' is reserved for the seeds argument; rename the factor")
        if not levels:
            raise ValueError(f"factor {name!r} has no levels; expected a mapping of level name -> overrides")
    names = list(factors)
    trials = []
    for combo in itertools.product(*(list(factors[n].items()) for n in names)):
        overrides: dict[str, Any] = {}
        owner: dict[str, str] = {}
        for factor, (level, sets) in zip(names, combo):
            for key, value in sets.items():
                if key in overrides and overrides[key] != value:
                    raise ValueError(
                        f"levels {owner[key]!r} and {factor}={level!r} both set {key!r} "
                        f"({overrides[key]!r} vs {value!r}); a key may be set by one factor only"
                    )
                overrides[key] = value
                owner[key] = f"{factor}={level}"
        for seed in seeds:
            tags = {n: level for n, (level, _) in zip(names, combo)}
            tags["seed"] = int(seed)
            trials.append(Trial(tags=tags, overrides={**overrides, seed_key: int(seed)}))
    return trials


def flatten_training_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The scalar columns of one :func:`pfclib.train.training_function` result.

    Keeps ``steps``, ``final_loss``, ``final_loss_avg``, ``samples_per_s``, ``train_time_s``,
    ``checkpoint`` and, for every verification set ``name``: ``{name}.acc``, ``{name}.acc_std``,
    ``{name}.auc``, ``{name}.best_threshold`` and ``{name}.tar@{far}`` (e.g. ``pairs.tar@1e-3``;
    ``NaN`` where the set is too small for that FAR). The loss history is left out (it is not a scalar).
    """
    row: dict[str, Any] = {}
    for key in ("steps", "final_loss", "final_loss_avg", "samples_per_s", "train_time_s", "checkpoint"):
        if key in metrics:
            value = metrics[key]
            row[key] = float("nan") if value is None and key != "checkpoint" else value
    for name, res in (metrics.get("verification") or {}).items():
        for key in ("acc", "acc_std", "auc", "best_threshold"):
            if key in res:
                row[f"{name}.{key}"] = float("nan") if res[key] is None else float(res[key])
        for far, tar in (res.get("tar_at_far") or {}).items():
            row[f"{name}.tar@{far}"] = float("nan") if tar is None else float(tar)
    return row


def run_trials(
    base: Mapping[str, Any] | Any,
    trials: Sequence[Trial],
    out_root: str | os.PathLike,
    train_fn: Callable[[Any], Mapping[str, Any]] | None = None,
    extra: Callable[[Trial, Mapping[str, Any], Any], Mapping[str, Any]] | None = None,
    log: Callable[[str], None] | None = print,
) -> pd.DataFrame:
    """Train every trial in this process, one after another; return one row per trial.

    Args:
        base: the base configuration, a :class:`~pfclib.config.TrainConfig` or a plain (nested) dict.
        trials: e.g. from :func:`factorial`.
        out_root: each run writes to ``<out_root>/<trial.slug>`` (its ``output_dir``; checkpoints,
            ``log.csv``); relative paths are resolved from the repository root by the trainer.
        train_fn: ``fn(TrainConfig) -> metrics dict``; default :func:`pfclib.train.training_function`.
        extra: optional ``fn(trial, metrics, config) -> {column: value}`` computing more columns from a
            finished run (e.g. reading its checkpoint).
        log: where to report progress (``None``: silent).

    Returns:
        A DataFrame with the tag columns (factor levels and ``seed``), the columns of
        :func:`flatten_training_metrics`, ``output_dir``, ``wall_s`` (wall-clock seconds of the run,
        data loading and evaluation included) and those of ``extra``.
    """
    from pfclib.config import TrainConfig, apply_overrides

    if train_fn is None:
        from pfclib.train import training_function as train_fn
    base_dict = base.to_dict() if isinstance(base, TrainConfig) else dict(base)
    slugs = [t.slug for t in trials]
    dupes = sorted({s for s in slugs if slugs.count(s) > 1})
    if dupes:
        raise ValueError(f"trials must have distinct tags; these would share an output folder: {dupes}")
    rows = []
    for i, trial in enumerate(trials):
        overrides = {**trial.overrides, "output_dir": str(Path(out_root) / trial.slug)}
        config = TrainConfig.from_dict(apply_overrides(base_dict, overrides))
        t0 = time.perf_counter()
        metrics = train_fn(config)
        wall = time.perf_counter() - t0
        row = {**trial.tags, **flatten_training_metrics(metrics), "output_dir": config.output_dir}
        row["wall_s"] = wall
        if extra is not None:
            row.update(extra(trial, metrics, config))
        rows.append(row)
        if log is not None:
            shown = ", ".join(f"{k}={v}" for k, v in trial.tags.items())
            acc = [f"{k}={v:.4f}" for k, v in row.items() if k.endswith(".acc")]
            log(
                f"[{i + 1}/{len(trials)}] {shown}: {wall:.1f} s, loss {row.get('final_loss_avg', float('nan')):.3f} {' '.join(acc)}"
            )
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------ statistics
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


def superiority_verdict(mean: float, low: float, high: float, min_effect: float = 0.0) -> str:
    """Verdict for a claim "the difference is positive" (treatment better than baseline).

    * ``"reproduced"``: the interval lies above ``min_effect`` (``low > min_effect``);
    * ``"not reproduced"``: the mean difference is not above ``min_effect`` (no effect, or the opposite);
    * ``"inconclusive"``: the mean is above ``min_effect`` but the interval reaches below it, or the
      interval is undefined (one seed).
    """
    if not math.isfinite(mean):
        raise ValueError(f"mean must be finite, got {mean!r}")
    if mean <= min_effect:
        return "not reproduced"
    if math.isfinite(low) and low > min_effect:
        return "reproduced"
    return "inconclusive"


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


# ------------------------------------------------------------------------------------ per-class analysis
def size_buckets(sizes: Sequence[int] | np.ndarray, edges: Sequence[int]) -> pd.Categorical:
    """Bucket class sizes (images per class) by the ascending integer ``edges``.

    Bucket ``i`` holds sizes in ``[edges[i], edges[i+1])``, the last one ``[edges[-1], inf)``; labels
    read ``"2-4"`` or ``"64+"`` (inclusive bounds). Sizes below ``edges[0]`` raise.
    """
    s = np.asarray(sizes)
    e = [int(x) for x in edges]
    if not e or any(b <= a for a, b in zip(e, e[1:])):
        raise ValueError(f"edges must be a non-empty strictly increasing sequence, got {list(edges)}")
    if s.size and s.min() < e[0]:
        raise ValueError(f"class size {int(s.min())} is below the first edge {e[0]}")
    labels = [f"{a}-{b - 1}" if b - 1 > a else f"{a}" for a, b in zip(e, e[1:])] + [f"{e[-1]}+"]
    index = np.searchsorted(np.asarray(e), s, side="right") - 1
    return pd.Categorical.from_codes(index, categories=labels, ordered=True)


def updates_by_class_size(
    sizes: Sequence[int] | np.ndarray,
    active: Sequence[int] | np.ndarray,
    passive: Sequence[int] | np.ndarray,
    steps: int,
    edges: Sequence[int],
) -> pd.DataFrame:
    """Aggregate the head's per-class update counters over class-size buckets.

    Args:
        sizes: ``(C,)`` training images per class.
        active: ``(C,)`` steps in which the class was a positive (its center got a pulling gradient).
        passive: ``(C,)`` steps in which the class was a sampled negative only (pushed away).
        steps: optimizer steps the counters cover (> 0).
        edges: bucket edges for :func:`size_buckets`.

    Returns:
        One row per non-empty bucket with ``bucket``, ``classes``, ``images`` (sum of sizes),
        ``active_per_class``, ``passive_per_class`` (means), ``active_rate`` and ``passive_rate``
        (per class and step) and ``passive_share`` (passive / (active + passive), pooled over the bucket).
    """
    s = np.asarray(sizes, dtype=np.int64)
    a = np.asarray(active, dtype=np.float64)
    p = np.asarray(passive, dtype=np.float64)
    if not (s.shape == a.shape == p.shape) or s.ndim != 1:
        raise ValueError(
            f"sizes, active and passive must be 1-D of one length, got {s.shape}, {a.shape}, {p.shape}"
        )
    if steps <= 0:
        raise ValueError(f"steps must be > 0, got {steps!r}")
    if (a < 0).any() or (p < 0).any() or (a + p > steps).any():
        raise ValueError(f"counters must lie in [0, steps={steps}] per class (active + passive <= steps)")
    frame = pd.DataFrame({"bucket": size_buckets(s, edges), "size": s, "active": a, "passive": p})
    out = (
        frame.groupby("bucket", observed=True)
        .agg(
            classes=("size", "size"),
            images=("size", "sum"),
            active=("active", "sum"),
            passive=("passive", "sum"),
        )
        .reset_index()
    )
    out["active_per_class"] = out["active"] / out["classes"]
    out["passive_per_class"] = out["passive"] / out["classes"]
    out["active_rate"] = out["active_per_class"] / steps
    out["passive_rate"] = out["passive_per_class"] / steps
    touched = out["active"] + out["passive"]
    out["passive_share"] = np.where(touched > 0, out["passive"] / touched.where(touched > 0, 1), np.nan)
    return out.drop(columns=["active", "passive"])


def expected_update_rates(
    sizes: Sequence[int] | np.ndarray, batch_size: int, sample_rate: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class probabilities of an active and of a passive update in one step, in float64.

    A step draws ``batch_size`` images without replacement from the ``N = sum(sizes)`` training
    images (the trainer's epoch permutation; ``batch_size`` is the global batch). Class ``c`` is
    *active* (a positive) with probability ``q_c = 1 - C(N - n_c, B) / C(N, B)`` (exact,
    hypergeometric). With ``C`` classes, ``k = int(r * C)`` of them are sampled and every positive is
    kept, so a non-positive class is a sampled negative (a *passive* update) with probability
    ``max(k - P, 0) / (C - P)`` for ``P`` distinct positives; this function uses the expected ``P``
    (``sum(q)``), hence ``passive_c ~= (1 - q_c) * max(k - E[P], 0) / (C - E[P])`` -- exact at r = 1.

    Returns:
        ``(active, passive)``, each ``(C,)``; counters over ``T`` steps should average ``T *`` these.
    """
    from scipy.special import gammaln

    n = np.asarray(sizes, dtype=np.float64)
    if n.ndim != 1 or n.size == 0 or (n < 0).any():
        raise ValueError(f"sizes must be a non-empty 1-D array of counts >= 0, got shape {n.shape}")
    total = float(n.sum())
    if not 1 <= batch_size <= total:
        raise ValueError(f"batch_size must be in [1, {int(total)}] (the number of images), got {batch_size}")
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    rest = total - n
    with np.errstate(invalid="ignore"):
        log_ratio = (
            gammaln(rest + 1)
            - gammaln(rest - batch_size + 1)
            - gammaln(total + 1)
            + gammaln(total - batch_size + 1)
        )
    active = np.where(rest < batch_size, 1.0, -np.expm1(np.where(rest < batch_size, 0.0, log_ratio)))
    num_classes = n.size
    k = int(sample_rate * num_classes)
    positives = float(active.sum())
    negatives = max(k - positives, 0.0) / max(num_classes - positives, 1e-12)
    passive = (1.0 - active) * min(negatives, 1.0)
    return active, passive


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


def row_angles(a: Any, b: Any) -> np.ndarray:
    """Angle in degrees between matching rows of two ``(C, D)`` matrices (numpy or torch), in float64.

    Used for center drift: the angle each class center moved between two snapshots, or between a
    center and its class's mean embedding. A zero row gives ``nan`` for its angle.
    """
    x = _as_float64(a)
    y = _as_float64(b)
    if x.ndim != 2 or x.shape != y.shape:
        raise ValueError(f"row_angles needs two matrices of one shape (C, D), got {x.shape} and {y.shape}")
    nx = np.linalg.norm(x, axis=1)
    ny = np.linalg.norm(y, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.einsum("ij,ij->i", x, y) / (nx * ny)
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def _as_float64(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


# ----------------------------------------------------------------------------------- head measurements
def measure_in_subprocess(
    function: str,
    kwargs: Mapping[str, Any],
    timeout: float | None = 600.0,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Call ``function(**kwargs)`` in a fresh Python interpreter and return its JSON result.

    Peak-memory figures (``ru_maxrss``, CUDA peak allocation) are per process, so each measurement
    point needs a process of its own; this runs ``python -c`` with the current interpreter,
    importing ``function`` by its dotted name (``"package.module:name"``). The child runs in the
    repository root, so its top-level folders import too (``"benchmarks.head:measure"``). ``kwargs``
    and the result must be JSON-serialisable. The child inherits the environment plus ``env``.

    Raises:
        RuntimeError: naming the function, its arguments and the child's stderr if it fails.
    """
    if ":" not in function:
        raise ValueError(f"function must be 'package.module:name', got {function!r}")
    module, name = function.split(":", 1)
    code = (
        "import importlib, json, sys\n"
        f"fn = getattr(importlib.import_module({module!r}), {name!r})\n"
        "result = fn(**json.loads(sys.stdin.read()))\n"
        "sys.stdout.write('\\n@@RESULT@@' + json.dumps(result) + '\\n')\n"
    )
    child_env = {**os.environ, **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(dict(kwargs)),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env,
        cwd=_repo_root_or_cwd(),
    )
    if proc.returncode != 0 or "@@RESULT@@" not in proc.stdout:
        tail = proc.stderr[-3000:]
        raise RuntimeError(
            f"{function}(**{dict(kwargs)!r}) failed in a subprocess (exit code {proc.returncode}):\n{tail}"
        )
    return json.loads(proc.stdout.rsplit("@@RESULT@@", 1)[1])


# Per-rank layouts of the head measured by :func:`measure_head_grid`: (label, benchmark method,
# whether the classes are sharded over W ranks, whether the rank sees the gathered W * B rows, sampled).
_LAYOUTS = (
    ("data parallel", "dense", False, False, False),
    ("model parallel", "dense", True, True, False),
    ("PFC dense", "dense", True, True, True),
    ("PFC sparse", "sparse", True, True, True),
)


def head_layouts(sample_rate: float) -> list[str]:
    """Names of the head layouts :func:`measure_head_grid` measures, in its order."""
    return [f"{name} r={sample_rate:g}" if sampled else name for name, *_, sampled in _LAYOUTS]


def measure_head_grid(
    classes: Sequence[int],
    world_size: int,
    batch_size: int,
    embedding_size: int,
    sample_rate: float,
    dp_max_classes: int,
    repeats: int = 3,
    warmup: int = 1,
    device: str = "cpu",
    function: str = "benchmarks.head:measure",
    log: Callable[[str], None] | None = print,
    runner: Callable[[str, Mapping[str, Any]], Mapping[str, Any]] | None = None,
) -> pd.DataFrame:
    """Peak memory and step time of one rank's classification head, per layout and class count.

    Every point runs ``function`` (default: engineer A's ``benchmarks/head.py:measure``, one
    training step = forward + backward + SGD step on random embeddings) in a fresh process
    (:func:`measure_in_subprocess`), so its peak memory is its own. A rank of a ``world_size``-rank
    job is emulated in one process:

    * ``data parallel``: the rank holds all ``C`` centers and its own ``batch_size`` rows;
    * ``model parallel``: ``C / W`` centers (rank 0's shard) and the gathered ``W * batch_size`` rows;
    * ``PFC dense r`` / ``PFC sparse r``: as model parallel, sampling ``k = int(r * C / W)`` classes,
      with the dense (reference) or sparse (only sampled rows move) center update.

    Communication is not included (one process). Labels are drawn among the rank's own classes, so
    every gathered row is a positive of this rank; for ``k`` much larger than ``W * batch_size``
    this does not change the cost. Data parallel is skipped above ``dp_max_classes`` (its
    ``C x D`` matrix, gradient and momentum would exceed the machine); such points, and points whose
    process fails (out of memory), are rows with an ``error`` string and NaN figures.

    ``runner(function, kwargs) -> record`` performs one measurement (default
    :func:`measure_in_subprocess`); the record needs ``k``, ``step_ms``, ``peak_bytes`` and
    ``model_bytes``. A runner raising ``RuntimeError`` marks the point as failed.

    Returns:
        One row per (classes, layout): ``layout``, ``num_classes``, ``world_size``,
        ``classes_per_rank``, ``rows_per_rank``, ``sample_rate``, ``k``, ``step_ms`` (median),
        ``samples_per_s`` (global: ``W * batch_size`` images per step), ``peak_mb`` (peak memory of the
        step above the process's baseline, MiB), ``model_mb`` (centers + optimizer state, MiB), ``error``.
    """
    if world_size < 1 or batch_size < 1 or embedding_size < 1:
        raise ValueError(
            f"world_size, batch_size and embedding_size must be >= 1, got {world_size}, {batch_size}, {embedding_size}"
        )
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    rows = []
    for c in classes:
        if int(c) < world_size:
            raise ValueError(
                f"num_classes {c} is smaller than world_size {world_size}: some rank would own no class"
            )
        for label, (_, method, sharded, gathered, sampled) in zip(head_layouts(sample_rate), _LAYOUTS):
            per_rank = int(c) // world_size + (int(c) % world_size > 0) if sharded else int(c)
            n_rows = batch_size * world_size if gathered else batch_size
            r = sample_rate if sampled else 1.0
            row: dict[str, Any] = {
                "layout": label,
                "num_classes": int(c),
                "world_size": world_size,
                "classes_per_rank": per_rank,
                "rows_per_rank": n_rows,
                "sample_rate": r,
                "k": float("nan"),
                "step_ms": float("nan"),
                "samples_per_s": float("nan"),
                "peak_mb": float("nan"),
                "model_mb": float("nan"),
                "error": "",
            }
            if not sharded and int(c) > dp_max_classes:
                row["error"] = f"skipped: C={c} > dp_max_classes={dp_max_classes}"
            else:
                kwargs = {
                    "method": method,
                    "num_classes": per_rank,
                    "sample_rate": r,
                    "embedding_size": embedding_size,
                    "batch_size": n_rows,
                    "repeats": repeats,
                    "warmup": warmup,
                    "device": device,
                }
                try:
                    rec = (runner or measure_in_subprocess)(function, kwargs)
                except (RuntimeError, subprocess.TimeoutExpired) as exc:
                    row["error"] = str(exc).strip().splitlines()[-1][:300]
                else:
                    row.update(
                        k=float(rec["k"]),
                        step_ms=float(rec["step_ms"]),
                        samples_per_s=batch_size * world_size / (float(rec["step_ms"]) / 1e3),
                        peak_mb=float(rec["peak_bytes"]) / 2**20,
                        model_mb=float(rec["model_bytes"]) / 2**20,
                    )
            rows.append(row)
            if log is not None:
                shown = row["error"] or f"{row['step_ms']:.1f} ms, peak {row['peak_mb']:.0f} MiB"
                log(f"C={int(c):>10,} {label:<22} {shown}")
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------- datasets
def ensure_dataset(path: str | os.PathLike, generate: Mapping[str, Any] | None = None) -> Path:
    """Return the synthetic dataset at ``path`` (resolved from the repository root), generating it first
    from the :class:`~pfclib.data.synthetic.SyntheticConfig` fields ``generate`` if it is missing.

    With ``generate=None`` a missing dataset is an error that names the DVC stage building it, so a
    notebook run by DVC never silently builds its own data. When the dataset exists and ``generate``
    is given, its ``meta.json`` config must match ``generate`` (a stale scratch folder would
    otherwise be used with the wrong parameters); a mismatch regenerates it.
    """
    from pfclib.data import synthetic
    from pfclib.paths import resolve

    root = resolve(path)
    if (root / "meta.json").is_file():
        if generate is None:
            return root
        wanted = synthetic.SyntheticConfig.from_dict(dict(generate)).to_dict()
        if synthetic.load_meta(root).get("config") == wanted:
            return root
        synthetic.generate(synthetic.SyntheticConfig.from_dict(dict(generate)), root, overwrite=True)
        return root
    if generate is None:
        raise FileNotFoundError(
            f"no synthetic dataset at {root} (no meta.json); build it with `dvc repro data` "
            "or pass its SyntheticConfig fields to generate it"
        )
    synthetic.generate(synthetic.SyntheticConfig.from_dict(dict(generate)), root)
    return root


# ------------------------------------------------------------------------------------ class analysis
def class_analysis(
    checkpoint: str | os.PathLike, dataset: str | os.PathLike, batch_size: int = 256, flip: bool = True
) -> pd.DataFrame:
    """Per-class state of a trained head against its training data, from one checkpoint.

    Loads the backbone and the full head (``checkpoint["head"]``: centers ``(C, D)`` and, when the run
    tracked them, the update counters) and embeds every training image of the synthetic ``dataset``.

    Returns:
        One row per class ``label`` with ``size`` (training images), ``active`` / ``passive`` (the
        head's counters; NaN when not tracked), ``steps``, ``drift_deg`` (angle between the final
        center and its initial value, re-created from the run's seed with
        :func:`pfclib.head.init_centers`), ``center_to_mean_deg`` (angle between the final center and
        the mean normalised embedding of the class's images) and ``train_top1`` (fraction of the
        class's training images whose nearest center by cosine is their own: how well the centers
        fit the training set, *not* a held-out accuracy).
    """
    import torch

    from pfclib import eval as pfe
    from pfclib.checkpoint import load_backbone, load_checkpoint
    from pfclib.data.synthetic import SyntheticDataset
    from pfclib.head import init_centers

    state = load_checkpoint(checkpoint, map_location="cpu")
    model, config = load_backbone(checkpoint, map_location="cpu")
    head = state["head"]
    weight = head["weight"].detach().to(torch.float64)
    num_classes, dim = weight.shape
    ds = SyntheticDataset(dataset)
    labels = ds.labels
    if labels.max(initial=-1) >= num_classes:
        raise ValueError(
            f"{dataset} has labels up to {labels.max()} but the checkpoint's head has {num_classes} classes"
        )
    emb = pfe.embed(model, torch.from_numpy(ds.images_uint8()), batch_size=batch_size, flip=flip)
    centers = weight.numpy() / np.linalg.norm(weight.numpy(), axis=1, keepdims=True)
    nearest = np.empty(len(labels), dtype=np.int64)
    for start in range(0, len(labels), 4096):
        nearest[start : start + 4096] = np.argmax(emb[start : start + 4096] @ centers.T, axis=1)
    size = np.bincount(labels, minlength=num_classes)
    sums = np.zeros((num_classes, dim))
    np.add.at(sums, labels, emb)
    correct = np.bincount(labels, weights=(nearest == labels).astype(np.float64), minlength=num_classes)
    initial = init_centers(0, num_classes, dim, int(config["seed"]), torch.float64)
    counters = head.get("counters")
    nan = np.full(num_classes, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        return pd.DataFrame(
            {
                "label": np.arange(num_classes),
                "size": size,
                "active": counters["active"].numpy().astype(np.float64) if counters else nan,
                "passive": counters["passive"].numpy().astype(np.float64) if counters else nan,
                "steps": int(state["step"]),
                "drift_deg": row_angles(initial, weight),
                "center_to_mean_deg": row_angles(weight, sums),
                "train_top1": np.where(size > 0, correct / np.maximum(size, 1), np.nan),
            }
        )


def _repo_root_or_cwd() -> Path:
    from pfclib.paths import repo_root

    try:
        return repo_root()
    except FileNotFoundError:
        return Path.cwd()
