#!/usr/bin/env bash
# Every check of deploy/, Dockerfile* and .dockerignore that runs without a
# cluster, a Docker engine or a Grafana: Prometheus rules and their unit tests,
# the dashboard's structure and PromQL, the PrometheusRule kept equal to the
# rules file, each kustomize overlay rendered and schema-validated (sharded: its
# StatefulSet, peer discovery and peer token too), the stand-alone examples of
# deploy/kubernetes/examples, the Dockerfiles' sources, stages and runtime
# packages, and the nginx proxy config (nginx -t, then routing through a real
# nginx to stand-in replicas).
#
#   tests/deploy/run.sh [BUILD_DIR]   BUILD_DIR: a build tree whose attnserve and
#                                     attnctl the runtime image must be able to load
# Needs promtool, kubectl, nginx, node and npm: scripts/install-deps installs them.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
here="$root/tests/deploy"
build_dir="${1:-}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

missing=()
for tool in promtool kubectl nginx node npm; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "deploy checks need ${missing[*]}: run scripts/install-deps" >&2
  exit 1
fi

# The validators' npm packages, pinned by package-lock.json; reinstalled only
# when the lock file changes.
lock_sum="$(sha256sum "$here/package-lock.json" | cut -d' ' -f1)"
if [ "$(cat "$here/node_modules/.attnserve-lock-sha256" 2>/dev/null)" != "$lock_sum" ]; then
  (cd "$here" && npm ci --no-audit --no-fund --loglevel=error) || { echo "npm ci failed" >&2; exit 1; }
  echo "$lock_sum" > "$here/node_modules/.attnserve-lock-sha256"
fi

passed=0
failed=0
failed_names=()
check() {
  local name="$1"; shift
  echo "== $name"
  if "$@"; then
    passed=$((passed + 1))
  else
    failed=$((failed + 1))
    failed_names+=("$name")
    echo "-- FAILED: $name"
  fi
}

rules="$root/deploy/prometheus/attnserve-rules.yml"
check "promtool check rules" promtool check rules "$rules"
check "promtool test rules" promtool test rules "$root/deploy/prometheus/attnserve-rules.test.yml"

dashboard_check() {
  node "$here/check-dashboard.mjs" "$root/deploy/grafana/attnserve.json" "$work/dashboard-rules.yml" &&
    promtool check rules "$work/dashboard-rules.yml"
}
check "grafana dashboard" dashboard_check

prometheusrule_in_sync() {
  "$root/deploy/kubernetes/generate-prometheusrule" "$work/prometheusrule.yaml" &&
    if ! cmp -s "$work/prometheusrule.yaml" "$root/deploy/kubernetes/base/prometheusrule.yaml"; then
      echo "deploy/kubernetes/base/prometheusrule.yaml is stale: run deploy/kubernetes/generate-prometheusrule" >&2
      diff "$root/deploy/kubernetes/base/prometheusrule.yaml" "$work/prometheusrule.yaml" | head -20 >&2
      return 1
    fi
}
check "PrometheusRule generated from the rules file" prometheusrule_in_sync

render_overlay() {  # OVERLAY OUT
  # kustomize v5 warns about the v2-compatible fields on stderr; errors still fail.
  kubectl kustomize "$root/deploy/kubernetes/overlays/$1" > "$2" 2> "$2.err" ||
    { cat "$2.err" >&2; return 1; }
}
overlay_check() {
  local overlay="$1" reference=()
  render_overlay "$overlay" "$work/$overlay.yaml" || return 1
  # sharded turns the base's Deployment into a StatefulSet: its pod template is
  # compared with the cpu overlay's Deployment, rendered on its own here.
  if [ "$overlay" = sharded ]; then
    render_overlay cpu "$work/sharded-reference.yaml" || return 1
    reference=("$work/sharded-reference.yaml")
  fi
  node "$here/check-kubernetes.mjs" "$overlay" "$work/$overlay.yaml" "$rules" "${reference[@]}"
}
check "kubernetes overlay cpu" overlay_check cpu
check "kubernetes overlay gpu" overlay_check gpu
check "kubernetes overlay sharded" overlay_check sharded
check "kubernetes examples" node "$here/check-examples.mjs" "$root"/deploy/kubernetes/examples/*.yaml

dockerfiles_check() {
  node "$here/check-dockerfile.mjs" "$root" Dockerfile cpu $build_dir > "$work/docker-cpu.out" &&
    node "$here/check-dockerfile.mjs" "$root" Dockerfile.cuda cuda > "$work/docker-cuda.out" || {
      cat "$work/docker-cpu.out" "$work/docker-cuda.out" 2>/dev/null; return 1; }
  cat "$work/docker-cpu.out" "$work/docker-cuda.out"
  if [ "$(tail -1 "$work/docker-cpu.out")" != "$(tail -1 "$work/docker-cuda.out")" ]; then
    echo "Dockerfile and Dockerfile.cuda install different runtime packages" >&2
    return 1
  fi
  bash -n "$root/scripts/install-deps"
}
check "Dockerfile and Dockerfile.cuda" dockerfiles_check

nginx_syntax() {
  local conf
  conf="$("$root/deploy/nginx/render" --listen 127.0.0.1:50080 --replica 127.0.0.1:50051 \
            --replica 127.0.0.1:50052 --replica 127.0.0.1:50053 --dir "$work/nginx-t")" &&
    nginx -t -q -c "$conf" -p "$work/nginx-t"
}
check "nginx -t" nginx_syntax
check "nginx routing" timeout 120 /usr/bin/python3 "$here/nginx_routing_test.py" "$root" "$work/nginx-routing"

echo
if [ "$failed" -gt 0 ]; then echo "failed: ${failed_names[*]}"; fi
echo "deploy: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
