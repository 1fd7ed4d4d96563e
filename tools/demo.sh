#!/usr/bin/env bash
# README command (a): install what is missing, build llmvq, and run the demo
# job: quantize the shipped stories260K model (jobs/demo/) on 2 MPI ranks with
# jobs/stories260K-2bit.ini, printing perplexity before and after.
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=$(nproc 2>/dev/null || echo 2)
tools/install-deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j"$jobs" >/dev/null
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe=1 OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
out=${LLMVQ_DEMO_OUT:-out/demo}
echo "== llmvq quantize jobs/stories260K-2bit.ini on 2 MPI ranks -> $out"
mpirun -np 2 ./build/llmvq quantize jobs/stories260K-2bit.ini --set output.dir="$out"
echo "== result: $out/model.h5, $out/summary.json; a story sampled from the 2-bit model:"
./build/llmvq generate --model "$out/model.h5" --tokenizer jobs/demo/tok512.bin --temperature 0.8 --top-p 0.9 --seed 1 --steps 120
