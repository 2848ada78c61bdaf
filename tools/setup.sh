#!/usr/bin/env bash
# Creates .venv (if missing) and installs speechformer into it, with the extras named on the
# command line (default: test, what the tests need).
#
#   bash tools/setup.sh           # the package and its test extra (the test command in README.md)
#   bash tools/setup.sh synth     # the package and the speech synthesiser only (the default recipe:
#                                 # skips the Whisper reference engines the tests compare against)
#
# Idempotent: a second run with the same extras only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
extras=$(IFS=,; echo "${*:-test}")
if [[ ! -x .venv/bin/python ]]; then
  "$python" -m venv .venv
fi
stamp=".venv/.speechformer-installed-${extras//,/-}"
if [[ ! -f $stamp || pyproject.toml -nt $stamp || tools/constraints.txt -nt $stamp ]]; then
  # pip >= 21.3 installs this project editable (PEP 660); upgrading an already new enough pip
  # only costs time (about 30 s of index queries on a fresh machine)
  if ! .venv/bin/python -c 'import sys, pip; sys.exit(tuple(map(int, pip.__version__.split(".")[:2])) < (21, 3))'; then
    .venv/bin/python -m pip install --quiet --upgrade pip
  fi
  .venv/bin/python -m pip install --quiet -c tools/constraints.txt -e ".[$extras]"
  touch "$stamp"
fi
