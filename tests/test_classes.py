"""pfcrepro.classes: class-size buckets, update rates, center angles, drift and movement of a trained head."""

import math

import numpy as np
import pytest
import torch

from pfcrepro import classes, trials


def test_size_buckets_labels_and_assignment():
    buckets = classes.size_buckets([1, 2, 3, 4, 9, 10, 500], edges=[1, 2, 4, 10])
    assert list(buckets.categories) == ["1", "2-3", "4-9", "10+"]
    assert list(buckets) == ["1", "2-3", "2-3", "4-9", "4-9", "10+", "10+"]
    with pytest.raises(ValueError, match="below the first edge"):
        classes.size_buckets([0, 3], edges=[1, 5])
    with pytest.raises(ValueError, match="increasing"):
        classes.size_buckets([3], edges=[5, 5])


def test_updates_by_class_size_aggregates_counters():
    sizes = [2, 2, 3, 50, 60]
    active = [1, 3, 2, 40, 50]
    passive = [9, 7, 8, 60, 50]
    out = classes.updates_by_class_size(sizes, active, passive, steps=100, edges=[1, 10])
    assert list(out["bucket"]) == ["1-9", "10+"]
    assert list(out["classes"]) == [3, 2] and list(out["images"]) == [7, 110]
    assert out["active_per_class"].tolist() == pytest.approx([2.0, 45.0])
    assert out["passive_per_class"].tolist() == pytest.approx([8.0, 55.0])
    assert out["passive_rate"].tolist() == pytest.approx([0.08, 0.55])
    assert out["passive_share"].tolist() == pytest.approx([24 / 30, 110 / 200])
    with pytest.raises(ValueError, match="steps"):
        classes.updates_by_class_size(sizes, active, passive, steps=50, edges=[1])
    with pytest.raises(ValueError, match="one length"):
        classes.updates_by_class_size(sizes, active[:2], passive, steps=100, edges=[1])


def test_row_angles_in_degrees_fp64():
    a = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [2.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([[0.0, 3.0], [1.0, 1.0], [-1.0, 0.0], [5.0, 0.0], [1.0, 0.0]], dtype=torch.float32)
    angles = classes.row_angles(a, b)
    assert angles.dtype == np.float64
    np.testing.assert_allclose(angles[:4], [90.0, 45.0, 180.0, 0.0], rtol=0, atol=1e-9)
    assert math.isnan(angles[4])
    with pytest.raises(ValueError, match="one shape"):
        classes.row_angles(a, a[:2])


def _hypergeometric_inclusion(sizes, batch):
    """P(class c in a batch of `batch` images drawn without replacement), by enumerating all batches."""
    import itertools

    labels = np.repeat(np.arange(len(sizes)), sizes)
    hits = np.zeros(len(sizes))
    batches = list(itertools.combinations(range(len(labels)), batch))
    for b in batches:
        hits[np.unique(labels[list(b)])] += 1
    return hits / len(batches)


def test_expected_update_rates_matches_enumeration():
    sizes = [1, 2, 3, 1, 5]
    q = _hypergeometric_inclusion(sizes, 3)
    active, passive = classes.expected_update_rates(sizes, batch_size=3, sample_rate=1.0)
    np.testing.assert_allclose(active, q, rtol=0, atol=1e-12)
    np.testing.assert_allclose(passive, 1 - q, rtol=0, atol=1e-12)  # r = 1: every non-positive, every step
    active, passive = classes.expected_update_rates(sizes, batch_size=3, sample_rate=0.8)
    k, expected_positives = 4, q.sum()
    np.testing.assert_allclose(
        passive, (1 - q) * (k - expected_positives) / (5 - expected_positives), atol=1e-12
    )
    # k below the expected positives: no negatives are sampled
    _, passive = classes.expected_update_rates(sizes, batch_size=3, sample_rate=0.2)
    assert np.all(passive == 0)
    # a class larger than N - B is in every batch
    active, _ = classes.expected_update_rates([1, 9], batch_size=2, sample_rate=1.0)
    assert active[1] == 1.0 and active[0] == pytest.approx(2 / 10)
    with pytest.raises(ValueError, match="batch_size"):
        classes.expected_update_rates([1, 2], batch_size=4, sample_rate=1.0)


TINY_DATA = {"num_identities": 12, "images_per_identity": 3, "heldout_identities": 4, "num_pairs": 8,
             "heldout_images_per_identity": 2, "image_size": 16, "seed": 3}  # fmt: skip


def _tiny_config(tmp_path, data, name, **head):
    return {
        "output_dir": str(tmp_path / name), "backbone": "mobilefacenet_tiny", "embedding_size": 8,
        "image_size": 16, "max_steps": 3, "device": "cpu", "seed": 5,
        "data": {"kind": "synthetic", "path": str(data), "batch_size": 6},
        "head": {"track_updates": True, "margin": {"name": "cosface", "s": 16.0, "m": 0.2}, **head},
        "log": {"csv": False, "tensorboard": False, "progress": "off"},
        "checkpoint": {"at_end": True},
    }  # fmt: skip


def test_class_analysis_drift_is_measured_from_the_centers_the_trainer_started_from(tmp_path):
    from pfclib.checkpoint import load_head
    from pfclib.data.synthetic import load_meta
    from pfclib.head import init_centers
    from pfclib.train import training_function

    data = trials.ensure_dataset(tmp_path / "data", TINY_DATA)
    started = {}

    def capture(event, info):
        if event == "start":
            started["weight"] = info["head"].weight.detach().clone()

    metrics = training_function(_tiny_config(tmp_path, data, "run", sample_rate=0.5), callback=capture)
    trainer_initial = started["weight"]
    assert trainer_initial.dtype == torch.float32
    # rebuilt in the trainer's dtype, then widened: exactly the trainer's numbers
    rebuilt = classes.initial_centers(12, 8, 5)
    assert rebuilt.dtype == torch.float64 and torch.equal(rebuilt, trainer_initial.double())
    # drawing them in float64 directly is another random stream: not the trainer's centers
    assert not torch.allclose(init_centers(0, 12, 8, 5, torch.float64), trainer_initial.double(), atol=1e-4)
    df = classes.class_analysis(metrics["checkpoint"], data, flip=False)
    assert list(df["label"]) == list(range(12))
    assert df["size"].tolist() == load_meta(data)["label_sizes"]
    assert (df["steps"] == 3).all()
    assert ((df["active"] + df["passive"]) <= 3).all() and df["active"].sum() > 0
    assert df["train_top1"].between(0, 1).all()
    final = load_head(metrics["checkpoint"])["weight"]
    np.testing.assert_allclose(df["drift_deg"], classes.row_angles(trainer_initial, final), rtol=0, atol=1e-9)
    assert (df["drift_deg"] > 0).all()  # the dense update moves every center
    assert df["center_to_mean_deg"].between(0, 180).all()


def test_movement_recorder_dense_moves_every_row_sparse_only_the_sampled(tmp_path):
    data = trials.ensure_dataset(tmp_path / "data", TINY_DATA)
    recorder = classes.MovementRecorder(range(12))
    design = trials.factorial(
        {"update": {"dense": {"head.update": "dense"}, "sparse": {"head.update": "sparse"}}}, seeds=[5]
    )
    base = _tiny_config(tmp_path, data, "unused", sample_rate=0.25)
    runs = trials.run_trials(base, design, tmp_path / "runs", train_fn=recorder.train, log=None)
    moved = recorder.frame().merge(runs[["output_dir", "update", "checkpoint"]], on="output_dir")
    assert len(moved) == 2 * 12 and (moved["steps"] == 3).all()
    dense = moved[moved["update"] == "dense"]
    # dense update: momentum and weight decay move every row in every step, sampled or not
    assert (dense["moved_steps"] == 3).all() and (dense["moved_fraction"] == 1.0).all()
    sparse = moved[moved["update"] == "sparse"].sort_values("label")
    # sparse update: a row moves exactly in the steps in which it was sampled (positive or negative)
    (checkpoint,) = sparse["checkpoint"].unique()
    counters = classes.class_analysis(checkpoint, data, flip=False)
    touched = (counters["active"] + counters["passive"]).to_numpy()
    np.testing.assert_array_equal(sparse["moved_steps"].to_numpy(), touched)
    assert touched.sum() < 3 * 12  # with r = 0.25 some rows were left out in some step
    with pytest.raises(ValueError, match=">= 0"):
        classes.MovementRecorder([-1])
