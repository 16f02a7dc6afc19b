#!/usr/bin/env bash
# simul.sh: our batch loop and C libnetfilter_queue's batch loop (the shared
# bench's cnfq -b 64) measured AT THE SAME TIME, each on its own queue and
# its own flows through the same namespaces, so that both see the same
# state of the machine. Run as root from the repository:
#
#	internal/benchadapter/simul.sh [ROUNDS]
#
# Each round starts both daemons (their queues swap from round to round, so
# that neither position favours one), then
#   - floods each queue with GEN_PPS datagrams per second (64 bytes) for DUR
#     seconds, both generators on CPU 0, and reads each daemon's CPU time
#     (every thread's schedstat) and the packets its queue took
#     (/proc/net/netfilter/nfnetlink_queue): CPU ns per packet;
#   - sends PINGS sequential echo round trips to each daemon's echo port, in
#     PBLK alternating blocks: RTT p50 per daemon.
# It prints per round the ratio ours/C of CPU per packet and the difference
# ours-C of RTT p50, and at the end their medians, then their means with
# standard errors (how far a median of N rounds can be trusted: RTT medians
# of separate runs move by several us). Daemons, echo servers and
# ping clients run on CPU 1, as run.sh's PIN=split places them.
#
# Sequential runs (run.sh, one daemon after the other) compare moments of
# a VM whose speed drifts by tens of percent between runs; here the two
# share every moment, and two copies of the same daemon measure within 1-2%
# of each other (OTHER=<our adapter binary> runs that A/A check, or
# compares two builds).
#
# With LONE=N (default 0, off) each round ends with N lone packets per
# daemon: single pings, each from a new ping client, alternating between
# the two echo ports LONE_GAP seconds apart [0.02], so that every packet
# finds its daemon idle (on Linux a lone packet wakes a waiting reader
# cold; see internal/nfq's Conn): CPU per lone packet (ours/C) and the
# lone round trip's p50 (ours-C), printed after the other figures.
#
# Knobs: OURS (adapter binary; default: built from this package), OTHER
# (C, or a second adapter binary), GEN_PPS [50000] per queue, DUR [3],
# PINGS [2000] per daemon per round, PBLK [4], LONE [0], LONE_GAP [0.02],
# BENCH_DIR [../shared/bench] (the shared bench: its gen, sink and cnfq are
# built into $OUT).
# PINGS is run.sh's count: with fewer, the costs each block pays once (a
# daemon that idled through the other's block waits cold for its first
# packet, then turns hot) weigh on the idle CPU per packet: at 400 pings a
# round our idle ratio read 1.35-1.41, at 2000 1.27.
# Traffic stays inside two namespaces this script creates (10.200.1.0/24,
# the range the bench's gen accepts) and removes on exit, also on failure;
# every generator and ping client is bounded in count and time.
set -Eeuo pipefail

ROUNDS=${1:-6}
GEN_PPS=${GEN_PPS:-50000}
DUR=${DUR:-3}
PINGS=${PINGS:-2000}
PBLK=${PBLK:-4}
LONE=${LONE:-0}
LONE_GAP=${LONE_GAP:-0.02}
OTHER=${OTHER:-C}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
BENCH_DIR=${BENCH_DIR:-$REPO/../shared/bench}
OUT=${OUT:-${TMPDIR:-/tmp}/simul}
mkdir -p "$OUT"

[ "$(id -u)" = 0 ] || { echo "simul.sh: must run as root" >&2; exit 1; }
[ "$(nproc)" -ge 2 ] || { echo "simul.sh: needs 2 CPUs" >&2; exit 1; }
(cd "$BENCH_DIR" && go build -trimpath -o "$OUT/" ./gen ./sink)
gcc -O2 -Wall -o "$OUT/cnfq" "$BENCH_DIR/cnfq/cnfq.c" -lnetfilter_queue -lnfnetlink
if [ -z "${OURS:-}" ]; then
	OURS=$OUT/ours
	(cd "$REPO" && go build -o "$OURS" ./internal/benchadapter)
fi

TX=simtx$$
RX=simrx$$
PIDS=()
stop_daemons() {
	local p
	for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
	for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
	PIDS=()
}
cleanup() {
	stop_daemons
	ip netns pids "$RX" 2>/dev/null | xargs -r kill 2>/dev/null || true
	ip netns pids "$TX" 2>/dev/null | xargs -r kill 2>/dev/null || true
	sleep 0.2
	ip netns del "$TX" 2>/dev/null || true
	ip netns del "$RX" 2>/dev/null || true
}
trap cleanup EXIT

ip netns add "$TX"
ip netns add "$RX"
ip link add vtx netns "$TX" type veth peer name vrx netns "$RX"
ip -n "$TX" addr add 10.200.1.1/24 dev vtx
ip -n "$RX" addr add 10.200.1.2/24 dev vrx
for ns in "$TX" "$RX"; do
	ip -n "$ns" link set lo up
done
ip -n "$TX" link set vtx up
ip -n "$RX" link set vrx up
# queue q takes bulk port 9000+2q and echo port 9001+2q
for q in 0 1; do
	for p in $((9000 + 2 * q)) $((9001 + 2 * q)); do
		ip netns exec "$RX" iptables -A INPUT -p udp --dport "$p" -j NFQUEUE --queue-num "$q"
	done
	taskset -c 1 ip netns exec "$RX" "$OUT/sink" -port $((9000 + 2 * q)) -echo $((9001 + 2 * q)) -maxdur 1200s >/dev/null 2>&1 &
done

start() { # start QUEUE BIN: the daemon's pid in SP
	if [ "$2" = C ]; then
		taskset -c 1 ip netns exec "$RX" "$OUT/cnfq" -q "$1" -l 4096 -r 4194304 -b 64 -t 1200 >/dev/null 2>&1 &
	else
		taskset -c 1 ip netns exec "$RX" "$2" -q "$1" -qlen 4096 -rcvbuf 4194304 -t 1200s >/dev/null 2>&1 &
	fi
	SP=$!
	PIDS+=("$SP")
}
sched_ns() { # CPU ns of every thread of process $1
	local t s=0
	if [ ! -d /proc/"$1"/task ]; then
		echo "simul.sh: daemon $1 has exited (its stderr went to /dev/null: run it by hand)" >&2
		return 1
	fi
	for t in /proc/"$1"/task/*/schedstat; do s=$((s + $(cut -d' ' -f1 "$t"))); done
	echo "$s"
}
qstat() { # queue $1: packets queued so far (id sequence) and dropped
	ip netns exec "$RX" awk -v q="$1" '$1 == q {print $8, $6 + $7}' /proc/net/netfilter/nfnetlink_queue
}
ping_p50() { # echo port $1, n $2[, warm-up round trips $3] -> p50 in µs
	taskset -c 1 ip netns exec "$TX" "$OUT/gen" -ping -dst 10.200.1.2:"$1" -n "$2" -warm "${3:-20}" -dur 20s |
		awk -F= '$1 == "rtt_p50_us" {print $2}'
}

: >"$OUT/rounds.txt"
for r in $(seq "$ROUNDS"); do
	# odd rounds: C (or OTHER) on queue 0, ours on queue 1; even rounds swapped
	if [ $((r % 2)) = 1 ]; then qc=0 qo=1; else qc=1 qo=0; fi
	start "$qc" "$OTHER"
	dc=$SP
	start "$qo" "$OURS"
	do=$SP
	sleep 1
	c0=$(sched_ns "$dc") o0=$(sched_ns "$do")
	read -r nc0 _ < <(qstat "$qc")
	read -r no0 _ < <(qstat "$qo")
	taskset -c 0 ip netns exec "$TX" "$OUT/gen" -dst 10.200.1.2:$((9000 + 2 * qc)) -dur "${DUR}s" -pps "$GEN_PPS" -batch 64 >/dev/null &
	g1=$!
	taskset -c 0 ip netns exec "$TX" "$OUT/gen" -dst 10.200.1.2:$((9000 + 2 * qo)) -dur "${DUR}s" -pps "$GEN_PPS" -batch 64 >/dev/null &
	g2=$!
	wait "$g1" "$g2"
	sleep 0.2
	c1=$(sched_ns "$dc") o1=$(sched_ns "$do")
	read -r nc1 dropc < <(qstat "$qc")
	read -r no1 dropo < <(qstat "$qo")
	read -r ic0 _ < <(qstat "$qc")
	read -r io0 _ < <(qstat "$qo")
	pc=() po=()
	for k in $(seq "$PBLK"); do
		if [ $((k % 2)) = 1 ]; then
			pc+=("$(ping_p50 $((9001 + 2 * qc)) $((PINGS / PBLK)))")
			po+=("$(ping_p50 $((9001 + 2 * qo)) $((PINGS / PBLK)))")
		else
			po+=("$(ping_p50 $((9001 + 2 * qo)) $((PINGS / PBLK)))")
			pc+=("$(ping_p50 $((9001 + 2 * qc)) $((PINGS / PBLK)))")
		fi
	done
	c2=$(sched_ns "$dc") o2=$(sched_ns "$do")
	read -r ic1 _ < <(qstat "$qc")
	read -r io1 _ < <(qstat "$qo")
	lc=() lo=()
	for _ in $(seq "$LONE"); do
		lc+=("$(ping_p50 $((9001 + 2 * qc)) 1 0)")
		sleep "$LONE_GAP"
		lo+=("$(ping_p50 $((9001 + 2 * qo)) 1 0)")
		sleep "$LONE_GAP"
	done
	c3=$(sched_ns "$dc") o3=$(sched_ns "$do")
	read -r lc1 _ < <(qstat "$qc")
	read -r lo1 _ < <(qstat "$qo")
	stop_daemons
	python3 - "$r" "$c0" "$c1" "$o0" "$o1" "$nc0" "$nc1" "$no0" "$no1" "$dropc" "$dropo" \
		"$c2" "$o2" "$ic0" "$ic1" "$io0" "$io1" "$c3" "$o3" "$lc1" "$lo1" \
		"${pc[*]}" "${po[*]}" "${lc[*]}" "${lo[*]}" <<'PY' | tee -a "$OUT/rounds.txt"
import statistics as st, sys
(r, c0, c1, o0, o1, nc0, nc1, no0, no1, dc, do, c2, o2, ic0, ic1, io0, io1,
 c3, o3, lc1, lo1) = map(int, sys.argv[1:22])
pc, po, lc, lo = ([float(x) for x in a.split()] for a in sys.argv[22:26])
cc, co = (c1 - c0) / max(nc1 - nc0, 1), (o1 - o0) / max(no1 - no0, 1)
ic, io = (c2 - c1) / max(ic1 - ic0, 1), (o2 - o1) / max(io1 - io0, 1)
line = (f"round {r}: cpu/pkt C {cc:.0f} ns, ours {co:.0f} ns, ratio {co / cc:.4f}; "
        f"packets {nc1 - nc0} and {no1 - no0}, dropped {dc} and {do}; "
        f"idle cpu/pkt C {ic:.0f} ns, ours {io:.0f} ns, ratio {io / ic:.4f}; "
        f"rtt p50 C {st.median(pc):.1f}, ours {st.median(po):.1f}, diff {st.median(po) - st.median(pc):+.1f} us")
if lc and lo:  # a lost reply leaves its ping out
    lcc, lco = (c3 - c2) / max(lc1 - ic1, 1), (o3 - o2) / max(lo1 - io1, 1)
    line += (f"; lone packets {lc1 - ic1} and {lo1 - io1}, cpu/pkt C {lcc:.0f} ns, ours {lco:.0f} ns, "
             f"lone ratio {lco / lcc:.3f}; lone rtt p50 C {st.median(lc):.1f}, ours {st.median(lo):.1f}, "
             f"lone diff {st.median(lo) - st.median(lc):+.1f} us")
print(line)
PY
done
python3 - "$OUT/rounds.txt" <<'PY'
import re, statistics as st, sys
ratios, idle, diffs = [], [], []
for line in open(sys.argv[1]):
    m = re.search(r"ours \d+ ns, ratio ([\d.]+);.*?idle cpu/pkt C \d+ ns, ours \d+ ns, ratio ([\d.]+);"
                  r".*?rtt p50 C [\d.]+, ours [\d.]+, diff ([-+\d.]+) us", line)
    if m:
        ratios.append(float(m.group(1)))
        idle.append(float(m.group(2)))
        diffs.append(float(m.group(3)))
print(f"{len(ratios)} rounds: CPU per packet ours/C median {st.median(ratios):.3f} "
      f"(range {min(ratios):.3f}-{max(ratios):.3f}); idle CPU per packet {st.median(idle):.3f} "
      f"(range {min(idle):.3f}-{max(idle):.3f}); RTT p50 ours-C median {st.median(diffs):+.1f} us "
      f"(range {min(diffs):+.1f} to {max(diffs):+.1f})")
lone, lonediff = [], []
for line in open(sys.argv[1]):
    m = re.search(r"lone ratio ([\d.]+);.*lone diff ([-+\d.]+) us", line)
    if m:
        lone.append(float(m.group(1)))
        lonediff.append(float(m.group(2)))
if lone:
    print(f"lone packets: CPU per packet ours/C median {st.median(lone):.2f} (range {min(lone):.2f}-{max(lone):.2f}); "
          f"RTT p50 ours-C median {st.median(lonediff):+.1f} us (range {min(lonediff):+.1f} to {max(lonediff):+.1f})")
if len(ratios) > 1:
    se = lambda x: st.stdev(x) / len(x) ** 0.5
    print(f"means, with their standard errors: CPU per packet {st.mean(ratios):.3f} ± {se(ratios):.3f}; "
          f"idle CPU per packet {st.mean(idle):.3f} ± {se(idle):.3f}; "
          f"RTT p50 ours-C {st.mean(diffs):+.1f} ± {se(diffs):.1f} us")
PY
