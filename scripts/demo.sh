#!/usr/bin/env bash
# The demo, end to end on CPU: make the demo data, train the demo detector on its boxes, store
# that (frozen) detector's feature of every box once, pretrain on those features with DeepSpeed
# (no CNN per step; tracked in the local MLflow store), then probe the model: accuracy at filling
# in masked colour words with the image and with it blanked.
# Extra arguments are config overrides for the training run, e.g. `--set optim.lr=3e-4`.
set -euo pipefail
source "$(dirname "$0")/env.sh"
# One compute thread per process, on any machine: the figures the README shows are those of one
# thread (floating-point sums, hence the run, differ with the thread count), and on a busy
# machine two threads that wait for each other are many times slower than one.
export OMP_NUM_THREADS=1
OUT="${VLBERT_DEMO_OUT:-runs/demo}"
start=$SECONDS
if [ -d "$OUT" ]; then
  # A new demo run starts from scratch (the MLflow store keeps the earlier runs).
  echo "[vlbert] removing the previous demo output $OUT"
  rm -rf "$OUT"
fi
vlbert-make-demo-data --out demo_data --size 64
vlbert-pretrain-demo-detector --config configs/demo.yaml --out demo_data/detector.pth
# Features made by an earlier detector would be kept (a finished shard is skipped): start afresh.
rm -rf demo_data/features
vlbert-extract-regions --config configs/demo.yaml --given-boxes --device cpu --batch-size 64 --input 'demo_data/captions/*.tar' --out demo_data/features
vlbert-train --config configs/demo_features.yaml --set runtime.output_dir="$OUT" "$@"
vlbert-probe-colours --config configs/demo_features.yaml --set runtime.output_dir="$OUT" "$@"
echo "[vlbert] demo finished in $(( SECONDS - start )) s; runs: mlflow ui --backend-store-uri sqlite:///mlflow.db (docs/demo.md)"
