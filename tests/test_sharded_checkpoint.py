"""Sharded head checkpoints: each rank writes its own rows and optimizer state, any number of ranks
reads them back (opening only the shards that hold its rows), the trainer's files form one set."""

from __future__ import annotations

import torch

from pfclib import head_state
from pfclib.checkpoint import (
    CorruptCheckpointError,
    find_latest_valid,
    head_folders,
    list_checkpoints,
    load_checkpoint,
    load_head,
    remove_stale_temp_files,
)
from pfclib.head import PartialFC
from pfclib.multiproc import run_gloo
from pfclib.train import training_function
from tests.test_train import tiny_config, tiny_data  # noqa: F401

C, D = 10, 6


def _trained_head(optimizer: str, steps: int = 3, **kw) -> tuple[PartialFC, torch.optim.Optimizer]:
    head = PartialFC(C, D, sample_rate=0.5, seed=3, track_updates=True, **kw)
    opt = head.make_optimizer(optimizer, lr=0.1, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(7)
    for _ in range(steps):
        emb = torch.randn(8, D, generator=gen)
        labels = torch.randint(0, C, (8,), generator=gen)
        head(emb, labels).backward()
        opt.step()
        opt.zero_grad()
    return head, opt


def _write(head, opt, folder) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"rank_{head.rank:05d}.pt"
    torch.save(head_state.shard_state_dict(head, opt), path)
    return {
        "file": path.name,
        "start": head.start,
        "end": head.start + head.n_local,
        "bytes": path.stat().st_size,
    }


def _assert_same_full(a: dict, b: dict) -> None:
    assert torch.equal(a["weight"], b["weight"])
    assert (a["counters"] is None) == (b["counters"] is None)
    for k in ("active", "passive") if a["counters"] is not None else ():
        assert torch.equal(a["counters"][k], b["counters"][k])
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])), k


def test_one_rank_round_trip_equals_the_full_state(tmp_path):
    for optimizer, other in (("sgd", "sgd"), ("adamw", "adamw")):
        head, opt = _trained_head(optimizer)
        full = head.full_state_dict(opt)
        entry = _write(head, opt, tmp_path / optimizer)
        manifest = head_state.sharded_manifest(head, [entry], optimizer)
        _assert_same_full(head_state.read_sharded_state(manifest, tmp_path / optimizer), full)
        fresh = PartialFC(C, D, sample_rate=0.5, seed=99, track_updates=True)
        fresh_opt = fresh.make_optimizer(other, lr=0.5)
        head_state.load_sharded_state(fresh, manifest, tmp_path / optimizer, fresh_opt)
        _assert_same_full(fresh.full_state_dict(fresh_opt), full)
        assert torch.equal(fresh.generator.get_state(), head.generator.get_state())
        assert fresh_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]  # hyper-parameters come along


def test_state_moves_within_an_optimizer_family(tmp_path):
    head, opt = _trained_head("adamw", update="dense")
    manifest = head_state.sharded_manifest(head, [_write(head, opt, tmp_path)], ".")
    sparse = PartialFC(C, D, sample_rate=0.5, update="sparse", track_updates=True)
    sparse_opt = sparse.make_optimizer("adamw", lr=0.1)
    head_state.load_sharded_state(sparse, manifest, tmp_path, sparse_opt)
    step = sparse_opt.state[sparse.weight]["step"]
    assert step.shape == (C,) and bool((step == 3).all())  # one scalar step -> one per row
    torch.testing.assert_close(sparse_opt.state[sparse.weight]["exp_avg"], opt.state[head.weight]["exp_avg"])


def test_wrong_shapes_and_missing_optimizer_state_are_refused(tmp_path):
    head, opt = _trained_head("sgd")
    manifest = head_state.sharded_manifest(head, [_write(head, None, tmp_path)], ".")
    other = PartialFC(C + 1, D)
    try:
        head_state.load_sharded_state(other, manifest, tmp_path)
    except ValueError as exc:
        assert "C=10, D=6; this head has C=11, D=6" in str(exc)
    else:
        raise AssertionError("a head of another size loaded the state")
    same = PartialFC(C, D)
    try:
        head_state.load_sharded_state(same, manifest, tmp_path, same.make_optimizer("sgd", lr=0.1))
    except ValueError as exc:
        assert "holds no optimizer state" in str(exc)
    else:
        raise AssertionError("a shard without optimizer state loaded into an optimizer")


def _write_on_ranks(rank, world_size, folder):
    torch.manual_seed(0)
    head, opt = _trained_head("sgd")  # same inputs on every rank: the global batch is the union
    entry = _write(head, opt, folder)
    entries = [None] * world_size
    torch.distributed.all_gather_object(entries, entry)
    return head_state.sharded_manifest(head, entries, "."), head.full_state_dict(opt)


def _read_on_ranks(rank, world_size, folder, manifest):
    opened = []
    real = head_state._open_shard

    def spy(base, entry):
        opened.append(entry["file"])
        return real(base, entry)

    head_state._open_shard = spy
    try:
        head = PartialFC(C, D, sample_rate=0.5, seed=5, track_updates=True)
        opt = head.make_optimizer("sgd", lr=0.1, momentum=0.9)
        head_state.load_sharded_state(head, manifest, folder, opt)
        return opened, head.full_state_dict(opt)
    finally:
        head_state._open_shard = real


def test_two_ranks_write_and_three_ranks_read_only_the_shards_holding_their_rows(tmp_path):
    (manifest, full), _ = run_gloo(_write_on_ranks, 2, tmp_path)
    assert [e["file"] for e in manifest["shards"]] == ["rank_00000.pt", "rank_00001.pt"]
    assert [(e["start"], e["end"]) for e in manifest["shards"]] == [(0, 5), (5, 10)]
    _assert_same_full(head_state.read_sharded_state(manifest, tmp_path), full)
    results = run_gloo(_read_on_ranks, 3, tmp_path, manifest)
    # three ranks hold rows [0, 4), [4, 7), [7, 10): rank 0 and rank 2 need one shard each
    assert [sorted(opened) for opened, _ in results] == [
        ["rank_00000.pt"],
        ["rank_00000.pt", "rank_00001.pt"],
        ["rank_00001.pt"],
    ]
    _assert_same_full(results[0][1], full)  # re-sharded onto three ranks, gathered back: bitwise


def test_the_trainer_writes_a_set_and_keeps_it_whole(tiny_data, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    cfg = tiny_config(tiny_data, out, **{"max_steps": 6, "checkpoint.every": 2, "checkpoint.keep": 2})
    training_function(cfg)
    files = list_checkpoints(out)
    assert [p.name for p in files] == ["ckpt_00000004.pt", "ckpt_00000006.pt"]
    for p in files:
        (folder,) = head_folders(p)  # pruning took the step-2 shards with their file
        assert [f.name for f in folder.iterdir()] == ["rank_00000.pt"]
        assert load_checkpoint(p)["head"]["folder"] == folder.name
    assert not list((out / "checkpoints").glob("ckpt_00000002*"))
    # a save killed before its checkpoint file: shards alone are no checkpoint, and are cleaned up
    orphan = out / "checkpoints" / "ckpt_00000008.head-0123abcd"
    orphan.mkdir()
    (orphan / "rank_00000.pt").write_bytes(b"partial")
    assert find_latest_valid(out) == files[-1]
    assert remove_stale_temp_files(out) == [orphan] and not orphan.exists()
    # a shard that is gone or cut short makes its checkpoint damaged: auto resume falls back
    (shard,) = head_folders(files[-1])[0].iterdir()
    shard.write_bytes(shard.read_bytes()[:100])
    try:
        load_checkpoint(files[-1])
    except CorruptCheckpointError as exc:
        assert "rank_00000.pt" in str(exc) and "damaged" in str(exc)
    else:
        raise AssertionError("a cut shard was not noticed")
    lines = []
    assert find_latest_valid(out, log=lines.append) == files[0] and "ckpt_00000006.pt" in lines[0]


def test_sharded_and_single_file_checkpoints_resume_alike(tiny_data, tmp_path):  # noqa: F811
    base = {"max_steps": 6, "checkpoint.every": 3, "eval.verification": []}
    results = {}
    for layout in ("sharded", "single"):
        cfg = tiny_config(tiny_data, tmp_path / layout, **{**base, "checkpoint.layout": layout})
        training_function({**cfg, "stop_after": 3})
        results[layout] = training_function({**cfg, "resume": "auto"})
    assert results["sharded"]["loss_history"] == results["single"]["loss_history"]
    a, b = load_head(tmp_path / "sharded"), load_head(tmp_path / "single")
    _assert_same_full(a, b)
    assert "folder" in load_checkpoint(list_checkpoints(tmp_path / "sharded")[-1])["head"]
    assert "weight" in load_checkpoint(list_checkpoints(tmp_path / "single")[-1])["head"]
