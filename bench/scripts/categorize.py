#!/usr/bin/env python3
"""Sums a flat `perf report --no-children -F overhead,sym` listing (stdin) into cost categories."""
import re
import sys

CATS = [
    ("engine: AES-GCM, SHA-256 cache digest, KEK cache, parse", r"aes|Aes|sha2|Sha256|quick_cache|kms_plugin::engine|polyval|ghash|zeroize"),
    (":authority shim", r"kms_plugin::protocol::authority"),
    ("plugin gRPC adapters, metrics", r"kms_plugin::|prometheus|KeyManagementService"),
    ("memcpy/memmove", r"memmove|memcpy"),
    ("malloc/free", r"malloc|_int_free|\bfree\b|cfree|realloc"),
    ("kernel (syscalls, scheduler, UNIX socket)", r"\[k\]"),
    ("h2", r"h2::"),
    ("tokio", r"tokio"),
    ("tonic/hyper/tower/http/bytes/prost", r"tonic|hyper|tower|http::|bytes::|prost"),
]
tot = {name: 0.0 for name, _ in CATS}
other = 0.0
for line in sys.stdin:
    m = re.match(r"\s*([\d.]+)%\s+(.*)", line)
    if not m:
        continue
    v, sym = float(m.group(1)), m.group(2)
    for name, pat in CATS:
        if re.search(pat, sym):
            tot[name] += v
            break
    else:
        other += v
for name, _ in CATS:
    print(f"{tot[name]:6.2f}%  {name}")
print(f"{other:6.2f}%  other (libc, std, futures glue, ...)")
