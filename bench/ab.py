#!/usr/bin/env python3
"""A/B: several legate binaries (and HAProxy, optionally nginx) side by side, interleaved.

Each contender's pair stays up for the whole run; every round measures each of them in turn
(one-stream throughput, Redis SET/GET with 50 clients, new connections per second,
single-client PING p99), so drift in
the machine hits all of them alike. Prints the median and every round. Pinned like bench/run
(BENCH_PIN=0 turns it off). Used for the comparisons in docs/performance.md.

  bench/ab.py BINARY [BINARY ...]     e.g. bench/ab.py /tmp/legate-before target/release/legate

A BINARY may carry environment for its two processes alone, after a colon:
  target/release/legate:GLIBC_TUNABLES=glibc.cpu.x86_rep_movsb_threshold=2097152

AB_ROUNDS (default 4), AB_HAPROXY=0 to leave HAProxy out, AB_NGINX=1 to add nginx,
AB_LATENCY_ONLY=1 for single-client PING latency alone, measured as bench/run does (turns of
round trips from this script, each visiting every pair; p50 and p99 over all of them).
"""
import os
import statistics
import sys
import tempfile
from pathlib import Path

import bench


def main():
    binaries = sys.argv[1:]
    if not binaries:
        sys.exit(__doc__)
    work = Path(tempfile.mkdtemp(prefix="legate-ab-"))
    c = bench.certs(work)
    services = bench.Procs(work)
    redis_port, iperf_port = bench.free_port(), bench.free_port()
    services.start("redis", ["redis-server", "--port", str(redis_port), "--save", "", "--dir", work])
    services.start("iperf3", ["iperf3", "-s", "-p", str(iperf_port)])
    bench.wait_port(redis_port)
    bench.wait_port(iperf_port)

    contenders = [(f"legate{i} ({b})", b, "legate") for i, b in enumerate(binaries)]
    if os.environ.get("AB_HAPROXY", "1") == "1":
        contenders.append(("haproxy", None, "haproxy"))
    if os.environ.get("AB_NGINX") == "1":
        contenders.append(("nginx", None, "nginx"))

    pairs, procs = {}, []
    try:
        for i, (name, binary, kind) in enumerate(contenders):
            if binary:
                path, _, env = binary.partition(":")
                bench.LEGATE = Path(path)
                bench.LEGATE_ENV = dict([env.split("=", 1)]) if env else {}
            d = work / f"c{i}"
            d.mkdir()
            p = bench.Procs(d)
            procs.append(p)
            pairs[name] = bench.start_pairs(kind, p, c, redis_port, iperf_port)
        latency_only = os.environ.get("AB_LATENCY_ONLY") == "1"
        results = {n: {"gbps": [], "rps": [], "conn": [], "p50": [], "p99": []} for n in pairs}
        rounds = int(os.environ.get("AB_ROUNDS", "4"))
        if latency_only:
            # As bench/run measures it: short turns of PING round trips visiting every pair, a
            # tenth of bench/run's turns per round; the p99 of each fifth of the turns stands in
            # for the rounds.
            turns = rounds * bench.LATENCY_TURNS // 10
            lat = bench.interleaved_latency({n: p["redis"] for n, p in pairs.items()}, turns)
            for name, (p50, p99, parts, slow, cold) in lat.items():
                results[name]["p50"].append(p50)
                results[name]["p99"].append(p99)
                results[name]["fifths"] = parts
                results[name]["slow"] = slow
                results[name]["cold"] = cold
            rounds = 0
        for _ in range(rounds):
            for name, ports in pairs.items():
                r = results[name]
                r["gbps"].append(bench.iperf(ports["iperf"], 1))
                p50, p99 = bench.latency(ports["redis"])
                r["p50"].append(p50)
                r["p99"].append(p99)
                r["rps"].append(bench.rps(ports["redis"], "-c", "50", "-n", "50000", "-t", "set,get"))
                r["conn"].append(bench.conn_rps(ports["redis"]))
        for name, r in results.items():
            parts = []
            if r["gbps"]:
                parts.append(f"1 stream {statistics.median(r['gbps']):.2f} Gbit/s "
                             f"[{' '.join(f'{x:.2f}' for x in r['gbps'])}]")
                parts.append(f"redis 50 clients {statistics.median(r['rps']):,.0f}/s "
                             f"[{' '.join(f'{x:,.0f}' for x in r['rps'])}]")
                parts.append(f"new connections {statistics.median(r['conn']):,.0f}/s "
                             f"[{' '.join(f'{x:,.0f}' for x in r['conn'])}]")
            parts.append(f"p50 {statistics.median(r['p50']):.3f} ms")
            runs = r.get("fifths", r["p99"])
            parts.append(f"p99 {statistics.median(r['p99']):.3f} ms [{' '.join(f'{x:.3f}' for x in runs)}]")
            if "slow" in r:
                parts.append(f"slower than 3x p50: {r['slow'] * 100:.2f}%")
            if "cold" in r:
                parts.append(f"cold first of each turn p50/p99 {r['cold'][0]:.3f}/{r['cold'][1]:.3f} ms")
            print(f"{name}: " + ", ".join(parts))
    finally:
        for p in procs:
            p.stop()
        services.stop()


if __name__ == "__main__":
    main()
