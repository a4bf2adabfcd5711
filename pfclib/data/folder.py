"""Image folders: ``root/<identity_name>/*.jpg|png``, one folder per identity.

Class ids are the identity folder names in sorted order (the order ``datasets``' ``imagefolder``
uses too); files inside a folder are read in sorted order. Hidden files and folders (``.name``) and
files with other extensions are ignored; an identity folder without images is an error, because
silently dropping it would shift every later class id.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pfclib.data.base import ImageDataset, as_path, decode_image

__all__ = ["IMAGE_EXTENSIONS", "ImageFolderDataset"]

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class ImageFolderDataset(ImageDataset):
    """Images under ``root/<identity>/``; item ``i`` is ``(float32 (3, S, S) normalised, label)``.

    Attributes:
        classes: identity folder names, sorted; ``classes[label]`` names a label.
        files: image paths, grouped by class; ``labels[i]`` is the class of ``files[i]``.
        num_classes: ``len(classes)``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        image_size: int | None = None,
        extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
    ) -> None:
        super().__init__(image_size)
        self.root = as_path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: no such folder; expected root/<identity>/<image files>")
        exts = tuple(e.lower() for e in extensions)
        self.classes = sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
        )
        if not self.classes:
            raise FileNotFoundError(
                f"{self.root}: no identity sub-folders; expected root/<identity>/<image files>"
            )
        files: list[Path] = []
        labels: list[int] = []
        empty: list[str] = []
        for label, name in enumerate(self.classes):
            found = sorted(
                p
                for p in (self.root / name).iterdir()
                if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in exts
            )
            if not found:
                empty.append(name)
            files.extend(found)
            labels.extend([label] * len(found))
        if empty:
            shown = ", ".join(empty[:10]) + (" ..." if len(empty) > 10 else "")
            raise FileNotFoundError(
                f"{self.root}: {len(empty)} identity folder(s) hold no image with extension in {list(exts)}: {shown}"
            )
        self.files = files
        self.labels = np.asarray(labels, dtype=np.int64)
        self.num_classes = len(self.classes)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}

    def __len__(self) -> int:
        return len(self.files)

    def read_uint8(self, index: int) -> tuple[np.ndarray, int]:
        path = self.files[index]
        return decode_image(path.read_bytes(), where=str(path)), int(self.labels[index])
