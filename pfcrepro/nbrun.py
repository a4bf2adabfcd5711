"""Execute a notebook with papermill, its parameters taken from one section of ``params.yaml``.

The one job of this module is the command every notebook's DVC stage runs::

    python -m pfcrepro.nbrun notebooks/01_memory_scaling.ipynb --section memory_scaling \
        --out-dir results/01_memory_scaling

``params.yaml`` holds a top-level ``profile`` (``cpu`` by default, ``gpu`` for paper-like scales)
and, per stage, one mapping per profile. The chosen mapping plus ``out_dir`` become the notebook's
parameters (they override the tiny defaults of its ``parameters`` cell). The executed copy is
written to ``<out-dir>/<notebook name>`` through a temporary name, so a failed run never leaves
a half-executed notebook where DVC expects its output.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

from pfclib.paths import repo_root

PROFILES = ("cpu", "gpu")


def stage_parameters(
    section: str, params_file: str | os.PathLike = "params.yaml", profile: str | None = None
) -> dict[str, Any]:
    """Return the parameters of ``section`` for ``profile`` (default: the file's ``profile`` key,
    overridable with the ``PFCLIB_PROFILE`` environment variable)."""
    path = Path(params_file)
    if not path.is_absolute():
        path = repo_root() / path
    params = yaml.safe_load(path.read_text()) or {}
    profile = profile or os.environ.get("PFCLIB_PROFILE") or params.get("profile", "cpu")
    if profile not in PROFILES:
        raise ValueError(
            f"profile must be one of {PROFILES}, got {profile!r} (from {path} or PFCLIB_PROFILE)"
        )
    if section not in params:
        raise KeyError(
            f"section {section!r} not found in {path}; sections: {sorted(k for k in params if k != 'profile')}"
        )
    block = params[section]
    if not isinstance(block, dict) or profile not in block:
        raise KeyError(f"{path}: section {section!r} has no {profile!r} profile; expected keys {PROFILES}")
    values = dict(block.get("common", {}))
    values.update(block[profile])
    values["profile"] = profile
    return values


def run_notebook(
    notebook: str | os.PathLike,
    section: str,
    out_dir: str | os.PathLike,
    params_file: str | os.PathLike = "params.yaml",
    profile: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Execute ``notebook`` with the parameters of ``section``; return the executed copy's path."""
    import papermill

    root = repo_root()
    notebook = Path(notebook) if Path(notebook).is_absolute() else root / notebook
    out = Path(out_dir) if Path(out_dir).is_absolute() else root / out_dir
    out.mkdir(parents=True, exist_ok=True)
    parameters = stage_parameters(section, params_file, profile)
    parameters["out_dir"] = str(out.relative_to(root)) if out.is_relative_to(root) else str(out)
    parameters.update(extra or {})
    final = out / notebook.name
    tmp = out / f".{notebook.stem}.running.ipynb"
    # The kernel inherits this environment; a non-inline backend there (MPLBACKEND=Agg, common in
    # headless shells) would leave the executed copy without a single figure. The kernel's default
    # (inline) backend embeds them; figures saved to files are unaffected.
    backend = os.environ.pop("MPLBACKEND", None)
    if backend is not None and "inline" not in backend:
        print(
            f"note: ignoring MPLBACKEND={backend} so that the executed notebook shows its figures",
            file=sys.stderr,
        )
    try:
        papermill.execute_notebook(
            str(notebook),
            str(tmp),
            parameters=parameters,
            cwd=str(root),
            kernel_name="python3",
            progress_bar=False,
        )
    except BaseException:
        failed = root / "scratch" / "failed" / notebook.name
        failed.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.move(tmp, failed)
            print(f"notebook failed; the partly executed copy is at {failed}", file=sys.stderr)
        raise
    finally:
        if backend is not None:
            os.environ["MPLBACKEND"] = backend
    os.replace(tmp, final)
    return final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebook")
    parser.add_argument("--section", required=True, help="top-level key of params.yaml")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--profile", choices=PROFILES, default=None)
    args = parser.parse_args(argv)
    path = run_notebook(args.notebook, args.section, args.out_dir, args.params, args.profile)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
