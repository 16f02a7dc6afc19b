#!/usr/bin/env bash
# narrowpair.sh: what a narrow filter costs the traffic it does not match,
# measured side by side. Run as root from the repository:
#
#	internal/benchadapter/narrowpair.sh [ROUNDS]
#
# One sender namespace floods two receiver namespaces at the same time, each
# over its own veth pair, with 64-byte UDP datagrams to port 9000: two
# generators flat out on CPU 0, which also runs both receivers' input paths
# (veth). One receiver (alternating from round to round) runs the
# interceptor example with FILTER (default "udp.DstPort == 9999": the flood
# never matches); the other runs nothing. The scheduler gives both
# generators the same CPU time, so the ratio of what the two sinks received
# is the ratio of the two paths' cost per packet: the share of its no-rule
# rate the flood keeps through the handle's kernel rules. BARE=1 puts a
# hand-written one-rule table (udp dport 9999 accept) in the handle's place,
# the floor any input rule costs; AA=1 puts nothing there (the harness's own
# error, within 1%).
#
# Sequential runs (divertbench -modes none,narrow) compare moments of a VM
# whose no-rule rate drifts by tens of percent from run to run; here both
# flows share every moment.
#
# Knobs: FILTER, DUR [3] seconds per round, BENCH_DIR [../shared/bench]
# (its gen and sink are built into $OUT). Traffic stays inside three
# namespaces this script creates (10.200.1.0/24, 10.200.2.0/24, the range
# the bench's gen accepts) and removes on exit, also on failure; each
# generator is bounded in time.
set -Eeuo pipefail

ROUNDS=${1:-8}
FILTER=${FILTER:-udp.DstPort == 9999}
DUR=${DUR:-3}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
BENCH_DIR=${BENCH_DIR:-$REPO/../shared/bench}
OUT=${OUT:-${TMPDIR:-/tmp}/narrowpair}
mkdir -p "$OUT"

[ "$(id -u)" = 0 ] || { echo "narrowpair.sh: must run as root" >&2; exit 1; }
[ "$(nproc)" -ge 2 ] || { echo "narrowpair.sh: needs 2 CPUs" >&2; exit 1; }
(cd "$BENCH_DIR" && go build -trimpath -o "$OUT/" ./gen ./sink)
(cd "$REPO" && go build -o "$OUT/interceptor" ./examples/interceptor)

TX=nptx$$
R1=npr1$$
R2=npr2$$
HP=
cleanup() {
	if [ -n "$HP" ]; then kill "$HP" 2>/dev/null || true; fi
	for ns in "$R1" "$R2" "$TX"; do
		ip netns pids "$ns" 2>/dev/null | xargs -r kill 2>/dev/null || true
	done
	sleep 0.3
	for ns in "$TX" "$R1" "$R2"; do ip netns del "$ns" 2>/dev/null || true; done
}
trap cleanup EXIT

for ns in "$TX" "$R1" "$R2"; do
	ip netns add "$ns"
	ip -n "$ns" link set lo up
done
ip link add va netns "$TX" type veth peer name vr netns "$R1"
ip link add vb netns "$TX" type veth peer name vr netns "$R2"
ip -n "$TX" addr add 10.200.1.1/24 dev va
ip -n "$TX" addr add 10.200.2.1/24 dev vb
ip -n "$R1" addr add 10.200.1.2/24 dev vr
ip -n "$R2" addr add 10.200.2.2/24 dev vr
ip -n "$TX" link set va up
ip -n "$TX" link set vb up
ip -n "$R1" link set vr up
ip -n "$R2" link set vr up
for ns in "$R1" "$R2"; do
	taskset -c 1 ip netns exec "$ns" "$OUT/sink" -port 9000 -echo 0 -maxdur 1200s >/dev/null 2>&1 &
done
udp_in() { ip netns exec "$1" awk '/^Udp:/ {n++; if (n == 2) print $2}' /proc/net/snmp; }

: >"$OUT/rounds.txt"
for r in $(seq "$ROUNDS"); do
	if [ $((r % 2)) = 1 ]; then
		H=$R1 N=$R2 HD=10.200.1.2 ND=10.200.2.2
	else
		H=$R2 N=$R1 HD=10.200.2.2 ND=10.200.1.2
	fi
	if [ -n "${BARE:-}" ]; then
		ip netns exec "$H" nft -f - <<-'EOF'
			table inet bare {
				chain input {
					type filter hook input priority 0; policy accept;
					udp dport 9999 accept
				}
			}
		EOF
	elif [ -z "${AA:-}" ]; then
		taskset -c 1 ip netns exec "$H" "$OUT/interceptor" -filter "$FILTER" -quiet -duration 300s >/dev/null 2>&1 &
		HP=$!
		sleep 1
	fi
	h0=$(udp_in "$H") n0=$(udp_in "$N")
	taskset -c 0 ip netns exec "$TX" "$OUT/gen" -dst "$HD":9000 -dur "${DUR}s" -batch 64 >/dev/null &
	g1=$!
	taskset -c 0 ip netns exec "$TX" "$OUT/gen" -dst "$ND":9000 -dur "${DUR}s" -batch 64 >/dev/null &
	g2=$!
	wait "$g1" "$g2"
	sleep 0.3
	h1=$(udp_in "$H") n1=$(udp_in "$N")
	if [ -n "$HP" ]; then
		kill "$HP"
		wait "$HP" 2>/dev/null || true
		HP=
	fi
	if [ -n "${BARE:-}" ]; then ip netns exec "$H" nft delete table inet bare; fi
	python3 -c "h, n = $h1 - $h0, $n1 - $n0; print(f'round $r: with the rules {h / $DUR:.0f}/s, without {n / $DUR:.0f}/s, ratio {h / n:.4f}')" |
		tee -a "$OUT/rounds.txt"
done
python3 - "$OUT/rounds.txt" <<'PY'
import re, statistics as st, sys
r = [float(m.group(1)) for line in open(sys.argv[1]) for m in [re.search(r"ratio ([\d.]+)", line)] if m]
print(f"{len(r)} rounds: the flood keeps {st.median(r):.3f} of its no-rule rate (median; range {min(r):.3f}-{max(r):.3f})")
PY
