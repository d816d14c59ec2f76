#!/usr/bin/env bash
# Install (first run) and run the pipeline end to end on the offline default: the tiny-random
# MusicGen and the bundled prompts -> activation store -> BatchTopK SAE -> features. Outputs go under
# data/demo/ (override with DEMO_OUT). Both stages resume or skip finished work when rerun.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/install.sh
out="${DEMO_OUT:-data/demo}"
py=.venv/bin/python
$py -m extractor.extract --model tiny-random --layers 2 --prompt_file bundled \
  --duration 4 --batch_size 8 --out "$out/activations"
$py -m jax_sae.train --store "$out/activations" --layer_idx 2 --sae_type batch_topk \
  --hidden_dim 512 --top_k 16 --batch_size 256 --epochs 10 --lr 1e-3 --out "$out/models"
$py -m discovery.discover --sae_path "$out/models/batch_topk/layer2/dim512/best" --store "$out/activations" \
  --output "$out/results/features_layer2.json" --no_filter --max_features 20
echo "done: store in $out/activations, SAE in $out/models/batch_topk/layer2/dim512/, features in $out/results/"
