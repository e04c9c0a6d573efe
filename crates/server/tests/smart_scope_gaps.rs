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
    // Reads and searches Observations only.
    ("observer", "system/Observation.rs"),
    // Reads and updates Patients, creates nothing.
    ("updater", "system/Patient.ru"),
    // Searches Observations and ViewDefinitions without reading them.
    (
        "searcher",
        "system/Observation.s system/Patient.rs system/ViewDefinition.s",
    ),
];

async fn start() -> Server {
    common::start_smart("rsa-a.pem", CLIENTS, 1 << 20).await
}

const SYSTEM: &str = "http://example.org/mrn";

fn patient(id: Option<&str>, mrn: &str) -> Value {
    let mut p = json!({"resourceType": "Patient", "birthDate": "1970-01-01",
        "identifier": [{"system": SYSTEM, "value": mrn}]});
    if let Some(id) = id {
        p["id"] = json!(id);
    }
    p
}

fn condition(mrn: &str) -> String {
    format!("identifier={SYSTEM}|{mrn}")
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

async fn conditional_create(
    s: &Server,
    token: &str,
    resource: Value,
    if_none_exist: &str,
) -> (StatusCode, reqwest::header::HeaderMap, String) {
    let path = format!("/{}", resource["resourceType"].as_str().unwrap());
    send_with(
        s,
        Method::POST,
        &path,
        token,
        Some(resource),
        &[("if-none-exist", if_none_exist)],
    )
    .await
}

fn header<'h>(h: &'h reqwest::header::HeaderMap, name: &str) -> &'h str {
    h.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

fn assert_outcome(st: StatusCode, want: StatusCode, body: &str) {
    assert_eq!(st, want, "{body}");
    assert!(body.contains("\"OperationOutcome\""), "{body}");
}

async fn total(s: &Server, token: &str, query: &str) -> u64 {
    let (st, _, body) = s
        .send(
            Method::GET,
            &format!("/{query}&_summary=count"),
            Some(token),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{query}: {body}");
    let b: Value = serde_json::from_str(&body).unwrap();
    b["total"].as_u64().unwrap()
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

/// `POST /Patient` with `If-None-Exist` created a duplicate every time (the header was
/// ignored). Now: no match → 201; one match → 200 with that resource's Location and ETag and no
/// new version; several → 412. The CapabilityStatement says `conditionalCreate: true`.
#[tokio::test]
async fn conditional_create_creates_once_and_refuses_several_matches() {
    let s = start().await;
    let admin = s.token("admin", "system/*.cruds").await;
    let (st, h, body) = conditional_create(&s, &admin, patient(None, "1"), &condition("1")).await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
    let first = header(&h, "location").to_string();
    assert!(first.contains("/Patient/"), "{first}");
    assert_eq!(header(&h, "etag"), "W/\"1\"");

    let (st, h, body) = conditional_create(&s, &admin, patient(None, "1"), &condition("1")).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(header(&h, "location"), first);
    assert_eq!(header(&h, "etag"), "W/\"1\"");
    assert_eq!(
        total(&s, &admin, &format!("Patient?{}", condition("1"))).await,
        1
    );
    let id = first.split('/').rev().nth(2).unwrap();
    let (st, _, history) = s
        .send(
            Method::GET,
            &format!("/Patient/{id}/_history"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let history: Value = serde_json::from_str(&history).unwrap();
    assert_eq!(history["entry"].as_array().unwrap().len(), 1, "{history}");

    // A second Patient with the same identifier: the condition is ambiguous.
    s.put(&admin, patient(Some("dup"), "1")).await;
    let (st, _, body) = conditional_create(&s, &admin, patient(None, "1"), &condition("1")).await;
    assert_outcome(st, StatusCode::PRECONDITION_FAILED, &body);
    assert_eq!(
        total(&s, &admin, &format!("Patient?{}", condition("1"))).await,
        2
    );

    // The condition is a search like any other: an unknown parameter is a 400, as is a
    // condition beyond the search limits (here more than 50 parameters).
    let (st, _, body) = conditional_create(&s, &admin, patient(None, "2"), "frobnicate=1").await;
    assert_outcome(st, StatusCode::BAD_REQUEST, &body);
    let many = vec![condition("2"); 51].join("&");
    let (st, _, body) = conditional_create(&s, &admin, patient(None, "2"), &many).await;
    assert_outcome(st, StatusCode::BAD_REQUEST, &body);
    assert_eq!(
        total(&s, &admin, &format!("Patient?{}", condition("2"))).await,
        0
    );

    let (_, _, body) = s.send(Method::GET, "/metadata", None, None).await;
    let cs: Value = serde_json::from_str(&body).unwrap();
    let patient_cs = cs["rest"][0]["resource"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["type"] == "Patient")
        .unwrap();
    assert_eq!(patient_cs["conditionalCreate"], true, "{patient_cs}");
}

/// `request.ifNoneExist` in a Bundle was refused (501). Now an entry whose condition matches
/// one resource answers 200 with it and the Bundle's references to its `fullUrl` point at it;
/// in a transaction that fails later nothing is created; in a batch an ambiguous condition
/// fails its entry alone with 412.
#[tokio::test]
async fn bundle_if_none_exist_resolves_to_the_match_inside_the_transaction() {
    let s = start().await;
    let admin = s.token("admin", "system/*.cruds").await;
    s.put(&admin, patient(Some("p1"), "1")).await;

    let tx = bundle(
        "transaction",
        json!([
            {"fullUrl": "urn:uuid:0c3a9b52-5a8e-4d7e-9f3b-111111111111", "resource": patient(None, "1"),
             "request": {"method": "POST", "url": "Patient", "ifNoneExist": condition("1")}},
            {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "c"},
              "subject": {"reference": "urn:uuid:0c3a9b52-5a8e-4d7e-9f3b-111111111111"}},
             "request": {"method": "POST", "url": "Observation"}}
        ]),
    );
    let (st, _, body) = s.send(Method::POST, "/", Some(&admin), Some(tx)).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert!(statuses(&body)[0].starts_with("200"), "{body}");
    assert!(statuses(&body)[1].starts_with("201"), "{body}");
    assert_eq!(locations(&body)[0], "Patient/p1/_history/1", "{body}");
    let (st, _, obs) = s
        .send(
            Method::GET,
            &format!("/{}", locations(&body)[1]),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{obs}");
    let obs: Value = serde_json::from_str(&obs).unwrap();
    assert_eq!(obs["subject"]["reference"], "Patient/p1", "{obs}");
    assert_eq!(
        total(&s, &admin, &format!("Patient?{}", condition("1"))).await,
        1
    );

    // No match: created, unless a later entry fails the transaction.
    let failing = bundle(
        "transaction",
        json!([
            {"resource": patient(None, "2"),
             "request": {"method": "POST", "url": "Patient", "ifNoneExist": condition("2")}},
            {"resource": patient(Some("zz"), "3"),
             "request": {"method": "PUT", "url": "Patient/zz", "ifMatch": "W/\"9\""}}
        ]),
    );
    let (st, _, body) = s.send(Method::POST, "/", Some(&admin), Some(failing)).await;
    assert!(st.is_client_error(), "{st} {body}");
    assert_eq!(
        total(&s, &admin, &format!("Patient?{}", condition("2"))).await,
        0
    );

    // A batch: the ambiguous condition fails its own entry; the others run.
    s.put(&admin, patient(Some("dup"), "1")).await;
    let batch = bundle(
        "batch",
        json!([
            {"resource": patient(None, "1"),
             "request": {"method": "POST", "url": "Patient", "ifNoneExist": condition("1")}},
            {"resource": patient(None, "2"),
             "request": {"method": "POST", "url": "Patient", "ifNoneExist": condition("2")}}
        ]),
    );
    let (st, _, body) = s.send(Method::POST, "/", Some(&admin), Some(batch)).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    let got = statuses(&body);
    assert!(got[0].starts_with("412"), "{body}");
    assert!(got[1].starts_with("201"), "{body}");
    assert_eq!(
        total(&s, &admin, &format!("Patient?{}", condition("2"))).await,
        1
    );
    assert_eq!(
        total(&s, &admin, &format!("Patient?{}", condition("1"))).await,
        2
    );
}

/// The condition of a conditional create is a search: answered 200, 201 or 412 by whether
/// resources match, it is an existence oracle for a client that may not search the type. It
/// needs `s` beside `c` (and what the same query needs as a search: `_has` through a type the
/// client cannot search is refused), directly and in a Bundle. Without `r` the 200 does not
/// carry the matched resource.
#[tokio::test]
async fn conditional_create_needs_search_scope() {
    let s = start().await;
    let admin = s.token("admin", "system/*.cruds").await;
    s.put(&admin, patient(Some("p1"), "1")).await;

    let creator = s
        .token("creator", "system/Patient.c system/Observation.c")
        .await;
    for mrn in ["1", "404"] {
        let (st, _, body) =
            conditional_create(&s, &creator, patient(None, mrn), &condition(mrn)).await;
        assert_outcome(st, StatusCode::FORBIDDEN, &body);
        let tx = bundle(
            "batch",
            json!([{"resource": patient(None, mrn),
                "request": {"method": "POST", "url": "Patient", "ifNoneExist": condition(mrn)}}]),
        );
        let (st, _, body) = s.send(Method::POST, "/", Some(&creator), Some(tx)).await;
        assert_outcome(st, StatusCode::FORBIDDEN, &body);
    }
    assert_eq!(
        total(&s, &admin, &format!("Patient?{}", condition("1"))).await,
        1
    );
    assert_eq!(
        total(&s, &admin, &format!("Patient?{}", condition("404"))).await,
        0
    );

    let finder = s
        .token("finder", "system/Patient.cs system/Observation.c")
        .await;
    let (st, h, body) = conditional_create(&s, &finder, patient(None, "1"), &condition("1")).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert!(header(&h, "location").ends_with("/Patient/p1/_history/1"));
    assert!(!body.contains("1970-01-01"), "the matched resource: {body}");
    // `_has` searches Observations, which this client may not search.
    let (st, _, body) = conditional_create(
        &s,
        &finder,
        patient(None, "5"),
        "_has:Observation:subject:status=final",
    )
    .await;
    assert_outcome(st, StatusCode::FORBIDDEN, &body);
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
            .send(
                Method::POST,
                "/",
                Some(&creator),
                Some(bundle(kind, entries)),
            )
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
        .send(
            Method::POST,
            "/",
            Some(&admin),
            Some(bundle("batch", entries)),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert!(locations(&body)[0].starts_with("Patient/kept/"), "{body}");
}

/// The other probes of the review, as a client holding `rs` on Observation only: `_has` and
/// chains through types it may not search, type and system history with `_since`, system
/// search with `_type`, instance history, a total of Patients, and `$export` kick-offs naming a
/// Group or Patients. Each answer (status and body) is the same whether the Patient and Group
/// it names exist or not.
#[tokio::test]
async fn other_probes_answer_alike_whether_unreadable_resources_exist() {
    let s = start().await;
    let admin = s.token("admin", "system/*.cruds").await;
    let observer = s.token("observer", "system/Observation.rs").await;
    s.put(
        &admin,
        json!({"resourceType": "Observation", "id": "o1", "status": "final",
            "code": {"text": "c"}, "subject": {"reference": "Patient/secret"}}),
    )
    .await;
    let probes: &[(Method, &str)] = &[
        (
            Method::GET,
            "/Observation?_has:Provenance:target:agent=Patient/secret",
        ),
        (Method::GET, "/Observation?subject:Patient.name=Secret"),
        (Method::GET, "/Observation?subject.name=Secret"),
        (Method::GET, "/Patient/_history?_since=2000-01-01T00:00:00Z"),
        (Method::GET, "/_history?_since=2000-01-01T00:00:00Z"),
        (Method::GET, "/?_type=Patient&name=Secret"),
        (Method::GET, "/Patient/secret/_history"),
        (Method::GET, "/Patient?_summary=count"),
        (Method::GET, "/Group/secret/$export"),
        (Method::GET, "/Patient/$export?_type=Observation"),
    ];
    let mut before = Vec::new();
    for (method, path) in probes {
        let (st, _, body) = s.send(method.clone(), path, Some(&observer), None).await;
        assert!(st.is_client_error(), "{path}: {st} {body}");
        before.push((st, body));
    }
    s.put(
        &admin,
        json!({"resourceType": "Patient", "id": "secret", "name": [{"family": "Secret"}]}),
    )
    .await;
    s.put(
        &admin,
        json!({"resourceType": "Group", "id": "secret", "type": "person", "actual": true,
            "member": [{"entity": {"reference": "Patient/secret"}}]}),
    )
    .await;
    for ((method, path), (st, body)) in probes.iter().zip(&before) {
        let after = s.send(method.clone(), path, Some(&observer), None).await;
        assert_eq!((after.0, &after.2), (*st, body), "{path}");
    }
}

/// A `PUT` of an id that does not exist creates the resource (create-on-update), so a client
/// with `u` but not `c` on a type could create in it: a scope bypass. Now such a client's update
/// of a missing or deleted resource is 403 and writes nothing, over REST and in Bundles (the
/// batch entry alone, the whole transaction), decided inside the write; its updates of
/// resources that exist work as before.
#[tokio::test]
async fn update_without_create_scope_never_creates() {
    let s = start().await;
    let admin = s.token("admin", "system/*.cruds").await;
    s.put(&admin, json!({"resourceType": "Patient", "id": "there"}))
        .await;
    s.put(&admin, json!({"resourceType": "Patient", "id": "gone"}))
        .await;
    let (st, _, body) = s
        .send(Method::DELETE, "/Patient/gone", Some(&admin), None)
        .await;
    assert!(st.is_success(), "{body}");
    let updater = s.token("updater", "system/Patient.ru").await;
    for id in ["new", "gone"] {
        let (st, _, body) = s
            .send(
                Method::PUT,
                &format!("/Patient/{id}"),
                Some(&updater),
                Some(json!({"resourceType": "Patient", "id": id})),
            )
            .await;
        assert_outcome(st, StatusCode::FORBIDDEN, &body);
    }
    let (st, _, body) = s
        .send(
            Method::PUT,
            "/Patient/there",
            Some(&updater),
            Some(json!({"resourceType": "Patient", "id": "there", "active": true})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    let entries = json!([
        {"resource": {"resourceType": "Patient", "id": "new2"},
         "request": {"method": "PUT", "url": "Patient/new2"}},
        {"resource": {"resourceType": "Patient", "id": "there", "active": false},
         "request": {"method": "PUT", "url": "Patient/there"}}
    ]);
    let (st, _, body) = s
        .send(
            Method::POST,
            "/",
            Some(&updater),
            Some(bundle("batch", entries.clone())),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    let got = statuses(&body);
    assert!(got[0].starts_with("403"), "{body}");
    assert!(got[1].starts_with("200"), "{body}");
    let (st, _, body) = s
        .send(
            Method::POST,
            "/",
            Some(&updater),
            Some(bundle("transaction", entries)),
        )
        .await;
    assert_outcome(st, StatusCode::FORBIDDEN, &body);
    for id in ["new", "new2"] {
        let (st, _, body) = s
            .send(Method::GET, &format!("/Patient/{id}"), Some(&admin), None)
            .await;
        assert_eq!(st, StatusCode::NOT_FOUND, "{body}");
    }
    let (st, _, body) = s
        .send(Method::GET, "/Patient/gone", Some(&admin), None)
        .await;
    assert_eq!(st, StatusCode::GONE, "{body}");
    // Versions: the admin's, the REST update, the batch's; the transaction wrote nothing.
    let (st, _, body) = s
        .send(Method::GET, "/Patient/there/_history", Some(&admin), None)
        .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    let history: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(history["entry"].as_array().unwrap().len(), 3, "{body}");
}

/// A Bundle entry whose `ifNoneExist` matched never returned the resource, even with
/// `Prefer: return=representation` (a REST conditional create does). Now the entry answers as
/// REST does: 200, the match's location and ETag, and under `return=representation` the
/// resource — only for a client that may read the type (`finder`, `c`+`s` without `r`, gets
/// none, as its REST 200 carries an OperationOutcome instead).
#[tokio::test]
async fn bundle_if_none_exist_match_returns_the_resource_as_rest_does() {
    let s = start().await;
    let admin = s.token("admin", "system/*.cruds").await;
    s.put(&admin, patient(Some("p1"), "1")).await;
    let entries = || {
        json!([{"resource": patient(None, "1"),
            "request": {"method": "POST", "url": "Patient", "ifNoneExist": condition("1")}}])
    };
    let representation = [("prefer", "return=representation")];
    for kind in ["transaction", "batch"] {
        let (st, _, body) = send_with(
            &s,
            Method::POST,
            "/",
            &admin,
            Some(bundle(kind, entries())),
            &representation,
        )
        .await;
        assert_eq!(st, StatusCode::OK, "{body}");
        let b: Value = serde_json::from_str(&body).unwrap();
        let entry = &b["entry"][0];
        assert!(statuses(&body)[0].starts_with("200"), "{body}");
        assert_eq!(entry["response"]["location"], "Patient/p1/_history/1");
        assert_eq!(entry["response"]["etag"], "W/\"1\"");
        assert_eq!(entry["resource"]["id"], "p1", "{kind}: {body}");
        assert_eq!(entry["resource"]["identifier"][0]["value"], "1", "{body}");

        // Without return=representation: no resource, as for any entry.
        let (st, _, body) = s
            .send(
                Method::POST,
                "/",
                Some(&admin),
                Some(bundle(kind, entries())),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{body}");
        let b: Value = serde_json::from_str(&body).unwrap();
        assert!(b["entry"][0].get("resource").is_none(), "{body}");
    }

    // A client that may create and search Patients but not read them: the location, never
    // the resource.
    let finder = s
        .token("finder", "system/Patient.cs system/Observation.c")
        .await;
    let (st, _, body) = send_with(
        &s,
        Method::POST,
        "/",
        &finder,
        Some(bundle("batch", entries())),
        &representation,
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    let b: Value = serde_json::from_str(&body).unwrap();
    assert!(statuses(&body)[0].starts_with("200"), "{body}");
    assert_eq!(
        b["entry"][0]["response"]["location"],
        "Patient/p1/_history/1"
    );
    assert!(b["entry"][0].get("resource").is_none(), "{body}");
    assert!(!body.contains("\"birthDate\""), "{body}");
    assert_eq!(
        total(&s, &admin, &format!("Patient?{}", condition("1"))).await,
        1
    );
}
