#!/usr/bin/env bash
# The README's "Faults survived" table, from a run of the fault suite: the integration
# tests of tests/faults (each prints its row) and the soak (tests/faults/soak.sh; a short
# one by default, ROUNDS=10000 RESTART_EVERY=1000 for the full one) and the power cut
# (tests/vm/run.sh, part powercut: a Debian VM killed mid-round, under KVM or emulated;
# its image is cached in OPSAGENT_VMTEST_CACHE). Where no VM can run (run.sh exits 3: not
# root, qemu or debootstrap not installable, no image) or OPSAGENT_FAULTS_VM=no, the power
# cut's row says "not run" and why, and the suite does not fail for it. Needs root (small
# tmpfs mounts, the helper). Exit status: the suite's.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OPSAGENT_TEST_NO_SKIP=${OPSAGENT_TEST_NO_SKIP:-1}
out=$(mktemp)
trap 'rm -f "$out"' EXIT
rc=0
cargo test --locked -p opsagent --test faults -- --nocapture --test-threads=1 >"$out" 2>&1 || rc=$?
ROUNDS=${ROUNDS:-300} RESTART_EVERY=${RESTART_EVERY:-50} bash tests/faults/soak.sh >>"$out" 2>&1 || rc=$?
vm=$(mktemp)
trap 'rm -f "$out" "$vm"' EXIT
vrc=0
if [ "${OPSAGENT_FAULTS_VM:-yes}" = no ]; then
    echo "vm test: cannot run: OPSAGENT_FAULTS_VM=no" >"$vm"
    vrc=3
else
    OPSAGENT_VMTEST_PARTS=powercut bash tests/vm/run.sh >"$vm" 2>&1 || vrc=$?
fi
if [ "$vrc" = 3 ]; then
    why=$(sed -n 's/^vm test: cannot run: //p' "$vm" | tail -n 1)
    echo "| power cut (VM of tests/vm/run.sh, part powercut) | not run here: ${why:-no VM} | — | — |" >>"$out"
else
    cat "$vm" >>"$out"
    [ "$vrc" = 0 ] || rc=$vrc
fi
echo "Last run $(date -u +%Y-%m-%d) ($(nproc) cores, debug build):"
echo
echo "| fault | what the agent did | lost | recovered in |"
echo "|---|---|---|---|"
# A row may follow libtest's "test NAME ... " on the same line (one test thread).
grep -E '\| .* \|$' "$out" | sed 's/^[^|]*//' || true
if [ "$rc" != 0 ]; then
    grep -E 'panicked|FAILED|^soak:|^vm test:|^powercut: FAIL' "$out" >&2 || true
    echo "fault suite FAILED (exit $rc)" >&2
fi
exit "$rc"
