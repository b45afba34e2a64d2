#!/usr/bin/env python3
"""Idle cost of efr-sharded: N idle clients + an idle source; CPU and wake-ups over a window."""
import os, re, socket, subprocess, sys, time
binary, cores, window = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
clients = int(sys.argv[4]) if len(sys.argv) > 4 else 100
proc = subprocess.Popen([binary, "--cores", str(cores), "--event-port", "0", "--client-port", "0"],
                        stderr=subprocess.PIPE, text=True)
ev = cl = None
while True:
    line = proc.stderr.readline()
    m = re.search(r"events on ([\d.]+):(\d+), clients on ([\d.]+):(\d+)", line)
    if m:
        ev, cl = int(m.group(2)), int(m.group(4)); break
socks = []
for i in range(max(clients, 0)):
    s = socket.create_connection(("127.0.0.1", cl)); s.sendall(b"%d\n" % (i + 1)); socks.append(s)
if clients >= 0:
    src = socket.create_connection(("127.0.0.1", ev)); socks.append(src)
time.sleep(1.0)
hz = os.sysconf("SC_CLK_TCK")
def cpu():
    f = open(f"/proc/{proc.pid}/stat").read().rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12])
def switches():
    out = {}
    for t in os.listdir(f"/proc/{proc.pid}/task"):
        try:
            st = open(f"/proc/{proc.pid}/task/{t}/status").read()
        except FileNotFoundError:
            continue
        name = re.search(r"Name:\s+(\S+)", st).group(1)
        v = int(re.search(r"^voluntary_ctxt_switches:\s+(\d+)", st, re.M).group(1))
        n = int(re.search(r"nonvoluntary_ctxt_switches:\s+(\d+)", st, re.M).group(1))
        out[t] = (name, v + n)
    return out
c0, s0, t0 = cpu(), switches(), time.time()
time.sleep(window)
c1, s1, t1 = cpu(), switches(), time.time()
el = t1 - t0
per = {}
for t, (name, v) in s1.items():
    if t in s0 and name.startswith("efr-shard-"):
        per.setdefault(name, []).append((v - s0[t][1]) / el)
ex = [max(v) for v in per.values()]
what = "no connection" if clients < 0 else f"{clients} clients + source"
print(f"cores={cores} {what} window={el:.1f}s cpu={(c1-c0)/hz/el*100:.2f}% of one core; "
      f"switches/s per executor: mean {sum(ex)/len(ex):.1f} max {max(ex):.1f}")
proc.terminate(); proc.wait()
