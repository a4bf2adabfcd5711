"""insightface RecordIO: byte layout, both header layouts, multi-part records, clear errors."""

from __future__ import annotations

import io
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from pfclib.data import DataFormatError, RecordIOError, build_dataset
from pfclib.data.recordio import (
    MAGIC,
    RecordIODataset,
    RecordIOReader,
    RecordIOWriter,
    _encode_record,
    pack_payload,
    unpack_payload,
    write_recordio,
)


def png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img.transpose(1, 2, 0)).save(buf, format="PNG")
    return buf.getvalue()


def images_and_labels(n=7, size=12, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8)
    labels = np.sort(rng.integers(0, 3, n))
    labels[-1] = 3  # 4 classes, contiguous
    return images, labels


def write_png_recordio(folder, images, labels, header=True):
    with RecordIOWriter(folder, header=header) as w:
        for img, lab in zip(images, labels):
            w.write_encoded(png(img), int(lab), img.shape[1:])
    return folder


def reference_record(payload: bytes, cflag: int = 0) -> bytes:
    """The record bytes written out by hand from the format in pfclib.data.recordio's docstring."""
    pad = (-len(payload)) % 4
    return struct.pack("<II", 0xCED7230A, (cflag << 29) | len(payload)) + payload + b"\0" * pad


def test_record_bytes_match_the_spec():
    payload = struct.pack("<IfQQ", 0, 5.0, 3, 0) + b"abcde"
    assert pack_payload(5, b"abcde", id=3) == payload
    assert _encode_record(payload) == reference_record(payload)
    vec = pack_payload([2.0, 7.0], b"xy")
    assert vec == struct.pack("<IfQQ", 2, 0.0, 0, 0) + struct.pack("<ff", 2.0, 7.0) + b"xy"
    header, image = unpack_payload(vec)
    assert header.flag == 2 and header.labels == (2.0, 7.0) and header.class_label == 2.0 and image == b"xy"


@pytest.mark.parametrize("header", [True, False])
def test_round_trip_exact(tmp_path, header):
    images, labels = images_and_labels()
    write_png_recordio(tmp_path, images, labels, header=header)
    assert (tmp_path / "property").read_text() == "4,12,12\n"
    ds = build_dataset("recordio", tmp_path)
    assert ds.layout == ("header" if header else "flat")
    assert len(ds) == len(images) and ds.num_classes == 4
    np.testing.assert_array_equal(ds.labels, labels)
    for i in range(len(images)):
        raw, label = ds.read_uint8(i)
        np.testing.assert_array_equal(raw, images[i])
        x, y = ds[i]
        expected = (torch.from_numpy(images[i].astype(np.float64)) / 255 - 0.5) / 0.5
        torch.testing.assert_close(x.double(), expected, rtol=0, atol=1e-6)
        assert y == labels[i]
    assert build_dataset("recordio", tmp_path / "train.rec", image_size=20)[0][0].shape == (3, 20, 20)


def test_header_layout_matches_insightface(tmp_path):
    images, labels = images_and_labels()
    write_png_recordio(tmp_path, images, labels, header=True)
    reader = RecordIOReader(tmp_path / "train.rec", tmp_path / "train.idx")
    head, rest = unpack_payload(reader.read(0))
    n, classes = len(images), 4
    # Record 0: [first identity record, end]; image keys 1..n; one identity record per class.
    assert head.flag == 2 and rest == b"" and head.labels == (n + 1, n + 1 + classes)
    assert reader.keys == list(range(n + 1 + classes))
    first_class = unpack_payload(reader.read(n + 1))[0]
    assert first_class.labels == (1.0, 1.0 + (labels == 0).sum())


def test_jpeg_writer_and_dataloader(tmp_path):
    _, labels = images_and_labels()
    ramp = np.linspace(0, 255, 32)
    images = [
        np.stack([np.add.outer(ramp, ramp * k / 8) / 2 for k in (i, i + 1, i + 2)]).astype(np.uint8)
        for i in range(len(labels))
    ]
    write_recordio(tmp_path, images, labels, quality=95)
    ds = RecordIODataset(tmp_path)
    errors = [
        np.abs(ds.read_uint8(i)[0].astype(int) - images[i].astype(int)).mean() for i in range(len(labels))
    ]
    assert max(errors) < 2.0  # JPEG is lossy, but these are the images written
    ds2 = pickle.loads(pickle.dumps(ds))  # DataLoader workers get a fresh file handle
    np.testing.assert_array_equal(ds2.read_uint8(3)[0], ds.read_uint8(3)[0])
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch[0].shape == (4, 3, 32, 32) and batch[1].tolist() == labels[:4].tolist()


def test_flat_layout_with_vector_label_at_key_zero(tmp_path):
    # Record 0 has flag > 0 but carries an image: it is an image, not the insightface header.
    img = images_and_labels(1)[0][0]
    payloads = [pack_payload([1.0, 9.0], png(img)), pack_payload(0, png(img))]
    rec, idx = bytearray(), []
    for key, p in enumerate(payloads):
        idx.append(f"{key}\t{len(rec)}\n")
        rec += reference_record(p)
    (tmp_path / "train.rec").write_bytes(bytes(rec))
    (tmp_path / "train.idx").write_text("".join(idx))
    ds = RecordIODataset(tmp_path)  # no property: num_classes from the labels
    assert ds.layout == "flat" and ds.labels.tolist() == [1, 0] and ds.num_classes == 2


def test_multi_part_records(tmp_path):
    magic = struct.pack("<I", MAGIC)
    rng = np.random.default_rng(0)
    payloads = [
        magic + bytes(rng.integers(0, 256, 9, dtype=np.uint8)) + b"\0\0\0" + magic + magic + b"tail",
        b"abc" + magic,  # unaligned magic: one part
        bytes(8) + magic,  # magic at the end
    ]
    encoded = [_encode_record(p) for p in payloads]
    flags = [struct.unpack_from("<I", e, 4)[0] >> 29 for e in encoded]
    assert flags == [1, 0, 1]
    rec = b"".join(encoded)
    (tmp_path / "x.rec").write_bytes(rec)
    offsets = np.cumsum([0] + [len(e) for e in encoded])[:-1]
    (tmp_path / "x.idx").write_text("".join(f"{k}\t{o}\n" for k, o in enumerate(offsets)))
    reader = RecordIOReader(tmp_path / "x.rec", tmp_path / "x.idx")
    assert [reader.read(k) for k in range(3)] == payloads
    # An image whose payload contains the magic word still round-trips through the dataset.
    img = images_and_labels(1)[0][0]
    data = png(img)
    data += b"\0" * ((-len(data) - 24) % 4) + magic + b"junk"
    with RecordIOWriter(tmp_path / "m", header=False) as w:
        w.write_encoded(data, 0)
    assert (tmp_path / "m" / "train.rec").read_bytes()[7] >> 5 == 1
    np.testing.assert_array_equal(RecordIODataset(tmp_path / "m").read_uint8(0)[0], img)


@pytest.fixture
def good(tmp_path):
    images, labels = images_and_labels()
    return write_png_recordio(tmp_path / "rec", images, labels, header=False)


def test_corrupt_magic(good):
    data = bytearray((good / "train.rec").read_bytes())
    offset = int((good / "train.idx").read_text().splitlines()[3].split("\t")[1])
    data[offset] ^= 0xFF
    ds = RecordIODataset(good)  # opened while intact; the record breaks afterwards (read lazily)
    (good / "train.rec").write_bytes(bytes(data))
    ds.read_uint8(2)
    message = rf"train.rec: record key 3 at byte offset {offset}: magic 0x.*expected 0xced7230a"
    with pytest.raises(RecordIOError, match=message):
        ds.read_uint8(3)
    with pytest.raises(RecordIOError, match=message):  # the flat layout reads every label at open
        RecordIODataset(good)


def test_length_past_end_of_file(good):
    data = (good / "train.rec").read_bytes()
    last = int((good / "train.idx").read_text().splitlines()[-1].split("\t")[1])
    (good / "train.rec").write_bytes(data[: last + 20])
    with pytest.raises(RecordIOError, match=r"record key 6 at byte offset \d+: length \d+ runs past the end"):
        RecordIODataset(good)  # the flat layout reads every record's header (its label) at open
    (good / "train.rec").write_bytes(data[: last + 4])
    with pytest.raises(
        RecordIOError, match=r"train.idx: line 7: key 6 at byte offset \d+, but the .rec file has only"
    ):
        RecordIODataset(good)


def test_truncated_and_malformed_index(good):
    idx = (good / "train.idx").read_text()
    (good / "train.idx").write_text(idx[:-3])
    with pytest.raises(
        RecordIOError, match=r"train.idx: line 7 .* not newline-terminated; the index looks truncated"
    ):
        RecordIODataset(good)
    lines = idx.splitlines(keepends=True)
    (good / "train.idx").write_text("".join(lines[:1] + ["1 64\n"] + lines[2:]))
    with pytest.raises(RecordIOError, match=r"train.idx: line 2 is b'1 64'; expected 'key<TAB>byte_offset'"):
        RecordIODataset(good)
    (good / "train.idx").write_text("".join(lines[:2] + lines[1:]))
    with pytest.raises(RecordIOError, match="line 3: key 1 appears twice"):
        RecordIODataset(good)


def test_missing_files_and_bad_property(good):
    (good / "property").write_text("four,112,112\n")
    with pytest.raises(
        RecordIOError, match="property: content 'four,112,112'; expected 'num_classes,height,width'"
    ):
        RecordIODataset(good)
    (good / "property").write_text("2,12,12\n")
    key = int(np.argmax(images_and_labels()[1] >= 2))  # flat layout: key = position
    with pytest.raises(RecordIOError, match=rf"record key {key} has label 2, outside \[0, 2\) from property"):
        RecordIODataset(good)  # refused when opened, not when the record is first read in a run
    (good / "train.idx").unlink()
    with pytest.raises(FileNotFoundError, match=r"train.idx: missing"):
        RecordIODataset(good)
    with pytest.raises(FileNotFoundError, match="expected a folder holding train.rec"):
        RecordIODataset(good / "nothing.txt")


def test_undecodable_image_and_short_payload(tmp_path):
    payloads = [pack_payload(0, b"not a jpeg at all"), b"short"]
    rec = b"".join(reference_record(p) for p in payloads)
    (tmp_path / "train.rec").write_bytes(rec)
    (tmp_path / "train.idx").write_text("0\t0\n")  # the image record alone: opens, fails when decoded
    (tmp_path / "property").write_text("1,112,112\n")
    ds = RecordIODataset(tmp_path)
    with pytest.raises(DataFormatError, match=r"train.rec: record key 0: cannot decode 17 bytes as an image"):
        ds.read_uint8(0)
    (tmp_path / "train.idx").write_text(f"0\t0\n1\t{len(reference_record(payloads[0]))}\n")
    with pytest.raises(
        RecordIOError, match=r"record key 1: payload has 5 bytes, expected at least the 24-byte header"
    ):
        RecordIODataset(tmp_path)  # the flat layout reads every record's header (its label) at open


def test_header_pointing_at_missing_keys(tmp_path):
    rec = reference_record(pack_payload([5.0, 5.0])) + reference_record(pack_payload(0, b"x"))
    (tmp_path / "train.rec").write_bytes(rec)
    (tmp_path / "train.idx").write_text(f"0\t0\n1\t{len(reference_record(pack_payload([5.0, 5.0])))}\n")
    with pytest.raises(RecordIOError, match=r"images are keys 1..4, but 3 of them are not in the index"):
        RecordIODataset(tmp_path)


def test_failed_writer_leaves_no_files(tmp_path):
    with pytest.raises(RuntimeError, match="boom"), RecordIOWriter(tmp_path / "w") as w:
        w.write(np.zeros((3, 8, 8), np.uint8), 0)
        raise RuntimeError("boom")
    assert list((tmp_path / "w").iterdir()) == []


def test_header_layout_property_with_fewer_classes_than_identity_records_is_refused_at_open(tmp_path):
    images, labels = images_and_labels()
    folder = write_png_recordio(tmp_path / "rec", images, labels, header=True)
    assert RecordIODataset(folder).num_classes == 4
    (folder / "property").write_text("3,12,12\n")
    with pytest.raises(
        RecordIOError,
        match=r"property: num_classes=3, but header record 0 of .*train.rec lists 4 identity records "
        r"\(one per class\); expected num_classes >= 4",
    ):
        RecordIODataset(folder)
    (folder / "property").write_text("5,12,12\n")  # more classes than labels is allowed (empty classes)
    assert RecordIODataset(folder).num_classes == 5
