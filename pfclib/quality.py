"""CR-FIQA face image quality: the certainty ratio under Partial FC, the quality branch, scoring.

CR-FIQA (Boutros, Fang, Klemt, Fu, Damer, *"CR-FIQA: Face Image Quality Assessment by Learning
Sample Relative Classifiability"*, CVPR 2023) learns an image's quality as its *relative
classifiability* while the face recognition model trains:

* **certainty ratio** of a training sample ``x`` of class ``y``, from the normalised embedding and
  the normalised class centers of the margin-softmax head, without gradient::

      CCS   = cos(x, w_y)                      (class center similarity)
      NNCCS = max_{j != y} cos(x, w_j)         (nearest negative class center similarity)
      CR    = CCS / (NNCCS + 1 + eps),  eps = 1e-9

  (the cosines are those of the loss, before the margin; ``1 + eps`` keeps the denominator
  positive, since a cosine is at least -1);
* **quality branch**: one linear layer from the backbone's embedding (un-normalised, the backbone's
  output) to one number, trained jointly: ``loss = margin loss + lambda * SmoothL1(q(x), CR)``
  with CR detached; ``lambda = 10`` and SmoothL1 ``beta = 0.5`` are the authors' settings (their
  training script ``train_cr_fiqa.py``: ``alpha = 10.0``, ``SmoothL1Loss(beta=0.5)``; the
  branch is ``nn.Linear(num_features, 1)`` on the backbone's final embedding);
* at test time the branch's output is the image's quality score (higher = better).

**What Partial FC changes.** The classes are sharded over ``W`` ranks and, with sample rate
``r < 1``, each rank uses only ``k = int(r * n_local)`` of its centers per step (every positive of
the global batch plus uniform negatives). :func:`certainty_ratio` therefore

* takes CCS from the rank owning ``y`` (an all-reduce MAX of the rows' own-center cosines, ``-inf``
  elsewhere: exact) and NNCCS as the all-reduce MAX over ranks of each rank's largest cosine to a
  center *sampled this step* other than ``y`` (the head's process group);
* so at ``r = 1`` NNCCS is the paper's (the maximum over all ``C - 1`` other classes, whatever
  ``W``), while at ``r < 1`` it is the maximum over a random subset: the other positives of the
  global batch (always sampled) and about ``r`` of the remaining classes. A maximum over a subset
  is never larger than over all, so **NNCCS is an under-estimate and CR an over-estimate**
  (CCS / (NNCCS + 1 + eps) falls as NNCCS rises). The gap grows as ``r`` falls: the true nearest
  negative is in the sample with probability about ``r`` (always when it is another positive of
  the batch), and when it is missed the value is that of the best of about ``r·(C - 1)`` random
  others, an upper order statistic that moves further down as that number shrinks. The target is
  also noisier from step to step (another subset each step). How much this changes the learned
  quality score at a given ``r`` is an empirical question this module does not answer.
  Equal to the full-softmax value at ``r = 1``; two ranks equal one for the same sampled classes.

Cost when the branch is on: per step one extra all-gather of the ``(N, D)`` embeddings (no
gradient), one ``(N, k)`` cosine product (no gradient, in chunks of ``head.chunk_size`` or 16,384
classes), two all-reduces of ``N`` numbers, and the linear branch (``D + 1`` parameters). Nothing
when off: the trainer builds no branch and calls none of this.

Scoring::

    python -m pfclib.quality score RUN_OR_CKPT face1.jpg face2.png --out scores.csv
    python -m pfclib.quality score RUN_OR_CKPT --data my_faces --kind folder --out scores.json
    python -m pfclib.quality score RUN_OR_CKPT --data pairs_folder_or.bin --kind pairs --out q.csv

The ``.csv`` holds ``index,name,label,quality`` per image; the ``.json`` the same rows plus where they
came from; both are written through a temporary name.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pfclib import distributed as pdist

__all__ = [
    "EPS",
    "DEFAULT_WEIGHT",
    "DEFAULT_BETA",
    "CertaintyRatio",
    "QualityBranch",
    "certainty_ratio",
    "certainty_ratio_gathered",
    "quality_loss",
    "load_quality_model",
    "score_images",
    "score_dataset",
    "write_scores",
    "main",
]

EPS = 1e-9  # the paper's epsilon in CR = CCS / (NNCCS + 1 + eps)
DEFAULT_WEIGHT = 10.0  # lambda of the authors' training script (alpha = 10.0)
DEFAULT_BETA = 0.5  # SmoothL1Loss(beta=0.5) of the authors' training script
_CHUNK = 16384  # classes per cosine chunk when the head has no chunk_size


class CertaintyRatio(NamedTuple):
    """Per-row certainty ratio and its two parts (1-D tensors of the compute dtype)."""

    cr: Tensor
    ccs: Tensor
    nnccs: Tensor


class QualityBranch(nn.Module):
    """CR-FIQA's quality regression: ``nn.Linear(embedding_size, 1)`` on the backbone's embedding.

    Initialised from its own generator (``seed``), so building it draws nothing from torch's global
    generator (a run with the branch takes the same dropout draws as one without). ``forward``
    maps ``(B, D)`` to ``(B,)`` in float32 (the input is cast: the backbone may run in bf16)."""

    def __init__(self, embedding_size: int, seed: int = 0) -> None:
        super().__init__()
        self.embedding_size = int(embedding_size)
        self.linear = nn.utils.skip_init(nn.Linear, self.embedding_size, 1)  # no global draws
        gen = torch.Generator().manual_seed(int(seed))
        bound = 1.0 / math.sqrt(self.embedding_size)  # nn.Linear's default range, seeded
        with torch.no_grad():
            self.linear.weight.uniform_(-bound, bound, generator=gen)
            self.linear.bias.uniform_(-bound, bound, generator=gen)

    def forward(self, embeddings: Tensor) -> Tensor:
        return self.linear(embeddings.to(self.linear.weight.dtype)).squeeze(1)


# ------------------------------------------------------------------------------ the certainty ratio
@torch.no_grad()
def certainty_ratio_gathered(
    x: Tensor, centers: Tensor, target: Tensor, group=None, eps: float = EPS, chunk_size: int | None = None
) -> CertaintyRatio:
    """CR of every row of a gathered batch against this rank's ``k`` (sampled) centers.

    Args:
        x: ``(N, D)`` normalised embeddings of the whole (gathered) batch, the same on every rank.
        centers: ``(k, D)`` normalised centers of this rank used this step, or ``(k, K, D)`` with
            K sub-centers per class (sub-center ArcFace: a class's cosine is the max over its K).
        target: ``(N,)`` int64, each row's column in ``centers``, -1 where another rank owns its class.
        group: the head's process group (None: one process).
        eps: the epsilon of ``CR = CCS / (NNCCS + 1 + eps)``.
        chunk_size: centers per cosine block (bounds the ``(N, chunk)`` buffer).

    Cosines are clamped to [-1, 1] like the loss's. A row whose class no rank owns, or with no
    other sampled class anywhere, raises ``ValueError``.
    """
    n, dtype = x.shape[0], x.dtype
    ccs = torch.full((n,), -math.inf, dtype=dtype, device=x.device)
    nnccs = torch.full((n,), -math.inf, dtype=dtype, device=x.device)
    rows = torch.arange(n, device=x.device)
    mine = target >= 0
    step = max(1, int(chunk_size or _CHUNK))
    for begin in range(0, centers.shape[0], step):
        w = centers[begin : begin + step]
        if w.dim() == 3:  # sub-centers: the class's cosine is its best sub-center's
            cos = (x @ w.reshape(-1, w.shape[-1]).T).view(n, w.shape[0], w.shape[1]).amax(dim=2)
            cos.clamp_(-1.0, 1.0)
        else:
            cos = (x @ w.T).clamp_(-1.0, 1.0)
        col = target - begin
        here = mine & (col >= 0) & (col < w.shape[0])
        if bool(here.any()):
            r, c = rows[here], col[here]
            ccs[r] = cos[r, c]
            cos[r, c] = -math.inf  # the own class is no negative
        if cos.shape[1]:
            nnccs = torch.maximum(nnccs, cos.max(dim=1).values)
    if group is not None:
        torch.distributed.all_reduce(ccs, op=torch.distributed.ReduceOp.MAX, group=group)
        torch.distributed.all_reduce(nnccs, op=torch.distributed.ReduceOp.MAX, group=group)
    if not bool(torch.isfinite(ccs).all()):
        raise ValueError("a row's class is owned by no rank: is target the head's mapping of these labels?")
    if not bool(torch.isfinite(nnccs).all()):
        raise ValueError(
            "no other class was sampled for some row: the certainty ratio needs at least two classes"
        )
    return CertaintyRatio(ccs / (nnccs + (1.0 + eps)), ccs, nnccs)


@torch.no_grad()
def certainty_ratio(head: Any, embeddings: Tensor, eps: float = EPS) -> CertaintyRatio:
    """The certainty ratio of this rank's rows of the head's last forward (collective).

    Call it right after ``loss = head(embeddings, labels)`` and before the optimizer step, with the
    same local ``embeddings``: it reads the classes that forward sampled (``head.last_sample``) and
    their current centers (``head.centers``: pending lazy updates applied, nothing changed), gathers
    the embeddings of every rank (no gradient) and returns ``(cr, ccs, nnccs)`` for the local rows,
    in the head's compute dtype (float32, or float64 for float64 centers). Under sampling
    (``r < 1``) NNCCS is the maximum over the sampled centers only (see the module docstring). The
    cosines are those of the loss: with sub-centers (``sub_centers=K``) a class's cosine is the max
    over its K, and with feature-dimension sampling (``dim_sample_rate < 1``) both sides are taken
    over the dimensions that forward kept.
    """
    if getattr(head, "last_sample", None) is None:
        raise RuntimeError(
            "certainty_ratio needs the head's last forward: call head(embeddings, labels) first"
        )
    index, target = head.last_sample
    group = head.group
    sizes, _ = pdist.gather_batch_meta(int(embeddings.shape[0]), True, group, head.weight.device)
    if sum(sizes) != target.shape[0]:
        raise ValueError(
            f"the head's last forward saw {target.shape[0]} rows over all ranks, these embeddings make "
            f"{sum(sizes)}: pass the embeddings of that forward"
        )
    compute = torch.promote_types(head.weight.dtype, torch.float32)
    emb = pdist.all_gather_no_grad(embeddings.detach(), sizes, group).to(compute)
    rows = torch.arange(head.n_local, device=head.weight.device) if index is None else index
    w = head.class_centers(rows).to(compute)  # (k, K, D): K sub-centers per class (K = 1: plain)
    dims = getattr(head, "last_dims", None)
    if dims is not None:  # Unicom: the cosines of that forward use only its kept dimensions
        emb, w = emb.index_select(1, dims), w.index_select(2, dims)
    x = F.normalize(emb, dim=1)
    w = F.normalize(w, dim=2)
    w = w.squeeze(1) if w.shape[1] == 1 else w
    full = certainty_ratio_gathered(x, w, target, group, eps, getattr(head, "chunk_size", None))
    rank = head.rank if group is not None else 0
    lo = sum(sizes[:rank])
    return CertaintyRatio(*(t[lo : lo + sizes[rank]] for t in full))


def quality_loss(predicted: Tensor, cr: Tensor, beta: float = DEFAULT_BETA) -> Tensor:
    """SmoothL1 (mean over rows) between the branch's prediction and the certainty ratio, which is
    detached (the target carries no gradient)."""
    return F.smooth_l1_loss(predicted, cr.detach().to(predicted.dtype), beta=beta)


# -------------------------------------------------------------------------------------- scoring
def load_quality_model(
    checkpoint: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, QualityBranch, dict[str, Any], Path]:
    """``(backbone, branch, config dict, checkpoint file)`` of a checkpoint or a run folder (its
    newest checkpoint), both in eval mode. Raises ``ValueError`` when the run was trained without
    the quality branch (``quality.enabled: false``)."""
    from pfclib.checkpoint import load_backbone, load_checkpoint, resolve_checkpoint

    path = resolve_checkpoint(checkpoint)
    state = load_checkpoint(path, map_location="cpu", mmap=True)
    if state.get("quality") is None:
        raise ValueError(
            f"checkpoint {str(path)!r} was trained without the quality branch (quality.enabled is false "
            "or missing in its config): it has no quality scores; train with --set quality.enabled=true"
        )
    model, config = load_backbone(path, map_location=map_location)
    branch = QualityBranch(int(config["embedding_size"]))
    branch.load_state_dict(state["quality"], strict=True)
    branch.to(map_location).eval()
    return model, branch, config, path


@torch.no_grad()
def score_images(
    model: nn.Module, branch: nn.Module, images: Tensor | np.ndarray, batch_size: int = 256
) -> np.ndarray:
    """Quality of each image: ``branch(model(image))``, float64 ``(M,)``, higher = better.

    ``images``: ``(M, 3, H, W)``; ``uint8`` ones are normalised as in training (``(x/255 - 0.5)/0.5``),
    floating-point ones are taken as normalised. Eval mode, no gradient, ``batch_size`` at a time."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (M, 3, H, W), got {tuple(images.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    param = next(model.parameters())
    modes = model.training, branch.training
    model.eval()
    branch.eval()
    out = []
    try:
        for i in range(0, images.shape[0], batch_size):
            batch = images[i : i + batch_size]
            if batch.dtype == torch.uint8:
                batch = (batch.to(torch.float32) / 255.0 - 0.5) / 0.5
            out.append(branch(model(batch.to(param.device, param.dtype))).double().cpu())
    finally:
        model.train(modes[0])
        branch.train(modes[1])
    return torch.cat(out).numpy() if out else np.zeros(0)


def score_dataset(
    model: nn.Module, branch: nn.Module, dataset: torch.utils.data.Dataset, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Quality of every item ``(image, label)`` of a data set, in order: ``(float64 (N,), int64 (N,))``."""
    if len(dataset) == 0:
        raise ValueError("the data set is empty: nothing to score")
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    scores, labels = [], []
    for images, y in loader:
        scores.append(score_images(model, branch, images, batch_size))
        labels.append(np.asarray(y, dtype=np.int64))
    return np.concatenate(scores), np.concatenate(labels)


def write_scores(
    out: str | Path,
    scores: np.ndarray,
    names: Sequence[str],
    labels: Sequence[int | None] | None,
    meta: dict[str, Any],
) -> Path:
    """Write the scores as ``.csv`` (``index,name,label,quality``) or ``.json`` (``meta`` plus the same
    rows under ``"rows"``), by ``out``'s suffix, through a temporary name."""
    from pfclib.io import atomic_path

    out = Path(out)
    if out.suffix not in (".csv", ".json"):
        raise ValueError(f"--out must name a .csv or .json file, got {str(out)!r}")
    labels = [None] * len(scores) if labels is None else list(labels)
    if not (len(scores) == len(names) == len(labels)):
        raise ValueError(
            f"scores, names and labels differ in length: {len(scores)}, {len(names)}, {len(labels)}"
        )
    rows = [
        {"index": i, "name": str(n), "label": None if lab is None else int(lab), "quality": float(q)}
        for i, (n, lab, q) in enumerate(zip(names, labels, scores))
    ]
    if out.suffix == ".csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["index", "name", "label", "quality"], lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {
                    **row,
                    "label": "" if row["label"] is None else row["label"],
                    "quality": repr(row["quality"]),
                }
            )
        text = buf.getvalue()
    else:
        text = json.dumps({**meta, "rows": rows}, indent=2) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.write_text(text)
    return out


def _read_image_files(paths: Sequence[str], image_size: int) -> Tensor:
    from pfclib.data.base import decode_image, normalise

    out = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"image {str(path)!r} does not exist")
        out.append(normalise(decode_image(path.read_bytes(), where=str(path)), image_size))
    return torch.stack(out)


def main(argv: Sequence[str] | None = None) -> int:
    from pfclib.checkpoint import checkpoint_step
    from pfclib.data import DATASET_KINDS

    parser = argparse.ArgumentParser(prog="python -m pfclib.quality", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sc = sub.add_parser(
        "score",
        help="quality score per image by a run trained with quality.enabled",
        description="Quality score (CR-FIQA branch output, higher = better) of each image.",
    )
    sc.add_argument("checkpoint", help="a checkpoint file, or a run folder (its newest)")
    sc.add_argument("images", nargs="*", help="image files (JPEG, PNG, ...), relative to here")
    sc.add_argument("--data", default=None, help="score a data set instead of image files (path)")
    sc.add_argument(
        "--kind",
        default="folder",
        choices=(*DATASET_KINDS, "pairs"),
        help="format of --data (default folder); pairs: a verification set (.bin or synthetic pairs "
        "folder), rows 2i and 2i+1 being pair i",
    )
    sc.add_argument("--out", required=True, help="the .csv or .json file to write")
    sc.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default 256)")
    sc.add_argument("--device", default="cpu", help="torch device (default cpu)")
    args = parser.parse_args(argv)
    if bool(args.images) == (args.data is not None):
        sc.error("give either image files or --data, not both and not neither")
    if Path(args.out).suffix not in (".csv", ".json"):
        sc.error(f"--out must name a .csv or .json file, got {args.out!r}")
    if args.batch_size < 1:
        sc.error(f"--batch-size must be a positive number of images, got {args.batch_size}")
    try:
        model, branch, config, ckpt = load_quality_model(args.checkpoint, map_location=args.device)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    size = int(config["image_size"])
    labels: list | None = None
    if args.images:
        scores = score_images(model, branch, _read_image_files(args.images, size), args.batch_size)
        names = list(args.images)
    elif args.kind == "pairs":
        from pfclib.data import load_verification

        vset = load_verification(args.data, image_size=size)
        scores = score_images(model, branch, vset.images, args.batch_size)
        names = [f"pair{i // 2}.{'ab'[i % 2]}" for i in range(len(scores))]
    else:
        from pfclib.data import build_dataset

        dataset = build_dataset(args.kind, args.data, image_size=size)
        scores, lab = score_dataset(model, branch, dataset, args.batch_size)
        labels = lab.tolist()
        files, root = getattr(dataset, "files", None), getattr(dataset, "root", None)
        names = (
            [str(Path(f).relative_to(root)) for f in files]
            if files is not None and root is not None
            else [str(i) for i in range(len(scores))]
        )
    meta = {
        "checkpoint": str(ckpt),
        "step": checkpoint_step(ckpt),
        "backbone": config["backbone"],
        "image_size": size,
        "source": args.data if args.data is not None else "files",
        "kind": args.kind if args.data is not None else "files",
        "count": int(len(scores)),
    }
    write_scores(args.out, scores, names, labels, meta)
    print(f"wrote {len(scores)} quality scores to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
