"""Embeddings of a data set by a trained backbone: the protocol's flip-sum, as ``.npy`` or an HF dataset.

    python -m pfclib.embed --checkpoint RUN_OR_CKPT --data PATH [--kind folder] --out emb.npy
    python -m pfclib.embed --checkpoint RUN_OR_CKPT --data PATH --format hf --out emb_ds

``--checkpoint`` is a checkpoint file or a run folder (its newest checkpoint). Every image of the
data set is resized to the backbone's input size, embedded together with its horizontal mirror, the
two embeddings summed and L2-normalised (as :func:`pfclib.eval.embed` does for verification), and
the rows are written in the data set's reading order:

* ``<out>``: float32 ``(N, D)``, unit rows;
* ``<out stem>.labels.npy``: int64 ``(N,)``, the data set's label of each row;
* ``<out stem>.json``: where the embeddings came from (checkpoint, its training step, backbone, data,
  kind, flip, count, dimension) and, for an image folder, each row's file (relative to the folder)
  and the identity name of each label.

With ``--format hf`` the output is instead one Hugging Face dataset folder (``save_to_disk``; open
it with ``datasets.load_from_disk``), one row per image: ``id`` (the image's file relative to the
folder, or its index in the data set for other kinds), ``label`` (int64) and ``embedding``
(float32, length D); the JSON description above is its ``info.description``.

Everything is written through temporary names: a run that fails leaves nothing behind.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pfclib.checkpoint import checkpoint_step, resolve_checkpoint  # the latter re-exported here
from pfclib.io import atomic_path

__all__ = ["embed_dataset", "resolve_checkpoint", "write_embeddings", "write_embeddings_hf", "main"]


def embed_dataset(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    batch_size: int = 256,
    flip: bool = True,
    num_workers: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Embed every item ``(image, label)`` of ``dataset`` in order: ``(float32 (N, D), int64 (N,))``.

    Images are those the data set yields (normalised float32 ``(3, S, S)``); each batch goes
    through :func:`pfclib.eval.embed` (eval mode, no grad, flip-sum, L2 normalisation).
    """
    from pfclib.eval import embed

    n = len(dataset)
    if n == 0:
        raise ValueError("the data set is empty: nothing to embed")
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers
    )
    rows, labels = [], []
    for images, y in loader:
        rows.append(embed(model, images, batch_size=batch_size, flip=flip).astype(np.float32))
        labels.append(np.asarray(y, dtype=np.int64))
    return np.concatenate(rows), np.concatenate(labels)


def _companions(out: Path) -> tuple[Path, Path]:
    stem = out.with_suffix("")
    return stem.with_name(stem.name + ".labels.npy"), stem.with_name(stem.name + ".json")


def write_embeddings(
    out: str | os.PathLike, emb: np.ndarray, labels: np.ndarray, meta: dict[str, Any]
) -> None:
    """Write ``out`` (``.npy``), its labels and its JSON description, each through a temporary name."""
    out = Path(out)
    if out.suffix != ".npy":
        raise ValueError(f"--out must name a .npy file, got {str(out)!r}")
    labels_path, meta_path = _companions(out)
    with atomic_path(out) as t1, atomic_path(labels_path) as t2, atomic_path(meta_path) as t3:
        with open(t1, "wb") as f:
            np.save(f, emb)
        with open(t2, "wb") as f:
            np.save(f, labels)
        t3.write_text(json.dumps(meta, indent=2) + "\n")


def write_embeddings_hf(
    out: str | os.PathLike, emb: np.ndarray, labels: np.ndarray, ids: Sequence[str], meta: dict[str, Any]
) -> None:
    """Write an HF dataset folder ``out`` (columns ``id``, ``label``, ``embedding``; ``meta`` as JSON in
    its description), built in a temporary folder beside it and renamed into place (an existing
    ``out`` is replaced only once the new one is complete)."""
    import shutil
    import tempfile

    import datasets

    out = Path(out)
    if out.exists() and not (out / "dataset_info.json").is_file():
        raise FileExistsError(f"--out {str(out)!r} exists and is not an HF dataset folder: choose a new path")
    if not (len(ids) == emb.shape[0] == labels.shape[0]):
        raise ValueError(
            f"ids, embeddings and labels differ in length: {len(ids)}, {emb.shape[0]}, {labels.shape[0]}"
        )
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "label": datasets.Value("int64"),
            "embedding": datasets.Sequence(datasets.Value("float32"), length=int(emb.shape[1])),
        }
    )
    table = datasets.Dataset.from_dict(
        {"id": list(ids), "label": labels.astype(np.int64), "embedding": emb.astype(np.float32)},
        features=features,
        info=datasets.DatasetInfo(description=json.dumps(meta), features=features),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    old = None
    try:
        table.save_to_disk(str(tmp / "ds"))
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / "ds")
        os.replace(tmp / "ds", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    from pfclib.checkpoint import load_backbone
    from pfclib.data import DATASET_KINDS, build_dataset

    parser = argparse.ArgumentParser(prog="python -m pfclib.embed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a checkpoint file, or a run folder (its newest)")
    parser.add_argument("--data", required=True, help="the data set to embed (path, relative to here)")
    parser.add_argument(
        "--kind", default="folder", choices=DATASET_KINDS, help="its format (default: folder)"
    )
    parser.add_argument(
        "--out",
        required=True,
        help="the .npy file to write (labels and JSON beside it), or the folder for --format hf",
    )
    parser.add_argument(
        "--format",
        default="npy",
        choices=("npy", "hf"),
        help="npy: float32 (N, D) array + labels + JSON (default); hf: an HF dataset folder (id, label, embedding)",
    )
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default 256)")
    parser.add_argument("--no-flip", action="store_true", help="do not add the mirrored image's embedding")
    parser.add_argument("--device", default="cpu", help="torch device of the backbone (default cpu)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be a positive number of images, got {args.batch_size}")
    if args.format == "npy" and Path(args.out).suffix != ".npy":
        parser.error(f"--out must name a .npy file with --format npy, got {args.out!r}")
    if args.format == "hf" and Path(args.out).suffix == ".npy":
        parser.error(f"--format hf writes a dataset folder: --out {args.out!r} names a .npy file")
    if (
        args.format == "hf"
        and Path(args.out).exists()
        and not (Path(args.out) / "dataset_info.json").is_file()
    ):
        parser.error(f"--out {args.out!r} exists and is not an HF dataset folder: choose a new path")

    ckpt = resolve_checkpoint(args.checkpoint)
    model, config = load_backbone(ckpt, map_location=args.device)
    dataset = build_dataset(args.kind, args.data, image_size=int(config["image_size"]))
    emb, labels = embed_dataset(model, dataset, batch_size=args.batch_size, flip=not args.no_flip)
    meta: dict[str, Any] = {
        "checkpoint": str(ckpt),
        "step": checkpoint_step(ckpt),
        "backbone": config["backbone"],
        "image_size": int(config["image_size"]),
        "data": str(args.data),
        "kind": args.kind,
        "flip": not args.no_flip,
        "count": int(emb.shape[0]),
        "dim": int(emb.shape[1]),
    }
    files = getattr(dataset, "files", None)
    root = getattr(dataset, "root", None)
    if files is not None and root is not None:
        meta["files"] = [str(Path(f).relative_to(root)) for f in files]
        meta["classes"] = list(getattr(dataset, "classes", []))
    if args.format == "hf":
        ids = meta.get("files") or [str(i) for i in range(emb.shape[0])]
        write_embeddings_hf(args.out, emb, labels, ids, meta)
        print(
            f"wrote {emb.shape[0]} embeddings of dimension {emb.shape[1]} to the HF dataset folder {args.out}"
        )
        return 0
    write_embeddings(args.out, emb, labels, meta)
    print(f"wrote {emb.shape[0]} embeddings of dimension {emb.shape[1]} to {args.out} (+ labels, json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
