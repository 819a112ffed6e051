# shellcheck shell=bash
# Helpers of the opsagent system tests (sourced by run.sh): the cached Debian root,
# containers booted with systemd-nspawn, commands run inside them with nsenter, and
# bounded waits. Every container started here is recorded in $WORK/containers and
# torn down by cleanup_all (run.sh's EXIT trap), by pid, never by name.

CACHE_DIR=${OPSAGENT_SYSTEST_CACHE:-/var/cache/opsagent-systest}
# Bump the suffix when the package list changes: a new cached root is built.
ROOTFS=$CACHE_DIR/bookworm-r1
ROOTFS_INCLUDE=systemd,dbus,systemd-sysv,curl,ca-certificates,cron,procps,iproute2
ROOTFS_EXTRA="polkitd minisign"
MIRROR=${OPSAGENT_SYSTEST_MIRROR:-http://deb.debian.org/debian}
CPATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

say() { printf '%s\n' "$*" >&2; }

# fail REASON: records why the current test failed and stops it (tests run with set -e).
fail() {
    [ -n "${TEST_REASON_FILE:-}" ] && [ ! -s "$TEST_REASON_FILE" ] && printf '%s\n' "$*" >"$TEST_REASON_FILE"
    say "  ! $*"
    return 1
}

# wait_until SECONDS WHAT CMD...: runs CMD every second until it succeeds.
wait_until() {
    local limit=$1 what=$2 start
    shift 2
    start=$(date +%s)
    while ! "$@" >/dev/null 2>&1; do
        if [ $(($(date +%s) - start)) -ge "$limit" ]; then
            say "  timed out after ${limit}s waiting for: $what"
            return 1
        fi
        sleep 1
    done
    say "  ok after $(($(date +%s) - start))s: $what"
}

# ---------------------------------------------------------------- cached root
ensure_rootfs() {
    mkdir -p "$CACHE_DIR"
    exec 8>"$CACHE_DIR/.lock"
    flock -w 1200 8 || { say "cannot lock $CACHE_DIR/.lock"; return 1; }
    if [ -f "$ROOTFS/.opsagent-systest-complete" ]; then
        say "cached root: $ROOTFS"
        flock -u 8
        return 0
    fi
    local tmp=$ROOTFS.tmp
    rm -rf "$tmp"
    say "building the cached Debian bookworm root in $ROOTFS (debootstrap, a few minutes)"
    debootstrap --variant=minbase --include="$ROOTFS_INCLUDE" bookworm "$tmp" "$MIRROR" \
        >"$CACHE_DIR/debootstrap.log" 2>&1 || {
        say "debootstrap failed; see $CACHE_DIR/debootstrap.log"
        tail -n 20 "$CACHE_DIR/debootstrap.log" >&2
        return 1
    }
    # polkitd cannot be installed by debootstrap --include (its postinst needs a
    # working dpkg environment), so it goes in with apt inside a non-booted container.
    # minisign is preinstalled to keep tests fast; test a removes it again so that
    # userdata.sh's "install minisign" path runs once.
    systemd-nspawn --quiet --pipe --register=no --keep-unit -D "$tmp" \
        env -i PATH="$CPATH" DEBIAN_FRONTEND=noninteractive sh -c \
        "apt-get update -qq && apt-get install -y -qq $ROOTFS_EXTRA && apt-get clean" \
        >"$CACHE_DIR/apt.log" 2>&1 </dev/null || true
    local p
    for p in $ROOTFS_EXTRA; do
        if ! grep -q '^Status: install ok installed' <(sed -n "/^Package: $p\$/,/^\$/p" "$tmp/var/lib/dpkg/status"); then
            say "installing $p into the cached root failed; see $CACHE_DIR/apt.log"
            tail -n 20 "$CACHE_DIR/apt.log" >&2
            return 1
        fi
    done
    rm -f "$tmp/etc/machine-id"
    : >"$tmp/etc/machine-id"
    touch "$tmp/.opsagent-systest-complete"
    mv "$tmp" "$ROOTFS"
    flock -u 8
    say "cached root ready: $ROOTFS"
}

# ensure_derived_rootfs NAME "PACKAGES" FILE... : sets ROOTFS to $CACHE_DIR/NAME, the
# cached root plus PACKAGES (apt, no recommends), built once under its own lock and
# checked to hold each FILE (relative to the root). A script masks units or adds files
# with a `derived_rootfs_finish DIR` function, run before the root is marked complete.
ensure_derived_rootfs() {
    local name=$1 packages=$2 dir=$CACHE_DIR/$1 f
    shift 2
    exec 9>"$CACHE_DIR/.lock-$name"
    flock -w 1200 9 || { say "cannot lock $CACHE_DIR/.lock-$name"; return 1; }
    if [ ! -f "$dir/.opsagent-systest-complete" ]; then
        local tmp=$dir.tmp
        rm -rf "$tmp"
        say "building $dir (the cached root + $packages; apt from Debian's archive)"
        cp -a --reflink=auto "$ROOTFS" "$tmp"
        rm -f "$tmp/.opsagent-systest-complete"
        systemd-nspawn --quiet --pipe --register=no --keep-unit -D "$tmp" \
            env -i PATH="$CPATH" DEBIAN_FRONTEND=noninteractive sh -c \
            "apt-get update -qq && apt-get install -y -qq --no-install-recommends $packages &&
             apt-get clean && rm -rf /var/lib/apt/lists/*_*" \
            >"$CACHE_DIR/apt-$name.log" 2>&1 </dev/null || true
        for f in "$@"; do
            [ -e "$tmp/$f" ] || {
                say "$f missing from $dir; see $CACHE_DIR/apt-$name.log"
                tail -n 20 "$CACHE_DIR/apt-$name.log" >&2
                return 1
            }
        done
        if declare -F derived_rootfs_finish >/dev/null; then derived_rootfs_finish "$tmp"; fi
        touch "$tmp/.opsagent-systest-complete"
        mv "$tmp" "$dir"
    fi
    flock -u 9
    say "cached root: $dir"
    ROOTFS=$dir
}

# ---------------------------------------------------------------- containers
# Per container NAME: $WORK/c/NAME/{upper,work,root,console.log,nspawn.pid,init.pid}

_cdir() { printf '%s/c/%s' "$WORK" "$1"; }
croot() { printf '%s/root' "$(_cdir "$1")"; }
cpid() { cat "$(_cdir "$1")/init.pid"; }

_prepare_root() { # NAME: a fresh copy of the cached root (overlay, else a full copy)
    local d
    d=$(_cdir "$1")
    mkdir -p "$d/upper" "$d/work" "$d/root"
    echo "$1" >>"$WORK/containers"
    if mount -t overlay overlay -o "lowerdir=$ROOTFS,upperdir=$d/upper,workdir=$d/work" "$d/root" 2>/dev/null; then
        echo overlay >"$d/kind"
    else
        say "  (overlayfs unavailable; copying the root)"
        cp -a --reflink=auto "$ROOTFS/." "$d/root/"
        echo copy >"$d/kind"
    fi
}

# With --keep-unit and --register=no, nspawn runs the container in nspawn's own cgroup
# (its "payload" child). Without a cgroup of its own per container, all containers
# would share one tree, and each container's systemd would manage (and kill) the
# others' units. So each nspawn starts inside a fresh child of our cgroup, in the
# cgroup2 hierarchy and, on hybrid hosts, in the name=systemd v1 hierarchy.
_cgroup_dirs() { # NAME: the per-container cgroup directories (created here)
    local name=$1 mnt rel
    if [ "$(stat -fc %T /sys/fs/cgroup 2>/dev/null)" = cgroup2fs ]; then
        rel=$(sed -n 's/^0::\(.*\)/\1/p' /proc/self/cgroup)
        echo "/sys/fs/cgroup${rel%/}/opsagent-systest-$$-$name"
    else
        for mnt in unified systemd; do
            [ -d "/sys/fs/cgroup/$mnt" ] || continue
            if [ "$mnt" = unified ]; then
                rel=$(sed -n 's/^0::\(.*\)/\1/p' /proc/self/cgroup)
            else
                rel=$(sed -n 's/^[0-9]*:name=systemd:\(.*\)/\1/p' /proc/self/cgroup)
            fi
            echo "/sys/fs/cgroup/$mnt${rel%/}/opsagent-systest-$$-$name"
        done
    fi
}

# _start NAME NSPAWN-ARGS...: starts systemd-nspawn in the background and records the
# pid of the container's PID 1 (nspawn's child).
_start() {
    local name=$1 d npid init="" cg
    shift
    d=$(_cdir "$name")
    _cgroup_dirs "$name" >"$d/cgroups"
    while read -r cg; do mkdir -p "$cg"; done <"$d/cgroups"
    (
        while read -r cg; do echo "$BASHPID" >"$cg/cgroup.procs"; done <"$d/cgroups"
        exec systemd-nspawn --quiet --register=no --keep-unit --console=passive \
            -M "systest-$name" -D "$d/root" "$@"
    ) >"$d/console.log" 2>&1 </dev/null &
    npid=$!
    echo "$npid" >"$d/nspawn.pid"
    # The container's PID 1 is the child of nspawn that lives in another pid namespace
    # (nspawn's short-lived "outer child" shares nspawn's and must not be taken).
    local child own
    own=$(readlink "/proc/$npid/ns/pid" 2>/dev/null || true)
    for _ in $(seq 1 100); do
        for child in $(ps -o pid= --ppid "$npid" 2>/dev/null || true); do
            if [ -n "$own" ] && [ "$(readlink "/proc/$child/ns/pid" 2>/dev/null || echo "$own")" != "$own" ]; then
                init=$child
                break 2
            fi
        done
        kill -0 "$npid" 2>/dev/null || break
        sleep 0.1
        [ -n "$own" ] || own=$(readlink "/proc/$npid/ns/pid" 2>/dev/null || true)
    done
    if [ -z "$init" ]; then
        say "  container $name did not start:"
        cat "$d/console.log" >&2
        return 1
    fi
    echo "$init" >"$d/init.pid"
}

# boot NAME: a fresh container booted with systemd as PID 1, up to a running system.
boot() {
    local name=$1
    _prepare_root "$name"
    _start "$name" -b || return 1
    wait_until 90 "container $name: systemd up" csh "$name" \
        'state=$(systemctl is-system-running 2>/dev/null); [ "$state" = running ] || [ "$state" = degraded ]' ||
        {
            csh "$name" 'systemctl is-system-running; systemctl list-jobs --no-pager; systemctl --failed --no-pager;
                journalctl -b --no-pager | tail -n 40' >&2 || true
            return 1
        }
}

# start_plain NAME CMD...: a fresh container WITHOUT systemd: CMD runs as PID 2 under
# nspawn's stub init.
start_plain() {
    local name=$1
    shift
    _prepare_root "$name"
    _start "$name" --as-pid2 "$@" || return 1
    wait_until 20 "container $name: started" cexec "$name" true
}

# cexec NAME CMD...: runs CMD in all namespaces of the container, clean environment.
cexec() {
    local pid
    pid=$(cpid "$1")
    shift
    nsenter -t "$pid" -a -- env -i PATH="$CPATH" LANG=C.UTF-8 HOME=/root "$@"
}

# csh NAME SCRIPT: runs a shell snippet inside the container.
csh() { cexec "$1" sh -c "$2"; }

stop_container() { # NAME: orderly shutdown, then SIGKILL; unmount and remove
    local name=$1 d npid init cg
    d=$(_cdir "$name")
    [ -d "$d" ] || return 0
    [ ! -e "$d/stopped" ] || return 0
    npid=$(cat "$d/nspawn.pid" 2>/dev/null || true)
    init=$(cat "$d/init.pid" 2>/dev/null || true)
    # Only our own nspawn process (a recycled pid must never be signalled).
    if [ -n "$npid" ] && [ "$(cat "/proc/$npid/comm" 2>/dev/null)" = systemd-nspawn ]; then
        kill -TERM "$npid" 2>/dev/null || true
        for _ in $(seq 1 150); do
            kill -0 "$npid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$npid" 2>/dev/null; then
            [ -z "$init" ] || [ "$(ps -o ppid= -p "$init" 2>/dev/null | tr -d ' ')" != "$npid" ] ||
                kill -KILL "$init" 2>/dev/null || true
            kill -KILL "$npid" 2>/dev/null || true
        fi
        wait "$npid" 2>/dev/null || true
    fi
    if mountpoint -q "$d/root"; then
        umount "$d/root" 2>/dev/null || umount -l "$d/root" 2>/dev/null || true
    fi
    if ! mountpoint -q "$d/root"; then
        rm -rf "$d/upper" "$d/work" "$d/root"
    fi
    if [ -f "$d/cgroups" ]; then
        while read -r cg; do
            [ ! -d "$cg" ] || find "$cg" -depth -type d -exec rmdir {} + 2>/dev/null || true
        done <"$d/cgroups"
    fi
    touch "$d/stopped"
}

# stop_containers PREFIX: stops the containers whose names start with PREFIX.
stop_containers() {
    local name
    [ -f "$WORK/containers" ] || return 0
    while read -r name; do
        case $name in "$1"*) stop_container "$name" ;; esac
    done < <(sort -u "$WORK/containers")
}

cleanup_all() {
    local name
    [ -f "$WORK/containers" ] || return 0
    while read -r name; do
        stop_container "$name"
    done < <(sort -u "$WORK/containers")
}

# install_host_tools CMD:PACKAGE...: apt-get install the packages whose command is missing
# on the host (a fresh CI machine has only the Rust toolchain).
install_host_tools() {
    local pair need=()
    for pair in "$@"; do
        command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
    done
    if [ "${#need[@]}" -gt 0 ]; then
        say "installing ${need[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq "${need[@]}" >/dev/null
    fi
}
