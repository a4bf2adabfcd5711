"""The reduced GPU profile: a few notebooks at GPU scale, end to end, on one GPU in about ten minutes.

The full ``gpu`` profile of ``params.yaml`` is paper-like and takes hours; the cpu profile (the
default of ``dvc repro``) never touches a GPU. This is the check in between, for a session that has
one GPU for a few minutes::

    python -m pfcrepro.gpu_profile                  # one CUDA GPU; writes results/gpu/
    python -m pfcrepro.gpu_profile --device cpu --out scratch/gpu_check   # the mechanics, no GPU

Each listed notebook runs with the ``gpu`` block of its ``params.yaml`` section, updated by the
mapping under ``gpu_quick.stages.<section>`` (a smaller world, fewer steps and seeds; nested
mappings are merged key by key, anything else is replaced). Its notebook and output folder are those
of its DVC stage in ``dvc.yaml`` (the ``python -m pfcrepro.nbrun`` command naming the section), so
this module keeps no second list of them.

Written under the output folder: one folder per notebook, as the DVC stage writes it (executed copy
with its figures inline, ``figures/``, ``metrics.json``); ``params.yaml``, the merged parameters
that ran; ``run.json``: the device, versions, seconds per notebook, the total and whether it stayed
within ``gpu_quick.budget_s``. The notebooks label their results with the profile ``gpu-quick``.
These are not DVC outputs: ``dvc repro`` never runs them, so a clone without a GPU stays reproducible.

``--device cpu`` runs the same notebooks on the CPU (their ``device`` settings replaced, mixed
precision off), to check the mechanics where no GPU is at hand; the sizes stay those of
``gpu_quick`` unless ``--params`` names a file with smaller ones.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from pfclib.io import atomic_path, write_json
from pfcrepro.paths import repo_root

from .nbrun import run_notebook, stage_parameters

PROFILE_LABEL = "gpu-quick"


def merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``update``: mappings in both are merged recursively, other values replaced."""
    out = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def notebook_stages(dvc_file: str | os.PathLike | None = None) -> dict[str, tuple[str, str]]:
    """``{section: (notebook, out_dir)}`` of every ``pfcrepro.nbrun`` stage of ``dvc.yaml``."""
    path = Path(dvc_file) if dvc_file is not None else repo_root() / "dvc.yaml"
    stages = (yaml.safe_load(path.read_text()) or {}).get("stages", {})
    found: dict[str, tuple[str, str]] = {}
    for stage in stages.values():
        cmd = stage.get("cmd") if isinstance(stage, Mapping) else None
        if not isinstance(cmd, str) or "pfcrepro.nbrun" not in cmd:
            continue
        args = shlex.split(cmd)
        i = args.index("pfcrepro.nbrun")
        parsed = argparse.ArgumentParser(add_help=False)
        parsed.add_argument("notebook")
        parsed.add_argument("--section", required=True)
        parsed.add_argument("--out-dir", required=True)
        ns, _ = parsed.parse_known_args(args[i + 1 :])
        found[ns.section] = (ns.notebook, ns.out_dir)
    return found


def _on_cpu(values: dict[str, Any]) -> dict[str, Any]:
    """The same parameters with every device setting on the CPU and mixed precision off."""
    out = dict(values)
    if "device" in out:
        out["device"] = "cpu"
    if isinstance(out.get("train"), Mapping):
        out["train"] = {**out["train"], "device": "cpu", "mixed_precision": "no"}
    return out


def quick_parameters(
    params_file: str | os.PathLike = "params.yaml", device: str = "cuda"
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """The merged parameters of every ``gpu_quick`` stage, and the ``gpu_quick`` settings.

    Raises:
        KeyError: when the file has no ``gpu_quick.stages`` or names a section it lacks.
    """
    path = Path(params_file) if Path(params_file).is_absolute() else repo_root() / params_file
    params = yaml.safe_load(path.read_text()) or {}
    quick = params.get("gpu_quick")
    if not isinstance(quick, Mapping) or not isinstance(quick.get("stages"), Mapping) or not quick["stages"]:
        raise KeyError(f"{path} has no gpu_quick.stages mapping (section name -> overrides of its gpu block)")
    merged: dict[str, dict[str, Any]] = {}
    for section, overrides in quick["stages"].items():
        values = merge(stage_parameters(section, path, profile="gpu"), overrides or {})
        values.pop("profile", None)
        merged[section] = _on_cpu(values) if device == "cpu" else values
    return merged, dict(quick)


def _versions() -> dict[str, str]:
    import torch

    import pfclib

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "pfclib": getattr(pfclib, "__version__", "unknown"),
    }


def _device_name(device: str) -> str:
    import torch

    if device == "cpu":
        return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    if not torch.cuda.is_available():
        raise RuntimeError(
            "no CUDA device is available: the reduced GPU profile runs on one GPU "
            "(use --device cpu to check its mechanics on the CPU)"
        )
    return f"{torch.cuda.get_device_name(0)} (1 of {torch.cuda.device_count()} visible)"


def run(
    out: str | os.PathLike = "results/gpu",
    params_file: str | os.PathLike = "params.yaml",
    device: str = "cuda",
    sections: Sequence[str] | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """Run the ``gpu_quick`` notebooks; return (and write to ``<out>/run.json``) what ran and how long."""
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    merged, quick = quick_parameters(params_file, device)
    chosen = list(sections) if sections else list(merged)
    unknown = [s for s in chosen if s not in merged]
    if unknown:
        raise KeyError(f"sections {unknown} are not in gpu_quick.stages; expected some of {list(merged)}")
    stages = notebook_stages()
    missing = [s for s in chosen if s not in stages]
    if missing:
        raise KeyError(f"no pfcrepro.nbrun stage of dvc.yaml runs the sections {missing}")
    device_name = _device_name(device)
    root = repo_root()
    out_dir = Path(out) if Path(out).is_absolute() else root / out
    out_dir.mkdir(parents=True, exist_ok=True)
    ran = {s: merged[s] for s in chosen}
    # nbrun reads one profile block per section: the merged values go under the `gpu` key.
    record = {"profile": "gpu", **{s: {"gpu": v} for s, v in ran.items()}}
    budget = float(quick.get("budget_s", 600))
    # Written first and read by every notebook run: the file records exactly what ran.
    ran_params = out_dir / "params.yaml"
    with atomic_path(ran_params) as tmp:
        tmp.write_text(yaml.safe_dump(record, sort_keys=False))
    times: dict[str, float] = {}
    t_all = time.perf_counter()
    for section in chosen:
        notebook, stage_out = stages[section]
        target = out_dir / Path(stage_out).name
        log(f"[gpu-quick] {section}: {notebook} -> {target} on {device_name}")
        t0 = time.perf_counter()
        run_notebook(notebook, section, target, ran_params, profile="gpu", extra={"profile": PROFILE_LABEL})
        times[section] = round(time.perf_counter() - t0, 1)
        log(f"[gpu-quick] {section}: {times[section]:.0f} s")
    total = round(time.perf_counter() - t_all, 1)
    summary = {
        "device": device_name,
        "versions": _versions(),
        "seconds": times,
        "total_s": total,
        "budget_s": budget,
        "within_budget": total <= budget,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    write_json(out_dir / "run.json", summary)
    log(f"[gpu-quick] total {total:.0f} s (budget {budget:.0f} s): {'within' if total <= budget else 'OVER'}")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/gpu", help="output folder (default results/gpu)")
    parser.add_argument("--params", default="params.yaml", help="file with the gpu_quick section")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--sections", nargs="*", default=None, help="a subset of gpu_quick.stages")
    args = parser.parse_args(argv)
    summary = run(args.out, args.params, args.device, args.sections)
    return 0 if summary["within_budget"] else 3


if __name__ == "__main__":
    sys.exit(main())
