#!/usr/bin/env bash
# Build and run the whole llmvq test suite (README command b; .ci/run calls it).
#  1. install missing Debian packages (with slurm-wlm + munge for the Slurm test);
#  2. AddressSanitizer + UBSan build (CPU only), the suite less the tests
#     labelled slow (whole-text evaluations, many repeated runs);
#  3. default build (CUDA auto-detected: with nvcc present the CUDA backend is
#     compiled and linked, and GPU tests skip visibly on machines without a GPU),
#     whole suite; its ctest summary ends the output.
# LLMVQ_TEST_QUICK=1 skips step 2.
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=$(nproc 2>/dev/null || echo 2)
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

# slurm-wlm + munge are for the slurm_requeue test only: where they cannot be
# installed (not root), that test skips and the rest must still build and run
tools/install-deps.sh --slurm || tools/install-deps.sh

if [ "${LLMVQ_TEST_QUICK:-0}" != 1 ]; then
  echo "== ASan + UBSan build (CPU only) and suite"
  cmake -S . -B build-asan -DLLMVQ_CUDA=OFF -DLLMVQ_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug >/dev/null
  cmake --build build-asan -j"$jobs" >/dev/null
  (cd build-asan && ctest -j"$jobs" -LE "gpu|slow" --output-on-failure)
fi

echo "== default build (CUDA: auto) and suite"
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j"$jobs" >/dev/null
cd build
exec ctest -j"$jobs" --output-on-failure
