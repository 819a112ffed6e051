//! The small INI dialect of `/etc/opsagent.conf`.
//!
//! Hand-written rather than `rust-ini` because every error must carry its line number, a
//! key set twice must be reported rather than silently merged, and backslashes (Windows-ish
//! escapes in rust-ini) must stay literal. The dialect:
//! - `[section]` lines; `key = value` lines (spaces around `=` optional);
//! - whole-line comments starting with `;` or `#`;
//! - an inline comment is `;` or `#` preceded by a space or tab (so URL fragments survive);
//! - a value may be wrapped in matching `"` or `'` quotes, taken literally.

/// One `key = value` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub line: usize,
    /// `None` for a key that appears before the first `[section]`.
    pub section: Option<(String, usize)>,
    pub key: String,
    pub value: String,
}

/// A line that is not valid INI; `line` counts from 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    pub line: usize,
    pub problem: String,
}

/// A `[section]` header, with its line, even when the section holds no key (so that an
/// unknown empty section is still reported).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    pub sections: Vec<(String, usize)>,
    pub entries: Vec<Entry>,
}

pub fn parse(text: &str) -> Result<Document, SyntaxError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut doc = Document { sections: Vec::new(), entries: Vec::new() };
    let mut current: Option<(String, usize)> = None;
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let error = |problem: String| SyntaxError { line, problem };
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with(';') || trimmed.starts_with('#') {
            continue;
        }
        if let Some(header) = trimmed.strip_prefix('[') {
            let name = section_name(header).map_err(error)?;
            current = Some((name.clone(), line));
            doc.sections.push((name, line));
            continue;
        }
        let Some((key, value)) = trimmed.split_once('=') else {
            return Err(error(format!("{trimmed:?} is neither `key = value`, a `[section]` nor a comment")));
        };
        let key = key.trim();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            return Err(error(format!("{key:?} is not a key name (letters, digits, `_`)")));
        }
        let value = value_text(value.trim()).map_err(error)?;
        doc.entries.push(Entry { line, section: current.clone(), key: key.to_string(), value });
    }
    Ok(doc)
}

/// `header` is the text after `[`.
fn section_name(header: &str) -> Result<String, String> {
    let Some((name, rest)) = header.split_once(']') else {
        return Err(format!("[{header}: missing `]`"));
    };
    let name = name.trim();
    let rest = rest.trim();
    if name.is_empty() {
        return Err("empty section name `[]`".to_string());
    }
    if !rest.is_empty() && !rest.starts_with(';') && !rest.starts_with('#') {
        return Err(format!("[{name}]: unexpected text {rest:?} after the section header"));
    }
    Ok(name.to_string())
}

/// The value of a `key = value` line: quotes removed, inline comment cut.
fn value_text(value: &str) -> Result<String, String> {
    let quote = match value.chars().next() {
        Some(q @ ('"' | '\'')) => q,
        _ => return Ok(cut_inline_comment(value).trim_end().to_string()),
    };
    let inner = &value[1..];
    let Some(end) = inner.find(quote) else {
        return Err(format!("unterminated {quote} quote in {value:?}"));
    };
    let rest = inner[end + 1..].trim();
    if !rest.is_empty() && !rest.starts_with(';') && !rest.starts_with('#') {
        return Err(format!("unexpected text {rest:?} after the quoted value"));
    }
    Ok(inner[..end].to_string())
}

fn cut_inline_comment(value: &str) -> &str {
    let bytes = value.as_bytes();
    let cut = (1..bytes.len()).find(|&i| matches!(bytes[i], b';' | b'#') && matches!(bytes[i - 1], b' ' | b'\t'));
    cut.map_or(value, |i| &value[..i])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(text: &str) -> Vec<(Option<String>, String, String)> {
        let doc = parse(text).unwrap();
        doc.entries.into_iter().map(|e| (e.section.map(|s| s.0), e.key, e.value)).collect()
    }

    #[test]
    fn sections_keys_comments_and_quotes() {
        let text = "\u{feff}; comment\n# other\n\n[a]\nk = v\nq=\"x ; y\" ; note\ns = 'lit\\n'\n\
                    [b] ; header comment\nu = wss://h/p#frag # note\nempty =\n";
        let some = |s: &str| Some(s.to_string());
        let expected = vec![
            (some("a"), "k".into(), "v".into()),
            (some("a"), "q".into(), "x ; y".into()),
            (some("a"), "s".into(), "lit\\n".into()),
            (some("b"), "u".into(), "wss://h/p#frag".into()),
            (some("b"), "empty".into(), String::new()),
        ];
        assert_eq!(values(text), expected);
    }

    #[test]
    fn crlf_lines_and_key_before_section() {
        let doc = parse("k = 1\r\n[s]\r\nj = 2\r\n").unwrap();
        assert_eq!(doc.entries[0].section, None);
        assert_eq!(doc.entries[1].value, "2");
        assert_eq!(doc.sections, vec![("s".to_string(), 2)]);
    }

    #[test]
    fn syntax_errors_carry_line_numbers() {
        let cases = [
            ("[s]\njust words\n", 2, "neither"),
            ("[s\n", 1, "missing `]`"),
            ("[]\n", 1, "empty section"),
            ("[s] x\n", 1, "after the section header"),
            ("[s]\nk = \"open\n", 2, "unterminated"),
            ("[s]\nk = \"a\" b\n", 2, "after the quoted value"),
            ("[s]\nbad key = 1\n", 2, "not a key name"),
        ];
        for (text, line, needle) in cases {
            let err = parse(text).unwrap_err();
            assert_eq!(err.line, line, "{text:?}");
            assert!(err.problem.contains(needle), "{text:?}: {}", err.problem);
        }
    }
}
