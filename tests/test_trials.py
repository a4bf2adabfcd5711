"""pfcrepro.trials: factorial designs, the trial runner and the synthetic data of a notebook."""

import numpy as np
import pytest

from pfcrepro import trials


def test_factorial_crosses_levels_and_seeds_in_order():
    design = trials.factorial(
        {
            "data": {"clean": {"data.path": "a"}, "flip40": {"data.path": "b"}},
            "method": {"full": {"head.sample_rate": 1.0}, "pfc": {"head.sample_rate": 0.1}},
        },
        seeds=[3, 7],
    )
    assert len(design) == 8
    assert [t.tags for t in design[:3]] == [
        {"data": "clean", "method": "full", "seed": 3},
        {"data": "clean", "method": "full", "seed": 7},
        {"data": "clean", "method": "pfc", "seed": 3},
    ]
    assert design[-1].overrides == {"data.path": "b", "head.sample_rate": 0.1, "seed": 7}
    assert len({t.slug for t in design}) == 8


def test_factorial_rejects_ambiguous_or_empty_designs():
    with pytest.raises(ValueError, match="head.sample_rate"):
        trials.factorial({"a": {"x": {"head.sample_rate": 1.0}}, "b": {"y": {"head.sample_rate": 0.1}}})
    with pytest.raises(ValueError, match="no levels"):
        trials.factorial({"a": {}})
    with pytest.raises(ValueError, match="reserved"):
        trials.factorial({"seed": {"x": {}}})
    with pytest.raises(ValueError, match="distinct"):
        trials.factorial({"a": {"x": {}}}, seeds=[1, 1])
    # the same value from two factors is not a conflict
    (trial,) = trials.factorial({"a": {"x": {"k": 1}}, "b": {"y": {"k": 1}}})
    assert trial.overrides == {"k": 1, "seed": 0}


def test_trial_slug_is_file_system_safe():
    trial = trials.Trial(tags={"method": "PFC r=0.1 / filter", "seed": 0}, overrides={})
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
    design = trials.factorial(
        {"method": {"full": {"head.sample_rate": 1.0}, "pfc": {"head.sample_rate": 0.1}}}, [0, 1]
    )
    df = trials.run_trials(
        base, design, tmp_path / "runs", train_fn=train_fn, extra=lambda t, m, c: {"lr": c.optim.lr}, log=None
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
    design = [trials.Trial({"a": "x"}, {}), trials.Trial({"a": "x"}, {"seed": 1})]
    with pytest.raises(ValueError, match="distinct tags"):
        trials.run_trials({"max_steps": 1}, design, tmp_path, train_fn=_fake_metrics, log=None)


def _fake_in_worker(config):
    """Module level, so a spawned worker can import it; reports where and how it ran."""
    import os

    import torch

    if config.seed == 99:
        raise ValueError("seed 99 is cursed")
    return {**_fake_metrics(config), "pid": os.getpid(), "threads": torch.get_num_threads()}


def _where(trial, metrics, config):
    return {"pid": metrics["pid"], "threads": metrics["threads"]}


def test_run_trials_in_workers_keeps_the_order_and_sets_threads(tmp_path):
    import os

    from pfcrepro.workers import threads_per_worker

    design = trials.factorial(
        {"method": {"full": {"head.sample_rate": 1.0}, "pfc": {"head.sample_rate": 0.1}}}, [0, 1, 2]
    )
    base = {"backbone": "iresnet_tiny", "image_size": 32, "embedding_size": 16, "max_steps": 3}
    lines = []
    df = trials.run_trials(
        base, design, tmp_path / "runs", train_fn=_fake_in_worker, extra=_where, log=lines.append, workers=2
    )
    # rows follow the design, not the order in which runs finished
    assert list(df["method"]) == ["full"] * 3 + ["pfc"] * 3 and list(df["seed"]) == [0, 1, 2] * 2
    np.testing.assert_allclose(df["pairs.acc"], [0.75, 0.76, 0.77, 0.525, 0.535, 0.545], rtol=0, atol=1e-12)
    assert list(df["output_dir"]) == [str(tmp_path / "runs" / t.slug) for t in design]
    # two fresh processes, each with its share of the cores
    assert os.getpid() not in set(df["pid"]) and 1 <= df["pid"].nunique() <= 2
    assert (df["threads"] == threads_per_worker(2)).all()
    assert len(lines) == 6 and lines[-1].startswith("[6/6]")


def test_run_trials_in_workers_names_the_failed_trial(tmp_path):
    design = trials.factorial({"m": {"a": {}}}, [0, 99])
    for workers in (1, 2):
        with pytest.raises(ValueError, match="seed 99 is cursed") as info:
            trials.run_trials(
                {"max_steps": 1}, design, tmp_path, train_fn=_fake_in_worker, log=None, workers=workers
            )
        assert any("m-a_seed-99" in note for note in info.value.__notes__)
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="workers must be a positive integer"):
            trials.run_trials(
                {"max_steps": 1}, design, tmp_path, train_fn=_fake_metrics, log=None, workers=bad
            )


def test_a_real_run_in_a_worker_equals_the_same_run_in_this_process(tmp_path):
    """One-thread workers give the numbers of the same runs trained here on one thread."""
    import torch

    from pfcrepro.workers import available_cores

    data = trials.ensure_dataset(
        tmp_path / "data", {**TINY_DATA, "heldout_images_per_identity": 3, "num_pairs": 20}
    )
    base = {
        "backbone": "mobilefacenet_tiny", "embedding_size": 8, "image_size": 16, "max_steps": 4,
        "device": "cpu", "data": {"kind": "synthetic", "path": str(data), "batch_size": 6},
        "head": {"margin": {"name": "cosface", "s": 16.0, "m": 0.2}},
        "eval": {"verification": [str(data / "pairs")]},
        "log": {"csv": False, "tensorboard": False, "progress": "off"}, "checkpoint": {"at_end": False},
    }  # fmt: skip
    design = trials.factorial(
        {"r": {"full": {"head.sample_rate": 1.0}, "half": {"head.sample_rate": 0.5}}}, [1]
    )
    workers = max(2, available_cores())  # one thread each
    here_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        here = trials.run_trials(base, design, tmp_path / "here", log=None)
    finally:
        torch.set_num_threads(here_threads)
    there = trials.run_trials(base, design, tmp_path / "there", log=None, workers=workers)
    cols = ["final_loss", "final_loss_avg", "pairs.acc", "pairs.auc"]
    np.testing.assert_array_equal(here[cols].to_numpy(), there[cols].to_numpy())
    assert here["final_loss"].iloc[0] != here["final_loss"].iloc[1]  # the two arms did differ


TINY_DATA = {"num_identities": 12, "images_per_identity": 3, "heldout_identities": 4, "num_pairs": 8,
             "heldout_images_per_identity": 2, "image_size": 16, "seed": 3}  # fmt: skip


def test_ensure_dataset_generates_reuses_and_refuses(tmp_path):
    from pfclib.data.synthetic import load_meta

    path = tmp_path / "tiny"
    with pytest.raises(FileNotFoundError, match="dvc repro data"):
        trials.ensure_dataset(path)
    assert trials.ensure_dataset(path, TINY_DATA) == path
    stamp = (path / "meta.json").stat().st_mtime_ns
    assert trials.ensure_dataset(path, TINY_DATA) == path and (path / "meta.json").stat().st_mtime_ns == stamp
    assert trials.ensure_dataset(path) == path  # exists: no config needed
    trials.ensure_dataset(path, {**TINY_DATA, "num_identities": 13})  # a different config regenerates
    assert load_meta(path)["num_identities"] == 13
