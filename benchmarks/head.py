"""Benchmark of one training step of the classification head: time and peak memory (command line).

One step = forward + backward + optimizer step (SGD, momentum 0.9, weight decay 5e-4) on a
``(B, D)`` batch of embeddings standing in for the backbone output. Methods:

* ``linear``  — a plain full-softmax ``nn.Linear(D, C, bias=False)`` + ``F.cross_entropy``
  (no normalisation, no margin; ignores the sample rate);
* ``dense``   — ``PartialFC(update="dense")`` (reference semantics, O(C·D) optimizer step);
* ``sparse``  — ``PartialFC(update="sparse")`` (only the k sampled rows move, O(k·D));
* ``chunked`` — ``PartialFC(update="sparse", chunk_size=...)``: chunked logits on top of sparse.

The measurement itself is :func:`pfcrepro.headbench.measure` (how memory is counted is said
there); this script runs it over a grid, each configuration in a fresh subprocess so peak memories
don't mix, checks the sparse head's targets and writes the records.

    python benchmarks/head.py                       # default grid, a few minutes on 2 cores
    python benchmarks/head.py --quick               # smoke test, seconds
    python benchmarks/head.py --classes 100000 1000000 --sample-rates 0.1 0.01 --methods sparse

Writes a JSON list of records (plus the targets check) to ``results/benchmarks/head.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from pfcrepro.headbench import METHODS, measure


def run_isolated(config: dict[str, Any], timeout: float = 1800.0) -> dict[str, Any]:
    """Run :func:`measure` with ``config`` in a fresh Python process; return its record (or an error record)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(config)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {**config, "error": f"exit {proc.returncode}: {' | '.join(tail)}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _same_k_rates(classes: list[int], sample_rates: list[float]) -> dict[int, list[float]]:
    """Extra sparse-head rates so that every smaller C is also measured at the k of the largest C
    (the "same k" comparison of the targets): r' = k / C where k = int(r * C_max) <= C."""
    c_max = max(classes)
    extra: dict[int, list[float]] = {}
    for c in classes:
        if c == c_max:
            continue
        for r in sample_rates:
            k = int(r * c_max)
            if k <= c and not any(int(r2 * c) == k for r2 in sample_rates):
                extra.setdefault(c, []).append(k / c)
    return extra


def _grid(args: argparse.Namespace) -> list[dict[str, Any]]:
    configs = []
    same_k = _same_k_rates(args.classes, args.sample_rates) if "sparse" in args.methods else {}
    for c in args.classes:
        for method in args.methods:
            rates = [1.0] if method == "linear" else args.sample_rates
            if method == "sparse":
                rates = list(rates) + same_k.get(c, [])
            for r in rates:
                configs.append(
                    {
                        "method": method,
                        "num_classes": c,
                        "sample_rate": r,
                        "embedding_size": args.embedding_size,
                        "batch_size": args.batch_size,
                        "repeats": args.repeats,
                        "device": args.device,
                        "chunk_size": args.chunk_size,
                    }
                )
    return configs


def check_targets(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets for the sparse head at equal k: step(C=1M) <= 1.2 x step(C=100k), and
    peak memory at 1M < 2.2 x C·D·4 bytes. Returns one entry per comparison found in ``records``."""
    sparse = {
        (r["num_classes"], r["k"]): r for r in records if r.get("method") == "sparse" and "error" not in r
    }
    out = []
    for (c, k), big in sorted(sparse.items()):
        if c < 1_000_000:
            continue
        budget = 2.2 * c * big["embedding_size"] * 4
        entry: dict[str, Any] = {
            "num_classes": c,
            "k": k,
            "peak_bytes": big["peak_bytes"],
            "peak_budget_bytes": budget,
            "memory_ok": big["peak_bytes"] < budget,
        }
        small = next((r for (c2, k2), r in sparse.items() if k2 == k and c2 < c), None)
        if small is not None:
            # the fastest repeat: on a shared machine, slower ones measure the neighbours' load
            fast_big, fast_small = (
                big.get("step_ms_min", big["step_ms"]),
                small.get("step_ms_min", small["step_ms"]),
            )
            entry.update(
                reference_classes=small["num_classes"],
                time_ratio=fast_big / fast_small,
                time_ratio_median=big["step_ms"] / small["step_ms"],
                time_ok=fast_big <= 1.2 * fast_small,
            )
        out.append(entry)
    return out


def _table(records: list[dict[str, Any]]) -> str:
    lines = [
        f"{'method':8} {'C':>9} {'r':>5} {'k':>9} {'step ms':>9} {'peak MB':>9} {'model MB':>9} {'peak/CD4':>8}"
    ]
    for r in records:
        if "error" in r:
            lines.append(f"{r['method']:8} {r['num_classes']:>9} {r['sample_rate']:>5} ERROR {r['error']}")
            continue
        cd4 = r["num_classes"] * r["embedding_size"] * 4
        lines.append(
            f"{r['method']:8} {r['num_classes']:>9} {r['sample_rate']:>5} {r['k']:>9} {r['step_ms']:>9.1f} "
            f"{r['peak_bytes'] / 2**20:>9.0f} {r['model_bytes'] / 2**20:>9.0f} {r['peak_bytes'] / cd4:>8.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--sample-rates", type=float, nargs="+", default=[0.1, 0.01])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--embedding-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--chunk-size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="JSON output (default results/benchmarks/head.json)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke-test grid")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(measure(**json.loads(args.worker))))
        return 0
    if args.quick:
        args.classes, args.sample_rates, args.embedding_size = [2000, 20000], [0.1], 64
        args.batch_size, args.repeats, args.chunk_size = 32, 2, 256
    from pfclib.io import write_json
    from pfclib.paths import resolve

    records = []
    for config in _grid(args):
        rec = run_isolated(config)
        records.append(rec)
        print(_table([rec]).splitlines()[-1], flush=True)
    targets = check_targets(records)
    print("\n" + _table(records))
    for t in targets:
        print(
            f"target @ C={t['num_classes']}, k={t['k']}: peak {t['peak_bytes'] / 2**20:.0f} MB "
            f"(budget {t['peak_budget_bytes'] / 2**20:.0f} MB, ok={t['memory_ok']})"
            + (
                f"; step ratio vs C={t['reference_classes']}: {t['time_ratio']:.2f} (ok={t['time_ok']})"
                if "time_ratio" in t
                else ""
            )
        )
    out = resolve(args.out or "results/benchmarks/head.json")
    write_json(
        out, {"records": records, "targets": targets, "torch": torch.__version__, "argv": sys.argv[1:]}
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
