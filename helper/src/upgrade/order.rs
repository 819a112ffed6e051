//! The staged order, parsed once into checked values: the installer is root and the
//! order is written by the daemon, so no field of it is used (logged, recorded,
//! compared) before it passed here.

use std::cmp::Ordering;

use opsagent_shared::upgrade::{self as hand, Order};

use super::UpgradeError;

/// URLs of releases are short; a longer one is not an order from our backend.
pub const MAX_URL_BYTES: usize = 2048;

/// An [`Order`] whose every field was checked: `version` and `from` are release
/// versions, `url` an http(s) URL of printable ASCII (no control character, no space),
/// `ordered_at` not in the future (beyond a day of clock skew).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagedOrder(Order);

impl StagedOrder {
    /// Parses the bytes of `order.json`; `now` in Unix seconds.
    pub fn parse(bytes: &[u8], now: u64) -> Result<Self, String> {
        let order: Order = serde_json::from_slice(bytes).map_err(|e| format!("not an order: {e}"))?;
        if !hand::valid_version(&order.version) {
            return Err(format!("the ordered version {:?} is not a release version", order.version));
        }
        if !hand::valid_version(&order.from) {
            return Err(format!("the version it was ordered from, {:?}, is not a release version", order.from));
        }
        check_url(&order.url)?;
        if order.ordered_at > now.saturating_add(24 * 3600) {
            return Err(format!("it was ordered at {}, in the future", order.ordered_at));
        }
        Ok(Self(order))
    }

    pub fn version(&self) -> &str {
        &self.0.version
    }

    pub fn url(&self) -> &str {
        &self.0.url
    }
}

/// `http://` or `https://`, a host, and only the characters RFC 3986 allows in a URL.
fn check_url(url: &str) -> Result<(), String> {
    let shown = || format!("{:?}", url.chars().take(200).collect::<String>());
    if url.len() > MAX_URL_BYTES {
        return Err(format!("the release URL is {} bytes, more than {MAX_URL_BYTES}", url.len()));
    }
    if let Some(bad) = url.chars().find(|&c| !is_url_char(c)) {
        return Err(format!("the release URL {} holds {bad:?}, which no URL holds", shown()));
    }
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| format!("the release URL {} is not http(s)", shown()))?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = authority.rsplit('@').next().unwrap_or_default();
    if host.is_empty() || host.starts_with(':') {
        return Err(format!("the release URL {} names no host", shown()));
    }
    Ok(())
}

fn is_url_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-._~:/?#[]@!$&'()*+,;=%".contains(c)
}

/// A release version ordered as semantic versions are, for the dotted-number versions
/// releases carry: `1.10.0 > 1.9.2`, `1.2 == 1.2.0`, a pre-release (`1.3.0-rc1`) before its
/// release, build metadata (`+build_7`) ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseVersion {
    numbers: Vec<u64>,
    pre: Option<String>,
}

impl ReleaseVersion {
    /// `None` for a version without a leading dotted-number part (e.g. `nightly`).
    pub fn parse(v: &str) -> Option<Self> {
        let v = v.split('+').next().unwrap_or_default();
        let (core, pre) = match v.split_once('-') {
            Some((core, pre)) if !pre.is_empty() => (core, Some(pre.to_string())),
            Some(_) => return None,
            None => (v, None),
        };
        let numbers = core.split('.').map(|n| n.parse::<u64>().ok()).collect::<Option<Vec<u64>>>()?;
        Some(Self { numbers, pre })
    }
}

impl Ord for ReleaseVersion {
    fn cmp(&self, other: &Self) -> Ordering {
        let len = self.numbers.len().max(other.numbers.len());
        let at = |v: &[u64], i: usize| v.get(i).copied().unwrap_or(0);
        (0..len)
            .map(|i| at(&self.numbers, i).cmp(&at(&other.numbers, i)))
            .find(|o| o.is_ne())
            .unwrap_or(Ordering::Equal)
            .then_with(|| match (&self.pre, &other.pre) {
                (None, None) => Ordering::Equal,
                (None, Some(_)) => Ordering::Greater,
                (Some(_), None) => Ordering::Less,
                (Some(a), Some(b)) => pre_release_cmp(a, b),
            })
    }
}

impl PartialOrd for ReleaseVersion {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Dot-separated identifiers, numeric ones compared as numbers and before alphanumeric
/// ones, as in semantic versioning.
fn pre_release_cmp(a: &str, b: &str) -> Ordering {
    let mut a = a.split('.');
    let mut b = b.split('.');
    loop {
        match (a.next(), b.next()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) => {
                let o = match (x.parse::<u64>(), y.parse::<u64>()) {
                    (Ok(m), Ok(n)) => m.cmp(&n),
                    (Ok(_), Err(_)) => Ordering::Less,
                    (Err(_), Ok(_)) => Ordering::Greater,
                    (Err(_), Err(_)) => x.cmp(y),
                };
                if o.is_ne() {
                    return o;
                }
            }
        }
    }
}

/// Refuses installing `version` over the running `from` when that would go back to an
/// older release (or one that cannot be ordered against it), unless the root-owned
/// configuration allows downgrades. A downgrade brings back whatever an old signed
/// release got wrong, so the daemon (or whoever controls its backend) must not be
/// able to choose one by itself.
pub fn check_not_older(version: &str, from: &str, allow_downgrade: bool) -> Result<(), UpgradeError> {
    if allow_downgrade || from == "none" {
        return Ok(());
    }
    let how = "downgrades need [upgrade] allow_downgrade = true in the root-owned /etc/opsagent.conf";
    match (ReleaseVersion::parse(version), ReleaseVersion::parse(from)) {
        (Some(new), Some(running)) if new >= running => Ok(()),
        (Some(_), Some(_)) => {
            Err(UpgradeError::Rejected(format!("{version} is older than the running {from}: refused ({how})")))
        }
        _ => Err(UpgradeError::Rejected(format!(
            "cannot tell whether {version} is newer than the running {from} (not dotted numbers): refused ({how})"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(url: &str, version: &str, from: &str, at: u64) -> Vec<u8> {
        serde_json::to_vec(&Order { version: version.into(), url: url.into(), from: from.into(), ordered_at: at })
            .unwrap()
    }

    #[test]
    fn a_url_with_a_newline_or_an_escape_is_refused() {
        for url in [
            "http://127.0.0.1:8000/1.2.0/opsagent.tgz\n2026-01-01T00:00:00Z /tmp/evil.so",
            "https://example.com/\u{1b}[2J/opsagent.tgz",
            "https://example.com/a b.tgz",
            "https://example.com/\u{202e}.tgz",
        ] {
            let e = StagedOrder::parse(&order(url, "1.2.0", "1.1.0", 10), 10).unwrap_err();
            assert!(e.contains("which no URL holds"), "{url:?}: {e}");
            assert!(!e.contains('\n') && !e.contains('\u{1b}'), "the error repeats it raw: {e:?}");
        }
    }

    #[test]
    fn every_field_is_checked() {
        let ok = "https://releases.example.com/opsagent/1.2.0/opsagent.tgz";
        let parsed = StagedOrder::parse(&order(ok, "1.2.0", "1.1.0", 10), 10).unwrap();
        assert_eq!((parsed.version(), parsed.url()), ("1.2.0", ok));
        assert!(StagedOrder::parse(&order("http://user@10.0.0.1:80/x?y=1#z", "1.2.0", "1.1.0", 10), 10).is_ok());
        let cases = [
            (order("ftp://example.com/x.tgz", "1.2.0", "1.1.0", 10), "not http(s)"),
            (order("https:///x.tgz", "1.2.0", "1.1.0", 10), "names no host"),
            (order(&format!("https://e.com/{}", "a".repeat(MAX_URL_BYTES)), "1.2.0", "1.1.0", 10), "bytes, more"),
            (order(ok, "../1.2.0", "1.1.0", 10), "not a release version"),
            (order(ok, "1.2.0", "1.1.0\nx", 10), "ordered from"),
            (order(ok, "1.2.0", "1.1.0", 10 + 2 * 86_400), "in the future"),
            (br#"{"version": "1.2.0"}"#.to_vec(), "not an order"),
        ];
        for (bytes, want) in cases {
            let e = StagedOrder::parse(&bytes, 10).unwrap_err();
            assert!(e.contains(want), "{want}: {e}");
        }
    }

    #[test]
    fn versions_order_as_dotted_numbers() {
        let v = |s| ReleaseVersion::parse(s).unwrap();
        assert!(v("1.10.0") > v("1.9.2"));
        assert!(v("9.10.0") > v("0.1.0"));
        assert_eq!(v("1.2").cmp(&v("1.2.0")), Ordering::Equal);
        assert!(v("1.3.0-rc1") < v("1.3.0"));
        assert!(v("1.3.0-rc.2") < v("1.3.0-rc.10"));
        assert!(v("1.3.0-1") < v("1.3.0-alpha"));
        assert_eq!(v("2026.11+build_7").cmp(&v("2026.11")), Ordering::Equal);
        assert!(ReleaseVersion::parse("nightly").is_none());
        assert!(ReleaseVersion::parse("1.x").is_none());
        assert!(ReleaseVersion::parse("1.2-").is_none());
    }

    #[test]
    fn an_older_release_is_refused_unless_allowed() {
        let e = check_not_older("0.1.0", "9.10.0", false).unwrap_err().to_string();
        assert!(e.contains("0.1.0 is older than the running 9.10.0") && e.contains("allow_downgrade = true"), "{e}");
        let e = check_not_older("nightly", "1.0.0", false).unwrap_err().to_string();
        assert!(e.contains("cannot tell"), "{e}");
        assert!(check_not_older("0.1.0", "9.10.0", true).is_ok());
        assert!(check_not_older("9.10.0", "0.1.0", false).is_ok());
        assert!(check_not_older("1.2.0", "1.2.0", false).is_ok());
        assert!(check_not_older("0.1.0", "none", false).is_ok());
    }
}
