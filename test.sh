#!/usr/bin/env bash
# Install (first run) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/install.sh
exec .venv/bin/python -m pytest -q "$@"
