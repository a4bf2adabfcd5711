"""Verification pairs from your own identities: held out from training, balanced, in identity-disjoint folds.

    python -m pfclib.data.pairs --data my_faces --kind folder --out my_pairs.bin --train-folder my_faces_train

The protocol is LFW's: pairs are scored by 10-fold cross-validation (a threshold chosen on nine folds,
accuracy measured on the tenth), and no identity appears in two folds. Here:

1. identities with at least two images are shuffled (``--seed``) and ``--holdout`` of all identities
   (at least two per fold) are held out; they are never to be trained on;
2. the held-out identities are dealt round-robin into ``--nfolds`` folds;
3. each fold gets ``--pairs / nfolds`` pairs, half genuine (two different images of one identity)
   and half impostor (one image each of two different identities), all distinct, shuffled within
   the fold; the folds are written one after the other, which is the contiguous split
   :mod:`pfclib.eval` uses, so every identity stays inside its fold.

Written: ``<out>.bin`` (the insightface format that training's ``eval.verification`` and
``python -m pfclib.eval --data`` read; PNG, lossless, resized to ``--image-size``) and
``<out stem>.json`` (the held-out identities by label and name, their fold, every pair's two item
indices in the data set, and the counts). With ``--train-folder`` (image folders only) a folder of
links to the identities that were *not* held out is made, ready to train on.

Any data set kind of :func:`pfclib.data.build_dataset` works; labels are read without decoding
images where the reader keeps them (folders, HF datasets), else from each item.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["PairPlan", "plan_pairs", "write_pairs", "main"]


@dataclass
class PairPlan:
    """Which identities are held out, their folds, and the pairs (item indices) of every fold."""

    heldout: list[int]  # labels, in fold order
    folds: list[list[int]]  # labels of each fold
    pairs: list[tuple[int, int, bool]]  # (item a, item b, genuine), fold after fold
    nfolds: int
    seed: int
    extra: dict[str, Any] = field(default_factory=dict)


def dataset_labels(dataset: Any) -> np.ndarray:
    """All labels of a data set, ``int64 (N,)``: the reader's ``labels`` if it keeps them, else read
    item by item (``read_uint8``)."""
    labels = getattr(dataset, "labels", None)
    if labels is not None and len(labels) == len(dataset):
        return np.asarray(labels, dtype=np.int64)
    return np.asarray([dataset.read_uint8(i)[1] for i in range(len(dataset))], dtype=np.int64)


def plan_pairs(
    labels: np.ndarray, num_pairs: int, nfolds: int = 10, holdout: float = 0.1, seed: int = 0
) -> PairPlan:
    """The held-out identities and the pairs of an ``nfolds``-fold verification set (see module doc).

    Raises ``ValueError`` when ``num_pairs`` does not give every fold at least one genuine and one
    impostor pair, when fewer than ``2 * nfolds`` identities have two images, or when a fold's
    identities cannot supply its pairs without repeating one.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if nfolds < 2:
        raise ValueError(f"nfolds must be >= 2, got {nfolds}")
    per_fold = num_pairs // nfolds // 2 * 2
    if per_fold < 2:
        raise ValueError(
            f"{num_pairs} pairs cannot give each of {nfolds} folds a genuine and an impostor pair: "
            f"ask for at least {2 * nfolds}"
        )
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout must be a fraction in (0, 1), got {holdout}")
    ids, counts = np.unique(labels, return_counts=True)
    eligible = ids[counts >= 2]
    want = max(2 * nfolds, math.ceil(holdout * ids.size))
    if eligible.size < 2 * nfolds:
        raise ValueError(
            f"{nfolds}-fold verification needs at least {2 * nfolds} identities with 2 or more images "
            f"(two per fold); the data set has {eligible.size} of {ids.size} identities with 2 or more"
        )
    if want >= ids.size:
        raise ValueError(
            f"holding out {want} of {ids.size} identities would leave none to train on: lower --holdout or nfolds"
        )
    rng = np.random.default_rng(seed)
    heldout = rng.permutation(eligible)[: min(want, eligible.size)]
    folds = [sorted(int(x) for x in heldout[f::nfolds]) for f in range(nfolds)]
    items = {int(c): np.flatnonzero(labels == c) for c in heldout}
    pairs: list[tuple[int, int, bool]] = []
    for f, fold in enumerate(folds):
        pairs.extend(_fold_pairs(fold, items, per_fold // 2, rng, f))
    return PairPlan(
        heldout=[c for fold in folds for c in fold],
        folds=folds,
        pairs=pairs,
        nfolds=nfolds,
        seed=seed,
        extra={"requested_pairs": num_pairs, "pairs_per_fold": per_fold},
    )


def _fold_pairs(
    fold: list[int], items: dict[int, np.ndarray], half: int, rng, f: int
) -> list[tuple[int, int, bool]]:
    possible_genuine = sum(len(items[c]) * (len(items[c]) - 1) // 2 for c in fold)
    if possible_genuine < half:
        raise ValueError(
            f"fold {f}: its {len(fold)} identities have {possible_genuine} distinct genuine pairs, {half} are "
            "needed: ask for fewer pairs or hold out more identities"
        )
    seen: set[tuple[int, int]] = set()
    out: list[tuple[int, int, bool]] = []
    for genuine in (True, False):
        made = 0
        while made < half:
            if genuine:
                c = fold[rng.integers(len(fold))]
                a, b = rng.choice(items[c], size=2, replace=False)
            else:
                c1, c2 = rng.choice(len(fold), size=2, replace=False)
                a, b = rng.choice(items[fold[c1]]), rng.choice(items[fold[c2]])
            key = (int(min(a, b)), int(max(a, b)))
            if key in seen:
                continue
            seen.add(key)
            out.append((int(a), int(b), genuine))
            made += 1
    order = rng.permutation(len(out))
    return [out[i] for i in order]


def write_pairs(
    dataset: Any, plan: PairPlan, out: str | os.PathLike, image_size: int, meta: dict[str, Any]
) -> Path:
    """Write the plan's pairs as a verification ``.bin`` (PNG, ``image_size`` squares) and its JSON
    description beside it; both atomically."""
    from pfclib.data.base import resize_uint8
    from pfclib.data.verification import write_bin
    from pfclib.io import write_json

    out = Path(out)
    images = torch.empty((2 * len(plan.pairs), 3, image_size, image_size), dtype=torch.uint8)
    cache: dict[int, torch.Tensor] = {}
    for p, (a, b, _) in enumerate(plan.pairs):
        for j, item in enumerate((a, b)):
            if item not in cache:
                cache[item] = resize_uint8(dataset.read_uint8(item)[0][None], image_size)[0]
            images[2 * p + j] = cache[item]
    issame = [g for _, _, g in plan.pairs]
    description = {
        **meta,
        "nfolds": plan.nfolds,
        "seed": plan.seed,
        "pairs": len(plan.pairs),
        "genuine": int(sum(issame)),
        "heldout_labels": plan.heldout,
        "folds": plan.folds,
        "pair_items": [[a, b, g] for a, b, g in plan.pairs],
        **plan.extra,
    }
    names = getattr(dataset, "classes", None)
    if names:
        description["heldout_names"] = [names[c] for c in plan.heldout]
    json_path = out.with_suffix(".json")
    write_json(json_path, description)
    try:
        write_bin(out, images, issame, image_format="PNG")
    except BaseException:
        json_path.unlink(missing_ok=True)
        raise
    return out


def link_training_folder(dataset: Any, heldout: Sequence[int], target: str | os.PathLike) -> int:
    """A folder of symbolic links to the identity folders of ``dataset`` (an image folder) that are
    not held out; returns their number. ``target`` must not exist yet."""
    root, classes = getattr(dataset, "root", None), getattr(dataset, "classes", None)
    if root is None or not classes:
        raise ValueError("--train-folder needs --kind folder (a folder with one sub-folder per identity)")
    target = Path(target)
    if target.exists():
        raise FileExistsError(f"--train-folder {str(target)!r} exists already: choose a new path")
    skip = set(int(c) for c in heldout)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.mkdir(parents=True)
    kept = 0
    for label, name in enumerate(classes):
        if label not in skip:
            (tmp / name).symlink_to(Path(root, name).resolve(), target_is_directory=True)
            kept += 1
    os.replace(tmp, target)
    return kept


def main(argv: Sequence[str] | None = None) -> int:
    from pfclib.data import DATASET_KINDS, build_dataset

    parser = argparse.ArgumentParser(prog="python -m pfclib.data.pairs", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", required=True, help="the data set whose identities are split (path, relative to here)"
    )
    parser.add_argument(
        "--kind", default="folder", choices=DATASET_KINDS, help="its format (default: folder)"
    )
    parser.add_argument(
        "--out", required=True, help="the .bin file to write (its .json description beside it)"
    )
    parser.add_argument(
        "--pairs", type=int, default=6000, help="number of pairs, half genuine (default 6000, as LFW)"
    )
    parser.add_argument("--nfolds", type=int, default=10, help="identity-disjoint folds (default 10)")
    parser.add_argument(
        "--holdout",
        type=float,
        default=0.1,
        help="fraction of all identities held out for verification (default 0.1; at least 2 per fold)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the identity split and of the pairs")
    parser.add_argument(
        "--image-size", type=int, default=112, help="side of the square images written, pixels"
    )
    parser.add_argument(
        "--train-folder", help="for --kind folder: make this folder of links to the training identities"
    )
    args = parser.parse_args(argv)
    if not args.out.endswith(".bin"):
        parser.error(f"--out must name a .bin file, got {args.out!r}")
    if Path(args.out).is_dir():
        parser.error(f"--out {args.out!r} is a folder; expected the path of a .bin file to write")
    if args.image_size < 1:
        parser.error(f"--image-size must be a positive number of pixels, got {args.image_size}")
    if args.train_folder and Path(args.train_folder).exists():
        parser.error(f"--train-folder {args.train_folder!r} exists already: choose a new path")

    dataset = build_dataset(args.kind, args.data)
    labels = dataset_labels(dataset)
    plan = plan_pairs(labels, args.pairs, args.nfolds, args.holdout, args.seed)
    meta = {
        "data": str(args.data),
        "kind": args.kind,
        "image_size": args.image_size,
        "identities": int(np.unique(labels).size),
    }
    write_pairs(dataset, plan, args.out, args.image_size, meta)
    print(
        f"wrote {len(plan.pairs)} pairs ({len(plan.pairs) // 2} genuine) of {len(plan.heldout)} held-out identities "
        f"in {plan.nfolds} identity-disjoint folds to {args.out} (+ {Path(args.out).with_suffix('.json').name})"
    )
    if args.train_folder:
        kept = link_training_folder(dataset, plan.heldout, args.train_folder)
        print(f"linked the {kept} training identities (held-out ones left out) into {args.train_folder}")
    else:
        print("train on the other identities only: the held-out ones are listed in the .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
