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
