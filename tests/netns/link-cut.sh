#!/usr/bin/env bash
# The link between the two ambassadors is cut without a FIN: two network namespaces joined by a
# veth pair (198.18.0.0/30), a legate server (with an echo target) in one, a legate client in
# the other, a consumer holding an idle connection through them. The veth is taken down; TCP
# keepalive (--keepalive=3s: probes after 3 s idle, every 1 s, 3 of them) must notice, and the
# consumer must see its connection closed within the configured time (3 + 3 x 1 s, plus slack).
#
# Needs root with CAP_NET_ADMIN (namespaces). scripts/test runs it after cargo test when the
# machine allows namespaces; exit 77 means it could not run here (not a failure). By hand:
#   LEGATE_BIN=target/debug/legate tests/netns/link-cut.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
. "$root/scripts/netns.sh"
legate=${LEGATE_BIN:-$root/target/release/legate}
a="lgcut-a-$$"
b="lgcut-b$$"
test_namespaces link-cut.sh "$a" "$b" "lc-a$$" "lc-b$$"

"$legate" gen-certs --out "$work/certs" --server-name 198.18.0.1 --client app >/dev/null
c="$work/certs"
# The target: an echo on the server's loopback; it says when it listens.
ip netns exec "$a" python3 -c '
import socket, sys, threading
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", 7000)); l.listen(16)
open(sys.argv[1], "w").write("listening")
def echo(s):
    while (d := s.recv(4096)): s.sendall(d)
while True:
    s, _ = l.accept(); threading.Thread(target=echo, args=(s,), daemon=True).start()
' "$work/target-listening" &
pids+=($!)
# The consumer's first connection must find the target listening (until 2026-12-02 a slow
# python start could lose that race: the server's dial was refused and the echo never came).
for _ in $(seq 200); do [ -f "$work/target-listening" ] && break; sleep 0.05; done
[ -f "$work/target-listening" ] || { echo "FAIL: the echo target did not start listening"; exit 1; }
ip netns exec "$a" "$legate" server --listen=198.18.0.1:8443 --target=127.0.0.1:7000 \
    --cert="$c/server.crt" --key="$c/server.key" --cacert="$c/ca.crt" --allow-cn=app \
    --keepalive=3s 2>"$work/server.log" &
pids+=($!)
ip netns exec "$b" "$legate" client --listen=127.0.0.1:7001 --target=198.18.0.1:8443 \
    --cert="$c/app.crt" --key="$c/app.key" --cacert="$c/ca.crt" --keepalive=3s \
    2>"$work/client.log" &
pids+=($!)

# Both ambassadors listening before the consumer's connection, for the same reason.
for _ in $(seq 200); do
    [ "$(grep -l "INFO listening" "$work/server.log" "$work/client.log" 2>/dev/null | wc -l)" -eq 2 ] && break
    sleep 0.05
done

# The consumer: connects, gets an echo, goes idle; reports when its connection closes.
ip netns exec "$b" python3 - "$work/ready" <<'EOF' &
import socket, sys, time
for _ in range(200):
    try:
        s = socket.create_connection(("127.0.0.1", 7001), timeout=1); break
    except OSError:
        time.sleep(0.05)
s.settimeout(None)
s.sendall(b"hello")
assert s.recv(16) == b"hello"
open(sys.argv[1], "w").write("ready")
try:
    got = s.recv(16)
except OSError:
    got = b""
print(f"consumer: connection closed ({got!r}) at {time.monotonic():.2f}", flush=True)
EOF
consumer=$!
pids+=($consumer)
for _ in $(seq 200); do [ -f "$work/ready" ] && break; sleep 0.05; done
[ -f "$work/ready" ] || { echo "FAIL: the consumer never got its echo"; cat "$work"/*.log; exit 1; }

cut=$(python3 -c 'import time; print(f"{time.monotonic():.2f}")')
echo "link cut at $cut (veth down on the client's side, no FIN sent)"
ip -n "$b" link set "lc-b$$" down
# Keepalive notices the cut after 3 s idle + 3 probes 1 s apart = 6 s; allow 4 s of slack.
limit=10
for _ in $(seq $((limit * 10))); do
    kill -0 "$consumer" 2>/dev/null || break
    sleep 0.1
done
if kill -0 "$consumer" 2>/dev/null; then
    echo "FAIL: the consumer's connection was still open $limit s after the cut"
    exit 1
fi
wait "$consumer"
end=$(python3 -c 'import time; print(f"{time.monotonic():.2f}")')
echo "detected within $(python3 -c "print(f'{$end - $cut:.1f}')") s of the cut (keepalive 3 s + 3 probes at 1 s = 6 s)"
line=$(grep -h "connection closed\|connection failed" "$work/client.log" | tail -n 1)
echo "$line"
case "$line" in
*outcome=aborted*) echo "PASS: the client side logged the broken link as aborted" ;;
*) echo "FAIL: expected outcome=aborted in the client's log line"; exit 1 ;;
esac
