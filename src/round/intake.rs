//! The engine's door for what the link receives. The link only turns frames into protocol
//! messages and hands the ones meant for the engine here as they came; typing a recipe
//! against the catalogue ([`Recipe::from_wire`]), attaching its signature and deciding that
//! its `meta.wait` states need the backend's wait list are the engine's business, done on
//! this side of the channel.

use std::sync::Arc;

use tokio::sync::mpsc;

use super::api::{Event, UpdateOrder};
use crate::protocol::{Outbound, RecipeMetadata};
use crate::recipe::Recipe;

/// A message for the engine, as the link has it (the recipe still in its wire form).
#[derive(Debug, Clone, PartialEq)]
pub enum ForEngine {
    /// A `RecipeMetadata` as the backend sent it.
    Recipe(RecipeMetadata),
    /// Waited states the backend reports done (a `State` push or a `WaitList`).
    WaitDone {
        recipe_version: u64,
        state_ids: Vec<String>,
    },
    AgentUpdate(UpdateOrder),
    /// `PlanRequest` from a backend that announced `drift`.
    PlanRequest,
    /// The backend link came up (first `RecipeMetadata`) or went down.
    Online(bool),
}

/// What one message becomes: the engine's event, and the answer the backend is owed.
#[derive(Debug)]
pub struct Intake {
    pub event: Option<Event>,
    /// Sent on the link after the event was handed over.
    pub reply: Option<Outbound>,
}

/// Types `msg` for the engine. A recipe with `meta.wait` states asks the backend which
/// waited states are already done (`WaitQuery`); an invalid recipe is logged and dropped,
/// so the current round goes on.
pub fn intake(msg: ForEngine) -> Intake {
    let event = |e| Intake { event: Some(e), reply: None };
    match msg {
        ForEngine::Recipe(r) => {
            let version = r.recipe_version;
            match r.states {
                // worker.py `load`: no states, or an empty list, is "no change in states".
                None => event(Event::VersionOnly(version)),
                Some(states) if states.is_empty() => event(Event::VersionOnly(version)),
                Some(states) => match Recipe::from_wire(version, r.module, states, r.signature) {
                    Ok(recipe) => {
                        let reply = recipe.has_waits().then_some(Outbound::WaitQuery { recipe_version: version });
                        Intake { event: Some(Event::Recipe(Arc::new(recipe))), reply }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, version, "invalid recipe rejected; the current round goes on");
                        Intake { event: None, reply: None }
                    }
                },
            }
        }
        ForEngine::WaitDone { recipe_version, state_ids } => event(Event::WaitDone { recipe_version, state_ids }),
        ForEngine::AgentUpdate(order) => event(Event::AgentUpdate(order)),
        ForEngine::PlanRequest => event(Event::PlanRequest),
        ForEngine::Online(up) => event(Event::Online(up)),
    }
}

/// The link's handle on the engine's channel.
#[derive(Clone)]
pub struct EngineDoor {
    tx: mpsc::Sender<Event>,
}

impl EngineDoor {
    pub fn new(tx: mpsc::Sender<Event>) -> Self {
        Self { tx }
    }

    /// Hands `msg` to the engine (waiting for room in its channel); returns what the link
    /// must send the backend afterwards. A stopped engine is not the link's concern: the
    /// daemon is ending, and the message is dropped.
    pub async fn deliver(&self, msg: ForEngine) -> Option<Outbound> {
        let Intake { event, reply } = intake(msg);
        if let Some(ev) = event {
            let _ = self.tx.send(ev).await;
        }
        reply
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{parse_inbound, Inbound, WireState, MAX_STATES};
    use serde_json::json;

    fn metadata(json: &str) -> RecipeMetadata {
        match parse_inbound(json).unwrap() {
            Inbound::RecipeMetadata(m) => m,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_recipe_with_a_wait_asks_for_the_wait_list_and_one_without_does_not() {
        let waits = metadata(
            r#"{"code":"RecipeMetadata","recipe_version":4,"state":[
                {"id":"w","module":"meta.wait","parameter":{"state":"other","timeout":60}}]}"#,
        );
        let i = intake(ForEngine::Recipe(waits));
        assert!(matches!(&i.event, Some(Event::Recipe(r)) if r.version == 4), "{:?}", i.event);
        assert_eq!(i.reply, Some(Outbound::WaitQuery { recipe_version: 4 }));

        let plain = metadata(
            r#"{"code":"RecipeMetadata","recipe_version":5,"state":[
                {"id":"c","module":"meta.comment","parameter":{"comment":"hi"}}]}"#,
        );
        let i = intake(ForEngine::Recipe(plain));
        assert!(matches!(&i.event, Some(Event::Recipe(r)) if r.version == 5), "{:?}", i.event);
        assert_eq!(i.reply, None);
    }

    #[test]
    fn header_only_and_empty_recipes_are_version_only_and_an_invalid_one_is_dropped() {
        for json in [
            r#"{"code":"RecipeMetadata","recipe_version":6}"#,
            r#"{"code":"RecipeMetadata","recipe_version":6,"state":[]}"#,
        ] {
            let i = intake(ForEngine::Recipe(metadata(json)));
            assert!(matches!(i.event, Some(Event::VersionOnly(6))), "{json}: {:?}", i.event);
            assert_eq!(i.reply, None);
        }
        // More states than a recipe may hold (components add up past the per-list cap).
        let state =
            WireState { id: "c".into(), module: "meta.comment".into(), parameter: json!({}), fetch_sha256: None };
        let bad = RecipeMetadata {
            recipe_version: 7,
            module: None,
            states: Some(vec![state; MAX_STATES + 1]),
            signature: None,
        };
        let i = intake(ForEngine::Recipe(bad));
        assert!(i.event.is_none() && i.reply.is_none(), "{i:?}");
    }
}
