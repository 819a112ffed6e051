#!/usr/bin/env bash
# Soak (#22 item 5): ROUNDS rounds of a STATES-state recipe with a round delay of
# ROUND_DELAY seconds (default 0: rounds back to back, as the original's `delay = 0`)
# against the reference backend, the backend restarted every RESTART_EVERY rounds. Reports
# the daemon's RSS and open file descriptors (first/last/max, sampled every SAMPLE_S s),
# the helper's exits (it is restarted when it exits) and checks that every StateLog
# reached the backend exactly once (by sequence number). Exit 0 only when nothing was lost
# or doubled and the daemon never died.
#
#   ROUNDS=10000 STATES=100 RESTART_EVERY=1000 bash tests/faults/soak.sh   (on demand)
#   ROUNDS=300 RESTART_EVERY=100 bash tests/faults/soak.sh                 (.ci/run)
# The state files are linux.file states whose content does not change: a round is the
# agent, the helper protocol and the spool, not process spawning. Needs the debug
# binaries (built if absent) and root (the helper).
set -euo pipefail
# The backend's listening socket is bound once, here, and handed to every backend started
# below the way systemd socket activation does (LISTEN_FDS): a restarted backend serves
# the same socket and never races anything for its port. python3 binds it and runs this
# script again holding it (its descriptor in SOAK_LISTEN_FD).
if [ -z "${SOAK_LISTEN_FD:-}" ]; then
    exec python3 -c 'import os, socket, sys
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(128)
s.set_inheritable(True)
os.environ["SOAK_LISTEN_FD"] = str(s.fileno())
os.execvp("bash", ["bash"] + sys.argv[1:])' "$0" "$@"
fi
cd "$(dirname "$0")/../.."
ROUNDS=${ROUNDS:-10000}
STATES=${STATES:-100}
RESTART_EVERY=${RESTART_EVERY:-1000}
ROUND_DELAY=${ROUND_DELAY:-0}
# The backend's statelog is rotated past this size (its default, 64 MiB); every rotated
# file is kept and counted, and a restarted backend rebuilds its seen sequence numbers
# from all of them.
ROTATE_BYTES=${ROTATE_BYTES:-67108864}
SAMPLE_S=${SAMPLE_S:-2}
BIN=${OPSAGENT_BIN_DIR:-target/debug}
[ -x "$BIN/opsagent" ] && [ -x "$BIN/opsagent-backend" ] && [ -x "$BIN/opsagent-helper" ] ||
    cargo build --locked -p opsagent -p opsagent-helper --bins >&2

# SOAK_DIR: where the run lives (a tmpfs such as /dev/shm takes the disk flushes out of a
# long run; the soak checks memory, descriptors and exactly-once delivery, not durability).
W=$(mktemp -d "${SOAK_DIR:-/tmp}/opsagent-soak.XXXXXX")
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [ -n "${SOAK_KEEP:-}" ]; then echo "soak: kept $W" >&2; else rm -rf "$W"; fi
}
trap cleanup EXIT
mkdir -p "$W/recipes" "$W/work"
python3 - "$W" "$STATES" <<'PY'
import json, sys
w, n = sys.argv[1], int(sys.argv[2])
states = [{"id": f"f{i}", "module": "linux.file",
           "parameter": {"path": f"{w}/work/f{i}", "content": f"soak {i}\n"}} for i in range(n)]
json.dump({"recipe_version": 1, "state": states}, open(f"{w}/recipes/app-soak.json", "w"))
PY
: >"$W/empty.conf"

helper_starts=0
start_helper() {
    rm -f "$W/helper.sock"
    "$BIN/opsagent-helper" --socket "$W/helper.sock" {SOAK_LISTEN_FD}>&- 2>>"$W/helper.log" &
    helper_pid=$!
    pids+=("$helper_pid")
    helper_starts=$((helper_starts + 1))
    for _ in $(seq 100); do [ -S "$W/helper.sock" ] && return 0; sleep 0.1; done
    echo "soak: the helper did not bind its socket" >&2
    exit 1
}
backend_starts=0
start_backend() {
    # LISTEN_PID unset: the backend takes the socket as its own (its pid is not known yet).
    # RUST_LOG=warn: a line per StateLog would make the backend, not the agent, the soak's limit.
    env -u LISTEN_PID LISTEN_FDS=1 LISTEN_FDS_FIRST_FD="$SOAK_LISTEN_FD" RUST_LOG=warn \
        "$BIN/opsagent-backend" --recipe-dir "$W/recipes" --statelog "$W/statelog.jsonl" \
        --poll-ms 1000 --rotate-bytes "$ROTATE_BYTES" --rotate-keep 1000 >"$W/backend.out" 2>>"$W/backend.log" &
    backend_pid=$!
    pids+=("$backend_pid")
    backend_starts=$((backend_starts + 1))
    for _ in $(seq 100); do [ -s "$W/backend.out" ] && break; sleep 0.1; done
    port=$(sed -n '1s/.*:\([0-9]*\)$/\1/p' "$W/backend.out")
}
start_helper
start_backend
RUNTIME_DIRECTORY=$W/run
mkdir -p "$RUNTIME_DIRECTORY"
start_agent() { # ROUND_DELAY
    rm -f "$RUNTIME_DIRECTORY/status.json"
    RUNTIME_DIRECTORY=$RUNTIME_DIRECTORY RUST_LOG=warn "$BIN/opsagent" run --config "$W/empty.conf" \
        --ws-uri "ws://127.0.0.1:$port/" --app-id app-soak --instance-id i-soak \
        --token-file "$W/token" --state-dir "$W/state" --helper-socket "$W/helper.sock" \
        --round-delay "$1" --retry-delay 1 {SOAK_LISTEN_FD}>&- >/dev/null 2>>"$W/agent.log" &
    agent=$!
    pids+=("$agent")
}
stop_agent() {
    kill -USR1 "$agent"
    for _ in $(seq 600); do kill -0 "$agent" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$agent" 2>/dev/null && { echo "soak: the daemon did not stop after its round" >&2; exit 1; }
    wait "$agent" 2>/dev/null || true
}
start_agent "$ROUND_DELAY"

round() { python3 -c 'import json,sys
try: print(json.load(open(sys.argv[1]))["engine"]["round"])
except Exception: print(0)' "$RUNTIME_DIRECTORY/status.json"; }
# "SPOOL_DEPTH PHASE" of the running daemon, from its status file.
spool_phase() { python3 -c 'import json,sys
try:
    d = json.load(open(sys.argv[1])); print(d["spool_depth"], d["engine"]["phase"]["phase"])
except Exception: print("-1 unknown")' "$RUNTIME_DIRECTORY/status.json"; }
sample() {
    local rss fds
    rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$agent/status")
    fds=$(ls "/proc/$agent/fd" | wc -l)
    echo "$1 $rss $fds" >>"$W/samples"
}
t0=$(date +%s)
next_restart=$RESTART_EVERY
sample 0
while :; do
    kill -0 "$agent" 2>/dev/null || { tail -n 20 "$W/agent.log" >&2; echo "soak: the daemon died" >&2; exit 1; }
    if ! kill -0 "$helper_pid" 2>/dev/null; then start_helper; fi
    r=$(round)
    if [ "$r" -ge "$next_restart" ] && [ "$r" -lt "$ROUNDS" ]; then
        kill "$backend_pid"; wait "$backend_pid" 2>/dev/null || true
        start_backend
        next_restart=$((next_restart + RESTART_EVERY))
    fi
    [ "$r" -ge "$ROUNDS" ] && break
    sample "$r"
    sleep "$SAMPLE_S"
done
sample "$(round)"
# Stop after the round in progress. With rounds back to back, StateLogs the backend has not
# acknowledged yet stay in the stopped daemon's spool (on disk, up to half of it: rounds
# wait beyond that), to be sent by the next daemon. So start the next one as a restart
# would, with a long round delay: it resumes the recipe (one more round), sends its spool,
# and is stopped once the spool is empty. Every StateLog must then be at the backend once.
# Lines of the statelog and its rotated files (FILE.N), each one StateLog.
statelogs() { { cat "$W/statelog.jsonl" "$W"/statelog.jsonl.[0-9]* 2>/dev/null || true; } | wc -l; }
stop_agent
at_stop=$(statelogs)
start_agent 3600
drained=
for _ in $(seq 3000); do
    kill -0 "$agent" 2>/dev/null || { tail -n 20 "$W/agent.log" >&2; echo "soak: the restarted daemon died" >&2; exit 1; }
    if [ "$(spool_phase)" = "0 idle" ]; then drained=yes; break; fi
    sleep 0.1
done
[ -n "$drained" ] || { echo "soak: the restarted daemon did not empty its spool in 300 s: $(spool_phase)" >&2; exit 1; }
stop_agent
echo "soak: the first daemon stopped with $(($(statelogs) - at_stop - STATES)) StateLog(s) in its spool; the restarted one sent them and its own round"
elapsed=$(($(date +%s) - t0))
python3 - "$W" "$STATES" "$elapsed" "$helper_starts" "$backend_starts" "$RESTART_EVERY" "$ROUND_DELAY" <<'PY'
import collections, json, sys
w, states, elapsed, helper_starts, backend_starts = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
seqs = collections.Counter()
rounds = set()
# The backend rotates its statelog by size (FILE.1 is the newest rotated file); the soak
# keeps every rotated file, so all of them together are every StateLog it took.
import glob
files = sorted((f for f in glob.glob(f"{w}/statelog.jsonl.*") if f.rsplit(".", 1)[1].isdigit()),
               key=lambda f: -int(f.rsplit(".", 1)[1]))
for path in files + [f"{w}/statelog.jsonl"]:
    for line in open(path):
        try:
            l = json.loads(line)
        except ValueError:
            continue
        seqs[l["seq"]] += 1
samples = [tuple(map(int, s.split())) for s in open(f"{w}/samples")]
# From the end of the first round on: start-up (before the first recipe) is not the steady state.
samples = [s for s in samples if s[0] >= 1] or samples
top = max(seqs) if seqs else 0
lost = [s for s in range(1, top + 1) if s not in seqs]
doubled = [s for s, n in seqs.items() if n > 1]
rss = [s[1] for s in samples]
fds = [s[2] for s in samples]
last_round = samples[-1][0]
print(f"soak: {last_round} rounds x {states} states in {elapsed} s; backend started {backend_starts} times; helper started {helper_starts} times ({helper_starts - 1} exits)")
print(f"soak: StateLogs delivered {sum(seqs.values())} (seq 1..{top}); lost {len(lost)}; doubled {len(doubled)}; whole rounds {'yes' if top % states == 0 else 'no'}")
print(f"soak: daemon RSS KiB first {rss[0]} last {rss[-1]} max {max(rss)}; open fds first {fds[0]} last {fds[-1]} max {max(fds)} ({len(samples)} samples)")
# The row of the README's table (tests/faults/table.sh).
print(f"| soak: {last_round} rounds x {states} states, round delay {sys.argv[7]} s, backend restarted every {sys.argv[6]} rounds "
      f"| RSS KiB first/last/max {rss[0]}/{rss[-1]}/{max(rss)}; fds {fds[0]}/{fds[-1]}/{max(fds)}; helper exits {helper_starts - 1} "
      f"| {'nothing' if not lost and not doubled else f'{len(lost)} lost, {len(doubled)} doubled'} ({sum(seqs.values())} StateLogs, each once by seq) "
      f"| {elapsed} s in all |")
sys.exit(1 if lost or doubled or top % states else 0)
PY
