#!/usr/bin/env bash
# Install (first run) and run the whole pipeline - extract -> train -> discover -> report - on the
# offline default (tiny-random MusicGen, bundled prompts) into data/demo/. Arguments go to
# python -m launch.pipeline (see --help), e.g. --model facebook/musicgen-small for a real run.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/install.sh
exec .venv/bin/python -m launch.pipeline "$@"
