#!/usr/bin/env python3
"""Two legate builds, paired: 8 rounds alternating which goes first, each measuring new
connections per second (-k 0 PING, 50 clients) and Redis SET/GET with 50 clients; prints the
runs and the median and range of the per-round ratios (second / first). Quicker than ab.py
(no throughput, no HAProxy), for changes to the per-connection path.

  bench/quick_ab.py BEFORE AFTER      e.g. bench/quick_ab.py /tmp/legate-before target/release/legate
"""
import statistics
import sys
import tempfile
from pathlib import Path

import bench

if len(sys.argv) != 3:
    sys.exit(__doc__)
bins = sys.argv[1:]
work = Path(tempfile.mkdtemp(prefix="qab-"))
c = bench.certs(work)
services = bench.Procs(work)
rp, ip = bench.free_port(), bench.free_port()
services.start("redis", ["redis-server", "--port", str(rp), "--save", "", "--dir", work, "--maxclients", "20000"])
services.start("iperf3", ["iperf3", "-s", "-p", str(ip)])
bench.wait_port(rp); bench.wait_port(ip)
pairs, procs = {}, []
try:
    for i, b in enumerate(bins):
        bench.LEGATE = Path(b)
        d = work / f"c{i}"; d.mkdir()
        p = bench.Procs(d); procs.append(p)
        pairs[b] = bench.start_pairs("legate", p, c, rp, ip)
    res = {b: {"conn": [], "rps": []} for b in bins}
    for r in range(8):
        order = bins if r % 2 == 0 else bins[::-1]
        for b in order:
            res[b]["conn"].append(bench.rps(pairs[b]["redis"], "-c", "50", "-n", "8000", "-k", "0", "-t", "ping"))
            res[b]["rps"].append(bench.rps(pairs[b]["redis"], "-c", "50", "-n", "40000", "-t", "set,get"))
    a, b = bins
    for k in ("conn", "rps"):
        ratios = [y / x for x, y in zip(res[a][k], res[b][k])]
        print(k, "first", [round(x) for x in res[a][k]], "second", [round(x) for x in res[b][k]],
              "ratio median", round(statistics.median(ratios), 3), "range", round(min(ratios), 3), round(max(ratios), 3))
finally:
    for p in procs: p.stop()
    services.stop()
