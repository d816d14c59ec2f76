#!/usr/bin/env bash
# Install (first run) and run the pipeline end to end on the offline default: the tiny-random
# MusicGen and the bundled prompts. Outputs go under data/demo/. Pass --model/--prompt_file/...
# to override the extraction stage's flags (see python -m extractor.extract --help).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/install.sh
out="${DEMO_OUT:-data/demo}"
.venv/bin/python -m extractor.extract --model tiny-random --layers 2 --prompt_file bundled \
  --duration 4 --batch_size 8 --out "$out/activations" "$@"
