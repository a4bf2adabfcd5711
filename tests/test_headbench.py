"""pfcrepro.headbench: one head step measured in a fresh process, the per-layout grid, and the CLI script."""

import importlib.util
import math
from pathlib import Path

import pytest

from pfcrepro import headbench


def test_measure_in_subprocess_round_trips_json():
    assert headbench.measure_in_subprocess("json:dumps", {"obj": [1, 2], "separators": [",", ":"]}) == "[1,2]"
    with pytest.raises(RuntimeError, match="json:loads"):
        headbench.measure_in_subprocess("json:loads", {"s": "not json"})
    with pytest.raises(ValueError, match="module:name"):
        headbench.measure_in_subprocess("json.dumps", {})


def test_measure_head_grid_emulates_one_rank_per_layout():
    calls = []

    def runner(function, kwargs):
        calls.append(dict(kwargs))
        if kwargs["method"] == "sparse" and kwargs["num_classes"] > 100:
            raise RuntimeError("CUDA out of memory")
        k = max(int(kwargs["sample_rate"] * kwargs["num_classes"]), 1)
        return {"k": k, "step_ms": 2.0 * kwargs["batch_size"], "peak_bytes": 2**20 * k, "model_bytes": 2**21}

    df = headbench.measure_head_grid(
        [80, 1000], world_size=4, batch_size=8, embedding_size=16, sample_rate=0.5, dp_max_classes=500,
        runner=runner, log=None,
    )  # fmt: skip
    assert list(df["layout"][:4]) == headbench.head_layouts(0.5) == [
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
        headbench.measure_head_grid([3], 4, 8, 16, 0.5, 10, runner=runner, log=None)


def test_measure_head_grid_runs_the_harness_measure_by_default():
    import inspect

    assert inspect.signature(headbench.measure_head_grid).parameters["function"].default == (
        "pfcrepro.headbench:measure"
    )
    rec = headbench.measure_in_subprocess(
        "pfcrepro.headbench:measure",
        {"method": "sparse", "num_classes": 40, "sample_rate": 0.5, "embedding_size": 4, "batch_size": 2,
         "repeats": 1, "warmup": 1},
    )  # fmt: skip
    assert rec["k"] == 20 and rec["step_ms"] > 0


def _benchmark_script():
    """benchmarks/head.py, the command line over headbench.measure, loaded as a module."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "head.py"
    spec = importlib.util.spec_from_file_location("bench_head", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_measure_runs_at_tiny_size():
    for method in headbench.METHODS:
        rec = headbench.measure(
            method, 300, 0.1, embedding_size=8, batch_size=4, repeats=1, warmup=1, chunk_size=16
        )
        assert rec["step_ms"] > 0 and rec["model_bytes"] >= 300 * 8 * 4 and math.isfinite(rec["loss"])
    assert rec["k"] == 30


def test_benchmark_script_uses_the_harness_and_checks_targets():
    bench = _benchmark_script()
    assert bench.measure is headbench.measure and bench.METHODS == headbench.METHODS
    targets = bench.check_targets(
        [
            {
                "method": "sparse",
                "num_classes": 100_000,
                "k": 10,
                "step_ms": 10.0,
                "peak_bytes": 1,
                "embedding_size": 4,
            },
            {
                "method": "sparse",
                "num_classes": 1_000_000,
                "k": 10,
                "step_ms": 13.0,
                "peak_bytes": 1,
                "embedding_size": 4,
            },
        ]
    )
    assert targets[0]["time_ok"] is False and targets[0]["memory_ok"] is True


def test_benchmark_grid_adds_same_k_reference_points():
    bench = _benchmark_script()
    # r = 0.1 at 1M is k = 100k: at 100k classes that k needs r = 1.0; r = 0.01 (k = 10k) is 0.1 there, already in
    assert bench._same_k_rates([100_000, 1_000_000], [0.1, 0.01]) == {100_000: [1.0]}
    # a k larger than the smaller C cannot be matched
    assert bench._same_k_rates([1_000, 1_000_000], [0.1]) == {}


def test_benchmark_grid_caps_the_baseline_and_the_plain_softmax_by_classes():
    bench = _benchmark_script()
    args = bench.argparse.Namespace(
        classes=[100_000, 1_000_000], sample_rates=[0.1], methods=["linear", "baseline", "dense"],
        baseline_max_classes=None, linear_max_classes=100_000, embedding_size=8, batch_size=4,
        repeats=1, chunk_size=16, device="cpu", embedding_dtype="float32",
    )  # fmt: skip
    rows = {(c["method"], c["num_classes"]) for c in bench._grid(args)}
    assert rows == {("linear", 100_000), ("baseline", 100_000), ("baseline", 1_000_000), ("dense", 100_000),
                    ("dense", 1_000_000)}  # fmt: skip
    args.baseline_max_classes = 100_000
    assert ("baseline", 1_000_000) not in {(c["method"], c["num_classes"]) for c in bench._grid(args)}


def test_baseline_and_default_take_low_precision_embeddings():
    for method in ("baseline", "dense"):
        rec = headbench.measure(
            method, 300, 0.1, embedding_size=8, batch_size=4, repeats=1, warmup=1, embedding_dtype="bfloat16"
        )
        assert math.isfinite(rec["loss"]) and rec["floor_ms"] > 0 and rec["embedding_dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="embedding_dtype must be"):
        headbench.measure("dense", 300, 0.1, embedding_dtype="int8")


def _rec(method, c, step, peak, floor=100.0):
    return {
        "method": method,
        "num_classes": c,
        "sample_rate": 0.1,
        "k": c // 10,
        "step_ms": step,
        "peak_bytes": peak,
        "floor_ms": floor,
        "embedding_size": 512,
    }


def test_pairs_alternate_and_targets_use_medians():
    bench = _benchmark_script()
    calls = []
    a, b = {"method": "baseline", "num_classes": 10}, {"method": "dense", "num_classes": 10}
    speed = iter([1000.0, 150.0, 160.0, 1100.0, 900.0, 400.0])  # pair 3 is a slow outlier for the default

    def runner(cfg):
        calls.append(cfg["method"])
        return _rec(cfg["method"], 10, next(speed), 400 if cfg["method"] == "baseline" else 200)

    pairs = bench.run_pairs(a, b, 3, runner=runner, log=None)
    assert calls == ["baseline", "dense", "dense", "baseline", "baseline", "dense"]
    assert [round(1 / p["time_ratio"], 3) for p in pairs] == [6.667, 6.875, 2.25]
    t = headbench.check_default_targets(pairs, [], None, 24 * 2**30)["versus_baseline"]
    assert (
        t["speedup_median"] == pytest.approx(1000 / 150) and t["speedup_ok"]
    )  # the median ignores the outlier
    assert (
        t["peak_ratio_median"] == 0.5
        and t["peak_ok"]
        and t["dense_over_floor_median"] == 1.6
        and t["floor_ok"]
    )


def test_default_targets_fail_when_they_are_not_met_and_the_big_run_is_judged():
    GIB = 2**30
    versus = [
        {
            "first": _rec("baseline", 10**6, 1000, 8 * GIB),
            "second": _rec("dense", 10**6, 300, 5 * GIB, floor=100),
            "time_ratio": 0.3,
            "peak_ratio": 5 / 8,
        }
    ]
    flat = [
        {
            "first": _rec("dense", 10**5, 100, 1),
            "second": _rec("dense", 10**6, 130, 1),
            "time_ratio": 1.3,
            "peak_ratio": 1,
        }
    ]
    big = _rec("dense", 4 * 10**6, 3000, 17 * GIB)
    t = headbench.check_default_targets(versus, flat, big, 24 * GIB)
    assert not t["versus_baseline"]["speedup_ok"] and not t["versus_baseline"]["peak_ok"]
    assert not t["versus_baseline"]["floor_ok"] and not t["flat_in_classes"]["ok"]
    # the baseline's 8 GiB at 1M classes is 32 GiB at 4M: over the limit, while the default ran in 17
    assert t["big"]["baseline_need_bytes_extrapolated"] == 32 * GIB and t["big"]["ok"]
    text = "\n".join(headbench.describe_default_targets(t))
    assert text.count("NOT met") == 4 and "trains: step 3000 ms, peak 17.0 GiB" in text
    failed = headbench.check_default_targets(versus, [], {**big, "error": "exit 1: out of memory"}, 24 * GIB)
    assert not failed["big"]["ok"] and "failed: exit 1: out of memory" in "\n".join(
        headbench.describe_default_targets(failed)
    )


def test_gpu_preset_grid():
    bench = _benchmark_script()
    import argparse

    args = argparse.Namespace(
        gpu=True,
        quick=False,
        device="cpu",
        device_given=False,
        out=None,
        repeats=3,
        pairs=5,
        big=4_000_000,
        embedding_size=512,
        batch_size=128,
        chunk_size=4096,
        classes=[1],
        sample_rates=[0.5],
        methods=["linear"],
        embedding_dtype="float32",
        pair_classes=None,
        baseline_max_classes=None,
        linear_max_classes=None,
    )
    bench._apply_presets(args)
    grid = bench._grid(args)
    assert {c["device"] for c in grid} == {"cuda"} and {c["embedding_dtype"] for c in grid} == {"bfloat16"}
    baseline = sorted(c["num_classes"] for c in grid if c["method"] == "baseline")
    dense = sorted(c["num_classes"] for c in grid if c["method"] == "dense")
    assert baseline == [1_000_000, 8_000_000] and dense == [1_000_000, 8_000_000, 29_000_000]
    assert args.out == "results/gpu/benchmarks/head.json" and args.pair_classes == 8_000_000 and args.big == 0
    args.device, args.device_given, args.gpu = "cpu", True, True
    bench._apply_presets(args)
    assert args.device == "cpu"  # an explicit --device wins


def test_floor_is_the_fastest_measured_and_covers_the_sparse_head():
    bench = _benchmark_script()
    speed = iter([1000.0, 150.0, 160.0, 1100.0, 900.0, 400.0])
    pairs = bench.run_pairs(
        {"method": "baseline"},
        {"method": "dense"},
        3,
        runner=lambda cfg: _rec(cfg["method"], 10, next(speed), 1),
        log=None,
    )
    slow_sparse = [{**_rec("sparse", 10, 300, 1, floor=80)}]  # another process measured a faster product
    t = headbench.check_default_targets(pairs, [], None, 2**30, slow_sparse)["versus_baseline"]
    assert t["floor_ms"] == 80 and t["dense_over_floor_median"] == 2.0 and t["sparse_over_floor"] == 3.75
    assert not t["floor_ok"]  # the sparse head is over x2.5
    assert "×2.00 default, ×3.75 sparse" in headbench.describe_default_targets({"versus_baseline": t})[0]


def test_measure_interleaved_steps_each_head_and_matches_separate_builds():
    configs = [
        {"method": "dense", "num_classes": 200, "sample_rate": 0.1, "embedding_size": 8, "batch_size": 4},
        {"method": "dense", "num_classes": 2000, "sample_rate": 0.01, "embedding_size": 8, "batch_size": 4},
    ]
    recs = headbench.measure_interleaved(configs, repeats=3, warmup=1)
    assert [(r["num_classes"], r["k"], len(r["step_ms_all"])) for r in recs] == [(200, 20, 3), (2000, 20, 3)]
    assert all(r["interleaved"] and "peak_bytes" not in r for r in recs)
    # each head draws its batches from its own generator, so interleaving changes no head's arithmetic:
    # the last loss equals the one a separate measure() of the same head ends with
    alone = headbench.measure(**configs[1], repeats=3, warmup=1)
    assert recs[1]["loss"] == alone["loss"]
    with pytest.raises(ValueError, match="at least 2 configs"):
        headbench.measure_interleaved(configs[:1])
    with pytest.raises(ValueError, match=r"unknown keys \['repeats'\]"):
        headbench.measure_interleaved([{**configs[0], "repeats": 3}, configs[1]])
    with pytest.raises(ValueError, match=r"missing keys \['num_classes'\]"):
        headbench.measure_interleaved(
            [{k: v for k, v in configs[0].items() if k != "num_classes"}, configs[1]]
        )


def test_interleaved_pairs_alternate_the_order_inside_each_process():
    bench = _benchmark_script()
    seen = []
    small, large = (
        {"method": "dense", "num_classes": 10, "repeats": 4},
        {"method": "dense", "num_classes": 100},
    )

    def runner(cfg):
        seen.append([c["num_classes"] for c in cfg["interleave"]])
        assert cfg["repeats"] == 7 and all("repeats" not in c for c in cfg["interleave"])
        ms = {10: 50.0, 100: 55.0}
        return [{**_rec("dense", c["num_classes"], ms[c["num_classes"]], 1), "interleaved": True}
                for c in cfg["interleave"]]  # fmt: skip

    flat = bench.run_interleaved_pairs(small, large, 3, 7, runner=runner, log=None)
    assert seen == [[10, 100], [100, 10], [10, 100]]
    assert [e["time_ratio"] for e in flat] == [pytest.approx(1.1)] * 3 and flat[0]["peak_ratio"] is None
    t = headbench.check_default_targets([], flat, None, 2**30)["flat_in_classes"]
    assert t["interleaved"] and t["ok"] and t["small_classes"] == 10 and t["large_classes"] == 100
    assert (
        "per process, steps interleaved 1.100, 1.100, 1.100"
        in headbench.describe_default_targets({"flat_in_classes": t})[0]
    )
    # a process that failed gives no ratio, and the others still decide
    failed = bench.run_interleaved_pairs(
        small, large, 2, 7, runner=lambda cfg: [{**c, "error": "exit 1"} for c in cfg["interleave"]], log=None
    )
    assert [e["time_ratio"] for e in failed] == [None, None]


def test_benchmark_worker_runs_an_interleaved_process():
    bench = _benchmark_script()
    cfg = {"method": "dense", "sample_rate": 0.1, "embedding_size": 8, "batch_size": 4}
    recs = bench.run_isolated(
        {"interleave": [{**cfg, "num_classes": 100}, {**cfg, "num_classes": 1000, "sample_rate": 0.01}],
         "repeats": 2}
    )  # fmt: skip
    assert [(r["num_classes"], r["k"], r["interleaved"]) for r in recs] == [(100, 10, True), (1000, 10, True)]
    bad = bench.run_isolated({"interleave": [{**cfg, "num_classes": 100, "bogus": 1}] * 2, "repeats": 2})
    assert all("unknown keys ['bogus']" in r["error"] for r in bad)
