#!/usr/bin/env bash
# Guest side of tests/vm/test_fast_path.py: policy.fast_path on a kernel with flowtables.
#
# Runs as root in Debian's stock kernel (tests/vm/harness.py). Our hosts' kernel has no
# flowtables (CONFIG_NF_FLOW_TABLE off), so this is where the fast path is proven:
#
#   a (192.168.1.10) eth0 --veth-- lan0 r wan0 --veth-- eth0 b (203.0.113.10)
#
# r applies CONFIG (a tcp-relay selector on 8443, so the flowtable rule carries
# nfgate's mark exclusion; lan zone also names ppp9, which does not exist) with
# `nfgate apply`, then replaces it with NARROW's rendering (no rule from lan to wan), as a
# reload would. Each finding is one `key=value` line on stdout; the host judges.
# Usage: guest_fast_path.sh OUT PYTHON REPO
set -u
out=$1 python=$2 repo=$3
p=nfgfp
a=${p}a r=${p}r b=${p}b
step() { echo "step=$* at $(date +%s)"; }
inns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }
nfgate() { inns $r env PYTHONPATH="$repo" PYTHONDONTWRITEBYTECODE=1 "$python" -m firewall.cli "$@"; }
# Connections of r's conntrack table to b's port $1, one line each.
ct() { inns $r conntrack -L -p tcp --dport "$1" 2>/dev/null; }
# The largest original-direction byte count of those connections (the data connection's).
ct_bytes() { ct "$1" | awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^bytes=/) { split($i, b, "="); if (b[2] > m) m = b[2]; break } } END { print m + 0 }'; }
# Poll (bounded) while client $2 runs until conntrack shows a connection to port $1 offloaded: 1 or 0.
seen_offloaded() {
	local i
	for i in $(seq 1 600); do
		ct "$1" | grep -q OFFLOAD && { echo 1; return; }
		kill -0 "$2" 2>/dev/null || break
		sleep 0.1
	done
	echo 0
}

step modules
modprobe -a nf_tables nf_conntrack nf_nat nft_ct nft_nat nft_chain_nat nft_masq nft_fib_inet nft_fib_ipv4 \
	nft_fib_ipv6 nft_reject_inet nft_queue nf_flow_table nf_flow_table_inet nft_flow_offload veth
sysctl -qw net.netfilter.nf_conntrack_acct=1
step lab
for n in $a $r $b; do ip netns add $n; done
ip link add eth0 netns $a type veth peer name lan0 netns $r
ip link add eth0 netns $b type veth peer name wan0 netns $r
ip -n $a addr add 192.168.1.10/24 dev eth0
ip -n $r addr add 192.168.1.1/24 dev lan0
ip -n $r addr add 203.0.113.1/24 dev wan0
ip -n $b addr add 203.0.113.10/24 dev eth0
for x in "$a eth0" "$r lan0" "$r wan0" "$b eth0"; do set -- $x; ip -n $1 link set $2 up; done
for n in $a $r $b; do ip -n $n link set lo up; done
ip -n $a route add default via 192.168.1.1
inns $r sysctl -qw net.ipv4.ip_forward=1
inns $r sysctl -qw net.netfilter.nf_conntrack_acct=1

step apply
nfgate apply -c "$out/nfgate.toml" > "$out/apply.out" 2>&1
echo "apply_rc=$?"
sed 's/^/apply: /' "$out/apply.out"
echo "devices=$(inns $r nft -j list flowtables 2>/dev/null | "$python" -c '
import json, sys
for item in json.load(sys.stdin)["nftables"]:
    if "flowtable" in item:
        print(",".join(item["flowtable"].get("dev", [])))')"

step traffic
for port in 5201 5202 5203 5204; do inns $b iperf3 -s -p $port -D; done
for port in 5201 5202 5203 5204; do
	for i in $(seq 1 50); do inns $b ss -ltn | grep -q ":$port " && break; sleep 0.1; done
done
# A connection with nfgate's connection mark, as a gateway flow's, log-only or dynamic-rule flow's.
inns $r nft -f - <<'EOF'
table inet probe {
	chain tag {
		type filter hook prerouting priority mangle; policy accept;
		tcp dport 5202 ct mark set ct mark | 0x00010000
	}
}
EOF
# 1: a gateway-free flow of known size: offloaded, and conntrack still counts its bytes.
inns $a iperf3 -c 203.0.113.10 -p 5201 -n 200M > "$out/plain.iperf" 2>&1 &
plain=$!
echo "plain_offloaded=$(seen_offloaded 5201 $plain)"
# 2: nfgate's own: never offloaded, counted by conntrack through the forward chain.
inns $a iperf3 -c 203.0.113.10 -p 5202 -n 50M > "$out/marked.iperf" 2>&1 &
marked=$!
# Looked at for as long as it runs (bounded): never once offloaded.
offloaded=0
for i in $(seq 1 600); do
	kill -0 $marked 2>/dev/null || break
	offloaded=$((offloaded + $(ct 5202 | grep -c OFFLOAD)))
	sleep 0.1
done
echo "marked_offloaded_while_running=$offloaded"
wait $marked; echo "marked_rc=$?"
wait $plain; echo "plain_rc=$?"
ct 5201 | sed 's/^/plain_ct=/'
echo "plain_sent=$(grep -E 'sender$' "$out/plain.iperf" | head -1)"
ct 5202 | sed 's/^/marked_ct=/'
echo "marked_sent=$(grep -E 'sender$' "$out/marked.iperf" | head -1)"

# 3: a reload that removes the accepting rule: the established flow goes on (still carried,
# offloaded again), a new one is refused. The client runs until stopped: an apply takes a while
# in software emulation.
inns $a iperf3 -c 203.0.113.10 -p 5203 -t 300 > "$out/reload.iperf" 2>&1 &
long=$!
echo "long_offloaded=$(seen_offloaded 5203 $long)"
# What `nfgate apply -c narrow.toml` loads, rendered on the host (an apply's Python start takes
# minutes in software emulation): the filter's table, then the fast path's.
inns $r nft -f "$out/narrow.nft" && inns $r nft -f "$out/narrow_fast.nft"
echo "narrow_rc=$?"
before=$(ct_bytes 5203)
grew=0
for i in $(seq 1 600); do
	[ "$(ct_bytes 5203)" -gt $((before + 10000000)) ] && { grew=1; break; }
	sleep 0.1
done
echo "long_grew_after_narrow=$grew"
echo "long_offloaded_after_narrow=$(seen_offloaded 5203 $long)"
inns $a timeout 10 iperf3 -c 203.0.113.10 -p 5204 -t 1 --connect-timeout 2000 > /dev/null 2>&1
echo "new_after_narrow_rc=$?"
# $long is the subshell around `ip netns exec`: the client is the namespace's only process.
ip netns pids $a | xargs -r kill; wait $long


step done
for n in $a $r $b; do ip netns pids $n | xargs -r kill 2>/dev/null; done
exit 0
