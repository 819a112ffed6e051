#!/bin/sh
# Runs in the VM (from the payload disk, as PID 1's child, root): the storage test binary
# with the kernel's storage drivers loaded, then a PASS/FAIL marker for tests/vm/run.sh.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# The selinux boot of tests/vm/run.sh (same image init, its own kernel command line).
case " $(cat /proc/cmdline) " in
*" opsagent.part=selinux "*) exec /payload/guest-selinux.sh ;;
esac
echo "OPSAGENT-VMTEST: start on $(uname -r)"
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mkdir -p /run/lock /run/lvm
# lvm2 and mdadm load their drivers on demand too, but the tests decide from /proc/misc and
# /proc/mdstat whether the kernel has them, so they are loaded before.
for m in loop dm_mod md_mod raid1; do
    modprobe "$m" || echo "modprobe $m failed"
done
# udev, as on any Debian host: lvcreate waits for it to make /dev/VG/LV (without it, libdm
# would have to be told to make the nodes itself, which the helper's clean environment
# cannot pass on).
/lib/systemd/systemd-udevd --daemon
udevadm trigger --action=add
udevadm settle --timeout=30
cd /tmp || exit 1
OPSAGENT_TEST_KERNEL_STORAGE=required RUST_BACKTRACE=1 /payload/storage --test-threads=1 --nocapture 2>&1
rc=$?
if [ "$rc" = 0 ]; then
    echo "OPSAGENT-VMTEST: PASS"
else
    echo "OPSAGENT-VMTEST: FAIL (the storage tests exited with $rc)"
fi
