#!/usr/bin/env bash
# Install the package with its test extras into .venv and run the test suite.
# torch==2.13.0 goes in first: its CPU wheel is on our machines' disk; an unpinned torch pulls CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
# Lint and format are checked with the settings in pyproject.toml, as pre-commit would.
ruff check src tests benchmarks
ruff format --check src tests benchmarks
set +e
HF_HUB_OFFLINE=1 python -m pytest -q "$@"
status=$?
set -e
# pytest exits 5 when it collected no tests: that is a failure here, never a pass.
if [ "$status" -eq 5 ]; then echo "no tests were collected" >&2; exit 1; fi
exit "$status"
