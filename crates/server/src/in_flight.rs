//! At most `--max-requests` requests in progress at once, and one client address's share of
//! them. A request is in progress from its arrival until its response body is sent (or
//! dropped): a search builds its whole page before answering, and a page waits in memory while
//! a slow reader takes it, so without a bound the requests one client keeps open are the
//! server's memory. HTTP/2 makes that cheap: 20 connections of 200 streams each held 4,000
//! search pages at once (16.7 GB) before this bound, while every other client's request waited
//! behind them for the database.
//!
//! A client address (as [`crate::per_address`] counts them) may have the share of
//! `--max-requests` that `--max-connections-per-address` is of `--max-connections` in progress
//! (`ServeConfig::share_per_address`). A request over either bound is answered at once —
//! `503` `throttled` with an OperationOutcome and `Retry-After: 1` — and costs nothing more;
//! nothing waits for a slot. `GET /metrics` is always served, so that an operator sees the
//! refusals while they happen.
//!
//! Downloads of export files (`GET /export-files/…`) have a bound of their own,
//! `--max-downloads` (and the same share of it per address), and do not count against
//! `--max-requests`: a population's files fetched by many parallel downloaders would otherwise
//! hold every request slot for as long as they take, and every other request — a status poll, a
//! search, a kick-off — would get 503 meanwhile. A download holds at most a few 1 MiB chunks in
//! memory (`export_routes`), so the bound is about the destination's reads and the sockets.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use axum::body::Body;
use axum::http::Request;
use axum::response::{IntoResponse, Response};

use crate::error::{ApiError, WarnEvery};
use crate::per_address::{Client, Counted, PerClient};
use crate::slow_clients::GuardedBody;

/// The default of `--max-requests`.
pub const DEFAULT_MAX_REQUESTS: usize = 128;

/// The default of `--max-downloads`.
pub const DEFAULT_MAX_DOWNLOADS: usize = 64;

/// What a bound counts: its option and the noun of its refusals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool {
    /// Every request but downloads (`--max-requests`).
    Requests,
    /// Downloads of export files (`--max-downloads`).
    Downloads,
}

impl Pool {
    fn flag(self) -> &'static str {
        match self {
            Pool::Requests => "--max-requests",
            Pool::Downloads => "--max-downloads",
        }
    }

    fn noun(self) -> &'static str {
        match self {
            Pool::Requests => "requests",
            Pool::Downloads => "downloads",
        }
    }
}

/// Requests (or downloads) in progress, in all and per client address.
pub struct InFlight {
    pool: Pool,
    max: usize,
    total: AtomicUsize,
    by_client: Arc<PerClient>,
    max_per_client: usize,
    refused: AtomicU64,
    warned: WarnEvery,
}

/// Which bound a refused request met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The bound of the pool (`--max-requests`, `--max-downloads`).
    Server,
    /// The client address's share of it.
    Client,
}

/// One request in progress; counted until dropped.
pub struct Slot {
    owner: Arc<InFlight>,
    _client: Option<Counted>,
}

impl InFlight {
    /// The bound of `--max-requests`: `max` in all, `max_per_client` per client address.
    pub fn new(max: usize, max_per_client: usize) -> Arc<InFlight> {
        InFlight::of(Pool::Requests, max, max_per_client)
    }

    /// A bound of `pool`: `max` in all, `max_per_client` per client address (each at least 1).
    pub fn of(pool: Pool, max: usize, max_per_client: usize) -> Arc<InFlight> {
        let max = max.max(1);
        let max_per_client = max_per_client.clamp(1, max);
        Arc::new(InFlight {
            pool,
            max,
            total: AtomicUsize::new(0),
            by_client: PerClient::new(max_per_client),
            max_per_client,
            refused: AtomicU64::new(0),
            warned: WarnEvery::new(std::time::Duration::from_secs(10)),
        })
    }

    /// A slot for a request from `client` (`None`: a request that did not come through
    /// `serve_connections`, counted in all only), or the bound it would go over.
    pub fn enter(self: &Arc<Self>, client: Option<IpAddr>) -> Result<Slot, Refusal> {
        self.total
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < self.max).then_some(n + 1)
            })
            .map_err(|_| Refusal::Server)?;
        // From here the total is counted: the slot (or its drop on refusal) gives it back.
        let mut slot = Slot {
            owner: Arc::clone(self),
            _client: None,
        };
        if let Some(c) = client {
            slot._client = Some(self.by_client.take(c).ok_or(Refusal::Client)?);
        }
        Ok(slot)
    }

    /// Requests in progress now.
    pub fn current(&self) -> usize {
        self.total.load(Ordering::SeqCst)
    }

    /// `--max-requests`.
    pub fn limit(&self) -> usize {
        self.max
    }

    /// Requests refused since the start.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// The answer to a refused request, counted and (at most every 10 s) logged.
    fn refuse(&self, why: Refusal, client: Option<IpAddr>) -> Response {
        let refused = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        let (noun, flag) = (self.pool.noun(), self.pool.flag());
        let (limit, what) = match why {
            Refusal::Server => (
                self.max,
                format!("the server has as many {noun} in progress as {flag} allows"),
            ),
            Refusal::Client => (
                self.max_per_client,
                format!("this client address has its share of {flag} in progress"),
            ),
        };
        if self.warned.due() {
            tracing::warn!(client = %client.map(|c| c.to_string()).unwrap_or_default(), limit, refused_in_all = refused, "{noun} refused: {what}");
        }
        ApiError::throttled(format!(
            "{what} ({limit}); retry after the ones in progress end"
        ))
        .into_response()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.owner.total.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The path prefix of downloads (`export_routes::download`), counted in [`Pool::Downloads`].
pub const DOWNLOADS_PATH: &str = "/export-files/";

/// The router layer: every request but `GET /metrics` takes a slot for as long as it is in
/// progress — a download of `downloads`, any other request of `requests` — or is answered 503
/// at once.
pub async fn admit(
    axum::extract::State((requests, downloads)): axum::extract::State<(
        Arc<InFlight>,
        Arc<InFlight>,
    )>,
    req: Request<Body>,
    next: axum::middleware::Next,
) -> Response {
    let path = req.uri().path();
    if path == "/metrics" {
        return next.run(req).await;
    }
    let in_flight = if path.starts_with(DOWNLOADS_PATH) {
        downloads
    } else {
        requests
    };
    let client = req.extensions().get::<Client>().map(|c| c.0);
    let slot = match in_flight.enter(client) {
        Ok(slot) => slot,
        Err(why) => return in_flight.refuse(why, client),
    };
    next.run(req)
        .await
        .map(|inner| Body::new(GuardedBody::new(inner, slot)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> Option<IpAddr> {
        Some(IpAddr::from([127, 0, 0, last]))
    }

    #[test]
    fn a_client_holds_its_share_and_the_server_its_limit() {
        let f = InFlight::new(3, 2);
        let a1 = f.enter(ip(1)).unwrap();
        let a2 = f.enter(ip(1)).unwrap();
        assert_eq!(f.enter(ip(1)).err(), Some(Refusal::Client));
        let b1 = f.enter(ip(2)).unwrap();
        assert_eq!(f.current(), 3);
        assert_eq!(f.enter(ip(3)).err(), Some(Refusal::Server));
        assert_eq!(f.enter(None).err(), Some(Refusal::Server));
        drop(a1);
        // The freed slot is the server's: another client may take it.
        let c1 = f.enter(ip(3)).unwrap();
        drop((a2, b1, c1));
        assert_eq!(f.current(), 0);
        assert!(f.by_client.is_empty());
        // Requests without a client address count in all only.
        let n: Vec<_> = (0..3).map(|_| f.enter(None).unwrap()).collect();
        assert_eq!(f.enter(ip(1)).err(), Some(Refusal::Server));
        drop(n);
    }

    #[test]
    fn the_share_is_at_least_one_and_at_most_the_limit() {
        let f = InFlight::new(2, 0);
        assert!(f.enter(ip(1)).is_ok());
        let g = InFlight::new(2, 10);
        let _a = g.enter(ip(1)).unwrap();
        let _b = g.enter(ip(1)).unwrap();
        assert_eq!(g.enter(ip(1)).err(), Some(Refusal::Server));
    }
}
