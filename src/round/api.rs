//! What the engine shows the rest of the daemon: the events it is sent, its status and
//! liveness. The link, the metrics and systemd notification import these, not the engine,
//! so reading them does not mean reading the round loop.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::recipe::Recipe;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateOrder {
    pub version: String,
    pub url: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// SIGTERM: let the running state finish (bounded), then stop.
    AfterState,
    /// Let the current round finish, then stop.
    AfterRound,
}

/// What the engine is told from outside.
#[derive(Debug, Clone)]
pub enum Event {
    Recipe(Arc<Recipe>),
    /// A header-only RecipeMetadata: same states, new version number.
    VersionOnly(u64),
    /// The backend reports waited states done (a `State` push or a `WaitList`).
    WaitDone {
        recipe_version: u64,
        state_ids: Vec<String>,
    },
    AgentUpdate(UpdateOrder),
    Stop(StopMode),
    /// The backend link came up or went down.
    Online(bool),
    /// The backend asks what would change now (`PlanRequest`): a drift plan runs as soon
    /// as no round is running, and its report is made even when nothing drifted.
    PlanRequest,
}

/// Last tick of the engine's loops, for the watchdog: a wedged engine stops ticking.
#[derive(Debug, Clone)]
pub struct Liveness {
    origin: Instant,
    last_ms: Arc<AtomicU64>,
}

impl Default for Liveness {
    fn default() -> Self {
        Self { origin: Instant::now(), last_ms: Arc::new(AtomicU64::new(0)) }
    }
}

impl Liveness {
    pub fn touch(&self) {
        let ms = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Time since the last tick.
    pub fn age(&self) -> Duration {
        self.origin.elapsed().saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
#[serde(tag = "phase", rename_all = "kebab-case")]
pub enum Phase {
    #[default]
    NoRecipe,
    Applying {
        index: usize,
        total: usize,
        state_id: String,
        module: String,
    },
    Waiting {
        index: usize,
        total: usize,
        state_id: String,
    },
    Idle {
        next_round_in_s: u64,
    },
    RetryWait {
        next_round_in_s: u64,
        ceased: u32,
    },
    Upgrading {
        version: String,
    },
    Stopped,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct EngineStatus {
    pub recipe_version: Option<u64>,
    pub round: u64,
    pub phase: Phase,
    pub online: bool,
    /// (state id, result) of the last state reported.
    pub last: Option<(String, bool)>,
    pub rounds_completed: u64,
    /// Rounds that ceased on a failing state.
    pub rounds_ceased: u64,
    /// The states reported so far in the running (or last) round.
    pub current: RoundCounts,
    /// The last round that ended (completed or ceased; a preempted or stopped round is
    /// not a result).
    pub last_round: Option<LastRound>,
}

/// States reported in one round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
pub struct RoundCounts {
    pub ok: u64,
    pub failed: u64,
    /// States that changed something (ok or not).
    pub changed: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LastRound {
    pub round: u64,
    pub completed: bool,
    pub states: RoundCounts,
    pub duration_ms: u64,
}
