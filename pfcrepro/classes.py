"""Per-class analysis of a trained head: the one job of this module is to say, class by class, how
often a center was updated, how far it moved and how well it fits its class.

* :func:`class_analysis` -- counters, center drift and training-set fit of every class, from a
  checkpoint; :func:`row_angles` is the angle between matching rows of two center matrices;
* :func:`size_buckets` and :func:`updates_by_class_size` -- the counters aggregated over class-size
  buckets; :func:`expected_update_rates` -- the rates the sampler implies;
* :class:`MovementRecorder` -- a training callback counting, for chosen classes, the steps in which
  the center row actually changed. This differs from the head's passive counter ("received a
  gradient as a sampled negative"): with the dense update every row moves every step through
  momentum and weight decay, with the sparse update only the sampled rows do.

Angles are in degrees, rates per optimizer step.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "size_buckets",
    "updates_by_class_size",
    "expected_update_rates",
    "row_angles",
    "class_analysis",
    "initial_centers",
    "MovementRecorder",
]


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


def initial_centers(num_classes: int, embedding_size: int, seed: int, dtype: Any = None) -> Any:
    """The ``(C, D)`` centers a :class:`pfclib.PartialFC` built with ``seed`` starts from, as float64.

    They are drawn by :func:`pfclib.head.init_centers` in the head's own ``dtype`` (default
    float32, what the trainer uses): the random stream depends on the dtype, so drawing them
    directly in float64 would give other numbers. The float32 draw is then converted exactly to
    float64. A class's initial center does not depend on the number of ranks, so rows ``[0, C)`` of
    one process are those of any sharded run.
    """
    import torch

    from pfclib.head import init_centers

    dtype = torch.float32 if dtype is None else dtype
    return init_centers(0, int(num_classes), int(embedding_size), int(seed), dtype).to(torch.float64)


def class_analysis(
    checkpoint: str | os.PathLike, dataset: str | os.PathLike, batch_size: int = 256, flip: bool = True
) -> pd.DataFrame:
    """Per-class state of a trained head against its training data, from one checkpoint.

    Loads the backbone and the full head (:func:`pfclib.checkpoint.load_head`, whole or sharded:
    centers ``(C, D)`` and, when the run tracked them, the update counters) and embeds every
    training image of the synthetic ``dataset``.

    Returns:
        One row per class ``label`` with ``size`` (training images), ``active`` / ``passive`` (the
        head's counters; NaN when not tracked), ``steps``, ``drift_deg`` (angle between the final
        center and its initial value: the centers the trainer started from, rebuilt by
        :func:`initial_centers` from the run's seed in the dtype of the saved centers),
        ``center_to_mean_deg`` (angle between the final center and
        the mean normalised embedding of the class's images) and ``train_top1`` (fraction of the
        class's training images whose nearest center by cosine is their own: how well the centers
        fit the training set, *not* a held-out accuracy).
    """
    import torch

    from pfclib import eval as pfe
    from pfclib.checkpoint import load_backbone, load_checkpoint, load_head
    from pfclib.data.synthetic import SyntheticDataset

    state = load_checkpoint(checkpoint, map_location="cpu")
    model, config = load_backbone(checkpoint, map_location="cpu")
    head = load_head(checkpoint)
    trained_dtype = head["weight"].dtype
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
    initial = initial_centers(num_classes, dim, int(config["seed"]), trained_dtype)
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


class MovementRecorder:
    """Count, for chosen classes, the optimizer steps in which each center row changed.

    The head's ``passive`` counter says in how many steps a class was a sampled negative (it received
    a gradient); whether its center *moved* is another matter. With ``update="dense"`` the optimizer
    steps the whole ``(C, D)`` matrix, so momentum and weight decay move every row in every step,
    sampled or not; with ``update="sparse"`` only the sampled rows change. This records the latter
    directly: after every optimizer step it compares the tracked rows with their previous values
    (exact comparison, no tolerance). Cost per step: one copy of ``len(labels)`` rows.

    Use :meth:`train` as the ``train_fn`` of :func:`pfcrepro.trials.run_trials` (one recorder for
    all trials; runs are told apart by ``output_dir``), or :meth:`callback` as the ``callback`` of
    :func:`pfclib.train.training_function`. Only the classes held by this process are tracked (all
    of them without a process group).

    Args:
        labels: the class labels to track, e.g. the tail classes.
    """

    def __init__(self, labels: Sequence[int] | np.ndarray):
        self.labels = np.unique(np.asarray(labels, dtype=np.int64))
        if self.labels.size and self.labels[0] < 0:
            raise ValueError(f"labels must be >= 0, got {int(self.labels[0])}")
        self.runs: dict[str, dict[str, Any]] = {}
        self._run: dict[str, Any] | None = None

    def callback(self, event: str, info: Mapping[str, Any]) -> None:
        """A :func:`pfclib.train.training_function` callback: snapshot at ``"start"``, compare at ``"step"``."""
        import torch

        head = info["head"]
        if event == "start":
            start, n_local = int(head.start), int(head.n_local)
            if self.labels.size and self.labels[-1] >= int(head.num_classes):
                raise ValueError(
                    f"label {int(self.labels[-1])} is not a class of the head ({int(head.num_classes)} classes)"
                )
            mine = self.labels[(self.labels >= start) & (self.labels < start + n_local)]
            rows = torch.as_tensor(mine - start, dtype=torch.long, device=head.weight.device)
            self._run = {
                "labels": mine,
                "rows": rows,
                "previous": head.centers(rows),
                "moved": np.zeros(mine.size, dtype=np.int64),
                "steps": 0,
            }
        elif event == "step":
            run = self._run
            if run is None:
                raise RuntimeError("MovementRecorder got a 'step' event before 'start'")
            current = head.centers(run["rows"])
            run["moved"] += (current != run["previous"]).any(dim=1).cpu().numpy()
            run["steps"] += 1
            run["previous"] = current

    def train(self, config: Any) -> dict[str, Any]:
        """Run :func:`pfclib.train.training_function` on ``config`` with this recorder attached;
        the counts are kept under the run's ``output_dir``."""
        from pfclib.config import TrainConfig
        from pfclib.train import training_function

        if isinstance(config, Mapping):
            config = TrainConfig.from_dict(dict(config))
        self._run = None
        metrics = training_function(config, callback=self.callback)
        if self._run is not None:
            self.runs[str(config.output_dir)] = {
                k: v for k, v in self._run.items() if k in ("labels", "moved", "steps")
            }
        self._run = None
        return metrics

    def frame(self) -> pd.DataFrame:
        """One row per (run, tracked class): ``output_dir``, ``label``, ``moved_steps``, ``steps`` and
        ``moved_fraction`` (``moved_steps / steps``; NaN for a run of no step)."""
        parts = [
            pd.DataFrame(
                {
                    "output_dir": output_dir,
                    "label": run["labels"],
                    "moved_steps": run["moved"],
                    "steps": run["steps"],
                    "moved_fraction": run["moved"] / run["steps"] if run["steps"] else np.nan,
                }
            )
            for output_dir, run in self.runs.items()
        ]
        columns = ["output_dir", "label", "moved_steps", "steps", "moved_fraction"]
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)
