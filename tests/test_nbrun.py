import pytest
import yaml

from pfcrepro.nbrun import stage_parameters
from pfcrepro.paths import repo_root


def write(tmp_path, obj):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(obj))
    return path


def test_profile_selects_the_block_and_common_is_merged(tmp_path, monkeypatch):
    monkeypatch.delenv("PFCLIB_PROFILE", raising=False)
    p = write(
        tmp_path, {"profile": "cpu", "s": {"common": {"a": 1, "b": 2}, "cpu": {"b": 3}, "gpu": {"b": 4}}}
    )
    assert stage_parameters("s", p) == {"a": 1, "b": 3, "profile": "cpu"}
    assert stage_parameters("s", p, profile="gpu")["b"] == 4
    monkeypatch.setenv("PFCLIB_PROFILE", "gpu")
    assert stage_parameters("s", p)["b"] == 4


def test_bad_profile_and_section_are_named(tmp_path, monkeypatch):
    monkeypatch.delenv("PFCLIB_PROFILE", raising=False)
    p = write(tmp_path, {"profile": "tpu", "s": {"cpu": {}, "gpu": {}}})
    with pytest.raises(ValueError, match="profile must be one of .* got 'tpu'"):
        stage_parameters("s", p)
    p = write(tmp_path, {"profile": "cpu", "s": {"gpu": {}}})
    with pytest.raises(KeyError, match="section 'other' not found"):
        stage_parameters("other", p)
    with pytest.raises(KeyError, match="has no 'cpu' profile"):
        stage_parameters("s", p)


def test_repository_params_have_both_profiles_for_every_stage():
    params = yaml.safe_load((repo_root() / "params.yaml").read_text())
    assert params["profile"] == "cpu", "the committed default profile must be the CPU one"
    for name, block in params.items():
        if name in ("profile", "gpu_quick") or name.startswith("_"):
            continue  # gpu_quick is no stage: it updates gpu blocks (pfcrepro.gpu_profile)
        assert {"cpu", "gpu"} <= set(block), f"params.yaml section {name!r} needs cpu and gpu profiles"


def test_executed_notebook_keeps_its_figures_under_a_headless_backend(tmp_path, monkeypatch):
    """MPLBACKEND=Agg in the caller's environment must not strip the figures from the executed copy."""
    import json

    import nbformat

    from pfcrepro.nbrun import run_notebook

    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell('out_dir = "scratch/x"', metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("import matplotlib.pyplot as plt\nplt.plot([0, 1], [1, 0])\nplt.show()"),
    ]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    source = tmp_path / "figure.ipynb"
    nbformat.write(nb, source)
    params = write(tmp_path, {"profile": "cpu", "s": {"cpu": {}, "gpu": {}}})
    monkeypatch.setenv("MPLBACKEND", "Agg")
    executed = run_notebook(source, "s", tmp_path / "out", params_file=params, profile="cpu")
    outputs = json.loads(executed.read_text())["cells"][-1]["outputs"]
    assert any("image/png" in o.get("data", {}) for o in outputs), outputs
    assert __import__("os").environ["MPLBACKEND"] == "Agg"  # the caller's environment is restored


def test_the_notebook_kernel_is_used_and_a_missing_one_is_explained(tmp_path):
    import json

    from pfcrepro.nbrun import notebook_kernel

    source = json.loads((repo_root() / "notebooks" / "00_synthetic_data.ipynb").read_text())
    assert notebook_kernel(repo_root() / "notebooks" / "00_synthetic_data.ipynb") == "pfclib"
    source["metadata"]["kernelspec"] = {
        "name": "no-such-kernel-xyz",
        "display_name": "x",
        "language": "python",
    }
    (tmp_path / "a.ipynb").write_text(json.dumps(source))
    with pytest.raises(RuntimeError, match=r"'no-such-kernel-xyz'.*ipykernel install --sys-prefix"):
        notebook_kernel(tmp_path / "a.ipynb")
    del source["metadata"]["kernelspec"]
    (tmp_path / "b.ipynb").write_text(json.dumps(source))
    with pytest.raises(ValueError, match="names no kernel"):
        notebook_kernel(tmp_path / "b.ipynb")
