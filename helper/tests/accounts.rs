//! `linux.user` and `linux.group` given bad parameters (issue 24, item 12): the helper
//! refuses, the refusal names the parameter, and no account file changes.
//!
//! Each value is tried where the helper meets it: the catalogue's decode, which every
//! request goes through first, and, for what that lets through, the state itself. Names,
//! groups, home and shell are typed (`AccountName`, `AccountNames`, `PathParam`): a state
//! cannot be given one that did not pass the decode, so every bad value here is refused
//! there. Either way `/etc/passwd`, `/etc/group`, `/etc/shadow` and `/etc/gshadow` stay
//! byte for byte what they were, and no account of the attempted name exists afterwards.
#![allow(clippy::unwrap_used)] // test support code outside #[test] fns

mod common;

use opsagent_helper::cancel::Cancel;
use opsagent_helper::states::{group, user};
use opsagent_proto::catalogue::{parse_state, LinuxGroup, LinuxUser};
use opsagent_proto::request::Outcome;
use serde_json::{json, Value};

const ACCOUNT_FILES: [&str; 4] = ["/etc/passwd", "/etc/group", "/etc/shadow", "/etc/gshadow"];

fn account_files() -> Vec<Option<Vec<u8>>> {
    ACCOUNT_FILES.iter().map(|f| std::fs::read(f).ok()).collect()
}

/// The helper's answer to `raw` for `module`: the decode's refusal, or the outcome of
/// the state run with what the decode let through.
async fn attempt(module: &str, raw: &Value) -> Result<Outcome, String> {
    let parsed = parse_state(module, raw).map_err(|e| e.to_string())?;
    Ok(match module {
        "linux.user" => user::apply(&LinuxUser::try_from(parsed.params).unwrap(), Cancel::never()).await,
        _ => group::apply(&LinuxGroup::try_from(parsed.params).unwrap(), Cancel::never()).await,
    })
}

#[tokio::test]
async fn bad_account_parameters_are_refused_naming_the_parameter_and_change_nothing() {
    if !nix::unistd::geteuid().is_root() {
        common::skip("bad_account_parameters_are_refused_naming_the_parameter_and_change_nothing: SKIPPED, needs root");
        return;
    }
    // (module, parameters, the parameter the refusal names, an account that must not exist after)
    let cases: Vec<(&str, Value, &str, &str)> = vec![
        ("linux.user", json!({"username": "bad:name"}), "username", "bad"),
        ("linux.user", json!({"username": "-obad"}), "username", "-obad"),
        ("linux.user", json!({"username": "bad name"}), "username", "bad"),
        ("linux.user", json!({"username": ""}), "username", ""),
        ("linux.user", json!({"username": "oa24user", "groups": ["no such"]}), "groups", "oa24user"),
        ("linux.user", json!({"username": "oa24user", "groups": ["-g0"]}), "groups", "oa24user"),
        ("linux.user", json!({"username": "oa24user", "groups": ["users", "a:b"]}), "groups", "oa24user"),
        ("linux.user", json!({"username": "x\u{7f}"}), "username", ""),
        ("linux.user", json!({"username": "oa24user", "shell": "/bin/sh\n"}), "shell", "oa24user"),
        ("linux.user", json!({"username": "oa24user", "home": "relative/home"}), "home", "oa24user"),
        ("linux.user", json!({"username": "oa24user", "shell": "bin/sh"}), "shell", "oa24user"),
        ("linux.user", json!({"username": "oa24user", "uid": "zero"}), "uid", "oa24user"),
        ("linux.user", json!({"username": "oa24user", "gid": -1}), "gid", "oa24user"),
        ("linux.group", json!({"groupname": "bad:group"}), "groupname", "bad"),
        ("linux.group", json!({"groupname": "-g0"}), "groupname", "-g0"),
        ("linux.group", json!({"groupname": "a\nb"}), "groupname", "a"),
        ("linux.group", json!({"groupname": "a b"}), "groupname", "a"),
        ("linux.group", json!({"groupname": "oa24group", "gid": "lots"}), "gid", "oa24group"),
    ];
    let before = account_files();
    let mut refused_by_state = 0;
    for (module, raw, param, name) in &cases {
        let answer = attempt(module, raw).await;
        let message = match &answer {
            Err(decode) => decode.clone(),
            Ok(out) => {
                assert!(!out.result && out.changes.is_empty(), "{module} {raw}: {out:?}");
                refused_by_state += 1;
                out.comment.clone()
            }
        };
        assert!(
            message.contains(&format!("parameter {param}:")) || message.contains(&format!("parameter \"{param}\"")),
            "{module} {raw}: the refusal does not name {param}: {message}"
        );
        assert_eq!(account_files(), before, "{module} {raw}: an account file changed");
        if !name.is_empty() {
            assert!(nix::unistd::User::from_name(name).unwrap().is_none(), "{module} {raw}: user {name} exists");
            assert!(nix::unistd::Group::from_name(name).unwrap().is_none(), "{module} {raw}: group {name} exists");
        }
    }
    // The typed parameters leave the states nothing to refuse among these.
    assert_eq!(refused_by_state, 0, "refused by a state rather than at decode");
    eprintln!("{} attempts, all refused at decode", cases.len());
}
