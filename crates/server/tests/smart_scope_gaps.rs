//! Conditional create (`If-None-Exist`, a Bundle entry's `request.ifNoneExist`) and the
//! existence oracles the REST/scope reviews left open: a create's condition is a search (`s`), a
//! search that returns resources reads them (`r`), and a Bundle `POST` by a client that may not
//! read the type does not keep the id it chose (a `409` told whether that resource existed).
//! Over real HTTP against the real router with `--auth smart`, on the test store's backend
//! (SQLite, or PostgreSQL with `FHIRHOSE_TEST_DATABASE`).

mod common;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use common::SmartServer as Server;

const CLIENTS: &[(&str, &str)] = &[
    ("admin", "system/*.cruds"),
    // Creates, neither reads nor searches.
    ("creator", "system/Patient.c system/Observation.c"),
    // Creates and searches Patients, reads nothing.
    ("finder", "system/Patient.cs system/Observation.c"),
    // Searches Observations and ViewDefinitions without reading them.
    (
        "searcher",
        "system/Observation.s system/Patient.rs system/ViewDefinition.s",
    ),
];

async fn start() -> Server {
    common::start_smart("rsa-a.pem", CLIENTS, 1 << 20).await
}

/// A request with extra headers: status, headers, body text.
async fn send_with(
    s: &Server,
    method: Method,
    path: &str,
    token: &str,
    body: Option<Value>,
    headers: &[(&str, &str)],
) -> (StatusCode, reqwest::header::HeaderMap, String) {
    let mut req = reqwest::Client::new()
        .request(method, format!("{}{path}", s.base))
        .header("accept", "application/fhir+json")
        .bearer_auth(token);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if let Some(b) = body {
        req = req
            .header("content-type", "application/fhir+json")
            .body(b.to_string());
    }
    let res = req.send().await.unwrap();
    let (status, headers) = (res.status(), res.headers().clone());
    (status, headers, res.text().await.unwrap())
}

fn assert_outcome(st: StatusCode, want: StatusCode, body: &str) {
    assert_eq!(st, want, "{body}");
    assert!(body.contains("\"OperationOutcome\""), "{body}");
}

fn bundle(kind: &str, entries: Value) -> Value {
    json!({"resourceType": "Bundle", "type": kind, "entry": entries})
}

fn statuses(body: &str) -> Vec<String> {
    let b: Value = serde_json::from_str(body).unwrap();
    b["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["response"]["status"].as_str().unwrap().to_string())
        .collect()
}

fn locations(body: &str) -> Vec<String> {
    let b: Value = serde_json::from_str(body).unwrap();
    b["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            e["response"]["location"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

/// A client holding `s` but not `r` on Observation got whole Observations from a search. A
/// search that returns resources reads them: it needs `r`; `s` alone allows only
/// `_summary=count` (or `_count=0`), a total without entries.
#[tokio::test]
async fn search_without_read_scope_gets_only_a_total() {
    let s = start().await;
    let admin = s.token("admin", "system/*.cruds").await;
    s.put(&admin, json!({"resourceType": "Patient", "id": "p1"}))
        .await;
    s.put(
        &admin,
        json!({"resourceType": "Observation", "id": "o1", "status": "final",
            "code": {"text": "secret-code"}, "subject": {"reference": "Patient/p1"}}),
    )
    .await;
    s.put(
        &admin,
        json!({"resourceType": "ViewDefinition", "id": "v1", "name": "secret_view",
            "status": "active", "resource": "Patient",
            "select": [{"column": [{"name": "id", "path": "getResourceKey()", "type": "id"}]}]}),
    )
    .await;
    let searcher = s
        .token(
            "searcher",
            "system/Observation.s system/Patient.rs system/ViewDefinition.s",
        )
        .await;
    for path in [
        "/Observation",
        "/Observation?status=final",
        "/Observation?_elements=status",
        "/Observation?_count=1&_total=accurate",
        "/Patient?_revinclude=Observation:subject",
        "/ViewDefinition",
        "/ViewDefinition?name=secret_view",
    ] {
        let (st, _, body) = s.send(Method::GET, path, Some(&searcher), None).await;
        assert_outcome(st, StatusCode::FORBIDDEN, &body);
        assert!(!body.contains("secret"), "{path}: {body}");
    }
    let (st, _, body) = send_with(
        &s,
        Method::POST,
        "/Observation/_search",
        &searcher,
        None,
        &[("content-type", "application/x-www-form-urlencoded")],
    )
    .await;
    assert_outcome(st, StatusCode::FORBIDDEN, &body);
    for path in ["/Observation?_summary=count", "/Observation?_count=0"] {
        let (st, _, body) = s.send(Method::GET, path, Some(&searcher), None).await;
        assert_eq!(st, StatusCode::OK, "{path}: {body}");
        let b: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(b["total"], 1, "{path}: {body}");
        assert!(!body.contains("secret"), "{path}: {body}");
        assert!(
            b["entry"].as_array().is_none_or(Vec::is_empty),
            "{path}: {body}"
        );
    }
    // `r` on the Patients the includes reach does not help: the matches are Observations.
    let (st, _, body) = s
        .send(
            Method::GET,
            "/Observation?_include=Observation:subject",
            Some(&searcher),
            None,
        )
        .await;
    assert_outcome(st, StatusCode::FORBIDDEN, &body);
}

/// A Bundle `POST` entry kept the `resource.id` it came with, and answered 409 when that
/// resource existed (even deleted): a client allowed only to create Patients learnt which
/// Patient ids exist. For a client that may not read the type the server now assigns the id
/// (FHIR's create); a client that may read it (who learns existence by reading anyway) keeps
/// the id as before.
#[tokio::test]
async fn bundle_post_keeps_no_client_id_for_a_client_that_cannot_read() {
    let s = start().await;
    let admin = s.token("admin", "system/*.cruds").await;
    s.put(&admin, json!({"resourceType": "Patient", "id": "secret"}))
        .await;
    let creator = s
        .token("creator", "system/Patient.c system/Observation.c")
        .await;
    for kind in ["batch", "transaction"] {
        let entries = json!([
            {"resource": {"resourceType": "Patient", "id": "secret"},
             "request": {"method": "POST", "url": "Patient"}},
            {"resource": {"resourceType": "Patient", "id": format!("free-{kind}")},
             "request": {"method": "POST", "url": "Patient"}}
        ]);
        let (st, _, body) = s
            .send(Method::POST, "/", Some(&creator), Some(bundle(kind, entries)))
            .await;
        assert_eq!(st, StatusCode::OK, "{kind}: {body}");
        assert_eq!(statuses(&body), ["201 Created", "201 Created"], "{body}");
        for location in locations(&body) {
            assert!(
                !location.starts_with("Patient/secret/") && !location.starts_with("Patient/free"),
                "{kind}: {body}"
            );
        }
    }
    let (st, _, body) = s
        .send(Method::GET, "/Patient/secret/_history", Some(&admin), None)
        .await;
    assert_eq!(st, StatusCode::OK);
    let history: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(history["entry"].as_array().unwrap().len(), 1, "{body}");

    // A client that may read Patients keeps its ids (and its 409).
    let entries = json!([{"resource": {"resourceType": "Patient", "id": "kept"},
        "request": {"method": "POST", "url": "Patient"}}]);
    let (st, _, body) = s
        .send(Method::POST, "/", Some(&admin), Some(bundle("batch", entries)))
        .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert!(locations(&body)[0].starts_with("Patient/kept/"), "{body}");
}
