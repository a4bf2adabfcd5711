"""What a user of the trainer sees and relies on: plain log lines off a terminal, the closing
summary, paths from the command line, fine-tuning from another run (init_from), the divergence
guard and the warning for own data without its own verification pairs."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
import yaml

from pfclib.checkpoint import list_checkpoints, load_head
from pfclib.config import TrainConfig
from pfclib.train import _verification_warnings, training_function
from tests.test_train import tiny_config, tiny_data  # noqa: F401  (the module-scoped data fixture)


def test_off_a_terminal_the_log_is_plain_lines_and_ends_with_where_things_are(tiny_data, tmp_path):  # noqa: F811
    work = tmp_path / "work"
    work.mkdir()
    (work / "data").symlink_to(tiny_data, target_is_directory=True)
    cfg = tiny_config(tiny_data, tmp_path / "unused", **{"eval.every": 4, "checkpoint.every": 4})
    cfg_path = tmp_path / "configs" / "run.yaml"
    cfg_path.parent.mkdir()
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    proc = subprocess.run(
        [sys.executable, "-m", "pfclib.train", "--config", str(cfg_path), "--set", "max_steps=8",
         "--set", "log.every=2", "--set", "log.progress=auto",
         # relative to the current folder (work/), not to the config's folder nor the repository
         "--set", "data.path=data", "--set", "output_dir=runs/a", "--set", "eval.verification=[data/pairs]"],
        capture_output=True, text=True, env=env, timeout=180, cwd=work,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    run = work / "runs" / "a"
    assert (run / "metrics.json").is_file() and len(list_checkpoints(run)) == 2
    steps = [line for line in out.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in steps] == ["2/8", "4/8", "6/8", "8/8"]
    for key in ("loss ", "lr ", "img/s", "elapsed ", "ETA "):
        assert all(key in line for line in steps), (key, steps)
    evals = [line for line in out.splitlines() if line.startswith("eval step")]
    assert [line.split()[2] for line in evals] == ["4:", "8:"] and all(
        "acc " in e and "%" in e for e in evals
    )
    assert "done: step 8/8" in out
    assert f"checkpoint: {run / 'checkpoints' / 'ckpt_00000008.pt'}" in out
    assert f"metrics:    {run / 'metrics.json'}" in out
    assert f"next:       python -m pfclib.eval --checkpoint {run} --data {work / 'data' / 'pairs'}" in out
    assert "\r" not in out and "it/s" not in proc.stderr  # no progress bar off a terminal


def test_init_from_takes_another_runs_backbone_with_a_new_head(tiny_data, tmp_path):  # noqa: F811
    first = tiny_config(tiny_data, tmp_path / "a", **{"max_steps": 4, "eval.verification": []})
    training_function(first)
    (ckpt,) = list_checkpoints(tmp_path / "a")
    trained = torch.load(ckpt, weights_only=True)["backbone"]

    seen = {}

    def at_start(event, info):
        if event == "start":
            seen["backbone"] = {k: v.clone() for k, v in info["model"].state_dict().items()}
            seen["classes"] = info["head"].num_classes

    second = tiny_config(
        tiny_data,
        tmp_path / "b",
        **{"max_steps": 2, "init_from": str(tmp_path / "a"), "head.num_classes": 40, "eval.verification": []},
    )
    metrics = training_function(second, callback=at_start)
    assert seen["classes"] == 40 and metrics["steps"] == 2 and metrics["start_step"] == 0
    assert seen["backbone"].keys() == trained.keys()
    assert all(torch.equal(seen["backbone"][k], trained[k]) for k in trained)
    # a fresh run from the same seed starts elsewhere: the weights really came from the checkpoint
    fresh = {}
    training_function(
        tiny_config(tiny_data, tmp_path / "c", **{"max_steps": 1, "eval.verification": []}),
        callback=lambda e, i: fresh.update(i["model"].state_dict()) if e == "start" else None,
    )
    assert not all(torch.equal(fresh[k], trained[k]) for k in trained)

    with pytest.raises(ValueError, match=r"init_from .*embedding_size 32 there, 16 here"):
        training_function({**second, "embedding_size": 16, "output_dir": str(tmp_path / "d")})
    with pytest.raises(FileNotFoundError, match="without checkpoints|does not exist"):
        training_function(
            {**second, "init_from": str(tmp_path / "nowhere"), "output_dir": str(tmp_path / "e")}
        )


def test_a_diverged_run_stops_and_leaves_no_poisoned_checkpoint(tiny_data, tmp_path):  # noqa: F811
    cfg = tiny_config(
        tiny_data,
        tmp_path / "run",
        **{"optim.lr": 1.0e12, "optim.warmup_steps": 0, "optim.grad_clip": None, "checkpoint.every": 1,
           "checkpoint.keep": 5, "max_steps": 20, "eval.verification": []},
    )  # fmt: skip
    with pytest.raises(FloatingPointError, match=r"training diverged (at|before) step \d+") as info:
        training_function(cfg)
    assert "lr" in str(info.value)  # says what to change
    for path in list_checkpoints(tmp_path / "run"):
        state = torch.load(path, weights_only=True)
        tensors = [*state["backbone"].values(), load_head(path)["weight"]]
        assert all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point()), path


def test_own_data_without_its_own_pairs_is_warned_about(tiny_data, tmp_path):  # noqa: F811
    base = TrainConfig.from_dict(tiny_config(tiny_data, tmp_path / "run"))
    assert _verification_warnings(base, tiny_data) == []  # synthetic data with its own pairs
    folder = base.replace(**{"data.kind": "folder", "data.path": str(tmp_path / "faces")})
    (unrelated,) = _verification_warnings(folder, tmp_path / "faces")
    assert (
        "pairs of a synthetic data set, unrelated" in unrelated and "python -m pfclib.data.pairs" in unrelated
    )
    none = folder.replace(**{"eval.verification": []})
    (missing,) = _verification_warnings(none, tmp_path / "faces")
    assert "names no verification set" in missing and "--kind folder" in missing
    own = folder.replace(**{"eval.verification": [str(tmp_path / "faces_pairs.bin")]})
    assert _verification_warnings(own, tmp_path / "faces") == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and a synthetic run raises none
        training_function(tiny_config(tiny_data, tmp_path / "quiet", **{"max_steps": 1}))
