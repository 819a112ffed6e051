#!/usr/bin/env bash
# tests/vm/run.sh falls back from KVM to emulation (TCG) on every kind of KVM failure, and
# remembers it. Driven with a stand-in qemu-system-x86_64 (OPSAGENT_VMTEST_QEMU) that fails
# under KVM the way real hosts do and, under TCG, plays a guest that passes; the cached
# image is a fake in a temporary cache directory, so this takes seconds, not minutes. The
# real VM run (tests/vm/run.sh itself) follows in .ci/run.
#
#   1. qemu aborts at once under KVM (the MSR assertion seen on CI's machine kind):
#      fallback to TCG, verdict written, PASS;
#   2. the next run reads the verdict and never tries KVM;
#   3. the guest hangs under KVM (no start marker): fallback after OPSAGENT_VMTEST_KVM_BOOT;
#   4. OPSAGENT_VMTEST_ACCEL=kvm with the abort: a failure naming qemu's end, no fallback;
#   5. a guest that reports FAIL under TCG still fails the run (the stand-in can fail).
set -euo pipefail
cd "$(dirname "$0")/../.."

[ "$(id -u)" = 0 ] || {
    echo "vm fallback test: needs root (tests/vm/run.sh does)" >&2
    exit 1
}
T=$(mktemp -d /tmp/opsagent-vmfallback.XXXXXX)
trap 'rm -rf "$T"' EXIT
fail() {
    echo "vm fallback test: FAIL: $*" >&2
    exit 1
}

# The stand-in: logs how it was started, then behaves as $STANDIN_KVM says under KVM
# (abort | hang) and as $STANDIN_TCG says under TCG (pass | fail).
cat >"$T/qemu" <<'QEMU'
#!/usr/bin/env bash
if [ "${1:-}" = --version ]; then
    echo "QEMU emulator version 10.0.2 (stand-in)"
    exit 0
fi
serial=
kvm=no
prev=
for a in "$@"; do
    [ "$a" = -enable-kvm ] && kvm=yes
    [ "$prev" = -serial ] && serial=${a#file:}
    prev=$a
done
echo "kvm=$kvm" >>"$STANDIN_LOG"
if [ "$kvm" = yes ]; then
    case $STANDIN_KVM in
        abort)
            echo "qemu-system-x86_64: error: failed to set MSR 0x10a to 0x0" >&2
            echo "qemu-system-x86_64: ../target/i386/kvm/kvm.c:3123: kvm_buf_set_msrs: Assertion \`ret == cpu->kvm_msr_buf->nmsrs' failed." >&2
            kill -ABRT $$
            ;;
        hang) exec sleep 600 ;;
    esac
fi
{
    echo "OPSAGENT-VMTEST: start"
    if [ "$STANDIN_TCG" = pass ]; then
        echo "storage-vmtest: created linux.lvm.lv /dev/vg/lv"
        echo "storage-vmtest: created linux.raid /dev/md0"
        echo 'storage-vmtest: plan cycle linux.lvm.lv: ["/dev/vg/data: logical volume created"] planned, applied, then nothing to plan'
        echo 'storage-vmtest: plan cycle linux.raid: ["/dev/md1: raid1 array created on /dev/a, /dev/b"] planned, applied, then nothing to plan'
        echo 'storage-vmtest: plan cycle linux.raid: ["/dev/md1: array assembled from /dev/a, /dev/b"] planned, applied, then nothing to plan'
        echo "OPSAGENT-VMTEST: PASS"
    else
        echo "OPSAGENT-VMTEST: FAIL (stand-in)"
    fi
} >>"$serial"
exit 0
QEMU
chmod 755 "$T/qemu"
# The storage boot is the one that decides on the fallback; the systemd boot reuses it.
export STANDIN_LOG=$T/invocations OPSAGENT_VMTEST_QEMU=$T/qemu OPSAGENT_VMTEST_PARTS=storage

# A fake cached image (run.sh only checks that it is complete and hands the files to qemu),
# under run.sh's image version.
IMAGE_VERSION=$(sed -n 's/^IMAGE_VERSION=//p' tests/vm/run.sh)
[ -n "$IMAGE_VERSION" ] || { echo "vm fallback test: no IMAGE_VERSION= in tests/vm/run.sh" >&2; exit 1; }
fake_cache() {
    local dir=$1/$IMAGE_VERSION
    mkdir -p "$dir"
    : >"$dir/vmlinuz"
    : >"$dir/initrd.img"
    : >"$dir/root.img"
    echo vmlinuz-stand-in >"$dir/complete"
}

# run NAME CACHE [VAR=VALUE...]: runs tests/vm/run.sh, output in $T/NAME.out, status in $rc.
run() {
    local name=$1 cache=$2
    shift 2
    : >"$STANDIN_LOG"
    rc=0
    env OPSAGENT_VMTEST_CACHE="$cache" "$@" bash tests/vm/run.sh >"$T/$name.out" 2>&1 || rc=$?
    echo "--- $name: exit $rc, qemu started as: $(tr '\n' ' ' <"$STANDIN_LOG")"
}
expect_pass() {
    [ "$rc" = 0 ] || {
        cat "$T/$1.out" >&2
        fail "$1: run.sh exited $rc, expected a PASS"
    }
    grep -q '^vm test: PASS' "$T/$1.out" || fail "$1: no PASS line"
}

fake_cache "$T/c1"
run abort "$T/c1" STANDIN_KVM=abort STANDIN_TCG=pass
expect_pass abort
[ "$(cat "$STANDIN_LOG")" = "$(printf 'kvm=yes\nkvm=no')" ] || fail "abort: expected KVM then TCG, got: $(cat "$STANDIN_LOG")"
grep -q 'qemu ended before the guest started its tests under KVM' "$T/abort.out" || fail "abort: the reason is not said"
grep -q 'kvm_buf_set_msrs' "$T/abort.out" || fail "abort: qemu's own message is not shown"
verdict=$(ls "$T/c1"/kvm-fails-* 2>/dev/null) || fail "abort: no verdict remembered in $T/c1"
grep -q 'qemu ended before' "$verdict" || fail "abort: the verdict does not say why"

run remembered "$T/c1" STANDIN_KVM=abort STANDIN_TCG=pass
expect_pass remembered
[ "$(cat "$STANDIN_LOG")" = kvm=no ] || fail "remembered: KVM was tried again: $(cat "$STANDIN_LOG")"
grep -q 'KVM is known to fail' "$T/remembered.out" || fail "remembered: the verdict is not named"

fake_cache "$T/c2"
run hang "$T/c2" STANDIN_KVM=hang STANDIN_TCG=pass OPSAGENT_VMTEST_KVM_BOOT=3
expect_pass hang
[ "$(cat "$STANDIN_LOG")" = "$(printf 'kvm=yes\nkvm=no')" ] || fail "hang: expected KVM then TCG, got: $(cat "$STANDIN_LOG")"
grep -q 'did not start its tests within 3s under KVM' "$T/hang.out" || fail "hang: the reason is not said"
ls "$T/c2"/kvm-fails-* >/dev/null 2>&1 || fail "hang: no verdict remembered"

fake_cache "$T/c3"
run forced "$T/c3" STANDIN_KVM=abort STANDIN_TCG=pass OPSAGENT_VMTEST_ACCEL=kvm
[ "$rc" != 0 ] || fail "forced: OPSAGENT_VMTEST_ACCEL=kvm passed although KVM aborted"
grep -q 'no fallback' "$T/forced.out" || fail "forced: the failure does not say why"
[ "$(cat "$STANDIN_LOG")" = kvm=yes ] || fail "forced: expected KVM only, got: $(cat "$STANDIN_LOG")"

run guest-fails "$T/c1" STANDIN_KVM=abort STANDIN_TCG=fail
[ "$rc" != 0 ] || fail "guest-fails: a guest reporting FAIL passed"
grep -q 'the guest did not report PASS' "$T/guest-fails.out" || fail "guest-fails: wrong reason: $(tail -n 3 "$T/guest-fails.out")"

echo "vm fallback test: 5 passed, 0 failed"
