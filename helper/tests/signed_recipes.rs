//! The "compromised daemon" suite in signed mode (issue 16): a real helper with a
//! `recipe_key` and **no policy at all**, and a client speaking the helper protocol as
//! the agent's uid. It cannot get any state run that the backend did not sign: not an
//! arbitrary `linux.cmd`, not a signed state's parameters sent as an `Apply`, not an
//! altered recipe, a recipe signed by another key or for another app, an older version,
//! an index past the end, nor a download the signed state does not pin. The signed
//! states themselves run (by index), and still do after a helper restart without the
//! recipe being sent again.
//!
//! As in `compromised_daemon.rs`, the attacker runs in a child process under the agent's
//! uid (this test binary again, `attacker_child`). These tests need root.

// Tests start helpers and attacker processes themselves; the helper's code spawns
// through exec only (helper/clippy.toml).
#![allow(clippy::disallowed_methods)]
#![allow(clippy::unwrap_used)]

mod policy_support;

use std::fs;
use std::io::Cursor;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use opsagent_proto::request::{ErrorCode, RecipeUpload, Reply};
use opsagent_proto::signed::{canonical_bytes, trusted_comment, SignState};
use policy_support::{apply_json, Client, Helper, AGENT_GID, AGENT_UID};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const CHILD_ENV: &str = "OPSAGENT_HELPER_TEST_SIGNED_DIR";
const APP: &str = "app-signed";
const MARKER: &str = "/tmp/opsagent-signed-recipes-unsigned-ran";
const PINNED: &str = "pinned content\n";

fn sign(
    kp: &minisign::KeyPair,
    app: &str,
    version: u64,
    states: &[(String, &str, Value, Option<Value>)],
) -> RecipeUpload {
    let bytes = canonical_bytes(
        version,
        states.iter().map(|(id, module, parameter, pins)| SignState { id, module, parameter, pins: pins.as_ref() }),
    )
    .unwrap();
    let comment = trusted_comment(app, version);
    let sig = minisign::sign(Some(&kp.pk), &kp.sk, Cursor::new(bytes.as_bytes()), Some(&comment), None).unwrap();
    RecipeUpload { bytes, signature: sig.into_string() }
}

/// The signed recipe of version `v`: a file, an unpinned download, a pinned one, a command.
fn states(dir: &Path, v: u64) -> Vec<(String, &'static str, Value, Option<Value>)> {
    let a = dir.join("allowed");
    let pin = json!({"http://h/pinned": hex::encode(Sha256::digest(PINNED.as_bytes()))});
    vec![
        (
            "s-file".into(),
            "linux.file",
            json!({"path": a.join("signed.txt"), "content": format!("signed v{v}\n")}),
            None,
        ),
        (
            "s-unpinned".into(),
            "linux.file",
            json!({"path": a.join("unpinned.txt"), "remote_uri": "http://h/unpinned"}),
            None,
        ),
        (
            "s-pinned".into(),
            "linux.file",
            json!({"path": a.join("pinned.txt"), "remote_uri": "http://h/pinned"}),
            Some(pin),
        ),
        ("s-cmd".into(), "linux.cmd", json!({"cmd": format!("echo v{v} > {}", a.join("cmd-ran").display())}), None),
    ]
}

/// What the parent hands the attacker: recipes it could have seen go by, and forgeries.
#[derive(Serialize, Deserialize)]
struct Inputs {
    v1_old_key: RecipeUpload,
    v2: RecipeUpload,
    v2_altered: RecipeUpload,
    v3_foreign_key: RecipeUpload,
    other_app: RecipeUpload,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Expect {
    /// Refused by the helper (`unverified`).
    Refused,
    /// A state of the verified recipe that fails by itself (with the reason).
    FailedOutcome,
    /// Accepted: the verified recipe, or one of its states.
    Runs,
}

#[derive(Debug, Serialize, Deserialize)]
struct Got {
    what: String,
    expect: Expect,
    code: Option<ErrorCode>,
    result: Option<bool>,
    reason: String,
}

#[tokio::test]
async fn an_agent_uid_cannot_run_anything_the_backend_did_not_sign() {
    let old = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
    let new = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
    let foreign = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
    // Two keys while rotating: v1 was signed with the old one, v2 with the new one.
    let keys = format!("{} , {}", old.pk.to_base64(), new.pk.to_base64());
    let h = Helper::start_signed(|_| format!("[userdata]\napp_id = {APP}\nrecipe_key = {keys}\n")).await;
    let dir = h.dir.path().to_path_buf();
    fs::create_dir(dir.join("allowed")).unwrap();
    let results = dir.join("results");
    fs::create_dir(&results).unwrap();
    std::os::unix::fs::chown(&results, Some(AGENT_UID), Some(AGENT_GID)).unwrap();
    let _ = fs::remove_file(MARKER);

    let mut altered = states(&dir, 2);
    altered[0].2["content"] = json!("altered in transit\n");
    let v2 = sign(&new, APP, 2, &states(&dir, 2));
    let inputs = Inputs {
        v1_old_key: sign(&old, APP, 1, &states(&dir, 1)),
        v2_altered: RecipeUpload { bytes: sign(&new, APP, 2, &altered).bytes, signature: v2.signature.clone() },
        v2,
        v3_foreign_key: sign(&foreign, APP, 3, &states(&dir, 3)),
        other_app: sign(&new, "app-other", 4, &states(&dir, 4)),
    };
    let inputs_path = results.join("inputs.json");
    fs::write(&inputs_path, serde_json::to_vec(&inputs).unwrap()).unwrap();
    fs::set_permissions(&inputs_path, fs::Permissions::from_mode(0o644)).unwrap();

    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "attacker_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, &dir)
        .uid(AGENT_UID)
        .gid(AGENT_GID)
        .output()
        .unwrap();
    let got: Vec<Got> = serde_json::from_slice(&fs::read(results.join("results.json")).unwrap_or_else(|e| {
        panic!(
            "the attacker wrote no results ({e}):\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }))
    .unwrap();
    assert!(got.len() >= 15, "{got:#?}");
    let mut failures = Vec::new();
    for g in &got {
        let ok = match g.expect {
            Expect::Refused => g.code == Some(ErrorCode::Unverified),
            Expect::FailedOutcome => g.code.is_none() && g.result == Some(false),
            Expect::Runs => g.code.is_none() && g.result != Some(false),
        };
        if !ok {
            failures.push(format!("{g:?}"));
        }
        if g.expect == Expect::Refused {
            if let Err(log) = h.wait_for_log(&["refused", &g.reason]).await {
                let escaped = g.reason.escape_debug().to_string();
                if !log.lines().any(|l| l.contains(&escaped)) {
                    failures.push(format!("{}: reason not in the log: {}", g.what, g.reason));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}\nlog:\n{}", failures.join("\n"), h.log());
    let reason = |what: &str| got.iter().find(|g| g.what == what).unwrap().reason.clone();
    assert!(reason("altered recipe").contains("does not verify"), "{}", reason("altered recipe"));
    assert!(reason("other app").contains("app-other"), "{}", reason("other app"));
    assert!(reason("older version replayed").contains("not newer"), "{}", reason("older version replayed"));
    assert!(reason("index past the end").contains("no state at index 99"), "{}", reason("index past the end"));
    let behind = reason("a state right behind a refused recipe");
    assert!(behind.contains("sent before on this connection was refused"), "{behind}");
    assert!(reason("unpinned download").contains("not pinned"), "{}", reason("unpinned download"));

    // What ran is what was signed, whatever the frames said.
    assert!(!Path::new(MARKER).exists(), "an unsigned command ran as root");
    assert_eq!(fs::read_to_string(dir.join("allowed/signed.txt")).unwrap(), "signed v2\n");
    assert_eq!(fs::read_to_string(dir.join("allowed/cmd-ran")).unwrap(), "v2\n");
    assert_eq!(fs::read_to_string(dir.join("allowed/pinned.txt")).unwrap(), PINNED);
    assert!(!dir.join("allowed/unpinned.txt").exists());

    // A restarted helper applies its kept copy without the recipe being sent again.
    fs::remove_file(dir.join("allowed/signed.txt")).unwrap();
    let h = h.restart().await;
    h.wait_for_log(&["verified recipe read back", "recipe_version=2"]).await.unwrap();
    let mut root = Client::connect(&h.sock).await;
    let reply = root.call_raw(json!({"type": "apply-signed", "recipe_version": 2, "index": 0})).await;
    assert!(matches!(&reply, Some(Reply::Outcome(o)) if o.result), "{reply:?}");
    assert_eq!(fs::read_to_string(dir.join("allowed/signed.txt")).unwrap(), "signed v2\n");
    // Even root's connection cannot send parameters to a helper in signed mode.
    let reply = root.call_raw(apply_json("r", "linux.cmd", json!({"cmd": format!("touch {MARKER}")}), &[])).await;
    assert!(matches!(&reply, Some(Reply::Error(e)) if e.code == ErrorCode::Unverified), "{reply:?}");
    let Some(Reply::Status(st)) = root.call_raw(json!({"type": "status"})).await else { panic!("no status") };
    assert!(st.recipes_verified);
    assert_eq!(st.verified_version, Some(2));
    assert!(!Path::new(MARKER).exists());
}

/// Not a test of its own: the attacker half, run under the agent's uid.
#[tokio::test]
async fn attacker_child() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let dir = PathBuf::from(dir);
    assert_eq!(nix::unistd::getuid().as_raw(), AGENT_UID, "the attacker must run as the agent's uid");
    let inputs: Inputs = serde_json::from_slice(&fs::read(dir.join("results/inputs.json")).unwrap()).unwrap();
    let recipe = |u: &RecipeUpload| json!({"type": "recipe", "bytes": u.bytes, "signature": u.signature});
    let signed = |v: u64, i: u32| json!({"type": "apply-signed", "recipe_version": v, "index": i});
    // A downloaded file of the agent's own, as the daemon hands them over.
    let fetched = |name: &str, content: &str, url: &str| {
        let path = dir.join("results").join(name);
        fs::write(&path, content).unwrap();
        json!([{"url": url, "path": path, "size": content.len(), "sha256": hex::encode(Sha256::digest(content.as_bytes()))}])
    };
    let signed_state_params = states(&dir, 2)[0].2.clone();
    let mut with_params = signed(2, 0);
    with_params["module"] = json!("linux.file");
    with_params["params"] = json!({"path": dir.join("allowed/signed.txt"), "content": "from the daemon\n"});
    let mut unpinned = signed(2, 1);
    unpinned["fetched"] = fetched("u", "anything\n", "http://h/unpinned");
    let mut wrong = signed(2, 2);
    wrong["fetched"] = fetched("w", "not what was pinned\n", "http://h/pinned");
    let mut pinned = signed(2, 2);
    pinned["fetched"] = fetched("p", PINNED, "http://h/pinned");

    let attempts: Vec<(&str, Value, Expect)> = vec![
        (
            "arbitrary linux.cmd",
            apply_json("x1", "linux.cmd", json!({"cmd": format!("touch {MARKER}")}), &[]),
            Expect::Refused,
        ),
        (
            "a signed state's parameters as an apply",
            apply_json("x2", "linux.file", signed_state_params, &[]),
            Expect::Refused,
        ),
        ("a state before any recipe", signed(2, 0), Expect::Refused),
        ("altered recipe", recipe(&inputs.v2_altered), Expect::Refused),
        ("recipe signed by a key not configured", recipe(&inputs.v3_foreign_key), Expect::Refused),
        ("other app", recipe(&inputs.other_app), Expect::Refused),
        ("the signed recipe", recipe(&inputs.v2), Expect::Runs),
        ("altered recipe after the signed one", recipe(&inputs.v2_altered), Expect::Refused),
        ("a state right behind a refused recipe", signed(2, 0), Expect::Refused),
        ("the signed recipe again", recipe(&inputs.v2), Expect::Runs),
        ("older version replayed", recipe(&inputs.v1_old_key), Expect::Refused),
        ("a state of the older version", signed(1, 0), Expect::Refused),
        ("index past the end", signed(2, 99), Expect::Refused),
        (
            "arbitrary linux.cmd after the recipe",
            apply_json("x3", "linux.cmd", json!({"cmd": format!("touch {MARKER}")}), &[]),
            Expect::Refused,
        ),
        ("signed state 0", signed(2, 0), Expect::Runs),
        ("signed state 0 with parameters in the frame", with_params, Expect::Runs),
        ("unpinned download asked for", signed(2, 1), Expect::FailedOutcome),
        ("unpinned download", unpinned, Expect::Refused),
        ("download not matching its pin", wrong, Expect::Refused),
        ("pinned download", pinned, Expect::Runs),
        ("signed command", signed(2, 3), Expect::Runs),
    ];
    let mut client = Client::connect(&dir.join("h.sock")).await;
    let mut got = Vec::new();
    for (what, request, expect) in attempts {
        let reply = client.call_raw(request).await.expect("the helper closed the connection");
        let mut g = Got { what: what.into(), expect, code: None, result: None, reason: String::new() };
        match reply {
            Reply::Error(e) => (g.code, g.reason) = (Some(e.code), e.message),
            Reply::Outcome(o) => (g.result, g.reason) = (Some(o.result), o.comment),
            Reply::RecipeVerified { recipe_version, .. } => g.reason = format!("verified version {recipe_version}"),
            Reply::NeedFetch { urls } => g.reason = format!("needs {}", urls.join(" ")),
            other => g.reason = format!("{other:?}"),
        }
        got.push(g);
    }
    // Pipelined: an unsigned command sent to follow a signed state that runs.
    let arbitrary = apply_json("x4", "linux.cmd", json!({"cmd": format!("touch {MARKER}")}), &[]);
    let (first, ahead) =
        client.call_pipelined(signed(2, 0), arbitrary).await.expect("the helper closed the connection");
    let mut g = Got {
        what: "arbitrary linux.cmd sent ahead behind a signed state".into(),
        expect: Expect::Refused,
        code: None,
        result: None,
        reason: String::new(),
    };
    match (first, ahead) {
        (Reply::Outcome(o), Reply::Error(e)) if o.result => (g.code, g.reason) = (Some(e.code), e.message),
        other => g.reason = format!("{other:?}"),
    }
    got.push(g);
    fs::write(dir.join("results/results.json"), serde_json::to_vec(&got).unwrap()).unwrap();
}

/// Issue 16 with #18 item 3: the signature covers the whole recipe, and the states are
/// typed one by one. A signed recipe holding a state with an unusable id, parameters the
/// catalogue refuses or malformed pins is verified and kept; asking for that state is
/// refused naming it (by index and id), and the states around it run.
#[tokio::test]
async fn a_bad_state_of_a_signed_recipe_is_refused_alone() {
    let kp = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
    let key = kp.pk.to_base64();
    let h = Helper::start_signed(|_| format!("[userdata]\napp_id = {APP}\nrecipe_key = {key}\n")).await;
    let dir = h.dir.path().to_path_buf();
    let file = |name: &str| json!({"path": dir.join(name), "content": format!("{name}\n")});
    let recipe = sign(
        &kp,
        APP,
        7,
        &[
            ("s-before".into(), "linux.file", file("before"), None),
            (String::new(), "linux.file", file("empty-id"), None),
            ("s-mode".into(), "linux.file", json!({"path": dir.join("mode"), "mode": "rwx"}), None),
            ("s-pins".into(), "linux.file", file("pins"), Some(json!({"http://h/x": "not hex"}))),
            ("s-module".into(), "", json!({}), None),
            ("s-after".into(), "linux.file", file("after"), None),
        ],
    );
    let mut root = Client::connect(&h.sock).await;
    let reply = root.call_raw(json!({"type": "recipe", "bytes": recipe.bytes, "signature": recipe.signature})).await;
    assert!(matches!(&reply, Some(Reply::RecipeVerified { recipe_version: 7, .. })), "{reply:?}");
    let mut refused = Vec::new();
    for index in 0..6u32 {
        let reply = root.call_raw(json!({"type": "apply-signed", "recipe_version": 7, "index": index})).await;
        match reply {
            Some(Reply::Outcome(o)) => assert!(o.result, "state {index}: {o:?}"),
            Some(Reply::Error(e)) => {
                assert_eq!(e.code, ErrorCode::InvalidParameter, "state {index}: {e:?}");
                refused.push((index, e.message));
            }
            other => panic!("state {index}: {other:?}"),
        }
    }
    let indexes: Vec<u32> = refused.iter().map(|(i, _)| *i).collect();
    assert_eq!(indexes, vec![1, 2, 3, 4], "{refused:#?}");
    let says = |i: usize, what: &[&str]| {
        let m = &refused[i].1;
        assert!(what.iter().all(|w| m.contains(w)), "{m}");
    };
    says(0, &["state #2", "state id \"\" is empty"]);
    says(1, &["state #3", "\"s-mode\"", "\"mode\""]);
    says(2, &["state #4", "\"s-pins\"", "not a sha256"]);
    says(3, &["state #5", "\"s-module\"", "unknown module"]);
    assert_eq!(fs::read_to_string(dir.join("before")).unwrap(), "before\n");
    assert_eq!(fs::read_to_string(dir.join("after")).unwrap(), "after\n");
    assert!(!dir.join("empty-id").exists() && !dir.join("pins").exists());
}
