#!/usr/bin/env bash
# Cold-start benchmark (issue 17 §3; `make bench-coldstart`, not part of `make test`): COUNT Secrets are
# created through a real kube-apiserver at a bounded rate, then the plugin and the apiserver are restarted
# and the time until `kubectl get secrets -A` returns all of them is measured, with the backend calls the
# plugin made (its /metrics) and those the backend saw (the Akeyless fake's stats, the delay proxy's count).
# Every backend call costs LATENCY ms: the Akeyless fake's injected latency, or a delay proxy in front of moto.
#
# Environment:
#   KMS_BENCH_CONFIGS   space-separated BACKEND:API:MODE (BACKEND akeyless|aws, API v1|v2, MODE default|per-dek;
#                       per-dek = --kek-max-uses 1: a new local KEK, so one backend wrap, per Encrypt and one
#                       unwrap per DEK at a cold start, the way plugins without a local KEK hierarchy work);
#                       entries may end in :COUNT to override KMS_BENCH_COUNT
#   KMS_BENCH_COUNT     Secrets per configuration (default 10000)
#   KMS_BENCH_RATE      creates per second (default 150), KMS_BENCH_WORKERS concurrent creates (default 8)
#   KMS_BENCH_LATENCY_MS  per backend call (default 50)
#   KMS_BENCH_OUT       results file (default $KMS_TEST_CACHE_DIR/bench-coldstart.tsv), one line per run
# Needs what the e2e run needs (tests/k8s/e2e/build.sh binaries) plus the test venv (moto, KMS_TEST_PYTHON).
set -euo pipefail
bench_here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../e2e/run.sh
source "$bench_here/../e2e/run.sh"

PY="${KMS_TEST_PYTHON:-$repo/.venv/bin/python}"
[[ -x "$PY" ]] || fail "python with the test requirements not found at $PY (set KMS_TEST_PYTHON)"
COUNT_DEFAULT="${KMS_BENCH_COUNT:-10000}"
RATE="${KMS_BENCH_RATE:-150}" WORKERS="${KMS_BENCH_WORKERS:-8}" LATENCY_MS="${KMS_BENCH_LATENCY_MS:-50}"
OUT="${KMS_BENCH_OUT:-${KMS_TEST_CACHE_DIR:-$HOME/.cache/kms-plugin}/bench-coldstart.tsv}"
MOTO_PID="" PROXY_PID=""
bench_stop() { stop_pid "$PROXY_PID"; PROXY_PID=""; stop_pid "$MOTO_PID"; MOTO_PID=""; }
trap 'rc=$?; bench_stop; (exit $rc); cleanup' EXIT

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
pm() { curl -sf "http://127.0.0.1:$HTTP_PORT/metrics" | awk -v m="$1" -v f="${2:-}" '($1 == m || index($1, m "{") == 1) && index($1, f) { s += $2 } END { printf "%d", s }'; }

backend_aws_init() {
  local port; port="$(free_port)"
  "$(dirname "$PY")/moto_server" -H 127.0.0.1 -p "$port" >>"$WORK/moto.log" 2>&1 &
  MOTO_PID=$!
  wait_for 60 "moto on $port" curl -s -o /dev/null "http://127.0.0.1:$port/"
  rm -f "$WORK/proxy.port"
  "$PY" "$bench_here/delay_proxy.py" --upstream "http://127.0.0.1:$port" --delay-ms "$LATENCY_MS" \
    --port-file "$WORK/proxy.port" >>"$WORK/proxy.log" 2>&1 &
  PROXY_PID=$!
  wait_for 30 "delay proxy" test -s "$WORK/proxy.port"
  PROXY_URL="http://127.0.0.1:$(cat "$WORK/proxy.port")"
  export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench AWS_EC2_METADATA_DISABLED=true
  local arn
  arn="$("$PY" -c 'import sys, botocore.session as s
c = s.get_session().create_client("kms", region_name="us-east-1", endpoint_url=sys.argv[1])
print(c.create_key()["KeyMetadata"]["Arn"])' "http://127.0.0.1:$port")" || fail "create a key in moto"
  PLUGIN_BACKEND_ARGS=(--backend aws-kms --aws-kms-key-id "$arn" --aws-region us-east-1 --aws-endpoint-url "$PROXY_URL")
}
backend_aws_stop() { bench_stop; }

# backend_calls_seen: what the backend itself counted since the last reset (key manager's view).
backend_calls_seen() {
  if [[ "$BACKEND" == akeyless ]]; then
    curl -sf "$FAKE_URL/__control/stats" | "$PY" -c '
import json, sys
c = json.load(sys.stdin)["calls"]
print(" ".join("%s=%d" % (k, v) for k, v in sorted(c.items()) if ":" not in k))'
  else
    curl -sf "$PROXY_URL/__proxy/stats" | "$PY" -c '
import json, sys
c = json.load(sys.stdin)["by_target"]
print(" ".join("%s=%d" % (k.split(".")[-1], v) for k, v in sorted(c.items())))'
  fi
}
backend_reset() {
  if [[ "$BACKEND" == akeyless ]]; then curl -sf -X POST -d '{}' "$FAKE_URL/__control/reset-stats" >/dev/null
  else curl -sf -X POST -d '{}' "$PROXY_URL/__proxy/reset-stats" >/dev/null; fi
}

bench_plugin() {
  "$PLUGIN_BIN" serve --listen "$SOCK_ENDPOINT" "${PLUGIN_BACKEND_ARGS[@]}" "${MODE_ARGS[@]}" \
    --data-dir "$WORK/plugin-data" --http "127.0.0.1:$HTTP_PORT" >>"$WORK/plugin.log" 2>&1 &
  PLUGIN_PID=$!
  wait_for 60 "kms-plugin Status" "$BIN/e2ehelper" kms-status "$SOCK_ENDPOINT"
}

all_listed() {
  [[ "$(kubectl --kubeconfig "$WORK/kubeconfig" --request-timeout=300s get secrets -A --no-headers -o name 2>>"$WORK/list.err" | wc -l)" -ge "$COUNT" ]]
}

bench_one() {
  IFS=: read -r BACKEND API MODE COUNT <<<"$1"
  COUNT="${COUNT:-$COUNT_DEFAULT}"
  KMS_NAME="bench-$API"
  MODE_ARGS=()
  [[ "$MODE" == per-dek ]] && MODE_ARGS=(--kek-max-uses 1)
  log "=== $BACKEND $API $MODE: $COUNT Secrets, $LATENCY_MS ms per backend call"
  rm -rf "$WORK/etcd" "$WORK"/*.sock "$WORK/plugin-data" "$WORK/apiserver.log" "$WORK/plugin.log"
  mkdir -p "$WORK/plugin-data"
  SOCK_ENDPOINT="unix://$WORK/kms-bench.sock" API_PORT="$(free_port)" HTTP_PORT="$(free_port)"
  write_kubeconfig
  "backend_${BACKEND}_init"
  if [[ "$BACKEND" == akeyless ]]; then
    curl -sf -X POST -d "{\"command\": \"*\", \"seconds\": $(awk -v l="$LATENCY_MS" 'BEGIN { print l / 1000 }'), \"count\": -1}" \
      "$FAKE_URL/__control/latency" >/dev/null || fail "set the Akeyless fake's latency"
  fi
  write_encryption_config
  start_etcd
  bench_plugin
  start_apiserver
  k create namespace bench >/dev/null
  local t; t="$(now)"
  "$PY" "$bench_here/create_secrets.py" --server "https://127.0.0.1:$API_PORT" --ca "$WORK/pki/ca.crt" \
    --cert "$WORK/pki/admin.crt" --key "$WORK/pki/admin.key" --namespace bench --count "$COUNT" \
    --rate "$RATE" --workers "$WORKERS" >"$WORK/create.out" || fail "create secrets: $(cat "$WORK/create.out")"
  local create_s; create_s="$(since "$t")"
  local w_wrap w_unwrap; w_wrap="$(pm kms_plugin_backend_calls_total 'operation="wrap"')" w_unwrap="$(pm kms_plugin_backend_calls_total 'operation="unwrap"')"
  local w_seen; w_seen="$(backend_calls_seen)"
  log "$(cat "$WORK/create.out"); plugin backend calls while writing: wrap $w_wrap, unwrap $w_unwrap; backend saw: $w_seen"

  stop_apiserver; stop_plugin
  backend_reset
  log "cold start: plugin and apiserver restarted"
  t="$(now)"
  bench_plugin
  local plugin_s; plugin_s="$(since "$t")"
  start_apiserver --no-wait
  wait_for 600 "kube-apiserver /readyz" k get --raw /readyz
  local ready_s; ready_s="$(since "$t")"
  : >"$WORK/list.err"
  wait_for 1800 "kubectl get secrets -A to list all $COUNT" all_listed
  local list_s; list_s="$(since "$t")"
  local decrypts unwraps probes seen
  decrypts="$(pm kms_plugin_grpc_requests_total 'method="Decrypt"')"
  unwraps="$(pm kms_plugin_backend_calls_total 'operation="unwrap"')"
  probes="$(pm kms_plugin_backend_calls_total 'operation="probe"')"
  seen="$(backend_calls_seen)"
  log "result: all $COUNT listed ${list_s}s after the restart (plugin Status ${plugin_s}s, /readyz ${ready_s}s); plugin: $decrypts Decrypts, $unwraps backend unwraps, $probes probes; backend saw: $seen; list errors before success: $(grep -c . "$WORK/list.err" || true)"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$(date -u +%FT%TZ)" "$BACKEND" "$API" "$MODE" "$COUNT" \
    "$LATENCY_MS" "$create_s" "$w_wrap" "$plugin_s" "$ready_s" "$list_s" "$decrypts" "$unwraps" "$probes" "$seen" "$w_seen" >>"$OUT"
  stop_apiserver; stop_plugin; stop_pid "$ETCD_PID"; ETCD_PID=""
  "backend_${BACKEND}_stop"
}

make_certs
use_version "${KMS_BENCH_VERSION:-$DEFAULT_VERSION}"
configs="${KMS_BENCH_CONFIGS:-akeyless:v1:default akeyless:v1:per-dek akeyless:v2:default akeyless:v2:per-dek aws:v1:default aws:v1:per-dek aws:v2:default aws:v2:per-dek}"
mkdir -p "$(dirname "$OUT")"
[[ -s "$OUT" ]] || printf 'time\tbackend\tapi\tmode\tcount\tlatency_ms\tcreate_s\twrite_wraps\tplugin_ready_s\treadyz_s\tall_listed_s\tdecrypts\tunwraps\tprobes\tbackend_saw_cold\tbackend_saw_write\n' >"$OUT"
for c in $configs; do bench_one "$c"; done
log "results appended to $OUT"
