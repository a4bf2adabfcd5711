"""Write environment.yml (for conda users) from requirements.lock, so the two always agree.

tests/test_environment.py fails when they disagree; run `python tools/sync_environment.py` to fix.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = "3.11"


def read_lock(path: Path = ROOT / "requirements.lock") -> dict[str, str]:
    """Return {normalised name: version} for every `name==version` line of the lock."""
    pins: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        if m is None:
            raise ValueError(f"{path}: expected 'name==version', got {raw!r}")
        pins[normalise(m.group(1))] = m.group(2)
    return pins


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def render(pins: dict[str, str]) -> str:
    lines = [
        "# Generated from requirements.lock by tools/sync_environment.py: do not edit by hand.",
        "# conda env create -f environment.yml && conda activate pfclib",
        "name: pfclib",
        "channels:",
        "  - conda-forge",
        "dependencies:",
        f"  - python={PYTHON}",
        "  - pip",
        "  - pip:",
    ]
    lines += [f"      - {name}=={version}" for name, version in sorted(pins.items())]
    lines.append("      - -e .")
    return "\n".join(lines) + "\n"


def main() -> int:
    (ROOT / "environment.yml").write_text(render(read_lock()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
