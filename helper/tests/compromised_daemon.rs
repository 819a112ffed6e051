//! The "compromised daemon" suite (issue 15): a client speaking the helper protocol as
//! the agent's uid, against a real helper with a restrictive policy, tries every module
//! with hostile parameters. Every attempt outside the grant must be refused — denied by
//! the policy, or refused when the request is decoded — with the reason in the helper's
//! log; the few attempts inside the grant show the policy does not simply refuse all.
//!
//! The attacker half runs in a child process under the agent's uid (`attacker_child`,
//! re-run of this test binary, as `socket.rs` does for its outsider). It writes what it
//! got back to a file; the parent checks it against the helper's log and writes the
//! table of attempts to `target/tmp/compromised-daemon-attempts.md`.
//!
//! These tests need root, as the helper does.
// The harness starts real tools (a registry, supervisorctl, the test binary itself);
// states inside the helper still run programs through exec only (helper/clippy.toml).
#![allow(clippy::disallowed_methods)]
#![allow(clippy::unwrap_used)]

mod policy_support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use opsagent_proto::catalogue::MODULES;
use opsagent_proto::request::{ErrorCode, Reply};
use policy_support::{apply_json, Client, Helper, AGENT_GID, AGENT_UID};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

const CHILD_ENV: &str = "OPSAGENT_HELPER_TEST_COMPROMISED_DIR";

/// Modules the policy does not grant at all; every other helper module is granted,
/// so that most attempts reach the footprint rules rather than the module list.
const NOT_GRANTED: &[&str] = &[
    "linux.cmd",
    "linux.docker.pulled",
    "linux.docker.pushed",
    "linux.mesos.master",
    "common.timezone",
    "linux.selinux",
];

fn policy(dir: &Path) -> String {
    let modules: Vec<&str> =
        MODULES.iter().filter(|m| !m.builtin && !NOT_GRANTED.contains(&m.name)).map(|m| m.name).collect();
    format!(
        "# The compromised-daemon suite's policy: no commands, writes under one tree.\n\
         modules = {}\nwrite_prefixes = {}\nunits = web\npackages = nginx\ndevices = /dev/xvdz\n\
         interpreters = /usr/bin/python3-granted\n",
        modules.join(" "),
        dir.join("allowed").display()
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Expect {
    /// Outside the grant: denied by the policy, or refused at decode.
    Refused,
    /// A value no state may receive: refused when the request is decoded
    /// (`invalid-parameter`), whatever the policy would say of it.
    Invalid,
    /// Inside the grant: the policy lets it through (the module may still fail).
    Granted,
}

struct Attempt {
    module: &'static str,
    what: String,
    /// The request's JSON (built here, sent raw by the child).
    request: Value,
    expect: Expect,
}

/// What the child got back for one attempt.
#[derive(Debug, Serialize, Deserialize)]
struct Got {
    outcome: String,
    code: Option<ErrorCode>,
    reason: String,
}

/// An attempt before it becomes a request: module, what, catalogue parameters, the
/// raw values written over them, and what must happen.
type Draft = (&'static str, &'static str, Value, Vec<(&'static str, Value)>, Expect);

/// Every attempt, numbered by position (state id `a-N`). `dir` is the helper's test
/// directory: `allowed/` is the granted tree, `outside/` is not, `allowed/escape` is
/// a link to `outside`.
fn attempts(dir: &Path) -> Vec<Attempt> {
    let p = |name: &str| dir.join(name).display().to_string();
    let (a, o) = (p("allowed"), p("outside"));
    let d = |k: &str, v: &str| json!([{"key": k, "value": v}]);
    let mut list: Vec<Draft> = Vec::new();
    let mut deny = |m: &'static str, what: &'static str, raw: Value| list.push((m, what, raw, vec![], Expect::Refused));
    // linux.cmd: not granted at all.
    deny("linux.cmd", "run id as root", json!({"cmd": "id"}));
    deny("linux.cmd", "run as nobody in the granted tree", json!({"cmd": "true", "user": "nobody", "cwd": a}));
    deny("linux.cmd", "shell is a file in the granted tree", json!({"cmd": "true", "shell": format!("{a}/evil")}));
    // linux.file
    deny("linux.file", "write /etc/ld.so.preload", json!({"path": "/etc/ld.so.preload", "content": "/x.so\n"}));
    deny("linux.file", "write outside the prefixes", json!({"path": format!("{o}/x"), "content": "x"}));
    deny("linux.file", "write through a link in the granted tree", json!({"path": format!("{a}/escape/x")}));
    deny(
        "linux.file",
        "set-uid root binary in the granted tree",
        json!({"path": format!("{a}/rootsh"), "mode": "04755", "user": "root"}),
    );
    deny("linux.file", "set-gid binary in the granted tree", json!({"path": format!("{a}/sgid"), "mode": "02755"}));
    deny("linux.file", "sudoers drop-in", json!({"path": "/etc/sudoers.d/opsagent", "content": "ALL\n"}));
    deny("linux.file", "root's authorized_keys", json!({"path": "/root/.ssh/authorized_keys", "content": "k"}));
    deny("linux.file", "absent: remove /etc/passwd", json!({"path": "/etc/passwd", "absent": true}));
    // linux.dir
    deny("linux.dir", "one granted, one /etc/cron.d", json!({"path": [format!("{a}/ok"), "/etc/cron.d"]}));
    deny("linux.dir", "create /root/.ssh owned by nobody", json!({"path": ["/root/.ssh"], "user": "nobody"}));
    deny("linux.dir", "through a link in the granted tree", json!({"path": [format!("{a}/escape/sub")]}));
    deny("linux.dir", "chown / recursively", json!({"path": ["/"], "user": "nobody", "recursive": true}));
    deny("linux.dir", "remove /etc", json!({"path": ["/etc"], "absent": true}));
    // linux.symlink
    deny(
        "linux.symlink",
        "link /etc/ld.so.preload",
        json!({"target": "/etc/ld.so.preload", "source": format!("{a}/evil")}),
    );
    deny("linux.symlink", "link outside the prefixes", json!({"target": format!("{o}/l"), "source": a}));
    deny("linux.symlink", "replace a binary in PATH", json!({"target": "/usr/local/bin/sudo", "source": a}));
    // common.archive
    deny("common.archive", "extract into /etc", json!({"path": "/etc", "source": "https://h/a.tgz"}));
    deny("common.archive", "extract outside the prefixes", json!({"path": o, "source": "https://h/a.tgz"}));
    deny("common.archive", "extract through a link", json!({"path": format!("{a}/escape/x"), "source": "https://h/a"}));
    // linux.service (units = web)
    deny("linux.service", "restart a unit not granted", json!({"name": ["sshd"]}));
    deny("linux.service", "a command as the action", json!({"name": d("web", "rm -rf /")}));
    deny("linux.service", "a unit name with ..", json!({"name": ["../../etc/x"]}));
    deny("linux.service", "keyword plus command", json!({"name": d("web", "restart; id")}));
    deny("linux.service", "a template unit not granted", json!({"name": ["getty@tty1"]}));
    // linux.apt.package (packages = nginx)
    deny("linux.apt.package", "a local .deb", json!({"name": d("evil", &format!("{a}/evil.deb"))}));
    deny("linux.apt.package", "a file:// .deb", json!({"name": d("evil", &format!("file://{a}/evil.deb"))}));
    deny("linux.apt.package", "verify-gpg off", json!({"name": ["nginx"], "verify-gpg": false}));
    deny("linux.apt.package", "a package not granted", json!({"name": ["sudo"]}));
    deny("linux.apt.package", "debconf file /etc/shadow", json!({"name": ["nginx"], "deb-conf-file": "/etc/shadow"}));
    deny("linux.apt.package", "a remote .deb", json!({"name": d("x", "http://evil/x.deb")}));
    // linux.yum.package
    deny("linux.yum.package", "a local .rpm", json!({"name": d("evil", &format!("{a}/evil.rpm"))}));
    deny("linux.yum.package", "verify-gpg off", json!({"name": ["nginx"], "verify-gpg": false}));
    deny("linux.yum.package", "a package not granted", json!({"name": ["bash"]}));
    // Package sources and keys
    deny("linux.apt.repo", "a trusted=yes source", json!({"name": "x", "content": "deb [trusted=yes] http://e/ ./"}));
    deny("linux.apt.repo", "a name with ..", json!({"name": "../../../etc/cron.d/x", "content": "* * * * * root id"}));
    deny("linux.apt.ppa", "an attacker's PPA", json!({"name": "ppa:evil/ppa"}));
    deny("linux.yum.repo", "gpgcheck off", json!({"name": "e", "content": "[e]\nbaseurl=http://e/\ngpgcheck=0\n"}));
    deny("linux.yum.repo", "a release rpm from the tree", json!({"name": "e", "rpm-url": format!("{a}/e.rpm")}));
    deny("linux.rpm.key", "trust a key from the tree", json!({"path": format!("{a}/key.asc")}));
    // linux.user / linux.group
    deny("linux.user", "uid 0", json!({"username": "toor", "password": "x", "uid": "0"}));
    deny("linux.user", "gid 0", json!({"username": "toor", "password": "x", "gid": "0"}));
    deny("linux.user", "root's password", json!({"username": "root", "password": "$6$known"}));
    deny("linux.user", "into sudo", json!({"username": "nobody", "password": "x", "groups": ["sudo"]}));
    deny("linux.user", "into docker", json!({"username": "nobody", "password": "x", "groups": ["docker"]}));
    deny("linux.user", "into shadow", json!({"username": "nobody", "password": "x", "groups": ["shadow"]}));
    deny("linux.user", "into opsagent", json!({"username": "nobody", "password": "x", "groups": ["opsagent"]}));
    deny("linux.user", "into group 0", json!({"username": "nobody", "password": "x", "groups": ["0"]}));
    deny("linux.user", "home /etc", json!({"username": "u", "password": "x", "home": "/etc"}));
    deny("linux.user", "into users,wheel", json!({"username": "nobody", "password": "x", "groups": ["users,wheel"]}));
    deny("linux.group", "sudo's gid to nogroup's", json!({"groupname": "sudo", "gid": "65534"}));
    deny("linux.group", "a new gid 0", json!({"groupname": "g0", "gid": "0"}));
    deny("linux.group", "docker", json!({"groupname": "docker"}));
    deny("linux.group", "opsagent", json!({"groupname": "opsagent", "gid": "65534"}));
    // linux.cronjob
    deny("linux.cronjob", "a root job", json!({"cmd": ["id > /tmp/p"], "user": "root"}));
    deny("linux.cronjob", "a job as nobody", json!({"cmd": ["id"], "user": "nobody"}));
    // common.timezone: not granted.
    deny("common.timezone", "set UTC", json!({"name": "UTC"}));
    deny("common.timezone", "a zone name that is a path", json!({"name": "../../../etc/shadow"}));
    // Storage (devices = /dev/xvdz)
    deny("linux.mkfs", "format /dev/sda", json!({"device": "/dev/sda", "fstype": "ext4"}));
    deny("linux.mkfs", "format a file in the tree", json!({"device": format!("{a}/disk.img"), "fstype": "ext4"}));
    let mount = |dev: &str, fs: &str, opts: &str, path: &str| json!({"device": dev, "filesystem": fs, "opts": opts, "path": path});
    deny("linux.mount", "bind /etc into the tree", mount("/etc", "none", "bind", &format!("{a}/etc")));
    deny("linux.mount", "rbind / into the tree", mount("/", "none", "rbind", &format!("{a}/root")));
    deny("linux.mount", "loop option", mount(&format!("{a}/disk.img"), "ext4", "loop", &format!("{a}/m1")));
    deny("linux.mount", "a file as the device", mount(&format!("{a}/disk.img"), "ext4", "", &format!("{a}/m2")));
    deny("linux.mount", "overlay over /etc", mount("overlay", "overlay", "lowerdir=/etc", &format!("{a}/ov")));
    deny("linux.mount", "tmpfs over /etc", mount("tmpfs", "tmpfs", "size=1m", "/etc"));
    deny("linux.mount", "granted device, mount point outside", mount("/dev/xvdz", "ext4", "", &format!("{o}/m")));
    deny("linux.mount", "an image in /dev/shm", mount("/dev/shm/img", "ext4", "", &format!("{a}/m3")));
    deny("linux.mount", "a device not granted", mount("/dev/sda1", "ext4", "", &format!("{a}/m4")));
    deny("linux.mount", "mount point is a link out", mount("/dev/xvdz", "ext4", "", &format!("{a}/escape")));
    deny("linux.lvm.pv", "/dev/sda as a PV", json!({"path": ["/dev/sda"]}));
    deny("linux.lvm.vg", "/dev/sda in a VG", json!({"name": "vg", "path": ["/dev/sda"]}));
    deny("linux.lvm.lv", "an LV on /dev/sda", json!({"name": "lv", "vg-name": "vg", "path": ["/dev/sda"]}));
    deny(
        "linux.raid",
        "a mirror of /dev/sda",
        json!({"device-name": "/dev/md9", "devices": ["/dev/sda", "/dev/sdb"], "level": "raid1"}),
    );
    // Docker
    deny("linux.docker.built", "build a context from the tree", json!({"path": a, "tag": "evil"}));
    deny(
        "linux.docker.running",
        "bind / into a container",
        json!({"container": "c", "image": "alpine", "binds": d("/", "/host")}),
    );
    deny(
        "linux.docker.running",
        "volume /etc",
        json!({"container": "c", "image": "alpine", "volumes": d("/etc", "/e")}),
    );
    deny(
        "linux.docker.running",
        "mount /etc/shadow as a file",
        json!({"container": "c", "image": "alpine", "files": d("/s", "/etc/shadow")}),
    );
    deny("linux.docker.running", "any container", json!({"container": "c", "image": "alpine"}));
    deny(
        "linux.docker.deploy",
        "deploy a container",
        json!({"container": "c", "image": "alpine", "volumes": d("/", "/h")}),
    );
    deny("linux.docker.pulled", "pull (not granted)", json!({"repo": "evil/image"}));
    deny("linux.docker.pushed", "push (not granted)", json!({"repository": "evil/image"}));
    // Configuration tools
    deny("linux.puppet.agent", "an attacker's puppet server", json!({"server": "evil.example"}));
    deny("linux.puppet.apply", "manifests from the tree", json!({"manifests": [format!("{a}/site.pp")]}));
    deny("linux.puppet.run", "a puppet run", json!({}));
    deny("linux.chef.client", "an attacker's chef server", json!({"server": "https://evil"}));
    deny("linux.chef.solo", "a recipe tarball", json!({"recipe_url": "https://evil/r.tgz"}));
    deny("linux.supervisord", "a config from the tree", json!({"config": format!("{a}/s.conf"), "name": ["x"]}));
    deny(
        "linux.supervisord",
        "the system config",
        json!({"config": "/etc/supervisor/supervisord.conf", "name": ["x"]}),
    );
    // Language packages
    deny("common.pip.package", "a package's setup.py", json!({"name": ["evil"]}));
    deny("common.npm.package", "a global package's scripts", json!({"name": ["evil"]}));
    deny("common.npm.package", "install into /etc", json!({"name": ["evil"], "path": "/etc"}));
    deny("common.gem.package", "a gem's extensions", json!({"name": ["evil"]}));
    deny("common.gem.source", "a gem source of its choosing", json!({"url": "https://gems.evil.example/"}));
    // ssh: an authorized key is a login (command-equivalent); key files outside the tree.
    deny(
        "common.ssh.auth",
        "an authorized key for root",
        json!({"username": "root", "content": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHy3 evil"}),
    );
    deny(
        "common.ssh.known_host",
        "the system's known_hosts",
        json!({"hostname": "git.example.org", "filename": "/etc/ssh/ssh_known_hosts"}),
    );
    deny("linux.selinux", "not granted: SELinux permissive", json!({"mode": "permissive"}));
    deny(
        "common.virtualenv",
        "python-bin in the tree",
        json!({"path": format!("{a}/v"), "python-bin": format!("{a}/evil")}),
    );
    deny("common.virtualenv", "python-bin /bin/sh", json!({"path": format!("{a}/v"), "python-bin": "/bin/sh"}));
    deny("common.virtualenv", "an environment in /etc", json!({"path": "/etc/venv"}));
    deny(
        "common.virtualenv",
        "a requirements file",
        json!({"path": format!("{a}/v"), "requirements-file": format!("{a}/r.txt")}),
    );
    deny(
        "common.virtualenv",
        "seed packages from the tree",
        json!({"path": format!("{a}/v"), "extra-search-dir": [a]}),
    );
    // Version control
    deny(
        "common.git",
        "a checkout whose hooks the tree holds",
        json!({"path": format!("{a}/app"), "repo": "https://h/r"}),
    );
    deny("common.git", "a checkout in /root", json!({"path": "/root/x", "repo": "https://h/r"}));
    deny("common.hg", "a checkout with hgrc hooks", json!({"path": format!("{a}/hg"), "repo": "https://h/r"}));
    deny("common.svn", "a working copy in /etc", json!({"path": "/etc/svn", "repo": "svn://h/r"}));
    deny("common.svn", "a working copy outside", json!({"path": format!("{o}/wc"), "repo": "svn://h/r"}));
    deny("common.svn", "a working copy through a link", json!({"path": format!("{a}/escape"), "repo": "svn://h/r"}));
    deny(
        "common.svn",
        "check out root's local repository",
        json!({"path": format!("{a}/wc"), "repo": "file:///root/repo"}),
    );
    deny(
        "linux.user",
        "root's shell to a file in the tree",
        json!({"username": "root", "password": "x", "shell": format!("{a}/evil")}),
    );
    // A group moved onto the gid of a privileged group of this host (adm is 4 on
    // Debian and RHEL alike; the footprint looks the gid up).
    let adm_gid = nix::unistd::Group::from_name("adm").unwrap().map_or(4, |g| g.gid.as_raw());
    list.push((
        "linux.group",
        "a group given adm's gid",
        json!({"groupname": "plain", "gid": adm_gid.to_string()}),
        vec![],
        Expect::Refused,
    ));
    let mut deny = |m: &'static str, what: &'static str, raw: Value| list.push((m, what, raw, vec![], Expect::Refused));
    // Retired and built-in modules
    deny(
        "linux.mesos.master",
        "not granted",
        json!({"cluster_name": "c", "master_ip": "1.2.3.4", "masters_addresses": d("a", "b"), "server_id": "1"}),
    );
    deny("meta.comment", "a built-in sent to the helper", json!({"comment": "x"}));
    deny("meta.wait", "a built-in sent to the helper", json!({"state": "@{host.state-1}"}));

    // Values only a compromised daemon sends (the catalogue refuses them).
    let mut raw = |m: &'static str, what: &'static str, base: Value, patch: Vec<(&'static str, Value)>| {
        list.push((m, what, base, patch, Expect::Refused))
    };
    raw(
        "linux.file",
        "relative path",
        json!({"path": format!("{a}/x"), "content": "x"}),
        vec![("path", json!("etc/passwd"))],
    );
    raw(
        "linux.file",
        "mode above 07777 with set-id bits",
        json!({"path": format!("{a}/m")}),
        vec![("mode", json!(0o17755))],
    );
    raw(
        "linux.cronjob",
        "a newline in minute",
        json!({"cmd": ["true"], "user": "nobody"}),
        vec![("minute", json!("* * * * * root id\n0"))],
    );
    raw(
        "linux.user",
        "uid 2^32 (0 once truncated to 32 bits)",
        json!({"username": "toor", "password": "x"}),
        vec![("uid", json!(1u64 << 32))],
    );

    // Typed names, files and programs (issue 15 item 5): each is refused by the decode
    // itself (`invalid-parameter`), before the policy or a module sees it. The other
    // parameters are chosen so that, were the type's check gone, the policy would deny
    // the request (uid 0, a root login, a command-equivalent module, an interpreter not
    // granted) or the state would fail: then the outcome is no longer `invalid-parameter`
    // and the attempt fails, without anything run on the test host.
    let mut invalid = |m: &'static str, what: &'static str, base: Value, patch: Vec<(&'static str, Value)>| {
        list.push((m, what, base, patch, Expect::Invalid))
    };
    let root_user = || json!({"username": "oa15typed", "uid": "0"});
    invalid("linux.user", "a newline in the username", root_user(), vec![("username", json!("oa15\nroot"))]);
    invalid("linux.user", "a username read as an option", root_user(), vec![("username", json!("-o"))]);
    invalid("linux.user", "a group with a tab", root_user(), vec![("groups", json!(["adm\tsudo"]))]);
    invalid("linux.user", "a group read as an option", root_user(), vec![("groups", json!(["-g0"]))]);
    invalid("linux.user", "a relative shell", root_user(), vec![("shell", json!("bin/sh"))]);
    invalid("linux.user", "a shell with a newline", root_user(), vec![("shell", json!("/bin/sh\nx"))]);
    invalid("linux.user", "a home that climbs out", root_user(), vec![("home", json!(format!("{a}/../../root")))]);
    invalid("linux.user", "a relative home", root_user(), vec![("home", json!("home/x"))]);
    let root_group = || json!({"groupname": "oa15typed", "gid": "0"});
    invalid("linux.group", "a newline in the group name", root_group(), vec![("groupname", json!("oa15\nx"))]);
    invalid("linux.group", "a group name read as an option", root_group(), vec![("groupname", json!("-g0"))]);
    let service = || json!({"name": ["oa15-none"], "watch": [format!("{a}/app.conf")]});
    invalid("linux.service", "a relative watched file", service(), vec![("watch", json!(["app.conf"]))]);
    let sv = || json!({"config": format!("{a}/sv.conf"), "name": ["app"]});
    invalid("linux.supervisord", "a watched file with a tab", sv(), vec![("watch", json!([format!("{a}/x\ty")]))]);
    invalid("linux.supervisord", "a watched file read as an option", sv(), vec![("watch", json!(["-x"]))]);
    let built = || json!({"path": format!("{a}/ctx"), "tag": "t"});
    invalid("linux.docker.built", "a watched file that climbs out", built(), vec![("watch", json!(["/srv/../etc/x"]))]);
    let running = || json!({"container": "c", "image": "i"});
    invalid(
        "linux.docker.running",
        "a files key that is relative",
        running(),
        vec![("files", json!([{"key": "app.yml", "value": format!("{a}/app.yml")}]))],
    );
    invalid(
        "linux.docker.running",
        "a files key read as an option",
        running(),
        vec![("files", json!([{"key": "-v", "value": "/etc:/host"}]))],
    );
    invalid(
        "linux.docker.deploy",
        "a files key that is /",
        json!({"container": "c", "image": "i"}),
        vec![("files", json!([{"key": "/", "value": "x"}]))],
    );
    let apt = || json!({"name": ["oa15-none"]});
    invalid("linux.apt.package", "deb-conf-file over ftp://", apt(), vec![("deb_conf_file", json!("ftp://h/sel"))]);
    invalid("linux.apt.package", "deb-conf-file over http://", apt(), vec![("deb_conf_file", json!("http://h/sel"))]);
    invalid("linux.apt.package", "deb-conf-file relative", apt(), vec![("deb_conf_file", json!("file://etc/shadow"))]);
    invalid("linux.apt.package", "deb-conf-file read as an option", apt(), vec![("deb_conf_file", json!("-x"))]);
    let key = || json!({"path": "/etc/pki/rpm-gpg/KEY"});
    invalid("linux.rpm.key", "a key over ftp://", key(), vec![("path", json!("ftp://h/KEY"))]);
    invalid("linux.rpm.key", "a key read as an option", key(), vec![("path", json!("--import"))]);
    invalid("linux.rpm.key", "a key with a newline", key(), vec![("path", json!("/etc/KEY\n-x"))]);
    let venv = || json!({"path": format!("{a}/venv")});
    invalid("common.virtualenv", "python-bin read as an option", venv(), vec![("python_bin", json!("-c"))]);
    invalid("common.virtualenv", "python-bin a relative path", venv(), vec![("python_bin", json!("bin/python"))]);
    invalid("common.virtualenv", "python-bin with a newline", venv(), vec![("python_bin", json!("python3\nx"))]);
    invalid("common.virtualenv", "python-bin a file:// URL", venv(), vec![("python_bin", json!("file:///bin/sh"))]);
    let auth = || json!({"username": "root", "content": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHy3OCDRQ8bOnoMZN4u6X7T6tq5zSBCpCyN6tFGmyO2h"});
    invalid("common.ssh.auth", "filename climbs out of the home", auth(), vec![("filename", json!("../../etc/x"))]);
    invalid("common.ssh.auth", "filename climbs out inside", auth(), vec![("filename", json!(".ssh/../../x"))]);
    invalid("common.ssh.auth", "filename read as an option", auth(), vec![("filename", json!("-f"))]);
    invalid("common.ssh.auth", "filename with a newline", auth(), vec![("filename", json!(".ssh/a\nb"))]);
    invalid("common.ssh.auth", "filename is /", auth(), vec![("filename", json!("/"))]);
    invalid(
        "common.ssh.known_host",
        "filename climbs out of the home",
        json!({"hostname": "h", "username": "root", "absent": true}),
        vec![("filename", json!("../../etc/ssh/ssh_known_hosts"))],
    );

    // A key file named relative to a home is the write it resolves to: the home of root,
    // or of an account whose home is `/` (systemd-network on Debian; an account that does
    // not exist is refused all the same).
    let known = |user: &str, file: &str| json!({"hostname": "git.example.org", "username": user, "filename": file});
    list.push((
        "common.ssh.known_host",
        "root's .bashrc, named in its home",
        known("root", ".bashrc"),
        vec![],
        Expect::Refused,
    ));
    list.push((
        "common.ssh.known_host",
        "/etc/ld.so.preload, in a home that is /",
        known("systemd-network", "etc/ld.so.preload"),
        vec![],
        Expect::Refused,
    ));

    // Inside the grant: the policy lets these through.
    let mut grant =
        |m: &'static str, what: &'static str, raw: Value| list.push((m, what, raw, vec![], Expect::Granted));
    grant(
        "linux.file",
        "a file in the granted tree",
        json!({"path": format!("{a}/app.conf"), "content": "x\n", "mode": "0640"}),
    );
    grant("linux.dir", "a directory in the granted tree", json!({"path": [format!("{a}/data")], "mode": "02775"}));
    grant(
        "linux.symlink",
        "a link in the granted tree",
        json!({"target": format!("{a}/current"), "source": format!("{a}/data")}),
    );
    grant("linux.mount", "the granted device in the tree", mount("/dev/xvdz", "ext4", "", &format!("{a}/mnt")));
    grant(
        "linux.mesos.slave",
        "a retired module (fails by itself)",
        json!({"attributes": d("a", "b"), "masters_addresses": d("a", "b"), "slave_ip": "1.2.3.4"}),
    );

    let mut out: Vec<Attempt> = list
        .into_iter()
        .enumerate()
        .map(|(i, (module, what, raw, patch, expect))| Attempt {
            module,
            what: what.to_string(),
            request: apply_json(&format!("a-{i}"), module, raw, &patch),
            expect,
        })
        .collect();
    // Frames that are not requests of the closed set at all.
    let n = out.len();
    out.push(Attempt {
        module: "linux.teleport",
        what: "a module outside the catalogue".into(),
        request: json!({"type": "apply", "state_id": format!("a-{n}"), "module": "linux.teleport", "params": {}}),
        expect: Expect::Refused,
    });
    let mut unknown_field = apply_json(&format!("a-{}", n + 1), "linux.file", json!({"path": format!("{a}/u")}), &[]);
    unknown_field["params"]["run_as_root_after"] = json!("id");
    out.push(Attempt {
        module: "linux.file",
        what: "a parameter the catalogue does not know".into(),
        request: unknown_field,
        expect: Expect::Refused,
    });
    out
}

/// Lays out the directory the attempts name: the granted tree, a tree outside it, a
/// link from one to the other, and files the agent could have written in the tree.
fn prepare(dir: &Path) {
    let a = dir.join("allowed");
    std::os::unix::fs::symlink(dir.join("outside"), a.join("escape")).unwrap();
    fs::write(a.join("evil"), "#!/bin/sh\nid -u > /tmp/opsagent-compromised-daemon-ran\n").unwrap();
    fs::set_permissions(a.join("evil"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(a.join("disk.img"), vec![0u8; 4096]).unwrap();
    let results = dir.join("results");
    fs::create_dir(&results).unwrap();
    std::os::unix::fs::chown(&results, Some(AGENT_UID), Some(AGENT_GID)).unwrap();
}

fn md_cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', "\\n")
}

#[tokio::test]
async fn a_compromised_daemon_gets_nothing_outside_the_grant() {
    let h = Helper::start(|dir| {
        fs::create_dir(dir.join("allowed")).unwrap();
        fs::create_dir(dir.join("outside")).unwrap();
        policy(dir)
    })
    .await;
    prepare(h.dir.path());
    let attempts = attempts(h.dir.path());
    let modules: std::collections::BTreeSet<&str> = attempts.iter().map(|a| a.module).collect();
    for m in MODULES {
        assert!(modules.contains(m.name), "no attempt for {}", m.name);
    }
    assert!(attempts.len() >= 100, "only {} attempts", attempts.len());

    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "attacker_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, h.dir.path())
        .uid(AGENT_UID)
        .gid(AGENT_GID)
        .output()
        .unwrap();
    let results_file = h.path("results/results.json");
    let got: Vec<Got> = serde_json::from_slice(&fs::read(&results_file).unwrap_or_else(|e| {
        panic!(
            "the attacker wrote no results ({e}):\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }))
    .unwrap();
    assert_eq!(got.len(), attempts.len());

    let mut table = String::from("| # | Module | Attempt | Outcome | Reason |\n|---|---|---|---|---|\n");
    let mut failures = Vec::new();
    for (i, (attempt, got)) in attempts.iter().zip(&got).enumerate() {
        let refused = matches!(
            got.code,
            Some(ErrorCode::Denied | ErrorCode::BadRequest | ErrorCode::InvalidParameter | ErrorCode::Unsupported)
        );
        match attempt.expect {
            Expect::Refused if !refused => {
                failures.push(format!("#{i} {} {}: not refused: {got:?}", attempt.module, attempt.what))
            }
            Expect::Invalid if got.code != Some(ErrorCode::InvalidParameter) => failures.push(format!(
                "#{i} {} {}: not refused at decode (invalid-parameter): {got:?}",
                attempt.module, attempt.what
            )),
            Expect::Granted if got.code.is_some() => {
                failures.push(format!("#{i} {} {}: refused inside the grant: {got:?}", attempt.module, attempt.what))
            }
            _ => {}
        }
        if refused {
            // The reason is in the log: a refused request under its state id, or a
            // malformed frame with the decoder's words.
            let reason = got.reason.strip_prefix("malformed request: ").unwrap_or(&got.reason);
            let state = format!("state_id=\"a-{i}\"");
            let needles: Vec<&str> = if got.code == Some(ErrorCode::BadRequest) {
                vec!["malformed request", reason]
            } else {
                vec!["request refused", &state, reason]
            };
            if let Err(log) = h.wait_for_log(&needles).await {
                let escaped = reason.escape_debug().to_string();
                if !log.lines().any(|l| l.contains(&escaped)) {
                    failures.push(format!("#{i} {}: reason not in the log: {reason}", attempt.module));
                }
            }
        }
        table.push_str(&format!(
            "| {i} | {} | {} | {} | {} |\n",
            attempt.module,
            md_cell(&attempt.what),
            got.outcome,
            md_cell(&got.reason.replace(&h.dir.path().display().to_string(), "$DIR"))
        ));
    }
    let denied = got.iter().filter(|g| g.code == Some(ErrorCode::Denied)).count();
    let other = got.iter().filter(|g| g.code.is_some()).count() - denied;
    let granted = got.iter().filter(|g| g.code.is_none()).count();
    let summary = format!(
        "{} attempts over the {} catalogue modules (and one outside it): {denied} denied by the policy, {other} \
         refused at decode or as built-in, {granted} inside the grant let through by the policy.\n\n",
        attempts.len(),
        MODULES.len()
    );
    let report = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("compromised-daemon-attempts.md");
    fs::write(&report, format!("{summary}{table}")).unwrap();
    assert!(!Path::new("/tmp/opsagent-compromised-daemon-ran").exists(), "the agent's file ran as root");
    assert!(
        failures.is_empty(),
        "{} failures:\n{}\n(table in {})",
        failures.len(),
        failures.join("\n"),
        report.display()
    );
}

/// Not a test of its own: the attacker half of the suite, run under the agent's uid.
/// Without the variable it does nothing.
#[tokio::test]
async fn attacker_child() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let dir = PathBuf::from(dir);
    assert_eq!(nix::unistd::getuid().as_raw(), AGENT_UID, "the attacker must run as the agent's uid");
    let mut client = Client::connect(&dir.join("h.sock")).await;
    let mut got = Vec::new();
    for attempt in attempts(&dir) {
        let reply = match client.call_raw(attempt.request).await {
            Some(r) => r,
            None => {
                // The helper closed the connection (a malformed frame may do that).
                client = Client::connect(&dir.join("h.sock")).await;
                got.push(Got { outcome: "connection closed".into(), code: None, reason: String::new() });
                continue;
            }
        };
        got.push(match reply {
            Reply::Error(e) => Got {
                outcome: if e.code == ErrorCode::Denied {
                    "denied".into()
                } else {
                    format!("refused ({})", code_name(e.code))
                },
                code: Some(e.code),
                reason: e.message,
            },
            Reply::Outcome(o) => {
                Got { outcome: format!("granted: outcome result={}", o.result), code: None, reason: o.comment }
            }
            Reply::NeedFetch { urls } => {
                Got { outcome: "granted: needs downloads".into(), code: None, reason: urls.join(" ") }
            }
            other => Got { outcome: format!("{other:?}"), code: None, reason: String::new() },
        });
    }
    fs::write(dir.join("results/results.json"), serde_json::to_vec(&got).unwrap()).unwrap();
}

fn code_name(code: ErrorCode) -> String {
    serde_json::to_value(code).unwrap().as_str().unwrap_or_default().to_string()
}
