//! Cancellation of a running request: the connection holds the [`Canceller`], the state
//! holds a [`Cancel`] and decides itself what cancelling means (for a command: kill its
//! process group), so nothing is ever torn down half-way by dropping a future.

use tokio::sync::watch;

pub struct Canceller(watch::Sender<bool>);

#[derive(Clone)]
pub struct Cancel(watch::Receiver<bool>);

pub fn pair() -> (Canceller, Cancel) {
    let (tx, rx) = watch::channel(false);
    (Canceller(tx), Cancel(rx))
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
        Self(rx)
    }

    /// Resolves once cancellation is requested; never, if the canceller is gone first.
    pub async fn requested(&mut self) {
        if self.0.wait_for(|c| *c).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
