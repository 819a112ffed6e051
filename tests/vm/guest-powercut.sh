#!/bin/sh
# The power cut (#22 item 6), in the VM under systemd as PID 1 (tests/vm/run.sh, part
# `powercut`; started by guest-units.sh when the kernel command line says
# opsagent.powercut=1 or 2). A persistent state disk (/dev/vdc, not -snapshot) is mounted
# at /var/lib/visualops: the daemon's state directory and token, and the reference
# backend's recipes, statelog, events and pins, are on it.
#
# Boot 1: the helper's units, the daemon as opsagent.service and the backend run rounds of
# a 52-state recipe (50 linux.file states, a meta.wait the backend releases once f0 is
# reported, and a meta.comment), round delay 1 s. The
# page cache keeps unwritten data for an hour (nothing reaches the disk unless synced).
# Once the backend has opsagent.cut_after= StateLogs and a round is applying, a canary is
# written without fsync and the marker CUT is printed: the host kills qemu (SIGKILL), and
# everything not synced is lost.
# Boot 2 (same state disk): the canary must be gone or empty (else the cut proved
# nothing), the token and the persisted recipe with its wait marks must be there; the
# files as the cut left them are copied to at-cut/ for the host's check; the backend and
# the daemon are started again and must complete a round and deliver their spool.
exec >/dev/ttyS0 2>&1
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
say() { echo "OPSAGENT-VMTEST-POWERCUT: $*"; }
fail() {
    say "FAIL ($*)"
    journalctl --no-pager -o cat -n 30 -u opsagent.service 2>/dev/null
    journalctl --no-pager -o cat -n 10 -u opsagent-helper.service 2>/dev/null
    [ -f /tmp/pc-backend.log ] && tail -n 10 /tmp/pc-backend.log
    exit 1
}
arg() { sed -n "s/.*opsagent\.$1=\([0-9]*\).*/\1/p" /proc/cmdline; }
uptime_s() { cut -d' ' -f1 /proc/uptime; }
phase=$(arg powercut)
say "boot $phase start on $(uname -r), systemd $(systemctl --version | sed -n '1s/^systemd \([0-9]*\).*/\1/p')"

V=/var/lib/visualops
S=$V/opsagent
BK=$V/backend
STATUS=/run/opsagent/status.json
# Dirty pages stay in memory for an hour and no flusher thread writes them: only what a
# program syncs reaches the disk before the cut.
sysctl -q -w vm.dirty_expire_centisecs=360000 vm.dirty_writeback_centisecs=0 || fail "sysctl"
mkdir -p "$V"
mount -t ext4 /dev/vdc "$V" || fail "cannot mount the state disk /dev/vdc"

systemctl start dbus.socket dbus.service || fail "cannot start D-Bus"
B=/opt/visualops/current/bin
mkdir -p "$B"
cp /payload/bin/opsagent /payload/bin/opsagent-helper /payload/bin/opsagent-backend "$B/"
cp /payload/units/opsagent.sysusers /usr/lib/sysusers.d/opsagent.conf
systemd-sysusers || fail "systemd-sysusers"
cp /payload/units/opsagent-helper.service /payload/units/opsagent-helper.socket /payload/units/opsagent.service \
    /etc/systemd/system/
cat >/etc/opsagent.conf <<'CONF'
[userdata]
ws_uri = ws://127.0.0.1:7780/
app_id = app-pc
instance_id = i-pc
[agent]
round_delay = 1
retry_delay = 1
CONF
chown root:opsagent /etc/opsagent.conf
chmod 0640 /etc/opsagent.conf
systemctl daemon-reload
systemctl start opsagent-helper.socket || fail "cannot start opsagent-helper.socket"
mkdir -p /srv/pc

start_backend() {
    "$B/opsagent-backend" --listen 127.0.0.1:7780 --recipe-dir "$BK/recipes" --statelog "$BK/statelog.jsonl" \
        --events "$BK/events-boot$phase.jsonl" --poll-ms 1000 >/tmp/pc-backend.out 2>/tmp/pc-backend.log &
    backend=$!
    i=0
    while [ ! -s /tmp/pc-backend.out ] && [ $i -lt 150 ]; do sleep 0.2; i=$((i + 1)); done
    [ -s /tmp/pc-backend.out ] || fail "the backend did not start"
}
start_agent() {
    systemctl start opsagent.service || fail "opsagent.service did not start"
}
# status.json is pretty-printed ("key": value).
field() { grep -o "\"$1\": *[0-9]*" "$STATUS" 2>/dev/null | head -n 1 | tr -dc 0-9; }
statelogs() { if [ -f "$BK/statelog.jsonl" ]; then wc -l <"$BK/statelog.jsonl"; else echo 0; fi; }

if [ "$phase" = 1 ]; then
    cut_after=$(arg cut_after)
    mkdir -p "$BK/recipes"
    {
        printf '{"recipe_version": 1, "state": [\n'
        i=0
        while [ $i -lt 50 ]; do
            printf '{"id": "f%d", "module": "linux.file", "parameter": {"path": "/srv/pc/f%d", "content": "power cut %d\\n"}},\n' $i $i $i
            # Released by the backend once f0 of this instance succeeded: a wait mark.
            [ $i = 24 ] && printf '{"id": "pc-wait", "module": "meta.wait", "parameter": {"state": ["@{i-pc.f0}"]}},\n'
            i=$((i + 1))
        done
        printf '{"id": "end", "module": "meta.comment", "parameter": {"comment": "end of the round"}}\n]}\n'
    } >"$BK/recipes/app-pc.json"
    # The recipe is the test's set-up, not something the cut is about.
    sync
    start_backend
    start_agent
    [ -s "$S/token" ] || fail "no token file"
    say "token sha256 $(sha256sum <"$S/token" | cut -d' ' -f1)"
    t0=$(uptime_s)
    last=0
    while :; do
        n=$(statelogs)
        # One read of the status: the phase and the state it names belong together.
        st=$(cat "$STATUS" 2>/dev/null)
        applying=$(printf '%s\n' "$st" | grep -q '"phase": *"applying"' &&
            printf '%s\n' "$st" | sed -n 's/.*"state_id": *"\([^"]*\)".*/\1/p' | head -n 1)
        if [ "$n" -ge "$cut_after" ] && [ -n "$applying" ]; then
            break
        fi
        if [ $((n / 50)) != $((last / 50)) ]; then say "statelogs $n"; fi
        last=$n
        systemctl -q is-active opsagent.service || fail "the daemon stopped"
        sleep 0.2
    done
    grep -q '"done":\[[^]]*"pc-wait"' "$S/recipe.json" || fail "no wait mark in the persisted recipe: $(tail -c 200 "$S/recipe.json")"
    round=$(printf '%s\n' "$st" | sed -n 's/.*"round": *\([0-9]*\).*/\1/p' | head -n 1)
    # Not synced: on the disk only if the page cache reached it, which it must not.
    echo "written just before the cut" >"$V/canary"
    say "CUT statelogs $n round $round applying $applying after $(awk -v a="$t0" -v b="$(uptime_s)" 'BEGIN { printf "%.0f", b - a }') s"
    # The host kills the VM now.
    sleep 600
    fail "not killed"
fi

# ---------------------------------------------------------------- boot 2
if [ -s "$V/canary" ]; then
    fail "the canary written without fsync survived the cut: the page cache reached the disk, the cut proved nothing"
fi
if [ -e "$V/canary" ]; then say "canary: empty (its data was lost)"; else say "canary: missing (lost)"; fi
mkdir -p "$V/at-cut"
for f in "$S/token" "$S/recipe.json" "$S/spool/spool.log" "$S/spool/seq.reserved" "$BK/statelog.jsonl"; do
    [ -f "$f" ] || fail "$f is missing after the cut"
    cp "$f" "$V/at-cut/"
done
sync
say "token sha256 $(sha256sum <"$S/token" | cut -d' ' -f1)"
grep -q '"done":\[[^]]*"pc-wait"' "$S/recipe.json" || fail "the wait mark is gone from the persisted recipe"
say "persisted recipe version $(grep -o '"version":[0-9]*' "$S/recipe.json" | head -n 1 | cut -d: -f2), wait marks $(grep -o '"done":\[[^]]*\]' "$S/recipe.json")"
say "at the cut: backend statelog $(statelogs) lines, spool.log $(stat -c %s "$S/spool/spool.log") bytes"
start_backend
t0=$(uptime_s)
start_agent
i=0
while [ "$(field rounds_completed)" = "" ] || [ "$(field rounds_completed)" = 0 ]; do
    [ $i -lt 1800 ] || fail "no round completed within 360 s of the restart"
    systemctl -q is-active opsagent.service || fail "the daemon stopped"
    sleep 0.2
    i=$((i + 1))
done
t1=$(uptime_s)
say "first round completed $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }') s after the daemon started, $(awk -v b="$t1" 'BEGIN { printf "%.1f", b }') s after boot"
i=0
while [ "$(field spool_depth)" != 0 ]; do
    [ $i -lt 600 ] || fail "the spool was not delivered within 120 s"
    sleep 0.2
    i=$((i + 1))
done
systemctl stop opsagent.service
kill "$backend"
wait "$backend"
# What the daemon said about its spool and recipe, with the entries' fields (OPSAGENT_*).
journalctl --no-pager -o verbose -u opsagent.service | awk '
    function flush() { if (msg ~ /spool|persisted recipe|token/) print "OPSAGENT-VMTEST-POWERCUT: daemon: " msg f; msg = ""; f = "" }
    /^[^ ]/ { flush(); next }
    /^    MESSAGE=/ { msg = substr($0, 13); next }
    /^    OPSAGENT_/ { f = f " " substr($0, 14); next }
    END { flush() }'
say "backend statelog $(statelogs) lines, $(grep -c statelog_repeated "$BK/events-boot2.jsonl") repeated StateLog(s) received"
sync
umount "$V" || fail "cannot unmount the state disk"
say "BOOT2 DONE"
