#!/usr/bin/env python3
"""One bulk stream through legate builds, interleaved: Gbit/s and each side's CPU per GB.

The stream's rate is set by the busier side (on this VM the client side, which reads from
iperf3, encrypts and sends); a saving on the other side shows as CPU it no longer spends, not
as speed. So every round runs one iperf3 stream of 3 s through each build in turn, pinned like
bench/run, and reads each ambassador's user+system time from /proc around it. The receive-path
figures in docs/performance.md ("The receive path without extra copies") come from this.

  bench/stream_cpu.py BINARY [BINARY ...]   e.g. bench/stream_cpu.py /tmp/legate-before target/release/legate

ROUNDS (default 5).
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench

TICK = os.sysconf("SC_CLK_TCK")
SECONDS = 3


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def stream(port):
    """One iperf3 stream of SECONDS: bytes received."""
    for _ in range(5):
        out = subprocess.run(bench.on("client", ["iperf3", "-c", "127.0.0.1", "-p", str(port),
                                                 "-t", str(SECONDS), "-J"]),
                             capture_output=True, text=True, timeout=60)
        doc = json.loads(out.stdout)
        if "error" not in doc:
            return doc["end"]["sum_received"]["bytes"]
        # The iperf3 server runs one test at a time and may still be closing the last one
        # (or the readiness probe's connection).
        time.sleep(1)
    raise RuntimeError(f"iperf3 kept failing: {doc['error']}")


def main():
    binaries = sys.argv[1:]
    if not binaries:
        sys.exit(__doc__)
    work = Path(tempfile.mkdtemp(prefix="legate-scpu-"))
    c = bench.certs(work)
    services = bench.Procs(work)
    iperf_port = bench.free_port()
    services.start("iperf3", ["iperf3", "-s", "-p", str(iperf_port)])
    bench.wait_port(iperf_port)
    pairs, procs = {}, []
    try:
        for i, b in enumerate(binaries):
            bench.LEGATE = Path(b)
            d = work / f"c{i}"
            d.mkdir()
            p = bench.Procs(d)
            procs.append(p)
            hop = {"server": bench.free_port(), "client": bench.free_port()}
            hop["dial"] = hop["server"]
            port = bench.legate(p, c, iperf_port, hop)
            bench.wait_ready("legate", hop, port)
            server, client = p.procs[0].pid, p.procs[1].pid
            pairs[f"{i}: {b}"] = (port, server, client)
        runs = {n: {"gbps": [], "server": [], "client": []} for n in pairs}
        for _ in range(int(os.environ.get("ROUNDS", "5"))):
            for name, (port, server, client) in pairs.items():
                s0, c0 = cpu_seconds(server), cpu_seconds(client)
                got = stream(port)
                s1, c1 = cpu_seconds(server), cpu_seconds(client)
                gb = got / 1e9
                runs[name]["gbps"].append(got * 8 / SECONDS / 1e9)
                runs[name]["server"].append((s1 - s0) / gb)
                runs[name]["client"].append((c1 - c0) / gb)
        for name, r in runs.items():
            med = {k: statistics.median(v) for k, v in r.items()}
            print(f"{name}: {med['gbps']:.2f} Gbit/s, CPU per GB: server side "
                  f"{med['server'] * 1000:.0f} ms, client side {med['client'] * 1000:.0f} ms  "
                  f"[server {' '.join(f'{x * 1000:.0f}' for x in r['server'])}; "
                  f"client {' '.join(f'{x * 1000:.0f}' for x in r['client'])}; "
                  f"Gbit/s {' '.join(f'{x:.2f}' for x in r['gbps'])}]")
    finally:
        for p in procs:
            p.stop()
        services.stop()


if __name__ == "__main__":
    main()
