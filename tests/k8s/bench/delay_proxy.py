#!/usr/bin/env python3
"""Loopback HTTP reverse proxy that adds a fixed delay to every request and counts requests.

For the cold-start benchmark (tests/k8s/bench/coldstart.sh): put it between the plugin and a backend
server (moto) to give every backend call the same latency as a remote key manager.

  delay_proxy.py --upstream http://127.0.0.1:PORT --delay-ms 50 --port-file F

GET /__proxy/stats answers {"requests": n, "by_target": {"TrentService.Decrypt": n, ...}} (the
X-Amz-Target header names the AWS operation; other requests count under their path);
POST /__proxy/reset-stats zeroes the counts. Everything else is forwarded after the delay.
"""

import argparse
import http.client
import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te", "trailer"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--delay-ms", type=float, default=50.0)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--port-file")
    args = ap.parse_args()
    up = urllib.parse.urlsplit(args.upstream)
    lock = threading.Lock()
    stats = {"requests": 0, "by_target": {}}
    local = threading.local()

    def upstream():
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = http.client.HTTPConnection(up.hostname, up.port, timeout=60)
        return conn

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def reply(self, status, body, ctype="application/json", headers=()):
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in headers:
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def forward(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            if self.path == "/__proxy/stats":
                with lock:
                    return self.reply(200, json.dumps(stats).encode())
            if self.path == "/__proxy/reset-stats":
                with lock:
                    stats["requests"] = 0
                    stats["by_target"] = {}
                return self.reply(200, b"{}")
            target = self.headers.get("X-Amz-Target") or self.path
            with lock:
                stats["requests"] += 1
                stats["by_target"][target] = stats["by_target"].get(target, 0) + 1
            time.sleep(args.delay_ms / 1000.0)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
            for attempt in range(2):
                try:
                    conn = upstream()
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    break
                except (http.client.HTTPException, OSError):
                    local.conn = None
                    if attempt:
                        return self.reply(502, b"upstream unreachable", "text/plain")
            out = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP | {"content-length", "content-type"}]
            self.reply(resp.status, data, resp.getheader("Content-Type", "application/octet-stream"), out)

        do_GET = do_POST = do_PUT = do_DELETE = forward

    srv = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    srv.daemon_threads = True
    if args.port_file:
        with open(args.port_file + ".tmp", "w") as f:
            f.write(str(srv.server_address[1]))
        import os

        os.replace(args.port_file + ".tmp", args.port_file)
    srv.serve_forever()


if __name__ == "__main__":
    main()
