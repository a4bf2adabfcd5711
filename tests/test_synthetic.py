"""Synthetic identities: sizes, label noise, pairs, determinism, storage, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import stats

from pfclib.data import build_dataset, load_verification, synthetic
from pfclib.data.synthetic import SyntheticConfig, apply_label_noise, class_sizes, make_pairs

SMALL = dict(
    num_identities=12,
    images_per_identity=5,
    image_size=16,
    heldout_identities=6,
    heldout_images_per_identity=3,
    num_pairs=20,
)


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    cfg = SyntheticConfig(**SMALL, flip_fraction=0.2, conflict_fraction=0.25, conflict_splits=2, seed=3)
    out = synthetic.generate(cfg, tmp_path_factory.mktemp("syn") / "small")
    return cfg, out


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("distribution", "zipf", "'uniform' or 'power'"),
        ("num_pairs", 7, "even"),
        ("flip_fraction", 1.0, r"\[0, 1\)"),
        ("conflict_splits", 1, ">= 2"),
        ("image_size", 4, ">= 8"),
        ("num_identities", 2.5, "an int"),
    ],
)
def test_config_rejects_bad_values(field, value, match):
    with pytest.raises(ValueError, match=match) as info:
        SyntheticConfig(**{**SMALL, field: value})
    assert field in str(info.value)


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match=r"unknown SyntheticConfig field\(s\) \['num_ids'\]"):
        SyntheticConfig.from_dict({"num_ids": 3})
    assert SyntheticConfig.from_dict({"num_identities": 7}).num_identities == 7


def test_uniform_sizes_are_exact():
    cfg = SyntheticConfig(num_identities=9, images_per_identity=4)
    np.testing.assert_array_equal(class_sizes(cfg, np.random.default_rng(0)), np.full(9, 4))


def test_power_law_histogram_matches_pmf():
    cfg = SyntheticConfig(
        num_identities=20000, distribution="power", power_exponent=1.7, min_images=2, max_images=60
    )
    sizes = class_sizes(cfg, np.random.default_rng(1))
    assert sizes.min() >= 2 and sizes.max() <= 60
    support, pmf = synthetic.power_law_pmf(cfg)
    counts = np.array([(sizes == k).sum() for k in support])
    # Pool the tail so every expected count is >= 5 for the chi-square test.
    expected = pmf * len(sizes)
    assert (expected >= 5).all()  # no pooling needed at this size
    obs, exp = counts, expected
    assert stats.chisquare(obs, exp).pvalue > 1e-3
    # The log-log slope of the head of the histogram recovers the exponent.
    head = slice(0, 15)
    slope = np.polyfit(np.log(support[head]), np.log(counts[head]), 1)[0]
    assert slope == pytest.approx(-1.7, abs=0.1)
    # Long tail: the smallest size is the most frequent; the biggest classes are rare.
    assert counts[0] == counts.max() and counts[-10:].sum() < 0.02 * len(sizes)


@pytest.mark.parametrize("splits", [2, 3])
def test_label_noise_exact_fractions(splits):
    n_id = 40
    rng = np.random.default_rng(0)
    sizes = rng.integers(3, 12, n_id)
    identity = np.repeat(np.arange(n_id), sizes)
    cfg = SyntheticConfig(
        num_identities=n_id, flip_fraction=0.3, conflict_fraction=0.25, conflict_splits=splits
    )
    noise = apply_label_noise(identity, n_id, cfg, np.random.default_rng(5))
    n_conf = round(0.25 * n_id)
    assert len(noise.conflict_identities) == n_conf
    assert noise.num_classes == n_id + n_conf * (splits - 1)
    assert noise.flipped.sum() == round(0.3 * len(identity))
    l2i = noise.label_to_identity
    np.testing.assert_array_equal(l2i[:n_id], np.arange(n_id))
    # Flipped images carry a label of another identity; all others a label of their own identity.
    assert np.all(l2i[noise.labels[noise.flipped]] != identity[noise.flipped])
    np.testing.assert_array_equal(l2i[noise.labels[~noise.flipped]], identity[~noise.flipped])
    # Conflicted identities are split into exactly `splits` non-empty labels (before flips).
    np.testing.assert_array_equal(noise.conflict, np.isin(identity, noise.conflict_identities))
    for ident in noise.conflict_identities:
        own = np.flatnonzero(l2i == ident)
        assert len(own) == splits and own[0] == ident and np.all(own[1:] >= n_id)
        kept = (identity == ident) & ~noise.flipped
        assert set(noise.labels[kept]) <= set(own.tolist())
    # Non-conflicted, unflipped images keep their identity as label.
    plain = ~noise.conflict & ~noise.flipped
    np.testing.assert_array_equal(noise.labels[plain], identity[plain])


def test_conflict_needs_enough_images():
    identity = np.repeat(np.arange(4), [1, 1, 1, 5])
    cfg = SyntheticConfig(num_identities=4, conflict_fraction=0.5, conflict_splits=2)
    with pytest.raises(ValueError, match="only 1 have that many"):
        apply_label_noise(identity, 4, cfg, np.random.default_rng(0))


def test_pairs_are_balanced_and_correct():
    pool = np.repeat(np.arange(10, 18), 3)
    a, b, same = make_pairs(pool, 200, np.random.default_rng(0))
    assert same.sum() == 100 and (~same).sum() == 100
    np.testing.assert_array_equal(pool[a] == pool[b], same)
    assert np.all(a[same] != b[same])
    assert 0 < same[:100].sum() < 100  # shuffled, not half-and-half in order


def test_identity_alone_determines_the_clean_image():
    cfg = SyntheticConfig(**SMALL, nuisance=0.0, expression=0.0, noise_std=0.0, occlusion_prob=0.0)
    renderer = synthetic.SyntheticRenderer(cfg.code_dim, 0)
    codes = np.random.default_rng(0).standard_normal((3, cfg.code_dim)).astype(np.float32)
    imgs, _ = synthetic.render_images(renderer, np.repeat(codes, 2, 0), cfg, np.random.SeedSequence(0))
    # Only the background differs between two images of one identity: compare the face centre.
    centre = (slice(None), slice(5, 11), slice(5, 11))
    assert np.array_equal(imgs[0][centre], imgs[1][centre])
    assert not np.array_equal(imgs[0][centre], imgs[2][centre])


def test_render_speed_and_range():
    cfg = SyntheticConfig(image_size=32)
    renderer = synthetic.SyntheticRenderer(cfg.code_dim, 0)
    codes = np.random.default_rng(0).standard_normal((500, cfg.code_dim)).astype(np.float32)
    imgs, occ = synthetic.render_images(renderer, codes, cfg, np.random.SeedSequence(0))
    assert imgs.shape == (500, 3, 32, 32) and imgs.dtype == np.uint8
    assert imgs.std() > 20  # not a flat image
    assert 0.02 < occ.mean() < 0.25


def test_same_seed_same_bytes_other_seed_differs(tmp_path, small_dataset):
    cfg, first = small_dataset
    again = synthetic.generate(cfg, tmp_path / "again")
    for split in ("train", "heldout", "pairs"):
        arrows = sorted((first / split).glob("*.arrow"))
        assert arrows
        for f in arrows:
            assert f.read_bytes() == (again / split / f.name).read_bytes(), f"{split}/{f.name} differs"
    assert json.loads((first / "meta.json").read_text()) == json.loads((again / "meta.json").read_text())
    other = synthetic.generate(SyntheticConfig(**{**cfg.to_dict(), "seed": 4}), tmp_path / "other")
    a = build_dataset("synthetic", first).images_uint8()
    b = build_dataset("synthetic", other).images_uint8()
    assert a.shape == b.shape and not np.array_equal(a, b)


def test_generate_refuses_to_overwrite(small_dataset):
    cfg, out = small_dataset
    with pytest.raises(FileExistsError, match="overwrite=True"):
        synthetic.generate(cfg, out)


def test_dataset_items_and_truth(small_dataset):
    cfg, out = small_dataset
    meta = synthetic.load_meta(out)
    ds = build_dataset("synthetic", out)
    n = cfg.num_identities * cfg.images_per_identity
    assert len(ds) == n == meta["num_images"]
    assert ds.num_classes == meta["num_classes"] == cfg.num_identities + round(0.25 * cfg.num_identities)
    assert ds.flipped.sum() == meta["num_flipped"] == round(0.2 * n)
    np.testing.assert_array_equal(np.bincount(ds.identities), meta["class_sizes"])
    l2i = np.asarray(meta["label_to_identity"])
    np.testing.assert_array_equal(l2i[ds.labels[~ds.flipped]], ds.identities[~ds.flipped])
    raw = ds.images_uint8()
    for i in (0, 7, n - 1):
        image, label = ds[i]
        assert image.dtype == torch.float32 and image.shape == (3, 16, 16)
        expected = (torch.from_numpy(raw[i]).double() / 255 - 0.5) / 0.5
        torch.testing.assert_close(image.double(), expected, rtol=0, atol=1e-6)
        assert label == ds.labels[i] and isinstance(label, int)
    big = build_dataset("synthetic", out / "train", image_size=24)
    assert big[0][0].shape == (3, 24, 24)


def test_heldout_and_pairs(small_dataset):
    cfg, out = small_dataset
    held = synthetic.SyntheticDataset(out, split="heldout")
    assert set(held.identities.tolist()) == set(range(12, 18))
    assert held.num_classes == 6 and held.labels.min() == 0 and held.labels.max() == 5
    vset = load_verification(out)
    assert vset.images.shape == (40, 3, 16, 16) and vset.images.dtype == torch.uint8
    assert vset.issame.sum() == 10
    pairs = load_verification(out / "pairs")
    assert torch.equal(pairs.images, vset.images)
    # Pair rows are the held-out pool images named by index_a / index_b.
    import datasets

    table = datasets.load_from_disk(str(out / "pairs")).with_format("numpy")[:]
    pool = held.images_uint8()
    np.testing.assert_array_equal(vset.images[0::2].numpy(), pool[table["index_a"]])
    np.testing.assert_array_equal(vset.images[1::2].numpy(), pool[table["index_b"]])
    np.testing.assert_array_equal(
        vset.issame.numpy(), held.identities[table["index_a"]] == held.identities[table["index_b"]]
    )


def test_cli_reads_yaml_section(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(
        "data:\n  tiny:\n    num_identities: 5\n    images_per_identity: 3\n    image_size: 8\n"
        "    heldout_identities: 2\n    heldout_images_per_identity: 2\n    num_pairs: 4\n"
    )
    out = tmp_path / "data" / "synthetic" / "tiny"
    argv = ["--params", str(params), "--section", "data.tiny", "--out", str(out), "--set", "seed=9"]
    assert synthetic.main(argv) == 0
    meta = synthetic.load_meta(out)
    assert meta["num_images"] == 15 and meta["config"]["seed"] == 9 and meta["config"]["image_size"] == 8
    assert synthetic.main(argv) == 0  # re-running replaces the folder
    with pytest.raises(KeyError, match="no section 'data.small'"):
        synthetic.main(["--params", str(params), "--section", "data.small", "--out", str(out)])
    with pytest.raises(ValueError, match="unknown SyntheticConfig"):
        synthetic.main(
            ["--params", str(params), "--section", "data.tiny", "--out", str(out), "--set", "bogus=1"]
        )
