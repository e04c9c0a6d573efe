//! One budget for the request bodies held in memory at once. `--max-body-bytes` bounds one
//! body, and handlers read a body whole before parsing it (a parsed tree is 10–20 times its
//! JSON), so without a shared bound a dozen clients each sending the largest body at once could
//! exhaust the server's memory. Every non-empty request body counts its bytes, as they arrive
//! (after gzip decoding), against `--max-body-memory`; they are given back when the request's
//! handler has answered. A body that would go over it is read to its end and dropped (a client
//! still sending would otherwise not see the answer; at most the budget's size more is read),
//! then ends with [`OverBudget`], which the handlers answer 503 `transient` with `Retry-After`
//! ([`crate::negotiate::body_bytes`]): nothing waits for the budget, so a budget held by slow
//! bodies cannot also hold the requests behind it. One client (address, marked on each request
//! by `serve_connections`) holds at most its share of the budget
//! ([`crate::config::ServeConfig::body_memory_per_address`]), so that a few clients sending
//! large bodies at the minimum rate cannot hold it all.

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use http_body::{Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::WarnEvery;

/// The default of `--max-body-memory`: 256 MiB (at least one body of `--max-body-bytes`).
pub const DEFAULT_MAX_BODY_MEMORY: usize = 256 * 1024 * 1024;

/// The shared budget, in bytes.
#[derive(Clone)]
pub struct BodyBudget {
    bytes: Arc<Semaphore>,
    total: usize,
    /// The most one client (an address, [`crate::per_address::Client`]) may hold.
    per_client: usize,
    /// `--max-body-bytes`: a body past it is not counted but left to the body limit (413).
    body_limit: usize,
    clients: Arc<Mutex<HashMap<IpAddr, usize>>>,
    refused: Arc<AtomicU64>,
}

/// A request body would take the bodies in memory over `--max-body-memory`.
#[derive(Debug, thiserror::Error)]
#[error(
    "the request bodies being read and handled at once exceed {total} bytes (--max-body-memory)"
)]
pub struct OverBudget {
    pub total: usize,
}

impl BodyBudget {
    /// `total` bytes (at least 1), all of which one client may hold.
    pub fn new(total: usize) -> BodyBudget {
        let total = total.clamp(1, Semaphore::MAX_PERMITS);
        BodyBudget {
            bytes: Arc::new(Semaphore::new(total)),
            total,
            per_client: total,
            body_limit: usize::MAX,
            clients: Arc::new(Mutex::new(HashMap::new())),
            refused: Arc::new(AtomicU64::new(0)),
        }
    }

    /// One client (an address) holds at most `per_client` bytes of it (at most all of it).
    pub fn with_client_share(mut self, per_client: usize) -> BodyBudget {
        self.per_client = per_client.clamp(1, self.total);
        self
    }

    /// One body is at most `limit` bytes (`--max-body-bytes`, enforced by the handlers' body
    /// limit): a body past it is answered 413 by that limit, not refused here. Under the
    /// defaults a client's share is one largest body, so a body over the limit met the share
    /// first, and a request that can never succeed was told to retry later (503).
    pub fn with_body_limit(mut self, limit: usize) -> BodyBudget {
        self.body_limit = limit;
        self
    }

    /// The budget, in bytes.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Request bodies refused for it since the start.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Bytes of request bodies held now.
    pub fn in_use(&self) -> usize {
        self.total - self.bytes.available_permits()
    }
}

/// The middleware: a non-empty body counts against the budget until the handler has answered.
pub async fn hold(State(budget): State<BodyBudget>, req: Request, next: Next) -> Response {
    use http_body::Body as _;
    if req.body().is_end_stream() {
        return next.run(req).await;
    }
    let client = req
        .extensions()
        .get::<crate::per_address::Client>()
        .map(|c| c.0);
    let held = Arc::new(Mutex::new(Held {
        budget: budget.clone(),
        client,
        permit: None,
        bytes: 0,
    }));
    let req = req.map(|inner| {
        Body::new(Counted {
            inner,
            held: Arc::clone(&held),
            drained: None,
            started: false,
            reserved: 0,
            over_limit: false,
        })
    });
    let response = next.run(req).await;
    // The body (and with it the other reference) is gone by now, or goes with the request.
    drop(held);
    response
}

/// What one request holds of the budget; given back when dropped (the request answered).
struct Held {
    budget: BodyBudget,
    client: Option<IpAddr>,
    permit: Option<OwnedSemaphorePermit>,
    bytes: usize,
}

impl Held {
    /// `n` more bytes, within the client's share and the whole budget.
    fn take(&mut self, n: usize) -> bool {
        let Ok(permits) = u32::try_from(n) else {
            return false;
        };
        let mut clients = self
            .budget
            .clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = self.client
            && clients.get(&c).copied().unwrap_or(0).saturating_add(n) > self.budget.per_client
        {
            return false;
        }
        let Ok(permit) = Arc::clone(&self.budget.bytes).try_acquire_many_owned(permits) else {
            return false;
        };
        if let Some(c) = self.client {
            *clients.entry(c).or_insert(0) += n;
        }
        drop(clients);
        match self.permit.as_mut() {
            Some(p) => p.merge(permit),
            None => self.permit = Some(permit),
        }
        self.bytes += n;
        true
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let Some(c) = self.client else { return };
        let mut clients = self
            .budget
            .clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(used) = clients.get_mut(&c) {
            *used = used.saturating_sub(self.bytes);
            if *used == 0 {
                clients.remove(&c);
            }
        }
    }
}

/// A request body whose bytes are taken from the budget as they arrive.
struct Counted {
    inner: Body,
    held: Arc<Mutex<Held>>,
    /// Refused: the bytes read and dropped since.
    drained: Option<usize>,
    /// Whether the first frame was read (the declared length is reserved then).
    started: bool,
    /// Bytes reserved for the declared length and not yet read.
    reserved: usize,
    /// Past `--max-body-bytes`: passed on uncounted to the body limit, which ends it (413)
    /// within this frame.
    over_limit: bool,
}

impl Counted {
    /// Takes `n` more bytes from the budget, held with the rest; `false` when it has not them.
    fn take(&mut self, n: usize) -> bool {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take(n)
    }

    /// Whether `n` more bytes take this body past `--max-body-bytes`.
    fn past_limit(&self, n: usize) -> bool {
        let held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        held.bytes.saturating_add(n) > held.budget.body_limit
    }

    fn budget(&self) -> BodyBudget {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .budget
            .clone()
    }

    /// From now on the body is read and dropped; `len` bytes so far.
    fn refuse(&mut self, len: usize) {
        let budget = self.budget();
        let refused = budget.refused.fetch_add(1, Ordering::Relaxed) + 1;
        static WARNED: WarnEvery = WarnEvery::new(std::time::Duration::from_secs(10));
        if WARNED.due() {
            tracing::warn!(
                limit = budget.total,
                per_client = budget.per_client,
                refused_in_all = refused,
                "request bodies are refused: the bodies in memory are at --max-body-memory"
            );
        }
        self.drained = Some(len);
    }

    fn refusal(&self) -> axum::BoxError {
        Box::new(OverBudget {
            total: self.budget().total,
        })
    }
}

impl http_body::Body for Counted {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        loop {
            let frame = match std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                None if this.drained.is_some() => return Poll::Ready(Some(Err(this.refusal()))),
                None => return Poll::Ready(None),
                Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
                Some(Ok(frame)) => frame,
            };
            let len = frame.data_ref().map_or(0, Bytes::len);
            if this.over_limit {
                return Poll::Ready(Some(Ok(frame)));
            }
            if !this.started {
                this.started = true;
                // A declared length is reserved whole at once: bodies that arrive together
                // then do not each take a part of the budget and all fail half-way.
                let declared = this.inner.size_hint().exact().map(|n| n as usize + len);
                if let Some(n) = declared.filter(|&n| n > 0) {
                    if this.past_limit(n) {
                        this.over_limit = true;
                        return Poll::Ready(Some(Ok(frame)));
                    }
                    if this.take(n) {
                        this.reserved = n;
                    } else {
                        this.refuse(len);
                        continue;
                    }
                }
            }
            if let Some(drained) = &mut this.drained {
                // Refused: read to its end and dropped, so that the client, still sending,
                // gets the answer; but not more than the budget itself.
                *drained = drained.saturating_add(len);
                if *drained > this.budget().total {
                    return Poll::Ready(Some(Err(this.refusal())));
                }
                continue;
            }
            let from_reserve = len.min(this.reserved);
            this.reserved -= from_reserve;
            if len > from_reserve && this.past_limit(len - from_reserve) {
                this.over_limit = true;
                return Poll::Ready(Some(Ok(frame)));
            }
            if len > from_reserve && !this.take(len - from_reserve) {
                this.refuse(len);
                continue;
            }
            return Poll::Ready(Some(Ok(frame)));
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

    fn held(budget: &BodyBudget, client: Option<&str>) -> Arc<Mutex<Held>> {
        Arc::new(Mutex::new(Held {
            budget: budget.clone(),
            client: client.map(|c| c.parse().unwrap()),
            permit: None,
            bytes: 0,
        }))
    }

    async fn read(held: &Arc<Mutex<Held>>, body: &'static [u8]) -> Result<Bytes, axum::Error> {
        let counted = Counted {
            inner: Body::from(body),
            held: Arc::clone(held),
            drained: None,
            started: false,
            reserved: 0,
            over_limit: false,
        };
        axum::body::to_bytes(Body::new(counted), usize::MAX).await
    }

    #[tokio::test]
    async fn bodies_hold_their_bytes_until_given_back_and_one_over_the_budget_is_refused() {
        let budget = BodyBudget::new(10);
        let first = held(&budget, None);
        assert_eq!(read(&first, b"123456").await.unwrap(), "123456");
        assert_eq!(budget.in_use(), 6, "held after the body was read");
        let second = held(&budget, None);
        let err = read(&second, b"12345").await.unwrap_err();
        assert!(crate::error::caused_by::<OverBudget>(&err), "{err}");
        // What the refused body had taken is given back with it.
        drop(second);
        assert_eq!(budget.in_use(), 6);
        drop(first);
        assert_eq!(budget.in_use(), 0);
        let third = held(&budget, None);
        assert_eq!(read(&third, b"1234567890").await.unwrap().len(), 10);
        assert_eq!(budget.refused(), 1);
    }

    #[tokio::test]
    async fn a_body_past_the_body_limit_is_left_to_the_limit_not_refused() {
        // The defaults' shape: a client's share is one largest body.
        let budget = BodyBudget::new(40)
            .with_client_share(10)
            .with_body_limit(10);
        let a = held(&budget, Some("192.0.2.1"));
        // Past the limit: passed on (the body limit answers 413), not an OverBudget (503).
        let body = read(&a, b"123456789012").await.unwrap();
        assert_eq!(body.len(), 12);
        assert_eq!(budget.refused(), 0);
        assert_eq!(budget.in_use(), 0, "a body past the limit holds nothing");
        // Within the limit but over the client's share with another body held: refused.
        let b1 = held(&budget, Some("192.0.2.2"));
        read(&b1, b"12345678").await.unwrap();
        let b2 = held(&budget, Some("192.0.2.2"));
        let err = read(&b2, b"12345").await.unwrap_err();
        assert!(crate::error::caused_by::<OverBudget>(&err), "{err}");
    }

    #[tokio::test]
    async fn one_client_holds_at_most_its_share() {
        // 40 bytes, 10 per client.
        let budget = BodyBudget::new(40).with_client_share(10);
        let a1 = held(&budget, Some("192.0.2.1"));
        read(&a1, b"1234567").await.expect("within a's share");
        let a2 = held(&budget, Some("192.0.2.1"));
        let err = read(&a2, b"12345").await.unwrap_err();
        assert!(crate::error::caused_by::<OverBudget>(&err), "{err}");
        // Another client has a share of its own.
        let b = held(&budget, Some("192.0.2.2"));
        read(&b, b"1234567890").await.expect("b's share");
        drop(a2);
        assert_eq!(budget.in_use(), 17);
        drop((a1, b));
        assert_eq!(budget.in_use(), 0);
        assert!(
            budget.clients.lock().unwrap().is_empty(),
            "no entry kept for a client holding nothing"
        );
    }
}
