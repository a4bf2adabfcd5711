import json

import pytest

from pfcrepro import results_page as results_table
from pfcrepro.report import headline, save_metrics


def test_table_is_built_from_metrics_and_spliced_into_readme(tmp_path):
    res = tmp_path / "results"
    save_metrics(
        res / "02_b" / "metrics.json",
        {
            "profile": "cpu",
            "x": 1.0,
            "headline": [headline("robust", "96.1", "93.0 ± 1.0", "partly reproduced")],
        },
    )
    save_metrics(
        res / "01_a" / "metrics.json",
        {"profile": "cpu", "y": 2.0, "headline": [headline("memory", "5620 MB", "1.2 GB", "reproduced")]},
    )
    readme = tmp_path / "README.md"
    readme.write_text(
        f"intro\n{results_table.START}\nold\n{results_table.END}\n"
        f"{results_table.BENCH_START}\nold bench\n{results_table.BENCH_END}\noutro\n"
    )
    bench = tmp_path / "head.json"
    rec = {
        "method": "sparse",
        "num_classes": 1_000_000,
        "sample_rate": 0.01,
        "k": 10_000,
        "step_ms": 130.4,
        "peak_bytes": 4 * 2**30,
        "embedding_size": 512,
        "batch_size": 128,
        "device": "cpu",
        "threads": 2,
    }
    target = {
        "num_classes": 1_000_000,
        "k": 10_000,
        "peak_bytes": 4 * 2**30,
        "peak_budget_bytes": 4.5e9,
        "memory_ok": True,
        "reference_classes": 100_000,
        "time_ratio": 1.31,
        "time_ok": False,
    }
    bench.write_text(json.dumps({"records": [rec], "targets": [target], "torch": "2.13.0"}))
    results_table.main(
        [
            "--results",
            str(res),
            "--readme",
            str(readme),
            "--out",
            str(res / "RESULTS.md"),
            "--benchmark",
            str(bench),
        ]
    )
    text = readme.read_text()
    assert "old" not in text and text.startswith("intro\n") and text.endswith("outro\n")
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert rows[0].startswith("| `01_a` (cpu) | memory | 5620 MB | 1.2 GB | **reproduced**")
    assert "93.0 ± 1.0" in rows[1]
    assert (res / "RESULTS.md").read_text().count("| `") == 2
    assert "old bench" not in text
    assert "| sparse | 1,000,000 | 0.01 | 10,000 | 130 | 4,096 | 2.10 |" in text
    assert "×1.31 (target ≤ ×1.2) → NOT met" in text and "→ met;" in text


def test_incomplete_headline_and_missing_markers_fail(tmp_path):
    (tmp_path / "01_a").mkdir()
    (tmp_path / "01_a" / "metrics.json").write_text(json.dumps({"headline": [{"claim": "c"}]}))
    with pytest.raises(ValueError, match="lacks"):
        results_table.collect(tmp_path)
    with pytest.raises(ValueError, match="markers"):
        results_table.splice("no markers here", "table")
    with pytest.raises(ValueError, match="verdict must be one of"):
        headline("c", "p", "m", "sort of")


def test_verdicts_are_checked_and_extrapolated_is_explained(tmp_path):
    (tmp_path / "01_a").mkdir()
    item = {"claim": "c", "paper": "p", "measured": "m", "verdict": "probably"}
    (tmp_path / "01_a" / "metrics.json").write_text(json.dumps({"headline": [item]}))
    with pytest.raises(ValueError, match="'probably' of 'c' is not one of"):
        results_table.collect(tmp_path)
    item["verdict"] = "extrapolated"
    (tmp_path / "01_a" / "metrics.json").write_text(json.dumps({"headline": [item]}))
    table = results_table.render(results_table.collect(tmp_path))
    assert (
        "| **extrapolated** |" in table
        and "**extrapolated**: the claim is about a scale not run here" in table
    )


def test_checkpoint_memory_table_comes_from_the_benchmark_json(tmp_path):
    rank = {"shard_state_bytes": 2 * 2**30, "save_extra_anon": 3 * 2**20, "load_extra_anon": 0,
            "save_s": 1.25, "load_s": 0.5}  # fmt: skip
    data = {
        "meta": {"torch": "2.13.0", "cpus": 2},
        "records": [
            {"layout": "sharded", "num_classes": 4_000_000, "dim": 512, "world": 2,
             "ranks": [rank, {**rank, "save_extra_anon": 5 * 2**20, "save_s": 2.0}]},
        ],
    }  # fmt: skip
    table = results_table.render_checkpoint_memory(data)
    # the worst rank of the row: 5 MiB at save, the slower save
    assert "| sharded | 4,000,000 | 2 | 2.0 GiB | +5.0 MiB | +0.0 MiB | 2.0 s / 0.5 s |" in table
    assert "D = 512" in table and "torch 2.13.0" in table
    assert "Not measured yet" in results_table.render_checkpoint_memory(None)
    readme = "a\n<!-- checkpoint-memory:start -->\nold\n<!-- checkpoint-memory:end -->\nb"
    spliced = results_table.splice(readme, table, results_table.CKPT_START, results_table.CKPT_END)
    assert "old" not in spliced and table in spliced
