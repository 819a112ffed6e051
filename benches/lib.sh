# Shared by the benchmark scripts: messages and the checks each makes before it runs.
# Source it after setting BENCH (the script's name, for messages).

say() { printf '%s\n' "$*" >&2; }
die() {
	say "${BENCH:-bench}: $*"
	exit 1
}
need_root() { [ "$(id -u)" = 0 ] || die "needs root ($*)"; }
need_bins() { # DIR NAME...: release binaries the script runs
	local dir=$1 b
	shift
	for b in "$@"; do
		[ -x "$dir/$b" ] || die "$dir/$b not built: cargo build --release --workspace"
	done
}
# systemd-socket-activate plays systemd's part for a socket-activated helper.
need_socket_activate() {
	command -v systemd-socket-activate >/dev/null || apt-get install -y -qq systemd >/dev/null ||
		die "systemd-socket-activate not found (package systemd)"
}
# build_runner DIR: compiles benches/runner.c (one timed run: wall, CPU of the process
# tree, peak RSS) into DIR/runner and prints its path.
build_runner() {
	command -v cc >/dev/null || die "cc not found (the Rust toolchain's linker; apt-get install gcc)"
	cc -O2 -o "$1/runner" "$(dirname "${BASH_SOURCE[0]}")/runner.c" || die "cannot build benches/runner.c"
	echo "$1/runner"
}
