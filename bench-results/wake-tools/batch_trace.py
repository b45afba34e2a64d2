#!/usr/bin/env python3
"""Part of bench-results/wake.md: reads the batch trace that a server built with
batch_trace.patch writes at session end (EFR_TRACE=FILE, one executor: --cores 1), and lists every
gap of over GAP_MS (default 1) between two consecutive trace records, with how much of it the
executor thread spent on a CPU (its CLOCK_THREAD_CPUTIME_ID). A gap with almost no thread CPU
is time the executor slept (no input, or a client write waiting for the client to read); a gap
with thread CPU equal to its length is work. Then sums both.
usage: batch_trace.py TRACE_FILE [GAP_MS]"""
import sys

KINDS = {1: "source read", 2: "batch sent", 3: "batch applied", 4: "client write ended"}
rows = [tuple(map(int, line.split())) for line in open(sys.argv[1])]
gap_ns = float(sys.argv[2] if len(sys.argv) > 2 else 1) * 1e6
t0 = rows[0][1]
asleep = working = 0.0
reads = [r for r in rows if r[0] == 1]
applies = [r for r in rows if r[0] == 3]
for a, b in zip(rows, rows[1:]):
    wall, cpu = b[1] - a[1], b[4] - a[4]
    if wall <= gap_ns:
        continue
    if cpu < wall / 10:
        asleep += wall
    else:
        working += wall
    print("  %5.2f ms at %7.1f ms: after %-18s -> %-18s thread CPU %5.2f ms" %
          (wall / 1e6, (a[1] - t0) / 1e6, KINDS[a[0]], KINDS[b[0]], cpu / 1e6))
span = (rows[-1][1] - t0) / 1e9
largest = max(reads, key=lambda r: r[3])
print("trace %.2f s: gaps over %.1f ms: %.1f ms asleep, %.1f ms working; %d source reads "
      "(largest %d bytes, %d events); batch apply p50 %.0f us, max %.0f us"
      % (span, gap_ns / 1e6, asleep / 1e6, working / 1e6, len(reads), largest[2], largest[3],
         sorted(r[2] for r in applies)[len(applies) // 2] / 1e3, max(r[2] for r in applies) / 1e3))
