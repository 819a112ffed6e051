#!/usr/bin/env bash
# System tests of the RPM side and of common.ssh.known_host, for real, on a Debian
# bookworm container booted with systemd-nspawn whose package managers include Debian's
# `rpm` and `dnf` (a cached root derived from the one of lib.sh): an rpm database and a
# dnf of its own, as on an RPM host, beside dpkg (no Fedora mirror is reachable from CI;
# everything dnf installs here comes from repositories this script builds). Run as root:
#
#   bash tests/system/rpm_states.sh
#
# Built on the host: test RPMs (rpmbuild), a GPG key (gpg, no passphrase) that signs
# some of them (rpmsign), and createrepo_c repositories; the freshly built `opsagent` and
# `opsagent-helper` copied in, recipes applied with `opsagent apply FILE` (a private root
# helper; commands as transient units), an HTTP server on the host's loopback (the
# container shares the host's network) for the URL values the daemon downloads.
#
# Checks: linux.rpm.key from an http URL (downloaded by the daemon) and from a file, the
# second seeing the key already imported; linux.yum.repo `content` for a signed `file://`
# repository (gpgcheck=1); linux.yum.package from it pinned, upgraded with `latest`,
# removed, each re-applied with no change; an unsigned package in the signed repository
# refused while verify-gpg holds, installed with verify-gpg false; linux.yum.repo
# `rpm-url` (a repo-release RPM) from an http URL, then the same from a file (no change),
# and a package from the repository it installed; linux.yum.package values that are an
# http URL (downloaded by the daemon) and a local .rpm; `yum` where it is dnf (Amazon
# Linux 2023, RHEL 8+: the module takes `yum` when there is no dnf). The agent's own .rpm
# (packaging/build-rpm, from the debug build to keep the test quick): `rpm -qpl`, `rpm -K`,
# installed with rpm (--nodeps: this rpm database holds no systemd; the dpkg side does),
# `rpm -V` clean, the user, directories, link and units, not started without a
# configuration; removed, nothing left. common.ssh.known_host against a real sshd on the
# loopback: host keys scanned and written, ssh itself then trusts the host; a fingerprint
# (SHA256, MD5) selects the key; a wrong one fails naming the found ones and writes
# nothing; `absent` removes.
#
# Drift cycles of plan mode (issue 19; `cycle` in cycle.sh, as plan_states.sh): the host
# drifted by hand (the key deleted from rpm's database, a .repo file edited and removed,
# the repo-release package erased, a package absent, older than its pin, present when
# `removed`, a local .rpm erased; the host missing from and present in known_hosts) -> the
# plan (`opsagent apply --test`) names the change in the apply's words and exits 3, a walk
# of /etc/yum.repos.d, /etc/pki, rpm's database (%_dbpath; SQLite's -shm index aside, see
# walk) and /var/lib/dnf (for known_host: the users' ~/.ssh) unchanged -> the apply makes
# it -> a plan exits 0 with nothing to change. About 20 s of the run.
#
# Ends with "N passed, M failed"; exits non-zero on any failure. The container is
# stopped and removed on exit (by pid, see lib.sh). OPSAGENT_SYSTEST_KEEP=1 keeps logs.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
# shellcheck source=tests/system/lib.sh
source "$HERE/lib.sh"
# shellcheck source=tests/system/checks.sh
source "$HERE/checks.sh" rpm
# shellcheck source=tests/system/cycle.sh
source "$HERE/cycle.sh"
HTTP_PID=""

# The package repository's HTTP server, before the containers go.
before_cleanup() {
    [ -z "$HTTP_PID" ] || { kill -TERM "$HTTP_PID"; wait "$HTTP_PID"; } 2>/dev/null
}

install_host_tools systemd-nspawn:systemd-container debootstrap:debootstrap nsenter:util-linux \
    rpmbuild:rpm rpmsign:rpm createrepo_c:createrepo-c gpg:gnupg python3:python3

ensure_rootfs

# ---------------------------------------------------------------- the RPM root
# The cached root plus rpm, dnf and OpenSSH (server and client), built once. ssh.service
# is masked: the containers share the host's network, and the test starts its own sshd
# on a free loopback port.
derived_rootfs_finish() {
    ln -sf /dev/null "$1/etc/systemd/system/ssh.service"
    ln -sf /dev/null "$1/etc/systemd/system/ssh.socket"
}
ensure_derived_rootfs bookworm-rpm-r1 "rpm dnf openssh-server openssh-client" \
    usr/bin/rpm usr/bin/dnf usr/sbin/sshd usr/bin/ssh-keyscan

say "building opsagent, opsagent-helper, opsagent-upgrade (debug)"
(cd "$REPO" && cargo build --locked -q -p opsagent --bin opsagent -p opsagent-helper --bin opsagent-helper --bin opsagent-upgrade) \
    >"$WORK/build.log" 2>&1 || { tail -n 30 "$WORK/build.log" >&2; exit 1; }
BIN_DIR=${CARGO_TARGET_DIR:-$REPO/target}/debug

# ---------------------------------------------------------------- test RPMs, key, repositories
R=$WORK/rpms
mkdir -p "$R/signed" "$R/rel" "$R/http" "$R/files" "$R/spec"
# mkrpm NAME VERSION [FILE CONTENT]: a noarch package that installs
# /usr/share/NAME/version (and FILE with CONTENT when given).
mkrpm() {
    local name=$1 ver=$2 file=${3:-} content=${4:-} extra_install="" extra_files=""
    if [ -n "$file" ]; then
        extra_install="mkdir -p %{buildroot}$(dirname "$file")
cat >%{buildroot}$file <<'CONTENT'
$content
CONTENT"
        extra_files=$file
    fi
    cat >"$R/spec/$name-$ver.spec" <<EOF
Name: $name
Version: $ver
Release: 1
Summary: opsagent test package $name
License: MIT
BuildArch: noarch
%description
A package built by tests/system/rpm_states.sh.
%install
mkdir -p %{buildroot}/usr/share/$name
echo $ver >%{buildroot}/usr/share/$name/version
$extra_install
%files
/usr/share/$name/version
$extra_files
EOF
    rpmbuild --quiet -bb --define "_topdir $R/top" --define "_rpmdir $R/out" "$R/spec/$name-$ver.spec"
    find "$R/out" -name "$name-$ver-1.noarch.rpm"
}
GNUPGHOME=$WORK/gnupg
export GNUPGHOME
install -d -m 0700 "$GNUPGHOME"
gpg --batch --quiet --passphrase '' --quick-gen-key 'opsagent rpm test <rpm-test@example.invalid>' rsa2048 sign never
gpg --batch --armor --export rpm-test@example.invalid >"$R/m-test.asc"
# (rpm's macros name gpg2 on some builds: the gpg found here, explicitly.)
sign() {
    rpmsign --define '_gpg_name rpm-test@example.invalid' --define "_gpg_path $GNUPGHOME" \
        --define "__gpg $(command -v gpg)" --addsign "$@" >/dev/null
    local f
    for f in "$@"; do
        [ "$(rpm -qp --qf '%{RSAHEADER:pgpsig}' "$f" 2>/dev/null)" != "(none)" ] || { echo "rpmsign did not sign $f" >&2; return 1; }
    done
}
{
    cp "$(mkrpm m-hello 1.0)" "$(mkrpm m-hello 1.1)" "$R/signed/"
    sign "$R"/signed/m-hello-*.rpm
    cp "$(mkrpm m-unsigned 1.0)" "$R/signed/"
    createrepo_c -q "$R/signed"
    cp "$(mkrpm m-relpkg 1.0)" "$(mkrpm m-yum 1.0)" "$R/rel/"
    createrepo_c -q "$R/rel"
    # The repo-release package: a .repo file, as epel-release and its kind install.
    cp "$(mkrpm m-rel 1.0 /etc/yum.repos.d/m-rel.repo "$(printf '[m-rel]\nname=m-rel\nbaseurl=file:///srv/rpms/rel\ngpgcheck=0')")" "$R/http/"
    cp "$(mkrpm m-url 1.0)" "$R/http/"
    cp "$R/m-test.asc" "$R/http/"
    cp "$(mkrpm m-url 1.1)" "$R/files/"
} >"$WORK/rpmbuild.log" 2>&1 || { tail -n 30 "$WORK/rpmbuild.log" >&2; exit 1; }
# (set -e does not act inside a `||` list: what the block must have made is checked here.)
for f in signed/m-hello-1.0-1.noarch.rpm signed/m-hello-1.1-1.noarch.rpm; do
    [ "$(rpm -qp --qf '%{RSAHEADER:pgpsig}' "$R/$f" 2>/dev/null)" != "(none)" ] ||
        { tail -n 30 "$WORK/rpmbuild.log" >&2; say "$f is not signed"; exit 1; }
done
for f in signed/m-unsigned-1.0-1.noarch.rpm signed/repodata/repomd.xml rel/m-relpkg-1.0-1.noarch.rpm rel/m-yum-1.0-1.noarch.rpm \
    rel/repodata/repomd.xml http/m-rel-1.0-1.noarch.rpm http/m-url-1.0-1.noarch.rpm http/m-test.asc files/m-url-1.1-1.noarch.rpm; do
    [ -s "$R/$f" ] || { tail -n 30 "$WORK/rpmbuild.log" >&2; say "the test repositories lack $f"; exit 1; }
done

python3 -u -m http.server --bind 127.0.0.1 --directory "$R/http" 0 >"$WORK/http.out" 2>"$WORK/http.err" &
HTTP_PID=$!
wait_until 15 "HTTP server" grep -q 'port [0-9]' "$WORK/http.out"
HTTP=http://127.0.0.1:$(sed -n 's/.* port \([0-9]*\).*/\1/p' "$WORK/http.out" | head -n 1)

# ---------------------------------------------------------------- the container
C=rpm
boot $C
ROOT=$(croot $C)
install -m 0755 "$BIN_DIR/opsagent" "$BIN_DIR/opsagent-helper" "$ROOT/usr/local/bin/"
mkdir -p "$ROOT/srv/rpms" "$ROOT/srv/keys"
cp -a "$R/signed" "$R/rel" "$R/files" "$ROOT/srv/rpms/"
cp "$R/http/m-rel-1.0-1.noarch.rpm" "$ROOT/srv/rpms/"
install -m 0644 "$R/m-test.asc" "$ROOT/srv/keys/m-test.asc"
chown -R 0:0 "$ROOT/srv"

# ---------------------------------------------------------------- helpers (as helper_states.sh)
apply() { # NAME JSON-STATES: applies a recipe of those states; output in $WORK/NAME.out
    local name=$1 states=$2 rc=0
    printf '{"recipe_version": 1, "state": [%s]}\n' "$states" >"$ROOT/root/$name.json"
    cexec $C opsagent apply "/root/$name.json" >"$WORK/$name.out" 2>&1 || rc=$?
    { echo "== $name (exit $rc)"; cat "$WORK/$name.out"; } | tee -a "$WORK/apply.log" >&2
    return "$rc"
}
fails() { ! apply "$@"; }
no_change() { grep -q '^ok ' "$WORK/$1.out" && ! grep -E '^(ok|FAILED)' "$WORK/$1.out" | grep -qv '(no change)'; }
changed() { grep -q '^ok ' "$WORK/$1.out" && ! no_change "$1"; }
in_c() { csh $C "$1"; }
setup() {
    if ! csh $C "$1" >>"$WORK/checks.log" 2>&1; then
        FAILED=$((FAILED + 1))
        FAILURES+=("setup: $1")
        say "  FAIL: setup: $1"
    fi
}
rpm_has() { in_c "rpm -q --qf '%{VERSION}-%{RELEASE}\n' $1 | grep -qx '$2'"; }
rpm_lacks() { ! in_c "rpm -q $1"; }
pkg() { # NAME VALUE [EXTRA-PARAMS]
    printf '{"id": "p", "module": "linux.yum.package", "parameter": {"name": [{"key": "%s", "value": "%s"}]%s}}' "$1" "$2" "${3:-}"
}

# The drift cycles' walk (tests/system/cycle.sh), of WALK_DIRS (each section sets them:
# what its modules write). Not checksummed (listed still): SQLite's shared-memory WAL
# index, *.sqlite-shm beside rpm's and dnf's databases, which every reader of the database
# writes its read mark into: seen changed by the plans that read a package file with
# `rpm -qp` (rpm opens its database for the keys), with the database and its -wal file
# unchanged. It is a cache SQLite rebuilds, not data.
WALK_SQLITE_SHM=skip

# ---------------------------------------------------------------- linux.rpm.key
say "== linux.rpm.key"
KEY_URL='{"id": "k", "module": "linux.rpm.key", "parameter": {"path": "'"$HTTP"'/m-test.asc"}}'
KEY_FILE='{"id": "k", "module": "linux.rpm.key", "parameter": {"path": "/srv/keys/m-test.asc"}}'
check "rpm.key: from an http URL (downloaded by the daemon): imported" apply key1 "$KEY_URL"
check "rpm.key: the URL import changed something" changed key1
check "rpm.key: rpm holds the key" in_c 'rpm -q gpg-pubkey'
check "rpm.key: the same key from a file: no change" apply key2 "$KEY_FILE"
check "rpm.key: no change (the key is known)" no_change key2
check "rpm.key: one key in rpm's database" in_c '[ "$(rpm -q gpg-pubkey | wc -l)" = 1 ]'

# ---------------------------------------------------------------- linux.yum.repo content + packages
say "== linux.yum.repo (content) and linux.yum.package from a signed repository"
REPO_SIGNED='{"id": "r", "module": "linux.yum.repo", "parameter": {"name": "m-signed", "content": "[m-signed]\nname=m-signed\nbaseurl=file:///srv/rpms/signed\ngpgcheck=1\nenabled=1\n"}}'
check "yum.repo: content written" apply repo1 "$REPO_SIGNED"
check "yum.repo: /etc/yum.repos.d/m-signed.repo" in_c 'grep -qx "gpgcheck=1" /etc/yum.repos.d/m-signed.repo'
check "yum.repo: again: no change" apply repo2 "$REPO_SIGNED"
check "yum.repo: again: no change (output)" no_change repo2
check "yum.package: pinned 1.0 from the signed repository" apply y1 "$(pkg m-hello 1.0 ', "repo": "m-signed"')"
check "yum.package: m-hello 1.0-1 installed" rpm_has m-hello 1.0-1
check "yum.package: the installed package carries our signature" in_c "rpm -qi m-hello | grep -q '^Signature *: RSA.*Key ID .*$(gpg --batch --with-colons --list-keys rpm-test@example.invalid 2>/dev/null | awk -F: '/^pub/ {print tolower(substr($5, 9))}')'"
check "yum.package: pinned again: no change" apply y2 "$(pkg m-hello 1.0)"
check "yum.package: pinned again: no change (output)" no_change y2
check "yum.package: latest upgrades" apply y3 "$(pkg m-hello latest)"
check "yum.package: m-hello 1.1-1 installed" rpm_has m-hello 1.1-1
check "yum.package: latest says 1.0-1 -> 1.1-1" out_has y3 "1.0-1 -> 1.1-1"
check "yum.package: latest again: no change" apply y4 "$(pkg m-hello latest)"
check "yum.package: latest again: no change (output)" no_change y4
check "yum.package: unsigned package in a gpgcheck repository refused (verify-gpg)" fails y5 "$(pkg m-unsigned '')"
check "yum.package: the unsigned package is not installed" rpm_lacks m-unsigned
check "yum.package: verify-gpg false installs it" apply y6 "$(pkg m-unsigned '' ', "verify-gpg": false')"
check "yum.package: m-unsigned installed" rpm_has m-unsigned 1.0-1
check "yum.package: removed" apply y7 "$(pkg m-hello removed)"
check "yum.package: m-hello gone" rpm_lacks m-hello
check "yum.package: removed again: no change" apply y8 "$(pkg m-hello removed)"
check "yum.package: removed again: no change (output)" no_change y8

# ---------------------------------------------------------------- linux.yum.repo rpm-url
say "== linux.yum.repo (rpm-url) and packages from the repository it installs"
check "yum.repo: rpm-url from an http URL (downloaded by the daemon)" apply rel1 \
    '{"id": "r", "module": "linux.yum.repo", "parameter": {"name": "m-rel", "rpm-url": "'"$HTTP"'/m-rel-1.0-1.noarch.rpm"}}'
check "yum.repo: the repo-release package is installed" rpm_has m-rel 1.0-1
check "yum.repo: its .repo file is in place" in_c '[ -f /etc/yum.repos.d/m-rel.repo ]'
check "yum.repo: the same package from a file: no change" apply rel2 \
    '{"id": "r", "module": "linux.yum.repo", "parameter": {"name": "m-rel", "rpm-url": "file:///srv/rpms/m-rel-1.0-1.noarch.rpm"}}'
check "yum.repo: rpm-url again: no change (output)" no_change rel2
check "yum.package: a package of the repository the release package added" apply rel3 "$(pkg m-relpkg '' ', "repo": "m-rel"')"
check "yum.package: m-relpkg installed" rpm_has m-relpkg 1.0-1

# ---------------------------------------------------------------- .rpm values
say "== linux.yum.package with .rpm values (an http URL, a local file)"
check "yum.package: .rpm from an http URL (downloaded by the daemon)" apply u1 "$(pkg m-url "$HTTP/m-url-1.0-1.noarch.rpm")"
check "yum.package: m-url 1.0-1 installed" rpm_has m-url 1.0-1
check "yum.package: same URL again: no change" apply u2 "$(pkg m-url "$HTTP/m-url-1.0-1.noarch.rpm")"
check "yum.package: same URL again: no change (output)" no_change u2
check "yum.package: a local .rpm file upgrades" apply u3 "$(pkg m-url /srv/rpms/files/m-url-1.1-1.noarch.rpm)"
check "yum.package: m-url 1.1-1 installed" rpm_has m-url 1.1-1
apply u4 "$(pkg m-url "$HTTP/m-missing-1.0-1.noarch.rpm")" || true
check "yum.package: a missing URL: the failed download names it" out_has u4 "$HTTP/m-missing-1.0-1.noarch.rpm"

# ---------------------------------------------------------------- yum where it is dnf
say "== yum where it is dnf (no dnf command, yum is dnf)"
setup 'mv /usr/bin/dnf /usr/bin/yum'
check "yum: a package installed through the yum command" apply yum1 "$(pkg m-yum '' ', "repo": "m-rel"')"
check "yum: m-yum installed" rpm_has m-yum 1.0-1
check "yum: dnf's history names yum's transaction" in_c 'yum history list m-yum | grep -qi install'
setup 'mv /usr/bin/yum /usr/bin/dnf'

# ---------------------------------------------------------------- drift cycles (issue 19)
# Each module above, planned with `opsagent apply --test` on a host drifted by hand: the plan
# names the change in the apply's words (exit 3) and the walk of what these modules write
# (the .repo files, /etc/pki, rpm's and dnf's databases) is unchanged; the apply makes it;
# a plan then finds nothing (exit 0). `cycle`: tests/system/cycle.sh.
say "== drift cycles: linux.rpm.key, linux.yum.repo, linux.yum.package"
WALK_DIRS="/etc/yum.repos.d /etc/pki $(in_c 'rpm --eval %_dbpath') /var/lib/dnf"
setup 'rpm -e --allmatches gpg-pubkey'
check "cycle setup: rpm holds no key" rpm_lacks gpg-pubkey
cycle rpm-key "$KEY_FILE" "/srv/keys/m-test.asc: key imported"
check "rpm-key: rpm holds the key again" in_c 'rpm -q gpg-pubkey'

setup 'sed -i "s/^gpgcheck=1$/gpgcheck=0/" /etc/yum.repos.d/m-signed.repo'
cycle yum-repo-content "$REPO_SIGNED" "/etc/yum.repos.d/m-signed.repo: content updated"
check "yum-repo-content: gpgcheck=1 again" in_c 'grep -qx "gpgcheck=1" /etc/yum.repos.d/m-signed.repo'
setup 'rm /etc/yum.repos.d/m-signed.repo'
cycle yum-repo-absent "$REPO_SIGNED" "/etc/yum.repos.d/m-signed.repo: file created (0644 0:0)"

# The repo-release package removed (its .repo file goes with it).
setup 'rpm -e m-rel'
REL_FILE='{"id": "r", "module": "linux.yum.repo", "parameter": {"name": "m-rel", "rpm-url": "file:///srv/rpms/m-rel-1.0-1.noarch.rpm"}}'
cycle yum-repo-rpm "$REL_FILE" "/srv/rpms/m-rel-1.0-1.noarch.rpm: installed m-rel 1.0-1"
check "yum-repo-rpm: its .repo file is back" in_c '[ -f /etc/yum.repos.d/m-rel.repo ]'

# m-hello was removed above: pinned (the version as rpm names it), upgraded by a new pin,
# removed; then 1.0 again by hand and `latest` (the plan names the version check-update
# offers, from dnf's metadata cache).
check "cycle setup: m-hello is not installed" rpm_lacks m-hello
cycle yum-pkg-install "$(pkg m-hello 1.0-1 ', "repo": "m-signed"')" "m-hello: installed 1.0-1"
check "yum-pkg-install: m-hello 1.0-1 installed" rpm_has m-hello 1.0-1
cycle yum-pkg-pin-up "$(pkg m-hello 1.1-1 ', "repo": "m-signed"')" "m-hello: 1.0-1 -> 1.1-1"
check "yum-pkg-pin-up: m-hello 1.1-1 installed" rpm_has m-hello 1.1-1
cycle yum-pkg-removed "$(pkg m-hello removed)" "m-hello: removed"
check "yum-pkg-removed: m-hello gone" rpm_lacks m-hello
setup 'rpm -i /srv/rpms/signed/m-hello-1.0-1.noarch.rpm'
cycle yum-pkg-latest "$(pkg m-hello latest ', "repo": "m-signed"')" "m-hello: 1.0-1 -> 1.1-1"
check "yum-pkg-latest: m-hello 1.1-1 installed" rpm_has m-hello 1.1-1
setup 'rpm -e m-hello'
# A local .rpm (its version read from the file by the plan).
setup 'rpm -e m-url'
cycle yum-pkg-file "$(pkg m-url /srv/rpms/files/m-url-1.1-1.noarch.rpm)" "m-url: installed 1.1-1"
check "yum-pkg-file: m-url 1.1-1 installed" rpm_has m-url 1.1-1

# ---------------------------------------------------------------- the agent's .rpm
say "== the agent's .rpm (packaging/build-rpm)"
VERSION=$(sed -n '/^\[workspace\.package\]/,/^\[/s/^version *= *"\([^"]*\)".*/\1/p' "$REPO/Cargo.toml" | head -n 1)
# The debug binaries without their debug sections (about 390 MB with them: minutes of
# payload compression for nothing the test looks at).
mkdir -p "$WORK/bin"
for b in opsagent opsagent-helper opsagent-upgrade; do
    strip -o "$WORK/bin/$b" "$BIN_DIR/$b" 2>/dev/null || cp "$BIN_DIR/$b" "$WORK/bin/$b"
done
AGENT_RPM=$(BIN_DIR=$WORK/bin OPSAGENT_SKIP_BUILD=1 "$REPO/packaging/build-rpm" "$WORK/agent-rpm" 2>>"$WORK/rpmbuild.log") ||
    { tail -n 20 "$WORK/rpmbuild.log" >&2; exit 1; }
rpm -qpl "$AGENT_RPM" >"$WORK/agent-rpm.list"
cat "$WORK/agent-rpm.list" >&2
list_has() { grep -qx -- "$1" "$WORK/agent-rpm.list"; }
for f in /opt/visualops/releases/$VERSION/bin/opsagent /opt/visualops/releases/$VERSION/bin/opsagent-helper \
    /opt/visualops/releases/$VERSION/bin/opsagent-upgrade /opt/visualops/releases/$VERSION/MANIFEST \
    /opt/visualops/releases/$VERSION/packaging/opsagent-supervise \
    /usr/lib/systemd/system/opsagent.service /usr/lib/systemd/system/opsagent-helper.socket \
    /usr/lib/systemd/system/opsagent-helper.service /usr/lib/systemd/system/opsagent-upgrade.service \
    /usr/lib/sysusers.d/opsagent.conf /usr/lib/tmpfiles.d/opsagent.conf /usr/share/polkit-1/rules.d/50-opsagent.rules \
    /usr/share/man/man8/opsagent.8.gz /usr/share/man/man8/opsagent-helper.8.gz /usr/share/man/man8/opsagent-upgrade.8.gz \
    /usr/share/bash-completion/completions/opsagent /usr/share/bash-completion/completions/opsagent-helper \
    /usr/share/bash-completion/completions/opsagent-upgrade /usr/lib/systemd/catalog/opsagent.catalog; do
    check "agent rpm: rpm -qpl lists $f" list_has "$f"
done
check "agent rpm: /opt/visualops/current is not a file of the package" bash -c "! grep -q '^/opt/visualops/current' '$WORK/agent-rpm.list'"
check "agent rpm: rpm -K: digests OK" bash -c "rpm -K '$AGENT_RPM' | grep -q 'digests OK'"
check "agent rpm: requires systemd" bash -c "rpm -qpR '$AGENT_RPM' | grep -q '^systemd >= 247'"
cp "$AGENT_RPM" "$ROOT/root/opsagent.rpm"
# --nodeps: this rpm database holds only what the tests installed; systemd and libc are
# the dpkg side's.
check "agent rpm: installs" in_c 'rpm -i --nodeps /root/opsagent.rpm'
check "agent rpm: rpm -V clean (files; --nodeps as above)" in_c 'rpm -V --nodeps opsagent'
check "agent rpm: /opt/visualops/current -> releases/$VERSION" in_c "[ \"\$(readlink /opt/visualops/current)\" = releases/$VERSION ]"
check "agent rpm: the opsagent user (sysusers), no login shell" in_c 'getent passwd opsagent | grep -q nologin'
check "agent rpm: its state directory (tmpfiles)" in_c '[ "$(stat -c "%U %a" /var/lib/visualops/opsagent)" = "opsagent 700" ]'
check "agent rpm: systemd loads its units" in_c 'systemctl show -p LoadState --value opsagent.service opsagent-helper.socket | sort -u | grep -qx loaded'
check "agent rpm: not started without /etc/opsagent.conf" in_c '! systemctl is-active --quiet opsagent.service && ! systemctl is-enabled --quiet opsagent.service'
check "agent rpm: the journal catalog knows its entries" in_c 'journalctl --list-catalog | grep -qi opsagent'
check "agent rpm: the manual page is a manual page" in_c 'zcat /usr/share/man/man8/opsagent.8.gz | grep -q "^\.TH"'
check "agent rpm: the packaged binary runs" in_c '/opt/visualops/current/bin/opsagent --version'
check "agent rpm: removes" in_c 'rpm -e opsagent'
check "agent rpm: nothing of the package left" in_c "[ ! -e /opt/visualops/releases/$VERSION ] && [ ! -e /opt/visualops/current ] &&
    [ ! -e /usr/lib/systemd/system/opsagent.service ] && [ ! -e /usr/lib/sysusers.d/opsagent.conf ] && ! rpm -q opsagent"
check "agent rpm: systemd forgot its units" in_c '[ "$(systemctl show -p LoadState --value opsagent.service)" = not-found ]'

# ---------------------------------------------------------------- common.ssh.known_host
say "== common.ssh.known_host against a real sshd on the loopback"
SSH_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
setup "mkdir -p /run/sshd && systemd-run --unit m-sshd --collect /usr/sbin/sshd -D -p $SSH_PORT -o ListenAddress=127.0.0.1"
wait_until 20 "sshd on 127.0.0.1:$SSH_PORT" in_c "ssh-keyscan -T 2 -p $SSH_PORT 127.0.0.1 | grep -q ssh-" || true
setup 'useradd -m kh'
FIELD="[127.0.0.1]:$SSH_PORT"
KH='"hostname": "127.0.0.1", "port": '$SSH_PORT
known() { printf '{"id": "kh", "module": "common.ssh.known_host", "parameter": {%s%s}}' "$KH" "$1"; }
check "known_host: root, no fingerprint: the host's keys written" apply kh1 "$(known ', "username": "root"')"
check "known_host: every key sshd serves is in root's known_hosts" in_c \
    "for k in /etc/ssh/ssh_host_*_key.pub; do grep -qF \"\$(cut -d' ' -f2 \$k)\" /root/.ssh/known_hosts || exit 1; done"
check "known_host: ssh-keygen -F finds $FIELD" in_c "ssh-keygen -F '$FIELD' -f /root/.ssh/known_hosts | grep -q ssh-"
# With the host key trusted, ssh gets as far as authentication (no key: refused there).
in_c "ssh -o StrictHostKeyChecking=yes -o BatchMode=yes -o PasswordAuthentication=no -p $SSH_PORT root@127.0.0.1 true" \
    >"$WORK/ssh.out" 2>&1 || true
cat "$WORK/ssh.out" >&2
check "known_host: ssh trusts the host (no host key failure)" bash -c "! grep -qi 'host key verification failed' '$WORK/ssh.out' && grep -q 'Permission denied' '$WORK/ssh.out'"
check "known_host: again: no change" apply kh2 "$(known ', "username": "root"')"
check "known_host: again: no change (output)" no_change kh2
ED_SHA=$(in_c 'ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub' | awk '{print $2}')
ED_MD5=$(in_c 'ssh-keygen -E md5 -lf /etc/ssh/ssh_host_ed25519_key.pub' | awk '{print $2}')
check "known_host: a SHA256 fingerprint and encrypt_algorithm select the ed25519 key" apply kh3 \
    "$(known ', "username": "kh", "encrypt_algorithm": "ssh-ed25519", "fingerprint": "'"$ED_SHA"'"')"
check "known_host: kh's known_hosts holds exactly that key, owned by kh" in_c \
    "[ \"\$(wc -l </home/kh/.ssh/known_hosts)\" = 1 ] && grep -qF \"\$(cut -d' ' -f2 /etc/ssh/ssh_host_ed25519_key.pub)\" /home/kh/.ssh/known_hosts &&
     [ \"\$(stat -c %U /home/kh/.ssh/known_hosts)\" = kh ]"
check "known_host: the MD5 form of the same fingerprint: no change" apply kh4 \
    "$(known ', "username": "kh", "encrypt_algorithm": "ssh-ed25519", "fingerprint": "'"$ED_MD5"'"')"
check "known_host: MD5 form: no change (output)" no_change kh4
in_c 'cp /home/kh/.ssh/known_hosts /root/kh-before'
check "known_host: a wrong fingerprint fails" fails kh5 \
    "$(known ', "username": "kh", "fingerprint": "SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"')"
check "known_host: the failure names the fingerprints found" out_has kh5 "found: MD5:"
check "known_host: the wrong fingerprint wrote nothing" in_c 'cmp -s /root/kh-before /home/kh/.ssh/known_hosts'
check "known_host: absent removes the host" apply kh6 "$(known ', "username": "root", "absent": true')"
check "known_host: root's known_hosts no longer names $FIELD" in_c "! ssh-keygen -F '$FIELD' -f /root/.ssh/known_hosts"

# Drift cycles: root's known_hosts without the host (the absent state above removed it),
# then with it, for an absent state. The walk: both users' ~/.ssh.
say "== drift cycles: common.ssh.known_host"
WALK_DIRS="/root/.ssh /home/kh/.ssh"
NKEYS=$(in_c 'ls /etc/ssh/ssh_host_*_key.pub | wc -l')
cycle known-host "$(known ', "username": "root"')" "/root/.ssh/known_hosts: $FIELD: $NKEYS key(s) written"
check "known-host: ssh-keygen -F finds $FIELD again" in_c "ssh-keygen -F '$FIELD' -f /root/.ssh/known_hosts | grep -q ssh-"
cycle known-host-absent "$(known ', "username": "root", "absent": true')" "/root/.ssh/known_hosts: $FIELD removed"
check "known-host-absent: $FIELD gone" in_c "! ssh-keygen -F '$FIELD' -f /root/.ssh/known_hosts"
setup 'systemctl stop m-sshd'

# ---------------------------------------------------------------- summary
SUMMARY_PRINTED=1
if [ "$FAILED" -gt 0 ]; then
    printf 'failed: %s\n' "${FAILURES[@]}" >&2
fi
echo "time: ${SECONDS}s"
echo "$PASSED passed, $FAILED failed"
[ "$FAILED" = 0 ]
