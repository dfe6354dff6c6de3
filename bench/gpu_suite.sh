#!/usr/bin/env bash
# Everything measured on the lent GPU, in one call (see docs/PERFORMANCE.md).
# Expects: .whl/ (av, facenet-pytorch, diffrp-nvdiffrast, trimesh wheels for the device's Python)
# and .carry/shared/ (testdata/video + bfm_index, a copy of ../shared that travels with the call).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD STUDIO_SHARED=$PWD/.carry/shared PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, numpy, av; print('torch', torch.__version__, 'numpy', numpy.__version__, 'av', av.__version__)"
date -u
for step in ${STEPS:-equal throughput memory render}; do
  echo "=== $step"
  case $step in
    equal) python3 bench/bench_gpu_equal.py ;;
    throughput) python3 bench/bench_throughput.py --device cuda --frames 600 --batch-size 64 ;;
    memory) python3 bench/bench_memory.py --device cuda --frames 600 2400 --batch-size 64 ;;
    render) python3 bench/gpu_render_compare.py --index .carry/shared/bfm_index --out "$OUT" ;;
  esac 2>&1 | tee "$OUT/$step.log"
done
