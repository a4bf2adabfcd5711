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


# --------------------------------------------------------------------------------------------
# Recorded per-image degradations (blur, noise level, pose, occlusion)


def _sha(array: np.ndarray) -> str:
    import hashlib

    a = np.ascontiguousarray(array)
    return hashlib.sha256(str(a.dtype).encode() + str(a.shape).encode() + a.tobytes()).hexdigest()[:16]


def _columns(out, split: str) -> dict[str, np.ndarray]:
    import datasets

    ds = datasets.load_from_disk(str(out / split))
    table = ds.with_format("numpy")[:]
    return {name: np.asarray(table[name]) for name in ds.column_names}


# sha256 (first 16 hex digits) of every column, computed with the generator as it was before the
# degradation options existed (numpy 2.4, x86-64), for PINNED_CFG below. Integer and boolean columns
# are platform independent; the images come from float32 numpy maths (exp, tanh, cos), whose last
# bits may differ with another numpy build or CPU: if only the image hashes fail on a new platform,
# check there with the code of before the change before suspecting the generator.
PINNED_CFG = dict(
    SMALL, flip_fraction=0.2, conflict_fraction=0.25, conflict_splits=2, seed=3, occlusion_prob=0.3
)
PINNED_DTYPES = {
    "image": np.uint8,
    "label": np.int64,
    "identity": np.int64,
    "flipped": bool,
    "conflict": bool,
}
PINNED = {
    "train/image": "a161d324d5311cb6",
    "train/label": "d1ecbcd35efba199",
    "train/identity": "5b22bf0a96624406",
    "train/flipped": "f437fedd659f2567",
    "train/conflict": "61bee39ca805f5bd",
    "train/occluded": "5e50da4981a37b29",
    "heldout/image": "e3bc5d3228ecf735",
    "heldout/identity": "32bfcd1be3f16200",
    "pairs/image_a": "067c6a3f1971fe4a",
    "pairs/image_b": "c520b9097794caab",
    "pairs/issame": "b3f0cef309055bc3",
    "pairs/identity_a": "27c42439c98c395c",
    "pairs/identity_b": "816f2629961a5dce",
    "pairs/index_a": "a8baed4792d938e1",
    "pairs/index_b": "895b1ac901f368fc",
}
# render_images at image_size=256 (two chunks of 16 images), 20 images, SeedSequence(7).
PINNED_RENDER = ("742203038720a3aa", "63b5b21c36e910af")


def _pinned_dtype(name: str):
    base = name.removesuffix("_a").removesuffix("_b")
    if base in PINNED_DTYPES:
        return PINNED_DTYPES[base]
    return np.int64 if base.startswith("index") else bool


@pytest.mark.parametrize(
    "off",
    [
        {},  # the defaults
        # degradation options at other values but switched off, and a noise range of zero width
        {"blur_max": 3.0, "pose_extreme_deg": 90.0, "noise_std_max": 0.03},
    ],
    ids=["defaults", "options-off"],
)
def test_defaults_reproduce_the_bytes_of_before(tmp_path, off):
    cfg = SyntheticConfig(**PINNED_CFG, **off)
    out = synthetic.generate(cfg, tmp_path / "pinned")
    got = {}
    for split in ("train", "heldout", "pairs"):
        cols = _columns(out, split)
        for key in PINNED:
            s, name = key.split("/")
            if s == split:
                got[key] = _sha(cols[name].astype(_pinned_dtype(name)))
    assert got == PINNED
    meta = synthetic.load_meta(out)
    assert meta["num_occluded"] == 18 and meta["num_flipped"] == 12 and meta["num_classes"] == 15
    assert meta["num_blurred"] == 0 and meta["num_pose_extreme"] == 0
    # The new truth columns hold the off values.
    train = _columns(out, "train")
    assert (train["blur_sigma"] == 0).all() and (train["noise_std"] == np.float32(0.03)).all()
    big = SyntheticConfig(image_size=256, **off)
    renderer = synthetic.SyntheticRenderer(big.code_dim, 0)
    codes = np.random.default_rng(0).standard_normal((20, big.code_dim)).astype(np.float32)
    imgs, occ = synthetic.render_images(renderer, codes, big, np.random.SeedSequence(7))
    assert (_sha(imgs), _sha(occ)) == PINNED_RENDER


DEGRADED = dict(
    SMALL,
    image_size=24,
    blur_prob=0.5,
    blur_max=2.0,
    noise_std=0.01,
    noise_std_max=0.08,
    pose_extreme_prob=0.3,
    pose_extreme_deg=70.0,
    occlusion_prob=0.3,
    seed=5,
)


@pytest.fixture(scope="module")
def degraded_dataset(tmp_path_factory):
    cfg = SyntheticConfig(**DEGRADED)
    return cfg, synthetic.generate(cfg, tmp_path_factory.mktemp("deg") / "degraded")


def test_degradation_truth_is_stored_per_image(degraded_dataset):
    cfg, out = degraded_dataset
    f32 = np.float32
    train, held, pairs = (_columns(out, s) for s in ("train", "heldout", "pairs"))
    n, m, p = len(train["label"]), len(held["identity"]), len(pairs["issame"])
    assert (n, m, p) == (60, 18, 20)
    # Existing columns first, in their order; the truth appended.
    assert list(train) == [
        "image", "label", "identity", "flipped", "conflict", "occluded", "blur_sigma", "noise_std", "pose_deg"
    ]  # fmt: skip
    assert list(held) == ["image", "identity", "occluded", "blur_sigma", "noise_std", "pose_deg"]
    assert list(pairs)[:7] == [
        "image_a",
        "image_b",
        "issame",
        "identity_a",
        "identity_b",
        "index_a",
        "index_b",
    ]
    for cols, rows in ((train, n), (held, m)):
        assert cols["occluded"].dtype == bool and cols["occluded"].shape == (rows,)
        for name in ("blur_sigma", "noise_std", "pose_deg"):
            assert cols[name].dtype == f32 and cols[name].shape == (rows,), name
        sigma = cols["blur_sigma"]
        assert (sigma >= 0).all() and (sigma <= cfg.blur_max).all() and 0 < (sigma > 0).sum() < rows
        assert (cols["noise_std"] >= f32(cfg.noise_std)).all() and (
            cols["noise_std"] <= f32(cfg.noise_std_max)
        ).all()
        assert len(np.unique(cols["noise_std"])) == rows  # drawn per image
        assert (cols["pose_deg"] >= 0).all() and (cols["pose_deg"] <= cfg.pose_extreme_deg).all()
    for name in synthetic.TRUTH_COLUMNS:
        for side in "ab":
            col = pairs[f"{name}_{side}"]
            assert col.dtype == held[name].dtype and col.shape == (p,)
            np.testing.assert_array_equal(col, held[name][pairs[f"index_{side}"]])
    meta = synthetic.load_meta(out)
    assert meta["num_blurred"] == int((train["blur_sigma"] > 0).sum())
    assert meta["num_occluded"] == int(train["occluded"].sum())
    assert meta["heldout"]["num_blurred"] == int((held["blur_sigma"] > 0).sum())
    assert meta["heldout"]["num_occluded"] == int(held["occluded"].sum())
    assert meta["mean_noise_std"] == pytest.approx(train["noise_std"].astype(np.float64).mean())
    assert meta["config"]["noise_std_max"] == 0.08 and meta["config"]["blur_prob"] == 0.5
    # The readers still work and expose the truth.
    ds = build_dataset("synthetic", out)
    assert len(ds) == n and ds[0][0].shape == (3, 24, 24)
    for name in synthetic.TRUTH_COLUMNS:
        np.testing.assert_array_equal(ds.truth[name], train[name])
    hds = synthetic.SyntheticDataset(out, split="heldout")
    np.testing.assert_array_equal(hds.truth["pose_deg"], held["pose_deg"])
    vset = load_verification(out)
    assert vset.images.shape == (2 * p, 3, 24, 24)
    np.testing.assert_array_equal(vset.images[0::2].numpy(), held["image"][pairs["index_a"]].astype(np.uint8))


def test_degraded_generation_is_deterministic(tmp_path, degraded_dataset):
    cfg, first = degraded_dataset
    again = synthetic.generate(cfg, tmp_path / "again")
    for split in ("train", "heldout", "pairs"):
        arrows = sorted((first / split).glob("*.arrow"))
        assert arrows
        for f in arrows:
            assert f.read_bytes() == (again / split / f.name).read_bytes(), f"{split}/{f.name} differs"
    assert json.loads((first / "meta.json").read_text()) == json.loads((again / "meta.json").read_text())


def _mean_abs_laplacian(images: np.ndarray) -> np.ndarray:
    x = images.astype(np.float64)
    lap = 4 * x[..., 1:-1, 1:-1] - x[..., :-2, 1:-1] - x[..., 2:, 1:-1] - x[..., 1:-1, :-2] - x[..., 1:-1, 2:]
    return np.abs(lap).mean(axis=(1, 2, 3))


def test_blur_removes_high_frequencies_and_leaves_other_images_alone(tmp_path):
    base = dict(SMALL, num_identities=20, image_size=32, noise_std=0.0, occlusion_prob=0.0, seed=2)
    sharp = synthetic.generate(SyntheticConfig(**base), tmp_path / "sharp")
    blurry = synthetic.generate(SyntheticConfig(**base, blur_prob=0.5, blur_max=2.0), tmp_path / "blurry")
    for split in ("train", "heldout"):
        a, b = _columns(sharp, split), _columns(blurry, split)
        sigma = b["blur_sigma"]
        on = sigma > 0
        assert 0.3 < on.mean() < 0.7 and (a["blur_sigma"] == 0).all()
        # Un-blurred images keep their bytes; everything else but the images is unchanged.
        np.testing.assert_array_equal(a["image"][~on], b["image"][~on])
        for name in ("identity", "occluded", "noise_std", "pose_deg"):
            np.testing.assert_array_equal(a[name], b[name])
        ratio = _mean_abs_laplacian(b["image"][on]) / _mean_abs_laplacian(a["image"][on])
        s = sigma[on]
        assert (ratio <= 1.0 + 1e-9).all()
        assert (ratio[s >= 0.75] < 0.9).all() and (ratio[s >= 1.25] < 0.6).all()
        assert stats.spearmanr(s, ratio).statistic < -0.8  # stronger blur, less high frequency


def test_gaussian_blur_matches_scipy_and_is_per_image():
    from scipy import ndimage

    x = np.random.default_rng(0).standard_normal((3, 3, 12, 10)).astype(np.float32)
    sigma = np.array([0.4, 1.5, 6.0])
    y = synthetic.gaussian_blur(x, sigma)
    assert y.shape == x.shape and y.dtype == np.float32
    for i, s in enumerate(sigma):
        ref = ndimage.gaussian_filter(x[i].astype(np.float64), (0, s, s), mode="reflect", truncate=4.0)
        np.testing.assert_allclose(y[i], ref, atol=1e-5)
        # An image's result does not depend on the others blurred with it.
        np.testing.assert_array_equal(synthetic.gaussian_blur(x[i : i + 1], sigma[i : i + 1]), y[i : i + 1])
    with pytest.raises(ValueError, match="> 0"):
        synthetic.gaussian_blur(x, [1.0, 0.0, 1.0])


def test_noise_std_per_image_matches_the_record():
    cfg = SyntheticConfig(image_size=32, noise_std=0.01, noise_std_max=0.08, occlusion_prob=0.0)
    clean_cfg = SyntheticConfig(image_size=32, noise_std=0.0, occlusion_prob=0.0)
    renderer = synthetic.SyntheticRenderer(cfg.code_dim, 0)
    codes = np.random.default_rng(0).standard_normal((40, cfg.code_dim)).astype(np.float32)
    seq = np.random.SeedSequence(11)
    noisy, truth = synthetic.render_images_with_truth(renderer, codes, cfg, seq)
    clean, clean_truth = synthetic.render_images_with_truth(renderer, codes, clean_cfg, seq)
    assert (clean_truth["noise_std"] == 0).all()
    assert truth["noise_std"].min() < 0.03 and truth["noise_std"].max() > 0.06
    residual = noisy.astype(np.float64) - clean.astype(np.float64)
    inside = (clean >= 30) & (clean <= 225)  # away from clipping at 0 and 255
    estimate = np.array([residual[i][inside[i]].std() for i in range(len(codes))]) / 255.0
    np.testing.assert_allclose(estimate, truth["noise_std"], rtol=0.1)
    # The other truth does not depend on the noise level.
    np.testing.assert_array_equal(truth["pose_deg"], clean_truth["pose_deg"])


def test_pose_deg_is_the_rendered_rotation():
    seq = np.random.SeedSequence(4)
    cfg = SyntheticConfig(image_size=32, pose_extreme_prob=0.4, pose_extreme_deg=80.0, noise_std=0.0)
    n = 300
    codes = np.random.default_rng(1).standard_normal((n, cfg.code_dim)).astype(np.float32)
    renderer = synthetic.SyntheticRenderer(cfg.code_dim, 0)
    imgs, truth = synthetic.render_images_with_truth(renderer, codes, cfg, seq)
    nz = synthetic._draw_nuisance(np.random.default_rng(synthetic._child(seq, 0)), n, cfg)
    ordinary = np.degrees(np.abs(nz["rotation"].astype(np.float64))).astype(np.float32)
    ext = truth["pose_extreme"]
    assert truth["pose_deg"].dtype == np.float32 and 0.25 < ext.mean() < 0.55
    np.testing.assert_array_equal(truth["pose_deg"][~ext], ordinary[~ext])
    assert (truth["pose_deg"][ext] >= 40.0 - 1e-4).all() and (truth["pose_deg"][ext] <= 80.0 + 1e-4).all()
    # With pose_extreme off: |rotation| of the nuisance, and the same images as before for the others.
    plain, plain_truth = synthetic.render_images_with_truth(
        renderer, codes, SyntheticConfig(image_size=32, noise_std=0.0), seq
    )
    np.testing.assert_array_equal(plain_truth["pose_deg"], ordinary)
    np.testing.assert_array_equal(imgs[~ext], plain[~ext])
    assert not plain_truth["pose_extreme"].any()
    # The extreme images are rendered at the recorded rotation (sign unknown: one of the two fits).
    for i in np.flatnonzero(ext)[:5]:
        part = {k: v[i : i + 1].copy() for k, v in nz.items()}
        code = codes[i : i + 1] + cfg.expression * part["expression"]
        zero = np.zeros((1, 3, 32, 32), np.float32)
        diffs = []
        for sign in (-1.0, 1.0):
            part["rotation"] = np.array([sign * np.radians(truth["pose_deg"][i])], np.float32)
            redo = renderer.render(code, part, 32, zero)
            diffs.append(np.abs(redo.astype(int) - imgs[i : i + 1].astype(int)).max())
        assert min(diffs) <= 1 < max(diffs)


def test_each_degradation_has_its_own_stream():
    renderer = synthetic.SyntheticRenderer(16, 0)
    codes = np.random.default_rng(0).standard_normal((50, 16)).astype(np.float32)
    seq = np.random.SeedSequence(9)
    opts = {"blur_prob": 0.5, "noise_std_max": 0.1, "pose_extreme_prob": 0.3}
    _, everything = synthetic.render_images_with_truth(
        renderer, codes, SyntheticConfig(image_size=16, **opts), seq
    )
    for key, column in (
        ("blur_prob", "blur_sigma"),
        ("noise_std_max", "noise_std"),
        ("pose_extreme_prob", "pose_deg"),
    ):
        cfg = SyntheticConfig(image_size=16, **{key: opts[key]})
        _, alone = synthetic.render_images_with_truth(renderer, codes, cfg, seq)
        np.testing.assert_array_equal(alone[column], everything[column])
        np.testing.assert_array_equal(alone["occluded"], everything["occluded"])


@pytest.mark.parametrize(
    ("values", "field", "match"),
    [
        ({"blur_max": -1.0}, "blur_max", ">= 0"),
        ({"blur_prob": 0.5, "blur_max": 0.0}, "blur_max", "> 0 when blur_prob > 0"),
        ({"blur_max": float("nan")}, "blur_max", "a finite number"),
        ({"blur_prob": 1.5}, "blur_prob", r"in \[0, 1\]"),
        ({"blur_prob": -0.1}, "blur_prob", r"in \[0, 1\]"),
        ({"noise_std": 0.05, "noise_std_max": 0.02}, "noise_std_max", ">= noise_std=0.05"),
        ({"noise_std_max": "big"}, "noise_std_max", "a finite number or None"),
        ({"pose_extreme_prob": 1.2}, "pose_extreme_prob", r"in \[0, 1\]"),
        ({"pose_extreme_deg": 0.0}, "pose_extreme_deg", r"in \(0, 180\]"),
    ],
)
def test_config_rejects_bad_degradations(values, field, match):
    with pytest.raises(ValueError, match=match) as info:
        SyntheticConfig(**{**SMALL, **values})
    assert f"SyntheticConfig.{field}=" in str(info.value)
