"""The face-image-quality study of notebook 06: a trained run's CR-FIQA scores against the known
degradations of synthetic verification pairs.

* :func:`pair_truth` reads the per-image truth of a synthetic ``pairs`` dataset (blur sigma, noise
  std, rotation, occlusion of both sides, written by :mod:`pfclib.data.synthetic`);
* :func:`score_run` embeds the pairs with a run's backbone, scores every image with its quality
  branch, and returns one row of numbers: the verification error at a fixed false-match rate, how
  much rejecting the lowest-quality pairs lowers it (against random rejection), the rank
  correlation of the quality with each degradation, and the error on clean and degraded pairs.

Units: rates are fractions in [0, 1]; "points" in the notebook are percentage points.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["FACTORS", "pair_truth", "score_run"]

FACTORS = ("blur_sigma", "noise_std", "pose_deg", "occluded")
"""The degradations recorded per image, in the order the notebook reports them."""


def pair_truth(path: str | Path) -> pd.DataFrame:
    """The truth columns of a synthetic data set's pairs (``<path>/pairs`` or the pairs folder):
    one row per pair, ``<factor>_a`` / ``<factor>_b`` for each of :data:`FACTORS`, plus ``index_a``,
    ``index_b`` (the held-out image of each side) and ``identity_a``, ``identity_b``. Raises
    ``ValueError`` naming the missing columns when the set was generated without the truth (an
    older data set)."""
    from pfclib.data.hf import offline

    path = Path(path)
    folder = path / "pairs" if (path / "pairs").is_dir() else path
    wanted = [f"{f}_{side}" for f in FACTORS for side in "ab"] + [
        "index_a",
        "index_b",
        "identity_a",
        "identity_b",
    ]
    with offline() as datasets:
        ds = datasets.load_from_disk(str(folder))
    missing = sorted(set(wanted) - set(ds.column_names))
    if missing:
        raise ValueError(f"{folder}: the pairs hold no truth columns {missing}; regenerate the data set")
    return ds.select_columns(wanted).to_pandas()


def _per_image(truth: pd.DataFrame) -> pd.DataFrame:
    """One row per distinct held-out image of the pairs (``index``, the factors), row order of
    first appearance; its position in the pairs: row ``2i`` (side a) or ``2i + 1`` (side b)."""
    sides = []
    for side, offset in (("a", 0), ("b", 1)):
        part = truth[[f"{f}_{side}" for f in FACTORS] + [f"index_{side}"]].copy()
        part.columns = [*FACTORS, "index"]
        part["row"] = 2 * np.arange(len(truth)) + offset
        sides.append(part)
    both = pd.concat(sides).sort_values("row", kind="stable")
    return both.drop_duplicates("index").reset_index(drop=True)


def score_run(
    run: str | Path,
    pairs: Any,
    truth: pd.DataFrame,
    fmr: float = 1e-3,
    reject: float = 0.2,
    seed: int = 0,
) -> dict[str, Any]:
    """The quality study of one trained run (a run folder or checkpoint with the quality branch).

    Args:
        run: what :func:`pfclib.quality.load_quality_model` accepts.
        pairs: the :class:`pfclib.data.verification.VerificationSet` of the truth's pairs.
        truth: :func:`pair_truth` of the same pairs.
        fmr: the false-match rate that fixes the threshold (on all pairs).
        reject: the fraction of pairs rejected for the headline numbers.
        seed: the random-rejection draws (:func:`pfclib.eval.random_reject_baseline`).

    Returns a flat dict: ``fnmr`` (at ``fmr``, nothing rejected); ``fnmr_quality`` / ``fnmr_random``
    (after rejecting ``reject`` of the pairs, lowest pair quality first / in random orders) and
    their ``gain_*`` (``fnmr - fnmr_*``: positive = rejection helped); ``auc_erc_quality`` /
    ``auc_erc_random``; ``rho_<factor>``: Spearman's rank correlation between an image's quality and
    the factor over the distinct held-out images (a quality that tracks a degradation is negative);
    ``tmr_clean`` / ``tmr_degraded``: the true-match rate at the threshold of genuine pairs whose two
    images have neither blur nor occluder / at least one of them; ``opis`` (:func:`pfclib.eval.opis`
    at ``fmr``: how much per-identity error rates vary at that threshold); ``quality_mean``; ``erc``
    (the two curves, lists).
    """
    from scipy.stats import spearmanr

    from pfclib.eval import embed, error_vs_reject, opis, pair_scores, random_reject_baseline
    from pfclib.quality import load_quality_model, score_images

    if len(truth) * 2 != pairs.images.shape[0]:
        raise ValueError(
            f"the truth has {len(truth)} pairs, the verification set {pairs.images.shape[0] // 2}"
        )
    model, branch, _, _ = load_quality_model(run)
    emb = embed(model, pairs.images)
    scores = pair_scores(emb[0::2], emb[1::2])
    quality = score_images(model, branch, pairs.images)
    issame = pairs.issame.numpy()
    fractions = np.round(np.arange(0.0, 0.5 + 1e-9, 0.05), 10)
    if not np.any(np.isclose(fractions, reject)):
        fractions = np.sort(np.append(fractions, reject))
    at = int(np.flatnonzero(np.isclose(fractions, reject))[0])
    by_quality = error_vs_reject(scores, issame, quality[0::2], quality[1::2], fmr, fractions)
    by_chance = random_reject_baseline(scores, issame, fmr, fractions, n_repeats=100, seed=seed)
    fnmr = float(by_quality["fnmr"][0])
    images = _per_image(truth)
    q_img = quality[images["row"].to_numpy()]
    row: dict[str, Any] = {
        "fnmr": fnmr,
        "fnmr_quality": float(by_quality["fnmr"][at]),
        "fnmr_random": float(by_chance["fnmr_sampled"][at]),
        "auc_erc_quality": float(by_quality["auc_erc"]),
        "auc_erc_random": float(by_chance["auc_erc"]),
        "quality_mean": float(quality.mean()),
        "threshold": float(by_quality["threshold"]),
    }
    identities = (truth["identity_a"].to_numpy(), truth["identity_b"].to_numpy())
    row["opis"] = float(opis(scores, issame, *identities, far_levels=(fmr,))["opis"])
    row["gain_quality"] = fnmr - row["fnmr_quality"]
    row["gain_random"] = fnmr - row["fnmr_random"]
    for factor in FACTORS:
        values = images[factor].to_numpy().astype(np.float64)
        rho = spearmanr(q_img, values).statistic if np.ptp(values) > 0 else float("nan")
        row[f"rho_{factor}"] = float(rho)
    degraded = np.zeros(len(truth), dtype=bool)
    for side in "ab":
        degraded |= truth[f"blur_sigma_{side}"].to_numpy() > 0
        degraded |= truth[f"occluded_{side}"].to_numpy().astype(bool)
    genuine_match = (scores >= by_quality["threshold"]) & issame
    for name, mask in (("tmr_clean", ~degraded & issame), ("tmr_degraded", degraded & issame)):
        row[name] = float(genuine_match[mask].sum() / mask.sum()) if mask.any() else float("nan")
    row["erc"] = {
        "reject_fraction": fractions.tolist(),
        "quality": np.asarray(by_quality["fnmr"], dtype=float).tolist(),
        "random": np.asarray(by_chance["fnmr_sampled"], dtype=float).tolist(),
    }
    return row
