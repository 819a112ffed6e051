#!/usr/bin/env python3
"""The host's verdict on the power cut (tests/vm/run.sh, part `powercut`).

Reads, from DIR (copied out of the VM's state disk after the second boot):
  at-cut/spool.log, at-cut/seq.reserved, at-cut/statelog.jsonl  the files as the cut left them
  statelog.jsonl, events-boot2.jsonl                             the backend's after boot 2
  console1.txt, console2.txt                                     the two boots' consoles
and how the guest ran (ACCEL: kvm or tcg, shown in the row).
Checks that every StateLog the agent had acknowledged at the cut was held by the backend,
that after the restart every sequence number the agent ever issued is in the backend's
statelog exactly once, and that the token survived; prints figures and the README's
Faults table row. Exit 0 only when all of that holds.

The spool is replayed here independently of the daemon (format: src/spool.rs), so the
check does not trust the code it checks.
"""
import collections
import hashlib
import json
import re
import struct
import sys

MAGIC = b"OPSSPL\x00\x01"
PREFIX = "OPSAGENT-VMTEST-POWERCUT: "


def replay(data):
    """(highest seq issued, pending seqs, bytes of torn tail) of a spool log."""
    if data[:8] != MAGIC:
        raise SystemExit("powercut: at-cut/spool.log does not start with the spool magic")
    pos, good, issued, pending = 8, 8, 0, set()
    while len(data) - pos >= 8:
        length, check = struct.unpack_from("<II", data, pos)
        if length == 0 or length > len(data) - pos - 8:
            break
        payload = data[pos + 8 : pos + 8 + length]
        if int.from_bytes(hashlib.sha256(struct.pack("<I", length) + payload).digest()[:4], "little") != check:
            break
        pos += 8 + length
        good = pos
        entry = json.loads(payload)
        kind = entry["t"]
        if kind == "header":
            issued = max(issued, entry["next_seq"] - 1)
        elif kind == "log":
            issued = max(issued, entry["log"]["seq"])
            pending.add(entry["log"]["seq"])
        elif kind == "ack":
            pending.discard(entry["seq"])
        elif kind == "ack_through":
            pending = {s for s in pending if s > entry["seq"]}
        elif kind == "drop":
            pending -= set(entry["seqs"])
    return issued, pending, len(data) - good


def seqs(path):
    """Sequence numbers of the instance's StateLogs in a statelog, with their counts."""
    out = collections.Counter()
    with open(path, "rb") as f:
        for line in f:
            try:
                obj = json.loads(line)
            except ValueError:
                continue  # a torn line: the backend skips it too
            if isinstance(obj, dict) and obj.get("instance_id") == "i-pc" and isinstance(obj.get("seq"), int):
                out[obj["seq"]] += 1
    return out


def console(path, pattern):
    with open(path, errors="replace") as f:
        for line in f:
            line = line.strip()
            if line.startswith(PREFIX):
                m = re.search(pattern, line[len(PREFIX) :])
                if m:
                    return m
    return None


def main(d, accel):
    problems = []
    with open(f"{d}/at-cut/spool.log", "rb") as f:
        issued, pending, torn = replay(f.read())
    with open(f"{d}/at-cut/seq.reserved") as f:
        reserved = int(f.read().strip() or 0)
    held = seqs(f"{d}/at-cut/statelog.jsonl")
    final = seqs(f"{d}/statelog.jsonl")
    repeated = 0
    with open(f"{d}/events-boot2.jsonl", "rb") as f:
        repeated = sum(1 for line in f if b'"statelog_repeated"' in line)

    acked = set(range(1, issued + 1)) - pending
    not_held = sorted(acked - set(held))
    if not_held:
        problems.append(f"{len(not_held)} acknowledged StateLog(s) not held by the backend at the cut: {not_held[:10]}")
    # A number the backend holds but the spool no longer knows it issued would be issued
    # again, and the backend would take the new StateLog for a resend of the old one.
    unknown = sorted(s for s in held if s > issued)
    if unknown:
        problems.append(f"the backend held {len(unknown)} StateLog(s) beyond the spool's high-water mark {issued} "
                        f"(seq {unknown[0]}..{unknown[-1]}): those numbers would be reused")
    if repeated != len(pending & set(held)):
        problems.append(f"the backend saw {repeated} repeated StateLog(s) after the restart, but only "
                        f"{len(pending & set(held))} of the re-sent ones were already held")
    doubled = sorted(s for s, n in final.items() if n > 1)
    if doubled:
        problems.append(f"{len(doubled)} StateLog(s) doubled in the backend's statelog: {doubled[:10]}")
    top = max(final) if final else 0
    missing = set(range(1, top + 1)) - set(final)
    # A torn log is not trusted for the high-water mark: the daemon continues from
    # seq.reserved, so the numbers between were never issued.
    jumped = sorted(s for s in missing if torn and issued < s < reserved)
    lost = sorted(missing - set(jumped))
    if lost:
        problems.append(f"{len(lost)} StateLog(s) lost (seq missing from the backend): {lost[:10]}")
    if top <= issued:
        problems.append(f"no StateLog after the restart (highest seq {top}, {issued} issued before the cut)")

    t1 = console(f"{d}/console1.txt", r"^token sha256 (\w+)")
    t2 = console(f"{d}/console2.txt", r"^token sha256 (\w+)")
    if not t1 or not t2 or t1.group(1) != t2.group(1):
        problems.append(f"the token changed across the cut ({t1 and t1.group(1)} -> {t2 and t2.group(1)})")
    canary = console(f"{d}/console2.txt", r"^canary: (\w+)")
    cut = console(f"{d}/console1.txt", r"^CUT statelogs (\d+) round (\d+) applying (\S+) after (\d+) s")
    rnd = console(f"{d}/console2.txt", r"^first round completed ([\d.]+) s after the daemon started, ([\d.]+) s after boot")
    marks = console(f"{d}/console2.txt", r"^persisted recipe version (\d+), wait marks (.*)")
    if not (canary and cut and rnd and marks):
        problems.append("a figure is missing from the consoles")

    # The daemon's own account (its journal, printed by the guest) must agree with the replay.
    said = console(f"{d}/console2.txt", r"^daemon: (spool: recovered.*)")
    said_pending = re.search(r"PENDING=(\d+)", said.group(1)) if said else None
    said_torn = console(f"{d}/console2.txt", r"^daemon: spool: dropped a torn or corrupt tail.*")
    if (said_pending and int(said_pending.group(1))) != (len(pending) or None):
        problems.append(f"the daemon recovered {said and said.group(1)!r}, the replay found {len(pending)} pending")
    if bool(said_torn) != bool(torn):
        problems.append(f"the daemon's log and the replay disagree on a torn tail ({torn} bytes)")
    spool = "intact" if not torn else f"torn tail of {torn} bytes cut off"
    print(f"powercut: at the cut the agent had issued {issued} StateLogs (seq 1..{issued}), {len(acked)} acknowledged, "
          f"{len(pending)} pending; the backend held {len(held)} durably; seq.reserved {reserved}")
    print(f"powercut: the daemon said: {said.group(1) if said else 'nothing about its spool (nothing pending)'}")
    print(f"powercut: spool.log {spool}; canary {canary and canary.group(1)}; token sha256 "
          f"{'unchanged' if t1 and t2 and t1.group(1) == t2.group(1) else 'CHANGED'}; "
          f"persisted recipe version {marks and marks.group(1)} wait marks {marks and marks.group(2)}")
    print(f"powercut: after the restart the agent re-sent {len(pending)} StateLog(s), {len(pending & set(held))} of them "
          f"already held (backend: {repeated} repeated, not appended); the backend holds {sum(final.values())} StateLogs "
          f"(seq 1..{top}{f', {len(jumped)} never issued after the torn log' if jumped else ''}); "
          f"lost {len(lost)}, doubled {len(doubled)}")
    if rnd:
        print(f"powercut: first round completed {rnd.group(1)} s after the daemon started ({rnd.group(2)} s after boot)")
    for p in problems:
        print(f"powercut: FAIL: {p}")
    resent = (
        f"re-sent the {len(pending)} StateLog(s) unacknowledged at the cut ({len(pending & set(held))} of them "
        f"already held by the backend: acknowledged again, not appended)"
        if pending
        else "nothing to re-send (every StateLog was acknowledged at the cut)"
    )
    if cut and rnd:
        print(f"| power cut: VM killed (qemu SIGKILL) mid-round ({cut.group(3)} of round {cut.group(2)}) after {issued} StateLogs, unsynced page cache lost "
              f"(a canary file written just before: {canary and canary.group(1)}) "
              f"| restarted: spool.log {spool} (the daemon's log agrees), token, persisted recipe and wait marks "
              f"intact; {resent}; the next round completed "
              f"| {'nothing' if not lost and not doubled and not not_held else f'{len(lost) + len(not_held)} lost, {len(doubled)} doubled'} "
              f"({len(acked)} acknowledged StateLogs all held at the cut; {sum(final.values())} StateLogs, each once by seq) "
              f"| {float(rnd.group(1)):.0f} s from the daemon's start to its first round ({float(rnd.group(2)):.0f} s after boot, {accel}) |")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
