#!/usr/bin/env bash
# The benchmark report in one command (issue 6): the quality table (bits per
# weight vs perplexity on stories260K) and, where `llmvq bench gemv` exists,
# the quantized-kernel benchmarks, as JSON plus a Pareto plot (PNG, gnuplot)
# in a results folder, and docs/results.md regenerated from them.
#   bash bench/run_all.sh [RESULTS_DIR]        (default: bench/results/)
# Environment: LLMVQ_THREADS (default: all cores), QUALITY_ROWS (default all).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/results}
THREADS=${LLMVQ_THREADS:-$(nproc)}
mkdir -p "$OUT"
tools/install-deps.sh --bench >/dev/null
cmake -S . -B build-bench -DLLMVQ_CUDA=OFF -DLLMVQ_TESTS=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build-bench -j"$(nproc)" >/dev/null
export OMP_WAIT_POLICY=passive OPENBLAS_NUM_THREADS=1
{
  echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "host: $(nproc) cores, $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
  echo "isa: $(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -x -E 'avx2|fma|f16c|avx512f|avx512bw' | tr '\n' ' ')"
  echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
} >"$OUT/machine.txt"

echo "== quality table (stories260K, TinyStories validation subset)"
OMP_NUM_THREADS=$THREADS ./build-bench/bench_quality_table --rows "${QUALITY_ROWS:-all}" \
  --json "$OUT/quality.json" | tee "$OUT/quality.md"

if ./build-bench/llmvq bench gemv --help >/dev/null 2>&1; then
  echo "== quantized GEMV/GEMM vs OpenBLAS"
  : >"$OUT/gemv.jsonl"
  for shape in "4096 4096" "11008 4096"; do
    set -- $shape
    for cfg in 2x8g8 1x16g8; do
      for batch in 1 8; do
        OMP_NUM_THREADS=$THREADS ./build-bench/llmvq bench gemv --rows "$1" --cols "$2" \
          --config "$cfg" --batch "$batch" --threads "$THREADS" --json >>"$OUT/gemv.jsonl"
      done
    done
  done
  echo "== 2x8g8 batch 1: stripped inner loops vs sgemv (the ceiling of LUT / GATHER here)"
  : >"$OUT/ceiling.jsonl"
  for shape in "4096 4096" "11008 4096"; do
    OMP_NUM_THREADS=$THREADS OPENBLAS_NUM_THREADS=$THREADS ./build-bench/bench_qmm_ceiling $shape 30 \
      | tee -a "$OUT/ceiling.jsonl"
  done
else
  echo "== llmvq bench gemv not available in this build: kernel benchmarks skipped"
  rm -f "$OUT/gemv.jsonl"
fi

python3 tools/results_report.py "$OUT" docs/results.md
if command -v gnuplot >/dev/null; then
  gnuplot -e "datafile='$OUT/pareto.dat'; outfile='$OUT/pareto.png'" bench/pareto.gp
  echo "wrote $OUT/pareto.png"
else
  echo "gnuplot missing (tools/install-deps.sh --bench): no plot"
fi
echo "wrote $OUT/quality.json, docs/results.md"
