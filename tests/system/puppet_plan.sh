#!/usr/bin/env bash
# Puppet's plan under real systemd (issue #19): `linux.puppet.apply` and `linux.puppet.run`
# plan by running Puppet's own noop in a transient unit confined to a read-only host
# (helper/src/states/puppet.rs, `exec::Sandbox`). helper/tests/puppet_plan.rs runs the
# same cycle where systemd is not PID 1, in a sandbox of its own making; here the
# helper's real runner starts the noop as a transient unit of the container's systemd,
# so the unit properties themselves (ProtectSystem=strict, PrivateTmp, the capability
# bounding set, RestrictAddressFamilies, …) are what keeps the host unchanged. Run as root:
#
#   bash tests/system/puppet_plan.sh
#
# A Debian bookworm container (the cached root plus Debian's `puppet`, cached once as
# bookworm-puppet-r1) booted with systemd-nspawn; the fresh `opsagent` and
# `opsagent-helper` copied in; recipes planned with `opsagent apply --test` (a private
# helper as root). Checks:
#  - drift cycle of linux.puppet.apply: a manifest's file absent -> the plan reports
#    `File[…]: ensure absent -> file` (exit 3) and a walk of /etc /var /opt /home /srv
#    /usr/local (Puppet's vardir, cache and config included) is unchanged -> the apply
#    creates it -> the plan finds nothing (exit 0); the file edited by hand -> the plan
#    reports its content change, the walk unchanged; the same through linux.puppet.run;
#  - escape: a resource marked `noop => false` (applied by Puppet even under --noop):
#    the plan fails, and neither that file nor anything else is written.
# Ends with "N passed, M failed"; the container is stopped and removed on exit (by pid).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
# shellcheck source=tests/system/lib.sh
source "$HERE/lib.sh"
# shellcheck source=tests/system/checks.sh
source "$HERE/checks.sh" puppet
# shellcheck source=tests/system/cycle.sh
source "$HERE/cycle.sh"

install_host_tools systemd-nspawn:systemd-container debootstrap:debootstrap nsenter:util-linux

ensure_rootfs

# ---------------------------------------------------------------- the Puppet root
# The agent's service is not under test; it would only add noise to the journal.
derived_rootfs_finish() { ln -sf /dev/null "$1/etc/systemd/system/puppet.service"; }
ensure_derived_rootfs bookworm-puppet-r1 puppet usr/bin/puppet

say "building opsagent and opsagent-helper"
(cd "$REPO" && cargo build --locked -q -p opsagent --bin opsagent -p opsagent-helper --bin opsagent-helper) \
    >"$WORK/build.log" 2>&1 || { tail -n 30 "$WORK/build.log" >&2; exit 1; }
BIN_DIR=${CARGO_TARGET_DIR:-$REPO/target}/debug

C=puppet
boot $C
ROOT=$(croot $C)
install -m 0755 "$BIN_DIR/opsagent" "$BIN_DIR/opsagent-helper" "$ROOT/usr/local/bin/"

in_c() { csh $C "$1"; }
# `walk` (tests/system/cycle.sh) of /etc /var /opt /home /srv /usr/local, as plan_states.sh's
# (see there for the exclusions); Puppet's own directories (/etc/puppet, /var/lib/puppet,
# /var/cache/puppet, /var/log/puppet) are inside it. Files also by size and modification
# time (a rewrite with the same content counts); not directories: the transient unit's
# PrivateTmp= directory under /var/tmp (pruned, systemd's, gone with the unit) changes
# /var/tmp's own time.
WALK_SIZES=yes

check "systemd is PID 1 in the container (the helper's runner is the transient unit)" \
    in_c 'test "$(cat /proc/1/comm)" = systemd'

mkdir -p "$ROOT/srv/puppet"
cat >"$ROOT/srv/puppet/motd.pp" <<'EOF'
file { '/srv/managed/motd':
  ensure  => file,
  content => "managed by puppet\n",
  mode    => '0644',
}
EOF
cat >"$ROOT/srv/puppet/escape.pp" <<'EOF'
file { '/srv/escaped':
  ensure  => file,
  content => "written by a plan\n",
  noop    => false,
}
EOF
in_c 'mkdir -p /srv/managed'
APPLY=$(st pa linux.puppet.apply '{"manifests": ["/srv/puppet/motd.pp"]}')
RUN=$(st pr linux.puppet.run '{"arguments": [{"key": "apply"}, {"key": "/srv/puppet/motd.pp"}]}')

# ---------------------------------------------------------------- linux.puppet.apply
say "== linux.puppet.apply: the managed file is absent"
walk pa.before
run pa-plan "apply --test" "$APPLY"
walk pa.after
check "puppet.apply: the plan exits 3" rc_is pa-plan 3
check "puppet.apply: the plan reports \"File[/srv/managed/motd]: ensure absent -> file\"" \
    out_has pa-plan "File[/srv/managed/motd]: ensure absent -> file"
check "puppet.apply: the plan wrote nothing (Puppet's state, reports and cache included)" unchanged pa.before pa.after
# The unit's description names the state (helper/src/transient.rs): systemd logs it.
check "puppet.apply: the plan's noop ran in a transient unit" \
    in_c 'journalctl -q --no-pager -o cat | grep -F "opsagent state pa (linux.puppet.apply)" | grep -q -- "--noop"'
run pa-apply apply "$APPLY"
check "puppet.apply: the apply succeeds" rc_is pa-apply 0
check "puppet.apply: the apply made the file" in_c 'grep -qx "managed by puppet" /srv/managed/motd'
run pa-again "apply --test" "$APPLY"
check "puppet.apply: after the apply, nothing would change" nothing_would_change pa-again

say "== linux.puppet.apply: the managed file edited by hand"
in_c 'echo "edited by hand" > /srv/managed/motd'
walk pa-edit.before
run pa-edit-plan "apply --test" "$APPLY"
walk pa-edit.after
check "puppet.apply (edited): the plan exits 3" rc_is pa-edit-plan 3
check "puppet.apply (edited): the plan reports the content change" out_has pa-edit-plan "File[/srv/managed/motd]: content {sha256}"
check "puppet.apply (edited): the plan wrote nothing" unchanged pa-edit.before pa-edit.after
check "puppet.apply (edited): the file is still as edited" in_c 'grep -qx "edited by hand" /srv/managed/motd'

# ---------------------------------------------------------------- linux.puppet.run
say "== linux.puppet.run apply MANIFEST: the file removed by hand"
in_c 'rm -f /srv/managed/motd'
walk pr.before
run pr-plan "apply --test" "$RUN"
walk pr.after
check "puppet.run: the plan exits 3" rc_is pr-plan 3
check "puppet.run: the plan reports \"File[/srv/managed/motd]: ensure absent -> file\"" \
    out_has pr-plan "File[/srv/managed/motd]: ensure absent -> file"
check "puppet.run: the plan wrote nothing" unchanged pr.before pr.after
run pr-apply apply "$RUN"
check "puppet.run: the apply succeeds and makes the file" \
    sh -c "grep -q '^ok ' '$WORK/pr-apply.out' && grep -qx 'managed by puppet' '$ROOT/srv/managed/motd'"
run pr-again "apply --test" "$RUN"
check "puppet.run: after the apply, nothing would change" nothing_would_change pr-again

# ---------------------------------------------------------------- escape
say "== a resource Puppet applies even under --noop (noop => false)"
ESCAPE=$(st pe linux.puppet.apply '{"manifests": ["/srv/puppet/escape.pp"]}')
walk pe.before
run pe-plan "apply --test" "$ESCAPE"
walk pe.after
check "escape: the plan fails (exit 1): the write hit the read-only host" rc_is pe-plan 1
check "escape: /srv/escaped was not written" in_c '! test -e /srv/escaped'
check "escape: nothing else was written" unchanged pe.before pe.after

summary
