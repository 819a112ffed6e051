//! The one escaping rule of every log value.

use std::borrow::Cow;
use std::fmt::Write;

/// `s` with every control character written as an escape: `\n`, `\r`, `\t`, `\xHH`
/// (other C0 and C1 controls, DEL, so ESC is `\x1b`), and `\u{HHHH}` for the Unicode
/// line and paragraph separators and the bidirectional overrides (which reorder what a
/// terminal shows). Everything else is kept as is; borrowed when nothing needs escaping.
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if needs_escape(c) && (c as u32) < 0x100 => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if needs_escape(c) => {
                let _ = write!(out, "\\u{{{:04x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

fn needs_escape(c: char) -> bool {
    c.is_control() || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_become_escapes() {
        assert_eq!(escape("a\nb\r\tc"), "a\\nb\\r\\tc");
        assert_eq!(escape("\u{1b}[31mred"), "\\x1b[31mred");
        assert_eq!(escape("\0\u{7f}\u{85}"), "\\x00\\x7f\\x85");
        assert_eq!(escape("evil\u{202e}txt.exe\u{2028}"), "evil\\u{202e}txt.exe\\u{2028}");
    }

    #[test]
    fn plain_text_is_borrowed_unchanged() {
        let s = "https://example.com/1.2.0/opsagent.tgz é 漢字 \\n";
        assert!(matches!(escape(s), Cow::Borrowed(t) if t == s));
    }
}
