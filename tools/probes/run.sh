#!/usr/bin/env bash
# Builds the task probes (plain kernels around one task kind's device code:
# fp4_probe.cu, attention_probe.cu, gemv_probe.cu, route_probe.cu; hop_probe.cu,
# the dependency hop's parts: round trips, release cost, ways to poll;
# icache_probe.cu, the SM's instruction cache; stream_probe.cu, the FP4
# job's load pattern alone against a copy; tagged_probe.cu, a hop whose data
# carries its own readiness against the event counter's; ring_probe.cu, the
# FP4 product fed by bulk copies into a ring of shared-memory slots against
# the task's loop) and times their shapes; with --ncu, also profiles one
# launch of each with Nsight Compute (the resident kernel itself cannot be
# profiled: the profiler serialises launches). Needs
# nvcc ($NVCC or PATH) and, to run, an sm_90 GPU. Results go to target/probes.
set -euo pipefail
cd "$(dirname "$0")/../.."
nvcc="${NVCC:-nvcc}"
root="$(dirname "$(dirname "$(command -v "$nvcc")")")"
out=target/probes
mkdir -p "$out"
for probe in fp4_probe attention_probe gemv_probe hop_probe icache_probe route_probe stream_probe tagged_probe ring_probe; do
  "$nvcc" -std=c++17 -O3 -arch=sm_90a -Ikernels -L"$root/lib" -L"$root/lib64" \
    "tools/probes/$probe.cu" -o "$out/$probe"
done
[ "${1:-}" = --build-only ] && exit 0
for shape in gate gate0 gate0b down; do
  "$out/fp4_probe" "$shape"
  "$out/fp4_probe" "$shape" 0 200 1 cold-code
done
for shape in spread spread-down; do
  for rows in 8 16; do "$out/fp4_probe" "$shape" 0 200 "$rows"; done
done
for rows in 1 8 16; do
  "$out/attention_probe" "$rows"
  "$out/attention_probe" "$rows" 400 rope
done
for shape in qkv oproj router; do
  for mode in cold staged staged-cold-code; do "$out/gemv_probe" "$shape" "$mode"; done
  "$out/gemv_probe" "$shape" staged-hot 200 2
done
"$out/hop_probe"
"$out/tagged_probe"
"$out/stream_probe"
"$out/icache_probe"
for shape in "2048 96 1 4" "2048 256 8 2" "768 256 8 2" "2048 2048 1 4"; do
  for mode in "" sliced lazyf; do "$out/ring_probe" $shape $mode; done
done
for shape in "2048 256 1" "2048 2048 1" "2048 2048 8"; do "$out/ring_probe" $shape 4 lazy; done
for rows in 1 8 16; do
  "$out/route_probe" "$rows"
  "$out/route_probe" "$rows" 400 cold-code
done
if [ "${1:-}" = --ncu ]; then
  profile() {  # name, then the probe's command line
    local name=$1
    shift
    ncu --clock-control none --cache-control none --set full -k regex:probe -s 3 -c 1 -f -o "$out/$name" "$@"
    ncu -i "$out/$name.ncu-rep" --page source --csv --print-source sass > "$out/$name.sass.csv"
  }
  profile fp4_gate "$out/fp4_probe" gate 0 5
  profile fp4_down "$out/fp4_probe" down 0 5
  profile attention_1 "$out/attention_probe" 1 5
  profile attention_8 "$out/attention_probe" 8 5
  profile attention_8_rope "$out/attention_probe" 8 5 rope
fi
