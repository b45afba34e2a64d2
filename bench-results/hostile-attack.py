#!/usr/bin/env python3
"""Attackers for the hostile-peer measurements in bench-results/hostile.md.

  flood   HOST:PORT N        N clients send an id line, then write junk as fast as they can
  stall   HOST:PORT N        N clients send an id line, then never read (4 KiB receive buffer)
  idle    HOST:PORT N        N connections that never send an id; each one the server closes
                             is opened again (the attacker keeps N pending handshakes up)
  broadcast HOST:EVPORT HOST:CLPORT EVENTS
                             one reading client (user 1) and a source sending EVENTS
                             broadcasts in order; checks every line the client receives

Runs until killed (flood, stall, idle) or until the check is done (broadcast).
"""
import selectors
import socket
import sys
import threading
import time


def addr(text):
    host, port = text.rsplit(":", 1)
    return host, int(port)


def flood(target, count):
    junk = b"x" * 65536

    def one(user):
        s = socket.create_connection(target)
        s.sendall(b"%d\n" % user)
        sent = 0
        try:
            while True:
                sent += s.send(junk)
        except OSError as error:
            print("flooder %d stopped after %d bytes: %s" % (user, sent, error), flush=True)

    for user in range(count):
        threading.Thread(target=one, args=(1_000_000 + user,), daemon=True).start()
    while True:
        time.sleep(3600)


def stall(target, count):
    held = []
    for user in range(count):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(target)
        s.sendall(b"%d\n" % (2_000_000 + user))
        held.append(s)
    print("%d stalled clients connected" % count, flush=True)
    while True:
        time.sleep(3600)


def idle(target, count):
    selector = selectors.DefaultSelector()
    opened = reopened = 0

    def open_one():
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(target)
        except BlockingIOError:
            pass
        selector.register(s, selectors.EVENT_READ)

    for _ in range(count):
        open_one()
        opened += 1
    print("%d idle connections opened" % opened, flush=True)
    last = time.time()
    while True:
        for key, _ in selector.select(timeout=1.0):
            s = key.fileobj
            try:
                data = s.recv(1)
            except OSError:
                data = b""
            if not data:
                selector.unregister(s)
                s.close()
                open_one()
                reopened += 1
        if time.time() - last >= 5:
            print("idle: %d open, %d reopened after the server closed them" % (count, reopened), flush=True)
            last = time.time()


def read(client_target, output):
    reader = socket.create_connection(client_target)
    reader.sendall(b"1\n")
    with open(output, "wb") as sink:
        while True:
            chunk = reader.recv(1 << 20)
            if not chunk:
                break
            sink.write(chunk)


def broadcast(event_target, client_target, events):
    # The reading client is a process of its own, so the source never slows it down.
    import os
    import subprocess
    import tempfile
    output = tempfile.mktemp(prefix="efr-hostile-reader-")
    reader = subprocess.Popen([sys.executable, __file__, "read", "%s:%d" % client_target, output])
    time.sleep(1.0)
    got = []
    source = socket.create_connection(event_target)
    started = time.time()
    step = 10_000
    for first in range(1, events + 1, step):
        last = min(first + step, events + 1)
        source.sendall(b"".join(b"%d|B\n" % seq for seq in range(first, last)))
    source.shutdown(socket.SHUT_WR)
    source.recv(1)
    reader.wait()
    with open(output, "rb") as received:
        got.append(received.read())
    os.unlink(output)
    expected = b"".join(b"%d|B\n" % seq for seq in range(1, events + 1))
    ok = got[0] == expected
    prefix = expected.startswith(got[0])
    print("broadcast: %d events in %.1f s; reading client %s (%d of %d bytes%s)"
          % (events, time.time() - started, "PASS" if ok else "FAIL", len(got[0]), len(expected),
             "" if ok else (", an exact prefix" if prefix else ", WRONG BYTES")), flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "read":
        read(addr(sys.argv[2]), sys.argv[3])
    elif mode == "broadcast":
        broadcast(addr(sys.argv[2]), addr(sys.argv[3]), int(sys.argv[4]))
    else:
        {"flood": flood, "stall": stall, "idle": idle}[mode](addr(sys.argv[2]), int(sys.argv[3]))
