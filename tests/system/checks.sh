# shellcheck shell=bash
# The checks of the state scripts (helper_states.sh, plan_states.sh, rpm_states.sh): the
# root check, $WORK, the counters, `check NAME COMMAND...`, the summary, and the EXIT
# trap. Sourced after lib.sh as `source checks.sh KIND` ($WORK is
# /tmp/opsagent-KIND-systest.*). A script with more to release than the containers
# defines `before_cleanup` (run before they are removed) or `after_cleanup` (after).

[ "$(id -u)" = 0 ] || { echo "tests/system/$(basename "$0") must run as root" >&2; exit 2; }

WORK=$(mktemp -d "/tmp/opsagent-$1-systest.XXXXXX")
export WORK
: >"$WORK/containers"
PASSED=0
FAILED=0
FAILURES=()
SUMMARY_PRINTED=0

# Runs COMMAND (its output to $WORK/checks.log) and counts it as passed or failed.
check() {
    local name=$1
    shift
    if "$@" >>"$WORK/checks.log" 2>&1; then
        PASSED=$((PASSED + 1))
        say "  pass: $name"
    else
        FAILED=$((FAILED + 1))
        FAILURES+=("$name")
        say "  FAIL: $name"
    fi
}

# The last command of a script: the failed checks, "N passed, M failed", and the status.
summary() {
    say ""
    if [ "$FAILED" -gt 0 ]; then
        say "failed checks: ${FAILURES[*]}"
    fi
    echo "$PASSED passed, $FAILED failed"
    SUMMARY_PRINTED=1
    [ "$FAILED" -eq 0 ]
}

checks_on_exit() {
    local rc=$?
    set +e
    if [ "$SUMMARY_PRINTED" = 0 ]; then
        # Stopped before the end (a setup step failed): that is a failure too.
        echo "aborted after: $PASSED passed, $FAILED failed" >&2
        echo "$PASSED passed, $((FAILED + 1)) failed"
        [ "$rc" -ne 0 ] || rc=1
    fi
    if declare -F before_cleanup >/dev/null; then before_cleanup; fi
    cleanup_all
    if declare -F after_cleanup >/dev/null; then after_cleanup; fi
    if [ "$rc" -eq 0 ] && [ "$FAILED" -eq 0 ] && [ "${OPSAGENT_SYSTEST_KEEP:-0}" != 1 ]; then
        rm -rf "$WORK"
    else
        echo "logs kept in $WORK" >&2
    fi
    exit "$rc"
}
trap checks_on_exit EXIT
trap 'exit 130' INT TERM
