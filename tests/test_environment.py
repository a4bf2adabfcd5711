"""The pinned environment is consistent: lock, environment.yml and pyproject agree."""

import re
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from sync_environment import normalise, read_lock  # noqa: E402


def conda_pins() -> tuple[str, dict[str, str]]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    python = None
    pip_section: list[str] = []
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            pip_section = dep["pip"]
        elif dep.startswith("python="):
            python = dep.split("=", 1)[1]
    pins = {}
    for line in pip_section:
        if line.startswith("-e"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", line)
        assert m, f"environment.yml pip entry not pinned exactly: {line!r}"
        pins[normalise(m.group(1))] = m.group(2)
    return python, pins


def test_environment_yml_agrees_with_lock():
    lock = read_lock()
    python, conda = conda_pins()
    assert python == "3.11"
    missing = sorted(set(lock) - set(conda))
    extra = sorted(set(conda) - set(lock))
    differ = sorted(
        f"{n}: lock {lock[n]} vs environment.yml {conda[n]}"
        for n in set(lock) & set(conda)
        if lock[n] != conda[n]
    )
    assert not (missing or extra or differ), (
        f"environment.yml disagrees with requirements.lock (run tools/sync_environment.py): "
        f"missing={missing} extra={extra} differ={differ}"
    )


def test_torch_is_pinned_to_the_cpu_build():
    assert read_lock()["torch"] == "2.13.0"


@pytest.mark.parametrize("group", ["dependencies", "dev"])
def test_pyproject_ranges_admit_the_locked_versions(group):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] if group == "dependencies" else project["optional-dependencies"]["dev"]
    lock = read_lock()
    for spec in reqs:
        req = Requirement(spec)
        name = normalise(req.name)
        assert name in lock, f"{req.name} is a {group} of pfclib but not in requirements.lock"
        assert req.specifier.contains(lock[name], prereleases=True), (
            f"locked {req.name}=={lock[name]} is outside pyproject's range {req.specifier}"
        )


def test_pyproject_keeps_ranges_not_pins():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = [d for d in deps if "==" in d]
    assert not pinned, f"pyproject dependencies must be ranges so GPU users can bring their torch: {pinned}"
