"""pfcrepro.stats: seed statistics (t intervals, paired differences) and verdicts."""

import math

import numpy as np
import pandas as pd
import pytest

from pfcrepro import stats
from pfcrepro.report import VERDICTS


def test_mean_interval_matches_the_t_interval():
    # reference: mean 2.5, s = sqrt(5/3), t(0.975, 3) = 3.182446305284263 (tables)
    mean, low, high = stats.mean_interval([1.0, 2.0, 3.0, 4.0])
    half = 3.182446305284263 * math.sqrt(5.0 / 3.0) / 2.0
    assert mean == 2.5
    assert low == pytest.approx(2.5 - half, abs=1e-12) and high == pytest.approx(2.5 + half, abs=1e-12)
    # 90 %: t(0.95, 3) = 2.3533634348018264
    _, low90, _ = stats.mean_interval([1.0, 2.0, 3.0, 4.0], confidence=0.9)
    assert low90 == pytest.approx(2.5 - 2.3533634348018264 * math.sqrt(5.0 / 3.0) / 2.0, abs=1e-12)


def test_mean_interval_edge_cases():
    mean, low, high = stats.mean_interval([0.25])
    assert mean == 0.25 and math.isnan(low) and math.isnan(high)
    assert stats.mean_interval([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)
    with pytest.raises(ValueError, match="non-finite"):
        stats.mean_interval([1.0, float("nan")])
    with pytest.raises(ValueError, match="at least one"):
        stats.mean_interval([])
    with pytest.raises(ValueError, match="confidence"):
        stats.mean_interval([1.0, 2.0], confidence=95)


def test_summarise_groups_in_order_of_appearance():
    df = pd.DataFrame({"m": ["b", "a", "b", "a", "b"], "v": [1.0, 10.0, 3.0, 14.0, 2.0]})
    out = stats.summarise(df, "v", "m")
    assert list(out["m"]) == ["b", "a"] and list(out["n"]) == [3, 2]
    assert list(out["mean"]) == [2.0, 12.0]
    for _, row in out.iterrows():
        ref = stats.mean_interval(df.loc[df["m"] == row["m"], "v"])
        assert (row["low"], row["high"]) == pytest.approx(ref[1:], abs=1e-12)
        assert row["half_width"] == pytest.approx((ref[2] - ref[1]) / 2, abs=1e-12)
    assert out["std"].tolist() == pytest.approx([1.0, math.sqrt(8.0)])
    with pytest.raises(KeyError, match="nope"):
        stats.summarise(df, "nope", "m")


def test_paired_difference_pairs_on_seed_not_on_row_order():
    df = pd.DataFrame(
        {
            "method": ["pfc", "full", "pfc", "full", "full", "pfc"],
            "seed": [0, 0, 1, 2, 1, 2],
            "data": ["x"] * 6,
            "acc": [0.751, 0.70, 0.849, 0.90, 0.80, 0.950],
        }
    )
    (row,) = stats.paired_difference(df, "acc", "method", "pfc", "full").to_dict("records")
    diffs = [0.751 - 0.70, 0.849 - 0.80, 0.950 - 0.90]
    ref = stats.mean_interval(diffs)
    assert row["n"] == 3
    assert (row["mean"], row["low"], row["high"]) == pytest.approx(ref, abs=1e-12)
    assert row["treatment"] == pytest.approx(np.mean([0.751, 0.849, 0.950]))
    assert row["baseline"] == pytest.approx(np.mean([0.70, 0.80, 0.90]))
    # an unpaired (Welch) interval would be far wider: pairing must remove the shared seed variance
    assert row["high"] - row["low"] < 0.01
    by = stats.paired_difference(df, "acc", "method", "pfc", "full", by="data")
    assert list(by["data"]) == ["x"]
    with pytest.raises(ValueError, match="no rows"):
        stats.paired_difference(df, "acc", "method", "pfc", "other")
    with pytest.raises(ValueError, match="several rows"):
        stats.paired_difference(pd.concat([df, df.iloc[:1]]), "acc", "method", "pfc", "full")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((0.05, 0.01, 0.09), "reproduced"),
        ((0.05, -0.01, 0.11), "inconclusive"),
        ((0.05, float("nan"), float("nan")), "inconclusive"),
        ((-0.05, -0.09, -0.01), "not reproduced"),
        # a mean <= 0 with an interval reaching far above the relevant effect says nothing
        ((-0.016, -0.158, 0.126), "inconclusive"),
        ((0.0, -0.01, 0.01), "inconclusive"),
    ],
)
def test_superiority_verdict(args, expected):
    assert stats.superiority_verdict(*args) == expected
    assert expected in VERDICTS


def test_superiority_verdict_relevant_effect():
    # the interval excludes every improvement of 1 point or more: the claim is excluded
    assert stats.superiority_verdict(0.0, -0.008, 0.009, relevant=0.01) == "not reproduced"
    assert stats.superiority_verdict(-0.02, -0.03, -0.01, relevant=0.01) == "not reproduced"
    # straddles 0 and reaches above the relevant effect
    assert stats.superiority_verdict(0.0, -0.008, 0.012, relevant=0.01) == "inconclusive"
    # resolved, but smaller than the relevant effect
    assert stats.superiority_verdict(0.005, 0.002, 0.008, relevant=0.01) == "partly reproduced"
    assert stats.superiority_verdict(0.03, 0.02, 0.04, relevant=0.01) == "reproduced"
    with pytest.raises(ValueError, match="relevant"):
        stats.superiority_verdict(0.0, -1.0, 1.0, relevant=-0.1)


def test_control_passed():
    assert stats.control_passed(-0.05, -0.01)
    assert not stats.control_passed(-0.05, 0.001)
    assert not stats.control_passed(float("nan"), float("nan"))


def test_resolution_matches_t_formula():
    from scipy import stats as sps

    d = np.array([0.01, -0.004, 0.006, 0.002, 0.0])
    res = stats.resolution(d)
    se = d.std(ddof=1) / np.sqrt(5)
    assert res["n"] == 5
    assert res["half_width"] == pytest.approx(sps.t.ppf(0.975, 4) * se, rel=1e-12)
    assert res["mde"] == pytest.approx((sps.t.ppf(0.975, 4) + sps.t.ppf(0.8, 4)) * se, rel=1e-12)
    # the half-width is the one of mean_interval
    mean, low, high = stats.mean_interval(d)
    assert (high - low) / 2 == pytest.approx(res["half_width"], rel=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        stats.resolution([0.1])


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((0.0, -0.01, 0.01), "reproduced"),
        ((-0.005, -0.03, 0.02), "inconclusive"),
        ((-0.05, -0.07, -0.03), "not reproduced"),
        ((0.05, 0.03, 0.07), "not reproduced"),
        ((0.0, float("nan"), float("nan")), "inconclusive"),
    ],
)
def test_equivalence_verdict(args, expected):
    assert stats.equivalence_verdict(*args, margin=0.02) == expected
    assert expected in VERDICTS


def test_verdicts_reject_bad_inputs():
    with pytest.raises(ValueError, match="margin"):
        stats.equivalence_verdict(0.0, -1.0, 1.0, margin=0.0)
    with pytest.raises(ValueError, match="finite"):
        stats.superiority_verdict(float("nan"), 0.0, 1.0)


def _design(control_gap: float) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for seed in range(6):
        shared = rng.normal(0, 0.01)  # what arms of one seed share: pairing removes it
        for cond, method, effect in (
            ("clean", "full", 0.0),
            ("noisy", "full", -control_gap),
            ("noisy", "pfc", -control_gap + 0.03),
        ):
            rows.append(
                {
                    "condition": cond,
                    "method": method,
                    "seed": seed,
                    "acc": 0.9 + effect + shared + rng.normal(0, 0.002),
                }
            )
    return pd.DataFrame(rows)


_COMPARISONS = [
    {
        "name": "noise hurts",
        "kind": "control",
        "treatment": {"condition": "noisy", "method": "full"},
        "baseline": {"condition": "clean", "method": "full"},
    },
    {
        "name": "pfc better",
        "kind": "superiority",
        "relevant": 0.01,
        "treatment": {"condition": "noisy", "method": "pfc"},
        "baseline": {"condition": "noisy", "method": "full"},
    },
    {
        "name": "pfc same as clean",
        "kind": "equivalence",
        "margin": 0.01,
        "treatment": {"condition": "noisy", "method": "pfc"},
        "baseline": {"condition": "clean", "method": "full"},
    },
]


def test_judge_pairs_on_seed_and_gives_verdicts_when_controls_pass():
    out = stats.judge(_design(0.05), "acc", _COMPARISONS).set_index("name")
    assert out.loc["noise hurts", "passed"]
    assert out.loc["noise hurts", "high"] < 0
    assert out.loc["pfc better", "verdict"] == "reproduced"
    assert out.loc["pfc better", "mean"] == pytest.approx(0.03, abs=0.005)
    # pairing: the shared per-seed term (sd 0.01) does not widen the interval (per-run noise 0.002)
    assert out.loc["pfc better", "half_width"] < 0.005
    assert out.loc["pfc same as clean", "verdict"] == "not reproduced"  # -0.02, outside +-0.01
    assert out.loc["pfc better", "n"] == 6


def test_judge_withholds_verdicts_when_a_control_fails():
    out = stats.judge(_design(0.0), "acc", _COMPARISONS).set_index("name")
    assert not out.loc["noise hurts", "passed"]
    assert (out.loc[["pfc better", "pfc same as clean"], "verdict"] == "control failed").all()
    # a claim validated by another control keeps its verdict
    own = [*_COMPARISONS[:2], {**_COMPARISONS[2], "controls": []}]
    assert stats.judge(_design(0.0), "acc", own).set_index("name").loc["pfc same as clean", "verdict"] == (
        "not reproduced"
    )
    with pytest.raises(ValueError, match="not in the design"):
        stats.judge(_design(0.0), "acc", [*_COMPARISONS[:2], {**_COMPARISONS[2], "controls": ["x"]}])
    smoke = stats.judge(_design(0.05), "acc", _COMPARISONS, smoke=True).set_index("name")
    assert (smoke.loc[["pfc better", "pfc same as clean"], "verdict"] == "smoke test").all()


def test_judge_rejects_bad_comparisons():
    df = _design(0.05)
    with pytest.raises(ValueError, match="kind"):
        stats.judge(df, "acc", [{**_COMPARISONS[1], "kind": "better"}])
    with pytest.raises(ValueError, match="no run matches"):
        stats.judge(df, "acc", [{**_COMPARISONS[1], "treatment": {"method": "nope"}}])
    with pytest.raises(ValueError, match="margin"):
        stats.judge(df, "acc", [{k: v for k, v in _COMPARISONS[2].items() if k != "margin"}])


def test_judge_skips_comparisons_without_runs_only_when_asked():
    df = _design(0.05)
    extra = {**_COMPARISONS[1], "name": "absent arm", "treatment": {"condition": "noisy", "method": "other"}}
    with pytest.raises(ValueError, match="no run matches"):
        stats.judge(df, "acc", [*_COMPARISONS, extra])
    out = stats.judge(df, "acc", [*_COMPARISONS, extra], skip_missing=True)
    assert list(out["name"]) == [c["name"] for c in _COMPARISONS]
    assert out.set_index("name").loc["pfc better", "verdict"] == "reproduced"
