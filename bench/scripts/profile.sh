#!/usr/bin/env bash
# Profiles the plugin and the floor under the same load (cached v2 Decrypt, Status) with perf's
# cpu-clock sampler (works without hardware counters, e.g. in VMs). Writes flat symbol profiles to
# bench/results/profile-<server>-<op>.txt. Needs release builds of kms-plugin and kms-bench, and perf.
set -euo pipefail
BIN=${BIN:-target/release}
OUT=${OUT:-bench/results}
SECS=${SECS:-4}
CONC=${CONC:-16}
dir=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT

"$BIN/kms-plugin" keygen "$dir/kek.json" 2>/dev/null
"$BIN/kms-plugin" serve --listen "unix://$dir/plugin.sock" --backend local \
  --local-key-file "$dir/kek.json" --data-dir "$dir" 2>"$dir/plugin.log" &
pids+=($!); plugin_pid=$!
"$BIN/kms-bench" floor --listen "unix://$dir/floor.sock" 2>"$dir/floor.log" &
pids+=($!); floor_pid=$!
for s in plugin floor; do
  for _ in $(seq 1 300); do
    "$BIN/kms-plugin" health --listen "unix://$dir/$s.sock" --timeout 1s >/dev/null 2>&1 && break
    sleep 0.1
  done
done

for op in v2-decrypt status; do
  for s in plugin floor; do
    pid=$plugin_pid; [ "$s" = floor ] && pid=$floor_pid
    perf record -q -e cpu-clock -F 1999 -p "$pid" -o "$dir/$s-$op.data" -- sleep "$SECS" 2>/dev/null &
    perf_pid=$!
    result=$("$BIN/kms-bench" load --listen "unix://$dir/$s.sock" --payloads-from "unix://$dir/plugin.sock" \
      --op "$op" --concurrency "$CONC" --duration "${SECS}s")
    wait "$perf_pid" || true
    {
      echo "# $s under $result"
      echo "# load: $(cat /proc/loadavg)"
      perf report -i "$dir/$s-$op.data" --no-children -F overhead,dso,sym --stdio 2>/dev/null \
        | grep -v '^#' | grep -v '^ *$' | sed 's/ *$//' | head -60 || true
      echo "# categories (sum over all symbols):"
      perf report -i "$dir/$s-$op.data" --no-children -F overhead,sym --stdio 2>/dev/null \
        | python3 "$(dirname "$0")/categorize.py" | sed 's/^/# /' || true
    } >"$OUT/profile-$s-$op.txt"
    echo "$s $op: $result"
  done
done
