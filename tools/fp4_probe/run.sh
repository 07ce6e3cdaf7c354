#!/usr/bin/env bash
# Builds the FP4 expert-task probe (fp4_probe.cu) and times its three shapes;
# with --ncu, also profiles one launch of each with Nsight Compute. Needs nvcc
# ($NVCC or PATH) and, to run, an sm_90 GPU. Results go to target/fp4_probe.
set -euo pipefail
cd "$(dirname "$0")/../.."
nvcc="${NVCC:-nvcc}"
root="$(dirname "$(dirname "$(command -v "$nvcc")")")"
out=target/fp4_probe
mkdir -p "$out"
"$nvcc" -std=c++17 -O3 -arch=sm_90a -Ikernels -L"$root/lib" -L"$root/lib64" \
  tools/fp4_probe/fp4_probe.cu -o "$out/fp4_probe"
[ "${1:-}" = --build-only ] && exit 0
for shape in gate gate0 down; do "$out/fp4_probe" "$shape"; done
if [ "${1:-}" = --ncu ]; then
  for shape in gate down; do
    ncu --clock-control none --cache-control none --set full -k regex:fp4_probe -s 3 -c 1 \
      -f -o "$out/$shape" "$out/fp4_probe" "$shape" 133120 5
    ncu -i "$out/$shape.ncu-rep" --page source --csv --print-source sass > "$out/$shape.sass.csv"
  done
fi
