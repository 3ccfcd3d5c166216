#!/usr/bin/env bash
# The two-host demo: an application on one host reaches Redis on another host through a pair of
# legate ambassadors, over mutual TLS.
#
#   client-server (198.18.0.2)                     big-server (198.18.0.1)
#   redis-cli ─plain─▶ legate client ══mTLS══▶ legate server ─plain─▶ redis-server
#                      127.0.0.1:6380            198.18.0.1:8443        127.0.0.1:6379
#
# The two hosts are network namespaces joined by a veth pair (198.18.0.0/15 is reserved for
# network tests). Without the rights to create namespaces (or with LEGATE_DEMO_LOOPBACK=1), both
# "hosts" run on loopback. LEGATE_BIN=path skips the build.
# Everything started here is stopped, and the namespaces removed, on exit and on Ctrl-C.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
. "$root/scripts/need.sh"
. "$root/scripts/netns.sh"

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
say() { printf '    %s\n' "$*"; }

work=$(mktemp -d)
pids=()
big="legate-big-$$"
cli="legate-client-$$"
netns=0

cleanup() {
    set +e
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null
    done
    if [ "$netns" = 1 ]; then
        ip netns del "$big" 2>/dev/null
        ip netns del "$cli" 2>/dev/null
    fi
    rm -rf "$work"
}
trap cleanup EXIT
trap 'echo; echo "interrupted"; exit 130' INT TERM

# Polls a command until it succeeds, for at most $1 seconds.
wait_for() {
    local secs=$1
    shift
    local end=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        if [ $SECONDS -ge $end ]; then
            echo "error: timed out waiting for: $*" >&2
            return 1
        fi
        sleep 0.1
    done
}

# Prints a TCP port on 127.0.0.1 that nothing listens on (loopback mode only).
free_port() {
    local port
    while :; do
        port=$((20000 + RANDOM % 20000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return
        fi
    done
}

step "checking what the demo needs"
need redis-server redis-server redis-cli redis-tools
if [ -n "${LEGATE_BIN:-}" ]; then
    legate=$LEGATE_BIN
else
    say "building legate (cargo build --release)"
    (cd "$root" && cargo build --release --quiet)
    legate="$root/target/release/legate"
fi
say "legate: $legate"

step "creating two hosts"
if [ -z "${LEGATE_DEMO_LOOPBACK:-}" ] && [ "$(id -u)" -eq 0 ] && command -v ip >/dev/null 2>&1 && ip netns add "$big" 2>/dev/null; then
    netns=1
    join_namespaces "$big" "$cli" "lg-b$$" "lg-c$$"
    on_big=(ip netns exec "$big")
    on_cli=(ip netns exec "$cli")
    server_ip=198.18.0.1
    redis_port=6379 tls_port=8443 app_port=6380
    say "big-server:    namespace $big, 198.18.0.1"
    say "client-server: namespace $cli, 198.18.0.2 (veth pair between them)"
else
    say "cannot create network namespaces here (that needs root and iproute2):"
    say "running both 'hosts' on loopback instead; the tunnel is the same"
    on_big=()
    on_cli=()
    server_ip=127.0.0.1
    redis_port=$(free_port) tls_port=$(free_port) app_port=$(free_port)
fi

step "issuing certificates: legate gen-certs"
"$legate" gen-certs --out "$work/certs" --server-name big-server --server-name "$server_ip" --client app |
    sed 's/^/    /'

step "big-server: starting redis-server on 127.0.0.1:$redis_port (not reachable from outside)"
"${on_big[@]}" redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$work" >"$work/redis.log" 2>&1 &
pids+=($!)
wait_for 10 "${on_big[@]}" redis-cli -p "$redis_port" ping

step "big-server: starting the legate server on $server_ip:$tls_port"
c="$work/certs"
"${on_big[@]}" "$legate" server --listen="$server_ip:$tls_port" --target="127.0.0.1:$redis_port" \
    --cert="$c/server.crt" --key="$c/server.key" --cacert="$c/ca.crt" --allow-cn=app \
    >"$work/server.log" 2>&1 &
pids+=($!)
wait_for 10 grep -q listening "$work/server.log"
say "$(grep listening "$work/server.log")"

step "client-server: starting the legate client on 127.0.0.1:$app_port"
"${on_cli[@]}" "$legate" client --listen="127.0.0.1:$app_port" --target="$server_ip:$tls_port" \
    --cert="$c/app.crt" --key="$c/app.key" --cacert="$c/ca.crt" \
    >"$work/client.log" 2>&1 &
pids+=($!)
wait_for 10 grep -q listening "$work/client.log"
say "$(grep listening "$work/client.log")"

if [ "$netns" = 1 ]; then
    step "client-server: Redis itself is out of reach (redis-cli -h $server_ip -p $redis_port ping)"
    if "${on_cli[@]}" timeout 3 redis-cli -h "$server_ip" -p "$redis_port" ping >/dev/null 2>&1; then
        echo "error: redis answered directly; the demo network is not what it should be" >&2
        exit 1
    fi
    say "refused, as it should be: only the tunnel leads there"
fi

step "client-server: redis-cli -p $app_port ping (through the tunnel)"
reply=$("${on_cli[@]}" redis-cli -p "$app_port" ping)
say "$reply"
[ "$reply" = PONG ]

step "client-server: SET and GET through the tunnel"
say "SET greeting -> $("${on_cli[@]}" redis-cli -p "$app_port" set greeting "hello from client-server")"
value=$("${on_cli[@]}" redis-cli -p "$app_port" get greeting)
say "GET greeting -> $value"
[ "$value" = "hello from client-server" ]

step "big-server: the value is in Redis"
say "$("${on_big[@]}" redis-cli -p "$redis_port" get greeting)"

step "what the ambassadors logged"
wait_for 5 grep -q "connection closed" "$work/server.log"
grep "connection closed" "$work/server.log" | tail -n 1 | sed 's/^/    server: /'
grep "connection closed" "$work/client.log" | tail -n 1 | sed 's/^/    client: /'

step "done: the demo worked; stopping everything"
