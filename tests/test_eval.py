"""Evaluation: the verification protocol of pfclib.eval's docstring, ROC / TAR@FAR, rank-1, embeddings, CLI.

pfclib.eval takes its folds, ROC and AUC from scikit-learn; the references here are written out
independently (explicit fold boundaries, a brute-force ROC over every threshold, the pairwise
Mann-Whitney AUC, hand-computed cases), so they check the results rather than sklearn against itself.
"""

import numpy as np
import pytest
import torch
from torch import nn

from pfclib import eval as pfe

# ---------------------------------------------------------------------------------------------- helpers


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _pairs_with_signal(num_pairs, dim, noise, seed):
    """Genuine pairs share a random direction plus noise; impostor pairs are independent."""
    rng = np.random.default_rng(seed)
    issame = rng.random(num_pairs) < 0.5
    a = rng.standard_normal((num_pairs, dim))
    b = np.where(issame[:, None], a, rng.standard_normal((num_pairs, dim)))
    b = b + noise * rng.standard_normal((num_pairs, dim))
    return a, b, issame


def _reference_folds(n, k):
    """Contiguous folds written out: the first n % k folds hold n // k + 1 items, the others n // k."""
    sizes = [n // k + (1 if i < n % k else 0) for i in range(k)]
    bounds = np.cumsum([0, *sizes])
    return [np.arange(bounds[i], bounds[i + 1]) for i in range(k)]


def _reference_protocol(emb_a, emb_b, issame, nfolds):
    """The protocol written the slow, obvious way: explicit folds, explicit loops over thresholds."""
    a, b = _unit(np.asarray(emb_a, np.float64)), _unit(np.asarray(emb_b, np.float64))
    dist = np.sum((a - b) ** 2, axis=1)
    thresholds = np.arange(0, 4, 0.01)
    accs, best = [], []
    for test in _reference_folds(dist.size, nfolds):
        train = np.setdiff1d(np.arange(dist.size), test)
        train_acc = [np.mean((dist[train] < t) == issame[train]) for t in thresholds]
        t = thresholds[int(np.argmax(train_acc))]
        accs.append(np.mean((dist[test] < t) == issame[test]))
        best.append(t)
    return np.mean(accs), np.std(accs), np.mean(best), accs


class _Linear(nn.Module):
    """A deterministic fp64 "backbone": flatten then a fixed matrix (reference embedding is explicit)."""

    def __init__(self, in_features, out_features, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(out_features, in_features, generator=gen, dtype=torch.float64))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        assert not torch.is_grad_enabled()
        assert not self.training
        return x.flatten(1) @ self.weight.T


# ---------------------------------------------------------------------------------------------- folds & accuracy


@pytest.mark.parametrize(("n", "k"), [(6000, 10), (7, 3), (20, 10), (23, 10), (10, 10), (101, 2)])
def test_folds_are_contiguous_kfold_without_shuffling(n, k):
    ours = pfe.fold_indices(n, k)
    ref = _reference_folds(n, k)
    assert len(ours) == len(ref) == k
    for o, r in zip(ours, ref):
        np.testing.assert_array_equal(o, r)
    np.testing.assert_array_equal(np.concatenate(ours), np.arange(n))  # every item once, in order


def test_fold_indices_hand_listed_cases():
    assert [f.tolist() for f in pfe.fold_indices(7, 3)] == [[0, 1, 2], [3, 4], [5, 6]]
    assert [f.tolist() for f in pfe.fold_indices(4, 4)] == [[0], [1], [2], [3]]
    assert [len(f) for f in pfe.fold_indices(23, 10)] == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
    assert [len(f) for f in pfe.fold_indices(6000, 10)] == [600] * 10


def test_fold_indices_rejects_bad_arguments():
    with pytest.raises(ValueError, match="nfolds must be an int >= 2, got 1"):
        pfe.fold_indices(10, 1)
    with pytest.raises(ValueError, match="cannot split 5 pairs into nfolds=10"):
        pfe.fold_indices(5, 10)
    with pytest.raises(ValueError, match="nfolds must be an int >= 2, got True"):
        pfe.fold_indices(10, True)
    with pytest.raises(ValueError, match=r"nfolds must be an int >= 2, got 2\.0"):
        pfe.fold_indices(10, 2.0)


def test_thresholds_are_0_to_4_by_001():
    assert pfe.THRESHOLDS.shape == (400,)
    assert pfe.THRESHOLDS[0] == 0.0
    np.testing.assert_allclose(pfe.THRESHOLDS[-1], 3.99, rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.diff(pfe.THRESHOLDS), 0.01, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("num_pairs", "nfolds", "noise", "seed"), [(600, 10, 1.0, 0), (253, 10, 1.5, 1), (90, 3, 0.7, 2)]
)
def test_verification_accuracy_matches_the_reference_protocol(num_pairs, nfolds, noise, seed):
    a, b, issame = _pairs_with_signal(num_pairs, 16, noise, seed)
    acc, std, thr, accs = _reference_protocol(a, b, issame, nfolds)
    res = pfe.verification_accuracy(a, b, issame, nfolds=nfolds)
    assert res["num_pairs"] == num_pairs
    np.testing.assert_allclose(res["fold_accuracies"], accs, rtol=0, atol=1e-15)
    assert res["acc"] == pytest.approx(acc, abs=1e-15)
    assert res["acc_std"] == pytest.approx(std, abs=1e-15)
    assert res["best_threshold"] == pytest.approx(thr, abs=1e-15)
    assert 0.6 < res["acc"] < 1.0  # the data has signal, and is not trivially separable


def test_verification_accuracy_hand_computed_case():
    # 10 pairs in 2 folds of 5; unit vectors in 2-D at chosen angles give chosen squared distances
    # d = 2 - 2 cos(angle). Genuine: d = 0.5 (x4), 1.5 (x1); impostor: d = 1.0 (x1), 2.5 (x4).
    d = np.array([0.5, 0.5, 1.0, 2.5, 2.5, 0.5, 0.5, 1.5, 2.5, 2.5])
    same = np.array([1, 1, 0, 0, 0, 1, 1, 1, 0, 0], dtype=bool)
    angle = np.arccos(1 - d / 2)
    a = np.stack([np.ones(10), np.zeros(10)], axis=1)
    b = np.stack([np.cos(angle), np.sin(angle)], axis=1)
    res = pfe.verification_accuracy(a, b, same, nfolds=2)
    # fold 1 is trained on fold 2 (d<t correct for t in (1.5, 2.5]: first such t = 1.51) -> on fold 1
    # the impostor at 1.0 is accepted: 4/5. Fold 2 is trained on fold 1 (best t in (0.5, 1.0], first
    # 0.51) -> on fold 2 the genuine pair at 1.5 is rejected: 4/5.
    np.testing.assert_allclose(res["fold_thresholds"], [1.51, 0.51], atol=1e-12)
    assert res["fold_accuracies"] == [0.8, 0.8]
    assert res["acc"] == pytest.approx(0.8) and res["acc_std"] == pytest.approx(0.0)
    assert res["best_threshold"] == pytest.approx(1.01)


def test_perfect_embeddings_give_accuracy_one_and_random_ones_half():
    rng = np.random.default_rng(0)
    num_pairs, dim = 3000, 64
    issame = np.arange(num_pairs) % 2 == 0
    ids = rng.standard_normal((num_pairs, dim))
    b = np.where(issame[:, None], ids, rng.standard_normal((num_pairs, dim)))
    perfect = pfe.evaluate_pairs(ids, b, issame)
    assert perfect["acc"] == 1.0 and perfect["acc_std"] == 0.0
    assert perfect["auc"] == 1.0
    assert all(v == 1.0 for v in perfect["tar_at_far"].values() if v is not None)

    rand = pfe.evaluate_pairs(
        rng.standard_normal((num_pairs, dim)), rng.standard_normal((num_pairs, dim)), issame
    )
    assert abs(rand["acc"] - 0.5) < 0.04
    assert abs(rand["auc"] - 0.5) < 0.04


def test_verification_accuracy_rejects_mismatched_inputs():
    a = np.ones((4, 3))
    with pytest.raises(ValueError, match=r"equal shape \(P, D\), got \(4, 3\) and \(5, 3\)"):
        pfe.verification_accuracy(a, np.ones((5, 3)), np.ones(4, bool))
    with pytest.raises(ValueError, match=r"issame must have shape \(4,\)"):
        pfe.verification_accuracy(a, a, np.ones(3, bool))
    with pytest.raises(ValueError, match="issame must be boolean"):
        pfe.verification_accuracy(a, a, np.array([0, 1, 2, 1]), nfolds=2)


def test_pair_distances_and_scores_normalise_and_agree():
    a, b, _ = _pairs_with_signal(50, 8, 1.0, 3)
    d = pfe.pair_distances(3.0 * a, b)  # scale must not matter
    s = pfe.pair_scores(a, 0.5 * b)
    ref_s = np.sum(_unit(a) * _unit(b), axis=1)
    np.testing.assert_allclose(s, ref_s, rtol=0, atol=1e-14)
    np.testing.assert_allclose(d, 2 - 2 * ref_s, rtol=0, atol=1e-14)


# ---------------------------------------------------------------------------------------------- ROC


def _scores_with_ties(n, seed):
    rng = np.random.default_rng(seed)
    same = rng.random(n) < 0.3
    scores = np.round(rng.standard_normal(n) + 1.5 * same, 1)  # rounding creates many ties
    return scores, same


def _brute_roc(scores, same):
    """Every operating point by counting: +inf, then each distinct score, highest first."""
    thresholds = np.r_[np.inf, np.unique(scores)[::-1]]
    fpr = np.array([np.mean(scores[~same] >= t) for t in thresholds])
    tpr = np.array([np.mean(scores[same] >= t) for t in thresholds])
    return fpr, tpr, thresholds


def _brute_auc(scores, same):
    """P(genuine score > impostor score) + P(equal) / 2, over all genuine x impostor pairs."""
    diff = scores[same][:, None] - scores[~same][None, :]
    return float(np.mean((diff > 0) + 0.5 * (diff == 0)))


@pytest.mark.parametrize(("seed", "n"), [(0, 500), (1, 500), (2, 500), (3, 37)])
def test_roc_matches_a_brute_force_roc_over_every_threshold(seed, n):
    scores, same = _scores_with_ties(n, seed)
    assert 0 < same.sum() < n and np.unique(scores).size < n  # both classes, and ties
    fpr, tpr, thr = pfe.roc(scores, same)
    ref_fpr, ref_tpr, ref_thr = _brute_roc(scores, same)
    np.testing.assert_array_equal(thr, ref_thr)
    np.testing.assert_allclose(fpr, ref_fpr, rtol=0, atol=1e-15)
    np.testing.assert_allclose(tpr, ref_tpr, rtol=0, atol=1e-15)
    assert fpr[0] == tpr[0] == 0.0 and fpr[-1] == tpr[-1] == 1.0
    assert pfe.roc_auc(scores, same) == pytest.approx(_brute_auc(scores, same), abs=1e-12)
    # labels as 0/1 ints or a tensor give the same curve
    np.testing.assert_array_equal(pfe.roc(torch.from_numpy(scores), same.astype(int))[1], tpr)


def test_roc_hand_computed_case():
    scores = np.array([0.9, 0.8, 0.8, 0.3, 0.1])
    same = np.array([True, True, False, False, True])
    fpr, tpr, thr = pfe.roc(scores, same)
    np.testing.assert_array_equal(thr, [np.inf, 0.9, 0.8, 0.3, 0.1])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 2 / 3, 2 / 3, 1])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 1, 1])
    # area: 0.5 * (1/3 + 2/3) / 2 [the tied step] + 0.5 * 2/3 = 0.25 + 1/3
    assert pfe.roc_auc(scores, same) == pytest.approx(0.25 + 1 / 3, abs=1e-15)


def test_roc_needs_both_classes():
    with pytest.raises(ValueError, match="got 3 genuine and 0 impostor"):
        pfe.roc(np.array([0.1, 0.2, 0.3]), np.ones(3, bool))
    with pytest.raises(ValueError, match="got 0 genuine and 2 impostor"):
        pfe.roc_auc(np.array([0.1, 0.2]), np.zeros(2, bool))


def test_roc_refuses_nan_inf_and_mismatched_shapes():
    same = np.array([True, False, True])
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(ValueError, match="scores contain NaN or inf"):
            pfe.roc(np.array([0.1, bad, 0.3]), same)
        with pytest.raises(ValueError, match="scores contain NaN or inf"):
            pfe.tar_at_far(np.array([0.1, bad, 0.3]), same)
    with pytest.raises(ValueError, match=r"1-D of equal length, got \(2,\) and \(3,\)"):
        pfe.roc(np.array([0.1, 0.2]), same)


def _brute_tar(scores, same, far):
    best = 0.0
    for t in np.r_[np.inf, np.unique(scores)]:
        accept = scores >= t
        if np.mean(accept[~same]) <= far:
            best = max(best, np.mean(accept[same]))
    return best


@pytest.mark.parametrize("seed", [0, 1])
def test_tar_at_far_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    same = np.r_[np.ones(300, bool), np.zeros(2000, bool)]
    scores = np.r_[rng.normal(1.0, 1.0, 300), rng.normal(-1.0, 1.0, 2000)]
    scores[::7] = np.round(scores[::7], 1)  # some ties
    out = pfe.tar_at_far(scores, same)
    assert list(out) == ["1e-1", "1e-2", "1e-3", "1e-4", "1e-5", "1e-6"]
    for key, far in [("1e-1", 1e-1), ("1e-2", 1e-2), ("1e-3", 1e-3)]:
        assert out[key] == pytest.approx(_brute_tar(scores, same, far), abs=1e-15)
    # 2000 impostors support FAR >= 1/2000 only
    assert out["1e-4"] is None and out["1e-5"] is None and out["1e-6"] is None


def test_tar_at_far_hand_computed_case_and_support():
    # 10 impostors at 0.0..0.9, genuine at 0.55, 0.85, 0.95, 1.0
    imp = np.arange(10) / 10
    gen = np.array([0.55, 0.85, 0.95, 1.0])
    scores, same = np.r_[imp, gen], np.r_[np.zeros(10, bool), np.ones(4, bool)]
    out = pfe.tar_at_far(scores, same, fars=(0.1, 0.2, 0.5, 0.05))
    # FAR <= 0.1 allows accepting the impostor at 0.9 -> threshold 0.85 accepts 3 of 4 genuine
    assert out["1e-1"] == 0.75
    assert out["2e-1"] == 0.75  # threshold 0.8 would add an impostor but no genuine pair
    assert out["5e-1"] == 1.0  # threshold 0.55: 4 impostors (0.6..0.9) accepted, 0.4 <= 0.5
    assert out["5e-2"] is None  # 10 impostors cannot measure FAR 0.05
    with pytest.raises(ValueError, match="FAR levels must be in"):
        pfe.tar_at_far(scores, same, fars=(0.0,))


def test_evaluate_pairs_reports_unsupported_far_levels():
    a, b, issame = _pairs_with_signal(400, 8, 1.0, 5)
    res = pfe.evaluate_pairs(a, b, issame)
    n_imp = int((~issame).sum())
    assert res["num_impostor"] == n_imp and res["num_genuine"] == 400 - n_imp
    assert 100 <= n_imp < 1000
    assert res["tar_at_far"]["1e-2"] is not None and res["tar_at_far"]["1e-3"] is None
    assert "1e-3" in res["tar_at_far_note"] and "1e-2" not in res["tar_at_far_note"]
    assert str(n_imp) in res["tar_at_far_note"]
    assert res["auc"] == pytest.approx(_brute_auc(np.sum(_unit(a) * _unit(b), 1), issame), abs=1e-12)


# ---------------------------------------------------------------------------------------------- rank-1


def test_rank1_hand_computed_case():
    gallery = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    g_lab = np.array([10, 20, 30])
    probes = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [-5.0, 0.1]])
    p_lab = np.array([10, 20, 20, 30])  # the third probe is nearer to id 10: wrong
    res = pfe.rank1_identification(gallery, g_lab, probes, p_lab)
    assert res == {"rank1": 0.75, "num_probes": 4, "num_probes_without_mate": 0, "num_gallery": 3}


def test_rank1_matches_brute_force_and_is_chunk_independent():
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((20, 16))
    g_lab = np.repeat(np.arange(20), 3)
    p_lab = rng.integers(0, 25, 200)  # ids 20..24 have no mate in the gallery
    gallery = centers[g_lab] + 0.8 * rng.standard_normal((60, 16))
    probes = np.where((p_lab < 20)[:, None], centers[np.minimum(p_lab, 19)], 0.0) + 0.8 * rng.standard_normal(
        (200, 16)
    )
    sim = _unit(probes) @ _unit(gallery).T
    pred = g_lab[np.argmax(sim, axis=1)]
    mated = p_lab < 20
    ref = np.mean(pred[mated] == p_lab[mated])
    for chunk in (7, 4096):
        res = pfe.rank1_identification(gallery, g_lab, probes, p_lab, chunk_size=chunk)
        assert res["rank1"] == pytest.approx(ref, abs=1e-15)
        assert res["num_probes"] == mated.sum() and res["num_probes_without_mate"] == (~mated).sum()
    assert 0.5 < ref < 1.0


def test_rank1_leave_one_out_excludes_the_probe_itself():
    emb = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [-1.0, 0.0]])
    lab = np.array([0, 0, 1, 2, 3])
    res = pfe.rank1_identification(emb, lab)
    # ids 2 and 3 have a single image: no mate once the probe is left out; id 1's only image
    # has no mate either. Probes 0 and 1 find each other.
    assert res["rank1"] == 1.0
    assert res["num_probes"] == 2 and res["num_probes_without_mate"] == 3
    with pytest.raises(ValueError, match="no probe has a mate"):
        pfe.rank1_identification(emb[2:], lab[2:])


# ---------------------------------------------------------------------------------------------- embed


def test_embed_normalises_uint8_sums_flips_and_l2_normalises():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (7, 3, 4, 5), dtype=torch.uint8, generator=gen)
    before = images.clone()
    model = _Linear(3 * 4 * 5, 6)
    model.train()
    emb = pfe.embed(model, images, batch_size=3, flip=True)
    assert model.training  # restored
    assert torch.equal(images, before)
    x = (images.double() / 255.0 - 0.5) / 0.5
    w = model.weight.detach()
    ref = x.flatten(1) @ w.T + x.flip(3).flatten(1) @ w.T
    ref = (ref / ref.norm(dim=1, keepdim=True)).numpy()
    assert emb.dtype == np.float64 and emb.shape == (7, 6)
    np.testing.assert_allclose(emb, ref, rtol=0, atol=1e-13)
    assert model.calls == 3 * 2  # ceil(7/3) batches, two passes each

    no_flip = pfe.embed(model, images, batch_size=100, flip=False)
    ref = x.flatten(1) @ w.T
    np.testing.assert_allclose(no_flip, (ref / ref.norm(dim=1, keepdim=True)).numpy(), rtol=0, atol=1e-13)


def test_embed_float_input_is_taken_as_normalised_and_batching_does_not_matter():
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (9, 3, 4, 4), dtype=torch.uint8, generator=gen)
    model = _Linear(48, 5).eval()
    from_uint8 = pfe.embed(model, images, batch_size=2)
    from_float = pfe.embed(model, (images.double() / 255 - 0.5) / 0.5, batch_size=9)
    from_numpy = pfe.embed(model, images.numpy(), batch_size=4)
    np.testing.assert_allclose(from_uint8, from_float, rtol=0, atol=1e-13)
    np.testing.assert_allclose(from_uint8, from_numpy, rtol=0, atol=1e-13)
    assert not model.training


def test_embed_uses_eval_mode_for_batchnorm_models():
    from pfclib import models

    model = models.create("iresnet_tiny", embedding_size=8, image_size=32, seed=0)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model(x)  # non-trivial running statistics
    emb = pfe.embed(model, x, flip=False)
    assert model.training
    model.eval()
    with torch.no_grad():
        ref = model(x).double()
    ref = (ref / ref.norm(dim=1, keepdim=True)).numpy()
    np.testing.assert_allclose(emb, ref, rtol=1e-5, atol=1e-6)


def test_embed_restores_each_submodules_mode():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.BatchNorm1d(4))
    model.train()
    model[2].eval()  # e.g. a frozen BN the caller keeps in eval mode while training
    pfe.embed(model, torch.zeros(3, 3, 2, 2, dtype=torch.uint8))
    assert [m.training for m in model.modules()] == [True, True, True, False]


def test_metrics_accept_torch_tensors():
    a, b, issame = _pairs_with_signal(100, 8, 1.0, 4)
    ref = pfe.evaluate_pairs(a, b, issame, nfolds=4)
    got = pfe.evaluate_pairs(
        torch.from_numpy(a).requires_grad_(), torch.from_numpy(b), torch.from_numpy(issame), nfolds=4
    )
    assert got == ref


def test_embed_rejects_bad_input():
    model = _Linear(12, 2)
    with pytest.raises(ValueError, match=r"shape \(M, 3, H, W\), got \(2, 1, 2, 2\)"):
        pfe.embed(model, torch.zeros(2, 1, 2, 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8 .raw pixels. or floating point"):
        pfe.embed(model, torch.zeros(2, 3, 2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        pfe.embed(model, torch.zeros(2, 3, 2, 2), batch_size=0)


# ---------------------------------------------------------------------------------------------- evaluate_verification


class _VSet:
    def __init__(self, images, issame, name="toy"):
        self.images, self.issame, self.name = images, issame, name


def test_evaluate_verification_embeds_pairs_in_row_order():
    rng = np.random.default_rng(0)
    num_pairs = 60
    issame = torch.from_numpy(np.arange(num_pairs) % 3 != 0)
    base = rng.integers(0, 256, (num_pairs, 3, 4, 4))
    other = np.where(issame.numpy()[:, None, None, None], base, rng.integers(0, 256, (num_pairs, 3, 4, 4)))
    images = torch.from_numpy(np.stack([base, other], axis=1).reshape(-1, 3, 4, 4).astype(np.uint8))
    model = _Linear(48, 8)
    res = pfe.evaluate_verification(model, _VSet(images, issame), batch_size=16, nfolds=5)
    assert res["name"] == "toy" and res["num_pairs"] == num_pairs
    assert res["acc"] == 1.0  # genuine pairs are identical images: distance 0
    emb = pfe.embed(model, images)
    ref = pfe.evaluate_pairs(emb[0::2], emb[1::2], issame.numpy(), nfolds=5)
    for key in ("acc", "acc_std", "best_threshold", "auc", "tar_at_far"):
        assert res[key] == ref[key]
    with pytest.raises(ValueError, match="with 60 pairs needs 120 images, got 118"):
        pfe.evaluate_verification(model, _VSet(images[:-2], issame))


# ---------------------------------------------------------------------------------------------- CLI


def _write_bin(path, images, issame):
    """A minimal `.bin` writer independent of pfclib.data: pickle of (PNG bytes list, bool list)."""
    import io
    import pickle

    from PIL import Image

    encoded = []
    for img in images.numpy():
        buf = io.BytesIO()
        Image.fromarray(img.transpose(1, 2, 0)).save(buf, format="PNG")  # lossless
        encoded.append(buf.getvalue())
    with open(path, "wb") as f:
        pickle.dump((encoded, [bool(s) for s in issame]), f, protocol=4)


def _save_checkpoint(path, model, name):
    """A checkpoint dict by the trainer's contract, holding only what the eval CLI reads."""
    from pfclib.io import atomic_torch_save

    config = {"backbone": name, "embedding_size": model.embedding_size, "image_size": model.image_size}
    ckpt = {
        "format": "pfclib-checkpoint/1",
        "config": config,
        "step": 0,
        "backbone": model.state_dict(),
        "head": {},
    }
    atomic_torch_save(ckpt, path)


def _checkpoint_and_bin(tmp_path):
    from pfclib import models

    model = models.create("iresnet_tiny", embedding_size=16, image_size=32, seed=0)
    gen = torch.Generator().manual_seed(0)
    model(torch.randn(8, 3, 32, 32, generator=gen))  # non-trivial BN statistics must survive the round trip
    model.eval()
    _save_checkpoint(tmp_path / "ckpt.pt", model, "iresnet_tiny")
    num_pairs = 40
    issame = torch.arange(num_pairs) % 2 == 0
    base = torch.randint(0, 256, (num_pairs, 3, 32, 32), dtype=torch.uint8, generator=gen)
    noise = torch.randint(-100, 101, (num_pairs, 3, 32, 32), generator=gen)
    other = torch.randint(0, 256, (num_pairs, 3, 32, 32), dtype=torch.uint8, generator=gen)
    second = torch.where(
        issame[:, None, None, None], (base.int() + noise).clamp(0, 255).to(torch.uint8), other
    )
    images = torch.stack([base, second], dim=1).reshape(-1, 3, 32, 32)
    _write_bin(tmp_path / "toy.bin", images, issame)
    emb = pfe.embed(model, images)
    return pfe.evaluate_pairs(emb[0::2], emb[1::2], issame.numpy(), nfolds=5)


def test_cli_scores_a_checkpoint_on_a_bin_file(tmp_path, capsys):
    ref = _checkpoint_and_bin(tmp_path)
    rc = pfe.main(
        ["--checkpoint", str(tmp_path / "ckpt.pt"), "--data", str(tmp_path / "toy.bin"), "--nfolds", "5",
         "--batch-size", "7", "--device", "cpu", "--out", str(tmp_path / "out" / "metrics.json")]
    )  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "toy" in printed and "acc (%)" in printed
    import json

    out = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert out["backbone"] == "iresnet_tiny" and out["flip"] is True
    got = out["sets"]["toy"]
    assert got["num_pairs"] == 40
    assert 0.6 < ref["acc"] < 1.0  # hard enough that a wrong pairing or decoding would show
    assert got["fold_accuracies"] == pytest.approx(ref["fold_accuracies"], abs=1e-12)
    assert got["acc"] == pytest.approx(ref["acc"], abs=1e-12)
    assert got["best_threshold"] == pytest.approx(ref["best_threshold"], abs=1e-12)
    assert got["auc"] == pytest.approx(ref["auc"], abs=1e-12)
    assert got["tar_at_far"] == pytest.approx(ref["tar_at_far"], abs=1e-12)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["metrics.json"]  # no temporary left behind


def test_cli_scores_a_checkpoint_on_synthetic_pairs(tmp_path):
    import json

    from pfclib import models
    from pfclib.data import load_verification, synthetic

    cfg = synthetic.SyntheticConfig(
        num_identities=4, images_per_identity=2, heldout_identities=12, num_pairs=50, image_size=32, seed=0
    )
    data = synthetic.generate(cfg, tmp_path / "synth")
    model = models.create("mobilefacenet_tiny", embedding_size=8, image_size=32, seed=1).eval()
    _save_checkpoint(tmp_path / "ckpt.pt", model, "mobilefacenet_tiny")
    argv = ["--checkpoint", str(tmp_path / "ckpt.pt"), "--data", str(data), "--out", str(tmp_path / "m.json")]
    assert pfe.main(argv) == 0
    ((name, got),) = json.loads((tmp_path / "m.json").read_text())["sets"].items()
    vset = load_verification(data)
    ref = pfe.evaluate_pairs(*_split_pairs(pfe.embed(model, vset.images)), vset.issame.numpy())
    assert got["num_pairs"] == 50 == ref["num_pairs"]
    assert got["acc"] == pytest.approx(ref["acc"], abs=1e-12)
    assert got["auc"] == pytest.approx(ref["auc"], abs=1e-12)


def _split_pairs(emb):
    return emb[0::2], emb[1::2]


def _run_folder(tmp_path):
    """A run folder whose newest checkpoint (step 12) is the backbone `_checkpoint_and_bin` scored,
    and an older one (step 3) of a different backbone; returns (run, newest file, reference metrics)."""
    import shutil

    from pfclib import models
    from pfclib.checkpoint import checkpoint_path

    ref = _checkpoint_and_bin(tmp_path)
    run = tmp_path / "run"
    older = models.create("iresnet_tiny", embedding_size=16, image_size=32, seed=5).eval()
    _save_checkpoint(checkpoint_path(run, 3), older, "iresnet_tiny")
    newest = checkpoint_path(run, 12)
    shutil.copy(tmp_path / "ckpt.pt", newest)
    return run, newest, ref


def test_cli_takes_a_run_folder_as_its_newest_checkpoint_and_explains_empty_cells(tmp_path, capsys):
    import json

    run, newest, ref = _run_folder(tmp_path)
    data = str(tmp_path / "toy.bin")
    for given in (run, run / "checkpoints"):
        out_file = tmp_path / "out" / f"{given.name}.json"
        assert (
            pfe.main(["--checkpoint", str(given), "--data", data, "--nfolds", "5", "--out", str(out_file)])
            == 0
        )
        out = json.loads(out_file.read_text())
        assert out["checkpoint"] == str(newest)  # the file read, not the folder given
        got = out["sets"]["toy"]
        assert got["fold_accuracies"] == pytest.approx(ref["fold_accuracies"], abs=1e-12)
        assert got["auc"] == pytest.approx(ref["auc"], abs=1e-12)
    printed = capsys.readouterr().out
    assert str(newest) in printed
    header = printed.splitlines()[1]
    assert "acc (%)" in header and "std (%)" in header and "thr (sq. L2)" in header
    assert "squared L2 distance of the unit embeddings, in [0, 4]" in printed
    # 20 impostor pairs: TAR@FAR <= 1e-2 cannot be measured; the table says why under it
    assert ref["num_impostor"] == 20 and ref["tar_at_far"]["1e-1"] is not None
    assert ref["tar_at_far"]["1e-2"] is None
    note = "'-' for toy: FAR levels ['1e-2', '1e-3', '1e-4', '1e-5', '1e-6'] need at least 1/FAR impostor pairs; this set has 20"
    assert note in printed.splitlines()
    assert ref["tar_at_far_note"] in note

    direct = pfe.evaluate_checkpoint(run, [data], nfolds=5, device="cpu")
    assert direct["checkpoint"] == str(newest)
    assert direct["sets"]["toy"]["acc"] == pytest.approx(ref["acc"], abs=1e-12)


def test_cli_names_a_missing_checkpoint_a_run_folder_without_one_and_bad_arguments(tmp_path, capsys):
    run, _, _ = _run_folder(tmp_path)
    data = str(tmp_path / "toy.bin")
    (tmp_path / "empty_run").mkdir()
    cases = [
        (["--checkpoint", str(tmp_path / "nope.pt"), "--data", data], [str(tmp_path / "nope.pt"), "does not exist"]),
        (["--checkpoint", str(tmp_path / "empty_run"), "--data", data],
         [str(tmp_path / "empty_run"), "folder without checkpoints", "checkpoints/ckpt_<step>.pt"]),
        (["--checkpoint", str(run), "--data", data, str(tmp_path / "no.bin")], [str(tmp_path / "no.bin"), "does not exist"]),
        (["--checkpoint", str(run), "--data", data, "--batch-size", "0"], ["--batch-size must be a positive number of images"]),
        (["--checkpoint", str(run), "--data", data, "--nfolds", "1"], ["--nfolds must be at least 2, got 1"]),
        (["--checkpoint", str(run), "--data", data, "--out", str(tmp_path)], ["is a folder"]),
    ]  # fmt: skip
    for argv, expected in cases:
        with pytest.raises(SystemExit) as exc:
            pfe.main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        for text in expected:
            assert text in err, (argv, err)
    with pytest.raises(FileNotFoundError, match="folder without checkpoints"):
        pfe.evaluate_checkpoint(tmp_path / "empty_run", [data])
    with pytest.raises(FileNotFoundError, match="nope.pt.* does not exist"):
        pfe.evaluate_checkpoint(tmp_path / "nope.pt", [data])


def test_cli_writes_only_where_out_says(tmp_path, monkeypatch, capsys):
    run, _, _ = _run_folder(tmp_path / "in")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)

    def files():
        return {p for p in tmp_path.rglob("*") if p.is_file()}

    before = files()
    argv = ["--checkpoint", str(run), "--data", str(tmp_path / "in" / "toy.bin"), "--nfolds", "5"]
    assert pfe.main(argv) == 0  # no --out: no file anywhere, the cwd included
    assert files() == before
    assert pfe.main([*argv, "--out", "res/lfw.json"]) == 0  # relative to the cwd
    assert files() - before == {cwd / "res" / "lfw.json"}
    assert "wrote res/lfw.json" in capsys.readouterr().out


def test_cli_help_says_what_each_option_is(capsys):
    with pytest.raises(SystemExit) as exc:
        pfe.main(["--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for phrase in [
        "--checkpoint RUN_OR_CKPT a pfclib training checkpoint (.pt file), or a run folder: its newest",
        "--data PATH [PATH ...] verification set(s)",
        "--batch-size N images per forward pass (default 256)",
        "--no-flip do not add the embedding of the horizontally mirrored image (default: add it)",
        "--nfolds K contiguous folds",
        "(default 10)",
        "--device DEVICE torch device of the backbone (default: cuda if available, else cpu)",
        "--out JSON write the metrics as JSON to this file",
        "default: write no file",
    ]:
        assert phrase in text, phrase


@pytest.mark.slow
def test_cli_runs_as_a_module(tmp_path):
    import json
    import subprocess
    import sys

    ref = _checkpoint_and_bin(tmp_path)
    out_file = tmp_path / "m.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pfclib.eval", "--checkpoint", str(tmp_path / "ckpt.pt"), "--data",
         str(tmp_path / "toy.bin"), "--no-flip", "--nfolds", "5", "--out", str(out_file)],
        capture_output=True, text=True, timeout=120, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    got = json.loads(out_file.read_text())
    assert got["flip"] is False and got["sets"]["toy"]["num_pairs"] == 40
    assert 0.0 <= got["sets"]["toy"]["acc"] <= 1.0
    assert ref["num_pairs"] == 40

    missing = subprocess.run(
        [sys.executable, "-m", "pfclib.eval", "--checkpoint", str(tmp_path / "nope.pt"), "--data", "x.bin"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert missing.returncode == 2 and "nope.pt" in missing.stderr and "does not exist" in missing.stderr
