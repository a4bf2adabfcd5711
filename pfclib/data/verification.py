"""Verification pair sets: insightface ``.bin`` files (LFW, CFP-FP, AgeDB-30) and synthetic pair folders.

A ``.bin`` file is a pickle of ``(list of encoded images, list of bool)``; images ``2i`` and
``2i + 1`` form pair ``i``. Unpickling can run arbitrary code, so :func:`load_bin` uses an
unpickler whose ``find_class`` refuses every global, with one narrow exception: ``.bin`` files
written by Python 3 with pickle protocol 2 store each ``bytes`` object as
``_codecs.encode(<latin-1 str>, "latin1")``. That single callable is allowed, wrapped so that it
only accepts a ``str`` and the ``latin1`` codec and returns ``bytes`` (it cannot call anything
else). Files written by Python 2 store the bytes as pickle strings and need ``encoding="bytes"``,
which is used. Persistent ids are refused too.
"""

from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pfclib.data.base import DataFormatError, as_path, decode_image, resize_uint8, to_chw_uint8
from pfclib.io import atomic_path

__all__ = [
    "UnsafePickleError",
    "VerificationSet",
    "load_bin",
    "load_verification",
    "write_bin",
]


class UnsafePickleError(DataFormatError, pickle.UnpicklingError):
    """A pickle asked for a global (code) that the restricted unpickler does not allow."""


@dataclass
class VerificationSet:
    """Pairs for face verification.

    Attributes:
        images: ``uint8`` tensor ``(2P, 3, H, W)``; rows ``2i`` and ``2i + 1`` are pair ``i``.
        issame: ``bool`` tensor ``(P,)``, True for a genuine pair (same identity).
        name: a short name for reports (file stem or folder name).
    """

    images: torch.Tensor
    issame: torch.Tensor
    name: str

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(
                f"{self.name}: images must be uint8 (2P, 3, H, W), got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.issame.dtype != torch.bool or self.issame.ndim != 1:
            raise ValueError(f"{self.name}: issame must be a bool (P,) tensor, got {self.issame.dtype}")
        if self.images.shape[0] != 2 * self.issame.shape[0]:
            raise ValueError(
                f"{self.name}: {self.images.shape[0]} images for {self.issame.shape[0]} pairs; expected 2 per pair"
            )

    def check_usable(self, nfolds: int) -> None:
        """Raise ``ValueError`` unless the set can be scored by ``nfolds``-fold verification: at least
        one genuine and one impostor pair (otherwise accuracy thresholds, ROC and TAR@FAR are
        undefined) and at least ``nfolds`` pairs."""
        genuine = int(self.issame.sum())
        if genuine == 0 or genuine == self.num_pairs:
            kind = "genuine" if genuine else "impostor"
            raise ValueError(
                f"verification set {self.name!r}: all {self.num_pairs} pairs are {kind}; verification needs "
                "both genuine and impostor pairs (accuracy, ROC and TAR@FAR are undefined otherwise)"
            )
        if self.num_pairs < nfolds:
            raise ValueError(
                f"verification set {self.name!r}: {self.num_pairs} pairs cannot be split into {nfolds} folds"
            )

    @property
    def num_pairs(self) -> int:
        return int(self.issame.shape[0])

    def __len__(self) -> int:
        return self.num_pairs

    def __repr__(self) -> str:
        genuine = int(self.issame.sum())
        return (
            f"VerificationSet(name={self.name!r}, pairs={self.num_pairs}, genuine={genuine}, "
            f"image_shape={tuple(self.images.shape[1:])})"
        )


def _codecs_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    # Stands in for _codecs.encode in protocol-2 pickles of bytes: str + latin1 only.
    if not isinstance(obj, str) or encoding.lower().replace("-", "").replace("_", "") not in (
        "latin1",
        "iso88591",
    ):
        raise UnsafePickleError(
            f"restricted unpickler: _codecs.encode is allowed only as encode(<str>, 'latin1') for bytes, "
            f"got encode({type(obj).__name__}, {encoding!r})"
        )
    return obj.encode("latin-1", errors)


class _RestrictedUnpickler(pickle.Unpickler):
    """Builds only builtin containers/scalars; every global except the bytes shim above is refused."""

    def __init__(self, file: Any, source: str) -> None:
        super().__init__(file, encoding="bytes")
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("_codecs", "encode"):
            return _codecs_encode
        raise UnsafePickleError(
            f"{self.source}: the pickle asks for global {module}.{name}, which a verification .bin file never "
            "needs (expected only lists of bytes and bools); refusing to load it, as it may run code"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self.source}: the pickle uses persistent id {pid!r}; refusing to load it")


def _check_structure(obj: Any, source: str) -> tuple[list[bytes], list[bool]]:
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise DataFormatError(
            f"{source}: the pickle holds {type(obj).__name__}"
            f"{' of length ' + str(len(obj)) if isinstance(obj, (tuple, list)) else ''}; "
            "expected a pair (list of encoded images, list of bool)"
        )
    bins, issame = obj
    if not isinstance(bins, (list, tuple)) or not isinstance(issame, (list, tuple)):
        raise DataFormatError(
            f"{source}: expected (list of encoded images, list of bool), got "
            f"({type(bins).__name__}, {type(issame).__name__})"
        )
    if len(bins) % 2:
        raise DataFormatError(f"{source}: {len(bins)} images is odd; expected two images per pair")
    if len(issame) != len(bins) // 2:
        raise DataFormatError(
            f"{source}: {len(issame)} issame flags for {len(bins)} images; expected {len(bins) // 2} (images / 2)"
        )
    for i, b in enumerate(bins):
        if not isinstance(b, (bytes, bytearray)):
            raise DataFormatError(f"{source}: image {i} is {type(b).__name__}; expected encoded image bytes")
    flags = []
    for i, s in enumerate(issame):
        if isinstance(s, (bool, np.bool_)) or (isinstance(s, int) and s in (0, 1)):
            flags.append(bool(s))
        else:
            raise DataFormatError(f"{source}: issame[{i}] is {s!r}; expected a bool")
    return [bytes(b) for b in bins], flags


def load_bin(path: str | os.PathLike, image_size: int | None = None) -> VerificationSet:
    """Read an insightface verification ``.bin`` with the restricted unpickler (see module docstring).

    Images are decoded with Pillow to RGB; they must share one size unless ``image_size`` is given,
    in which case each is resized to ``image_size x image_size``.
    """
    path = as_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such verification .bin file")
    raw = path.read_bytes()
    try:
        obj = _RestrictedUnpickler(io.BytesIO(raw), str(path)).load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError) as exc:
        raise DataFormatError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc})") from exc
    bins, flags = _check_structure(obj, str(path))
    images = []
    first_shape = None
    for i, data in enumerate(bins):
        img = decode_image(data, where=f"{path}: image {i}")
        if image_size is not None:
            img = resize_uint8(img, image_size).numpy()
        elif first_shape is None:
            first_shape = img.shape
        elif img.shape != first_shape:
            raise DataFormatError(
                f"{path}: image {i} has shape {img.shape}, image 0 has {first_shape}; pass image_size to resize"
            )
        images.append(img)
    stacked = torch.from_numpy(np.stack(images)) if images else torch.zeros(0, 3, 1, 1, dtype=torch.uint8)
    return VerificationSet(stacked, torch.tensor(flags, dtype=torch.bool), path.stem)


def write_bin(
    path: str | os.PathLike,
    images: Any,
    issame: Any,
    image_format: str = "JPEG",
    quality: int = 95,
    protocol: int = pickle.HIGHEST_PROTOCOL,
) -> Path:
    """Write a verification ``.bin``: ``images`` ``(2P, 3, H, W)`` uint8 (or a list of encoded bytes).

    ``image_format`` ``"JPEG"``/``"PNG"`` (PNG is lossless: round trips exactly). ``protocol=2``
    reproduces the ``_codecs.encode`` form of old files. Written atomically.
    """
    from pfclib.data.recordio import encode_image

    if isinstance(images, (list, tuple)) and all(isinstance(b, (bytes, bytearray)) for b in images):
        bins = [bytes(b) for b in images]
    else:
        arr = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        bins = [
            encode_image(to_chw_uint8(a, where=f"{path}: image {i}"), quality=quality, format=image_format)
            for i, a in enumerate(arr)
        ]
    flags = [bool(s) for s in (issame.tolist() if hasattr(issame, "tolist") else issame)]
    _check_structure((bins, flags), str(path))
    path = as_path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            pickle.dump((bins, flags), f, protocol=protocol)
    return path


def load_verification(path: str | os.PathLike, image_size: int | None = None) -> VerificationSet:
    """Load pairs from a ``.bin`` file or from a synthetic pairs folder.

    A folder may be the synthetic dataset root (holding ``pairs/``) or the ``pairs`` dataset
    itself (columns ``image_a``, ``image_b``, ``issame``). Pair ``i`` becomes rows ``2i``, ``2i + 1``.
    """
    path = as_path(path)
    if path.is_file():
        return load_bin(path, image_size)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path}: no such file or folder; expected a .bin file or a synthetic pairs folder"
        )
    return _load_pairs_folder(path, image_size)


def _load_pairs_folder(path: Path, image_size: int | None) -> VerificationSet:
    from pfclib.data.hf import arrow_uint8_rows, offline

    folder = path / "pairs" if (path / "pairs").is_dir() else path
    name = path.name if folder is path else f"{path.name}"
    with offline() as datasets:
        try:
            ds = datasets.load_from_disk(str(folder))
        except FileNotFoundError as exc:
            raise FileNotFoundError(
                f"{path}: neither a .bin file nor a saved pairs dataset (columns image_a, image_b, issame): {exc}"
            ) from exc
    missing = {"image_a", "image_b", "issame"} - set(ds.column_names)
    if missing:
        raise DataFormatError(
            f"{folder}: pairs dataset lacks columns {sorted(missing)}; has {ds.column_names}"
        )
    table = ds.with_format("arrow")[:]
    shape = tuple(ds.features["image_a"].shape)
    a = arrow_uint8_rows(table["image_a"], shape)
    b = arrow_uint8_rows(table["image_b"], shape)
    images = np.empty((2 * len(a), *shape), dtype=np.uint8)
    images[0::2], images[1::2] = a, b
    tensor = torch.from_numpy(images)
    if image_size is not None:
        tensor = resize_uint8(tensor, image_size)
    issame = torch.from_numpy(np.asarray(table["issame"], dtype=bool))
    return VerificationSet(tensor, issame, name)
