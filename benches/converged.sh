#!/usr/bin/env bash
# A realistic converged round, the same 67 states expressed once per tool, measured on
# the same host with nothing left to change:
#   5 packages (already installed), 1 group, 1 user, 5 cron jobs, 15 directories,
#   30 files, 8 symbolic links, 1 git checkout of a local repository, 1 guarded command
# opsagent (`opsagent apply`, private helper, and `--helper-socket` against a running
# helper, as deployed), Salt (`salt-call --local state.apply`), Ansible
# (`ansible-playbook -c local`) and Puppet (`puppet apply`).
#
#   sudo bash benches/converged.sh            # 7 interleaved runs per tool
#   RUNS=3 TOOLS="opsagent salt" sudo bash benches/converged.sh
#
# Environment:
#   RUNS            timed runs per tool (median taken)               [7]
#   TOOLS           tools measured      [opsagent opsagent-running salt ansible puppet]
#   SALT_VERSION    Salt release from PyPI                            [3008.3]
#   SALT_VENV       virtualenv for Salt (shared with vs_salt.sh) [/var/tmp/opsagent-bench/salt-venv]
#   ANSIBLE_VENV    virtualenv for ansible-core [/var/tmp/opsagent-bench/ansible-venv]
#   OPSAGENT_BIN    opsagent binary (opsagent-helper next to it)     [target/release/opsagent]
#   BENCH_TSV       also append raw rows here (tool run wall_s cpu_s rss_kib)
#
# Every tool converges its own copy (own directory tree, own user, group and crontab:
# bench-<tool>), the packages are shared. Each is applied once untimed to converge and
# once more untimed to check that nothing is left to change (a converged run of each
# tool must report no change), then the timed runs go round robin (opsagent, salt,
# ansible, puppet, opsagent, ...) so every tool sees the same phases of a shared
# machine. Wall time around the run; CPU time: user + system from wait4's rusage, which
# covers the whole process tree (every process the tool starts is waited for by its
# parent, so its rusage is added to its parent's and, in the end, to the child the
# runner waits for); peak RSS: ru_maxrss (the largest single process).
# Each tool gets its usual best case: Salt with warm caches and terse output, Ansible
# without fact gathering, Puppet as Debian ships it (facter runs, as it always does).
# Equivalents: cron jobs are Salt's cron.present, Ansible's cron, Puppet's cron
# (puppet-module-puppetlabs-cron-core); the checkout is Salt's git.latest, Ansible's
# git, Puppet's vcsrepo with ensure => latest (puppet-module-puppetlabs-vcsrepo): each
# fetches from the remote every run, as opsagent's common.git does.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUNS=${RUNS:-7}
TOOLS=${TOOLS:-"opsagent opsagent-running salt ansible puppet"}
SALT_VERSION=${SALT_VERSION:-3008.3}
SALT_VENV=${SALT_VENV:-/var/tmp/opsagent-bench/salt-venv}
ANSIBLE_VENV=${ANSIBLE_VENV:-/var/tmp/opsagent-bench/ansible-venv}
OPSAGENT_BIN=${OPSAGENT_BIN:-$ROOT/target/release/opsagent}
BENCH_TSV=${BENCH_TSV:-}
PACKAGES="bash coreutils gzip sed tar"

BENCH=converged
# shellcheck source=benches/lib.sh
. "$ROOT/benches/lib.sh"
need_root "every tool manages users, crontabs and packages"
need_bins "$(dirname "$OPSAGENT_BIN")" "$(basename "$OPSAGENT_BIN")" opsagent-helper

apt_install() {
	say "installing $* with apt-get"
	DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
has() { case " $TOOLS " in *" $1 "*) return 0 ;; *) return 1 ;; esac }

# --- prerequisites -------------------------------------------------------------------------
command -v git >/dev/null || apt_install git
command -v crontab >/dev/null || apt_install cron
venv() { # DIR PIP-SPEC CHECK-CMD...
	local dir=$1 spec=$2
	shift 2
	"$@" >/dev/null 2>&1 && return 0
	rm -rf "$dir"
	mkdir -p "$(dirname "$dir")"
	python3 -m venv "$dir" >/dev/null 2>&1 || { rm -rf "$dir" && apt_install python3-venv && python3 -m venv "$dir"; }
	say "installing $spec from PyPI into $dir"
	"$dir/bin/pip" install --quiet --disable-pip-version-check "$spec" || die "pip install $spec failed"
}
if has salt; then
	venv "$SALT_VENV" "salt==$SALT_VERSION" sh -c "'$SALT_VENV/bin/salt-call' --version | grep -q '$SALT_VERSION'"
fi
if has ansible; then
	venv "$ANSIBLE_VENV" ansible-core "$ANSIBLE_VENV/bin/ansible-playbook" --version
	# Ansible's apt module runs under the system's python3 and needs its apt bindings.
	/usr/bin/python3 -c 'import apt' 2>/dev/null || apt_install python3-apt
fi
if has puppet; then
	command -v puppet >/dev/null || apt_install puppet
	[ -d /usr/share/puppet/modules/cron_core ] || apt_install puppet-module-puppetlabs-cron-core
	[ -d /usr/share/puppet/modules/vcsrepo ] || apt_install puppet-module-puppetlabs-vcsrepo
fi
for p in $PACKAGES; do
	dpkg-query -W -f '${db:Status-Status}' "$p" 2>/dev/null | grep -qx installed || die "package $p is not installed"
done

WORK=$(mktemp -d /var/tmp/opsagent-converged.XXXXXX)
HELPER_PID=
cleanup() {
	if [ -n "$HELPER_PID" ]; then
		kill "$HELPER_PID" 2>/dev/null || true
		wait "$HELPER_PID" 2>/dev/null || true
	fi
	local t
	for t in opsagent salt ansible puppet; do
		crontab -u "bench-$t" -r 2>/dev/null || true
		userdel "bench-$t" 2>/dev/null || true
		groupdel "bgrp-$t" 2>/dev/null || true
	done
	rm -rf "$WORK"
}
trap cleanup EXIT
RUNNER=$(build_runner "$WORK")

# --- the round, once per tool ------------------------------------------------------------
# A bare repository with one commit: the checkout's remote.
git init -q --bare "$WORK/src.git"
git init -q "$WORK/seed"
printf 'hello\n' >"$WORK/seed/README"
git -C "$WORK/seed" add README
git -C "$WORK/seed" -c user.name=bench -c user.email=bench@localhost commit -q -m one
git -C "$WORK/seed" push -q "$WORK/src.git" HEAD:refs/heads/master
git -C "$WORK/src.git" symbolic-ref HEAD refs/heads/master

python3 - "$WORK" "$PACKAGES" <<'EOF'
import json, sys
work, packages = sys.argv[1], sys.argv[2].split()
DIRS, FILES, LINKS, JOBS = 15, 30, 8, 5

def layout(tool):
    base = f"{work}/tree/{tool}"
    dirs = [f"{base}/d{i}" for i in range(DIRS)]
    files = [(f"{dirs[i % DIRS]}/f{i}.conf", f"# file {i}\nkey{i} = value{i}\n") for i in range(FILES)]
    links = [(f"{base}/l{i}", files[i][0]) for i in range(LINKS)]
    jobs = [(f"/bin/true bench-job-{k}", str(k * 10)) for k in range(JOBS)]
    return dict(base=base, dirs=dirs, files=files, links=links, jobs=jobs, user=f"bench-{tool}",
                group=f"bgrp-{tool}", checkout=f"{base}/checkout", marker=f"{base}/guard-done",
                repo=f"{work}/src.git")

# opsagent recipe
t = layout("opsagent")
s = [{"id": f"pkg-{p}", "module": "linux.apt.package", "parameter": {"name": [{"key": p, "value": ""}]}} for p in packages]
s.append({"id": "group", "module": "linux.group", "parameter": {"groupname": t["group"]}})
s.append({"id": "user", "module": "linux.user", "parameter": {"username": t["user"], "groups": [t["group"]],
          "home": t["base"] + "/home", "shell": "/bin/sh"}})
s += [{"id": f"cron-{k}", "module": "linux.cronjob", "parameter": {"user": t["user"], "cmd": [c], "minute": m}}
      for k, (c, m) in enumerate(t["jobs"])]
s += [{"id": f"dir-{i}", "module": "linux.dir", "parameter": {"path": [d], "mode": "0755"}} for i, d in enumerate(t["dirs"])]
s += [{"id": f"file-{i}", "module": "linux.file", "parameter": {"path": p, "content": c, "mode": "0644"}}
      for i, (p, c) in enumerate(t["files"])]
s += [{"id": f"link-{i}", "module": "linux.symlink", "parameter": {"target": l, "source": f}}
      for i, (l, f) in enumerate(t["links"])]
s.append({"id": "checkout", "module": "common.git", "parameter": {"path": t["checkout"], "repo": t["repo"], "revision": "master"}})
s.append({"id": "guarded", "module": "linux.cmd", "parameter": {"cmd": f"touch {t['marker']}", "cwd": "/",
          "if-path-absent": [t["marker"]]}})
assert len(s) == 67, len(s)
json.dump({"recipe_version": 1, "state": s}, open(f"{work}/recipe.json", "w"), indent=1)

# Salt SLS (#!json: no Jinja, no YAML)
t = layout("salt")
sls = {f"pkg-{p}": {"pkg.installed": [{"name": p}]} for p in packages}
sls["group"] = {"group.present": [{"name": t["group"]}]}
sls["user"] = {"user.present": [{"name": t["user"]}, {"groups": [t["group"]]}, {"home": t["base"] + "/home"},
               {"shell": "/bin/sh"}, {"createhome": False}, {"require": [{"group": "group"}]}]}
for k, (c, m) in enumerate(t["jobs"]):
    sls[f"cron-{k}"] = {"cron.present": [{"name": c}, {"user": t["user"]}, {"minute": m}, {"require": [{"user": "user"}]}]}
for i, d in enumerate(t["dirs"]):
    sls[f"dir-{i}"] = {"file.directory": [{"name": d}, {"mode": "0755"}, {"makedirs": True}]}
for i, (p, c) in enumerate(t["files"]):
    sls[f"file-{i}"] = {"file.managed": [{"name": p}, {"contents": c}, {"mode": "0644"}, {"makedirs": True}]}
for i, (l, f) in enumerate(t["links"]):
    sls[f"link-{i}"] = {"file.symlink": [{"name": l}, {"target": f}, {"makedirs": True}]}
sls["checkout"] = {"git.latest": [{"name": t["repo"]}, {"target": t["checkout"]}, {"rev": "master"}]}
sls["guarded"] = {"cmd.run": [{"name": f"touch {t['marker']}"}, {"creates": t["marker"]}, {"cwd": "/"}]}
assert len(sls) == 67, len(sls)
with open(f"{work}/converged.sls", "w") as f:
    f.write("#!json\n")
    json.dump(sls, f, indent=1)

# Ansible playbook (JSON is YAML)
t = layout("ansible")
tasks = [{"name": f"pkg-{p}", "ansible.builtin.apt": {"name": p, "state": "present"}} for p in packages]
tasks.append({"name": "group", "ansible.builtin.group": {"name": t["group"]}})
tasks.append({"name": "user", "ansible.builtin.user": {"name": t["user"], "groups": [t["group"]], "home": t["base"] + "/home",
              "shell": "/bin/sh", "create_home": False}})
tasks += [{"name": f"cron-{k}", "ansible.builtin.cron": {"name": f"job-{k}", "job": c, "user": t["user"], "minute": m}}
          for k, (c, m) in enumerate(t["jobs"])]
tasks += [{"name": f"dir-{i}", "ansible.builtin.file": {"path": d, "state": "directory", "mode": "0755"}}
          for i, d in enumerate(t["dirs"])]
tasks += [{"name": f"file-{i}", "ansible.builtin.copy": {"dest": p, "content": c, "mode": "0644"}}
          for i, (p, c) in enumerate(t["files"])]
tasks += [{"name": f"link-{i}", "ansible.builtin.file": {"path": l, "src": f, "state": "link"}}
          for i, (l, f) in enumerate(t["links"])]
tasks.append({"name": "checkout", "ansible.builtin.git": {"repo": t["repo"], "dest": t["checkout"], "version": "master"}})
tasks.append({"name": "guarded", "ansible.builtin.command": {"cmd": f"touch {t['marker']}", "creates": t["marker"], "chdir": "/"}})
assert len(tasks) == 67, len(tasks)
json.dump([{"hosts": "localhost", "gather_facts": False, "tasks": tasks}], open(f"{work}/playbook.yml", "w"), indent=1)

# Puppet manifest
t = layout("puppet")
q = json.dumps  # a JSON string is a valid double-quoted Puppet string for these values
m = [f"package {{ {q(p)}: ensure => installed }}" for p in packages]
m.append(f"group {{ {q(t['group'])}: ensure => present }}")
m.append(f"user {{ {q(t['user'])}: ensure => present, groups => [{q(t['group'])}], home => {q(t['base'] + '/home')},"
         f" shell => '/bin/sh', managehome => false, require => Group[{q(t['group'])}] }}")
m += [f"cron {{ 'job-{k}': command => {q(c)}, user => {q(t['user'])}, minute => {q(m_)}, require => User[{q(t['user'])}] }}"
      for k, (c, m_) in enumerate(t["jobs"])]
m.append(f"file {{ {q(t['base'])}: ensure => directory }}")
m += [f"file {{ {q(d)}: ensure => directory, mode => '0755' }}" for d in t["dirs"]]
m += [f"file {{ {q(p)}: ensure => file, content => {q(c)}, mode => '0644' }}" for p, c in t["files"]]
m += [f"file {{ {q(l)}: ensure => link, target => {q(f)} }}" for l, f in t["links"]]
m.append(f"vcsrepo {{ {q(t['checkout'])}: ensure => latest, provider => git, source => {q(t['repo'])}, revision => 'master' }}")
m.append(f"exec {{ 'guarded': command => {q('touch ' + t['marker'])}, creates => {q(t['marker'])}, path => '/usr/bin:/bin' }}")
# The base directory is Puppet's only extra resource (it does not create parents).
assert len(m) == 68, len(m)
open(f"{work}/manifest.pp", "w").write("\n".join(m) + "\n")
EOF

# The parents of every tree exist beforehand (Puppet does not create parents).
mkdir -p "$WORK/tree"

# --- Salt: masterless minion -----------------------------------------------------------------
mkdir -p "$WORK/salt/conf" "$WORK/salt/roots" "$WORK/salt/cache" "$WORK/salt/pki" "$WORK/salt/run"
mv "$WORK/converged.sls" "$WORK/salt/roots/converged.sls"
cat >"$WORK/salt/conf/minion" <<EOF
id: bench
file_client: local
file_roots:
  base:
    - $WORK/salt/roots
root_dir: $WORK/salt
cachedir: $WORK/salt/cache
pki_dir: $WORK/salt/pki
sock_dir: $WORK/salt/run
pidfile: $WORK/salt/run/minion.pid
log_file: $WORK/salt/minion.log
log_level_logfile: warning
grains_cache: True
EOF

# --- Ansible: its own home and temp dirs ---------------------------------------------------------
export ANSIBLE_HOME=$WORK/ansible ANSIBLE_LOCAL_TEMP=$WORK/ansible/tmp ANSIBLE_NOCOLOR=1 \
	ANSIBLE_RETRY_FILES_ENABLED=0 ANSIBLE_PYTHON_INTERPRETER=/usr/bin/python3 \
	ANSIBLE_LOCALHOST_WARNING=0 ANSIBLE_INVENTORY_UNPARSED_WARNING=0 LC_ALL=C.UTF-8

# --- opsagent: a helper started once and left running, as the packaged agent has it -------------
mkdir -p "$WORK/helper-state"
if has opsagent-running; then
	"$(dirname "$OPSAGENT_BIN")/opsagent-helper" --socket "$WORK/helper.sock" --state-dir "$WORK/helper-state" \
		2>"$WORK/helper.log" &
	HELPER_PID=$!
	for _ in $(seq 100); do [ -S "$WORK/helper.sock" ] && break; sleep 0.05; done
	[ -S "$WORK/helper.sock" ] || die "the helper did not create its socket: $(tail -5 "$WORK/helper.log")"
fi

cmdline() { # TOOL: the command of one run
	case $1 in
	opsagent) echo "$OPSAGENT_BIN" apply "$WORK/recipe.json" ;;
	opsagent-running) echo "$OPSAGENT_BIN" apply --helper-socket "$WORK/helper.sock" "$WORK/recipe.json" ;;
	salt) echo "$SALT_VENV/bin/salt-call" --local -c "$WORK/salt/conf" --retcode-passthrough --state-output=terse \
		state.apply converged ;;
	ansible) echo "$ANSIBLE_VENV/bin/ansible-playbook" -c local -i localhost, "$WORK/playbook.yml" ;;
	puppet) echo puppet apply --detailed-exitcodes --color=false "$WORK/manifest.pp" ;;
	esac
}

# converged TOOL LOG: did that run change nothing?
converged() {
	case $1 in
	opsagent*) [ "$(grep -c '^ok .*(no change)$' "$2")" = 67 ] ;;
	salt) grep -qE '^Succeeded: 67 *$' "$2" ;;
	ansible) grep -qE 'localhost +: ok=67 +changed=0 .*failed=0' "$2" ;;
	puppet) true ;; # --detailed-exitcodes: 0 = no change, 2 = changes (refused below)
	esac
}

# measure TOOL LOG: one run; prints "wall_s cpu_s rss_kib"; exits on failure or change.
# benches/runner.c forks and execs the tool and reaps it with wait4: wall time
# around it, and the rusage of the whole reaped tree at microsecond resolution (GNU time
# prints 10 ms).
measure() {
	local tool=$1 log=$2 out rc=0
	# shellcheck disable=SC2046 # the command line is words without spaces
	out=$("$RUNNER" "$log" $(cmdline "$tool")) || rc=$?
	if [ "$rc" != 0 ]; then
		say "converged: $tool failed (exit $rc):"
		tail -30 "$log" >&2
		exit 1
	fi
	echo "$out"
}

say "converged: opsagent $("$OPSAGENT_BIN" --version | awk '{print $2}'), tools: $TOOLS, runs: $RUNS"
for tool in $TOOLS; do
	[ "$tool" = opsagent-running ] && continue # the same tree as opsagent
	say "  $tool: converging (untimed)"
	# shellcheck disable=SC2046
	$(cmdline "$tool") >"$WORK/converge-$tool.log" 2>&1 || [ "$tool" = puppet ] || {
		tail -30 "$WORK/converge-$tool.log" >&2
		die "$tool could not converge the round"
	}
done
for tool in $TOOLS; do
	measure "$tool" "$WORK/check-$tool.log" >/dev/null
	converged "$tool" "$WORK/check-$tool.log" || {
		tail -30 "$WORK/check-$tool.log" >&2
		die "$tool: a second run still changed something (see above)"
	}
	say "  $tool: converged (a second run changed nothing)"
done

declare -A WALLS CPUS RSSS
for ((i = 1; i <= RUNS; i++)); do
	for tool in $TOOLS; do
		out=$(measure "$tool" "$WORK/run-$tool.log")
		converged "$tool" "$WORK/run-$tool.log" || die "$tool: run $i changed something"
		read -r wall cpu rss <<<"$out"
		[ -z "$BENCH_TSV" ] || printf '%s\t%s\t%s\t%s\t%s\n' "$tool" "$i" "$wall" "$cpu" "$rss" >>"$BENCH_TSV"
		say "  $tool run $i/$RUNS: wall $wall s, cpu $cpu s, ${rss} KiB (load $(cut -d' ' -f1 /proc/loadavg))"
		WALLS[$tool]+="$wall"$'\n'
		CPUS[$tool]+="$cpu"$'\n'
		RSSS[$tool]+="$rss"$'\n'
	done
done

median() { sort -g | awk 'NF { v[++n] = $1 } END { if (n % 2) print v[(n + 1) / 2]; else printf "%.4f\n", (v[n / 2] + v[n / 2 + 1]) / 2 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.0f", a / b; else print "inf" }'; }
declare -A WALL CPU RSS
for tool in $TOOLS; do
	WALL[$tool]=$(printf '%s' "${WALLS[$tool]}" | median)
	CPU[$tool]=$(printf '%s' "${CPUS[$tool]}" | median)
	RSS[$tool]=$(printf '%s' "${RSSS[$tool]}" | median)
done

echo
echo "== converged round: 67 states, nothing to change (median of $RUNS interleaved runs) =="
printf '%-17s %9s %9s %9s %12s %11s\n' tool wall_s cpu_s RSS_MiB "wall/opsagent" "cpu/opsagent"
for tool in $TOOLS; do
	cpu_ratio="$(ratio "${CPU[$tool]}" "${CPU[opsagent]:-0}")x"
	# The running helper is not the CLI's child: its CPU time is not in the tree measured.
	[ "$tool" != opsagent-running ] || cpu_ratio=-
	printf '%-17s %9.4f %9.4f %9.1f %11sx %11s\n' "$tool" "${WALL[$tool]}" "${CPU[$tool]}" \
		"$(awk -v k="${RSS[$tool]}" 'BEGIN { print k / 1024 }')" \
		"$(ratio "${WALL[$tool]}" "${WALL[opsagent]:-0}")" "$cpu_ratio"
done
echo "(opsagent-running: CPU and RSS of the CLI alone; the helper it talks to runs on its own)"
echo "(CPU: user + system of the whole process tree, from wait4; the machine may be shared: see load in the log)"
if has salt && has opsagent; then
	w=$(ratio "${WALL[salt]}" "${WALL[opsagent]}") c=$(ratio "${CPU[salt]}" "${CPU[opsagent]}")
	echo "target: opsagent >= 100x Salt on a converged round: wall ${w}x, cpu ${c}x" \
		"($(awk -v w="$w" -v c="$c" 'BEGIN { print (w >= 100 && c >= 100) ? "met" : "MISSED" }'))"
fi
