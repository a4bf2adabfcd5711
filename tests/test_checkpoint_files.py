"""Checkpoint files that survive crashes: damaged checkpoints are named (and skipped by
``resume="auto"``), atomic writes are fsync-ed and follow the umask, leftovers of killed writes are
cleaned up, and one output folder takes one job at a time (RunLock)."""

from __future__ import annotations

import io
import os
import pickle
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pfclib.checkpoint import (
    CHECKPOINT_FORMAT,
    CorruptCheckpointError,
    checkpoint_path,
    find_latest_valid,
    list_checkpoints,
    load_checkpoint,
    remove_stale_temp_files,
    resolve_resume,
    save_checkpoint,
)
from pfclib.io import RunLock, atomic_path, atomic_torch_save, remove_temp_files, write_json

REPO = Path(__file__).resolve().parents[1]


def _state(step: int) -> dict:
    return {
        "format": CHECKPOINT_FORMAT,
        "config": {"backbone": "x"},
        "step": step,
        "backbone": {"weight": torch.arange(64 * 64, dtype=torch.float32).reshape(64, 64)},
        "head": {"weight": torch.ones(10, 8)},
    }


def _save(run: Path, *steps: int) -> list[Path]:
    return [save_checkpoint(_state(s), checkpoint_path(run, s)) for s in steps]


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])  # keep < 0: all but the last -keep bytes


def _python(code: str, *args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, text=True, **kwargs)


# ------------------------------------------------------------------------------ damaged checkpoints
@pytest.mark.parametrize("keep", [0, 100, 2000, -5], ids=["empty", "head-only", "half", "tail-cut"])
def test_load_names_a_truncated_checkpoint(tmp_path, keep):
    (path,) = _save(tmp_path, 8)
    _truncate(path, keep)
    with pytest.raises(CorruptCheckpointError, match=re.escape(repr(str(path))) + ".*truncated") as info:
        load_checkpoint(path)
    assert isinstance(info.value, ValueError) and info.value.path == path
    assert "\n" not in info.value.reason


@pytest.mark.parametrize("content", [os.urandom(3000), b"PK\x03\x04" + os.urandom(3000), b"hello " * 100])
def test_load_names_a_garbage_file(tmp_path, content):
    path = tmp_path / "ckpt_00000008.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(repr(str(path))) + ".*corrupt"):
        load_checkpoint(path)


class _Payload:
    def __reduce__(self):
        return (print, ("code ran while loading",))


def test_a_file_with_code_in_it_is_refused_as_both_kinds_of_error(tmp_path):
    buf = io.BytesIO()
    torch.save({**_state(1), "evil": _Payload()}, buf)
    path = tmp_path / "evil.pt"
    path.write_bytes(buf.getvalue())
    with pytest.raises(pickle.UnpicklingError, match="weights_only=True.*Unsupported global") as info:
        load_checkpoint(path)
    assert isinstance(info.value, CorruptCheckpointError) and str(path) in str(info.value)


def test_auto_resume_skips_a_truncated_newest_checkpoint(tmp_path, capsys):
    p4, p8 = _save(tmp_path, 4, 8)
    _truncate(p8, os.path.getsize(p8) // 2)
    lines: list[str] = []
    assert resolve_resume("auto", tmp_path, log=lines.append) == p4
    assert len(lines) == 1 and str(p8) in lines[0] and "truncated" in lines[0]
    # by default the line goes to stderr
    assert resolve_resume("auto", tmp_path) == p4
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "skipping" in err[0] and "ckpt_00000008.pt" in err[0]
    # a folder means "its newest loadable checkpoint" too
    assert resolve_resume(tmp_path / "checkpoints", "elsewhere", log=lines.append) == p4
    assert find_latest_valid(tmp_path, log=lines.append) == p4
    assert load_checkpoint(resolve_resume("auto", tmp_path, log=lines.append))["step"] == 4


def test_auto_resume_with_only_damaged_checkpoints_lists_them(tmp_path):
    p4, p8, p12 = _save(tmp_path, 4, 8, 12)
    _truncate(p4, 0)
    p8.write_bytes(os.urandom(500))
    _truncate(p12, -10)
    lines: list[str] = []
    with pytest.raises(CorruptCheckpointError, match="no checkpoint in .* can be loaded") as info:
        resolve_resume("auto", tmp_path, log=lines.append)
    message = str(info.value)
    assert all(p.name in message for p in (p4, p8, p12)) and str(tmp_path / "checkpoints") in message
    assert [line.split("'")[1] for line in lines] == [str(p12), str(p8), str(p4)]  # newest first
    assert resolve_resume("auto", tmp_path / "fresh") is None  # no checkpoint at all: start fresh


def test_an_explicit_damaged_checkpoint_is_an_error_not_a_fallback(tmp_path):
    p4, p8 = _save(tmp_path, 4, 8)
    _truncate(p8, 1000)
    with pytest.raises(CorruptCheckpointError, match=re.escape(repr(str(p8))) + " is truncated"):
        resolve_resume(str(p8), tmp_path)
    assert resolve_resume(str(p4), tmp_path) == p4


# ------------------------------------------------------------------------------ durable atomic writes
def _write_plain(path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(b"payload")


WRITERS = {
    "atomic_path": _write_plain,
    "write_json": lambda p: write_json(p, {"a": 1}),
    "atomic_torch_save": lambda p: atomic_torch_save({"a": torch.ones(3)}, p),
    "save_checkpoint": lambda p: save_checkpoint(_state(1), p),
}


@pytest.mark.parametrize("writer", list(WRITERS))
def test_atomic_writes_fsync_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch, writer):
    events: list[tuple[str, object]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.fstat(fd).st_ino))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = tmp_path / "sub" / "out.bin"
    WRITERS[writer](path)
    file_synced = events.index(("fsync", path.stat().st_ino))
    renamed = events.index(("replace", path.name))
    folder_synced = events.index(("fsync", path.parent.stat().st_ino))
    assert file_synced < renamed < folder_synced


def test_atomic_path_without_fsync_and_on_failure(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(os, "fsync", calls.append)
    with atomic_path(tmp_path / "a.txt", fsync=False) as tmp:
        tmp.write_text("a")
    assert calls == [] and (tmp_path / "a.txt").read_text() == "a"
    with pytest.raises(KeyError), atomic_path(tmp_path / "b.txt") as tmp:
        tmp.write_text("half")
        raise KeyError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)], ids=oct)
def test_atomic_files_get_their_mode_from_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        for name, writer in WRITERS.items():
            writer(tmp_path / name)
    finally:
        os.umask(old)
    assert {name: oct(stat.S_IMODE((tmp_path / name).stat().st_mode)) for name in WRITERS} == {
        name: oct(mode) for name in WRITERS
    }


# ------------------------------------------------------------------------------ leftovers of killed writes
KILLED_WRITE = """
import os, sys
from pfclib.io import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_bytes(b"half a checkpoint")
    os.kill(os.getpid(), 9)
"""


def test_stale_temp_files_of_killed_writes_are_removed_and_nothing_else(tmp_path):
    run = tmp_path / "run"
    p4, p8 = _save(run, 4, 8)
    folder = p4.parent
    killed = _python(KILLED_WRITE, str(checkpoint_path(run, 12)))
    assert killed.wait(timeout=60) == -signal.SIGKILL
    (leftover,) = [p for p in folder.iterdir() if p.name.startswith(".ckpt_00000012.pt.")]
    assert leftover.name.endswith(".tmp") and not checkpoint_path(run, 12).exists()
    by_older_version = folder / ".ckpt_00000016.pt.k2_9ab0x.tmp"  # tempfile.mkstemp's alphabet
    by_older_version.write_bytes(b"")
    keep = {
        folder / "notes.tmp": b"x",
        folder / ".ckpt_00000012.pt.tmp": b"x",  # no random tag: not atomic_path's
        folder / ".metrics.json.abcdefgh.tmp": b"x",  # a temporary, but not of a checkpoint
        folder / "ckpt_00000020.pt.abcdefgh.tmp": b"x",  # not hidden
        folder / "README": b"x",
    }
    for p, data in keep.items():
        p.write_bytes(data)
    (folder / ".ckpt_00000024.pt.abcdefgh.tmp").mkdir()  # a folder is never deleted
    removed = remove_stale_temp_files(run)
    assert removed == sorted([leftover, by_older_version])
    assert all(p.exists() for p in keep) and (folder / ".ckpt_00000024.pt.abcdefgh.tmp").is_dir()
    assert list_checkpoints(run) == [p4, p8] and load_checkpoint(p8)["step"] == 8
    assert remove_stale_temp_files(run) == [] and remove_stale_temp_files(tmp_path / "none") == []
    # the generic helper takes every temporary of a folder
    assert remove_temp_files(folder) == [folder / ".metrics.json.abcdefgh.tmp"]


# ------------------------------------------------------------------------------ one job per folder
def test_run_lock_refuses_a_second_holder_and_is_reusable(tmp_path):
    out = tmp_path / "run"
    with RunLock(out) as lock:
        assert lock.held and (out / ".lock").read_text().split()[0] == str(os.getpid())
        with pytest.raises(RuntimeError, match=re.escape(repr(str(out))) + rf".*pid {os.getpid()}\b"):
            RunLock(out).acquire()  # another open file description: flock conflicts in-process too
        with pytest.raises(RuntimeError, match="already holds"):
            lock.acquire()
    assert not lock.held and (out / ".lock").read_text() == ""
    with lock:  # the same object again, then a new one
        pass
    second = RunLock(out).acquire()
    second.release()
    second.release()  # a no-op


HOLDER = """
import sys, time
from pfclib.io import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(120)
"""


def test_run_lock_held_by_another_process_until_it_is_killed(tmp_path):
    out = tmp_path / "run"
    holder = _python(HOLDER, str(out), stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RuntimeError, match=rf"output folder .*run' is in use .*pid {holder.pid}\b"):
            RunLock(out).acquire()
    finally:
        holder.kill()
        holder.wait(timeout=60)
        holder.stdout.close()
    with RunLock(out) as lock:  # the kernel dropped the dead holder's lock
        assert lock.held
