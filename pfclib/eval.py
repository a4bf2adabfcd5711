"""Face-verification and identification metrics, and a CLI that scores a checkpoint.

The verification protocol is insightface's for the LFW / CFP-FP / AgeDB-30 ``.bin`` sets:

1. embed every image and its horizontal flip, sum the two embeddings, L2-normalise (:func:`embed`);
2. pair i is rows ``2i`` and ``2i+1``; its distance is the squared L2 distance of the two
   normalised embeddings (in [0, 4]);
3. candidate thresholds ``np.arange(0, 4, 0.01)`` (0.00, 0.01, ..., 3.99); a pair is predicted
   "same" when ``distance < threshold``;
4. the pairs are split into ``nfolds`` contiguous folds without shuffling (the sizes of
   ``sklearn.model_selection.KFold(nfolds, shuffle=False)``: the first ``P % nfolds`` folds hold one
   extra pair); for each fold the threshold with the best accuracy on the other folds (the first
   one on ties) is applied to it;
5. report the mean and the (population, ``ddof=0``) standard deviation of the fold accuracies.

From the ROC of all pairs (score = cosine similarity, higher means "same"; the ROC is exact, one
point per distinct score) come the AUC and TAR at FAR 1e-1 ... 1e-6. TAR@FAR=f is the highest
true-accept rate of any threshold whose false-accept rate is <= f; a level is reported only when
the number of impostor pairs supports it (``n_impostor * f >= 1``), otherwise its value is ``None``
and ``tar_at_far_note`` says why.

CLI::

    python -m pfclib.eval --checkpoint CKPT --data PATH [PATH ...] [--batch-size N] [--no-flip] [--out metrics.json]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "DEFAULT_FARS",
    "THRESHOLDS",
    "embed",
    "evaluate_checkpoint",
    "evaluate_pairs",
    "evaluate_verification",
    "fold_indices",
    "main",
    "pair_distances",
    "pair_scores",
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
    """Contiguous folds without shuffling, sized like ``KFold(nfolds, shuffle=False)``: the first
    ``num_items % nfolds`` folds hold ``num_items // nfolds + 1`` items, the rest one fewer."""
    if isinstance(nfolds, bool) or not isinstance(nfolds, int) or nfolds < 2:
        raise ValueError(f"nfolds must be an int >= 2, got {nfolds!r}")
    if num_items < nfolds:
        raise ValueError(
            f"cannot split {num_items} pairs into nfolds={nfolds} folds; need at least {nfolds} pairs"
        )
    return np.array_split(np.arange(num_items), nfolds)


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
        accepts everything, fpr = tpr = 1). Equal to ``sklearn.metrics.roc_curve(issame, scores,
        drop_intermediate=False)``.
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
    order = np.argsort(-s, kind="mergesort")
    s_sorted, same_sorted = s[order], same[order]
    # last index of each run of equal scores: the operating point after accepting that whole run
    ends = np.r_[np.flatnonzero(np.diff(s_sorted)), s.size - 1]
    tp = np.cumsum(same_sorted)[ends]
    fp = (ends + 1) - tp
    fpr = np.r_[0.0, fp / n_neg]
    tpr = np.r_[0.0, tp / n_pos]
    thresholds = np.r_[np.inf, s_sorted[ends]]
    return fpr, tpr, thresholds


def roc_auc(scores: ArrayLike, issame: ArrayLike) -> float:
    """Area under the exact ROC (trapezoidal over ties), equal to ``sklearn.metrics.roc_auc_score``."""
    fpr, tpr, _ = roc(scores, issame)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


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
# CLI


def _format_table(results: dict[str, dict[str, Any]]) -> str:
    fars = list(DEFAULT_FARS)
    header = ["set", "pairs", "acc (%)", "std", "thr", "AUC"] + [f"TAR@{_far_key(f)}" for f in fars]
    rows = [header]
    for name, r in results.items():
        tar = r["tar_at_far"]
        rows.append(
            [
                name,
                str(r["num_pairs"]),
                f"{100 * r['acc']:.2f}",
                f"{100 * r['acc_std']:.2f}",
                f"{r['best_threshold']:.2f}",
                "-" if r["auc"] is None else f"{r['auc']:.4f}",
            ]
            + ["-" if tar.get(_far_key(f)) is None else f"{100 * tar[_far_key(f)]:.2f}" for f in fars]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows)


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    data: Sequence[str | os.PathLike],
    batch_size: int = 256,
    flip: bool = True,
    nfolds: int = 10,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Score a training checkpoint's backbone on verification sets.

    The backbone comes from ``pfclib.checkpoint.load_backbone`` and each set from
    ``pfclib.data.load_verification(path, image_size=config["image_size"])`` (a ``.bin`` file or a
    synthetic pairs folder). Returns ``{"checkpoint", "backbone", "image_size", "flip", "sets":
    {name: metrics of evaluate_verification plus "path"}}``.
    """
    # Imported here so that `import pfclib.eval` does not pull in the trainer and the data readers.
    from pfclib.checkpoint import load_backbone
    from pfclib.data import load_verification

    if not os.path.exists(checkpoint):
        raise FileNotFoundError(f"checkpoint {str(checkpoint)!r} does not exist")
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
    print a table and optionally write the metrics as JSON."""
    parser = argparse.ArgumentParser(prog="python -m pfclib.eval", description=main.__doc__)
    parser.add_argument("--checkpoint", required=True, help="a pfclib training checkpoint (.pt)")
    parser.add_argument(
        "--data", required=True, nargs="+", help="verification .bin file(s) or synthetic pairs folder(s)"
    )
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument(
        "--no-flip", action="store_true", help="do not add the embedding of the mirrored image"
    )
    parser.add_argument("--nfolds", type=int, default=10)
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--out", default=None, help="write the metrics as JSON here (atomically)")
    args = parser.parse_args(argv)
    if not os.path.exists(args.checkpoint):
        parser.error(f"--checkpoint {args.checkpoint!r} does not exist")

    from pfclib.io import write_json

    out = evaluate_checkpoint(
        args.checkpoint,
        args.data,
        batch_size=args.batch_size,
        flip=not args.no_flip,
        nfolds=args.nfolds,
        device=args.device,
    )
    print(_format_table(out["sets"]))
    if args.out is not None:
        write_json(args.out, out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
