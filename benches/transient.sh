#!/usr/bin/env bash
# What running each command as a transient systemd unit costs against a direct spawn.
#
#   sudo bash benches/transient.sh
#
# In a booted Debian container (tests/system/lib.sh: the cached root, an overlay copy,
# systemd as PID 1), the release helper is installed with the shipped units, and one
# recipe of N `linux.cmd` states running `true` is applied with `opsagent apply`:
#   transient  through the installed opsagent-helper.service (socket-activated, already
#              started): each command is a transient unit started over D-Bus, its
#              exit status, CPU time and peak memory read, then stopped and collected;
#   direct     through a second helper in the same container started with
#              `--direct-exec`: each command is a child in its own process group.
# Wall time of the whole `opsagent apply` (date +%s%N around it), medians over RUNS
# runs, interleaved; the per-command figure is (median - median of an empty recipe) / N.
#
# Environment: RUNS [5], N [40], BIN_DIR [target/release].
set -euo pipefail

ROOT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN_DIR=${BIN_DIR:-$ROOT_DIR/target/release}
RUNS=${RUNS:-5}
N=${N:-40}

BENCH=transient
# shellcheck source=benches/lib.sh
. "$ROOT_DIR/benches/lib.sh"
need_root "containers and the helper run as root"
need_bins "$BIN_DIR" opsagent opsagent-helper
# shellcheck source=tests/system/lib.sh
. "$ROOT_DIR/tests/system/lib.sh"
install_host_tools systemd-nspawn:systemd-container debootstrap:debootstrap nsenter:util-linux ps:procps
ensure_rootfs

WORK=$(mktemp -d /tmp/opsagent-bench-transient.XXXXXX)
export WORK
: >"$WORK/containers"
cleanup() {
	cleanup_all
	rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

C=bt
boot "$C"
R=$(croot "$C")
install -d -m 0755 "$R/opt/visualops/current/bin" "$R/etc/sysusers.d"
install -m 0755 "$BIN_DIR/opsagent-helper" "$R/opt/visualops/current/bin/"
install -m 0755 "$BIN_DIR/opsagent" "$R/usr/local/bin/"
install -m 0644 "$ROOT_DIR/units/opsagent-helper.service" "$ROOT_DIR/units/opsagent-helper.socket" "$R/etc/systemd/system/"
install -m 0644 "$ROOT_DIR/units/opsagent.sysusers" "$R/etc/sysusers.d/opsagent.conf"
csh "$C" 'systemd-sysusers && systemctl daemon-reload && systemctl start opsagent-helper.socket' >/dev/null
csh "$C" '/opt/visualops/current/bin/opsagent-helper --socket /run/bench-direct.sock --allow-user root --direct-exec \
	>/var/log/bench-direct.log 2>&1 & echo $! >/run/bench-direct.pid'
for _ in $(seq 1 50); do csh "$C" '[ -S /run/bench-direct.sock ]' && break; sleep 0.2; done

{
	printf '{"recipe_version": 1, "state": ['
	for i in $(seq 1 "$N"); do
		[ "$i" = 1 ] || printf ', '
		printf '{"id": "t%s", "module": "linux.cmd", "parameter": {"cmd": "true", "cwd": "/"}}' "$i"
	done
	printf ']}\n'
} >"$R/root/bench.json"
printf '{"recipe_version": 1, "state": []}\n' >"$R/root/empty.json"

run_ms() { # SOCKET RECIPE: wall time of one apply, in ms
	local t0 t1
	t0=$(date +%s%N)
	cexec "$C" opsagent apply --helper-socket "$1" "$2" >"$WORK/last.out" 2>&1 || {
		cat "$WORK/last.out" >&2
		die "opsagent apply failed"
	}
	t1=$(date +%s%N)
	echo $(((t1 - t0) / 1000000))
}
median() { sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }

UNIT_SOCK=/run/opsagent-helper/helper.sock
DIRECT_SOCK=/run/bench-direct.sock
# Warm both helpers up (the unit's first connection starts it).
run_ms "$UNIT_SOCK" /root/bench.json >/dev/null
run_ms "$DIRECT_SOCK" /root/bench.json >/dev/null
: >"$WORK/transient" && : >"$WORK/direct" && : >"$WORK/empty"
for r in $(seq 1 "$RUNS"); do
	run_ms "$UNIT_SOCK" /root/bench.json >>"$WORK/transient"
	run_ms "$DIRECT_SOCK" /root/bench.json >>"$WORK/direct"
	run_ms "$DIRECT_SOCK" /root/empty.json >>"$WORK/empty"
	say "  run $r/$RUNS done"
done
left=$(csh "$C" "systemctl list-units --all --no-legend 'opsagent-state-*' | wc -l")
T=$(median <"$WORK/transient")
D=$(median <"$WORK/direct")
E=$(median <"$WORK/empty")
echo "$N commands per recipe, medians of $RUNS runs (ms): transient $T, direct $D, empty recipe $E"
awk -v t="$T" -v d="$D" -v e="$E" -v n="$N" 'BEGIN {
	printf "per command: transient unit %.1f ms, direct spawn %.1f ms, difference %.1f ms\n", (t - e) / n, (d - e) / n, (t - d) / n
}'
echo "opsagent-state units left loaded after the runs: $left"
