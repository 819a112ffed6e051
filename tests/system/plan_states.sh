#!/usr/bin/env bash
# Plan mode on a real host (issue #19): a Debian bookworm container booted with
# systemd-nspawn, the freshly built `opsagent` and `opsagent-helper` copied in, recipes
# planned with `opsagent apply --test FILE` (a private helper as root). Run as root:
#
#   bash tests/system/plan_states.sh
#
# 1. The no-write proof: one recipe with a fixture state of every module of the
#    catalogue (the list is read from proto/src/catalogue.rs, so a new module
#    without a fixture fails here) is planned on a fresh container; a walk of /etc /var
#    /opt /home /srv /usr/local (content checksum, mode, owner, link target of every
#    entry) before and after must be identical. Excluded, because the OS changes them
#    whatever the helper does (seen by walking an idle container before and after a plan
#    with no exclusion at all: only these two differed):
#      /var/log/journal      journald's files grow on their own (every unit's log,
#                            the helper's own journal lines);
#      /var/cache/apt/*.bin  apt rebuilds its binary caches (pkgcache.bin, srcpkgcache.bin)
#                            whenever they are older than its lists or sources, on any
#                            read-only query too (apt-cache policy): the plan of an apt
#                            state asks apt, and this container's sources were changed.
#      /var/tmp/systemd-private-*  the PrivateTmp= directories of units that come and
#                            go on their own: systemd-timedated (started by the timezone
#                            cycle's apply) exits when idle, during a later cycle's plan,
#                            and systemd removes its directory (seen in the symlink cycle).
#    Nothing else is excluded: the rest of /var/log (apt's and dpkg's logs), the helper's
#    state dir, apt's lists, /etc, crontabs (/var/spool/cron) are all compared.
# 2. Drift cycles, one per module the container can run without the network (linux.user,
#    linux.group, linux.cronjob, common.timezone, linux.mount of a tmpfs, linux.service
#    stopped -> started and a watched file changed -> restarted, linux.file, linux.dir,
#    linux.symlink, linux.cmd behind an if-path-absent guard, linux.apt.repo,
#    linux.apt.package from a .deb built here in a local file: repository, linux.apt.ppa
#    with credentials, common.ssh.auth): drifted host -> the plan reports the exact
#    change (exit 3), in the words the apply then uses, and the walk (for a unit, its
#    state or main pid too) is unchanged -> apply -> the plan reports nothing (exit 0).
#    linux.supervisord is in the no-write plan only: the cached root has no python3, so
#    supervisor cannot run in it.
#
# Ends with "N passed, M failed"; exits non-zero on any failure. The container is
# stopped and removed on exit (by pid, see lib.sh). OPSAGENT_SYSTEST_KEEP=1 keeps logs.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
# shellcheck source=tests/system/lib.sh
source "$HERE/lib.sh"
# shellcheck source=tests/system/checks.sh
source "$HERE/checks.sh" plan
# shellcheck source=tests/system/cycle.sh
source "$HERE/cycle.sh"

install_host_tools systemd-nspawn:systemd-container debootstrap:debootstrap nsenter:util-linux \
    dpkg-deb:dpkg ps:procps

ensure_rootfs

say "building opsagent and opsagent-helper"
(cd "$REPO" && cargo build --locked -q -p opsagent --bin opsagent -p opsagent-helper --bin opsagent-helper) \
    >"$WORK/build.log" 2>&1 || { tail -n 30 "$WORK/build.log" >&2; exit 1; }
BIN_DIR=${CARGO_TARGET_DIR:-$REPO/target}/debug

C="ps"
boot $C
ROOT=$(croot $C)
install -m 0755 "$BIN_DIR/opsagent" "$BIN_DIR/opsagent-helper" "$ROOT/usr/local/bin/"
csh $C 'mv /etc/apt/sources.list /etc/apt/sources.list.off 2>/dev/null; rm -f /etc/apt/sources.list.d/*.list; rm -rf /var/lib/apt/lists/*_*'

in_c() { csh $C "$1"; }
setup() {
    if ! csh $C "$1" >>"$WORK/checks.log" 2>&1; then
        FAILED=$((FAILED + 1))
        FAILURES+=("setup: $1")
        say "  FAIL: setup: $1"
    fi
}
# The walk: tests/system/cycle.sh's `walk` with its defaults (the directories and the
# exclusions of this file's header).
# ---------------------------------------------------------------- fixtures
say "== fixtures on the host the recipe needs to be inspected"
cat >"$ROOT/etc/systemd/system/opsh-demo.service" <<'EOF'
[Unit]
Description=opsagent plan system test service
[Service]
ExecStart=/bin/sh -c 'while :; do sleep 1 & wait $!; done'
EOF
setup 'systemctl daemon-reload && echo v=1 > /etc/opsh-demo.conf'
setup 'useradd -m opshplan && mkdir -p /srv/fixtures/docker && printf "FROM scratch\n" > /srv/fixtures/docker/Dockerfile'
setup 'mkdir -p /srv/fixtures/tree && echo a > /srv/fixtures/tree/a && tar -C /srv/fixtures/tree -czf /srv/fixtures/a.tar.gz .'
setup 'printf "notify { \"opsh\": }\n" > /srv/fixtures/site.pp && printf "not a key\n" > /srv/fixtures/key.asc'
setup 'mkdir -p /etc/supervisor && printf "[program:app]\ncommand=/bin/sleep 1000\n" > /etc/supervisor/opsh.conf'

KEY='ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOsJ5cJ5Cj0m0Z0m2Kd5d0b3dE8v1t3m6Z6wq1n7X2aB opsh'
declare -A FIX
FIX[common.archive]='{"path": "/srv/plan-archive", "source": "file:///srv/fixtures/a.tar.gz"}'
FIX[common.gem.source]='{"url": "https://rubygems.example.invalid/"}'
FIX[common.gem.package]='{"name": ["opsh-gem"]}'
FIX[common.git]='{"path": "/srv/plan-git", "repo": "file:///srv/fixtures/no-repo.git"}'
FIX[common.hg]='{"path": "/srv/plan-hg", "repo": "file:///srv/fixtures/no-repo-hg"}'
FIX[common.svn]='{"path": "/srv/plan-svn", "repo": "file:///srv/fixtures/no-repo-svn"}'
FIX[common.npm.package]='{"name": ["opsh-npm"]}'
FIX[common.pip.package]='{"name": ["opsh-pip"]}'
FIX[common.ssh.auth]="{\"username\": \"opshplan\", \"content\": \"$KEY\"}"
FIX[common.ssh.known_host]="{\"hostname\": \"git.example.invalid\", \"username\": \"opshplan\", \"key\": \"${KEY#ssh-ed25519 }\", \"enc\": \"ssh-ed25519\"}"
FIX[common.timezone]='{"name": "Europe/Paris"}'
FIX[common.virtualenv]='{"path": "/srv/plan-venv"}'
FIX[linux.apt.package]='{"name": [{"key": "opsh-hello", "value": "latest"}]}'
FIX[linux.apt.ppa]='{"name": "ppa:opsh/plan"}'
FIX[linux.apt.repo]='{"name": "opsh-local", "content": "deb [trusted=yes] file:/srv/repo ./"}'
FIX[linux.chef.client]='{"server": "https://chef.example.invalid"}'
FIX[linux.chef.solo]='{}'
FIX[linux.cmd]='{"cmd": "touch /srv/plan-cmd-ran", "cwd": "/"}'
FIX[linux.cronjob]='{"user": "opshplan", "cmd": ["/usr/bin/true opsh-plan"], "minute": "*/5"}'
FIX[linux.dir]='{"path": ["/srv/plan-dir"], "mode": "0750"}'
FIX[linux.docker.built]='{"path": "/srv/fixtures/docker", "tag": "opsh/plan:1"}'
FIX[linux.docker.deploy]='{"container": "opsh-plan-d", "image": "busybox"}'
FIX[linux.docker.pulled]='{"repo": "busybox"}'
FIX[linux.docker.pushed]='{"repository": "127.0.0.1:5999/opsh"}'
FIX[linux.docker.running]='{"container": "opsh-plan-r", "image": "busybox"}'
FIX[linux.file]='{"path": "/etc/opsh-plan.conf", "content": "a = 1\n", "mode": "0640"}'
FIX[linux.group]='{"groupname": "opshplangrp", "gid": "2456"}'
FIX[linux.lvm.lv]='{"name": "lv0", "vg-name": "opshvg", "size": "8M"}'
FIX[linux.lvm.pv]='{"path": ["/dev/opsh-nodev"]}'
FIX[linux.lvm.vg]='{"name": "opshvg", "path": ["/dev/opsh-nodev"]}'
FIX[linux.mesos.master]='{"cluster_name": "opsh", "master_ip": "127.0.0.1", "masters_addresses": ["127.0.0.1"], "server_id": "1"}'
FIX[linux.mesos.slave]='{"attributes": [{"key": "rack", "value": "a"}], "masters_addresses": ["127.0.0.1"], "slave_ip": "127.0.0.1"}'
FIX[linux.mkfs]='{"device": "/dev/opsh-nodev", "fstype": "ext4"}'
FIX[linux.mount]='{"device": "tmpfs", "filesystem": "tmpfs", "path": "/srv/plan-tmp", "fstab": true, "opts": "size=8m"}'
FIX[linux.puppet.agent]='{"server": "puppet.example.invalid"}'
FIX[linux.puppet.apply]='{"manifests": ["/srv/fixtures/site.pp"]}'
FIX[linux.puppet.run]='{}'
FIX[linux.selinux]='{"mode": "permissive"}'
FIX[linux.raid]='{"device-name": "/dev/md9", "devices": ["/dev/opsh-nodev"], "level": "1"}'
FIX[linux.rpm.key]='{"path": "/srv/fixtures/key.asc"}'
FIX[linux.service]='{"name": ["opsh-demo"], "watch": ["/etc/opsh-demo.conf"]}'
FIX[linux.supervisord]='{"config": "/etc/supervisor/opsh.conf", "name": ["app"]}'
FIX[linux.symlink]='{"source": "/etc/hostname", "target": "/srv/plan-link"}'
FIX[linux.user]='{"username": "opshplanu", "password": "s3cret pass", "shell": "/bin/bash"}'
FIX[linux.yum.package]='{"name": ["opsh-yum"]}'
FIX[linux.yum.repo]='{"name": "opsh", "content": "[opsh]\nbaseurl=file:///srv/yum\n"}'

# ---------------------------------------------------------------- 1. no write
say "== the no-write proof: a plan of every module of the catalogue"
mapfile -t MODULES < <(grep -oE '= "(linux|common)\.[a-z_.]+", builtin' "$REPO/proto/src/catalogue.rs" | cut -d'"' -f2 | sort -u)
STATES=""
MISSING=()
i=0
for m in "${MODULES[@]}"; do
    if [ -z "${FIX[$m]:-}" ]; then
        MISSING+=("$m")
        continue
    fi
    i=$((i + 1))
    STATES+="${STATES:+, }{\"id\": \"s$i\", \"module\": \"$m\", \"parameter\": ${FIX[$m]}}"
done
say "  ${#MODULES[@]} modules in the catalogue, $i with a fixture"
check "every module of the catalogue has a fixture (missing: ${MISSING[*]:-none})" test "${#MISSING[@]}" = 0
walk all.before
run all "apply --test" "$STATES"
walk all.after
check "plan of every module: the walk of /etc /var /opt /home /srv /usr/local is unchanged" unchanged all.before all.after
check "plan of every module: one line per state" test "$(grep -cE '^(ok|change|FAILED) ' "$WORK/all.out")" = "$i"
check "plan of every module: something would change (exit 3) or a state cannot be planned here (exit 1)" \
    sh -c "rc=\$(cat '$WORK/all.rc'); [ \"\$rc\" = 3 ] || [ \"\$rc\" = 1 ]"
check "plan of every module: linux.cmd would run, and did not" \
    sh -c "grep -q 'would run' '$WORK/all.out' && ! test -e '$ROOT/srv/plan-cmd-ran'"

# ---------------------------------------------------------------- 2. drift -> plan -> apply -> plan
# `cycle` (tests/system/cycle.sh): drift set up by hand -> plan -> apply -> plan.

say "== linux.group: absent"
cycle group "$(st grp linux.group "${FIX[linux.group]}")" "opshplangrp: group created (gid 2456)"
say "== linux.user: absent"
cycle user "$(st usr linux.user "${FIX[linux.user]}")" "opshplanu: user created" "opshplanu: password set"
say "== linux.cronjob: no entry in the user's crontab"
cycle cronjob "$(st cron linux.cronjob "${FIX[linux.cronjob]}")" "crontab of opshplan: entries of state cron written"
say "== common.timezone: UTC -> Europe/Paris"
cycle timezone "$(st tz common.timezone "${FIX[common.timezone]}")" "timezone: set to Europe/Paris"
say "== linux.mount: a tmpfs, not mounted, no fstab line (the mount point exists)"
setup 'mkdir -p /srv/plan-tmp'
cycle mount "$(st tmpfs linux.mount "${FIX[linux.mount]}")" \
    "/etc/fstab: line for /srv/plan-tmp written: tmpfs /srv/plan-tmp tmpfs size=8m 0 0" "/srv/plan-tmp: tmpfs mounted (tmpfs)"
in_c "systemctl stop 'srv-plan\\x2dtmp.mount'" || true

say "== linux.service: opsh-demo stopped -> started"
SVC_START='{"name": ["opsh-demo"], "watch": ["/etc/opsh-demo.conf"]}'
PROBE='systemctl is-active opsh-demo.service' cycle service-start "$(st svc linux.service "$SVC_START")" \
    "opsh-demo.service: started"
say "== linux.service: the watched file changed -> restarted"
setup 'echo v=2 > /etc/opsh-demo.conf'
SVC_RESTART='{"name": [{"key": "opsh-demo", "value": "restart"}], "watch": ["/etc/opsh-demo.conf"]}'
PROBE='systemctl show -p MainPID --value opsh-demo.service' cycle service-restart \
    "$(st svc linux.service "$SVC_RESTART")" "opsh-demo.service: restarted"
check "service-restart: the plan said why" out_has service-restart-plan "watched /etc/opsh-demo.conf changed"
in_c 'systemctl stop opsh-demo.service' || true

say "== linux.file: content and mode drifted"
setup 'printf "a = 0\n" > /etc/opsh-plan.conf && chmod 0644 /etc/opsh-plan.conf'
cycle file "$(st f linux.file "${FIX[linux.file]}")" \
    "/etc/opsh-plan.conf: content updated" "/etc/opsh-plan.conf: mode 0644 -> 0640"
say "== linux.dir: absent"
cycle dir "$(st d linux.dir "${FIX[linux.dir]}")" "/srv/plan-dir: directory created (0750 0:0)"
say "== linux.symlink: pointing elsewhere"
setup 'ln -s /etc/os-release /srv/plan-link'
cycle symlink "$(st l linux.symlink "${FIX[linux.symlink]}")" \
    "/srv/plan-link: link retargeted /etc/os-release -> /etc/hostname"

say "== linux.cmd: guarded by if-path-absent (would run -> ran -> the guard holds)"
CMD='{"cmd": "touch /srv/plan-cmd-ran", "cwd": "/", "if-path-absent": ["/srv/plan-cmd-ran"]}'
cycle cmd "$(st c linux.cmd "$CMD")" "cmd: ran"
check "cmd: the plan said it would run the command" out_has cmd-plan 'would run /bin/sh -c "touch /srv/plan-cmd-ran"'

say "== linux.apt.repo: sources file absent"
cycle apt-repo "$(st repo linux.apt.repo "${FIX[linux.apt.repo]}")" \
    "/etc/apt/sources.list.d/opsh-local.list: file created (0644 0:0)"

say "== linux.apt.package: not installed, in a local file: repository (a .deb built here)"
# As helper_states.sh does: a .deb made with dpkg-deb on the host, a flat repository
# (Packages by hand) in the container, which the sources file written above names.
DEB=$WORK/deb
mkdir -p "$DEB/DEBIAN" "$DEB/usr/share/opsh-hello"
printf 'Package: opsh-hello\nVersion: 1.0\nArchitecture: all\nMaintainer: opsagent tests <t@example.invalid>\nDescription: opsagent plan system test package\n' \
    >"$DEB/DEBIAN/control"
echo 1.0 >"$DEB/usr/share/opsh-hello/version"
dpkg-deb --root-owner-group -b "$DEB" "$WORK/opsh-hello_1.0_all.deb" >/dev/null
mkdir -p "$ROOT/srv/repo"
cp "$WORK/opsh-hello_1.0_all.deb" "$ROOT/srv/repo/"
{
    dpkg-deb -f "$WORK/opsh-hello_1.0_all.deb"
    printf 'Filename: ./opsh-hello_1.0_all.deb\nSize: %s\nSHA256: %s\n\n' \
        "$(stat -c %s "$WORK/opsh-hello_1.0_all.deb")" "$(sha256sum "$WORK/opsh-hello_1.0_all.deb" | cut -d' ' -f1)"
} >"$ROOT/srv/repo/Packages"
# A plan plans against the indexes there are (it never refreshes them): fresh ones.
setup 'apt-get update -qq'
cycle apt-package "$(st pkg linux.apt.package "${FIX[linux.apt.package]}")" "opsh-hello: installed 1.0"
check "apt-package: installed for real" in_c 'dpkg-query -W -f "\${Version}" opsh-hello | grep -qx 1.0'

say "== linux.apt.ppa: a private PPA (source list and credentials) absent"
PPA='{"name": "ppa:opsh/plan", "username": "opsh", "password": "s3cret"}'
cycle apt-ppa "$(st ppa linux.apt.ppa "$PPA")" \
    "/etc/apt/sources.list.d/opsh-ubuntu-plan.list: file created (0644 0:0)" \
    "/etc/apt/auth.conf.d/opsh-ubuntu-plan.conf: file created (0600 0:0)"
# Launchpad is not reachable from here: no later apt call may read it.
in_c 'rm -f /etc/apt/sources.list.d/opsh-ubuntu-plan.list /etc/apt/auth.conf.d/opsh-ubuntu-plan.conf'

say "== common.ssh.auth: authorized_keys with another key only"
OTHER='ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHy3OCDRQ8bOnoMZN4u6X7T6tq5zSBCpCyN6tFGmyO2h other'
setup "install -d -m 0700 -o opshplan -g opshplan /home/opshplan/.ssh && echo '$OTHER' > /home/opshplan/.ssh/authorized_keys &&
    chown opshplan:opshplan /home/opshplan/.ssh/authorized_keys && chmod 0600 /home/opshplan/.ssh/authorized_keys"
cycle ssh-auth "$(st auth common.ssh.auth "${FIX[common.ssh.auth]}")" \
    "/home/opshplan/.ssh/authorized_keys: 1 key(s) written"
check "ssh-auth: both keys there, the other one kept" \
    in_c 'grep -qF "IHy3OCDRQ8bOnoMZN4u6X7T6tq5zSBCpCyN6tFGmyO2h other" /home/opshplan/.ssh/authorized_keys &&
          grep -qF "IOsJ5cJ5Cj0m0Z0m2Kd5d0b3dE8v1t3m6Z6wq1n7X2aB" /home/opshplan/.ssh/authorized_keys'

summary
