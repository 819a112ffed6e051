//! The daemon's side of the root helper's socket.
//!
//! The round engine talks to a [`HelperClient`]; the real one speaks the length-prefixed
//! protocol of `opsagent-proto` over a Unix socket, tests substitute a fake. One request
//! runs at a time; cancelling sends `Cancel` and still waits (bounded) for the helper to
//! confirm, so a new round never starts while an old command is alive.
//!
//! Downloads are this client's business, not the round engine's: when the helper
//! answers an `Apply` with `NeedFetch`, the client downloads the URLs with its
//! [`Fetcher`] and sends the same `Apply` again with the files — once; a second
//! `NeedFetch` is a failed state. A failed download is a failed state naming the URL.

use std::collections::VecDeque;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use opsagent_proto::codec::{self, CodecError};
use opsagent_proto::newtypes::AbsPath;
use opsagent_proto::request::{
    ApplyRequest, ApplySignedRequest, ErrorCode, FetchedFile, HelperError, HelperStatus, Outcome, RecipeUpload, Reply,
    ReplyFrame, Request, RequestFrame, AHEAD_MAX_FRAME, AHEAD_MAX_REQUESTS,
};
use opsagent_proto::stream::{self, FrameWriter};
use opsagent_proto::HELPER_PROTOCOL_VERSION;
use opsagent_shared::timer::sleep_until_opt;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, Mutex};

use crate::download::Downloader;

/// How long the helper gets to answer a cancelled request before the connection is
/// dropped (which makes it stop the request's commands too). Long on purpose: the
/// helper stops an ordinary command at once (SIGTERM, 5 s, SIGKILL), but lets a
/// package manager, mkfs/LVM/RAID tool or VCS update finish, bounded by its own timeout
/// (an hour at most: apt, yum, transfers), so that a new round never starts while dpkg
/// is half-way; giving up earlier would start the next round beside it.
const CANCEL_GRACE: Duration = Duration::from_secs(3700);

#[derive(Debug, thiserror::Error)]
pub enum HelperClientError {
    #[error("cannot connect to the helper at {path}: {source} (is opsagent-helper.socket active?)")]
    Connect { path: String, source: std::io::Error },
    #[error("helper at {path}: {source}")]
    Codec { path: String, source: CodecError },
    /// Writing the request failed: the helper had closed the connection, so it never
    /// saw the request (a Unix socket refuses the write at once).
    #[error("helper at {path}: the request could not be sent: {source}")]
    Unsent { path: String, source: CodecError },
    #[error(
        "helper at {path} closed the connection before answering (it exited or was killed while serving the request)"
    )]
    Closed { path: String },
    #[error("helper at {path} refused: {error}")]
    Refused { path: String, error: HelperError },
    #[error("helper at {path} did not confirm a cancellation in time; connection dropped")]
    Abandoned { path: String },
    #[error("helper at {path} answered out of protocol: {what}")]
    Protocol { path: String, what: String },
}

// Re-exported: a request's cancellation is part of this client's API.
pub use crate::cancel::{cancel_pair, Cancel, CancelHandle};

/// A state of a recipe the backend signed: the signed bytes (or why they could not be
/// formed), and where the state sits in them.
#[derive(Clone, Debug)]
pub struct SignedState {
    pub upload: Result<Arc<RecipeUpload>, String>,
    /// The version the signature covers.
    pub version: u64,
    pub index: u32,
}

/// A state a round will run after the one being applied, if that and the states between
/// them succeed.
#[derive(Clone, Debug)]
pub struct Next {
    pub req: Arc<ApplyRequest>,
    pub signed: Option<SignedState>,
    /// Fired when the round will not go on to this state after all (a new recipe, a
    /// stop): sent ahead and still waiting in the helper, it is withdrawn unrun.
    pub withdraw: Cancel,
}

/// What the round engine needs from the helper.
pub trait HelperClient: Send + Sync {
    fn apply(
        &self,
        req: ApplyRequest,
        cancel: Cancel,
    ) -> impl Future<Output = Result<Outcome, HelperClientError>> + Send;
    /// A state of a signed recipe. A helper with a `recipe_key` gets the signed recipe
    /// (once per connection and version) and is asked for the state by index; a helper
    /// without one gets `req` as [`HelperClient::apply`] would send it. No default: a
    /// client that wraps another must pass the signed state on, or every state of a
    /// signed recipe would reach the helper unsigned and be refused.
    fn apply_signed(
        &self,
        req: ApplyRequest,
        signed: SignedState,
        cancel: Cancel,
    ) -> impl Future<Output = Result<Outcome, HelperClientError>> + Send;
    fn status(&self) -> impl Future<Output = Result<HelperStatus, HelperClientError>> + Send;
    /// Waits for a state sent ahead that the round did not take (it stopped, or moved
    /// on, just as the state before succeeded): it is withdrawn if it has not started,
    /// and let finish if it has. The engine calls it before it stops, so that the
    /// helper never has a state cut short by the daemon's exit.
    fn drain(&self) -> impl Future<Output = ()> + Send {
        async {}
    }
    /// A state (signed or not), and the states the round runs after it, in order, as long
    /// as each succeeds. A client may send some of `ahead` to the helper at once, each to
    /// start there the moment the one before succeeds, without a round trip through the
    /// daemon (a pipelined round); the round's later call for such a state then only
    /// collects its outcome. The default ignores `ahead`: a client that adds work before a
    /// state (prerequisites) must decide which of `ahead` may go ahead.
    fn apply_then(
        &self,
        req: ApplyRequest,
        signed: Option<SignedState>,
        ahead: Vec<Next>,
        cancel: Cancel,
    ) -> impl Future<Output = Result<Outcome, HelperClientError>> + Send {
        let _ = ahead;
        async move {
            match signed {
                Some(signed) => self.apply_signed(req, signed, cancel).await,
                None => self.apply(req, cancel).await,
            }
        }
    }
}

struct Conn {
    writer: FrameWriter,
    replies: mpsc::Receiver<Result<ReplyFrame, CodecError>>,
    next_id: u64,
    /// The helper said (in `Hello`) that it has a `recipe_key`.
    signed_mode: bool,
    /// The signed recipe this connection's helper has verified.
    sent: Option<Arc<RecipeUpload>>,
    /// How many requests the helper said (in `Hello`) may wait behind the running one;
    /// 0: one at a time.
    ahead_max: usize,
    /// The states sent ahead and not yet answered, in order, each sent to follow the one
    /// before it (the first, the request running or about to run).
    ahead: VecDeque<Ahead>,
}

/// A state sent to run behind another ([`RequestFrame::after`]).
struct Ahead {
    id: u64,
    request: Request,
    withdraw: Cancel,
}

/// A state's request as it goes to the helper, and the signed recipe it needs there.
struct Formed {
    request: Request,
    upload: Option<Arc<RecipeUpload>>,
}

/// Downloads for the helper: into a private directory of the daemon, one uniquely named
/// file per URL, removed once the `Apply` they were for has returned.
pub struct Fetcher {
    /// Given, or built on first use from `settings` ([`Fetcher::lazy`]).
    downloader: std::sync::OnceLock<Result<Arc<Downloader>, String>>,
    settings: Option<crate::download::DownloadSettings>,
    dir: PathBuf,
    max_bytes: u64,
    next: AtomicU64,
}

/// Why [`Fetcher::fetch_all`] gave up.
enum FetchEnd {
    Failed(String),
    Cancelled(String),
}

/// Removes the downloaded files when dropped.
struct FetchedFiles(Vec<PathBuf>);

impl Drop for FetchedFiles {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Fetcher {
    /// Uses `dir` (created 0700 if missing) and removes whatever an earlier run left in
    /// it. `dir` must be absolute: the helper takes the paths as they are.
    pub fn new(downloader: Downloader, dir: PathBuf, max_bytes: u64) -> std::io::Result<Self> {
        Self::with(std::sync::OnceLock::from(Ok(Arc::new(downloader))), None, dir, max_bytes)
    }

    /// As [`Fetcher::new`], but the HTTP client is built at the first download: setting
    /// one up costs milliseconds (the system's root certificates are read), which a
    /// one-round `opsagent apply` of a recipe that downloads nothing need not pay.
    pub fn lazy(settings: crate::download::DownloadSettings, dir: PathBuf, max_bytes: u64) -> std::io::Result<Self> {
        Self::with(std::sync::OnceLock::new(), Some(settings), dir, max_bytes)
    }

    fn with(
        downloader: std::sync::OnceLock<Result<Arc<Downloader>, String>>,
        settings: Option<crate::download::DownloadSettings>,
        dir: PathBuf,
        max_bytes: u64,
    ) -> std::io::Result<Self> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        if !dir.is_absolute() {
            return Err(std::io::Error::other(format!("{}: the fetch directory must be absolute", dir.display())));
        }
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        let fetcher = Self { downloader, settings, dir, max_bytes, next: AtomicU64::new(0) };
        fetcher.sweep();
        Ok(fetcher)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Removes leftovers (a crash between a download and the end of its `Apply`).
    fn sweep(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return };
        for entry in entries.flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| !t.is_dir()) {
                match std::fs::remove_file(&path) {
                    Ok(()) => tracing::debug!(path = %path.display(), "removed a leftover download"),
                    Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot remove a leftover download"),
                }
            }
        }
    }

    fn downloader(&self) -> Result<&Arc<Downloader>, FetchEnd> {
        self.downloader
            .get_or_init(|| {
                Downloader::new(self.settings.clone().unwrap_or_default()).map(Arc::new).map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(|e| FetchEnd::Failed(e.clone()))
    }

    async fn fetch_all(
        &self,
        urls: &[String],
        mut cancel: Cancel,
    ) -> Result<(FetchedFiles, Vec<FetchedFile>), FetchEnd> {
        let downloader = self.downloader()?;
        let mut guard = FetchedFiles(Vec::new());
        let mut files = Vec::new();
        for url in urls {
            let n = self.next.fetch_add(1, Ordering::Relaxed);
            let dest = self.dir.join(format!("fetch-{}-{n}", std::process::id()));
            guard.0.push(dest.clone());
            tracing::info!(url = %url, dest = %dest.display(), "downloading for the helper");
            let fetched = tokio::select! {
                r = downloader.fetch(url, &dest, self.max_bytes) => r,
                _ = cancel.cancelled() => return Err(FetchEnd::Cancelled(url.clone())),
            };
            let f = fetched.map_err(|e| FetchEnd::Failed(e.to_string()))?;
            let path = AbsPath::parse(&f.path.display().to_string())
                .map_err(|e| FetchEnd::Failed(format!("{}: {e}", f.path.display())))?;
            files.push(FetchedFile { url: url.clone(), path, size: f.size, sha256: f.sha256 });
        }
        Ok((guard, files))
    }
}

/// What one `Apply` exchange came to.
enum Applied {
    Outcome(Outcome),
    NeedFetch(Vec<String>),
}

/// What waiting for a state's answer came to.
enum Waited {
    Applied(Applied),
    /// Sent ahead, and not run: the state before it did not succeed.
    NotRun,
}

/// The real client: one connection, opened on first use and re-opened after errors.
pub struct UnixHelperClient {
    path: PathBuf,
    agent_version: String,
    max_frame: usize,
    conn: Mutex<Option<Conn>>,
    fetcher: Option<Fetcher>,
    /// The most states sent ahead at once (the helper may say fewer).
    ahead_limit: usize,
}

impl UnixHelperClient {
    pub fn new(path: impl Into<PathBuf>, agent_version: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            agent_version: agent_version.into(),
            max_frame: codec::DEFAULT_MAX_FRAME,
            conn: Mutex::new(None),
            fetcher: None,
            ahead_limit: AHEAD_MAX_REQUESTS,
        }
    }

    /// Downloads what the helper asks for with `fetcher`; without one, a state that
    /// needs remote content fails.
    pub fn with_fetcher(mut self, fetcher: Fetcher) -> Self {
        self.fetcher = Some(fetcher);
        self
    }

    /// One request at a time even with a helper that takes requests sent ahead (the
    /// behaviour before pipelining: for comparisons and for tests).
    pub fn without_pipelining(self) -> Self {
        self.with_ahead_at_most(0)
    }

    /// At most `n` states sent ahead at once (at most [`AHEAD_MAX_REQUESTS`]): for
    /// comparisons of pipeline depths.
    pub fn with_ahead_at_most(mut self, n: usize) -> Self {
        self.ahead_limit = n.min(AHEAD_MAX_REQUESTS);
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn shown(&self) -> String {
        self.path.display().to_string()
    }

    fn codec_err(&self, source: CodecError) -> HelperClientError {
        HelperClientError::Codec { path: self.shown(), source }
    }

    async fn connect(&self) -> Result<Conn, HelperClientError> {
        let stream = UnixStream::connect(&self.path)
            .await
            .map_err(|source| HelperClientError::Connect { path: self.shown(), source })?;
        let (mut reader, writer) =
            stream::split_tokio(stream).map_err(|source| HelperClientError::Connect { path: self.shown(), source })?;
        let (tx, replies) = mpsc::channel(4);
        let max = self.max_frame;
        // A reader task makes receiving cancel-safe: the engine may stop waiting at any
        // moment without losing half a frame.
        tokio::spawn(async move {
            loop {
                let frame = match reader.read::<ReplyFrame>(max).await {
                    Ok(None) => break,
                    Ok(Some(f)) => Ok(f),
                    Err(e) => Err(e),
                };
                let fatal = frame.as_ref().is_err_and(CodecError::is_fatal);
                if tx.send(frame).await.is_err() || fatal {
                    break;
                }
            }
        });
        let mut conn =
            Conn { writer, replies, next_id: 1, signed_mode: false, sent: None, ahead_max: 0, ahead: VecDeque::new() };
        let id = self
            .send(
                &mut conn,
                Request::Hello { protocol_version: HELPER_PROTOCOL_VERSION, agent_version: self.agent_version.clone() },
            )
            .await?;
        match self.recv(&mut conn).await? {
            ReplyFrame { id: rid, reply: Reply::Hello { protocol_version, signed_recipes, pipelining, ahead, .. } }
                if rid == id && protocol_version == HELPER_PROTOCOL_VERSION =>
            {
                conn.signed_mode = signed_recipes;
                // A helper that pipelines without saying how deep takes one.
                let helper_max = if pipelining { usize::try_from(ahead).unwrap_or(1).max(1) } else { 0 };
                conn.ahead_max = helper_max.min(self.ahead_limit);
                Ok(conn)
            }
            ReplyFrame { reply: Reply::Error(error), .. } => {
                Err(HelperClientError::Refused { path: self.shown(), error })
            }
            other => Err(HelperClientError::Protocol {
                path: self.shown(),
                what: format!("unexpected answer to Hello: {other:?}"),
            }),
        }
    }

    async fn send(&self, conn: &mut Conn, request: Request) -> Result<u64, HelperClientError> {
        let frame =
            codec::encode(&RequestFrame::new(conn.next_id, request), self.max_frame).map_err(|e| self.codec_err(e))?;
        self.write(conn, &frame).await
    }

    /// Sends the request if its frame is at most `max` bytes; `None` (nothing sent)
    /// otherwise.
    async fn send_within(
        &self,
        conn: &mut Conn,
        request: Request,
        after: Option<u64>,
        max: usize,
    ) -> Result<Option<u64>, HelperClientError> {
        match codec::encode(&RequestFrame { id: conn.next_id, after, request }, max) {
            Ok(frame) => self.write(conn, &frame).await.map(Some),
            Err(CodecError::TooLarge { .. }) => Ok(None),
            Err(e) => Err(self.codec_err(e)),
        }
    }

    /// Writes a frame encoded with the connection's next id, and takes that id.
    async fn write(&self, conn: &mut Conn, frame: &[u8]) -> Result<u64, HelperClientError> {
        let id = conn.next_id;
        conn.next_id += 1;
        conn.writer.write_all(frame).await.map_err(|e| self.codec_err(CodecError::Io(e)))?;
        Ok(id)
    }

    async fn recv(&self, conn: &mut Conn) -> Result<ReplyFrame, HelperClientError> {
        match conn.replies.recv().await {
            Some(Ok(frame)) => Ok(frame),
            Some(Err(e)) => Err(self.codec_err(e)),
            None => Err(HelperClientError::Closed { path: self.shown() }),
        }
    }

    /// Runs one request on the shared connection; on any transport error the
    /// connection is discarded so the next call starts afresh. `retry`: whether a
    /// request whose connection was lost may be sent once more on a fresh one — only
    /// for requests without effects (status): a state whose helper died under it is
    /// reported as failed, not run again behind the round's back.
    async fn with_conn<T, F>(&self, retry: bool, f: F) -> Result<T, HelperClientError>
    where
        F: for<'c> Fn(
            &'c Self,
            &'c mut Conn,
        ) -> std::pin::Pin<Box<dyn Future<Output = Result<T, HelperClientError>> + Send + 'c>>,
    {
        let mut guard = self.conn.lock().await;
        let mut retried = false;
        loop {
            // A kept connection that the helper closed meanwhile (idle timeout, exit
            // when idle, restart) has a finished reader task: replace it before use, so
            // that a lost connection below means the helper went away during this call.
            if guard.as_ref().is_some_and(|c| c.replies.is_closed() && c.replies.is_empty()) {
                tracing::debug!(socket = %self.shown(), "the helper closed the kept connection; reconnecting");
                *guard = None;
            }
            let reused = guard.is_some();
            if guard.is_none() {
                *guard = Some(self.connect().await?);
            }
            let conn = guard.as_mut().expect("connected above");
            let result = f(self, conn).await;
            let unsent = matches!(result, Err(HelperClientError::Unsent { .. }));
            let lost =
                unsent || matches!(result, Err(HelperClientError::Codec { .. } | HelperClientError::Closed { .. }));
            if lost || matches!(result, Err(HelperClientError::Protocol { .. } | HelperClientError::Abandoned { .. })) {
                *guard = None;
            }
            // A kept connection closed by the helper just as it was used (the close
            // raced the request): try once more on a fresh one — always when the
            // request was not even sent, otherwise for requests without effects only.
            if lost && reused && (retry || unsent) && !retried {
                retried = true;
                tracing::debug!(socket = %self.shown(), "helper connection was closed; reconnecting");
                continue;
            }
            return result;
        }
    }

    /// The request `req` goes as: by index when the helper verifies recipes and the
    /// recipe is signed (with the signed recipe it needs), with its parameters otherwise;
    /// or, when it cannot be formed, the state's failed outcome.
    fn form(
        conn: &Conn,
        req: &ApplyRequest,
        signed: Option<&SignedState>,
        fetched: Vec<FetchedFile>,
    ) -> Result<Formed, Outcome> {
        match signed {
            Some(s) if conn.signed_mode => {
                let upload = s.upload.clone().map_err(|e| {
                    Outcome::failed(format!(
                        "the helper verifies recipes, and this recipe's signed bytes cannot be formed: {e}"
                    ))
                })?;
                let request = Request::ApplySigned(ApplySignedRequest {
                    recipe_version: s.version,
                    index: s.index,
                    fetched,
                    plan: req.plan,
                });
                Ok(Formed { request, upload: Some(upload) })
            }
            _ => {
                let mut req = req.clone();
                req.fetched = fetched;
                Ok(Formed { request: Request::Apply(req), upload: None })
            }
        }
    }

    /// One exchange for a state: the states of `ahead`, when the helper pipelines, are
    /// sent behind it, each to start as soon as the one before succeeds; a state that was
    /// sent ahead like that is awaited instead of sent again.
    async fn step_on(
        &self,
        conn: &mut Conn,
        req: ApplyRequest,
        signed: Option<SignedState>,
        fetched: Vec<FetchedFile>,
        ahead: Vec<Next>,
        cancel: Cancel,
    ) -> Result<Applied, HelperClientError> {
        let Formed { request, upload } = match Self::form(conn, &req, signed.as_ref(), fetched) {
            Ok(f) => f,
            Err(outcome) => return Ok(Applied::Outcome(outcome)),
        };
        let uploaded = |conn: &Conn| covers(conn.sent.as_ref(), upload.as_ref());
        // Fired when the round will not go on to the states of `ahead`.
        let withdraw = ahead.first().map_or_else(Cancel::never, |n| n.withdraw.clone());
        let mut resent = false;
        loop {
            // Sent ahead already: await it. Any other request sent ahead is withdrawn
            // (or, if it started, waited for: see `settle`) before this one goes.
            let sent_ahead = match conn.ahead.front() {
                Some(a) if a.request == request && !a.withdraw.is_cancelled() && uploaded(conn) => Some(a.id),
                _ => None,
            };
            let (id, recipe) = match sent_ahead {
                Some(id) => {
                    conn.ahead.pop_front();
                    (id, None)
                }
                None => {
                    self.settle(conn).await?;
                    // The recipe and the state go back to back, without waiting for the
                    // verification: the helper takes a connection's requests in order,
                    // and refuses the state if it refused the recipe.
                    let recipe = match &upload {
                        Some(u) if !uploaded(conn) => {
                            Some((self.send_unsent(conn, Request::Recipe((**u).clone())).await?, Arc::clone(u)))
                        }
                        _ => None,
                    };
                    (self.send_unsent(conn, request.clone()).await?, recipe)
                }
            };
            self.send_ahead(conn, id, &ahead, upload.as_ref()).await?;
            let (waited, verdict) =
                self.wait(conn, id, cancel.clone(), withdraw.clone(), recipe.as_ref().map(|(rid, _)| *rid)).await?;
            let applied = match waited {
                Waited::Applied(applied) => applied,
                // Not run, and the round cancelled it meanwhile (a new recipe, a stop):
                // it is not sent again, to start after the round said it would not go on.
                Waited::NotRun if cancel.is_cancelled() => {
                    return Ok(Applied::Outcome(Outcome {
                        cancelled: true,
                        ..Outcome::failed("cancelled before it started")
                    }))
                }
                // Sent ahead behind a state that then failed (a plan goes on after one):
                // nothing ran; send it again on its own, once.
                Waited::NotRun if !resent => {
                    resent = true;
                    continue;
                }
                Waited::NotRun => {
                    return Err(HelperClientError::Protocol {
                        path: self.shown(),
                        what: "a state sent on its own was answered not-run".into(),
                    })
                }
            };
            let applied = match (recipe, verdict) {
                (Some(_), Some(Err(refusal))) => {
                    Applied::Outcome(Outcome::failed(format!("the helper refused the signed recipe: {refusal}")))
                }
                (Some((_, upload)), Some(Ok(()))) => {
                    conn.sent = Some(upload);
                    applied
                }
                (Some(_), None) => {
                    return Err(HelperClientError::Protocol {
                        path: self.shown(),
                        what: "no answer to the signed recipe before the state's".into(),
                    })
                }
                (None, _) => applied,
            };
            return Ok(applied);
        }
    }

    /// Sends a request whose failure to go out means the helper never saw it.
    async fn send_unsent(&self, conn: &mut Conn, request: Request) -> Result<u64, HelperClientError> {
        self.send(conn, request).await.map_err(|e| match e {
            HelperClientError::Codec { path, source: source @ CodecError::Io(_) } => {
                HelperClientError::Unsent { path, source }
            }
            other => other,
        })
    }

    /// Tops up the line of states sent ahead behind request `id`: `ahead` are the states
    /// the round runs after it, in order; those already sent (the first of them, as many
    /// as wait in `conn.ahead`) are not sent again. A state goes ahead when it can go as
    /// it is (a state of the same signed recipe, or one sent with its parameters, in a
    /// frame within `AHEAD_MAX_FRAME`); the line stops at the first that cannot, since
    /// each follows the one before.
    async fn send_ahead(
        &self,
        conn: &mut Conn,
        id: u64,
        ahead: &[Next],
        upload: Option<&Arc<RecipeUpload>>,
    ) -> Result<(), HelperClientError> {
        // The line sent before must be the round's, state for state: it is, unless the
        // round changed its mind without withdrawing them (then they are settled when
        // their turn does not come), and then nothing more goes behind them.
        let sent = conn.ahead.len();
        if sent > ahead.len() || !conn.ahead.iter().zip(ahead).all(|(a, n)| same_state(&a.request, n)) {
            return Ok(());
        }
        for next in ahead.iter().skip(sent) {
            if conn.ahead.len() >= conn.ahead_max || next.withdraw.is_cancelled() {
                break;
            }
            let Ok(Formed { request, upload: next_upload }) =
                Self::form(conn, &next.req, next.signed.as_ref(), Vec::new())
            else {
                break;
            };
            if !covers(upload, next_upload.as_ref()) {
                break;
            }
            let after = conn.ahead.back().map_or(id, |a| a.id);
            // A large state goes on its own when its turn comes: a helper started with a
            // smaller frame limit than ours closes the connection on a frame over it, and
            // while another state runs that would take the running state down with it.
            match self.send_within(conn, request.clone(), Some(after), AHEAD_MAX_FRAME).await? {
                Some(sent) => conn.ahead.push_back(Ahead { id: sent, request, withdraw: next.withdraw.clone() }),
                None => break,
            }
        }
        Ok(())
    }

    /// Withdraws the requests sent ahead and waits for their answers: `not-run` for
    /// those that had not started; one that had (the state before it succeeded and the
    /// helper went on before the round could say otherwise) is the running state, and it
    /// is let finish as a round lets its running state finish (bounded like a
    /// cancellation).
    async fn settle(&self, conn: &mut Conn) -> Result<(), HelperClientError> {
        let targets = self.withdraw_line(conn).await?;
        conn.ahead.clear();
        let mut unanswered = targets.len();
        let deadline = tokio::time::Instant::now() + CANCEL_GRACE;
        while unanswered > 0 {
            let frame = tokio::time::timeout_at(deadline, self.recv(conn))
                .await
                .map_err(|_| HelperClientError::Abandoned { path: self.shown() })??;
            match frame.reply {
                Reply::Cancelled { .. } => {}
                reply if targets.contains(&frame.id) => {
                    ran_ahead(&reply);
                    unanswered -= 1;
                }
                other => {
                    return Err(HelperClientError::Protocol {
                        path: self.shown(),
                        what: format!("unexpected reply {other:?} while withdrawing the requests sent ahead"),
                    })
                }
            }
        }
        Ok(())
    }

    /// Sends a withdrawal of every state of the line sent ahead, and says which (their
    /// answers are still to come). The head first: the helper reads the withdrawals one
    /// at a time and may end its running state between two of them; the head, taken
    /// back, never starts, nor do those behind it (each follows the one before), whereas
    /// a head withdrawn last would let the line go on meanwhile.
    async fn withdraw_line(&self, conn: &mut Conn) -> Result<Vec<u64>, HelperClientError> {
        let targets: Vec<u64> = conn.ahead.iter().map(|a| a.id).collect();
        for &target in &targets {
            self.send(conn, Request::Withdraw { target }).await?;
        }
        Ok(targets)
    }

    /// Waits for the answer to request `id`, cancelling it when `cancel` fires and
    /// withdrawing the requests sent ahead when `withdraw` fires (the round will not go
    /// on to them). `recipe`: the id of a `Recipe` request sent just before, whose answer
    /// comes first: `Ok` verified, `Err` the refusal.
    async fn wait(
        &self,
        conn: &mut Conn,
        id: u64,
        mut cancel: Cancel,
        mut withdraw: Cancel,
        recipe: Option<u64>,
    ) -> Result<(Waited, Option<Result<(), String>>), HelperClientError> {
        let mut verdict = None;
        let mut deadline: Option<tokio::time::Instant> = None;
        let mut withdrawn = conn.ahead.is_empty();
        loop {
            tokio::select! {
                reply = conn.replies.recv() => {
                    let frame = match reply {
                        Some(Ok(f)) => f,
                        Some(Err(e)) => return Err(self.codec_err(e)),
                        None => return Err(HelperClientError::Closed { path: self.shown() }),
                    };
                    match frame.reply {
                        Reply::RecipeVerified { .. } if Some(frame.id) == recipe => verdict = Some(Ok(())),
                        Reply::Error(error) if Some(frame.id) == recipe => verdict = Some(Err(error.message)),
                        // A request sent ahead, withdrawn while this one ran (it cannot have
                        // run before this one ends).
                        reply if conn.ahead.iter().any(|a| a.id == frame.id) => {
                            ran_ahead(&reply);
                            conn.ahead.retain(|a| a.id != frame.id);
                        }
                        Reply::Outcome(o) if frame.id == id => return Ok((Waited::Applied(Applied::Outcome(o)), verdict)),
                        Reply::NeedFetch { urls } if frame.id == id => {
                            return Ok((Waited::Applied(Applied::NeedFetch(urls)), verdict))
                        }
                        Reply::Error(error) if frame.id == id && error.code == ErrorCode::NotRun => {
                            return Ok((Waited::NotRun, verdict))
                        }
                        // The state refused after its recipe was: the recipe's reason says it.
                        Reply::Error(_) if frame.id == id && matches!(verdict, Some(Err(_))) => {
                            return Ok((Waited::Applied(Applied::Outcome(Outcome::failed(String::new()))), verdict))
                        }
                        Reply::Error(error) if frame.id == id || frame.id == 0 => {
                            return Err(HelperClientError::Refused { path: self.shown(), error })
                        }
                        Reply::Cancelled { .. } => {}
                        other => {
                            return Err(HelperClientError::Protocol { path: self.shown(), what: format!("unexpected reply {other:?}") })
                        }
                    }
                }
                _ = cancel.cancelled(), if deadline.is_none() => {
                    self.send(conn, Request::Cancel { target: id }).await?;
                    deadline = Some(tokio::time::Instant::now() + CANCEL_GRACE);
                }
                _ = withdraw.cancelled(), if !withdrawn => {
                    withdrawn = true;
                    self.withdraw_line(conn).await?;
                }
                _ = sleep_until_opt(deadline) => {
                    // The helper kills what the request started when its connection closes.
                    return Err(HelperClientError::Abandoned { path: self.shown() });
                }
            }
        }
    }
}

/// Whether a connection that has verified the signed recipe `have` can take a state that
/// needs `need` (`None`: a state sent with its parameters, which needs none).
fn covers(have: Option<&Arc<RecipeUpload>>, need: Option<&Arc<RecipeUpload>>) -> bool {
    match (need, have) {
        (None, _) => true,
        (Some(need), Some(have)) => Arc::ptr_eq(need, have),
        (Some(_), None) => false,
    }
}

/// Whether a request sent ahead is the one `next` forms, told cheaply by which state of
/// which recipe version, planned or applied (the whole request is compared when its turn
/// comes).
fn same_state(sent: &Request, next: &Next) -> bool {
    match sent {
        Request::ApplySigned(r) => {
            r.plan == next.req.plan
                && next.signed.as_ref().is_some_and(|s| s.version == r.recipe_version && s.index == r.index)
        }
        Request::Apply(r) => {
            r.plan == next.req.plan && r.recipe_version == next.req.recipe_version && r.state_id == next.req.state_id
        }
        _ => false,
    }
}

/// Says what became of a state sent ahead that the round did not take.
fn ran_ahead(reply: &Reply) {
    match reply {
        Reply::Outcome(o) => tracing::info!(
            result = o.result,
            cancelled = o.cancelled,
            changes = o.changes.len(),
            comment = %o.comment,
            "a state sent ahead had started before the round moved on; it ran to its end"
        ),
        other => tracing::debug!(reply = ?other, "a state sent ahead was withdrawn before it started"),
    }
}

impl UnixHelperClient {
    async fn step(
        &self,
        req: &ApplyRequest,
        signed: Option<&SignedState>,
        fetched: &[FetchedFile],
        ahead: &[Next],
        cancel: &Cancel,
    ) -> Result<Applied, HelperClientError> {
        self.with_conn(false, move |me, conn| {
            Box::pin(me.step_on(conn, req.clone(), signed.cloned(), fetched.to_vec(), ahead.to_vec(), cancel.clone()))
        })
        .await
    }

    /// A state, with one round of downloads if the helper asks for them.
    async fn apply_state(
        &self,
        req: ApplyRequest,
        signed: Option<SignedState>,
        ahead: Vec<Next>,
        cancel: Cancel,
    ) -> Result<Outcome, HelperClientError> {
        // Files the caller already has (a retried request) go with the first attempt.
        let given = req.fetched.clone();
        let urls = match self.step(&req, signed.as_ref(), &given, &ahead, &cancel).await? {
            Applied::Outcome(o) => return Ok(o),
            Applied::NeedFetch(urls) => urls,
        };
        let Some(fetcher) = &self.fetcher else {
            return Ok(Outcome::failed(format!(
                "the state needs {} downloaded, and this agent was started without downloads",
                urls.join(", ")
            )));
        };
        // The files live until the helper has answered, then go.
        let (_files, fetched) = match fetcher.fetch_all(&urls, cancel.clone()).await {
            Ok(f) => f,
            Err(FetchEnd::Failed(reason)) => return Ok(Outcome::failed(format!("download failed: {reason}"))),
            Err(FetchEnd::Cancelled(url)) => {
                return Ok(Outcome {
                    cancelled: true,
                    ..Outcome::failed(format!("cancelled while downloading {}", crate::download::redact_str(&url)))
                })
            }
        };
        match self.step(&req, signed.as_ref(), &fetched, &ahead, &cancel).await? {
            Applied::Outcome(o) => Ok(o),
            Applied::NeedFetch(again) => Ok(Outcome::failed(format!(
                "the helper asked again for {} after it was downloaded; giving up",
                again.join(", ")
            ))),
        }
    }
}

impl HelperClient for UnixHelperClient {
    async fn apply(&self, req: ApplyRequest, cancel: Cancel) -> Result<Outcome, HelperClientError> {
        self.apply_state(req, None, Vec::new(), cancel).await
    }

    async fn apply_signed(
        &self,
        req: ApplyRequest,
        signed: SignedState,
        cancel: Cancel,
    ) -> Result<Outcome, HelperClientError> {
        self.apply_state(req, Some(signed), Vec::new(), cancel).await
    }

    async fn apply_then(
        &self,
        req: ApplyRequest,
        signed: Option<SignedState>,
        ahead: Vec<Next>,
        cancel: Cancel,
    ) -> Result<Outcome, HelperClientError> {
        self.apply_state(req, signed, ahead, cancel).await
    }

    async fn drain(&self) {
        let mut guard = self.conn.lock().await;
        let Some(conn) = guard.as_mut() else { return };
        if let Err(e) = self.settle(conn).await {
            tracing::warn!(error = %e, "could not wait for the states sent ahead");
            *guard = None;
        }
    }

    async fn status(&self) -> Result<HelperStatus, HelperClientError> {
        self.with_conn(true, |me, conn| {
            Box::pin(async move {
                // States sent ahead are withdrawn first: the helper answers nothing else
                // while they run or wait.
                me.settle(conn).await?;
                let id = me.send(conn, Request::Status).await?;
                let mut reply = me.recv(conn).await?;
                // Confirmations of earlier withdrawals may still be on their way.
                while matches!(reply.reply, Reply::Cancelled { .. }) {
                    reply = me.recv(conn).await?;
                }
                match reply {
                    ReplyFrame { id: rid, reply: Reply::Status(s) } if rid == id => Ok(s),
                    ReplyFrame { reply: Reply::Error(error), .. } => {
                        Err(HelperClientError::Refused { path: me.shown(), error })
                    }
                    other => Err(HelperClientError::Protocol {
                        path: me.shown(),
                        what: format!("unexpected answer to Status: {other:?}"),
                    }),
                }
            })
        })
        .await
    }
}
