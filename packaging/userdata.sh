#!/bin/sh
# opsagent bootstrap, run as root from the instance userdata (cloud-init runs it once;
# running it again is harmless: nothing is downloaded, rewritten or restarted when the
# installed release, configuration and units are already as wanted).
#
# Input, as environment variables or as KEY=value lines placed before this script in
# the userdata:
#   WS_URI       backend WebSocket URL (ws:// or wss://)                  required
#   APP_ID       VisualOps app id                                         required
#   VERSION      agent release to install, e.g. 1.2.0                     required
#   BASE_REMOTE  release base URL; BASE_REMOTE/VERSION/opsagent.tgz        required
#   UPDATE_KEY   minisign public key (the base64 line of minisign.pub)    required
#   RECIPE_KEY   minisign public key(s) the backend signs recipes with (base64 lines,
#                blank-separated while rotating): the root helper then runs only states
#                of recipes they signed (README "Signed recipes"); unset: not verified
#   INSTANCE_ID  fixed instance id (else the daemon asks the metadata service)
#   METADATA_URL base URL of the cloud metadata service
#   HELPER_NETWORK yes (default): units/opsagent-helper-network.conf lifts the helper's
#                PrivateNetwork=; it only matters for commands run as the helper's children
#                (under systemd they run as transient units of their own, with the host's
#                network either way); no: keep the unit's PrivateNetwork=yes
#   STORAGE      no longer used: the storage states need no switch (their commands run in
#                units of their own); a storage drop-in or /etc/opsagent/helper.env left by
#                an earlier release is removed
#
# What it does: downloads opsagent.tgz and its minisign signature, refuses anything not
# signed by UPDATE_KEY for exactly this VERSION, checks the MANIFEST, installs into
# /opt/visualops/releases/VERSION and switches /opt/visualops/current atomically,
# creates the opsagent user, writes /etc/opsagent.conf and the instance token, then
# hands the agent to systemd (units, sysusers, tmpfiles, polkit rule), or, on hosts
# without systemd, to a root cron job (/etc/cron.d/opsagent → opsagent-supervise).
set -eu
umask 022
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH

PREFIX=/opt/visualops
CONF=/etc/opsagent.conf
STATE_DIR=/var/lib/visualops/opsagent
TOKEN_FILE=$STATE_DIR/token
LOG_DIR=/var/log/visualops
AGENT_USER=opsagent

log() { printf 'opsagent-userdata: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root"

# ---------------------------------------------------------------- input checks
WS_URI=${WS_URI:-}
APP_ID=${APP_ID:-}
VERSION=${VERSION:-}
BASE_REMOTE=${BASE_REMOTE:-}
UPDATE_KEY=${UPDATE_KEY:-}
RECIPE_KEY=${RECIPE_KEY:-}
INSTANCE_ID=${INSTANCE_ID:-}
METADATA_URL=${METADATA_URL:-}
HELPER_NETWORK=${HELPER_NETWORK:-yes}
STORAGE=${STORAGE:-}

need_match() { # NAME VALUE REGEX WHAT
    if [ -z "$2" ]; then die "$1 is not set ($4)"; fi
    if ! printf '%s' "$2" | grep -Eq "$3"; then die "$1=$2 is not $4"; fi
    case $2 in *'
'*) die "$1 contains a newline" ;; esac
}
need_match WS_URI "$WS_URI" '^wss?://[^"[:space:]]+$' "a ws:// or wss:// URL"
need_match APP_ID "$APP_ID" '^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$' "an app id (letters, digits, . _ -)"
need_match VERSION "$VERSION" '^[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}$' "a release version (e.g. 1.2.0)"
need_match BASE_REMOTE "$BASE_REMOTE" '^https?://[^"[:space:]]+$' "an http:// or https:// URL"
need_match UPDATE_KEY "$UPDATE_KEY" '^[A-Za-z0-9+/]{40,100}={0,2}$' "a minisign public key (base64 line)"
if [ -n "$RECIPE_KEY" ]; then
    need_match RECIPE_KEY "$RECIPE_KEY" '^[A-Za-z0-9+/]{40,100}={0,2}( [A-Za-z0-9+/]{40,100}={0,2})*$' \
        "one or more minisign public keys (base64 lines, separated by one space)"
fi
if [ -n "$INSTANCE_ID" ]; then
    need_match INSTANCE_ID "$INSTANCE_ID" '^[A-Za-z0-9][A-Za-z0-9._:-]{0,199}$' "an instance id"
fi
if [ -n "$METADATA_URL" ]; then
    need_match METADATA_URL "$METADATA_URL" '^https?://[^"[:space:]]+$' "an http:// or https:// URL"
fi
case $HELPER_NETWORK in yes|no) ;; *) die "HELPER_NETWORK=$HELPER_NETWORK is not yes or no" ;; esac
[ -z "$STORAGE" ] || log "STORAGE=$STORAGE is ignored: storage states need no switch any more"
BASE_REMOTE=${BASE_REMOTE%/}

# One run at a time (cloud-init and an operator re-running it by hand).
mkdir -p /run/lock 2>/dev/null || true
if command -v flock >/dev/null 2>&1; then
    exec 9>/run/lock/opsagent-userdata.lock
    flock -w 600 9 || die "another opsagent userdata run holds /run/lock/opsagent-userdata.lock"
fi

if [ -d /run/systemd/system ]; then HAVE_SYSTEMD=1; else HAVE_SYSTEMD=0; fi

# What changed in this run, to restart only what needs it.
CHANGED_RELEASE=0
CHANGED_CONFIG=0
CHANGED_UNITS=0
CHANGED_DROPIN=0

# ---------------------------------------------------------------- tools
pkg_install() { # PACKAGE...
    if command -v apt-get >/dev/null 2>&1; then
        log "installing $* with apt-get"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q "$@" >/dev/null 2>&1 || {
            apt-get update -q >/dev/null 2>&1 || true
            apt-get install -y -q "$@" >/dev/null
        }
    elif command -v dnf >/dev/null 2>&1; then
        log "installing $* with dnf"
        dnf install -y -q "$@" >/dev/null || {
            # minisign lives in EPEL on EL hosts.
            dnf install -y -q epel-release >/dev/null 2>&1 && dnf install -y -q "$@" >/dev/null
        }
    elif command -v yum >/dev/null 2>&1; then
        log "installing $* with yum"
        yum install -y -q "$@" >/dev/null || {
            yum install -y -q epel-release >/dev/null 2>&1 && yum install -y -q "$@" >/dev/null
        }
    else
        return 1
    fi
}

if command -v curl >/dev/null 2>&1; then
    fetch() { curl -fsSL --retry 5 --retry-delay 2 --retry-connrefused --connect-timeout 10 --max-time 300 -o "$2" "$1"; }
elif command -v wget >/dev/null 2>&1; then
    fetch() { wget -q --tries=5 --waitretry=2 --retry-connrefused --timeout=30 -O "$2" "$1"; }
else
    pkg_install curl || die "neither curl nor wget is available, and curl cannot be installed"
    fetch() { curl -fsSL --retry 5 --retry-delay 2 --retry-connrefused --connect-timeout 10 --max-time 300 -o "$2" "$1"; }
fi

# ---------------------------------------------------------------- release
RELEASES=$PREFIX/releases
RELEASE=$RELEASES/$VERSION

# Checks DIR against its MANIFEST: the version line, every sha256, and that the tree
# holds exactly the listed regular files (no symlink, device or extra file).
manifest_ok() { # DIR
    [ -f "$1/MANIFEST" ] || return 1
    [ "$(sed -n 1p "$1/MANIFEST")" = "version $VERSION" ] || return 1
    (
        cd "$1" || exit 1
        sed 1d MANIFEST | sha256sum -c --strict --quiet >/dev/null 2>&1 || exit 1
        [ -z "$(find . ! -type f ! -type d | head -n 1)" ] || exit 1
        listed=$(sed 1d MANIFEST | sed 's/^[0-9a-f]\{64\}  //' | LC_ALL=C sort)
        present=$(find . -type f ! -path ./MANIFEST | sed 's|^\./||' | LC_ALL=C sort)
        [ "$listed" = "$present" ] || exit 1
    )
}

if manifest_ok "$RELEASE"; then
    log "release $VERSION already installed in $RELEASE and intact"
else
    command -v minisign >/dev/null 2>&1 || pkg_install minisign ||
        die "minisign is not installed and cannot be installed; refusing to install an unverified release"
    command -v minisign >/dev/null 2>&1 || die "minisign is still missing; refusing to install an unverified release"

    mkdir -p "$RELEASES"
    WORK=$(mktemp -d "$RELEASES/.download.XXXXXX")
    trap 'rm -rf "$WORK"' EXIT
    URL=$BASE_REMOTE/$VERSION/opsagent.tgz
    log "downloading $URL"
    fetch "$URL" "$WORK/opsagent.tgz" || die "cannot download $URL"
    fetch "$URL.minisig" "$WORK/opsagent.tgz.minisig" || die "cannot download $URL.minisig"

    # The signature must verify with UPDATE_KEY, and its trusted (signed) comment must
    # name this exact version: a validly signed older release put at this URL is refused.
    out=$(minisign -V -P "$UPDATE_KEY" -m "$WORK/opsagent.tgz" -x "$WORK/opsagent.tgz.minisig" 2>&1) ||
        die "signature check of opsagent.tgz failed: $out"
    trusted=$(printf '%s\n' "$out" | sed -n 's/^Trusted comment: //p')
    [ "$trusted" = "opsagent release $VERSION" ] ||
        die "the signed comment is \"$trusted\", expected \"opsagent release $VERSION\"; refusing"
    log "signature verified ($trusted)"

    # Only opsagent-VERSION/..., only plain files and directories.
    listing=$(tar -tvzf "$WORK/opsagent.tgz") || die "opsagent.tgz is not a readable tar.gz"
    if printf '%s\n' "$listing" | cut -c1 | grep -qv '^[-d]$'; then
        die "opsagent.tgz holds something other than files and directories"
    fi
    names=$(tar -tzf "$WORK/opsagent.tgz")
    if printf '%s\n' "$names" | grep -v "^opsagent-$VERSION/" | grep -q .; then
        die "opsagent.tgz holds paths outside opsagent-$VERSION/"
    fi
    if printf '%s\n' "$names" | grep -Eq '(^|/)\.\.(/|$)'; then
        die "opsagent.tgz holds a .. path"
    fi
    mkdir "$WORK/x"
    tar -xzf "$WORK/opsagent.tgz" -C "$WORK/x" --no-same-owner --no-same-permissions
    STAGE=$WORK/x/opsagent-$VERSION
    manifest_ok "$STAGE" || die "MANIFEST of opsagent-$VERSION does not match its files"
    chown -R 0:0 "$STAGE"
    find "$STAGE" -type d -exec chmod 0755 {} +
    find "$STAGE" -type f -exec chmod 0644 {} +
    chmod 0755 "$STAGE"/bin/* "$STAGE/packaging/userdata.sh" "$STAGE/packaging/opsagent-supervise"

    # Swap into place with renames; a broken earlier copy of this version is replaced.
    if [ -e "$RELEASE" ]; then
        mv "$RELEASE" "$WORK/old"
    fi
    mv "$STAGE" "$RELEASE"
    rm -rf "$WORK"
    trap - EXIT
    CHANGED_RELEASE=1
    log "release $VERSION installed in $RELEASE"
fi

if [ "$(readlink "$PREFIX/current" 2>/dev/null || true)" != "releases/$VERSION" ]; then
    ln -sfn "releases/$VERSION" "$PREFIX/.current.new"
    mv -T "$PREFIX/.current.new" "$PREFIX/current"
    CHANGED_RELEASE=1
    log "$PREFIX/current -> releases/$VERSION"
fi
CUR=$PREFIX/current

# ---------------------------------------------------------------- files that must be identical
# install_file SRC DEST MODE [OWNER:GROUP]; returns 0 if it changed DEST.
install_file() {
    if [ -f "$2" ] && cmp -s "$1" "$2"; then
        chmod "$3" "$2"
        [ -z "${4:-}" ] || chown "$4" "$2"
        return 1
    fi
    tmp="$2.new.$$"
    cp "$1" "$tmp"
    chmod "$3" "$tmp"
    [ -z "${4:-}" ] || chown "$4" "$tmp"
    mv -f "$tmp" "$2"
    return 0
}

# as_agent CMD...: runs CMD as the agent user (what root creates for that user in the
# user's own directories, that user writes itself), with whichever tool the host has.
as_agent() {
    if command -v setpriv >/dev/null 2>&1; then
        setpriv --reuid="$AGENT_USER" --regid="$AGENT_USER" --init-groups --inh-caps=-all -- "$@"
    elif command -v runuser >/dev/null 2>&1; then
        runuser -u "$AGENT_USER" -- "$@"
    else
        cmdline=""
        for word in "$@"; do
            cmdline="$cmdline '$(printf '%s' "$word" | sed "s/'/'\\\\''/g")'"
        done
        su -s /bin/sh "$AGENT_USER" -c "$cmdline"
    fi
}

# ---------------------------------------------------------------- user and directories
if ! getent passwd "$AGENT_USER" >/dev/null 2>&1; then
    if command -v systemd-sysusers >/dev/null 2>&1; then
        mkdir -p /etc/sysusers.d
        install_file "$CUR/units/opsagent.sysusers" /etc/sysusers.d/opsagent.conf 0644 || true
        systemd-sysusers /etc/sysusers.d/opsagent.conf
    else
        nologin=$(command -v nologin || echo /sbin/nologin)
        useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home \
            --shell "$nologin" --comment "VisualOps agent" "$AGENT_USER"
    fi
    log "created the user $AGENT_USER"
elif command -v systemd-sysusers >/dev/null 2>&1; then
    mkdir -p /etc/sysusers.d
    install_file "$CUR/units/opsagent.sysusers" /etc/sysusers.d/opsagent.conf 0644 || true
fi
getent passwd "$AGENT_USER" >/dev/null || die "the user $AGENT_USER does not exist"

if [ "$HAVE_SYSTEMD" = 1 ] && command -v systemd-tmpfiles >/dev/null 2>&1; then
    mkdir -p /etc/tmpfiles.d
    install_file "$CUR/units/opsagent.tmpfiles" /etc/tmpfiles.d/opsagent.conf 0644 || true
    systemd-tmpfiles --create /etc/tmpfiles.d/opsagent.conf
else
    # The same owners and modes as units/opsagent.tmpfiles.
    install -d -m 0755 -o root -g root "$PREFIX" "$RELEASES" /var/lib/visualops
    install -d -m 0700 -o "$AGENT_USER" -g "$AGENT_USER" "$STATE_DIR"
    install -d -m 0700 -o root -g root /var/lib/opsagent-helper
    install -d -m 0750 -o "$AGENT_USER" -g "$AGENT_USER" "$LOG_DIR"
fi

# ---------------------------------------------------------------- manual pages, completion, catalog
# Under /usr/local: the package managers' files stay theirs (the .deb and .rpm install the
# same pages under /usr). Releases older than these files have none to install.
DOCS_CHANGED=0
if [ -d "$CUR/man" ]; then
    mkdir -p /usr/local/share/man/man8 /usr/local/share/bash-completion/completions
    for page in "$CUR"/man/*.8.gz; do
        if install_file "$page" "/usr/local/share/man/man8/${page##*/}" 0644; then DOCS_CHANGED=1; fi
    done
    if install_file "$CUR/completion/opsagent.bash" /usr/local/share/bash-completion/completions/opsagent 0644; then
        DOCS_CHANGED=1
    fi
    if [ -f "$CUR/completion/opsagent-root-tools.bash" ]; then
        for b in opsagent-helper opsagent-upgrade; do
            if install_file "$CUR/completion/opsagent-root-tools.bash" "/usr/local/share/bash-completion/completions/$b" 0644; then
                DOCS_CHANGED=1
            fi
        done
    fi
fi
if [ "$HAVE_SYSTEMD" = 1 ] && [ -f "$CUR/units/opsagent.catalog" ]; then
    # `journalctl -x` explains the agent's events (MESSAGE_ID) from this catalog. journald
    # reads catalogs only from /usr/lib and /usr/local/lib (never /etc/systemd/catalog).
    mkdir -p /usr/local/lib/systemd/catalog
    if install_file "$CUR/units/opsagent.catalog" /usr/local/lib/systemd/catalog/opsagent.catalog 0644; then
        DOCS_CHANGED=1
        journalctl --update-catalog >/dev/null 2>&1 || log "journalctl --update-catalog failed; catalog texts missing"
    fi
fi
[ "$DOCS_CHANGED" = 0 ] || log "installed the manual pages, the bash completion and the journal catalog"

# ---------------------------------------------------------------- configuration
NEWCONF=$(mktemp /etc/.opsagent.conf.XXXXXX)
{
    echo "; /etc/opsagent.conf, written by the opsagent userdata script."
    echo "; Run 'opsagent config-example' for every key with its default."
    echo "[userdata]"
    echo "ws_uri = \"$WS_URI\""
    echo "app_id = \"$APP_ID\""
    echo "version = \"$VERSION\""
    echo "base_remote = \"$BASE_REMOTE\""
    echo "update_key = \"$UPDATE_KEY\""
    [ -z "$RECIPE_KEY" ] || echo "recipe_key = \"$RECIPE_KEY\""
    [ -z "$INSTANCE_ID" ] || echo "instance_id = \"$INSTANCE_ID\""
    [ -z "$METADATA_URL" ] || echo "metadata_url = \"$METADATA_URL\""
} >"$NEWCONF"
if install_file "$NEWCONF" "$CONF" 0640 "root:$AGENT_USER"; then
    CHANGED_CONFIG=1
    log "wrote $CONF"
fi
rm -f "$NEWCONF"

# The instance token: 32 random bytes as hex, then the app it belongs to (the daemon's
# format; it makes a new token by itself if the app id changes).
# An instance the original agent set up keeps its token (an ssh-keygen RSA key in
# /etc/opsagent.token, root's alone): the backend knows the instance by it, and the
# daemon sends such a token exactly as it is. Root reads it; the agent user writes it.
ORIGINAL_TOKEN=/etc/opsagent.token
if [ ! -e "$TOKEN_FILE" ] && [ -f "$ORIGINAL_TOKEN" ] && [ ! -L "$ORIGINAL_TOKEN" ] && [ -s "$ORIGINAL_TOKEN" ]; then
    # shellcheck disable=SC2016 # expanded by the inner sh
    as_agent sh -c 'umask 077 && t=$(mktemp "$1/.token.XXXXXX") && cat >"$t" && mv -f "$t" "$1/token"' \
        sh "$STATE_DIR" <"$ORIGINAL_TOKEN" || die "cannot copy $ORIGINAL_TOKEN to $TOKEN_FILE as $AGENT_USER"
    log "kept the original agent's instance token $ORIGINAL_TOKEN as $TOKEN_FILE"
fi
if [ ! -e "$TOKEN_FILE" ]; then
    token=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')
    [ ${#token} -eq 64 ] || die "cannot read 32 random bytes"
    # Written by the agent user itself: its directory is its own, so any name root would
    # open, chown or rename there may be a link it planted to a file of root's.
    # shellcheck disable=SC2016 # expanded by the inner sh
    printf '%s\napp_id=%s\n' "$token" "$APP_ID" | as_agent sh -c \
        'umask 077 && t=$(mktemp "$1/.token.XXXXXX") && cat >"$t" && mv -f "$t" "$1/token"' sh "$STATE_DIR" ||
        die "cannot write the instance token $TOKEN_FILE as $AGENT_USER"
    log "created the instance token $TOKEN_FILE"
fi

# helper_dropin WANT SOURCE NAME WHAT: installs units/SOURCE as the helper unit's drop-in
# NAME when WANT is yes, removes it otherwise; records a change for the restart below.
helper_dropin() {
    dropin=/etc/systemd/system/opsagent-helper.service.d/$3
    if [ "$1" = yes ]; then
        mkdir -p "${dropin%/*}"
        if install_file "$CUR/units/$2" "$dropin" 0644; then
            CHANGED_DROPIN=1
            log "the helper gets $4 ($dropin)"
        fi
    elif [ -f "$dropin" ]; then
        rm -f "$dropin"
        CHANGED_DROPIN=1
        log "removed the helper's $4 ($dropin)"
    fi
}

# ---------------------------------------------------------------- supervision
if [ "$HAVE_SYSTEMD" = 1 ]; then
    for u in opsagent.service opsagent-helper.service opsagent-helper.socket opsagent-upgrade.service; do
        if install_file "$CUR/units/$u" "/etc/systemd/system/$u" 0644; then CHANGED_UNITS=1; fi
    done
    helper_dropin "$HELPER_NETWORK" opsagent-helper-network.conf 50-network.conf "network access"
    # Migration: the storage drop-in of earlier releases widened the whole helper.
    helper_dropin no opsagent-helper-storage.conf 60-storage.conf "access to the block devices"
    for d in /etc/polkit-1/rules.d /usr/share/polkit-1/rules.d; do
        if [ -d "$d" ]; then
            install_file "$CUR/polkit/50-opsagent.rules" "$d/50-opsagent.rules" 0644 || true
            break
        fi
    done
    # A cron supervisor from an earlier systemd-less install must not compete.
    if [ -f /etc/cron.d/opsagent ]; then
        rm -f /etc/cron.d/opsagent
        "$CUR/packaging/opsagent-supervise" stop || true
        log "removed the cron supervision of an earlier install"
    fi

    if [ "$CHANGED_UNITS" = 1 ] || [ "$CHANGED_DROPIN" = 1 ] ||
        [ "$(systemctl show -p NeedDaemonReload --value opsagent.service)" = yes ]; then
        systemctl daemon-reload
    fi
    systemctl enable --quiet opsagent-helper.socket opsagent.service
    if [ "$CHANGED_RELEASE" = 1 ] || [ "$CHANGED_UNITS" = 1 ]; then
        # New binaries or units: a full cycle, socket included (a socket's settings only
        # apply when it is re-created, and it cannot be while its service runs).
        was=$(systemctl is-active opsagent.service || true)
        systemctl stop opsagent.service opsagent-helper.service opsagent-helper.socket
        systemctl reset-failed opsagent.service 2>/dev/null || true
        if [ "$was" = active ]; then
            log "restarting opsagent (release or units changed)"
        else
            log "starting opsagent.service"
        fi
        systemctl start opsagent-helper.socket opsagent.service
    else
        systemctl start opsagent-helper.socket
        if [ "$CHANGED_DROPIN" = 1 ] || [ "$CHANGED_CONFIG" = 1 ]; then
            # The next connection activates the helper with its new settings (it reads
            # recipe_key from the configuration at start).
            systemctl try-restart opsagent-helper.service
        fi
        if systemctl is-active --quiet opsagent.service; then
            if [ "$CHANGED_CONFIG" = 1 ]; then
                log "restarting opsagent.service (configuration changed)"
                systemctl restart opsagent.service
            else
                log "opsagent.service is running and up to date; not restarted"
            fi
        else
            systemctl reset-failed opsagent.service 2>/dev/null || true
            log "starting opsagent.service"
            systemctl start opsagent.service
        fi
    fi
    systemctl is-active --quiet opsagent.service || die "opsagent.service did not start; see journalctl -u opsagent"
    log "done: opsagent.service is $(systemctl is-active opsagent.service)"
else
    log "no systemd: supervising with cron (/etc/cron.d/opsagent)"
    CRONLINE="* * * * * root $CUR/packaging/opsagent-supervise >/dev/null 2>&1"
    NEWCRON=$(mktemp /etc/.opsagent.cron.XXXXXX)
    {
        echo "# opsagent supervision without systemd: (re)starts the helper and the agent."
        echo "SHELL=/bin/sh"
        echo "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        echo "$CRONLINE"
    } >"$NEWCRON"
    mkdir -p /etc/cron.d
    install_file "$NEWCRON" /etc/cron.d/opsagent 0644 root:root || true
    rm -f "$NEWCRON"
    # Migration: earlier releases' STORAGE=yes switch (the helper needs none now).
    CHANGED_HELPER_ENV=0
    if [ -f /etc/opsagent/helper.env ]; then
        rm -f /etc/opsagent/helper.env
        CHANGED_HELPER_ENV=1
        log "removed /etc/opsagent/helper.env (the storage switch is gone)"
    fi
    command -v cron >/dev/null 2>&1 || command -v crond >/dev/null 2>&1 ||
        log "WARNING: no cron daemon found; install cron, or the agent is not restarted when it dies"
    if [ "$CHANGED_RELEASE" = 1 ] || [ "$CHANGED_CONFIG" = 1 ] || [ "$CHANGED_HELPER_ENV" = 1 ]; then
        "$CUR/packaging/opsagent-supervise" restart
    else
        "$CUR/packaging/opsagent-supervise"
    fi
    log "done: supervised by cron"
fi
