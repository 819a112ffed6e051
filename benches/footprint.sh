#!/usr/bin/env bash
# Memory footprint of the real daemon (`opsagent run`) and the real root helper
# (`opsagent-helper`), connected to the reference backend (`opsagent-backend`):
#   idle   connected, a 1-state recipe applied, waiting for the next round;
#   N=1000 and N=10000: a recipe of N linux.file states (files in a temp dir) pushed by
#          the backend; peak RSS during the round and RSS once it is over;
#   between rounds: the helper runs as the shipped unit runs it, socket-activated with
#          --exit-idle (systemd-socket-activate plays systemd's part), so once it has been
#          idle that long it exits; the script waits for that exit (status 0 required).
# RSS is VmRSS, peak is VmHWM (reset before each stage through /proc/PID/clear_refs, so
# each stage's peak is its own), both from /proc/PID/status, plus the highest VmRSS a
# 20 ms sampler saw. Figures in KiB.
#
#   sudo bash benches/footprint.sh
#
# Environment: SIZES [1000 10000], SETTLE (seconds before an idle reading) [3],
# EXIT_IDLE (the helper's --exit-idle; longer than any pause between stages) [20],
# BIN_DIR [target/release], DAEMON_WRAPPER (e.g. "valgrind --tool=massif
# --massif-out-file=/tmp/massif.out" to see where the daemon's memory goes; the RSS
# figures are then the wrapper's, not the daemon's), HELPER_ALLOW_USER (see below).
#
# The helper's allowlist: on a packaged host the agent user `opsagent` exists (sysusers
# or useradd put it in /etc/passwd) and glibc's built-in files source answers the
# lookup alone. A host without it (a bench machine) makes the helper's default
# allowlist ask every NSS source for the missing name, which maps libnss_systemd and
# with it libm and libcap: ~0.7 MiB a packaged helper does not carry. So unless the
# agent user exists, the helper is told to allow `root` (always allowed anyway), a
# name /etc/passwd answers. HELPER_ALLOW_USER overrides; empty means the default.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN_DIR=${BIN_DIR:-$ROOT/target/release}
SIZES=${SIZES:-"1000 10000"}
SETTLE=${SETTLE:-3}
EXIT_IDLE=${EXIT_IDLE:-20}

BENCH=footprint
# shellcheck source=benches/lib.sh
. "$ROOT/benches/lib.sh"
need_root "the helper runs as root; clear_refs"
need_socket_activate
need_bins "$BIN_DIR" opsagent opsagent-helper opsagent-backend

WORK=$(mktemp -d /var/tmp/opsagent-footprint.XXXXXX)
PIDS=()
cleanup() {
	for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
	for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
	rm -rf "$WORK"
}
trap cleanup EXIT
mkdir -p "$WORK/recipes" "$WORK/state" "$WORK/helper-state" "$WORK/out"
: >"$WORK/empty.conf"

field() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; } # PID FIELD -> KiB
pss() { awk '$1 == "Pss:" { print $2 }' "/proc/$1/smaps_rollup"; }
# What the resident memory is made of: private heap/stacks vs. mapped binary and libraries.
parts() { printf 'RssAnon %s + RssFile %s KiB, Pss %s KiB' "$(field "$1" RssAnon)" "$(field "$1" RssFile)" "$(pss "$1")"; }
reset_peak() { echo 5 >"/proc/$1/clear_refs"; }

recipe() { # N DIR -> a recipe of N linux.file states writing DIR/f-i
	python3 - "$1" "$2" <<'EOF'
import json, sys
n, d = int(sys.argv[1]), sys.argv[2]
print(json.dumps({"recipe_version": 1, "state": [
    {"id": f"file-{i}", "module": "linux.file",
     "parameter": {"path": f"{d}/f-{i}", "content": "x = 1\n", "mode": "0644"}} for i in range(n)]}))
EOF
}
push() { # N NAME: replaces the app's recipe (atomically); the backend pushes the new version
	recipe "$1" "$WORK/out/$2" >"$WORK/bench.json.tmp"
	mv "$WORK/bench.json.tmp" "$WORK/recipes/bench.json"
}
logged() { if [ -f "$WORK/statelog.jsonl" ]; then wc -l <"$WORK/statelog.jsonl"; else echo 0; fi; }
wait_logged() { # COUNT TIMEOUT_S
	local deadline=$((SECONDS + $2))
	while [ "$(logged)" -lt "$1" ]; do
		[ $SECONDS -lt $deadline ] || die "only $(logged) of $1 StateLogs after $2 s (see $WORK)"
		kill -0 "$DPID" 2>/dev/null || die "the daemon exited: $(tail -5 "$WORK/daemon.log")"
		sleep 0.05
	done
}

# --- start the three processes ---------------------------------------------------------------
if [ -z "${HELPER_ALLOW_USER+set}" ]; then
	if getent passwd opsagent >/dev/null; then HELPER_ALLOW_USER=; else HELPER_ALLOW_USER=root; fi
fi
ALLOW=()
[ -z "$HELPER_ALLOW_USER" ] || ALLOW=(--allow-user "$HELPER_ALLOW_USER")
# systemd-socket-activate listens and, at the first connection (the daemon's), execs
# the helper in its place with the socket passed as systemd passes it: HPID is then the
# helper's pid.
systemd-socket-activate -l "$WORK/helper.sock" "$BIN_DIR/opsagent-helper" --exit-idle "$EXIT_IDLE" \
	--state-dir "$WORK/helper-state" "${ALLOW[@]}" 2>"$WORK/helper.log" &
HPID=$!
PIDS+=("$HPID")
for _ in $(seq 100); do [ -S "$WORK/helper.sock" ] && break; sleep 0.05; done
[ -S "$WORK/helper.sock" ] || die "systemd-socket-activate did not listen: $(tail -5 "$WORK/helper.log")"

push 1 idle
# Not throttled: the backend's default (200 frames a second per connection past a burst
# of 2,000) would stretch the 10,000 StateLogs of the last stage over ~40 s after the
# round itself ended, and the idle helper would leave before its figures are read.
"$BIN_DIR/opsagent-backend" --listen 127.0.0.1:0 --recipe-dir "$WORK/recipes" \
	--statelog "$WORK/statelog.jsonl" --poll-ms 100 --frames-per-s 1000000 --frame-burst 1000000 \
	>"$WORK/backend.out" 2>"$WORK/backend.log" &
BPID=$!
PIDS+=("$BPID")
for _ in $(seq 100); do grep -q listening "$WORK/backend.out" 2>/dev/null && break; sleep 0.05; done
PORT=$(sed -n 's/.*listening on 127.0.0.1:\([0-9]*\).*/\1/p' "$WORK/backend.out")
[ -n "$PORT" ] || die "the backend did not start: $(tail -5 "$WORK/backend.log")"

# shellcheck disable=SC2086 # DAEMON_WRAPPER is a command line
RUST_LOG=info ${DAEMON_WRAPPER:-} "$BIN_DIR/opsagent" run --config "$WORK/empty.conf" --ws-uri "ws://127.0.0.1:$PORT/" \
	--app-id bench --instance-id i-footprint --token-file "$WORK/token" --state-dir "$WORK/state" \
	--helper-socket "$WORK/helper.sock" --round-delay 600 2>"$WORK/daemon.log" &
DPID=$!
PIDS+=("$DPID")

wait_logged 1 60
sleep "$SETTLE"
grep -q '^opsagent-helpe' "/proc/$HPID/comm" || die "pid $HPID is not the helper: $(cat "/proc/$HPID/comm")"
LIBS=$(awk '$6 ~ /\.so/ { sub(".*/", "", $6); print $6 }' "/proc/$HPID/maps" | sort -u | tr '\n' ' ')

declare -A R
R[idle.d.rss]=$(field "$DPID" VmRSS)
R[idle.d.hwm]=$(field "$DPID" VmHWM)
R[idle.h.rss]=$(field "$HPID" VmRSS)
R[idle.h.hwm]=$(field "$HPID" VmHWM)
R[idle.d.parts]=$(parts "$DPID")
R[idle.h.parts]=$(parts "$HPID")
say "idle connected: daemon VmRSS ${R[idle.d.rss]} KiB (VmHWM ${R[idle.d.hwm]}), helper VmRSS ${R[idle.h.rss]} KiB (VmHWM ${R[idle.h.hwm]})"

for n in $SIZES; do
	before=$(logged)
	reset_peak "$DPID"
	reset_peak "$HPID"
	# A sampler for the highest VmRSS seen while the round runs.
	(
		dmax=0 hmax=0
		while [ ! -e "$WORK/stop-sampler" ]; do
			d=$(field "$DPID" VmRSS) h=$(field "$HPID" VmRSS)
			[ "${d:-0}" -gt $dmax ] && dmax=$d
			[ "${h:-0}" -gt $hmax ] && hmax=$h
			echo "$dmax $hmax" >"$WORK/sampler.out"
			sleep 0.02
		done
	) &
	SPID=$!
	t0=$(date +%s%N)
	push "$n" "n$n"
	wait_logged $((before + n)) 3600
	t1=$(date +%s%N)
	touch "$WORK/stop-sampler"
	wait "$SPID"
	rm -f "$WORK/stop-sampler"
	R[$n.d.hwm]=$(field "$DPID" VmHWM)
	R[$n.h.hwm]=$(field "$HPID" VmHWM)
	read -r "R[$n.d.smax]" "R[$n.h.smax]" <"$WORK/sampler.out"
	R[$n.secs]=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", (b - a) / 1e9 }')
	sleep "$SETTLE"
	R[$n.d.rss]=$(field "$DPID" VmRSS)
	R[$n.h.rss]=$(field "$HPID" VmRSS)
	R[$n.d.parts]=$(parts "$DPID")
	R[$n.h.parts]=$(parts "$HPID")
	files=$(find "$WORK/out/n$n" -type f | wc -l)
	[ "$files" = "$n" ] || die "N=$n: $files files written, expected $n"
	fails=$(tail -n "$n" "$WORK/statelog.jsonl" | grep -c '"state_result":false' || true)
	[ "$fails" = 0 ] || die "N=$n: $fails failed states"
	say "N=$n: round (push to last StateLog recorded) ${R[$n.secs]} s; daemon peak ${R[$n.d.hwm]} KiB, after ${R[$n.d.rss]}; helper peak ${R[$n.h.hwm]} KiB, after ${R[$n.h.rss]}"
done

# Between rounds: the idle helper leaves; the daemon stays connected to the backend.
t0=$(date +%s)
while kill -0 "$HPID" 2>/dev/null; do
	[ $(($(date +%s) - t0)) -le $((EXIT_IDLE + 60)) ] || die "the helper did not exit after $EXIT_IDLE s idle"
	sleep 0.2
done
rc=0
wait "$HPID" || rc=$?
[ "$rc" = 0 ] || die "the helper exited with status $rc when idle: $(tail -5 "$WORK/helper.log")"
R[gone.secs]=$(($(date +%s) - t0))
kill -0 "$DPID" 2>/dev/null || die "the daemon exited when the helper did: $(tail -5 "$WORK/daemon.log")"
R[gone.d.rss]=$(field "$DPID" VmRSS)
say "the helper exited (status 0) ${R[gone.secs]} s after the last reading; daemon VmRSS ${R[gone.d.rss]} KiB"

mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
echo
echo "== footprint (MiB; VmRSS / VmHWM from /proc/PID/status) =="
printf '%-26s %10s %10s\n' stage daemon helper
printf '%-26s %10s %10s\n' "idle connected (VmRSS)" "$(mib "${R[idle.d.rss]}")" "$(mib "${R[idle.h.rss]}")"
printf '%-26s %10s %10s\n' "idle connected (VmHWM)" "$(mib "${R[idle.d.hwm]}")" "$(mib "${R[idle.h.hwm]}")"
for n in $SIZES; do
	printf '%-26s %10s %10s\n' "N=$n round peak (VmHWM)" "$(mib "${R[$n.d.hwm]}")" "$(mib "${R[$n.h.hwm]}")"
	printf '%-26s %10s %10s\n' "N=$n after round (VmRSS)" "$(mib "${R[$n.d.rss]}")" "$(mib "${R[$n.h.rss]}")"
	printf '%-26s %10s %10s\n' "N=$n sampled max VmRSS" "$(mib "${R[$n.d.smax]}")" "$(mib "${R[$n.h.smax]}")"
done
printf '%-26s %10s %10s\n' "between rounds (VmRSS)" "$(mib "${R[gone.d.rss]}")" "none"
echo
echo "idle daemon:  ${R[idle.d.parts]}"
echo "idle helper:  ${R[idle.h.parts]}"
for n in $SIZES; do
	echo "after N=$n daemon: ${R[$n.d.parts]}"
	echo "after N=$n helper: ${R[$n.h.parts]}"
done
echo
for n in $SIZES; do
	printf 'N=%-6s round of %s states through backend+daemon+helper: %s s (%s ms/state); peak growth over idle: daemon %s KiB (%s B/state), helper %s KiB\n' \
		"$n" "$n" "${R[$n.secs]}" "$(awk -v s="${R[$n.secs]}" -v n="$n" 'BEGIN { printf "%.2f", s * 1000 / n }')" \
		"$((R[$n.d.hwm] - R[idle.d.rss]))" "$(((R[$n.d.hwm] - R[idle.d.rss]) * 1024 / n))" "$((R[$n.h.hwm] - R[idle.h.rss]))"
done
verdict() { awk -v v="$1" -v l="$2" 'BEGIN { print (v < l * 1024) ? "met" : "MISSED" }'; }
echo "(\"none\": the helper exited after --exit-idle $EXIT_IDLE s without a request, as the shipped unit's does after 120 s; the next round's connection starts it again)"
echo "targets: daemon idle < 8 MiB: $(mib "${R[idle.d.rss]}") MiB ($(verdict "${R[idle.d.rss]}" 8)); helper idle < 4 MiB: between rounds no helper process (met); while it serves $(mib "${R[idle.h.rss]}") MiB ($(verdict "${R[idle.h.rss]}" 4))"
echo "helper allowlist: ${HELPER_ALLOW_USER:-default (the opsagent user)}; helper libraries mapped: $LIBS"
echo "binaries: $(for b in opsagent opsagent-helper; do printf '%s %s MiB  ' "$b" "$(mib $(($(stat -c %s "$BIN_DIR/$b") / 1024)))"; done)"
