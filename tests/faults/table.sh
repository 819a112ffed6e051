#!/usr/bin/env bash
# The README's "Faults survived" table, from a run of the fault suite: the integration
# tests of tests/faults (each prints its row) and the soak (tests/faults/soak.sh; a short
# one by default, ROUNDS=10000 RESTART_EVERY=1000 for the full one). Needs root (small
# tmpfs mounts, the helper). Exit status: the suite's.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OPSAGENT_TEST_NO_SKIP=${OPSAGENT_TEST_NO_SKIP:-1}
out=$(mktemp)
trap 'rm -f "$out"' EXIT
rc=0
cargo test --locked -p opsagent --test faults -- --nocapture --test-threads=1 >"$out" 2>&1 || rc=$?
ROUNDS=${ROUNDS:-100} RESTART_EVERY=${RESTART_EVERY:-25} bash tests/faults/soak.sh >>"$out" 2>&1 || rc=$?
echo "Last run $(date -u +%Y-%m-%d) ($(nproc) cores, debug build):"
echo
echo "| fault | what the agent did | lost | recovered in |"
echo "|---|---|---|---|"
# A row may follow libtest's "test NAME ... " on the same line (one test thread).
grep -E '\| .* \|$' "$out" | sed 's/^[^|]*//' || true
if [ "$rc" != 0 ]; then
    grep -E 'panicked|FAILED|^soak:' "$out" >&2 || true
    echo "fault suite FAILED (exit $rc)" >&2
fi
exit "$rc"
