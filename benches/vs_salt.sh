#!/usr/bin/env bash
# opsagent vs Salt on the same work: N files with the same path, content and mode,
# applied by `opsagent apply` (linux.file states, release build, private root helper)
# and by `salt-call --local state.apply` (file.managed states, masterless minion in a
# temp dir), first run (creating every file) and second run (nothing to change).
#
# Prints, for every N and run kind: median wall time and median peak RSS over RUNS runs,
# and Salt/opsagent ratios. Also the scaling of opsagent (time per state as N grows).
#
#   sudo bash benches/vs_salt.sh                 # N = 100 1000 10000, 5 runs (3 at 10000)
#   SIZES="100 1000" RUNS=5 sudo bash benches/vs_salt.sh
#
# Environment:
#   SIZES           numbers of states                    [100 1000 10000]
#   RUNS            runs per measurement (median taken)  [5]
#   RUNS_BIG        runs at N >= 10000 (Salt takes ~1 min a run there) [3]
#   SALT_VERSION    Salt release installed from PyPI     [3008.3]
#   SALT_VENV       virtualenv for Salt                  [/var/tmp/opsagent-bench/salt-venv]
#   OPSAGENT_BIN    opsagent binary (opsagent-helper next to it) [target/release/opsagent]
#   BENCH_TSV       also append raw rows here (tool kind N run wall_s rss_kib)
#
# opsagent runs twice per measurement set: as `opsagent apply FILE` (starts and stops a
# private helper every run: the headline figures) and, second run only, as
# `opsagent apply --helper-socket` against a helper started once (as deployed).
# Each run goes through benches/runner.c: forked, exec'd and reaped with wait4, wall
# time around both; peak RSS is
# ru_maxrss: the largest single process of the run (the child and its waited-for
# descendants), in KiB.
# Salt gets its best case: the SLS uses the `#!json` renderer (no Jinja, no YAML), the
# grains/fileserver caches are warm (one untimed warm-up call), and output is the terse
# one-line-per-state format (opsagent prints one line per state too); both outputs go to
# a file, not a terminal.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SIZES=${SIZES:-"100 1000 10000"}
RUNS=${RUNS:-5}
RUNS_BIG=${RUNS_BIG:-3}
SALT_VERSION=${SALT_VERSION:-3008.3}
SALT_VENV=${SALT_VENV:-/var/tmp/opsagent-bench/salt-venv}
OPSAGENT_BIN=${OPSAGENT_BIN:-$ROOT/target/release/opsagent}
BENCH_TSV=${BENCH_TSV:-}

BENCH=vs_salt
# shellcheck source=benches/lib.sh
. "$ROOT/benches/lib.sh"
need_root "opsagent apply starts a private root helper; Salt writes as root too"
need_bins "$(dirname "$OPSAGENT_BIN")" "$(basename "$OPSAGENT_BIN")" opsagent-helper

apt_install() {
	say "installing $* with apt-get"
	DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# --- prerequisites: a venv with Salt -----------------------------------------------------

if [ ! -x "$SALT_VENV/bin/salt-call" ] || ! "$SALT_VENV/bin/salt-call" --version 2>/dev/null | grep -q "$SALT_VERSION"; then
	rm -rf "$SALT_VENV"
	mkdir -p "$(dirname "$SALT_VENV")"
	if ! python3 -m venv "$SALT_VENV" >/dev/null 2>&1; then
		rm -rf "$SALT_VENV"
		apt_install python3-venv
		python3 -m venv "$SALT_VENV"
	fi
	say "installing salt==$SALT_VERSION from PyPI into $SALT_VENV"
	"$SALT_VENV/bin/pip" install --quiet --disable-pip-version-check "salt==$SALT_VERSION" ||
		die "pip install salt==$SALT_VERSION failed (try another SALT_VERSION)"
fi
SALT_CALL="$SALT_VENV/bin/salt-call"
SALT_REPORTED=$("$SALT_CALL" --version 2>/dev/null | head -1)

WORK=$(mktemp -d /var/tmp/opsagent-vs-salt.XXXXXX)
HELPER_PID=
cleanup() {
	if [ -n "$HELPER_PID" ]; then
		kill "$HELPER_PID" 2>/dev/null || true
		wait "$HELPER_PID" 2>/dev/null || true
	fi
	rm -rf "$WORK"
}
trap cleanup EXIT
RUNNER=$(build_runner "$WORK")

# A helper started once and left running, as the packaged agent has it (socket-activated,
# long-lived): `opsagent apply --helper-socket` against it shows the cost per run without
# starting a private helper each time.
mkdir -p "$WORK/helper-state"
"$(dirname "$OPSAGENT_BIN")/opsagent-helper" --socket "$WORK/helper.sock" --state-dir "$WORK/helper-state" \
	2>"$WORK/helper.log" &
HELPER_PID=$!
for _ in $(seq 100); do [ -S "$WORK/helper.sock" ] && break; sleep 0.05; done
[ -S "$WORK/helper.sock" ] || die "the helper did not create its socket: $(tail -5 "$WORK/helper.log")"

# --- masterless minion ---------------------------------------------------------------------
mkdir -p "$WORK/salt/conf" "$WORK/salt/roots" "$WORK/salt/cache" "$WORK/salt/pki" "$WORK/salt/run"
cat >"$WORK/salt/conf/minion" <<EOF
id: bench
file_client: local
file_roots:
  base:
    - $WORK/salt/roots
root_dir: $WORK/salt
cachedir: $WORK/salt/cache
pki_dir: $WORK/salt/pki
sock_dir: $WORK/salt/run
pidfile: $WORK/salt/run/minion.pid
log_file: $WORK/salt/minion.log
log_level_logfile: warning
grains_cache: True
EOF
SALT=("$SALT_CALL" --local -c "$WORK/salt/conf" --retcode-passthrough --state-output=terse)

# --- the same N files for both tools -----------------------------------------------------
gen() { # N
	python3 - "$1" "$WORK" <<'EOF'
import json, sys
n, work = int(sys.argv[1]), sys.argv[2]
content, mode = "x = 1\n", "0644"
states = [{"id": f"file-{i}", "module": "linux.file",
           "parameter": {"path": f"{work}/out/opsagent-{n}/f-{i}", "content": content, "mode": mode}}
          for i in range(n)]
with open(f"{work}/recipe-{n}.json", "w") as f:
    json.dump({"recipe_version": 1, "state": states}, f)
sls = {f"{work}/out/salt-{n}/f-{i}": {"file.managed": [{"contents": content}, {"mode": mode}]}
       for i in range(n)}
with open(f"{work}/salt/roots/bench{n}.sls", "w") as f:
    f.write("#!json\n")
    json.dump(sls, f)
EOF
}

# measure LABEL CMD...: one timed run; prints "wall_s rss_kib"; exits on failure.
# benches/runner.c forks and execs the command and reaps it with wait4 (wall
# time around it, peak RSS of the largest process).
measure() {
	local label=$1 out rc=0
	shift
	local log="$WORK/last.log"
	out=$("$RUNNER" "$log" "$@") || rc=$?
	if [ "$rc" != 0 ]; then
		say "vs_salt: $label failed:"
		tail -20 "$log" >&2
		exit 1
	fi
	awk '{ printf "%.4f %s\n", $1, $3 }' <<<"$out"
}

median() { sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

declare -A WALLS RSSS WALL RSS NRUNS
# once TOOL KIND N I RUNS: one timed run, its figures kept for the medians
once() {
	local tool=$1 kind=$2 n=$3 i=$4 runs=$5 dir out
	dir="$WORK/out/${tool%-running}-$n"
	if [ "$kind" = first ]; then
		rm -rf "$dir"
		mkdir -p "$dir"
		sync
	fi
	case $tool in
	opsagent) out=$(measure "opsagent apply N=$n $kind" "$OPSAGENT_BIN" apply "$WORK/recipe-$n.json") ;;
	opsagent-running) out=$(measure "opsagent apply --helper-socket N=$n $kind" "$OPSAGENT_BIN" apply \
		--helper-socket "$WORK/helper.sock" "$WORK/recipe-$n.json") ;;
	salt) out=$(measure "salt-call N=$n $kind" "${SALT[@]}" state.apply "bench$n") ;;
	esac
	[ -z "$BENCH_TSV" ] || printf '%s\t%s\t%s\t%s\t%s\n' "$tool" "$kind" "$n" "$i" "${out// /$'\t'}" >>"$BENCH_TSV"
	say "  $tool $kind N=$n run $i/$runs: ${out% *} s, ${out#* } KiB (load $(cut -d' ' -f1 /proc/loadavg))"
	WALLS[$tool.$kind.$n]+="${out% *}"$'\n'
	RSSS[$tool.$kind.$n]+="${out#* }"$'\n'
	NRUNS[$tool.$kind.$n]=$i
	# The files must really be there, with the content and mode asked for.
	local count
	count=$(find "$dir" -type f -perm 0644 | wc -l)
	[ "$count" = "$n" ] || die "$tool N=$n: $count files of mode 0644 in $dir, expected $n"
	cmp -s "$dir/f-0" <(printf 'x = 1\n') || die "$tool N=$n: unexpected content in $dir/f-0"
}

say "vs_salt: opsagent $("$OPSAGENT_BIN" --version | awk '{print $2}'), $SALT_REPORTED, sizes: $SIZES, runs: $RUNS ($RUNS_BIG at N >= 10000)"
say "warming Salt's caches (untimed)"
gen 1
mkdir -p "$WORK/out/salt-1"
"${SALT[@]}" state.apply bench1 >/dev/null 2>&1 || die "salt-call does not work: see $WORK/salt/minion.log"

for n in $SIZES; do
	say "N=$n: generating the recipe and the SLS"
	gen "$n"
	runs=$RUNS
	[ "$n" -lt 10000 ] || runs=$RUNS_BIG
	# Interleaved, run by run, so that both tools see the same phases of a noisy machine.
	for ((i = 1; i <= runs; i++)); do
		once opsagent first "$n" "$i" "$runs"
		once opsagent second "$n" "$i" "$runs"
		once opsagent-running second "$n" "$i" "$runs"
		once salt first "$n" "$i" "$runs"
		once salt second "$n" "$i" "$runs"
	done
	for key in opsagent.first opsagent.second opsagent-running.second salt.first salt.second; do
		WALL[$key.$n]=$(printf '%s' "${WALLS[$key.$n]}" | median)
		RSS[$key.$n]=$(printf '%s' "${RSSS[$key.$n]}" | median)
	done
	rm -rf "$WORK/out"
done

# --- report ------------------------------------------------------------------------------
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.1f", a / b; else print "inf" }'; }
echo
echo "== opsagent apply vs salt-call --local state.apply (median of runs; wall s, peak RSS MiB) =="
printf '%-7s %-7s %5s %10s %9s %5s %10s %9s %11s %9s\n' \
	N run runs opsagent_s RSS_MiB runs salt_s RSS_MiB time_ratio RSS_ratio
for n in $SIZES; do
	for kind in first second; do
		o=opsagent.$kind.$n s=salt.$kind.$n
		printf '%-7s %-7s %5s %10.3f %9.1f %5s %10.3f %9.1f %10sx %8sx\n' "$n" "$kind" \
			"${NRUNS[$o]}" "${WALL[$o]}" "$(awk -v k="${RSS[$o]}" 'BEGIN { print k / 1024 }')" \
			"${NRUNS[$s]}" "${WALL[$s]}" "$(awk -v k="${RSS[$s]}" 'BEGIN { print k / 1024 }')" \
			"$(ratio "${WALL[$s]}" "${WALL[$o]}")" "$(ratio "${RSS[$s]}" "${RSS[$o]}")"
	done
done
echo
echo "== opsagent apply --helper-socket: helper already running (as deployed), second run =="
printf '%-7s %5s %10s %9s %11s\n' N runs opsagent_s RSS_MiB vs_salt
for n in $SIZES; do
	o=opsagent-running.second.$n
	printf '%-7s %5s %10.3f %9.1f %10sx\n' "$n" "${NRUNS[$o]}" "${WALL[$o]}" \
		"$(awk -v k="${RSS[$o]}" 'BEGIN { print k / 1024 }')" "$(ratio "${WALL[salt.second.$n]}" "${WALL[$o]}")"
done
echo "(RSS here is the CLI process alone; the running helper is not its child)"
echo
echo "== scaling: wall time per state (whole process, median) =="
printf '%-7s %-7s %14s %14s\n' N run opsagent_us salt_us
for n in $SIZES; do
	for kind in first second; do
		printf '%-7s %-7s %14.1f %14.1f\n' "$n" "$kind" \
			"$(awk -v t="${WALL[opsagent.$kind.$n]}" -v n="$n" 'BEGIN { print t * 1e6 / n }')" \
			"$(awk -v t="${WALL[salt.$kind.$n]}" -v n="$n" 'BEGIN { print t * 1e6 / n }')"
	done
done
set -- $SIZES
if [ $# -ge 2 ]; then
	first=$1
	last=${!#}
	echo "marginal cost per state between N=$first and N=$last (fixed start-up cost removed):"
	for kind in first second; do
		for tool in opsagent salt; do
			printf '  %-8s %-6s %10.1f us/state\n' "$tool" "$kind" "$(awk -v a="${WALL[$tool.$kind.$first]}" \
				-v b="${WALL[$tool.$kind.$last]}" -v na="$first" -v nb="$last" 'BEGIN { print (b - a) * 1e6 / (nb - na) }')"
		done
	done
fi
for n in $SIZES; do
	if [ "$n" = 1000 ]; then
		r=$(ratio "${WALL[salt.second.1000]}" "${WALL[opsagent.second.1000]}")
		f=$(ratio "${WALL[salt.first.1000]}" "${WALL[opsagent.first.1000]}")
		verdict=$(awk -v r="$r" 'BEGIN { print (r >= 100) ? "met" : "MISSED" }')
		fverdict=$(awk -v r="$f" 'BEGIN { print (r >= 20) ? "met" : "MISSED" }')
		echo
		echo "target: opsagent >= 100x faster than Salt on the second run at N=1000: ${r}x ($verdict);" \
			"with the helper already running: $(ratio "${WALL[salt.second.1000]}" "${WALL[opsagent-running.second.1000]}")x"
		echo "target: opsagent >= 20x faster than Salt on the first run at N=1000: ${f}x ($fverdict)"
	fi
done
