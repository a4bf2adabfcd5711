import json
import math

import pandas as pd
import pytest

from pfcrepro import report
from pfcrepro.report import VERDICTS, check_metrics, headline, save_metrics


def test_save_and_check_roundtrip(tmp_path):
    path = tmp_path / "m" / "metrics.json"
    save_metrics(path, {"acc": 0.91, "nested": {"tar": [0.5, 0.7]}, "name": "x"})
    assert json.loads(path.read_text())["nested"]["tar"] == [0.5, 0.7]
    assert check_metrics(path, required=["acc", "nested.tar"])["acc"] == 0.91


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_is_refused_and_nothing_written(tmp_path, bad):
    path = tmp_path / "metrics.json"
    with pytest.raises(ValueError, match="non-finite metrics"):
        save_metrics(path, {"acc": bad})
    assert not path.exists() and not list(tmp_path.iterdir())


def test_metrics_without_numbers_are_refused(tmp_path):
    with pytest.raises(ValueError, match="contain no numbers"):
        save_metrics(tmp_path / "m.json", {"note": "nothing measured"})


def test_check_metrics_fails_on_missing_file_and_keys(tmp_path):
    with pytest.raises(AssertionError, match="was not written"):
        check_metrics(tmp_path / "absent.json")
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"acc": 1.0, "loss": float("nan")}))
    with pytest.raises(AssertionError, match="non-finite"):
        check_metrics(path)
    path.write_text(json.dumps({"acc": 1.0}))
    with pytest.raises(AssertionError, match=r"missing metrics \['tar'\]"):
        check_metrics(path, required=["tar"])


def test_to_records_is_json_ready():
    df = pd.DataFrame(
        {"a": [1, 2], "b": [0.5, float("nan")], "c": pd.Categorical(["x", "y"]), "d": [True, False]}
    )
    records = report.to_records(df)
    assert records == [{"a": 1, "b": 0.5, "c": "x", "d": True}, {"a": 2, "b": None, "c": "y", "d": False}]
    assert type(records[0]["a"]) is int and type(records[0]["d"]) is bool


def test_extrapolated_is_a_verdict_of_its_own():
    assert "extrapolated" in VERDICTS and "reproduced" in VERDICTS
    assert headline("c", "p", "m", "extrapolated")["verdict"] == "extrapolated"
    with pytest.raises(ValueError, match="verdict must be one of"):
        headline("c", "p", "m", "sort of")


_ROW = {
    "baseline": 0.9,
    "treatment": 0.925,
    "mean": 0.025,
    "low": 0.01,
    "high": 0.04,
    "half_width": 0.015,
    "n": 5,
}


def test_comparison_text_shows_points_interval_seeds_and_resolution():
    text = report.comparison_text(_ROW, "features, C=10,000", "r=0.1", "r=1.0")
    assert text == (
        "[features, C=10,000] r=1.0 90.00 vs r=0.1 92.50 (verification acc %); diff +2.50 pp, "
        "95% CI [+1.00, +4.00], 5 seeds, resolves +-1.50 pp"
    )
    single = report.comparison_text({**_ROW, "low": math.nan, "high": math.nan, "n": 1}, "x", "a", "b")
    assert "(one seed: no interval)" in single and "resolves" not in single


def test_comparison_text_names_the_unit_of_a_comparison():
    """A headline about another measure (e.g. an FNMR gain) must not be labelled as accuracy."""
    text = report.comparison_text(_ROW, "images", "quality", "random", unit="FNMR gain, %")
    assert "(FNMR gain, %)" in text and "verification acc" not in text
    with pytest.raises(ValueError, match="unit"):
        report.comparison_text(_ROW, "images", "a", "b", unit="")


def test_claim_headlines_carry_each_comparisons_unit_and_skip_controls():
    judged = pd.DataFrame(
        [
            {**_ROW, "name": "control", "verdict": None},
            {**_ROW, "name": "acc claim", "verdict": "reproduced"},
            {**_ROW, "name": "gain claim", "verdict": "inconclusive"},
        ]
    )
    arms = {"treatment": {"method": "t"}, "baseline": {"method": "b"}}
    comparisons = [
        {"name": "control", "kind": "control", **arms},
        {"name": "acc claim", "claim": "c1", "paper": "p1", **arms},
        {"name": "gain claim", "claim": "c2", "paper": "p2", "unit": "FNMR gain, %", **arms},
    ]
    rows = report.claim_headlines(judged, comparisons, "images")
    assert [r["claim"] for r in rows] == ["c1", "c2"]
    assert "(verification acc %)" in rows[0]["measured"] and rows[0]["verdict"] == "reproduced"
    assert "(FNMR gain, %)" in rows[1]["measured"] and rows[1]["verdict"] == "inconclusive"
    with pytest.raises(ValueError, match="no 'paper'"):
        report.claim_headlines(judged, [{"name": "acc claim", "claim": "c", **arms}], "images")


def test_claim_headlines_skip_the_claims_a_smaller_design_did_not_judge_only_when_asked():
    arms = {"treatment": {"method": "t"}, "baseline": {"method": "b"}}
    comparisons = [
        {"name": "run claim", "claim": "c1", "paper": "p1", **arms},
        {"name": "skipped claim", "claim": "c2", "paper": "p2", **arms},
    ]
    judged = pd.DataFrame([{**_ROW, "name": "run claim", "verdict": "reproduced"}])
    with pytest.raises(ValueError, match="claim 'skipped claim' has no judged row.*skip_missing=True"):
        report.claim_headlines(judged, comparisons, "images")
    rows = report.claim_headlines(judged, comparisons, "images", skip_missing=True)
    assert [r["claim"] for r in rows] == ["c1"]
