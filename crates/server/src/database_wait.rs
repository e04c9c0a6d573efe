//! Every request's store work runs here: on the blocking pool, under a [`store::Patience`],
//! and waited for at most `--database-wait`.
//!
//! A database that stops answering without closing its connections (a paused host or VM, a
//! storage stall under PostgreSQL or SQLite, a network dropping packets) blocks the thread of
//! each call in a read until it answers again; a request waiting on that thread would hang as
//! long, and so would its client, its proxy and the status polls of every export. Past the
//! wait the request is answered instead, and the thread is left to finish on its own:
//! - no commit of the request's work had begun: 503 `transient` with `Retry-After`. The
//!   store refuses every commit of that work from then on ([`store::give_up`]), so the
//!   answer is true whenever the database answers again: nothing was written.
//! - a commit had begun (sent to the database, no answer yet): 504 `timeout`, saying that the
//!   outcome is the database's; the client reads before it writes again.
//!
//! The blocked threads stay bounded: each holds a pooled database connection or waits for one
//! (PostgreSQL's `pool_timeout`), or waits for SQLite's single writer; work that was still
//! queued for a thread when its request gave up is dropped without touching the database.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use store::{GaveUp, Patience};

use crate::error::{ApiError, RETRY_AFTER_SECS};

/// `--database-wait`'s default: twice the default search time limit, so that a search on an
/// answering database always ends by its own limit first.
pub const DEFAULT: Duration = Duration::from_secs(60);

/// Runs `f` (store work) on the blocking pool under a fresh [`Patience`] and waits for it at
/// most `wait`; past it, answers as the module documentation says. `what` names the work in
/// the log.
pub async fn run<T: Send + 'static>(
    wait: Duration,
    what: &'static str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    let patience = Patience::new();
    let worker = patience.clone();
    // Work still queued for a blocking thread when its request gave up (every thread blocked
    // by the same silent database) is dropped unstarted once a thread takes it: it would only
    // hold a connection, or the queue, for an answer nobody waits for.
    let task = tokio::task::spawn_blocking(move || (!worker.given_up()).then(|| worker.run(f)));
    match tokio::time::timeout(wait, task).await {
        Ok(Ok(Some(done))) => Ok(done),
        // Not started: only after a give-up, which this caller would have seen first.
        Ok(Ok(None)) => Err(ApiError::internal(what, "work dropped unstarted")),
        Ok(Err(e)) => Err(ApiError::internal(what, e)),
        Err(_) => Err(gave_up(patience.give_up(), wait, what)),
    }
}

/// [`run`] for work that answers with an [`ApiError`] of its own.
pub async fn run_api<T: Send + 'static>(
    wait: Duration,
    what: &'static str,
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    run(wait, what, f).await?
}

/// The answer to a request whose store work waited `wait` for a database that did not answer
/// and wrote nothing: 503 `transient` with `Retry-After`.
pub fn silent(wait: Duration, what: &'static str) -> ApiError {
    let secs = wait.as_secs();
    tracing::error!(
        work = what,
        wait_s = secs,
        "the database did not answer within the wait; the request answered 503"
    );
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "transient",
        format!(
            "the database did not answer within {secs} s: nothing of this request was \
             written; retry later"
        ),
    )
    .with_header(
        header::RETRY_AFTER,
        HeaderValue::from_static(RETRY_AFTER_SECS),
    )
}

fn gave_up(found: GaveUp, wait: Duration, what: &'static str) -> ApiError {
    let secs = wait.as_secs();
    match found {
        GaveUp::NothingWritten => silent(wait, what),
        GaveUp::CommitBegun => {
            tracing::error!(
                work = what,
                wait_s = secs,
                "the database did not confirm a commit within the wait; the request answered 504"
            );
            ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                format!(
                    "the database did not confirm this request's write within {secs} s: it may \
                     or may not have been made; read the resource before writing it again"
                ),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn work_past_the_wait_is_answered_503_and_its_later_commit_refused() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (go, wait_go) = std::sync::mpsc::channel::<()>();
        let answer = run(Duration::from_millis(50), "test", move || {
            // Blocked like a read from a database that does not answer.
            wait_go.recv().unwrap();
            tx.send(store::give_up::before_commit().is_ok()).unwrap();
        })
        .await;
        let e = answer.unwrap_err();
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        go.send(()).unwrap();
        assert!(
            !rx.recv().unwrap(),
            "a commit after the request gave up was allowed"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn work_whose_commit_began_before_the_wait_ended_is_answered_504() {
        let (go, wait_go) = std::sync::mpsc::channel::<()>();
        let answer = run(Duration::from_millis(50), "test", move || {
            assert!(store::give_up::before_commit().is_ok());
            // The commit was sent; its answer does not come.
            wait_go.recv().unwrap();
        })
        .await;
        assert_eq!(answer.unwrap_err().status, StatusCode::GATEWAY_TIMEOUT);
        go.send(()).unwrap();
    }

    #[test]
    fn work_still_queued_when_its_request_gave_up_never_starts() {
        // One blocking thread, held by work that does not return: the next work waits in the
        // queue past its wait.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (release, held) = std::sync::mpsc::channel::<()>();
        let started = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        rt.block_on(async {
            let first = run(Duration::from_millis(50), "test", move || {
                held.recv().unwrap();
            });
            assert!(first.await.is_err());
            let flag = started.clone();
            let second = run(Duration::from_millis(50), "test", move || {
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
            });
            assert_eq!(
                second.await.unwrap_err().status,
                StatusCode::SERVICE_UNAVAILABLE
            );
            release.send(()).unwrap();
            // The thread is free: later work runs, the queued one did not.
            let third = run(Duration::from_secs(10), "test", || 7);
            assert_eq!(third.await.unwrap(), 7);
        });
        assert!(!started.load(std::sync::atomic::Ordering::SeqCst));
    }

    #[tokio::test]
    async fn work_within_the_wait_is_answered_by_the_work() {
        let answer = run(Duration::from_secs(10), "test", || {
            store::give_up::before_commit().is_ok()
        })
        .await;
        assert!(answer.unwrap());
    }
}
