//! Clients registered by `jwks_url`, through the real server's token endpoint: where the server
//! may connect for a client's keys, what one client's JWKS may cost, and that one client's slow
//! JWKS host does not hold up another client. (The test keys are the auth crate's, see
//! crates/auth/tests/data/PROVENANCE.md.)

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;

/// A server with `--auth smart` whose clients file is `clients`.
struct JwksServer {
    token_url: String,
    _dir: tempfile::TempDir,
    _db: store::testing::TestStore,
}

async fn start(clients: Value) -> JwksServer {
    let dir = tempfile::tempdir().unwrap();
    let db = common::test_store_async().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let token_url = test_support::smart::token_url(&base);
    let registry =
        auth::ClientRegistry::from_json(&clients.to_string(), Path::new("clients.json")).unwrap();
    let auth = auth::Auth::smart(auth::SmartAuth::new(
        registry,
        auth::TokenIssuer::new(base.clone(), Duration::from_secs(300)),
        token_url.clone(),
        1000,
    ));
    let state = common::app_state(db.store.clone(), &base, auth, 1 << 20, dir.path()).await;
    let app = server::router(state);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    JwksServer {
        token_url,
        _dir: dir,
        _db: db,
    }
}

impl JwksServer {
    /// A token request of `client` with an assertion signed by `key`: the status and the body.
    async fn token(&self, client: &str, key: &auth::ClientKey) -> (StatusCode, Value) {
        let assertion = key.sign(client, &self.token_url, now()).unwrap();
        self.token_with(&assertion).await
    }

    async fn token_with(&self, assertion: &str) -> (StatusCode, Value) {
        let res = reqwest::Client::new()
            .post(&self.token_url)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!(
                "grant_type=client_credentials&client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer&client_assertion={assertion}&scope=system%2FPatient.rs"
            ))
            .send()
            .await
            .unwrap();
        let st = res.status();
        let text = res.text().await.unwrap();
        (
            st,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// This machine's host name, when it resolves to one of this machine's IPv4 addresses that is
/// loopback or private (`/etc/hosts` maps it to 127.0.x.x, or in a container to its private
/// address): a name, not an address literal, that leads into the server's own network.
async fn internal_host_name() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim().to_owned();
    let addrs: Vec<_> = tokio::net::lookup_host((name.as_str(), 0))
        .await
        .ok()?
        .collect();
    let internal = |ip: std::net::IpAddr| match ip {
        std::net::IpAddr::V4(v4) => v4.is_loopback() || v4.is_private(),
        std::net::IpAddr::V6(_) => false,
    };
    (!addrs.is_empty() && addrs.iter().all(|a| internal(a.ip()))).then_some(name)
}

/// A JWKS URL whose host is a *name* that resolves to an internal address was fetched: only
/// address literals (and `localhost`) were refused as internal, so a registration for a public
/// looking name that resolves (or is rebound) to 127.0.0.1, 10/8, 169.254.169.254 … made the
/// server connect into its own network. Measured before the fix: the listener below, on every
/// local address, accepted the server's connection. Now the addresses a name resolves to are
/// checked when the fetch connects, and the connection is never opened.
#[tokio::test]
async fn a_jwks_host_name_resolving_to_an_internal_address_is_not_connected_to() {
    let Some(name) = internal_host_name().await else {
        eprintln!(
            "skipped: this machine's host name does not resolve to a loopback or private IPv4 address"
        );
        return;
    };
    // Any local address: the name may resolve to 127.0.x.x or to the container's own address.
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let connections = Arc::new(AtomicUsize::new(0));
    let c = connections.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            drop(socket);
        }
    });
    let s = start(json!([
        {"client_id": "named", "jwks_url": format!("https://{name}:{port}/jwks.json"),
         "scope": "system/*.rs"},
    ]))
    .await;
    let key = test_support::smart::test_key("ec-p384.pem");
    let (st, body) = s.token("named", &key).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["error"], "invalid_client", "{body}");
    assert_eq!(
        connections.load(Ordering::SeqCst),
        0,
        "the server connected to {name}:{port}, an internal address"
    );
}

/// Serves `jwks` at `http://127.0.0.1:port/jwks.json`; counts the fetches.
async fn jwks_server(jwks: Value) -> (String, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let body = jwks.to_string();
    let app = axum::Router::new().route(
        "/jwks.json",
        axum::routing::get(move || {
            h.fetch_add(1, Ordering::SeqCst);
            let body = body.clone();
            async move { body }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/jwks.json"), hits)
}

/// An assertion of `client` signed by the test key `pem_name` (RS384 for RSA keys, ES256 for
/// `ec-p256.pem`), with no `kid` in its header: the server must find the key among all the
/// client's keys.
fn assertion_without_kid(pem_name: &str, client: &str, token_url: &str) -> String {
    let pem = std::fs::read(test_support::smart::key_path(pem_name)).unwrap();
    let (alg, key) = if pem_name.starts_with("ec-") {
        (
            jsonwebtoken::Algorithm::ES256,
            jsonwebtoken::EncodingKey::from_ec_pem(&pem).unwrap(),
        )
    } else {
        (
            jsonwebtoken::Algorithm::RS384,
            jsonwebtoken::EncodingKey::from_rsa_pem(&pem).unwrap(),
        )
    };
    let t = now();
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(alg),
        &json!({"iss": client, "sub": client, "aud": token_url, "exp": t + 240, "iat": t,
                "jti": uuid_like()}),
        &key,
    )
    .unwrap()
}

fn uuid_like() -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!("{}-{}", now(), N.fetch_add(1, Ordering::SeqCst))
}

/// A JWKS of `n` keys: `n - 1` copies of the public key of `rsa-b.pem` (which signs nothing
/// here) with the `kid` `decoy_kid` (none if `None`), then the key of `rsa-a.pem` with its own.
fn jwks_of(n: usize, decoy_kid: Option<&str>) -> Value {
    let mut decoy = test_support::smart::test_key("rsa-b.pem")
        .public_jwk()
        .unwrap();
    match decoy_kid {
        Some(kid) => decoy["kid"] = kid.into(),
        None => {
            decoy.as_object_mut().unwrap().remove("kid");
        }
    }
    let mut keys = vec![decoy; n - 1];
    keys.push(
        test_support::smart::test_key("rsa-a.pem")
            .public_jwk()
            .unwrap(),
    );
    json!({ "keys": keys })
}

/// Without a `kid`, every key of the client's JWKS that fit the algorithm was tried, however many
/// it held, on an async worker: an assertion (valid or not) for a client whose JWKS holds
/// hundreds of keys cost hundreds of signature checks (measured with
/// `measure_token_request_cost_of_a_large_jwks`: 1,000 EC keys, 291 ms CPU per request). Before
/// the fix a JWKS of 100 keys was accepted and a `kid`-less assertion signed by its last key
/// verified (100 RSA verifications, token issued). Now a JWKS holds at most
/// `auth::MAX_JWKS_KEYS` keys, one assertion is tried against at most
/// `auth::MAX_CANDIDATE_KEYS` of them (those that fit its `alg` and `kid`; more is refused, also
/// when several keys share the `kid`), and the checks run off the async workers.
#[tokio::test]
async fn a_jwks_of_many_keys_costs_an_assertion_at_most_the_candidate_limit() {
    const { assert!(auth::MAX_CANDIDATE_KEYS < 100 && 100 <= auth::MAX_JWKS_KEYS) };
    let rsa_a = test_support::smart::test_key("rsa-a.pem");
    let kid = rsa_a.public_jwk().unwrap()["kid"]
        .as_str()
        .unwrap()
        .to_owned();
    let (many, hits) = jwks_server(jwks_of(100, None)).await;
    let (few, _) = jwks_server(jwks_of(auth::MAX_CANDIDATE_KEYS, None)).await;
    let (too_many, _) = jwks_server(jwks_of(auth::MAX_JWKS_KEYS + 1, None)).await;
    let (shared_kid, _) = jwks_server(jwks_of(auth::MAX_CANDIDATE_KEYS + 1, Some(&kid))).await;
    let s = start(json!([
        {"client_id": "many", "jwks_url": many, "scope": "system/*.rs"},
        {"client_id": "few", "jwks_url": few, "scope": "system/*.rs"},
        {"client_id": "too-many", "jwks_url": too_many, "scope": "system/*.rs"},
        {"client_id": "shared-kid", "jwks_url": shared_kid, "scope": "system/*.rs"},
    ]))
    .await;
    let refused = |(st, body): (StatusCode, Value)| {
        assert_eq!(st, StatusCode::UNAUTHORIZED, "{body}");
        assert_eq!(body["error"], "invalid_client", "{body}");
    };
    let granted = |(st, body): (StatusCode, Value)| assert_eq!(st, StatusCode::OK, "{body}");

    // 100 keys fit RS384 and the assertion names none: refused, not tried 100 times.
    refused(
        s.token_with(&assertion_without_kid("rsa-a.pem", "many", &s.token_url))
            .await,
    );
    // Named by its `kid`, the one key is tried.
    granted(s.token("many", &rsa_a).await);
    assert_eq!(hits.load(Ordering::SeqCst), 1, "the JWKS was fetched once");
    // As many candidates as the limit: tried.
    granted(
        s.token_with(&assertion_without_kid("rsa-a.pem", "few", &s.token_url))
            .await,
    );
    // A JWKS beyond the key limit is not usable at all.
    refused(s.token("too-many", &rsa_a).await);
    // A `kid` that more keys share than the limit.
    refused(s.token("shared-kid", &rsa_a).await);
}

/// A JWKS host that reads each request and never answers; `requests` counts the requests read.
async fn stalling_jwks_server() -> (String, Arc<tokio::sync::Notify>, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let arrived = Arc::new(tokio::sync::Notify::new());
    let requests = Arc::new(AtomicUsize::new(0));
    let (a, r) = (arrived.clone(), requests.clone());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut buf = [0u8; 4096];
            if socket.read(&mut buf).await.unwrap_or(0) > 0 {
                r.fetch_add(1, Ordering::SeqCst);
                a.notify_one();
            }
            held.push(socket);
        }
    });
    (format!("http://{addr}/jwks.json"), arrived, requests)
}

/// One client's JWKS host that does not answer holds up that client's token requests for at
/// most the fetch timeout, and nobody else's: another client's token request is answered while
/// the first client's fetch is still waiting. (This held before too: each client's JWKS cache
/// has its own lock; kept as a guard.)
#[tokio::test]
async fn a_stalling_jwks_host_does_not_hold_up_another_client() {
    let (stalled_url, arrived, requests) = stalling_jwks_server().await;
    let key = test_support::smart::test_key("rsa-a.pem");
    let (prompt_url, _) =
        jwks_server(auth::client_tools::jwks_document(std::slice::from_ref(&key)).unwrap()).await;
    let s = Arc::new(
        start(json!([
            {"client_id": "stalled", "jwks_url": stalled_url, "scope": "system/*.rs"},
            {"client_id": "prompt", "jwks_url": prompt_url, "scope": "system/*.rs"},
        ]))
        .await,
    );
    let waiting = {
        let s = s.clone();
        tokio::spawn(async move {
            let key = test_support::smart::test_key("rsa-a.pem");
            s.token("stalled", &key).await
        })
    };
    arrived.notified().await;
    let (st, body) = s.token("prompt", &key).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(requests.load(Ordering::SeqCst), 1);
    // The stalled client's request ends with the fetch timeout: invalid_client.
    let (st, body) = waiting.await.unwrap();
    assert_eq!(st, StatusCode::UNAUTHORIZED, "{body}");
}

/// This process's CPU time (user + system, every thread), in clock ticks of 10 ms.
fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // The fields after the command name (which is in parentheses): utime and stime are the
    // 12th and 13th.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// Measurement (run by hand: `cargo test -p server --profile ci --test smart_jwks -- --ignored
/// --nocapture`): the cost of one token request whose assertion has no `kid` and a bad
/// signature, for a client whose fetched JWKS holds `n` EC P-256 keys (copies of one key).
#[tokio::test]
#[ignore]
async fn measure_token_request_cost_of_a_large_jwks() {
    for n in [1usize, 10, 100, 1000] {
        let mut jwk = test_support::smart::test_key("ec-p256.pem")
            .public_jwk()
            .unwrap();
        jwk.as_object_mut().unwrap().remove("kid");
        let (url, _) = jwks_server(json!({ "keys": vec![jwk; n] })).await;
        let s =
            start(json!([{"client_id": "many", "jwks_url": url, "scope": "system/*.rs"}])).await;
        let forged = || {
            let a = assertion_without_kid("ec-p256.pem", "many", &s.token_url);
            // The signature's first character changed: it verifies with none of the keys.
            let (head, sig) = a.rsplit_once('.').unwrap();
            let first = if sig.starts_with('A') { 'B' } else { 'A' };
            format!("{head}.{first}{}", &sig[1..])
        };
        // The first request fetches the JWKS.
        let (st, body) = s.token_with(&forged()).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED, "{body}");
        let rounds = 20;
        let (cpu, wall) = (cpu_ticks(), std::time::Instant::now());
        for _ in 0..rounds {
            let (st, body) = s.token_with(&forged()).await;
            assert_eq!(st, StatusCode::UNAUTHORIZED, "{body}");
        }
        let wall_ms = wall.elapsed().as_secs_f64() * 1000.0 / rounds as f64;
        let cpu_ms = (cpu_ticks() - cpu) as f64 * 10.0 / rounds as f64;
        println!(
            "JWKS of {n} keys, no kid, bad signature: {wall_ms:.1} ms wall, {cpu_ms:.1} ms CPU per token request ({rounds} requests)"
        );
    }
}
