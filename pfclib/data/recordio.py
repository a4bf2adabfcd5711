"""insightface RecordIO (``train.rec``, ``train.idx``, ``property``), read and written without mxnet.

Format (mxnet / dmlc-core RecordIO, as in the insightface data sets). ``train.rec`` is a sequence of records::

    uint32 magic 0xced7230a | uint32 lrec (bits 31..29: continuation flag, 28..0: length) | payload | 0-pad to 4

A payload that contains the magic word at a 4-byte-aligned position is stored as several parts
(flags 1 = first, 2 = middle, 3 = last; 0 = a record in one part) with that word cut out; the
reader puts it back between parts. Both are implemented here, as in dmlc-core.

A payload starts with the 24-byte header ``<IfQQ`` (flag, label, id, id2). When ``flag > 0``,
``flag`` float32 labels follow the header (and the scalar label is unused). The rest is the
encoded image (JPEG). ``train.idx`` has one ``key<TAB>byte_offset`` line per record and gives
random access. ``property`` holds ``num_classes,height,width``.

Two layouts exist and both are read:

* **header layout** (insightface ``train.rec``): record 0 has ``flag > 0``, no image, and labels
  ``[first, end]``; image records are keys ``1 .. first-1``; keys ``first .. end-1`` are per-identity
  records (``[start_key, end_key)`` of each class) that the reader does not need.
* **flat layout**: every key in ``train.idx`` is an image record.

An image's class is its scalar label, or the first of its vector labels.
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pfclib.data.base import DataFormatError, ImageDataset, as_path, decode_image, to_chw_uint8
from pfclib.io import atomic_path

__all__ = [
    "MAGIC",
    "IRHeader",
    "RecordIODataset",
    "RecordIOError",
    "RecordIOReader",
    "RecordIOWriter",
    "encode_image",
    "pack_payload",
    "unpack_payload",
    "write_recordio",
]

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LREC = struct.Struct("<II")
_IR_HEADER = struct.Struct("<IfQQ")
_MAX_LENGTH = (1 << 29) - 1
_FLOAT32_EXACT = 1 << 24


class RecordIOError(DataFormatError):
    """A malformed ``.rec``/``.idx``/``property`` file; the message names the file, key/offset and expectation."""


@dataclass(frozen=True)
class IRHeader:
    """The 24-byte record header. ``labels`` holds the ``flag`` float32 labels when ``flag > 0``."""

    flag: int
    label: float
    id: int
    id2: int
    labels: tuple[float, ...] = ()

    @property
    def class_label(self) -> float:
        """The class of an image record: the scalar label, or the first vector label."""
        return self.labels[0] if self.flag > 0 else self.label


def _align4(n: int) -> int:
    return (n + 3) & ~3


def _exact_float32(value: float, what: str) -> float:
    if not float(np.float32(value)) == float(value):
        raise ValueError(
            f"{what} {value!r} is not exactly representable as float32 (RecordIO stores float32)"
        )
    return float(value)


def pack_payload(label: float | Iterable[float], image: bytes = b"", id: int = 0, id2: int = 0) -> bytes:
    """Build a record payload: header, optional vector labels, encoded image bytes.

    A scalar ``label`` is stored in the header (``flag = 0``); a sequence is stored after it
    (``flag = len(label)``, header label 0), as mxnet's ``recordio.pack`` does.
    """
    if isinstance(label, (int, float, np.integer, np.floating)):
        header = _IR_HEADER.pack(0, _exact_float32(float(label), "label"), id, id2)
        return header + bytes(image)
    values = [_exact_float32(float(v), "label") for v in label]
    if not values:
        raise ValueError("a vector label needs at least one value")
    return _IR_HEADER.pack(len(values), 0.0, id, id2) + np.asarray(values, "<f4").tobytes() + bytes(image)


def unpack_payload(payload: bytes, where: str = "record") -> tuple[IRHeader, bytes]:
    """Split a payload into its :class:`IRHeader` and the encoded image bytes (possibly empty)."""
    if len(payload) < _IR_HEADER.size:
        raise RecordIOError(
            f"{where}: payload has {len(payload)} bytes, expected at least the {_IR_HEADER.size}-byte header <IfQQ"
        )
    flag, label, id_, id2 = _IR_HEADER.unpack_from(payload, 0)
    body = _IR_HEADER.size
    labels: tuple[float, ...] = ()
    if flag > 0:
        need = body + 4 * flag
        if need > len(payload):
            raise RecordIOError(
                f"{where}: header flag {flag} announces {flag} float32 labels ({4 * flag} bytes) "
                f"but only {len(payload) - body} bytes follow the header"
            )
        labels = tuple(float(v) for v in np.frombuffer(payload, "<f4", count=flag, offset=body))
        body = need
    return IRHeader(flag, float(label), id_, id2, labels), payload[body:]


def encode_image(image: Any, quality: int = 95, format: str = "JPEG") -> bytes:
    """Encode an RGB ``uint8`` image (``(3, H, W)``, ``(H, W, 3)`` or PIL) as JPEG (default) or PNG bytes."""
    import io

    from PIL import Image

    chw = to_chw_uint8(image)
    buf = io.BytesIO()
    kwargs = {"quality": int(quality)} if format.upper() in ("JPEG", "JPG") else {}
    Image.fromarray(chw.transpose(1, 2, 0)).save(buf, format=format.upper().replace("JPG", "JPEG"), **kwargs)
    return buf.getvalue()


def _record_parts(payload: bytes) -> list[tuple[int, bytes]]:
    """Split ``payload`` at 4-byte-aligned magic words into (cflag, part) pieces, dmlc-core style."""
    lower = len(payload) & ~3
    words = np.frombuffer(payload, "<u4", count=lower // 4) if lower else np.zeros(0, "<u4")
    cuts = (np.flatnonzero(words == MAGIC) * 4).tolist()
    if not cuts:
        return [(0, payload)]
    parts, start = [], 0
    for i, cut in enumerate(cuts):
        parts.append((1 if i == 0 else 2, payload[start:cut]))
        start = cut + 4
    parts.append((3, payload[start:]))
    return parts


def _encode_record(payload: bytes) -> bytes:
    out = bytearray()
    for cflag, part in _record_parts(payload):
        if len(part) > _MAX_LENGTH:
            raise ValueError(f"record part of {len(part)} bytes exceeds the RecordIO limit of {_MAX_LENGTH}")
        out += _LREC.pack(MAGIC, (cflag << 29) | len(part))
        out += part
        out += b"\0" * (_align4(len(part)) - len(part))
    return bytes(out)


class RecordIOWriter:
    """Write ``train.rec``, ``train.idx`` and ``property`` into ``out_dir``; use as a context manager.

    Args:
        out_dir: destination folder (created). Files appear only when the writer closes without
            error (each is written under a temporary name, then renamed).
        header: write the insightface header layout (record 0 ``[first, end]``, per-identity
            records after the images when every class's images are contiguous); ``False`` writes
            the flat layout (every key an image).
        quality: JPEG quality for :meth:`write`.
        num_classes: written to ``property``; default ``max(label) + 1``.
        prefix: file stem (``train``).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        header: bool = True,
        quality: int = 95,
        num_classes: int | None = None,
        prefix: str = "train",
    ) -> None:
        self.out_dir = as_path(out_dir)
        self.header = bool(header)
        self.quality = int(quality)
        self.num_classes = num_classes
        self.prefix = prefix
        self._stack = contextlib.ExitStack()
        self._rec_tmp = self._stack.enter_context(atomic_path(self.out_dir / f"{prefix}.rec"))
        self._idx_tmp = self._stack.enter_context(atomic_path(self.out_dir / f"{prefix}.idx"))
        self._prop_tmp = self._stack.enter_context(atomic_path(self.out_dir / "property"))
        self._rec = open(self._rec_tmp, "wb")  # noqa: SIM115 - closed in close()/__exit__
        self._offsets: list[tuple[int, int]] = []
        self._labels: list[int] = []
        self._shape: tuple[int, int] | None = None
        self._closed = False
        if self.header:
            self._append(0, pack_payload([0.0, 0.0]))  # placeholder, rewritten in close()

    def _append(self, key: int, payload: bytes) -> None:
        self._offsets.append((key, self._rec.tell()))
        self._rec.write(_encode_record(payload))

    def _next_key(self) -> int:
        return len(self._labels) + (1 if self.header else 0)

    def write_encoded(self, data: bytes, label: int, shape: tuple[int, int] | None = None) -> int:
        """Append already-encoded image bytes with class ``label``; returns the record key."""
        if self._closed:
            raise RuntimeError("RecordIOWriter is closed")
        label = int(label)
        if label < 0:
            raise ValueError(f"labels must be >= 0, got {label}")
        key = self._next_key()
        self._append(key, pack_payload(float(label), data, id=key))
        self._labels.append(label)
        if self._shape is None and shape is not None:
            self._shape = shape
        return key

    def write(self, image: Any, label: int) -> int:
        """Append an RGB ``uint8`` image (``(3, H, W)``, ``(H, W, 3)`` or PIL) as JPEG; returns its key."""
        chw = to_chw_uint8(image)
        return self.write_encoded(encode_image(chw, self.quality), label, (chw.shape[1], chw.shape[2]))

    def close(self) -> Path:
        """Finish the files (header record, identity records, index, property) and move them into place."""
        if self._closed:
            return self.out_dir
        try:
            labels = np.asarray(self._labels, dtype=np.int64)
            num_classes = int(labels.max()) + 1 if len(labels) else 0
            if self.num_classes is not None:
                if self.num_classes < num_classes:
                    raise ValueError(
                        f"num_classes={self.num_classes} but a label {num_classes - 1} was written"
                    )
                num_classes = int(self.num_classes)
            if self.header:
                self._finish_header(labels)
            self._rec.close()
            with open(self._idx_tmp, "w") as f:
                f.writelines(f"{key}\t{offset}\n" for key, offset in self._offsets)
            h, w = self._shape if self._shape is not None else (112, 112)
            self._prop_tmp.write_text(f"{num_classes},{h},{w}\n")
        except BaseException as exc:
            self._rec.close()
            self._stack.__exit__(type(exc), exc, exc.__traceback__)
            self._closed = True
            raise
        self._closed = True
        self._stack.close()
        return self.out_dir

    def _finish_header(self, labels: np.ndarray) -> None:
        first = len(labels) + 1
        end = first
        # Identity records [start_key, end_key) can only describe classes stored contiguously.
        change = np.flatnonzero(np.diff(labels)) + 1
        starts = np.concatenate([[0], change]) if len(labels) else np.zeros(0, np.int64)
        if len(np.unique(labels[starts])) == len(starts):
            for s, e in zip(starts.tolist(), [*change.tolist(), len(labels)]):
                self._append(end, pack_payload([float(s + 1), float(e + 1)], id=end))
                end += 1
        _exact_float32(float(end), "header record key")
        self._rec.seek(0)
        self._rec.write(_encode_record(pack_payload([float(first), float(end)])))
        self._rec.seek(0, os.SEEK_END)

    def __enter__(self) -> RecordIOWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        elif not self._closed:
            self._closed = True
            self._rec.close()
            self._stack.__exit__(exc_type, exc, tb)


def write_recordio(
    out_dir: str | os.PathLike,
    images: Iterable[Any],
    labels: Iterable[int],
    header: bool = True,
    quality: int = 95,
    num_classes: int | None = None,
) -> Path:
    """Pack RGB ``uint8`` images and their labels into ``out_dir/{train.rec, train.idx, property}``.

    ``images`` and ``labels`` must have the same length; otherwise nothing is written."""
    missing = object()
    with RecordIOWriter(out_dir, header=header, quality=quality, num_classes=num_classes) as writer:
        label_iter = iter(labels)
        count = 0
        for image in images:
            label = next(label_iter, missing)
            if label is missing:
                raise ValueError(
                    f"write_recordio: only {count} labels for more than {count} images; expected one label per image"
                )
            writer.write(image, label)
            count += 1
        if next(label_iter, missing) is not missing:
            raise ValueError(
                f"write_recordio: more labels than the {count} images; expected one label per image"
            )
    return as_path(out_dir)


def _resolve_files(path: Path) -> tuple[Path, Path, Path]:
    if path.is_dir():
        rec, idx = path / "train.rec", path / "train.idx"
    elif path.suffix == ".rec":
        rec, idx = path, path.with_suffix(".idx")
    else:
        raise FileNotFoundError(
            f"{path}: expected a folder holding train.rec/train.idx/property, or a .rec file"
        )
    for f in (rec, idx):
        if not f.is_file():
            raise FileNotFoundError(
                f"{f}: missing; a RecordIO dataset needs {rec.name} and {idx.name} side by side"
            )
    return rec, idx, rec.parent / "property"


def _parse_index(idx: Path, rec_size: int) -> dict[int, int]:
    text = idx.read_bytes()
    if not text:
        raise RecordIOError(f"{idx}: empty index; expected one 'key<TAB>offset' line per record")
    lines = text.split(b"\n")
    if lines[-1] != b"":
        raise RecordIOError(
            f"{idx}: line {len(lines)} ({lines[-1][:40]!r}) is not newline-terminated; the index looks truncated"
        )
    offsets: dict[int, int] = {}
    for number, line in enumerate(lines[:-1], start=1):
        fields = line.rstrip(b"\r").split(b"\t")
        try:
            if len(fields) != 2:
                raise ValueError
            key, offset = int(fields[0]), int(fields[1])
            if key < 0 or offset < 0:
                raise ValueError
        except ValueError:
            raise RecordIOError(
                f"{idx}: line {number} is {line[:60]!r}; expected 'key<TAB>byte_offset' with two integers >= 0"
            ) from None
        if key in offsets:
            raise RecordIOError(f"{idx}: line {number}: key {key} appears twice")
        if offset + 8 > rec_size:
            raise RecordIOError(
                f"{idx}: line {number}: key {key} at byte offset {offset}, but the .rec file has only "
                f"{rec_size} bytes (index and .rec do not match, or the .rec is truncated)"
            )
        offsets[key] = offset
    return offsets


class RecordIOReader:
    """Random access to the payloads of a ``.rec`` file through its ``.idx``; safe across fork/threads.

    ``reader.keys`` lists the keys in index order; ``reader.read(key)`` returns the full payload
    (multi-part records joined). Every check names the file, the key and the byte offset.
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike) -> None:
        self.rec_path = as_path(rec_path)
        self.idx_path = as_path(idx_path)
        for f in (self.rec_path, self.idx_path):
            if not f.is_file():
                raise FileNotFoundError(f"{f}: missing")
        self.size = self.rec_path.stat().st_size
        self.offsets = _parse_index(self.idx_path, self.size)
        self.keys = list(self.offsets)
        self._fd: int | None = None
        self._pid: int | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_fd=None, _pid=None, _lock=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _pread(self, n: int, offset: int) -> bytes:
        if self._fd is None or self._pid != os.getpid():
            with self._lock:
                if self._fd is None or self._pid != os.getpid():
                    self._fd = os.open(self.rec_path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
                    self._pid = os.getpid()
        if hasattr(os, "pread"):
            return os.pread(self._fd, n, offset)
        with self._lock:  # pragma: no cover - platforms without pread
            os.lseek(self._fd, offset, os.SEEK_SET)
            return os.read(self._fd, n)

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def read(self, key: int, max_bytes: int | None = None) -> bytes:
        """The payload of record ``key``; with ``max_bytes``, only its first part, cut to that many bytes."""
        if key not in self.offsets:
            raise KeyError(f"{self.idx_path}: no key {key} in the index")
        offset = self.offsets[key]
        where = f"{self.rec_path}: record key {key}"
        parts: list[bytes] = []
        pos = offset
        while True:
            head = self._pread(_LREC.size, pos)
            if len(head) < _LREC.size:
                raise RecordIOError(
                    f"{where}: file ends at byte {self.size}, expected an 8-byte record header at offset {pos}"
                )
            magic, lrec = _LREC.unpack(head)
            if magic != MAGIC:
                raise RecordIOError(
                    f"{where} at byte offset {pos}: magic 0x{magic:08x}, expected 0x{MAGIC:08x} "
                    "(corrupt file, or the index offset does not point at a record)"
                )
            cflag, length = lrec >> 29, lrec & _MAX_LENGTH
            if pos + 8 + length > self.size:
                raise RecordIOError(
                    f"{where} at byte offset {pos}: length {length} runs past the end of the file "
                    f"({self.size} bytes; {self.size - pos - 8} available)"
                )
            expected = (0, 1) if not parts else (2, 3)
            if cflag not in expected:
                raise RecordIOError(
                    f"{where} at byte offset {pos}: continuation flag {cflag}, expected one of {expected} "
                    f"({'a record start' if not parts else 'a continuation part'})"
                )
            if max_bytes is not None and cflag == 0:
                return self._pread(min(length, max_bytes), pos + 8)
            parts.append(self._pread(length, pos + 8))
            if cflag in (0, 3):
                break
            pos += 8 + _align4(length)
            if pos >= self.size:
                raise RecordIOError(
                    f"{where}: multi-part record is cut off by the end of the file at byte {pos}"
                )
        return _MAGIC_BYTES.join(parts)

    def read_header(self, key: int) -> tuple[IRHeader, bool]:
        """The header of record ``key`` and whether image bytes follow it (without reading the image)."""
        head = self.read(key, max_bytes=_IR_HEADER.size + 4 * 64)
        flag = _IR_HEADER.unpack_from(head, 0)[0] if len(head) >= _IR_HEADER.size else 0
        if len(head) < _IR_HEADER.size or len(head) < _IR_HEADER.size + 4 * flag:
            head = self.read(key)
        header, rest = unpack_payload(head, f"{self.rec_path}: record key {key}")
        full_length = self._payload_length(key)
        used = _IR_HEADER.size + 4 * header.flag
        return header, (full_length > used if full_length is not None else len(rest) > 0)

    def _payload_length(self, key: int) -> int | None:
        magic, lrec = _LREC.unpack(self._pread(_LREC.size, self.offsets[key]))
        return lrec & _MAX_LENGTH if magic == MAGIC and lrec >> 29 == 0 else None

    def __len__(self) -> int:
        return len(self.keys)

    def __iter__(self) -> Iterator[int]:
        return iter(self.keys)


def _read_property(path: Path) -> tuple[int, int, int] | None:
    if not path.is_file():
        return None
    try:
        text = path.read_bytes().decode("ascii").strip()
    except UnicodeDecodeError:
        raise RecordIOError(
            f"{path}: binary content; expected one text line 'num_classes,height,width' with three positive integers"
        ) from None
    fields = text.split(",")
    try:
        if len(fields) != 3:
            raise ValueError
        values = tuple(int(f) for f in fields)
        if min(values) <= 0:
            raise ValueError
    except ValueError:
        raise RecordIOError(
            f"{path}: content {text[:60]!r}; expected 'num_classes,height,width' with three positive integers"
        ) from None
    return values  # type: ignore[return-value]


class RecordIODataset(ImageDataset):
    """An insightface RecordIO training set: item ``i`` is ``(float32 (3, S, S) normalised, label)``.

    Args:
        path: folder with ``train.rec``, ``train.idx`` (and ``property``), or the ``.rec`` file
            (its ``.idx`` beside it).
        image_size: resize every image to this square size; default the stored size.

    The layout (header or flat, see the module docstring) is detected from record 0: it is the
    header when its ``flag > 0`` and it holds no image. ``num_classes`` comes from ``property``
    and is checked against the labels when the set is opened (see
    :meth:`_check_property_covers_labels`); without that file it is ``max(label) + 1`` over all
    records (one header read per record).
    """

    def __init__(self, path: str | os.PathLike, image_size: int | None = None) -> None:
        super().__init__(image_size)
        self.path = as_path(path)
        rec, idx, prop = _resolve_files(self.path)
        self.reader = RecordIOReader(rec, idx)
        self.layout = "flat"
        keys = self.reader.keys
        identities = 0  # identity records listed by the header record (header layout)
        if 0 in self.reader.offsets:
            header, has_image = self.reader.read_header(0)
            if header.flag > 0 and not has_image:
                self.layout = "header"
                if header.flag < 2:
                    raise RecordIOError(
                        f"{rec}: record 0 is a header with {header.flag} label(s); expected [first, end]"
                    )
                first = int(header.labels[0])
                if first != header.labels[0] or first < 1:
                    raise RecordIOError(
                        f"{rec}: header record 0 has first identity key {header.labels[0]}; "
                        "expected an integer >= 1"
                    )
                keys = list(range(1, first))
                end = int(header.labels[1])
                identities = max(end - first, 0) if end == header.labels[1] else 0
                missing = [k for k in keys if k not in self.reader.offsets]
                if missing:
                    raise RecordIOError(
                        f"{idx}: header record 0 says images are keys 1..{first - 1}, but {len(missing)} "
                        f"of them are not in the index (first missing: {missing[:5]})"
                    )
        self.keys = np.asarray(keys, dtype=np.int64)
        prop_values = _read_property(prop)
        self.property = prop_values
        if prop_values is not None:
            self.num_classes = prop_values[0]
            self._check_property_covers_labels(prop, identities)
        else:
            labels = self.labels
            self.num_classes = int(labels.max()) + 1 if len(labels) else 0

    def _check_property_covers_labels(self, prop: Path, identities: int) -> None:
        """Refuse, when the data set is opened, a ``property`` whose ``num_classes`` is smaller than
        the classes the records hold (otherwise the first image of a missing class would stop a
        training run in the middle).

        With the insightface header layout, record 0 lists one identity record per class, so the
        check is the count of identity records (``O(1)``). Otherwise every record's header is read
        once (24 bytes per record) and each label is compared with ``num_classes``."""
        if identities > 0:
            if identities > self.num_classes:
                raise RecordIOError(
                    f"{prop}: num_classes={self.num_classes}, but header record 0 of {self.reader.rec_path} "
                    f"lists {identities} identity records (one per class); expected num_classes >= {identities}"
                )
            return
        _ = self.labels  # reads every label; the first one >= num_classes raises, naming its record

    @property
    def labels(self) -> np.ndarray:
        """Every image's class, ``int64 (N,)``; reads one header per record on first use."""
        if not hasattr(self, "_labels"):
            self._labels = np.asarray([self._label_of(int(k)) for k in self.keys], dtype=np.int64)
        return self._labels

    def _label_of(self, key: int, header: IRHeader | None = None) -> int:
        if header is None:
            header, _ = self.reader.read_header(key)
        value = header.class_label
        label = int(value)
        if label != value or label < 0:
            raise RecordIOError(
                f"{self.reader.rec_path}: record key {key} has label {value}; expected an integer >= 0"
            )
        limit = getattr(self, "num_classes", None)
        if limit is not None and label >= limit:
            raise RecordIOError(
                f"{self.reader.rec_path}: record key {key} has label {label}, outside [0, {limit}) from property"
            )
        return label

    def __len__(self) -> int:
        return len(self.keys)

    def read_uint8(self, index: int) -> tuple[np.ndarray, int]:
        key = int(self.keys[index])
        where = f"{self.reader.rec_path}: record key {key}"
        header, data = unpack_payload(self.reader.read(key), where)
        label = self._label_of(key, header)
        if not data:
            raise RecordIOError(f"{where}: holds no image bytes after its header (flag {header.flag})")
        return decode_image(data, where=where), label
