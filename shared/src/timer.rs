//! Optional deadlines in `select!` loops, as both processes write them: a deadline that
//! is not set never fires.

use tokio::time::Instant;

/// Sleeps until `deadline`, or forever when there is none.
pub async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_deadline_fires_and_none_never_does() {
        let at = Instant::now() + Duration::from_secs(5);
        sleep_until_opt(Some(at)).await;
        assert!(Instant::now() >= at);
        let never = tokio::time::timeout(Duration::from_secs(3600), sleep_until_opt(None)).await;
        assert!(never.is_err(), "no deadline must never fire");
    }
}
