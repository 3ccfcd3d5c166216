#!/usr/bin/env python3
"""What a Redis route costs per new connection, one build, side by side in one run: four legate
pairs in front of Redis, measured in 6 rounds that alternate their order.

  plain     no Redis keys, a Redis without a password (the baseline)
  inject    --redis-password-file, a requirepass Redis: the server ambassador sends AUTH
  consumer  no Redis keys, the same requirepass Redis: the consumer sends AUTH itself, through
            the tunnel (redis-benchmark -a), as it would without an ambassador that injects
  master    --require-role=master: HELLO checks the role on every connection

Each round measures new connections per second (redis-benchmark -k 0 PING, 50 clients), the
time of one new connection with its PING done serially (-c 1 -k 0), and, for plain and inject,
SET/GET on kept connections (50 clients). Prints medians and each contender's median ratio to
plain; the serial figure is compared with one local round trip to Redis (a PING on a kept
connection straight to it), the most injection may add.

  bench/redis_routes.py [LEGATE]      default target/release/legate
"""
import os
import statistics
import sys
import tempfile
from pathlib import Path

import bench

bench.LEGATE = Path(sys.argv[1] if len(sys.argv) > 1 else "target/release/legate").resolve()
work = Path(tempfile.mkdtemp(prefix="rr-"))
c = bench.certs(work)
services = bench.Procs(work)
open_port, locked_port = bench.free_port(), bench.free_port()
common = ["--save", "", "--dir", work, "--maxclients", "20000"]
services.start("redis-open", ["redis-server", "--port", str(open_port), *common])
services.start("redis-locked", ["redis-server", "--port", str(locked_port), "--requirepass", "pw", *common])
bench.wait_port(open_port); bench.wait_port(locked_port)
pw = work / "redis.pw"
pw.write_text("pw\n"); os.chmod(pw, 0o600)
setups = {
    "plain": (open_port, (), ()),
    "inject": (locked_port, (f"--redis-password-file={pw}",), ()),
    "consumer": (locked_port, (), ("-a", "pw")),
    "master": (open_port, ("--require-role=master",), ()),
}
procs = bench.Procs(work / "pairs")
(work / "pairs").mkdir()
ports = {}
try:
    for name, (target, flags, _) in setups.items():
        hop = {"server": bench.free_port(), "client": bench.free_port()}
        hop["dial"] = hop["server"]
        ports[name] = bench.legate(procs, c, target, hop, server_flags=flags)
        bench.wait_ready("legate", hop, ports[name])
    conn = {n: [] for n in setups}
    serial = {n: [] for n in setups}
    local_rtt = []
    rps = {n: [] for n in ("plain", "inject")}
    names = list(setups)
    for r in range(6):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            extra = setups[n][2]
            conn[n].append(bench.rps(ports[n], *extra, "-c", "50", "-n", "8000", "-k", "0", "-t", "ping"))
            serial[n].append(1e6 / bench.rps(ports[n], *extra, "-c", "1", "-n", "2000", "-k", "0", "-t", "ping"))
            if n in rps:
                rps[n].append(bench.rps(ports[n], "-c", "50", "-n", "40000", "-t", "set,get"))
        local_rtt.append(1e6 / bench.rps(open_port, "-c", "1", "-n", "20000", "-k", "1", "-t", "ping"))
    base = statistics.median(conn["plain"])
    print("new connections/s (redis-benchmark -k 0 -t ping -c 50 -n 8000), 6 rounds:")
    for n in names:
        m = statistics.median(conn[n])
        ratios = [x / p for x, p in zip(conn[n], conn["plain"])]
        print(f"  {n:9} median {m:9.0f}  ratio to plain {statistics.median(ratios):.3f} "
              f"(range {min(ratios):.3f}-{max(ratios):.3f})")
    # Paired: one new connection (connect, PING, PONG, close) to each contender in turn, 3,000
    # turns; the per-turn differences cancel what drifts between rounds.
    import socket, time
    def once(port):
        t = time.perf_counter_ns()
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.sendall(bench.PING)
            if bench.read_reply(s) != b"+PONG\r\n":
                raise RuntimeError("no PONG")
        return (time.perf_counter_ns() - t) / 1000
    def direct_rtt():
        with socket.create_connection(("127.0.0.1", open_port)) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return statistics.median(bench.ping_rtts(s, 3000))
    paired = {n: [] for n in names}
    for turn in range(3000):
        for n in names[turn % len(names):] + names[:turn % len(names)]:
            if n == "consumer":
                continue
            paired[n].append(once(ports[n]))
    print(f"paired serial new connections (3,000 turns), µs; a PING round trip straight to Redis on a kept connection is {direct_rtt():.1f} µs:")
    for n in names:
        if n == "consumer":
            continue
        d = [x - p for x, p in zip(paired[n], paired["plain"])]
        print(f"  {n:9} median {statistics.median(paired[n]):7.1f}  added to plain {statistics.median(d):6.1f}")
    rtt = statistics.median(local_rtt)
    print(f"one new connection and its PING, serially (-c 1 -k 0), µs; a local round trip to Redis is {rtt:.1f} µs:")
    for n in names:
        added = [x - p for x, p in zip(serial[n], serial["plain"])]
        print(f"  {n:9} median {statistics.median(serial[n]):7.1f}  added to plain {statistics.median(added):6.1f} "
              f"(range {min(added):.1f} to {max(added):.1f})")
    print("Redis SET/GET on kept connections (-c 50 -n 40000), 6 rounds:")
    for n in rps:
        ratios = [x / p for x, p in zip(rps[n], rps["plain"])]
        print(f"  {n:9} median {statistics.median(rps[n]):9.0f}  ratio to plain "
              f"{statistics.median(ratios):.3f} (range {min(ratios):.3f}-{max(ratios):.3f})")
finally:
    procs.stop()
    services.stop()
