#!/bin/sh
# Runs in the VM's second boot, under systemd as PID 1 on the unified cgroup hierarchy
# (started by systemd.run= from the image's units-entry; tests/vm/run.sh). The helper is
# installed as its units (opsagent-helper.socket/.service, socket-activated), the reference
# backend and the daemon run by hand on loopback, and one recipe's linux.cmd runs
# `sysctl -w` and burns some CPU in a transient unit. Shown (#17): the StateLog's comment
# carries the unit's CPU time and peak memory, the sysctl took effect, the helper has no
# CAP_SYS_ADMIN, no opsagent-state-* unit is left. Ends with a PASS/FAIL marker.
exec >/dev/ttyS0 2>&1
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# The power cut's boots (tests/vm/run.sh, part powercut) come through the same entry.
case " $(cat /proc/cmdline) " in *" opsagent.powercut="*) exec /payload/guest-powercut.sh ;; esac
say() { echo "OPSAGENT-VMTEST-UNITS: $*"; }
fail() {
    say "FAIL ($*)"
    journalctl --no-pager -n 40 -u opsagent-helper.service 2>/dev/null | tail -n 40
    [ -f /tmp/opsagent.log ] && tail -n 20 /tmp/opsagent.log
    exit 1
}
say "start on $(uname -r), systemd $(systemctl --version | sed -n '1s/^systemd \([0-9]*\).*/\1/p'), PID 1 $(cat /proc/1/comm)"
[ -e /sys/fs/cgroup/cgroup.controllers ] || fail "not the unified cgroup hierarchy"
# systemd.run='s unit may start before the system bus; the helper starts units over it.
systemctl start dbus.socket dbus.service || fail "cannot start D-Bus"
B=/opt/visualops/current/bin
mkdir -p "$B"
cp /payload/bin/opsagent /payload/bin/opsagent-helper /payload/bin/opsagent-backend "$B/"
cp /payload/units/opsagent.sysusers /usr/lib/sysusers.d/opsagent.conf
systemd-sysusers || fail "systemd-sysusers"
cp /payload/units/opsagent-helper.service /payload/units/opsagent-helper.socket /etc/systemd/system/
systemctl daemon-reload
systemctl start opsagent-helper.socket || fail "cannot start opsagent-helper.socket"

mkdir -p /tmp/vm/recipes
before=$(sysctl -n vm.swappiness)
want=$((before == 13 ? 14 : 13))
# The loop burns CPU the figures must show (a few seconds under emulation).
cat >/tmp/vm/recipes/app-vm.json <<JSON
{"recipe_version": 1, "state": [
  {"id": "vm-sysctl", "module": "linux.cmd",
   "parameter": {"cmd": "sysctl -w vm.swappiness=$want && x=\$(head -c 33554432 /dev/zero | tr '\\\\0' a) && echo held \${#x} bytes && i=0 && while [ \$i -lt 30000 ]; do i=\$((i+1)); done && echo burnt"}}
]}
JSON
"$B/opsagent-backend" --listen 127.0.0.1:0 --recipe-dir /tmp/vm/recipes --statelog /tmp/vm/statelog.jsonl \
    >/tmp/vm/backend.out 2>/tmp/vm/backend.log &
i=0
while [ ! -s /tmp/vm/backend.out ] && [ $i -lt 100 ]; do sleep 0.2; i=$((i + 1)); done
port=$(sed -n '1s/.*:\([0-9]*\)$/\1/p' /tmp/vm/backend.out)
[ -n "$port" ] || fail "the backend did not start: $(cat /tmp/vm/backend.log)"
: >/tmp/vm/empty.conf
"$B/opsagent" run --config /tmp/vm/empty.conf --ws-uri "ws://127.0.0.1:$port/" --app-id app-vm --instance-id i-vm \
    --token-file /tmp/vm/token --state-dir /tmp/vm/state --helper-socket /run/opsagent-helper/helper.sock \
    --round-delay 600 >/dev/null 2>/tmp/opsagent.log &
i=0
while ! grep -q '"vm-sysctl"' /tmp/vm/statelog.jsonl 2>/dev/null && [ $i -lt 300 ]; do sleep 1; i=$((i + 1)); done
line=$(grep '"vm-sysctl"' /tmp/vm/statelog.jsonl | head -n 1)
[ -n "$line" ] || fail "no StateLog within 300 s"
say "StateLog: $line"
echo "$line" | grep -q '"state_result":true' || fail "the state failed"
echo "$line" | grep -Eq 'commands used cpu [0-9.]+ s' || fail "no CPU time in the comment"
say "figures: $(echo "$line" | grep -Eo 'commands used cpu [0-9.]+ s(, peak memory [0-9.]+ MiB)?')"
# Peak memory: the unit's MemoryPeak from systemd 255 on; this image's systemd (Debian 12's
# 252) has none and removes the group when the command exits, so the helper reads the
# group's memory.peak while the command runs. The command held 32 MiB in a shell variable.
peak=$(echo "$line" | grep -Eo 'peak memory [0-9.]+ MiB' | grep -Eo '[0-9.]+')
[ -n "$peak" ] || fail "no peak memory in the comment"
awk -v p="$peak" 'BEGIN { exit !(p >= 32) }' || fail "peak memory $peak MiB, but the command held 32 MiB"
say "peak memory $peak MiB for a command that held 32 MiB"
[ "$(sysctl -n vm.swappiness)" = "$want" ] || fail "vm.swappiness is $(sysctl -n vm.swappiness), not $want"
say "sysctl -w vm.swappiness=$want took effect (was $before)"
hpid=$(systemctl show -p MainPID --value opsagent-helper.service)
[ "${hpid:-0}" != 0 ] || fail "the helper unit is not running"
caps=$(sed -n 's/^CapBnd:[[:space:]]*//p' "/proc/$hpid/status")
[ $(((0x$caps >> 21) & 1)) = 0 ] || fail "the helper holds CAP_SYS_ADMIN (CapBnd $caps)"
say "helper (opsagent-helper.service, pid $hpid) CapBnd $caps: no CAP_SYS_ADMIN"
left=$(systemctl list-units --all --no-legend 'opsagent-state-*' | wc -l)
[ "$left" = 0 ] || fail "$left opsagent-state-* unit(s) left: $(systemctl list-units --all --no-legend 'opsagent-state-*')"
journalctl --no-pager -o cat -u 'opsagent-state-*' | grep -q burnt || fail "the command's output is not in the unit's journal"
say "the command's output is in journalctl -u opsagent-state-*; no unit left"
say "PASS"
