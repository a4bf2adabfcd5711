"""pfclib.experiments: designs, the trial runner, seed statistics, verdicts and per-class analysis."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from pfclib import experiments as ex
from pfclib.report import VERDICTS

# --------------------------------------------------------------------------------------------- designs


def test_factorial_crosses_levels_and_seeds_in_order():
    trials = ex.factorial(
        {
            "data": {"clean": {"data.path": "a"}, "flip40": {"data.path": "b"}},
            "method": {"full": {"head.sample_rate": 1.0}, "pfc": {"head.sample_rate": 0.1}},
        },
        seeds=[3, 7],
    )
    assert len(trials) == 8
    assert [t.tags for t in trials[:3]] == [
        {"data": "clean", "method": "full", "seed": 3},
        {"data": "clean", "method": "full", "seed": 7},
        {"data": "clean", "method": "pfc", "seed": 3},
    ]
    assert trials[-1].overrides == {"data.path": "b", "head.sample_rate": 0.1, "seed": 7}
    assert len({t.slug for t in trials}) == 8


def test_factorial_rejects_ambiguous_or_empty_designs():
    with pytest.raises(ValueError, match="head.sample_rate"):
        ex.factorial({"a": {"x": {"head.sample_rate": 1.0}}, "b": {"y": {"head.sample_rate": 0.1}}})
    with pytest.raises(ValueError, match="no levels"):
        ex.factorial({"a": {}})
    with pytest.raises(ValueError, match="reserved"):
        ex.factorial({"seed": {"x": {}}})
    with pytest.raises(ValueError, match="distinct"):
        ex.factorial({"a": {"x": {}}}, seeds=[1, 1])
    # the same value from two factors is not a conflict
    (trial,) = ex.factorial({"a": {"x": {"k": 1}}, "b": {"y": {"k": 1}}})
    assert trial.overrides == {"k": 1, "seed": 0}


def test_trial_slug_is_file_system_safe():
    trial = ex.Trial(tags={"method": "PFC r=0.1 / filter", "seed": 0}, overrides={})
    assert trial.slug == "method-PFC-r=0.1-filter_seed-0"


def _fake_metrics(config):
    acc = 0.5 + config.head.sample_rate / 4 + config.seed / 100
    return {
        "steps": 3,
        "final_loss": 1.0,
        "final_loss_avg": 1.5,
        "samples_per_s": 10.0,
        "train_time_s": 0.3,
        "loss_history": [3.0, 2.0, 1.0],
        "checkpoint": None,
        "verification": {
            "pairs": {"acc": acc, "acc_std": 0.01, "auc": 0.9, "tar_at_far": {"1e-1": 0.7, "1e-4": None}}
        },
    }


def test_run_trials_builds_configs_and_a_tidy_table(tmp_path):
    seen = []

    def train_fn(config):
        seen.append(config)
        return _fake_metrics(config)

    base = {"backbone": "iresnet_tiny", "image_size": 32, "embedding_size": 16, "max_steps": 3}
    trials = ex.factorial(
        {"method": {"full": {"head.sample_rate": 1.0}, "pfc": {"head.sample_rate": 0.1}}}, [0, 1]
    )
    df = ex.run_trials(
        base, trials, tmp_path / "runs", train_fn=train_fn, extra=lambda t, m, c: {"lr": c.optim.lr}, log=None
    )
    assert len(df) == 4 and len(seen) == 4
    assert [c.head.sample_rate for c in seen] == [1.0, 1.0, 0.1, 0.1]
    assert [c.seed for c in seen] == [0, 1, 0, 1]
    assert len({c.output_dir for c in seen}) == 4
    assert all(c.output_dir.startswith(str(tmp_path / "runs")) for c in seen)
    assert list(df["method"]) == ["full", "full", "pfc", "pfc"]
    np.testing.assert_allclose(df["pairs.acc"], [0.75, 0.76, 0.525, 0.535], rtol=0, atol=1e-12)
    assert df["pairs.tar@1e-1"].tolist() == [0.7] * 4
    assert df["pairs.tar@1e-4"].isna().all()
    assert "loss_history" not in df.columns
    assert (df["wall_s"] >= 0).all() and (df["lr"] == 0.1).all()
    assert base == {"backbone": "iresnet_tiny", "image_size": 32, "embedding_size": 16, "max_steps": 3}


def test_run_trials_rejects_colliding_output_folders(tmp_path):
    trials = [ex.Trial({"a": "x"}, {}), ex.Trial({"a": "x"}, {"seed": 1})]
    with pytest.raises(ValueError, match="distinct tags"):
        ex.run_trials({"max_steps": 1}, trials, tmp_path, train_fn=_fake_metrics, log=None)


# ------------------------------------------------------------------------------------------ statistics


def test_mean_interval_matches_the_t_interval():
    # reference: mean 2.5, s = sqrt(5/3), t(0.975, 3) = 3.182446305284263 (tables)
    mean, low, high = ex.mean_interval([1.0, 2.0, 3.0, 4.0])
    half = 3.182446305284263 * math.sqrt(5.0 / 3.0) / 2.0
    assert mean == 2.5
    assert low == pytest.approx(2.5 - half, abs=1e-12) and high == pytest.approx(2.5 + half, abs=1e-12)
    # 90 %: t(0.95, 3) = 2.3533634348018264
    _, low90, _ = ex.mean_interval([1.0, 2.0, 3.0, 4.0], confidence=0.9)
    assert low90 == pytest.approx(2.5 - 2.3533634348018264 * math.sqrt(5.0 / 3.0) / 2.0, abs=1e-12)


def test_mean_interval_edge_cases():
    mean, low, high = ex.mean_interval([0.25])
    assert mean == 0.25 and math.isnan(low) and math.isnan(high)
    assert ex.mean_interval([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)
    with pytest.raises(ValueError, match="non-finite"):
        ex.mean_interval([1.0, float("nan")])
    with pytest.raises(ValueError, match="at least one"):
        ex.mean_interval([])
    with pytest.raises(ValueError, match="confidence"):
        ex.mean_interval([1.0, 2.0], confidence=95)


def test_summarise_groups_in_order_of_appearance():
    df = pd.DataFrame({"m": ["b", "a", "b", "a", "b"], "v": [1.0, 10.0, 3.0, 14.0, 2.0]})
    out = ex.summarise(df, "v", "m")
    assert list(out["m"]) == ["b", "a"] and list(out["n"]) == [3, 2]
    assert list(out["mean"]) == [2.0, 12.0]
    for _, row in out.iterrows():
        ref = ex.mean_interval(df.loc[df["m"] == row["m"], "v"])
        assert (row["low"], row["high"]) == pytest.approx(ref[1:], abs=1e-12)
        assert row["half_width"] == pytest.approx((ref[2] - ref[1]) / 2, abs=1e-12)
    assert out["std"].tolist() == pytest.approx([1.0, math.sqrt(8.0)])
    with pytest.raises(KeyError, match="nope"):
        ex.summarise(df, "nope", "m")


def test_paired_difference_pairs_on_seed_not_on_row_order():
    df = pd.DataFrame(
        {
            "method": ["pfc", "full", "pfc", "full", "full", "pfc"],
            "seed": [0, 0, 1, 2, 1, 2],
            "data": ["x"] * 6,
            "acc": [0.751, 0.70, 0.849, 0.90, 0.80, 0.950],
        }
    )
    (row,) = ex.paired_difference(df, "acc", "method", "pfc", "full").to_dict("records")
    diffs = [0.751 - 0.70, 0.849 - 0.80, 0.950 - 0.90]
    ref = ex.mean_interval(diffs)
    assert row["n"] == 3
    assert (row["mean"], row["low"], row["high"]) == pytest.approx(ref, abs=1e-12)
    assert row["treatment"] == pytest.approx(np.mean([0.751, 0.849, 0.950]))
    assert row["baseline"] == pytest.approx(np.mean([0.70, 0.80, 0.90]))
    # an unpaired (Welch) interval would be far wider: pairing must remove the shared seed variance
    assert row["high"] - row["low"] < 0.01
    by = ex.paired_difference(df, "acc", "method", "pfc", "full", by="data")
    assert list(by["data"]) == ["x"]
    with pytest.raises(ValueError, match="no rows"):
        ex.paired_difference(df, "acc", "method", "pfc", "other")
    with pytest.raises(ValueError, match="several rows"):
        ex.paired_difference(pd.concat([df, df.iloc[:1]]), "acc", "method", "pfc", "full")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((0.05, 0.01, 0.09), "reproduced"),
        ((0.05, -0.01, 0.11), "inconclusive"),
        ((0.05, float("nan"), float("nan")), "inconclusive"),
        ((0.0, -0.01, 0.01), "not reproduced"),
        ((-0.05, -0.09, -0.01), "not reproduced"),
    ],
)
def test_superiority_verdict(args, expected):
    assert ex.superiority_verdict(*args) == expected
    assert expected in VERDICTS


def test_superiority_verdict_minimum_effect():
    assert ex.superiority_verdict(0.05, 0.02, 0.08, min_effect=0.03) == "inconclusive"
    assert ex.superiority_verdict(0.02, 0.01, 0.03, min_effect=0.03) == "not reproduced"


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
    assert ex.equivalence_verdict(*args, margin=0.02) == expected
    assert expected in VERDICTS


def test_verdicts_reject_bad_inputs():
    with pytest.raises(ValueError, match="margin"):
        ex.equivalence_verdict(0.0, -1.0, 1.0, margin=0.0)
    with pytest.raises(ValueError, match="finite"):
        ex.superiority_verdict(float("nan"), 0.0, 1.0)


# ------------------------------------------------------------------------------------ per-class analysis


def test_size_buckets_labels_and_assignment():
    buckets = ex.size_buckets([1, 2, 3, 4, 9, 10, 500], edges=[1, 2, 4, 10])
    assert list(buckets.categories) == ["1", "2-3", "4-9", "10+"]
    assert list(buckets) == ["1", "2-3", "2-3", "4-9", "4-9", "10+", "10+"]
    with pytest.raises(ValueError, match="below the first edge"):
        ex.size_buckets([0, 3], edges=[1, 5])
    with pytest.raises(ValueError, match="increasing"):
        ex.size_buckets([3], edges=[5, 5])


def test_updates_by_class_size_aggregates_counters():
    sizes = [2, 2, 3, 50, 60]
    active = [1, 3, 2, 40, 50]
    passive = [9, 7, 8, 60, 50]
    out = ex.updates_by_class_size(sizes, active, passive, steps=100, edges=[1, 10])
    assert list(out["bucket"]) == ["1-9", "10+"]
    assert list(out["classes"]) == [3, 2] and list(out["images"]) == [7, 110]
    assert out["active_per_class"].tolist() == pytest.approx([2.0, 45.0])
    assert out["passive_per_class"].tolist() == pytest.approx([8.0, 55.0])
    assert out["passive_rate"].tolist() == pytest.approx([0.08, 0.55])
    assert out["passive_share"].tolist() == pytest.approx([24 / 30, 110 / 200])
    with pytest.raises(ValueError, match="steps"):
        ex.updates_by_class_size(sizes, active, passive, steps=50, edges=[1])
    with pytest.raises(ValueError, match="one length"):
        ex.updates_by_class_size(sizes, active[:2], passive, steps=100, edges=[1])


def test_row_angles_in_degrees_fp64():
    a = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [2.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([[0.0, 3.0], [1.0, 1.0], [-1.0, 0.0], [5.0, 0.0], [1.0, 0.0]], dtype=torch.float32)
    angles = ex.row_angles(a, b)
    assert angles.dtype == np.float64
    np.testing.assert_allclose(angles[:4], [90.0, 45.0, 180.0, 0.0], rtol=0, atol=1e-9)
    assert math.isnan(angles[4])
    with pytest.raises(ValueError, match="one shape"):
        ex.row_angles(a, a[:2])


# ----------------------------------------------------------------------------------- head measurements


def test_measure_in_subprocess_round_trips_json():
    assert ex.measure_in_subprocess("json:dumps", {"obj": [1, 2], "separators": [",", ":"]}) == "[1,2]"
    with pytest.raises(RuntimeError, match="json:loads"):
        ex.measure_in_subprocess("json:loads", {"s": "not json"})
    with pytest.raises(ValueError, match="module:name"):
        ex.measure_in_subprocess("json.dumps", {})


def test_measure_head_grid_emulates_one_rank_per_layout():
    calls = []

    def runner(function, kwargs):
        calls.append(dict(kwargs))
        if kwargs["method"] == "sparse" and kwargs["num_classes"] > 100:
            raise RuntimeError("CUDA out of memory")
        k = max(int(kwargs["sample_rate"] * kwargs["num_classes"]), 1)
        return {"k": k, "step_ms": 2.0 * kwargs["batch_size"], "peak_bytes": 2**20 * k, "model_bytes": 2**21}

    df = ex.measure_head_grid(
        [80, 1000], world_size=4, batch_size=8, embedding_size=16, sample_rate=0.5, dp_max_classes=500,
        runner=runner, log=None,
    )  # fmt: skip
    assert list(df["layout"][:4]) == ex.head_layouts(0.5) == [
        "data parallel", "model parallel", "PFC dense r=0.5", "PFC sparse r=0.5",
    ]  # fmt: skip
    first = {row.layout: row for row in df[df["num_classes"] == 80].itertuples()}
    assert (first["data parallel"].classes_per_rank, first["data parallel"].rows_per_rank) == (80, 8)
    assert (first["model parallel"].classes_per_rank, first["model parallel"].rows_per_rank) == (20, 32)
    assert first["PFC dense r=0.5"].k == 10 and first["model parallel"].k == 20
    # throughput counts the images of all W ranks: W * B per step
    assert first["model parallel"].samples_per_s == pytest.approx(32 / (64e-3))
    assert (
        first["PFC dense r=0.5"].peak_mb == pytest.approx(10.0) and first["PFC dense r=0.5"].model_mb == 2.0
    )
    big = {row.layout: row for row in df[df["num_classes"] == 1000].itertuples()}
    assert big["data parallel"].error.startswith("skipped") and math.isnan(big["data parallel"].step_ms)
    assert "out of memory" in big["PFC sparse r=0.5"].error and math.isnan(big["PFC sparse r=0.5"].peak_mb)
    assert big["model parallel"].error == "" and big["model parallel"].classes_per_rank == 250
    assert len(calls) == 7  # the skipped data-parallel point never ran
    assert [c["method"] for c in calls[:4]] == ["dense", "dense", "dense", "sparse"]
    with pytest.raises(ValueError, match="world_size"):
        ex.measure_head_grid([3], 4, 8, 16, 0.5, 10, runner=runner, log=None)


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
    active, passive = ex.expected_update_rates(sizes, batch_size=3, sample_rate=1.0)
    np.testing.assert_allclose(active, q, rtol=0, atol=1e-12)
    np.testing.assert_allclose(passive, 1 - q, rtol=0, atol=1e-12)  # r = 1: every non-positive, every step
    active, passive = ex.expected_update_rates(sizes, batch_size=3, sample_rate=0.8)
    k, expected_positives = 4, q.sum()
    np.testing.assert_allclose(
        passive, (1 - q) * (k - expected_positives) / (5 - expected_positives), atol=1e-12
    )
    # k below the expected positives: no negatives are sampled
    _, passive = ex.expected_update_rates(sizes, batch_size=3, sample_rate=0.2)
    assert np.all(passive == 0)
    # a class larger than N - B is in every batch
    active, _ = ex.expected_update_rates([1, 9], batch_size=2, sample_rate=1.0)
    assert active[1] == 1.0 and active[0] == pytest.approx(2 / 10)
    with pytest.raises(ValueError, match="batch_size"):
        ex.expected_update_rates([1, 2], batch_size=4, sample_rate=1.0)


def test_to_records_is_json_ready():
    df = pd.DataFrame(
        {"a": [1, 2], "b": [0.5, float("nan")], "c": pd.Categorical(["x", "y"]), "d": [True, False]}
    )
    records = ex.to_records(df)
    assert records == [{"a": 1, "b": 0.5, "c": "x", "d": True}, {"a": 2, "b": None, "c": "y", "d": False}]
    assert type(records[0]["a"]) is int and type(records[0]["d"]) is bool


TINY_DATA = {"num_identities": 12, "images_per_identity": 3, "heldout_identities": 4, "num_pairs": 8,
             "heldout_images_per_identity": 2, "image_size": 16, "seed": 3}  # fmt: skip


def test_ensure_dataset_generates_reuses_and_refuses(tmp_path):
    from pfclib.data.synthetic import load_meta

    path = tmp_path / "tiny"
    with pytest.raises(FileNotFoundError, match="dvc repro data"):
        ex.ensure_dataset(path)
    assert ex.ensure_dataset(path, TINY_DATA) == path
    stamp = (path / "meta.json").stat().st_mtime_ns
    assert ex.ensure_dataset(path, TINY_DATA) == path and (path / "meta.json").stat().st_mtime_ns == stamp
    assert ex.ensure_dataset(path) == path  # exists: no config needed
    ex.ensure_dataset(path, {**TINY_DATA, "num_identities": 13})  # a different config regenerates
    assert load_meta(path)["num_identities"] == 13


def test_class_analysis_of_a_tiny_run(tmp_path):
    from pfclib.checkpoint import load_checkpoint
    from pfclib.data.synthetic import load_meta
    from pfclib.head import init_centers
    from pfclib.train import training_function

    data = ex.ensure_dataset(tmp_path / "data", TINY_DATA)
    config = {
        "output_dir": str(tmp_path / "run"), "backbone": "mobilefacenet_tiny", "embedding_size": 8,
        "image_size": 16, "max_steps": 3, "device": "cpu", "seed": 5,
        "data": {"kind": "synthetic", "path": str(data), "batch_size": 6},
        "head": {"sample_rate": 0.5, "track_updates": True, "margin": {"name": "cosface", "s": 16.0, "m": 0.2}},
        "log": {"csv": False, "tensorboard": False, "progress": "off"},
        "checkpoint": {"at_end": True},
    }  # fmt: skip
    metrics = training_function(config)
    df = ex.class_analysis(metrics["checkpoint"], data, flip=False)
    assert list(df["label"]) == list(range(12))
    assert df["size"].tolist() == load_meta(data)["label_sizes"]
    assert (df["steps"] == 3).all()
    assert ((df["active"] + df["passive"]) <= 3).all() and df["active"].sum() > 0
    assert df["train_top1"].between(0, 1).all()
    weight = load_checkpoint(metrics["checkpoint"])["head"]["weight"]
    initial = init_centers(0, 12, 8, 5, torch.float64)
    np.testing.assert_allclose(df["drift_deg"], ex.row_angles(initial, weight), rtol=0, atol=1e-9)
    assert (df["drift_deg"] >= 0).all() and (df["drift_deg"] > 0).any()
    assert df["center_to_mean_deg"].between(0, 180).all()
