//! Manual pages and shell completion, generated from the same clap definitions that parse
//! the command line, so a documented option can never be missing from the program or the
//! other way round. `packaging/build-deb` writes them into the package
//! (`opsagent manual DIR`, `opsagent-backend manual DIR`, `opsagent completion bash`).
//!
//! Written here rather than with clap_mangen/clap_complete: the output needed is small
//! (one roff page per program, one bash function), and the build stays offline.

use std::fmt::Write as _;

use clap::{Arg, Command};

/// Sections of a page that the clap definition does not hold.
#[derive(Debug, Default, Clone, Copy)]
pub struct Extra<'a> {
    /// Paragraphs of DESCRIPTION after the command's about text.
    pub description: &'a [&'a str],
    /// FILES: (path, what it is).
    pub files: &'a [(&'a str, &'a str)],
    /// ENVIRONMENT: (variable, what it does), beyond the options' own `env`.
    pub environment: &'a [(&'a str, &'a str)],
    /// SEE ALSO, e.g. `opsagent-helper(8)`.
    pub see_also: &'a [&'a str],
}

/// Text made safe for roff: backslashes escaped, hyphens as minus signs (so options
/// can be searched and copied), and a line that would start a request neutralised.
pub(crate) fn roff(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    for line in text.lines() {
        if !out.is_empty() {
            out.push('\n');
        }
        if line.starts_with('.') || line.starts_with('\'') {
            out.push_str("\\&");
        }
        for c in line.chars() {
            match c {
                '\\' => out.push_str("\\e"),
                '-' => out.push_str("\\-"),
                c if c.is_control() => {}
                c => out.push(c),
            }
        }
    }
    out
}

fn help_of(arg: &Arg) -> String {
    arg.get_long_help().or_else(|| arg.get_help()).map(|h| h.to_string()).unwrap_or_default()
}

/// `\-\-name VALUE` or `\-c, \-\-config FILE` or `FILE` for a positional.
fn arg_synopsis(arg: &Arg) -> String {
    let value = arg
        .get_value_names()
        .and_then(|v| v.first())
        .map(|v| v.to_string())
        .unwrap_or_else(|| arg.get_id().as_str().to_uppercase());
    let takes_value = arg.get_action().takes_values();
    if arg.is_positional() {
        return if arg.is_required_set() { value } else { format!("[{value}]") };
    }
    let mut names = Vec::new();
    if let Some(s) = arg.get_short() {
        names.push(format!("\\-{s}"));
    }
    if let Some(l) = arg.get_long() {
        names.push(format!("\\-\\-{}", roff(l)));
    }
    let mut s = names.join(", ");
    if takes_value {
        let _ = write!(s, " \\fI{value}\\fR");
    }
    s
}

pub(crate) fn visible_args(cmd: &Command) -> impl Iterator<Item = &Arg> {
    cmd.get_arguments().filter(|a| !a.is_hide_set() && !matches!(a.get_id().as_str(), "help" | "version"))
}

pub(crate) fn visible_subcommands(cmd: &Command) -> impl Iterator<Item = &Command> {
    cmd.get_subcommands().filter(|c| !c.is_hide_set() && c.get_name() != "help")
}

fn options(out: &mut String, args: Vec<&Arg>) {
    for arg in args {
        let _ = writeln!(out, ".TP\n.B {}", arg_synopsis(arg));
        let mut help = roff(&help_of(arg));
        if let Some(env) = arg.get_env() {
            let _ = write!(help, " (environment: {})", roff(&env.to_string_lossy()));
        }
        let _ = writeln!(out, "{help}");
    }
}

/// The manual page of `cmd` in `section` (8 for system programs).
pub fn man_page(cmd: &Command, section: u8, extra: &Extra<'_>) -> String {
    let name = cmd.get_name();
    let version = cmd.get_version().unwrap_or("");
    let about = cmd.get_about().map(|a| a.to_string()).unwrap_or_default();
    let mut out = String::new();
    let _ = writeln!(out, ".TH {} {section} \"\" \"{name} {version}\" \"opsagent\"", name.to_uppercase());
    let _ = writeln!(out, ".SH NAME\n{} \\- {}", roff(name), roff(&about));
    let _ = writeln!(out, ".SH SYNOPSIS");
    if cmd.has_subcommands() {
        let _ = writeln!(out, ".B {}\n.I COMMAND\n[\\fIOPTIONS\\fR]", roff(name));
    } else {
        let _ = writeln!(out, ".B {}\n[\\fIOPTIONS\\fR]", roff(name));
    }
    let _ = writeln!(out, ".SH DESCRIPTION\n{}", roff(&about));
    for p in extra.description {
        let _ = writeln!(out, ".PP\n{}", roff(p));
    }
    let top: Vec<&Arg> = visible_args(cmd).collect();
    if !top.is_empty() {
        let _ = writeln!(out, ".SH OPTIONS");
        options(&mut out, top);
    }
    let subs: Vec<&Command> = visible_subcommands(cmd).collect();
    if !subs.is_empty() {
        let _ = writeln!(out, ".SH COMMANDS");
        for sub in subs {
            write_subcommand(&mut out, name, sub);
        }
    }
    if !extra.environment.is_empty() {
        let _ = writeln!(out, ".SH ENVIRONMENT");
        for (var, what) in extra.environment {
            let _ = writeln!(out, ".TP\n.B {}\n{}", roff(var), roff(what));
        }
    }
    if !extra.files.is_empty() {
        let _ = writeln!(out, ".SH FILES");
        for (path, what) in extra.files {
            let _ = writeln!(out, ".TP\n.I {}\n{}", roff(path), roff(what));
        }
    }
    if !extra.see_also.is_empty() {
        let refs: Vec<String> = extra
            .see_also
            .iter()
            .map(|r| match r.split_once('(') {
                Some((page, sec)) => format!(".BR {} ({}", roff(page), roff(sec)),
                None => format!(".B {}", roff(r)),
            })
            .collect();
        let _ = writeln!(out, ".SH SEE ALSO");
        for (i, r) in refs.iter().enumerate() {
            let sep = if i + 1 < refs.len() { "," } else { "" };
            let _ = writeln!(out, "{r}{sep}");
        }
    }
    out
}

fn write_subcommand(out: &mut String, parent: &str, sub: &Command) {
    let path = format!("{parent} {}", sub.get_name());
    let mut synopsis = vec![format!("\\fB{}\\fR", roff(&path))];
    for a in sub.get_arguments().filter(|a| a.is_positional() && !a.is_hide_set()) {
        synopsis.push(arg_synopsis(a));
    }
    if visible_args(sub).any(|a| !a.is_positional()) {
        synopsis.push("[\\fIOPTIONS\\fR]".to_string());
    }
    if sub.has_subcommands() {
        synopsis.push("\\fICOMMAND\\fR".to_string());
    }
    let _ = writeln!(out, ".SS {}", synopsis.join(" "));
    let about = sub.get_long_about().or_else(|| sub.get_about()).map(|a| a.to_string()).unwrap_or_default();
    let _ = writeln!(out, "{}", roff(&about));
    let opts: Vec<&Arg> = visible_args(sub).collect();
    if !opts.is_empty() {
        let _ = writeln!(out, ".RS");
        options(out, opts);
        let _ = writeln!(out, ".RE");
    }
    for nested in visible_subcommands(sub) {
        write_subcommand(out, &path, nested);
    }
}

/// Writes `DIR/NAME.8` (the page of `cmd`), creating DIR.
pub fn write_page(dir: &std::path::Path, cmd: &Command, extra: &Extra<'_>) -> anyhow::Result<std::path::PathBuf> {
    use anyhow::Context as _;
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create the directory", dir.display()))?;
    let path = dir.join(format!("{}.8", cmd.get_name()));
    std::fs::write(&path, man_page(cmd, 8, extra)).with_context(|| format!("{}: cannot write", path.display()))?;
    Ok(path)
}

/// A bash completion function for `cmd`: subcommands (nested too) and each one's long
/// options, files for options that take a path.
pub fn bash_completion(cmd: &Command) -> String {
    let name = cmd.get_name();
    let func = format!("_{}", name.replace('-', "_"));
    let mut cases = String::new();
    collect_cases(cmd, "", &mut cases);
    format!(
        "# bash completion for {name} (generated by `{name} completion bash`)\n\
{func}() {{\n\
    local cur path word i\n\
    cur=\"${{COMP_WORDS[COMP_CWORD]}}\"\n\
    path=\"\"\n\
    for ((i = 1; i < COMP_CWORD; i++)); do\n\
        word=\"${{COMP_WORDS[i]}}\"\n\
        case \"$word\" in -*) continue ;; esac\n\
        case \"${{path:+$path }}$word\" in\n\
{known}\
            *) ;;\n\
        esac\n\
    done\n\
    local words=\"\"\n\
    case \"$path\" in\n\
{cases}\
    esac\n\
    if [[ \"$cur\" == -* || -n \"$words\" ]]; then\n\
        mapfile -t COMPREPLY < <(compgen -W \"$words\" -- \"$cur\")\n\
    fi\n\
    if [[ ${{#COMPREPLY[@]}} -eq 0 && \"$cur\" != -* ]]; then\n\
        mapfile -t COMPREPLY < <(compgen -f -- \"$cur\")\n\
    fi\n\
}}\n\
complete -F {func} {name}\n",
        known = known_paths(cmd, ""),
    )
}

fn known_paths(cmd: &Command, prefix: &str) -> String {
    let mut out = String::new();
    for sub in visible_subcommands(cmd) {
        let path = if prefix.is_empty() { sub.get_name().to_string() } else { format!("{prefix} {}", sub.get_name()) };
        let _ = writeln!(out, "            \"{path}\") path=\"{path}\" ;;");
        out.push_str(&known_paths(sub, &path));
    }
    out
}

fn collect_cases(cmd: &Command, path: &str, out: &mut String) {
    let mut words: Vec<String> = visible_subcommands(cmd).map(|s| s.get_name().to_string()).collect();
    for a in visible_args(cmd) {
        if let Some(l) = a.get_long() {
            words.push(format!("--{l}"));
        }
    }
    words.push("--help".to_string());
    let _ = writeln!(out, "        \"{path}\") words=\"{}\" ;;", words.join(" "));
    for sub in visible_subcommands(cmd) {
        let p = if path.is_empty() { sub.get_name().to_string() } else { format!("{path} {}", sub.get_name()) };
        collect_cases(sub, &p, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roff_neutralises_requests_and_escapes() {
        assert_eq!(roff(".rm x\n'so /etc/passwd"), "\\&.rm x\n\\&'so /etc/passwd");
        assert_eq!(roff("a\\b --c"), "a\\eb \\-\\-c");
        assert_eq!(roff("bell\u{7}"), "bell");
    }
}
