"""Designs of training runs and the trial runner: the one job of this module is to turn a
base configuration and named factors into finished runs, one tidy table row per run.

* :func:`factorial` builds the cartesian product of named factors (each level a set of dotted
  :class:`~pfclib.config.TrainConfig` overrides) times seeds, as a list of :class:`Trial`;
* :func:`run_trials` trains each one with :func:`pfclib.train.training_function`, in this process
  or in several worker processes side by side, and returns one ``pandas.DataFrame`` row per run
  (:func:`flatten_training_metrics` names the columns);
* :func:`ensure_dataset` returns a notebook's synthetic data set: built by DVC, or generated at the
  notebook's tiny defaults.

Units: accuracies are fractions in [0, 1]; times are seconds.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = ["Trial", "factorial", "flatten_training_metrics", "run_trials", "ensure_dataset"]


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


def _timed(train_fn: Callable[[Any], Mapping[str, Any]], config: Any) -> tuple[Mapping[str, Any], float]:
    t0 = time.perf_counter()
    metrics = train_fn(config)
    return metrics, time.perf_counter() - t0


def run_trials(
    base: Mapping[str, Any] | Any,
    trials: Sequence[Trial],
    out_root: str | os.PathLike,
    train_fn: Callable[[Any], Mapping[str, Any]] | None = None,
    extra: Callable[[Trial, Mapping[str, Any], Any], Mapping[str, Any]] | None = None,
    log: Callable[[str], None] | None = print,
    workers: int = 1,
) -> pd.DataFrame:
    """Train every trial; return one row per trial, in the order of ``trials``.

    Args:
        base: the base configuration, a :class:`~pfclib.config.TrainConfig` or a plain (nested) dict.
        trials: e.g. from :func:`factorial`.
        out_root: each run writes to ``<out_root>/<trial.slug>`` (its ``output_dir``; checkpoints,
            ``log.csv``); relative paths (here and in ``base``) are resolved from the repository root.
        train_fn: ``fn(TrainConfig) -> metrics dict``; default :func:`pfclib.train.training_function`.
        extra: optional ``fn(trial, metrics, config) -> {column: value}`` computing more columns from a
            finished run (e.g. reading its checkpoint); always called in this process.
        log: where to report progress (``None``: silent).
        workers: how many runs train at once (:func:`pfcrepro.workers.run_jobs`). ``1`` trains them
            one after another in this process; more starts that many processes, each with its share
            of the cores. ``train_fn`` must then be importable (defined at module level) and its
            result picklable. A run's numbers depend on its thread count, so keep ``workers`` fixed
            within one design.

    Raises:
        ValueError: colliding output folders (two trials with the same tags) or a bad ``workers``.
        Exception: whatever a run raised, with a note naming its trial.

    Returns:
        A DataFrame with the tag columns (factor levels and ``seed``), the columns of
        :func:`flatten_training_metrics`, ``output_dir``, ``wall_s`` (wall-clock seconds of the run,
        data loading and evaluation included; with ``workers > 1`` runs share the cores) and those of
        ``extra``.
    """
    from pfclib.config import TrainConfig, apply_overrides
    from pfcrepro.paths import repo_root
    from pfcrepro.workers import run_jobs

    if train_fn is None:
        from pfclib.train import training_function as train_fn
    base_dict = base.to_dict() if isinstance(base, TrainConfig) else dict(base)
    slugs = [t.slug for t in trials]
    dupes = sorted({s for s in slugs if slugs.count(s) > 1})
    if dupes:
        raise ValueError(f"trials must have distinct tags; these would share an output folder: {dupes}")
    configs = []
    for trial in trials:
        overrides = {**trial.overrides, "output_dir": str(Path(out_root) / trial.slug)}
        config = TrainConfig.from_dict(apply_overrides(base_dict, overrides))
        # params.yaml's paths are relative to the repository
        configs.append(config.resolve_paths(repo_root()))

    rows: list[dict[str, Any] | None] = [None] * len(trials)

    def finish(i: int, metrics: Mapping[str, Any], wall: float) -> None:
        trial, config = trials[i], configs[i]
        row = {**trial.tags, **flatten_training_metrics(metrics), "output_dir": config.output_dir}
        row["wall_s"] = wall
        if extra is not None:
            row.update(extra(trial, metrics, config))
        rows[i] = row
        if log is not None:
            done = sum(r is not None for r in rows)
            shown = ", ".join(f"{k}={v}" for k, v in trial.tags.items())
            acc = [f"{k}={v:.4f}" for k, v in row.items() if k.endswith(".acc")]
            log(
                f"[{done}/{len(trials)}] {shown}: {wall:.1f} s, loss {row.get('final_loss_avg', float('nan')):.3f} {' '.join(acc)}"
            )

    run_jobs(
        _timed,
        [(train_fn, config) for config in configs],
        workers,
        on_done=lambda i, result: finish(i, *result),
        names=slugs,
    )
    return pd.DataFrame(rows)


def ensure_dataset(path: str | os.PathLike, generate: Mapping[str, Any] | None = None) -> Path:
    """Return the synthetic dataset at ``path`` (resolved from the repository root), generating it first
    from the :class:`~pfclib.data.synthetic.SyntheticConfig` fields ``generate`` if it is missing.

    With ``generate=None`` a missing dataset is an error that names the DVC stage building it, so a
    notebook run by DVC never silently builds its own data. When the dataset exists and ``generate``
    is given, its ``meta.json`` config must match ``generate`` (a stale scratch folder would
    otherwise be used with the wrong parameters); a mismatch regenerates it.
    """
    from pfclib.data import synthetic
    from pfcrepro.paths import resolve

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
