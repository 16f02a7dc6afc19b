#!/usr/bin/env bash
# Runs the windows/amd64 test binaries of the pure packages (and the root
# package's driver-free tests, selected with -test.run) under Wine, and fails
# when a test fails, a binary does not build, or a binary times out.
#
# Wine comes from Debian's packages (wine + wine64; 64-bit only, so no i386
# architecture). Headless: console programs need no display; WINEPREFIX is a
# fresh temporary directory, removed on exit.
#
# Go >= 1.22 binaries import ProcessPrng from bcryptprimitives.dll, which Wine
# has only from 9.0 on; Debian bookworm ships Wine 8.0. When the fresh prefix
# has no bcryptprimitives.dll, a shim built here with mingw-w64 from
# .ci/wine/bcryptprimitives.c (ProcessPrng over advapi32's RtlGenRandom) is
# put into the prefix's system32, where Go's runtime looks for it
# (LoadLibraryExW with LOAD_LIBRARY_SEARCH_SYSTEM32).
#
# Environment: WINE_TEST_TIMEOUT, seconds per test binary (default 300).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="/usr/local/go/bin:$PATH"
per_bin=${WINE_TEST_TIMEOUT:-300}
if [ "$per_bin" -lt 30 ]; then per_bin=30; fi

# Packages whose every test runs under Wine, and the root package's tests
# that need no WinDivert driver (the Windows backend's tests run over the
# fake handle of internal/windivert).
pkgs=(./filter ./internal/packet ./internal/reassembly ./internal/windivert ./internal/bsdaddr ./internal/ipfw)
root_run='^(TestFlag|TestOpen|TestParam|TestDefaults|TestClosedHandle|TestRecvSendOnly|TestSendLengths|TestShutdown|TestErrShutdown|TestCalcChecksums|TestKernelPackets|TestParsePacket|TestNextPacket|TestDecrementTTL|TestHashPacket|TestPacketHelpers|TestPacketSetters|TestSendable|TestShared|TestPipe|TestRecvEmptyBuffer|TestSendBatchTooLarge|TestStats|TestEvalFilter|TestInvalidArguments|TestParseNfqueue|TestWin|Example|Fuzz)'

apt_install() {
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

if ! command -v wine64 >/dev/null 2>&1 && ! [ -x /usr/lib/wine/wine64 ]; then
	apt_install wine wine64
fi
WINE=$(command -v wine64 || echo /usr/lib/wine/wine64)
WINESERVER=$(command -v wineserver || echo /usr/lib/wine/wineserver)
echo "wine: $("$WINE" --version)"

tmp=$(mktemp -d)
export WINEPREFIX="$tmp/prefix" WINEDEBUG=-all WINEARCH=win64 DISPLAY=
# Wine makes its server directory (/tmp/wine-XXXXXX) under TMPDIR: inside
# $tmp it goes with the prefix.
export TMPDIR="$tmp"
# No Mono/Gecko installer prompts during wineboot: tests are console programs.
export WINEDLLOVERRIDES="mscoree,mshtml="
cleanup() {
	"$WINESERVER" -k >/dev/null 2>&1 || true
	rm -rf "$tmp"
}
trap cleanup EXIT

timeout -k 10 300 "$WINE" wineboot --init >"$tmp/wineboot.log" 2>&1 || true
sys32="$WINEPREFIX/drive_c/windows/system32"
if ! [ -d "$sys32" ]; then
	echo "wine: wineboot did not create $sys32:"; cat "$tmp/wineboot.log"; exit 1
fi
if ! [ -e "$sys32/bcryptprimitives.dll" ]; then
	command -v x86_64-w64-mingw32-gcc >/dev/null 2>&1 || apt_install gcc-mingw-w64-x86-64
	x86_64-w64-mingw32-gcc -Wall -Wextra -Werror -O2 -shared -s -nostdlib -Wl,-e,DllMain \
		-o "$sys32/bcryptprimitives.dll" .ci/wine/bcryptprimitives.c -ladvapi32
	echo "wine: no bcryptprimitives.dll in this Wine; installed the shim from .ci/wine/bcryptprimitives.c"
fi

fail=0 passed=0 failed=0
# run PKG [RUN]: build PKG's windows/amd64 test binary, run it in the
# package's directory (testdata is read relative to it), print go test's
# result line.
run() {
	local pkg=$1 sel=${2:-} imp dir bin log rc start ms secs
	imp=$(go list "$pkg")
	dir=$(go list -f '{{.Dir}}' "$pkg")
	bin="$tmp/$(basename "$imp").test.exe"
	log="$tmp/$(basename "$imp").log"
	if ! GOOS=windows GOARCH=amd64 go test -c -o "$bin" "$pkg"; then
		printf 'FAIL\t%s [build failed]\n' "$imp"; fail=1; return
	fi
	if ! [ -f "$bin" ]; then
		printf '?   \t%s\t[no test files]\n' "$imp"; return
	fi
	local args=(-test.v -test.count=1 -test.timeout="$((per_bin - 15))s")
	if [ -n "$sel" ]; then
		args+=(-test.run "$sel")
		# Say which tests the selection leaves out, so none is lost unseen.
		local all sel_list left
		all=$(cd "$dir" && timeout -k 5 60 "$WINE" "$bin" -test.list '.*' | tr -d '\r' | grep -v '^Benchmark' | sort)
		sel_list=$(cd "$dir" && timeout -k 5 60 "$WINE" "$bin" -test.list "$sel" | tr -d '\r' | sort)
		left=$(comm -23 <(echo "$all") <(echo "$sel_list") | tr '\n' ' ')
		if [ -n "$left" ]; then echo "wine: $imp: not selected by -run: $left"; fi
	fi
	start=$(date +%s%N)
	rc=0
	(cd "$dir" && timeout -k 10 "$per_bin" "$WINE" "$bin" "${args[@]}") >"$log" 2>&1 || rc=$?
	ms=$((($(date +%s%N) - start) / 1000000))
	secs=$(printf '%d.%03d' $((ms / 1000)) $((ms % 1000)))
	tr -d '\r' <"$log" >"$log.lf" && mv "$log.lf" "$log"
	local np nf ns
	np=$(grep -c '^--- PASS' "$log" || true)
	nf=$(grep -c '^--- FAIL' "$log" || true)
	ns=$(grep -c '^--- SKIP' "$log" || true)
	passed=$((passed + np)) failed=$((failed + nf))
	if grep -q '^testing: warning: no tests to run' "$log"; then
		echo "wine: $imp: the selection ran no test"; rc=1
	fi
	if [ "$ns" -gt 0 ]; then
		grep -A2 '^--- SKIP' "$log"
	fi
	if [ "$rc" -eq 0 ] && grep -q '^PASS$' "$log"; then
		printf 'ok  \t%s\t%ss\t(windows/amd64 under wine: %d passed, %d skipped)\n' "$imp" "$secs" "$np" "$ns"
		return
	fi
	# Failure: the failing tests' output (whole log when short), then the line.
	if [ "$(wc -l <"$log")" -le 300 ]; then
		cat "$log"
	else
		grep -v -E '^(=== (RUN|PAUSE|CONT)|\s*--- PASS)' "$log" | tail -n 300
	fi
	if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then echo "wine: $imp: timed out after ${per_bin}s"; fi
	printf 'FAIL\t%s\t%ss\t(windows/amd64 under wine: exit %d, %d failed)\n' "$imp" "$secs" "$rc" "$nf"
	fail=1
	if [ "$nf" -eq 0 ]; then failed=$((failed + 1)); fi # crashed, timed out or ran nothing
}

for p in "${pkgs[@]}"; do
	if [ -d "$p" ]; then run "$p"; fi
done
run . "$root_run"
echo "wine: $passed passed, $failed failed"
exit $fail
