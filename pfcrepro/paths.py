"""Repository-relative paths for the reproduction harness, so notebooks and scripts work from any
working directory (the library itself takes paths as given: see pfclib.config.TrainConfig.resolve_paths).

nbval runs a notebook's kernel in the notebook's folder, papermill in the caller's, so every
path is resolved from the repository root: the nearest parent folder holding ``dvc.yaml``.
"""

from __future__ import annotations

import os
from pathlib import Path


def repo_root(start: str | os.PathLike | None = None) -> Path:
    """Return the repository root: the first folder, walking up from ``start`` (default: the
    current directory, then this file), that contains ``dvc.yaml``."""
    candidates = [Path(start)] if start is not None else [Path.cwd(), Path(__file__).resolve().parent]
    for base in candidates:
        base = base.resolve()
        for folder in (base, *base.parents):
            if (folder / "dvc.yaml").is_file():
                return folder
    raise FileNotFoundError(
        f"no dvc.yaml found above {[str(c) for c in candidates]}; expected to run inside the pfclib repository"
    )


def scratch_dir(name: str = "") -> Path:
    """A git-ignored folder for throw-away outputs (notebook defaults, nbval runs):
    ``<root>/scratch/<name>``."""
    path = repo_root() / "scratch" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def resolve(path: str | os.PathLike) -> Path:
    """Resolve ``path`` against the repository root unless it is already absolute."""
    p = Path(path)
    return p if p.is_absolute() else repo_root() / p
