"""Execute a notebook with papermill, its parameters taken from one section of ``params.yaml``.

The one job of this module is the command every notebook's DVC stage runs::

    python -m pfcrepro.nbrun notebooks/01_memory_scaling.ipynb --section memory_scaling \
        --out-dir results/01_memory_scaling

``params.yaml`` holds a top-level ``profile`` (``cpu`` by default, ``gpu`` for paper-like scales)
and, per stage, one mapping per profile. The chosen mapping plus ``out_dir`` become the notebook's
parameters (they override the tiny defaults of its ``parameters`` cell). The executed copy is
written to ``<out-dir>/<notebook name>`` through a temporary name, so a failed run never leaves
a half-executed notebook where DVC expects its output.

The notebook runs in the kernel its metadata names (``pfclib``, which ``make`` registers inside
``.venv``), as nbval and JupyterLab run it; a kernel that is not installed is an error naming the
command that installs it.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

from pfcrepro.paths import repo_root

PROFILES = ("cpu", "gpu")
RUNNER_PARAMETERS = ("out_dir", "profile")  # set by the runner for every notebook
_NOT_LITERAL = object()  # a parameters-cell default that is an expression, not a literal


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


def notebook_kernel(notebook: str | os.PathLike) -> str:
    """The kernel named in the notebook's ``metadata.kernelspec``, checked to be installed.

    Raises ``ValueError`` when the notebook names no kernel and ``RuntimeError`` when the named one
    is not installed (the message gives the command that registers it). A kernel that starts another
    Python than this one is allowed, with a note on stderr.
    """
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    path = Path(notebook)
    metadata = json.loads(path.read_text(encoding="utf-8")).get("metadata", {})
    name = (metadata.get("kernelspec") or {}).get("name")
    if not name:
        raise ValueError(f"{path}: metadata.kernelspec names no kernel")
    try:
        spec = KernelSpecManager().get_kernel_spec(name)
    except NoSuchKernel:
        raise RuntimeError(
            f"{path.name} runs in the Jupyter kernel {name!r}, which is not installed for {sys.executable}; "
            f"register it in this environment with: {sys.executable} -m ipykernel install --sys-prefix "
            f'--name {name} --display-name "{name} (.venv)"   (make does this for .venv)'
        ) from None
    argv0 = spec.argv[0] if spec.argv else ""
    if os.path.isabs(argv0) and os.path.abspath(argv0) != os.path.abspath(sys.executable):
        print(f"note: kernel {name!r} runs {argv0}, not this Python ({sys.executable})", file=sys.stderr)
    return name


def notebook_parameters(notebook: str | os.PathLike) -> dict[str, Any] | None:
    """The names the notebook's cell tagged ``parameters`` assigns, with their default values (a
    default that is not a Python literal maps to an opaque marker); None when it has no such cell."""
    path = Path(notebook)
    if not path.is_file():
        raise FileNotFoundError(f"notebook {str(path)!r} does not exist")
    for cell in json.loads(path.read_text(encoding="utf-8")).get("cells", []):
        if cell.get("cell_type") != "code" or "parameters" not in cell.get("metadata", {}).get("tags", []):
            continue
        source = cell.get("source", "")
        source = source if isinstance(source, str) else "".join(source)
        declared: dict[str, Any] = {}
        for node in ast.parse(source).body:
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, ast.AnnAssign) and node.value is not None:
                targets = [node.target]
            else:
                continue
            try:
                default = ast.literal_eval(node.value)
            except (ValueError, TypeError, SyntaxError, RecursionError):
                default = _NOT_LITERAL
            for target in targets:
                if isinstance(target, ast.Name):
                    declared[target.id] = default
        return declared
    return None


def _expected_kind(default: Any) -> tuple[tuple[type, ...], str] | None:
    """The types a parameter with this default accepts (an int where a float is expected, a list
    where a tuple is) and their name; None when anything goes (None or a non-literal default)."""
    if default is None or default is _NOT_LITERAL:
        return None
    if isinstance(default, bool):
        return (bool,), "bool"
    if isinstance(default, int):
        return (int,), "int"
    if isinstance(default, float):
        return (int, float), "float"
    if isinstance(default, list | tuple):
        return (list, tuple), "list"
    return (type(default),), type(default).__name__


def check_parameters(
    notebook: str | os.PathLike, parameters: dict[str, Any], where: str = "parameters"
) -> None:
    """Raise unless every parameter is declared in the notebook's ``parameters`` cell (``out_dir``
    and ``profile`` are always allowed) and has the type of its default there.

    A misspelt name would otherwise be injected by papermill beside the real one, which silently
    keeps its tiny default. ``ValueError`` names the unknown parameters, the closest declared names
    and all declared ones; ``TypeError`` names the parameter, its value and the expected type (a YAML
    number without a dot, ``1e-3``, is read as text: the message says so). A notebook without a
    ``parameters`` cell is not checked."""
    path = Path(notebook)
    declared = notebook_parameters(path)
    if declared is None:
        return
    unknown = sorted(set(parameters) - set(declared) - set(RUNNER_PARAMETERS))
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, list(declared), n=1)
            if close:
                hints.append(f"{name!r} -> {close[0]!r}?")
        hint = f" (did you mean: {', '.join(hints)})" if hints else ""
        raise ValueError(
            f"{where}: unknown parameter(s) {unknown} for {path.name}{hint}; its parameters cell "
            f"declares {sorted(declared)}"
        )
    for name, value in parameters.items():
        kind = _expected_kind(declared.get(name))
        if kind is None or name in RUNNER_PARAMETERS:
            continue
        types, expected = kind
        if isinstance(value, types) and not (isinstance(value, bool) and bool not in types):
            continue
        hint = ""
        if isinstance(value, str) and expected in ("int", "float"):
            try:
                float(value)
                hint = f" (YAML reads {value} as text: write a float with a dot, e.g. {float(value):.1e})"
            except ValueError:
                pass
        if isinstance(value, bool) and expected == "str":
            hint = " (YAML reads unquoted off/on/yes/no as booleans: quote the word)"
        raise TypeError(
            f"{where}: parameter {name!r} of {path.name} must be {expected} like its default "
            f"{declared[name]!r}, got {type(value).__name__}: {value!r}{hint}"
        )


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
    parameters = stage_parameters(section, params_file, profile)
    parameters["out_dir"] = str(out.relative_to(root)) if out.is_relative_to(root) else str(out)
    parameters.update(extra or {})
    check_parameters(notebook, parameters, f"{params_file} section {section!r} ({parameters['profile']})")
    kernel = notebook_kernel(notebook)
    out.mkdir(parents=True, exist_ok=True)
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
            kernel_name=kernel,
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
