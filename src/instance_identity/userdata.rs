//! Instance userdata: the shell script the original VisualOps IDE put in every instance,
//! whose `KEY=value` lines told the agent its app, backend and versions.
//!
//! Only plain assignments are read (`KEY=value`, `export KEY=value`, quoted values,
//! `$VAR`/`${VAR}` of variables assigned above). Anything the shell would have to run to
//! know the value (`$(…)`, backquotes, unknown variables) makes the line ignored rather
//! than guessed. Comments, other commands and here-document bodies are skipped.

use std::collections::BTreeMap;
use std::iter::Peekable;
use std::str::Chars;

use crate::config::{Config, ConfigError, Origin};

/// The variables found in the userdata; empty strings are kept as written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Userdata {
    pub app_id: Option<String>,
    pub ws_uri: Option<String>,
    pub version: Option<String>,
    pub base_remote: Option<String>,
    /// The original agent's GPG key URL (kept for reference; releases use `update_key`).
    pub gpg_key_uri: Option<String>,
    pub update_key: Option<String>,
    pub instance_id: Option<String>,
    pub metadata_url: Option<String>,
    /// Every other assignment.
    pub other: BTreeMap<String, String>,
}

/// Userdata variable → `[userdata]` config key filled from it. `METADATA_URL` is not
/// applied: the userdata was itself read from the metadata service.
const FILLS: &[(&str, &str)] = &[
    ("WS_URI", "ws_uri"),
    ("APP_ID", "app_id"),
    ("VERSION", "version"),
    ("BASE_REMOTE", "base_remote"),
    ("UPDATE_KEY", "update_key"),
    ("INSTANCE_ID", "instance_id"),
];

impl Userdata {
    /// The value of a variable by its userdata name.
    pub fn get(&self, name: &str) -> Option<&str> {
        let field = match name {
            "APP_ID" => &self.app_id,
            "WS_URI" => &self.ws_uri,
            "VERSION" => &self.version,
            "BASE_REMOTE" => &self.base_remote,
            "GPG_KEY_URI" => &self.gpg_key_uri,
            "UPDATE_KEY" => &self.update_key,
            "INSTANCE_ID" => &self.instance_id,
            "METADATA_URL" => &self.metadata_url,
            _ => return self.other.get(name).map(String::as_str),
        };
        field.as_deref()
    }

    fn from_vars(mut vars: BTreeMap<String, String>) -> Userdata {
        let mut take = |name: &str| vars.remove(name);
        let mut userdata = Userdata {
            app_id: take("APP_ID"),
            ws_uri: take("WS_URI"),
            version: take("VERSION"),
            base_remote: take("BASE_REMOTE"),
            gpg_key_uri: take("GPG_KEY_URI"),
            update_key: take("UPDATE_KEY"),
            instance_id: take("INSTANCE_ID"),
            metadata_url: take("METADATA_URL"),
            other: BTreeMap::new(),
        };
        userdata.other = vars;
        userdata
    }
}

/// Reads the assignments of a userdata script. Never fails: lines it does not understand
/// are skipped.
pub fn parse_userdata(text: &str) -> Userdata {
    let mut vars = BTreeMap::new();
    let mut heredoc_end: Option<String> = None;
    for line in text.lines() {
        let line = line.trim();
        if let Some(end) = &heredoc_end {
            if line == end {
                heredoc_end = None;
            }
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        heredoc_end = heredoc_delimiter(line);
        if let Some((name, value)) = assignment(line, &vars) {
            vars.insert(name, value);
        }
    }
    Userdata::from_vars(vars)
}

/// Fills the `[userdata]` keys that neither the file nor a flag set. `url` is where the
/// userdata came from (for error messages). Returns the config keys filled. Empty values
/// are skipped; an invalid value is an error naming the userdata variable.
pub fn fill_from_userdata(
    config: &mut Config,
    userdata: &Userdata,
    url: &str,
) -> Result<Vec<&'static str>, ConfigError> {
    let mut filled = Vec::new();
    for (var, key) in FILLS {
        let Some(value) = userdata.get(var).filter(|v| !v.is_empty()) else {
            continue;
        };
        let origin = Origin::Userdata { url: url.to_string(), var: (*var).to_string() };
        if config.set_if_unset(origin, "userdata", key, value)? {
            filled.push(*key);
        }
    }
    Ok(filled)
}

/// `NAME=value` or `export NAME=value`, with the value expanded; `None` for other lines.
fn assignment(line: &str, vars: &BTreeMap<String, String>) -> Option<(String, String)> {
    let line = match line.strip_prefix("export") {
        Some(rest) if rest.starts_with([' ', '\t']) => rest.trim_start(),
        _ => line,
    };
    let (name, value) = line.split_once('=')?;
    if !is_name(name) {
        return None;
    }
    Some((name.to_string(), word(value, vars)?))
}

fn is_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// One shell word: quotes removed, variables expanded; ends at a blank or `;`, `&`, `|`.
fn word(text: &str, vars: &BTreeMap<String, String>) -> Option<String> {
    let mut out = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() || matches!(c, ';' | '&' | '|') => break,
            '\'' => out.push_str(&single_quoted(&mut chars)?),
            '"' => double_quoted(&mut chars, vars, &mut out)?,
            '\\' => out.extend(chars.next()),
            '$' => expand(&mut chars, vars, &mut out)?,
            // Command substitution, arrays, redirections: not a plain value.
            '`' | '(' | ')' | '<' | '>' => return None,
            c => out.push(c),
        }
    }
    Some(out)
}

fn single_quoted(chars: &mut Peekable<Chars<'_>>) -> Option<String> {
    let mut out = String::new();
    loop {
        match chars.next()? {
            '\'' => return Some(out),
            c => out.push(c),
        }
    }
}

fn double_quoted(chars: &mut Peekable<Chars<'_>>, vars: &BTreeMap<String, String>, out: &mut String) -> Option<()> {
    loop {
        match chars.next()? {
            '"' => return Some(()),
            '\\' => match chars.next()? {
                c @ ('"' | '\\' | '$' | '`') => out.push(c),
                c => {
                    out.push('\\');
                    out.push(c);
                }
            },
            '$' => expand(chars, vars, out)?,
            '`' => return None,
            c => out.push(c),
        }
    }
}

/// After a `$`: `${NAME}` or `$NAME` of a variable assigned above; a lone `$` stays.
fn expand(chars: &mut Peekable<Chars<'_>>, vars: &BTreeMap<String, String>, out: &mut String) -> Option<()> {
    let name = match chars.peek() {
        Some('{') => {
            chars.next();
            let name: String = chars.by_ref().take_while(|c| *c != '}').collect();
            // `${X:-default}` and friends are not plain names: give up on the line.
            is_name(&name).then_some(name)?
        }
        Some(c) if c.is_ascii_alphabetic() || *c == '_' => {
            let mut name = String::new();
            while let Some(c) = chars.next_if(|c| c.is_ascii_alphanumeric() || *c == '_') {
                name.push(c);
            }
            name
        }
        // `$(…)`, `$1`, `$?`, …: only the shell knows.
        Some(c) if !c.is_whitespace() && *c != '"' && *c != '/' => return None,
        _ => {
            out.push('$');
            return Some(());
        }
    };
    out.push_str(vars.get(&name)?);
    Some(())
}

/// The end word of a here-document started on this line (`<<EOF`, `<<-'EOF'`, `<< "EOF"`).
fn heredoc_delimiter(line: &str) -> Option<String> {
    let (_, rest) = line.split_once("<<")?;
    let rest = rest.strip_prefix('-').unwrap_or(rest).trim_start();
    let word: String = rest.chars().take_while(|c| !c.is_whitespace() && !matches!(c, ';' | '&' | '|' | '>')).collect();
    let word = word.trim_matches(['\'', '"']);
    // `<<<` is a here-string, not a here-document.
    (!word.is_empty() && !word.starts_with('<')).then(|| word.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn original_visualops_userdata() {
        let text = "#!/bin/bash\n\
            ## VisualOps userdata\r\n\
            APP_ID=app-7e59c1\r\n\
            WS_URI=wss://api.visualops.io:443/agent/\n\
            VERSION=v2015-03-26\n\
            BASE_REMOTE=https://s3.amazonaws.com/visualops\n\
            GPG_KEY_URI=${BASE_REMOTE}/visualops.gpg\n\
            curl -sSL -o /tmp/userdata.sh ${BASE_REMOTE}/${VERSION}/userdata.sh\n\
            bash /tmp/userdata.sh \"${APP_ID}\" \"${WS_URI}\"\n";
        let u = parse_userdata(text);
        assert_eq!(u.app_id.as_deref(), Some("app-7e59c1"));
        assert_eq!(u.ws_uri.as_deref(), Some("wss://api.visualops.io:443/agent/"));
        assert_eq!(u.version.as_deref(), Some("v2015-03-26"));
        assert_eq!(u.base_remote.as_deref(), Some("https://s3.amazonaws.com/visualops"));
        assert_eq!(u.gpg_key_uri.as_deref(), Some("https://s3.amazonaws.com/visualops/visualops.gpg"));
        assert!(u.other.is_empty());
    }

    #[test]
    fn export_quotes_comments_and_other_keys() {
        let text = "  export APP_ID=\"app 1\"\n\
            export\tWS_URI='wss://b/$NOT_EXPANDED'\n\
            VERSION=1.2.3 # trailing comment\n\
            UPDATE_KEY=\"RWQ\\\"x\\$y\"\n\
            INSTANCE_ID=i-1; echo done\n\
            METADATA_URL=http://md\\ x\n\
            # APP_ID=commented-out\n\
            CUSTOM_thing=\"a\"'b'c\n\
            EMPTY=\n\
            exported=1\n";
        let u = parse_userdata(text);
        assert_eq!(u.app_id.as_deref(), Some("app 1"));
        assert_eq!(u.ws_uri.as_deref(), Some("wss://b/$NOT_EXPANDED"));
        assert_eq!(u.version.as_deref(), Some("1.2.3"));
        assert_eq!(u.update_key.as_deref(), Some("RWQ\"x$y"));
        assert_eq!(u.instance_id.as_deref(), Some("i-1"));
        assert_eq!(u.metadata_url.as_deref(), Some("http://md x"));
        assert_eq!(u.get("CUSTOM_thing"), Some("abc"));
        assert_eq!(u.get("EMPTY"), Some(""));
        assert_eq!(u.get("exported"), Some("1"));
        assert_eq!(u.get("APP_ID"), Some("app 1"));
    }

    #[test]
    fn lines_only_the_shell_could_evaluate_are_ignored() {
        let text = "APP_ID=$(curl -s http://x/app)\n\
            WS_URI=`cat /etc/ws`\n\
            VERSION=${UNKNOWN}\n\
            BASE_REMOTE=${BASE:-https://x}\n\
            INSTANCE_ID=\"unterminated\n\
            ARR=(a b)\n\
            1BAD=x\n\
            echo APP_ID=not-an-assignment\n\
            PRICE=5$\n";
        let u = parse_userdata(text);
        assert_eq!(u, Userdata { other: [("PRICE".to_string(), "5$".to_string())].into(), ..Userdata::default() });
    }

    #[test]
    fn later_assignments_win_and_heredocs_are_skipped() {
        let text = "APP_ID=first\nAPP_ID=second\n\
            cat > /etc/other.conf <<-'EOF'\nAPP_ID=inside-heredoc\nEOF\n\
            WS_URI=wss://after/\ngrep x <<< \"$APP_ID\"\nVERSION=9\n";
        let u = parse_userdata(text);
        assert_eq!(u.app_id.as_deref(), Some("second"));
        assert_eq!(u.ws_uri.as_deref(), Some("wss://after/"));
        assert_eq!(u.version.as_deref(), Some("9"));
    }

    #[test]
    fn not_a_shell_script() {
        assert_eq!(parse_userdata("#cloud-config\npackages:\n  - nginx\n"), Userdata::default());
        assert_eq!(parse_userdata(""), Userdata::default());
    }

    #[test]
    fn fill_only_unset_keys_and_report_bad_values() {
        let url = "http://169.254.169.254/latest/user-data";
        let mut config = Config::parse("/etc/opsagent.conf".as_ref(), "[userdata]\napp_id = from-file\n").unwrap();
        let u = parse_userdata("APP_ID=from-userdata\nWS_URI=wss://ud/\nVERSION=\nBASE_REMOTE=https://dl/\n");
        assert_eq!(fill_from_userdata(&mut config, &u, url).unwrap(), vec!["ws_uri", "base_remote"]);
        assert_eq!(config.require_backend().unwrap(), ("wss://ud/", "from-file"));
        assert_eq!(config.userdata.version, None, "an empty VERSION= is ignored");

        let mut config = Config::default();
        let u = parse_userdata("WS_URI=http://not-ws/\n");
        let e = fill_from_userdata(&mut config, &u, url).unwrap_err().to_string();
        assert_eq!(
            e,
            "userdata http://169.254.169.254/latest/user-data: WS_URI ([userdata] ws_uri): \
             \"http://not-ws/\" must start with ws:// or wss://"
        );
    }
}
