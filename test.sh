#!/usr/bin/env bash
# Install (first run) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/install.sh
if [ "${CI:-}" = "true" ] && ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  # The report's browser test needs Chromium; on CI install it (elsewhere that test skips and says how).
  echo "installing chromium for the report's browser test"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) \
    > /tmp/sae-music-jax-apt.log 2>&1 || echo "could not install chromium (see /tmp/sae-music-jax-apt.log); its test will skip"
fi
exec .venv/bin/python -m pytest -q "$@"
