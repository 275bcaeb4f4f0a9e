#!/usr/bin/env bash
# The benchmarks' GPU rows in one go (docs/benchmarks.md, "GPU"), for a machine with a
# CUDA GPU: run from the repository root. PYTHON picks the interpreter (default: the venv's).
# Each step runs even if one before it failed; the exit status counts the failures.
set -u
python=${PYTHON:-.venv/bin/python}
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
failed=0
step() { echo; echo "### $*"; "$@" || { echo "### FAILED ($?): $*"; failed=$((failed + 1)); }; }

step nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
# the extractor against the bare forward: the CLAM/TRIDENT baseline, a small CNN, a ViT
for workers in 4 8; do
  step "$python" bench/bench_features.py --device cuda --backbone resnet50_layer3 \
    --min-tiles 8192 --batch-size 256 --workers "$workers" --prefetch 8
done
step "$python" bench/bench_features.py --device cuda --backbone resnet18 \
  --min-tiles 8192 --batch-size 256 --workers 8 --prefetch 8
step "$python" bench/bench_features.py --device cuda --backbone timm:vit_base_patch16_224 \
  --min-tiles 4096 --batch-size 256 --workers 4 --prefetch 8
# where the extractor's time goes (reader, copy, conversion, forward)
for backbone in resnet50_layer3 resnet18; do
  step "$python" bench/bench_features_breakdown.py --backbone "$backbone" --tiles 8192
done
step "$python" bench/bench_attacks.py --device cuda --batch-size 256 --image-size 128
step "$python" bench/bench_training.py --device cuda --batch-size 128 --image-size 224 \
  --channels 3
# the tests that only run where there is a GPU
step "$python" -m pytest -q -o addopts= -p no:cacheprovider -k "gpu or cuda" \
  tests/test_features.py tests/test_attacks.py tests/test_perturbations.py
echo; echo "### $failed step(s) failed"
exit "$failed"
