//! Clients that hold a connection without sending. hyper's header-read timeout starts with the
//! first byte of a request head, and nothing bounds how slowly a request body may come, so a
//! client could hold one of the `--max-connections` slots for ever by sending nothing after
//! connecting, or a body one byte now and then. Two guards, both from the header-read timeout:
//! - [`first_byte`]: a new connection that sends no byte within it is closed;
//! - [`MinRateBody`]: a request body must, from its first read on, arrive at an average of at
//!   least `--min-body-rate` bytes a second after that grace, and pause at most
//!   [`PAUSE_FACTOR`] times it; a slower one ends the request with 408 (see [`too_slow`]) and
//!   the connection is closed;
//! - [`Busy`]: a connection with no request in progress (none being handled, no response body
//!   being sent) for that long is closed. hyper does this for HTTP/1.1 keep-alive; an HTTP/2
//!   connection would otherwise stay open, idle, for ever.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use http_body::{Frame, SizeHint};
use tokio::time::{Instant, Sleep};

/// Whether `stream` has a byte to read (or has ended) within `within`: `false` when the client
/// sent nothing, the connection is then dropped unserved.
pub async fn first_byte(stream: &tokio::net::TcpStream, within: Duration) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(within, stream.peek(&mut byte)).await,
        Ok(Ok(n)) if n > 0
    )
}

/// Requests in progress on one connection, and since when it has had none.
pub struct Busy {
    in_flight: AtomicUsize,
    /// Milliseconds since [`clock_base`] when the last request ended (or the connection began).
    idle_since_ms: AtomicU64,
}

/// The origin of [`Busy::idle_since_ms`].
fn clock_base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    Instant::now()
        .saturating_duration_since(clock_base())
        .as_millis()
        .try_into()
        .unwrap_or(u64::MAX)
}

impl Busy {
    pub fn new() -> Arc<Busy> {
        Arc::new(Busy {
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(now_ms()),
        })
    }

    /// The idle time starts again now (the connection sent its first byte).
    pub fn touch(&self) {
        self.idle_since_ms.store(now_ms(), Ordering::SeqCst);
    }

    /// A request begins; it ends when the guard is dropped (with its response body).
    fn enter(self: &Arc<Busy>) -> BusyGuard {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        BusyGuard(self.clone())
    }

    /// Completes once the connection has had no request in progress for `timeout`.
    pub async fn idle_for(&self, timeout: Duration) {
        loop {
            if self.in_flight.load(Ordering::SeqCst) == 0 {
                let since =
                    clock_base() + Duration::from_millis(self.idle_since_ms.load(Ordering::SeqCst));
                let due = since + timeout;
                if Instant::now() >= due && self.in_flight.load(Ordering::SeqCst) == 0 {
                    return;
                }
                tokio::time::sleep_until(due.max(Instant::now() + Duration::from_millis(1))).await;
            } else {
                tokio::time::sleep(timeout).await;
            }
        }
    }
}

/// One request in progress on a connection (see [`Busy`]).
struct BusyGuard(Arc<Busy>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        // The idle time starts before the count reaches 0, so a check in between sees a request.
        self.0.idle_since_ms.store(now_ms(), Ordering::SeqCst);
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response body that keeps `guard` (its request counted in progress) until it is sent or
/// dropped.
pub struct GuardedBody<G> {
    inner: Body,
    _guard: G,
}

impl<G> GuardedBody<G> {
    pub fn new(inner: Body, guard: G) -> GuardedBody<G> {
        GuardedBody {
            inner,
            _guard: guard,
        }
    }
}

impl<G: Unpin> http_body::Body for GuardedBody<G> {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// `inner` with each request counted in `busy` from its arrival to the end of its response body,
/// and given the connection's `mark` as an extension (the client it came from).
#[derive(Clone)]
pub struct Tracked<S, M> {
    pub inner: S,
    pub busy: Arc<Busy>,
    pub mark: M,
}

impl<S, M, B> tower::Service<axum::http::Request<B>> for Tracked<S, M>
where
    M: Clone + Send + Sync + 'static,
    S: tower::Service<
            axum::http::Request<B>,
            Response = axum::response::Response,
            Error = std::convert::Infallible,
        >,
    S::Future: Send + 'static,
{
    type Response = axum::response::Response;
    type Error = std::convert::Infallible;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: axum::http::Request<B>) -> Self::Future {
        req.extensions_mut().insert(self.mark.clone());
        let guard = self.busy.enter();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            Ok(resp.map(|inner| Body::new(GuardedBody::new(inner, guard))))
        })
    }
}

/// A request body that came slower than the minimum rate.
#[derive(Debug, thiserror::Error)]
#[error(
    "the request body came slower than {rate} bytes a second ({received} bytes after {} s)",
    elapsed.as_secs()
)]
pub struct BodyTooSlow {
    pub rate: u64,
    pub received: u64,
    pub elapsed: Duration,
}

/// Whether `err` (a body read error, as the extractors wrap it) is [`BodyTooSlow`].
pub fn too_slow(err: &(dyn std::error::Error + 'static)) -> bool {
    crate::error::caused_by::<BodyTooSlow>(err)
}

/// The longest pause within a request body, in header-read timeouts (30 s by default).
pub const PAUSE_FACTOR: u32 = 3;

/// A request body that must keep to a minimum average rate: by `grace + received / rate` after
/// its first read, more must have come (or the body ended); and no pause between two reads may
/// last longer than [`PAUSE_FACTOR`] times `grace`. Data already buffered is always
/// handed on; the deadline only ends a wait.
pub struct MinRateBody {
    inner: Body,
    rate: u64,
    grace: Duration,
    started: Option<Instant>,
    received: u64,
    deadline: Pin<Box<Sleep>>,
}

impl MinRateBody {
    /// `rate` in bytes a second (at least 1).
    pub fn new(inner: Body, rate: u64, grace: Duration) -> MinRateBody {
        MinRateBody {
            inner,
            rate: rate.max(1),
            grace,
            started: None,
            received: 0,
            deadline: Box::pin(tokio::time::sleep(grace)),
        }
    }

    /// The latest moment the next bytes may come, for a body first read at `started`.
    fn due(&self, started: Instant) -> Instant {
        let earned = Duration::from_secs_f64(self.received as f64 / self.rate as f64);
        started + self.grace.saturating_add(earned)
    }
}

/// Every request body wrapped in a [`MinRateBody`] (empty ones are left as they are).
pub fn min_rate(req: axum::extract::Request, rate: u64, grace: Duration) -> axum::extract::Request {
    use http_body::Body as _;
    req.map(|body| {
        if body.is_end_stream() {
            body
        } else {
            Body::new(MinRateBody::new(body, rate, grace))
        }
    })
}

impl http_body::Body for MinRateBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let started = match this.started {
            Some(t) => t,
            None => {
                let now = Instant::now();
                this.started = Some(now);
                this.deadline.as_mut().reset(now + this.grace);
                now
            }
        };
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.received += data.len() as u64;
                    // An average alone would let a body that came fast at first stop for as
                    // long as it earned (a day after 85 MB), holding its connection and its
                    // bytes: a pause is also bounded.
                    let due = this
                        .due(started)
                        .min(Instant::now() + this.grace * PAUSE_FACTOR);
                    this.deadline.as_mut().reset(due);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTooSlow {
                    rate: this.rate,
                    received: this.received,
                    elapsed: started.elapsed(),
                })))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt as _;

    async fn read(body: MinRateBody) -> Result<Bytes, axum::Error> {
        axum::body::to_bytes(Body::new(body), usize::MAX).await
    }

    /// A body whose chunks come `every` apart.
    fn dripping(chunks: usize, size: usize, every: Duration) -> Body {
        let stream = futures::stream::unfold(0, move |i| async move {
            if i == chunks {
                return None;
            }
            tokio::time::sleep(every).await;
            Some((
                Ok::<_, std::io::Error>(Bytes::from(vec![b' '; size])),
                i + 1,
            ))
        });
        Body::from_stream(stream)
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_at_the_rate_is_read_whole() {
        // 100 bytes every 50 ms: 2,000 bytes a second against 1,000.
        let body = MinRateBody::new(
            dripping(40, 100, Duration::from_millis(50)),
            1000,
            Duration::from_secs(1),
        );
        let bytes = read(body).await.expect("read");
        assert_eq!(bytes.len(), 4000);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slower_body_fails_after_the_grace_and_what_it_earned() {
        // 10 bytes every 100 ms: 100 bytes a second against 1,000. After the 1 s grace each 10
        // bytes earn 10 ms more; the body fails at about 1.1 s, having sent 110 bytes.
        let t0 = Instant::now();
        let body = MinRateBody::new(
            dripping(1000, 10, Duration::from_millis(100)),
            1000,
            Duration::from_secs(1),
        );
        let err = read(body).await.expect_err("too slow");
        let waited = t0.elapsed();
        assert!(too_slow(&err), "{err}");
        assert!(
            waited >= Duration::from_secs(1) && waited < Duration::from_millis(1300),
            "failed after {waited:?}"
        );
        let text = std::error::Error::source(&err)
            .map(ToString::to_string)
            .unwrap_or_default();
        assert!(text.contains("slower than 1000 bytes a second"), "{text}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_never_comes_fails_after_the_grace() {
        let stalled =
            Body::from_stream(futures::stream::pending::<Result<Bytes, std::io::Error>>());
        let t0 = Instant::now();
        let err = read(MinRateBody::new(stalled, 1, Duration::from_secs(3)))
            .await
            .expect_err("stalled");
        assert!(too_slow(&err));
        assert_eq!(t0.elapsed().as_secs(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_came_fast_may_not_then_pause_for_what_it_earned() {
        // 5,000 bytes at once earn 5 s at 1,000 bytes a second; a pause is still cut at 3 times
        // the 1 s grace.
        let burst =
            futures::stream::once(async { Ok::<_, std::io::Error>(Bytes::from(vec![b' '; 5000])) })
                .chain(futures::stream::pending());
        let t0 = Instant::now();
        let err = read(MinRateBody::new(
            Body::from_stream(burst),
            1000,
            Duration::from_secs(1),
        ))
        .await
        .expect_err("paused too long");
        assert!(too_slow(&err));
        assert_eq!(t0.elapsed().as_secs(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_idle_only_without_a_request_in_progress() {
        let busy = Busy::new();
        let t0 = Instant::now();
        let guard = busy.enter();
        // A request in progress for 5 s: not idle meanwhile, idle 1 s after it ended.
        let ends = async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(guard);
        };
        tokio::join!(ends, busy.idle_for(Duration::from_secs(1)));
        assert_eq!(t0.elapsed().as_secs(), 6);
        // Two overlapping requests: idle only after the last one.
        let (a, b) = (busy.enter(), busy.enter());
        let t1 = Instant::now();
        let ends = async {
            tokio::time::sleep(Duration::from_secs(2)).await;
            drop(a);
            tokio::time::sleep(Duration::from_secs(2)).await;
            drop(b);
        };
        tokio::join!(ends, busy.idle_for(Duration::from_secs(1)));
        assert_eq!(t1.elapsed().as_secs(), 5);
    }

    #[test]
    fn too_slow_is_found_inside_io_errors() {
        let slow = BodyTooSlow {
            rate: 1,
            received: 0,
            elapsed: Duration::ZERO,
        };
        let wrapped = std::io::Error::other(slow);
        assert!(too_slow(&wrapped));
        assert!(!too_slow(&std::io::Error::other("other")));
    }
}
