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
