"""Verification .bin files: round trip, old pickle forms, refusal of code, structure errors."""

from __future__ import annotations

import io
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from pfclib.data import DataFormatError, UnsafePickleError, VerificationSet, load_verification
from pfclib.data.verification import load_bin, write_bin


def png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img.transpose(1, 2, 0)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def pairs():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (6, 3, 9, 9), dtype=np.uint8), [True, False, True]


@pytest.mark.parametrize("protocol", [2, 4, pickle.HIGHEST_PROTOCOL])
def test_round_trip(tmp_path, pairs, protocol):
    images, issame = pairs
    path = write_bin(tmp_path / "lfw.bin", images, issame, image_format="PNG", protocol=protocol)
    raw = path.read_bytes()
    assert (b"_codecs" in raw) == (protocol == 2)  # protocol 2 stores bytes via _codecs.encode
    vset = load_verification(path)
    assert isinstance(vset, VerificationSet) and vset.name == "lfw" and len(vset) == 3
    assert torch.equal(vset.images, torch.from_numpy(images))
    assert vset.issame.tolist() == issame and vset.issame.dtype == torch.bool
    assert load_bin(path, image_size=5).images.shape == (6, 3, 5, 5)


def test_python2_style_pickle(tmp_path, pairs):
    # Python 2 wrote bytes as pickle strings (BINSTRING); hand-assembled opcodes, no globals.
    images, issame = pairs
    body = b"\x80\x02]("  # PROTO 2, EMPTY_LIST, MARK
    for img in images:
        data = png(img)
        body += b"T" + struct.pack("<i", len(data)) + data
    body += b"e]("  # APPENDS, EMPTY_LIST, MARK
    body += b"".join(b"\x88" if s else b"\x89" for s in issame)
    body += b"e\x86."  # APPENDS, TUPLE2, STOP
    (tmp_path / "old.bin").write_bytes(body)
    vset = load_bin(tmp_path / "old.bin")
    assert torch.equal(vset.images, torch.from_numpy(images)) and vset.issame.tolist() == issame


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvalExploit:
    def __reduce__(self):
        return (eval, ("1 + 1",))


def test_code_is_refused_and_not_run(tmp_path, pairs):
    images, issame = pairs
    marker = tmp_path / "pwned"
    payload = ([png(images[0]), png(images[1])], [_Exploit(marker)])
    (tmp_path / "evil.bin").write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(
        UnsafePickleError, match=r"evil.bin: the pickle asks for global (posix|os|nt)\.system"
    ) as info:
        load_verification(tmp_path / "evil.bin")
    assert isinstance(info.value, pickle.UnpicklingError) and "refusing to load" in str(info.value)
    assert not marker.exists()
    (tmp_path / "eval.bin").write_bytes(pickle.dumps(_EvalExploit()))
    with pytest.raises(UnsafePickleError, match=r"global builtins\.eval"):
        load_bin(tmp_path / "eval.bin")
    # The one allowed callable cannot be bent to another use.
    misuse = b"\x80\x02c_codecs\nencode\nq\x00X\x03\x00\x00\x00abcX\x06\x00\x00\x00rot_13\x86R."
    (tmp_path / "codec.bin").write_bytes(misuse)
    with pytest.raises(UnsafePickleError, match=r"encode\(<str>, 'latin1'\)"):
        load_bin(tmp_path / "codec.bin")
    (tmp_path / "numpy.bin").write_bytes(pickle.dumps((list(np.zeros(2, np.uint8)), [True])))
    with pytest.raises(UnsafePickleError, match=r"global numpy"):
        load_bin(tmp_path / "numpy.bin")


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        ([b"a", b"b", b"c"], r"holds list of length 3; expected a pair"),
        ((b"ab", [True]), r"expected \(list of encoded images, list of bool\), got \(bytes, list\)"),
        (([b"a", b"b", b"c"], [True]), r"3 images is odd; expected two images per pair"),
        (([b"a", b"b"], [True, False]), r"2 issame flags for 2 images; expected 1 \(images / 2\)"),
        (([b"a", "b"], [True]), r"image 1 is str; expected encoded image bytes"),
        (([b"a", b"b"], ["yes"]), r"issame\[0\] is 'yes'; expected a bool"),
    ],
)
def test_structure_errors(tmp_path, obj, match):
    (tmp_path / "bad.bin").write_bytes(pickle.dumps(obj))
    with pytest.raises(DataFormatError, match=match):
        load_bin(tmp_path / "bad.bin")


def test_unreadable_files(tmp_path, pairs):
    (tmp_path / "garbage.bin").write_bytes(b"\x00\x01 this is not a pickle")
    with pytest.raises(DataFormatError, match=r"garbage.bin: not a readable pickle"):
        load_bin(tmp_path / "garbage.bin")
    (tmp_path / "cut.bin").write_bytes(pickle.dumps(([b"ab", b"cd"], [True]))[:-5])
    with pytest.raises(DataFormatError, match=r"cut.bin: not a readable pickle"):
        load_bin(tmp_path / "cut.bin")
    (tmp_path / "jpeg.bin").write_bytes(pickle.dumps(([b"ab", b"cd"], [True])))
    with pytest.raises(DataFormatError, match=r"jpeg.bin: image 0: cannot decode 2 bytes"):
        load_bin(tmp_path / "jpeg.bin")
    images, _ = pairs
    mixed = [png(images[0]), png(images[1][:, :5, :5])]
    (tmp_path / "mixed.bin").write_bytes(pickle.dumps((mixed, [False])))
    with pytest.raises(DataFormatError, match=r"image 1 has shape \(3, 5, 5\), image 0 has \(3, 9, 9\)"):
        load_bin(tmp_path / "mixed.bin")
    assert load_bin(tmp_path / "mixed.bin", image_size=4).images.shape == (2, 3, 4, 4)
    with pytest.raises(FileNotFoundError, match="expected a .bin file or a synthetic pairs folder"):
        load_verification(tmp_path / "absent.bin")
