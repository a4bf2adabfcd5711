"""The reduced GPU profile (pfcrepro.gpu_profile): its parameters, its stages and, on the CPU, a run."""

import json

import pytest
import torch
import yaml

from pfcrepro import gpu_profile
from pfcrepro.paths import repo_root


def test_merge_is_recursive_for_mappings_and_replaces_the_rest():
    base = {"a": 1, "t": {"x": 1, "o": {"lr": 0.1, "wd": 5e-4}}, "l": [1, 2]}
    out = gpu_profile.merge(base, {"t": {"o": {"lr": 0.5}, "y": 2}, "l": [3], "n": None})
    assert out == {"a": 1, "t": {"x": 1, "o": {"lr": 0.5, "wd": 5e-4}, "y": 2}, "l": [3], "n": None}
    assert base["t"]["o"]["lr"] == 0.1, "the base must not be changed"


def test_notebook_stages_come_from_dvc_yaml():
    stages = gpu_profile.notebook_stages()
    dvc = yaml.safe_load((repo_root() / "dvc.yaml").read_text())["stages"]
    runners = [s for s in dvc.values() if isinstance(s, dict) and "pfcrepro.nbrun" in s.get("cmd", "")]
    assert len(stages) == len(runners) >= 5
    nb, out = stages["sample_rate"]
    assert nb == "notebooks/04_sample_rate.ipynb" and out == "results/04_sample_rate"
    for nb, _ in stages.values():
        assert (repo_root() / nb).is_file()


def test_repository_gpu_quick_updates_the_gpu_blocks():
    merged, quick = gpu_profile.quick_parameters()
    params = yaml.safe_load((repo_root() / "params.yaml").read_text())
    assert float(quick["budget_s"]) <= 600, "the reduced profile is meant to fit ten minutes"
    assert set(merged) <= set(gpu_profile.notebook_stages())
    for section, values in merged.items():
        gpu = params[section]["gpu"]
        override = quick["stages"][section]
        for key in gpu:  # a key the overlay does not name keeps the gpu value
            if key not in override:
                assert values[key] == gpu[key], (section, key)
        assert "profile" not in values
    q = merged["quality"]
    assert q["train"]["device"] == "cuda" and q["train"]["mixed_precision"] == "bf16"
    assert q["train"]["max_steps"] == quick["stages"]["quality"]["train"]["max_steps"]
    assert q["train"]["backbone"] == params["quality"]["gpu"]["train"]["backbone"]
    assert q["train"]["quality"]["enabled"] and q["train"]["checkpoint"]["at_end"], "06 scores the checkpoint"
    assert set(q["generate"]) == {q["dataset"]}, "the quick data set is generated where the stage reads it"
    assert merged["memory_scaling"]["device"] == "cuda"
    on_cpu, _ = gpu_profile.quick_parameters(device="cpu")
    assert on_cpu["quality"]["train"]["device"] == "cpu"
    assert on_cpu["quality"]["train"]["mixed_precision"] == "no"
    assert on_cpu["memory_scaling"]["device"] == "cpu"


def test_missing_section_and_device_are_named(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"profile": "cpu", "s": {"cpu": {}, "gpu": {}}}))
    with pytest.raises(KeyError, match="no gpu_quick.stages"):
        gpu_profile.quick_parameters(p)
    with pytest.raises(ValueError, match="device must be 'cuda' or 'cpu', got 'tpu'"):
        gpu_profile.run(tmp_path / "out", p, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            gpu_profile.run(tmp_path / "out", repo_root() / "params.yaml", device="cuda")
        assert not (tmp_path / "out").exists(), "nothing is written before the device is known"


def test_a_cpu_run_writes_the_stage_outputs_and_the_run_record(tmp_path):
    params = yaml.safe_load((repo_root() / "params.yaml").read_text())
    tiny = {
        "classes": [2000, 4000],
        "world_size": 8,
        "batch_size": 16,
        "embedding_size": 32,
        "sample_rate": 0.1,
        "dp_max_classes": 4000,
        "repeats": 1,
        "warmup": 1,
        "device": "cuda",
        "memory_budget_gb": 32.0,
        "extrapolate_classes": 29_000_000,
    }
    p = tmp_path / "params.yaml"
    p.write_text(
        yaml.safe_dump(
            {
                "profile": "cpu",
                "memory_scaling": {"common": {}, "cpu": tiny, "gpu": tiny},
                "gpu_quick": {"budget_s": 600, "stages": {"memory_scaling": {"classes": [2000, 3000]}}},
            }
        )
    )
    assert params["gpu_quick"]["stages"], "the repository's own gpu_quick must not be empty"
    summary = gpu_profile.run(tmp_path / "gpu", p, device="cpu", log=lambda _: None)
    out = tmp_path / "gpu"
    stage = out / "01_memory_scaling"
    assert (stage / "01_memory_scaling.ipynb").is_file() and (stage / "metrics.json").is_file()
    assert any((stage / "figures").glob("*.png"))
    metrics = json.loads((stage / "metrics.json").read_text())
    assert metrics["profile"] == gpu_profile.PROFILE_LABEL
    ran = yaml.safe_load((out / "params.yaml").read_text())
    assert ran["memory_scaling"]["gpu"]["classes"] == [2000, 3000]
    assert ran["memory_scaling"]["gpu"]["device"] == "cpu"
    record = json.loads((out / "run.json").read_text())
    assert record == json.loads(json.dumps(summary))
    assert record["device"].startswith("cpu") and set(record["seconds"]) == {"memory_scaling"}
    assert record["within_budget"] == (record["total_s"] <= 600)
