"""Checkpoints and exact resume: a run stopped mid-way and resumed ends bitwise equal to an
uninterrupted one (1 and 2 processes); a 2-process checkpoint resumes on 1 process (re-shard)."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import pytest
import torch
from test_train import NO_BN, tiny_config, tiny_data  # noqa: F401 - the fixture is used by name

from pfclib.checkpoint import (
    CHECKPOINT_FORMAT,
    checkpoint_path,
    find_latest,
    list_checkpoints,
    load_backbone,
    load_checkpoint,
    load_head,
    prune_checkpoints,
    resolve_resume,
    save_checkpoint,
)
from pfclib.multiproc import run_gloo
from pfclib.train import training_function


# ------------------------------------------------------------------------------- checkpoint files
def _minimal(step: int) -> dict:
    return {
        "format": CHECKPOINT_FORMAT,
        "config": {"backbone": "x"},
        "step": step,
        "backbone": {},
        "head": {},
    }


def test_checkpoint_files_listing_pruning_and_resume_resolution(tmp_path):
    assert list_checkpoints(tmp_path) == [] and find_latest(tmp_path) is None
    assert resolve_resume("auto", tmp_path) is None and resolve_resume(None, tmp_path) is None
    for step in (3, 12, 100, 7):
        save_checkpoint(_minimal(step), checkpoint_path(tmp_path, step))
    (tmp_path / "checkpoints" / "notes.txt").write_text("not a checkpoint")
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "ckpt_00000003.pt", "ckpt_00000007.pt", "ckpt_00000012.pt", "ckpt_00000100.pt",
    ]  # fmt: skip
    assert resolve_resume("auto", tmp_path) == checkpoint_path(tmp_path, 100)
    assert resolve_resume(tmp_path / "checkpoints", tmp_path) == checkpoint_path(tmp_path, 100)
    assert resolve_resume(str(checkpoint_path(tmp_path, 7)), "elsewhere") == checkpoint_path(tmp_path, 7)
    deleted = prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in deleted] == ["ckpt_00000003.pt", "ckpt_00000007.pt"]
    assert [load_checkpoint(p)["step"] for p in list_checkpoints(tmp_path)] == [12, 100]
    assert not list(tmp_path.glob("checkpoints/.*tmp"))  # atomic writes leave no temporaries
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_resume(tmp_path / "missing.pt", tmp_path)


def test_save_and_load_reject_malformed_checkpoints(tmp_path):
    with pytest.raises(ValueError, match=r"missing key\(s\) \['head'\]"):
        save_checkpoint({k: v for k, v in _minimal(1).items() if k != "head"}, tmp_path / "a.pt")
    with pytest.raises(ValueError, match="format must be 'pfclib-checkpoint/1', got 'other/2'"):
        save_checkpoint({**_minimal(1), "format": "other/2"}, tmp_path / "a.pt")
    torch.save({"format": "something-else"}, tmp_path / "b.pt")
    with pytest.raises(ValueError, match="not a pfclib checkpoint: expected format 'pfclib-checkpoint/1'"):
        load_checkpoint(tmp_path / "b.pt")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nothing.pt")


class _Payload:
    def __reduce__(self):
        return (print, ("code ran while loading",))


def test_load_never_unpickles_arbitrary_objects(tmp_path):
    buf = io.BytesIO()
    torch.save({**_minimal(1), "evil": _Payload()}, buf)
    (tmp_path / "evil.pt").write_bytes(buf.getvalue())
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(tmp_path / "evil.pt")


def test_load_backbone_rebuilds_the_trained_network(tiny_data, tmp_path):  # noqa: F811
    m = training_function(tiny_config(tiny_data, tmp_path, max_steps=2, **{"eval.verification": []}))
    model, config = load_backbone(m["checkpoint"])
    assert config["backbone"] == "iresnet_tiny" and not model.training
    saved = load_checkpoint(m["checkpoint"])["backbone"]
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    x = torch.zeros(2, 3, 32, 32)
    assert model(x).shape == (2, 32)


# ------------------------------------------------------------------------------------ exact resume
def assert_checkpoints_bitwise_equal(a: Path, b: Path) -> None:
    """Every tensor of the two checkpoints equal (torch.equal); plain values equal."""
    sa, sb = load_checkpoint(a), load_checkpoint(b)
    assert sa["step"] == sb["step"]

    def walk(x, y, where):
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y), where
        elif isinstance(x, dict):
            assert set(x) == set(y), (where, set(x) ^ set(y))
            for k in x:
                walk(x[k], y[k], f"{where}.{k}")
        elif isinstance(x, list | tuple):
            assert len(x) == len(y), where
            for i, (u, v) in enumerate(zip(x, y)):
                walk(u, v, f"{where}[{i}]")
        else:
            assert x == y, (where, x, y)

    for key in ("backbone", "backbone_optimizer", "scheduler", "data_state", "rng"):
        walk(sa[key], sb[key], key)
    walk(load_head(a), load_head(b), "head")  # whole or sharded: the assembled rows and state


def _interrupted_then_resumed(cfg_full: dict, cfg_cut: dict, stop_after: int) -> tuple[dict, dict, dict]:
    full = training_function(cfg_full)
    cut = training_function({**cfg_cut, "stop_after": stop_after})
    resumed = training_function({**cfg_cut, "resume": "auto"})
    return full, cut, resumed


RESUME_CASES = {
    "dense-sgd-accum2": {
        "head.update": "dense",
        "optim.optimizer": "sgd",
        "optim.gradient_accumulation_steps": 2,
    },
    "sparse-adamw": {
        "head.update": "sparse",
        "optim.optimizer": "adamw",
        "optim.lr": 0.003,
        "head.track_updates": True,
    },
    # AdaFace keeps moving averages of the embedding norms in the head: they travel in the checkpoint
    "adaface": {"head.margin": {"name": "adaface", "s": 32.0}},
    # dropout draws from torch's global generator: the resume must put it back exactly
    "dropout": {"backbone_kwargs": {"dropout": 0.5}},
    # Sub-center ArcFace: (C·K, D) centers and their optimizer rows travel in the checkpoint
    "subcenter3": {"head.sub_centers": 3, "head.track_updates": True},
    # Unicom: the count of dimension draws travels in the checkpoint, the next draw is the same
    "unicom-q05": {"head.dim_sample_rate": 0.5, "optim.gradient_accumulation_steps": 2},
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_stopped_and_resumed_run_is_bitwise_identical(tiny_data, tmp_path, case):  # noqa: F811
    extra = {"max_steps": 12, "checkpoint.every": 4, "eval.verification": [], "data.batch_size": 16}
    extra.update(RESUME_CASES[case])
    cfg_full = tiny_config(tiny_data, tmp_path / "full", **extra)
    cfg_cut = tiny_config(tiny_data, tmp_path / "cut", **extra)
    # killed after step 10: steps 9 and 10 are lost, the resume starts from the step-8 checkpoint
    full, cut, resumed = _interrupted_then_resumed(cfg_full, cfg_cut, stop_after=10)
    assert cut["stopped_early"] and cut["steps"] == 10
    assert resumed["start_step"] == 8 and resumed["steps"] == 12 and not resumed["stopped_early"]
    assert resumed["resumed_from"].endswith("ckpt_00000008.pt")
    assert resumed["loss_history"] == full["loss_history"][8:]  # exactly, not approximately
    assert cut["loss_history"][8:10] == full["loss_history"][8:10]
    assert_checkpoints_bitwise_equal(Path(full["checkpoint"]), Path(resumed["checkpoint"]))
    # the CSV of the resumed run has no duplicate rows from the lost steps
    steps = [int(line.split(",")[0]) for line in (tmp_path / "cut" / "log.csv").read_text().splitlines()[1:]]
    assert steps == sorted(set(steps)) and steps[-1] == 12


def _full_and_resumed_on_rank(rank, world_size, cfg_full, cfg_cut):
    full, cut, resumed = _interrupted_then_resumed(cfg_full, cfg_cut, stop_after=7)
    return {"full": full["checkpoint"], "resumed": resumed["checkpoint"], "start": resumed["start_step"],
            "losses": (full["loss_history"], resumed["loss_history"])}  # fmt: skip


@pytest.mark.distributed
@pytest.mark.slow
def test_two_process_stopped_and_resumed_run_is_bitwise_identical(tiny_data, tmp_path):  # noqa: F811
    extra = {"max_steps": 8, "checkpoint.every": 3, "eval.verification": [], "data.batch_size": 16}
    cfg_full = tiny_config(tiny_data, tmp_path / "full", **extra)
    cfg_cut = tiny_config(tiny_data, tmp_path / "cut", **extra)
    r0, r1 = run_gloo(_full_and_resumed_on_rank, 2, cfg_full, cfg_cut)
    assert r0["start"] == r1["start"] == 6
    full_losses, resumed_losses = r0["losses"]
    assert resumed_losses == full_losses[6:]
    assert_checkpoints_bitwise_equal(Path(r0["full"]), Path(r0["resumed"]))
    ckpt = load_checkpoint(r0["resumed"])
    assert ckpt["world_size"] == 2 and len(ckpt["head"]["generator_states"]) == 2
    assert not torch.equal(*ckpt["head"]["generator_states"])  # per-rank sampler generators, saved once


def _train_two(rank, world_size, cfg):
    return training_function(cfg)["loss_history"]


@pytest.mark.distributed
def test_two_process_checkpoint_resumes_on_one_process(tiny_data, tmp_path):  # noqa: F811
    """The 2-process centers are re-sharded onto 1 process; with a BatchNorm-free backbone, r = 1
    and no flips, the continuation matches the 2-process one to float tolerance."""
    extra = {"backbone": NO_BN, "max_steps": 6, "checkpoint.every": 4, "checkpoint.keep": 5,
             "eval.verification": [], "data.batch_size": 16, "data.hflip": False, "head.sample_rate": 1.0,
             "optim.grad_clip": None}  # fmt: skip  # clipping would rescale a wrong gradient scale away
    two = tiny_config(tiny_data, tmp_path / "two", **extra)
    losses_two = run_gloo(_train_two, 2, two)[0]
    step4 = tmp_path / "two" / "checkpoints" / "ckpt_00000004.pt"
    saved = load_checkpoint(step4)
    assert saved["world_size"] == 2
    saved_head = load_head(step4)

    loaded = {}

    def on_start(event, info):
        if event == "start":
            loaded["weight"] = info["head"].weight.detach().clone()
            loaded["momentum"] = info["optimizers"][1].state[info["head"].weight]["momentum_buffer"].clone()
            loaded["n_local"] = info["head"].n_local

    one = {
        **tiny_config(tiny_data, tmp_path / "one", **{**extra, "data.batch_size": 32}),
        "resume": str(step4),
    }
    resumed = training_function(one, callback=on_start)
    assert loaded["n_local"] == saved_head["num_classes"]
    assert torch.equal(loaded["weight"], saved_head["weight"])  # the full (C, D) matrix, bitwise
    assert torch.equal(loaded["momentum"], saved_head["optimizer"]["state"]["momentum_buffer"])
    assert resumed["start_step"] == 4 and resumed["world_size"] == 1 and resumed["global_batch"] == 32
    assert resumed["loss_history"] == pytest.approx(losses_two[4:], rel=1e-4)
    final_two = load_checkpoint(tmp_path / "two" / "checkpoints" / "ckpt_00000006.pt")
    final_one = load_checkpoint(resumed["checkpoint"])
    torch.testing.assert_close(
        load_head(resumed["checkpoint"])["weight"],
        load_head(tmp_path / "two" / "checkpoints" / "ckpt_00000006.pt")["weight"],
        rtol=1e-4,
        atol=1e-6,
    )
    for k, v in final_two["backbone"].items():
        torch.testing.assert_close(final_one["backbone"][k], v, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------- resume policy
def _lrs(run: Path) -> dict[int, float]:
    rows = (run / "log.csv").read_text().splitlines()
    header = rows[0].split(",")
    return {int(r.split(",")[0]): float(r.split(",")[header.index("lr")]) for r in rows[1:]}


def test_resume_with_more_steps_continues_the_schedule(tiny_data, tmp_path, capsys):  # noqa: F811
    from pfclib.schedule import WarmupPolyDecay

    extra = {
        "max_steps": 6,
        "eval.verification": [],
        "data.batch_size": 16,
        "log.every": 1,
        "optim.warmup_steps": 2,
    }
    cfg = tiny_config(tiny_data, tmp_path / "run", **extra)
    training_function(cfg)
    longer = training_function({**cfg, "max_steps": 12, "resume": "auto"})
    out = capsys.readouterr().out
    assert longer["start_step"] == 6 and longer["steps"] == 12
    assert "resume: max_steps: 6 -> 12 (applied)" in out and "WarmupPolyDecay(total_steps=12" in out
    lrs, schedule = _lrs(tmp_path / "run"), WarmupPolyDecay(12, 2, 2.0, 0.0)
    for step in range(7, 13):  # the row of step s shows the rate its update used: lr * schedule(s - 1)
        assert lrs[step] == pytest.approx(0.1 * schedule(step - 1), rel=1e-5) and lrs[step] > 0
    # the checkpoint now records the new length
    assert load_checkpoint(Path(longer["checkpoint"]))["config"]["max_steps"] == 12


def test_resume_with_a_new_peak_lr_applies_it(tiny_data, tmp_path, capsys):  # noqa: F811
    from pfclib.schedule import WarmupPolyDecay

    extra = {
        "max_steps": 8,
        "checkpoint.every": 4,
        "eval.verification": [],
        "data.batch_size": 16,
        "log.every": 1,
    }
    cfg = tiny_config(tiny_data, tmp_path / "run", **extra)
    training_function({**cfg, "stop_after": 4})
    training_function({**cfg, "resume": "auto", "optim": {**cfg["optim"], "lr": 0.05}})
    assert "resume: optim.lr: 0.1 -> 0.05 (applied)" in capsys.readouterr().out
    lrs, schedule = _lrs(tmp_path / "run"), WarmupPolyDecay(8, 3, 2.0, 0.0)
    assert [lrs[s] for s in range(5, 9)] == pytest.approx(
        [0.05 * schedule(s - 1) for s in range(5, 9)], rel=1e-5
    )


@pytest.mark.parametrize(
    "override, named",
    [
        ({"head.sample_rate": 0.25}, "head.sample_rate: 0.5 -> 0.25"),
        ({"optim.momentum": 0.5}, "optim.momentum: 0.9 -> 0.5"),
        (
            {"data.batch_size": 8},
            "data.batch_size: 16 -> 8 per process on 1 -> 1 process(es): global batch 16 -> 8",
        ),
        ({"head.margin": "cosface"}, "head.margin.name: 'arcface' -> (unset)"),
    ],
)
def test_resume_refuses_changes_to_what_the_checkpoint_means(tiny_data, tmp_path, override, named):  # noqa: F811
    from pfclib.config import TrainConfig

    extra = {"max_steps": 4, "eval.verification": [], "data.batch_size": 16}
    cfg = tiny_config(tiny_data, tmp_path / "run", **extra)
    done = training_function(cfg)
    changed = TrainConfig.from_dict(cfg).replace(**override, resume="auto").to_dict()
    with pytest.raises(ValueError, match="cannot resume .*" + named.replace("(", r"\(").replace(")", r"\)")):
        training_function(changed)
    assert list_checkpoints(tmp_path / "run") == [Path(done["checkpoint"])]


@pytest.mark.parametrize("genuine", [True, False])
def test_a_one_sided_verification_set_stops_training_before_it_starts(tiny_data, tmp_path, genuine):  # noqa: F811
    from pfclib.data.verification import write_bin

    images = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8)
    bad = write_bin(tmp_path / "one_sided.bin", images, [genuine] * 10, image_format="PNG")
    cfg = tiny_config(tiny_data, tmp_path / "run", **{"max_steps": 4, "eval.verification": [str(bad)]})
    kind = "genuine" if genuine else "impostor"
    with pytest.raises(ValueError, match=f"'one_sided': all 10 pairs are {kind}; verification needs both"):
        training_function(cfg)
    assert list_checkpoints(tmp_path / "run") == []
