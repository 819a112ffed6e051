//! What the backend link and the downloader share on the way out: the HTTP proxy rules
//! (and the reqwest client built on them) and the backoff between attempts. Kept apart
//! from [`crate::link`] so a download does not depend on the WebSocket session.

mod backoff;
pub mod proxy;

pub use backoff::Backoff;
pub use proxy::{http_client_builder, NoProxy, ProxySettings, ProxyUrl};
