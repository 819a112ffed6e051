//! The daemon's one cancellation type: the round engine, the helper client, the
//! downloader and the prerequisite installer all stop a request with it. A leaf module, so
//! none of them imports another for it; backed by tokio-util's `CancellationToken`.

use tokio_util::sync::CancellationToken;

/// Asks a running request to stop. Cheap to clone; `never()` for requests that are not
/// cancellable.
#[derive(Clone, Debug)]
pub struct Cancel(CancellationToken);

/// The side that cancels; only the engine (or a test) holds it, so a request cannot
/// cancel itself.
#[derive(Debug)]
pub struct CancelHandle(CancellationToken);

pub fn cancel_pair() -> (CancelHandle, Cancel) {
    let token = CancellationToken::new();
    (CancelHandle(token.clone()), Cancel(token))
}

impl CancelHandle {
    pub fn cancel(&self) {
        self.0.cancel();
    }
}

impl Cancel {
    pub fn never() -> Self {
        Self(CancellationToken::new())
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.is_cancelled()
    }

    /// Resolves once cancelled; pends forever if the handle is gone uncancelled.
    pub async fn cancelled(&mut self) {
        self.0.cancelled().await;
    }
}
