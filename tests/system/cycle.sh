# shellcheck shell=bash
# Issue 19's drift cycle for the state scripts that plan (plan_states.sh, rpm_states.sh,
# puppet_plan.sh): `run`, `cycle`, their checks and `walk`, the checksum walk of what the
# plans must not write. Sourced after lib.sh and checks.sh; the script sets C (its
# container) and ROOT (the container's root on the host), defines `in_c COMMAND`, and sets
# the walk's WALK_* variables where it wants other than their defaults (see `walk`).

# walk FILE: into $WORK/FILE, run inside the container (in_c), of the directories of
# WALK_DIRS (default /etc /var /opt /home /srv /usr/local), each on its own file system
# (-xdev):
#  - "absent DIR" for each of them that is missing, so that a plan creating one shows;
#  - one line per entry: type, mode, owner, path, link target;
#  - with WALK_SIZES=yes, every regular file's path, size and modification time (a
#    rewrite with the same content counts too);
#  - the sha256 of every regular file's content; with WALK_SQLITE_SHM=skip, not of
#    SQLite's shared-memory WAL indexes (*.sqlite-shm: listed still; why in rpm_states.sh).
# Left out entirely (pruned): what the OS changes whatever the helper does, found by
# walking an idle container before and after a plan (plan_states.sh's header has each
# one's reason): journald's files, apt's binary caches, units' PrivateTmp= directories.
WALK_PRUNE='\( -path /var/log/journal -o -path "/var/cache/apt/*.bin" -o -path "/var/tmp/systemd-private-*" \) -prune -o'
walk() {
    local dirs=${WALK_DIRS:-/etc /var /opt /home /srv /usr/local} sizes="" shm=""
    case ${WALK_SIZES:-no} in
        yes) sizes="find \"\$@\" -xdev $WALK_PRUNE -type f -printf '%p %s %T@\n' | sort" ;;
        no) ;;
        *) echo "walk: WALK_SIZES is yes or no, not '$WALK_SIZES'" >&2; return 1 ;;
    esac
    case ${WALK_SQLITE_SHM:-sum} in
        skip) shm="! -name '*.sqlite-shm'" ;;
        sum) ;;
        *) echo "walk: WALK_SQLITE_SHM is sum or skip, not '$WALK_SQLITE_SHM'" >&2; return 1 ;;
    esac
    # Only the directories that exist are handed to find: it would complain of the others
    # (they are named above), and with none at all it would walk its working directory.
    in_c "set --; for d in $dirs; do if [ -e \"\$d\" ]; then set -- \"\$@\" \"\$d\"; else echo \"absent \$d\"; fi; done
        [ \$# -gt 0 ] || exit 0
        find \"\$@\" -xdev $WALK_PRUNE -printf '%y %m %u:%g %p -> %l\n' | sort
        $sizes
        find \"\$@\" -xdev $WALK_PRUNE -type f $shm -print0 | sort -z | xargs -0 -r sha256sum" \
        >"$WORK/$1" 2>>"$WORK/checks.log"
}

# run NAME ARGS JSON-STATES: `opsagent ARGS /root/NAME.json`; output in $WORK/NAME.out,
# exit status in $WORK/NAME.rc.
run() {
    local name=$1 args=$2 states=$3 rc=0
    printf '{"recipe_version": 1, "state": [%s]}\n' "$states" >"$ROOT/root/$name.json"
    # shellcheck disable=SC2086
    cexec "$C" opsagent $args "/root/$name.json" >"$WORK/$name.out" 2>&1 || rc=$?
    echo "$rc" >"$WORK/$name.rc"
    { echo "== $name: opsagent $args (exit $rc)"; cat "$WORK/$name.out"; } | tee -a "$WORK/apply.log" >&2
}
out_has() { grep -qF -- "$2" "$WORK/$1.out"; }
rc_is() { [ "$(cat "$WORK/$1.rc")" = "$2" ]; }
nothing_would_change() { # NAME: exit 0 and every line says (no change)
    rc_is "$1" 0 && grep -q '^ok ' "$WORK/$1.out" && ! grep -E '^(ok|change|FAILED) ' "$WORK/$1.out" | grep -qv '(no change)'
}
unchanged() { # BEFORE AFTER: the walks are equal (the difference is logged), and not empty
    [ -s "$WORK/$1" ] && [ -s "$WORK/$2" ] || { echo "empty: $1 or $2 (the walk failed?)"; return 1; }
    diff -u "$WORK/$1" "$WORK/$2" >"$WORK/$2.diff" && return 0
    cat "$WORK/$2.diff" >&2
    return 1
}
st() { printf '{"id": "%s", "module": "%s", "parameter": %s}' "$1" "$2" "$3"; }

# cycle NAME STATE EXPECTED...: the plan names each EXPECTED change and exits 3 with the
# walk unchanged; the apply succeeds and reports the same changes in the same words; the
# plan after it exits 0 with nothing to change. With PROBE set (a command run in the
# container), its output must be the same before and after the plan too: what the walk
# of files cannot see (a unit's state, a process id).
cycle() {
    local name=$1 state=$2 e
    shift 2
    walk "$name.before"
    [ -z "${PROBE:-}" ] || in_c "$PROBE" >"$WORK/$name.probe.before" 2>&1 || true
    run "$name-plan" "apply --test" "$state"
    walk "$name.after"
    [ -z "${PROBE:-}" ] || in_c "$PROBE" >"$WORK/$name.probe.after" 2>&1 || true
    check "$name: the plan exits 3" rc_is "$name-plan" 3
    for e in "$@"; do
        check "$name: the plan reports \"$e\"" out_has "$name-plan" "$e"
    done
    check "$name: the plan wrote nothing" unchanged "$name.before" "$name.after"
    if [ -n "${PROBE:-}" ]; then
        check "$name: the plan left \`$PROBE\` as it was" unchanged "$name.probe.before" "$name.probe.after"
    fi
    run "$name-apply" apply "$state"
    check "$name: the apply succeeds" rc_is "$name-apply" 0
    for e in "$@"; do
        check "$name: the apply reports \"$e\" too" out_has "$name-apply" "$e"
    done
    run "$name-again" "apply --test" "$state"
    check "$name: after the apply, nothing would change" nothing_would_change "$name-again"
}
