#!/usr/bin/env bash
# mDNS / DNS-SD discovery between two network namespaces joined by a veth pair (198.18.0.0/30),
# with no DNS server or registry: three server ambassadors and an impostor announce themselves
# (--announce) in one namespace; a client in the other finds them (--target=mdns:).
#   - the three are found and balanced over;
#   - one stopped with SIGTERM takes no new connection and withdraws its announcement (gone from
#     the client's list after RFC 6762's one-second goodbye hold);
#   - one killed with SIGKILL (no goodbye) is ejected by passive health, with no consumer error;
#   - the impostor (a certificate from another CA) is never used: its handshake fails;
#   - avahi-browse (avahi-daemon in the client's namespace) resolves the announcements.
# Needs root (namespaces); exit 77 when it cannot run here. By hand:
#   LEGATE_BIN=target/debug/legate tests/netns/mdns.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
. "$root/scripts/netns.sh"
legate=${LEGATE_BIN:-$root/target/release/legate}
legate=$(realpath "$legate")
a="lgmd-a-$$"
b="lgmd-b-$$"
test_namespaces mdns.sh "$a" "$b" "md-a$$" "md-b$$"

"$legate" gen-certs --out "$work/certs" --server-name 198.18.0.1 --client app >/dev/null
"$legate" gen-certs --out "$work/other" --server-name 198.18.0.1 --client app >/dev/null
c="$work/certs"

# Each server's service answers its own tag and closes: the consumer learns who served it.
ip netns exec "$a" python3 -c '
import socket, sys, threading
def serve(port, tag):
    l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind(("127.0.0.1", port)); l.listen(64)
    while True:
        s, _ = l.accept(); s.sendall(tag); s.close()
for port, tag in ((7001, b"one"), (7002, b"two"), (7003, b"three"), (7004, b"evil")):
    threading.Thread(target=serve, args=(port, tag), daemon=True).start()
open(sys.argv[1], "w").write("listening")
threading.Event().wait()
' "$work/tags" &
pids+=($!)
for _ in $(seq 200); do [ -f "$work/tags" ] && break; sleep 0.05; done

server() { # NAME PORT TARGET CERTDIR
    ip netns exec "$a" "$legate" server --listen="198.18.0.1:$2" \
        --target="127.0.0.1:$3" --cert="$4/server.crt" --key="$4/server.key" \
        --cacert="$4/ca.crt" --allow-cn=app --announce 2>"$work/$1.log" &
    pids+=($!)
    eval "pid_$1=$!"
}
server one 8443 7001 "$c"
server two 8444 7002 "$c"
server three 8445 7003 "$c"
server evil 8446 7004 "$work/other"

ip netns exec "$b" "$legate" client --listen=127.0.0.1:6000 --target=mdns: \
    --override-server-name=198.18.0.1 --cert="$c/app.crt" --key="$c/app.key" \
    --cacert="$c/ca.crt" --status=http://127.0.0.1:6001 2>"$work/client.log" &
pids+=($!)

# The client's view: how many endpoints its mDNS source gives now.
endpoints() {
    ip netns exec "$b" python3 -c '
import json, sys, urllib.error, urllib.request
try:
    s = json.load(urllib.request.urlopen("http://127.0.0.1:6001/_status", timeout=2))
except urllib.error.HTTPError as e:
    s = json.load(e)  # 503 while not every check passes: the body is the same JSON
except Exception as e:
    print(-1, e, file=sys.stderr); print(-1); sys.exit()
print(sum(src.get("endpoints", 0) for t in s["tunnels"] for src in t.get("sources", [])))
'
}
# Consumers: N connections; prints the tags received, "err" for a connection that got none.
consume() {
    ip netns exec "$b" python3 -c '
import socket, sys
for _ in range(int(sys.argv[1])):
    try:
        s = socket.create_connection(("127.0.0.1", 6000), timeout=5)
        got = b""
        while (d := s.recv(64)): got += d
        print(got.decode() or "err")
    except Exception:
        print("err")
' "$1"
}
fail() { echo "FAIL: $*"; for f in "$work"/*.log; do echo "--- $f"; tail -5 "$f"; done; exit 1; }

for _ in $(seq 200); do [ "$(endpoints)" = 4 ] && break; sleep 0.1; done
[ "$(endpoints)" = 4 ] || fail "the client did not find the four announcements (has $(endpoints))"
echo "found: 4 announced servers"

got=$(consume 120)
for tag in one two three; do
    n=$(grep -cx "$tag" <<<"$got" || true)
    [ "$n" -gt 0 ] || fail "server $tag served none of 120 connections: $(sort <<<"$got" | uniq -c)"
done
[ "$(grep -cx evil <<<"$got" || true)" = 0 ] || fail "the impostor served a connection"
[ "$(grep -cx err <<<"$got" || true)" = 0 ] || fail "consumers saw errors: $(sort <<<"$got" | uniq -c)"
echo "balanced: $(sort <<<"$got" | uniq -c | tr -s ' \n' ' ')(impostor 0, errors 0)"

# SIGTERM: the server stops taking connections at once (consumers fail over without an
# error), and withdraws its announcement with a goodbye. RFC 6762 (10.1) has a listener keep a
# record for one second after its goodbye, so the client drops it about a second later.
start=$(date +%s%N)
kill -TERM "$pid_one"
got=$(consume 30)
[ "$(grep -cx err <<<"$got" || true)" = 0 ] || fail "consumers saw errors after SIGTERM: $(sort <<<"$got" | uniq -c)"
[ "$(grep -cx one <<<"$got" || true)" = 0 ] || fail "the stopping server took new connections"
for _ in $(seq 200); do [ "$(endpoints)" = 3 ] && break; sleep 0.02; done
[ "$(endpoints)" = 3 ] || fail "the stopped server is still listed ($(endpoints))"
ms=$(( ($(date +%s%N) - start) / 1000000 ))
[ "$ms" -lt 2000 ] || fail "the withdrawal took $ms ms"
echo "withdrawn: 30 of 30 consumers served by the others at once; gone from the client's list $ms ms after SIGTERM (1 s of it the RFC's goodbye hold)"

# SIGKILL: no goodbye; passive health ejects it, consumers notice nothing.
kill -KILL "$pid_two"
got=$(consume 60)
[ "$(grep -cx err <<<"$got" || true)" = 0 ] || fail "consumers saw errors after SIGKILL: $(sort <<<"$got" | uniq -c)"
[ "$(grep -cx three <<<"$got" || true)" = 60 ] || fail "not all served by three: $(sort <<<"$got" | uniq -c)"
grep -q "ejected" "$work/client.log" || fail "the killed server was not ejected"
echo "killed: ejected by health; 60 of 60 consumers served by the remaining server"

if grep -q "outcome=ok" "$work/evil.log"; then fail "the impostor completed a connection"; fi

# avahi sees the announcement: avahi-daemon in the client's namespace, on a D-Bus of this test's
# own (a system bus may not run here) and with a /run of its own (its PID file and socket stay
# apart from a host's avahi-daemon), and avahi-browse asking it.
if command -v avahi-daemon >/dev/null && command -v avahi-browse >/dev/null \
    && command -v dbus-daemon >/dev/null; then
    cat >"$work/bus.conf" <<EOF
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path=$work/bus</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/> <allow own="*"/>
    <allow send_destination="*"/> <allow receive_sender="*"/>
  </policy>
</busconfig>
EOF
    printf '[server]\nuse-ipv6=no\nenable-dbus=yes\n[publish]\ndisable-publishing=yes\n' >"$work/avahi.conf"
    dbus-daemon --config-file="$work/bus.conf" --nofork 2>"$work/dbus.log" &
    pids+=($!)
    export DBUS_SYSTEM_BUS_ADDRESS="unix:path=$work/bus"
    for _ in $(seq 100); do [ -S "$work/bus" ] && break; sleep 0.05; done
    # ip netns exec runs it in a mount namespace of its own: the tmpfs is its alone.
    ip netns exec "$b" sh -c 'mount -t tmpfs none /run && exec avahi-daemon -f "$1" \
        --no-drop-root --no-chroot --no-rlimits' sh "$work/avahi.conf" 2>"$work/avahi.log" &
    pids+=($!)
    seen=""
    for _ in $(seq 20); do
        seen=$(ip netns exec "$b" timeout 5 avahi-browse -rpt _legate._tcp 2>/dev/null || true)
        grep -q '^=.*;198.18.0.1;8445;.*"routes=' <<<"$seen" && break
        sleep 0.2
    done
    grep -q '^=.*;198.18.0.1;8445;.*"routes=' <<<"$seen" \
        || fail "avahi-browse did not resolve the announcement: $seen $(cat "$work/avahi.log")"
    echo "avahi: avahi-browse resolves $(grep -c '^=' <<<"$seen") announcement(s), server three at 198.18.0.1:8445 among them"
else
    echo "avahi: skipped (avahi-daemon, avahi-browse or dbus-daemon not installed)"
fi
echo "PASS: mDNS discovery across namespaces"
