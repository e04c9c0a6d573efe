//! Request hygiene over real HTTP (issue 16, items 6, 11, 14, 16): Bundle entry limit, JSON
//! parsing bounds (depth, duplicate keys), out-of-range decimals, undecodable paths, request
//! `Content-Encoding`, write `Content-Type`s (CSRF), the `Host` check (DNS rebinding) and server
//! paths in error answers.

mod common;

use std::io::Write;
use std::sync::Arc;

use reqwest::StatusCode;
use serde_json::{Value, json};

struct TestServer {
    base: String,
    port: u16,
    client: reqwest::Client,
    dir: tempfile::TempDir,
    /// The store's database (SQLite, or PostgreSQL with `FHIRHOSE_TEST_DATABASE`).
    _db: store::testing::TestStore,
}

/// A server with `--auth none` on 127.0.0.1 over an empty data directory; `policy` adjusts its
/// request rules before it starts.
async fn start_with(
    max_body_bytes: usize,
    policy: impl FnOnce(&mut server::negotiate::RequestPolicy, &str),
) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let db = common::test_store_async().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let base = format!("http://127.0.0.1:{port}");
    let mut state = common::app_state(
        db.store.clone(),
        &base,
        auth::Auth::none(),
        max_body_bytes,
        dir.path(),
    )
    .await;
    let mut p = (*state.policy).clone();
    policy(&mut p, &base);
    state.policy = Arc::new(p);
    let app = server::router(state);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    TestServer {
        base,
        port,
        client: reqwest::Client::new(),
        dir,
        _db: db,
    }
}

async fn start() -> TestServer {
    start_with(100 * 1024 * 1024, |_, _| {}).await
}

impl TestServer {
    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// POST `body` with a Content-Type; the status, content type and body (JSON, or the text
    /// as a JSON string).
    async fn post(&self, path: &str, content_type: &str, body: impl Into<reqwest::Body>) -> Answer {
        let r = self
            .client
            .post(self.url(path))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        Answer::of(r).await
    }

    async fn get(&self, path: &str) -> Answer {
        Answer::of(self.client.get(self.url(path)).send().await.unwrap()).await
    }
}

#[derive(Debug)]
struct Answer {
    status: StatusCode,
    content_type: String,
    body: Value,
}

impl Answer {
    async fn of(r: reqwest::Response) -> Answer {
        let status = r.status();
        let content_type = r
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let text = r.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Answer {
            status,
            content_type,
            body,
        }
    }

    /// An OperationOutcome with this status whose first issue's diagnostics contain `needle`.
    fn outcome(&self, status: StatusCode, needle: &str) -> &Answer {
        assert_eq!(self.status, status, "{:#}", self.body);
        assert!(
            self.content_type.starts_with("application/fhir+json"),
            "{}: {:#}",
            self.content_type,
            self.body
        );
        assert_eq!(
            self.body["resourceType"], "OperationOutcome",
            "{:#}",
            self.body
        );
        let d = self.body["issue"][0]["diagnostics"].as_str().unwrap_or("");
        assert!(d.contains(needle), "'{needle}' not in: {d}");
        self
    }

    fn expression(&self) -> &str {
        self.body["issue"][0]["expression"][0]
            .as_str()
            .unwrap_or("")
    }
}

/// The number of entries of a searchset.
fn entries(a: &Answer) -> usize {
    assert_eq!(a.status, StatusCode::OK, "{:#}", a.body);
    a.body["entry"].as_array().map_or(0, Vec::len)
}

fn batch_of_empty_entries(n: usize) -> String {
    let mut s = String::from(r#"{"resourceType":"Bundle","type":"batch","entry":["#);
    for i in 0..n {
        if i > 0 {
            s.push(',');
        }
        s.push_str("{}");
    }
    s.push_str("]}");
    s
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

const FHIR: &str = "application/fhir+json";

// ---- item 6: Bundle entries, memory, nesting ----

#[tokio::test]
async fn bundle_with_more_entries_than_the_limit_is_refused_with_413() {
    let s = start().await;
    // The default limit is 10,000: one more is refused, while parsing.
    let a = s.post("/", FHIR, batch_of_empty_entries(10_001)).await;
    a.outcome(StatusCode::PAYLOAD_TOO_LARGE, "more than 10000 entries");
    assert_eq!(a.expression(), "Bundle.entry");
    // The review's 3 MB of empty entries (3.8 GB of memory before): refused the same way.
    let a = s.post("/", FHIR, batch_of_empty_entries(1_000_000)).await;
    a.outcome(StatusCode::PAYLOAD_TOO_LARGE, "--max-bundle-entries");
    // At the limit the batch is processed (each empty entry fails on its own).
    let a = s.post("/", FHIR, batch_of_empty_entries(10_000)).await;
    assert_eq!(a.status, StatusCode::OK, "{:#}", a.body);
    assert_eq!(a.body["entry"].as_array().unwrap().len(), 10_000);
}

#[tokio::test]
async fn bundle_entry_limit_is_configurable() {
    let s = start_with(1 << 20, |p, _| p.max_bundle_entries = 2).await;
    let entry = json!({"resource": {"resourceType": "Patient"}, "request": {"method": "POST", "url": "Patient"}});
    let two = json!({"resourceType": "Bundle", "type": "transaction", "entry": [entry, entry]});
    let a = s.post("/", FHIR, two.to_string()).await;
    assert_eq!(a.status, StatusCode::OK, "{:#}", a.body);
    let three =
        json!({"resourceType": "Bundle", "type": "transaction", "entry": [entry, entry, entry]});
    s.post("/", FHIR, three.to_string())
        .await
        .outcome(StatusCode::PAYLOAD_TOO_LARGE, "more than 2 entries");
    // Only a Bundle's own entries count: nested arrays of any length are fine.
    let p = json!({"resourceType": "Patient", "name": [{"given": ["a", "b", "c", "d"]}]});
    assert_eq!(
        s.post("/Patient", FHIR, p.to_string()).await.status,
        StatusCode::CREATED
    );
}

#[tokio::test]
async fn batch_entries_retried_alone_keep_their_resources_intact() {
    // One entry fails in the store (If-Match on a resource that does not exist), so the batch's
    // single transaction fails and each write is retried alone from its retry copy.
    let s = start().await;
    let bundle = r#"{"resourceType":"Bundle","type":"batch","entry":[
        {"resource":{"resourceType":"Patient","id":"a","gender":"female"},"request":{"method":"PUT","url":"Patient/a","ifMatch":"W/\"9\""}},
        {"resource":{"resourceType":"Observation","id":"o1","status":"final","code":{"text":"x"},"valueQuantity":{"value":1.50,"unit":"mg"}},"request":{"method":"POST","url":"Observation"}},
        {"resource":{"resourceType":"Patient","id":"b","gender":"male"},"request":{"method":"PUT","url":"Patient/b"}}
    ]}"#;
    let a = s.post("/", FHIR, bundle).await;
    assert_eq!(a.status, StatusCode::OK, "{:#}", a.body);
    let statuses: Vec<&str> = a.body["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["response"]["status"].as_str().unwrap())
        .collect();
    assert!(statuses[0].starts_with("412"), "{statuses:?}");
    assert!(statuses[1].starts_with("201"), "{statuses:?}");
    assert!(statuses[2].starts_with("201"), "{statuses:?}");
    let r = s
        .client
        .get(s.url("/Observation/o1"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // The decimal keeps its text through the retry copy.
    assert!(r.contains(r#""value":1.50"#), "{r}");
    assert_eq!(s.get("/Patient/b").await.body["gender"], "male");
}

/// The status lines of a batch-response's entries.
fn statuses(a: &Answer) -> Vec<String> {
    assert_eq!(a.status, StatusCode::OK, "{:#}", a.body);
    a.body["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["response"]["status"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn a_batch_entry_naming_an_entry_that_failed_validation_fails_too() {
    let s = start().await;
    // Entry 0 is invalid (an empty gender); entry 1 names it. Entries 2 and 3: the same pair,
    // valid, so the reference resolves.
    let bundle = r#"{"resourceType":"Bundle","type":"batch","entry":[
        {"fullUrl":"urn:uuid:55555555-0000-0000-0000-000000000001","resource":{"resourceType":"Patient","gender":""},"request":{"method":"POST","url":"Patient"}},
        {"resource":{"resourceType":"Observation","status":"final","code":{"text":"x"},"subject":{"reference":"urn:uuid:55555555-0000-0000-0000-000000000001"}},"request":{"method":"POST","url":"Observation"}},
        {"fullUrl":"urn:uuid:55555555-0000-0000-0000-000000000002","resource":{"resourceType":"Patient","gender":"male"},"request":{"method":"POST","url":"Patient"}},
        {"resource":{"resourceType":"Observation","status":"final","code":{"text":"y"},"subject":{"reference":"urn:uuid:55555555-0000-0000-0000-000000000002"}},"request":{"method":"POST","url":"Observation"}}
    ]}"#;
    let a = s.post("/", FHIR, bundle).await;
    let st = statuses(&a);
    assert!(st[0].starts_with("400"), "{st:?}");
    assert_eq!(st[1], "424 Failed Dependency", "{:#}", a.body);
    assert!(st[2].starts_with("201"), "{st:?}");
    assert!(st[3].starts_with("201"), "{st:?}");
    let issue = &a.body["entry"][1]["response"]["outcome"]["issue"][0];
    let d = issue["diagnostics"].as_str().unwrap();
    assert!(d.contains("entry 0 failed (400 Bad Request)"), "{d}");
    assert!(
        d.contains("urn:uuid:55555555-0000-0000-0000-000000000001"),
        "{d}"
    );
    assert_eq!(
        issue["expression"][0],
        "Bundle.entry[1].resource.subject.reference"
    );
    // One Observation, and its subject exists.
    let obs = s.get("/Observation").await;
    assert_eq!(entries(&obs), 1, "{:#}", obs.body);
    let subject = obs.body["entry"][0]["resource"]["subject"]["reference"]
        .as_str()
        .unwrap()
        .to_string();
    let patient = a.body["entry"][2]["response"]["location"].as_str().unwrap();
    assert!(
        patient.starts_with(&format!("{subject}/_history/")),
        "{subject} {patient}"
    );
    assert_eq!(s.get(&format!("/{subject}")).await.status, StatusCode::OK);
    assert_eq!(entries(&s.get("/Patient").await), 1);
}

#[tokio::test]
async fn a_batch_entry_naming_an_entry_that_failed_in_the_store_fails_too() {
    let s = start().await;
    // Entry 0 fails in the store (If-Match on a resource that does not exist: 412), so the
    // batch's single transaction fails and the entries are written one by one; entry 1 names
    // entry 0 and fails, entry 3 names entry 2 (written after it) and is written. Entry 4 names
    // entry 1 (failed because of entry 0).
    let bundle = r#"{"resourceType":"Bundle","type":"batch","entry":[
        {"fullUrl":"urn:uuid:66666666-0000-0000-0000-000000000001","resource":{"resourceType":"Patient","id":"a"},"request":{"method":"PUT","url":"Patient/a","ifMatch":"W/\"9\""}},
        {"fullUrl":"urn:uuid:66666666-0000-0000-0000-000000000003","resource":{"resourceType":"Observation","status":"final","code":{"text":"x"},"subject":{"reference":"urn:uuid:66666666-0000-0000-0000-000000000001"}},"request":{"method":"POST","url":"Observation"}},
        {"fullUrl":"urn:uuid:66666666-0000-0000-0000-000000000002","resource":{"resourceType":"Patient","id":"b"},"request":{"method":"PUT","url":"Patient/b"}},
        {"resource":{"resourceType":"Observation","status":"final","code":{"text":"y"},"subject":{"reference":"urn:uuid:66666666-0000-0000-0000-000000000002"}},"request":{"method":"POST","url":"Observation"}},
        {"resource":{"resourceType":"Provenance","target":[{"reference":"urn:uuid:66666666-0000-0000-0000-000000000003"}],"recorded":"2020-01-01T00:00:00Z","agent":[{"who":{"display":"x"}}]},"request":{"method":"POST","url":"Provenance"}}
    ]}"#;
    let a = s.post("/", FHIR, bundle).await;
    let st = statuses(&a);
    assert!(st[0].starts_with("412"), "{st:?}");
    assert_eq!(st[1], "424 Failed Dependency", "{:#}", a.body);
    assert!(st[2].starts_with("201"), "{st:?}");
    assert!(st[3].starts_with("201"), "{st:?}");
    assert_eq!(st[4], "424 Failed Dependency", "{:#}", a.body);
    let d = a.body["entry"][1]["response"]["outcome"]["issue"][0]["diagnostics"]
        .as_str()
        .unwrap();
    assert!(
        d.contains("entry 0 failed (412 Precondition Failed)"),
        "{d}"
    );
    let d = a.body["entry"][4]["response"]["outcome"]["issue"][0]["diagnostics"]
        .as_str()
        .unwrap();
    assert!(d.contains("entry 1 failed (424 Failed Dependency)"), "{d}");
    let obs = s.get("/Observation").await;
    assert_eq!(entries(&obs), 1, "{:#}", obs.body);
    assert_eq!(
        obs.body["entry"][0]["resource"]["subject"]["reference"],
        "Patient/b"
    );
    assert_eq!(s.get("/Patient/a").await.status, StatusCode::NOT_FOUND);
    assert_eq!(entries(&s.get("/Provenance").await), 0);
}

#[tokio::test]
async fn if_match_compares_the_version_text_exactly() {
    let s = start().await;
    let put = |etag: Option<&'static str>| {
        let mut r = s
            .client
            .put(s.url("/Patient/p"))
            .header("content-type", FHIR)
            .body(r#"{"resourceType":"Patient","id":"p"}"#);
        if let Some(e) = etag {
            r = r.header("if-match", e);
        }
        async move { Answer::of(r.send().await.unwrap()).await }
    };
    assert_eq!(put(None).await.status, StatusCode::CREATED);
    for bad in ["W/\"01\"", "W/\"+1\"", "1", "W/\"\"", "garbage"] {
        put(Some(bad))
            .await
            .outcome(StatusCode::BAD_REQUEST, "is not a version ETag");
    }
    let delete = |etag: &'static str| {
        let r = s
            .client
            .delete(s.url("/Patient/p"))
            .header("if-match", etag);
        async move { Answer::of(r.send().await.unwrap()).await }
    };
    delete("1")
        .await
        .outcome(StatusCode::BAD_REQUEST, "is not a version ETag");
    delete("W/\"01\"")
        .await
        .outcome(StatusCode::BAD_REQUEST, "is not a version ETag");
    // The strong form names the version too; a well-formed other version is a 412.
    assert_eq!(put(Some("\"1\"")).await.status, StatusCode::OK);
    assert_eq!(
        put(Some("W/\"1\"")).await.status,
        StatusCode::PRECONDITION_FAILED
    );
    assert_eq!(delete("W/\"2\"").await.status, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn deep_nesting_is_a_400_not_a_stack_overflow() {
    let s = start().await;
    for depth in [200, 100_000] {
        let body = format!(
            r#"{{"resourceType":"Patient","extension":{}{}}}"#,
            "[".repeat(depth),
            "]".repeat(depth)
        );
        s.post("/Patient", FHIR, body)
            .await
            .outcome(StatusCode::BAD_REQUEST, "recursion limit exceeded");
    }
    // Still serving.
    assert_eq!(s.get("/metadata").await.status, StatusCode::OK);
}

#[tokio::test]
async fn duplicate_object_keys_are_refused() {
    let s = start().await;
    s.post(
        "/Patient",
        FHIR,
        r#"{"resourceType":"Patient","gender":"male","gender":"female"}"#,
    )
    .await
    .outcome(StatusCode::BAD_REQUEST, "duplicate key \"gender\"");
    // Deep inside a Bundle entry too.
    let bundle = r#"{"resourceType":"Bundle","type":"batch","entry":[{"resource":{"resourceType":"Patient","name":[{"family":"a","family":"b"}]},"request":{"method":"POST","url":"Patient"}}]}"#;
    s.post("/", FHIR, bundle)
        .await
        .outcome(StatusCode::BAD_REQUEST, "duplicate key \"family\"");
    // Nothing was stored.
    let a = s.get("/Patient").await;
    assert_eq!(entries(&a), 0, "{:#}", a.body);
}

// ---- item 16: decimals, paths, encodings ----

#[tokio::test]
async fn decimal_beyond_f64_range_is_refused_naming_the_element() {
    let s = start().await;
    for value in ["1e400", "-1e400", "1E+309"] {
        let body = format!(
            r#"{{"resourceType":"Observation","status":"final","code":{{"text":"x"}},"valueQuantity":{{"value":{value}}}}}"#
        );
        let a = s.post("/Observation", FHIR, body).await;
        a.outcome(StatusCode::BAD_REQUEST, "decimal");
        assert_eq!(
            a.expression(),
            "Observation.valueQuantity.value",
            "{:#}",
            a.body
        );
    }
    // A large but finite decimal is stored and found by a search on its value.
    let body = r#"{"resourceType":"Observation","status":"final","code":{"text":"x"},"valueQuantity":{"value":1e300}}"#;
    let a = s.post("/Observation", FHIR, body).await;
    assert_eq!(a.status, StatusCode::CREATED, "{:#}", a.body);
    let a = s.get("/Observation?value-quantity=ge1e299").await;
    assert_eq!(entries(&a), 1, "{:#}", a.body);
}

#[tokio::test]
async fn invalid_utf8_in_the_path_gives_an_operation_outcome() {
    let s = start().await;
    for path in ["/Patient/%FF", "/Patient/%C3%28/_history", "/%FF%FE/x"] {
        let a = s.get(path).await;
        assert!(a.status.is_client_error(), "{path}: {a:?}");
        a.outcome(a.status, "");
    }
}

#[tokio::test]
async fn gzip_request_bodies_are_decoded() {
    let s = start().await;
    let body = json!({"resourceType": "Patient", "gender": "female"}).to_string();
    let r = s
        .client
        .post(s.url("/Patient"))
        .header("content-type", FHIR)
        .header("content-encoding", "gzip")
        .body(gzip(body.as_bytes()))
        .send()
        .await
        .unwrap();
    let a = Answer::of(r).await;
    assert_eq!(a.status, StatusCode::CREATED, "{:#}", a.body);
    assert_eq!(a.body["gender"], "female");
    // A corrupt gzip stream is a 400.
    let r = s
        .client
        .post(s.url("/Patient"))
        .header("content-type", FHIR)
        .header("content-encoding", "gzip")
        .body(b"\x1f\x8b\x08\x00garbage".to_vec())
        .send()
        .await
        .unwrap();
    Answer::of(r).await.outcome(StatusCode::BAD_REQUEST, "");
}

#[tokio::test]
async fn gzip_bomb_is_cut_at_the_body_limit() {
    // 64 MB of JSON whitespace compresses to ~64 KB; the decoded body limit is 1 MB.
    let s = start_with(1 << 20, |_, _| {}).await;
    let mut json = vec![b' '; 64 << 20];
    json.extend_from_slice(br#"{"resourceType":"Patient"}"#);
    let bomb = gzip(&json);
    drop(json);
    assert!(bomb.len() < 1 << 20);
    let r = s
        .client
        .post(s.url("/Patient"))
        .header("content-type", FHIR)
        .header("content-encoding", "gzip")
        .body(bomb)
        .send()
        .await
        .unwrap();
    Answer::of(r)
        .await
        .outcome(StatusCode::PAYLOAD_TOO_LARGE, "--max-body-bytes");
}

#[tokio::test]
async fn unsupported_content_encoding_is_a_415() {
    let s = start().await;
    for encoding in ["br", "deflate", "gzip, gzip", "x-unknown"] {
        let r = s
            .client
            .post(s.url("/Patient"))
            .header("content-type", FHIR)
            .header("content-encoding", encoding)
            .body(r#"{"resourceType":"Patient"}"#)
            .send()
            .await
            .unwrap();
        Answer::of(r)
            .await
            .outcome(StatusCode::UNSUPPORTED_MEDIA_TYPE, "Content-Encoding");
    }
}

// ---- item 11: CSRF (Content-Type) and DNS rebinding (Host) ----

#[tokio::test]
async fn writes_refuse_form_and_other_non_fhir_content_types() {
    let s = start().await;
    let patient = r#"{"resourceType":"Patient","id":"p1"}"#;
    // The content types a cross-origin page can send without a preflight.
    for ct in [
        "application/x-www-form-urlencoded",
        "text/plain",
        "multipart/form-data; boundary=x",
    ] {
        s.post("/Patient", ct, patient)
            .await
            .outcome(StatusCode::UNSUPPORTED_MEDIA_TYPE, "Content-Type");
        s.post("/", ct, r#"{"resourceType":"Bundle","type":"batch"}"#)
            .await
            .outcome(StatusCode::UNSUPPORTED_MEDIA_TYPE, "Content-Type");
        let r = s
            .client
            .put(s.url("/Patient/p1"))
            .header("content-type", ct)
            .body(patient)
            .send()
            .await
            .unwrap();
        Answer::of(r)
            .await
            .outcome(StatusCode::UNSUPPORTED_MEDIA_TYPE, "Content-Type");
    }
    // A body without a Content-Type.
    let r = s
        .client
        .post(s.url("/Patient"))
        .body(patient)
        .send()
        .await
        .unwrap();
    Answer::of(r)
        .await
        .outcome(StatusCode::UNSUPPORTED_MEDIA_TYPE, "no Content-Type");
    // Nothing was written.
    assert_eq!(s.get("/Patient/p1").await.status, StatusCode::NOT_FOUND);
    // FHIR JSON with parameters, plain JSON: accepted.
    for ct in [
        "application/fhir+json; charset=utf-8",
        "application/json",
        "Application/FHIR+JSON;fhirVersion=4.0",
    ] {
        let a = s
            .post("/Patient", ct, r#"{"resourceType":"Patient"}"#)
            .await;
        assert_eq!(a.status, StatusCode::CREATED, "{ct}: {:#}", a.body);
    }
    // A form where FHIR defines one: POST _search.
    let a = s
        .post(
            "/Patient/_search",
            "application/x-www-form-urlencoded",
            "_count=1",
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{:#}", a.body);
    assert_eq!(a.body["resourceType"], "Bundle");
}

async fn get_with_host(s: &TestServer, host: &str) -> Answer {
    let r = s
        .client
        .get(s.url("/metadata"))
        .header("host", host)
        .send()
        .await
        .unwrap();
    Answer::of(r).await
}

#[tokio::test]
async fn auth_none_refuses_foreign_host_headers() {
    let s = start().await;
    let port = s.port;
    for host in [
        "evil.example".to_string(),
        format!("evil.example:{port}"),
        format!("127.0.0.1:{}", port.wrapping_add(1)),
        format!("127.0.0.1.evil.example:{port}"),
    ] {
        get_with_host(&s, &host)
            .await
            .outcome(StatusCode::MISDIRECTED_REQUEST, "--allowed-hosts");
    }
    // A rebinding page's write is refused before it is read.
    let r = s
        .client
        .post(s.url("/Patient"))
        .header("host", format!("evil.example:{port}"))
        .header("content-type", FHIR)
        .body(r#"{"resourceType":"Patient"}"#)
        .send()
        .await
        .unwrap();
    Answer::of(r)
        .await
        .outcome(StatusCode::MISDIRECTED_REQUEST, "Host");
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("LOCALHOST:{port}"),
        format!("[::1]:{port}"),
    ] {
        let a = get_with_host(&s, &host).await;
        assert_eq!(a.status, StatusCode::OK, "{host}: {:#}", a.body);
    }
}

#[tokio::test]
async fn allowed_hosts_admit_a_proxy_name() {
    let s = start_with(1 << 20, |p, base| {
        p.allow_hosts(
            base,
            &["fhir.example.org".into(), "other.example:8443".into()],
        )
        .unwrap()
    })
    .await;
    assert_eq!(
        get_with_host(&s, "fhir.example.org").await.status,
        StatusCode::OK
    );
    assert_eq!(
        get_with_host(&s, "fhir.example.org:443").await.status,
        StatusCode::OK
    );
    assert_eq!(
        get_with_host(&s, "other.example:8443").await.status,
        StatusCode::OK
    );
    get_with_host(&s, "other.example:8444")
        .await
        .outcome(StatusCode::MISDIRECTED_REQUEST, "Host");
    assert_eq!(
        get_with_host(&s, &format!("127.0.0.1:{}", s.port))
            .await
            .status,
        StatusCode::OK
    );
    // `*` turns the check off.
    let s = start_with(1 << 20, |p, base| {
        p.allow_hosts(base, &["*".into()]).unwrap()
    })
    .await;
    assert_eq!(
        get_with_host(&s, "anything.example").await.status,
        StatusCode::OK
    );
}

#[test]
fn serve_flags_set_the_request_policy() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: server::ServeConfig,
    }
    let c = Cli::try_parse_from([
        "fhirhose",
        "--max-bundle-entries",
        "7",
        "--allowed-hosts",
        "fhir.example.org,proxy:8443",
    ])
    .unwrap()
    .serve;
    c.validate().unwrap();
    let p = c.request_policy(&c.base_url()).unwrap();
    assert_eq!(p.max_bundle_entries, 7);
    let hosts = p.allowed_hosts.unwrap();
    for h in ["fhir.example.org", "proxy", "localhost", "127.0.0.1"] {
        assert!(hosts.iter().any(|x| x.host == h), "{h}: {hosts:?}");
    }
    // The defaults: 10,000 entries, the Host check on with --auth none, off with smart.
    let c = Cli::try_parse_from(["fhirhose"]).unwrap().serve;
    let p = c.request_policy(&c.base_url()).unwrap();
    assert_eq!(p.max_bundle_entries, 10_000);
    assert!(p.allowed_hosts.is_some());
    let c = Cli::try_parse_from(["fhirhose", "--auth", "smart"])
        .unwrap()
        .serve;
    assert!(
        c.request_policy(&c.base_url())
            .unwrap()
            .allowed_hosts
            .is_none()
    );
    // Bad values fail at start-up.
    for bad in [
        vec!["fhirhose", "--allowed-hosts", "a b"],
        vec!["fhirhose", "--max-bundle-entries", "0"],
    ] {
        let c = Cli::try_parse_from(bad).unwrap().serve;
        assert!(c.validate().is_err());
    }
}

// ---- item 14: no server paths in error answers ----

#[tokio::test]
async fn error_answers_show_no_server_paths() {
    let s = start().await;
    let dir = s.dir.path().display().to_string();
    // The export destination cannot be written: a file where the container folder belongs.
    std::fs::create_dir_all(s.dir.path().join("storage")).unwrap();
    std::fs::write(s.dir.path().join("storage/exports"), b"not a folder").unwrap();
    let a = s
        .post("/Patient", FHIR, r#"{"resourceType":"Patient"}"#)
        .await;
    assert_eq!(a.status, StatusCode::CREATED);
    let r = s
        .client
        .get(s.url("/$export"))
        .header("accept", FHIR)
        .header("prefer", "respond-async")
        .send()
        .await
        .unwrap();
    let status = r.status();
    let location = r
        .headers()
        .get("content-location")
        .map(|v| v.to_str().unwrap().to_string());
    let text = r.text().await.unwrap();
    assert!(!text.contains(&dir), "{text}");
    if status == StatusCode::ACCEPTED {
        let url = location.unwrap();
        for _ in 0..600 {
            let r = s.client.get(&url).send().await.unwrap();
            let st = r.status();
            let text = r.text().await.unwrap();
            assert!(!text.contains(&dir), "{st}: {text}");
            if st != StatusCode::ACCEPTED {
                assert!(st.is_server_error() || st.is_client_error(), "{st}: {text}");
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
    // A request path naming the data directory is not echoed with it either.
    let a = s.get(&format!("{dir}/storage/exports/x")).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert!(!a.body.to_string().contains(&dir), "{:#}", a.body);
}
