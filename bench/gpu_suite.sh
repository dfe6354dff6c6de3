#!/usr/bin/env bash
# Everything measured on the lent GPU (see docs/PERFORMANCE.md); STEPS picks steps, one call each
# when they would not fit the 10-minute call limit together.
# Expects: .whl/ (av, facenet-pytorch, diffrp-nvdiffrast, trimesh wheels for the device's Python)
# and .carry/shared/ (testdata/video + bfm_index, a copy of ../shared that travels with the call).
set -uo pipefail
# .whl-db/ (sqlmodel, SQLAlchemy, pydantic ...) only for the registry steps (dataset*): carried apart to fit 64 MiB;
# those steps need only .carry/shared/testdata of .carry (py-spy's wheel in .whl then still fits, for dataset-spy).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl $(ls .whl-db/*.whl 2>/dev/null) || exit 1
export PYTHONPATH=/tmp/site:$PWD STUDIO_SHARED=$PWD/.carry/shared PYTHONUNBUFFERED=1 PATH=/tmp/site/bin:$PATH
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, numpy, av; print('torch', torch.__version__, 'numpy', numpy.__version__, 'av', av.__version__)"
date -u
if [ "${MPS:-0}" = 1 ]; then  # CUDA MPS for the steps that run several processes on one GPU
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps CUDA_MPS_LOG_DIRECTORY=/tmp/mpslog
  mkdir -p /tmp/mps /tmp/mpslog && nvidia-cuda-mps-control -d && echo "CUDA MPS on"
  trap 'echo quit | nvidia-cuda-mps-control' EXIT
fi
fast_nvdec() {  # bench/dataset.py on the fast path with NVDEC and MTCNN, 250-frame 1080p clips; more flags follow
  python3 bench/dataset.py --device cuda --frames 250 --gen-jobs "$(nproc)" --mode fast --landmarks mtcnn \
    --decoder nvdec "$@"
}
exact_mtcnn() {  # the same on the exact path (PyAV's frames)
  python3 bench/dataset.py --device cuda --frames 250 --gen-jobs "$(nproc)" --mode exact --landmarks mtcnn "$@"
}
by_mode() {  # MODE=exact: exact_mtcnn, else fast_nvdec (dataset-ab, dataset-spy, dataset-pair)
  # THREAD_CPU=1: --thread-cpu; DECODE_THREADS=N: the workers' --decode-threads (0: FFmpeg's choice)
  local more=(${THREAD_CPU:+--thread-cpu} ${DECODE_THREADS:+--decode-threads "$DECODE_THREADS"})
  if [ "${MODE:-fast}" = exact ]; then exact_mtcnn "${more[@]}" "$@"; else fast_nvdec "${more[@]}" "$@"; fi
}
for step in ${STEPS:-equal throughput memory render}; do
  echo "=== $step"
  case $step in
    equal) python3 bench/bench_gpu_equal.py ;;
    conv-shapes) python3 bench/conv_shapes.py --device cuda ;;
    checks) python3 bench/gpu_checks.py --device cuda ;;
    checks-exact) python3 bench/gpu_checks.py --device cuda --only-exact-mtcnn ;;  # the exact path's MTCNN only
    checks-rgb) python3 bench/gpu_checks.py --device cuda --only-rgb ;;  # RGB made on the GPU (engine.yuv), exact path
    compat) python3 bench/compat_diff.py --device cuda --landmarks mtcnn --make-1080p 300 ;;
    throughput) python3 bench/throughput.py --device cuda --set clips --clips 8 --landmarks mtcnn fan \
                  --reference-inputs 4 --out "$OUT/throughput.md" ;;
    clips-fast) python3 bench/throughput.py --device cuda --set clips --mode fast --no-reference \
                  --out "$OUT/clips_fast.md" ;;
    clips-procs) python3 bench/throughput.py --device cuda --set clips --mode fast --no-reference --stage-frames 0 \
                  --processes "${PROCESSES:-4}" --concurrency 2 --out "$OUT/clips_procs.md" ;;
    clips-exact) python3 bench/throughput.py --device cuda --set clips --mode exact --landmarks mtcnn --no-reference \
                  --stage-frames 0 --processes "${PROCESSES:-4}" --concurrency 2 --out "$OUT/clips_exact.md" ;;
    dataset-gen) python3 bench/dataset.py --device cuda --clips 200 --frames 250 --gen-jobs "$(nproc)" --gen-only ;;
    long-fast) python3 bench/throughput.py --device cuda --set long --mode fast --no-reference \
                  --out "$OUT/long_fast.md" ;;
    long-split) python3 bench/throughput.py --device cuda --set long --mode fast --landmarks mtcnn fan \
                  --decoder "${DECODER:-nvdec}" --stage-frames 0 --processes "${PROCESSES:-4}" --concurrency 2 \
                  --reference-inputs 1 --reference-max-frames 600 --out "$OUT/long_split.md" ;;
    nvdec) python3 bench/throughput.py --device cuda --set clips --mode fast --decoder nvdec --reference-inputs 1 \
                  --stage-frames 0 --processes "${PROCESSES:-4}" --concurrency 2 --out "$OUT/clips_fast_nvdec.md" ;;
    dataset-nvdec) python3 bench/dataset.py --device cuda --clips 200 --frames 250 --mode fast --landmarks mtcnn \
                  --decoder nvdec --per-gpu "${PER_GPU:-4}" --out "$OUT/dataset_nvdec.md" ;;
    dataset-sync) for sync in auto blocking; do  # spin (CUDA's default here) vs sleeping waits, same clips
                    STUDIO_CUDA_SYNC=$sync python3 bench/dataset.py --device cuda --clips 200 --frames 250 --mode fast \
                      --landmarks mtcnn --decoder nvdec --per-gpu "${PER_GPU:-4}" --out "$OUT/dataset_sync_$sync.md"
                  done ;;
    dataset-per) for k in ${PERS:-1 2}; do  # workers per GPU (MPS=0 or 1; STUDIO_PIN_CORES=0: not pinned)
                    fast_nvdec --clips "${CLIPS:-100}" --per-gpu "$k" --out "$OUT/dataset_per_$k.md"
                  done ;;
    dataset-spy) by_mode --clips "${CLIPS:-100}" --per-gpu "${PER_GPU:-4}" ${SINGLE:+--single-only} ${ALL:+--all-only} \
                   --spy "$OUT/spy" ${SPY_VIEWS:+--spy-views $SPY_VIEWS} \
                   --out "$OUT/dataset_spy.md"  # py-spy of every worker, from its first job on (SPY_VIEWS="cpu": native)
                 for f in "$OUT"/spy/*.txt; do
                   echo "--- $f"; python3 bench/spy_summary.py "$f" --match=--device --top 8  # the workers, not their launcher
                 done; gzip -f "$OUT"/spy/*.txt ;;  # under the 16 MiB a file that comes back
    dataset-ab) for v in ${VARIANTS:-STUDIO_PIN_CORES=1 STUDIO_PIN_CORES=0 STUDIO_PIN_CORES=1}; do  # env per run (A=1,B=2), same clips
                  (export ${v//,/ }  # THREADS=N in a variant: the workers' --threads
                   by_mode --clips "${CLIPS:-48}" \
                     --per-gpu "${PER_GPU:-1}" ${THREADS:+--threads "$THREADS"} ${SINGLE:+--single-only} ${ALL:+--all-only} \
                     --out "$OUT/dataset_ab_${MODE:-fast}_${v//[^A-Za-z0-9_]/_}.md")
                done ;;
    dataset-pair) python3 bench/cpu_topology.py --probe  # is it what the GPUs' workers share? A B C C B A:
                  halves=($(python3 bench/cpu_topology.py --split 2))  # whole cores, by NUMA node
                  # MODE=exact, PER_GPU=K, THREADS=N as for dataset-ab; PAIR_RUNS: the runs, in order
                  pair() {  # each GPU its own launcher and registry, at once; $1: run name, $2 $3: taskset lists
                    for g in 0 1; do
                      (cpus=$([ $g = 0 ] && echo "${2:-}" || echo "${3:-}"); [ -n "$cpus" ] && taskset -cp "$cpus" $BASHPID
                       CUDA_VISIBLE_DEVICES=$g by_mode --clips "${CLIPS:-48}" --per-gpu "${PER_GPU:-1}" --single-only \
                         ${THREADS:+--threads "$THREADS"} --out "$OUT/dataset_pair_$1_gpu$g.md") &
                    done; wait
                    for g in 0 1; do echo "pair $1, GPU $g: $(grep "^| ${MODE:-fast}" "$OUT/dataset_pair_$1_gpu$g.md")"; done
                  }
                  for r in ${PAIR_RUNS:-std unpinned pinned pinned unpinned std}; do  # std: --gpus 0, then --gpus all
                    case $r in
                      std) by_mode --clips "${CLIPS:-48}" --per-gpu "${PER_GPU:-1}" ${THREADS:+--threads "$THREADS"} \
                             --out "$OUT/dataset_pair_std.md" ;;
                      unpinned) pair unpinned ;;
                      pinned) pair pinned "${halves[0]}" "${halves[1]}" ;;
                    esac
                  done ;;
    dataset-batch) for b in ${BATCHES:-32 64 128}; do  # frames per batch: the face stages' per-call costs over more frames
                  by_mode --clips "${CLIPS:-48}" --per-gpu "${PER_GPU:-1}" --batch-size "$b" ${SINGLE:+--single-only} \
                    ${ALL:+--all-only} ${THREADS:+--threads "$THREADS"} \
                    --out "$OUT/dataset_batch_$b.md"
                done ;;
    dataset-conc) for c in ${CONCS:-2 4 8}; do  # one worker per GPU with more inputs in flight
                    fast_nvdec --clips "${CLIPS:-100}" --per-gpu 1 --concurrency "$c" --out "$OUT/dataset_conc_$c.md"
                  done ;;
    dataset) python3 bench/dataset.py --device cuda --clips 200 --frames 250 --mode fast exact --landmarks mtcnn \
                  --out "$OUT/dataset.md" ;;
    dataset-fast) python3 bench/dataset.py --device cuda --clips 200 --frames 250 --mode fast --landmarks mtcnn \
                  --out "$OUT/dataset_fast.md" ;;
    dataset-exact) exact_mtcnn --clips "${CLIPS:-200}" --per-gpu "${PER_GPU:-auto}" ${SINGLE:+--single-only} \
                  ${ALL:+--all-only} ${THREADS:+--threads "$THREADS"} ${THREAD_CPU:+--thread-cpu} \
                  --out "$OUT/dataset_exact.md" ;;
                  # 200 clips: both runs and the clips' generation fit one call at 8 workers per GPU now
                  # (~125 + ~80 + ~125 s); else SINGLE=1, then ALL=1 in the next (MPS=1 for several workers per GPU)
    memory) python3 bench/bench_memory.py --device cuda --frames 600 2400 --batch-size 64 ;;
    render) python3 bench/gpu_render_compare.py --index .carry/shared/bfm_index --out "$OUT" ;;
  esac 2>&1 | tee "$OUT/$step.log"
done
