#!/usr/bin/env bash
# Every benchmark of issue 10 in one go, then a short table of the figures.
#
#   sudo bash benches/run-all.sh            # about 15-30 minutes on 2 cores
#   QUICK=1 sudo bash benches/run-all.sh    # smaller sizes and fewer runs, a few minutes
#
# 1. vs Salt   benches/vs_salt.sh: opsagent apply vs salt-call --local state.apply,
#              N = 100 / 1,000 / 10,000 files, first and second run (also the scaling of
#              opsagent apply per state)
# 2. latency   cargo bench --bench push_latency: backend push -> helper Apply, real daemon
#              (in-process backend and stand-in helper: the daemon's own share), and
#              benches/push_e2e.py: the same through the real backend, daemon and helper
# 3. footprint benches/footprint.sh: RSS of the real daemon and helper, idle and 1k/10k rounds
# 4. engine    cargo bench --bench engine: round-engine overhead per state, parse+validate
#              of a 10,000-state recipe
# 5. activation benches/activation.sh: the first request after the helper exited when
#              idle (socket activation) vs one served by a running helper
# 6. converged benches/converged.sh: a realistic converged round (67 states) by opsagent,
#              Salt, Ansible and Puppet, interleaved; wall and whole-tree CPU time
# 7. plan      benches/plan_vs_salt.sh: opsagent apply --test vs salt-call state.apply
#              test=True on the 1,000-file recipe of vs_salt.sh, converged and with 10 % of
#              the files drifted; wall and CPU time (issue 19)
# Raw output goes to $OUT (default target/bench-results/DATE), the table to stdout and
# $OUT/summary.txt. `bash benches/run-all.sh --summary DIR` prints the table of an earlier
# run again.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
if [ "${1:-}" = --summary ]; then
	OUT=${2:?--summary DIR}
	SUMMARY_ONLY=1
else
	OUT=${OUT:-$ROOT/target/bench-results/$(date -u +%Y%m%d-%H%M%S)}
	SUMMARY_ONLY=
	mkdir -p "$OUT"
	date -u +%Y-%m-%dT%H:%MZ >"$OUT/stamp"
fi
[ -n "$SUMMARY_ONLY" ] || [ "$(id -u)" = 0 ] || {
	echo "run-all: needs root (opsagent apply and the helper run as root)" >&2
	exit 1
}

if [ -n "${QUICK:-}" ]; then
	export SIZES=${SIZES:-"100 1000"} RUNS=${RUNS:-3} PUSHES=${PUSHES:-100}
	FP_SIZES=${FP_SIZES:-"1000"}
	CONVERGED_RUNS=${CONVERGED_RUNS:-3}
	PLAN_RUNS=${PLAN_RUNS:-3}
else
	export RUNS=${RUNS:-5} RUNS_BIG=${RUNS_BIG:-3} PUSHES=${PUSHES:-200}
	FP_SIZES=${FP_SIZES:-"1000 10000"}
fi

step() { printf '\n### %s\n' "$*" | tee -a "$OUT/all.log" >&2; }

if [ -z "$SUMMARY_ONLY" ]; then
step "build: cargo build --release --workspace; cargo bench --no-run"
cargo build --release --workspace 2>&1 | tail -2 >&2
cargo bench --bench push_latency --bench engine --no-run 2>&1 | tail -2 >&2

step "1. vs Salt: benches/vs_salt.sh (SIZES=${SIZES:-100 1000 10000} RUNS=$RUNS RUNS_BIG=${RUNS_BIG:-3})"
BENCH_TSV="$OUT/vs_salt.tsv" bash benches/vs_salt.sh 2>"$OUT/vs_salt.log" | tee "$OUT/vs_salt.txt" >&2

step "2. push-to-apply latency: cargo bench --bench push_latency (PUSHES=$PUSHES)"
cargo bench --bench push_latency 2>"$OUT/push_latency.log" | tee "$OUT/push_latency.txt" >&2
PUSHES=$PUSHES python3 benches/push_e2e.py 2>"$OUT/push_e2e.log" | tee "$OUT/push_e2e.txt" >&2

step "3. footprint: benches/footprint.sh (SIZES=$FP_SIZES)"
SIZES=$FP_SIZES bash benches/footprint.sh 2>"$OUT/footprint.log" | tee "$OUT/footprint.txt" >&2

step "4. engine: cargo bench --bench engine"
cargo bench --bench engine 2>"$OUT/engine.log" | tee "$OUT/engine.txt" >&2

step "5. helper started on demand: benches/activation.sh"
bash benches/activation.sh 2>"$OUT/activation.log" | tee "$OUT/activation.txt" >&2

step "6. converged round vs Salt, Ansible, Puppet: benches/converged.sh (RUNS=${CONVERGED_RUNS:-7})"
RUNS=${CONVERGED_RUNS:-7} BENCH_TSV="$OUT/converged.tsv" bash benches/converged.sh 2>"$OUT/converged.log" |
	tee "$OUT/converged.txt" >&2

step "7. plan vs Salt test=True: benches/plan_vs_salt.sh (N=1000, 10 % drift, RUNS=${PLAN_RUNS:-7})"
N=1000 RUNS=${PLAN_RUNS:-7} BENCH_TSV="$OUT/plan_vs_salt.tsv" bash benches/plan_vs_salt.sh 2>"$OUT/plan_vs_salt.log" |
	tee "$OUT/plan_vs_salt.txt" >&2
fi

# --- the short table -----------------------------------------------------------------------
{
	echo "opsagent benchmarks, $(cat "$OUT/stamp"), $(nproc) cores, $(uname -r), opsagent $(target/release/opsagent --version | awk '{print $2}')"
	echo "commands: sudo bash benches/run-all.sh   (raw output: $OUT)"
	echo
	echo "opsagent apply vs salt-call --local state.apply (median wall s / peak RSS MiB):"
	sed -n '/^N  *run  *runs/,/^$/p' "$OUT/vs_salt.txt" | sed '/^$/d'
	grep '^target:' "$OUT/vs_salt.txt" || true
	echo
	echo "opsagent apply --helper-socket (helper already running, as deployed), second run:"
	sed -n '/^== opsagent apply --helper-socket/,/^$/p' "$OUT/vs_salt.txt" | grep -v '^==' | sed '/^$/d'
	echo
	echo "opsagent apply, time per state:"
	sed -n '/^== scaling/,$p' "$OUT/vs_salt.txt" | grep -v '^==' | grep -v '^target:' | sed '/^$/d'
	echo
	echo "push -> first Apply (real daemon; in-process backend and stand-in helper):"
	grep -E '^state dir on|push -> Apply' "$OUT/push_latency.txt" | sed 's/^  */  /'
	echo "push -> helper through the real backend, daemon and helper (benches/push_e2e.py):"
	sed -n '/^== push -> helper/,$p' "$OUT/push_e2e.txt" 2>/dev/null | grep -v '^==' | sed '/^$/d'
	echo
	echo "footprint:"
	sed -n '/^== footprint/,$p' "$OUT/footprint.txt" | grep -v '^==' | sed '/^$/d'
	echo
	echo "helper started on demand (exit when idle, socket activation):"
	sed -n '/^== helper started on demand/,$p' "$OUT/activation.txt" 2>/dev/null | grep -v '^==' | sed '/^$/d'
	echo
	echo "converged round, 67 states (benches/converged.sh; median wall s, whole-tree CPU s):"
	sed -n '/^== converged round/,$p' "$OUT/converged.txt" 2>/dev/null | grep -v '^==' | sed '/^$/d'
	echo
	echo "plan: opsagent apply --test vs salt-call state.apply test=True (benches/plan_vs_salt.sh; median):"
	sed -n '/^== plan:/,$p' "$OUT/plan_vs_salt.txt" 2>/dev/null | grep -v '^==' | sed '/^$/d'
	echo
	echo "engine (criterion, instant fake helper):"
	grep -E -A1 '^engine_round/|^parse_and_validate' "$OUT/engine.txt" | grep -E 'time:|thrpt:|^engine|^parse' |
		paste - - 2>/dev/null | sed 's/  */ /g' || cat "$OUT/engine.txt"
} | tee "$OUT/summary.txt"
