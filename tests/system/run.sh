#!/usr/bin/env bash
# System tests of the opsagent deployment on real systemd (Debian bookworm containers
# booted with systemd-nspawn). Run as root:   bash tests/system/run.sh [TEST...]
#
# Builds the release once (packaging/build-release, signed with a throw-away minisign
# key), serves it over HTTP on 127.0.0.1, runs the reference backend on the host, and
# installs the agent in fresh containers (they share the host network) with
# packaging/userdata.sh, as an instance would. Tests (select with arguments, e.g. "a e"):
#   a  install from userdata; Handshake + StateLogs; re-run changes nothing
#   b  watchdog: a SIGSTOPped agent is restarted by systemd
#   c  helper socket activation; other users refused (file mode, then SO_PEERCRED);
#      the helper exits when idle and each round starts it again
#   d  journal fields (OPSAGENT_STATE_ID=...) and the STATUS= line
#   e  polkit rule: exactly restart opsagent.service / start opsagent-upgrade.service
#   f  systemd-analyze verify + security scores (opsagent.service must be <= 2.0)
#   g  cron fallback without systemd: started, and restarted after kill -9
#   h  userdata.sh refuses releases that are unsigned, re-labelled, tampered with or signed
#      with another key, each for its own reason
#   i  the .deb: installs, does not start without a config, starts with one, removes
#   j  the helper's sandbox: chown/chmod, a command as another user, a service restart
#      over D-Bus work; the helper has no network unless HELPER_NETWORK=yes (drop-in),
#      its commands (transient units) have the host's either way
#   k  self-upgrade ordered by the backend: tampered, wrongly signed and path-traversal
#      releases refused (reason reported once as UpgradeReport, never as a StateLog,
#      version unchanged); A -> B after the round, ordered with the backend's URI as url;
#      a B that exits at start is reverted within the health gate and held off; the
#      units userdata installed follow each switch (B's, back to B's, A's), loaded by
#      systemd, the helper socket re-created
#   l  cron host: links the agent user plants in its log and state directories (to a
#      root-owned file) and a staged order whose url forges a log line: after a
#      supervisor pass (rotation forced) and a userdata re-run the file is unchanged, no
#      log line holds the forged line, the order is refused
#   m  the original VisualOps userdata template (tests/fixtures/original/userdata.sh,
#      its placeholders filled, run as it is) installs the agent from the published
#      BASE_REMOTE/VERSION/ud_init.sh without any UPDATE_KEY; the original's ssh-keygen
#      token in /etc/opsagent.token is kept and sent
#   n  commands as transient units: hostname, a tmpfs mount, the namespaced sysctl
#      kernel.domainname (by setdomainname: nspawn mounts /proc/sys read-only), mkfs +
#      mount of a loop device from a recipe with no drop-in, while the helper holds no
#      CAP_SYS_ADMIN; a timed-out and a preempted command that double-forked a sleep
#      leave no process; journalctl -u shows a command's output; no opsagent-state-*
#      unit is left loaded after the round; CPU time in the outcome; an apt install
#      whose request is cancelled while its postinst runs finishes, dpkg --audit clean
#   o  preemption through the daemon: while an apt install of the backend's recipe runs
#      its postinst, the backend pushes a new recipe; the install finishes (dpkg --audit
#      clean, the package installed), the old round's next state never runs, and the new
#      recipe's state runs after the postinst ended
#   (g also upgrades the cron-supervised agent)
#
# Environment: OPSAGENT_SYSTEST_CACHE (cached root, default /var/cache/opsagent-systest),
# OPSAGENT_SYSTEST_KEEP=1 keeps the work directory (logs) even when all tests pass.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
# shellcheck source=tests/system/lib.sh
source "$HERE/lib.sh"

[ "$(id -u)" = 0 ] || { echo "tests/system/run.sh must run as root" >&2; exit 2; }

ALL_TESTS="a b c d e f g h i j k l m n o"
SELECTED=${*:-$ALL_TESTS}
SUITE_START=$(date +%s)
WORK=$(mktemp -d /tmp/opsagent-systest.XXXXXX)
export WORK
: >"$WORK/containers"
BG_PIDS=()
HOST_PIDS=()

on_exit() {
    local rc=$? p
    set +e
    for p in "${BG_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
    cleanup_all
    # Loop devices tests attached on the host (test m), once their containers are gone.
    if [ -f "$WORK/loops" ]; then
        while read -r p; do losetup -d "$p" 2>/dev/null; done <"$WORK/loops"
    fi
    for p in "${HOST_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
    for p in "${HOST_PIDS[@]}"; do wait "$p" 2>/dev/null; done
    if [ "$rc" -eq 0 ] && [ "${OPSAGENT_SYSTEST_KEEP:-0}" != 1 ]; then
        rm -rf "$WORK"
    else
        echo "logs kept in $WORK" >&2
    fi
    exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- prerequisites
install_host_tools systemd-nspawn:systemd-container debootstrap:debootstrap minisign:minisign curl:curl \
    python3:python3 nsenter:util-linux dpkg-deb:dpkg ps:procps

ensure_rootfs

# ---------------------------------------------------------------- release, backend, HTTP
say "building the release (cargo build --release --workspace --locked)"
minisign -G -W -p "$WORK/update.pub" -s "$WORK/update.key" >/dev/null </dev/null
UPDATE_KEY=$(sed -n 2p "$WORK/update.pub")
minisign -G -W -p "$WORK/other.pub" -s "$WORK/other.key" >/dev/null </dev/null
OTHER_KEY=$(sed -n 2p "$WORK/other.pub")
built=0
for attempt in 1 2 3; do
    # Others change the sources concurrently: a momentarily broken build is retried.
    if SIGNING_KEY=$WORK/update.key "$REPO/packaging/build-release" "$WORK/releases" >"$WORK/build.log" 2>&1; then
        built=1
        break
    fi
    say "build attempt $attempt failed (tail of $WORK/build.log):"
    tail -n 15 "$WORK/build.log" >&2
    [ "$attempt" = 3 ] || sleep 60
done
[ "$built" = 1 ] || { say "cannot build the release"; exit 1; }
VERSION=$(ls "$WORK/releases")
say "release $VERSION: $(ls "$WORK/releases/$VERSION" | tr '\n' ' ')"
OPSAGENT_SKIP_BUILD=1 "$REPO/packaging/build-deb" "$WORK/deb" >>"$WORK/build.log" 2>&1 ||
    { say "build-deb failed"; tail -n 15 "$WORK/build.log" >&2; exit 1; }
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}

# Refused releases for test h: a validly signed archive re-labelled as another version,
# a tampered archive, and one signed by a key that is not UPDATE_KEY.
mkdir -p "$WORK/releases/9.9.1" "$WORK/releases/9.9.2" "$WORK/releases/9.9.3" "$WORK/releases/9.9.4"
# 9.9.4: the archive without its signature.
cp "$WORK/releases/$VERSION/opsagent.tgz" "$WORK/releases/9.9.4/"
cp "$WORK/releases/$VERSION/opsagent.tgz" "$WORK/releases/$VERSION/opsagent.tgz.minisig" "$WORK/releases/9.9.1/"
cp "$WORK/releases/$VERSION/opsagent.tgz" "$WORK/releases/9.9.2/"
printf 'tampered' >>"$WORK/releases/9.9.2/opsagent.tgz"
minisign -S -s "$WORK/update.key" -m "$WORK/releases/$VERSION/opsagent.tgz" -x "$WORK/releases/9.9.2/opsagent.tgz.minisig" \
    -t "opsagent release 9.9.2" >/dev/null </dev/null
cp "$WORK/releases/$VERSION/opsagent.tgz" "$WORK/releases/9.9.3/"
minisign -S -s "$WORK/other.key" -m "$WORK/releases/9.9.3/opsagent.tgz" -x "$WORK/releases/9.9.3/opsagent.tgz.minisig" \
    -t "opsagent release 9.9.3" >/dev/null </dev/null

# Releases for the self-upgrade tests (k, g): the built release re-packaged and signed
# under other versions. KIND broken: bin/opsagent exits at start; traversal: one entry
# climbs out of the tree (signed, so only the unpacker can refuse it).
# Every one changes its units so that test k sees the installer carry them over: the
# mark "opsagent release VERSION" at the end of the units, drop-ins and polkit rule,
# an Environment= of opsagent.service and the Description= of the helper socket (both
# visible in `systemctl show` once systemd loaded them).
make_release() { # VERSION [KIND]
    local v=$1 kind=${2:-} d u
    d=$(mktemp -d)
    tar -xzf "$WORK/releases/$VERSION/opsagent.tgz" -C "$d"
    mv "$d/opsagent-$VERSION" "$d/opsagent-$v"
    if [ "$kind" = broken ]; then
        printf '#!/bin/sh\necho "this release is broken" >&2\nexit 1\n' >"$d/opsagent-$v/bin/opsagent"
    fi
    u=$d/opsagent-$v/units
    for f in opsagent.service opsagent-helper.socket opsagent-upgrade.service opsagent-helper-network.conf; do
        printf '# opsagent release %s\n' "$v" >>"$u/$f"
    done
    printf '// opsagent release %s\n' "$v" >>"$d/opsagent-$v/polkit/50-opsagent.rules"
    sed -i "/^\[Service\]/a Environment=OPSAGENT_RELEASE_MARK=$v" "$u/opsagent.service"
    sed -i "s/^Description=.*/& (release $v)/" "$u/opsagent-helper.socket"
    (
        cd "$d/opsagent-$v"
        echo "version $v"
        find . -type f ! -path ./MANIFEST | sed 's|^\./||' | LC_ALL=C sort | while IFS= read -r f; do sha256sum "$f"; done
    ) >"$d/MANIFEST"
    mv "$d/MANIFEST" "$d/opsagent-$v/MANIFEST"
    mkdir -p "$WORK/releases/$v"
    if [ "$kind" = traversal ]; then
        python3 - "$d" "$v" "$WORK/releases/$v/opsagent.tgz" <<'PY'
import io, sys, tarfile
d, v, out = sys.argv[1:]
with tarfile.open(out, "w:gz") as t:
    t.add(f"{d}/opsagent-{v}", arcname=f"opsagent-{v}")
    data = b"escaped\n"
    info = tarfile.TarInfo(f"opsagent-{v}/../../../../../tmp/opsagent-escaped")
    info.size = len(data)
    t.addfile(info, io.BytesIO(data))
PY
    else
        tar --owner=0 --group=0 --numeric-owner -C "$d" -czf "$WORK/releases/$v/opsagent.tgz" "opsagent-$v"
    fi
    minisign -S -s "$WORK/update.key" -m "$WORK/releases/$v/opsagent.tgz" -x "$WORK/releases/$v/opsagent.tgz.minisig" \
        -t "opsagent release $v" >/dev/null </dev/null
    rm -rf "$d"
}
make_release 9.10.0
make_release 9.11.0 broken
make_release 9.12.0 traversal

python3 -u -m http.server --bind 127.0.0.1 --directory "$WORK/releases" 0 >"$WORK/http.out" 2>"$WORK/http.err" &
HOST_PIDS+=($!)
wait_until 15 "HTTP server" grep -q 'port [0-9]' "$WORK/http.out"
HTTP_PORT=$(sed -n 's/.* port \([0-9]*\).*/\1/p' "$WORK/http.out" | head -n 1)
BASE_REMOTE=http://127.0.0.1:$HTTP_PORT

mkdir -p "$WORK/recipes"
APP_ID=app-sys
cp "$HERE/recipe-app-sys.json" "$WORK/recipes/$APP_ID.json"
# Apps of their own for the tests that order upgrades (an order goes to a whole app).
cp "$HERE/recipe-app-sys.json" "$WORK/recipes/app-cron.json"
cp "$HERE/recipe-app-upg.json" "$WORK/recipes/app-upg.json"
"$TARGET_DIR/release/opsagent-backend" --listen 127.0.0.1:0 --recipe-dir "$WORK/recipes" \
    --statelog "$WORK/statelog.jsonl" --events "$WORK/events.jsonl" >"$WORK/backend.out" 2>"$WORK/backend.err" &
HOST_PIDS+=($!)
wait_until 15 "reference backend" grep -q 'listening on' "$WORK/backend.out"
BACKEND=$(sed -n 's/.*listening on \([0-9.:]*\).*/\1/p' "$WORK/backend.out" | head -n 1)
WS_URI=ws://$BACKEND/
say "backend $WS_URI, releases $BASE_REMOTE, work $WORK"

# ---------------------------------------------------------------- shared steps
# userdata NAME INSTANCE_ID [VAR=value...]: runs packaging/userdata.sh in the container
# as an instance's userdata would (root, variables in the environment).
userdata() {
    local name=$1 iid=$2
    shift 2
    cp "$REPO/packaging/userdata.sh" "$(croot "$name")/root/userdata.sh"
    cexec "$name" env WS_URI="$WS_URI" APP_ID="$APP_ID" VERSION="$VERSION" BASE_REMOTE="$BASE_REMOTE" \
        UPDATE_KEY="$UPDATE_KEY" INSTANCE_ID="$iid" "$@" sh /root/userdata.sh
}

# install_agent NAME INSTANCE_ID [VAR=value…]: boot a fresh container and install the
# agent in it.
install_agent() {
    boot "$1"
    userdata "$@" || fail "userdata.sh failed in $1"
    csh "$1" 'systemctl is-active --quiet opsagent.service' || fail "opsagent.service is not active after userdata.sh"
}

statelogs_of() { # INSTANCE_ID STATE_ID: StateLogs of that state with state_result true
    grep -F "\"instance_id\":\"$1\"" "$WORK/statelog.jsonl" 2>/dev/null |
        grep -F "\"id\":\"$2\"" | grep -c '"state_result":true'
}
has_statelog() { [ "$(statelogs_of "$1" "$2")" -gt 0 ]; }
upgrade_report_with() { # INSTANCE_ID VERSION TEXT: an UpgradeReport of VERSION whose reason holds TEXT
    grep -F '"code":"UpgradeReport"' "$WORK/events.jsonl" 2>/dev/null | grep -F "\"instance_id\":\"$1\"" |
        grep -F "\"version\":\"$2\"" | grep -qF -- "$3"
}
upgrade_reason() { # INSTANCE_ID VERSION: the reason of its first UpgradeReport
    grep -F '"code":"UpgradeReport"' "$WORK/events.jsonl" | grep -F "\"instance_id\":\"$1\"" |
        grep -F "\"version\":\"$2\"" | head -n 1 | sed -n 's/.*"reason":"\([^"]*\)".*/\1/p'
}
handshake_version() { # INSTANCE_ID: the agent_version of its last Handshake
    grep -F '"code":"Handshake"' "$WORK/events.jsonl" 2>/dev/null | grep -F "\"instance_id\":\"$1\"" | tail -n 1 |
        sed -n 's/.*"agent_version":"\([^"]*\)".*/\1/p'
}
runs_version() { [ "$(handshake_version "$1")" = "$2" ]; }
order_upgrade() { # APP VERSION [URL]: the backend orders the app's agents to VERSION
    # URL: the release archive (default), or, as the original backend sent it, the
    # backend's WebSocket URI (the release then comes from [userdata] base_remote).
    printf '{"version": "%s", "url": "%s"}\n' "$2" "${3:-$BASE_REMOTE/$2/opsagent.tgz}" >"$WORK/recipes/$1.update.json.tmp"
    mv "$WORK/recipes/$1.update.json.tmp" "$WORK/recipes/$1.update.json"
}
has_handshake() {
    grep -F '"code":"Handshake"' "$WORK/events.jsonl" 2>/dev/null | grep -qF "\"instance_id\":\"$1\""
}
unit_prop() { csh "$1" "systemctl show -p $3 --value $2"; }
journal_has() { csh "$1" "journalctl --no-pager $2 | grep -q -- \"$3\""; }

# ---------------------------------------------------------------- a. install
test_a() {
    local c=a-install iid=i-sys pid1 inv1 hpid1 pid2 inv2 hpid2 out
    boot $c
    # The cached root has minisign; remove it so that userdata.sh installs it (apt).
    csh $c 'DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq minisign >/dev/null && ! command -v minisign' ||
        fail "cannot remove minisign from the container"
    userdata $c $iid >"$WORK/a-userdata1.log" 2>&1 || { cat "$WORK/a-userdata1.log" >&2; fail "userdata.sh failed"; }
    cat "$WORK/a-userdata1.log" >&2
    grep -q 'installing minisign' "$WORK/a-userdata1.log" || fail "userdata.sh did not install minisign"
    grep -q 'signature verified' "$WORK/a-userdata1.log" || fail "no signature verification in the userdata.sh output"
    [ "$(unit_prop $c opsagent.service ActiveState)" = active ] || fail "opsagent.service is not active"
    csh $c 'systemctl is-enabled --quiet opsagent.service && systemctl is-enabled --quiet opsagent-helper.socket' ||
        fail "opsagent.service / opsagent-helper.socket are not enabled"
    [ "$(csh $c 'readlink /opt/visualops/current')" = "releases/$VERSION" ] || fail "/opt/visualops/current is not releases/$VERSION"
    [ "$(csh $c 'stat -c "%U:%G %a" /etc/opsagent.conf')" = "root:opsagent 640" ] || fail "/etc/opsagent.conf is not root:opsagent 0640"
    [ "$(csh $c 'stat -c "%U:%G %a" /var/lib/visualops/opsagent/token')" = "opsagent:opsagent 600" ] ||
        fail "the token file is not opsagent:opsagent 0600"
    csh $c 'head -n 1 /var/lib/visualops/opsagent/token | grep -Eq "^[0-9a-f]{64}$"' || fail "the token is not 64 hex digits"
    csh $c 'getent passwd opsagent | grep -q nologin' || fail "the opsagent user has a login shell"
    wait_until 30 "Handshake from $iid" has_handshake $iid || fail "the backend saw no Handshake from $iid"
    # Manual pages, completion and catalog from the release, all under /usr/local.
    for page in opsagent opsagent-helper opsagent-upgrade; do
        csh $c "zcat /usr/local/share/man/man8/$page.8.gz | grep -q '^\.TH'" || fail "userdata.sh did not install $page.8"
    done
    csh $c 'bash -c ". /usr/local/share/bash-completion/completions/opsagent && complete -p opsagent" | grep -q _opsagent' ||
        fail "userdata.sh did not install the bash completion"
    for b in opsagent-helper opsagent-upgrade; do
        csh $c "bash -c '. /usr/local/share/bash-completion/completions/$b && complete -p $b'" | grep -q _opsagent_root_tool ||
            fail "userdata.sh did not install the bash completion of $b"
    done
    csh $c 'journalctl --list-catalog 777f651060c14c789dfd9d1d9aa0c00a | grep -q "recipes are not verified"' ||
        fail "userdata.sh did not install the journal catalog"
    wait_until 60 "StateLogs of sys-file and sys-cmd from $iid" \
        sh -c "grep -F '\"instance_id\":\"$iid\"' '$WORK/statelog.jsonl' | grep -F '\"id\":\"sys-cmd\"' | grep -q '\"state_result\":true'" ||
        fail "no successful StateLog of sys-cmd from $iid"
    has_statelog $iid sys-file || fail "no successful StateLog of sys-file from $iid"
    out=$(csh $c 'cat /tmp/opsagent-systest/cmd.out') || fail "the command's output file is missing"
    [ "$out" = "$(printf 'root\nhello from opsagent')" ] || fail "unexpected command output: $out"

    pid1=$(unit_prop $c opsagent.service MainPID)
    inv1=$(unit_prop $c opsagent.service InvocationID)
    hpid1=$(unit_prop $c opsagent-helper.service MainPID)
    userdata $c $iid >"$WORK/a-userdata2.log" 2>&1 || { cat "$WORK/a-userdata2.log" >&2; fail "the second userdata.sh run failed"; }
    cat "$WORK/a-userdata2.log" >&2
    grep -q 'already installed' "$WORK/a-userdata2.log" || fail "the second run did not find the release installed"
    grep -q 'not restarted' "$WORK/a-userdata2.log" || fail "the second run did not leave the agent alone"
    if grep -q -E 'downloading|wrote /etc|created' "$WORK/a-userdata2.log"; then fail "the second run changed something"; fi
    pid2=$(unit_prop $c opsagent.service MainPID)
    inv2=$(unit_prop $c opsagent.service InvocationID)
    hpid2=$(unit_prop $c opsagent-helper.service MainPID)
    say "  MainPID $pid1 -> $pid2, InvocationID $inv1 -> $inv2, helper $hpid1 -> $hpid2"
    [ "$pid1" = "$pid2" ] && [ "$inv1" = "$inv2" ] || fail "the second userdata.sh run restarted opsagent.service"
    [ "$hpid1" = "$hpid2" ] || fail "the second userdata.sh run restarted the helper"
    [ "$(csh $c 'journalctl -u opsagent.service --no-pager | grep -c "Started opsagent.service"')" = 1 ] ||
        fail "the journal shows more than one start of opsagent.service"

    # A changed setting is written and the agent restarted to take it.
    userdata $c $iid METADATA_URL=http://127.0.0.1:9/ >"$WORK/a-userdata3.log" 2>&1 ||
        { cat "$WORK/a-userdata3.log" >&2; fail "the third userdata.sh run failed"; }
    cat "$WORK/a-userdata3.log" >&2
    grep -q 'restarting opsagent.service' "$WORK/a-userdata3.log" || fail "a changed configuration did not restart the agent"
    csh $c 'grep -q "^metadata_url = \"http://127.0.0.1:9/\"" /etc/opsagent.conf' || fail "metadata_url was not written"
    [ "$(unit_prop $c opsagent.service InvocationID)" != "$inv1" ] || fail "the agent was not restarted"
    [ "$(unit_prop $c opsagent.service ActiveState)" = active ] || fail "the agent is not active after the restart"

    # Units that differ from the release's (as after an upgrade) are replaced, and the
    # socket, helper and agent cycled.
    inv1=$(unit_prop $c opsagent.service InvocationID)
    csh $c 'echo "# stale" >>/etc/systemd/system/opsagent-helper.socket' || fail "cannot edit the socket unit"
    userdata $c $iid METADATA_URL=http://127.0.0.1:9/ >"$WORK/a-userdata4.log" 2>&1 ||
        { cat "$WORK/a-userdata4.log" >&2; fail "the fourth userdata.sh run failed"; }
    cat "$WORK/a-userdata4.log" >&2
    grep -q 'restarting opsagent (release or units changed)' "$WORK/a-userdata4.log" || fail "changed units did not cycle the agent"
    csh $c '! grep -q stale /etc/systemd/system/opsagent-helper.socket' || fail "the socket unit was not replaced"
    [ "$(unit_prop $c opsagent.service InvocationID)" != "$inv1" ] || fail "the agent was not restarted"
    [ "$(unit_prop $c opsagent-helper.socket ActiveState)" = active ] || fail "the socket is not listening after the cycle"
    [ "$(unit_prop $c opsagent.service ActiveState)" = active ] || fail "the agent is not active after the cycle"
    [ "$(unit_prop $c opsagent-helper.service ActiveState)" = active ] || fail "the helper was not re-activated by the agent"
}

# ---------------------------------------------------------------- b. watchdog
test_b() {
    local c=b-watchdog pid1 pid2
    install_agent $c i-wd
    pid1=$(unit_prop $c opsagent.service MainPID)
    csh $c 'systemctl kill -s SIGSTOP opsagent.service' || fail "cannot SIGSTOP the agent"
    say "  SIGSTOPped pid $pid1; WatchdogSec=$(unit_prop $c opsagent.service WatchdogUSec)"
    wait_until 60 "journal: Watchdog timeout" journal_has $c "-u opsagent.service" "opsagent.service: Watchdog timeout" ||
        fail "no 'Watchdog timeout' in the journal within WatchdogSec + 30 s"
    wait_until 30 "opsagent.service active again with a new MainPID" \
        csh $c "[ \"\$(systemctl show -p MainPID --value opsagent.service)\" != $pid1 ] && systemctl is-active --quiet opsagent.service" ||
        fail "opsagent.service did not come back after the watchdog timeout"
    pid2=$(unit_prop $c opsagent.service MainPID)
    csh $c 'journalctl -u opsagent.service --no-pager | grep -E "Watchdog timeout|Failed with result|Scheduled restart|Started opsagent"' >&2 || true
    journal_has $c "-u opsagent.service" "Failed with result 'watchdog'" || fail "the journal does not say the unit failed by the watchdog"
    [ "$(unit_prop $c opsagent.service NRestarts)" -ge 1 ] || fail "NRestarts did not grow"
    say "  MainPID $pid1 -> $pid2"
}

# ---------------------------------------------------------------- c. socket activation
test_c() {
    local c=c-socket out rc uid
    install_agent $c i-sock
    csh $c 'systemctl stop opsagent.service && systemctl stop opsagent-helper.service' || fail "cannot stop the agent and helper"
    [ "$(unit_prop $c opsagent-helper.service ActiveState)" = inactive ] || fail "the helper did not stop"
    [ "$(unit_prop $c opsagent-helper.socket ActiveState)" = active ] || fail "the helper socket is not listening"
    out=$(csh $c 'stat -c "%U:%G %a %F" /run/opsagent-helper/helper.sock') || fail "no socket file"
    [ "$out" = "root:opsagent 660 socket" ] || fail "socket file is '$out', expected root:opsagent 660 socket"

    # nobody: not in the group. The file mode refuses the connect (connect(2) needs
    # write permission on the socket file): the helper is not even activated, and it
    # logs nothing.
    local nobody_uid
    nobody_uid=$(csh $c 'id -u nobody')
    ! csh $c 'setpriv --reuid=nobody --regid=nogroup --clear-groups test -w /run/opsagent-helper/helper.sock' ||
        fail "nobody has write permission on the socket"
    rc=0
    out=$(csh $c 'setpriv --reuid=nobody --regid=nogroup --clear-groups curl -sS --max-time 5 --unix-socket /run/opsagent-helper/helper.sock http://helper/ 2>&1') || rc=$?
    say "  nobody (uid $nobody_uid): curl exit $rc: $out"
    [ "$rc" != 0 ] || fail "nobody got an answer from the helper socket"
    [ "$(unit_prop $c opsagent-helper.service ActiveState)" = inactive ] || fail "nobody's connect reached the socket (the helper was activated)"

    # The daemon's first connection activates the helper.
    csh $c 'systemctl start opsagent.service' || fail "cannot start opsagent.service"
    [ "$(unit_prop $c opsagent-helper.service ActiveState)" = active ] || fail "the helper was not activated by the daemon"
    journal_has $c "-u opsagent.service" "helper answers" || fail "the daemon did not log that the helper answers"

    # A member of the group passes the file mode; the helper refuses it by SO_PEERCRED,
    # closes the connection without a word and logs the uid.
    csh $c 'useradd --system --no-create-home -G opsagent intruder' || fail "cannot create the test user"
    uid=$(csh $c 'id -u intruder')
    csh $c 'setpriv --reuid=intruder --regid=intruder --init-groups test -w /run/opsagent-helper/helper.sock' ||
        fail "the group member has no write permission on the socket"
    rc=0
    out=$(csh $c 'setpriv --reuid=intruder --regid=intruder --init-groups curl -sS --max-time 5 --unix-socket /run/opsagent-helper/helper.sock http://helper/ 2>&1') || rc=$?
    say "  intruder (uid $uid, group opsagent): curl exit $rc: $out"
    [ "$rc" != 0 ] || fail "the group member got an answer from the helper"
    refused_uid() { # UID: the helper journal holds a "refused connection" entry for UID
        csh $c "journalctl -u opsagent-helper.service -o json --no-pager | grep '\"MESSAGE\":\"refused connection\"' | grep -Eq '\"[A-Z_]*UID\":\"$1\"'"
    }
    wait_until 10 "helper journal: refused connection of uid $uid" refused_uid "$uid" ||
        fail "the helper did not log the refusal of uid $uid"
    ! refused_uid "$nobody_uid" || fail "nobody's connect reached the helper"
    csh $c 'journalctl -u opsagent-helper.service --no-pager | grep "refused connection"' >&2 || true
    csh $c 'systemctl is-active --quiet opsagent.service' || fail "the agent is not running after the refusals"

    # Between rounds the helper exits (--exit-idle in the shipped unit; 2 s here, and a
    # round every 6 s): no root process idles, and each round's first connection starts
    # it again through the socket. Rounds keep succeeding, and systemd records clean
    # exits, not failures.
    csh $c 'grep -q -- "^ExecStart=.*opsagent-helper --exit-idle [1-9]" /etc/systemd/system/opsagent-helper.service' ||
        fail "the shipped helper unit does not exit when idle"
    local exits0 logs0
    idle_exits() { csh $c 'journalctl -u opsagent-helper.service --no-pager | grep -c "exiting until the next connection"' || true; }
    idle_exits_reach() { [ "$(idle_exits)" -ge "$1" ]; }
    cmd_logs_reach() { [ "$(statelogs_of i-sock sys-cmd)" -ge "$1" ]; }
    exits0=$(idle_exits)
    csh $c 'mkdir -p /etc/systemd/system/opsagent-helper.service.d /etc/systemd/system/opsagent.service.d &&
        printf "[Service]\nExecStart=\nExecStart=/opt/visualops/current/bin/opsagent-helper --exit-idle 2\n" \
            >/etc/systemd/system/opsagent-helper.service.d/90-test.conf &&
        printf "[Service]\nExecStart=\nExecStart=/opt/visualops/current/bin/opsagent run --round-delay 6\n" \
            >/etc/systemd/system/opsagent.service.d/90-test.conf &&
        systemctl daemon-reload && systemctl stop opsagent.service opsagent-helper.service &&
        systemctl reset-failed opsagent-helper.service; systemctl start opsagent.service' ||
        fail "cannot set the short idle exit and round delay"
    logs0=$(statelogs_of i-sock sys-cmd)
    wait_until 60 "three idle exits of the helper" idle_exits_reach $((exits0 + 3)) || fail "the helper did not exit when idle"
    wait_until 30 "a round after the third idle exit" cmd_logs_reach $((logs0 + 4)) ||
        fail "rounds did not keep succeeding with the helper started on demand"
    say "  helper idle exits: $exits0 -> $(idle_exits); sys-cmd StateLogs: $logs0 -> $(statelogs_of i-sock sys-cmd)"
    [ "$(unit_prop $c opsagent-helper.service NRestarts)" = 0 ] || fail "systemd restarted the helper (it counted a failure)"
    [ "$(unit_prop $c opsagent-helper.service Result)" = success ] || fail "the helper's last run did not end in success"
    ! journal_has $c "-u opsagent.service" "the round ceases" || fail "a round failed while the helper came and went"
}

# ---------------------------------------------------------------- d. journal and STATUS=
test_d() {
    local c=d-journal out
    install_agent $c i-jrnl
    wait_until 60 "StateLog of sys-cmd from i-jrnl" has_statelog i-jrnl sys-cmd || fail "no StateLog from i-jrnl"
    # StateLogs can reach the backend before journald has stored the log line.
    wait_until 20 "journal: OPSAGENT_STATE_ID=sys-file with OPSAGENT_RESULT" \
        csh $c 'journalctl -u opsagent OPSAGENT_STATE_ID=sys-file --no-pager -o verbose | grep -q "OPSAGENT_RESULT="' || true
    out=$(csh $c 'journalctl -u opsagent OPSAGENT_STATE_ID=sys-file --no-pager -o verbose') || fail "journalctl failed"
    printf '%s\n' "$out" | grep -q 'OPSAGENT_STATE_ID=sys-file' || fail "journalctl -u opsagent OPSAGENT_STATE_ID=sys-file returned nothing"
    printf '%s\n' "$out" | grep -q 'OPSAGENT_MODULE=linux.file' || fail "the entries of sys-file lack OPSAGENT_MODULE=linux.file"
    printf '%s\n' "$out" | grep -q 'OPSAGENT_RESULT=true' || fail "the entries of sys-file lack OPSAGENT_RESULT=true"
    say "  $(printf '%s\n' "$out" | grep -c '^    MESSAGE=') journal entries for OPSAGENT_STATE_ID=sys-file"
    [ -z "$(csh $c 'journalctl -u opsagent OPSAGENT_STATE_ID=no-such-state --no-pager -q -o cat')" ] ||
        fail "a query for an unknown state id returned entries"
    wait_until 20 "systemctl status shows the STATUS= line with the recipe" \
        csh $c 'systemctl status opsagent.service --no-pager | grep -E "^ *Status: \".*connected to ws://.*recipe [0-9]+"' ||
        fail "systemctl status opsagent does not show the STATUS= line with the recipe"
    csh $c 'systemctl status opsagent.service --no-pager | grep "Status:"' >&2
    out=$(csh $c '/opt/visualops/current/bin/opsagent status') || fail "opsagent status failed"
    printf '%s\n' "$out" | sed 's/^/  /' >&2
    printf '%s\n' "$out" | grep -q 'recipe' || fail "opsagent status does not show the recipe"
}

# ---------------------------------------------------------------- e. polkit
test_e() {
    local c=e-polkit pid1 pid2 rc
    install_agent $c i-pk
    as_agent() { csh $c "setpriv --reuid=opsagent --regid=opsagent --init-groups $1"; }
    # polkit >= 121 lets only root pass details to CheckAuthorization, so pkcheck runs
    # as root about a subject process owned by the user in question.
    local -A subject
    subject[opsagent]=$(csh $c 'setpriv --reuid=opsagent --regid=opsagent --init-groups sleep 600 </dev/null >/dev/null 2>&1 & echo $!')
    subject[nobody]=$(csh $c 'setpriv --reuid=nobody --regid=nogroup --clear-groups sleep 600 </dev/null >/dev/null 2>&1 & echo $!')
    pk() { # USER UNIT VERB: pkcheck's exit code for a process of USER
        local r=0
        csh $c "pkcheck --action-id org.freedesktop.systemd1.manage-units --process ${subject[$1]} --detail unit $2 --detail verb $3 >/dev/null 2>&1" || r=$?
        echo "$r"
    }
    pid1=$(unit_prop $c opsagent.service MainPID)
    as_agent 'systemctl --no-ask-password restart opsagent.service' || fail "opsagent may not restart opsagent.service"
    pid2=$(unit_prop $c opsagent.service MainPID)
    [ "$pid1" != "$pid2" ] || fail "the restart by opsagent did not restart the service"
    say "  opsagent: systemctl restart opsagent.service allowed (MainPID $pid1 -> $pid2)"
    rc=0
    as_agent 'systemctl --no-ask-password stop opsagent.service' 2>/dev/null || rc=$?
    [ "$rc" != 0 ] || fail "opsagent may stop opsagent.service"
    csh $c 'systemctl is-active --quiet opsagent.service' || fail "opsagent.service was stopped by the agent user"
    rc=0
    as_agent 'systemctl --no-ask-password restart cron.service' 2>/dev/null || rc=$?
    [ "$rc" != 0 ] || fail "opsagent may restart cron.service"
    say "  opsagent: systemctl stop opsagent.service / restart cron.service denied"

    local want unit verb user got
    while read -r want user unit verb; do
        got=$(pk "$user" "$unit" "$verb")
        say "  pkcheck $user $unit $verb -> $got (want $want)"
        case $want in
            yes) [ "$got" = 0 ] || fail "pkcheck: $user $verb $unit should be allowed (exit $got)" ;;
            no) [ "$got" = 1 ] || [ "$got" = 2 ] || fail "pkcheck: $user $verb $unit should be denied (exit $got)" ;;
        esac
    done <<'EOF'
yes opsagent opsagent.service restart
yes opsagent opsagent-upgrade.service start
no opsagent opsagent.service stop
no opsagent opsagent.service start
no opsagent opsagent.service set-property
no opsagent opsagent-upgrade.service restart
no opsagent opsagent-upgrade.service stop
no opsagent cron.service restart
no opsagent opsagent.service.d restart
no opsagent opsagent-helper.service restart
no opsagent run-u1.service start
no nobody opsagent.service restart
EOF
    csh $c "kill ${subject[opsagent]} ${subject[nobody]}" || true
}

# ---------------------------------------------------------------- f. systemd-analyze
test_f() {
    local c=f-analyze out score hscore uscore
    install_agent $c i-an
    out=$(csh $c 'cd /etc/systemd/system && systemd-analyze verify opsagent.service opsagent-helper.service opsagent-helper.socket 2>&1') ||
        { say "$out"; fail "systemd-analyze verify failed"; }
    [ -z "$out" ] || { say "$out"; fail "systemd-analyze verify printed warnings"; }
    say "  systemd-analyze verify: clean"
    out=$(csh $c 'systemd-analyze security --no-pager opsagent.service') || fail "systemd-analyze security opsagent.service failed"
    score=$(printf '%s\n' "$out" | sed -n 's/.*Overall exposure level for opsagent.service: \([0-9.]*\).*/\1/p')
    out=$(csh $c 'systemd-analyze security --no-pager opsagent-helper.service') || fail "systemd-analyze security opsagent-helper.service failed"
    hscore=$(printf '%s\n' "$out" | sed -n 's/.*Overall exposure level for opsagent-helper.service: \([0-9.]*\).*/\1/p')
    out=$(csh $c 'systemd-analyze security --no-pager opsagent-upgrade.service') || fail "systemd-analyze security opsagent-upgrade.service failed"
    uscore=$(printf '%s\n' "$out" | sed -n 's/.*Overall exposure level for opsagent-upgrade.service: \([0-9.]*\).*/\1/p')
    say "  SCORE systemd-analyze security: opsagent.service $score, opsagent-helper.service $hscore, opsagent-upgrade.service $uscore"
    echo "opsagent.service $score; opsagent-helper.service $hscore; opsagent-upgrade.service $uscore" >"$WORK/scores"
    [ -n "$score" ] && [ -n "$hscore" ] && [ -n "$uscore" ] || fail "cannot read the exposure scores"
    awk -v s="$score" 'BEGIN { exit !(s <= 1.2) }' || fail "opsagent.service exposure $score > 1.2"
    # No shipped unit may get more exposed than it was when the trust-boundary work began
    # (daemon 1.2, helper 2.9 then, 2.6 since its commands run in units of their own,
    # installer 1.4), measured on the unit files as shipped:
    # installed, the helper carries the network drop-in the userdata script adds by
    # default (HELPER_NETWORK=yes), which is the operator's choice (3.7 with it).
    local unit limit shipped
    for unit in opsagent:1.2 opsagent-helper:2.6 opsagent-upgrade:1.4; do
        limit=${unit#*:}
        unit=${unit%%:*}
        shipped=$(systemd-analyze security --offline=true --no-pager "$REPO/units/$unit.service" 2>/dev/null |
            sed -n "s/.*Overall exposure level for $unit.service: \([0-9.]*\).*/\1/p")
        [ -n "$shipped" ] || fail "cannot read the exposure of units/$unit.service"
        say "  SCORE shipped units/$unit.service: $shipped (at most $limit)"
        awk -v s="$shipped" -v l="$limit" 'BEGIN { exit !(s <= l) }' || fail "units/$unit.service exposure $shipped > $limit"
    done
}

# ---------------------------------------------------------------- g. cron fallback
test_g() {
    local c=g-cron iid=i-cron hpid dpid hpid2 dpid2
    # No systemd: nspawn's stub init is PID 1 and cron runs in the foreground as PID 2.
    start_plain $c /usr/sbin/cron -f
    csh $c '[ ! -d /run/systemd/system ]' || fail "the container looks booted with systemd"
    # An old helper.env (STORAGE=yes of earlier releases) is removed; STORAGE= is ignored.
    csh $c 'mkdir -p /etc/opsagent && echo OPSAGENT_HELPER_STORAGE=yes >/etc/opsagent/helper.env'
    userdata $c $iid APP_ID=app-cron STORAGE=yes >"$WORK/g-userdata.log" 2>&1 || { cat "$WORK/g-userdata.log" >&2; fail "userdata.sh failed without systemd"; }
    cat "$WORK/g-userdata.log" >&2
    csh $c 'grep -q "opsagent-supervise" /etc/cron.d/opsagent' || fail "/etc/cron.d/opsagent is missing"
    running() { # NAME: the pid file names a live process of /opt/visualops/*/bin/NAME
        csh $c "p=\$(cat /run/opsagent-supervise/$1.pid 2>/dev/null) && [ -n \"\$p\" ] && [ \"\$(basename \"\$(readlink /proc/\$p/exe)\")\" = $1 ]"
    }
    both_running() { running opsagent-helper && running opsagent; }
    # Without systemd commands are the helper's children: it keeps CAP_SYS_ADMIN (bit 21)
    # in its bounding set for the storage states, with no switch; every start must, a
    # self-upgrade's too.
    helper_keeps_storage() {
        csh $c 'm=$(awk "/^CapBnd:/ {print \$2}" /proc/$(cat /run/opsagent-supervise/opsagent-helper.pid)/status) &&
            [ $(((0x$m >> 21) & 1)) = 1 ]'
    }
    both_restarted() {
        both_running &&
            [ "$(csh $c 'cat /run/opsagent-supervise/opsagent.pid')" != "$dpid" ] &&
            [ "$(csh $c 'cat /run/opsagent-supervise/opsagent-helper.pid')" != "$hpid" ]
    }
    two_handshakes() {
        [ "$(grep -F '"code":"Handshake"' "$WORK/events.jsonl" | grep -cF "\"instance_id\":\"$iid\"")" -ge 2 ]
    }
    wait_until 120 "helper and daemon running" both_running ||
        fail "the helper and the daemon are not running within two minutes"
    hpid=$(csh $c 'cat /run/opsagent-supervise/opsagent-helper.pid')
    dpid=$(csh $c 'cat /run/opsagent-supervise/opsagent.pid')
    [ "$(csh $c "stat -c %U /proc/$dpid")" = opsagent ] || fail "the daemon does not run as opsagent"
    [ "$(csh $c "stat -c %U /proc/$hpid")" = root ] || fail "the helper does not run as root"
    csh $c '[ ! -e /etc/opsagent/helper.env ]' || fail "the old /etc/opsagent/helper.env was not removed"
    grep -q 'STORAGE=yes is ignored' "$WORK/g-userdata.log" || fail "userdata.sh did not say that STORAGE= is ignored"
    helper_keeps_storage || fail "the helper does not keep the storage capabilities"
    [ "$(csh $c 'stat -c "%U:%G %a" /run/opsagent-helper/helper.sock')" = "root:opsagent 660" ] ||
        fail "the helper socket is not root:opsagent 0660"
    wait_until 60 "StateLog of sys-cmd from $iid" has_statelog $iid sys-cmd || fail "no StateLog from the cron-supervised agent"
    csh $c 'ps -eo pid,user,args' >&2
    say "  killing helper $hpid and daemon $dpid with SIGKILL"
    csh $c "kill -9 $hpid $dpid" || fail "cannot kill the processes"
    wait_until 130 "cron restarts both" both_restarted ||
        { csh $c 'cat /var/log/opsagent-root/supervise.log' >&2 || true; fail "cron did not restart the helper and the daemon within two minutes"; }
    hpid2=$(csh $c 'cat /run/opsagent-supervise/opsagent-helper.pid')
    dpid2=$(csh $c 'cat /run/opsagent-supervise/opsagent.pid')
    say "  helper $hpid -> $hpid2, daemon $dpid -> $dpid2"
    helper_keeps_storage || fail "the restarted helper lost the storage capabilities"
    csh $c 'cat /var/log/opsagent-root/supervise.log' >&2
    wait_until 30 "the restarted daemon reconnects (second Handshake from $iid)" two_handshakes ||
        fail "the restarted daemon did not reconnect"
    # The daemon alone: the helper living on must not keep the supervisor from acting.
    dpid=$dpid2
    hpid=$(csh $c 'cat /run/opsagent-supervise/opsagent-helper.pid')
    daemon_restarted() { running opsagent && [ "$(csh $c 'cat /run/opsagent-supervise/opsagent.pid')" != "$dpid" ]; }
    csh $c "kill -9 $dpid" || fail "cannot kill the daemon"
    wait_until 130 "cron restarts the daemon alone" daemon_restarted ||
        { csh $c 'cat /var/log/opsagent-root/supervise.log' >&2 || true; fail "cron did not restart the killed daemon while the helper ran"; }
    [ "$(csh $c 'cat /run/opsagent-supervise/opsagent-helper.pid')" = "$hpid" ] || fail "the running helper was restarted too"

    # Self-upgrade without systemd: the daemon stages the release, the next cron pass of
    # the supervisor runs the installer, which restarts both through the supervisor.
    runs_version $iid "$VERSION" || fail "the cron agent does not report $VERSION"
    order_upgrade app-cron 9.10.0
    wait_until 200 "the cron agent reconnects as 9.10.0" runs_version $iid 9.10.0 ||
        { csh $c 'tail -n 30 /var/log/visualops/opsagent.log; cat /var/log/opsagent-root/supervise.log /var/log/opsagent-root/upgrade.log; ls -lR /var/lib/visualops/opsagent/upgrade' >&2 || true; fail "the cron-supervised agent was not upgraded"; }
    csh $c '[ "$(readlink /opt/visualops/current)" = releases/9.10.0 ]' || fail "current does not point at 9.10.0"
    wait_until 60 "the upgrade confirmed" csh $c 'grep -q "\"outcome\": \"confirmed\"" /var/lib/visualops/opsagent/upgrade/result.json' ||
        fail "the installer did not confirm 9.10.0"
    csh $c "[ -d /opt/visualops/releases/$VERSION ]" || fail "the previous release was not kept"
    csh $c 'tail -n 3 /var/log/opsagent-root/upgrade.log; grep -i upgrade /var/log/opsagent-root/supervise.log' >&2
    wait_until 30 "helper and daemon running after the upgrade" both_running || fail "the agent is not running after the upgrade"
    helper_keeps_storage || fail "the helper restarted by the upgrade lost the storage capabilities"
}

# ---------------------------------------------------------------- h. refused releases
test_h() {
    local c=h-verify v log reason want
    boot $c
    # Each refusal for its own reason: a release refused for another one (say, the
    # signed comment check gone and the archive refused later) fails the test.
    for v in \
        "9.9.1|signed comment names another version|the signed comment is \"opsagent release $VERSION\", expected \"opsagent release 9.9.1\"; refusing" \
        "9.9.2|tampered archive|signature check of opsagent.tgz failed: Signature verification failed" \
        "9.9.3|signed with another key|signature check of opsagent.tgz failed: Signature key id in" \
        "9.9.4|unsigned|cannot download $BASE_REMOTE/9.9.4/opsagent.tgz.minisig"; do
        IFS='|' read -r ver reason want <<<"$v"
        log=$WORK/h-$ver.log
        if userdata $c i-bad VERSION="$ver" >"$log" 2>&1; then
            cat "$log" >&2
            fail "userdata.sh installed release $ver ($reason)"
        fi
        say "  $ver ($reason) refused: $(grep ERROR "$log" | head -n 1)"
        grep -qF "ERROR: $want" "$log" || { cat "$log" >&2; fail "release $ver ($reason) not refused with \"$want\""; }
    done
    log=$WORK/h-key.log
    if userdata $c i-bad UPDATE_KEY="$OTHER_KEY" >"$log" 2>&1; then fail "userdata.sh accepted a release with the wrong UPDATE_KEY"; fi
    say "  $VERSION with a different UPDATE_KEY refused: $(grep ERROR "$log" | head -n 1)"
    grep -qF "ERROR: signature check of opsagent.tgz failed: Signature key id in" "$log" ||
        { cat "$log" >&2; fail "the wrong UPDATE_KEY was not refused for its key id"; }
    csh $c '[ ! -e /opt/visualops/current ] && [ -z "$(ls -A /opt/visualops/releases 2>/dev/null)" ]' ||
        fail "a refused release left files in /opt/visualops"
    csh $c '! getent passwd opsagent >/dev/null && [ ! -e /etc/opsagent.conf ]' || fail "a refused install went on to create the user or config"
}

# ---------------------------------------------------------------- i. the .deb
test_i() {
    local c=i-deb deb
    boot $c
    deb=$(ls "$WORK/deb"/*.deb)
    cp "$deb" "$(croot $c)/root/opsagent.deb"
    csh $c 'dpkg -i /root/opsagent.deb' >&2 || fail "dpkg -i failed"
    csh $c 'getent passwd opsagent >/dev/null' || fail "the package did not create the user"
    [ "$(csh $c 'stat -c "%U %a" /var/lib/visualops/opsagent')" = "opsagent 700" ] || fail "the state directory is not opsagent 0700"
    [ "$(csh $c 'readlink /opt/visualops/current')" = "releases/$VERSION" ] || fail "no current symlink"
    [ "$(unit_prop $c opsagent.service ActiveState)" = inactive ] || fail "the agent started without a configuration"
    [ "$(csh $c 'systemctl is-enabled opsagent.service || true')" = disabled ] || fail "the agent was enabled without a configuration"
    csh $c "printf '[userdata]\nws_uri = $WS_URI\napp_id = $APP_ID\ninstance_id = i-deb\n' >/etc/opsagent.conf && chgrp opsagent /etc/opsagent.conf && chmod 0640 /etc/opsagent.conf" ||
        fail "cannot write the configuration"
    csh $c 'systemctl enable --now opsagent-helper.socket opsagent.service' >&2 || fail "cannot start the packaged agent"
    wait_until 60 "StateLog of sys-cmd from i-deb" has_statelog i-deb sys-cmd || fail "no StateLog from the packaged agent"
    # Manual pages, completion and the journal catalog came with the package, and
    # journalctl -x explains the agent's "recipes are not verified" entry with its text.
    csh $c 'zcat /usr/share/man/man8/opsagent.8.gz | grep -q "^\.SS .*opsagent apply"' || fail "no opsagent.8 with its commands"
    csh $c 'zcat /usr/share/man/man8/opsagent-helper.8.gz | grep -q "^\.B .*recipe"' || fail "no opsagent-helper.8"
    csh $c 'zcat /usr/share/man/man8/opsagent-upgrade.8.gz | grep -q "^\.B .*health.*timeout"' || fail "no opsagent-upgrade.8 with --health-timeout"
    csh $c 'bash -c ". /usr/share/bash-completion/completions/opsagent && complete -p opsagent" | grep -q _opsagent' ||
        fail "the bash completion does not load"
    for b in opsagent-helper opsagent-upgrade; do
        csh $c "bash -c '. /usr/share/bash-completion/completions/$b && complete -p $b'" | grep -q _opsagent_root_tool ||
            fail "the bash completion of $b does not load"
    done
    csh $c 'journalctl --list-catalog 777f651060c14c789dfd9d1d9aa0c00a | grep -q "recipes are not verified"' ||
        fail "the catalog was not installed into the journal's database"
    wait_until 20 "the catalog text under the agent's entry" csh $c \
        'journalctl -x -u opsagent.service --no-pager | grep -q "Configure RECIPE_KEY in the userdata"' ||
        fail "journalctl -x does not explain the agent's entry"
    csh $c 'dpkg -r opsagent' >&2 || fail "dpkg -r failed"
    [ "$(unit_prop $c opsagent.service ActiveState)" = inactive ] || fail "the agent still runs after dpkg -r"
    csh $c '[ ! -e /lib/systemd/system/opsagent.service ] && [ ! -e /opt/visualops/current ]' || fail "dpkg -r left files"
}

# ---------------------------------------------------------------- j. the helper's sandbox
# Recipes applied through the socket-activated helper (opsagent apply --helper-socket):
# what its unit must allow (owners and modes, a command as another user, a service
# restart over D-Bus) works; with HELPER_NETWORK=no the network is off, and the default
# (yes) gives it back.
test_j() {
    local c=j-sandbox cron1 cron2 apid1 hpid1 out rc
    install_agent $c i-sbx HELPER_NETWORK=no
    cat >"$(croot $c)/root/sandbox.json" <<EOF
{"recipe_version": 1, "state": [
  {"id": "j-dir", "module": "linux.dir", "parameter": {"path": ["/srv/j"], "mode": "0755"}},
  {"id": "j-file", "module": "linux.file", "parameter": {"path": "/srv/j/owned.txt", "content": "secret of nobody\n", "user": "nobody", "group": "nogroup", "mode": "0600"}},
  {"id": "j-as-user", "module": "linux.cmd", "parameter": {"cmd": "id -un > /tmp/j-whoami; cat /srv/j/owned.txt >> /tmp/j-whoami", "user": "nobody", "cwd": "/tmp"}},
  {"id": "j-service", "module": "linux.service", "parameter": {"name": ["cron"]}}
]}
EOF
    cat >"$(croot $c)/root/net.json" <<EOF
{"recipe_version": 1, "state": [
  {"id": "j-net", "module": "linux.cmd", "parameter": {"cmd": "curl -sS -o /dev/null --max-time 5 $BASE_REMOTE/", "cwd": "/tmp"}}
]}
EOF
    local apply="/opt/visualops/current/bin/opsagent apply --helper-socket /run/opsagent-helper/helper.sock"
    csh $c 'systemctl stop cron.service' || fail "cannot stop cron.service"
    cron1=$(unit_prop $c cron.service ActiveState)
    out=$(csh $c "$apply /root/sandbox.json 2>&1") || { say "$out"; fail "the sandboxed helper failed the basic states"; }
    say "$out"
    [ "$(csh $c 'cat /tmp/j-whoami')" = "$(printf 'nobody\nsecret of nobody')" ] ||
        fail "the command as nobody did not run as nobody or could not read its 0600 file"
    [ "$(csh $c 'stat -c "%U:%G %a" /srv/j/owned.txt')" = "nobody:nogroup 600" ] || fail "owner/mode not applied"
    cron2=$(unit_prop $c cron.service ActiveState)
    [ "$cron2" = active ] || fail "cron.service was not started over D-Bus ($cron1 -> $cron2)"
    say "  cron.service started by the helper over D-Bus: $cron1 -> $cron2"

    # The helper itself has no network (HELPER_NETWORK=no: no drop-in); the commands it
    # runs are transient units of their own, with the host's network.
    [ "$(unit_prop $c opsagent-helper.service PrivateNetwork)" = yes ] || fail "the helper has the network without the drop-in"
    out=$(csh $c "$apply /root/net.json 2>&1") || { say "$out"; fail "a command in its transient unit has no network"; }
    say "$out"

    apid1=$(unit_prop $c opsagent.service MainPID)
    hpid1=$(unit_prop $c opsagent-helper.service MainPID)
    userdata $c i-sbx >"$WORK/j-userdata.log" 2>&1 || { cat "$WORK/j-userdata.log" >&2; fail "userdata.sh (default HELPER_NETWORK=yes) failed"; }
    cat "$WORK/j-userdata.log" >&2
    grep -q 'network access' "$WORK/j-userdata.log" || fail "userdata.sh did not install the network drop-in"
    [ "$(unit_prop $c opsagent.service MainPID)" = "$apid1" ] || fail "the drop-in restarted the agent"
    [ "$(unit_prop $c opsagent-helper.service PrivateNetwork)" = no ] || fail "the helper still has PrivateNetwork=yes"
    [ "$(unit_prop $c opsagent-helper.service MainPID)" != "$hpid1" ] || fail "the helper was not restarted"
    out=$(csh $c "$apply /root/net.json 2>&1") || { say "$out"; fail "the helper has no network with HELPER_NETWORK=yes"; }
    say "$out"
}

# ---------------------------------------------------------------- k. self-upgrade
# units_are NAME VERSION: the units userdata.sh installed in NAME are those of VERSION
# (made by make_release; "" for the built release, which carries no mark), systemd has
# loaded them (nothing changed on disk since, the daemon runs with the release's
# Environment=, the socket's Description= is the release's), and the storage drop-in,
# which the userdata did not ask for, was not created.
units_are() {
    local c=$1 v=$2 f got want=${2:+opsagent release $2}
    for f in /etc/systemd/system/opsagent.service /etc/systemd/system/opsagent-helper.socket \
        /etc/systemd/system/opsagent-upgrade.service /etc/systemd/system/opsagent-helper.service.d/50-network.conf \
        /etc/polkit-1/rules.d/50-opsagent.rules; do
        got=$(csh $c "grep -o 'opsagent release .*' $f || true")
        [ "$got" = "$want" ] || fail "$f carries '$got', not '$want'"
    done
    csh $c '[ ! -e /etc/systemd/system/opsagent-helper.service.d/60-storage.conf ]' || fail "the storage drop-in was created"
    for f in opsagent.service opsagent-helper.socket opsagent-helper.service opsagent-upgrade.service; do
        [ "$(unit_prop $c $f NeedDaemonReload)" = no ] || fail "$f: changed on disk, systemd did not reload it"
        ! csh $c "systemctl cat $f 2>&1 | grep -qi 'changed on disk'" || fail "systemctl cat $f warns of a change on disk"
    done
    got=$(unit_prop $c opsagent.service Environment)
    [ "$got" = "${v:+OPSAGENT_RELEASE_MARK=$v}" ] || fail "opsagent.service has Environment='$got' loaded"
    got=$(csh $c 'tr "\0" "\n" </proc/$(systemctl show -p MainPID --value opsagent.service)/environ | grep "^OPSAGENT_RELEASE_MARK=" || true')
    [ "$got" = "${v:+OPSAGENT_RELEASE_MARK=$v}" ] || fail "the running daemon has '$got', not the release's Environment="
    got=$(unit_prop $c opsagent-helper.socket Description)
    case $got in *"(release $v)") [ -n "$v" ] ;; *"(release "*) false ;; *) [ -z "$v" ] ;; esac ||
        fail "opsagent-helper.socket has Description='$got' loaded"
}

test_k() {
    local c=k-upgrade iid=i-upg pid_a ver
    install_agent $c $iid APP_ID=app-upg
    # A short health gate keeps the revert case quick (the installer reads it from
    # this root-owned file, like update_key).
    csh $c 'printf "\n[upgrade]\nhealth_timeout = 25\n" >>/etc/opsagent.conf' || fail "cannot set health_timeout"
    wait_until 60 "the first round of $iid" has_statelog $iid upg-last || fail "no round from $iid"
    runs_version $iid "$VERSION" || fail "the Handshake does not report $VERSION (got '$(handshake_version $iid)')"
    pid_a=$(unit_prop $c opsagent.service MainPID)
    units_are $c ""
    local sock_a
    sock_a=$(unit_prop $c opsagent-helper.socket ActiveEnterTimestampMonotonic)

    # Refused releases: the reason reaches the backend, nothing changes on the host.
    for ver in "9.9.2:does not verify" "9.9.3:does not verify" "9.12.0:unsafe or broken archive"; do
        order_upgrade app-upg "${ver%%:*}"
        wait_until 60 "the refusal of ${ver%%:*} reported" upgrade_report_with $iid "${ver%%:*}" "" ||
            { csh $c 'journalctl --no-pager -u opsagent-upgrade -u opsagent | tail -n 30' >&2; fail "no failure report for ${ver%%:*}"; }
        upgrade_report_with $iid "${ver%%:*}" "${ver#*:}" || fail "the report of ${ver%%:*} does not say '${ver#*:}'"
        say "  ${ver%%:*} refused: $(upgrade_reason $iid "${ver%%:*}")"
        csh $c "[ \"\$(readlink /opt/visualops/current)\" = releases/$VERSION ] && [ ! -e /opt/visualops/releases/${ver%%:*} ]" ||
            fail "a refused release (${ver%%:*}) was installed"
    done
    csh $c '[ ! -e /tmp/opsagent-escaped ] && [ ! -e /opt/opsagent-escaped ]' || fail "the traversal entry was written"
    [ "$(unit_prop $c opsagent.service MainPID)" = "$pid_a" ] || fail "a refused upgrade restarted the agent"

    # A -> B, ordered while a round runs: the round ends first.
    cp "$HERE/recipe-app-upg.json" "$WORK/recipes/app-upg.json.tmp"
    sed -i 's/"recipe_version": 1/"recipe_version": 2/' "$WORK/recipes/app-upg.json.tmp"
    mv "$WORK/recipes/app-upg.json.tmp" "$WORK/recipes/app-upg.json"
    wait_until 20 "round 2 runs its slow state" csh $c 'pgrep -x sleep >/dev/null' || fail "round 2 did not start"
    # Ordered the original's way: the url is the backend's WebSocket URI.
    order_upgrade app-upg 9.10.0 "$WS_URI"
    wait_until 120 "$iid reconnects as 9.10.0" runs_version $iid 9.10.0 ||
        { csh $c 'journalctl --no-pager -u opsagent-upgrade -u opsagent | tail -n 40' >&2; fail "not upgraded to 9.10.0"; }
    python3 - "$WORK/statelog.jsonl" "$WORK/events.jsonl" "$iid" <<'PY' || fail "the upgrade did not wait for the round's last state"
import json, sys
statelog, events, iid = sys.argv[1:]
done = [json.loads(l)["received_at"] for l in open(statelog)
        if f'"instance_id":"{iid}"' in l and '"id":"upg-last"' in l and '"recipe_version":2' in l]
hello_b = [e["at"] for e in map(json.loads, open(events))
           if (e.get("message") or {}).get("code") == "Handshake"
           and e["message"].get("instance_id") == iid and e["message"].get("agent_version") == "9.10.0"]
print(f"  round 2 ended (last StateLog) at {done[:1]}, first 9.10.0 Handshake at {hello_b[:1]}", file=sys.stderr)
sys.exit(0 if done and hello_b and done[0] < hello_b[0] else 1)
PY
    csh $c '[ "$(readlink /opt/visualops/current)" = releases/9.10.0 ]' || fail "current does not point at 9.10.0"
    wait_until 60 "the upgrade confirmed" csh $c 'grep -q "\"outcome\": \"confirmed\"" /var/lib/visualops/opsagent/upgrade/result.json' ||
        fail "the installer did not confirm 9.10.0"
    csh $c "[ -d /opt/visualops/releases/$VERSION ]" || fail "release A was not kept"
    csh $c 'systemctl is-active --quiet opsagent.service' || fail "opsagent.service is not active on 9.10.0"
    say "  installer: $(csh $c 'journalctl --no-pager -u opsagent-upgrade -o cat | grep -i "upgrade finished\|->" | tail -n 1')"
    # Its units came along, systemd reloaded them, and the socket was re-created.
    units_are $c 9.10.0
    [ "$(unit_prop $c opsagent-helper.socket ActiveEnterTimestampMonotonic)" != "$sock_a" ] ||
        fail "the helper socket was not re-created with its new unit"
    say "  units replaced: $(csh $c 'journalctl --no-pager -u opsagent-upgrade OPSAGENT_VERSION=9.10.0 -o verbose | sed -n "s/^ *OPSAGENT_UNITS=//p" | head -n 1')"

    # B -> C where C exits at start: reverted to B within the gate, reported, held off.
    local t0 t1
    t0=$(date +%s)
    order_upgrade app-upg 9.11.0
    wait_until 120 "the revert of 9.11.0 reported" upgrade_report_with $iid 9.11.0 "" ||
        { csh $c 'journalctl --no-pager -u opsagent-upgrade -u opsagent | tail -n 60' >&2; fail "no report of the failed 9.11.0"; }
    t1=$(date +%s)
    upgrade_report_with $iid 9.11.0 "reverted to 9.10.0" || fail "the report does not say it was reverted"
    say "  9.11.0 reverted and reported after $((t1 - t0)) s: $(upgrade_reason $iid 9.11.0)"
    if grep -F "\"instance_id\":\"$iid\"" "$WORK/statelog.jsonl" | grep -qF 'agent upgrade'; then
        fail "an upgrade failure was reported as a StateLog"
    fi
    [ $((t1 - t0)) -le $((25 + 60)) ] || fail "the revert took longer than the health gate plus a margin"
    csh $c '[ "$(readlink /opt/visualops/current)" = releases/9.10.0 ] && [ ! -e /opt/visualops/releases/9.11.0 ]' ||
        fail "current is not back on 9.10.0"
    wait_until 60 "$iid runs 9.10.0 again" runs_version $iid 9.10.0 || fail "9.10.0 did not reconnect"
    csh $c 'systemctl is-active --quiet opsagent.service' || fail "opsagent.service is not active after the revert"
    # 9.11.0's units were installed for its start, and 9.10.0's put back for the revert.
    journal_has $c "-u opsagent-upgrade OPSAGENT_VERSION=9.11.0 -o cat" "replaced the installed units" ||
        fail "the units of 9.11.0 were not installed"
    units_are $c 9.10.0
    # The backend keeps ordering 9.11.0 at every Handshake: it is not tried again.
    wait_until 30 "the hold-off logged" journal_has $c "-u opsagent" "not tried again" || fail "the failed version is not held off"
    [ "$(csh $c 'journalctl --no-pager -u opsagent-upgrade OPSAGENT_VERSION=9.11.0 -o cat | grep -c "installing a staged release"')" = 1 ] ||
        fail "the installer ran 9.11.0 more than once"

    # By hand, as an operator: back to A with `opsagent upgrade --url` (same installer).
    # A is older than 9.10.0: refused until the root-owned configuration allows it.
    local out
    if out=$(csh $c "/opt/visualops/current/bin/opsagent upgrade --url $BASE_REMOTE/$VERSION/opsagent.tgz 2>&1"); then
        say "$out"
        fail "the downgrade to $VERSION was not refused"
    fi
    printf '%s\n' "$out" | grep -q "$VERSION is older than the running 9.10.0" ||
        { say "$out"; fail "the refusal does not say that $VERSION is older"; }
    csh $c '[ "$(readlink /opt/visualops/current)" = releases/9.10.0 ]' || fail "the refused downgrade switched current"
    say "  downgrade refused: $(printf '%s\n' "$out" | grep -m 1 'older than')"
    csh $c 'printf "allow_downgrade = true\n" >>/etc/opsagent.conf' || fail "cannot allow downgrades"
    out=$(csh $c "/opt/visualops/current/bin/opsagent upgrade --url $BASE_REMOTE/$VERSION/opsagent.tgz 2>&1") ||
        { say "$out"; fail "opsagent upgrade --url failed"; }
    say "  opsagent upgrade --url …/$VERSION/opsagent.tgz: $(printf '%s\n' "$out" | tail -n 1)"
    wait_until 60 "$iid runs $VERSION again" runs_version $iid "$VERSION" || fail "the manual roll-back did not reconnect as $VERSION"
    csh $c "[ \"\$(readlink /opt/visualops/current)\" = releases/$VERSION ]" || fail "current is not $VERSION after the manual upgrade"
    units_are $c ""
    # The backend still orders 9.11.0: the failure is remembered past the manual upgrade.
    sleep 5
    [ "$(csh $c 'journalctl --no-pager -u opsagent-upgrade OPSAGENT_VERSION=9.11.0 -o cat | grep -c "installing a staged release"')" = 1 ] ||
        fail "9.11.0 was tried again after the manual upgrade"
}

# ---------------------------------------------------------------- n. transient units
test_n() {
    local c=n-units out hpid caps loop major minor apply left
    install_agent $c i-units HELPER_NETWORK=no
    apply="/opt/visualops/current/bin/opsagent apply --helper-socket /run/opsagent-helper/helper.sock"
    # A loop device made on the host over a sparse file, its node made in the container
    # (nspawn gives it none); detached by the suite's cleanup.
    truncate -s 64M "$WORK/m-disk.img"
    loop=$(losetup --find --show "$WORK/m-disk.img") || fail "no loop device on the host"
    echo "$loop" >>"$WORK/loops"
    major=$((16#$(stat -c %t "$loop")))
    minor=$((16#$(stat -c %T "$loop")))
    csh $c "mknod -m 0660 $loop b $major $minor" || fail "cannot make $loop in the container"
    cat >"$(croot $c)/root/admin.json" <<EOF
{"recipe_version": 1, "state": [
  {"id": "m-hostname", "module": "linux.cmd", "parameter": {"cmd": "hostname m-renamed && hostname"}},
  {"id": "m-tmpfs", "module": "linux.cmd", "parameter": {"cmd": "mkdir -p /mnt/m-tmp && mount -t tmpfs tmpfs /mnt/m-tmp && echo tmpfs-mounted"}},
  {"id": "m-domain", "module": "linux.cmd", "parameter": {"cmd": "domainname m-domain && sysctl kernel.domainname"}},
  {"id": "m-mkfs", "module": "linux.mkfs", "parameter": {"device": "$loop", "fstype": "ext4", "label": "mdata"}},
  {"id": "m-mount", "module": "linux.mount", "parameter": {"device": "$loop", "filesystem": "ext4", "path": "/mnt/m-data"}},
  {"id": "m-echo", "module": "linux.cmd", "parameter": {"cmd": "x=m42; echo output-for-the-journal-\${x}"}}
]}
EOF
    csh $c '[ ! -e /etc/systemd/system/opsagent-helper.service.d/60-storage.conf ]' || fail "a storage drop-in is installed"
    out=$(csh $c "$apply /root/admin.json 2>&1") || { say "$out"; fail "the admin commands failed under the helper unit"; }
    say "$out"
    [ "$(csh $c hostname)" = m-renamed ] || fail "hostname was not changed"
    grep -q " /mnt/m-tmp [^ ]* .* - tmpfs " "/proc/$(cpid $c)/mountinfo" || fail "the tmpfs is not mounted in the container"
    [ "$(csh $c 'cat /proc/sys/kernel/domainname')" = m-domain ] || fail "the kernel.domainname sysctl was not set"
    grep -q " /mnt/m-data [^ ]* .* - ext4 " "/proc/$(cpid $c)/mountinfo" || fail "the loop device is not mounted"
    # Resource accounting needs the unified cgroup hierarchy (a v1 host, as some CI
    # machines, gives a container no CPU figures for a unit).
    if csh $c '[ -e /sys/fs/cgroup/cgroup.controllers ]'; then
        printf '%s\n' "$out" | grep -q 'cpu [0-9.]* s' || fail "no CPU time in the outcome"
        say "  CPU time in the outcome: $(printf '%s\n' "$out" | grep -o 'commands used [^)]*' | head -n 1)"
    else
        say "  cgroup v1 in the container: no CPU figures to check (accounting needs cgroup v2)"
    fi
    say "  hostname, tmpfs, kernel.domainname, mkfs + mount: done by a recipe without any drop-in"
    hpid=$(unit_prop $c opsagent-helper.service MainPID)
    [ "$hpid" != 0 ] || fail "the helper is not running"
    caps=$(csh $c "sed -n 's/^CapBnd:[[:space:]]*//p' /proc/$hpid/status")
    # CAP_SYS_ADMIN is bit 21.
    [ $(((16#$caps >> 21) & 1)) = 0 ] || fail "the helper holds CAP_SYS_ADMIN (CapBnd $caps)"
    say "  SCORE helper CapBnd $caps (no CAP_SYS_ADMIN)"
    csh $c "journalctl --no-pager -u 'opsagent-state-1-m-echo-*' | grep -q output-for-the-journal-m42" ||
        fail "journalctl -u opsagent-state-1-m-echo-* does not show the output"
    left=$(csh $c "systemctl list-units --all --no-legend 'opsagent-state-*'")
    [ -z "$left" ] || { say "$left"; fail "opsagent-state units left after the round"; }

    # Timeout: a command that double-forks a sleep, over its 2 s timeout.
    cat >"$(croot $c)/root/timeout.json" <<'EOF'
{"recipe_version": 2, "state": [
  {"id": "m-timeout", "module": "linux.cmd", "parameter": {"cmd": "( setsid sh -c 'sleep 3111 &' & ); sleep 3222", "timeout": 2}}
]}
EOF
    if out=$(csh $c "$apply /root/timeout.json 2>&1"); then
        say "$out"
        fail "the timed-out command succeeded"
    fi
    say "$out"
    # (slee[p]: the pattern must not match the shell that runs pgrep.)
    ! csh $c 'pgrep -f "slee[p] 3[12][12][12]"' || fail "processes of the timed-out command are left"
    say "  timeout: no process left (the double-forked sleep included)"

    # Preemption: the apply that runs it is killed (its connection closes, as when the
    # daemon gives the state up); the unit's whole control group goes.
    cat >"$(croot $c)/root/preempt.json" <<'EOF'
{"recipe_version": 3, "state": [
  {"id": "m-preempt", "module": "linux.cmd", "parameter": {"cmd": "( setsid sh -c 'sleep 3333 &' & ); sleep 3444"}}
]}
EOF
    csh $c "$apply /root/preempt.json >/root/preempt.out 2>&1 & echo \$! >/root/preempt.pid"
    wait_until 30 "the preempted command runs" csh $c 'pgrep -f "slee[p] 3333" && pgrep -f "slee[p] 3444"'
    csh $c "systemctl list-units --no-legend 'opsagent-state-3-m-preempt-*' | grep -q running" ||
        fail "the command does not run as an opsagent-state unit"
    csh $c 'kill -9 $(cat /root/preempt.pid)'
    wait_until 30 "the preempted command's processes are gone" csh $c '! pgrep -f "slee[p] 3[34][34][34]"'
    wait_until 30 "no opsagent-state unit left" csh $c '[ -z "$(systemctl list-units --all --no-legend "opsagent-state-*")" ]'
    say "  preemption: no process left (the double-forked sleep included), no unit left"

    # A package manager is not cut in half: an apt install whose postinst runs for 6 s,
    # its request cancelled (the apply killed: the connection closes, as when the
    # daemon gives a state up for a new recipe) while the postinst runs, finishes; dpkg
    # is left consistent.
    local d=$WORK/m-slow
    mkdir -p "$d/DEBIAN"
    printf 'Package: m-slow\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@example.invalid>\nDescription: slow postinst\n' \
        >"$d/DEBIAN/control"
    printf '#!/bin/sh\nset -e\ntouch /run/m-slow-started\nsleep 6\ntouch /run/m-slow-done\n' >"$d/DEBIAN/postinst"
    chmod 0755 "$d/DEBIAN/postinst"
    dpkg-deb --root-owner-group -b "$d" "$WORK/m-slow_1.0_all.deb" >/dev/null
    mkdir -p "$(croot $c)/srv/debs"
    cp "$WORK/m-slow_1.0_all.deb" "$(croot $c)/srv/debs/"
    # Offline: apt sees no remote source.
    csh $c 'mv /etc/apt/sources.list /etc/apt/sources.list.off 2>/dev/null; rm -f /etc/apt/sources.list.d/*.list; rm -rf /var/lib/apt/lists/*_*'
    cat >"$(croot $c)/root/apt.json" <<'EOF'
{"recipe_version": 4, "state": [
  {"id": "m-apt", "module": "linux.apt.package", "parameter": {"name": [{"key": "m-slow", "value": "file:///srv/debs/m-slow_1.0_all.deb"}]}}
]}
EOF
    csh $c "$apply /root/apt.json >/root/apt.out 2>&1 & echo \$! >/root/apt.pid"
    wait_until 120 "the postinst runs" csh $c '[ -e /run/m-slow-started ]'
    csh $c 'kill -9 $(cat /root/apt.pid)'
    # (The container's /run is its own tmpfs: looked at from inside, never through croot.)
    ! csh $c '[ -e /run/m-slow-done ]' || fail "the postinst had ended before the cancellation"
    wait_until 60 "the postinst finished although its request was cancelled" csh $c '[ -e /run/m-slow-done ]'
    wait_until 30 "apt's unit is gone" csh $c '[ -z "$(systemctl list-units --all --no-legend "opsagent-state-*")" ]'
    out=$(csh $c 'dpkg --audit 2>&1')
    [ -z "$out" ] || { say "$out"; fail "dpkg --audit is not clean after a cancelled install"; }
    [ "$(csh $c "dpkg-query -W -f='\${Status}' m-slow")" = "install ok installed" ] || fail "m-slow is not installed"
    say "  cancelled apt install: finished, dpkg --audit clean"
}

# ---------------------------------------------------------------- o. preemption through the daemon
# Test n cancels an apt install through the helper connection; here the backend does
# what a backend does: it pushes a new recipe while the daemon's round runs the install.
test_o() {
    local c=o-preempt iid=i-preempt app=app-pre d=$WORK/o-slow out
    # An app of its own; its first recipe is harmless (the install comes once apt is
    # offline in the container).
    printf '%s\n' '{"recipe_version": 1, "state": [{"id": "o-hello", "module": "linux.cmd", "parameter": {"cmd": "true"}}]}' \
        >"$WORK/recipes/$app.json"
    install_agent $c $iid APP_ID=$app
    wait_until 60 "StateLog of o-hello from $iid" has_statelog $iid o-hello || fail "no successful StateLog of o-hello"
    mkdir -p "$d/DEBIAN"
    printf 'Package: o-slow\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@example.invalid>\nDescription: slow postinst\n' \
        >"$d/DEBIAN/control"
    printf '#!/bin/sh\nset -e\ntouch /run/o-slow-started\nsleep 8\ntouch /run/o-slow-done\n' >"$d/DEBIAN/postinst"
    chmod 0755 "$d/DEBIAN/postinst"
    dpkg-deb --root-owner-group -b "$d" "$WORK/o-slow_1.0_all.deb" >/dev/null
    mkdir -p "$(croot $c)/srv/debs"
    cp "$WORK/o-slow_1.0_all.deb" "$(croot $c)/srv/debs/"
    csh $c 'mv /etc/apt/sources.list /etc/apt/sources.list.off 2>/dev/null; rm -f /etc/apt/sources.list.d/*.list; rm -rf /var/lib/apt/lists/*_*'
    # Recipe 2: the install, then a state that must not run once recipe 3 has come.
    cat >"$WORK/recipes/$app.json.tmp" <<'EOF'
{"recipe_version": 2, "state": [
  {"id": "o-apt", "module": "linux.apt.package", "parameter": {"name": [{"key": "o-slow", "value": "file:///srv/debs/o-slow_1.0_all.deb"}]}},
  {"id": "o-old-next", "module": "linux.cmd", "parameter": {"cmd": "touch /run/o-old-next-ran"}}
]}
EOF
    mv "$WORK/recipes/$app.json.tmp" "$WORK/recipes/$app.json"
    wait_until 120 "the postinst of recipe 2's install runs" csh $c '[ -e /run/o-slow-started ]' ||
        fail "the daemon did not start the install"
    # Recipe 3, pushed by the backend (its directory poll) while dpkg runs the postinst.
    cat >"$WORK/recipes/$app.json.tmp" <<'EOF'
{"recipe_version": 3, "state": [
  {"id": "o-new", "module": "linux.cmd", "parameter": {"cmd": "if [ -e /run/o-slow-done ]; then echo after >/run/o-new-ran; else echo during >/run/o-new-ran; fi"}}
]}
EOF
    mv "$WORK/recipes/$app.json.tmp" "$WORK/recipes/$app.json"
    # (The container's /run is its own tmpfs: looked at from inside, never through croot.)
    ! csh $c '[ -e /run/o-slow-done ]' || fail "the postinst had ended before the new recipe was written"
    wait_until 60 "recipe 3's state ran" csh $c '[ -e /run/o-new-ran ]' || fail "the new recipe's state never ran"
    csh $c '[ -e /run/o-slow-done ]' || fail "the postinst was cut: it never finished"
    [ "$(csh $c 'cat /run/o-new-ran')" = after ] || fail "the new recipe's state ran while dpkg was still at work"
    out=$(csh $c 'dpkg --audit 2>&1')
    [ -z "$out" ] || { say "$out"; fail "dpkg --audit is not clean after the preempted install"; }
    [ "$(csh $c "dpkg-query -W -f='\${Status}' o-slow")" = "install ok installed" ] || fail "o-slow is not installed"
    ! csh $c '[ -e /run/o-old-next-ran ]' || fail "recipe 2's next state ran although recipe 3 had come"
    wait_until 30 "StateLog of o-new from $iid" has_statelog $iid o-new || fail "no successful StateLog of o-new"
    say "  recipe 3 pushed during recipe 2's postinst: the install finished (dpkg --audit clean), then recipe 3 ran"
    csh $c "journalctl --no-pager -u opsagent.service | grep -E 'o-apt|o-new|recipe' | tail -n 12" >&2 || true
}

# ---------------------------------------------------------------- l. links planted by the agent user
# What a compromised daemon (user opsagent) can do on a cron host: plant links, in the
# directories it owns, at every name root used to open there, pointing at a root-owned
# file, and stage an order whose url carries a newline and a forged log line. Then root
# does what it does by itself: a supervisor pass (with rotation forced) and, as an
# administrator would, a userdata re-run (which creates a missing token).
test_l() {
    local c=l-links victim=/etc/opsagent-victim before after staged=/var/lib/visualops/opsagent/upgrade/staged
    start_plain $c /usr/sbin/cron -f
    userdata $c i-links APP_ID=app-cron >"$WORK/l-userdata.log" 2>&1 ||
        { cat "$WORK/l-userdata.log" >&2; fail "userdata.sh failed without systemd"; }
    csh $c "printf 'root-owned victim\n' >$victim && chmod 0644 $victim" || fail "cannot make the victim"
    before=$(csh $c "stat -c '%U:%G %a %s' $victim && sha256sum <$victim")
    agent() { cexec $c setpriv --reuid=opsagent --regid=opsagent --init-groups sh -c "$1"; }
    agent "cd /var/log/visualops && for f in supervise upgrade opsagent-helper opsagent; do
            rm -f \$f.log \$f.log.*; for n in '' .1 .2 .3; do ln -s $victim \$f.log\$n; done; done" ||
        fail "cannot plant the log links"
    # The order: valid JSON whose url holds a newline (\n in the JSON text).
    printf '%s' '{"version":"9.10.0","url":"http://127.0.0.1/a.tgz\nFORGED-LINE root wrote this","from":"'"$VERSION"'","ordered_at":1}' \
        >"$WORK/l-order.json"
    agent "mkdir -p $staged && printf x >$staged/opsagent.tgz && printf x >$staged/opsagent.tgz.minisig && cat >$staged/order.json" \
        <"$WORK/l-order.json" || fail "cannot stage the order"
    # The token: removed by its owner, and the temporary names userdata.sh used (its pid)
    # taken by links to the victim.
    agent "rm -f /var/lib/visualops/opsagent/token &&
        perl -e 'symlink(\"$victim\", \"/var/lib/visualops/opsagent/.token.new.\$_\") for 1..50000'" ||
        fail "cannot plant the token links"

    # Root: a supervisor pass with every log over the rotation size (as cron runs it; a
    # pass cron started at the same time may take the order first, which is as good).
    cexec $c env OPSAGENT_LOG_MAX_BYTES=1 /opt/visualops/current/packaging/opsagent-supervise || true
    wait_until 90 "the staged order consumed" csh $c "[ ! -e $staged/order.json ]" || fail "the order was not picked up"
    cexec $c env OPSAGENT_LOG_MAX_BYTES=1 /opt/visualops/current/packaging/opsagent-supervise || true
    userdata $c i-links APP_ID=app-cron >>"$WORK/l-userdata.log" 2>&1 ||
        { tail -n 20 "$WORK/l-userdata.log" >&2; fail "the userdata re-run failed"; }

    after=$(csh $c "stat -c '%U:%G %a %s' $victim && sha256sum <$victim")
    [ "$after" = "$before" ] || fail "the root-owned file was changed through the links: '$before' -> '$after'"
    csh $c 'grep -q "which no URL holds" /var/lib/visualops/opsagent/upgrade/result.json' ||
        { csh $c 'cat /var/lib/visualops/opsagent/upgrade/result.json' >&2 || true; fail "the order was not refused for its url"; }
    # (in upgrade.log or, rotated by the forced pass, upgrade.log.1)
    csh $c 'cat /var/log/opsagent-root/upgrade.log* | grep -q "FORGED-LINE"' || fail "the refusal is not in root's upgrade.log"
    if csh $c 'grep -rn "^FORGED-LINE" /var/log/opsagent-root /var/log/visualops /var/lib/visualops/opsagent/upgrade'; then
        fail "a log line starts with the forged text"
    fi
    [ "$(csh $c 'stat -c "%U:%G %a" /var/log/opsagent-root')" = "root:root 750" ] || fail "root's log directory is not root's alone"
    [ "$(csh $c 'stat -c "%U %a" /var/lib/visualops/opsagent/token')" = "opsagent 600" ] ||
        fail "the re-created token is not opsagent's, 0600"
    csh $c 'head -n 1 /var/lib/visualops/opsagent/token | grep -Eqx "[0-9a-f]{64}"' || fail "the re-created token is not 64 hex digits"
    csh $c 'tail -n 4 /var/log/opsagent-root/supervise.log*; grep -h FORGED /var/log/opsagent-root/upgrade.log*' >&2
}

# ---------------------------------------------------------------- runner
PASSED=0
FAILED=0
test_m() {
    local c=m-original iid=i-orig-ud r ud=$WORK/releases/$VERSION/ud_init.sh
    [ -s "$ud" ] || fail "build-release published no $VERSION/ud_init.sh"
    grep -q "^UPDATE_KEY='$UPDATE_KEY'" "$ud" || fail "ud_init.sh does not carry the release's public key"
    boot $c
    r=$(croot $c)
    # The template's bootstrap is a Python 2 heredoc and the container has no Python: the
    # host's Python 3 (the same Debian release) as `python`, and `urllib2` as the one-line
    # module that is Python 3's urlopen. The template's lines themselves are unchanged.
    cp -a /usr/lib/python3.11 "$r/usr/lib/"
    cp -a /usr/bin/python3.11 "$r/usr/bin/"
    ln -sf /usr/bin/python3.11 "$r/usr/local/bin/python"
    printf 'from urllib.request import urlopen\n' >"$r/usr/lib/python3.11/urllib2.py"
    # Filled as the original backend filled it (its @{...} placeholders).
    sed -e "s|@{ws_uri}|$WS_URI|" -e "s|@{app_id}|$APP_ID|" -e "s|@{version}|$VERSION|" \
        -e "s|@{remote}|$BASE_REMOTE|" -e "s|@{gpg_key_uri}|$BASE_REMOTE/madeira.gpg.public.key|" \
        "$REPO/tests/fixtures/original/userdata.sh" >"$r/root/original-userdata.sh"
    if grep -q '@{' "$r/root/original-userdata.sh"; then fail "a placeholder of the template is left"; fi
    diff <(grep -v '^export' "$REPO/tests/fixtures/original/userdata.sh") <(grep -v '^export' "$r/root/original-userdata.sh") >/dev/null ||
        fail "the template changed beyond its placeholders"
    # An instance the original agent set up: its ssh-keygen token, root's alone.
    csh $c 'printf -- "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEAoriginal+token\n-----END RSA PRIVATE KEY-----\n" >/etc/opsagent.token && chmod 400 /etc/opsagent.token'
    # No metadata service in the container: the instance id is in the environment the
    # template runs in (it exports only WS_URI, APP_ID, VERSION, BASE_REMOTE, GPG_KEY_URI).
    cexec $c env INSTANCE_ID=$iid bash /root/original-userdata.sh >"$WORK/m-userdata.log" 2>&1 ||
        { cat "$WORK/m-userdata.log" >&2; fail "the original template failed"; }
    wait_until 300 "Handshake from $iid" has_handshake $iid || { cat "$WORK/m-userdata.log" >&2; fail "no Handshake from $iid"; }
    cat "$WORK/m-userdata.log" >&2
    grep -q 'signature verified' "$WORK/m-userdata.log" || fail "no signature verification in the installer's output"
    csh $c 'systemctl is-active --quiet opsagent.service' || fail "opsagent.service is not active"
    [ "$(csh $c 'readlink /opt/visualops/current')" = "releases/$VERSION" ] || fail "/opt/visualops/current is not releases/$VERSION"
    csh $c 'cmp -s /etc/opsagent.token /var/lib/visualops/opsagent/token' || fail "the original token was not kept as it is"
    wait_until 60 "StateLog of sys-cmd from $iid" has_statelog $iid sys-cmd || fail "no successful StateLog of sys-cmd from $iid"
    say "  installed by the original template from $BASE_REMOTE/$VERSION/ud_init.sh; the original token kept"
}

declare -A NAMES=([a]=a-install [b]=b-watchdog [c]=c-socket [d]=d-journal [e]=e-polkit [f]=f-analyze
    [g]=g-cron [h]=h-verify [i]=i-deb [j]=j-sandbox [k]=k-upgrade [l]=l-links [m]=m-original [n]=n-units [o]=o-preempt)

# run_one LETTER: runs test_LETTER in a subshell (set -e: the first failed step ends
# it), its output in $WORK/NAME.log; writes NAME.rc and NAME.reason.
run_one() {
    local t=$1 name=${NAMES[$1]} rc start
    start=$(date +%s)
    set +e
    (
        set -eE
        TEST_REASON_FILE=$WORK/$name.reason
        TEST_LEVEL=$BASH_SUBSHELL
        # Only a failure at the test's own level ends it; expected failures inside
        # command substitutions ($(...) || ...) must not be recorded as the reason.
        trap '[ "$BASH_SUBSHELL" != "$TEST_LEVEL" ] || [ -s "$TEST_REASON_FILE" ] ||
            echo "unexpected failure (exit $?) of: $BASH_COMMAND" >"$TEST_REASON_FILE"' ERR
        "test_$t"
    ) >"$WORK/$name.log" 2>&1
    rc=$?
    set -e
    stop_containers "$t-"
    echo "$rc $(($(date +%s) - start))" >"$WORK/$name.rc"
}

report() { # LETTER
    local name=${NAMES[$1]} rc secs
    read -r rc secs <"$WORK/$name.rc"
    if [ "$rc" = 0 ]; then
        PASSED=$((PASSED + 1))
        echo "PASS $name (${secs}s)"
        grep -h '  SCORE' "$WORK/$name.log" 2>/dev/null | sed 's/^ *SCORE/     /' || true
    else
        FAILED=$((FAILED + 1))
        echo "FAIL $name (${secs}s): $(cat "$WORK/$name.reason" 2>/dev/null || echo "exit $rc")"
        echo "---- last lines of $WORK/$name.log"
        tail -n 40 "$WORK/$name.log" | sed 's/^/    /'
        echo "----"
    fi
}

# The cron test mostly waits for cron's minute ticks: it runs in the background.
BG_TEST=""
case " $SELECTED " in *" g "*)
    BG_TEST=g
    say "== ${NAMES[g]} (in the background)"
    run_one g &
    BG_PIDS+=($!)
    ;;
esac
for t in $SELECTED; do
    [ "$t" != "$BG_TEST" ] || continue
    [ -n "${NAMES[$t]:-}" ] || { echo "unknown test: $t (tests: $ALL_TESTS)" >&2; exit 2; }
    say "== ${NAMES[$t]}"
    run_one "$t"
    report "$t"
done
if [ -n "$BG_TEST" ]; then
    wait "${BG_PIDS[0]}" || true
    BG_PIDS=()
    report "$BG_TEST"
fi

echo "suite time: $(($(date +%s) - SUITE_START))s"
echo "$PASSED passed, $FAILED failed"
[ "$FAILED" = 0 ]
