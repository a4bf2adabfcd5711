"""The feature-level experiment: its world is what the docstring says, and training learns it."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pandas as pd
import pytest
import torch

from pfcrepro import features as fx

SMALL = dict(
    num_identities=300, samples_per_class=6, heldout_identities=60, heldout_samples=4, num_pairs=2000
)


def test_world_is_deterministic_and_noise_changes_labels_only():
    clean = fx.make_world(fx.FeatureWorld(**SMALL))
    again = fx.make_world(fx.FeatureWorld(**SMALL))
    assert torch.equal(clean.features, again.features) and torch.equal(clean.pair_a, again.pair_a)
    flip = fx.make_world(fx.FeatureWorld(**SMALL, flip_fraction=0.4))
    conflict = fx.make_world(fx.FeatureWorld(**SMALL, conflict_fraction=0.3, conflict_splits=2))
    for noisy in (flip, conflict):
        # the same samples and held-out pairs: only the labels differ
        assert torch.equal(noisy.features, clean.features)
        assert torch.equal(noisy.pair_a, clean.pair_a) and torch.equal(noisy.issame, clean.issame)
        assert torch.equal(noisy.identity, clean.identity)
    assert torch.equal(clean.labels, clean.identity) and clean.num_classes == 300
    # flips: exactly 40 % of the samples, each moved to another class
    n = clean.labels.numel()
    assert int(flip.flipped.sum()) == round(0.4 * n)
    assert (flip.labels[flip.flipped] != flip.identity[flip.flipped]).all()
    assert torch.equal(flip.labels[~flip.flipped], flip.identity[~flip.flipped])
    # conflict: 90 identities split over 2 labels each, every label used
    assert conflict.num_classes == 300 + 90
    per_identity = {}
    for ident, label in zip(conflict.identity.tolist(), conflict.labels.tolist()):
        per_identity.setdefault(ident, set()).add(label)
    assert sum(len(v) == 2 for v in per_identity.values()) == 90
    assert all(len(v) in (1, 2) for v in per_identity.values())
    assert set(conflict.labels.tolist()) == set(range(390))
    # balanced pairs; genuine pairs share an identity by construction
    assert int(clean.issame.sum()) == 1000


def test_training_learns_what_an_untrained_net_cannot():
    world = fx.make_world(fx.FeatureWorld(**{**SMALL, "num_identities": 2000, "samples_per_class": 4}))
    base = dict(batch_size=128, embedding_size=64, width=256, warmup_steps=30, seed=0)
    untrained = fx.train(world, {**base, "steps": 0})
    trained = fx.train(world, {**base, "steps": 300})  # about 0.86 against 0.65
    assert untrained["acc"] < 0.75
    assert trained["acc"] > untrained["acc"] + 0.12
    assert math.isfinite(trained["final_loss"])
    assert trained["tar@1e-3"] is not None and trained["tar@1e-4"] is None  # 1000 impostors
    # a seed fixes everything: the same run twice gives the same accuracy
    assert fx.train(world, {**base, "steps": 30})["acc"] == fx.train(world, {**base, "steps": 30})["acc"]


def test_sampling_keeps_k_and_design_rows():
    world = fx.FeatureWorld(**SMALL)
    runs = fx.run_design(
        {"clean": world.to_dict()},
        {"full": {"sample_rate": 1.0}, "pfc": {"sample_rate": 0.1}},
        None,
        [0, 1],
        {"steps": 5, "batch_size": 32, "embedding_size": 16, "width": 32, "warmup_steps": 1},
        log=None,
    )
    assert list(runs["method"]) == ["full", "full", "pfc", "pfc"]
    assert list(runs["k"]) == [300, 300, 30, 30]


def test_a_design_in_workers_equals_the_same_design_here_on_one_thread():
    """Worker processes (one thread each) give exactly the rows of the same design trained here on
    one thread: each worker builds the same world from its fields and the seed fixes the rest."""
    world = fx.FeatureWorld(**SMALL).to_dict()
    worlds = {"clean": world, "flip": {**world, "flip_fraction": 0.3}}
    arms = {"full": {"sample_rate": 1.0}, "pfc": {"sample_rate": 0.1}}
    base = {"steps": 6, "batch_size": 32, "embedding_size": 16, "width": 32, "warmup_steps": 1}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        here = fx.run_design(worlds, arms, None, [0, 1], base, log=None)
    finally:
        torch.set_num_threads(threads)
    lines = []
    there = fx.run_design(worlds, arms, None, [0, 1], base, log=lines.append, workers=2)
    cols = ["condition", "method", "seed", "acc", "auc", "final_loss", "k"]
    pd.testing.assert_frame_equal(here[cols], there[cols])
    assert here["final_loss"].nunique() == 8  # every run differs from every other
    assert len(lines) == 8 and all("seed" in line for line in lines)
    with pytest.raises(ValueError, match="unknown FeatureWorld fields"):
        fx.run_design({"a": {"num_ids": 3}}, arms, None, [0, 1], base, log=None, workers=2)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="flip_fraction"):
        fx.FeatureWorld(flip_fraction=1.0)
    with pytest.raises(ValueError, match="unknown FeatureWorld fields"):
        fx.FeatureWorld.from_dict({"num_ids": 3})
    with pytest.raises(ValueError, match="unknown TrainSettings fields"):
        fx.TrainSettings.from_dict({"lr_head": 3})
    with pytest.raises(ValueError, match="conflict_splits"):
        fx.FeatureWorld(samples_per_class=2, conflict_splits=3)
    with pytest.raises(ValueError, match="cell"):
        fx.run_design({"a": {}}, {"m": {}}, [["a", "x"]], [0], {}, log=None)


def test_a_diverging_run_is_never_scored():
    world = fx.make_world(fx.FeatureWorld(**SMALL))
    with pytest.raises(FloatingPointError, match="diverged"):
        fx.train(world, {"steps": 50, "batch_size": 64, "lr": 1.0e30, "warmup_steps": 1})


POWER = dict(
    num_identities=2000,
    distribution="power",
    power_exponent=1.5,
    min_samples=2,
    max_samples=40,
    heldout_identities=20,
    heldout_samples=4,
    num_pairs=200,
    seed=1,
)


def test_power_law_sizes_are_within_bounds_deterministic_and_drive_the_world():
    sizes = fx.identity_sizes(fx.FeatureWorld(**POWER))
    assert torch.equal(sizes, fx.identity_sizes(POWER))  # a mapping works too; same seed, same sizes
    assert not torch.equal(sizes, fx.identity_sizes({**POWER, "seed": 2}))
    assert sizes.dtype == torch.int64 and sizes.shape == (2000,)
    assert int(sizes.min()) == 2 and int(sizes.max()) <= 40
    # the truncated power law: P(2) = 2^-1.5 / sum_{n=2}^{40} n^-1.5 ~ 0.28, mean ~ 7.2
    support = torch.arange(2, 41, dtype=torch.float64)
    pmf = support**-1.5 / (support**-1.5).sum()
    assert abs(float((sizes == 2).double().mean()) - float(pmf[0])) < 0.04
    assert abs(float(sizes.double().mean()) - float((support * pmf).sum())) < 0.6
    world = fx.make_world(fx.FeatureWorld(**POWER))
    assert world.features.shape == (int(sizes.sum()), 96)
    assert torch.equal(world.identity, torch.arange(2000).repeat_interleave(sizes))
    assert torch.equal(world.labels, world.identity) and torch.equal(world.sizes, sizes)
    assert fx.describe_world(world)["samples"] == int(sizes.sum())
    # the same world again, bit for bit
    assert torch.equal(fx.make_world(POWER).features, world.features)


def test_power_law_conflict_splits_only_identities_with_enough_samples():
    cfg = fx.FeatureWorld(**{**POWER, "conflict_fraction": 0.5, "conflict_splits": 3})
    world = fx.make_world(cfg)
    sizes = fx.identity_sizes(cfg)
    eligible = int((sizes >= 3).sum())
    n_split = round(0.5 * eligible)
    assert world.num_classes == 2000 + 2 * n_split
    assert set(world.labels.tolist()) == set(range(world.num_classes))  # every label used
    labels_of = {}
    for ident, label in zip(world.identity.tolist(), world.labels.tolist()):
        labels_of.setdefault(ident, set()).add(label)
    split = [i for i, labels in labels_of.items() if len(labels) > 1]
    assert len(split) == n_split and all(len(labels_of[i]) == 3 for i in split)
    assert int(sizes[split].min()) >= 3
    assert int(world.sizes.sum()) == world.labels.numel() and int(world.sizes.min()) >= 1
    with pytest.raises(ValueError, match="max_samples"):
        fx.FeatureWorld(**{**POWER, "max_samples": 1})
    with pytest.raises(ValueError, match="conflict_splits"):
        fx.FeatureWorld(**{**POWER, "max_samples": 4, "conflict_splits": 5})
    with pytest.raises(ValueError, match="distribution"):
        fx.FeatureWorld(distribution="zipf")


def _fingerprint(world) -> str:
    h = hashlib.sha256()
    for t in (world.labels, world.identity, world.flipped.to(torch.int64), world.issame.to(torch.int64)):
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize(
    "noise, digest, num_classes",
    [
        ({}, "6c6e946c0285ecf4", 300),
        ({"flip_fraction": 0.4}, "8529d07be15889a2", 300),
        ({"conflict_fraction": 0.3, "conflict_splits": 3}, "2bd30a7409f26347", 480),
    ],
)
def test_uniform_worlds_are_those_made_before_power_laws_existed(noise, digest, num_classes):
    # digests and values recorded from make_world before the `distribution` option was added
    world = fx.make_world(fx.FeatureWorld(**SMALL, **noise))
    assert _fingerprint(world) == digest and world.num_classes == num_classes
    close = dict(rtol=1e-4, atol=1e-5)
    assert torch.allclose(world.features[0, :3], torch.tensor([-1.198056, -0.066377, -1.467589]), **close)
    assert torch.allclose(world.features[-1, :3], torch.tensor([-0.50825, 0.15148, 0.338996]), **close)
    assert torch.allclose(world.pair_a[7, :3], torch.tensor([-1.190749, -0.68737, -0.1246]), **close)
    assert math.isclose(float(world.features.double().sum()), -7809.0465, rel_tol=1e-5)


def test_train_tracked_counts_updates_and_movement(monkeypatch):
    from pfcrepro.classes import expected_update_rates

    world = fx.make_world({**POWER, "num_identities": 500})
    # power 0: a constant rate after the warm-up, so no dense update is small enough to round away
    base = dict(steps=40, batch_size=32, embedding_size=16, width=32, warmup_steps=5, power=0.0)
    tail = np.flatnonzero(world.sizes.numpy() == 2)[:50]
    # r = 1: every class is in every step's softmax, as a positive or as a negative
    res, full = fx.train_tracked(world, {**base, "sample_rate": 1.0}, tail)
    assert list(full.columns) == ["label", "size", "active", "passive", "moved", "steps"]
    assert (full["active"] + full["passive"] == 40).all() and (full["steps"] == 40).all()
    assert np.array_equal(full["size"].to_numpy(), world.sizes.numpy())
    assert (full.loc[tail, "moved"] == 40).all()
    assert full["moved"].notna().sum() == len(tail) == res["tracked"]
    # the counters change nothing: the run is the one `train` makes
    settings = {**base, "sample_rate": 0.1}
    res, dense = fx.train_tracked(world, settings, tail)
    plain = fx.train(world, settings)
    assert {k: res[k] for k in plain if k not in ("train_s", "step_ms")} == {
        k: v for k, v in plain.items() if k not in ("train_s", "step_ms")
    }
    assert (dense.loc[tail, "moved"] == 40).all()  # dense: momentum and weight decay move every row
    monkeypatch.setattr(fx, "DEFAULT_TRACKED", 100)
    _, sparse = fx.train_tracked(world, {**settings, "update": "sparse"})  # default: the smallest classes
    tracked = sparse[sparse["moved"].notna()]
    assert len(tracked) == 100 and tracked["size"].max() <= sparse[sparse["moved"].isna()]["size"].min()
    assert (tracked["moved"] == tracked["active"] + tracked["passive"]).all()  # sparse: only when sampled
    assert (sparse["active"] == dense["active"]).all() and (sparse["passive"] == dense["passive"]).all()
    # the passive rate is what the sampler implies (~ (k - E[P]) / (C - E[P]) for a non-positive)
    _, passive = expected_update_rates(world.sizes.numpy(), 32, 0.1)
    assert abs(sparse["passive"].mean() / 40 - passive.mean()) < 0.1 * passive.mean()
    # sub-centers: a class is tracked over its K rows (labels index classes, not weight rows), so
    # labels beyond C / K are valid and a sparse class moves exactly when it is sampled
    _, sub = fx.train_tracked(world, {**settings, "update": "sparse", "sub_centers": 3}, tail)
    assert (sub.loc[tail, "moved"] == sub.loc[tail, "active"] + sub.loc[tail, "passive"]).all()
    assert (sub.loc[tail, "active"] + sub.loc[tail, "passive"]).gt(0).any()


def test_pair_identities_truncated_accuracy_and_opis_come_from_the_pairs():
    world = fx.make_world(fx.FeatureWorld(**SMALL))
    # genuine pairs have one identity, impostor pairs two; the features of equal identities come
    # from the same held-out block of heldout_samples rows
    same = world.pair_identity_a == world.pair_identity_b
    assert torch.equal(same, world.issame)
    assert int(world.pair_identity_a.max()) < SMALL["heldout_identities"]
    backbone = fx.MLPBackbone(world.config.feature_dim, 16, 32, 1).eval()
    res = fx.evaluate(backbone, world, eval_dims=(4, 16))
    # d = all dimensions is the full accuracy; the truncated one is computed on the first d columns
    assert res["acc@16d"] == res["acc"]
    from pfclib.eval import evaluate_pairs, opis, pair_scores

    with torch.no_grad():
        a, b = backbone(world.pair_a), backbone(world.pair_b)
    assert res["acc@4d"] == evaluate_pairs(a[:, :4].numpy(), b[:, :4].numpy(), world.issame.numpy())["acc"]
    scores = pair_scores(a.numpy(), b.numpy())
    ids = (world.pair_identity_a.numpy(), world.pair_identity_b.numpy())
    assert res["opis"] == opis(scores, world.issame.numpy(), *ids, far_levels=(1e-2, 1e-3))["opis"]
    # levels the pairs cannot support are left out; none supported -> None
    few = fx.make_world(fx.FeatureWorld(**{**SMALL, "num_pairs": 40}))
    assert fx.evaluate(backbone, few)["opis"] is None
    with pytest.raises(ValueError, match=r"eval_dims entries must be in \[1, 16\], got 17"):
        fx.evaluate(backbone, world, eval_dims=(17,))


def test_sub_centers_and_dimension_sampling_reach_the_head():
    world = fx.make_world(fx.FeatureWorld(**SMALL))
    base = {"steps": 3, "batch_size": 32, "embedding_size": 16, "width": 32, "warmup_steps": 1}
    seen = {}

    def on_start(head):
        seen["head"] = head

    settings = fx.TrainSettings.from_dict({**base, "sub_centers": 3, "dim_sample_rate": 0.5})
    fx._fit(world, settings, on_start=on_start)
    head = seen["head"]
    assert head.sub_centers == 3 and head.num_dims == 8
    assert head.weight.shape == (SMALL["num_identities"] * 3, 16)
    res = fx.train(world, {**base, "eval_dims": (8,)})
    assert {"acc", "acc@8d", "opis"} <= set(res)
