#!/usr/bin/env bash
# Creates .venv (if missing) and installs speechformer with its test extra into it.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$python" -m venv .venv
fi
stamp=.venv/.speechformer-installed
if [[ ! -f $stamp || pyproject.toml -nt $stamp || tools/constraints.txt -nt $stamp ]]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -c tools/constraints.txt -e ".[test]"
  touch "$stamp"
fi
