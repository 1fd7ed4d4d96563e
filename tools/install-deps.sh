#!/usr/bin/env bash
# Install the Debian 12 packages llmvq needs to build and test, only those that
# are missing (idempotent). Run as root (or with sudo available).
#   tools/install-deps.sh            build + test dependencies
#   tools/install-deps.sh --slurm    also slurm-wlm + munge (for the Slurm test)
#   tools/install-deps.sh --fuzz     also clang (libFuzzer targets)
#   tools/install-deps.sh --bench    also gnuplot (the Pareto plot of bench/run_all.sh)
set -euo pipefail

pkgs=(build-essential cmake pkg-config openmpi-bin libopenmpi-dev libhdf5-openmpi-dev
      hdf5-tools libopenblas-dev liblapacke-dev libcmocka-dev libcjson-dev libinih-dev
      python3)
for arg in "$@"; do
  case "$arg" in
    --slurm) pkgs+=(slurm-wlm munge) ;;
    --fuzz) pkgs+=(clang libclang-rt-14-dev) ;;
    --bench) pkgs+=(gnuplot-nox) ;;
    *) echo "install-deps.sh: unknown option '$arg'" >&2; exit 2 ;;
  esac
done

missing=()
for p in "${pkgs[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps.sh: all ${#pkgs[@]} packages present"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null; then SUDO="sudo"; else
    echo "install-deps.sh: missing packages (${missing[*]}) and not root; install them as root" >&2
    exit 1
  fi
fi
echo "install-deps.sh: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install-deps.sh: done"
