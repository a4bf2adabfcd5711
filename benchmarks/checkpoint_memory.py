"""Host memory of saving and loading the head's checkpoint state: sharded against one file.

Each case runs in fresh processes (W ranks joined by gloo) holding a ``PartialFC(C, D)`` head and
its default optimizer state (``make_optimizer("sgd")``: centers and momentum, ``2 x C x D`` floats
over all ranks), after one training step. Each rank measures, around one operation:

* ``save``: its part of a checkpoint written to disk, as the trainer writes it:
  ``sharded`` -- :func:`pfclib.head_state.shard_state_dict` of its own rows, ``torch.save``'d;
  ``single`` -- :meth:`pfclib.PartialFC.full_state_dict` (every rank gathers the whole head), then
  rank 0 ``torch.save``'s it;
* ``load``: a fresh head of the same size (centers allocated, no optimizer state yet) takes its rows
  back: ``sharded`` -- :func:`pfclib.head_state.load_sharded_state` (only the shards holding its
  rows, memory-mapped, copied in chunks); ``single`` -- ``torch.load`` of the file, then
  :meth:`~pfclib.PartialFC.load_full_state_dict`.

Memory is the process's anonymous resident memory (``RssAnon`` of ``/proc/self/status``: what the
process allocated, sampled every millisecond in a thread), as the peak during the operation minus
the value just before it. After a load the optimizer state exists, which a run needs anyway: the
``extra`` reported for a load is what remains above the rank's own state (centers + momentum) at the
peak. File-backed pages (the kernel's cache of the file being read or written) are reported apart:
they are reclaimable and not charged to the process.

    python benchmarks/checkpoint_memory.py                               # C = 4M (sharded), 1M (both); ~10 min
    python benchmarks/checkpoint_memory.py --classes 100000 --world 1 2  # quick

Writes ``results/benchmarks/checkpoint_memory.json``; checkpoint files go to a temporary folder
(``--tmp``) and are deleted after each case.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

GIB = 1024**3
MIB = 1024**2


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmRSS"):
                out[key] = int(value.split()[0]) * 1024
    return out


class _Peak:
    """Sample ``RssAnon`` / ``RssFile`` every millisecond in a thread, from ``start`` to ``stop``."""

    def __enter__(self):
        self.before = _status()
        self.peak = dict(self.before)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            now = _status()
            for key, value in now.items():
                self.peak[key] = max(self.peak[key], value)
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.after = _status()
        for key, value in self.after.items():
            self.peak[key] = max(self.peak[key], value)
        return False


def _head(num_classes: int, dim: int, step: bool):
    from pfclib.head import PartialFC

    head = PartialFC(num_classes, dim, sample_rate=0.1, seed=0)
    opt = head.make_optimizer("sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)
    if step:
        gen = torch.Generator().manual_seed(0)
        emb = torch.randn(64, dim, generator=gen)
        labels = torch.randint(0, num_classes, (64,), generator=gen)
        head(emb, labels).backward()
        opt.step()
        opt.zero_grad()
        head.sync()  # every row current: the momentum buffer holds C x D values
    return head, opt


def _state_bytes(head, opt) -> int:
    total = head.weight.numel() * head.weight.element_size()
    for value in opt.state.get(head.weight, {}).values():
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
    return total


def _case(rank: int, world: int, layout: str, num_classes: int, dim: int, folder: str) -> dict:
    import torch.distributed as dist

    from pfclib import head_state
    from pfclib.io import atomic_torch_save

    folder = Path(folder)
    out = {"rank": rank}
    # ---- save
    head, opt = _head(num_classes, dim, step=True)
    out["shard_state_bytes"] = _state_bytes(head, opt)
    out["shard_rows"] = head.n_local
    if world > 1:
        dist.barrier()
    t0 = time.perf_counter()
    with _Peak() as p:
        if layout == "sharded":
            path = folder / f"rank_{rank:05d}.pt"
            atomic_torch_save(head_state.shard_state_dict(head, opt), path)
            entry = {
                "file": path.name,
                "start": head.start,
                "end": head.start + head.n_local,
                "bytes": path.stat().st_size,
            }
            entries = [None] * world
            if world > 1:
                dist.all_gather_object(entries, entry)
            else:
                entries = [entry]
            manifest = head_state.sharded_manifest(head, entries, ".")
        else:
            full = head.full_state_dict(opt)
            if rank == 0:
                atomic_torch_save(full, folder / "head.pt")
            del full
            manifest = None
    out["save_s"] = time.perf_counter() - t0
    out["save_extra_anon"] = p.peak["RssAnon"] - p.before["RssAnon"]
    out["save_peak_file"] = p.peak["RssFile"] - p.before["RssFile"]
    del head, opt
    if world > 1:
        dist.barrier()
    # ---- load
    head, opt = _head(num_classes, dim, step=False)
    if world > 1:
        dist.barrier()
    t0 = time.perf_counter()
    with _Peak() as p:
        if layout == "sharded":
            head_state.load_sharded_state(head, manifest, folder, opt)
        else:
            full = torch.load(folder / "head.pt", map_location="cpu", weights_only=True)
            head.load_full_state_dict(full, opt)
            del full
    out["load_s"] = time.perf_counter() - t0
    own_optimizer = _state_bytes(head, opt) - head.weight.numel() * head.weight.element_size()
    out["load_extra_anon"] = p.peak["RssAnon"] - p.before["RssAnon"] - own_optimizer
    out["load_peak_file"] = p.peak["RssFile"] - p.before["RssFile"]
    out["load_optimizer_state_bytes"] = own_optimizer
    return out


def run(layout: str, num_classes: int, dim: int, world: int, tmp: Path) -> dict:
    from pfclib.multiproc import run_gloo

    folder = Path(tempfile.mkdtemp(prefix=f"ckptmem_{layout}_", dir=tmp))
    try:
        if world == 1:
            ranks = [_case(0, 1, layout, num_classes, dim, str(folder))]
        else:
            ranks = run_gloo(_case, world, layout, num_classes, dim, str(folder))
        disk = sum(f.stat().st_size for f in folder.iterdir())
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {
        "layout": layout,
        "num_classes": num_classes,
        "dim": dim,
        "world": world,
        "disk_bytes": disk,
        "ranks": ranks,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/checkpoint_memory.py", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--classes", type=int, nargs="+", default=[4_000_000, 1_000_000], help="head sizes C (classes)"
    )
    parser.add_argument("--dim", type=int, default=512, help="embedding size D")
    parser.add_argument(
        "--world", type=int, nargs="+", default=[1, 2], help="numbers of processes (gloo, CPU)"
    )
    parser.add_argument(
        "--single-max-classes",
        type=int,
        default=1_000_000,
        help="run the one-file layout only up to this C (it holds the whole head twice on every rank)",
    )
    parser.add_argument(
        "--tmp", default=None, help="folder for the checkpoint files (default: the system's temp)"
    )
    parser.add_argument(
        "--out", default="results/benchmarks/checkpoint_memory.json", help="JSON written here"
    )
    args = parser.parse_args(argv)
    tmp = Path(args.tmp or tempfile.gettempdir())
    records = []
    for c in args.classes:
        for world in args.world:
            for layout in ("sharded", "single"):
                if layout == "single" and c > args.single_max_classes:
                    continue
                rec = run(layout, c, args.dim, world, tmp)
                records.append(rec)
                for r in rec["ranks"]:
                    print(
                        f"C={c:>9,} W={world} {layout:7s} rank {r['rank']}: state {r['shard_state_bytes'] / GIB:6.2f} GiB | "
                        f"save +{r['save_extra_anon'] / MIB:8.1f} MiB in {r['save_s']:5.1f} s | "
                        f"load +{r['load_extra_anon'] / MIB:8.1f} MiB beyond its state in {r['load_s']:5.1f} s "
                        f"(file cache {r['load_peak_file'] / GIB:.2f} GiB)",
                        flush=True,
                    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "cpus": os.cpu_count(), "python": sys.version.split()[0]}
    from pfclib.io import write_json

    write_json(out, {"meta": meta, "records": records})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
