#!/usr/bin/env python3
"""Redis requests per second AND the ambassadors' CPU time per request, interleaved.

Each contender is a legate binary with optional environment and client flags; its pair stays
up for the whole run, and every round runs redis-benchmark (SET, 50 clients unless CLIENTS
says otherwise) through each in turn, pinned like bench/run. CPU per request is the
user+system time both legate processes used during the round, divided by the requests:
steadier than requests/s on a noisy machine, and what multiplexing changes. The batch-size
figures in docs/performance.md come from this.

  bench/cpu_ab.py NAME=BINARY[:ENV=V,ENV=V[:--flag,--flag]] ...
  e.g. bench/cpu_ab.py one=target/release/legate two=target/release/legate::--pool-size=2 \\
           before=/tmp/legate-before

Also prints how idle each CPU was during the rounds (median): what the batch size and the
reader's hand-over of the CPU changed, when they were measured with environment knobs (now
constants in src/mux/conn.rs).

ROUNDS (default 5), REQUESTS per round (default 100000), CLIENTS (default 50; 1 measures the
path of a lone request).
"""
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import bench


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main():
    specs = sys.argv[1:]
    if not specs:
        sys.exit(__doc__)
    work = Path(tempfile.mkdtemp(prefix="legate-cpu-ab-"))
    c = bench.certs(work)
    services = bench.Procs(work)
    redis_port = bench.free_port()
    services.start("redis", ["redis-server", "--port", str(redis_port), "--save", "", "--dir", work])
    bench.wait_port(redis_port)
    pairs, procs = {}, []
    try:
        for i, spec in enumerate(specs):
            name, rest = spec.split("=", 1)
            binary, env_s, flags_s = (rest.split(":") + ["", ""])[:3]
            env = dict(kv.split("=", 1) for kv in env_s.split(",") if kv)
            flags = [f for f in flags_s.split(",") if f]
            d = work / f"c{i}"
            d.mkdir()
            p = bench.Procs(d)
            procs.append(p)
            hop = {"server": bench.free_port(), "client": bench.free_port()}
            hop["dial"] = hop["server"]
            bench.LEGATE = Path(binary)
            port = bench.legate(p, c, redis_port, hop, env=env, client_flags=flags)
            bench.wait_ready("legate", hop, port)
            server, client = p.procs
            pairs[name] = (port, server.pid, client.pid)
        n = int(os.environ.get("REQUESTS", "100000"))
        clients = os.environ.get("CLIENTS", "50")
        results = {name: ([], [], []) for name in pairs}
        for _ in range(int(os.environ.get("ROUNDS", "5"))):
            for name, (port, spid, cpid) in pairs.items():
                before = cpu_seconds(spid) + cpu_seconds(cpid)
                idle_before = bench.cpu_ticks()
                out = subprocess.run(bench.on("client", ["redis-benchmark", "-p", str(port), "-c", clients,
                                                         "-n", str(n), "-t", "set", "-q"]),
                                     capture_output=True, text=True, timeout=300).stdout
                rps = float(re.findall(r"([0-9.]+) requests per second", out)[-1])
                used = cpu_seconds(spid) + cpu_seconds(cpid) - before
                results[name][0].append(rps)
                results[name][1].append(used / n * 1e6)
                after = bench.cpu_ticks()
                results[name][2].append({cpu: bench.share(idle_before, after, cpu, (3, 4))
                                         for cpu in after if cpu != "cpu"})
        for name, (rps, us, idle) in results.items():
            idle_median = ", ".join(f"{c} {statistics.median(r[c] for r in idle):.0f}%"
                                    for c in sorted(idle[0]))
            print(f"{name}: {statistics.median(rps):,.0f} requests/s "
                  f"[{' '.join(f'{x:,.0f}' for x in rps)}], "
                  f"{statistics.median(us):.1f} us of CPU per request, both sides "
                  f"[{' '.join(f'{x:.1f}' for x in us)}], idle {idle_median}")
    finally:
        for p in procs:
            p.stop()
        services.stop()


if __name__ == "__main__":
    main()
