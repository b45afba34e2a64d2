"""The ingest's publish rate: writes N harness-mix events, in order, to an ingest's event port
in one go and times (1) until the ingest has handed every event to its publisher (it closes
the source) and (2) until an edge has applied the last one (its efr_events_delivered metric).

Expects an ingest with --event-port 19290 --metrics-addr 127.0.0.1:19300 and an edge on the
same stream with --metrics-addr 127.0.0.1:19301 (see bench-results/cluster.md).
Usage: python3 bench-results/cluster-pubrate.py N
"""
import random, socket, sys, time, urllib.request
n = int(sys.argv[1]); users = 1000
random.seed(7)
parts = []
for seq in range(1, n + 1):
    r = random.randrange(10000); a = random.randint(1, users); b = random.randint(1, users)
    if r < 1: parts.append(f"{seq}|B\n")
    elif r < 1501: parts.append(f"{seq}|F|{a}|{b}\n")
    elif r < 3001: parts.append(f"{seq}|U|{a}|{b}\n")
    elif r < 4501: parts.append(f"{seq}|P|{a}|{b}\n")
    else: parts.append(f"{seq}|S|{a}\n")
data = "".join(parts).encode()
def metric(port, name):
    for line in urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode().splitlines():
        if line.startswith(name + " "): return int(line.split()[1])
    return 0
base_i = metric(19300, "efr_events_delivered"); base_e = metric(19301, "efr_events_delivered")
s = socket.create_connection(("127.0.0.1", 19290))
t0 = time.time(); s.sendall(data); t_sent = time.time() - t0
s.shutdown(socket.SHUT_WR); s.recv(1); t_closed = time.time() - t0
t_edge = None
while True:
    if metric(19301, "efr_events_delivered") - base_e >= n: t_edge = time.time() - t0; break
    time.sleep(0.005)
print(f"{n} events, {len(data)/1e6:.1f} MB: source written in {t_sent:.3f}s, ingest session closed (all handed to the publisher) {t_closed:.3f}s -> {n/t_closed/1e6:.2f}M ev/s; last event applied on the edge {t_edge:.3f}s -> {n/t_edge/1e6:.2f}M ev/s")
print("ingest published msgs:", metric(19300, "efr_nats_messages_published"), "retries:", metric(19300, "efr_nats_publish_retries"))
