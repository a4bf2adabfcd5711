"""python -m pfclib.embed: embeddings of an image folder by a checkpoint, against pfclib.eval.embed."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pfclib import models
from pfclib.checkpoint import CHECKPOINT_FORMAT, checkpoint_path
from pfclib.data import build_dataset
from pfclib.embed import main, resolve_checkpoint
from pfclib.eval import embed
from pfclib.io import atomic_torch_save

SIZE = 32


def make_folder(root, identities=3, per=2, size=40):
    rng = np.random.default_rng(0)
    for i in range(identities):
        (root / f"id{i}").mkdir(parents=True)
        for j in range(per):
            img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / f"id{i}" / f"{j}.png")
    return root


def make_run(run, step=7):
    torch.manual_seed(0)
    model = models.create("iresnet_tiny", embedding_size=8, image_size=SIZE)
    state = {
        "format": CHECKPOINT_FORMAT,
        "config": {"backbone": "iresnet_tiny", "embedding_size": 8, "image_size": SIZE},
        "step": step,
        "backbone": model.state_dict(),
        "head": {},
    }
    atomic_torch_save(state, checkpoint_path(run, step))
    return model.eval()


def test_embeddings_equal_the_protocol_embedding_of_each_image_in_order(tmp_path):
    data = make_folder(tmp_path / "faces")
    model = make_run(tmp_path / "run")
    out = tmp_path / "out" / "emb.npy"
    assert main(["--checkpoint", str(tmp_path / "run"), "--data", str(data), "--out", str(out)]) == 0
    emb, labels = np.load(out), np.load(tmp_path / "out" / "emb.labels.npy")
    ds = build_dataset("folder", data, image_size=SIZE)  # resized to the backbone's input size
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    ref = embed(model, images, flip=True)
    assert emb.dtype == np.float32 and emb.shape == (6, 8)
    np.testing.assert_allclose(emb, ref, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]
    meta = json.loads((tmp_path / "out" / "emb.json").read_text())
    assert meta["step"] == 7 and meta["flip"] is True and meta["count"] == 6 and meta["dim"] == 8
    assert meta["files"][2] == "id1/0.png" and meta["classes"] == ["id0", "id1", "id2"]
    # without the mirror the rows differ (the flag reaches the computation)
    out2 = tmp_path / "noflip.npy"
    main(["--checkpoint", str(tmp_path / "run"), "--data", str(data), "--out", str(out2), "--no-flip"])
    np.testing.assert_allclose(np.load(out2), embed(model, images, flip=False), rtol=0, atol=1e-6)
    assert np.abs(np.load(out2) - emb).max() > 1e-3


def test_a_run_folder_resolves_to_its_newest_checkpoint(tmp_path):
    make_run(tmp_path / "run", step=3)
    make_run(tmp_path / "run", step=12)
    assert resolve_checkpoint(tmp_path / "run").name == "ckpt_00000012.pt"
    assert resolve_checkpoint(tmp_path / "run" / "checkpoints").name == "ckpt_00000012.pt"
    given = tmp_path / "run" / "checkpoints" / "ckpt_00000003.pt"
    assert resolve_checkpoint(given) == given  # a file is taken as given, even an older one
    with pytest.raises(FileNotFoundError, match="folder without checkpoints") as exc:
        resolve_checkpoint(tmp_path)
    assert str(tmp_path) in str(exc.value)
    with pytest.raises(FileNotFoundError, match="nope.pt' does not exist"):
        resolve_checkpoint(tmp_path / "nope.pt")


def test_resolve_checkpoint_lives_in_pfclib_checkpoint_and_is_re_exported_here():
    import pfclib.checkpoint
    import pfclib.embed

    assert pfclib.embed.resolve_checkpoint is pfclib.checkpoint.resolve_checkpoint
    assert "resolve_checkpoint" in pfclib.checkpoint.__all__


def test_bad_input_is_named_and_leaves_no_file(tmp_path, capsys):
    make_run(tmp_path / "run")
    out = tmp_path / "emb.npy"
    with pytest.raises(SystemExit):
        main(
            ["--checkpoint", str(tmp_path / "run"), "--data", str(tmp_path), "--out", str(tmp_path / "e.txt")]
        )
    assert "--out must name a .npy file" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="no such folder"):
        main(["--checkpoint", str(tmp_path / "run"), "--data", str(tmp_path / "missing"), "--out", str(out)])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no identity sub-folders"):
        main(["--checkpoint", str(tmp_path / "run"), "--data", str(tmp_path / "empty"), "--out", str(out)])
    assert not list(tmp_path.glob("emb*")) and not list(tmp_path.glob(".emb*"))


def test_hf_dataset_output_holds_ids_labels_and_the_same_embeddings(tmp_path, capsys):
    import datasets

    data = make_folder(tmp_path / "faces")
    make_run(tmp_path / "run")
    run = ["--checkpoint", str(tmp_path / "run"), "--data", str(data)]
    assert main([*run, "--out", str(tmp_path / "emb.npy")]) == 0
    out = tmp_path / "out" / "emb_ds"
    assert main([*run, "--format", "hf", "--out", str(out)]) == 0
    ds = datasets.load_from_disk(str(out))
    assert ds.column_names == ["id", "label", "embedding"] and len(ds) == 6
    assert ds["id"][2] == "id1/0.png" and ds["label"] == [0, 0, 1, 1, 2, 2]
    np.testing.assert_array_equal(
        np.asarray(ds["embedding"], dtype=np.float32), np.load(tmp_path / "emb.npy")
    )
    meta = json.loads(ds.info.description)
    assert meta["step"] == 7 and meta["dim"] == 8
    # written again over itself: replaced, and no temporary folder is left beside it
    assert main([*run, "--format", "hf", "--out", str(out), "--no-flip"]) == 0
    assert json.loads(datasets.load_from_disk(str(out)).info.description)["flip"] is False
    assert sorted(p.name for p in out.parent.iterdir()) == ["emb_ds"]
    # a .npy name with --format hf, and an existing folder that is not a dataset, are refused
    with pytest.raises(SystemExit):
        main([*run, "--format", "hf", "--out", str(tmp_path / "x.npy")])
    assert "writes a dataset folder" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    with pytest.raises(SystemExit):
        main([*run, "--format", "hf", "--out", str(tmp_path / "mine")])
    assert "is not an HF dataset folder" in capsys.readouterr().err
