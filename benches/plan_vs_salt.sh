#!/usr/bin/env bash
# Plans, not applies: `opsagent apply --test` vs `salt-call --local state.apply test=True`
# on the same N files (the recipe of benches/vs_salt.sh: same path, content and mode), on a
# converged tree (nothing would change) and on a drifted tree (DRIFT_PCT % of the files
# edited behind both tools' backs: those would change). Nothing is written by either
# tool: the script checks that the drifted files are still drifted after every plan.
#
# Prints, for each tree: median wall time, median CPU time (user + system of the whole
# process tree, GNU time) and median peak RSS over RUNS runs, and the Salt/opsagent ratios.
#
#   sudo bash benches/plan_vs_salt.sh                # N = 1000, 10 % drift, 5 runs
#   N=1000 DRIFT_PCT=10 RUNS=7 sudo bash benches/plan_vs_salt.sh
#
# Environment:
#   N               number of states                     [1000]
#   DRIFT_PCT       share of files edited for the drifted tree, in % [10]
#   RUNS            runs per measurement (median taken)  [5]
#   SALT_VERSION    Salt release installed from PyPI     [3008.3]
#   SALT_VENV       virtualenv for Salt                  [/var/tmp/opsagent-bench/salt-venv]
#   OPSAGENT_BIN    opsagent binary (opsagent-helper next to it) [target/release/opsagent]
#   BENCH_TSV       also append raw rows here (tool tree run wall_s cpu_s rss_kib)
#
# opsagent is measured twice: `opsagent apply --test FILE` (starts and stops a private
# helper every run: the headline figures, as vs_salt.sh) and `opsagent apply --test
# --helper-socket` against a helper started once (as deployed). Salt gets its best case as
# in vs_salt.sh: `#!json` SLS, warm caches (the untimed converging run), terse output to a
# file. The trees are interleaved run by run (converged, then drifted, then put back) so
# both tools see the same phases of a noisy machine.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
N=${N:-1000}
DRIFT_PCT=${DRIFT_PCT:-10}
RUNS=${RUNS:-5}
SALT_VERSION=${SALT_VERSION:-3008.3}
SALT_VENV=${SALT_VENV:-/var/tmp/opsagent-bench/salt-venv}
OPSAGENT_BIN=${OPSAGENT_BIN:-$ROOT/target/release/opsagent}
BENCH_TSV=${BENCH_TSV:-}

BENCH=plan_vs_salt
# shellcheck source=benches/lib.sh
. "$ROOT/benches/lib.sh"
need_root "opsagent apply starts a private root helper; Salt reads as root too"
need_bins "$(dirname "$OPSAGENT_BIN")" "$(basename "$OPSAGENT_BIN")" opsagent-helper
DRIFTED=$((N * DRIFT_PCT / 100))
[ "$DRIFTED" -ge 1 ] || die "N=$N and DRIFT_PCT=$DRIFT_PCT drift no file"

apt_install() {
	say "installing $* with apt-get"
	DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# --- prerequisites: GNU time, a venv with Salt (as vs_salt.sh) ---------------------------
[ -x /usr/bin/time ] || apt_install time
/usr/bin/time -f %M true >/dev/null 2>&1 || die "/usr/bin/time is not GNU time"
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

WORK=$(mktemp -d /var/tmp/opsagent-plan-vs-salt.XXXXXX)
HELPER_PID=
cleanup() {
	if [ -n "$HELPER_PID" ]; then
		kill "$HELPER_PID" 2>/dev/null || true
		wait "$HELPER_PID" 2>/dev/null || true
	fi
	rm -rf "$WORK"
}
trap cleanup EXIT

mkdir -p "$WORK/helper-state"
"$(dirname "$OPSAGENT_BIN")/opsagent-helper" --socket "$WORK/helper.sock" --state-dir "$WORK/helper-state" \
	2>"$WORK/helper.log" &
HELPER_PID=$!
for _ in $(seq 100); do [ -S "$WORK/helper.sock" ] && break; sleep 0.05; done
[ -S "$WORK/helper.sock" ] || die "the helper did not create its socket: $(tail -5 "$WORK/helper.log")"

# --- masterless minion (as vs_salt.sh) -----------------------------------------------------
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

# --- the same N files for both tools (the recipe of vs_salt.sh) --------------------------
python3 - "$N" "$WORK" <<'EOF'
import json, sys
n, work = int(sys.argv[1]), sys.argv[2]
content, mode = "x = 1\n", "0644"
states = [{"id": f"file-{i}", "module": "linux.file",
           "parameter": {"path": f"{work}/out/opsagent/f-{i}", "content": content, "mode": mode}}
          for i in range(n)]
with open(f"{work}/recipe.json", "w") as f:
    json.dump({"recipe_version": 1, "state": states}, f)
sls = {f"{work}/out/salt/f-{i}": {"file.managed": [{"contents": content}, {"mode": mode}]}
       for i in range(n)}
with open(f"{work}/salt/roots/bench.sls", "w") as f:
    f.write("#!json\n")
    json.dump(sls, f)
EOF

# The drifted files: every (100 / DRIFT_PCT)-th, spread over the recipe.
DRIFT_IDX=$(awk -v n="$N" -v d="$DRIFTED" 'BEGIN { for (k = 0; k < d; k++) print int(k * n / d) }')
GOOD=$'x = 1\n' BAD=$'x = 2\n'
# set_tree CONTENT: write CONTENT into the drifted files of both trees (same inode, mode
# kept: only the content differs from the recipe)
set_tree() {
	local i
	for i in $DRIFT_IDX; do
		printf '%s' "$1" >"$WORK/out/opsagent/f-$i"
		printf '%s' "$1" >"$WORK/out/salt/f-$i"
	done
}
check_tree() { # CONTENT: the drifted files still hold it (a plan wrote nothing)
	local i
	for i in $DRIFT_IDX; do
		cmp -s "$WORK/out/opsagent/f-$i" <(printf '%s' "$1") || die "opsagent's f-$i changed under a plan"
		cmp -s "$WORK/out/salt/f-$i" <(printf '%s' "$1") || die "salt's f-$i changed under a plan"
	done
}

# measure LABEL OKCODES CMD...: one timed run; prints "wall_s cpu_s rss_kib"; exits when
# the command's exit code is not one of OKCODES (`opsagent apply --test` exits 3 when
# something would change)
measure() {
	local label=$1 ok=$2
	shift 2
	local tf="$WORK/time.out" log="$WORK/last.log" t0 t1 rc=0
	t0=$(date +%s%N)
	/usr/bin/time -f "%U %S %M" -o "$tf" "$@" >"$log" 2>&1 || rc=$?
	t1=$(date +%s%N)
	if ! [[ " $ok " == *" $rc "* ]]; then
		say "plan_vs_salt: $label exited $rc (expected one of: $ok):"
		tail -20 "$log" >&2
		exit 1
	fi
	# GNU time prints "Command exited with non-zero status" first when rc != 0.
	printf '%s %s\n' "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", (b - a) / 1e9 }')" \
		"$(tail -1 "$tf" | awk '{ printf "%.2f %s", $1 + $2, $3 }')"
}

CLK_TCK=$(getconf CLK_TCK)
# CPU time (user + system, clock ticks) the running helper has used so far.
helper_ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$HELPER_PID/stat"; }

median() { sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

declare -A WALLS CPUS RSSS WALL CPU RSS
# once TOOL TREE I: one timed plan, its figures kept for the medians, its verdict checked
once() {
	local tool=$1 tree=$2 i=$3 out want changes wall cpu rss
	if [ "$tree" = converged ]; then want=0; else want=$DRIFTED; fi
	case $tool in
	opsagent) out=$(measure "opsagent apply --test ($tree)" "0 3" "$OPSAGENT_BIN" apply --test "$WORK/recipe.json") ;;
	opsagent-running)
		local h0 h1
		h0=$(helper_ticks)
		out=$(measure "opsagent apply --test --helper-socket ($tree)" "0 3" "$OPSAGENT_BIN" apply \
			--test --helper-socket "$WORK/helper.sock" "$WORK/recipe.json")
		h1=$(helper_ticks)
		# The running helper is not the CLI's child: its share is added from /proc.
		read -r wall cpu rss <<<"$out"
		out="$wall $(awk -v c="$cpu" -v a="$h0" -v b="$h1" -v t="$CLK_TCK" 'BEGIN { printf "%.2f", c + (b - a) / t }') $rss"
		;;
	salt) out=$(measure "salt-call test=True ($tree)" "0" "${SALT[@]}" state.apply bench test=True) ;;
	esac
	# Each plan must name exactly the drifted files as what would change.
	case $tool in
	opsagent*) changes=$(grep -c '^change ' "$WORK/last.log" || true) ;;
	salt) changes=$(grep -c 'Result: Differs' "$WORK/last.log" || true) ;;
	esac
	[ "$changes" = "$want" ] || die "$tool on the $tree tree: $changes states would change, expected $want (see $WORK/last.log)"
	read -r wall cpu rss <<<"$out"
	[ -z "$BENCH_TSV" ] || printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$tool" "$tree" "$i" "$wall" "$cpu" "$rss" >>"$BENCH_TSV"
	say "  $tool $tree run $i/$RUNS: ${wall} s wall, ${cpu} s CPU, ${rss} KiB (load $(cut -d' ' -f1 /proc/loadavg))"
	WALLS[$tool.$tree]+="$wall"$'\n'
	CPUS[$tool.$tree]+="$cpu"$'\n'
	RSSS[$tool.$tree]+="$rss"$'\n'
}

say "plan_vs_salt: opsagent $("$OPSAGENT_BIN" --version | awk '{print $2}'), $SALT_REPORTED, N=$N," \
	"drift $DRIFTED files ($DRIFT_PCT %), runs: $RUNS, load $(cut -d' ' -f1-3 /proc/loadavg)"
say "converging both trees (untimed; also warms Salt's caches)"
mkdir -p "$WORK/out/opsagent" "$WORK/out/salt"
"$OPSAGENT_BIN" apply "$WORK/recipe.json" >"$WORK/converge.log" 2>&1 || die "opsagent apply failed: $(tail -5 "$WORK/converge.log")"
"${SALT[@]}" state.apply bench >"$WORK/converge.log" 2>&1 || die "salt-call failed: $(tail -5 "$WORK/converge.log")"

for ((i = 1; i <= RUNS; i++)); do
	set_tree "$GOOD"
	for tool in opsagent opsagent-running salt; do once "$tool" converged "$i"; done
	set_tree "$BAD"
	for tool in opsagent opsagent-running salt; do once "$tool" drifted "$i"; done
	check_tree "$BAD"
done
set_tree "$GOOD"
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

for key in opsagent.converged opsagent-running.converged salt.converged \
	opsagent.drifted opsagent-running.drifted salt.drifted; do
	WALL[$key]=$(printf '%s' "${WALLS[$key]}" | median)
	CPU[$key]=$(printf '%s' "${CPUS[$key]}" | median)
	RSS[$key]=$(printf '%s' "${RSSS[$key]}" | median)
done

# --- report ------------------------------------------------------------------------------
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.1f", a / b; else print "inf" }'; }
echo
echo "== plan: opsagent apply --test vs salt-call --local state.apply test=True, N=$N, $RUNS runs (median) =="
echo "(drifted: $DRIFTED files ($DRIFT_PCT %) edited; load at the end $LOAD_END)"
printf '%-10s %-17s %8s %8s %8s %11s %10s\n' tree tool wall_s cpu_s RSS_MiB salt/wall salt/cpu
for tree in converged drifted; do
	for tool in opsagent opsagent-running salt; do
		k=$tool.$tree s=salt.$tree
		printf '%-10s %-17s %8.3f %8.2f %8.1f %10sx %9sx\n' "$tree" "$tool" "${WALL[$k]}" "${CPU[$k]}" \
			"$(awk -v k="${RSS[$k]}" 'BEGIN { print k / 1024 }')" \
			"$(ratio "${WALL[$s]}" "${WALL[$k]}")" "$(ratio "${CPU[$s]}" "${CPU[$k]}")"
	done
done
echo "(opsagent: private helper started per run; opsagent-running: --helper-socket, helper already"
echo " running; CPU = user + system of the measured process tree, plus for opsagent-running the"
echo " running helper's CPU during the run, from /proc)"
