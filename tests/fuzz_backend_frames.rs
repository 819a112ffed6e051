#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

//! Bounded fuzz run of the daemon's decoder of backend frames: `protocol::parse_inbound`
//! and, for recipes, the typing of every state through the catalogue
//! (`Recipe::from_wire`), as the link does with each text frame. Whatever the input, the
//! decoder answers (a value or a typed error) and never panics. Seeds:
//! `tests/fuzz/corpus/backend/`; `OPSAGENT_FUZZ_SECS` sets the run's length.

#[path = "fuzz_support/mutator.rs"]
mod mutator;

use std::path::Path;

use opsagent::protocol::{parse_inbound, Inbound};
use opsagent::recipe::Recipe;

#[test]
fn backend_frames_never_panic_the_decoder() {
    let corpus = mutator::load_corpus(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz/corpus/backend"));
    let execs = mutator::run("backend-frames", &corpus, 8, |input| {
        // The link hands the decoder text frames only.
        let Ok(text) = std::str::from_utf8(input) else { return };
        if let Ok(Inbound::RecipeMetadata(r)) = parse_inbound(text) {
            if let Some(states) = r.states {
                if let Ok(recipe) = Recipe::from_wire(r.recipe_version, r.module, states, r.signature) {
                    for s in &recipe.states {
                        let _ = s.typed();
                    }
                }
            }
        }
    });
    assert!(execs > corpus.len() as u64, "the run generated inputs beyond the seeds");
}
