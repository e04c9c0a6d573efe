//! Clients that hold a connection without sending. hyper's header-read timeout starts with the
//! first byte of a request head, and nothing bounds how slowly a request body may come, so a
//! client could hold one of the `--max-connections` slots for ever by sending nothing after
//! connecting, or a body one byte now and then. Two guards, both from the header-read timeout:
//! - [`first_byte`]: a new connection that sends no byte within it is closed;
//! - [`MinRateBody`]: a request body must, from its first read on, arrive at an average of at
//!   least `--min-body-rate` bytes a second after that grace; a slower one ends the request with
//!   408 (see [`too_slow`]) and the connection is closed.

use std::pin::Pin;
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
    let mut next = Some(err);
    while let Some(e) = next {
        if e.is::<BodyTooSlow>() {
            return true;
        }
        // `io::Error::source` skips the error it wraps: look inside.
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            && too_slow(inner)
        {
            return true;
        }
        next = e.source();
    }
    false
}

/// A request body that must keep to a minimum average rate: by `grace + received / rate` after
/// its first read, more must have come (or the body ended). Data already buffered is always
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
                    let due = this.due(started);
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
