#!/usr/bin/env bash
# Re-resolve the pinned set after changing dependencies, then rewrite environment.yml to match.
# Usage: tools/lock.sh   (from the repository root; uses a throw-away venv)
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
# torch pinned in the same step so pip never resolves a CUDA build.
"$tmp/venv/bin/pip" install --quiet "torch==2.13.0" -e ".[dev]"
{
  echo "# Exact versions installed by \`make\` (CPU). Regenerate with: tools/lock.sh"
  echo "# torch is pinned to the CPU build; GPU users see README 'GPU'."
  "$tmp/venv/bin/pip" freeze --exclude-editable | grep -v '^-e ' | sed -E 's/^torch==([0-9.]+)\+cpu$/torch==\1/'
} > requirements.lock
python3 tools/sync_environment.py
echo "requirements.lock and environment.yml updated"
