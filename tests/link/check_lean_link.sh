#!/usr/bin/env bash
# Checks that BINARY, a program linking only attnserve_client, carries none of
# attnserve_core's weight: no oneDNN, OpenMP runtime or cairo among the
# libraries it loads (ldd), and no backend, kernel or scheduler among its
# symbols (nm). Prints what it found; exits 1 if any.
#   tests/link/check_lean_link.sh BINARY
set -uo pipefail
binary="${1:?usage: check_lean_link.sh BINARY}"
libraries="$(ldd "$binary")" || { echo "ldd $binary failed" >&2; exit 1; }
symbols="$(nm -C "$binary")" || { echo "nm $binary failed" >&2; exit 1; }
echo "ldd $binary:"
echo "$libraries"
status=0
heavy_libraries="$(grep -E 'lib(dnnl|gomp|omp|iomp5|cairo)\b' <<<"$libraries")"
if [ -n "$heavy_libraries" ]; then
  echo "FAIL: loads libraries the client does not need:" >&2
  echo "$heavy_libraries" >&2
  status=1
fi
core_symbols="$(grep -E 'attnserve::.*(CpuBackend|OnednnBackend|ReferenceBackend|CudaBackend|Scheduler)|attnserve::PrepareAttention|dnnl::' <<<"$symbols" | head -5)"
if [ -n "$core_symbols" ]; then
  echo "FAIL: holds attnserve_core's backends, kernels or scheduler, e.g.:" >&2
  echo "$core_symbols" >&2
  status=1
fi
if [ "$status" = 0 ]; then
  echo "ok: no oneDNN, OpenMP or cairo loaded; no backend, kernel or scheduler symbol"
fi
exit "$status"
