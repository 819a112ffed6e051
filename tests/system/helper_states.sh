#!/usr/bin/env bash
# System tests of the root helper's states on a real host: a Debian bookworm container
# booted with systemd-nspawn (systemd, D-Bus, apt, dpkg, cron, shadow utilities), the
# freshly built `opsagent` and `opsagent-helper` copied in, and recipes applied with
# `opsagent apply FILE` (which starts a private helper as root). Run as root:
#
#   bash tests/system/helper_states.sh
#
# Checks: a real unit started, reloaded when its watched file changes and left alone
# when it does not (and restarted with the `restart` keyword); a .deb built here with
# dpkg-deb in two versions, served from a local `file:` apt source written by
# linux.apt.repo, installed, pinned, upgraded with `latest` (after the index ages),
# installed from a file and from an http URL (downloaded by the daemon) and removed; a
# missing tool's package installed first (a stand-in mercurial), or named when
# --no-prerequisites; a group, a user (plaintext password hashed once,
# verified by libxcrypt; a yescrypt hash from chpasswd recognised; a user named like a
# group, without password), cron entries (Salt's syntax, random, empty command) and the
# timezone, each re-applied with no change; a uid outside the allowlist refused; a
# policy file that forbids linux.cmd honoured; journal fields of outcomes; the storage
# states through the real, sandboxed opsagent-helper.service (socket activation) with
# no drop-in (there is none any more): a tmpfs mounted by systemd, linux.mkfs (in a
# transient unit of its own) and linux.mount (transient unit; /etc/fstab) on loop
# devices made on the host, the helper itself without CAP_SYS_ADMIN.
#
# Ends with "N passed, M failed"; exits non-zero on any failure. The container is
# stopped and removed on exit (by pid, see lib.sh). OPSAGENT_SYSTEST_KEEP=1 keeps logs.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
# shellcheck source=tests/system/lib.sh
source "$HERE/lib.sh"
# shellcheck source=tests/system/checks.sh
source "$HERE/checks.sh" helper

# Loop devices made on the host for the storage checks (after the container, whose
# mounts held them, is gone).
after_cleanup() {
    if [ -f "$WORK/loops" ]; then
        while read -r dev; do losetup -d "$dev" 2>/dev/null || true; done <"$WORK/loops"
    fi
}

install_host_tools systemd-nspawn:systemd-container debootstrap:debootstrap nsenter:util-linux \
    dpkg-deb:dpkg ps:procps losetup:mount blkid:util-linux

ensure_rootfs

say "building opsagent and opsagent-helper"
(cd "$REPO" && cargo build --locked -q -p opsagent --bin opsagent -p opsagent-helper --bin opsagent-helper) \
    >"$WORK/build.log" 2>&1 || { tail -n 30 "$WORK/build.log" >&2; exit 1; }
BIN_DIR=${CARGO_TARGET_DIR:-$REPO/target}/debug

C=hs
boot $C
ROOT=$(croot $C)
install -m 0755 "$BIN_DIR/opsagent" "$BIN_DIR/opsagent-helper" "$ROOT/usr/local/bin/"
# Offline: apt sees only the local repository the tests build.
csh $C 'mv /etc/apt/sources.list /etc/apt/sources.list.off 2>/dev/null; rm -f /etc/apt/sources.list.d/*.list; rm -rf /var/lib/apt/lists/*_*'

# ---------------------------------------------------------------- helpers
# (check NAME CMD...: one named check, in checks.sh; counts, never stops the script.)

# apply NAME JSON-STATES: applies a recipe of those states; its output goes to
# $WORK/NAME.out (and the log); returns opsagent's exit status.
N=0
apply() {
    local name=$1 states=$2 rc=0
    N=$((N + 1))
    printf '{"recipe_version": 1, "state": [%s]}\n' "$states" >"$ROOT/root/$name.json"
    cexec $C opsagent apply "/root/$name.json" >"$WORK/$name.out" 2>&1 || rc=$?
    { echo "== $name (exit $rc)"; cat "$WORK/$name.out"; } | tee -a "$WORK/apply.log" >&2
    return "$rc"
}
out_has() { grep -qF -- "$2" "$WORK/$1.out"; }
# setup SCRIPT: a preparation step inside the container; a failure counts as a failed
# check (named after the script) but does not stop the run.
setup() {
    if ! csh $C "$1" >>"$WORK/checks.log" 2>&1; then
        FAILED=$((FAILED + 1))
        FAILURES+=("setup: $1")
        say "  FAIL: setup: $1"
    fi
}
no_change() { # NAME: every state line says (no change)
    grep -q '^ok ' "$WORK/$1.out" && ! grep -E '^(ok|FAILED)' "$WORK/$1.out" | grep -qv '(no change)'
}
in_c() { csh $C "$1"; }

# ---------------------------------------------------------------- linux.service + watch
say "== linux.service with a watched file"
cat >"$ROOT/etc/systemd/system/opsh-demo.service" <<'EOF'
[Unit]
Description=opsagent helper system test service
[Service]
Type=simple
ExecStart=/bin/sh -c 'echo start >> /run/opsh-demo.log; trap "echo reload >> /run/opsh-demo.log" HUP; while :; do sleep 1 & wait $!; done'
ExecReload=/bin/kill -HUP $MAINPID
EOF
setup 'systemctl daemon-reload && echo v=1 > /etc/opsh-demo.conf'
SVC='{"id": "svc", "module": "linux.service", "parameter": {"name": ["opsh-demo"], "watch": ["/etc/opsh-demo.conf"]}}'
count() { in_c "grep -c '^$1\$' /run/opsh-demo.log || true"; }
check "service: stopped unit is started (first sight of the watched file)" apply svc1 "$SVC"
check "service: reported as started" out_has svc1 "opsh-demo.service: started"
check "service: unit is active" in_c 'systemctl is-active --quiet opsh-demo.service'
PID1=$(in_c 'systemctl show -p MainPID --value opsh-demo.service')
check "service: second run changes nothing" apply svc2 "$SVC"
check "service: second run reports no change" no_change svc2
check "service: no reload without a change" test "$(count reload)" = 0
setup 'echo v=2 > /etc/opsh-demo.conf'
check "service: changed watched file" apply svc3 "$SVC"
check "service: reported as reloaded" out_has svc3 "opsh-demo.service: reloaded"
one_reload() { [ "$(count reload)" = 1 ]; }
wait_until 10 "reload seen by the service" one_reload || true
check "service: the unit got SIGHUP (ExecReload)" test "$(count reload)" = 1
check "service: reload kept the process" test "$(in_c 'systemctl show -p MainPID --value opsh-demo.service')" = "$PID1"
check "service: unchanged file again: no change" apply svc4 "$SVC"
check "service: ... reported as no change" no_change svc4
check "service: still exactly one reload" test "$(count reload)" = 1
RESTART='{"id": "svc-restart", "module": "linux.service", "parameter": {"name": [{"key": "opsh-demo", "value": "restart"}], "watch": ["/etc/opsh-demo.conf"]}}'
check "service: restart keyword (first sight for this state)" apply svc5 "$RESTART"
check "service: reported as restarted" out_has svc5 "opsh-demo.service: restarted"
check "service: restart gave a new process" test "$(in_c 'systemctl show -p MainPID --value opsh-demo.service')" != "$PID1"
check "service: restart state again: no change" apply svc6 "$RESTART"
check "service: ... no change" no_change svc6
check "service: checksums kept in the helper's state dir" \
    in_c 'test -s /var/lib/opsagent-helper/watch/svc--etc-opsh-demo.conf.cksum'

# ---------------------------------------------------------------- apt
say "== linux.apt.repo + linux.apt.package with a local file: repository"
mkdeb() { # VERSION
    local d=$WORK/deb-$1
    mkdir -p "$d/DEBIAN" "$d/usr/share/opsh-hello"
    printf 'Package: opsh-hello\nVersion: %s\nArchitecture: all\nMaintainer: opsagent tests <t@example.invalid>\nDescription: opsagent helper system test package\n' "$1" >"$d/DEBIAN/control"
    echo "$1" >"$d/usr/share/opsh-hello/version"
    dpkg-deb --root-owner-group -b "$d" "$WORK/opsh-hello_$1_all.deb" >/dev/null
}
publish() { # VERSIONS...: the flat repository /srv/repo holds exactly these
    local v f
    rm -rf "$ROOT/srv/repo"
    mkdir -p "$ROOT/srv/repo"
    for v in "$@"; do
        f=opsh-hello_${v}_all.deb
        cp "$WORK/$f" "$ROOT/srv/repo/"
        dpkg-deb -f "$WORK/$f"
        printf 'Filename: ./%s\nSize: %s\nSHA256: %s\n\n' "$f" "$(stat -c %s "$WORK/$f")" "$(sha256sum "$WORK/$f" | cut -d' ' -f1)"
    done >"$ROOT/srv/repo/Packages"
}
mkdeb 1.0
mkdeb 2.0
mkdir -p "$ROOT/srv/debs"
cp "$WORK/opsh-hello_2.0_all.deb" "$ROOT/srv/debs/"
publish 1.0
REPO_STATE='{"id": "repo", "module": "linux.apt.repo", "parameter": {"name": "opsh-local", "content": "deb [trusted=yes] file:/srv/repo ./"}}'
pkg() { printf '{"id": "pkg", "module": "linux.apt.package", "parameter": {"name": [{"key": "opsh-hello", "value": "%s"}]}}' "$1"; }
version() { in_c 'dpkg-query -W -f "\${Version}" opsh-hello 2>/dev/null || true'; }
check "apt: repo written and package installed" apply apt1 "$REPO_STATE, $(pkg '')"
check "apt: sources file" in_c 'grep -q "file:/srv/repo" /etc/apt/sources.list.d/opsh-local.list'
check "apt: installed 1.0" test "$(version)" = 1.0
check "apt: reported installed 1.0" out_has apt1 "opsh-hello: installed 1.0"
check "apt: indexes refreshed (package unknown before)" out_has apt1 "package indexes refreshed"
check "apt: second run" apply apt2 "$REPO_STATE, $(pkg '')"
check "apt: second run: no change" no_change apt2
publish 1.0 2.0
check "apt: pin 1.0 while 2.0 exists: no change" apply apt3 "$(pkg 1.0)"
check "apt: ... no change" no_change apt3
# file: sources are read in place: the new version is visible without a refresh.
check "apt: latest upgrades to the newer candidate" apply apt4 "$(pkg latest)"
check "apt: reported 1.0 -> 2.0" out_has apt4 "opsh-hello: 1.0 -> 2.0"
check "apt: fresh indexes were not refreshed" sh -c "! grep -q 'refreshed' '$WORK/apt4.out'"
check "apt: installed 2.0" test "$(version)" = 2.0
setup 'touch -d "2 hours ago" /var/lib/opsagent-helper/apt-update.stamp'
check "apt: latest with aged indexes" apply apt5 "$(pkg latest)"
check "apt: ... refreshes them first, then nothing to do" \
    sh -c "grep -q 'package indexes refreshed (older than 1 h)' '$WORK/apt5.out' && grep -q '(no change)' '$WORK/apt5.out'"
check "apt: latest again: no change" apply apt6 "$(pkg latest)"
check "apt: ... no change, no refresh" sh -c "! grep -q 'refreshed' '$WORK/apt6.out' && grep -q '(no change)' '$WORK/apt6.out'"
check "apt: pin back to 1.0 (downgrade)" apply apt7 "$(pkg 1.0)"
check "apt: installed 1.0 again" test "$(version)" = 1.0
check "apt: pinned again: no change" apply apt8 "$(pkg 1.0)"
check "apt: ... no change" no_change apt8
check "apt: .deb from a file:// URI" apply apt9 "$(pkg file:///srv/debs/opsh-hello_2.0_all.deb)"
check "apt: ... installed 2.0" test "$(version)" = 2.0
check "apt: same .deb again: no change" apply apt10 "$(pkg file:///srv/debs/opsh-hello_2.0_all.deb)"
check "apt: ... no change" no_change apt10
apply apt11 "$(pkg https://example.invalid/opsh-hello_3.0_all.deb)" || true
check "apt: remote .deb: the daemon's failed download names the URL" out_has apt11 "https://example.invalid/opsh-hello_3.0_all.deb"
check "apt: removed" apply apt12 "$(pkg removed)"
check "apt: ... reported removed" out_has apt12 "opsh-hello: removed"
check "apt: ... not installed" test -z "$(version)"
check "apt: removed again: no change" apply apt13 "$(pkg removed)"
check "apt: ... no change" no_change apt13
# A .deb given as an http URL (the original's `sources`): downloaded by the daemon,
# installed by the helper from its root-only copy. Served on the container's loopback.
cat >"$ROOT/root/serve.pl" <<'PERL'
use IO::Socket::INET;
my $s = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => 8808, Listen => 5, ReuseAddr => 1) or die "$!";
while (my $c = $s->accept) {
    my $req = <$c>;
    while (my $l = <$c>) { last if $l =~ /^\r?\n$/ }
    my ($path) = $req =~ m{^GET /([\w.+~-]+) };
    my $f = defined $path ? "/srv/debs/$path" : "";
    if ($f ne "" && -f $f) {
        open my $fh, '<:raw', $f or die; local $/; my $d = <$fh>;
        print $c "HTTP/1.1 200 OK\r\nContent-Length: " . length($d) . "\r\nConnection: close\r\n\r\n$d";
    } else {
        print $c "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    }
    close $c;
}
PERL
setup 'systemd-run --unit opsh-http --collect perl /root/serve.pl'
wait_until 10 "loopback http server" in_c 'perl -MIO::Socket::INET -e "exit(IO::Socket::INET->new(q(127.0.0.1:8808)) ? 0 : 1)"' || true
check "apt: .deb from an http URL (downloaded by the daemon)" apply apt13b "$(pkg http://127.0.0.1:8808/opsh-hello_2.0_all.deb)"
check "apt: ... installed 2.0" test "$(version)" = 2.0
check "apt: ... the helper's copy is gone" in_c 'test -z "$(ls -A /var/lib/opsagent-helper/staged 2>/dev/null)"'
check "apt: same URL again: no change" apply apt13c "$(pkg http://127.0.0.1:8808/opsh-hello_2.0_all.deb)"
check "apt: ... no change" no_change apt13c
in_c 'systemctl stop opsh-http' || true
apply apt14 "$(pkg no-such-version-9)" || true
check "apt: unknown version named with the versions apt knows" out_has apt14 "version no-such-version-9 is not available (apt knows: 2.0, 1.0)"

# ---------------------------------------------------------------- prerequisites
say "== prerequisites: a state's missing tool installed first (a stand-in mercurial package)"
d=$WORK/deb-hg
mkdir -p "$d/DEBIAN" "$d/usr/bin"
printf 'Package: mercurial\nVersion: 99.0-opsh\nArchitecture: all\nMaintainer: opsagent tests <t@example.invalid>\nDescription: stand-in hg for the prerequisite test\n' >"$d/DEBIAN/control"
printf '#!/bin/sh\necho "stand-in hg $*" >&2\nexit 1\n' >"$d/usr/bin/hg"
chmod 0755 "$d/usr/bin/hg"
dpkg-deb --root-owner-group -b "$d" "$WORK/mercurial_99.0-opsh_all.deb" >/dev/null
mkdir -p "$ROOT/srv/repo-hg"
cp "$WORK/mercurial_99.0-opsh_all.deb" "$ROOT/srv/repo-hg/"
{
    dpkg-deb -f "$WORK/mercurial_99.0-opsh_all.deb"
    f=$WORK/mercurial_99.0-opsh_all.deb
    printf 'Filename: ./mercurial_99.0-opsh_all.deb\nSize: %s\nSHA256: %s\n\n' "$(stat -c %s "$f")" "$(sha256sum "$f" | cut -d' ' -f1)"
} >"$ROOT/srv/repo-hg/Packages"
setup 'echo "deb [trusted=yes] file:/srv/repo-hg ./" > /etc/apt/sources.list.d/opsh-hg.list && ! command -v hg'
HG_STATE='{"id": "hg", "module": "common.hg", "parameter": {"path": "/srv/hg-co", "repo": "file:///srv/no-such-repo"}}'
printf '{"recipe_version": 1, "state": [%s]}\n' "$HG_STATE" >"$ROOT/root/pre1.json"
cexec $C opsagent apply --no-prerequisites /root/pre1.json >"$WORK/pre1.out" 2>&1 || true
cat "$WORK/pre1.out" >>"$WORK/apply.log"
check "prerequisites off: the state fails naming the package" out_has pre1 "mercurial"
check "prerequisites off: nothing installed" in_c '! dpkg-query -W mercurial >/dev/null 2>&1'
apply pre2 "$HG_STATE" || true
check "prerequisites on: installed first and said so" out_has pre2 "prerequisite hg installed with apt (package mercurial)"
check "prerequisites on: the package is installed" in_c 'dpkg-query -W -f "\${Version}" mercurial | grep -qx 99.0-opsh'
check "prerequisites on: then the state ran with the tool" out_has pre2 "stand-in hg"
apply pre3 "$HG_STATE" || true
check "prerequisites: present now, not installed again" sh -c "! grep -q 'prerequisite hg' '$WORK/pre3.out'"

# ---------------------------------------------------------------- users, groups, cron, timezone
say "== linux.group, linux.user, linux.cronjob, common.timezone"
GROUP='{"id": "grp", "module": "linux.group", "parameter": {"groupname": "opshgrp", "gid": "2345"}}'
USER_STATE='{"id": "usr", "module": "linux.user", "parameter": {"username": "opshuser", "password": "s3cret pass", "groups": ["opshgrp"], "fullname": "Ops Helper", "shell": "/bin/bash"}}'
CRON='{"id": "cron", "module": "linux.cronjob", "parameter": {"user": "opshuser", "cmd": ["/usr/bin/true opsh-cron"], "minute": "*/5"}}'
TZ_STATE='{"id": "tz", "module": "common.timezone", "parameter": {"name": "Europe/Paris", "use-utc": false}}'
check "accounts: first run" apply acc1 "$GROUP, $USER_STATE, $CRON, $TZ_STATE"
check "group: created with gid 2345" in_c 'getent group opshgrp | grep -q ":2345:"'
check "user: created, in opshgrp, GECOS and shell" in_c 'id -nG opshuser | grep -qw opshgrp && getent passwd opshuser | grep -q ":Ops Helper:/home/opshuser:/bin/bash$" && test -d /home/opshuser'
check "user: the stored hash verifies with libxcrypt" \
    in_c 'perl -e "my \$h = (getpwnam(q(opshuser)))[1]; exit(crypt(q(s3cret pass), \$h) eq \$h ? 0 : 1)"'
check "user: plaintext warning in the comment" out_has acc1 "plaintext passwords in recipes are a risk"
check "cron: entry in the user's crontab" in_c 'crontab -u opshuser -l | grep -qx "\*/5 \* \* \* \* /usr/bin/true opsh-cron"'
check "timezone: /etc/localtime" in_c 'readlink /etc/localtime | grep -q "zoneinfo/Europe/Paris$"'
check "timezone: hardware clock local" in_c 'sed -n 3p /etc/adjtime | grep -qx LOCAL'
HASH1=$(in_c 'getent shadow opshuser | cut -d: -f2')
setup 'crontab -u opshuser -l > /tmp/ct && echo "0 4 * * * /usr/bin/true users-own-line" >> /tmp/ct && crontab -u opshuser /tmp/ct'
check "accounts: second run" apply acc2 "$GROUP, $USER_STATE, $CRON, $TZ_STATE"
check "accounts: second run: no change" no_change acc2
check "user: password hash unchanged" test "$(in_c 'getent shadow opshuser | cut -d: -f2')" = "$HASH1"
check "cron: the user's own line kept" in_c 'crontab -u opshuser -l | grep -q users-own-line'
check "cron: our block once" test "$(in_c 'crontab -u opshuser -l | grep -c opsh-cron')" = 1
setup 'useradd -m opshy && echo "opshy:pw with yescrypt" | chpasswd && getent shadow opshy | grep -qF ":\$y\$"'
check "user: a yescrypt hash made by chpasswd verifies: no change" \
    apply acc3 '{"id": "usr-y", "module": "linux.user", "parameter": {"username": "opshy", "password": "pw with yescrypt"}}'
check "user: ... no change" no_change acc3
check "user: a different plaintext password is changed" \
    apply acc4 '{"id": "usr-y", "module": "linux.user", "parameter": {"username": "opshy", "password": "another"}}'
check "user: ... reported" out_has acc4 "opshy: password set"
# The original's shapes: a group and a user of the same name (app/app), the user without
# a password; Salt's cron syntax; an empty cron command refused.
APPGRP='{"id": "appgrp", "module": "linux.group", "parameter": {"groupname": "opshapp"}}'
APPUSR='{"id": "appusr", "module": "linux.user", "parameter": {"username": "opshapp"}}'
check "user: name of an existing group, no password" apply acc5 "$APPGRP, $APPUSR"
check "user: ... that group is its primary group" in_c 'test "$(id -gn opshapp)" = opshapp'
check "user: ... no usable password (locked)" in_c 'getent shadow opshapp | cut -d: -f2 | grep -q "^!"'
check "user: ... again: no change" apply acc6 "$APPGRP, $APPUSR"
check "user: ... no change" no_change acc6
SALTCRON='{"id": "cron-salt", "module": "linux.cronjob", "parameter": {"user": "opshuser", "cmd": ["/usr/bin/true opsh-salt"], "minute": "random", "hour": "9-17/2", "day-of-week": "mon-fri", "month": "jan,jul"}}'
check "cron: Salt field syntax" apply acc7 "$SALTCRON"
check "cron: ... written with numbers, random in range" \
    in_c 'crontab -u opshuser -l | grep -E "^([0-9]|[1-5][0-9]) 9-17/2 \* 1,7 1-5 /usr/bin/true opsh-salt$"'
check "cron: ... random is stable: no change" apply acc8 "$SALTCRON"
check "cron: ... no change" no_change acc8
if apply acc9 '{"id": "cron-empty", "module": "linux.cronjob", "parameter": {"user": "opshuser", "cmd": [""]}}'; then
    check "cron: an empty command fails" false
else
    check "cron: an empty command fails" out_has acc9 "an empty command"
fi

# ---------------------------------------------------------------- policy
say "== policy file forbidding linux.cmd"
setup 'mkdir -p /etc/opsagent && chmod 0755 /etc/opsagent && printf "modules = linux.file\n" > /etc/opsagent/helper.policy && chmod 0644 /etc/opsagent/helper.policy'
FILE_STATE='{"id": "f", "module": "linux.file", "parameter": {"path": "/tmp/opsh-policy.txt", "content": "ok\n"}}'
CMD_STATE='{"id": "c", "module": "linux.cmd", "parameter": {"cmd": "touch /tmp/opsh-policy-cmd-ran", "cwd": "/"}}'
check "policy: linux.file allowed" apply pol1 "$FILE_STATE"
if apply pol2 "$CMD_STATE"; then check "policy: linux.cmd refused" false; else check "policy: linux.cmd refused" true; fi
check "policy: the refusal names the rule" out_has pol2 "module linux.cmd is not in the policy's \`modules\`"
check "policy: the command did not run" in_c '! test -e /tmp/opsh-policy-cmd-ran'
setup 'printf "modules = linux.file\nbogus line\n" > /etc/opsagent/helper.policy'
check "policy: an invalid policy stops the helper (file:line)" \
    in_c 'timeout 10 opsagent-helper --socket /run/x.sock 2>&1 | grep -q "refusing to start: /etc/opsagent/helper.policy:2:"'
in_c 'rm -f /etc/opsagent/helper.policy'

# ---------------------------------------------------------------- allowlist + journal
say "== a helper for opshuser only: another uid is refused; journal fields"
setup 'useradd -M -N -g opshuser opshother && mkdir -p /run/opsh && chmod 0755 /run/opsh'
setup 'systemd-run --unit opsh-helper --collect /usr/local/bin/opsagent-helper --socket /run/opsh/h.sock --allow-user opshuser --state-dir /var/lib/opsh-helper'
wait_until 20 "private helper socket" nsenter -t "$(cpid $C)" -a -- test -S /run/opsh/h.sock || true
printf '{"recipe_version": 1, "state": [%s]}\n' '{"id": "jf", "module": "linux.file", "parameter": {"path": "/tmp/opsh-journal.txt", "content": "j\n"}}' >"$ROOT/srv/j.json"
chmod 0644 "$ROOT/srv/j.json"
OTHER_UID=$(in_c 'id -u opshother')
check "allowlist: opshuser (allowed) is served" \
    in_c 'setpriv --reuid=opshuser --regid=opshuser --init-groups opsagent apply --helper-socket /run/opsh/h.sock /srv/j.json'
if in_c 'setpriv --reuid=opshother --regid=opshuser --clear-groups opsagent apply --helper-socket /run/opsh/h.sock /srv/j.json' >"$WORK/refused.out" 2>&1; then
    check "allowlist: another uid in the socket's group is refused" false
else
    check "allowlist: another uid in the socket's group is refused" true
fi
check "allowlist: the refusal is logged with uid and pid" \
    in_c "journalctl -u opsh-helper --no-pager -o verbose OPSAGENT_UID=$OTHER_UID | grep -q 'MESSAGE=refused connection' &&
          journalctl -u opsh-helper --no-pager -o verbose OPSAGENT_UID=$OTHER_UID | grep -q 'OPSAGENT_PID=[1-9]'"
check "journal: outcomes carry structured fields" \
    in_c 'journalctl -u opsh-helper -o verbose --no-pager | grep -q "^ *OPSAGENT_MODULE=linux.file" && journalctl -u opsh-helper -o verbose --no-pager | grep -q "^ *OPSAGENT_STATE_ID=jf"'
check "journal: the kept capability set is logged" \
    in_c 'journalctl -u opsh-helper --no-pager | grep -q "capability bounding set reduced"'
in_c 'systemctl stop opsh-helper' || true

# ---------------------------------------------------------------- storage through the helper unit
say "== storage states through the real opsagent-helper.service (sandboxed, no drop-in)"
# The shipped units, with the binary where ExecStart expects it. Root may always connect.
HSOCK=/run/opsagent-helper/helper.sock
install -d -m 0755 "$ROOT/opt/visualops/current/bin" "$ROOT/etc/sysusers.d"
install -m 0755 "$BIN_DIR/opsagent-helper" "$ROOT/opt/visualops/current/bin/"
install -m 0644 "$REPO/units/opsagent-helper.service" "$REPO/units/opsagent-helper.socket" "$ROOT/etc/systemd/system/"
install -m 0644 "$REPO/units/opsagent.sysusers" "$ROOT/etc/sysusers.d/opsagent.conf"
setup 'systemd-sysusers && systemctl daemon-reload && systemctl start opsagent-helper.socket'
# apply_unit NAME JSON-STATES: like apply, through the socket of the helper unit.
apply_unit() {
    local name=$1 states=$2 rc=0
    printf '{"recipe_version": 1, "state": [%s]}\n' "$states" >"$ROOT/root/$name.json"
    cexec $C opsagent apply --helper-socket "$HSOCK" "/root/$name.json" >"$WORK/$name.out" 2>&1 || rc=$?
    { echo "== $name (exit $rc, helper unit)"; cat "$WORK/$name.out"; } | tee -a "$WORK/apply.log" >&2
    return "$rc"
}
# Two loop devices made on the host over sparse files, and their nodes made in the
# container's /dev (nspawn gives it none; its device cgroup is not restricted here).
mkloop() { # NAME: prints the loop device
    local dev
    truncate -s 64M "$WORK/$1.img"
    dev=$(losetup --find --show "$WORK/$1.img") || return 1
    echo "$dev" >>"$WORK/loops"
    csh $C "mknod -m 0660 $dev b $((16#$(stat -c %t "$dev"))) $((16#$(stat -c %T "$dev")))" || return 1
    echo "$dev"
}
if ! { LOOP1=$(mkloop disk1) && LOOP2=$(mkloop disk2); }; then
    FAILED=$((FAILED + 1))
    FAILURES+=("setup: loop devices")
fi
say "  loop devices: ${LOOP1:-none} ${LOOP2:-none}"
MKFS="{\"id\": \"mkfs\", \"module\": \"linux.mkfs\", \"parameter\": {\"device\": \"$LOOP1\", \"fstype\": \"ext4\", \"label\": \"opshdata\"}}"
MNT_T="{\"id\": \"mnt-t\", \"module\": \"linux.mount\", \"parameter\": {\"device\": \"$LOOP1\", \"filesystem\": \"ext4\", \"path\": \"/mnt/opsh-data\", \"opts\": \"noatime\"}}"
MKFS2="{\"id\": \"mkfs2\", \"module\": \"linux.mkfs\", \"parameter\": {\"device\": \"$LOOP2\", \"fstype\": \"ext4\"}}"
MNT_F="{\"id\": \"mnt-f\", \"module\": \"linux.mount\", \"parameter\": {\"device\": \"$LOOP2\", \"filesystem\": \"ext4\", \"path\": \"/srv/opsh-fstab\", \"fstab\": true, \"pass\": \"2\"}}"
TMPFS="{\"id\": \"tmpfs\", \"module\": \"linux.mount\", \"parameter\": {\"device\": \"tmpfs\", \"filesystem\": \"tmpfs\", \"path\": \"/srv/opsh-tmp\", \"fstab\": true, \"opts\": \"size=8m\"}}"
UNIT_T='mnt-opsh\x2ddata.mount'
UNIT_F='srv-opsh\x2dfstab.mount'
UNIT_TMP='srv-opsh\x2dtmp.mount'
# The container's own mount table (its PID 1), read from the host: the mount must be
# there, not only in the helper's private mount namespace.
host_mounted() { # PATH FSTYPE
    grep -q " $1 [^ ]* .* - $2 " "/proc/$(cpid $C)/mountinfo"
}
unit_active() { in_c "systemctl is-active --quiet '$1'"; }

# Without the drop-in: a tmpfs needs no device, so systemd mounts it for the sandbox;
# its fstab line becomes a unit of systemd's fstab generator, which is started.
check "storage: tmpfs with fstab through the sandboxed helper (no drop-in)" apply_unit st1 "$TMPFS"
check "storage: ... mounted by the unit generated from /etc/fstab" out_has st1 "by systemd unit $UNIT_TMP, from /etc/fstab"
check "storage: ... the unit comes from the fstab generator" \
    in_c "systemctl show -p FragmentPath --value '$UNIT_TMP' | grep -q '^/run/systemd/generator/'"
check "storage: ... in the container's mountinfo" host_mounted /srv/opsh-tmp tmpfs
check "storage: ... unit active" unit_active "$UNIT_TMP"
check "storage: tmpfs again: no change" apply_unit st2 "$TMPFS"
check "storage: ... no change" no_change st2
check "storage: the helper unit has no drop-in" in_c '[ -z "$(systemctl show -p DropInPaths --value opsagent-helper.service)" ]'
in_c 'systemd-analyze security --no-pager opsagent-helper.service' >"$WORK/security.txt" 2>&1 || true
say "  $(grep 'Overall exposure level' "$WORK/security.txt" || echo 'systemd-analyze security gave no score')"
check "storage: mkfs without any drop-in (its own transient unit)" apply_unit st5 "$MKFS"
check "storage: ... reported" out_has st5 "ext4 filesystem created (label opshdata)"
check "storage: ... ext4 on the device (seen from the host)" test "$(blkid -p -o value -s TYPE "$LOOP1")" = ext4
check "storage: mkfs again: no change" apply_unit st6 "$MKFS"
check "storage: ... no change" no_change st6
# CAP_SYS_ADMIN is capability 21.
check "storage: the helper itself holds no CAP_SYS_ADMIN" \
    in_c 'm=$(awk "/^CapBnd:/ {print \$2}" /proc/$(systemctl show -p MainPID --value opsagent-helper.service)/status) && [ $(((0x$m >> 21) & 1)) = 0 ]'
check "storage: mount without fstab (transient unit)" apply_unit st7 "$MNT_T"
check "storage: ... by the transient unit" out_has st7 "$LOOP1 mounted (ext4) by transient systemd unit $UNIT_T"
check "storage: ... in the container's mountinfo" host_mounted /mnt/opsh-data ext4
check "storage: ... systemctl status of the unit" in_c "systemctl status --no-pager '$UNIT_T' | grep -q 'Active: active (mounted)'"
check "storage: ... with the options" in_c "findmnt -n -o OPTIONS /mnt/opsh-data | grep -qw noatime"
check "storage: mount again: no change" apply_unit st8 "$MNT_T"
check "storage: ... no change" no_change st8
check "storage: mkfs + mount with fstab" apply_unit st9 "$MKFS2, $MNT_F"
check "storage: ... the fstab line" in_c "grep -qx '$LOOP2 /srv/opsh-fstab ext4 defaults 0 2' /etc/fstab"
# In a container systemd's fstab generator ignores device lines, so a transient unit
# mounts it (on a host, the generated unit is started, as for the tmpfs above).
check "storage: ... mounted (transient: no generated unit for a device in a container)" \
    out_has st9 "$LOOP2 mounted (ext4) by transient systemd unit $UNIT_F (systemd made no unit from the /etc/fstab line"
check "storage: ... in the container's mountinfo" host_mounted /srv/opsh-fstab ext4
check "storage: ... unit active" unit_active "$UNIT_F"
check "storage: mount with fstab again: no change" apply_unit st10 "$MKFS2, $MNT_F"
check "storage: ... no change" no_change st10
in_c "systemctl stop '$UNIT_T' '$UNIT_F' '$UNIT_TMP'" || true

summary
