#!/usr/bin/env python3
"""Load: a legate pair in front of a real redis-server on loopback, then
  1. redis-benchmark through the tunnel for LOAD_REQUESTS requests (default 10 million, SET and
     GET, 50 clients, pipelined -P 16) and a check that none failed;
  2. LOAD_CONNS concurrent connections (default 10,000) held open for LOAD_HOLD seconds
     (default 60), each PINGed at the start and again at the end;
recording both ambassadors' resident memory, open descriptors and threads before, during and
after. Where the hard descriptor limit is too low for one pair to hold all connections (two per
connection and side), they are spread over as many pairs as it takes. Not part of CI; writes
bench/LOAD.md.

  bench/load.py          (after cargo build --release; installs nothing: run bench/run once)
"""
import os, resource, socket, subprocess, sys, tempfile, time
from pathlib import Path

from bench import PING, free_port, read_reply, wait_port

ROOT = Path(__file__).resolve().parent.parent
LEGATE = str(ROOT / "target" / "release" / "legate")
REQUESTS = int(os.environ.get("LOAD_REQUESTS", "10000000"))
CONNS = int(os.environ.get("LOAD_CONNS", "10000"))
HOLD = int(os.environ.get("LOAD_HOLD", "60"))
# Extra flags for both ambassadors, e.g. LOAD_LEGATE_ARGS="--keepalive=0".
EXTRA = os.environ.get("LOAD_LEGATE_ARGS", "").split()


def sample(pid):
    rss = next(int(l.split()[1]) for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS:"))
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    threads = len(os.listdir(f"/proc/{pid}/task"))
    return {"rss_kb": rss, "fds": fds, "threads": threads}


def kernel_drops():
    """Packets the kernel dropped from its per-CPU input backlog (loopback traffic goes through
    it), and connections it aborted after unanswered retransmissions or keepalive probes."""
    dropped = sum(int(l.split()[1], 16) for l in open("/proc/net/softnet_stat"))
    lines = open("/proc/net/netstat").read().splitlines()
    names, values = lines[0].split(), lines[1].split()
    aborted = int(values[names.index("TCPAbortOnTimeout")])
    return dropped, aborted


def ping(s):
    s.sendall(PING)
    got = read_reply(s)
    if got != b"+PONG\r\n":
        raise RuntimeError(f"unexpected reply {got!r}")


def start_pair(c, sp, cp, rp, env):
    server = subprocess.Popen([LEGATE, "server", f"--listen=127.0.0.1:{sp}", f"--target=127.0.0.1:{rp}",
                               f"--cert={c}/server.crt", f"--key={c}/server.key", f"--cacert={c}/ca.crt",
                               "--allow-cn=client", *EXTRA], env=env)
    client = subprocess.Popen([LEGATE, "client", f"--listen=127.0.0.1:{cp}", f"--target=127.0.0.1:{sp}",
                               f"--cert={c}/client.crt", f"--key={c}/client.key", f"--cacert={c}/ca.crt", *EXTRA],
                              env=env)
    return client, server


def main():
    # Each ambassador holds two descriptors per connection; legate raises its soft limit to the
    # hard one, which it inherits from here. Where the hard limit is below what one pair needs
    # for all connections (and cannot be raised), the connections are spread over as many pairs
    # as it takes, each in front of the same redis: the machine still holds them all at once.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * CONNS + 300
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, max(hard, need)))
        hard = max(hard, need)
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    npairs = -(-2 * CONNS // max(hard - 300, 2))  # each pair: two per connection, plus 300
    work = Path(tempfile.mkdtemp(prefix="legate-load-"))
    c = work / "certs"
    subprocess.run([LEGATE, "gen-certs", "--out", c, "--server-name", "127.0.0.1", "--client", "client"],
                   check=True, stdout=subprocess.DEVNULL)
    rp = free_port()
    env = {**os.environ, "RUST_LOG": os.environ.get("LOAD_RUST_LOG", "warn")}
    procs = [subprocess.Popen(["redis-server", "--port", str(rp), "--save", "", "--maxclients",
                               str(CONNS + 100), "--dir", work], stdout=subprocess.DEVNULL)]
    pairs = []  # (client, server, client port)
    for _ in range(npairs):
        sp, cp = free_port(), free_port()
        client, server = start_pair(c, sp, cp, rp, env)
        procs += [server, client]
        pairs.append((client, server, cp))
    cp = pairs[0][2]

    def sample_all():
        return [(sample(cl.pid), sample(sv.pid)) for cl, sv, _ in pairs]

    report = ["# legate load run", "",
              f"Run on {os.uname().nodename} ({os.cpu_count()} cores), "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, with `bench/load.py`.", ""]
    ok = False
    try:
        wait_port(rp, 20)
        for _, _, port in pairs:
            wait_port(port, 20)
        samples = {"start": sample_all()}

        # 1. Many requests, zero errors.
        t0 = time.monotonic()
        out = subprocess.run(["redis-benchmark", "-h", "127.0.0.1", "-p", str(cp), "-c", "50", "-P", "16",
                              "-n", str(REQUESTS // 2), "-t", "set,get", "--csv"],
                             capture_output=True, text=True, timeout=3600)
        took = time.monotonic() - t0
        rows = [l for l in out.stdout.splitlines() if l.startswith('"SET"') or l.startswith('"GET"')]
        errors = out.returncode != 0 or len(rows) != 2 or "rror" in out.stderr
        # Count what redis executed: every request arrived.
        info = subprocess.run(["redis-cli", "-p", str(rp), "info", "commandstats"],
                              capture_output=True, text=True).stdout
        calls = {k: int(v.split("calls=")[1].split(",")[0]) for k, v in
                 (l.split(":", 1) for l in info.splitlines() if l.startswith("cmdstat_"))}
        executed = calls.get("cmdstat_set", 0) + calls.get("cmdstat_get", 0)
        samples["after requests"] = sample_all()
        report += ["## Requests", "",
                   f"redis-benchmark -c 50 -P 16 -t set,get, {REQUESTS:,} requests through the first pair in "
                   f"{took:.0f} s ({REQUESTS / took:,.0f}/s); redis executed {executed:,} SET+GET; "
                   f"benchmark exit {out.returncode}, errors: {'yes' if errors else 'none'}.", ""]
        if executed != REQUESTS or errors:
            report.append(f"**FAILED**: expected {REQUESTS:,} executed and no errors. stderr: {out.stderr[-300:]}")

        # 2. Many connections, held, spread evenly over the pairs.
        drops_before = kernel_drops()
        conns = []
        t0 = time.monotonic()
        while len(conns) < CONNS:
            batch = [socket.create_connection(("127.0.0.1", pairs[(len(conns) + i) % npairs][2]), timeout=60)
                     for i in range(min(200, CONNS - len(conns)))]
            for s in batch:
                ping(s)
            conns += batch
        opened = time.monotonic() - t0
        samples[f"{CONNS} open"] = sample_all()
        deadline = time.monotonic() + HOLD
        while time.monotonic() < deadline:
            time.sleep(5)
        failed = 0
        for s in conns:
            try:
                ping(s)
            except (OSError, RuntimeError):
                failed += 1
        samples[f"after {HOLD} s"] = sample_all()
        drops = [b - a for a, b in zip(drops_before, kernel_drops())]
        for s in conns:
            s.close()
        end = time.monotonic() + 30
        while time.monotonic() < end and any(
                now[0]["fds"] > start[0]["fds"] + 70 for now, start in zip(sample_all(), samples["start"])):
            time.sleep(0.5)
        samples["all closed"] = sample_all()
        spread = ""
        if npairs > 1:
            spread = (f" over {npairs} pairs of ambassadors ({CONNS // npairs:,} each: the hard descriptor "
                      f"limit here is {hard:,} and cannot be raised, and one ambassador holding all "
                      f"{CONNS:,} would need two per connection, {need:,})")
        report += ["## Connections", "",
                   f"{CONNS:,} connections{spread} opened and PINGed in {opened:.1f} s, held {HOLD} s, "
                   f"PINGed again: {CONNS - failed:,} answered, {failed} failed. Meanwhile the kernel dropped "
                   f"{drops[0]:,} packets from its input backlog and aborted {drops[1]:,} connections on timeout "
                   f"(keepalive probes or retransmissions unanswered). Flags for the ambassadors: "
                   f"{' '.join(EXTRA) or 'defaults'}.", ""]
        report += ["## The ambassadors", "",
                   "| when | pair | client RSS (KB) | client fds | client threads | server RSS (KB) | server fds | server threads |",
                   "|---|---|---|---|---|---|---|---|"]
        for when, per_pair in samples.items():
            for i, (cs, ss) in enumerate(per_pair):
                report.append(f"| {when} | {i + 1} | {cs['rss_kb']:,} | {cs['fds']:,} | {cs['threads']} | "
                              f"{ss['rss_kb']:,} | {ss['fds']:,} | {ss['threads']} |")
        report.append("")
        report.append("After all connections closed the descriptors return to the start plus the "
                      "client's pool (ready connections, and returned ones until the server's idle limit). "
                      "Resident memory stays at its peak: the allocator keeps the freed heap for reuse "
                      "rather than returning it to the system.")
        ok = executed == REQUESTS and not errors and failed == 0
    finally:
        for p in procs:
            p.terminate()
            p.wait()
    text = "\n".join(report) + "\n"
    print(text)
    (ROOT / "bench" / "LOAD.md").write_text(text)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
