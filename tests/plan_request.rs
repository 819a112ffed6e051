// Integration tests wait on real processes with the wall clock.
#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

//! A plan on demand end to end (issue #19), with real processes: the operator of the
//! reference backend asks an app's agents for a plan (`RECIPE_DIR/APP.plan-request.json`),
//! the backend sends `PlanRequest`, the daemon plans through the real helper and answers
//! with `Drift`, which the backend records as a `drift` event. The daemon runs with drift
//! plans off (the default) and no second round, so only the request can produce a report.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const APP: &str = "app-plan";

fn recipe(work: &Path) -> Value {
    let w = work.display();
    json!({"component": {"init": {"state": [
        {"id": "s-dir", "module": "linux.dir", "parameter": {"path": [format!("{w}/d")]}},
        {"id": "s-file", "module": "linux.file", "parameter": {"path": format!("{w}/d/f.conf"), "content": "v1\n"}}
    ]}}})
}

/// Drops the trigger file the way an operator should (write aside, then rename: the
/// backend never reads half a file).
fn trigger(recipes: &Path, text: &str) {
    let tmp = recipes.join(".plan.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, recipes.join(format!("{APP}.plan-request.json"))).unwrap();
}

fn events_named(events: &Path, name: &str) -> Vec<Value> {
    read_jsonl(events).into_iter().filter(|e| e["event"] == name).collect()
}

#[test]
fn the_backend_asks_for_a_plan_and_records_the_drift_the_agent_reports() {
    let s = setup(APP, recipe);
    let (dir, work, recipes, statelog, socket) = (s.dir.as_path(), &s.work, &s.recipes, &s.statelog, &s.socket);
    let events = dir.join("events.jsonl");
    let (_backend, port) =
        start_backend(dir, recipes, statelog, &["--poll-ms", "100", "--events", events.to_str().unwrap()]);
    let _helper = start_helper(dir, socket);
    let agent = start_agent(dir, port, APP, "i-plan", socket, &["--round-delay", "3600"]);
    assert!(
        wait_until(Duration::from_secs(30), || read_jsonl(statelog)
            .iter()
            .filter(|l| l["recipe_version"] == 1)
            .count()
            >= 2),
        "the first round; agent: {}",
        agent.log_text()
    );

    // 1. Converged: the request is answered with an empty report.
    trigger(recipes, "");
    assert!(
        wait_until(Duration::from_secs(30), || !events_named(&events, "drift").is_empty()),
        "no drift report after a plan request; events: {:?}\nagent: {}",
        read_jsonl(&events),
        agent.log_text()
    );
    let asked = events_named(&events, "plan_request");
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert_eq!(asked[0]["sent_to"], json!(["i-plan"]), "{asked:?}");
    let first = &events_named(&events, "drift")[0];
    assert_eq!(first["instance_id"], "i-plan", "{first}");
    assert_eq!(first["states"], json!([]), "nothing drifted yet: {first}");
    assert!(!recipes.join(format!("{APP}.plan-request.json")).exists(), "the trigger is deleted once acted on");

    // 2. A managed file edited by hand: the next request names that state and its change.
    let managed = work.join("d/f.conf");
    std::fs::write(&managed, "edited by hand\n").unwrap();
    trigger(recipes, "{}");
    assert!(
        wait_until(Duration::from_secs(30), || events_named(&events, "drift").len() >= 2),
        "no second drift report; events: {:?}\nagent: {}",
        read_jsonl(&events),
        agent.log_text()
    );
    let report = events_named(&events, "drift").pop().unwrap();
    assert_eq!(report["instance_id"], "i-plan", "{report}");
    assert_eq!(report["recipe_version"], 1, "{report}");
    assert_eq!(
        report["states"],
        json!([{"id": "s-file", "changes": [format!("{}: content updated", managed.display())]}]),
        "{report}"
    );
    // A plan acts on nothing and reports no StateLog.
    assert_eq!(std::fs::read_to_string(&managed).unwrap(), "edited by hand\n");
    assert_eq!(read_jsonl(statelog).iter().filter(|l| l["recipe_version"] == 1).count(), 2);

    // 3. A trigger with fields is refused, named in the event log, and sends nothing.
    trigger(recipes, r#"{"instance_id": "i-plan"}"#);
    assert!(
        wait_until(Duration::from_secs(30), || !events_named(&events, "plan_request_rejected").is_empty()),
        "no rejection; events: {:?}",
        read_jsonl(&events)
    );
    assert_eq!(events_named(&events, "plan_request").len(), 2);
}
