#!/usr/bin/env bash
# README command (a): install what is missing, build llmvq, run the demo job on
# the shipped stories260K model (jobs/demo/) and print its perplexity.
# The quantize stage is not built yet (issue 4): until it is, the demo evaluates
# the FP model and samples a story from it.
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=$(nproc 2>/dev/null || echo 2)
tools/install-deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j"$jobs" >/dev/null
echo "== llmvq eval: stories260K (FP32) on the TinyStories validation subset, ctx 512"
./build/llmvq eval --model jobs/demo/stories260K.bin --data jobs/demo/tinystories_val_subset.txt --ctx 512
echo "== llmvq generate: greedy story"
./build/llmvq generate --model jobs/demo/stories260K.bin --temperature 0 --steps 200
