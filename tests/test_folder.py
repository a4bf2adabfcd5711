"""Image folders (plain and through datasets' imagefolder), saved HF datasets, and the image pipeline."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from pfclib.data import DataFormatError, ImageFolderDataset, build_dataset, random_hflip
from pfclib.data.base import normalise, resize_uint8

NAMES = ["bob", "alice", "carol"]  # written unsorted: class ids must follow sorted names


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "faces"
    truth = []
    for name, count in zip(NAMES, (2, 3, 1)):
        (root / name).mkdir(parents=True)
        for j in range(count):
            img = rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / name / f"{j}.png")
            truth.append((sorted(NAMES).index(name), img.transpose(2, 0, 1)))
    (root / "alice" / "notes.txt").write_text("not an image")
    (root / "alice" / ".hidden.png").write_bytes(b"junk")
    (root / ".cache").mkdir()
    return root, truth


def test_folder_labels_and_pixels(folder):
    root, truth = folder
    ds = build_dataset("folder", root)
    assert isinstance(ds, ImageFolderDataset)
    assert ds.classes == ["alice", "bob", "carol"] and ds.num_classes == 3 and len(ds) == 6
    np.testing.assert_array_equal(ds.labels, [0, 0, 0, 1, 1, 2])
    got = sorted((label, ds.read_uint8(i)[0].tobytes()) for i, label in enumerate(ds.labels))
    want = sorted((label, img.tobytes()) for label, img in truth)
    assert got == want
    x, y = ds[3]
    expected = (torch.from_numpy(ds.read_uint8(3)[0].astype(np.float64)) / 255 - 0.5) / 0.5
    torch.testing.assert_close(x.double(), expected, rtol=0, atol=1e-6)
    assert y == 1 and x.dtype == torch.float32
    assert build_dataset("folder", root, image_size=16)[0][0].shape == (3, 16, 16)
    with pytest.raises(IndexError, match="index 6 out of range"):
        ds[6]


def test_folder_errors(tmp_path, folder):
    root, _ = folder
    (root / "dave").mkdir()
    with pytest.raises(FileNotFoundError, match=r"1 identity folder\(s\) hold no image .*: dave"):
        ImageFolderDataset(root)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        ImageFolderDataset(tmp_path / "missing")
    (root / "dave" / "x.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(DataFormatError, match=r"dave/x.jpg: cannot decode 12 bytes as an image"):
        ImageFolderDataset(root).read_uint8(6)


def _digest(ds):
    return sorted(
        (int(label), hashlib.sha1(ds.read_uint8(i)[0].tobytes()).hexdigest())
        for i, label in enumerate(ds.labels)
    )


def test_imagefolder_through_datasets_matches(folder, tmp_path):
    root, _ = folder
    ds = build_dataset("imagefolder_hf", root, cache_dir=tmp_path / "cache")
    assert ds.num_classes == 3 and len(ds) == 6
    assert _digest(ds) == _digest(build_dataset("folder", root))
    assert ds[0][0].shape == (3, 10, 10)


def test_saved_hf_datasets(tmp_path):
    import datasets

    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, (5, 3, 8, 8), dtype=np.uint8)
    labels = [0, 2, 1, 2, 0]
    pil = [Image.fromarray(a.transpose(1, 2, 0)) for a in imgs]
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=4)})
    datasets.Dataset.from_dict({"image": pil, "label": labels}, features=feats).save_to_disk(
        str(tmp_path / "img")
    )
    arr = datasets.Features({"img": datasets.Array3D((3, 8, 8), "uint8"), "labels": datasets.Value("int64")})
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"img": imgs, "labels": labels}, features=arr)}
    ).save_to_disk(str(tmp_path / "arr"))
    a = build_dataset("hf", tmp_path / "img")
    b = build_dataset("hf", tmp_path / "arr")
    assert a.num_classes == 4 and b.num_classes == 3  # ClassLabel vs max(label) + 1
    for ds in (a, b):
        for i in range(5):
            raw, label = ds.read_uint8(i)
            np.testing.assert_array_equal(raw, imgs[i])
            assert label == labels[i]
    with pytest.raises(KeyError, match="no split 'test'"):
        build_dataset("hf", tmp_path / "arr", split="test")
    with pytest.raises(ValueError, match=r"unknown dataset kind 'lmdb'; expected one of \['synthetic'"):
        build_dataset("lmdb", tmp_path)


def test_normalise_and_resize():
    img = np.arange(3 * 4 * 4, dtype=np.uint8).reshape(3, 4, 4) * 5
    before = img.copy()
    x = normalise(img)
    torch.testing.assert_close(
        x.double(), (torch.from_numpy(before).double() / 255 - 0.5) / 0.5, rtol=0, atol=1e-7
    )
    np.testing.assert_array_equal(img, before)
    assert normalise(img, 8).shape == (3, 8, 8)
    const = np.full((3, 6, 6), 77, np.uint8)
    assert torch.equal(resize_uint8(const, 3), torch.full((3, 3, 3), 77, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"expected a uint8 image of shape \(3, H, W\), got float32"):
        normalise(img.astype(np.float32))


def test_random_hflip_is_seeded_per_sample_and_pure():
    batch = torch.randn(64, 3, 5, 7, generator=torch.Generator().manual_seed(0))
    original = batch.clone()
    out = random_hflip(batch, torch.Generator().manual_seed(1))
    again = random_hflip(batch, torch.Generator().manual_seed(1))
    assert torch.equal(out, again) and torch.equal(batch, original) and out.data_ptr() != batch.data_ptr()
    draws = torch.rand(64, generator=torch.Generator().manual_seed(1))
    for i in range(64):
        assert torch.equal(out[i], batch[i].flip(-1) if draws[i] < 0.5 else batch[i])
    flipped = torch.tensor([not torch.equal(out[i], batch[i]) for i in range(64)])
    assert 20 < int(flipped.sum()) < 44
    assert torch.equal(random_hflip(batch, torch.Generator(), p=0.0), batch)
    assert torch.equal(random_hflip(batch, torch.Generator(), p=1.0), batch.flip(-1))
    with pytest.raises(ValueError, match=r"expects a batch of shape \(B, C, H, W\), got \(3, 5, 7\)"):
        random_hflip(batch[0], torch.Generator())
