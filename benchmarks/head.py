"""Benchmark of one training step of the classification head: time and peak memory (command line).

One step = forward + backward + optimizer step (SGD, momentum 0.9, weight decay 5e-4) on a
``(B, D)`` batch of embeddings standing in for the backbone output. Methods:

* ``linear``   — a plain full-softmax ``nn.Linear(D, C, bias=False)`` + ``F.cross_entropy``
  (no normalisation, no margin; ignores the sample rate);
* ``baseline`` — the reference implementation's step written plainly here: ``index_select`` of the
  sampled rows, normalise, matmul, ArcFace, cross-entropy, ``torch.optim.SGD`` over the whole
  ``(C, D)`` matrix (dense gradient, every row moved by momentum and weight decay);
* ``dense``    — ``PartialFC(update="dense")``, the library's default: the same result as the
  baseline (``pfclib.optim.LazySGD``), at ``O(k·D)`` per step;
* ``sparse``   — ``PartialFC(update="sparse")`` (only the k sampled rows move, O(k·D));
* ``chunked``  — ``PartialFC(update="sparse", chunk_size=...)``: chunked logits on top of sparse.

The measurement itself is :func:`pfcrepro.headbench.measure` (how memory is counted is said
there, and the compute floor: the step's three ``B x k x D`` products at this machine's measured
matrix-product speed); this script runs it over a grid, each configuration in a fresh subprocess so
peak memories don't mix. Then, as the machine is noisy, the comparisons the targets are about run
in alternating pairs of fresh processes (A B, B A, A B, ...) and are reported per pair and as the
median ratio:

* default (``dense``) against ``baseline`` at the largest C and the first rate: step time, peak memory;
* ``dense`` at the largest C against the smallest C at the same k (flat in C): a time ratio only,
  so each "pair" is one fresh process that builds both heads and interleaves their steps
  (``--flat-repeats`` each). Measured in separate processes this ratio swung from ×0.85 to ×1.39
  within one run: the memory-bound part of a step runs at one of two speeds for a process's whole
  life, whatever the head (see :func:`pfcrepro.headbench.measure_interleaved`);
* ``--big C``: the default head alone at C classes (4M by default) under a 24 GiB address-space
  limit; the baseline's need there is extrapolated from its measured per-class peak (running it
  would exhaust this machine's memory).

    python benchmarks/head.py                       # default grid + pairs, ~15 minutes on 2 cores
    python benchmarks/head.py --quick               # smoke test, seconds
    python benchmarks/head.py --classes 100000 1000000 --sample-rates 0.1 0.01 --methods sparse

Writes a JSON (records, pairs, targets) to ``results/benchmarks/head.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from pfcrepro.headbench import (
    GIB,
    METHODS,
    check_default_targets,
    describe_default_targets,
    measure,
    measure_interleaved,
)


def run_isolated(
    config: dict[str, Any], timeout: float = 1800.0, memory_limit: int | None = None
) -> dict[str, Any] | list[dict[str, Any]]:
    """Run :func:`measure` with ``config`` in a fresh Python process (its address space limited to
    ``memory_limit`` bytes if given); return its record (or an error record). A config
    ``{"interleave": [config, ...], "repeats": n}`` runs :func:`measure_interleaved` over the
    configs in that one process and returns one record (or error record) per config."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(config)]
    if memory_limit is not None:
        cmd += ["--memory-limit", str(int(memory_limit))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        error = f"exit {proc.returncode}: {' | '.join(tail)}"
        if "interleave" in config:
            return [{**c, "error": error} for c in config["interleave"]]
        return {**config, "error": error}
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


def _config(args: argparse.Namespace, method: str, num_classes: int, sample_rate: float) -> dict[str, Any]:
    return {
        "method": method,
        "num_classes": num_classes,
        "sample_rate": sample_rate,
        "embedding_size": args.embedding_size,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "device": args.device,
        "chunk_size": args.chunk_size,
        "embedding_dtype": args.embedding_dtype,
    }


def _pair_entry(a: dict[str, Any], b: dict[str, Any], with_peak: bool = True) -> dict[str, Any]:
    """One comparison of :func:`run_pairs` / :func:`run_interleaved_pairs`: both records,
    ``time_ratio`` (b's step time / a's) and ``peak_ratio`` (b's peak / a's, None without peaks);
    the ratios are None when either run failed."""
    entry: dict[str, Any] = {"first": a, "second": b, "time_ratio": None, "peak_ratio": None}
    if "error" not in a and "error" not in b:
        entry["time_ratio"] = b["step_ms"] / a["step_ms"]
        if with_peak:
            entry["peak_ratio"] = b["peak_bytes"] / a["peak_bytes"]
    return entry


def run_pairs(
    first: dict[str, Any], second: dict[str, Any], pairs: int, runner=run_isolated, log=print
) -> list[dict[str, Any]]:
    """``pairs`` pairs of fresh-process measurements of two configurations, alternating which runs
    first (A B, B A, ...) so that a drift of the machine's speed hits both alike. Entries: see
    :func:`_pair_entry` (a = first, b = second)."""
    out = []
    for i in range(pairs):
        order = (first, second) if i % 2 == 0 else (second, first)
        recs = {id(cfg): runner(cfg) for cfg in order}
        a, b = recs[id(first)], recs[id(second)]
        entry = _pair_entry(a, b)
        out.append(entry)
        if log is not None:
            shown = (
                f"{a['method']} C={a['num_classes']:,} {a.get('step_ms', float('nan')):.0f} ms vs {b['method']} "
                f"C={b['num_classes']:,} {b.get('step_ms', float('nan')):.0f} ms"
            )
            log(f"pair {i + 1}/{pairs}: {shown}; ratio ×{entry['time_ratio'] or float('nan'):.3f}")
    return out


def run_interleaved_pairs(
    first: dict[str, Any],
    second: dict[str, Any],
    pairs: int,
    repeats: int,
    runner=run_isolated,
    log=print,
) -> list[dict[str, Any]]:
    """``pairs`` fresh processes, each building both configurations and interleaving ``repeats``
    steps of each (:func:`pfcrepro.headbench.measure_interleaved`; which one steps first alternates
    between processes). Entries as :func:`run_pairs`'s, ``time_ratio`` from the one process and
    ``peak_ratio`` None (a process holding both heads has no peak of either)."""
    out = []
    both = [{k: v for k, v in c.items() if k != "repeats"} for c in (first, second)]
    for i in range(pairs):
        flip = slice(None, None, 1 if i % 2 == 0 else -1)
        a, b = runner({"interleave": both[flip], "repeats": repeats})[flip]
        entry = _pair_entry(a, b, with_peak=False)
        out.append(entry)
        if log is not None:
            log(
                f"process {i + 1}/{pairs}: C={a['num_classes']:,} {a.get('step_ms', float('nan')):.1f} ms vs "
                f"C={b['num_classes']:,} {b.get('step_ms', float('nan')):.1f} ms (interleaved); "
                f"ratio ×{entry['time_ratio'] or float('nan'):.3f}"
            )
    return out


def _grid(args: argparse.Namespace) -> list[dict[str, Any]]:
    configs = []
    same_k = _same_k_rates(args.classes, args.sample_rates) if "sparse" in args.methods else {}
    caps = {"baseline": args.baseline_max_classes, "linear": args.linear_max_classes}
    for c in args.classes:
        for method in args.methods:
            if caps.get(method) and c > caps[method]:
                continue
            rates = [1.0] if method == "linear" else args.sample_rates
            if method == "sparse":
                rates = list(rates) + same_k.get(c, [])
            for r in rates:
                configs.append(_config(args, method, c, r))
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


def _apply_presets(args: argparse.Namespace) -> None:
    """``--gpu``: the GPU figures (1M, 8M, 29M classes, bf16 embeddings, the baseline up to 8M, where
    its 4·C·D·4 bytes still fit one large GPU; at 29M it would need 237 GB). ``--quick``: a smoke test.
    ``--gpu --device cpu`` runs the GPU preset's grid on the CPU (sizes permitting)."""
    if args.gpu:
        args.device = "cuda" if args.device == "cpu" and not args.device_given else args.device
        args.classes, args.sample_rates = [1_000_000, 8_000_000, 29_000_000], [0.1]
        args.methods, args.embedding_dtype = ["baseline", "dense", "sparse"], "bfloat16"
        args.pairs, args.big = 2, 0
        args.pair_classes = args.baseline_max_classes = 8_000_000
        args.out = args.out or "results/gpu/benchmarks/head.json"
    if args.quick:
        args.classes, args.sample_rates, args.embedding_size = [2000, 20000], [0.1], 64
        args.batch_size, args.repeats, args.chunk_size = 32, 2, 256
        args.pairs, args.big, args.flat_repeats = min(args.pairs, 2), 0, 3
        if args.gpu:
            args.pair_classes = args.baseline_max_classes = 2000


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
    parser.add_argument(
        "--embedding-dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="dtype of the embeddings handed to the head (logits are fp32 either way)",
    )
    parser.add_argument(
        "--gpu",
        action="store_true",
        help="the GPU figures: cuda, C = 1M, 8M, 29M, r = 0.1, bf16 embeddings, baseline / dense / sparse, "
        "2 pairs; writes results/gpu/benchmarks/head.json (about 10 minutes on one large GPU)",
    )
    parser.add_argument("--pair-classes", type=int, help="C of the paired comparisons (default: the largest)")
    parser.add_argument("--baseline-max-classes", type=int, help="skip the baseline above this C in the grid")
    parser.add_argument(
        "--linear-max-classes", type=int, help="skip the plain full softmax (linear) above this C in the grid"
    )
    parser.add_argument("--pairs", type=int, default=5, help="alternating pairs per comparison (0: none)")
    parser.add_argument(
        "--flat-repeats", type=int, default=16, help="interleaved steps per head in each flat-in-C process"
    )
    parser.add_argument("--big", type=int, default=4_000_000, help="classes of the large run (0: skip)")
    parser.add_argument(
        "--memory-limit-gib", type=float, default=24.0, help="address-space limit of the large run"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--memory-limit", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.device_given = any(
        a == "--device" or a.startswith("--device=") for a in (argv if argv is not None else sys.argv[1:])
    )

    if args.worker:
        if args.memory_limit:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (args.memory_limit, args.memory_limit))
        config = json.loads(args.worker)
        if "interleave" in config:
            result = measure_interleaved(config["interleave"], repeats=config["repeats"])
        else:
            result = measure(**config)
        print(json.dumps(result))
        return 0
    _apply_presets(args)
    from pfclib.io import write_json
    from pfcrepro.paths import resolve

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
    versus = flat = []
    big = None
    c_small, rate = min(args.classes), args.sample_rates[0]
    c_large = args.pair_classes or max(args.classes)
    if args.pairs > 0:
        print(f"\ndefault (dense) vs baseline at C={c_large:,}, r={rate}, {args.pairs} alternating pairs:")
        versus = run_pairs(
            _config(args, "baseline", c_large, rate), _config(args, "dense", c_large, rate), args.pairs
        )
        k = int(rate * c_small)
        if c_small < c_large and k >= 1:
            print(
                f"\ndefault at k={k:,}: C={c_small:,} vs C={c_large:,}, {args.pairs} processes, "
                f"{args.flat_repeats} interleaved steps each:"
            )
            flat = run_interleaved_pairs(
                _config(args, "dense", c_small, rate),
                _config(args, "dense", c_large, k / c_large),
                args.pairs,
                args.flat_repeats,
            )
    limit = int(args.memory_limit_gib * GIB)
    if args.big:
        print(
            f"\ndefault at C={args.big:,}, r={rate}, address space limited to {args.memory_limit_gib:g} GiB:"
        )
        big = run_isolated({**_config(args, "dense", args.big, rate), "repeats": 3}, memory_limit=limit)
        print(_table([big]).splitlines()[-1])
    default = check_default_targets(versus, flat, big, limit, records)
    for line in describe_default_targets(default):
        print(line)
    out = resolve(args.out or "results/benchmarks/head.json")
    write_json(
        out,
        {
            "records": records,
            "targets": targets,
            "pairs": {"versus_baseline": versus, "flat_in_classes": flat},
            "default_targets": default,
            "torch": torch.__version__,
            "argv": sys.argv[1:],
        },
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
