#!/usr/bin/env bash
# attn_bench --layer against PyTorch's CPU layer (bench/torch_layer.py), the
# same shape and dtype, alternately in one run, with the ratio:
#   bench/layer_vs_torch.sh [BUILD_DIR] [ROUNDS]
# For each of L1 and L2, f32 and bf16 (bf16 only where the CPU has AVX-512
# BF16): ROUNDS alternations (default 2), one JSON line per run, then a
# summary line with the medians and torch_ms / attnserve_ms.
set -euo pipefail
build=${1:-build}
rounds=${2:-2}
bench="$build/bench/attn_bench"
here=$(cd "$(dirname "$0")" && pwd)
[ -x "$bench" ] || { echo "layer_vs_torch: $bench not built" >&2; exit 2; }
dtypes="f32"
grep -q avx512_bf16 /proc/cpuinfo && dtypes="f32 bf16"
# One machine peak for every run, so that the fractions compare.
peak=$("$bench" --shape=S1 --iters=1 --json)
gflops=$(echo "$peak" | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["peak_gflops"])')
gbps=$(echo "$peak" | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["peak_gbps"])')
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores, FP32 FMA peak ${gflops} GFLOP/s, read ${gbps} GB/s"
for shape in L1 L2; do
  for dtype in $dtypes; do
    ours=(); theirs=()
    for _ in $(seq "$rounds"); do
      a=$("$bench" --layer="$shape" --dtype="$dtype" --peak_gflops="$gflops" --peak_gbps="$gbps" --json)
      echo "attnserve $a"
      ours+=("$(echo "$a" | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["ms"])')")
      t=$(/usr/bin/python3 "$here/torch_layer.py" --shape="$shape" --dtype="$dtype" --json 2>/dev/null)
      echo "torch     $t"
      theirs+=("$(echo "$t" | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["ms"])')")
    done
    /usr/bin/python3 - "$shape" "$dtype" "${ours[*]}" "${theirs[*]}" <<'PY'
import statistics, sys
shape, dtype, ours, theirs = sys.argv[1], sys.argv[2], sys.argv[3].split(), sys.argv[4].split()
a = statistics.median(map(float, ours)); t = statistics.median(map(float, theirs))
print(f"summary {shape} {dtype}: attnserve {a:.1f} ms, torch {t:.1f} ms, torch/attnserve {t / a:.2f}x")
PY
  done
done
