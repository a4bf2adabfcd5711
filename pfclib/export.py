"""Export a trained backbone to ONNX, checked against torch with onnxruntime.

    python -m pfclib.export --checkpoint RUN_OR_CKPT --onnx backbone.onnx [--opset 18] [--no-check]

The graph takes ``images``: float32 ``(batch, 3, S, S)`` normalised as in training
(``(pixel / 255 - 0.5) / 0.5``, RGB) with a dynamic batch, and returns ``embeddings``: float32
``(batch, D)``, not normalised (L2-normalise them, and add the mirrored image's embedding, as the
verification protocol does). The export uses torch's ONNX exporter (``torch.onnx.export`` with the
dynamo tracer, which needs the ``onnx`` and ``onnxscript`` packages).

After writing, the file is checked (unless ``--no-check``): onnxruntime runs it on a batch of a
different size from the one traced, and its embeddings must match the torch model's within
``rtol * max|torch|`` elementwise (``rtol = 1e-4``: float32 kernels differ in summation order) and
their cosine must be at least ``1 - 1e-6`` row by row. The file appears only once that check passes.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pfclib.io import atomic_path

__all__ = ["export_onnx", "check_onnx", "main", "RTOL", "MIN_COSINE"]

RTOL = 1e-4
"""Elementwise tolerance of the check, relative to the largest torch output."""
MIN_COSINE = 1.0 - 1e-6
"""Smallest cosine between an onnxruntime embedding and the torch one."""


def check_onnx(path: str | os.PathLike, model: nn.Module, images: torch.Tensor) -> dict[str, float]:
    """Run the ONNX file with onnxruntime on ``images``; compare with ``model``. Returns the errors.

    Raises:
        AssertionError: when the outputs differ beyond :data:`RTOL` or :data:`MIN_COSINE`.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: images.cpu().numpy()})[0].astype(np.float64)
    model.eval()
    with torch.no_grad():
        want = model(images).double().cpu().numpy()
    if got.shape != want.shape:
        raise AssertionError(
            f"ONNX output shape {got.shape} != torch {want.shape} for input {tuple(images.shape)}"
        )
    scale = float(np.abs(want).max())
    err = float(np.abs(got - want).max())
    cos = float(
        np.min(
            (got * want).sum(1)
            / np.maximum(np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1), 1e-300)
        )
    )
    if not err <= RTOL * scale or not cos >= MIN_COSINE:
        raise AssertionError(
            f"ONNX and torch outputs differ: max |diff| {err:.3g} (allowed {RTOL:g} x {scale:.3g}), "
            f"smallest cosine {cos:.9f} (needs >= {MIN_COSINE})"
        )
    return {"max_abs_diff": err, "max_abs_output": scale, "min_cosine": cos}


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    image_size: int,
    opset: int = 18,
    check: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Export a float32, CPU, eval-mode copy of ``model`` to ``path`` with a dynamic batch; check it.

    Traced with a batch of 2, checked with a batch of 3 (so the batch axis is known to be dynamic).
    Returns ``{"path", "opset", "image_size", "embedding_size"}`` plus the check's errors.

    Raises:
        ValueError: for a bad ``image_size`` or ``opset``, or a path not ending in ``.onnx``.
        RuntimeError: when torch cannot export the model (the exporter's message is kept).
    """
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"the output must be a .onnx file, got {str(path)!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if not isinstance(opset, int) or opset < 17:
        raise ValueError(f"opset must be an int >= 17 (the dynamo exporter's range), got {opset!r}")
    model = copy.deepcopy(model).float().cpu().eval()  # the caller's model keeps its dtype, device, mode
    gen = torch.Generator().manual_seed(seed)
    traced = torch.randn(2, 3, image_size, image_size, generator=gen)
    probe = torch.randn(3, 3, image_size, image_size, generator=gen)
    batch = torch.export.Dim("batch", min=1)
    with atomic_path(path) as tmp:
        tmp_onnx = tmp.with_suffix(".onnx")  # the exporter wants the suffix
        try:
            program = torch.onnx.export(
                model,
                (traced,),
                input_names=["images"],
                output_names=["embeddings"],
                dynamic_shapes=({0: batch},),
                opset_version=opset,
                dynamo=True,
                verbose=False,
            )
            program.save(str(tmp_onnx))
        except Exception as exc:  # the exporter raises many types; keep its message
            tmp_onnx.unlink(missing_ok=True)
            raise RuntimeError(f"torch could not export {type(model).__name__} to ONNX: {exc}") from exc
        try:
            result = check_onnx(tmp_onnx, model, probe) if check else {}
            os.replace(tmp_onnx, tmp)
        finally:
            tmp_onnx.unlink(missing_ok=True)
    with torch.no_grad():
        dim = int(model(probe[:1]).shape[1])
    return {"path": str(path), "opset": opset, "image_size": image_size, "embedding_size": dim, **result}


def main(argv: Sequence[str] | None = None) -> int:
    from pfclib.checkpoint import load_backbone, resolve_checkpoint

    parser = argparse.ArgumentParser(prog="python -m pfclib.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a checkpoint file, or a run folder (its newest)")
    parser.add_argument("--onnx", required=True, help="the .onnx file to write")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset version (default 18, at least 17)")
    parser.add_argument(
        "--no-check", action="store_true", help="skip the onnxruntime comparison with the torch model"
    )
    args = parser.parse_args(argv)
    if Path(args.onnx).suffix != ".onnx":
        parser.error(f"--onnx must name a .onnx file, got {args.onnx!r}")
    ckpt = resolve_checkpoint(args.checkpoint)
    model, config = load_backbone(ckpt)
    info = export_onnx(model, args.onnx, int(config["image_size"]), opset=args.opset, check=not args.no_check)
    checked = (
        f"; onnxruntime matches torch (max |diff| {info['max_abs_diff']:.2g}, cosine >= {info['min_cosine']:.9f})"
        if "min_cosine" in info
        else " (not checked)"
    )
    print(
        f"wrote {args.onnx}: {config['backbone']} from {ckpt}, input (batch, 3, {info['image_size']}, "
        f"{info['image_size']}) -> embeddings (batch, {info['embedding_size']}), opset {args.opset}{checked}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
