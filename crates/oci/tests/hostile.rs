//! Against a deliberately broken registry: a hand-written HTTP server (`test_support::raw_http`)
//! that answers what an honest registry never would (content that does not match its digest,
//! lying sizes, garbage, error statuses). A real registry cannot be made to misbehave like this,
//! so this is the one place where a hand-written server stands in for it. Every case must end in
//! a typed error, never a panic or a hang.

use std::collections::HashMap;
use std::io::Write;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use oci_config::{OciError, OciSettings, fetch_file};
use sha2::{Digest, Sha256};
use test_support::raw_http::{self, Request, Server};

#[derive(Clone, Default)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Sent as-is instead of a formed response.
    raw: Option<Vec<u8>>,
}

fn ok(body: impl Into<Vec<u8>>, content_type: &str) -> Reply {
    Reply {
        status: 200,
        headers: vec![("Content-Type".into(), content_type.into())],
        body: body.into(),
        raw: None,
    }
}

/// An error status with a plain-text body.
fn status(code: u16) -> Reply {
    Reply {
        status: code,
        body: format!("error {code}").into_bytes(),
        headers: vec![("Content-Type".into(), "text/plain".into())],
        raw: None,
    }
}

/// An error status with an OCI error envelope.
fn oci_error(code: u16, oci_code: &str, message: &str) -> Reply {
    Reply {
        body: serde_json::to_vec(
            &serde_json::json!({"errors": [{"code": oci_code, "message": message}]}),
        )
        .unwrap(),
        headers: vec![("Content-Type".into(), "application/json".into())],
        ..status(code)
    }
}

/// Serves `routes` (path → reply; `/v2/` answers 200 unless routed) on a fresh loopback port.
fn serve(routes: HashMap<String, Reply>) -> String {
    serve_on("127.0.0.1:0", routes)
}

/// [`serve`] on `addr`.
fn serve_on(addr: &str, routes: HashMap<String, Reply>) -> String {
    let server = Server::start_on(addr, move |r| answer(r, &routes));
    server.addr().to_owned()
}

/// The route's reply to `request`: a route `<path>#authed` answers requests that carry the token
/// the test's token service hands out.
fn answer(request: &Request, routes: &HashMap<String, Reply>) -> raw_http::Reply {
    let path = request.path();
    let authed = request
        .header("authorization")
        .is_some_and(|a| a.eq_ignore_ascii_case("bearer good-token"));
    let reply = authed
        .then(|| routes.get(&format!("{path}#authed")).cloned())
        .flatten()
        .or_else(|| routes.get(path).cloned())
        .unwrap_or_else(|| {
            if path == "/v2/" {
                ok("{}", "application/json")
            } else {
                status(404)
            }
        });
    match reply.raw {
        Some(raw) => raw_http::Reply::Raw(raw),
        None => raw_http::Reply::Full {
            status: reply.status,
            headers: reply.headers,
            body: reply.body,
        },
    }
}

fn sha256(bytes: &[u8]) -> String {
    let hex: String = Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256:{hex}")
}

fn tar_gz(name: &str, content: &[u8]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(content.len() as u64);
    header.set_mode(0o644);
    builder.append_data(&mut header, name, content).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&builder.into_inner().unwrap()).unwrap();
    gz.finish().unwrap()
}

const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

fn manifest(layers: &[(String, i64)]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": sha256(b"{}"),
            "size": 2,
        },
        "layers": layers.iter().map(|(digest, size)| serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": digest,
            "size": size,
        })).collect::<Vec<_>>(),
    }))
    .unwrap()
}

fn settings(addr: &str) -> OciSettings {
    OciSettings {
        allow: vec![addr.parse().unwrap()],
        insecure_http: vec![addr.to_string()],
        timeout: Duration::from_secs(10),
        ..OciSettings::default()
    }
}

fn fetch(addr: &str, reference: &str) -> Result<oci_config::Fetched, OciError> {
    fetch_file(
        &settings(addr),
        &format!("{addr}/{reference}"),
        "r4-config.json",
    )
}

#[test]
fn the_honest_case_works_with_this_server() {
    let layer = tar_gz("r4-config.json", b"{\"ok\":true}");
    let digest = sha256(&layer);
    let body = manifest(&[(digest.clone(), layer.len() as i64)]);
    let routes = HashMap::from([
        ("/v2/c/manifests/v1".to_string(), ok(body.clone(), MANIFEST)),
        (
            format!("/v2/c/blobs/{digest}"),
            ok(layer, "application/octet-stream"),
        ),
    ]);
    let addr = serve(routes);
    let fetched = fetch(&addr, "c:v1").unwrap();
    assert_eq!(fetched.bytes, b"{\"ok\":true}");
    assert_eq!(fetched.manifest_digest, sha256(&body));
}

#[test]
fn content_that_does_not_match_its_digest() {
    let layer = tar_gz("r4-config.json", b"{\"ok\":true}");
    let digest = sha256(&layer);
    let mut tampered = layer.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    let body = manifest(&[(digest.clone(), layer.len() as i64)]);
    let other_body = manifest(&[(sha256(b"x"), 1)]);
    let pinned = sha256(&body);
    let routes = HashMap::from([
        ("/v2/c/manifests/v1".to_string(), ok(body.clone(), MANIFEST)),
        (
            format!("/v2/c/blobs/{digest}"),
            ok(tampered, "application/octet-stream"),
        ),
        // Asked for one digest, answers with another manifest.
        (
            format!("/v2/d/manifests/{pinned}"),
            ok(other_body, MANIFEST),
        ),
        // A Docker-Content-Digest header that does not match the body.
        (
            "/v2/e/manifests/v1".to_string(),
            Reply {
                headers: vec![
                    ("Content-Type".into(), MANIFEST.into()),
                    ("Docker-Content-Digest".into(), sha256(b"something else")),
                ],
                ..ok(body, MANIFEST)
            },
        ),
    ]);
    let addr = serve(routes);

    match fetch(&addr, "c:v1") {
        Err(OciError::DigestMismatch { expected, actual }) => {
            assert_eq!(expected, digest);
            assert_ne!(actual, digest);
        }
        other => panic!("expected a layer digest mismatch, got {other:?}"),
    }
    match fetch(&addr, &format!("d@{pinned}")) {
        Err(OciError::DigestMismatch { expected, .. }) => assert_eq!(expected, pinned),
        other => panic!("expected a manifest digest mismatch, got {other:?}"),
    }
    let err = fetch(&addr, "e:v1").unwrap_err();
    assert!(matches!(err, OciError::DigestMismatch { .. }), "{err:?}");
    assert!(!err.is_transient());
}

#[test]
fn malformed_manifests() {
    let layer = tar_gz("r4-config.json", b"{}");
    let digest = sha256(&layer);
    let index_of_index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": MANIFEST,
            "digest": sha256(b"inner"),
            "size": 5,
        }],
    }))
    .unwrap();
    let inner_index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [],
    }))
    .unwrap();
    let mut routes = HashMap::from([
        (
            "/v2/garbage/manifests/v1".to_string(),
            ok("this is not json", MANIFEST),
        ),
        ("/v2/empty/manifests/v1".to_string(), ok("", MANIFEST)),
        (
            "/v2/schema1/manifests/v1".to_string(),
            ok(
                r#"{"schemaVersion":1,"name":"x","tag":"v1","fsLayers":[]}"#,
                MANIFEST,
            ),
        ),
        (
            "/v2/traversal/manifests/v1".to_string(),
            ok(
                manifest(&[("sha256:../../../../etc/passwd".into(), 10)]),
                MANIFEST,
            ),
        ),
        (
            "/v2/negative/manifests/v1".to_string(),
            ok(manifest(&[(digest.clone(), -5)]), MANIFEST),
        ),
        (
            "/v2/wrongsize/manifests/v1".to_string(),
            ok(
                manifest(&[(digest.clone(), layer.len() as i64 + 1)]),
                MANIFEST,
            ),
        ),
        (
            format!("/v2/wrongsize/blobs/{digest}"),
            ok(layer.clone(), "application/octet-stream"),
        ),
        (
            "/v2/huge/manifests/v1".to_string(),
            ok(manifest(&[(digest.clone(), 200 * 1024 * 1024)]), MANIFEST),
        ),
        (
            "/v2/nested/manifests/v1".to_string(),
            ok(index_of_index, "application/vnd.oci.image.index.v1+json"),
        ),
        (
            format!("/v2/nested/manifests/{}", sha256(b"inner")),
            ok(inner_index, "application/vnd.oci.image.index.v1+json"),
        ),
        (
            "/v2/big/manifests/v1".to_string(),
            ok(
                [
                    b"{\"schemaVersion\":2".as_slice(),
                    &vec![b' '; 5 << 20],
                    b"}",
                ]
                .concat(),
                MANIFEST,
            ),
        ),
        (
            "/v2/nolayers/manifests/v1".to_string(),
            ok(manifest(&[]), MANIFEST),
        ),
    ]);
    // A blob whose Content-Length announces more than a layer may have (the body never comes).
    routes.insert(
        "/v2/lying/manifests/v1".to_string(),
        ok(manifest(&[(digest.clone(), layer.len() as i64)]), MANIFEST),
    );
    routes.insert(
        format!("/v2/lying/blobs/{digest}"),
        Reply {
            headers: vec![("Content-Length".into(), (300u64 << 20).to_string())],
            ..ok(Vec::new(), "application/octet-stream")
        },
    );
    let addr = serve(routes);

    for repo in [
        "garbage",
        "empty",
        "schema1",
        "traversal",
        "negative",
        "wrongsize",
    ] {
        let err = fetch(&addr, &format!("{repo}:v1")).unwrap_err();
        assert!(
            matches!(err, OciError::BadManifest { .. }),
            "{repo}: {err:?}"
        );
    }
    // The inner entry's digest does not match what the server sends for it.
    let err = fetch(&addr, "nested:v1").unwrap_err();
    assert!(
        matches!(
            err,
            OciError::DigestMismatch { .. } | OciError::BadManifest { .. }
        ),
        "{err:?}"
    );
    let err = fetch(&addr, "big:v1").unwrap_err();
    assert!(matches!(err, OciError::BadManifest { .. }), "{err:?}");
    let err = fetch(&addr, "huge:v1").unwrap_err();
    assert!(matches!(err, OciError::LayerTooLarge { .. }), "{err:?}");
    let err = fetch(&addr, "lying:v1").unwrap_err();
    assert!(matches!(err, OciError::LayerTooLarge { .. }), "{err:?}");
    let err = fetch(&addr, "nolayers:v1").unwrap_err();
    assert!(matches!(err, OciError::FileNotFound { .. }), "{err:?}");
}

#[test]
fn error_statuses_are_classified() {
    let mut routes = HashMap::new();
    for code in [401u16, 403, 404, 408, 429, 500, 502, 503, 418] {
        routes.insert(format!("/v2/s{code}/manifests/v1"), status(code));
    }
    routes.insert(
        "/v2/notfound/manifests/v1".to_string(),
        oci_error(404, "MANIFEST_UNKNOWN", "manifest unknown"),
    );
    routes.insert(
        "/v2/denied/manifests/v1".to_string(),
        oci_error(403, "DENIED", "requested access to the resource is denied"),
    );
    routes.insert(
        "/v2/toomany/manifests/v1".to_string(),
        oci_error(429, "TOOMANYREQUESTS", "slow down"),
    );
    routes.insert(
        "/v2/emptyenvelope/manifests/v1".to_string(),
        Reply {
            body: br#"{"errors":[]}"#.to_vec(),
            ..status(400)
        },
    );
    routes.insert(
        "/v2/html/manifests/v1".to_string(),
        Reply {
            body: format!("<html>{}</html>", "x".repeat(10_000)).into_bytes(),
            ..status(502)
        },
    );
    routes.insert(
        "/v2/nothttp/manifests/v1".to_string(),
        Reply {
            raw: Some(b"SSH-2.0-OpenSSH_9.2\r\n\r\n".to_vec()),
            ..Reply::default()
        },
    );
    routes.insert(
        "/v2/cut/manifests/v1".to_string(),
        Reply {
            raw: Some(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n{\"schema".to_vec()),
            ..Reply::default()
        },
    );
    let addr = serve(routes);

    let transient = |repo: &str| {
        let err = fetch(&addr, &format!("{repo}:v1")).unwrap_err();
        eprintln!("{repo}: {err}");
        assert!(
            matches!(err, OciError::Registry { .. }),
            "{repo}: expected a registry error, got {err:?}"
        );
        assert!(
            err.to_string()
                .starts_with(&format!("Failed to access container registry '{addr}': ")),
            "{err}"
        );
        assert!(err.to_string().len() < 600, "message not clipped: {err}");
        err.is_transient()
    };
    for repo in [
        "s408", "s429", "s500", "s502", "s503", "html", "cut", "toomany",
    ] {
        assert!(transient(repo), "{repo} should be transient");
    }
    for repo in ["s401", "s403", "s418", "denied", "emptyenvelope"] {
        assert!(!transient(repo), "{repo} should not be transient");
    }
    // Whatever a non-HTTP peer leads to, it is a registry error and not a panic.
    transient("nothttp");
    for repo in ["s404", "notfound"] {
        let err = fetch(&addr, &format!("{repo}:v1")).unwrap_err();
        assert!(matches!(err, OciError::ImageNotFound(_)), "{repo}: {err:?}");
    }
}

/// Deterministic pseudo-random bytes (xorshift), so failures can be replayed.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn random_answers_never_panic() {
    let layer = tar_gz("r4-config.json", b"{}");
    let mut routes = HashMap::new();
    for seed in 0..40u64 {
        let len = (seed as usize * 37) % 3000;
        let mut body = noise(seed, len);
        if seed % 2 == 0 {
            // JSON-ish noise: a valid manifest with a corrupted stretch.
            body = manifest(&[(sha256(&layer), layer.len() as i64)]);
            let at = (seed as usize * 13) % body.len();
            let n = (body.len() - at).min(8);
            body[at..at + n].copy_from_slice(&noise(seed, n));
        }
        routes.insert(format!("/v2/r{seed}/manifests/v1"), ok(body, MANIFEST));
        // Layer blobs that match their (noise) digest, so the archive reader sees the noise.
        let blob = if seed % 3 == 0 {
            let mut gz = layer.clone();
            let at = 10 + (seed as usize % (gz.len() - 10));
            gz[at] ^= 0xff;
            gz
        } else {
            [&[0x1f, 0x8b][..], &noise(seed + 100, len)].concat()
        };
        let digest = sha256(&blob);
        routes.insert(
            format!("/v2/b{seed}/manifests/v1"),
            ok(manifest(&[(digest.clone(), blob.len() as i64)]), MANIFEST),
        );
        routes.insert(
            format!("/v2/b{seed}/blobs/{digest}"),
            ok(blob, "application/octet-stream"),
        );
    }
    let addr = serve(routes);
    for seed in 0..40u64 {
        for repo in [format!("r{seed}"), format!("b{seed}")] {
            // Any result is acceptable; reaching the next line means no panic and no hang.
            let result = fetch(&addr, &format!("{repo}:v1"));
            if let Ok(fetched) = result {
                assert!(fetched.bytes.len() <= 1 << 20);
            }
        }
    }
}

/// A server that answers every request with 418 and a body that must never reach an error
/// message, counting the requests it gets: the stand-in for an internal service.
fn bystander() -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = Arc::clone(&hits);
    let routes = HashMap::from([(
        "/latest/meta-data".to_string(),
        Reply {
            body: b"SECRET-CREDENTIALS".to_vec(),
            ..status(418)
        },
    )]);
    let server = Server::start(move |r| {
        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        answer(r, &routes)
    });
    (server.addr().to_owned(), hits)
}

fn redirect(to: &str) -> Reply {
    Reply {
        status: 302,
        headers: vec![("Location".into(), to.into())],
        body: Vec::new(),
        raw: None,
    }
}

/// Issue 16 item 10: a registry cannot send the server to a host that is not allowed (SSRF),
/// by a redirect or a token realm, and nothing the remote side says reaches an error message.
#[test]
fn redirects_and_token_services_only_to_allowed_hosts() {
    let (inside, hits) = bystander();
    let secret = format!("http://{inside}/latest/meta-data");
    let layer = tar_gz("r4-config.json", b"{\"ok\":true}");
    let digest = sha256(&layer);
    let body = manifest(&[(digest.clone(), layer.len() as i64)]);
    let routes = HashMap::from([
        ("/v2/m/manifests/v1".to_string(), redirect(&secret)),
        ("/v2/b/manifests/v1".to_string(), ok(body.clone(), MANIFEST)),
        (format!("/v2/b/blobs/{digest}"), redirect(&secret)),
        (
            "/v2/t/manifests/v1".to_string(),
            Reply {
                headers: vec![(
                    "WWW-Authenticate".into(),
                    format!(r#"Bearer realm="{secret}",service="x""#),
                )],
                ..status(401)
            },
        ),
        (
            "/v2/e/manifests/v1".to_string(),
            Reply {
                body: b"SECRET-CREDENTIALS from the registry".to_vec(),
                ..status(403)
            },
        ),
    ]);
    let addr = serve(routes);
    for repo in ["m", "b", "t", "e"] {
        let err = fetch(&addr, &format!("{repo}:v1")).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, OciError::Registry { .. }), "{repo}: {err:?}");
        assert!(
            !text.contains("SECRET"),
            "{repo}: remote text echoed: {text}"
        );
        assert!(!err.is_transient(), "{repo}: {text}");
        if repo != "e" {
            assert!(text.contains("not allowed"), "{repo}: {text}");
        }
    }
    assert_eq!(
        hits.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the server was sent to a host that is not allowed"
    );
}

/// Blob redirects to a CDN are normal: followed when the CDN host is configured.
#[test]
fn redirect_to_a_configured_host_is_followed() {
    let layer = tar_gz("r4-config.json", b"{\"ok\":true}");
    let digest = sha256(&layer);
    let cdn = serve(HashMap::from([(
        "/blobs/layer".to_string(),
        ok(layer.clone(), "application/octet-stream"),
    )]));
    let body = manifest(&[(digest.clone(), layer.len() as i64)]);
    let addr = serve(HashMap::from([
        ("/v2/c/manifests/v1".to_string(), ok(body, MANIFEST)),
        (
            format!("/v2/c/blobs/{digest}"),
            redirect(&format!("http://{cdn}/blobs/layer")),
        ),
    ]));
    let mut settings = settings(&addr);
    settings.insecure_http.push(cdn.clone());
    let refused = fetch_file(&settings, &format!("{addr}/c:v1"), "r4-config.json").unwrap_err();
    assert!(refused.to_string().contains("not allowed"), "{refused}");
    settings.redirect_hosts = vec![cdn.clone()];
    let fetched = fetch_file(&settings, &format!("{addr}/c:v1"), "r4-config.json").unwrap();
    assert_eq!(fetched.bytes, b"{\"ok\":true}");
}

/// The Bearer token flow of registries (a token service on the registry's host).
#[test]
fn bearer_token_from_the_registry_host() {
    let layer = tar_gz("r4-config.json", b"{\"ok\":true}");
    let digest = sha256(&layer);
    let body = manifest(&[(digest.clone(), layer.len() as i64)]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    drop(listener);
    let challenge = |path: &str| {
        (
            path.to_string(),
            Reply {
                headers: vec![(
                    "WWW-Authenticate".into(),
                    format!(r#"Bearer realm="http://{addr}/token",service="test""#),
                )],
                ..status(401)
            },
        )
    };
    let routes = HashMap::from([
        challenge("/v2/p/manifests/v1"),
        challenge(&format!("/v2/p/blobs/{digest}")),
        ("/v2/p/manifests/v1#authed".to_string(), ok(body, MANIFEST)),
        (
            format!("/v2/p/blobs/{digest}#authed"),
            ok(layer, "application/octet-stream"),
        ),
        (
            "/token".to_string(),
            ok(r#"{"token":"good-token"}"#, "application/json"),
        ),
    ]);
    let bound = serve_on(&addr, routes);
    let fetched = fetch(&bound, "p:v1").unwrap();
    assert_eq!(fetched.bytes, b"{\"ok\":true}");
}
