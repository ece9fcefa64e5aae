#!/usr/bin/env bash
# The inference-cost benchmark as GPU users run it: fp16, SD1.5 and SDXL UNets at full size
# (random weights), 512 and 1024 px, N = 2 and 3, SABW every step and map_refresh 2/3, each
# against N single fp16 steps in the same process (benchmarks/inference_cost.py's table).
# The first run on a CUDA machine answers "how close to the paper's 1.018 (N = 3)".
#
#   benchmarks/gpu.sh                          # CUDA, fp16 (about 16 GB of GPU memory for SDXL N = 3)
#   benchmarks/gpu.sh --dtype bf16             # another dtype
#   benchmarks/gpu.sh --device cpu --quick     # smoke test: tiny UNets on the CPU (tests run this)
# Any other option is passed on to inference_cost.py (e.g. --models 2, --repeats 10, --comfyui DIR).
# PYTHON overrides the interpreter (default: python).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
device=cuda
dtype=fp16
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device="$2"; shift 2 ;;
    --dtype) dtype="$2"; shift 2 ;;
    *) extra+=("$1"); shift ;;
  esac
done
python="${PYTHON:-python}"
for arch in sd15 sdxl; do
  for size in 512 1024; do
    echo "== ${arch} ${size} px, ${dtype} on ${device}"
    "$python" "$here/inference_cost.py" --device "$device" --dtype "$dtype" --arch "$arch" --size "$size" \
      --models 2 3 --repeats 5 --refresh 2 3 ${extra[@]+"${extra[@]}"}
  done
done
