"""python -m pfclib.data.pairs: identity-disjoint, balanced k-fold verification pairs from one's own folder."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pfclib.data import build_dataset
from pfclib.data.base import resize_uint8
from pfclib.data.pairs import main, plan_pairs
from pfclib.data.verification import load_verification


def make_folder(root, identities=30, per=3, size=20, seed=0):
    rng = np.random.default_rng(seed)
    for i in range(identities):
        (root / f"person{i:02d}").mkdir(parents=True)
        for j in range(per + (i % 2)):  # 3 or 4 images each
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                root / f"person{i:02d}" / f"{j}.png"
            )
    return root


def test_pairs_are_balanced_identity_disjoint_folds_of_held_out_identities(tmp_path):
    data = make_folder(tmp_path / "faces")
    out = tmp_path / "pairs" / "mine.bin"
    args = ["--data", str(data), "--out", str(out), "--pairs", "60", "--nfolds", "5", "--holdout", "0.4"]
    assert main([*args, "--image-size", "16", "--train-folder", str(tmp_path / "train")]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    vset = load_verification(out)
    ds = build_dataset("folder", data)
    labels = ds.labels
    assert vset.num_pairs == meta["pairs"] == 60 and int(vset.issame.sum()) == 30
    assert len(meta["heldout_labels"]) == 12 and len(set(meta["heldout_labels"])) == 12  # 40% of 30
    fold_of = {c: f for f, fold in enumerate(meta["folds"]) for c in fold}
    for p, (a, b, same) in enumerate(meta["pair_items"]):
        assert same == bool(vset.issame[p]) == (labels[a] == labels[b]) and a != b
        f = p // 12  # pfclib.eval's contiguous folds: 12 pairs each, 6 genuine
        assert fold_of[int(labels[a])] == f and fold_of[int(labels[b])] == f
        # the images are the data set's, resized (PNG: exact)
        assert torch.equal(vset.images[2 * p], resize_uint8(ds.read_uint8(a)[0][None], 16)[0])
    for f in range(5):
        assert int(vset.issame[12 * f : 12 * (f + 1)].sum()) == 6
    assert len({(a, b) for a, b, _ in meta["pair_items"]}) == 60
    # the training folder links exactly the identities that were not held out
    train = build_dataset("folder", tmp_path / "train")
    held_names = set(meta["heldout_names"])
    assert set(train.classes) == set(ds.classes) - held_names and len(train.classes) == 18
    # the same seed gives the same set
    main([*args, "--image-size", "16"][:-2] + ["--out", str(tmp_path / "again.bin"), "--image-size", "16"])
    assert json.loads((tmp_path / "again.json").read_text())["pair_items"] == meta["pair_items"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"num_pairs": 100, "nfolds": 10},
            r"needs at least 20 identities with 2 or more images .* has 12 of 12",
        ),
        (
            {"num_pairs": 8, "nfolds": 5},
            r"8 pairs cannot give each of 5 folds a genuine and an impostor pair: ask for at least 10",
        ),
        (
            {"num_pairs": 400, "nfolds": 5},
            r"fold 0: its 2 identities have 2 distinct genuine pairs, 40 are needed",
        ),
        ({"num_pairs": 100, "nfolds": 5, "holdout": 1.5}, r"holdout must be a fraction in \(0, 1\), got 1.5"),
    ],
)
def test_plans_that_cannot_be_made_are_explained(kwargs, message):
    labels = np.repeat(np.arange(12), 2)  # 12 identities of 2 images
    if kwargs.get("nfolds") == 5 and kwargs["num_pairs"] == 100:
        labels = np.repeat(np.arange(40), 2)
    with pytest.raises(ValueError, match=message):
        plan_pairs(labels, **kwargs)


def test_cli_errors_name_the_value(tmp_path, capsys):
    data = make_folder(tmp_path / "faces", identities=4)
    with pytest.raises(SystemExit):
        main(["--data", str(data), "--out", str(tmp_path / "p.txt")])
    assert "--out must name a .bin file" in capsys.readouterr().err
    with pytest.raises(ValueError, match="has 4 of 4"):
        main(["--data", str(data), "--out", str(tmp_path / "p.bin")])
    with pytest.raises(FileNotFoundError):
        main(["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "p.bin")])
    assert not list(tmp_path.glob("p.*")) and not list(tmp_path.glob(".p*"))
