"""Peak memory and step time of the classification head alone: the one job of this module is to
measure one training step of a head, each measurement point in a fresh process.

* :func:`measure` -- build one head (a plain full-softmax linear layer, or :class:`pfclib.PartialFC`
  with the dense, sparse or chunked update), run ``warmup`` + ``repeats`` training steps (forward +
  backward + SGD with momentum 0.9 and weight decay 5e-4) on random ``(B, D)`` embeddings standing
  in for the backbone output, and return the median step time and the peak memory. Memory on CPU is
  the peak resident set size of the process (``ru_maxrss``) minus its resident size just before the
  head was built (the interpreter and torch libraries), reported next to the bytes of the head's own
  tensors (centers + optimizer state); on CUDA it is ``torch.cuda.max_memory_allocated``. Call it in
  a fresh process for a meaningful peak.
* :func:`measure_interleaved` -- the step times of several heads built in one process, their
  steps interleaved: the instrument for a time ratio between two configurations (why: its doc).
* :func:`measure_in_subprocess` -- call a function by its dotted name in a fresh interpreter.
* :func:`measure_head_grid` -- :func:`measure` per layout of one rank of a ``W``-rank job (data
  parallel, model parallel, Partial FC dense / sparse) and per class count; :func:`head_layouts`
  names the layouts. No backbone and no communication are included.

``benchmarks/head.py`` is the command line over :func:`measure` (its grid, JSON output and target
checks); notebook 01 uses :func:`measure_head_grid`. Memory in MiB (``_mb``) or bytes (``_bytes``),
times in milliseconds (``_ms``).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "METHODS",
    "measure",
    "measure_interleaved",
    "measure_in_subprocess",
    "head_layouts",
    "measure_head_grid",
    "check_default_targets",
    "describe_default_targets",
]

if TYPE_CHECKING:
    import pandas as pd

METHODS = ("linear", "baseline", "dense", "sparse", "chunked")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _warm_up(dev: torch.device) -> None:
    from pfclib.head import PartialFC

    for update in ("dense", "sparse"):
        tiny = PartialFC(64, 16, sample_rate=0.5, update=update, device=dev)
        opt = tiny.make_optimizer("sgd", lr=0.1)
        F.cross_entropy(
            torch.randn(4, 8, device=dev, requires_grad=True), torch.zeros(4, dtype=torch.long, device=dev)
        ).backward()
        tiny(torch.randn(4, 16, device=dev), torch.arange(4, device=dev)).backward()
        opt.step()


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass
class _Built:
    """A head of :func:`measure` ready to step, with the shape and generator of its random batches."""

    weight: torch.Tensor
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    opt: torch.optim.Optimizer
    k: int
    dev: torch.device
    emb_dtype: torch.dtype
    gen: torch.Generator
    num_classes: int
    batch_size: int
    embedding_size: int


def _build(
    method: str,
    num_classes: int,
    sample_rate: float,
    embedding_size: int,
    batch_size: int,
    device: str,
    chunk_size: int,
    seed: int,
    embedding_dtype: str,
) -> _Built:
    """One head of :func:`measure` ready to step."""
    from pfclib.head import PartialFC

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    emb_dtype = _DTYPES.get(embedding_dtype)
    if emb_dtype is None:
        raise ValueError(
            f"embedding_dtype must be 'float32', 'bfloat16' or 'float16', got {embedding_dtype!r}"
        )
    dev = torch.device(device)
    if method == "linear":
        head = torch.nn.Linear(embedding_size, num_classes, bias=False, device=dev)
        weight = head.weight
        opt = torch.optim.SGD([weight], lr=0.1, momentum=0.9, weight_decay=5e-4)
        k = num_classes

        def loss_fn(x, y):
            return F.cross_entropy(head(x.float()), y)
    elif method == "baseline":
        weight, loss_fn, k = _baseline_head(num_classes, embedding_size, sample_rate, seed, dev)
        opt = torch.optim.SGD([weight], lr=0.1, momentum=0.9, weight_decay=5e-4)
    else:
        head = PartialFC(
            num_classes,
            embedding_size,
            sample_rate=sample_rate,
            update="dense" if method == "dense" else "sparse",
            chunk_size=chunk_size if method == "chunked" else None,
            seed=seed,
            device=dev,
        )
        weight = head.weight
        opt = head.make_optimizer("sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)
        k = head.num_sampled if sample_rate < 1.0 else head.n_local
        loss_fn = head
    gen = torch.Generator().manual_seed(seed)
    return _Built(weight, loss_fn, opt, k, dev, emb_dtype, gen, num_classes, batch_size, embedding_size)


def _step(built: _Built) -> tuple[float, Tensor]:
    """One timed training step of a :func:`_build` head on a fresh random batch: (seconds, loss)."""
    dev, gen, shape = built.dev, built.gen, (built.batch_size, built.embedding_size)
    x = torch.randn(shape, generator=gen).to(dev, built.emb_dtype).requires_grad_()
    y = torch.randint(built.num_classes, (built.batch_size,), generator=gen).to(dev)
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    loss = built.loss_fn(x, y)
    loss.backward()
    built.opt.step()
    built.opt.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize(dev)
    return time.perf_counter() - t0, loss


def _record(built: _Built, times: list[float], loss: Tensor, config: Mapping[str, Any]) -> dict[str, Any]:
    """The fields :func:`measure` and :func:`measure_interleaved` share: configuration, k, step
    times (ms), the compute floor, the bytes of the centers and of centers + optimizer state."""
    weight, opt, dev = built.weight, built.opt, built.dev
    method = config["method"]
    state_bytes = sum(
        v.numel() * v.element_size()
        for s in opt.state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor)
    )
    return {
        "method": method,
        "num_classes": config["num_classes"],
        "sample_rate": 1.0 if method == "linear" else config["sample_rate"],
        "k": built.k,
        "embedding_size": config["embedding_size"],
        "batch_size": config["batch_size"],
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "step_ms": 1e3 * statistics.median(times),
        "step_ms_min": 1e3 * min(times),
        "step_ms_all": [1e3 * t for t in times],
        "floor_ms": _compute_floor_ms(config["batch_size"], built.k, config["embedding_size"], dev),
        "model_bytes": int(weight.numel() * weight.element_size() + state_bytes),
        "centers_bytes": int(weight.numel() * weight.element_size()),
        "chunk_size": config["chunk_size"] if method == "chunked" else None,
        "embedding_dtype": config["embedding_dtype"],
        "loss": float(loss.detach()),
    }


def measure(
    method: str,
    num_classes: int,
    sample_rate: float,
    embedding_size: int = 512,
    batch_size: int = 128,
    repeats: int = 3,
    warmup: int = 2,
    device: str = "cpu",
    chunk_size: int = 4096,
    seed: int = 0,
    embedding_dtype: str = "float32",
) -> dict[str, Any]:
    """Build one head, run ``warmup`` + ``repeats`` training steps, return timings and memory.

    ``embedding_dtype`` (``"float32"``, ``"bfloat16"``, ``"float16"``) is the dtype of the
    embeddings handed to the head, as a mixed-precision backbone would; logits are fp32 either way.

    Returns a dict with ``step_ms`` (median over repeats, milliseconds), ``step_ms_min``, ``step_ms_all``,
    ``peak_bytes`` (see module doc), ``model_bytes`` (centers + optimizer state), ``k`` and the
    configuration. Call it in a fresh process for a meaningful ``peak_bytes`` on CPU.
    """
    config = dict(locals())
    dev = torch.device(device)
    torch.manual_seed(seed)
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    _warm_up(dev)  # load torch's lazily initialised kernels/threads so they are not counted as the head's
    rss_before = _rss_bytes()
    built = _build(
        method,
        num_classes,
        sample_rate,
        embedding_size,
        batch_size,
        device,
        chunk_size,
        seed,
        embedding_dtype,
    )
    times = []
    for i in range(warmup + repeats):
        seconds, loss = _step(built)
        if i >= warmup:
            times.append(seconds)
    if cuda:
        peak = torch.cuda.max_memory_allocated(dev)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    return {**_record(built, times, loss, config), "peak_bytes": int(peak)}


def measure_interleaved(
    configs: Sequence[Mapping[str, Any]], repeats: int = 16, warmup: int = 2
) -> list[dict[str, Any]]:
    """Step times of several heads built in ONE process, their steps interleaved: round ``i`` steps
    every head once, in the given order on even rounds and reversed on odd ones. Returns one record
    per config as :func:`measure` does, without ``peak_bytes`` (the process holds all the heads).

    This is the instrument for a time ratio between configurations. On this project's shared
    2-core machine the memory-bound part of a step (gathering and writing back the sampled rows)
    runs in one of two speeds for the whole life of a process, about 2x apart in the optimizer
    step, whatever the head; measured in separate processes, a ratio between two heads then
    depends on which speed each process drew. Interleaved in one process, both heads share it.
    Each config takes :func:`measure`'s keyword arguments except ``repeats`` and ``warmup``; the
    first config's seed seeds torch's global generator."""
    if len(configs) < 2:
        raise ValueError(f"measure_interleaved needs at least 2 configs to compare, got {len(configs)}")
    params = inspect.signature(measure).parameters
    defaults = {n: p.default for n, p in params.items() if p.default is not p.empty}
    for per_process in ("repeats", "warmup"):
        del defaults[per_process]
    required = {n for n, p in params.items() if p.default is p.empty}
    full = []
    for cfg in configs:
        unknown, missing = set(cfg) - set(defaults) - required, required - set(cfg)
        if unknown or missing:
            raise ValueError(
                f"config {dict(cfg)!r}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}; "
                f"expected {sorted(required)} and optionally {sorted(defaults)}"
            )
        full.append({**defaults, **cfg})
    devices = {c["device"] for c in full}
    for dev in devices:
        _warm_up(torch.device(dev))
    torch.manual_seed(full[0]["seed"])
    build_args = inspect.signature(_build).parameters
    built = [_build(**{n: c[n] for n in build_args}) for c in full]
    times: list[list[float]] = [[] for _ in full]
    losses: list[Tensor | None] = [None] * len(full)
    for i in range(warmup + repeats):
        order = range(len(full)) if i % 2 == 0 else reversed(range(len(full)))
        for j in order:
            seconds, losses[j] = _step(built[j])
            if i >= warmup:
                times[j].append(seconds)
    return [
        {**_record(b, t, loss, c), "interleaved": True} for b, t, loss, c in zip(built, times, losses, full)
    ]


def _baseline_head(num_classes: int, embedding_size: int, sample_rate: float, seed: int, dev: torch.device):
    """The reference implementation's head step, written plainly: sample the positives plus uniform
    negatives, ``index_select`` those rows of a ``(C, D)`` parameter (its gradient is then a dense
    ``(C, D)`` tensor, zero off the sampled rows), normalise, matmul, ArcFace margin, cross-entropy;
    ``torch.optim.SGD`` then moves the whole matrix. Returns ``(weight, loss_fn, k)``."""
    from pfclib.head import init_centers
    from pfclib.margins import create
    from pfclib.sampler import num_sampled, remap_labels, sample_classes

    weight = torch.nn.Parameter(init_centers(0, num_classes, embedding_size, seed, torch.float32, dev))
    margin = create("arcface")
    k = num_sampled(sample_rate, num_classes) if sample_rate < 1.0 else num_classes
    sampler = torch.Generator().manual_seed(seed)

    def loss_fn(x, y):
        positives = torch.unique(y)
        if sample_rate < 1.0:
            index = sample_classes(positives.cpu(), num_classes, k, sampler).to(dev)
            w, target = weight.index_select(0, index), remap_labels(y, index)
        else:
            w, target = weight, y
        cos = (F.normalize(x.float(), dim=1) @ F.normalize(w, dim=1).T).clamp(-1.0, 1.0)
        return F.cross_entropy(margin(cos, target), target)

    return weight, loss_fn, k


def _compute_floor_ms(
    batch_size: int, k: int, embedding_size: int, dev: torch.device, repeats: int = 7
) -> float:
    """The step's compute floor on this device: its three ``B x k x D`` matrix products (forward,
    and the two of backward: 6·B·k·D flops) at the speed of one such product measured here (the
    fastest of ``repeats``, the machine's best rate), in milliseconds."""
    a = torch.randn(batch_size, embedding_size, device=dev)
    b = torch.randn(embedding_size, k, device=dev)
    times = []
    for i in range(repeats + 1):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        torch.mm(a, b)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if i:
            times.append(time.perf_counter() - t0)
    return 3e3 * min(times)


def measure_in_subprocess(
    function: str,
    kwargs: Mapping[str, Any],
    timeout: float | None = 600.0,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Call ``function(**kwargs)`` in a fresh Python interpreter and return its JSON result.

    Peak-memory figures (``ru_maxrss``, CUDA peak allocation) are per process, so each measurement
    point needs a process of its own; this runs ``python -c`` with the current interpreter,
    importing ``function`` by its dotted name (``"package.module:name"``, e.g.
    ``"pfcrepro.headbench:measure"``). The child runs in the repository root. ``kwargs``
    and the result must be JSON-serialisable. The child inherits the environment plus ``env``.

    Raises:
        RuntimeError: naming the function, its arguments and the child's stderr if it fails.
    """
    if ":" not in function:
        raise ValueError(f"function must be 'package.module:name', got {function!r}")
    module, name = function.split(":", 1)
    code = (
        "import importlib, json, sys\n"
        f"fn = getattr(importlib.import_module({module!r}), {name!r})\n"
        "result = fn(**json.loads(sys.stdin.read()))\n"
        "sys.stdout.write('\\n@@RESULT@@' + json.dumps(result) + '\\n')\n"
    )
    child_env = {**os.environ, **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(dict(kwargs)),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env,
        cwd=_repo_root_or_cwd(),
    )
    if proc.returncode != 0 or "@@RESULT@@" not in proc.stdout:
        tail = proc.stderr[-3000:]
        raise RuntimeError(
            f"{function}(**{dict(kwargs)!r}) failed in a subprocess (exit code {proc.returncode}):\n{tail}"
        )
    return json.loads(proc.stdout.rsplit("@@RESULT@@", 1)[1])


# Per-rank layouts of the head measured by :func:`measure_head_grid`: (label, benchmark method,
# whether the classes are sharded over W ranks, whether the rank sees the gathered W * B rows, sampled).
_LAYOUTS = (
    ("data parallel", "dense", False, False, False),
    ("model parallel", "dense", True, True, False),
    ("PFC dense", "dense", True, True, True),
    ("PFC sparse", "sparse", True, True, True),
)


def head_layouts(sample_rate: float) -> list[str]:
    """Names of the head layouts :func:`measure_head_grid` measures, in its order."""
    return [f"{name} r={sample_rate:g}" if sampled else name for name, *_, sampled in _LAYOUTS]


def measure_head_grid(
    classes: Sequence[int],
    world_size: int,
    batch_size: int,
    embedding_size: int,
    sample_rate: float,
    dp_max_classes: int,
    repeats: int = 3,
    warmup: int = 1,
    device: str = "cpu",
    function: str = "pfcrepro.headbench:measure",
    log: Callable[[str], None] | None = print,
    runner: Callable[[str, Mapping[str, Any]], Mapping[str, Any]] | None = None,
) -> pd.DataFrame:
    """Peak memory and step time of one rank's classification head, per layout and class count.

    Every point runs ``function`` (default: :func:`measure`, one training step = forward +
    backward + SGD step on random embeddings) in a fresh process
    (:func:`measure_in_subprocess`), so its peak memory is its own. A rank of a ``world_size``-rank
    job is emulated in one process:

    * ``data parallel``: the rank holds all ``C`` centers and its own ``batch_size`` rows;
    * ``model parallel``: ``C / W`` centers (rank 0's shard) and the gathered ``W * batch_size`` rows;
    * ``PFC dense r`` / ``PFC sparse r``: as model parallel, sampling ``k = int(r * C / W)`` classes,
      with the dense (reference) or sparse (only sampled rows move) center update.

    Communication is not included (one process). Labels are drawn among the rank's own classes, so
    every gathered row is a positive of this rank; for ``k`` much larger than ``W * batch_size``
    this does not change the cost. Data parallel is skipped above ``dp_max_classes`` (its
    ``C x D`` matrix, gradient and momentum would exceed the machine); such points, and points whose
    process fails (out of memory), are rows with an ``error`` string and NaN figures.

    ``runner(function, kwargs) -> record`` performs one measurement (default
    :func:`measure_in_subprocess`); the record needs ``k``, ``step_ms``, ``peak_bytes`` and
    ``model_bytes``. A runner raising ``RuntimeError`` marks the point as failed.

    Returns:
        One row per (classes, layout): ``layout``, ``num_classes``, ``world_size``,
        ``classes_per_rank``, ``rows_per_rank``, ``sample_rate``, ``k``, ``step_ms`` (median),
        ``samples_per_s`` (global: ``W * batch_size`` images per step), ``peak_mb`` (peak memory of the
        step above the process's baseline, MiB), ``model_mb`` (centers + optimizer state, MiB), ``error``.
    """
    import pandas as pd

    if world_size < 1 or batch_size < 1 or embedding_size < 1:
        raise ValueError(
            f"world_size, batch_size and embedding_size must be >= 1, got {world_size}, {batch_size}, {embedding_size}"
        )
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    rows = []
    for c in classes:
        if int(c) < world_size:
            raise ValueError(
                f"num_classes {c} is smaller than world_size {world_size}: some rank would own no class"
            )
        for label, (_, method, sharded, gathered, sampled) in zip(head_layouts(sample_rate), _LAYOUTS):
            per_rank = int(c) // world_size + (int(c) % world_size > 0) if sharded else int(c)
            n_rows = batch_size * world_size if gathered else batch_size
            r = sample_rate if sampled else 1.0
            row: dict[str, Any] = {
                "layout": label,
                "num_classes": int(c),
                "world_size": world_size,
                "classes_per_rank": per_rank,
                "rows_per_rank": n_rows,
                "sample_rate": r,
                "k": float("nan"),
                "step_ms": float("nan"),
                "samples_per_s": float("nan"),
                "peak_mb": float("nan"),
                "model_mb": float("nan"),
                "error": "",
            }
            if not sharded and int(c) > dp_max_classes:
                row["error"] = f"skipped: C={c} > dp_max_classes={dp_max_classes}"
            else:
                kwargs = {
                    "method": method,
                    "num_classes": per_rank,
                    "sample_rate": r,
                    "embedding_size": embedding_size,
                    "batch_size": n_rows,
                    "repeats": repeats,
                    "warmup": warmup,
                    "device": device,
                }
                try:
                    rec = (runner or measure_in_subprocess)(function, kwargs)
                except (RuntimeError, subprocess.TimeoutExpired) as exc:
                    row["error"] = str(exc).strip().splitlines()[-1][:300]
                else:
                    row.update(
                        k=float(rec["k"]),
                        step_ms=float(rec["step_ms"]),
                        samples_per_s=batch_size * world_size / (float(rec["step_ms"]) / 1e3),
                        peak_mb=float(rec["peak_bytes"]) / 2**20,
                        model_mb=float(rec["model_bytes"]) / 2**20,
                    )
            rows.append(row)
            if log is not None:
                shown = row["error"] or f"{row['step_ms']:.1f} ms, peak {row['peak_mb']:.0f} MiB"
                log(f"C={int(c):>10,} {label:<22} {shown}")
    return pd.DataFrame(rows)


def _repo_root_or_cwd() -> Path:
    from pfcrepro.paths import repo_root

    try:
        return repo_root()
    except FileNotFoundError:
        return Path.cwd()


# ---------------------------------------------------------------- targets of the default head
def _median(values: list[float | None]) -> float | None:
    good = sorted(v for v in values if v is not None)
    if not good:
        return None
    mid = len(good) // 2
    return good[mid] if len(good) % 2 else 0.5 * (good[mid - 1] + good[mid])


GIB = 2**30


def check_default_targets(
    versus: list[dict[str, Any]],
    flat: list[dict[str, Any]],
    big: dict[str, Any] | None,
    memory_limit: int,
    records: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """The default head's targets from the paired runs: against the baseline (first = baseline,
    second = dense) a median speed-up >= 5 and a median peak ratio <= 0.55; the default's step
    (median over pairs) and the sparse head's (its ``records`` entry at the same C and r) within
    x2.5 of the compute floor; flat in C (first = small C, second = large C, same k; separate or
    interleaved in one process, ``interleaved`` says which) a median ratio within x1.2; at
    ``big`` classes the default's peak under ``memory_limit`` while the baseline's need (its
    measured peak per class x C) is over it.

    The compute floor is the *fastest* of the floors measured in every process of the run at that
    k (``records`` and the pairs): one process's matrix products can run slower than the machine's
    best (its memory state, its neighbours), and a slow floor would flatter the ratio."""
    out: dict[str, Any] = {}
    if versus:
        speedups = [None if e["time_ratio"] is None else 1.0 / e["time_ratio"] for e in versus]
        peaks = [e["peak_ratio"] for e in versus]
        dense = [e["second"] for e in versus if "error" not in e["second"]]
        base = [e["first"] for e in versus if "error" not in e["first"]]
        c, r = versus[0]["first"]["num_classes"], versus[0]["first"]["sample_rate"]
        k = dense[0]["k"] if dense else None
        measured = [
            x for x in [*records, *dense, *base] if "error" not in x and x.get("k") == k and "floor_ms" in x
        ]
        floor_ms = min((x["floor_ms"] for x in measured), default=None)
        dense_ratio = None if floor_ms is None else _median([x["step_ms"] / floor_ms for x in dense])
        sparse = next(
            (x for x in records if x.get("method") == "sparse" and x.get("num_classes") == c
             and x.get("sample_rate") == r and "error" not in x),
            None,
        )  # fmt: skip
        sparse_ratio = None if sparse is None or floor_ms is None else sparse["step_ms"] / floor_ms
        out["versus_baseline"] = {
            "num_classes": c,
            "sample_rate": r,
            "speedup_per_pair": speedups,
            "peak_ratio_per_pair": peaks,
            "speedup_median": _median(speedups),
            "peak_ratio_median": _median(peaks),
            "floor_ms": floor_ms,
            "dense_over_floor_median": dense_ratio,
            "sparse_over_floor": sparse_ratio,
            "speedup_ok": (_median(speedups) or 0.0) >= 5.0,
            "peak_ok": (_median(peaks) or float("inf")) <= 0.55,
            "floor_ok": dense_ratio is not None
            and dense_ratio <= 2.5
            and (sparse_ratio is None or sparse_ratio <= 2.5),
            "baseline_peak_per_class": _median([x["peak_bytes"] / x["num_classes"] for x in base]),
        }
    if flat:
        ratios = [e["time_ratio"] for e in flat]
        out["flat_in_classes"] = {
            "interleaved": all(
                e["first"].get("interleaved") and e["second"].get("interleaved") for e in flat
            ),
            "k": flat[0]["second"].get("k"),
            "small_classes": flat[0]["first"]["num_classes"],
            "large_classes": flat[0]["second"]["num_classes"],
            "ratio_per_pair": ratios,
            "ratio_median": _median(ratios),
            "ok": (_median(ratios) or float("inf")) <= 1.2,
        }
    if big is not None:
        per_class = out.get("versus_baseline", {}).get("baseline_peak_per_class")
        need = None if per_class is None else per_class * big["num_classes"]
        out["big"] = {
            "num_classes": big["num_classes"],
            "memory_limit_bytes": memory_limit,
            "dense": big,
            "trains": "error" not in big,
            "baseline_need_bytes_extrapolated": need,
            "ok": "error" not in big
            and big["peak_bytes"] < memory_limit
            and need is not None
            and need > memory_limit,
        }
    return out


def describe_default_targets(t: dict[str, Any]) -> list[str]:
    """One markdown bullet per target of :func:`check_default_targets` (README and console)."""
    lines = []
    v = t.get("versus_baseline")
    if v:
        pairs = ", ".join("–" if x is None else f"{x:.2f}" for x in v["speedup_per_pair"])
        peaks = ", ".join("–" if x is None else f"{x:.3f}" for x in v["peak_ratio_per_pair"])
        lines.append(
            f"- Default head vs baseline at C = {v['num_classes']:,}, r = {v['sample_rate']:g}: step ×{v['speedup_median']:.2f} "
            f"faster (median of pairs; per pair {pairs}; target ≥ ×5 → {'met' if v['speedup_ok'] else 'NOT met'}), "
            f"peak memory ×{v['peak_ratio_median']:.3f} (per pair {peaks}; target ≤ ×0.55 → "
            f"{'met' if v['peak_ok'] else 'NOT met'}); step / compute floor ({v['floor_ms']:.0f} ms: the run's fastest "
            f"3 B×k×D products) ×{v['dense_over_floor_median']:.2f} default"
            + ("" if v.get("sparse_over_floor") is None else f", ×{v['sparse_over_floor']:.2f} sparse")
            + f" (target ≤ ×2.5 → {'met' if v['floor_ok'] else 'NOT met'})"
        )
    f = t.get("flat_in_classes")
    if f:
        ratios = ", ".join("–" if x is None else f"{x:.3f}" for x in f["ratio_per_pair"])
        unit = "process, steps interleaved" if f.get("interleaved") else "pair"
        lines.append(
            f"- Default head at k = {f['k']:,}: step at C = {f['large_classes']:,} / C = {f['small_classes']:,} "
            f"×{f['ratio_median']:.3f} (median; per {unit} {ratios}; target ≤ ×1.2 → "
            f"{'met' if f['ok'] else 'NOT met'})"
        )
    b = t.get("big")
    if b:
        limit = b["memory_limit_bytes"] / GIB
        got = (
            "failed: " + b["dense"]["error"]
            if not b["trains"]
            else (
                f"trains: step {b['dense']['step_ms']:.0f} ms, peak {b['dense']['peak_bytes'] / GIB:.1f} GiB"
            )
        )
        need = b["baseline_need_bytes_extrapolated"]
        lines.append(
            f"- Default head at C = {b['num_classes']:,}, D = {b['dense']['embedding_size']} with momentum, "
            f"address space ≤ {limit:g} GiB: {got}; the baseline would need "
            f"{'?' if need is None else f'{need / GIB:.1f}'} GiB (its measured peak per class × C, extrapolated) → "
            f"{'met' if b['ok'] else 'NOT met'}"
        )
    return lines
