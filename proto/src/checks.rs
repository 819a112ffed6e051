//! What each parameter names on the host, checked where it is parsed: paths are
//! absolute and normalised, accounts are account names, units are unit names, ports
//! are ports, and nothing a tool reads as an argument starts with `-`.
//!
//! The parameter types already refuse control characters in one-line values, list items and
//! dict keys ([`crate::param_types`]); these checks narrow values to what the parameter means.
//! They run in [`crate::catalogue::parse_state`] (the daemon, `opsagent check`) and in
//! [`crate::catalogue::parse_params`] (the helper's decoding of every `Apply`), so a
//! module in the helper only ever sees values that passed them.

use crate::catalogue::{CatalogueError, ModuleParams};
use crate::newtypes::UnitName;
use crate::param_types::{shorten, Dict, HomeFile, Line};

/// An `http://` or `https://` URL: content the daemon downloads for the helper.
pub fn is_remote(value: &str) -> bool {
    let v = value.trim().to_ascii_lowercase();
    v.starts_with("http://") || v.starts_with("https://")
}

/// Checks one state's parameters; the error names the first bad one.
pub(crate) fn check_fields(params: &ModuleParams) -> Result<(), CatalogueError> {
    let c = Checker { module: params.name() };
    match params {
        ModuleParams::CommonArchive(p) => c.url("source", &p.source),
        ModuleParams::CommonGemPackage(p) => c.names("name", &p.name),
        ModuleParams::CommonGemSource(p) => c.url("url", &p.url),
        ModuleParams::CommonSshAuth(p) => c.url("encrypt_algorithm", &p.encrypt_algorithm),
        ModuleParams::CommonSshKnownHost(p) => {
            c.url("hostname", &p.hostname)?;
            // Across two parameters: the type of `filename` cannot know whether a home
            // is named.
            if p.username.is_none() && matches!(p.filename, HomeFile::InHome(_)) {
                return c.invalid("filename", "without username the file must be an absolute path".into());
            }
            c.opt_url("encrypt_algorithm", p.encrypt_algorithm.as_ref())?;
            c.opt_url("fingerprint", p.fingerprint.as_ref())
        }
        ModuleParams::LinuxSelinux(_) => Ok(()),
        ModuleParams::CommonGit(p) => {
            c.url("repo", &p.repo)?;
            c.argument("revision", &p.revision)
        }
        ModuleParams::CommonHg(p) => {
            c.url("repo", &p.repo)?;
            c.argument("revision", &p.revision)
        }
        ModuleParams::CommonNpmPackage(p) => c.names("name", &p.name),
        ModuleParams::CommonPipPackage(p) => c.names("name", &p.name),
        ModuleParams::CommonSvn(p) => {
            c.url("repo", &p.repo)?;
            c.argument("revision", &p.revision)?;
            c.opt_argument("username", p.username.as_ref())
        }
        ModuleParams::CommonTimezone(p) => c.timezone("name", &p.name),
        ModuleParams::LinuxAptPackage(p) => {
            c.names("name", &p.name)?;
            c.opt_argument("repo", p.repo.as_ref())
        }
        ModuleParams::LinuxAptPpa(p) => {
            c.argument("name", &p.name)?;
            c.opt_argument("username", p.username.as_ref())
        }
        ModuleParams::LinuxAptRepo(p) => c.file_name("name", &p.name),
        ModuleParams::LinuxChefClient(p) => c.url("server", &p.server),
        ModuleParams::LinuxChefSolo(p) => c.opt_url("recipe_url", p.recipe_url.as_ref()),
        ModuleParams::LinuxCmd(p) => {
            for e in p.env.iter().flat_map(|d| d.iter()) {
                let ok = e.key.starts_with(|ch: char| ch.is_ascii_alphabetic() || ch == '_')
                    && e.key.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_');
                if !ok {
                    return c.invalid("env", format!("{:?} is not an environment variable name", shorten(&e.key)));
                }
            }
            Ok(())
        }
        ModuleParams::LinuxCronjob(p) => {
            if p.cmd.iter().all(|l| l.trim().is_empty()) {
                return c.invalid("cmd", "no command given".into());
            }
            Ok(())
        }
        ModuleParams::LinuxDir(_) => Ok(()),
        ModuleParams::LinuxDockerBuilt(p) => c.argument("tag", &p.tag),
        ModuleParams::LinuxDockerDeploy(p) => {
            c.argument("container", &p.container)?;
            c.argument("image", &p.image)?;
            c.argument("tag", &p.tag)?;
            c.ports("port_bindings", p.port_bindings.as_ref())
        }
        ModuleParams::LinuxDockerPulled(p) => {
            c.argument("repo", &p.repo)?;
            c.argument("tag", &p.tag)
        }
        ModuleParams::LinuxDockerPushed(p) => {
            c.argument("repository", &p.repository)?;
            c.argument("tag", &p.tag)?;
            c.opt_argument("container", p.container.as_ref())
        }
        ModuleParams::LinuxDockerRunning(p) => {
            c.argument("container", &p.container)?;
            c.argument("image", &p.image)?;
            c.argument("tag", &p.tag)?;
            c.ports("port_bindings", p.port_bindings.as_ref())
        }
        ModuleParams::LinuxFile(p) => c.opt_url("remote_uri", p.remote_uri.as_ref()),
        ModuleParams::LinuxLvmLv(p) => {
            c.argument("name", &p.name)?;
            c.argument("vg-name", &p.vg_name)
        }
        ModuleParams::LinuxLvmPv(_) => Ok(()),
        ModuleParams::LinuxLvmVg(p) => c.argument("name", &p.name),
        ModuleParams::LinuxMkfs(p) => c.opt_argument("label", p.label.as_ref()),
        ModuleParams::LinuxMount(p) => {
            c.argument("device", &p.device)?;
            c.argument("filesystem", &p.filesystem)?;
            c.opt_argument("opts", p.opts.as_ref())
        }
        ModuleParams::LinuxPuppetAgent(p) => c.argument("server", &p.server),
        ModuleParams::LinuxPuppetApply(_) | ModuleParams::LinuxRaid(_) => Ok(()),
        ModuleParams::LinuxService(p) => {
            for e in p.name.iter() {
                if let Err(e) = UnitName::service(e.key.trim()) {
                    return c.invalid("name", e.to_string());
                }
            }
            Ok(())
        }
        ModuleParams::LinuxSupervisord(p) => {
            for n in p.name.iter().filter(|n| !n.trim().is_empty()) {
                c.file_name("name", n)?;
            }
            Ok(())
        }
        // Typed throughout ([`crate::param_types`]): `python-bin` (`Program`), the
        // group's and user's names, groups, home and shell, the key's source.
        ModuleParams::LinuxSymlink(_)
        | ModuleParams::CommonVirtualenv(_)
        | ModuleParams::LinuxGroup(_)
        | ModuleParams::LinuxRpmKey(_) => Ok(()),
        ModuleParams::LinuxUser(p) => c.opt_argument("fullname", p.fullname.as_ref()),
        ModuleParams::LinuxYumPackage(p) => {
            c.names("name", &p.name)?;
            c.opt_argument("repo", p.repo.as_ref())
        }
        ModuleParams::LinuxYumRepo(p) => {
            c.file_name("name", &p.name)?;
            c.opt_url("rpm-url", p.rpm_url.as_ref())?;
            c.opt_url("rpm-key", p.rpm_key.as_ref())
        }
        ModuleParams::LinuxMesosMaster(_)
        | ModuleParams::LinuxMesosSlave(_)
        | ModuleParams::LinuxPuppetRun(_)
        | ModuleParams::MetaComment(_)
        | ModuleParams::MetaWait(_) => Ok(()),
    }
}

struct Checker {
    module: &'static str,
}

impl Checker {
    fn invalid(&self, param: &str, problem: String) -> Result<(), CatalogueError> {
        Err(CatalogueError::Invalid { module: self.module.to_string(), param: param.to_string(), problem })
    }

    /// A value passed to a tool as one argument: it must not read as an option.
    fn argument(&self, param: &str, raw: &str) -> Result<(), CatalogueError> {
        if raw.trim_start().starts_with('-') {
            return self
                .invalid(param, format!("{:?} starts with \"-\" (it would be read as an option)", shorten(raw)));
        }
        Ok(())
    }

    fn opt_argument(&self, param: &str, raw: Option<&Line>) -> Result<(), CatalogueError> {
        raw.map_or(Ok(()), |r| self.argument(param, r))
    }

    /// Package names and the like: dict keys that become arguments.
    fn names(&self, param: &str, d: &Dict) -> Result<(), CatalogueError> {
        for e in d.iter() {
            self.argument(param, &e.key)?;
            if e.value.as_deref().is_some_and(|v| v.trim_start().starts_with('-')) {
                return self.argument(param, e.value_or_empty());
            }
        }
        Ok(())
    }

    /// One file name: no `/`, not `.` or `..`, not an option.
    fn file_name(&self, param: &str, raw: &str) -> Result<(), CatalogueError> {
        let name = raw.trim();
        if name.is_empty() || name.contains('/') || name == "." || name == ".." || name.contains('\t') {
            return self
                .invalid(param, format!("{:?} is not a plain name (no \"/\", not \".\" or \"..\")", shorten(raw)));
        }
        self.argument(param, name)
    }

    /// A URL or local path handed to a tool: one word, not an option.
    fn url(&self, param: &str, raw: &str) -> Result<(), CatalogueError> {
        let u = raw.trim();
        if u.is_empty() || u.contains(char::is_whitespace) {
            return self.invalid(param, format!("{:?} is not a URL (empty or with blanks)", shorten(raw)));
        }
        self.argument(param, u)
    }

    fn opt_url(&self, param: &str, raw: Option<&Line>) -> Result<(), CatalogueError> {
        match raw.map(|r| r.trim()).filter(|r| !r.is_empty()) {
            Some(r) => self.url(param, r),
            None => Ok(()),
        }
    }

    /// An IANA zone name such as `Europe/Paris`: no `..`, not absolute.
    fn timezone(&self, param: &str, raw: &str) -> Result<(), CatalogueError> {
        let name = raw.trim();
        let ok = !name.is_empty()
            && !name.starts_with(['/', '-'])
            && name.split('/').all(|part| !part.is_empty() && part != "." && part != "..")
            && name.chars().all(|c| c.is_ascii_alphanumeric() || "/_+-".contains(c));
        if ok {
            Ok(())
        } else {
            self.invalid(param, format!("{:?} is not a time zone name such as \"Europe/Paris\"", shorten(raw)))
        }
    }

    /// Docker port bindings: `PORT[/tcp|udp]` to `[IP:]PORT`, ports 1-65535.
    fn ports(&self, param: &str, d: Option<&Dict>) -> Result<(), CatalogueError> {
        let port = |s: &str| s.trim().parse::<u16>().is_ok_and(|p| p > 0);
        for e in d.iter().flat_map(|d| d.iter()) {
            let (container, proto) = e.key.split_once('/').unwrap_or((&e.key, "tcp"));
            let proto_ok = ["tcp", "udp", "sctp"].contains(&proto.trim().to_ascii_lowercase().as_str());
            let host = e.value_or_empty().trim();
            let host_port = host.rsplit_once(':').map_or(host, |(_, p)| p);
            let host_ok = host.is_empty() || host_port.trim().parse::<u16>().is_ok();
            if !port(container) || !proto_ok || !host_ok {
                return self.invalid(
                    param,
                    format!(
                        "{:?}: {:?} is not PORT[/tcp|udp|sctp] (1-65535) to [IP:]PORT",
                        shorten(&e.key),
                        shorten(host)
                    ),
                );
            }
        }
        Ok(())
    }
}
