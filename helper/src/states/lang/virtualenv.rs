//! `common.virtualenv`: a Python virtual environment at `path`, optionally with the
//! packages of a requirements file.
//!
//! - Missing (no `pyvenv.cfg`, `bin/python` or `bin/pip` under `path`): created with
//!   `PYTHON -m venv [--system-site-packages] PATH`, `PYTHON` being `python-bin` (a path,
//!   or a name looked up on the helper's search path; default `python3`). With
//!   `extra-search-dir`, which is an option of the `virtualenv` tool (where it looks for
//!   the seed packages pip and setuptools), the `virtualenv` tool is used instead:
//!   `virtualenv --python PYTHON [--system-site-packages] --extra-search-dir DIR… PATH`;
//!   without that tool the state fails and says so. An existing environment is not
//!   rebuilt for another `python-bin`.
//! - `system-site-packages`: when given, kept in line with the environment's
//!   `pyvenv.cfg` (`include-system-site-packages`), which is all that
//!   `--system-site-packages` ever sets. When omitted, what the original adaptor
//!   applied: Salt's `virtualenv.managed` default, false, for a new environment, and an
//!   existing one is left as it is (module.json's `true` was only the IDE form's
//!   pre-filled value, sent in the recipe when kept).
//! - `requirements-file`: installed with the environment's pip (`PATH/bin/python -m pip
//!   install -r FILE`, in the file's directory, so relative paths in it work) when the
//!   environment was just created, or when the file's MD5 differs from the one stored
//!   after the last successful install (`<state dir>/requirements/<state id>-<file>.cksum`,
//!   the watch mechanism's naming). Packages removed from the environment by hand are
//!   therefore not reinstalled until the file changes. The changes list the packages
//!   that pip installed, upgraded or removed, with versions.
//! - `path`, and every directory on the way to it, must be root's and writable by nobody
//!   else ([`crate::dirfd::root_controlled`]): the tools run as root and take the path by
//!   name.
//!
//! A plan (issue 19) makes the same checks and reads (`pyvenv.cfg`, `bin/python`,
//! `bin/pip`, the requirements file's checksum against the stored one) and reports the
//! apply's words (`PATH: virtualenv created (…)`, `system-site-packages false -> true`);
//! a `pip install -r` it would run is named as such ("would run …"), since only pip
//! knows what the file comes to, and nothing is stored.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use opsagent_proto::catalogue::CommonVirtualenv;
use opsagent_proto::newtypes::{AbsPath, StateId};
use opsagent_proto::param_types::Program;
use opsagent_proto::request::{Change, Outcome};

use super::{pip, LangError, Run, Tool};
use crate::cancel::Cancel;
use crate::checksums::ChecksumStore;
use crate::fsutil;
use crate::states::storage::{find_tool, MissingTool};

/// Under the helper's state directory: the requirements files' checksums.
pub const REQUIREMENTS_DIR: &str = "requirements";
const SITE_KEY: &str = "include-system-site-packages";

/// What creates a missing environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Creator {
    /// `PYTHON -m venv`.
    Venv { python: PathBuf },
    /// The `virtualenv` tool, for `extra-search-dir`.
    Virtualenv { program: PathBuf, python: PathBuf, extra_search_dirs: Vec<AbsPath> },
}

impl Creator {
    pub fn args(&self, path: &AbsPath, system_site_packages: bool) -> (PathBuf, Vec<String>) {
        let site = system_site_packages.then(|| "--system-site-packages".to_string());
        match self {
            Creator::Venv { python } => {
                let mut args = vec!["-m".to_string(), "venv".into()];
                args.extend(site);
                args.push(path.to_string());
                (python.clone(), args)
            }
            Creator::Virtualenv { program, python, extra_search_dirs } => {
                let mut args = vec!["--python".to_string(), python.display().to_string()];
                args.extend(site);
                for d in extra_search_dirs {
                    args.extend(["--extra-search-dir".to_string(), d.to_string()]);
                }
                args.push(path.to_string());
                (program.clone(), args)
            }
        }
    }
}

/// The interpreter `python-bin` names (default `python3`), validated at decode
/// ([`Program`]: an absolute path, or a plain name); whether it is an executable file
/// is a fact of the host, checked here.
pub fn interpreter(python_bin: Option<&Program>) -> Result<PathBuf, LangError> {
    let name = match python_bin {
        Some(Program::Path(abs)) => {
            return find_tool(&abs.to_string(), &[]).ok_or_else(|| LangError::Param {
                param: "python-bin",
                problem: format!("{abs} is not an executable file"),
            })
        }
        Some(Program::Name(name)) => name.as_str(),
        None => "python3",
    };
    find_tool(name, &[]).ok_or_else(|| {
        LangError::Missing(MissingTool {
            tool: name.to_string(),
            hint: "Debian/Ubuntu packages python3 and python3-venv, RHEL python3".into(),
        })
    })
}

/// The environment is usable: configuration, interpreter and pip are there.
pub fn complete(path: &Path) -> bool {
    path.join("pyvenv.cfg").is_file() && path.join("bin/python").exists() && path.join("bin/pip").exists()
}

/// The value of `include-system-site-packages` in a `pyvenv.cfg`.
pub fn site_packages_setting(cfg: &str) -> Option<bool> {
    cfg.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim().eq_ignore_ascii_case(SITE_KEY)).then(|| v.trim().eq_ignore_ascii_case("true"))
    })
}

/// `cfg` with `include-system-site-packages` set to `on`.
pub fn with_site_packages(cfg: &str, on: bool) -> String {
    let line = format!("{SITE_KEY} = {on}");
    let mut found = false;
    let mut lines: Vec<String> = cfg
        .lines()
        .map(|l| match l.split_once('=') {
            Some((k, _)) if k.trim().eq_ignore_ascii_case(SITE_KEY) => {
                found = true;
                line.clone()
            }
            _ => l.to_string(),
        })
        .collect();
    if !found {
        lines.push(line);
    }
    lines.join("\n") + "\n"
}

/// The environment's own pip, run through its interpreter.
pub fn venv_pip(path: &AbsPath) -> Tool {
    pip::pip_tool(path.as_path().join("bin/python")).with_args(["-m", "pip"])
}

pub async fn apply(p: &CommonVirtualenv, state: &StateId, state_dir: &Path, cancel: Cancel) -> Outcome {
    let store = ChecksumStore::in_dir(state_dir.join(REQUIREMENTS_DIR));
    let mut run = Run::new(cancel);
    let result = run_state(p, state, &store, &mut run).await;
    run.finish(&p.path.0, result)
}

async fn run_state(
    p: &CommonVirtualenv,
    state: &StateId,
    store: &ChecksumStore,
    run: &mut Run,
) -> Result<(), LangError> {
    let path = p.path.abs().clone();
    if path.is_root() {
        return Err(LangError::Param { param: "path", problem: "/ cannot be a virtualenv".into() });
    }
    // Python and later pip run as root on `path` by name: whoever could change it, or a
    // directory on the way, could swap in a link to where root's files should land, or
    // plant the `bin/python` that root's pip then runs. Only a place root alone controls.
    crate::dirfd::root_controlled(path.as_path()).map_err(|e| {
        use crate::dirfd::WalkError as W;
        let why = matches!(
            e,
            W::NotRootControlled { .. } | W::UnsafeLink { .. } | W::LinkOwner { .. } | W::LinkBelowUnsafe { .. }
        )
        .then_some("; the virtualenv is built and used as root, so only where nobody else can write")
        .unwrap_or_default();
        LangError::Param { param: "path", problem: format!("{e}{why}") }
    })?;
    let requirements = p.requirements_file.as_ref().map(|r| r.abs().clone());
    if let Some(req) = &requirements {
        if !req.as_path().is_file() {
            return Err(LangError::Param {
                param: "requirements-file",
                problem: format!("{req} does not exist or is not a regular file"),
            });
        }
        // pip reads it as root and installs what it names: only a file root controls.
        crate::states::root_read::check("requirements-file", req)
            .map_err(|e| LangError::Param { param: "requirements-file", problem: e.to_string() })?;
    }
    let extra: Vec<AbsPath> = p.extra_search_dir.iter().flat_map(|a| a.iter()).cloned().collect();

    let created = if complete(path.as_path()) {
        if let Some(want) = p.system_site_packages {
            sync_site_packages(&path, want, &mut run.changes)?;
        }
        false
    } else {
        if let Some(m) = fsutil::lstat(path.as_path())? {
            if !m.is_dir() {
                return Err(LangError::Param {
                    param: "path",
                    problem: format!("{path} exists and is {}, not a directory", fsutil::kind_of(m.file_type())),
                });
            }
        }
        let python = interpreter(p.python_bin.as_ref())?;
        let creator = if extra.is_empty() {
            Creator::Venv { python: python.clone() }
        } else {
            let program = find_tool("virtualenv", &[]).ok_or_else(|| {
                LangError::Missing(MissingTool {
                    tool: "virtualenv".into(),
                    hint: "extra-search-dir is a virtualenv option; Debian/Ubuntu package python3-virtualenv, or pip \
                           package virtualenv"
                        .into(),
                })
            })?;
            Creator::Virtualenv { program, python: python.clone(), extra_search_dirs: extra }
        };
        let repaired = path.as_path().join("pyvenv.cfg").exists();
        let site = p.system_site_packages.unwrap_or(false);
        let (program, args) = creator.args(&path, site);
        if !crate::plan::active() {
            run.act(&Tool::new(program).command(args, super::INSTALL_TIMEOUT)).await?;
        }
        let what =
            if repaired { "virtualenv rebuilt (bin/python or bin/pip was missing)" } else { "virtualenv created" };
        run.changes
            .push(Change::new(path.to_string(), format!("{what} ({}, system-site-packages {site})", python.display())));
        true
    };

    let Some(req) = requirements else { return Ok(()) };
    let check = store.check(state, std::slice::from_ref(&req), true)?;
    if crate::plan::active() {
        // What `pip install -r` changes is pip's to find out (the file's versions,
        // ranges and dependencies against the index): the plan names the step.
        if created || check.triggered() {
            let why = if created { "the environment is new" } else { "the file changed since its last install" };
            let pip = venv_pip(&path).command(["install", "-r", &req.to_string()], super::INSTALL_TIMEOUT);
            run.changes.push(Change::new(
                path.to_string(),
                format!("would run {} ({why}; what it installs is known only when it runs)", pip.display()),
            ));
        }
        return Ok(());
    }
    if created || check.triggered() {
        let pip = venv_pip(&path).with_cwd(req.parent().as_path());
        let before = pip::list(&pip, run).await?;
        let installed = run.act(&pip.command(["install", "-r", &req.to_string()], super::INSTALL_TIMEOUT)).await;
        let after = pip::list(&pip, run).await?;
        let changes = super::describe_changes(&before, &after);
        if changes.is_empty() && installed.is_ok() {
            run.notes.push(format!("{req} changed; everything it lists was already installed"));
        }
        run.changes.extend(changes);
        installed?;
    }
    // Only now: a failed install leaves the old checksum, so it is tried again.
    store.commit(&check)?;
    Ok(())
}

fn sync_site_packages(path: &AbsPath, want: bool, changes: &mut Vec<Change>) -> Result<(), LangError> {
    let cfg_path = path.as_path().join("pyvenv.cfg");
    let io = |op: &'static str| {
        let path = cfg_path.clone();
        move |source| LangError::Io { path, op, source }
    };
    let text = fs::read_to_string(&cfg_path).map_err(io("read"))?;
    let current = site_packages_setting(&text).unwrap_or(false);
    if current == want {
        return Ok(());
    }
    if crate::plan::active() {
        changes.push(Change::new(path.to_string(), format!("system-site-packages {current} -> {want}")));
        return Ok(());
    }
    let meta = fs::metadata(&cfg_path).map_err(io("inspect"))?;
    let abs =
        AbsPath::parse(&cfg_path.to_string_lossy()).map_err(|source| LangError::Path { param: "path", source })?;
    fsutil::write_atomic(
        &abs,
        with_site_packages(&text, want).as_bytes(),
        meta.mode() & 0o7777,
        meta.uid(),
        meta.gid(),
    )?;
    changes.push(Change::new(path.to_string(), format!("system-site-packages {current} -> {want}")));
    Ok(())
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // fixtures are built by path (helper/clippy.toml)
mod tests {
    use super::*;
    use crate::states::testutil::typed;
    use serde_json::json;

    #[test]
    fn creation_command_lines() {
        let path = AbsPath::parse("/srv/venv").unwrap();
        let venv = Creator::Venv { python: "/usr/bin/python3".into() };
        let (prog, args) = venv.args(&path, true);
        assert_eq!(
            (prog.as_path(), args.join(" ").as_str()),
            (Path::new("/usr/bin/python3"), "-m venv --system-site-packages /srv/venv")
        );
        let (_, args) = venv.args(&path, false);
        assert_eq!(args.join(" "), "-m venv /srv/venv");
        let tool = Creator::Virtualenv {
            program: "/usr/bin/virtualenv".into(),
            python: "/usr/bin/python3.11".into(),
            extra_search_dirs: vec![AbsPath::parse("/opt/wheels").unwrap(), AbsPath::parse("/srv/w").unwrap()],
        };
        let (prog, args) = tool.args(&path, false);
        assert_eq!(prog, Path::new("/usr/bin/virtualenv"));
        assert_eq!(
            args.join(" "),
            "--python /usr/bin/python3.11 --extra-search-dir /opt/wheels --extra-search-dir /srv/w /srv/venv"
        );
        let pip = venv_pip(&path).command(["list"], super::super::QUERY_TIMEOUT).inspection().inspection();
        assert_eq!(pip.display(), "/srv/venv/bin/python -m pip list");
    }

    #[test]
    fn pyvenv_cfg_site_packages() {
        let cfg = "home = /usr/bin\ninclude-system-site-packages = false\nversion = 3.11.2\n";
        assert_eq!(site_packages_setting(cfg), Some(false));
        let on = with_site_packages(cfg, true);
        assert_eq!(on, "home = /usr/bin\ninclude-system-site-packages = true\nversion = 3.11.2\n");
        assert_eq!(site_packages_setting(&on), Some(true));
        assert_eq!(site_packages_setting("home = /usr/bin\n"), None);
        assert_eq!(
            with_site_packages("home = /usr/bin", false),
            "home = /usr/bin\ninclude-system-site-packages = false\n"
        );
    }

    #[test]
    fn interpreters() {
        let bin = |raw: &str| -> Program { opsagent_proto::param_types::Param::from_wire(&json!(raw)).unwrap() };
        assert!(interpreter(Some(&bin("/bin/sh"))).is_ok());
        let err = interpreter(Some(&bin("python0.1"))).unwrap_err().to_string();
        assert!(err.starts_with("python0.1 is not installed"), "{err}");
        crate::states::testutil::refused(
            "common.virtualenv",
            json!({"path": "/v", "python-bin": "bin/python"}),
            "path \"bin/python\" is not absolute",
        );
        let err = interpreter(Some(&bin("/nonexistent/python3"))).unwrap_err().to_string();
        assert_eq!(err, "parameter python-bin: /nonexistent/python3 is not an executable file");
    }

    #[tokio::test]
    async fn bad_parameters() {
        let dir = tempfile::tempdir().unwrap();
        let id = StateId::parse("s-1").unwrap();
        crate::states::testutil::refused("common.virtualenv", json!({"path": "venv"}), "path \"venv\" is not absolute");
        let target = dir.path().join("v");
        let p: CommonVirtualenv = typed(
            "common.virtualenv",
            json!({"path": target.to_str().unwrap(), "requirements-file": "/nonexistent/req.txt"}),
        );
        let out = apply(&p, &id, dir.path(), Cancel::never()).await;
        assert_eq!(
            out.comment,
            "parameter requirements-file: /nonexistent/req.txt does not exist or is not a regular file"
        );
        assert!(!target.exists(), "nothing is created for a bad parameter");
        std::fs::write(&target, "").unwrap();
        let p: CommonVirtualenv = typed("common.virtualenv", json!({"path": target.to_str().unwrap()}));
        let out = apply(&p, &id, dir.path(), Cancel::never()).await;
        assert!(out.comment.ends_with("exists and is a regular file, not a directory"), "{}", out.comment);
    }
}
