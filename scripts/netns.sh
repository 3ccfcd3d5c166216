# Sourced by the two-host demo and the link-cut test: joins two network namespaces with a veth
# pair, 198.18.0.1/30 in the first and 198.18.0.2/30 in the second (the range reserved for
# network benchmarks), loopback up in both. The first namespace must exist already: callers
# create it to learn whether this machine allows namespaces at all. Needs root.
# Usage: join_namespaces NS_A NS_B IF_A IF_B

join_namespaces() {
    local a=$1 b=$2 ifa=$3 ifb=$4
    ip netns add "$b"
    ip link add "$ifa" type veth peer name "$ifb"
    ip link set "$ifa" netns "$a"
    ip link set "$ifb" netns "$b"
    ip -n "$a" addr add 198.18.0.1/30 dev "$ifa"
    ip -n "$b" addr add 198.18.0.2/30 dev "$ifb"
    for ns in "$a" "$b"; do
        ip -n "$ns" link set lo up
    done
    ip -n "$a" link set "$ifa" up
    ip -n "$b" link set "$ifb" up
}

# For a test script run as root: two fresh namespaces NS_A and NS_B joined as above, a work
# directory in $work, and on exit every PID in the caller's pids array stopped, the namespaces
# removed and $work deleted. Exits 77 (skipped) when this is not root or namespaces are not
# allowed here.
# Usage: test_namespaces SCRIPT-NAME NS_A NS_B IF_A IF_B
test_namespaces() {
    local script=$1
    ns_a=$2 ns_b=$3
    if [ "$(id -u)" -ne 0 ]; then
        echo "$script: skipped: needs root to create network namespaces" >&2
        exit 77
    fi
    work=$(mktemp -d)
    pids=()
    trap _test_namespaces_cleanup EXIT
    if ! ip netns add "$ns_a" 2>"$work/netns.err"; then
        echo "$script: skipped: cannot create a network namespace here: $(cat "$work/netns.err")" >&2
        exit 77
    fi
    join_namespaces "$ns_a" "$ns_b" "$4" "$5"
}

_test_namespaces_cleanup() {
    set +e
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null; done
    ip netns del "$ns_a" 2>/dev/null
    ip netns del "$ns_b" 2>/dev/null
    rm -rf "$work"
}
