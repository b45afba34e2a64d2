#!/usr/bin/env python3
"""Part of bench-results/wake.md: reads efr-sharded's metrics page on 127.0.0.1:PORT and prints
the quantiles of its own delivery latency (efr_delivery_latency_seconds, interpolated inside
the 1-2-5 buckets; "within 1 ms" is exact) and the batches it applied.
usage: server_latency.py PORT"""
import re
import socket
import sys

s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
page = b""
while chunk := s.recv(65536):
    page += chunk
page = page.decode()
buckets = [(float("inf") if le == "+Inf" else float(le), int(n)) for le, n in
           re.findall(r'efr_delivery_latency_seconds_bucket\{le="([^"]+)"\} (\d+)', page)]
count = buckets[-1][1] if buckets else 0


def quantile(q):
    target, low, below = q * count, 0.0, 0
    for le, n in buckets:
        if n >= target and n > below:
            return low if le == float("inf") else low + (le - low) * (target - below) / (n - below)
        low, below = le, n
    return float("nan")


batches = re.search(r"^efr_batches_applied (\d+)", page, re.M)
print("server p50=%.3fms p99=%.3fms p99.9=%.3fms within-1ms=%.2f%% batches-applied=%s"
      % (quantile(.5) * 1e3, quantile(.99) * 1e3, quantile(.999) * 1e3,
         100 * dict(buckets).get(0.001, 0) / max(count, 1), batches.group(1) if batches else "?"))
