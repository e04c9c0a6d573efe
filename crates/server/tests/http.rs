//! Integration tests over real HTTP: the real router on a socket, a temporary data directory.

mod common;

use reqwest::StatusCode;
use serde_json::{Value, json};

struct TestServer {
    base: String,
    client: reqwest::Client,
    _dir: tempfile::TempDir,
    /// The store's database (SQLite, or PostgreSQL with `FHIRHOSE_TEST_DATABASE`).
    _db: store::testing::TestStore,
}

async fn start_with(max_body_bytes: usize, load: Option<&str>) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let paths: Vec<_> = load
        .map(|path| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .into_iter()
        .collect();
    let db = tokio::task::spawn_blocking(move || {
        let db = common::test_store();
        if !paths.is_empty() {
            let summary = ingest::load_into_store(
                &*db.store,
                &paths,
                &ingest::LoadOptions::default(),
                &mut |_| {},
            )
            .unwrap();
            assert_eq!(summary.invalid, 0, "{:?}", summary.problems);
        }
        db
    })
    .await
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    // Off the async workers: the export service's start-up calls the store.
    let (store, url, data) = (db.store.clone(), base.clone(), dir.path().to_path_buf());
    let state = tokio::task::spawn_blocking(move || {
        server::AppState::new(store, url, auth::Auth::none(), max_body_bytes, &data).unwrap()
    })
    .await
    .unwrap();
    let app = server::router(state);
    tokio::spawn(async move { axum_serve(listener, app).await });
    TestServer {
        base,
        client: reqwest::Client::new(),
        _dir: dir,
        _db: db,
    }
}

async fn axum_serve(listener: tokio::net::TcpListener, app: axum::Router) {
    axum::serve(listener, app).await.unwrap();
}

async fn start() -> TestServer {
    start_with(100 * 1024 * 1024, None).await
}

impl TestServer {
    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let (status, headers, text) = self.send_text(method, path, body, headers).await;
        let v = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, headers, v)
    }

    /// [`TestServer::send`] with the answer's body as text, unparsed.
    async fn send_text(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, reqwest::header::HeaderMap, String) {
        let mut req = self.client.request(method, self.url(path));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(b) = body {
            req = req
                .header("content-type", "application/fhir+json")
                .body(b.to_string());
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        (status, headers, resp.text().await.unwrap())
    }

    async fn get(&self, path: &str) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        self.send(reqwest::Method::GET, path, None, &[]).await
    }
}

/// The answer is an OperationOutcome whose diagnostics mention `needle`.
fn assert_outcome(v: &Value, needle: &str) {
    assert_eq!(v["resourceType"], "OperationOutcome", "{v}");
    let text = v.to_string();
    assert!(text.contains(needle), "expected '{needle}' in {text}");
}

#[tokio::test]
async fn crud_vread_and_history() {
    let s = start().await;
    let (st, h, created) = s
        .send(
            reqwest::Method::POST,
            "/Patient",
            Some(json!({"resourceType": "Patient", "id": "ignored", "name": [{"family": "Doe"}]})),
            &[],
        )
        .await;
    assert_eq!(st, StatusCode::CREATED);
    let id = created["id"].as_str().unwrap().to_string();
    assert_ne!(id, "ignored", "the server assigns ids on create");
    assert_eq!(h["etag"], "W/\"1\"");
    assert!(
        h["location"]
            .to_str()
            .unwrap()
            .ends_with(&format!("/Patient/{id}/_history/1"))
    );
    assert_eq!(created["meta"]["versionId"], "1");

    let (st, _, read) = s.get(&format!("/Patient/{id}")).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(read, created);

    let (st, _, updated) = s
        .send(
            reqwest::Method::PUT,
            &format!("/Patient/{id}"),
            Some(json!({"resourceType": "Patient", "id": id, "name": [{"family": "Roe"}]})),
            &[],
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(updated["meta"]["versionId"], "2");

    let (st, _, v1) = s.get(&format!("/Patient/{id}/_history/1")).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v1["name"][0]["family"], "Doe");
    let since = updated["meta"]["lastUpdated"].as_str().unwrap().to_string();

    let (st, _, _) = s
        .send(
            reqwest::Method::DELETE,
            &format!("/Patient/{id}"),
            None,
            &[],
        )
        .await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, _, gone) = s.get(&format!("/Patient/{id}")).await;
    assert_eq!(st, StatusCode::GONE);
    assert_outcome(&gone, "deleted");

    let (st, _, hist) = s.get(&format!("/Patient/{id}/_history")).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(hist["type"], "history");
    let methods: Vec<&str> = hist["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["request"]["method"].as_str().unwrap())
        .collect();
    assert_eq!(methods, ["DELETE", "PUT", "POST"]);

    let (_, _, since_hist) = s
        .get(&format!("/Patient/{id}/_history?_since={since}"))
        .await;
    assert_eq!(
        since_hist["entry"].as_array().unwrap().len(),
        2,
        "{since_hist}"
    );

    // Create-on-update with the client's id.
    let (st, _, _) = s
        .send(
            reqwest::Method::PUT,
            "/Patient/client-chosen",
            Some(json!({"resourceType": "Patient", "id": "client-chosen"})),
            &[],
        )
        .await;
    assert_eq!(st, StatusCode::CREATED);
    let (st, _, _) = s.get("/Patient/never-was").await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (st, _, _) = s.get(&format!("/Patient/{id}/_history/9")).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
}

/// Clinical data is kept by no cache and never sniffed into a page: a resource holding markup is
/// JSON to every browser, on reads, searches, errors and the capability statement alike.
#[tokio::test]
async fn every_answer_is_uncached_and_never_sniffed() {
    let s = start().await;
    let markup = json!({"resourceType": "Patient", "id": "m1",
        "name": [{"family": "<html><body><script>alert(1)</script>"}]});
    let (st, _, _) = s
        .send(reqwest::Method::PUT, "/Patient/m1", Some(markup), &[])
        .await;
    assert_eq!(st, StatusCode::CREATED);
    for path in [
        "/Patient/m1",
        "/Patient?_id=m1",
        "/Patient/none",
        "/metadata",
        "/nowhere",
    ] {
        let (_, h, _) = s.get(path).await;
        assert_eq!(h["cache-control"], "no-store", "{path}");
        assert_eq!(h["x-content-type-options"], "nosniff", "{path}");
    }
}

/// A read takes `_elements` and `_summary` as search does: the subset asked for, tagged
/// SUBSETTED, or a refusal; never the whole resource in silence.
#[tokio::test]
async fn reads_honour_elements_and_refuse_other_summaries() {
    let s = start().await;
    let p = json!({"resourceType": "Patient", "id": "e1", "gender": "female",
        "birthDate": "1970-01-01", "name": [{"family": "Doe"}]});
    let (st, _, _) = s
        .send(reqwest::Method::PUT, "/Patient/e1", Some(p), &[])
        .await;
    assert_eq!(st, StatusCode::CREATED);
    for path in [
        "/Patient/e1?_elements=gender",
        "/Patient/e1/_history/1?_elements=Patient.gender",
    ] {
        let (st, h, v) = s.get(path).await;
        assert_eq!(st, StatusCode::OK, "{path}: {v}");
        assert_eq!(h["etag"], "W/\"1\"");
        assert_eq!(v["gender"], "female", "{path}");
        assert!(
            v.get("name").is_none() && v.get("birthDate").is_none(),
            "{path}: {v}"
        );
        assert_eq!(v["meta"]["tag"][0]["code"], "SUBSETTED", "{path}");
    }
    let (st, _, v) = s.get("/Patient/e1?_summary=false").await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["name"][0]["family"], "Doe");
    // `_summary=true|text|data` are subsets (tests/summary.rs); `count` is for searches.
    let (st, _, v) = s.get("/Patient/e1?_summary=count").await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_outcome(&v, "_summary=count");
    // An answer the client says it will not take: 406, not JSON regardless.
    let (st, _, _) = s
        .send(
            reqwest::Method::GET,
            "/Patient/e1",
            None,
            &[("accept", "application/fhir+json;q=0")],
        )
        .await;
    assert_eq!(st, StatusCode::NOT_ACCEPTABLE);
}

#[tokio::test]
async fn history_pages_follow_next_links() {
    let s = start().await;
    for i in 0..5 {
        let (st, _, _) = s
            .send(
                reqwest::Method::PUT,
                &format!("/Organization/o{i}"),
                Some(json!({"resourceType": "Organization", "id": format!("o{i}")})),
                &[],
            )
            .await;
        assert_eq!(st, StatusCode::CREATED);
    }
    let mut url = s.url("/Organization/_history?_count=2");
    let mut seen = Vec::new();
    loop {
        let b: Value = s
            .client
            .get(&url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        for e in b["entry"].as_array().unwrap() {
            seen.push(e["resource"]["id"].as_str().unwrap().to_string());
        }
        match b["link"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["relation"] == "next")
        {
            Some(l) => url = l["url"].as_str().unwrap().to_string(),
            None => break,
        }
    }
    assert_eq!(seen, ["o4", "o3", "o2", "o1", "o0"]);
}

/// Search and history pages embed each resource as it is stored (what a read answers), byte for
/// byte.
#[tokio::test]
async fn search_and_history_bundles_carry_the_stored_bytes() {
    let s = start().await;
    let patient = json!({"resourceType": "Patient", "id": "p1", "active": true,
        "name": [{"family": "Ünïcode \"quoted\" \\ name", "given": ["A"]}],
        "extension": [{"url": "http://e/x", "valueDecimal": 1.50}]});
    let (st, _, _) = s
        .send(reqwest::Method::PUT, "/Patient/p1", Some(patient), &[])
        .await;
    assert_eq!(st, StatusCode::CREATED);
    let (st, _, _) = s
        .send(
            reqwest::Method::PUT,
            "/Patient/p2",
            Some(json!({"resourceType": "Patient", "id": "p2"})),
            &[],
        )
        .await;
    assert_eq!(st, StatusCode::CREATED);
    let (st, _, _) = s
        .send(reqwest::Method::DELETE, "/Patient/p2", None, &[])
        .await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (_, _, stored) = s
        .send_text(reqwest::Method::GET, "/Patient/p1", None, &[])
        .await;
    for path in [
        "/Patient?_id=p1",
        "/Patient?_sort=-_lastUpdated&_count=1",
        "/Patient?_total=accurate&family:contains=quoted",
        "/Patient/p1/_history",
        "/Patient/_history",
        "/_history",
    ] {
        let (status, headers, text) = s.send_text(reqwest::Method::GET, path, None, &[]).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        assert!(
            headers["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/fhir+json")
        );
        assert!(text.contains(&stored), "{path}: {text}");
        let b: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(b["resourceType"], "Bundle", "{path}");
        let entries = b["entry"].as_array().unwrap();
        let first = entries
            .iter()
            .find(|e| e["fullUrl"] == s.url("/Patient/p1"))
            .unwrap_or_else(|| panic!("{path}: {b}"));
        if path.contains("_history") {
            assert_eq!(first["response"]["etag"], "W/\"1\"", "{path}");
        } else {
            assert_eq!(first["search"]["mode"], "match", "{path}");
        }
        if path == "/Patient/_history" {
            // p2's delete (newest first): an entry without a resource.
            assert_eq!(entries.len(), 3, "{path}: {b}");
            assert_eq!(entries[0]["fullUrl"], s.url("/Patient/p2"));
            assert!(entries[0].get("resource").is_none());
            assert_eq!(entries[0]["request"]["method"], "DELETE");
        }
    }
}

#[tokio::test]
async fn if_match_conflicts() {
    let s = start().await;
    let body = json!({"resourceType": "Patient", "id": "p"});
    s.send(reqwest::Method::PUT, "/Patient/p", Some(body.clone()), &[])
        .await;
    let (st, _, oo) = s
        .send(
            reqwest::Method::PUT,
            "/Patient/p",
            Some(body.clone()),
            &[("if-match", "W/\"7\"")],
        )
        .await;
    assert_eq!(st, StatusCode::PRECONDITION_FAILED);
    assert_outcome(&oo, "conflict");
    let (st, _, _) = s
        .send(
            reqwest::Method::PUT,
            "/Patient/p",
            Some(body.clone()),
            &[("if-match", "W/\"1\"")],
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let (st, _, _) = s
        .send(
            reqwest::Method::DELETE,
            "/Patient/p",
            None,
            &[("if-match", "W/\"1\"")],
        )
        .await;
    assert_eq!(st, StatusCode::PRECONDITION_FAILED);
    let (st, _, _) = s
        .send(
            reqwest::Method::DELETE,
            "/Patient/p",
            None,
            &[("if-match", "W/\"2\"")],
        )
        .await;
    assert_eq!(st, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn transaction_is_all_or_nothing() {
    let s = start().await;
    let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:6c5d9ca9-54d7-42f5-bfae-a7c19cd217f2", "resource": {"resourceType": "Patient", "name": [{"family": "Tx"}]},
         "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                      "subject": {"reference": "urn:uuid:6c5d9ca9-54d7-42f5-bfae-a7c19cd217f2"}, "valueFoo": 1},
         "request": {"method": "POST", "url": "Observation"}}
    ]});
    let (st, _, oo) = s
        .send(reqwest::Method::POST, "/", Some(tx.clone()), &[])
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_outcome(&oo, "valueFoo");
    let (_, _, count) = s.get("/Patient?_summary=count").await;
    assert_eq!(count["total"], 0, "a failed transaction leaves no trace");

    let mut good = tx.clone();
    good["entry"][1]["resource"]
        .as_object_mut()
        .unwrap()
        .remove("valueFoo");
    let (st, _, resp) = s.send(reqwest::Method::POST, "/", Some(good), &[]).await;
    assert_eq!(st, StatusCode::OK, "{resp}");
    assert_eq!(resp["type"], "transaction-response");
    assert_eq!(resp["entry"][0]["response"]["status"], "201 Created");
    let obs_loc = resp["entry"][1]["response"]["location"].as_str().unwrap();
    let obs_id = obs_loc.split('/').nth(1).unwrap();
    let (_, _, obs) = s.get(&format!("/Observation/{obs_id}")).await;
    let subject = obs["subject"]["reference"].as_str().unwrap();
    assert!(
        subject.starts_with("Patient/"),
        "urn:uuid rewritten: {subject}"
    );
    let (st, _, _) = s.get(&format!("/{subject}")).await;
    assert_eq!(st, StatusCode::OK);
}

/// Issue 23 item 1: `POST /{type}` and `PUT /{type}/{id}` pass the checks of the Bundle path
/// (ingest's `check_resource`): the same invalid resource and the same `urn:` reference, which
/// names nothing outside a Bundle, are refused by both, and nothing is stored.
#[tokio::test]
async fn single_writes_are_checked_like_bundle_entries() {
    let s = start().await;
    let dangling = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
        "subject": {"reference": "urn:uuid:0f2c5a4e-8f21-4c6e-9a55-0d3c1b0a7e11"}});
    let invalid = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
        "valueFoo": 1});
    for (resource, says) in [(&dangling, "urn:uuid:0f2c5a4e"), (&invalid, "valueFoo")] {
        let (st, _, oo) = s
            .send(
                reqwest::Method::POST,
                "/Observation",
                Some(resource.clone()),
                &[],
            )
            .await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{oo}");
        assert_outcome(&oo, says);
        let mut with_id = resource.clone();
        with_id["id"] = json!("o1");
        let (st, _, oo) = s
            .send(reqwest::Method::PUT, "/Observation/o1", Some(with_id), &[])
            .await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{oo}");
        assert_outcome(&oo, says);
        let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
            {"resource": resource, "request": {"method": "POST", "url": "Observation"}}]});
        let (st, _, resp) = s.send(reqwest::Method::POST, "/", Some(batch), &[]).await;
        assert_eq!(st, StatusCode::OK, "{resp}");
        assert!(
            resp["entry"][0]["response"]["status"]
                .as_str()
                .is_some_and(|t| t.starts_with("400")),
            "{resp}"
        );
        assert_outcome(&resp["entry"][0]["response"]["outcome"], says);
    }
    let (_, _, count) = s.get("/Observation?_summary=count").await;
    assert_eq!(count["total"], 0, "nothing stored");
    // The expression names where the reference is.
    let (_, _, oo) = s
        .send(reqwest::Method::POST, "/Observation", Some(dangling), &[])
        .await;
    assert_eq!(
        oo["issue"][0]["expression"][0], "Observation.subject.reference",
        "{oo}"
    );
}

#[tokio::test]
async fn bad_input_answers_with_operation_outcomes() {
    let s = start_with(64 * 1024, None).await;
    let post = |body: &'static str, ct: &'static str| {
        let c = s.client.clone();
        let url = s.url("/Patient");
        async move {
            let r = c
                .post(url)
                .header("content-type", ct)
                .body(body)
                .send()
                .await
                .unwrap();
            (r.status(), r.json::<Value>().await.unwrap())
        }
    };
    let (st, v) = post("{not json", "application/fhir+json").await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_outcome(&v, "malformed JSON");
    let (st, v) = post("[1,2]", "application/fhir+json").await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_outcome(&v, "JSON object");
    let (st, v) = post(r#"{"resourceType":"Observation"}"#, "application/fhir+json").await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_outcome(&v, "does not match");
    let (st, v) = post(
        r#"{"resourceType":"Patient","foo":1}"#,
        "application/fhir+json",
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_outcome(&v, "Patient.foo");
    let (st, v) = post(
        r#"{"resourceType":"Patient","birthDate":"2020-13-45"}"#,
        "application/fhir+json",
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_outcome(&v, "Patient.birthDate");
    let (st, v) = post("<Patient/>", "application/fhir+xml").await;
    assert_eq!(st, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_outcome(&v, "Content-Type");

    let big = format!(
        r#"{{"resourceType":"Patient","name":[{{"family":"{}"}}]}}"#,
        "x".repeat(100 * 1024)
    );
    let r = s
        .client
        .post(s.url("/Patient"))
        .header("content-type", "application/fhir+json")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_outcome(&r.json::<Value>().await.unwrap(), "limit");

    let (st, _, v) = s
        .send(
            reqwest::Method::POST,
            "/Unicorn",
            Some(json!({"resourceType": "Unicorn"})),
            &[],
        )
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert_outcome(&v, "unknown resource type");
    let (st, _, v) = s
        .send(
            reqwest::Method::PUT,
            "/Patient/a_b",
            Some(json!({"resourceType": "Patient", "id": "a_b"})),
            &[],
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_outcome(&v, "invalid id");
    let (st, _, v) = s
        .send(
            reqwest::Method::PUT,
            "/Patient/abc",
            Some(json!({"resourceType": "Patient", "id": "abd"})),
            &[],
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_outcome(&v, "differs");
    let (st, _, v) = s
        .send(
            reqwest::Method::GET,
            "/Patient/abc",
            None,
            &[("accept", "application/fhir+xml")],
        )
        .await;
    assert_eq!(st, StatusCode::NOT_ACCEPTABLE);
    assert_outcome(&v, "JSON only");
    let (st, _, v) = s
        .send(reqwest::Method::PATCH, "/Patient/abc", None, &[])
        .await;
    assert_eq!(st, StatusCode::METHOD_NOT_ALLOWED);
    assert_outcome(&v, "not allowed");
    let (st, _, v) = s.get("/a/b/c/d/e").await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert_outcome(&v, "no such endpoint");
    let (st, _, v) = s.get("/Observation?date=2020-13-45").await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_outcome(&v, "date");
    let (st, _, v) = s.get("/Observation?_count=-1").await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_outcome(&v, "_count");
    let (st, _, v) = s.get("/Patient/_history?_since=yesterday").await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_outcome(&v, "_since");
}

#[tokio::test]
async fn metadata_describes_what_is_implemented() {
    let s = start().await;
    let (st, h, cs) = s.get("/metadata").await;
    assert_eq!(st, StatusCode::OK);
    assert!(
        h["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/fhir+json")
    );
    assert_eq!(cs["resourceType"], "CapabilityStatement");
    assert_eq!(cs["fhirVersion"], "4.0.1");
    let patient = cs["rest"][0]["resource"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["type"] == "Patient")
        .unwrap();
    assert!(
        patient["searchParam"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "birthdate")
    );
}

/// The 100-patient Synthea set: counts per type equal the table of the data set's README, except
/// Organization and Practitioner: the table counts 452 bundle entries of each, but those entries
/// carry only 203 distinct ids (the hospital and practitioner files repeat resources). Ids are kept
/// (the cross-file references need them), so the repeats are new versions of the same 203.
#[tokio::test(flavor = "multi_thread")]
async fn synthea_counts_per_type() {
    let s = start_with(100 * 1024 * 1024, Some("../../testdata/synthea-r4-100")).await;
    for &(t, n) in test_support::SYNTHEA_100_COUNTS {
        let (st, _, b) = s.get(&format!("/{t}?_summary=count")).await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(b["total"], n, "{t}");
    }
}

/// PostgreSQL only (`FHIRHOSE_TEST_DATABASE`): while the database refuses connections (its
/// backends terminated, `ALLOW_CONNECTIONS false`), a read, a search and an export status poll
/// answer 503 `transient` with Retry-After — the search and the job queue answered 500 — and
/// the same server answers again once the database takes connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_went_away_answers_503_with_retry_after() {
    let s = start().await;
    let store::testing::TestGuard::Postgres(db) = &s._db.guard else {
        eprintln!("skipped: SQLite (set FHIRHOSE_TEST_DATABASE)");
        return;
    };
    let admin_url = store::testing::test_database_url().unwrap();
    let name = db.name.clone();
    let admin = move |allow: bool| {
        let (url, name) = (admin_url.clone(), name.clone());
        tokio::task::spawn_blocking(move || {
            let mut sql = format!("ALTER DATABASE {name} ALLOW_CONNECTIONS {allow};");
            if !allow {
                sql.push_str(&format!(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}';"
                ));
            }
            store::testing::admin_batch(&url, &sql).unwrap();
        })
    };
    let (status, _, _) = s
        .send(
            reqwest::Method::PUT,
            "/Patient/p1",
            Some(json!({"resourceType": "Patient", "id": "p1"})),
            &[],
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    // A finished export, whose status is then polled.
    let r = s
        .client
        .get(s.url("/Patient/$export"))
        .header("accept", "application/fhir+json")
        .header("prefer", "respond-async")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let status_url = r.headers()["content-location"]
        .to_str()
        .unwrap()
        .to_string();
    let status_path = status_url.strip_prefix(&s.base).unwrap().to_string();
    for _ in 0..300 {
        if s.get(&status_path).await.0 == StatusCode::OK {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    admin(false).await.unwrap();
    for path in ["/Patient/p1", "/Patient?name=x", status_path.as_str()] {
        let (status, headers, body) = s.get(path).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{path}: {body}");
        assert_eq!(body["resourceType"], "OperationOutcome", "{path}");
        assert_eq!(body["issue"][0]["code"], "transient", "{path}: {body}");
        assert!(headers.contains_key("retry-after"), "{path}: {headers:?}");
        assert!(!body.to_string().contains("127.0.0.1"), "{path}: {body}");
    }
    // Kick-offs too: a Group export reads the Group before anything else (it answered 500).
    for path in ["/Group/g1/$export", "/Patient/$export", "/$export"] {
        let r = s
            .client
            .get(s.url(path))
            .header("accept", "application/fhir+json")
            .header("prefer", "respond-async")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE, "{path}");
        assert!(r.headers().contains_key("retry-after"), "{path}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["issue"][0]["code"], "transient", "{path}: {body}");
    }
    admin(true).await.unwrap();
    let (status, _, body) = s.get("/Patient?_id=p1").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(s.get(&status_path).await.0, StatusCode::OK);
}
