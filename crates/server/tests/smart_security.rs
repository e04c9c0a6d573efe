//! Regression tests for the authorization holes of issue 16, over real HTTP against the real
//! router with `--auth smart`: Bundle entries authorized by the type in their URL, `$export`
//! authorized on the parsed request (GET and POST alike), status/download/cancel checking the
//! caller's current scopes, token endpoint bounds and error texts, log hygiene.
//! (Test keys: crates/auth/tests/data, see PROVENANCE.md there.)

mod common;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use common::SmartServer as Server;

/// A server whose body limit is `max_body` (the token endpoint has its own, smaller one).
async fn start_with(max_body: usize) -> Server {
    common::start_smart(
        "rsa-a.pem",
        &[
            ("admin", "system/*.cruds"),
            ("patients", "system/Patient.cruds"),
            (
                "exporter",
                "system/Patient.rs system/Observation.rs system/Provenance.rs",
            ),
        ],
        max_body,
    )
    .await
}

async fn start() -> Server {
    start_with(1 << 20).await
}

fn assert_outcome(st: StatusCode, want: StatusCode, body: &str) {
    assert_eq!(st, want, "{body}");
    assert!(body.contains("\"OperationOutcome\""), "{body}");
}

fn observation(id: &str) -> Value {
    json!({"resourceType": "Observation", "id": id, "status": "final",
        "code": {"text": "secret"}, "subject": {"reference": "Patient/p1"}})
}

fn bundle(kind: &str, entries: Value) -> Value {
    json!({"resourceType": "Bundle", "type": kind, "entry": entries})
}

/// Issue 16 item 1: a Patient-only client used decoy `resource`s of type Patient to read a Claim
/// and delete an Observation. Entries are now authorized by the interaction and the type of
/// their request URL.
#[tokio::test]
async fn bundle_entries_are_authorized_by_the_type_in_their_url() {
    let s = start().await;
    let admin = s.token("admin", "system/*.cruds").await;
    s.put(&admin, json!({"resourceType": "Patient", "id": "p1"}))
        .await;
    s.put(&admin, observation("o1")).await;
    let patients = s.token("patients", "system/Patient.cruds").await;
    let decoy = json!({"resourceType": "Patient", "id": "p1"});

    for kind in ["batch", "transaction"] {
        // Read of another type behind a decoy Patient.
        let b = bundle(
            kind,
            json!([{"resource": decoy, "request": {"method": "GET", "url": "Observation/o1"}}]),
        );
        let (st, _, body) = s.send(Method::POST, "/", Some(&patients), Some(b)).await;
        assert_outcome(st, StatusCode::FORBIDDEN, &body);
        assert!(!body.contains("secret"), "{body}");
        // Delete of another type behind a decoy Patient.
        let b = bundle(
            kind,
            json!([{"resource": decoy, "request": {"method": "DELETE", "url": "Observation/o1"}}]),
        );
        let (st, _, body) = s.send(Method::POST, "/", Some(&patients), Some(b)).await;
        assert_outcome(st, StatusCode::FORBIDDEN, &body);
        // Searches, conditional URLs, history and PATCH are typed by their URL too.
        for (method, url) in [
            ("GET", "Observation?code=x"),
            ("GET", "Patient?_has:Observation:subject:code=x"),
            ("GET", "Patient?_revinclude=Observation:subject"),
            ("GET", "Observation/o1/_history"),
            ("GET", "_history"),
            ("DELETE", "Observation?code=x"),
            ("PATCH", "Observation/o1"),
            ("PUT", "Observation?code=x"),
            ("POST", "Observation/_search"),
        ] {
            let b = bundle(
                kind,
                json!([{"resource": decoy, "request": {"method": method, "url": url}}]),
            );
            let (st, _, body) = s.send(Method::POST, "/", Some(&patients), Some(b)).await;
            assert_outcome(st, StatusCode::FORBIDDEN, &body);
        }
    }
    // Nothing was deleted.
    let (st, _, body) = s
        .send(Method::GET, "/Observation/o1", Some(&admin), None)
        .await;
    assert_eq!(st, StatusCode::OK, "{body}");

    // A resource whose type differs from its URL's is refused, even where the type is allowed.
    let b = bundle(
        "transaction",
        json!([{"resource": {"resourceType": "Observation"},
                "request": {"method": "DELETE", "url": "Patient/p1"}}]),
    );
    let (st, _, body) = s.send(Method::POST, "/", Some(&admin), Some(b)).await;
    assert_outcome(st, StatusCode::BAD_REQUEST, &body);
    let (st, _, _) = s.send(Method::GET, "/Patient/p1", Some(&admin), None).await;
    assert_eq!(st, StatusCode::OK);

    // What the scopes allow still works.
    let b = bundle(
        "batch",
        json!([{"request": {"method": "GET", "url": "Patient/p1"}}]),
    );
    let (st, _, body) = s.send(Method::POST, "/", Some(&patients), Some(b)).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert!(body.contains("200 OK"), "{body}");
}

/// Issue 16 item 16: a transaction changing the same resource twice SHALL fail, writing nothing.
#[tokio::test]
async fn transaction_changing_a_resource_twice_fails() {
    let s = start().await;
    let admin = s.token("admin", "system/*.cruds").await;
    s.put(&admin, json!({"resourceType": "Patient", "id": "keep"}))
        .await;
    let twice = [
        json!([
            {"resource": {"resourceType": "Patient", "id": "d1"}, "request": {"method": "PUT", "url": "Patient/d1"}},
            {"resource": {"resourceType": "Patient", "id": "d1", "gender": "male"}, "request": {"method": "PUT", "url": "Patient/d1"}}
        ]),
        json!([
            {"resource": {"resourceType": "Patient", "id": "d1"}, "request": {"method": "PUT", "url": "Patient/d1"}},
            {"request": {"method": "DELETE", "url": "Patient/keep"}},
            {"request": {"method": "DELETE", "url": "/Patient/keep"}}
        ]),
        json!([
            {"resource": {"resourceType": "Patient", "id": "d1"}, "request": {"method": "POST", "url": "Patient"}},
            {"resource": {"resourceType": "Patient", "id": "d1"}, "request": {"method": "PUT", "url": "Patient/d1"}}
        ]),
    ];
    for entries in twice {
        let (st, _, body) = s
            .send(
                Method::POST,
                "/",
                Some(&admin),
                Some(bundle("transaction", entries)),
            )
            .await;
        assert_outcome(st, StatusCode::BAD_REQUEST, &body);
        assert!(body.contains("both change"), "{body}");
    }
    let (st, _, _) = s.send(Method::GET, "/Patient/d1", Some(&admin), None).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (st, _, _) = s
        .send(Method::GET, "/Patient/keep", Some(&admin), None)
        .await;
    assert_eq!(st, StatusCode::OK);
}

/// The peak resident set of this process (the server runs in it), in KiB.
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

async fn token_request(s: &Server, body: String) -> (StatusCode, Value) {
    let res = reqwest::Client::new()
        .post(&s.token_url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .unwrap();
    let st = res.status();
    let text = res
        .text()
        .await
        .unwrap_or_else(|e| format!("unreadable: {e}"));
    (
        st,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn token_form(assertion: &str, scope: &str) -> String {
    format!(
        "grant_type=client_credentials&client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer&client_assertion={assertion}&scope={scope}"
    )
}

/// Issue 16 items 5, 17, 18: the token endpoint bounds its body and the assertion before
/// decoding them, answers an unknown client and a bad signature alike, and an empty scope with
/// `invalid_scope`.
#[tokio::test]
async fn token_endpoint_bounds_input_and_hides_client_ids() {
    // A server body limit far above the token endpoint's own.
    let s = start_with(64 << 20).await;
    let huge = token_form(&"a".repeat(28 << 20), "system%2FPatient.rs");
    let before = peak_rss_kib();
    let (st, json) = token_request(&s, huge).await;
    // (The server answers before reading the rest, so the client may not get to read the body.)
    assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE, "{json}");
    // The 28 MB body lives once in the client; the server did not buffer or decode it.
    let grown_mib = peak_rss_kib().saturating_sub(before) / 1024;
    assert!(grown_mib < 100, "peak RSS grew by {grown_mib} MiB");
    // Just over the limit: the answer is an OAuth error.
    let over = token_form(&"a".repeat(70 * 1024), "system%2FPatient.rs");
    let (st, json) = token_request(&s, over).await;
    assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE, "{json}");
    assert_eq!(json["error"], "invalid_request", "{json}");

    // An assertion over 16 KiB inside a small body: 400 before it is decoded.
    let (st, json) =
        token_request(&s, token_form(&"a".repeat(20_000), "system%2FPatient.rs")).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{json}");
    assert_eq!(json["error"], "invalid_request", "{json}");

    // An empty scope.
    let assertion = s.key.sign("patients", &s.token_url, now()).unwrap();
    let (st, json) = token_request(&s, token_form(&assertion, "")).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{json}");
    assert_eq!(json["error"], "invalid_scope", "{json}");

    // An unknown client and a known one with a wrong key get the same answer.
    let unknown = s.key.sign("nobody", &s.token_url, now()).unwrap();
    let (st, unknown) = token_request(&s, token_form(&unknown, "system%2FPatient.rs")).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let other_key = test_support::smart::test_key("rsa-b.pem");
    let forged = other_key.sign("patients", &s.token_url, now()).unwrap();
    let (st, forged) = token_request(&s, token_form(&forged, "system%2FPatient.rs")).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    assert_eq!(unknown, forged);
    assert!(!forged.to_string().contains("patients"), "{forged}");
}

/// Every refusal at the token endpoint is an OAuth error JSON (RFC 6749 §5.2) with its status,
/// also those made before the token handler runs: a body without or with another content type,
/// another method.
#[tokio::test]
async fn token_endpoint_refusals_before_its_handler_are_oauth_errors() {
    let s = start().await;
    let assertion = s.key.sign("patients", &s.token_url, now()).unwrap();
    let form = token_form(&assertion, "system%2FPatient.rs");
    let client = reqwest::Client::new();
    let cases = [
        (
            client.post(&s.token_url).body(form.clone()),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            client
                .post(&s.token_url)
                .header("content-type", "text/plain")
                .body(form.clone()),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (client.get(&s.token_url), StatusCode::METHOD_NOT_ALLOWED),
    ];
    for (request, want) in cases {
        let res = request.send().await.unwrap();
        let st = res.status();
        let content_type = res.headers()["content-type"].to_str().unwrap().to_owned();
        let cache = res.headers().get("cache-control").cloned();
        let text = res.text().await.unwrap();
        assert_eq!(st, want, "{text}");
        assert_eq!(content_type, "application/json", "{text}");
        assert_eq!(cache.unwrap(), "no-store");
        let json: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(json["error"], "invalid_request", "{text}");
        assert!(json["error_description"].is_string(), "{text}");
    }
}

/// SMART: an assertion's `jti` is refused for the assertion's whole lifetime, also across a
/// restart. On SQLite the accepted assertions are `exports.db`'s, not the process's memory: a
/// second process on the same data directory (the server restarted) refuses an assertion the
/// first one accepted.
#[tokio::test(flavor = "multi_thread")]
async fn an_assertion_accepted_before_a_restart_is_refused_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let key = test_support::smart::test_key("rsa-a.pem");
    let mut listener = Some(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap());
    let base = format!(
        "http://{}",
        listener.as_ref().unwrap().local_addr().unwrap()
    );
    let token_url = test_support::smart::token_url(&base);
    let assertion = key.sign("patients", &token_url, now()).unwrap();
    let form = token_form(&assertion, "system%2FPatient.rs");
    for (start, want) in [
        ("first", StatusCode::OK),
        ("restarted", StatusCode::UNAUTHORIZED),
    ] {
        let listener = match listener.take() {
            Some(l) => l,
            // The same base URL (the assertion's audience) on another port.
            None => tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        };
        let url = format!("http://{}/auth/token", listener.local_addr().unwrap());
        let db = dir.path().join("fhirhose.db");
        let store: std::sync::Arc<dyn store::Store> = common::blocking(move || {
            std::sync::Arc::new(store::SqliteStore::open(&db, Default::default()).unwrap())
        })
        .await;
        let auth = test_support::smart::auth(&base, &key, &[("patients", "system/Patient.rs")]);
        let on = store.clone();
        let auth = common::blocking(move || server::auth_on_store(auth, &*on).unwrap()).await;
        let state = common::app_state(store, &base, auth, 1 << 20, dir.path()).await;
        tokio::spawn(async move { axum::serve(listener, server::router(state)).await });
        let res = reqwest::Client::new()
            .post(&url)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form.clone())
            .send()
            .await
            .unwrap();
        let st = res.status();
        let text = res.text().await.unwrap();
        assert_eq!(st, want, "{start}: {text}");
        if want == StatusCode::UNAUTHORIZED {
            assert!(text.contains("replay"), "{text}");
        }
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn parameters(params: Value) -> Value {
    json!({"resourceType": "Parameters", "parameter": params})
}

/// Issue 16 items 2, 4, 15: `$export` is authorized on the parsed request, whatever the value
/// type a POST gives `_type` in; `includeAssociatedData` needs Provenance; reserved containers
/// are refused.
#[tokio::test]
async fn export_kickoff_is_authorized_on_the_parsed_request() {
    let s = start().await;
    let admin = s.token("admin", "system/*.cruds").await;
    s.put(&admin, json!({"resourceType": "Patient", "id": "p1"}))
        .await;
    s.put(&admin, observation("o1")).await;
    let patient_only = s.token("exporter", "system/Patient.rs").await;

    // `_type=Observation` in every form: refused (403), or 400 for a value type `_type` has not.
    for (method, path, body, want) in [
        (
            Method::GET,
            "/$export?_type=Observation",
            None,
            StatusCode::FORBIDDEN,
        ),
        (
            Method::GET,
            "/$export?_type=Patient,Observation",
            None,
            StatusCode::FORBIDDEN,
        ),
        (
            Method::POST,
            "/$export",
            Some(parameters(
                json!([{"name": "_type", "valueString": "Observation"}]),
            )),
            StatusCode::FORBIDDEN,
        ),
        (
            Method::POST,
            "/$export",
            Some(parameters(
                json!([{"name": "_type", "valueCode": "Observation"}]),
            )),
            StatusCode::FORBIDDEN,
        ),
        (
            Method::POST,
            "/$export",
            Some(parameters(json!([{"name": "_type", "valueInteger": 7}]))),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            "/$export",
            Some(parameters(
                json!([{"name": "_type", "valueUri": "Observation"}]),
            )),
            StatusCode::BAD_REQUEST,
        ),
        // includeAssociatedData exports Provenance.
        (
            Method::GET,
            "/$export?_type=Patient&includeAssociatedData=LatestProvenanceResources",
            None,
            StatusCode::FORBIDDEN,
        ),
        (
            Method::POST,
            "/$export",
            Some(parameters(json!([
                {"name": "_type", "valueCode": "Patient"},
                {"name": "includeAssociatedData", "valueCode": "RelevantProvenanceResources"}
            ]))),
            StatusCode::FORBIDDEN,
        ),
    ] {
        let (st, _, text) = s
            .send(method.clone(), path, Some(&patient_only), body)
            .await;
        assert_outcome(st, want, &text);
    }

    // The configuration container is not an export destination, even for an all-scopes client.
    let (st, _, text) = s
        .send(
            Method::GET,
            "/$export?_container=anonymization",
            Some(&admin),
            None,
        )
        .await;
    assert_outcome(st, StatusCode::BAD_REQUEST, &text);

    // POST without `_type`: the export covers exactly what the scopes allow.
    let (st, h, text) = s
        .send(
            Method::POST,
            "/$export",
            Some(&patient_only),
            Some(parameters(
                json!([{"name": "_outputFormat", "valueString": "application/fhir+ndjson"}]),
            )),
        )
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{text}");
    let status_url = h["content-location"].to_str().unwrap().to_owned();
    let manifest = s.manifest(&status_url, &patient_only).await;
    let types: Vec<&str> = manifest["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, vec!["Patient"], "{manifest}");

    // With Provenance granted, includeAssociatedData is accepted.
    let with_provenance = s
        .token("exporter", "system/Patient.rs system/Provenance.rs")
        .await;
    let (st, _, text) = s
        .send(
            Method::GET,
            "/$export?_type=Patient&includeAssociatedData=LatestProvenanceResources",
            Some(&with_provenance),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{text}");
}

/// Kicks off `path` with `token`; returns the status URL.
async fn kickoff_ok(s: &Server, path: &str, token: &str) -> String {
    let (st, h, text) = s.send(Method::GET, path, Some(token), None).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{path}: {text}");
    h["content-location"].to_str().unwrap().to_owned()
}

/// Issue 16 item 3: status, downloads and cancel are protected like the kick-off. The caller's
/// current token must carry every permission the export needed (read+search on each type it may
/// contain, Provenance for `includeAssociatedData`, Patient at Patient level, Group read at Group
/// level); the same client with fewer scopes, or none of them, gets 403 and the job stays.
#[tokio::test]
async fn export_status_files_and_cancel_need_the_kickoff_scopes() {
    let s = start().await;
    let admin = s.token("admin", "system/*.cruds").await;
    s.put(&admin, json!({"resourceType": "Patient", "id": "p1"}))
        .await;
    s.put(&admin, observation("o1")).await;
    s.put(
        &admin,
        json!({"resourceType": "Group", "id": "g1", "type": "person", "actual": true,
            "member": [{"entity": {"reference": "Patient/p1"}}]}),
    )
    .await;
    let full = s
        .token("exporter", "system/Patient.rs system/Observation.rs")
        .await;
    let fewer = s.token("exporter", "system/Patient.rs").await;
    let read_only = s
        .token("exporter", "system/Patient.r system/Observation.r")
        .await;
    let none_needed = s.token("exporter", "system/Provenance.rs").await;

    // Without `_type`: the export covers what `full` allowed (Patient and Observation).
    let status_url = kickoff_ok(&s, "/$export", &full).await;
    let manifest = s.manifest(&status_url, &full).await;
    let file_url = manifest["output"][0]["url"].as_str().unwrap().to_owned();
    for token in [&fewer, &read_only, &none_needed] {
        let (st, _, text) = s.send(Method::GET, &status_url, Some(token), None).await;
        assert_outcome(st, StatusCode::FORBIDDEN, &text);
        let (st, _, text) = s.send(Method::GET, &file_url, Some(token), None).await;
        assert_outcome(st, StatusCode::FORBIDDEN, &text);
        let (st, _, text) = s.send(Method::DELETE, &status_url, Some(token), None).await;
        assert_outcome(st, StatusCode::FORBIDDEN, &text);
    }
    // The refused cancels changed nothing; the full token still polls, downloads and cancels.
    let (st, _, text) = s.send(Method::GET, &status_url, Some(&full), None).await;
    assert_eq!(st, StatusCode::OK, "{text}");
    let (st, _, ndjson) = s.send(Method::GET, &file_url, Some(&full), None).await;
    assert_eq!(st, StatusCode::OK);
    assert!(!ndjson.trim().is_empty());
    let (st, _, text) = s.send(Method::DELETE, &status_url, Some(&full), None).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{text}");

    // An explicit `_type` needs exactly its types: Patient alone suffices for a Patient export.
    let status_url = kickoff_ok(&s, "/$export?_type=Patient", &full).await;
    s.manifest(&status_url, &fewer).await;
    let (st, _, text) = s
        .send(Method::GET, &status_url, Some(&none_needed), None)
        .await;
    assert_outcome(st, StatusCode::FORBIDDEN, &text);

    // includeAssociatedData needs Provenance on every later request too.
    let with_provenance = s
        .token("exporter", "system/Patient.rs system/Provenance.rs")
        .await;
    let status_url = kickoff_ok(
        &s,
        "/$export?_type=Patient&includeAssociatedData=LatestProvenanceResources",
        &with_provenance,
    )
    .await;
    s.manifest(&status_url, &with_provenance).await;
    let (st, _, text) = s.send(Method::GET, &status_url, Some(&fewer), None).await;
    assert_outcome(st, StatusCode::FORBIDDEN, &text);

    // Patient level needs Patient; Group level needs Group read as well.
    let status_url = kickoff_ok(&s, "/Patient/$export?_type=Observation", &full).await;
    s.manifest(&status_url, &full).await;
    let observations = s.token("exporter", "system/Observation.rs").await;
    let (st, _, text) = s
        .send(Method::GET, &status_url, Some(&observations), None)
        .await;
    assert_outcome(st, StatusCode::FORBIDDEN, &text);
    let group_admin = s
        .token(
            "admin",
            "system/Patient.rs system/Observation.rs system/Group.r",
        )
        .await;
    let no_group = s
        .token("admin", "system/Patient.rs system/Observation.rs")
        .await;
    let status_url = kickoff_ok(&s, "/Group/g1/$export?_type=Patient", &group_admin).await;
    s.manifest(&status_url, &group_admin).await;
    let (st, _, text) = s
        .send(Method::GET, &status_url, Some(&no_group), None)
        .await;
    assert_outcome(st, StatusCode::FORBIDDEN, &text);
    let (st, _, text) = s
        .send(Method::DELETE, &status_url, Some(&no_group), None)
        .await;
    assert_outcome(st, StatusCode::FORBIDDEN, &text);
    let (st, _, text) = s
        .send(Method::DELETE, &status_url, Some(&group_admin), None)
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{text}");
}
