#!/usr/bin/env python3
"""Creates N Secrets through a kube-apiserver at a bounded rate (tests/k8s/bench/coldstart.sh).

  create_secrets.py --server https://127.0.0.1:PORT --ca CA --cert CRT --key KEY --namespace NS \
                    --count 10000 --rate 150 --workers 8

Each Secret bench-<i> holds one random 32-byte value. Prints one line `created N in S s (R/s)`; exits
non-zero after the first failure that a retry (3 attempts) did not fix.
"""

import argparse
import base64
import http.client
import json
import os
import ssl
import sys
import threading
import time


def main():
    ap = argparse.ArgumentParser()
    for a in ("--server", "--ca", "--cert", "--key", "--namespace"):
        ap.add_argument(a, required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--rate", type=float, default=150.0)
    ap.add_argument("--workers", type=int, default=8)
    args = ap.parse_args()
    host, port = args.server.removeprefix("https://").split(":")
    ctx = ssl.create_default_context(cafile=args.ca)
    ctx.load_cert_chain(args.cert, args.key)
    path = f"/api/v1/namespaces/{args.namespace}/secrets"
    lock = threading.Lock()
    state = {"next": 0, "failed": None}
    start = time.monotonic()

    def take():
        with lock:
            if state["failed"] or state["next"] >= args.count:
                return None
            i = state["next"]
            state["next"] += 1
        # Bounded rate: request i is not sent before start + i/rate.
        wait = start + i / args.rate - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        return i

    def worker():
        conn = None
        while (i := take()) is not None:
            body = json.dumps({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": f"bench-{i}"},
                "data": {"value": base64.b64encode(os.urandom(32)).decode()},
            })
            for attempt in range(3):
                try:
                    if conn is None:
                        conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=60)
                    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
                    resp = conn.getresponse()
                    data = resp.read()
                    if resp.status in (201, 409):  # 409: a retried create that had landed
                        break
                    err = f"bench-{i}: HTTP {resp.status}: {data[:200]!r}"
                except (OSError, http.client.HTTPException) as e:
                    conn, err = None, f"bench-{i}: {e}"
                time.sleep(0.5 * (attempt + 1))
            else:
                with lock:
                    state["failed"] = err

    threads = [threading.Thread(target=worker) for _ in range(args.workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.monotonic() - start
    if state["failed"]:
        print(f"FAIL: {state['failed']}", file=sys.stderr)
        sys.exit(1)
    print(f"created {args.count} in {took:.1f} s ({args.count / took:.0f}/s)")


if __name__ == "__main__":
    main()
