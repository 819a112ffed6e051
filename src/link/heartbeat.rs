//! The `Heartbeat` extension (sent only to a backend that announced `heartbeat`): host
//! vitals, the agent's own footprint and what the round engine is doing.
//!
//! ```json
//! {"code": "Heartbeat", "instance_id": "i-0abc", "app_id": "app-1", "agent_version": "0.1.0",
//!  "sent_at": 1795300000,
//!  "host": {"uptime_s": 86400, "load": [0.12, 0.08, 0.01],
//!           "memory": {"total_bytes": 1024000000, "available_bytes": 512000000},
//!           "disk": {"path": "/", "total_bytes": 8.0e9, "used_bytes": 2.0e9, "available_bytes": 5.6e9,
//!                    "used_percent": 26.3}},
//!  "agent": {"uptime_s": 3600, "rss_bytes": 9000000, "open_fds": 12, "spool_depth": 0},
//!  "recipe_version": 7, "round": 12, "rounds_completed": 11,
//!  "phase": {"phase": "idle", "next_round_in_s": 540},
//!  "link": {"connected_s": 600, "connects": 3, "bad_frames": 0}}
//! ```
//! A value that cannot be read is `null`; a heartbeat is never skipped for it.

use serde_json::{json, Value};

use crate::round::api::EngineStatus;

/// What the link adds about itself.
#[derive(Debug, Clone, Default)]
pub struct LinkFacts {
    pub agent_version: String,
    pub agent_uptime_s: u64,
    pub connected_s: u64,
    pub connects: u64,
    pub bad_frames: u64,
    pub spool_depth: Option<u64>,
}

/// The heartbeat body (the link adds `code`, `instance_id` and `app_id`).
pub fn body(engine: &EngineStatus, link: &LinkFacts) -> Value {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
    json!({
        "agent_version": link.agent_version,
        "sent_at": now,
        "host": {
            "uptime_s": host_uptime_s(),
            "load": load_average(),
            "memory": memory(),
            "disk": disk("/"),
        },
        "agent": {
            "uptime_s": link.agent_uptime_s,
            "rss_bytes": own_rss_bytes(),
            "open_fds": open_fds(),
            "spool_depth": link.spool_depth,
        },
        "recipe_version": engine.recipe_version,
        "round": engine.round,
        "rounds_completed": engine.rounds_completed,
        "phase": serde_json::to_value(&engine.phase).unwrap_or(Value::Null),
        "link": {"connected_s": link.connected_s, "connects": link.connects, "bad_frames": link.bad_frames},
    })
}

fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

pub fn host_uptime_s() -> Option<u64> {
    let text = read("/proc/uptime")?;
    text.split_whitespace().next()?.parse::<f64>().ok().map(|s| s as u64)
}

pub fn load_average() -> Option<[f64; 3]> {
    let text = read("/proc/loadavg")?;
    let mut it = text.split_whitespace().map(|f| f.parse::<f64>().ok());
    Some([it.next()??, it.next()??, it.next()??])
}

/// `MemTotal` and `MemAvailable` of /proc/meminfo, in bytes.
pub fn memory() -> Value {
    let text = read("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name) && l[name.len()..].starts_with(':'))?;
        let kib: u64 = line[name.len() + 1..].split_whitespace().next()?.parse().ok()?;
        Some(kib * 1024)
    };
    json!({"total_bytes": field("MemTotal"), "available_bytes": field("MemAvailable")})
}

pub fn disk(path: &str) -> Value {
    match nix::sys::statvfs::statvfs(path) {
        Ok(s) => {
            let frag = wide(s.fragment_size());
            let total = wide(s.blocks()) * frag;
            let free = wide(s.blocks_free()) * frag;
            let avail = wide(s.blocks_available()) * frag;
            let used = total.saturating_sub(free);
            // As df computes it: used / (used + available to unprivileged users).
            let pct =
                if used + avail == 0 { 0.0 } else { (used as f64 * 1000.0 / (used + avail) as f64).round() / 10.0 };
            json!({"path": path, "total_bytes": total, "used_bytes": used, "available_bytes": avail, "used_percent": pct})
        }
        Err(e) => json!({"path": path, "error": e.to_string()}),
    }
}

/// statvfs fields are 32 or 64 bits depending on the platform.
fn wide<T: Into<u64>>(v: T) -> u64 {
    v.into()
}

pub fn own_rss_bytes() -> Option<u64> {
    let text = read("/proc/self/status")?;
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line["VmRSS:".len()..].split_whitespace().next()?.parse().ok()?;
    Some(kib * 1024)
}

pub fn open_fds() -> Option<u64> {
    // The directory handle being read is one of them.
    let n = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
    Some(n.saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_has_every_field() {
        let engine = EngineStatus { recipe_version: Some(7), round: 3, ..Default::default() };
        let b = body(&engine, &LinkFacts { agent_version: "9".into(), connects: 2, ..Default::default() });
        assert_eq!(b["recipe_version"], 7);
        assert_eq!(b["round"], 3);
        assert_eq!(b["phase"]["phase"], "no-recipe");
        assert_eq!(b["link"]["connects"], 2);
        assert!(b["host"]["load"].as_array().is_some_and(|a| a.len() == 3), "{b}");
        assert!(b["host"]["memory"]["total_bytes"].as_u64().unwrap() > 0);
        assert!(b["host"]["memory"]["available_bytes"].as_u64().unwrap() > 0);
        assert!(b["host"]["uptime_s"].as_u64().is_some());
        assert!(b["host"]["disk"]["total_bytes"].as_u64().unwrap() > 0, "{b}");
        let pct = b["host"]["disk"]["used_percent"].as_f64().unwrap();
        assert!((0.0..=100.0).contains(&pct));
        assert!(b["agent"]["rss_bytes"].as_u64().unwrap() > 1024 * 1024);
        assert!(b["agent"]["open_fds"].as_u64().unwrap() >= 3);
    }
}
