"""What every pfclib image dataset shares: the item contract, decoding, resizing, normalisation.

An item is ``(image, label)``: ``image`` a float32 tensor ``(3, H, W)`` normalised as
``(x / 255 - 0.5) / 0.5`` (so values lie in ``[-1, 1]``), ``label`` a Python ``int`` in
``[0, num_classes)``. Readers only implement :meth:`ImageDataset.read_uint8`, which returns the raw
RGB ``uint8`` image ``(3, H, W)`` and its label; resizing and normalisation live here, once.
No augmentation happens in a dataset (see :func:`pfclib.data.augment.random_hflip`).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

__all__ = [
    "DataFormatError",
    "as_path",
    "ImageDataset",
    "decode_image",
    "normalise",
    "resize_uint8",
    "to_chw_uint8",
]


class DataFormatError(ValueError):
    """A data file is malformed: the message names the file, the position and what was expected."""


def decode_image(data: bytes | bytearray | memoryview, where: str = "image") -> np.ndarray:
    """Decode encoded image bytes (JPEG, PNG, ...) with Pillow to an RGB ``uint8`` array ``(3, H, W)``.

    ``where`` names the source in the error raised for undecodable bytes.
    """
    try:
        with Image.open(io.BytesIO(bytes(data))) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        head = bytes(data[:8]).hex()
        raise DataFormatError(
            f"{where}: cannot decode {len(data)} bytes as an image (first bytes 0x{head}): {exc}"
        ) from exc
    return np.ascontiguousarray(rgb.transpose(2, 0, 1))


def to_chw_uint8(image: object, where: str = "image") -> np.ndarray:
    """Convert a PIL image, or a ``uint8`` array/tensor ``(3, H, W)`` or ``(H, W, 3)``, to ``(3, H, W)`` uint8.

    A 2-D (grey) array is repeated to three channels. Channel-first is assumed when the first
    axis has size 1 or 3 and the last does not.
    """
    if isinstance(image, Image.Image):
        return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1))
    arr = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.integer) or arr.size and (arr.min() < 0 or arr.max() > 255):
            raise DataFormatError(f"{where}: expected uint8 pixel values in [0, 255], got dtype {arr.dtype}")
        arr = arr.astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[None], 3, axis=0)
    if arr.ndim != 3:
        raise DataFormatError(f"{where}: expected an image of shape (3, H, W) or (H, W, 3), got {arr.shape}")
    if arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        chw = arr
    elif arr.shape[-1] in (1, 3):
        chw = arr.transpose(2, 0, 1)
    else:
        raise DataFormatError(f"{where}: expected 1 or 3 channels first or last, got shape {arr.shape}")
    if chw.shape[0] == 1:
        chw = np.repeat(chw, 3, axis=0)
    return np.ascontiguousarray(chw)


def _resize_float(x: torch.Tensor, size: int) -> torch.Tensor:
    # Bilinear with antialiasing: downscaling by large factors does not alias.
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def resize_uint8(images: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """Resize ``uint8`` images ``(3, H, W)`` or ``(N, 3, H, W)`` to ``size x size`` (bilinear, antialiased).

    Returns a new ``uint8`` tensor; the input is returned as a copy when it already has that size.
    """
    t = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.array(images, copy=True))
    if t.dtype != torch.uint8:
        raise TypeError(f"resize_uint8 expects uint8 images, got {t.dtype}")
    single = t.ndim == 3
    batch = t[None] if single else t
    if batch.ndim != 4:
        raise ValueError(f"expected (3, H, W) or (N, 3, H, W), got shape {tuple(t.shape)}")
    if batch.shape[-2:] == (size, size):
        out = batch.clone()
    else:
        out = _resize_float(batch.float(), size).round_().clamp_(0, 255).to(torch.uint8)
    return out[0] if single else out


def normalise(image: np.ndarray | torch.Tensor, image_size: int | None = None) -> torch.Tensor:
    """``uint8`` ``(3, H, W)`` -> float32 ``(3, S, S)`` with values ``(x / 255 - 0.5) / 0.5``.

    When ``image_size`` is given and differs from ``H``/``W`` the float image is resized
    (bilinear, antialiased) before normalising. The input is never modified.
    """
    if isinstance(image, torch.Tensor):
        dtype, shape = image.dtype, tuple(image.shape)
        ok = dtype == torch.uint8
    else:
        image = np.asarray(image)
        dtype, shape = image.dtype, image.shape
        ok = dtype == np.uint8
    if not ok or len(shape) != 3 or shape[0] != 3:
        raise ValueError(f"expected a uint8 image of shape (3, H, W), got {dtype} {shape}")
    # A new float tensor either way: the caller's array (possibly read-only Arrow memory) is untouched.
    x = (
        image.to(torch.float32)
        if isinstance(image, torch.Tensor)
        else torch.from_numpy(image.astype(np.float32))
    )
    if image_size is not None and tuple(x.shape[-2:]) != (image_size, image_size):
        x = _resize_float(x[None], image_size)[0]
    return x.div_(255.0).sub_(0.5).div_(0.5)


class ImageDataset(torch.utils.data.Dataset):
    """Base of pfclib's image datasets: item ``i`` is ``(float32 (3, S, S) normalised image, int label)``.

    Subclasses set ``num_classes`` and implement ``__len__`` and :meth:`read_uint8`.
    ``image_size`` (``None``: keep each file's size) resizes every image to a square.
    """

    num_classes: int
    image_size: int | None

    def __init__(self, image_size: int | None = None) -> None:
        if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
            raise ValueError(f"image_size must be a positive int or None, got {image_size!r}")
        self.image_size = image_size

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def read_uint8(self, index: int) -> tuple[np.ndarray, int]:  # pragma: no cover - abstract
        """Return the raw RGB image ``uint8 (3, H, W)`` (not resized) and the label of item ``index``."""
        raise NotImplementedError

    def _check_index(self, index: int) -> int:
        n = len(self)
        index = int(index)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} images")
        return index

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.read_uint8(self._check_index(index))
        return normalise(image, self.image_size), int(label)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(len={len(self)}, num_classes={self.num_classes}, "
            f"image_size={self.image_size})"
        )


def as_path(path: str | os.PathLike) -> Path:
    """``Path(path)`` with ``~`` expanded."""
    return Path(os.fspath(path)).expanduser()
