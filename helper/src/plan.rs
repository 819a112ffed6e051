//! Plan mode ("what would you change?"): the one switch every write path of the helper
//! checks.
//!
//! A plan request runs the same module code as an apply, inside a plan context. Modules
//! that know how to plan look at [`active`] and report what they would do instead of
//! doing it; but the guarantee that a plan writes nothing does not rest on every module
//! remembering that: the places where the helper changes the host — the directory-fd
//! writes of [`crate::dirfd`], the path-based writes left in a few modules, every
//! command [`crate::exec`] runs that is not declared an inspection, every job and
//! reload sent to systemd — call [`check`] first, and in a plan context it refuses.
//! A module that forgets to plan therefore fails (the refusal names what it would have
//! done, and [`Plan::refused`] keeps the first one for the outcome); it never writes.
//!
//! The context travels with the request's task (a tokio task-local, so a request
//! planning on one connection does not put another connection's apply, polled on the
//! same runtime thread, into plan mode) and into the blocking pool with the request's
//! synchronous work ([`in_thread`], a thread-local for the duration of the call).

use std::cell::RefCell;
use std::fmt::Display;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};

/// One plan request's context.
#[derive(Debug, Default)]
pub struct Plan {
    /// The first write a module attempted although it was planning (see [`check`]).
    refused: Mutex<Option<Refused>>,
}

impl Plan {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The first write refused during this plan, if a module attempted one.
    pub fn refused(&self) -> Option<Refused> {
        self.refused.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn record(&self, r: &Refused) {
        let mut first = self.refused.lock().unwrap_or_else(PoisonError::into_inner);
        if first.is_none() {
            *first = Some(r.clone());
        }
    }
}

/// A write refused because the request is a plan.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a plan writes nothing: refused to {action} {subject}")]
pub struct Refused {
    /// What would have been done (`create`, `rename onto`, `run`, `start`).
    pub action: String,
    /// To what: a path, a command line, a unit.
    pub subject: String,
}

impl From<Refused> for std::io::Error {
    fn from(r: Refused) -> Self {
        std::io::Error::new(std::io::ErrorKind::PermissionDenied, r)
    }
}

tokio::task_local! {
    static TASK: Arc<Plan>;
}

thread_local! {
    static THREAD: RefCell<Option<Arc<Plan>>> = const { RefCell::new(None) };
}

/// The plan context of the running request: its task's, or the one [`in_thread`] set
/// for this thread. `None`: the request applies.
pub fn current() -> Option<Arc<Plan>> {
    TASK.try_with(Arc::clone).ok().or_else(|| THREAD.with(|t| t.borrow().clone()))
}

/// Whether the running request is a plan.
pub fn active() -> bool {
    current().is_some()
}

/// The guard of every write path: `Ok` when applying; when planning, the refusal (and
/// it is kept as the plan's first refused write).
pub fn check(action: &str, subject: impl Display) -> Result<(), Refused> {
    match current() {
        None => Ok(()),
        Some(plan) => {
            let r = Refused { action: action.to_string(), subject: subject.to_string() };
            plan.record(&r);
            Err(r)
        }
    }
}

/// Runs `work` as a plan (with `Some`) or an apply (`None`).
pub async fn scope<F: Future>(plan: Option<Arc<Plan>>, work: F) -> F::Output {
    match plan {
        Some(p) => TASK.scope(p, work).await,
        None => work.await,
    }
}

/// Runs the synchronous `f` on this thread in `plan`'s context (for work moved to the
/// blocking pool, which a task-local does not follow, and for synchronous states run
/// inline). The thread's previous context is restored afterwards, even on a panic.
pub fn in_thread<T>(plan: Option<Arc<Plan>>, f: impl FnOnce() -> T) -> T {
    struct Restore(Option<Arc<Plan>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let previous = self.0.take();
            THREAD.with(|t| *t.borrow_mut() = previous);
        }
    }
    let _restore = Restore(THREAD.with(|t| t.replace(plan)));
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outside_a_plan_every_write_is_allowed() {
        assert!(!active());
        assert_eq!(check("create", "/etc/x"), Ok(()));
    }

    #[test]
    fn in_a_plan_a_write_is_refused_and_remembered() {
        let plan = Plan::new();
        let first = in_thread(Some(Arc::clone(&plan)), || {
            assert!(active());
            let e = check("create", "/etc/x").unwrap_err();
            let _ = check("remove", "/etc/y");
            e
        });
        assert_eq!(first.to_string(), "a plan writes nothing: refused to create /etc/x");
        assert_eq!(plan.refused(), Some(first));
        // The thread is back to applying afterwards.
        assert!(!active());
    }

    #[tokio::test]
    async fn the_plan_follows_its_task_only() {
        let plan = Plan::new();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        // An apply polled on the same thread while the plan waits is not planning.
        let planning = scope(Some(Arc::clone(&plan)), async move {
            assert!(active());
            rx.await.unwrap();
            check("run", "apt-get install nginx")
        });
        let applying = async move {
            assert!(!active());
            assert_eq!(check("run", "useradd bob"), Ok(()));
            tx.send(()).unwrap();
        };
        let (planned, ()) = tokio::join!(planning, applying);
        assert!(planned.is_err());
        assert_eq!(plan.refused().map(|r| r.subject), Some("apt-get install nginx".to_string()));
    }
}
