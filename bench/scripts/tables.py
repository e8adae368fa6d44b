#!/usr/bin/env python3
"""Renders bench/results/latest.json (written by `kms-bench run`) as the Markdown tables of BENCHMARKS.md."""
import json
import sys

path = sys.argv[1] if len(sys.argv) > 1 else "bench/results/latest.json"
r = json.load(open(path))
m = r["machine"]
print(f"Machine: {m['nproc']} x {m['cpu_model']}, {m['mem_total_mib']} MiB, kernel {m['kernel']}; "
      f"load average before {r['load_before'][0]:.2f}, after {r['load_after'][0]:.2f}. "
      f"Settings: {r['settings']['rounds']} alternating floor/plugin slices of {r['settings']['slice_seconds']} s "
      f"per cell (after {r['settings']['warmup_seconds']} s warm-up each).\n")

titles = {
    "status": "Scenario 1: Status",
    "v2-decrypt": "Scenario 2a: v2 Decrypt of a 32-byte seed, local KEK cached",
    "v2-encrypt": "Scenario 2b: v2 Encrypt of a 32-byte seed",
    "v1-encrypt": "Scenario 3a: v1 Encrypt of a 32-byte DEK",
    "v1-decrypt": "Scenario 3b: v1 Decrypt of a 32-byte DEK",
}
for scen, title in titles.items():
    rows = [x for x in r["rows"] if x["scenario"] == scen]
    if not rows:
        continue
    print(f"### {title}\n")
    print("| clients | conns | plugin ops/s | floor ops/s | plugin p50 / p99 / p99.9 (µs) | floor p50 / p99 / p99.9 (µs) | p50 ratio | p99 ratio | floor/plugin ops |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for x in rows:
        p, f = x["plugin"], x["floor"]
        print(f"| {x['concurrency']} | {x['connections']} | {p['ops_per_sec']:.0f} | {f['ops_per_sec']:.0f} | "
              f"{p['p50_us']:.0f} / {p['p99_us']:.0f} / {p['p999_us']:.0f} | "
              f"{f['p50_us']:.0f} / {f['p99_us']:.0f} / {f['p999_us']:.0f} | "
              f"{x['p50_ratio']:.2f} | {x['p99_ratio']:.2f} | {x['throughput_ratio']:.2f} |")
    print()

if r["cold_start"]:
    print("### Scenario 4: cold start\n")
    print("| order | clients | ciphertexts | distinct local KEKs | backend unwraps | start-up check calls | cold pass (s) | backend busy (s) | KEKs x 20 ms (s) | warm pass (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in r["cold_start"]:
        s = c["startup_calls"]
        print(f"| {c['order']} | {c['concurrency']} | {c['ciphertexts']} | {c['distinct_local_keks']} | "
              f"{c['decrypt_calls']['unwraps']} | {s['probes']} probe, {s['wraps']} wrap, {s['unwraps']} unwrap | "
              f"{c['cold_seconds']:.3f} | {c['backend_busy_seconds']:.3f} | {c['expected_backend_seconds']:.3f} | {c['warm_seconds']:.3f} |")
    print()

mem = r["memory"]
if mem["plugin_idle_rss_kib"]:
    print("### Scenario 5: memory (VmRSS of `kms-plugin serve`)\n")
    print("| idle | floor idle | max during heaviest cell | after all load | peak (VmHWM) |")
    print("|---:|---:|---:|---:|---:|")
    mib = lambda k: f"{k / 1024:.1f} MiB"
    print(f"| {mib(mem['plugin_idle_rss_kib'])} | {mib(mem['floor_idle_rss_kib'])} | "
          f"{mib(mem['heaviest_scenario_max_rss_kib'])} ({mem['heaviest_scenario']}) | "
          f"{mib(mem['plugin_rss_after_load_kib'])} | {mib(mem['plugin_peak_rss_kib'])} |")
    print()

print("### Targets\n")
print("| target | value | limit | |")
print("|---|---:|---|---|")
for t in r["targets"]:
    print(f"| {t['name']} | {t['value']:.2f} | {t['limit']} | {'pass' if t['pass'] else '**miss**'} |")
