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
//!
//! And one for clients that hold a connection without *reading*: a request is in progress
//! (holding one of the `--max-requests` or `--max-downloads` slots, and its response's bytes)
//! until its response body has been handed to the connection, and the connection takes the next
//! part only once the client has read enough of the last one. A client that sent requests and
//! read nothing (a closed TCP window; an HTTP/2 stream it grants no window) held their slots
//! for ever: 32 such requests from one address and every later request from it was answered
//! 503; from four addresses, every client's. [`Busy::stalled_for`] closes a connection
//! - whose socket has refused every byte for `--send-timeout` ([`WriteWatch`]; the rule of
//!   nginx's `send_timeout`: a bound on the wait between two writes, not on the response: a
//!   slow client that goes on reading gets all of it), or
//! - (HTTP/2) one of whose response bodies has waited `--send-timeout` for the stream to take
//!   the part it handed out last ([`GuardedBody::watched`]): flow control stalls a stream without
//!   blocking the socket.
//!
//! A connection whose socket is waiting for its client is not idle: [`Busy::idle_for`] leaves it
//! to the send timeout (a response whose last part was handed out, and so no longer counts as
//! in progress, is still being written).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
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

/// Connections closed because a response waited `--send-timeout` for its client, since start.
static STALLED_CLOSED: AtomicU64 = AtomicU64::new(0);

/// Connections closed so far because a response waited `--send-timeout` for its client.
pub fn stalled_closed() -> u64 {
    STALLED_CLOSED.load(Ordering::Relaxed)
}

/// Counts and logs a connection closed by [`Busy::stalled_for`].
pub fn note_stalled(peer: std::net::SocketAddr, timeout: Duration) {
    STALLED_CLOSED.fetch_add(1, Ordering::Relaxed);
    tracing::info!(
        peer = %peer,
        send_timeout_s = timeout.as_secs(),
        "connection closed: its client took no part of a response within --send-timeout"
    );
}

/// A connection socket's descriptor (Linux).
type Socket = i32;

/// How many bytes written to `socket` its peer has not acknowledged yet (Linux `SIOCOUTQ`);
/// `None` where that cannot be read.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn unacknowledged(socket: Socket) -> Option<u64> {
    let mut queued: libc::c_int = 0;
    // SAFETY: `socket` is the descriptor of a TCP socket the caller keeps open (the connection
    // task owns it while it watches it); `TIOCOUTQ` (= `SIOCOUTQ`) writes one `c_int` through
    // the pointer, which points at one.
    let done = unsafe { libc::ioctl(socket, libc::TIOCOUTQ, &mut queued) };
    (done == 0).then(|| u64::try_from(queued).unwrap_or(0))
}

#[cfg(not(target_os = "linux"))]
fn unacknowledged(_socket: Socket) -> Option<u64> {
    None
}

/// Requests in progress on one connection, and since when it has had none.
pub struct Busy {
    in_flight: AtomicUsize,
    /// Milliseconds since [`clock_base`] when the last request ended (or the connection began).
    idle_since_ms: AtomicU64,
    /// Milliseconds since [`clock_base`] since when the socket has refused every write (0:
    /// it is not refusing; see [`WriteWatch`]).
    blocked_since_ms: AtomicU64,
    /// The HTTP/2 response bodies of the connection ([`GuardedBody::watched`]): each one's moment it
    /// handed out a part that its stream has not yet taken (0: none waits).
    bodies: Mutex<Vec<Weak<AtomicU64>>>,
    /// The connection's socket, to read how much of what was written its client has not yet
    /// acknowledged ([`unacknowledged`]); valid while the connection is served.
    socket: Option<Socket>,
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
    /// A connection's record, for the socket `stream` (whose unacknowledged bytes
    /// [`Busy::stalled_for`] reads; the connection task keeps the socket open as long as it
    /// runs that).
    pub fn for_socket(stream: &tokio::net::TcpStream) -> Arc<Busy> {
        #[cfg(target_os = "linux")]
        let socket = {
            use std::os::fd::AsRawFd as _;
            Some(stream.as_raw_fd())
        };
        #[cfg(not(target_os = "linux"))]
        let socket = {
            let _ = stream;
            None
        };
        Arc::new(Busy {
            socket,
            ..Busy::unshared()
        })
    }

    /// A record without a socket (the unit tests'): waits are measured from the last write.
    #[cfg(test)]
    fn new() -> Arc<Busy> {
        Arc::new(Busy::unshared())
    }

    fn unshared() -> Busy {
        Busy {
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(now_ms()),
            blocked_since_ms: AtomicU64::new(0),
            bodies: Mutex::new(Vec::new()),
            socket: None,
        }
    }

    /// What a write to the connection's socket did: bytes taken end a wait (and count as
    /// activity, [`Busy::idle_for`]); a refusal starts one.
    fn wrote(&self, poll: &Poll<std::io::Result<usize>>) {
        match poll {
            Poll::Ready(Ok(n)) if *n > 0 => {
                self.blocked_since_ms.store(0, Ordering::SeqCst);
                self.touch();
            }
            Poll::Pending => {
                let _ = self.blocked_since_ms.compare_exchange(
                    0,
                    now_ms().max(1),
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                );
            }
            _ => {}
        }
    }

    /// A watch for an HTTP/2 response body of this connection ([`GuardedBody::watched`],
    /// [`Busy::stalled_for`]).
    fn body_watch(&self) -> Arc<AtomicU64> {
        let waiting = Arc::new(AtomicU64::new(0));
        let mut bodies = self.bodies.lock().unwrap_or_else(|e| e.into_inner());
        bodies.retain(|b| b.strong_count() > 0);
        bodies.push(Arc::downgrade(&waiting));
        waiting
    }

    /// Since when (milliseconds since [`clock_base`]) an HTTP/2 response body of the connection
    /// has waited for its stream to take the part it handed out last, the longest wait.
    fn body_waiting_since(&self) -> Option<u64> {
        let bodies = self.bodies.lock().unwrap_or_else(|e| e.into_inner());
        bodies
            .iter()
            .filter_map(Weak::upgrade)
            .map(|w| w.load(Ordering::SeqCst))
            .filter(|&t| t != 0)
            .min()
    }

    /// Completes once the connection has waited `timeout` for its client to take a part of a
    /// response (the connection is then closed: its client reads nothing, or too slowly to
    /// matter). Looks at least once a second.
    ///
    /// While the socket refuses writes, the wait is measured from the last byte the client
    /// acknowledged (the socket's unacknowledged bytes, `SIOCOUTQ`, going down), not from the
    /// last write: the kernel grows a socket's send buffer up to 4 MiB, and lets the server
    /// write again only once a third of it is free, so a client reading steadily at 100 KB/s
    /// can leave writes refused for 10 s and more. Where that count cannot be read (not Linux),
    /// from the last write.
    pub async fn stalled_for(&self, timeout: Duration) {
        let tick = timeout.min(Duration::from_secs(1));
        // The socket's unacknowledged bytes when last looked at, and since when unchanged.
        let mut acked: Option<(u64, Instant)> = None;
        loop {
            let now = Instant::now();
            let at = |ms: u64| clock_base() + Duration::from_millis(ms);
            let mut since = self.body_waiting_since().map(at);
            let blocked = self.blocked_since_ms.load(Ordering::SeqCst);
            if blocked == 0 {
                acked = None;
            } else {
                let mut waiting = at(blocked);
                if let Some(queued) = self.socket.and_then(unacknowledged) {
                    match acked {
                        Some((before, _)) if before == queued => {}
                        _ => acked = Some((queued, now)),
                    }
                    waiting = waiting.max(acked.map_or(now, |(_, t)| t));
                }
                since = Some(since.map_or(waiting, |s| s.min(waiting)));
            }
            // A timeout beyond what an `Instant` can hold (`--send-timeout` of u64::MAX
            // seconds) never ends a wait, rather than panicking on the sum.
            let next = match since.and_then(|since| since.checked_add(timeout)) {
                Some(due) if now >= due => return,
                Some(due) => due.min(now + tick),
                None => now + tick,
            };
            tokio::time::sleep_until(next).await;
        }
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
            if self.in_flight.load(Ordering::SeqCst) == 0
                && self.blocked_since_ms.load(Ordering::SeqCst) == 0
            {
                let since =
                    clock_base() + Duration::from_millis(self.idle_since_ms.load(Ordering::SeqCst));
                let due = since + timeout;
                if Instant::now() >= due
                    && self.in_flight.load(Ordering::SeqCst) == 0
                    && self.blocked_since_ms.load(Ordering::SeqCst) == 0
                {
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
/// dropped; an HTTP/2 one is also watched for a stream that stops taking it
/// ([`GuardedBody::watched`]).
pub struct GuardedBody<G> {
    inner: Body,
    _guard: G,
    /// Milliseconds since [`clock_base`] (at least 1) when the last part was handed out and not
    /// yet taken; 0 while the connection is asking for a part. Only on a watched body.
    waiting: Option<Arc<AtomicU64>>,
}

impl<G> GuardedBody<G> {
    pub fn new(inner: Body, guard: G) -> GuardedBody<G> {
        GuardedBody {
            inner,
            _guard: guard,
            waiting: None,
        }
    }

    /// `inner`, also watched as an HTTP/2 response body of `busy`'s connection: from the moment
    /// it hands a part of itself to its stream until the stream asks for the next (hyper asks
    /// once the stream's flow-control window has room again), it records that it waits for its
    /// client ([`Busy::stalled_for`]). A body that is slow to produce its next part (a streamed
    /// view run) waits for the server, not for the client: that is not counted.
    pub fn watched(inner: Body, guard: G, busy: &Busy) -> GuardedBody<G> {
        GuardedBody {
            waiting: Some(busy.body_watch()),
            ..GuardedBody::new(inner, guard)
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
        let this = &mut *self;
        let Some(waiting) = &this.waiting else {
            return Pin::new(&mut this.inner).poll_frame(cx);
        };
        // Asked for more: the part handed out before has been taken.
        waiting.store(0, Ordering::SeqCst);
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && frame.data_ref().is_some_and(|d| !d.is_empty())
        {
            waiting.store(now_ms().max(1), Ordering::SeqCst);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A connection's socket whose writes tell its [`Busy`] when the client stops taking bytes
/// (the socket refuses a write) and when it takes them again.
pub struct WriteWatch<T> {
    inner: T,
    busy: Arc<Busy>,
}

impl<T> WriteWatch<T> {
    pub fn new(inner: T, busy: Arc<Busy>) -> WriteWatch<T> {
        WriteWatch { inner, busy }
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for WriteWatch<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for WriteWatch<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.busy.wrote(&polled);
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.busy.wrote(&polled);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
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
        // HTTP/1.1 responses are watched at the socket ([`WriteWatch`]).
        let watch = (req.version() == axum::http::Version::HTTP_2).then(|| self.busy.clone());
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            Ok(resp.map(|inner| {
                Body::new(match watch {
                    Some(busy) => GuardedBody::watched(inner, guard, &busy),
                    None => GuardedBody::new(inner, guard),
                })
            }))
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

    #[tokio::test(start_paused = true)]
    async fn a_socket_refusing_writes_is_a_stall_not_idleness_and_progress_ends_it() {
        let busy = Busy::new();
        let t0 = Instant::now();
        // No request in progress, but the socket refuses the rest of a response for 3 s and
        // then takes it: not idle meanwhile (a 1 s idle limit), idle 1 s after the last write.
        busy.wrote(&Poll::Pending);
        let drains = async {
            tokio::time::sleep(Duration::from_secs(3)).await;
            busy.wrote(&Poll::Ready(Ok(10)));
        };
        tokio::join!(drains, busy.idle_for(Duration::from_secs(1)));
        assert_eq!(t0.elapsed().as_secs(), 4);
        // Refusing for the send timeout (5 s) ends the connection; a write taken within it
        // starts the wait again.
        let t1 = Instant::now();
        busy.wrote(&Poll::Pending);
        let takes_some = async {
            tokio::time::sleep(Duration::from_secs(4)).await;
            busy.wrote(&Poll::Ready(Ok(1)));
            busy.wrote(&Poll::Pending);
        };
        tokio::join!(takes_some, busy.stalled_for(Duration::from_secs(5)));
        assert_eq!(t1.elapsed().as_secs(), 9);
    }

    #[tokio::test(start_paused = true)]
    async fn a_send_timeout_too_large_for_a_clock_never_ends_a_wait() {
        let busy = Busy::new();
        busy.wrote(&Poll::Pending);
        let waited = tokio::time::timeout(
            Duration::from_secs(3600),
            busy.stalled_for(Duration::from_secs(u64::MAX)),
        )
        .await;
        assert!(waited.is_err(), "a wait ended under an unreachable timeout");
    }

    #[tokio::test(start_paused = true)]
    async fn an_http2_body_waits_for_its_stream_only_between_handing_a_part_and_the_next_ask() {
        use http_body::Body as _;
        let busy = Busy::new();
        // A body slow to make its second part (4 s, the server's own time), then a stream that
        // does not take the second part.
        let parts = futures::stream::unfold(0, |i| async move {
            match i {
                0 => Some((Ok::<_, std::io::Error>(Bytes::from_static(b"one")), 1)),
                1 => {
                    tokio::time::sleep(Duration::from_secs(4)).await;
                    Some((Ok(Bytes::from_static(b"two")), 2))
                }
                _ => None,
            }
        });
        let mut body = Box::pin(GuardedBody::watched(Body::from_stream(parts), (), &busy));
        let t0 = Instant::now();
        let first = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await;
        assert!(first.is_some());
        assert!(
            busy.body_waiting_since().is_some(),
            "handed out, not yet taken"
        );
        let second = async {
            std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await;
        };
        // The 4 s the body took to make its second part are not a wait for the client; the
        // wait starts when it is handed out.
        tokio::select! {
            () = busy.stalled_for(Duration::from_secs(3)) => panic!("stalled while the server worked"),
            () = second => {}
        }
        assert_eq!(t0.elapsed().as_secs(), 4);
        busy.stalled_for(Duration::from_secs(3)).await;
        assert_eq!(t0.elapsed().as_secs(), 7);
        drop(body);
        assert!(
            busy.body_waiting_since().is_none(),
            "a dropped body waits for nothing"
        );
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
