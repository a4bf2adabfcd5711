"""Every notebook follows the repository's conventions (README, 'Notebooks'), and every one is a DVC stage.

These are structural checks; nbval (``pytest --nbval-lax notebooks``) executes the notebooks themselves.
They also hold the layering: ``pfclib`` (the library) never imports ``pfcrepro`` (the reproduction
harness), neither imports ``benchmarks/``, and every DVC stage depends on the modules its code imports.
"""

import ast
import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text()) or {}
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def code_cells(nb):
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def parameters_of(nb) -> dict:
    cells = [c for c in code_cells(nb) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"expected exactly one cell tagged 'parameters', found {len(cells)}"
    tree = ast.parse("".join(cells[0]["source"]))
    values = {}
    for node in tree.body:
        assert isinstance(node, ast.Assign), "the parameters cell holds only assignments"
        values[node.targets[0].id] = ast.literal_eval(node.value)
    return values


def stage_for(nb_path: Path):
    rel = f"notebooks/{nb_path.name}"
    for name, stage in (DVC.get("stages") or {}).items():
        if rel in stage.get("cmd", "") and "python -m pfcrepro.nbrun" in stage.get("cmd", ""):
            return name, stage
    return None, None


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ holds no notebook"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_source_notebook_is_committed_clean(path):
    nb = json.loads(path.read_text())
    dirty = [i for i, c in enumerate(code_cells(nb)) if c.get("outputs") or c.get("execution_count")]
    assert not dirty, (
        f"{path.name}: code cells {dirty} carry outputs; strip them (executed copies go to results/)"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_parameters_defaults_are_tiny_and_write_to_scratch(path):
    params = parameters_of(json.loads(path.read_text()))
    assert str(params.get("out_dir", "")).startswith("scratch/"), (
        f"{path.name}: default out_dir must be under the git-ignored scratch/ folder, got {params.get('out_dir')!r}"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_last_cell_checks_the_metrics_file(path):
    last = "".join(code_cells(json.loads(path.read_text()))[-1]["source"])
    assert "check_metrics(" in last, (
        f"{path.name}: the last code cell must assert its metrics with check_metrics"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_a_dvc_stage_reading_params_yaml(path):
    name, stage = stage_for(path)
    assert stage is not None, f"{path.name} has no DVC stage running it through python -m pfcrepro.nbrun"
    deps = stage.get("deps", [])
    assert {f"notebooks/{path.name}", "pfcrepro/nbrun.py", "pfcrepro/report.py"} <= set(deps), (
        f"stage {name}: deps must list the notebook, pfcrepro/nbrun.py and pfcrepro/report.py"
    )
    assert not {"pfclib", "pfcrepro"} & set(deps), (
        f"stage {name}: list the modules the notebook uses, not a whole package (a docstring edit elsewhere "
        "would invalidate the stage)"
    )
    section = stage["cmd"].split("--section", 1)[1].split()[0]
    assert set(stage.get("params", [])) >= {"profile", section}, (
        f"stage {name} must declare params profile and {section}"
    )
    out_dir = stage["cmd"].split("--out-dir", 1)[1].split()[0]
    outs = [next(iter(o)) if isinstance(o, dict) else o for o in stage.get("outs", [])]
    assert f"{out_dir}/{path.name}" in outs, f"stage {name}: the executed notebook must be a DVC output"
    metrics = [next(iter(m)) if isinstance(m, dict) else m for m in stage.get("metrics", [])]
    assert f"{out_dir}/metrics.json" in metrics, f"stage {name}: {out_dir}/metrics.json must be a DVC metric"
    assert f"notebooks/{path.name}" not in outs, "a notebook must not be both a dependency and an output"
    # every parameter the stage passes must exist in the notebook's parameters cell (papermill would ignore typos)
    nb_params = parameters_of(json.loads(path.read_text()))
    for profile in ("cpu", "gpu"):
        block = {**PARAMS[section].get("common", {}), **PARAMS[section][profile]}
        unknown = sorted(set(block) - set(nb_params))
        assert not unknown, (
            f"params.yaml {section}.{profile} sets {unknown}, which {path.name} does not declare"
        )


def test_notebooks_name_the_pfclib_kernel_that_make_registers():
    """Every notebook runs in the kernel ``pfclib``, which the Makefile's install step registers inside
    .venv (``--sys-prefix``): papermill and nbval start the kernel the metadata names, so on a fresh
    clone they, and JupyterLab, use the venv's Python, not whatever ``python3`` kernel is around."""
    specs = {p.name: json.loads(p.read_text()).get("metadata", {}).get("kernelspec") or {} for p in NOTEBOOKS}
    wrong = {name: spec for name, spec in specs.items() if spec.get("name") != "pfclib"}
    assert not wrong, f"notebooks whose kernelspec is not 'pfclib': {wrong}"
    recipe = re.search(r"^\$\(STAMP\):.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert recipe, "the Makefile has no $(STAMP) (install) recipe"
    installs = [line for line in recipe.group(1).splitlines() if "-m ipykernel install" in line]
    assert len(installs) == 1, "the Makefile's install recipe must register the kernel with ipykernel install"
    line = installs[0]
    assert (
        "$(BIN)/python" in line and "--sys-prefix" in line and re.search(r"--name[ =]pfclib(\s|$)", line)
    ), f"the kernel must be registered from the venv's python, inside the venv, as 'pfclib': {line.strip()}"
    shown = re.search(r'--display-name[ =]"([^"]+)"', line)
    displays = {spec.get("display_name") for spec in specs.values()}
    assert shown and displays == {shown.group(1)}, (
        f"notebooks show {displays}, the Makefile registers {shown.group(1) if shown else None!r}"
    )


# ------------------------------------------------------------------------------ imports and DVC deps
PACKAGES = ("pfclib", "pfcrepro")


def module_file(module: str) -> Path | None:
    """The source file of a pfclib / pfcrepro module (its ``__init__.py`` for a package), or None."""
    base = ROOT.joinpath(*module.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return base.with_suffix(".py") if base.with_suffix(".py").is_file() else None


def imported_modules(tree: ast.AST, top_level_only: bool) -> set[str]:
    """pfclib / pfcrepro modules a parsed source imports (``from a import b`` counts ``a.b`` if a module)."""
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {m for m in found if m.split(".")[0] in PACKAGES and module_file(m)}


def import_closure(modules, top_level_only: bool = True) -> set[str]:
    """Repository-relative files of ``modules``, their parent packages and everything they import,
    transitively (module-level imports only, unless ``top_level_only`` is False)."""
    seen, todo = set(), list(modules)
    while todo:
        parts = todo.pop().split(".")
        for i in range(1, len(parts) + 1):
            module = ".".join(parts[:i])
            if module in seen or module_file(module) is None:
                continue
            seen.add(module)
            todo += imported_modules(ast.parse(module_file(module).read_text()), top_level_only)
    return {module_file(m).relative_to(ROOT).as_posix() for m in seen}


def notebook_tree(path: Path) -> ast.Module:
    return ast.parse("\n".join("".join(c["source"]) for c in code_cells(json.loads(path.read_text()))))


def uncovered(files, deps) -> list[str]:
    return sorted(f for f in files if not any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_stage_deps_cover_every_module_the_notebook_imports(path):
    name, stage = stage_for(path)
    tree = notebook_tree(path)
    required = import_closure({"pfcrepro.nbrun", *imported_modules(tree, top_level_only=False)})
    source = ast.unparse(tree)
    if "run_trials(" in source:
        # a notebook that trains runs the trainer, which imports its parts inside functions
        required |= import_closure({"pfclib.train"}, top_level_only=False)
    if "run_trials(" in source or "run_design(" in source:
        required |= import_closure({"pfcrepro.workers"})  # both runners hand their runs to it
    missing = uncovered(required, stage["deps"])
    assert not missing, f"stage {name} imports {missing} but does not list them in deps"
    stale = [d for d in stage["deps"] if d.split("/")[0] in PACKAGES and not (ROOT / d).exists()]
    assert not stale, f"stage {name} lists deps that do not exist: {stale}"


def test_script_stage_deps_cover_their_imports():
    stages = DVC["stages"]
    scripts = {
        "benchmark_head": ROOT / "benchmarks" / "head.py",
        "results_page": ROOT / "pfcrepro" / "results_page.py",
        "data": ROOT / "pfclib" / "data" / "synthetic.py",
    }
    for name, script in scripts.items():
        deps = (stages[name].get("do") or stages[name])["deps"]
        required = import_closure(imported_modules(ast.parse(script.read_text()), top_level_only=False))
        if (
            name == "benchmark_head"
        ):  # each point runs pfcrepro.headbench.measure, which imports the head lazily
            required |= import_closure({"pfcrepro.headbench"}, top_level_only=False)
        missing = uncovered(required | {script.relative_to(ROOT).as_posix()}, deps)
        assert not missing, f"stage {name} imports {missing} but does not list them in deps"


def python_sources(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def imports_or_names(path: Path, package: str) -> list[str]:
    """Imports of ``package`` in ``path``, and string constants naming it for a dynamic import
    (``"package.module:function"``, ``importlib.import_module("package...")``)."""
    tree = ast.parse(path.read_text())
    hits = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names = re.findall(rf"^{package}(?:\.\w+)*(?=:|$)", node.value)
        hits += [f"{path.relative_to(ROOT)}:{node.lineno}: {n}" for n in names if n.split(".")[0] == package]
    return hits


def test_the_library_never_imports_the_harness():
    assert python_sources("pfclib") and python_sources("pfcrepro")
    hits = [h for p in python_sources("pfclib") for h in imports_or_names(p, "pfcrepro")]
    assert not hits, f"pfclib must not depend on pfcrepro (the reproduction harness): {hits}"


def test_neither_package_imports_the_benchmark_scripts():
    hits = [
        h for folder in PACKAGES for p in python_sources(folder) for h in imports_or_names(p, "benchmarks")
    ]
    assert not hits, f"benchmarks/ imports pfcrepro, never the reverse: {hits}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_defines_no_function(path):
    defined = [
        node.name if hasattr(node, "name") else "lambda"
        for node in ast.walk(notebook_tree(path))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
    ]
    assert not defined, f"{path.name} defines {defined}: logic belongs in pfcrepro (or pfclib), not in a cell"


# ------------------------------------------------------------------ the profile's designs, at tiny sizes
# nbval runs each notebook with its own tiny defaults; these run it with the cpu profile's design
# (comparisons, arms, cells, the verdict and headline code that `dvc repro` runs) shrunk to seconds,
# so a design the tiny defaults do not have (an instrument that skips some comparisons, say) is
# exercised before an hour-long pipeline meets it.
SIZE_KEYS = ("num_identities", "samples_per_class", "heldout_identities", "heldout_samples", "num_pairs",
             "max_samples")  # fmt: skip
DESIGN_SECTIONS = ["noise_robustness", "long_tail", "sample_rate", "quality", "unicom", "margins"]


def tiny_design(section: str, tmp: Path) -> tuple[Path, dict]:
    """The notebook of ``section`` and overrides that keep its cpu design but take every size
    (worlds, steps, seeds, data sets) from the notebook's tiny defaults."""
    from pfcrepro.gpu_profile import notebook_stages
    from pfcrepro.nbrun import stage_parameters

    nb_path = ROOT / notebook_stages()[section][0]
    tiny = parameters_of(json.loads(nb_path.read_text()))
    cpu = stage_parameters(section, ROOT / "params.yaml", "cpu")
    small = {}

    def sizes(world: dict) -> dict:
        return {k: v for k, v in world.items() if k in SIZE_KEYS}

    if "feature_worlds" in cpu:  # every world at the sizes of the notebook's first tiny world
        tiny_sizes = sizes(next(iter(tiny["feature_worlds"].values())))
        small["feature_worlds"] = {name: {**w, **tiny_sizes} for name, w in cpu["feature_worlds"].items()}
    if "feature_world" in cpu:
        small["feature_world"] = {**cpu["feature_world"], **sizes(tiny["feature_world"])}
    for key in ("feature_train", "train"):
        if key in cpu:
            small[key] = {**cpu[key], **tiny[key]}
    for key in ("feature_seeds", "seeds", "data_dir", "generate", "runs_dir", "truncate"):
        if key in cpu and key in tiny:
            small[key] = tiny[key]
    for key in ("data_dir", "runs_dir"):
        if key in small:
            small[key] = str(tmp / key)
    return nb_path, small


@pytest.mark.parametrize("section", DESIGN_SECTIONS)
def test_notebook_runs_its_cpu_design_at_tiny_sizes(section, tmp_path):
    from pfcrepro.nbrun import run_notebook

    nb_path, small = tiny_design(section, tmp_path)
    assert small, f"{section}: nothing to shrink; is it a training notebook?"
    run_notebook(nb_path, section, tmp_path / "out", ROOT / "params.yaml", profile="cpu", extra=small)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["profile"] == "cpu" and metrics["headline"], (
        f"{section}: the cpu design gave no headline row"
    )
