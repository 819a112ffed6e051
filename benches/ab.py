#!/usr/bin/env python3
"""Interleaved A/B timing of whole commands on a noisy machine.

    sudo python3 benches/ab.py RUNS LABEL=COMMAND [LABEL=COMMAND ...]
    sudo python3 benches/ab.py 30 before="old/opsagent apply r.json" after="target/release/opsagent apply r.json"

Runs every command once untimed, then RUNS rounds of all commands in turn (so that
each sees the same phases of the machine), and prints per label the median, quartiles
and minimum wall time and the median CPU time (user + system of the command and its
children, from getrusage). Output goes to /dev/null. Compare labels of one invocation:
the machine's speed drifts by a factor of three within an hour (benches/RESULTS.md).
"""
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time


def main() -> None:
    if len(sys.argv) < 3 or not sys.argv[1].isdigit():
        sys.exit(__doc__)
    runs = int(sys.argv[1])
    cmds = [arg.split("=", 1) for arg in sys.argv[2:]]
    wall = {label: [] for label, _ in cmds}
    cpu = {label: [] for label, _ in cmds}
    with open(os.devnull, "w") as null:
        for _, cmd in cmds:
            subprocess.run(shlex.split(cmd), stdout=null, check=True)
        for _ in range(runs):
            for label, cmd in cmds:
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                t0 = time.perf_counter()
                subprocess.run(shlex.split(cmd), stdout=null, check=True)
                wall[label].append((time.perf_counter() - t0) * 1e3)
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                used = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
                cpu[label].append(used * 1e3)
    load = open("/proc/loadavg").read().split()[0]
    for label, _ in cmds:
        v = sorted(wall[label])
        print(
            f"{label:12s} wall median {statistics.median(v):7.2f} ms  p25 {v[len(v) // 4]:7.2f}"
            f"  p75 {v[3 * len(v) // 4]:7.2f}  min {v[0]:7.2f}   cpu median {statistics.median(cpu[label]):6.2f} ms"
            f"  (n={runs}, load {load})"
        )


if __name__ == "__main__":
    main()
