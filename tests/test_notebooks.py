"""Every notebook follows the repository's conventions (README, 'Notebooks'), and every one is a DVC stage.

These are structural checks; nbval (``pytest --nbval-lax notebooks``) executes the notebooks themselves.
"""

import ast
import json
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
        if rel in stage.get("cmd", "") and "pfclib.nbrun" in stage.get("cmd", ""):
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
    assert stage is not None, f"{path.name} has no DVC stage running it through pfclib.nbrun"
    deps = stage.get("deps", [])
    assert f"notebooks/{path.name}" in deps and "pfclib" in deps, (
        f"stage {name}: deps must list the notebook and pfclib"
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
