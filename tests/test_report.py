import json
import math

import pytest

from pfclib.report import check_metrics, save_metrics


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
