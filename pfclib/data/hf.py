"""Hugging Face ``datasets`` as a pfclib image source, always offline.

Two ways in: a dataset written with ``save_to_disk`` (kind ``"hf"``; the synthetic generator
writes these), and ``datasets``' ``imagefolder`` builder over ``root/<identity>/*.jpg``
(kind ``"imagefolder_hf"``). The image column may be an ``Image()`` feature (decoded by Pillow)
or an ``Array3D`` of ``uint8`` (read straight from Arrow: ``datasets`` would otherwise hand back
``int64`` arrays, eight times the memory).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pfclib.data.base import DataFormatError, ImageDataset, as_path, to_chw_uint8

__all__ = [
    "HFImageDataset",
    "arrow_uint8_rows",
    "import_datasets",
    "load_hf",
    "load_imagefolder_hf",
    "offline",
]

_OFFLINE_ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def import_datasets() -> Any:
    """Import ``datasets`` with the offline switches set (when this is the first import)."""
    if "datasets" not in sys.modules:
        for key, value in _OFFLINE_ENV.items():
            os.environ.setdefault(key, value)
    import datasets

    return datasets


@contextlib.contextmanager
def offline() -> Iterator[Any]:
    """Run the body with ``datasets`` in offline mode (restored afterwards); yields the module.

    ``datasets`` reads ``HF_HUB_OFFLINE`` once at import, so the flag is also set on its config.
    """
    datasets = import_datasets()
    saved_env = {key: os.environ.get(key) for key in _OFFLINE_ENV}
    saved_cfg = {
        name: getattr(datasets.config, name) for name in _OFFLINE_ENV if hasattr(datasets.config, name)
    }
    os.environ.update(_OFFLINE_ENV)
    for name in saved_cfg:
        setattr(datasets.config, name, True)
    try:
        yield datasets
    finally:
        for name, value in saved_cfg.items():
            setattr(datasets.config, name, value)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def arrow_uint8_rows(column: Any, shape: tuple[int, ...]) -> np.ndarray:
    """The rows of an Arrow ``Array3D``/nested-list ``uint8`` column as one ``uint8`` array ``(N, *shape)``."""
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    storage = getattr(column, "storage", column)
    for _ in range(len(shape)):
        storage = storage.flatten()
    flat = storage.to_numpy(zero_copy_only=False)
    if flat.dtype != np.uint8:
        raise DataFormatError(f"expected a uint8 image column, found {flat.dtype}")
    return flat.reshape(-1, *shape)


class HFImageDataset(ImageDataset):
    """A pfclib dataset over an in-memory/memory-mapped ``datasets.Dataset``.

    Args:
        dataset: a ``datasets.Dataset`` with an image column and an integer label column.
        image_column / label_column: column names (the defaults ``"image"``, ``"label"``; ``"img"``
            and ``"labels"`` are tried too).
        num_classes: number of classes; default: from a ``ClassLabel`` feature, else ``max(label) + 1``.
        image_size: resize every image to ``image_size x image_size`` (``None``: keep).
    """

    def __init__(
        self,
        dataset: Any,
        image_column: str | None = None,
        label_column: str | None = None,
        num_classes: int | None = None,
        image_size: int | None = None,
    ) -> None:
        super().__init__(image_size)
        columns = list(dataset.column_names)
        self.image_column = _pick_column(columns, image_column, ("image", "img"), "image")
        self.label_column = _pick_column(columns, label_column, ("label", "labels"), "label")
        self.dataset = dataset
        feature = dataset.features[self.image_column]
        kind = type(feature).__name__
        if kind == "Image":
            self._array_shape: tuple[int, ...] | None = None
        elif kind in ("Array2D", "Array3D"):
            if np.dtype(feature.dtype) != np.uint8:
                raise DataFormatError(
                    f"image column {self.image_column!r} has dtype {feature.dtype}, expected uint8"
                )
            self._array_shape = tuple(feature.shape)
        else:
            raise DataFormatError(
                f"image column {self.image_column!r} has feature {kind}; expected Image() or Array3D(uint8)"
            )
        self._arrow = dataset.with_format("arrow")
        self._plain = dataset.with_format(None)
        labels = self.labels
        label_feature = dataset.features[self.label_column]
        if num_classes is None:
            if type(label_feature).__name__ == "ClassLabel":
                num_classes = int(label_feature.num_classes)
            else:
                num_classes = int(labels.max()) + 1 if len(labels) else 0
        self.num_classes = int(num_classes)
        if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
            bad = int(labels.min()) if labels.min() < 0 else int(labels.max())
            raise DataFormatError(
                f"label {bad} in column {self.label_column!r} is outside [0, {self.num_classes})"
            )

    @property
    def labels(self) -> np.ndarray:
        """All labels, ``int64 (N,)``."""
        if not hasattr(self, "_labels"):
            col = self._arrow[self.label_column] if len(self.dataset) else []
            self._labels = np.asarray(col, dtype=np.int64).reshape(-1)
        return self._labels

    def __len__(self) -> int:
        return len(self.dataset)

    def read_uint8(self, index: int) -> tuple[np.ndarray, int]:
        label = int(self.labels[index])
        if self._array_shape is not None:
            row = self._arrow[index : index + 1][self.image_column]
            image = arrow_uint8_rows(row, self._array_shape)[0]
            return to_chw_uint8(image, where=f"row {index}"), label
        try:
            image = self._plain[index][self.image_column]
        except (OSError, SyntaxError, ValueError) as exc:  # PIL.UnidentifiedImageError is an OSError
            raise DataFormatError(
                f"row {index} of column {self.image_column!r}: cannot decode the image "
                f"({type(exc).__name__}: {exc}); expected a file Pillow can read (JPEG, PNG, ...)"
            ) from exc
        return to_chw_uint8(image, where=f"row {index}"), label


def _pick_column(columns: list[str], wanted: str | None, defaults: tuple[str, ...], what: str) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise DataFormatError(f"no {what} column {wanted!r}; the dataset has columns {columns}")
        return wanted
    for name in defaults:
        if name in columns:
            return name
    raise DataFormatError(f"no {what} column (tried {list(defaults)}); the dataset has columns {columns}")


def load_hf(
    path: str | os.PathLike,
    image_size: int | None = None,
    split: str = "train",
    image_column: str | None = None,
    label_column: str | None = None,
    num_classes: int | None = None,
) -> HFImageDataset:
    """Open a dataset saved with ``save_to_disk`` (a ``Dataset``, or a ``DatasetDict`` -> ``split``)."""
    path = as_path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path}: no such folder; expected a dataset written by datasets' save_to_disk"
        )
    with offline() as datasets:
        try:
            ds = datasets.load_from_disk(str(path))
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{path}: not a saved datasets folder ({exc})") from exc
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise KeyError(f"{path}: no split {split!r}; available splits {list(ds)}")
        ds = ds[split]
    return HFImageDataset(ds, image_column, label_column, num_classes, image_size)


def default_cache_dir() -> Path | None:
    """Where ``imagefolder`` caches go: ``$PFCLIB_HF_CACHE`` when set, else ``None`` (the Hugging
    Face default, ``$HF_DATASETS_CACHE`` or ``~/.cache/huggingface/datasets``)."""
    env = os.environ.get("PFCLIB_HF_CACHE")
    return Path(env) if env else None


def load_imagefolder_hf(
    root: str | os.PathLike,
    image_size: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> HFImageDataset:
    """``root/<identity>/*.jpg`` through ``datasets.load_dataset("imagefolder", data_dir=root)``, offline.

    Class ids follow ``datasets``' ``ClassLabel`` (identity folder names sorted), the same ids as
    :class:`pfclib.data.folder.ImageFolderDataset`. ``cache_dir`` defaults to :func:`default_cache_dir`.
    """
    from pfclib.data.folder import IMAGE_EXTENSIONS

    root = as_path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder; expected root/<identity>/<image files>")
    # datasets' imagefolder drops an identity folder without images, which would shift every later
    # class id away from the `folder` reader's (that refuses such a folder): refuse it here too
    empty = [
        p.name
        for p in sorted(root.iterdir())
        if p.is_dir()
        and not p.name.startswith(".")
        and not any(f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS for f in p.iterdir())
    ]
    if empty:
        shown = ", ".join(empty[:10]) + (" ..." if len(empty) > 10 else "")
        raise FileNotFoundError(
            f"{root}: {len(empty)} identity folder(s) hold no image with extension in {list(IMAGE_EXTENSIONS)}: "
            f"{shown}; remove them, or their classes would be dropped and the other ids shifted"
        )
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    with offline() as datasets:
        try:
            ds = datasets.load_dataset(
                "imagefolder",
                data_dir=str(root),
                split="train",
                cache_dir=None if cache is None else str(cache),
            )
        except FileNotFoundError as exc:  # datasets' EmptyDatasetError: no image file under root
            raise FileNotFoundError(
                f"{root}: datasets' imagefolder found no image files ({exc}); "
                "expected root/<identity>/<image files>"
            ) from exc
    if "label" not in ds.column_names:
        raise DataFormatError(
            f"{root}: datasets' imagefolder found no class folders (columns {ds.column_names}); "
            "expected one sub-folder per identity"
        )
    return HFImageDataset(ds, "image", "label", None, image_size)
