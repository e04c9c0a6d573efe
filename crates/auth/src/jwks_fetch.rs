//! Fetching and caching the JWKS of clients registered by `jwks_url`.
//!
//! Keys are fetched on first use, cached for the response's `Cache-Control: max-age` (clamped to
//! [`MIN_TTL`, `MAX_TTL`], [`DEFAULT_TTL`] without one), and re-fetched early when an assertion
//! names a `kid` the cache does not hold (key rotation), at most once per [`MIN_TTL`]. Each fetch
//! has a bounded time and body size. One client's requests that need a fetch share one (single
//! flight: they wait for its turn and then read what it left), so that a burst of token
//! requests makes one request to the client's server; the cache itself is read under a lock
//! never held across a fetch, so a slow JWKS host holds up no request its cached keys serve,
//! and no other client (each has its own cache).
//!
//! Redirects (at most [`MAX_REDIRECTS`]) are followed only to URLs the registration itself would
//! accept (https, or plain http to a loopback host), and never from a public host to a loopback,
//! private, link-local or unspecified address: the client's server must not be able to send the
//! fetch over plain http (where anyone on the path could swap the keys) or into the server's own
//! network. A registration on a public host is fetched by a client whose resolver drops every
//! address that is not public ([`PublicOnlyResolver`]): a host *name* that resolves, now or after
//! DNS rebinding, to an internal address is refused when the fetch connects, not only an address
//! literal when it is checked. Registrations that point at `localhost` or an internal address
//! literal themselves (a local test, an on-premises client) may connect anywhere, as before.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use reqwest::Url;

use crate::jwk::{MAX_JWKS_KEYS, VerificationKey, parse_jwk};

pub const DEFAULT_TTL: Duration = Duration::from_secs(300);
pub const MIN_TTL: Duration = Duration::from_secs(30);
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_BODY: usize = 256 * 1024;
/// Redirects followed for one JWKS fetch.
pub const MAX_REDIRECTS: usize = 3;

/// Why a client's JWKS could not be obtained. Shown to the client as part of `invalid_client`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JwksFetchError {
    #[error("cannot create the HTTP client: {0}")]
    Client(String),
    #[error("fetching the registered JWKS failed: {0}")]
    Transport(String),
    #[error("the registered JWKS URL answered HTTP {0}")]
    Status(u16),
    #[error(
        "the registered JWKS URL redirected more than {MAX_REDIRECTS} times, or to a URL that may not serve it (plain http to a host that is not loopback, or an internal address)"
    )]
    Redirect,
    #[error("the registered JWKS is larger than {MAX_BODY} bytes")]
    TooLarge,
    #[error("the registered JWKS holds more than {MAX_JWKS_KEYS} keys")]
    TooManyKeys,
    #[error("the registered JWKS is not valid: {0}")]
    Invalid(String),
    #[error("a recent fetch of the registered JWKS failed; retry later")]
    Backoff,
    #[error(
        "the registered JWKS URL's host resolves to no public address (only loopback, private, link-local or other internal ones)"
    )]
    InternalAddress,
}

/// Where a fetch may connect, decided by the registered URL's host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reach {
    /// A public host: only public addresses, whatever a name resolves to.
    PublicOnly,
    /// `localhost` or an internal address literal, registered as such: anywhere.
    Any,
}

/// A host name resolved only to public addresses: the rest are dropped, and a name with none
/// left is refused ([`ResolvedInternal`]). The connection is made to the addresses returned
/// here, so a name rebound between a check and the connect cannot slip through.
struct PublicOnlyResolver;

/// The error [`PublicOnlyResolver`] answers for a name without public addresses.
#[derive(Debug, thiserror::Error)]
#[error("{host} resolves to no public address")]
struct ResolvedInternal {
    host: String,
}

impl reqwest::dns::Resolve for PublicOnlyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let resolved: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let public: Vec<SocketAddr> = resolved
                .iter()
                .copied()
                .filter(|a| is_public_ip(a.ip()))
                .collect();
            if public.is_empty() {
                let addresses: Vec<String> = resolved.iter().map(|a| a.ip().to_string()).collect();
                tracing::warn!(host = %crate::log_safe(&host), addresses = %addresses.join(" "), "client JWKS host resolves to no public address; not fetched");
                return Err(Box::new(ResolvedInternal { host }) as Box<_>);
            }
            if public.len() < resolved.len() {
                tracing::warn!(host = %crate::log_safe(&host), dropped = resolved.len() - public.len(), "client JWKS host resolves to internal addresses too; only the public ones are used");
            }
            Ok(Box::new(public.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The shared HTTP clients for JWKS fetches, built on first use: one for registrations on public
/// hosts, one for those on `localhost` or an internal address literal.
pub(crate) struct JwksFetcher {
    public_only: OnceLock<Result<reqwest::Client, String>>,
    any: OnceLock<Result<reqwest::Client, String>>,
}

impl JwksFetcher {
    pub(crate) fn new() -> JwksFetcher {
        JwksFetcher {
            public_only: OnceLock::new(),
            any: OnceLock::new(),
        }
    }

    fn client(&self, reach: Reach) -> Result<&reqwest::Client, JwksFetchError> {
        let cell = match reach {
            Reach::PublicOnly => &self.public_only,
            Reach::Any => &self.any,
        };
        cell.get_or_init(|| {
            let builder = reqwest::Client::builder()
                .timeout(FETCH_TIMEOUT)
                .connect_timeout(FETCH_TIMEOUT)
                .redirect(reqwest::redirect::Policy::custom(redirect_policy));
            match reach {
                // No proxy: a proxy would resolve the name itself, beyond the resolver's check.
                Reach::PublicOnly => builder
                    .no_proxy()
                    .dns_resolver(Arc::new(PublicOnlyResolver)),
                Reach::Any => builder,
            }
            .build()
            .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| JwksFetchError::Client(e.clone()))
    }

    /// One GET of `url`: the usable keys and how long they may be cached.
    async fn fetch(
        &self,
        url: &Url,
        reach: Reach,
    ) -> Result<(Arc<Vec<VerificationKey>>, Duration), JwksFetchError> {
        let client = self.client(reach)?;
        let mut response = client
            .get(url.clone())
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| {
                if e.is_redirect() {
                    JwksFetchError::Redirect
                } else if resolved_internal(&e) {
                    JwksFetchError::InternalAddress
                } else {
                    JwksFetchError::Transport(transport_reason(&e))
                }
            })?;
        if !response.status().is_success() {
            return Err(JwksFetchError::Status(response.status().as_u16()));
        }
        let ttl = response
            .headers()
            .get(reqwest::header::CACHE_CONTROL)
            .and_then(|v| v.to_str().ok())
            .map(cache_ttl)
            .unwrap_or(DEFAULT_TTL);
        if response
            .content_length()
            .is_some_and(|n| n > MAX_BODY as u64)
        {
            return Err(JwksFetchError::TooLarge);
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| JwksFetchError::Transport(transport_reason(&e)))?
        {
            if body.len() + chunk.len() > MAX_BODY {
                return Err(JwksFetchError::TooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        let doc: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|_| JwksFetchError::Invalid("not JSON".to_owned()))?;
        let Some(keys) = doc.get("keys").and_then(|k| k.as_array()) else {
            return Err(JwksFetchError::Invalid("no `keys` array".to_owned()));
        };
        if keys.len() > MAX_JWKS_KEYS {
            return Err(JwksFetchError::TooManyKeys);
        }
        // A published JWKS may carry keys for other uses; keep the ones that can verify.
        let usable: Vec<VerificationKey> = keys
            .iter()
            .filter_map(|k| parse_jwk(k).ok().flatten())
            .collect();
        if usable.is_empty() {
            return Err(JwksFetchError::Invalid(
                "no RSA or EC (P-384, P-256) signature key".to_owned(),
            ));
        }
        Ok((Arc::new(usable), ttl))
    }
}

/// Why a URL may not serve a client's JWKS, at registration or as a redirect's target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum JwksUrlError {
    #[error("has no host")]
    NoHost,
    #[error("must be https (plain http only to a loopback host)")]
    PlainHttp,
    #[error("leads from a public host to a loopback, private, link-local or unspecified address")]
    Internal,
}

/// A URL's host: a name, or an address literal (IPv4-mapped IPv6 ones as IPv4).
enum Host<'a> {
    Name(&'a str),
    Ip(IpAddr),
}

fn host_of(url: &Url) -> Option<Host<'_>> {
    let host = url.host_str()?;
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    Some(match bare.parse::<IpAddr>() {
        Ok(ip) => Host::Ip(ip.to_canonical()),
        Err(_) => Host::Name(host),
    })
}

/// The registration's rule: https, or plain http to a loopback host (for local testing).
fn check_jwks_url(url: &Url) -> Result<(), JwksUrlError> {
    let host = host_of(url).ok_or(JwksUrlError::NoHost)?;
    match url.scheme() {
        "https" => Ok(()),
        "http" if is_loopback(&host) => Ok(()),
        _ => Err(JwksUrlError::PlainHttp),
    }
}

fn is_loopback(host: &Host) -> bool {
    match host {
        Host::Name(name) => name.eq_ignore_ascii_case("localhost"),
        Host::Ip(ip) => ip.is_loopback(),
    }
}

/// A host a public server has no business sending us to: `localhost`, or an address literal
/// that is not public ([`is_public_ip`]). Host names are checked when they are resolved
/// ([`PublicOnlyResolver`]).
fn is_internal(host: &Host) -> bool {
    match host {
        Host::Name(_) => is_loopback(host),
        Host::Ip(ip) => !is_public_ip(*ip),
    }
}

/// Whether an address may be reached from a registration on a public host: not loopback,
/// private, shared (CGNAT), link-local (cloud metadata services), unspecified (`0.0.0.0` reaches
/// this very machine), multicast, broadcast, reserved or documentation, nor an IPv6 address
/// that embeds such an IPv4 address (IPv4-mapped, -compatible, NAT64, 6to4).
fn is_public_ip(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(a == 0 // "this network", 0.0.0.0 included
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || (a == 100 && b & 0xc0 == 64) // shared address space (CGNAT), 100.64/10
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments, 192.0.0/24
        || (a == 198 && b & 0xfe == 18) // benchmarking, 198.18/15
        || ip.is_documentation()
        || ip.is_multicast()
        || a >= 240) // reserved, and the broadcast address
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    let embedded_v4 = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    if ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || ip.is_unique_local()
        || ip.is_unicast_link_local()
        || s[0] & 0xffc0 == 0xfec0 // site-local (deprecated), fec0::/10
        || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation, 2001:db8::/32
        || (s[0] == 0x0100 && s[1..4] == [0, 0, 0]) // discard-only, 100::/64
        || s[..6] == [0; 6]
    // IPv4-compatible (deprecated), ::/96
    {
        return false;
    }
    match (s[0], s[1], s[2]) {
        // NAT64, 64:ff9b::/96: as public as the IPv4 address it carries.
        (0x0064, 0xff9b, 0) if s[3..6] == [0, 0, 0] => is_public_v4(embedded_v4(s[6], s[7])),
        // Local-use NAT64, 64:ff9b:1::/48.
        (0x0064, 0xff9b, 1) => false,
        // 6to4, 2002::/16: as public as the IPv4 address it carries.
        (0x2002, hi, lo) => is_public_v4(embedded_v4(hi, lo)),
        _ => true,
    }
}

/// Whether a fetch of the registered JWKS URL `registered` may follow a redirect to `next`: only
/// to a URL the registration would accept, and to an internal address only from one.
fn redirect_allowed(registered: &Url, next: &Url) -> Result<(), JwksUrlError> {
    check_jwks_url(next)?;
    let (Some(from), Some(to)) = (host_of(registered), host_of(next)) else {
        return Err(JwksUrlError::NoHost);
    };
    if is_internal(&to) && !is_internal(&from) {
        return Err(JwksUrlError::Internal);
    }
    Ok(())
}

fn redirect_policy(attempt: reqwest::redirect::Attempt) -> reqwest::redirect::Action {
    // `previous` starts with the URL first asked for: the registered one.
    let Some(registered) = attempt.previous().first().cloned() else {
        return attempt.stop();
    };
    if attempt.previous().len() > MAX_REDIRECTS {
        return attempt.error(JwksFetchError::Redirect);
    }
    match redirect_allowed(&registered, attempt.url()) {
        Ok(()) => attempt.follow(),
        Err(reason) => {
            tracing::warn!(registered = %registered, next = %crate::log_safe(attempt.url().as_str()), %reason, "client JWKS redirect refused");
            attempt.error(JwksFetchError::Redirect)
        }
    }
}

/// Whether a fetch failed because [`PublicOnlyResolver`] refused its host.
fn resolved_internal(e: &reqwest::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<ResolvedInternal>() {
            return true;
        }
        source = err.source();
    }
    false
}

fn transport_reason(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_connect() {
        "cannot connect".to_owned()
    } else {
        "transport error".to_owned()
    }
}

/// The cache lifetime a `Cache-Control` value asks for, clamped.
fn cache_ttl(value: &str) -> Duration {
    let mut ttl = None;
    for directive in value.split(',').map(str::trim) {
        let lower = directive.to_ascii_lowercase();
        if lower == "no-store" || lower == "no-cache" {
            return MIN_TTL;
        }
        if let Some(secs) = lower.strip_prefix("max-age=")
            && let Ok(secs) = secs.trim_matches('"').parse::<u64>()
        {
            ttl = Some(Duration::from_secs(secs));
        }
    }
    ttl.unwrap_or(DEFAULT_TTL).clamp(MIN_TTL, MAX_TTL)
}

#[derive(Default)]
struct CacheState {
    keys: Option<Arc<Vec<VerificationKey>>>,
    expires_at: Option<Instant>,
    /// When the last fetch that ended began.
    last_fetch: Option<Instant>,
    last_failed: bool,
}

/// What the cache can do for a request.
enum Cached {
    Keys(Arc<Vec<VerificationKey>>),
    Backoff,
    Fetch,
}

impl CacheState {
    fn lookup(&self, refresh: bool, now: Instant) -> Cached {
        let recently = self
            .last_fetch
            .is_some_and(|t| now.duration_since(t) < MIN_TTL);
        if let (Some(keys), Some(exp)) = (&self.keys, self.expires_at)
            && now < exp
            && (!refresh || recently)
        {
            return Cached::Keys(keys.clone());
        }
        if recently && self.last_failed {
            return Cached::Backoff;
        }
        Cached::Fetch
    }
}

/// A client's registered JWKS URL and its cached keys.
pub(crate) struct JwksUrlSource {
    url: Url,
    reach: Reach,
    /// Held only to read or update the cache, never across an await.
    cache: std::sync::Mutex<CacheState>,
    /// The turn to fetch: held by the one fetch in flight, waited for by the requests of this
    /// client that need one meanwhile. Cache hits never take it.
    fetch_turn: tokio::sync::Mutex<()>,
}

impl JwksUrlSource {
    /// Checks the URL: https, or plain http to a loopback host (for local testing).
    pub(crate) fn new(url: &str) -> Result<JwksUrlSource, String> {
        let parsed = Url::parse(url).map_err(|e| format!("is not a URL: {e}"))?;
        check_jwks_url(&parsed).map_err(|e| e.to_string())?;
        let reach = match host_of(&parsed) {
            Some(host) if is_internal(&host) => Reach::Any,
            _ => Reach::PublicOnly,
        };
        Ok(JwksUrlSource {
            url: parsed,
            reach,
            cache: std::sync::Mutex::new(CacheState::default()),
            fetch_turn: tokio::sync::Mutex::new(()),
        })
    }

    pub(crate) fn url(&self) -> &Url {
        &self.url
    }

    /// The cached keys, fetched when missing or expired. `refresh` asks for a re-fetch because
    /// the wanted `kid` was not found; it is honoured at most once per [`MIN_TTL`].
    pub(crate) async fn keys(
        &self,
        fetcher: &JwksFetcher,
        refresh: bool,
    ) -> Result<Arc<Vec<VerificationKey>>, JwksFetchError> {
        match self.lookup(refresh) {
            Cached::Keys(keys) => return Ok(keys),
            Cached::Backoff => return Err(JwksFetchError::Backoff),
            Cached::Fetch => {}
        }
        let _turn = self.fetch_turn.lock().await;
        // A fetch that ended while this request waited for its turn decides for it too.
        match self.lookup(refresh) {
            Cached::Keys(keys) => return Ok(keys),
            Cached::Backoff => return Err(JwksFetchError::Backoff),
            Cached::Fetch => {}
        }
        let started = Instant::now();
        let fetched = fetcher.fetch(&self.url, self.reach).await;
        let mut state = self.state();
        state.last_fetch = Some(started);
        match fetched {
            Ok((keys, ttl)) => {
                tracing::debug!(url = %self.url, keys = keys.len(), ttl_s = ttl.as_secs(), "fetched client JWKS");
                state.keys = Some(keys.clone());
                state.expires_at = Some(Instant::now() + ttl);
                state.last_failed = false;
                Ok(keys)
            }
            Err(e) => {
                tracing::warn!(url = %self.url, error = %e, "client JWKS fetch failed");
                state.last_failed = true;
                Err(e)
            }
        }
    }

    fn lookup(&self, refresh: bool) -> Cached {
        self.state().lookup(refresh, Instant::now())
    }

    fn state(&self) -> std::sync::MutexGuard<'_, CacheState> {
        // Nothing panics while holding it; a poisoned cache is still a consistent one.
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;

    use super::*;

    #[test]
    fn cache_control_is_clamped() {
        assert_eq!(cache_ttl("max-age=600"), Duration::from_secs(600));
        assert_eq!(cache_ttl("public, max-age=1"), MIN_TTL);
        assert_eq!(cache_ttl("max-age=99999999"), MAX_TTL);
        assert_eq!(cache_ttl("no-store"), MIN_TTL);
        assert_eq!(cache_ttl("private"), DEFAULT_TTL);
    }

    #[test]
    fn jwks_url_must_be_https_or_loopback() {
        assert!(JwksUrlSource::new("https://example.org/jwks.json").is_ok());
        assert!(JwksUrlSource::new("http://127.0.0.1:9/jwks").is_ok());
        assert!(JwksUrlSource::new("http://localhost/jwks").is_ok());
        assert!(JwksUrlSource::new("http://example.org/jwks").is_err());
        assert!(JwksUrlSource::new("not a url").is_err());
    }

    #[test]
    fn redirects_keep_to_the_registration_rule_and_out_of_internal_networks() {
        let url = |s: &str| Url::parse(s).unwrap();
        let public = url("https://client.example/jwks");
        let local = url("http://127.0.0.1:9/jwks");
        assert_eq!(
            redirect_allowed(&public, &url("https://cdn.example/jwks")),
            Ok(())
        );
        for plain in [
            "http://client.example/jwks",
            "http://169.254.169.254/latest/meta-data/",
            "http://0.0.0.0:9/jwks",
        ] {
            assert_eq!(
                redirect_allowed(&public, &url(plain)),
                Err(JwksUrlError::PlainHttp),
                "{plain}"
            );
            assert_eq!(
                redirect_allowed(&local, &url(plain)),
                Err(JwksUrlError::PlainHttp),
                "{plain}"
            );
        }
        for internal in [
            "https://127.0.0.1/jwks",
            "https://localhost/jwks",
            "https://10.1.2.3/jwks",
            "https://192.168.0.1/jwks",
            "https://172.16.0.1/jwks",
            "https://100.64.0.1/jwks",
            "https://169.254.169.254/jwks",
            "https://0.0.0.0/jwks",
            "https://[::1]/jwks",
            "https://[::ffff:10.0.0.1]/jwks",
            "https://[fd00::1]/jwks",
            "https://[fe80::1]/jwks",
        ] {
            assert_eq!(
                redirect_allowed(&public, &url(internal)),
                Err(JwksUrlError::Internal),
                "{internal}"
            );
        }
        // A client registered on a loopback host (a local test set-up) may move on it.
        assert_eq!(
            redirect_allowed(&local, &url("http://localhost:9/keys")),
            Ok(())
        );
    }

    /// A JWKS host that answers the first request with `jwks` (and closes the connection) and
    /// reads every later one without answering; `stalled` is told of each of those.
    async fn answers_once_then_stalls(jwks: String) -> (String, Arc<tokio::sync::Notify>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
        let stalled = Arc::new(tokio::sync::Notify::new());
        let tell = stalled.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            let mut first = true;
            while let Ok((mut socket, _)) = listener.accept().await {
                let mut request = [0u8; 4096];
                let _ = socket.read(&mut request).await;
                if first {
                    first = false;
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
                        jwks.len()
                    );
                    let _ = socket.write_all(head.as_bytes()).await;
                    let _ = socket.write_all(jwks.as_bytes()).await;
                } else {
                    tell.notify_one();
                    held.push(socket);
                }
            }
        });
        (url, stalled)
    }

    fn test_jwks() -> String {
        let pem = include_bytes!("../tests/data/ec-p384.pem");
        let key = crate::client_tools::ClientKey::from_pem(pem, None, Some("k1".into())).unwrap();
        crate::client_tools::jwks_document(&[key])
            .unwrap()
            .to_string()
    }

    /// A client's JWKS cache was one async lock held for the whole fetch (up to 5 s): while one
    /// request re-fetched (an unknown `kid`, or expired keys), every other request of that
    /// client waited, even those its cached keys would serve. Now the cache is read and written
    /// under a lock never held across a fetch, and the fetch has a turn of its own: a cache hit
    /// is answered at its first poll while another request's fetch is in flight.
    #[tokio::test]
    async fn a_fetch_in_flight_holds_up_no_cache_hit() {
        let (url, stalled) = answers_once_then_stalls(test_jwks()).await;
        let source = Arc::new(JwksUrlSource::new(&url).unwrap());
        let fetcher = Arc::new(JwksFetcher::new());
        assert_eq!(source.keys(&fetcher, false).await.unwrap().len(), 1);
        // The fetch as if a minute ago: a request for an unknown `kid` may fetch again.
        source.state().last_fetch = Instant::now().checked_sub(MIN_TTL * 2);
        let refreshing = tokio::spawn({
            let (source, fetcher) = (source.clone(), fetcher.clone());
            async move { source.keys(&fetcher, true).await.map(|k| k.len()) }
        });
        stalled.notified().await;
        // That fetch is in flight (its request arrived, never to be answered). A request whose
        // key is cached gets it without waiting for it.
        let mut hit = std::pin::pin!(source.keys(&fetcher, false));
        let polled = hit
            .as_mut()
            .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()));
        assert!(
            matches!(&polled, std::task::Poll::Ready(Ok(keys)) if keys.len() == 1),
            "a cache hit waited for another request's fetch"
        );
        assert!(!refreshing.is_finished());
        refreshing.abort();
    }

    /// Requests of one client that find no usable keys at once share one fetch.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_requests_share_one_fetch() {
        let (url, stalled) = answers_once_then_stalls(test_jwks()).await;
        let source = Arc::new(JwksUrlSource::new(&url).unwrap());
        let fetcher = Arc::new(JwksFetcher::new());
        let requests: Vec<_> = (0..8)
            .map(|_| {
                let (source, fetcher) = (source.clone(), fetcher.clone());
                tokio::spawn(async move { source.keys(&fetcher, false).await.map(|k| k.len()) })
            })
            .collect();
        for r in requests {
            assert_eq!(r.await.unwrap().unwrap(), 1);
        }
        // A second fetch would have stalled: none was made.
        assert!(
            std::pin::pin!(stalled.notified())
                .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
                .is_pending()
        );
    }

    /// A JWKS host that answers every request with `head` and then `body`, written in pieces
    /// of `piece` bytes with `pause` between them.
    async fn hostile_host(head: &'static str, body: Vec<u8>, piece: usize, pause: Duration) -> Url {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let body = body.clone();
                tokio::spawn(async move {
                    let mut request = [0u8; 4096];
                    let _ = socket.read(&mut request).await;
                    let _ = socket.write_all(head.as_bytes()).await;
                    for chunk in body.chunks(piece) {
                        if socket.write_all(chunk).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(pause).await;
                    }
                });
            }
        });
        Url::parse(&url).unwrap()
    }

    /// Probes of a hostile JWKS host: a body over the limit without a `content-length` (read
    /// until the limit, then refused), and one trickled a byte at a time (cut off by the fetch
    /// time limit, which covers the body).
    #[tokio::test]
    async fn hostile_jwks_hosts_are_cut_off() {
        let fetcher = JwksFetcher::new();
        // Chunked: `3ffff` (256 KiB - 1) bytes per chunk, twice.
        let mut body = Vec::new();
        for _ in 0..2 {
            body.extend_from_slice(b"3ffff\r\n");
            body.extend(std::iter::repeat_n(b' ', 0x3ffff));
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(b"0\r\n\r\n");
        let url = hostile_host(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
            body,
            64 * 1024,
            Duration::ZERO,
        )
        .await;
        let err = fetcher.fetch(&url, Reach::Any).await.unwrap_err();
        assert!(matches!(err, JwksFetchError::TooLarge), "{err}");

        let url = hostile_host(
            "HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n",
            vec![b' '; 100_000],
            1,
            Duration::from_millis(200),
        )
        .await;
        let err = fetcher.fetch(&url, Reach::Any).await.unwrap_err();
        assert!(
            matches!(&err, JwksFetchError::Transport(reason) if reason == "timed out"),
            "{err}"
        );
    }

    #[test]
    fn public_addresses_are_told_from_internal_ones() {
        for internal in [
            "0.0.0.0",
            "0.1.2.3",
            "127.0.0.1",
            "127.255.0.1",
            "10.1.2.3",
            "172.31.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "169.254.169.254",
            "192.0.0.8",
            "198.18.0.1",
            "192.0.2.1",
            "224.0.0.1",
            "240.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "::127.0.0.1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::10.0.0.1",
            "64:ff9b:1::1",
            "2002:7f00:1::",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "fec0::1",
            "ff02::1",
            "2001:db8::1",
            "100::1",
        ] {
            assert!(!is_public_ip(internal.parse().unwrap()), "{internal}");
        }
        for public in [
            "1.1.1.1",
            "8.8.8.8",
            "100.128.0.1",
            "172.32.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::8.8.8.8",
            "2002:808:808::",
        ] {
            assert!(is_public_ip(public.parse().unwrap()), "{public}");
        }
    }

    #[test]
    fn only_registrations_on_public_hosts_are_kept_to_public_addresses() {
        let reach = |u: &str| JwksUrlSource::new(u).unwrap().reach;
        assert_eq!(
            reach("https://keys.example.com/jwks.json"),
            Reach::PublicOnly
        );
        assert_eq!(reach("https://93.184.215.14/jwks.json"), Reach::PublicOnly);
        assert_eq!(reach("http://127.0.0.1:9/jwks"), Reach::Any);
        assert_eq!(reach("http://localhost:9/jwks"), Reach::Any);
        assert_eq!(reach("https://10.0.0.5/jwks"), Reach::Any);
        assert_eq!(reach("https://[fd00::5]/jwks"), Reach::Any);
    }

    /// A name that resolves to loopback (`localhost` here; a public-looking name rebound to
    /// 127.0.0.1 alike) is refused when the fetch of a public registration connects: no
    /// connection is opened, and the error says why.
    #[tokio::test]
    async fn a_public_registrations_fetch_never_connects_to_a_name_resolving_internally() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let a = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                a.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut request = [0u8; 4096];
                let _ = socket.read(&mut request).await;
                let _ = socket
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\n{\"keys\": []}")
                    .await;
            }
        });
        let url = Url::parse(&format!("http://localhost:{port}/jwks.json")).unwrap();
        let fetcher = JwksFetcher::new();
        let err = fetcher.fetch(&url, Reach::PublicOnly).await.unwrap_err();
        assert!(matches!(err, JwksFetchError::InternalAddress), "{err}");
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 0);
        // The same URL registered as such (`localhost`) is fetched.
        let err = fetcher.fetch(&url, Reach::Any).await.unwrap_err();
        assert!(matches!(err, JwksFetchError::Invalid(_)), "{err}");
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
}
