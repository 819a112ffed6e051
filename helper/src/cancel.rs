//! Cancellation of a running request: the connection holds the [`Canceller`], the state
//! holds a [`Cancel`] and decides itself what cancelling means (for a command: kill its
//! process group), so nothing is ever torn down half-way by dropping a future.
//!
//! The token also carries the request's [`Scope`]: it already
//! travels, cloned, to every command a state starts, so the commands are named after
//! the state that runs them and their resource use is added up for it, without a
//! parameter more in every state.

use std::sync::Arc;

use tokio::sync::watch;

use crate::exec::Scope;

pub struct Canceller(watch::Sender<bool>);

#[derive(Clone)]
pub struct Cancel(watch::Receiver<bool>, Option<Arc<Scope>>);

pub fn pair() -> (Canceller, Cancel) {
    let (tx, rx) = watch::channel(false);
    (Canceller(tx), Cancel(rx, None))
}

impl Canceller {
    pub fn cancel(&self) {
        self.0.send_replace(true);
    }
}

impl Cancel {
    /// A token nobody can trigger (tests, start-up work).
    pub fn never() -> Self {
        // With the sender gone, `requested` stays pending forever.
        let (_, rx) = watch::channel(false);
        Self(rx, None)
    }

    /// This token, for the commands of the request `scope` describes.
    pub fn with_scope(mut self, scope: Arc<Scope>) -> Self {
        self.1 = Some(scope);
        self
    }

    pub fn scope(&self) -> Option<&Arc<Scope>> {
        self.1.as_ref()
    }

    /// Whether cancellation was requested already.
    pub fn is_requested(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once cancellation is requested; never, if the canceller is gone first.
    pub async fn requested(&mut self) {
        if self.0.wait_for(|c| *c).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
