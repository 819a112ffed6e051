#!/usr/bin/env bash
# What the helper's exit when idle costs: under systemd the helper is socket-activated
# and leaves after `--exit-idle` seconds without a request (120 in the shipped unit), so
# between rounds it holds no memory at all, and the first request of the next round
# waits for a helper to start. This times that first request against one served by a
# helper that is already running.
#
#   sudo bash benches/activation.sh
#
# Each run: `systemd-socket-activate` listens on a socket and starts the real helper
# (`--exit-idle 1`) on the first connection, passing the socket as systemd does; then
#   cold  `opsagent apply --helper-socket SOCK` of one idempotent linux.file state: the
#         connection waits in the socket while the helper starts;
#   warm  the same command again at once, served by the running helper;
#   exit  the helper leaves by itself after its idle second (exit status 0 required).
# Wall time of the whole `opsagent apply` process (date +%s%N around it), medians over
# RUNS runs, interleaved.
#
# Environment: RUNS [20], BIN_DIR [target/release].
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN_DIR=${BIN_DIR:-$ROOT/target/release}
RUNS=${RUNS:-20}

BENCH=activation
# shellcheck source=benches/lib.sh
. "$ROOT/benches/lib.sh"
need_root "the helper runs as root"
need_bins "$BIN_DIR" opsagent opsagent-helper
need_socket_activate

WORK=$(mktemp -d /var/tmp/opsagent-activation.XXXXXX)
APID=
cleanup() {
	[ -z "$APID" ] || kill "$APID" 2>/dev/null || true
	rm -rf "$WORK"
}
trap cleanup EXIT
SOCK=$WORK/helper.sock
cat >"$WORK/one.json" <<EOF
{"recipe_version": 1, "state": [
  {"id": "motd", "module": "linux.file", "parameter": {"path": "$WORK/motd", "content": "hello\n", "mode": "0644"}}
]}
EOF
# The helper's allowlist names root (always allowed), as footprint.sh explains.
ALLOW=(--allow-user root)
getent passwd opsagent >/dev/null && ALLOW=()

ms_since() { echo $((($(date +%s%N) - $1) / 1000)); } # T0_NS -> microseconds
apply() { "$BIN_DIR/opsagent" apply --helper-socket "$SOCK" "$WORK/one.json" >"$WORK/apply.out" 2>&1 ||
	die "opsagent apply failed: $(cat "$WORK/apply.out")"; }

listen() {
	rm -f "$SOCK"
	RUST_LOG=warn systemd-socket-activate -l "$SOCK" "$BIN_DIR/opsagent-helper" --exit-idle 1 \
		--state-dir "$WORK/helper-state" "${ALLOW[@]}" 2>>"$WORK/helper.log" &
	APID=$!
	for _ in $(seq 200); do [ -S "$SOCK" ] && return; sleep 0.01; done
	die "systemd-socket-activate did not listen: $(tail -5 "$WORK/helper.log")"
}

# The first run creates the file; every timed run finds it as wanted.
listen
apply
wait "$APID" || die "the helper did not exit cleanly when idle: $(tail -5 "$WORK/helper.log")"
APID=

COLD=() WARM=() EXIT=()
for i in $(seq "$RUNS"); do
	listen
	t0=$(date +%s%N)
	apply
	COLD+=("$(ms_since "$t0")")
	t0=$(date +%s%N)
	apply
	WARM+=("$(ms_since "$t0")")
	t0=$(date +%s%N)
	rc=0
	wait "$APID" || rc=$?
	APID=
	[ "$rc" = 0 ] || die "run $i: the helper exited with status $rc: $(tail -5 "$WORK/helper.log")"
	EXIT+=("$(ms_since "$t0")")
	say "  run $i/$RUNS: cold ${COLD[-1]} µs, warm ${WARM[-1]} µs, exited ${EXIT[-1]} µs after the last request"
done

median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : int((a[NR/2]+a[NR/2+1])/2)}'; }
p90() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {i=int(NR*0.9+0.999); if (i<1) i=1; print a[i]}'; }
cold=$(median "${COLD[@]}") warm=$(median "${WARM[@]}")
ms() { awk -v us="$1" 'BEGIN { printf "%10.2f", us / 1000 }'; }
echo
echo "== helper started on demand (socket activation, --exit-idle 1), $RUNS runs; opsagent apply of 1 state =="
printf '%-36s %10s %10s\n' "" "median_ms" "p90_ms"
printf '%-36s %s %s\n' "cold (the helper starts for it)" "$(ms "$cold")" "$(ms "$(p90 "${COLD[@]}")")"
printf '%-36s %s %s\n' "warm (the helper is running)" "$(ms "$warm")" "$(ms "$(p90 "${WARM[@]}")")"
printf '%-36s %s\n' "cost of starting the helper" "$(ms $((cold - warm)))"
printf '%-36s %s ms (exit status 0 in every run)\n' "helper gone after its last request" "$(ms "$(median "${EXIT[@]}")")"
echo "helper memory between rounds: none (no process)"
