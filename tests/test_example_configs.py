"""The example configs in configs/ train: each on a tiny data set in its real format (an image folder,
a saved Hugging Face dataset, insightface RecordIO), with a verification set made by
``python -m pfclib.data.pairs`` as the example's header says, for two steps through the command-line
entry ``pfclib.train.main``. Only sizes, paths and the device are overridden; every other setting
(head, margin, optimizer, schedule, ...) must reach the run from the example file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_pairs import make_folder  # tests/ helpers: a real image folder, a real RecordIO
from test_recordio import write_png_recordio

from pfclib.data.pairs import main as make_pairs
from pfclib.train import main as train_main

ROOT = Path(__file__).resolve().parent.parent
SIZE = 16  # pixels: images on disk and the model's input
IDENTITIES, PER = 12, 3  # make_folder: 3 or 4 images per identity

# The only settings a test run changes; everything else comes from the example file.
SHRINK = {
    "backbone": "iresnet_tiny",
    "embedding_size": 32,
    "image_size": SIZE,
    "max_steps": 2,
    "num_epochs": None,
    "mixed_precision": "no",
    "device": "cpu",
    "data.batch_size": 8,
    "data.num_workers": 0,
    "eval.nfolds": 2,
    "eval.batch_size": 16,
    "log.tensorboard": False,
    "log.progress": "off",
}
PATH_KEYS = {"output_dir", "data.path", "eval.verification"}  # set per test, to tmp_path


def pairs(data: Path, kind: str, out: Path, *extra: str) -> Path:
    """The header's pairs command, at a tiny size: 2 folds of 2 held-out identities each, 8 pairs."""
    argv = ["--data", str(data), "--kind", kind, "--out", str(out), "--pairs", "8", "--nfolds", "2"]
    assert make_pairs([*argv, "--holdout", "0.3", "--image-size", str(SIZE), *extra]) == 0
    return out


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "generate":
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def train_example(name: str, tmp_path: Path, data: Path, verification: list[Path], **more) -> dict:
    """Train configs/<name> through the command line with SHRINK + paths (+ ``more``); check the run
    finished and that every setting of the example file that was not overridden was used."""
    out = tmp_path / "run"
    overrides = {
        **SHRINK,
        "output_dir": str(out),
        "data.path": str(data),
        "eval.verification": [str(v) for v in verification],
        **more,
    }
    argv = ["--config", str(ROOT / "configs" / name)]
    for key, value in overrides.items():
        argv += ["--set", f"{key}={json.dumps(value)}"]  # JSON is YAML: quoted paths, "no" stays text
    metrics = train_main(argv)

    assert metrics["steps"] == 2 and len(metrics["loss_history"]) == 2
    assert all(np.isfinite(metrics["loss_history"]))
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2
    ckpt_path = out / "checkpoints" / "ckpt_00000002.pt"
    assert ckpt_path.is_file() and metrics["checkpoint"] == str(ckpt_path)
    assert sorted(metrics["verification"]) == sorted(v.stem for v in verification)
    for result in metrics["verification"].values():  # the pairs set made by pairs(): 8 pairs, 2 folds
        assert result["num_pairs"] == 8 and len(result["fold_accuracies"]) == 2

    example = flatten(yaml.safe_load((ROOT / "configs" / name).read_text()))
    used = flatten(torch.load(ckpt_path, weights_only=True)["config"])
    assert used["data.path"] == str(data) and used["output_dir"] == str(out)
    for key in ("head.sample_rate", "head.margin.name", "head.margin.m", "optim.optimizer", "optim.lr"):
        assert key in example, f"{name} should set {key}"
    kept = {k: v for k, v in example.items() if k not in overrides and k not in PATH_KEYS}
    differ = {k: (v, used.get(k, "<missing>")) for k, v in kept.items() if used.get(k, "<missing>") != v}
    assert not differ, f"settings of {name} not used by the run (file value, run value): {differ}"
    return metrics


def test_example_folder_config_trains_on_an_image_folder(tmp_path):
    faces = make_folder(tmp_path / "my_faces", identities=IDENTITIES, per=PER, size=SIZE)
    train = tmp_path / "my_faces_train"
    bin_path = pairs(faces, "folder", tmp_path / "my_faces_pairs.bin", "--train-folder", str(train))
    assert len(list(train.iterdir())) == IDENTITIES - 4  # 2 folds x 2 held-out identities
    train_example("example_folder.yaml", tmp_path, train, [bin_path])


def _save_hf_faces(folder: Path, out: Path) -> Path:
    """The images of an image folder as a saved ``datasets`` DatasetDict (Image + ClassLabel), as a
    hub dataset saved with ``save_to_disk`` looks."""
    import datasets
    from PIL import Image

    names = sorted(p.name for p in folder.iterdir())
    images, labels = [], []
    for label, name in enumerate(names):
        for file in sorted((folder / name).iterdir()):
            with Image.open(file) as img:
                images.append(img.copy())
            labels.append(label)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    ds = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
    datasets.DatasetDict({"train": ds}).save_to_disk(str(out))
    return out


def test_example_hf_config_trains_on_a_saved_dataset(tmp_path):
    import datasets

    faces = _save_hf_faces(make_folder(tmp_path / "src", IDENTITIES, PER, SIZE), tmp_path / "my_hf_faces")
    bin_path = pairs(faces, "hf", tmp_path / "my_hf_pairs.bin")
    # the header's step: save the dataset without the held-out identities
    held = set(json.loads((tmp_path / "my_hf_pairs.json").read_text())["heldout_labels"])
    ds = datasets.load_from_disk(str(faces))
    ds = ds["train"] if isinstance(ds, datasets.DatasetDict) else ds
    train = tmp_path / "my_hf_faces_train"
    ds.filter(lambda y: y not in held, input_columns="label").save_to_disk(str(train))
    assert len(held) == 4 and not held & set(datasets.load_from_disk(str(train))["label"])
    train_example("example_hf.yaml", tmp_path, train, [bin_path])


def test_example_hf_config_trains_on_an_imagefolder(tmp_path, monkeypatch):
    monkeypatch.setenv("PFCLIB_HF_CACHE", str(tmp_path / "hf_cache"))
    faces = make_folder(tmp_path / "my_faces", identities=IDENTITIES, per=PER, size=SIZE)
    bin_path = pairs(faces, "imagefolder_hf", tmp_path / "my_faces_pairs.bin")
    train_example("example_hf.yaml", tmp_path, faces, [bin_path], **{"data.kind": "imagefolder_hf"})
    assert any((tmp_path / "hf_cache").iterdir())  # the Arrow cache went where PFCLIB_HF_CACHE says


def test_example_recordio_config_trains_on_recordio(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(IDENTITIES), PER)
    images = rng.integers(0, 256, (labels.size, 3, SIZE, SIZE), dtype=np.uint8)
    rec = write_png_recordio(tmp_path / "ms1mv3", images, labels)
    assert sorted(p.name for p in rec.iterdir()) == ["property", "train.idx", "train.rec"]
    bin_path = pairs(rec, "recordio", tmp_path / "lfw.bin")
    train_example("example_recordio.yaml", tmp_path, rec, [bin_path])


@pytest.mark.parametrize("name", ["example_folder.yaml", "example_hf.yaml", "example_recordio.yaml"])
def test_example_headers_show_the_commands(name):
    """Each example's comment header says how to make its data's verification set and how to train."""
    text = (ROOT / "configs" / name).read_text()
    header = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#"))
    assert f"-m pfclib.train --config configs/{name}" in header
    if name != "example_recordio.yaml":  # insightface RecordIO sets come with their .bin files
        assert "python -m pfclib.data.pairs --data" in header


@pytest.mark.parametrize("name", ["example_folder.yaml", "example_hf.yaml", "example_recordio.yaml"])
def test_example_paths_are_relative_to_the_config_file(name):
    """In a config file relative paths are taken from its folder: the examples' "../data/..." are the
    repository's data/ folder, wherever the command runs."""
    from pfclib.config import TrainConfig

    config = TrainConfig.from_yaml(ROOT / "configs" / name)
    paths = [config.data.path, *config.eval.verification]
    assert all(Path(p).resolve().is_relative_to(ROOT / "data") for p in paths), paths
    assert Path(config.output_dir).resolve().parent == ROOT / "results" / "train"
