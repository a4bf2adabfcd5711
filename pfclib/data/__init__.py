"""Data for pfclib: synthetic identities with known truth, and the formats users bring.

Every training source is a :class:`~pfclib.data.base.ImageDataset`: item ``i`` is
``(float32 (3, H, W) normalised (x/255 - 0.5)/0.5, int label)``, with ``ds.num_classes`` and
``len(ds)``; no augmentation (use :func:`random_hflip` on the batch).

=====================  ==========================================  ==============================
kind                   path                                        module
=====================  ==========================================  ==============================
``"synthetic"``        folder written by ``synthetic.generate``    :mod:`pfclib.data.synthetic`
``"recordio"``         folder with ``train.rec/.idx/property``     :mod:`pfclib.data.recordio`
``"folder"``           ``root/<identity>/*.jpg|png``               :mod:`pfclib.data.folder`
``"imagefolder_hf"``   same, through ``datasets``' imagefolder     :mod:`pfclib.data.hf`
``"hf"``               a ``save_to_disk`` folder (image, label)    :mod:`pfclib.data.hf`
=====================  ==========================================  ==============================

Verification pairs: :func:`load_verification` (``.bin`` via a restricted unpickler, or a
synthetic pairs folder) in :mod:`pfclib.data.verification`.
"""

from __future__ import annotations

import os
from typing import Any

from pfclib.data.augment import random_hflip
from pfclib.data.base import DataFormatError, ImageDataset
from pfclib.data.folder import ImageFolderDataset
from pfclib.data.hf import HFImageDataset, load_hf, load_imagefolder_hf
from pfclib.data.recordio import RecordIODataset, RecordIOError
from pfclib.data.verification import UnsafePickleError, VerificationSet, load_verification

__all__ = [
    "DATASET_KINDS",
    "DataFormatError",
    "HFImageDataset",
    "ImageDataset",
    "ImageFolderDataset",
    "RecordIODataset",
    "RecordIOError",
    "SyntheticConfig",
    "SyntheticDataset",
    "UnsafePickleError",
    "VerificationSet",
    "build_dataset",
    "load_verification",
    "random_hflip",
    "synthetic",
]

_LAZY = {"synthetic", "SyntheticConfig", "SyntheticDataset"}


def __getattr__(name: str) -> Any:
    # Lazy, so that `python -m pfclib.data.synthetic` runs the module once (no runpy warning).
    if name in _LAZY:
        import importlib

        module = importlib.import_module("pfclib.data.synthetic")
        return module if name == "synthetic" else getattr(module, name)
    raise AttributeError(f"module 'pfclib.data' has no attribute {name!r}")


DATASET_KINDS: tuple[str, ...] = ("synthetic", "recordio", "folder", "imagefolder_hf", "hf")


def build_dataset(
    kind: str, path: str | os.PathLike, image_size: int | None = None, **kwargs: Any
) -> ImageDataset:
    """Open a training set of ``kind`` (one of :data:`DATASET_KINDS`) at ``path``.

    ``image_size`` resizes every image to a square of that size (``None``: as stored). Extra
    keyword arguments go to the reader (e.g. ``split`` for ``"synthetic"``/``"hf"``,
    ``cache_dir`` for ``"imagefolder_hf"``).
    """
    if kind == "synthetic":
        from pfclib.data.synthetic import SyntheticDataset

        return SyntheticDataset(path, image_size=image_size, **kwargs)
    if kind == "recordio":
        return RecordIODataset(path, image_size=image_size, **kwargs)
    if kind == "folder":
        return ImageFolderDataset(path, image_size=image_size, **kwargs)
    if kind == "imagefolder_hf":
        return load_imagefolder_hf(path, image_size=image_size, **kwargs)
    if kind == "hf":
        return load_hf(path, image_size=image_size, **kwargs)
    raise ValueError(f"unknown dataset kind {kind!r}; expected one of {list(DATASET_KINDS)}")
