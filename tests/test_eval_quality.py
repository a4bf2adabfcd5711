"""Quality and threshold-consistency metrics of pfclib.eval: error_vs_reject, random_reject_baseline, opis.

The references are written out independently of pfclib.eval: plain Python loops over candidate
thresholds, pairs and identities, hand-computed tiny cases and exhaustive enumeration. Each reference
also has deliberately wrong variants (mutants) that must NOT agree with pfclib.eval, so the
comparisons are shown to be sensitive to the conventions they check.
"""

import itertools
import math
import re

import numpy as np
import pytest

from pfclib import eval as pfe

# ---------------------------------------------------------------------------------------------- references


def _ref_threshold(scores, issame, rate):
    """Brute force: the smallest candidate (every observed score, then +inf) whose impostor
    fraction with score >= t is <= rate (1e-9 tolerance on the count, as documented)."""
    imp = [float(x) for x, g in zip(scores, issame) if not g]
    for t in sorted({float(x) for x in scores}) + [math.inf]:
        if sum(x >= t for x in imp) <= rate * len(imp) + 1e-9:
            return t
    raise AssertionError("unreachable: +inf always qualifies")


def _ref_erc(
    scores, issame, qa, qb, rate, fractions, *, pair_quality=min, reverse_ties=False, recompute=False
):
    """ERC with explicit loops; the keyword arguments switch on wrong variants (mutants)."""
    n = len(scores)
    q = [pair_quality(float(a), float(b)) for a, b in zip(qa, qb)]
    order = sorted(range(n), key=(lambda i: (q[i], -i)) if reverse_ties else (lambda i: (q[i], i)))
    t0 = _ref_threshold(scores, issame, rate)
    fnmr = []
    for f in fractions:
        kept = order[math.floor(f * n + 1e-9) :]
        t = _ref_threshold([scores[i] for i in kept], [issame[i] for i in kept], rate) if recompute else t0
        genuine = [i for i in kept if issame[i]]
        fnmr.append(sum(scores[i] < t for i in genuine) / len(genuine))
    return np.array(fnmr), t0


def _ref_opis(
    scores, issame, ida, idb, levels, min_pairs, *, impostor_side_a_only=False, ddof=0, centre="mean"
):
    """OPIS with explicit loops over identities; keyword arguments switch on mutants."""
    identities = sorted(set(ida) | set(idb))
    per_level = []
    for f in levels:
        t = _ref_threshold(scores, issame, f)
        fnmr_i, fmr_i = [], []
        for ident in identities:
            gen = [s for s, g, a in zip(scores, issame, ida) if g and a == ident]
            if impostor_side_a_only:
                imp = [s for s, g, a in zip(scores, issame, ida) if not g and a == ident]
            else:
                imp = [s for s, g, a, b in zip(scores, issame, ida, idb) if not g and ident in (a, b)]
            if len(gen) >= min_pairs and gen:
                fnmr_i.append(sum(s < t for s in gen) / len(gen))
            if len(imp) >= min_pairs and imp:
                fmr_i.append(sum(s >= t for s in imp) / len(imp))
        if centre == "mean":
            c_fnmr, c_fmr = sum(fnmr_i) / len(fnmr_i), sum(fmr_i) / len(fmr_i)
        else:  # mutant: centre on the global rates
            gen_all = [s for s, g in zip(scores, issame) if g]
            imp_all = [s for s, g in zip(scores, issame) if not g]
            c_fnmr = sum(s < t for s in gen_all) / len(gen_all)
            c_fmr = sum(s >= t for s in imp_all) / len(imp_all)
        var_fnmr = sum((x - c_fnmr) ** 2 for x in fnmr_i) / (len(fnmr_i) - ddof)
        var_fmr = sum((x - c_fmr) ** 2 for x in fmr_i) / (len(fmr_i) - ddof)
        per_level.append(var_fnmr + var_fmr)
    return sum(per_level) / len(per_level), per_level


def _tied_pairs(n, seed):
    """Scores and qualities rounded to one decimal, so both are full of ties."""
    rng = np.random.default_rng(seed)
    issame = rng.random(n) < 0.5
    scores = np.round(np.where(issame, rng.normal(0.4, 0.3, n), rng.normal(0.0, 0.3, n)), 1)
    qa, qb = np.round(rng.random(n), 1), np.round(rng.random(n), 1)
    return scores, issame, qa, qb


def _one(a):
    return np.ones(len(a))


# ---------------------------------------------------------------------------------------------- threshold


def test_threshold_at_ties_hand_cases():
    # impostors 0.9, 0.8, 0.8, 0.1 (four, so fmr down to 0.25 is supported); genuine 0.95, 0.85, 0.8, 0.5
    scores = np.array([0.9, 0.8, 0.8, 0.1, 0.95, 0.85, 0.8, 0.5])
    issame = np.array([False] * 4 + [True] * 4)
    cases = {  # fmr: (threshold, realised FMR, FNMR)
        0.25: (0.85, 0.25, 0.5),  # one false match allowed: t must exceed the 2nd impostor (0.8)
        0.5: (0.85, 0.25, 0.5),  # two allowed, but the tied 0.8s cannot be split: same t, FMR < fmr
        0.75: (0.5, 0.75, 0.0),  # t = the genuine 0.5: a score equal to t is a match
        1.0: (0.1, 1.0, 0.0),  # everything may match: t = the lowest score
    }
    for rate, (t, realised, fnmr) in cases.items():
        res = pfe.error_vs_reject(
            scores, issame, _one(scores), _one(scores), fmr=rate, reject_fractions=[0.0]
        )
        assert res["threshold"] == t, rate
        assert res["fmr_at_threshold"] == realised, rate
        assert res["fnmr"].tolist() == [fnmr], rate
        assert _ref_threshold(scores, issame, rate) == t


def test_threshold_is_inf_when_no_score_lies_above_the_tied_impostors():
    scores = np.array([1.0, 1.0, 0.2, 0.1, 0.9, 1.0])
    issame = np.array([False, False, False, False, True, True])
    res = pfe.error_vs_reject(scores, issame, _one(scores), _one(scores), fmr=0.25, reject_fractions=[0.0])
    assert res["threshold"] == math.inf
    assert res["fmr_at_threshold"] == 0.0
    assert res["fnmr"].tolist() == [1.0]  # nothing matches, not even the genuine 1.0


@pytest.mark.parametrize("seed", range(6))
def test_threshold_matches_brute_force_on_tied_scores(seed):
    scores, issame, qa, qb = _tied_pairs(300, seed)
    n_imp = int((~issame).sum())
    for rate in (1.0, 0.5, 0.3, 0.1, 0.05, 0.02, 1.0 / n_imp, 0.29, 0.123):
        res = pfe.error_vs_reject(scores, issame, qa, qb, fmr=rate, reject_fractions=[0.0])
        t = _ref_threshold(scores, issame, rate)
        assert res["threshold"] == t
        imp = scores[~issame]
        assert np.sum(imp >= t) <= rate * imp.size + 1e-9  # the rule holds ...
        lower = scores[scores < t]
        if lower.size:  # ... and no smaller observed score satisfies it
            assert np.sum(imp >= lower.max()) > rate * imp.size + 1e-9


# ---------------------------------------------------------------------------------------------- ERC


def _hand_erc_case():
    # pair: 0-3 impostors, 4-8 genuine. fmr 0.25 with impostors 0.9 > 0.3 > 0.2 > 0.1: one false
    # match allowed, t = the smallest score above 0.3 = 0.35; false non-matches: pairs 5 (0.25), 8 (0.2).
    scores = np.array([0.1, 0.2, 0.3, 0.9, 0.8, 0.25, 0.6, 0.35, 0.2])
    issame = np.array([False] * 4 + [True] * 5)
    qa = np.array([0.5, 0.7, 0.9, 0.6, 0.9, 0.3, 0.4, 0.8, 0.1])
    qb = np.array([0.9, 0.7, 0.2, 0.8, 0.9, 0.95, 0.8, 0.3, 0.99])
    # pair quality (min): 0.5 0.7 0.2 0.6 0.9 0.3 0.4 0.3 0.1 -> rejection order 8, 2, 5, 7, 6, 0, 3, 1, 4
    # (5 before 7: equal quality, lower index first)
    fractions = np.arange(10) / 10  # P = 9: drop 0, 0, 1, 2, 3, 4, 5, 6, 7, 8 pairs
    return scores, issame, qa, qb, fractions


def test_erc_hand_computed_case():
    scores, issame, qa, qb, fractions = _hand_erc_case()
    res = pfe.error_vs_reject(scores, issame, qa, qb, fmr=0.25, reject_fractions=fractions)
    assert res["threshold"] == 0.35
    assert res["fmr"] == 0.25 and res["fmr_at_threshold"] == 0.25
    assert res["num_genuine"] == 5 and res["num_impostor"] == 4
    assert res["num_rejected"].tolist() == [0, 0, 1, 2, 3, 4, 5, 6, 7, 8]
    # 2/5; drop 8 (FNM) -> 1/4; drop 2 (impostor) -> 1/4; drop 5 (FNM) -> 0/3; then 0
    np.testing.assert_allclose(res["fnmr"], [0.4, 0.4, 0.25, 0.25, 0, 0, 0, 0, 0, 0], rtol=0, atol=1e-15)
    assert res["num_genuine_kept"].tolist() == [5, 5, 4, 4, 3, 2, 1, 1, 1, 1]
    # trapezoid, step 0.1: (0.4 + 0.325 + 0.25 + 0.125) * 0.1
    assert res["auc_erc"] == pytest.approx(0.11, abs=1e-15)
    np.testing.assert_array_equal(res["reject_fraction"], fractions)


def test_erc_hand_case_distinguishes_the_conventions():
    """Mutation check: each wrong variant of the reference disagrees with the hand values and with
    pfclib.eval, and the implementation fed a wrong convention disagrees with the reference."""
    scores, issame, qa, qb, fractions = _hand_erc_case()
    ours = pfe.error_vs_reject(scores, issame, qa, qb, fmr=0.25, reject_fractions=fractions)["fnmr"]
    ref, _ = _ref_erc(scores, issame, qa, qb, 0.25, fractions)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-15)
    for mutant in (dict(pair_quality=max), dict(reverse_ties=True), dict(recompute=True)):
        wrong, _ = _ref_erc(scores, issame, qa, qb, 0.25, fractions, **mutant)
        assert not np.allclose(wrong, ours), mutant
    # the reversed tie order drops pair 7 (a match) before pair 5 (a false non-match): 1/3 at 3 dropped
    assert _ref_erc(scores, issame, qa, qb, 0.25, fractions, reverse_ties=True)[0][4] == pytest.approx(1 / 3)
    best = np.maximum(qa, qb)  # the implementation with pair quality = max (min(x, x) = x)
    wrong = pfe.error_vs_reject(scores, issame, best, best, fmr=0.25, reject_fractions=fractions)["fnmr"]
    assert not np.allclose(wrong, ref)


@pytest.mark.parametrize("seed", range(5))
def test_erc_matches_brute_force_and_not_its_mutants(seed):
    scores, issame, qa, qb = _tied_pairs(400, seed)
    fractions = [0.0, 0.05, 0.1, 0.25, 0.29, 0.5, 0.7, 0.9]
    mutants = (dict(pair_quality=max), dict(reverse_ties=True), dict(recompute=True))
    caught = [False] * len(mutants)
    for rate in (0.1, 0.02):
        res = pfe.error_vs_reject(scores, issame, qa, qb, fmr=rate, reject_fractions=fractions)
        ref, t = _ref_erc(scores, issame, qa, qb, rate, fractions)
        assert res["threshold"] == t
        np.testing.assert_allclose(res["fnmr"], ref, rtol=0, atol=1e-15)
        assert res["num_rejected"].tolist() == [math.floor(f * 400 + 1e-9) for f in fractions]
        for j, mutant in enumerate(mutants):
            wrong, _ = _ref_erc(scores, issame, qa, qb, rate, fractions, **mutant)
            caught[j] |= not np.allclose(wrong, res["fnmr"], rtol=0, atol=1e-12)
    assert all(caught), caught  # every wrong variant disagrees with pfclib.eval at some FMR


def test_erc_default_fractions_and_decimal_rounding():
    scores, issame, qa, qb = _tied_pairs(100, 7)
    res = pfe.error_vs_reject(scores, issame, qa, qb, fmr=0.1)
    np.testing.assert_allclose(res["reject_fraction"], [i * 0.05 for i in range(20)], rtol=0, atol=1e-15)
    assert res["num_rejected"].tolist() == [5 * i for i in range(20)]
    assert 0.29 * 100 < 29  # binary floating point ...
    res = pfe.error_vs_reject(scores, issame, qa, qb, fmr=0.1, reject_fractions=[0.29])
    assert res["num_rejected"].tolist() == [29]  # ... but 0.29 of 100 pairs is 29 pairs


def _informative_set(seed):
    """2000 pairs: 1000 impostors (scores < 0.3), 900 genuine matches (scores > 0.5) and 100 genuine
    false non-matches (scores < 0) which are exactly the 100 lowest-quality pairs."""
    rng = np.random.default_rng(seed)
    imp = rng.uniform(-0.5, 0.3, 1000)
    gen_match = rng.uniform(0.5, 0.9, 900)
    gen_miss = rng.uniform(-0.4, 0.0, 100)
    scores = np.concatenate([imp, gen_match, gen_miss])
    issame = np.concatenate([np.zeros(1000, bool), np.ones(1000, bool)])
    qa = np.concatenate([rng.uniform(0.2, 1.0, 1900), rng.uniform(0.0, 0.1, 100)])
    qb = np.concatenate([rng.uniform(0.2, 1.0, 1900), rng.uniform(0.0, 1.0, 100)])
    perm = rng.permutation(2000)
    return scores[perm], issame[perm], qa[perm], qb[perm]


def test_erc_perfectly_informative_quality_drops_fnmr_to_zero_at_the_right_fraction():
    scores, issame, qa, qb = _informative_set(0)
    fractions = [0.0, 0.01, 0.02, 0.03, 0.04, 0.049, 0.05, 0.1, 0.5, 0.9]
    res = pfe.error_vs_reject(scores, issame, qa, qb, fmr=1e-2, reject_fractions=fractions)
    t = res["threshold"]
    assert 0.0 < t < 0.5 and np.sum(issame & (scores < t)) == 100  # exactly the constructed misses
    m = np.array([0, 20, 40, 60, 80, 98, 100, 200, 1000, 1800])
    assert res["num_rejected"].tolist() == m.tolist()
    expected = np.where(m <= 100, (100 - np.minimum(m, 100)) / (1000 - np.minimum(m, 100)), 0.0)
    np.testing.assert_allclose(res["fnmr"], expected, rtol=0, atol=1e-15)
    assert res["fnmr"][5] > 0 and np.all(res["fnmr"][6:] == 0)  # 0 from exactly 5% (100 pairs) on
    base = pfe.random_reject_baseline(scores, issame, fmr=1e-2, reject_fractions=fractions, n_repeats=0)
    np.testing.assert_allclose(base["fnmr"], 0.1, rtol=0, atol=1e-15)
    assert res["auc_erc"] < 0.1 * base["auc_erc"]


def test_erc_uninformative_quality_is_flat_within_noise():
    rng = np.random.default_rng(1)
    n = 20000
    issame = np.arange(n) % 2 == 0
    scores = np.where(issame, rng.normal(0.5, 0.25, n), rng.normal(0.0, 0.25, n))
    qa, qb = rng.random(n), rng.random(n)  # independent of everything
    fractions = np.arange(19) / 20  # up to 0.9
    res = pfe.error_vs_reject(scores, issame, qa, qb, fmr=1e-3, reject_fractions=fractions)
    p0 = res["fnmr"][0]
    assert 0.1 < p0 < 0.9  # a non-trivial error rate
    noise = np.sqrt(p0 * (1 - p0) / res["num_genuine_kept"])  # binomial sd of the kept genuine pairs
    assert np.all(np.abs(res["fnmr"] - p0) <= 4 * noise)
    base = pfe.random_reject_baseline(scores, issame, fmr=1e-3, reject_fractions=fractions, n_repeats=0)
    assert res["auc_erc"] == pytest.approx(base["auc_erc"], rel=0.05)
    # contrast: the same scores with an informative quality (the misses first) fall far outside
    informative = np.where(issame & (scores < res["threshold"]), 0.0, 1.0)
    good = pfe.error_vs_reject(scores, issame, informative, informative, fmr=1e-3, reject_fractions=fractions)
    assert np.any(np.abs(good["fnmr"] - p0) > 4 * noise)


# ---------------------------------------------------------------------------------------------- random baseline


def test_random_baseline_closed_form_is_fnmr_at_zero_rejection():
    scores, issame, qa, qb = _tied_pairs(500, 3)
    fractions = [0.0, 0.2, 0.5, 0.8]
    erc = pfe.error_vs_reject(scores, issame, qa, qb, fmr=0.05, reject_fractions=fractions)
    base = pfe.random_reject_baseline(scores, issame, fmr=0.05, reject_fractions=fractions, n_repeats=0)
    np.testing.assert_array_equal(base["fnmr"], np.full(4, erc["fnmr"][0]))
    assert base["threshold"] == erc["threshold"]
    assert base["auc_erc"] == pytest.approx(erc["fnmr"][0] * 0.8, abs=1e-15)
    assert (
        base["fnmr_sampled"] is None and base["fnmr_sampled_std"] is None and base["num_draws_used"] is None
    )
    assert base["num_rejected"].tolist() == erc["num_rejected"].tolist()


def test_random_baseline_closed_form_by_exhaustive_enumeration():
    """Over all 720 rejection orders of 6 pairs, the mean FNMR of the orders that leave a genuine
    pair equals FNMR at zero rejection, at every number of rejected pairs."""
    scores = np.array([0.9, 0.1, 0.8, 0.3, 0.2, 0.5])  # genuine 0.9, 0.1, 0.8; impostors 0.3, 0.2, 0.5
    issame = np.array([True, True, True, False, False, False])
    t = _ref_threshold(scores, issame, 1 / 3)  # one false match allowed: t = the impostor 0.5
    assert t == 0.5
    fnmr0 = 1 / 3  # the genuine 0.1
    for m in range(6):
        rates = []
        for order in itertools.permutations(range(6)):
            kept = [i for i in order[m:] if issame[i]]
            if kept:
                rates.append(sum(scores[i] < t for i in kept) / len(kept))
        assert np.mean(rates) == pytest.approx(fnmr0, abs=1e-12), m
    base = pfe.random_reject_baseline(
        scores, issame, fmr=1 / 3, reject_fractions=np.arange(6) / 6, n_repeats=0
    )
    np.testing.assert_allclose(base["fnmr"], fnmr0, rtol=0, atol=1e-15)


def _ref_sampled(scores, issame, rate, fractions, n_repeats, seed):
    rng = np.random.default_rng(seed)
    t = _ref_threshold(scores, issame, rate)
    n = len(scores)
    per_fraction = [[] for _ in fractions]
    for _ in range(n_repeats):
        order = rng.permutation(n)
        for j, f in enumerate(fractions):
            genuine = [i for i in order[math.floor(f * n + 1e-9) :] if issame[i]]
            if genuine:
                per_fraction[j].append(sum(scores[i] < t for i in genuine) / len(genuine))
    mean = np.array([np.mean(r) if r else np.nan for r in per_fraction])
    std = np.array([np.std(r) if r else np.nan for r in per_fraction])
    return mean, std, np.array([len(r) for r in per_fraction])


def test_random_baseline_sampled_matches_a_loop_and_handles_draws_without_genuine_pairs():
    rng = np.random.default_rng(5)
    scores = np.round(rng.normal(0, 1, 12), 1)
    issame = np.array([True, False, True] + [False] * 9)  # 2 genuine of 12 pairs
    fractions = [0.0, 0.5, 0.9]  # 0.9 keeps 2 pairs: many orders keep no genuine pair
    res = pfe.random_reject_baseline(
        scores, issame, fmr=0.5, reject_fractions=fractions, n_repeats=40, seed=3
    )
    mean, std, used = _ref_sampled(scores, issame, 0.5, fractions, 40, 3)
    np.testing.assert_allclose(res["fnmr_sampled"], mean, rtol=0, atol=1e-12, equal_nan=True)
    np.testing.assert_allclose(res["fnmr_sampled_std"], std, rtol=0, atol=1e-12, equal_nan=True)
    assert res["num_draws_used"].tolist() == used.tolist()
    assert used[0] == 40 and used[-1] < 40


def test_random_baseline_sampled_converges_to_the_closed_form_and_is_seeded():
    scores, issame, _, _ = _tied_pairs(600, 11)
    fractions = [0.0, 0.3, 0.6, 0.9]
    kw = dict(fmr=0.05, reject_fractions=fractions, n_repeats=300)
    res = pfe.random_reject_baseline(scores, issame, seed=0, **kw)
    assert res["num_draws_used"].tolist() == [300] * 4
    assert res["fnmr_sampled_std"][0] == pytest.approx(0.0, abs=1e-12)  # no rejection: no spread
    assert res["fnmr_sampled"][0] == pytest.approx(res["fnmr"][0], abs=1e-12)
    se = res["fnmr_sampled_std"][1:] / np.sqrt(300)
    assert np.all(np.abs(res["fnmr_sampled"][1:] - res["fnmr"][1:]) <= 4 * se)
    again = pfe.random_reject_baseline(scores, issame, seed=0, **kw)
    other = pfe.random_reject_baseline(scores, issame, seed=1, **kw)
    np.testing.assert_array_equal(res["fnmr_sampled"], again["fnmr_sampled"])
    assert not np.array_equal(res["fnmr_sampled"], other["fnmr_sampled"])


# ---------------------------------------------------------------------------------------------- OPIS


def _toy_opis():
    # identities A, B, C; genuine: A 0.9, 0.2; B 0.8, 0.7; C 0.3; impostors: AB 0.6, AC 0.1, BC 0.4, AB 0.0
    scores = np.array([0.9, 0.2, 0.8, 0.7, 0.3, 0.6, 0.1, 0.4, 0.0])
    issame = np.array([True] * 5 + [False] * 4)
    ida = np.array(["A", "A", "B", "B", "C", "A", "A", "B", "B"])
    idb = np.array(["A", "A", "B", "B", "C", "B", "C", "C", "A"])
    return scores, issame, ida, idb


def test_opis_hand_computed_three_identities():
    scores, issame, ida, idb = _toy_opis()
    res = pfe.opis(scores, issame, ida, idb, far_levels=(0.25, 0.5))
    # FAR 0.25: t = 0.6. FNMR_i = 1/2, 0, 1 (mean 1/2, var 1/6); FMR_i = 1/3, 1/3, 0 (mean 2/9, var 2/81)
    # FAR 0.5:  t = 0.2. FNMR_i = 0, 0, 0 (var 0);            FMR_i = 1/3, 2/3, 1/2 (mean 1/2, var 1/54)
    np.testing.assert_allclose(res["threshold"], [0.6, 0.2], rtol=0, atol=0)
    np.testing.assert_allclose(res["var_fnmr"], [1 / 6, 0.0], rtol=0, atol=1e-15)
    np.testing.assert_allclose(res["var_fmr"], [2 / 81, 1 / 54], rtol=0, atol=1e-15)
    np.testing.assert_allclose(res["opis_at_level"], [31 / 162, 3 / 162], rtol=0, atol=1e-15)
    assert res["opis"] == pytest.approx(17 / 162, abs=1e-15)
    np.testing.assert_allclose(res["fnmr"], [2 / 5, 0.0], rtol=0, atol=1e-15)
    np.testing.assert_allclose(res["fmr"], [1 / 4, 1 / 2], rtol=0, atol=1e-15)
    np.testing.assert_array_equal(res["far_levels"], [0.25, 0.5])
    assert res["num_identities"] == 3
    assert res["num_identities_fnmr"] == res["num_identities_fmr"] == 3
    assert res["num_identities_excluded_fnmr"] == res["num_identities_excluded_fmr"] == 0
    assert (res["num_genuine"], res["num_impostor"], res["min_pairs"]) == (5, 4, 1)


def test_opis_min_pairs_leaves_identities_out_and_counts_them():
    scores, issame, ida, idb = _toy_opis()
    res = pfe.opis(scores, issame, ida, idb, far_levels=(0.25, 0.5), min_pairs=2)
    # C has 1 genuine pair (left out of the FNMR term) and 2 impostor pairs (kept in the FMR term)
    assert res["num_identities_fnmr"] == 2 and res["num_identities_excluded_fnmr"] == 1
    assert res["num_identities_fmr"] == 3 and res["num_identities_excluded_fmr"] == 0
    # FAR 0.25: FNMR over A, B = 1/2, 0 -> var 1/16
    np.testing.assert_allclose(res["opis_at_level"], [1 / 16 + 2 / 81, 1 / 54], rtol=0, atol=1e-15)
    assert res["opis"] == pytest.approx((1 / 16 + 2 / 81 + 1 / 54) / 2, abs=1e-15)


def test_opis_is_zero_when_every_identity_has_the_same_rates():
    k, gen_scores = 4, [0.9, 0.7, 0.5, 0.3, 0.1]
    imp_scores = list(np.linspace(-0.5, 0.8, 20))
    scores, issame, ida, idb = [], [], [], []
    for i in range(k):  # every identity: the same genuine scores
        scores += gen_scores
        issame += [True] * len(gen_scores)
        ida += [i] * len(gen_scores)
        idb += [i] * len(gen_scores)
    for i, j in itertools.combinations(range(k), 2):  # every identity pair: the same impostor scores
        scores += imp_scores
        issame += [False] * len(imp_scores)
        ida += [i] * len(imp_scores)
        idb += [j] * len(imp_scores)
    scores, issame = np.array(scores), np.array(issame)
    res = pfe.opis(scores, issame, np.array(ida), np.array(idb), far_levels=(1e-1, 1e-2, 0.3))
    assert res["opis"] == pytest.approx(0.0, abs=1e-25)
    np.testing.assert_allclose(res["opis_at_level"], 0.0, rtol=0, atol=1e-25)
    # the rates themselves are not trivial (at 1e-2 the six tied top impostors force FMR = 0)
    assert np.all(res["fnmr"] > 0) and res["fmr"].tolist() == [0.1, 0.0, 0.3]
    scores[0] = -1.0  # identity 0's best genuine pair becomes a miss at every level
    assert pfe.opis(scores, issame, np.array(ida), np.array(idb), far_levels=(1e-1, 1e-2, 0.3))["opis"] > 1e-3


@pytest.mark.parametrize(("seed", "min_pairs"), [(0, 1), (1, 3), (2, 5), (3, 2)])
def test_opis_matches_brute_force_and_not_its_mutants(seed, min_pairs):
    rng = np.random.default_rng(seed)
    n, k = 400, 12
    ida = rng.integers(0, k, n)
    issame = rng.random(n) < 0.4
    idb = np.where(issame, ida, (ida + rng.integers(1, k, n)) % k)
    quality = rng.uniform(0.5, 1.5, k)  # identity-dependent separability: inconsistent rates
    scores = np.round(np.where(issame, rng.normal(0.6 * quality[ida], 0.3), rng.normal(0.0, 0.3, n)), 2)
    levels = (0.1, 0.03, 0.01)
    res = pfe.opis(scores, issame, ida, idb, far_levels=levels, min_pairs=min_pairs)
    overall, per_level = _ref_opis(list(scores), list(issame), list(ida), list(idb), levels, min_pairs)
    np.testing.assert_allclose(res["opis_at_level"], per_level, rtol=1e-12, atol=1e-15)
    assert res["opis"] == pytest.approx(overall, rel=1e-12)
    assert res["opis"] > 0
    for mutant in (dict(impostor_side_a_only=True), dict(ddof=1), dict(centre="global")):
        wrong, _ = _ref_opis(list(scores), list(issame), list(ida), list(idb), levels, min_pairs, **mutant)
        assert wrong != pytest.approx(res["opis"], rel=1e-6), mutant


def test_opis_accepts_string_and_integer_labels_alike():
    scores, issame, ida, idb = _toy_opis()
    codes = {"A": 10, "B": 20, "C": 30}
    as_int = pfe.opis(
        scores, issame, [codes[x] for x in ida], [codes[x] for x in idb], far_levels=(0.25, 0.5)
    )
    as_str = pfe.opis(scores, issame, ida, idb, far_levels=(0.25, 0.5))
    assert as_int["opis"] == as_str["opis"]


# ---------------------------------------------------------------------------------------------- errors


def _err(msg):
    return pytest.raises(ValueError, match=re.escape(msg))


def test_error_vs_reject_errors():
    scores, issame, qa, qb, fractions = _hand_erc_case()
    ok = dict(fmr=0.25, reject_fractions=fractions)
    erc = pfe.error_vs_reject
    with _err("scores must be 1-D (one score per pair), got shape (9, 1)"):
        erc(scores[:, None], issame, qa, qb, **ok)
    with _err("scores is empty: need at least one pair"):
        erc([], [], [], [], **ok)
    with _err("issame must have shape (9,) to match scores, got (8,)"):
        erc(scores, issame[:-1], qa, qb, **ok)
    with _err("issame must be boolean (or 0/1), got values [0 1 2]"):
        erc(scores, np.r_[issame[:-1].astype(int), 2], qa, qb, **ok)
    with _err("scores must be finite, got nan at index 3 (1 NaN or inf value(s) in all)"):
        erc(np.where(np.arange(9) == 3, np.nan, scores), issame, qa, qb, **ok)
    with _err("scores must be finite, got inf at index 0 (2 NaN or inf value(s) in all)"):
        erc(np.r_[np.inf, -np.inf, scores[2:]], issame, qa, qb, **ok)
    with _err("quality_a must have shape (9,) to match scores, got (8,)"):
        erc(scores, issame, qa[:-1], qb, **ok)
    with _err("quality_b must be finite, got nan at index 8 (1 NaN or inf value(s) in all)"):
        erc(scores, issame, qa, np.r_[qb[:-1], np.nan], **ok)
    for bad in (0, 0.0, 1.5, -0.1, float("nan"), True, "abc", None):
        with _err(f"fmr must be a number in (0, 1], got {bad!r}"):
            erc(scores, issame, qa, qb, fmr=bad, reject_fractions=fractions)
    with _err("fmr 0.001 needs at least ceil(1/0.001) = 1000 impostor pairs, got 4"):
        erc(scores, issame, qa, qb, fmr=1e-3, reject_fractions=fractions)
    with _err("fmr 0.2 needs at least ceil(1/0.2) = 5 impostor pairs, got 4"):
        erc(scores, issame, qa, qb, fmr=0.2, reject_fractions=fractions)
    for bad, at in ((1.0, 1), (-0.1, 1), (float("nan"), 1)):
        with _err(f"reject_fractions must each be in [0, 1), got {bad!r} at index {at}"):
            erc(scores, issame, qa, qb, fmr=0.25, reject_fractions=[0.0, bad])
    with _err("reject_fractions must be a non-empty 1-D sequence, got shape (0,)"):
        erc(scores, issame, qa, qb, fmr=0.25, reject_fractions=[])
    with _err("reject_fractions must be a non-empty 1-D sequence, got shape ()"):
        erc(scores, issame, qa, qb, fmr=0.25, reject_fractions=0.1)
    with _err("reject_fractions must be strictly increasing, got 0.5 at index 1 then 0.2"):
        erc(scores, issame, qa, qb, fmr=0.25, reject_fractions=[0.0, 0.5, 0.2])
    with _err("reject_fractions must be strictly increasing, got 0.5 at index 0 then 0.5"):
        erc(scores, issame, qa, qb, fmr=0.25, reject_fractions=[0.5, 0.5])
    with _err("the ERC needs genuine pairs (FNMR is over them), got none among 4 pairs"):
        erc(scores[:4], issame[:4], qa[:4], qb[:4], fmr=0.25, reject_fractions=[0.0])
    # the 5 genuine pairs get the lowest quality: rejecting 5 of 9 pairs (fraction 0.6) removes them all
    low_gen = np.where(issame, 0.0, 1.0)
    with _err(
        "no genuine pair is left after rejecting the 5 of 9 pairs with the lowest quality "
        "(reject fraction 0.6); use smaller reject fractions"
    ):
        erc(scores, issame, low_gen, low_gen, fmr=0.25, reject_fractions=[0.0, 0.5, 0.6, 0.7])


def test_random_reject_baseline_errors():
    scores, issame, _, _, fractions = _hand_erc_case()
    for bad in (-1, 1.5, True, "3", None):
        with _err(f"n_repeats must be an int >= 0, got {bad!r}"):
            pfe.random_reject_baseline(scores, issame, fmr=0.25, reject_fractions=fractions, n_repeats=bad)
    with _err("fmr 0.001 needs at least ceil(1/0.001) = 1000 impostor pairs, got 4"):
        pfe.random_reject_baseline(scores, issame, fmr=1e-3)
    with _err("reject_fractions must each be in [0, 1), got 1.0 at index 0"):
        pfe.random_reject_baseline(scores, issame, fmr=0.25, reject_fractions=[1.0])
    with _err("the ERC needs genuine pairs (FNMR is over them), got none among 4 pairs"):
        pfe.random_reject_baseline(scores[:4], issame[:4], fmr=0.25)


def test_opis_errors():
    scores, issame, ida, idb = _toy_opis()
    ok = dict(far_levels=(0.25,))
    with _err("identity_a must have shape (9,) to match scores, got (8,)"):
        pfe.opis(scores, issame, ida[:-1], idb, **ok)
    with _err("identity_b must have shape (9,) to match scores, got (9, 1)"):
        pfe.opis(scores, issame, ida, idb[:, None], **ok)
    with _err("issame must have shape (9,) to match scores, got (10,)"):
        pfe.opis(scores, np.r_[issame, True], ida, idb, **ok)
    with _err("scores must be finite, got nan at index 2 (1 NaN or inf value(s) in all)"):
        pfe.opis(np.where(np.arange(9) == 2, np.nan, scores), issame, ida, idb, **ok)
    num_a = np.array([0.0, 0, 1, 1, 2, 0, 0, 1, 1])
    num_b = np.array([0.0, 0, 1, 1, 2, 1, 2, 2, 0])
    assert pfe.opis(scores, issame, num_a, num_b, **ok)["opis"] == pytest.approx(31 / 162, abs=1e-15)
    with _err("identity_b must be finite, got nan at index 4 (1 NaN or inf value(s) in all)"):
        pfe.opis(scores, issame, num_a, np.where(np.arange(9) == 4, np.nan, num_b), **ok)
    with _err(
        "pair 1 is genuine but has identity_a='A' and identity_b='B': genuine pairs need equal "
        "identities, impostor pairs different ones"
    ):
        pfe.opis(scores, issame, ida, np.r_[idb[:1], ["B"], idb[2:]], **ok)
    with _err("pair 6 is an impostor but has identity_a='C' and identity_b='C'"):
        pfe.opis(scores, issame, np.r_[ida[:6], ["C"], ida[7:]], idb, **ok)
    for bad in (0.0, 1.5, float("nan")):
        with _err(f"FAR level must be a number in (0, 1], got {bad!r}"):
            pfe.opis(scores, issame, ida, idb, far_levels=(0.25, bad))
    with _err("far_levels must be a non-empty 1-D sequence, got shape (0,)"):
        pfe.opis(scores, issame, ida, idb, far_levels=())
    with _err("far_levels must be a non-empty 1-D sequence, got shape ()"):
        pfe.opis(scores, issame, ida, idb, far_levels=0.25)
    for bad in (0, -1, 1.5, True):
        with _err(f"min_pairs must be an int >= 1, got {bad!r}"):
            pfe.opis(scores, issame, ida, idb, min_pairs=bad, **ok)
    with _err("FAR level 0.1 needs at least ceil(1/0.1) = 10 impostor pairs, got 4"):
        pfe.opis(scores, issame, ida, idb, far_levels=(0.25, 0.1))
    with _err(
        "no identity has at least min_pairs=3 genuine pairs (the most any of the 3 identities has is 2); "
        "lower min_pairs or add genuine pairs"
    ):
        pfe.opis(scores, issame, ida, idb, min_pairs=3, **ok)
    # A and B: 3 genuine pairs each, but only the 2 impostor pairs A-B
    with _err(
        "no identity has at least min_pairs=3 impostor pairs (the most any of the 2 identities has is 2); "
        "lower min_pairs or add impostor pairs"
    ):
        pfe.opis(
            [0.9, 0.2, 0.5, 0.8, 0.7, 0.6, 0.1, 0.3],
            [True] * 6 + [False] * 2,
            ["A", "A", "A", "B", "B", "B", "A", "B"],
            ["A", "A", "A", "B", "B", "B", "B", "A"],
            far_levels=(0.5,),
            min_pairs=3,
        )
    with _err(
        "no identity has at least min_pairs=1 genuine pairs (the most any of the 3 identities has is 0)"
    ):
        pfe.opis(scores[~issame], issame[~issame], ida[~issame], idb[~issame], **ok)
