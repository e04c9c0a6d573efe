//! At most `--max-connections-per-address` connections from one client address. Without it one
//! client could take every one of the `--max-connections` slots: the slow-client guards
//! ([`crate::slow_clients`]) bound how long each connection is held, not how many one client
//! holds. An IPv4 address is one client, and so is an IPv6 `/64` (one host's usual share).
//!
//! A connection over the cap gives its slot back at once and, if it sends a request within a
//! second, is answered `503` `throttled` with an OperationOutcome and `Retry-After`, then
//! closed (HTTP/2 with prior knowledge too: each of its requests within 2 s). At most [`MAX_REFUSING`] such answers are in progress at once (they hold no slot);
//! beyond that, or when nothing comes within the second, the connection is closed unanswered.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::http::{HeaderValue, header};
use axum::response::IntoResponse;

use crate::error::{ApiError, WarnEvery};

/// Over-cap connections being answered at once.
pub const MAX_REFUSING: usize = 64;

/// How long an over-cap connection may take to send its request.
const REFUSE_WITHIN: Duration = Duration::from_secs(1);

/// Things held per client address (connections here, requests in [`crate::in_flight`]), at most
/// `max` each; a [`Counted`] holds one until dropped.
pub struct PerClient {
    max: usize,
    held: Mutex<HashMap<IpAddr, usize>>,
}

/// One thing a client holds in a [`PerClient`]; counted until dropped.
pub struct Counted {
    owner: Arc<PerClient>,
    key: IpAddr,
}

impl PerClient {
    pub fn new(max: usize) -> Arc<PerClient> {
        Arc::new(PerClient {
            max: max.max(1),
            held: Mutex::new(HashMap::new()),
        })
    }

    /// One more for `key` (a [`client_key`]), or `None` when it holds `max`.
    pub fn take(self: &Arc<Self>, key: IpAddr) -> Option<Counted> {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let n = held.entry(key).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(Counted {
            owner: Arc::clone(self),
            key,
        })
    }

    /// What `key` holds now.
    pub fn held(&self, key: IpAddr) -> usize {
        let held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        held.get(&key).copied().unwrap_or(0)
    }

    /// Whether no client holds anything.
    pub fn is_empty(&self) -> bool {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty()
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut held = self
            .owner
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = held.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.key);
            }
        }
    }
}

/// Open connections per client address.
pub struct PerAddress {
    max: usize,
    open: Arc<PerClient>,
    refusing: Arc<tokio::sync::Semaphore>,
    refused: AtomicU64,
    /// At most one warning every 10 s, with the count refused so far.
    warned: WarnEvery,
}

/// The client a request came from ([`client_key`] of its peer): a request extension, set by
/// `serve_connections` for every request of a connection. The auth crate's type, so that the
/// token endpoint reads it too (its failure throttle is per client address).
pub use auth::ClientAddress as Client;

/// One open connection of an address; counted until dropped.
pub type AddressSlot = Counted;

/// The client `peer` counts as: an IPv4 address (also when written as an IPv4-mapped IPv6
/// address, as a dual-stack listener gives it), or the `/64` of an IPv6 address.
pub fn client_key(peer: IpAddr) -> IpAddr {
    match peer {
        IpAddr::V4(_) => peer,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !(u128::from(u64::MAX)))),
        },
    }
}

impl PerAddress {
    pub fn new(max: usize) -> Arc<PerAddress> {
        Arc::new(PerAddress {
            max: max.max(1),
            open: PerClient::new(max),
            refusing: Arc::new(tokio::sync::Semaphore::new(MAX_REFUSING)),
            refused: AtomicU64::new(0),
            warned: WarnEvery::new(Duration::from_secs(10)),
        })
    }

    /// A slot for a connection from `peer`, or `None` when its address has `max` open.
    pub fn take(&self, peer: IpAddr) -> Option<AddressSlot> {
        self.open.take(client_key(peer))
    }

    /// Connections open from the client `peer` counts as.
    #[cfg(test)]
    fn open(&self, peer: IpAddr) -> usize {
        self.open.held(client_key(peer))
    }

    /// Answers the over-cap connection `stream` from `peer` (see the module's text), on a task
    /// of its own.
    pub fn refuse(self: &Arc<Self>, stream: tokio::net::TcpStream, peer: std::net::SocketAddr) {
        self.note_refused(peer);
        let Ok(permit) = Arc::clone(&self.refusing).try_acquire_owned() else {
            return; // dropped: closed unanswered
        };
        let max = self.max;
        tokio::spawn(async move {
            use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
            use hyper_util::server::conn::auto::Builder;
            use hyper_util::service::TowerToHyperService;
            if !crate::slow_clients::first_byte(&stream, REFUSE_WITHIN).await {
                return;
            }
            // HTTP/1.1 and HTTP/2 (prior knowledge) alike: every request gets the 503.
            let mut builder = Builder::new(TokioExecutor::new());
            builder
                .http1()
                .keep_alive(false)
                .timer(TokioTimer::new())
                .header_read_timeout(REFUSE_WITHIN);
            builder.http2().timer(TokioTimer::new());
            let answer = TowerToHyperService::new(tower::service_fn(move |_req| async move {
                Ok::<_, std::convert::Infallible>(throttled(max).into_response())
            }));
            let conn = builder.serve_connection(
                TokioIo::new(crate::parse_errors::OutcomeOnParseError::new(stream)),
                answer,
            );
            // The answer is one small header and body: a client that does not read it is not
            // waited for.
            let _ = tokio::time::timeout(REFUSE_WITHIN * 2, conn).await;
            drop(permit);
        });
    }

    fn note_refused(&self, peer: std::net::SocketAddr) {
        let refused = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::debug!(peer = %peer, "connection over --max-connections-per-address");
        if self.warned.due() {
            tracing::warn!(
                client = %client_key(peer.ip()),
                limit = self.max,
                refused_in_all = refused,
                "connections over --max-connections-per-address are refused"
            );
        }
    }
}

/// The answer to a request on an over-cap connection.
fn throttled(max: usize) -> ApiError {
    ApiError::throttled(format!(
        "this client already has {max} connections open (--max-connections-per-address); \
         reuse one, or retry when one has closed"
    ))
    .with_header(header::CONNECTION, HeaderValue::from_static("close"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_client_is_an_ipv4_address_or_an_ipv6_64() {
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(client_key(v4), v4);
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(client_key(mapped), v4);
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_key(a), client_key(b));
        assert_eq!(client_key(a), "2001:db8:1:2::".parse::<IpAddr>().unwrap());
        assert_ne!(client_key(a), client_key(other));
    }

    #[test]
    fn slots_are_counted_per_client_and_given_back_on_drop() {
        let limits = PerAddress::new(2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let first = limits.take(a).expect("first");
        let second = limits.take(a).expect("second");
        assert!(limits.take(a).is_none(), "a third from the same address");
        let other = limits.take(b).expect("another address has its own count");
        assert_eq!(limits.open(a), 2);
        drop(first);
        assert_eq!(limits.open(a), 1);
        let again = limits.take(a).expect("a slot was given back");
        drop((second, again, other));
        assert!(
            limits.open.is_empty(),
            "no entry is kept for an address with nothing open"
        );
    }
}
