//! What a plan shows of a file content change ([`opsagent_proto::request::Outcome::diff`]).
//!
//! Text content: a unified diff (3 lines of context), cut at [`DIFF_CAP`] bytes on a
//! line boundary with a line saying so. Binary content (a NUL byte, or not UTF-8), content
//! too large to diff ([`DIFF_INPUT_CAP`]) and sensitive content are named by their sha256
//! only: a diff travels to the daemon, the backend and the journal, and a secret must
//! not. Sensitive is decided by the caller (the policy's `secret_paths`, or a file that
//! others may not read).

use sha2::{Digest, Sha256};

/// Largest diff text shown, in bytes.
pub const DIFF_CAP: usize = 16 * 1024;
/// Larger content (either side) is compared by checksum only.
pub const DIFF_INPUT_CAP: usize = 1024 * 1024;

/// Why content is shown by checksum only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hidden {
    /// The policy marks the path secret, or others may not read the file.
    Sensitive,
}

/// The diff of `path` from `old` (`None`: the file does not exist) to `new`.
pub fn content(path: &str, old: Option<&[u8]>, new: &[u8], hidden: Option<Hidden>) -> String {
    let sums = || format!("sha256 {} -> {}", old.map_or_else(|| "(none)".to_string(), sha256), sha256(new));
    if hidden == Some(Hidden::Sensitive) {
        return format!("content of {path} not shown (sensitive): {}\n", sums());
    }
    if old.is_some_and(|o| o.len() > DIFF_INPUT_CAP) || new.len() > DIFF_INPUT_CAP {
        // Named without checksums: only the first bytes of a large old file were read.
        return format!("content of {path} too large to diff (over {DIFF_INPUT_CAP} bytes)\n");
    }
    let (Some(old_text), Some(new_text)) = (text(old.unwrap_or_default()), text(new)) else {
        return format!("binary content of {path}: {}\n", sums());
    };
    let from = if old.is_some() { path.to_string() } else { "/dev/null".to_string() };
    let diff = similar::TextDiff::from_lines(old_text, new_text);
    let full = diff.unified_diff().context_radius(3).header(&from, path).to_string();
    cap(full)
}

fn text(b: &[u8]) -> Option<&str> {
    if b.contains(&0) {
        return None;
    }
    std::str::from_utf8(b).ok()
}

fn sha256(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

fn cap(full: String) -> String {
    if full.len() <= DIFF_CAP {
        return full;
    }
    let cut = full[..DIFF_CAP].rfind('\n').map_or(0, |i| i + 1);
    format!("{}… diff cut at {DIFF_CAP} bytes ({} bytes in all)\n", &full[..cut], full.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_changes_are_a_unified_diff() {
        let d = content("/etc/app.conf", Some(b"a=1\nb=2\n"), b"a=1\nb=3\n", None);
        assert_eq!(d, "--- /etc/app.conf\n+++ /etc/app.conf\n@@ -1,2 +1,2 @@\n a=1\n-b=2\n+b=3\n");
        let new = content("/etc/new", None, b"x\n", None);
        assert!(new.starts_with("--- /dev/null\n+++ /etc/new\n"), "{new}");
        assert!(new.ends_with("+x\n"), "{new}");
    }

    #[test]
    fn binary_large_and_sensitive_content_is_named_by_checksums() {
        let bin = content("/opt/a.bin", Some(b"\0\x01"), b"\0\x02", None);
        assert!(bin.starts_with("binary content of /opt/a.bin: sha256 "), "{bin}");
        let secret = content("/etc/key", Some(b"old-secret\n"), b"new-secret\n", Some(Hidden::Sensitive));
        assert!(secret.starts_with("content of /etc/key not shown (sensitive): sha256 "), "{secret}");
        assert!(!secret.contains("secret\n-") && !secret.contains("new-secret"), "{secret}");
        let big = vec![b'a'; DIFF_INPUT_CAP + 1];
        assert!(content("/big", None, &big, None).contains("too large to diff"));
    }

    #[test]
    fn a_long_diff_is_cut_on_a_line_and_says_so() {
        let new: String = (0..5000).map(|i| format!("line {i}\n")).collect();
        let d = content("/etc/long", Some(b""), new.as_bytes(), None);
        assert!(d.len() <= DIFF_CAP + 80, "{}", d.len());
        assert!(d.ends_with("bytes in all)\n"), "{}", &d[d.len() - 100..]);
        let before_marker = d.rsplit_once("… diff cut").unwrap().0;
        assert!(before_marker.ends_with('\n'));
    }
}
