#!/usr/bin/env bash
# The storage tests (helper/tests/storage.rs) in a Debian 12 VM booted with Debian's own
# kernel, whose device-mapper and md drivers let linux.lvm.lv and linux.raid create a
# logical volume and a RAID1 array for real (the CI kernel has neither, so there the
# tests only see the refusals). Needs root; uses KVM when /dev/kvm is there and boots the
# guest, else emulates it (TCG).
#
# The guest: a cached debootstrap root (kernel, lvm2, mdadm, ...) as a raw ext4 image
# (mkfs.ext4 -d, no partition table: root=/dev/vda), booted with its kernel and initrd,
# init= a small script of the image that mounts a second disk (the payload: this run's
# test binary and tests/vm/guest.sh) and runs it. The root is opened with -snapshot, so
# the cached image is never written. The guest prints a PASS/FAIL marker on its serial
# console and powers off; this script reads the console log.
#
# Exit 0 only when the guest reported PASS and the LV and RAID creations ran (not skipped),
# and so did the plan's drift cycles of linux.lvm.lv and linux.raid (created; assembled).
#   OPSAGENT_VMTEST_CACHE    cache directory (default /var/cache/opsagent-vmtest)
#   OPSAGENT_VMTEST_TIMEOUT  seconds the VM may run (default 300)
#   OPSAGENT_VMTEST_MIRROR   Debian mirror (default http://deb.debian.org/debian)
#   OPSAGENT_VMTEST_ACCEL    kvm, tcg or auto (default: KVM, falling back to emulation
#                            where the guest does not start under this host's KVM: qemu
#                            ends before the guest's start marker, or it does not show
#                            within OPSAGENT_VMTEST_KVM_BOOT seconds, default 45)
#   OPSAGENT_VMTEST_QEMU     the qemu-system-x86_64 to run (tests/vm/fallback.sh uses a
#                            stand-in to force the fallback)
#   OPSAGENT_VMTEST_PARTS    which boots, default "storage selinux units": the storage tests,
#                            a boot with SELinux on, permissive (tests/vm/guest-selinux.sh:
#                            linux.selinux's plan cycles, helper/tests/selinux.rs), then a
#                            boot under systemd as PID 1 (tests/vm/guest-units.sh: the
#                            helper's installed units, a transient unit's CPU time and peak
#                            memory in the StateLog, a real `sysctl -w`); add "powercut" for
#                            the power cut (tests/vm/guest-powercut.sh: the daemon as its unit
#                            on a persistent state disk, qemu killed mid-round, a second boot
#                            on the same disk; the host's check is tests/vm/powercut_check.py,
#                            which prints the README's Faults table row)
#   OPSAGENT_VMTEST_CUT_AFTER  StateLogs the backend must have before the cut (default 250)
#
# Exit 3 (and "vm test: cannot run: ...") when no VM can run here at all (not root, qemu or
# debootstrap not installable, the image cannot be built): tests/faults/table.sh then shows
# the power cut's row as not run instead of failing the suite.
set -euo pipefail
cd "$(dirname "$0")/../.."

CACHE_DIR=${OPSAGENT_VMTEST_CACHE:-/var/cache/opsagent-vmtest}
# Bump when the package list or the image's init changes: a new image is built.
IMAGE_VERSION=bookworm-v3
IMAGE_DIR=$CACHE_DIR/$IMAGE_VERSION
# systemd and dbus: the second boot (tests/vm/guest-units.sh) runs systemd as PID 1 on the
# unified cgroup hierarchy; procps: sysctl. selinux-basics and selinux-policy-default
# (Debian's reference policy, its userland: getenforce, getsebool, setsebool, load_policy):
# the selinux boot (tests/vm/guest-selinux.sh); the other boots do not turn SELinux on.
INCLUDE=linux-image-amd64,initramfs-tools,lvm2,mdadm,e2fsprogs,xfsprogs,util-linux,udev,kmod,systemd,dbus,procps,selinux-basics,selinux-policy-default
MIRROR=${OPSAGENT_VMTEST_MIRROR:-http://deb.debian.org/debian}
TIMEOUT=${OPSAGENT_VMTEST_TIMEOUT:-300}
KVM_BOOT=${OPSAGENT_VMTEST_KVM_BOOT:-45}

say() { printf '%s\n' "$*" >&2; }
die() {
    say "vm test: $*"
    exit 1
}
cannot() {
    say "vm test: cannot run: $*"
    exit 3
}

[ "$(id -u)" = 0 ] || cannot "needs root (debootstrap, mkfs.ext4 -d of a root-owned tree)"
need=()
QEMU=${OPSAGENT_VMTEST_QEMU:-qemu-system-x86_64}
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
if [ "${#need[@]}" -gt 0 ]; then
    say "installing ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null ||
        cannot "cannot install ${need[*]}"
fi

WORK=$(mktemp -d /tmp/opsagent-vmtest.XXXXXX)
QEMU_PID=
cleanup() {
    if [ -n "$QEMU_PID" ] && kill -0 "$QEMU_PID" 2>/dev/null; then
        kill "$QEMU_PID" 2>/dev/null || true
        wait "$QEMU_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

# ---------------------------------------------------------------- cached image
# The image's init: everything else comes from the payload disk, so that changing the
# tests or guest.sh does not rebuild the image.
write_init() {
    cat >"$1" <<'INIT'
#!/bin/sh
# opsagent VM test: runs /payload/guest.sh from the second disk, then powers off.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /payload
if mount -o ro /dev/vdb /payload && [ -x /payload/guest.sh ]; then
    /payload/guest.sh
else
    echo "OPSAGENT-VMTEST: FAIL (no payload disk with guest.sh on /dev/vdb)"
fi
sync
echo o >/proc/sysrq-trigger
sleep 30
INIT
    chmod 755 "$1"
    # The second boot's entry, started by systemd (systemd.run= on the kernel command line).
    cat >"$(dirname "$1")/units-entry" <<'ENTRY'
#!/bin/sh
mkdir -p /payload
if mount -o ro /dev/vdb /payload && [ -x /payload/guest-units.sh ]; then
    exec /payload/guest-units.sh
fi
echo "OPSAGENT-VMTEST-UNITS: FAIL (no payload disk with guest-units.sh on /dev/vdb)" >/dev/ttyS0
ENTRY
    chmod 755 "$(dirname "$1")/units-entry"
}

ensure_image() {
    mkdir -p "$CACHE_DIR"
    exec 8>"$CACHE_DIR/.lock"
    flock -w 1200 8 || die "cannot lock $CACHE_DIR/.lock"
    if [ -f "$IMAGE_DIR/complete" ]; then
        say "cached VM image: $IMAGE_DIR"
        flock -u 8
        return 0
    fi
    local tmp=$IMAGE_DIR.tmp root
    root=$tmp/root
    rm -rf "$tmp"
    mkdir -p "$tmp"
    say "building the VM image in $IMAGE_DIR (debootstrap with Debian's kernel, a few minutes)"
    debootstrap --variant=minbase --include="$INCLUDE" bookworm "$root" "$MIRROR" >"$tmp/debootstrap.log" 2>&1 || {
        tail -n 20 "$tmp/debootstrap.log" >&2
        cannot "debootstrap failed; see $tmp/debootstrap.log"
    }
    local kernel initrd
    kernel=$(find "$root/boot" -maxdepth 1 -name 'vmlinuz-*' | sort -V | tail -n 1)
    initrd=$root/boot/initrd.img-${kernel##*/vmlinuz-}
    if [ -z "$kernel" ] || [ ! -f "$initrd" ]; then
        die "no kernel/initrd in $root/boot: $(ls "$root/boot")"
    fi
    cp "$kernel" "$tmp/vmlinuz"
    cp "$initrd" "$tmp/initrd.img"
    mkdir -p "$root/opsagent-vmtest"
    write_init "$root/opsagent-vmtest/init"
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    # Size: the tree plus room for the tests' sparse files and LVM/md metadata.
    local mib
    mib=$(($(du -sm "$root" | cut -f1) + 768))
    mkfs.ext4 -q -F -L opsvmroot -d "$root" "$tmp/root.img" "${mib}M" || die "mkfs.ext4 -d failed"
    rm -rf "$root"
    echo "${kernel##*/}" >"$tmp/complete"
    rm -rf "$IMAGE_DIR"
    mv "$tmp" "$IMAGE_DIR"
    flock -u 8
    say "VM image ready: $IMAGE_DIR ($(cat "$IMAGE_DIR/complete"))"
}

# ---------------------------------------------------------------- this run
build_tests() { # NAME: builds the helper's test binary NAME (helper/tests/NAME.rs), prints its path
    say "building the $1 test binary"
    cargo test -p opsagent-helper --test "$1" --no-run --locked --message-format=json >"$WORK/cargo.json" ||
        die "cargo test --no-run failed"
    python3 - "$WORK/cargo.json" "$1" <<'PY'
import json, sys
exe = None
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == sys.argv[2] and m.get("executable"):
        exe = m["executable"]
if not exe:
    sys.exit(f"no {sys.argv[2]} test executable in cargo's output")
print(exe)
PY
}

PARTS=${OPSAGENT_VMTEST_PARTS:-storage selinux units}
part() { case " $PARTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

ensure_image
mkdir -p "$WORK/payload"
if part storage; then
    exe=$(build_tests storage) || die "cannot find the storage test binary"
    # Without debug information, like the binaries below: the payload disk stays small.
    strip --strip-debug -o "$WORK/payload/storage" "$exe" || die "cannot copy the storage test binary"
    cp tests/vm/guest.sh "$WORK/payload/guest.sh"
    chmod 755 "$WORK/payload/guest.sh" "$WORK/payload/storage"
fi
if part selinux; then
    exe=$(build_tests selinux) || die "cannot find the selinux test binary"
    strip --strip-debug -o "$WORK/payload/selinux" "$exe" || die "cannot copy the selinux test binary"
    # guest.sh hands the selinux boot over to guest-selinux.sh.
    cp tests/vm/guest.sh tests/vm/guest-selinux.sh "$WORK/payload/"
    chmod 755 "$WORK/payload/guest.sh" "$WORK/payload/guest-selinux.sh" "$WORK/payload/selinux"
fi
if part units || part powercut; then
    say "building the daemon, the helper and the reference backend"
    cargo build --locked -p opsagent -p opsagent-helper --bins >&2 || die "cargo build failed"
    mkdir -p "$WORK/payload/bin" "$WORK/payload/units"
    for b in opsagent opsagent-helper opsagent-backend; do
        # Without debug information: the payload disk stays small.
        strip --strip-debug -o "$WORK/payload/bin/$b" "target/debug/$b" || die "cannot copy $b"
    done
    cp units/opsagent-helper.service units/opsagent-helper.socket units/opsagent.service units/opsagent.sysusers \
        "$WORK/payload/units/"
    # guest-units.sh hands a power-cut boot over to guest-powercut.sh.
    cp tests/vm/guest-units.sh tests/vm/guest-powercut.sh "$WORK/payload/"
    chmod 755 "$WORK/payload/guest-units.sh" "$WORK/payload/guest-powercut.sh"
fi
# Its files plus a quarter and 32 MiB for ext4's own blocks (journal, inode tables), no
# blocks reserved for root: a fixed 16 MiB stopped being enough once the binaries grew
# ("Could not allocate block … while populating file system").
payload_mb=$(du -sm "$WORK/payload" | cut -f1)
mkfs.ext4 -q -F -m 0 -L opspayload -d "$WORK/payload" "$WORK/payload.img" "$((payload_mb + payload_mb / 4 + 32))M" ||
    die "cannot make the payload disk"

console=$WORK/console.log
# boot ACCEL [INIT-ARGS]: starts qemu in the background (QEMU_PID), console in $console;
# INIT-ARGS default to the image's storage-test init. EXTRA_DRIVES: more -drive options
# (the power cut's state disk, written for real: snapshot=off).
EXTRA_DRIVES=()
boot() {
    local init=${2:-init=/opsagent-vmtest/init}
    local how=(-enable-kvm -cpu host)
    if [ "$1" = tcg ]; then how=(-accel "tcg,thread=multi" -cpu max); fi
    : >"$console"
    "$QEMU" "${how[@]}" -smp 2 -m 1024 -display none -monitor none -no-reboot \
        -serial "file:$console" -snapshot \
        -kernel "$IMAGE_DIR/vmlinuz" -initrd "$IMAGE_DIR/initrd.img" \
        -append "console=ttyS0 root=/dev/vda rw rootfstype=ext4 $init panic=-1 quiet loglevel=3" \
        -drive "file=$IMAGE_DIR/root.img,format=raw,if=virtio" \
        -drive "file=$WORK/payload.img,format=raw,if=virtio,readonly=on" \
        "${EXTRA_DRIVES[@]}" </dev/null >"$WORK/qemu.log" 2>&1 &
    QEMU_PID=$!
}
# wait_vm SECONDS [MARKER]: waits until MARKER shows on the console (0), qemu exits
# (0 without a MARKER, 2 with one: it ended before the marker), or SECONDS pass (1,
# qemu killed).
wait_vm() {
    local limit=$1 marker=${2:-} t0
    t0=$(date +%s)
    while kill -0 "$QEMU_PID" 2>/dev/null; do
        [ -n "$marker" ] && grep -aq "$marker" "$console" && return 0
        if [ $(($(date +%s) - t0)) -ge "$limit" ]; then
            kill "$QEMU_PID" 2>/dev/null || true
            wait "$QEMU_PID" 2>/dev/null || true
            QEMU_PID=
            return 1
        fi
        sleep 1
    done
    wait "$QEMU_PID" 2>/dev/null || true
    QEMU_PID=
    # It may have printed the marker and powered off between two looks.
    [ -z "$marker" ] && return 0
    grep -aq "$marker" "$console" && return 0
    return 2
}

# Some hosts expose a /dev/kvm on which the guest cannot run: Debian's kernel hangs right
# after its decompressor (nested KVM under a Firecracker-style VM), or qemu aborts at once
# ("failed to set MSR 0x10a", "kvm_buf_set_msrs: Assertion ... failed"). Either way the
# guest is emulated (TCG), which is slower but runs the same kernel. What was found is
# remembered per host kernel and qemu version, so later runs go straight to TCG.
accel=${OPSAGENT_VMTEST_ACCEL:-auto}
case $accel in auto | kvm | tcg) ;; *) die "OPSAGENT_VMTEST_ACCEL must be auto, kvm or tcg, not '$accel'" ;; esac
if [ "$accel" = auto ] && [ ! -e /dev/kvm ]; then
    say "######## /dev/kvm is absent: emulating the guest (TCG)"
    accel=tcg
fi
verdict=$CACHE_DIR/kvm-fails-$(uname -r)-$("$QEMU" --version | sed -n '1s/[^0-9.]*\([0-9.]*\).*/\1/p')
if [ "$accel" = auto ] && [ -f "$verdict" ]; then
    say "######## KVM is known to fail for this guest on this host ($verdict: $(head -c 200 "$verdict")): emulating the guest (TCG)"
    accel=tcg
fi
# vm_boot WHAT MARKER SHOW TXT [INIT-ARGS]: one boot of the guest (WHAT names it in the
# messages; INIT-ARGS as boot's). Its console goes to $WORK/TXT without the firmware's and
# kernel's escape sequences, and the lines the sed script SHOW selects from it to stderr;
# a boot that ran out of time fails the run.
# The accelerator: TCG when $accel says so. Else KVM, and the first boot of the run under
# KVM must show MARKER (the guest's start line) within KVM_BOOT seconds. Where it does not
# (qemu ended before it, or the guest hangs), OPSAGENT_VMTEST_ACCEL=kvm fails the run, and
# auto emulates this boot and the later ones (TCG) and remembers that in $verdict. Once a
# boot has started under KVM, the later ones use KVM without the check, whatever part
# came first.
KVM_CHECKED=no
vm_boot() {
    local what=$1 marker=$2 show=$3 txt=$WORK/$4 init=${5:-} start rc why timed_out=no
    start=$(date +%s)
    if [ "$accel" = auto ] || [ "$accel" = kvm ]; then
        say "booting the VM: $what (KVM, $(cat "$IMAGE_DIR/complete"), timeout ${TIMEOUT}s)"
        boot kvm "$init"
        rc=0
        if [ "$KVM_CHECKED" = no ]; then
            wait_vm "$KVM_BOOT" "$marker" || rc=$?
        fi
        if [ "$rc" != 0 ]; then
            if [ "$rc" = 1 ]; then
                why="the guest did not start its tests within ${KVM_BOOT}s under KVM"
            else
                why="qemu ended before the guest started its tests under KVM: $(tail -n 3 "$WORK/qemu.log" | tr '\n' ' ')"
            fi
            if [ "$accel" = kvm ]; then
                tail -n 20 "$console" >&2
                cat "$WORK/qemu.log" >&2
                die "$why (OPSAGENT_VMTEST_ACCEL=kvm: no fallback)"
            fi
            say "######## $why"
            say "######## emulating the guest instead (TCG), and remembering that in $verdict"
            printf '%s\n' "$why" >"$verdict"
            accel=tcg
        else
            KVM_CHECKED=yes
            wait_vm $((TIMEOUT - ($(date +%s) - start))) || timed_out=yes
        fi
    fi
    if [ "$accel" = tcg ]; then
        say "booting the VM: $what (emulated: TCG, $(cat "$IMAGE_DIR/complete"), timeout ${TIMEOUT}s)"
        start=$(date +%s)
        boot tcg "$init"
        wait_vm "$TIMEOUT" || timed_out=yes
    fi
    say "VM ran $(($(date +%s) - start))s"
    tr -d '\r' <"$console" | sed 's/\x1b\[[0-9;?]*[a-zA-Z]//g' >"$txt" || true
    sed -n "$show" "$txt" >&2
    [ "$timed_out" = no ] || {
        tail -n 40 "$txt" >&2
        die "the $what boot timed out after ${TIMEOUT}s; qemu killed"
    }
}

if part storage; then
    vm_boot storage '^OPSAGENT-VMTEST: start' "/^OPSAGENT-VMTEST: start/,\$p" console.txt
    [ -s "$WORK/qemu.log" ] && cat "$WORK/qemu.log" >&2
    if ! grep -q '^OPSAGENT-VMTEST: start' "$WORK/console.txt"; then
        tail -n 40 "$WORK/console.txt" >&2
        die "the guest never started the tests"
    fi
    grep -q '^OPSAGENT-VMTEST: PASS$' "$WORK/console.txt" || die "the guest did not report PASS"
    for what in linux.lvm.lv linux.raid; do
        grep -q "storage-vmtest: created $what /dev/" "$WORK/console.txt" || die "$what was not created in the guest (skipped?)"
    done
    # The plan's drift cycles (issue #19) of the modules only this kernel can create: the LV,
    # and the array both created and assembled (two cycles).
    grep -q 'storage-vmtest: plan cycle linux.lvm.lv: \["/dev/' "$WORK/console.txt" ||
        die "the linux.lvm.lv plan cycle did not run in the guest (skipped?)"
    [ "$(grep -c 'storage-vmtest: plan cycle linux.raid: \["/dev/md' "$WORK/console.txt")" = 2 ] ||
        die "the two linux.raid plan cycles (created, assembled) did not both run in the guest (skipped?)"
    if grep -q 'SKIPPED' "$WORK/console.txt"; then
        die "a storage test was skipped in the guest"
    fi
    say "vm test: PASS (logical volume and RAID1 array created for real in the guest; plan -> apply -> plan cycles of linux.lvm.lv and linux.raid)"
fi

# ---------------------------------------------------------------- selinux boot
# linux.selinux's plan cycles (helper/tests/selinux.rs) under Debian's kernel with SELinux
# on, permissive: security=selinux selects it over AppArmor, Debian's default.
if part selinux; then
    vm_boot selinux '^OPSAGENT-VMTEST-SELINUX: start' "/^OPSAGENT-VMTEST-SELINUX: start/,\$p" console-selinux.txt \
        "init=/opsagent-vmtest/init security=selinux selinux=1 enforcing=0 opsagent.part=selinux"
    grep -aq '^OPSAGENT-VMTEST-SELINUX: PASS$' "$WORK/console-selinux.txt" || {
        tail -n 60 "$WORK/console-selinux.txt" >&2
        die "the selinux boot did not report PASS"
    }
    # Both cycles ran (a filter matching no test would pass with nothing run).
    [ "$(grep -ac 'selinux-vmtest: plan cycle linux.selinux: ' "$WORK/console-selinux.txt")" = 2 ] ||
        die "the two linux.selinux plan cycles (a boolean, the persisted mode) did not both run"
    say "vm test: PASS (SELinux permissive: plan -> apply -> plan cycles of a boolean and of SELINUX= in /etc/selinux/config)"
fi

# ---------------------------------------------------------------- second boot: systemd
SYSTEMD_INIT="init=/lib/systemd/systemd systemd.unified_cgroup_hierarchy=1 systemd.run=/opsagent-vmtest/units-entry systemd.run_success_action=poweroff systemd.run_failure_action=poweroff"
if part units; then
    vm_boot systemd '^OPSAGENT-VMTEST-UNITS: start' '/^OPSAGENT-VMTEST-UNITS: /p' console-units.txt "$SYSTEMD_INIT"
    grep -aq '^OPSAGENT-VMTEST-UNITS: PASS$' "$WORK/console-units.txt" || {
        tail -n 60 "$WORK/console-units.txt" >&2
        die "the systemd boot did not report PASS"
    }
    say "vm test: PASS (under systemd: a transient unit's CPU time in the StateLog, sysctl -w applied, no CAP_SYS_ADMIN in the helper)"
fi

# ---------------------------------------------------------------- power cut
if part powercut; then
    CUT_AFTER=${OPSAGENT_VMTEST_CUT_AFTER:-250}
    PC=$WORK/powercut
    mkdir -p "$PC"
    # The state disk: a raw ext4 image written for real (no -snapshot), so that what the
    # second boot finds is exactly what the first one got onto the virtual disk.
    EXTRA_DRIVES=(-drive "file=$PC/state.img,format=raw,if=virtio,snapshot=off")
    new_state_disk() { mkfs.ext4 -q -F -L opsstate "$PC/state.img" 128M || die "cannot make the state disk"; }
    if [ "$accel" = auto ]; then
        if [ -e /dev/kvm ]; then accel=kvm_try; else accel=tcg; fi
    fi
    pc_start=$(date +%s)
    while :; do
        pc_accel=$accel
        [ "$pc_accel" = kvm_try ] && pc_accel=kvm
        new_state_disk
        say "power cut, boot 1 ($pc_accel, cut after $CUT_AFTER StateLogs)"
        boot "$pc_accel" "$SYSTEMD_INIT opsagent.powercut=1 opsagent.cut_after=$CUT_AFTER"
        if [ "$accel" = kvm_try ]; then
            rc=0
            wait_vm "$KVM_BOOT" '^OPSAGENT-VMTEST-POWERCUT: boot 1 start' || rc=$?
            if [ "$rc" != 0 ]; then
                why="the power cut's first boot did not start within ${KVM_BOOT}s under KVM (rc $rc): $(tail -n 3 "$WORK/qemu.log" | tr '\n' ' ')"
                say "######## $why; emulating the guest instead (TCG), and remembering that in $verdict"
                printf '%s\n' "$why" >"$verdict"
                accel=tcg
                continue
            fi
            accel=kvm
        fi
        break
    done
    # The cut: SIGKILL as soon as the guest says so (it polls for the CUT marker itself).
    t0=$(date +%s)
    cut=no
    while kill -0 "$QEMU_PID" 2>/dev/null; do
        if grep -aq '^OPSAGENT-VMTEST-POWERCUT: CUT ' "$console"; then
            kill -KILL "$QEMU_PID"
            cut=yes
            break
        fi
        grep -aq '^OPSAGENT-VMTEST-POWERCUT: FAIL' "$console" && break
        [ $(($(date +%s) - t0)) -lt $((2 * TIMEOUT)) ] || break
        sleep 0.1
    done
    kill -KILL "$QEMU_PID" 2>/dev/null || true
    wait "$QEMU_PID" 2>/dev/null || true
    QEMU_PID=
    tr -d '\r' <"$console" | sed 's/\x1b\[[0-9;?]*[a-zA-Z]//g' >"$PC/console1.txt" || true
    grep -a '^OPSAGENT-VMTEST-POWERCUT: ' "$PC/console1.txt" >&2 || true
    [ "$cut" = yes ] || {
        tail -n 60 "$PC/console1.txt" >&2
        die "the power cut's first boot never reached the cut (limit $((2 * TIMEOUT))s)"
    }
    say "power cut: qemu killed $(($(date +%s) - pc_start))s after the first boot started"

    say "power cut, boot 2 (same state disk, $accel)"
    boot "$accel" "$SYSTEMD_INIT opsagent.powercut=2"
    timed_out=no
    # Each boot may take twice the others' limit: a round and more under emulation.
    wait_vm $((2 * TIMEOUT)) || timed_out=yes
    tr -d '\r' <"$console" | sed 's/\x1b\[[0-9;?]*[a-zA-Z]//g' >"$PC/console2.txt" || true
    grep -a '^OPSAGENT-VMTEST-POWERCUT: ' "$PC/console2.txt" >&2 || true
    [ "$timed_out" = no ] || {
        tail -n 40 "$PC/console2.txt" >&2
        die "the power cut's second boot timed out after $((2 * TIMEOUT))s; qemu killed"
    }
    grep -aq '^OPSAGENT-VMTEST-POWERCUT: BOOT2 DONE$' "$PC/console2.txt" || {
        tail -n 60 "$PC/console2.txt" >&2
        die "the power cut's second boot did not finish"
    }
    say "power cut: both boots took $(($(date +%s) - pc_start))s"
    # The files, read off the (cleanly unmounted) image without mounting it.
    mkdir -p "$PC/at-cut"
    for f in at-cut/spool.log at-cut/seq.reserved at-cut/statelog.jsonl backend/statelog.jsonl backend/events-boot2.jsonl; do
        debugfs -R "dump -p /$f $PC/${f#backend/}" "$PC/state.img" 2>/dev/null
        [ -s "$PC/${f#backend/}" ] || die "cannot read /$f off the state disk"
    done
    python3 tests/vm/powercut_check.py "$PC" "$accel" || die "the power cut lost or doubled something (see above)"
    say "vm test: PASS (power cut: nothing acknowledged lost, nothing doubled, the next round completed)"
fi
