#!/bin/sh
# Runs in the VM (from the payload disk, started by guest.sh when the kernel command line
# has opsagent.part=selinux, root): the kernel was booted with security=selinux selinux=1
# enforcing=0; the image's policy (Debian's selinux-policy-default) is loaded here, as
# systemd would at boot, then helper/tests/selinux.rs runs (its cycles are #[ignore]d on
# hosts without SELinux). A PASS/FAIL marker for tests/vm/run.sh.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
echo "OPSAGENT-VMTEST-SELINUX: start on $(uname -r): $(cat /proc/cmdline)"
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
if ! load_policy -i; then
    echo "OPSAGENT-VMTEST-SELINUX: FAIL (load_policy -i could not load the policy)"
    exit 1
fi
echo "OPSAGENT-VMTEST-SELINUX: policy loaded, $(getenforce), policy version $(cat /sys/fs/selinux/policyvers)"
cd /tmp || exit 1
RUST_BACKTRACE=1 /payload/selinux --ignored --exact plan_apply_plan_cycles_of_a_boolean_and_the_persisted_mode \
    --test-threads=1 --nocapture 2>&1
rc=$?
if [ "$rc" = 0 ]; then
    echo "OPSAGENT-VMTEST-SELINUX: PASS"
else
    echo "OPSAGENT-VMTEST-SELINUX: FAIL (the selinux test exited with $rc)"
fi
