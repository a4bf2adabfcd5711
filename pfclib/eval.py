"""Face-verification and identification metrics, and a CLI that scores a checkpoint.

The verification protocol is insightface's for the LFW / CFP-FP / AgeDB-30 ``.bin`` sets:

1. embed every image and its horizontal flip, sum the two embeddings, L2-normalise (:func:`embed`);
2. pair i is rows ``2i`` and ``2i+1``; its distance is the squared L2 distance of the two
   normalised embeddings (in [0, 4]);
3. candidate thresholds ``np.arange(0, 4, 0.01)`` (0.00, 0.01, ..., 3.99); a pair is predicted
   "same" when ``distance < threshold``;
4. the pairs are split into ``nfolds`` contiguous folds without shuffling
   (``sklearn.model_selection.KFold(nfolds, shuffle=False)``: the first ``P % nfolds`` folds hold one
   extra pair); for each fold the threshold with the best accuracy on the other folds (the first
   one on ties) is applied to it;
5. report the mean and the (population, ``ddof=0``) standard deviation of the fold accuracies.

From the ROC of all pairs (score = cosine similarity, higher means "same"; the exact ROC, one
point per distinct score: ``sklearn.metrics.roc_curve(drop_intermediate=False)``) come the AUC
(``sklearn.metrics.auc`` of that curve) and TAR at FAR 1e-1 ... 1e-6. TAR@FAR=f is the highest
true-accept rate of any threshold whose false-accept rate is <= f; a level is reported only when
the number of impostor pairs supports it (``n_impostor * f >= 1``), otherwise its value is ``None``
and ``tar_at_far_note`` says why.

Two further pair metrics take scores at one global threshold, fixed at a false-match rate on all
impostor pairs (the smallest observed score ``t`` with ``#{impostor score >= t} <= rate * N``):
:func:`error_vs_reject` is the error-versus-reject curve of face-image quality (FNMR of the pairs
left after rejecting the lowest-quality fraction, pair quality = the worse image's), with
:func:`random_reject_baseline` (random rejection, whose expected FNMR is constant) to compare it
with; :func:`opis` is an operating-point-inconsistency score (the across-identity variances of
per-identity FNMR and FMR, averaged over FAR levels; lower is more consistent).

CLI::

    python -m pfclib.eval --checkpoint RUN_OR_CKPT --data PATH [PATH ...] [--batch-size N] [--no-flip] [--out metrics.json]

``--checkpoint`` is a checkpoint file or a run folder (its newest checkpoint). It prints a table
(accuracy and its std in %, the mean best threshold in squared-L2 units, AUC, TAR@FAR in %) and
writes the metrics as JSON only to ``--out``; without ``--out`` it writes no file.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sklearn.metrics import auc, roc_curve
from sklearn.model_selection import KFold
from torch import nn

__all__ = [
    "DEFAULT_FARS",
    "THRESHOLDS",
    "embed",
    "error_vs_reject",
    "evaluate_checkpoint",
    "evaluate_pairs",
    "evaluate_verification",
    "fold_indices",
    "main",
    "opis",
    "pair_distances",
    "pair_scores",
    "random_reject_baseline",
    "rank1_identification",
    "roc",
    "roc_auc",
    "tar_at_far",
    "verification_accuracy",
]

THRESHOLDS: np.ndarray = np.arange(0, 4, 0.01)
DEFAULT_FARS: tuple[float, ...] = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)

ArrayLike = np.ndarray | torch.Tensor | Sequence


# ----------------------------------------------------------------------------------------------
# Embeddings


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        return p.device, (p.dtype if p.dtype.is_floating_point else torch.float32)
    for b in model.buffers():
        if b.dtype.is_floating_point:
            return b.device, b.dtype
    return torch.device("cpu"), torch.float32


def _numpy(x: ArrayLike, dtype: type | None = None) -> np.ndarray:
    """A numpy view/copy of an array, list or tensor (detached, on the CPU)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _l2_normalise(x: ArrayLike) -> np.ndarray:
    """Row-wise L2 normalisation in float64; all-zero rows stay zero (as sklearn's ``normalize``)."""
    x = _numpy(x, np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def embed(
    model: nn.Module,
    images: torch.Tensor | np.ndarray,
    batch_size: int = 256,
    flip: bool = True,
) -> np.ndarray:
    """Embed a stack of images: ``(M, 3, H, W)`` -> ``(M, D)`` L2-normalised float64 numpy array.

    ``uint8`` images are normalised as ``(x/255 - 0.5)/0.5``; floating-point images are assumed to
    be normalised already. With ``flip`` each image's embedding is summed with the embedding of its
    horizontal mirror before normalising (step 1 of the protocol in the module docstring). The model runs in eval mode under
    ``torch.no_grad()`` on its own device and dtype, ``batch_size`` images at a time; its training
    mode is restored afterwards. The caller's ``images`` are not modified.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor or numpy array, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (M, 3, H, W), got {tuple(images.shape)}")
    if images.dtype != torch.uint8 and not images.dtype.is_floating_point:
        raise ValueError(
            f"images must be uint8 (raw pixels) or floating point (normalised), got {images.dtype}"
        )
    if images.shape[0] == 0:
        raise ValueError("images is empty: need at least one image to embed")

    device, dtype = _model_device_dtype(model)
    modes = [(m, m.training) for m in model.modules()]  # restore per module: some may be frozen in eval
    model.eval()
    chunks = []
    try:
        with torch.no_grad():
            for start in range(0, images.shape[0], batch_size):
                batch = images[start : start + batch_size].to(device)
                if batch.dtype == torch.uint8:
                    batch = (batch.to(dtype) / 255.0 - 0.5) / 0.5
                else:
                    batch = batch.to(dtype)
                out = model(batch).to(torch.float64)
                if flip:
                    out = out + model(torch.flip(batch, dims=[3])).to(torch.float64)
                chunks.append(out.cpu().numpy())
    finally:
        for m, mode in modes:
            m.training = mode
    emb = np.concatenate(chunks, axis=0)
    if not np.all(np.isfinite(emb)):
        raise FloatingPointError(
            f"the model produced non-finite embeddings for {int((~np.isfinite(emb)).any(1).sum())} images"
        )
    return _l2_normalise(emb)


# ----------------------------------------------------------------------------------------------
# Verification


def _as_pairs(
    emb_a: ArrayLike, emb_b: ArrayLike, issame: ArrayLike
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a = _numpy(emb_a, np.float64)
    b = _numpy(emb_b, np.float64)
    same = _numpy(issame)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"emb_a and emb_b must be 2-D of equal shape (P, D), got {a.shape} and {b.shape}")
    if same.shape != (a.shape[0],):
        raise ValueError(f"issame must have shape ({a.shape[0]},) to match the pairs, got {same.shape}")
    if same.dtype != np.bool_:
        if not np.all((same == 0) | (same == 1)):
            raise ValueError(f"issame must be boolean (or 0/1), got values {np.unique(same)[:5]}")
        same = same.astype(bool)
    return a, b, same


def pair_distances(emb_a: ArrayLike, emb_b: ArrayLike) -> np.ndarray:
    """Squared L2 distance of each pair after L2-normalising both sides: ``(P, D), (P, D) -> (P,)`` in [0, 4]."""
    a, b = _l2_normalise(_numpy(emb_a)), _l2_normalise(_numpy(emb_b))
    if a.shape != b.shape:
        raise ValueError(f"emb_a and emb_b must have equal shape, got {a.shape} and {b.shape}")
    return np.sum(np.square(a - b), axis=1)


def pair_scores(emb_a: ArrayLike, emb_b: ArrayLike) -> np.ndarray:
    """Cosine similarity of each pair: ``(P, D), (P, D) -> (P,)`` in [-1, 1] (higher means "same")."""
    a, b = _l2_normalise(_numpy(emb_a)), _l2_normalise(_numpy(emb_b))
    if a.shape != b.shape:
        raise ValueError(f"emb_a and emb_b must have equal shape, got {a.shape} and {b.shape}")
    return np.einsum("pd,pd->p", a, b)


def fold_indices(num_items: int, nfolds: int) -> list[np.ndarray]:
    """The test indices of ``KFold(nfolds, shuffle=False)`` over ``num_items`` items: contiguous
    folds in order; the first ``num_items % nfolds`` hold ``num_items // nfolds + 1`` items, the
    rest one fewer. ``nfolds`` must be an int >= 2 and at most ``num_items`` (ValueError)."""
    if isinstance(nfolds, bool) or not isinstance(nfolds, int) or nfolds < 2:
        raise ValueError(f"nfolds must be an int >= 2, got {nfolds!r}")
    if num_items < nfolds:
        raise ValueError(
            f"cannot split {num_items} pairs into nfolds={nfolds} folds; need at least {nfolds} pairs"
        )
    return [test for _, test in KFold(n_splits=nfolds, shuffle=False).split(np.empty((num_items, 0)))]


def _accuracy_per_threshold(dist: np.ndarray, same: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Accuracy of the rule ``dist < t`` for every ``t``: ``(P,), (P,), (T,) -> (T,)`` (O((P+T) log P))."""
    pos = np.sort(dist[same])
    neg = np.sort(dist[~same])
    true_accepts = np.searchsorted(pos, thresholds, side="left")  # positives with dist < t
    true_rejects = neg.size - np.searchsorted(neg, thresholds, side="left")  # negatives with dist >= t
    return (true_accepts + true_rejects) / dist.size


def verification_accuracy(
    emb_a: ArrayLike,
    emb_b: ArrayLike,
    issame: ArrayLike,
    nfolds: int = 10,
    thresholds: ArrayLike | None = None,
) -> dict[str, Any]:
    """K-fold verification accuracy by the protocol of the module docstring.

    Args:
        emb_a, emb_b: ``(P, D)`` embeddings of the two sides of each pair (normalised here again).
        issame: ``(P,)`` bool, True for genuine (same identity) pairs.
        nfolds: number of contiguous folds.
        thresholds: candidate squared-distance thresholds; default :data:`THRESHOLDS`.

    Returns:
        ``{"acc", "acc_std", "best_threshold", "fold_accuracies", "fold_thresholds", "num_pairs"}``:
        mean and population std of the fold accuracies (fractions in [0, 1]), the mean of the
        per-fold best thresholds (squared L2 units), and the per-fold values.
    """
    a, b, same = _as_pairs(emb_a, emb_b, issame)
    thr = THRESHOLDS if thresholds is None else _numpy(thresholds, np.float64)
    if thr.ndim != 1 or thr.size == 0:
        raise ValueError(f"thresholds must be a non-empty 1-D array, got shape {thr.shape}")
    dist = pair_distances(a, b)
    folds = fold_indices(dist.size, nfolds)
    accs, best = [], []
    for test_idx in folds:
        train = np.ones(dist.size, dtype=bool)
        train[test_idx] = False
        t = thr[int(np.argmax(_accuracy_per_threshold(dist[train], same[train], thr)))]
        accs.append(float(np.mean((dist[test_idx] < t) == same[test_idx])))
        best.append(float(t))
    return {
        "acc": float(np.mean(accs)),
        "acc_std": float(np.std(accs)),
        "best_threshold": float(np.mean(best)),
        "fold_accuracies": accs,
        "fold_thresholds": best,
        "num_pairs": int(dist.size),
    }


# ----------------------------------------------------------------------------------------------
# ROC


def roc(scores: ArrayLike, issame: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact ROC of a score ("same" when ``score >= threshold``).

    Args:
        scores: ``(P,)`` similarity per pair (higher means more likely the same identity).
        issame: ``(P,)`` bool labels; both classes must be present.

    Returns:
        ``(fpr, tpr, thresholds)``, each ``(K + 1,)`` for K distinct scores: thresholds decrease
        from ``+inf`` (nothing accepted, fpr = tpr = 0) through every distinct score (the last
        accepts everything, fpr = tpr = 1): ``sklearn.metrics.roc_curve(issame, scores,
        drop_intermediate=False)``, after checking the shapes, that the scores are finite and that
        both classes are present (ValueError otherwise).
    """
    s = _numpy(scores, np.float64)
    same = _numpy(issame).astype(bool)
    if s.ndim != 1 or same.shape != s.shape:
        raise ValueError(f"scores and issame must be 1-D of equal length, got {s.shape} and {same.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or inf")
    n_pos, n_neg = int(same.sum()), int((~same).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            f"ROC needs both genuine and impostor pairs, got {n_pos} genuine and {n_neg} impostor"
        )
    return roc_curve(same, s, drop_intermediate=False)


def roc_auc(scores: ArrayLike, issame: ArrayLike) -> float:
    """Area under the exact ROC of :func:`roc` (trapezoidal, so a run of tied scores counts half),
    by ``sklearn.metrics.auc``: the value of ``sklearn.metrics.roc_auc_score(issame, scores)``, i.e.
    the probability that a random genuine pair scores above a random impostor pair (ties count 1/2).
    Raises like :func:`roc`."""
    fpr, tpr, _ = roc(scores, issame)
    return float(auc(fpr, tpr))


def _far_key(far: float) -> str:
    mantissa, exponent = f"{far:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def tar_at_far(
    scores: ArrayLike, issame: ArrayLike, fars: Sequence[float] = DEFAULT_FARS
) -> dict[str, float | None]:
    """True-accept rate at each false-accept rate level, from the exact ROC of all pairs.

    TAR@FAR=f is the largest TPR over thresholds whose FPR is <= f. A level is supported only if
    ``n_impostor * f >= 1`` (at least one false accept is allowed); unsupported levels map to
    ``None``. Keys are formatted like ``"1e-4"``.
    """
    fpr, tpr, _ = roc(scores, issame)
    n_neg = int((~_numpy(issame).astype(bool)).sum())
    out: dict[str, float | None] = {}
    for far in fars:
        if not 0.0 < far <= 1.0:
            raise ValueError(f"FAR levels must be in (0, 1], got {far!r}")
        if n_neg * far < 1.0 - 1e-9:
            out[_far_key(far)] = None
        else:
            out[_far_key(far)] = float(tpr[fpr <= far + 1e-12].max())
    return out


def evaluate_pairs(
    emb_a: ArrayLike,
    emb_b: ArrayLike,
    issame: ArrayLike,
    nfolds: int = 10,
    fars: Sequence[float] = DEFAULT_FARS,
) -> dict[str, Any]:
    """All verification metrics of pairs of embeddings: :func:`verification_accuracy` plus
    ``auc``, ``tar_at_far`` (``{"1e-1": tar or None, ...}``), ``tar_at_far_note``, ``num_genuine``
    and ``num_impostor``."""
    a, b, same = _as_pairs(emb_a, emb_b, issame)
    result = verification_accuracy(a, b, same, nfolds=nfolds)
    scores = pair_scores(a, b)
    n_neg = int((~same).sum())
    result["num_genuine"] = int(same.sum())
    result["num_impostor"] = n_neg
    if same.all() or not same.any():
        result["auc"] = None
        result["tar_at_far"] = {_far_key(f): None for f in fars}
        result["tar_at_far_note"] = "ROC undefined: the pairs are all genuine or all impostor"
        return result
    result["auc"] = roc_auc(scores, same)
    result["tar_at_far"] = tar_at_far(scores, same, fars)
    missing = [k for k, v in result["tar_at_far"].items() if v is None]
    result["tar_at_far_note"] = (
        f"FAR levels {missing} need at least 1/FAR impostor pairs; this set has {n_neg}" if missing else ""
    )
    return result


def evaluate_verification(
    model: nn.Module,
    vset: Any,
    batch_size: int = 256,
    flip: bool = True,
    nfolds: int = 10,
    fars: Sequence[float] = DEFAULT_FARS,
) -> dict[str, Any]:
    """Score ``model`` on a verification set by the protocol of the module docstring.

    Args:
        model: a backbone mapping normalised ``(B, 3, H, W)`` images to ``(B, D)``.
        vset: an object with ``images`` (``(2P, 3, H, W)`` uint8, pair i = rows 2i and 2i+1),
            ``issame`` (``(P,)`` bool) and ``name`` -- e.g. from ``pfclib.data.load_verification``.
        batch_size, flip: passed to :func:`embed`.
        nfolds: folds of the accuracy protocol.
        fars: FAR levels for ``tar_at_far``.

    Returns:
        The dict of :func:`evaluate_pairs` (``acc``, ``acc_std``, ``best_threshold``, ``tar_at_far``,
        ``auc``, ``num_pairs``, ...) plus ``name``.
    """
    images, issame = vset.images, vset.issame
    issame = _numpy(issame)
    if images.shape[0] != 2 * issame.shape[0]:
        raise ValueError(
            f"a verification set with {issame.shape[0]} pairs needs {2 * issame.shape[0]} images, got {images.shape[0]}"
        )
    emb = embed(model, images, batch_size=batch_size, flip=flip)
    result = evaluate_pairs(emb[0::2], emb[1::2], issame, nfolds=nfolds, fars=fars)
    result["name"] = str(getattr(vset, "name", "verification"))
    return result


# ----------------------------------------------------------------------------------------------
# Identification


def rank1_identification(
    gallery_emb: ArrayLike,
    gallery_labels: ArrayLike,
    probe_emb: ArrayLike | None = None,
    probe_labels: ArrayLike | None = None,
    chunk_size: int = 4096,
) -> dict[str, Any]:
    """Closed-set rank-1 identification by cosine similarity.

    Each probe takes the label of its most similar gallery embedding (the first on ties); rank-1
    accuracy is the fraction of probes whose label is right, counted over probes whose identity
    appears in the gallery. With ``probe_emb=None`` the gallery is scored leave-one-out: every
    gallery item is a probe against all the others.

    Args:
        gallery_emb: ``(G, D)`` embeddings; gallery_labels: ``(G,)`` int identities.
        probe_emb: ``(Q, D)`` embeddings or None; probe_labels: ``(Q,)`` int identities.
        chunk_size: probes per similarity block (memory ``chunk_size * G`` floats).

    Returns:
        ``{"rank1", "num_probes", "num_probes_without_mate", "num_gallery"}``; ``rank1`` is a fraction.
    """
    g = _l2_normalise(_numpy(gallery_emb))
    g_lab = _numpy(gallery_labels)
    if g.ndim != 2 or g_lab.shape != (g.shape[0],):
        raise ValueError(
            f"gallery_emb must be (G, D) and gallery_labels (G,), got {g.shape} and {g_lab.shape}"
        )
    leave_one_out = probe_emb is None
    if leave_one_out:
        if probe_labels is not None:
            raise ValueError("probe_labels given without probe_emb")
        q, q_lab = g, g_lab
    else:
        if probe_labels is None:
            raise ValueError("probe_emb given without probe_labels")
        q = _l2_normalise(_numpy(probe_emb))
        q_lab = _numpy(probe_labels)
        if q.ndim != 2 or q.shape[1] != g.shape[1] or q_lab.shape != (q.shape[0],):
            raise ValueError(
                f"probe_emb must be (Q, {g.shape[1]}) and probe_labels (Q,), got {q.shape} and {q_lab.shape}"
            )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    min_gallery = 2 if leave_one_out else 1
    if g.shape[0] < min_gallery:
        raise ValueError(f"need at least {min_gallery} gallery embeddings, got {g.shape[0]}")

    labels, counts = np.unique(g_lab, return_counts=True)
    needed = 2 if leave_one_out else 1  # in leave-one-out the probe's own entry is not a mate
    has_mate = np.isin(q_lab, labels[counts >= needed])
    if not has_mate.any():
        raise ValueError("no probe has a mate (same identity) in the gallery: rank-1 is undefined")

    correct = 0
    for start in range(0, q.shape[0], chunk_size):
        stop = min(start + chunk_size, q.shape[0])
        sim = q[start:stop] @ g.T
        if leave_one_out:
            sim[np.arange(stop - start), np.arange(start, stop)] = -np.inf
        pred = g_lab[np.argmax(sim, axis=1)]
        correct += int(np.sum((pred == q_lab[start:stop]) & has_mate[start:stop]))
    n_probes = int(has_mate.sum())
    return {
        "rank1": correct / n_probes,
        "num_probes": n_probes,
        "num_probes_without_mate": int((~has_mate).sum()),
        "num_gallery": int(g.shape[0]),
    }


# ----------------------------------------------------------------------------------------------
# Face-image quality (error-versus-reject curve) and threshold consistency (OPIS)

# Tolerance on ``fraction * count`` products: a decimal fraction that is not exact in binary still
# counts as meant (``0.29 * 100 == 28.999999999999996`` is 29 pairs).
_COUNT_TOL = 1e-9


def _check_finite(name: str, x: np.ndarray) -> None:
    bad = np.flatnonzero(~np.isfinite(x))
    if bad.size:
        raise ValueError(
            f"{name} must be finite, got {x[bad[0]].item()!r} at index {bad[0]} ({bad.size} NaN or inf value(s) in all)"
        )


def _scores_and_labels(scores: ArrayLike, issame: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """``(P,)`` finite float64 scores and ``(P,)`` bool labels, or ValueError naming the problem."""
    s = _numpy(scores, np.float64)
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D (one score per pair), got shape {s.shape}")
    if s.size == 0:
        raise ValueError("scores is empty: need at least one pair")
    _check_finite("scores", s)
    same = _numpy(issame)
    if same.shape != s.shape:
        raise ValueError(f"issame must have shape {s.shape} to match scores, got {same.shape}")
    if same.dtype != np.bool_:
        if not np.all((same == 0) | (same == 1)):
            raise ValueError(f"issame must be boolean (or 0/1), got values {np.unique(same)[:5]}")
        same = same.astype(bool)
    return s, same


def _per_pair(name: str, x: ArrayLike, num_pairs: int) -> np.ndarray:
    """A ``(P,)`` finite float64 per-pair value (a quality), or ValueError."""
    v = _numpy(x, np.float64)
    if v.shape != (num_pairs,):
        raise ValueError(f"{name} must have shape ({num_pairs},) to match scores, got {v.shape}")
    _check_finite(name, v)
    return v


def _check_rate(name: str, value: Any) -> float:
    """A false-match / false-accept rate: a number in (0, 1]."""
    if isinstance(value, bool | np.bool_):
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    try:
        rate = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}") from None
    if not (np.isfinite(rate) and 0.0 < rate <= 1.0):
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    return rate


def _check_count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _threshold_at_fmr(s: np.ndarray, same: np.ndarray, rate: float, name: str) -> float:
    """The smallest observed score (or ``+inf``) ``t`` with ``#{impostor score >= t} <= rate * N``.

    With the impostor scores sorted in decreasing order ``i_1 >= i_2 >= ... >= i_N`` and
    ``k = floor(rate * N)``, ``t`` is the smallest score of any pair strictly above ``i_(k+1)``
    (``+inf`` if there is none; the smallest score of all if ``k = N``). Impostors tied at
    ``i_(k+1)`` are all rejected, so the realised rate can be below ``rate``.
    """
    imp = np.sort(s[~same])[::-1]
    n = imp.size
    needed = math.ceil(1.0 / rate - _COUNT_TOL)
    if n < needed:
        raise ValueError(
            f"{name} {rate:g} needs at least ceil(1/{rate:g}) = {needed} impostor pairs, got {n}"
        )
    k = math.floor(rate * n + _COUNT_TOL)
    if k >= n:
        return float(s.min())
    above = s[s > imp[k]]
    return float(above.min()) if above.size else float("inf")


def _reject_fractions(reject_fractions: ArrayLike | None) -> np.ndarray:
    if reject_fractions is None:
        return np.arange(20) / 20  # 0, 0.05, ..., 0.95
    f = _numpy(reject_fractions, np.float64)
    if f.ndim != 1 or f.size == 0:
        raise ValueError(f"reject_fractions must be a non-empty 1-D sequence, got shape {f.shape}")
    bad = np.flatnonzero(~((f >= 0.0) & (f < 1.0)))  # NaN fails both comparisons
    if bad.size:
        raise ValueError(
            f"reject_fractions must each be in [0, 1), got {f[bad[0]].item()!r} at index {bad[0]}"
        )
    down = np.flatnonzero(np.diff(f) <= 0)
    if down.size:
        i = down[0]
        raise ValueError(
            f"reject_fractions must be strictly increasing, got {f[i].item()!r} at index {i} then {f[i + 1].item()!r}"
        )
    return f


def _num_rejected(fractions: np.ndarray, num_pairs: int) -> np.ndarray:
    """``floor(f * P)`` for each fraction (with :data:`_COUNT_TOL`), at most ``P - 1``."""
    m = np.floor(fractions * num_pairs + _COUNT_TOL).astype(np.int64)
    return np.minimum(m, num_pairs - 1)


def _kept_genuine(
    same: np.ndarray, false_nonmatch: np.ndarray, order: np.ndarray, num_rejected: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Genuine pairs and false non-matches left after dropping ``order[:m]`` for each ``m``."""
    dropped_gen = np.concatenate(([0], np.cumsum(same[order])))
    dropped_fnm = np.concatenate(([0], np.cumsum(false_nonmatch[order])))
    kept_gen = int(same.sum()) - dropped_gen[num_rejected]
    kept_fnm = int(false_nonmatch.sum()) - dropped_fnm[num_rejected]
    return kept_gen, kept_fnm


def _trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))


def _erc_setup(
    scores: ArrayLike, issame: ArrayLike, fmr: Any, reject_fractions: ArrayLike | None
) -> tuple[np.ndarray, np.ndarray, float, np.ndarray, float, np.ndarray]:
    s, same = _scores_and_labels(scores, issame)
    rate = _check_rate("fmr", fmr)
    fractions = _reject_fractions(reject_fractions)
    if not same.any():
        raise ValueError(f"the ERC needs genuine pairs (FNMR is over them), got none among {s.size} pairs")
    t = _threshold_at_fmr(s, same, rate, "fmr")
    false_nonmatch = same & (s < t)
    return s, same, rate, fractions, t, false_nonmatch


def error_vs_reject(
    scores: ArrayLike,
    issame: ArrayLike,
    quality_a: ArrayLike,
    quality_b: ArrayLike,
    fmr: float = 1e-3,
    reject_fractions: ArrayLike | None = None,
) -> dict[str, Any]:
    """Error-versus-reject curve (ERC): FNMR at a fixed threshold as low-quality pairs are rejected.

    Conventions:

    * pair quality = ``min(quality_a, quality_b)``: a pair is as good as its worse image (higher
      quality = better);
    * the threshold ``t`` is fixed ONCE, on all pairs, at the false-match rate ``fmr``: the smallest
      threshold such that the fraction of impostor pairs with ``score >= t`` is ``<= fmr``, a pair
      being a match when ``score >= t``. Candidate thresholds are the observed scores (of all pairs)
      and ``+inf``: with impostor scores sorted ``i_1 >= ... >= i_N`` and ``k = floor(fmr * N)``,
      ``t`` is the smallest score strictly above ``i_(k+1)``. Impostors tied at ``i_(k+1)`` cannot
      be split, so they are all non-matches and the realised FMR (``fmr_at_threshold``) can be
      below ``fmr``; ``t = +inf`` (nothing matches) when no score lies above ``i_(k+1)``;
    * for each reject fraction ``f`` the ``floor(f * P)`` pairs (of all ``P`` pairs, genuine and
      impostor) with the lowest pair quality are dropped, ties in quality broken by pair index (the
      earlier pair goes first: a stable sort); ``f * P`` is floored with a 1e-9 tolerance, so
      ``0.29 * 100`` drops 29 pairs;
    * FNMR(f) = the fraction of the remaining genuine pairs with ``score < t``;
    * ``auc_erc`` = trapezoidal area under FNMR over ``reject_fraction`` (not normalised by the
      range of the fractions; 0 for a single fraction). Lower is better; compare it with
      :func:`random_reject_baseline` on the same fractions.

    Args:
        scores: ``(P,)`` similarity per pair (higher = more likely the same identity).
        issame: ``(P,)`` bool (or 0/1) labels.
        quality_a, quality_b: ``(P,)`` quality of the two images of each pair.
        fmr: false-match rate in (0, 1]; needs at least ``ceil(1 / fmr)`` impostor pairs.
        reject_fractions: strictly increasing fractions in [0, 1); default
            ``np.arange(20) / 20`` (0, 0.05, ..., 0.95).

    Returns:
        ``{"reject_fraction", "fnmr", "num_rejected", "num_genuine_kept"}`` (arrays, one entry per
        fraction) and ``{"threshold", "fmr", "fmr_at_threshold", "num_genuine", "num_impostor",
        "auc_erc"}``.

    Raises:
        ValueError: shape mismatches, NaN/inf scores or qualities, non-0/1 labels, ``fmr`` outside
        (0, 1], fewer than ``ceil(1 / fmr)`` impostor pairs, reject fractions outside [0, 1) or not
        increasing, no genuine pairs, or no genuine pair left after a rejection (naming the fraction).
    """
    s, same, rate, fractions, t, false_nonmatch = _erc_setup(scores, issame, fmr, reject_fractions)
    quality = np.minimum(_per_pair("quality_a", quality_a, s.size), _per_pair("quality_b", quality_b, s.size))
    order = np.argsort(quality, kind="stable")
    rejected = _num_rejected(fractions, s.size)
    kept_gen, kept_fnm = _kept_genuine(same, false_nonmatch, order, rejected)
    empty = np.flatnonzero(kept_gen == 0)
    if empty.size:
        i = empty[0]
        raise ValueError(
            f"no genuine pair is left after rejecting the {rejected[i]} of {s.size} pairs with the lowest "
            f"quality (reject fraction {fractions[i].item()!r}); use smaller reject fractions"
        )
    fnmr = kept_fnm / kept_gen
    return {
        "reject_fraction": fractions,
        "fnmr": fnmr,
        "num_rejected": rejected,
        "num_genuine_kept": kept_gen,
        **_erc_common(t, rate, s, same, fnmr, fractions),
    }


def _erc_common(t: float, rate: float, s: np.ndarray, same: np.ndarray, fnmr, fractions) -> dict[str, Any]:
    """The fields an error-versus-reject result and its random baseline share."""
    return {
        "threshold": t,
        "fmr": rate,
        "fmr_at_threshold": float(np.mean(s[~same] >= t)),
        "num_genuine": int(same.sum()),
        "num_impostor": int((~same).sum()),
        "auc_erc": _trapezoid(fnmr, fractions),
    }


def random_reject_baseline(
    scores: ArrayLike,
    issame: ArrayLike,
    fmr: float = 1e-3,
    reject_fractions: ArrayLike | None = None,
    n_repeats: int = 100,
    seed: int = 0,
) -> dict[str, Any]:
    """The ERC of :func:`error_vs_reject` when pairs are rejected in a random order (no quality).

    Same threshold and rejection counts as :func:`error_vs_reject`. Closed form: after dropping
    ``m`` pairs uniformly at random, the genuine pairs that are left are a uniform random subset of
    the genuine pairs, so given that ``g > 0`` are left the expected number of false non-matches
    among them is ``g * FNMR(0)``; the expected FNMR (given at least one genuine pair is left) is
    therefore ``FNMR(0)`` at every fraction: ``fnmr`` is that constant and ``auc_erc`` its area.

    With ``n_repeats > 0`` it also averages ``n_repeats`` random orders (draw ``r`` is the r-th
    ``rng.permutation(P)`` of ``np.random.default_rng(seed)``; each order is used for all fractions,
    like a random quality): ``fnmr_sampled`` (the mean over the draws that leave a genuine pair, NaN
    if none does), ``fnmr_sampled_std`` (population std over the same draws) and ``num_draws_used``.
    With ``n_repeats = 0`` these three are None.

    Returns:
        ``{"reject_fraction", "fnmr", "fnmr_sampled", "fnmr_sampled_std", "num_draws_used",
        "num_rejected", "threshold", "fmr", "fmr_at_threshold", "num_genuine", "num_impostor",
        "auc_erc", "n_repeats", "seed"}``. Raises like :func:`error_vs_reject` (and for
        ``n_repeats`` not an int >= 0).
    """
    s, same, rate, fractions, t, false_nonmatch = _erc_setup(scores, issame, fmr, reject_fractions)
    n_repeats = _check_count("n_repeats", n_repeats, 0)
    rejected = _num_rejected(fractions, s.size)
    fnmr0 = float(false_nonmatch.sum() / same.sum())
    sampled = sampled_std = used = None
    if n_repeats > 0:
        rng = np.random.default_rng(seed)
        draws = np.zeros((n_repeats, fractions.size))
        kept = np.zeros((n_repeats, fractions.size), dtype=bool)  # the draw leaves a genuine pair
        for r in range(n_repeats):
            kept_gen, kept_fnm = _kept_genuine(same, false_nonmatch, rng.permutation(s.size), rejected)
            kept[r] = kept_gen > 0
            draws[r] = np.where(kept[r], kept_fnm / np.maximum(kept_gen, 1), 0.0)
        used = kept.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            sampled = np.where(used > 0, draws.sum(axis=0) / used, np.nan)
            dev = np.where(kept, draws - sampled, 0.0)  # two passes: no cancellation
            sampled_std = np.where(used > 0, np.sqrt((dev**2).sum(axis=0) / used), np.nan)
    fnmr = np.full(fractions.size, fnmr0)
    return {
        "reject_fraction": fractions,
        "fnmr": fnmr,
        "fnmr_sampled": sampled,
        "fnmr_sampled_std": sampled_std,
        "num_draws_used": used,
        "num_rejected": rejected,
        **_erc_common(t, rate, s, same, fnmr, fractions),
        "n_repeats": n_repeats,
        "seed": seed,
    }


def _identity_codes(identity_a: ArrayLike, identity_b: ArrayLike, num_pairs: int) -> tuple[np.ndarray, ...]:
    """Identity labels of both sides as codes ``0..K-1`` (and the labels), or ValueError."""
    ids = []
    for name, x in (("identity_a", identity_a), ("identity_b", identity_b)):
        v = _numpy(x)
        if v.shape != (num_pairs,):
            raise ValueError(f"{name} must have shape ({num_pairs},) to match scores, got {v.shape}")
        if v.dtype.kind in "fc":
            _check_finite(name, v)
        ids.append(v)
    labels, inverse = np.unique(np.concatenate(ids), return_inverse=True)
    return labels, inverse[:num_pairs], inverse[num_pairs:]


def opis(
    scores: ArrayLike,
    issame: ArrayLike,
    identity_a: ArrayLike,
    identity_b: ArrayLike,
    far_levels: Sequence[float] = (1e-1, 1e-2, 1e-3),
    min_pairs: int = 1,
) -> dict[str, Any]:
    """Operating-Point-Inconsistency Score: how much per-identity error rates at one global
    threshold vary across identities.

    After the OPIS of the Threshold-Consistent Margin paper (Zhang et al., 2023), which measures how
    much per-class accuracy at shared thresholds varies across classes; this is a verification
    variant with the following definition (not that paper's exact formula). For each FAR level ``f``:

    1. the global threshold ``t`` is set on all impostor pairs by the rule of
       :func:`error_vs_reject` (the smallest observed score, or ``+inf``, with
       ``#{impostor score >= t} <= f * N``; a pair is accepted when ``score >= t``);
    2. a genuine pair belongs to its one identity, an impostor pair to both of its identities;
       for each identity ``i``, ``FNMR_i`` = the fraction of its genuine pairs with ``score < t``
       and ``FMR_i`` = the fraction of its impostor pairs with ``score >= t``;
    3. identities with fewer than ``min_pairs`` genuine pairs are left out of the FNMR term, those
       with fewer than ``min_pairs`` impostor pairs out of the FMR term (an identity with no pair
       of a kind is always left out of that term); the counts are reported;
    4. OPIS(f) = mean_i (FNMR_i - mean FNMR_i)^2 + mean_i (FMR_i - mean FMR_i)^2, the sum of the two
       across-identity population variances (``ddof=0``).

    The overall ``opis`` is the mean of OPIS(f) over the levels. 0 means every identity sees the
    same error rates at the global threshold; lower is more consistent. The value depends on the
    level set (and on ``min_pairs``: rates over few pairs add binomial noise to the variances), so
    compare models only on the same levels, pairs and ``min_pairs``.

    Args:
        scores: ``(P,)`` similarity per pair (higher = more likely the same identity).
        issame: ``(P,)`` bool (or 0/1) labels.
        identity_a, identity_b: ``(P,)`` identity labels (ints or strings) of the two sides; a
            genuine pair must have equal labels, an impostor pair different ones.
        far_levels: FAR levels in (0, 1]; each needs at least ``ceil(1 / f)`` impostor pairs.
        min_pairs: the fewest genuine (impostor) pairs an identity needs for the FNMR (FMR) term.

    Returns:
        ``{"opis", "far_levels", "opis_at_level", "threshold", "fnmr", "fmr", "var_fnmr",
        "var_fmr", "num_identities", "num_identities_fnmr", "num_identities_fmr",
        "num_identities_excluded_fnmr", "num_identities_excluded_fmr", "min_pairs",
        "num_genuine", "num_impostor"}``; the per-level entries are arrays in the order of
        ``far_levels``, ``fnmr`` / ``fmr`` being the global rates over all pairs at ``t``.

    Raises:
        ValueError: shape mismatches, NaN/inf scores or identity labels, non-0/1 labels, labels
        inconsistent with ``issame``, bad ``far_levels`` or ``min_pairs``, too few impostor pairs
        for a level, or no identity with ``min_pairs`` genuine (or impostor) pairs.
    """
    s, same = _scores_and_labels(scores, issame)
    labels, code_a, code_b = _identity_codes(identity_a, identity_b, s.size)
    levels = _numpy(far_levels, np.float64)
    if levels.ndim != 1 or levels.size == 0:
        raise ValueError(f"far_levels must be a non-empty 1-D sequence, got shape {levels.shape}")
    for level in levels.tolist():
        _check_rate("FAR level", level)
    min_pairs = _check_count("min_pairs", min_pairs, 1)
    bad = np.flatnonzero(same != (code_a == code_b))
    if bad.size:
        i = bad[0]
        raise ValueError(
            f"pair {i} is {'genuine' if same[i] else 'an impostor'} but has identity_a="
            f"{_numpy(identity_a)[i].item()!r} and identity_b={_numpy(identity_b)[i].item()!r}: genuine pairs need "
            "equal identities, impostor pairs different ones"
        )

    k = labels.size
    imp = ~same

    def per_identity(mask_gen: np.ndarray, mask_imp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        gen = np.bincount(code_a[mask_gen], minlength=k)
        imp_ = np.bincount(code_a[mask_imp], minlength=k) + np.bincount(code_b[mask_imp], minlength=k)
        return gen, imp_

    num_gen, num_imp = per_identity(same, imp)
    use_gen, use_imp = num_gen >= min_pairs, num_imp >= min_pairs
    for use, counts, kind in ((use_gen, num_gen, "genuine"), (use_imp, num_imp, "impostor")):
        if not use.any():
            raise ValueError(
                f"no identity has at least min_pairs={min_pairs} {kind} pairs (the most any of the {k} "
                f"identities has is {int(counts.max())}); lower min_pairs or add {kind} pairs"
            )

    out: dict[str, list[float]] = {
        key: [] for key in ("opis", "threshold", "fnmr", "fmr", "var_fnmr", "var_fmr")
    }
    for level in levels:
        t = _threshold_at_fmr(s, same, float(level), "FAR level")
        false_nonmatch, false_match = same & (s < t), imp & (s >= t)
        fn, fm = per_identity(false_nonmatch, false_match)
        fnmr_i = fn[use_gen] / num_gen[use_gen]
        fmr_i = fm[use_imp] / num_imp[use_imp]
        var_fnmr = float(np.mean((fnmr_i - fnmr_i.mean()) ** 2))
        var_fmr = float(np.mean((fmr_i - fmr_i.mean()) ** 2))
        out["opis"].append(var_fnmr + var_fmr)
        out["threshold"].append(t)
        out["fnmr"].append(float(false_nonmatch.sum() / same.sum()))
        out["fmr"].append(float(false_match.sum() / imp.sum()))
        out["var_fnmr"].append(var_fnmr)
        out["var_fmr"].append(var_fmr)
    return {
        "opis": float(np.mean(out["opis"])),
        "far_levels": levels,
        "opis_at_level": np.asarray(out["opis"]),
        "threshold": np.asarray(out["threshold"]),
        "fnmr": np.asarray(out["fnmr"]),
        "fmr": np.asarray(out["fmr"]),
        "var_fnmr": np.asarray(out["var_fnmr"]),
        "var_fmr": np.asarray(out["var_fmr"]),
        "num_identities": int(k),
        "num_identities_fnmr": int(use_gen.sum()),
        "num_identities_fmr": int(use_imp.sum()),
        "num_identities_excluded_fnmr": int(k - use_gen.sum()),
        "num_identities_excluded_fmr": int(k - use_imp.sum()),
        "min_pairs": min_pairs,
        "num_genuine": int(same.sum()),
        "num_impostor": int(imp.sum()),
    }


# ----------------------------------------------------------------------------------------------
# CLI


def _format_table(results: dict[str, dict[str, Any]]) -> str:
    """The printed table of :func:`evaluate_checkpoint`'s sets, a legend of its units and, for each
    set with an empty (``-``) AUC or TAR@FAR cell, its ``tar_at_far_note`` saying why."""
    fars = list(DEFAULT_FARS)
    header = ["set", "pairs", "acc (%)", "std (%)", "thr (sq. L2)", "AUC"] + [
        f"TAR@{_far_key(f)}" for f in fars
    ]
    rows = [header]
    notes = []
    for name, r in results.items():
        tar = r["tar_at_far"]
        cells = ["-" if tar.get(_far_key(f)) is None else f"{100 * tar[_far_key(f)]:.2f}" for f in fars]
        rows.append(
            [
                name,
                str(r["num_pairs"]),
                f"{100 * r['acc']:.2f}",
                f"{100 * r['acc_std']:.2f}",
                f"{r['best_threshold']:.2f}",
                "-" if r["auc"] is None else f"{r['auc']:.4f}",
            ]
            + cells
        )
        if (r["auc"] is None or "-" in cells) and r.get("tar_at_far_note"):
            notes.append(f"'-' for {name}: {r['tar_at_far_note']}")
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.append(
        "acc, std (%): mean and std of the fold accuracies; thr (sq. L2): mean of the folds' best "
        "thresholds on the squared L2 distance of the unit embeddings, in [0, 4] (below it a pair is 'same')"
    )
    lines.append(
        "AUC: area under the ROC of the cosine scores; TAR@f (%): true-accept rate at false-accept rate f"
    )
    return "\n".join(lines + notes)


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    data: Sequence[str | os.PathLike],
    batch_size: int = 256,
    flip: bool = True,
    nfolds: int = 10,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Score a training checkpoint's backbone on verification sets.

    ``checkpoint`` is a checkpoint file or a run folder, read as its newest checkpoint
    (``pfclib.checkpoint.resolve_checkpoint``: FileNotFoundError naming the path when there is
    none). The backbone comes from ``pfclib.checkpoint.load_backbone`` and each set from
    ``pfclib.data.load_verification(path, image_size=config["image_size"])`` (a ``.bin`` file or a
    synthetic pairs folder). Nothing is written. Returns ``{"checkpoint": the file read,
    "backbone", "image_size", "flip", "sets": {name: metrics of evaluate_verification plus "path"}}``.
    """
    # Imported here so that `import pfclib.eval` does not pull in the trainer and the data readers.
    from pfclib.checkpoint import load_backbone, resolve_checkpoint
    from pfclib.data import load_verification

    checkpoint = resolve_checkpoint(checkpoint)
    if len(data) == 0:
        raise ValueError("no verification data given: pass at least one .bin file or pairs folder")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, config = load_backbone(checkpoint, map_location="cpu")
    model = model.to(device)
    image_size = config.get("image_size")

    results: dict[str, dict[str, Any]] = {}
    for path in data:
        vset = load_verification(path, image_size=image_size)
        metrics = evaluate_verification(model, vset, batch_size=batch_size, flip=flip, nfolds=nfolds)
        name = metrics["name"]
        if name in results:
            name = f"{name}:{path}"
        metrics["path"] = str(path)
        results[name] = metrics
    return {
        "checkpoint": str(checkpoint),
        "backbone": config.get("backbone"),
        "image_size": image_size,
        "flip": flip,
        "sets": results,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Score a pfclib checkpoint on verification sets (.bin files or synthetic pair folders):
    print a table and, with --out, write the metrics as JSON (no file is written without it)."""
    parser = argparse.ArgumentParser(prog="python -m pfclib.eval", description=main.__doc__)
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="RUN_OR_CKPT",
        help="a pfclib training checkpoint (.pt file), or a run folder: its newest checkpoints/ckpt_<step>.pt",
    )
    parser.add_argument(
        "--data",
        required=True,
        nargs="+",
        metavar="PATH",
        help="verification set(s): insightface .bin file(s) or synthetic pairs folder(s); "
        "images are resized to the backbone's input size",
    )
    parser.add_argument(
        "--batch-size", type=int, default=256, metavar="N", help="images per forward pass (default 256)"
    )
    parser.add_argument(
        "--no-flip",
        action="store_true",
        help="do not add the embedding of the horizontally mirrored image (default: add it)",
    )
    parser.add_argument(
        "--nfolds",
        type=int,
        default=10,
        metavar="K",
        help="contiguous folds of the accuracy protocol, each scored with the threshold chosen on the others "
        "(default 10)",
    )
    parser.add_argument(
        "--device", default=None, help="torch device of the backbone (default: cuda if available, else cpu)"
    )
    parser.add_argument(
        "--out",
        default=None,
        metavar="JSON",
        help="write the metrics as JSON to this file (written atomically, folders created; "
        "a relative path is relative to the current directory); default: write no file",
    )
    args = parser.parse_args(argv)

    from pfclib.checkpoint import resolve_checkpoint

    try:
        checkpoint = resolve_checkpoint(args.checkpoint)
    except FileNotFoundError as exc:
        parser.error(f"--checkpoint: {exc}")
    missing = [p for p in args.data if not os.path.exists(p)]
    if missing:
        parser.error(f"--data {missing[0]!r} does not exist (expected a .bin file or a pairs folder)")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be a positive number of images, got {args.batch_size}")
    if args.nfolds < 2:
        parser.error(f"--nfolds must be at least 2, got {args.nfolds}")
    if args.out is not None and os.path.isdir(args.out):
        parser.error(f"--out {args.out!r} is a folder: name the JSON file to write")

    from pfclib.io import write_json

    out = evaluate_checkpoint(
        checkpoint,
        args.data,
        batch_size=args.batch_size,
        flip=not args.no_flip,
        nfolds=args.nfolds,
        device=args.device,
    )
    print(f"checkpoint {out['checkpoint']} ({out['backbone']}, {out['image_size']}x{out['image_size']})")
    print(_format_table(out["sets"]))
    if args.out is not None:
        write_json(args.out, out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
