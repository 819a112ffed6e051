#!/usr/bin/env python3
"""Push-to-apply latency through the real parts: the reference backend (`opsagent-backend`),
the daemon (`opsagent run`) and the root helper (`opsagent-helper`), release builds.

    sudo python3 benches/push_e2e.py            # PUSHES=200 by default

`cargo bench --bench push_latency` measures the daemon alone (an in-process backend and a
stand-in helper give it exact clocks). This one keeps every process real and takes its
clock readings from two byte-forwarding proxies on the two links, which see the traffic
as it passes (the WebSocket is plain ws:// on loopback and server frames are not masked,
so a recipe's state id is visible in the bytes; helper frames are length-prefixed JSON):

    opsagent-backend --TCP--> [proxy A] --> opsagent run --Unix--> [proxy B] --> opsagent-helper

Each push replaces the app's recipe file with one linux.file state whose id is new
(`push-N`); the backend notices it (`--poll-ms 5`) and sends it. Readings:
  push     the first bytes holding `push-N` reach proxy A from the backend;
  apply    the daemon's bytes holding `push-N` (its Apply) reach proxy B: the request is
           on its way to the helper, which starts the state on reading it;
  outcome  the helper's next bytes reach proxy B: the state has run and answered.
push->apply is the issue's figure (the helper starts its first state); push->outcome
bounds it from above with the helper's decode, a real linux.file state (a write, as
the content changes every push) and its reply. Each proxy hop adds some tens of µs to
both. The next push waits for the backend to record the StateLog, plus IDLE_MS.

Environment: PUSHES [200], WARMUP [10], IDLE_MS [20], BIN_DIR [target/release], KEEP=1 keeps
the work directory (logs of the three processes).

DIRECT=1 takes proxy B out: the daemon talks to the helper directly, and the state's start
is read from the filesystem instead (inotify on the state's directory, read by a thread
blocked on it):
  write    the first state's first file appears beside its target (the helper's
           temporary file): the helper has decoded the request, walked the path and
           begun writing, an upper bound on "the helper starts the state";
  placed   the new content is renamed into place.
Why: in signed mode proxy B sits on three extra crossings (the recipe up, its answer down,
the apply-signed up), each a Python thread's wake-up on a loaded machine, so its reading
measures the proxy as much as the agent. Proxy A's one hop stays in both modes.

SIGNED=1 runs the same with signed recipes (README "Signed recipes"): a key made with
`minisign -G -W`, the backend started with `--signing-key`, the helper with a `--config`
holding it as `recipe_key`. The daemon then hands the helper the signed recipe (the bytes
holding `push-N`) and, right behind it, asks for state 0 by index (`apply-signed`); the
helper verifies the recipe, answers, and starts the state: `apply` is then the later of
the `apply-signed` reaching the helper and the helper's answer to the recipe, so
push->apply includes the whole verification.
"""

import ctypes
import json
import os
import struct
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("BIN_DIR", os.path.join(ROOT, "target", "release"))
PUSHES = int(os.environ.get("PUSHES", "200"))
WARMUP = int(os.environ.get("WARMUP", "10"))
IDLE_MS = int(os.environ.get("IDLE_MS", "20"))
SIGNED = os.environ.get("SIGNED") == "1"
DIRECT = os.environ.get("DIRECT") == "1"


def die(msg):
    print(f"push_e2e: {msg}", file=sys.stderr)
    sys.exit(1)


class Proxy(threading.Thread):
    """Forwards every accepted connection to `connect()`, and calls `seen(direction,
    bytes, now_ns)` for each chunk before forwarding it (direction "up": from the
    accepting side's peer towards the target; "down": back)."""

    def __init__(self, listener, connect, seen):
        super().__init__(daemon=True)
        self.listener, self.connect, self.seen = listener, connect, seen
        self.sel = selectors.DefaultSelector()

    def run(self):
        self.listener.setblocking(False)
        self.sel.register(self.listener, selectors.EVENT_READ, None)
        while True:
            for key, _ in self.sel.select():
                if key.data is None:
                    client, _ = self.listener.accept()
                    target = self.connect()
                    for s in (client, target):
                        s.setblocking(True)
                        # A forwarding hop must not hold small writes back (Nagle).
                        if s.family != socket.AF_UNIX:
                            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    self.sel.register(client, selectors.EVENT_READ, (target, "up"))
                    self.sel.register(target, selectors.EVENT_READ, (client, "down"))
                    continue
                peer, direction = key.data
                try:
                    chunk = key.fileobj.recv(1 << 20)
                except OSError:
                    chunk = b""
                now = time.monotonic_ns()
                if not chunk:
                    for s in (key.fileobj, peer):
                        try:
                            self.sel.unregister(s)
                        except (KeyError, ValueError):
                            pass
                        s.close()
                    continue
                self.seen(direction, chunk, now)
                peer.sendall(chunk)


class Clock:
    """The readings of one push, filled in by the proxies' threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.token = None
        self.push = self.apply = self.outcome = None
        # Signed mode: when the recipe holding the token went up, and when the helper
        # answered it (the next request up is then the state's apply-signed).
        self.recipe = self.verified = self.sent = None
        # DIRECT=1: the first file the state creates, and its target renamed into place.
        self.write = self.placed = None
        self.tail_ws = b""
        self.tail_helper = b""

    def arm(self, token):
        with self.lock:
            self.token = token.encode()
            self.push = self.apply = self.outcome = None
            self.recipe = self.verified = self.sent = None
            self.write = self.placed = None

    def on_file(self, name, moved_to, now):
        with self.lock:
            if self.push is None:
                return
            if self.write is None:
                self.write = now
            if moved_to and name == b"motd" and self.placed is None:
                self.placed = now

    def from_backend(self, direction, chunk, now):
        if direction != "down":
            return
        with self.lock:
            data = self.tail_ws + chunk
            self.tail_ws = chunk[-64:]
            if self.token and self.push is None and self.token in data:
                self.push = now

    def on_helper_link(self, direction, chunk, now):
        with self.lock:
            if SIGNED:
                # The daemon sends the recipe and the state's apply-signed back to back;
                # the helper starts the state once it has verified the recipe: "apply"
                # is the later of the apply-signed arriving and the verification answer.
                if direction == "up":
                    data = self.tail_helper + chunk
                    self.tail_helper = chunk[-64:]
                    if self.token and self.push is not None and self.recipe is None and self.token in data:
                        self.recipe = now
                    if self.recipe is not None and self.sent is None and b"apply-signed" in data:
                        self.sent = now
                elif self.recipe is not None:
                    if self.verified is None and b"recipe-verified" in chunk:
                        self.verified = now
                    if self.verified is not None and self.outcome is None and b'"outcome"' in chunk:
                        self.outcome = now
                if self.apply is None and self.sent is not None and self.verified is not None:
                    self.apply = max(self.sent, self.verified)
                return
            if direction == "up":
                data = self.tail_helper + chunk
                self.tail_helper = chunk[-64:]
                if self.token and self.push is not None and self.apply is None and self.token in data:
                    self.apply = now
            elif self.apply is not None and self.outcome is None:
                self.outcome = now


IN_CREATE, IN_MOVED_TO = 0x100, 0x80


class DirWatch(threading.Thread):
    """Calls `seen(name, moved_to, now_ns)` for each file created in, or renamed into,
    `path` (inotify through libc; a blocking read, so the reading is taken on wake-up)."""

    def __init__(self, path, seen):
        super().__init__(daemon=True)
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        self.fd = libc.inotify_init1(0)
        if self.fd < 0 or libc.inotify_add_watch(self.fd, path.encode(), IN_CREATE | IN_MOVED_TO) < 0:
            die(f"inotify on {path}: {os.strerror(ctypes.get_errno())}")
        self.seen = seen

    def run(self):
        while True:
            buf = os.read(self.fd, 1 << 16)
            now = time.monotonic_ns()
            off = 0
            while off + 16 <= len(buf):
                _wd, mask, _cookie, length = struct.unpack_from("iIII", buf, off)
                name = buf[off + 16:off + 16 + length].rstrip(b"\0")
                off += 16 + length
                self.seen(name, bool(mask & IN_MOVED_TO), now)


def wait_for(pred, what, timeout=30):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            die(f"timed out waiting for {what}")
        time.sleep(0.002)


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(p / 100 * len(xs) + 0.4999)) - 1))]


def main():
    if os.geteuid() != 0:
        die("needs root (the helper runs as root)")
    for b in ("opsagent", "opsagent-helper", "opsagent-backend"):
        if not os.access(os.path.join(BIN, b), os.X_OK):
            die(f"{BIN}/{b} not built: cargo build --release --workspace")
    work = tempfile.mkdtemp(prefix="opsagent-push-e2e.", dir="/var/tmp")
    procs = []

    def cleanup(*_):
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
        if os.environ.get("KEEP") == "1":
            print(f"kept {work}", file=sys.stderr)
        else:
            subprocess.run(["rm", "-rf", work], check=False)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        run(work, procs)
    finally:
        cleanup()


def run(work, procs):
    for d in ("recipes", "state", "helper-state", "out"):
        os.mkdir(os.path.join(work, d))
    open(os.path.join(work, "empty.conf"), "w").close()
    recipe = os.path.join(work, "recipes", "bench.json")

    def write_recipe(state_id, content):
        doc = {"recipe_version": 1, "state": [{"id": state_id, "module": "linux.file", "parameter": {
            "path": os.path.join(work, "out", "motd"), "content": content, "mode": "0644"}}]}
        with open(recipe + ".tmp", "w") as f:
            json.dump(doc, f)
        os.rename(recipe + ".tmp", recipe)

    log = lambda name: open(os.path.join(work, name), "w")  # noqa: E731
    # The helper's allowlist names root, always allowed (see footprint.sh).
    helper_sock = os.path.join(work, "helper.sock")
    allow = [] if subprocess.run(["getent", "passwd", "opsagent"], capture_output=True).returncode == 0 \
        else ["--allow-user", "root"]
    signing = []
    if SIGNED:
        key, pub, conf = (os.path.join(work, n) for n in ("recipes.key", "recipes.pub", "helper.conf"))
        subprocess.run(["minisign", "-G", "-W", "-f", "-p", pub, "-s", key], check=True, capture_output=True)
        with open(conf, "w") as f:
            f.write(f"[userdata]\napp_id = bench\nrecipe_key = {open(pub).read().splitlines()[1]}\n")
        os.chmod(conf, 0o640)
        allow += ["--config", conf]
        signing = ["--signing-key", key]
    procs.append(subprocess.Popen([os.path.join(BIN, "opsagent-helper"), "--socket", helper_sock,
                                   "--state-dir", os.path.join(work, "helper-state")] + allow,
                                  stdout=subprocess.DEVNULL, stderr=log("helper.log")))
    wait_for(lambda: os.path.exists(helper_sock), "the helper's socket")

    write_recipe("warm-0", "0\n")
    statelog = os.path.join(work, "statelog.jsonl")
    procs.append(subprocess.Popen([os.path.join(BIN, "opsagent-backend"), "--listen", "127.0.0.1:0",
                                   "--recipe-dir", os.path.join(work, "recipes"), "--statelog", statelog,
                                   "--poll-ms", "5"] + signing, stdout=log("backend.out"), stderr=log("backend.log")))
    out = os.path.join(work, "backend.out")
    wait_for(lambda: "listening on" in open(out).read(), "the backend")
    backend_port = int(open(out).read().split("listening on")[1].split()[0].rsplit(":", 1)[1])

    clock = Clock()
    ws_listener = socket.create_server(("127.0.0.1", 0))
    Proxy(ws_listener, lambda: socket.create_connection(("127.0.0.1", backend_port)), clock.from_backend).start()
    proxy_sock = os.path.join(work, "proxy.sock")
    helper_listener = socket.socket(socket.AF_UNIX)
    helper_listener.bind(proxy_sock)
    helper_listener.listen(8)

    def to_helper():
        s = socket.socket(socket.AF_UNIX)
        s.connect(helper_sock)
        return s

    if DIRECT:
        DirWatch(os.path.join(work, "out"), clock.on_file).start()
        daemon_helper = helper_sock
    else:
        Proxy(helper_listener, to_helper, clock.on_helper_link).start()
        daemon_helper = proxy_sock

    procs.append(subprocess.Popen(
        [os.path.join(BIN, "opsagent"), "run", "--config", os.path.join(work, "empty.conf"),
         "--ws-uri", f"ws://127.0.0.1:{ws_listener.getsockname()[1]}/", "--app-id", "bench",
         "--instance-id", "i-push-e2e", "--token-file", os.path.join(work, "token"),
         "--state-dir", os.path.join(work, "state"), "--helper-socket", daemon_helper, "--round-delay", "600"],
        env=dict(os.environ, RUST_LOG="info"), stdout=subprocess.DEVNULL, stderr=log("daemon.log")))

    def logged(state_id):
        try:
            with open(statelog) as f:
                return any(f'"{state_id}"' in line for line in f)
        except FileNotFoundError:
            return False

    wait_for(lambda: logged("warm-0"), "the first StateLog", timeout=60)
    applies, outcomes = [], []
    for i in range(1, WARMUP + PUSHES + 1):
        token = f"push-{i:05d}"
        clock.arm(token)
        write_recipe(token, f"{i}\n")
        wait_for(lambda: logged(token), f"the StateLog of {token}")
        if DIRECT:
            wait_for(lambda: clock.placed is not None, f"{token}'s file in place")
        else:
            wait_for(lambda: clock.outcome is not None, f"the helper's answer to {token}")
        with clock.lock:
            push = clock.push
            apply, outcome = (clock.write, clock.placed) if DIRECT else (clock.apply, clock.outcome)
        if i > WARMUP:
            applies.append((apply - push) / 1e3)
            outcomes.append((outcome - push) / 1e3)
        time.sleep(IDLE_MS / 1000)

    print()
    mode = "signed recipes" if SIGNED else "recipes not signed"
    how = "no proxy on the helper socket, readings by inotify" if DIRECT else "proxy on the helper socket"
    print(f"== push -> helper, real backend + daemon + helper (release builds, {mode}, {how}), "
          f"{PUSHES} pushes after {WARMUP} ==")
    print(f"{'':42} {'p50_ms':>8} {'p90_ms':>8} {'p99_ms':>8} {'max_ms':>8}")
    names = (("push -> the state's first write", "push -> its file in place") if DIRECT
             else ("push -> Apply reaches the helper", "push -> helper's Outcome (state done)"))
    for name, xs in zip(names, (applies, outcomes)):
        print(f"{name:42} " + " ".join(f"{pct(xs, p) / 1e3:8.3f}" for p in (50, 90, 99, 100)))
    print(f"target: p99 push -> helper starts the first state < 2 ms: {pct(applies, 99) / 1e3:.3f} ms "
          f"({'met' if pct(applies, 99) < 2000 else 'MISSED'}); mean {statistics.mean(applies) / 1e3:.3f} ms")


if __name__ == "__main__":
    main()
