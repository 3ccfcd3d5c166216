#!/usr/bin/env python3
"""Resident memory per idle connection of a legate pair, per side: opens N connections through
a legate client and server to a redis-server on loopback, PINGs through each, and divides each
process's RSS growth by N. Extra arguments go to `legate client` (e.g. --pool-size=0).

  python3 bench/idle_memory.py [N] [client flags...]      (after cargo build --release)
"""
import os, socket, subprocess, sys, tempfile, time
from pathlib import Path

from bench import PING, free_port, read_reply, wait_port

ROOT = Path(__file__).resolve().parent.parent
LEGATE = str(ROOT / "target" / "release" / "legate")


def rss_kb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])


def main():
    args = sys.argv[1:]
    n = int(args.pop(0)) if args and args[0].isdigit() else 2000
    work = Path(tempfile.mkdtemp(prefix="legate-mem-"))
    c = work / "certs"
    subprocess.run([LEGATE, "gen-certs", "--out", c, "--server-name", "127.0.0.1", "--client", "client"],
                   check=True, stdout=subprocess.DEVNULL)
    rp, sp, cp = free_port(), free_port(), free_port()
    procs = [subprocess.Popen(["redis-server", "--port", str(rp), "--save", "", "--maxclients", "20000",
                               "--dir", work], stdout=subprocess.DEVNULL)]
    env = {**os.environ, "RUST_LOG": "warn"}
    server = subprocess.Popen([LEGATE, "server", f"--listen=127.0.0.1:{sp}", f"--target=127.0.0.1:{rp}",
                               f"--cert={c}/server.crt", f"--key={c}/server.key", f"--cacert={c}/ca.crt",
                               "--allow-all"], env=env)
    client = subprocess.Popen([LEGATE, "client", f"--listen=127.0.0.1:{cp}", f"--target=127.0.0.1:{sp}",
                               f"--cert={c}/client.crt", f"--key={c}/client.key", f"--cacert={c}/ca.crt",
                               *args], env=env)
    procs += [server, client]
    try:
        wait_port(rp)
        wait_port(cp)
        time.sleep(0.5)
        before = rss_kb(client.pid), rss_kb(server.pid)
        conns = []
        while len(conns) < n:
            batch = []
            for _ in range(min(100, n - len(conns))):
                s = socket.create_connection(("127.0.0.1", cp), timeout=60)
                s.sendall(PING)
                batch.append(s)
            for s in batch:
                read_reply(s)
            conns += batch
        time.sleep(1)
        after = rss_kb(client.pid), rss_kb(server.pid)
        per = [(a - b) / n for a, b in zip(after, before)]
        print(f"{n} idle connections: client side {per[0]:.1f} KB, server side {per[1]:.1f} KB, "
              f"both {sum(per):.1f} KB per connection")
    finally:
        for p in procs:
            p.terminate()
            p.wait()


if __name__ == "__main__":
    main()
