//! What a SMART client holding limited scopes sees of a search, a history or an operation must
//! not depend on resources of types it may not read or search (the REST/scope review's items),
//! and ambiguous credentials are refused. Over real HTTP against the real router with
//! `--auth smart`. (Test keys: crates/auth/tests/data, see PROVENANCE.md there.)

mod common;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use common::SmartServer as Server;

const CLIENTS: &[(&str, &str)] = &[
    ("admin", "system/*.cruds"),
    ("reader", "system/Observation.rs system/Group.rs"),
    (
        "provenance",
        "system/Observation.rs system/Provenance.rs system/Patient.r",
    ),
    ("views", "system/ViewDefinition.r system/Patient.rs"),
];

async fn start() -> Server {
    start_with(|s| s).await
}

async fn start_with(adjust: impl FnOnce(server::AppState) -> server::AppState) -> Server {
    common::start_smart_with("rsa-a.pem", CLIENTS, 1 << 20, adjust).await
}

impl Server {
    async fn get_ok(&self, path: &str, token: &str) -> String {
        let (st, _, body) = self.send(Method::GET, path, Some(token), None).await;
        assert_eq!(st, StatusCode::OK, "{path}: {body}");
        body
    }
}

fn assert_outcome(st: StatusCode, want: StatusCode, body: &str) {
    assert_eq!(st, want, "{body}");
    assert!(body.contains("\"OperationOutcome\""), "{body}");
}

fn entry_ids(body: &str) -> Vec<String> {
    let b: Value = serde_json::from_str(body).unwrap();
    b["entry"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| {
            let r = &e["resource"];
            Some(format!(
                "{}/{}",
                r["resourceType"].as_str()?,
                r["id"].as_str()?
            ))
        })
        .collect()
}

/// `_include` without a target type reaches Patients, which the client may not read. They were
/// withheld only when the Bundle was written, after they had been fetched and counted against
/// `--search-max-included` (here 1) and `--search-max-page-bytes` (here 4 KiB, the Patient is
/// 8 KiB): the client got no Group, a `too-costly` warning, and the opposite once the Patient
/// was deleted, so the page told whether (and how large) a resource it may not read existed.
/// Now the includes follow references only to readable types: the page is the same with or
/// without the Patient.
#[tokio::test]
async fn withheld_includes_do_not_change_the_page() {
    type Limit = fn(&mut search::SearchLimits);
    let configs: [(&str, Limit); 2] = [
        ("max_included", |l| l.max_included = 1),
        ("max_page_bytes", |l| l.max_page_bytes = 4096),
    ];
    for (limit, set) in configs {
        let s = start_with(|mut state| {
            set(&mut state.search_limits);
            state
        })
        .await;
        let admin = s.token("admin", "system/*.cruds").await;
        s.put(
            &admin,
            json!({"resourceType": "Patient", "id": "p1",
                "name": [{"text": "x".repeat(8192)}]}),
        )
        .await;
        s.put(
            &admin,
            json!({"resourceType": "Group", "id": "g1", "type": "person", "actual": true}),
        )
        .await;
        for (id, subject) in [("o1", "Patient/p1"), ("o2", "Group/g1")] {
            s.put(
                &admin,
                json!({"resourceType": "Observation", "id": id, "status": "final",
                    "code": {"text": "c"}, "subject": {"reference": subject}}),
            )
            .await;
        }
        let reader = s
            .token("reader", "system/Observation.rs system/Group.rs")
            .await;
        let paths = [
            "/Observation?_include=Observation:subject&_sort=_id",
            "/Observation?_include=Observation:*&_sort=_id",
            "/Observation?_include:iterate=Observation:subject&_sort=_id",
        ];
        let mut with_patient = Vec::new();
        for path in paths {
            let body = s.get_ok(path, &reader).await;
            assert_eq!(
                entry_ids(&body),
                ["Observation/o1", "Observation/o2", "Group/g1"],
                "{limit} {path}: {body}"
            );
            assert!(!body.contains("too-costly"), "{limit} {path}: {body}");
            with_patient.push(body);
        }
        // The administrator still gets the Patient (within the limits).
        let body = s.get_ok(paths[0], &admin).await;
        assert!(body.contains("Patient/p1"), "{limit}: {body}");

        let (st, _, body) = s
            .send(Method::DELETE, "/Patient/p1", Some(&admin), None)
            .await;
        assert!(st.is_success(), "{body}");
        for (path, before) in paths.iter().zip(&with_patient) {
            let after = s.get_ok(path, &reader).await;
            assert_eq!(&after, before, "{limit} {path}");
        }
    }
}

/// System history lists every stored type's versions, ViewDefinitions (stored like a resource
/// by view_routes) too, but its scope check covered only the R4 types: a client holding `rs`
/// on each of them but nothing on ViewDefinition listed the stored ViewDefinitions. It now
/// needs `rs` on ViewDefinition as well, directly and as a batch entry.
#[tokio::test]
async fn system_history_needs_view_definition_scopes_too() {
    let every_r4: Vec<String> = fhir_model::r4()
        .resource_types()
        .iter()
        .map(|t| format!("system/{t}.rs"))
        .collect();
    let every_r4 = every_r4.join(" ");
    let with_views = format!("{every_r4} system/ViewDefinition.rs");
    let s = common::start_smart(
        "rsa-a.pem",
        &[
            ("admin", "system/*.cruds"),
            ("r4", &every_r4),
            ("all", &with_views),
        ],
        1 << 20,
    )
    .await;
    let admin = s.token("admin", "system/*.cruds").await;
    s.put(
        &admin,
        json!({"resourceType": "ViewDefinition", "id": "v1", "name": "secret_view",
            "status": "active", "resource": "Patient",
            "select": [{"column": [{"name": "id", "path": "getResourceKey()", "type": "id"}]}]}),
    )
    .await;
    s.put(&admin, json!({"resourceType": "Patient", "id": "p1"}))
        .await;

    let r4 = s.token("r4", &every_r4).await;
    let (st, _, body) = s.send(Method::GET, "/_history", Some(&r4), None).await;
    assert_outcome(st, StatusCode::FORBIDDEN, &body);
    assert!(!body.contains("secret_view"), "{body}");
    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "_history"}}
    ]});
    let (st, _, body) = s.send(Method::POST, "/", Some(&r4), Some(batch)).await;
    assert_outcome(st, StatusCode::FORBIDDEN, &body);
    assert!(!body.contains("secret_view"), "{body}");
    // What R4 types allow still works.
    s.get_ok("/Patient/_history", &r4).await;

    let all = s.token("all", &with_views).await;
    let body = s.get_ok("/_history", &all).await;
    assert!(body.contains("secret_view"), "{body}");
}

/// `_revinclude` searches its source type by reference (every Provenance pointing at the
/// matches): it needed only `r` on that type, where a search and type history need `s`. It now
/// needs `r` and `s`; chains and `_has` through a type the client cannot search are refused
/// rather than filtering the matches.
#[tokio::test]
async fn revinclude_chains_and_has_need_search_on_the_types_they_search() {
    let s = start().await;
    let admin = s.token("admin", "system/*.cruds").await;
    s.put(
        &admin,
        json!({"resourceType": "Patient", "id": "p1", "name": [{"family": "Doe"}]}),
    )
    .await;
    s.put(
        &admin,
        json!({"resourceType": "Observation", "id": "o1", "status": "final",
            "code": {"text": "c"}, "subject": {"reference": "Patient/p1"}}),
    )
    .await;
    s.put(
        &admin,
        json!({"resourceType": "Provenance", "id": "pv1", "recorded": "2024-01-01T00:00:00Z",
            "target": [{"reference": "Observation/o1"}],
            "agent": [{"who": {"reference": "Patient/p1"}}]}),
    )
    .await;

    let read_only = s
        .token(
            "provenance",
            "system/Observation.rs system/Provenance.r system/Patient.r",
        )
        .await;
    for path in [
        "/Observation?_revinclude=Provenance:target",
        "/Observation?_revinclude=Provenance:target:Observation",
        "/Observation?_revinclude:iterate=Provenance:target",
        // A chain through Patient, which may be read but not searched.
        "/Observation?subject:Patient.family=Doe",
        "/Observation?subject.family=Doe",
        // `_has` searches Provenance.
        "/Observation?_has:Provenance:target:agent=Patient/p1",
    ] {
        let (st, _, body) = s.send(Method::GET, path, Some(&read_only), None).await;
        assert_outcome(st, StatusCode::FORBIDDEN, &body);
        assert!(!body.contains("pv1"), "{path}: {body}");
    }
    // The same searches inside a batch are refused alike.
    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Observation?_revinclude=Provenance:target"}}
    ]});
    let (st, _, body) = s
        .send(Method::POST, "/", Some(&read_only), Some(batch))
        .await;
    assert_outcome(st, StatusCode::FORBIDDEN, &body);

    // With `s` on Provenance the revinclude and `_has` run.
    let searching = s
        .token("provenance", "system/Observation.rs system/Provenance.rs")
        .await;
    let body = s
        .get_ok("/Observation?_revinclude=Provenance:target", &searching)
        .await;
    assert_eq!(
        entry_ids(&body),
        ["Observation/o1", "Provenance/pv1"],
        "{body}"
    );
    let body = s
        .get_ok(
            "/Observation?_has:Provenance:target:agent=Patient/p1",
            &searching,
        )
        .await;
    assert_eq!(entry_ids(&body), ["Observation/o1"], "{body}");
}

/// A request with two `Authorization` headers was served with the first (whichever a proxy
/// or cache in front would have honoured). It is now refused, 400 `invalid_request` with an
/// OperationOutcome and a `WWW-Authenticate` challenge, on the FHIR routes, export status
/// polls and file downloads alike.
#[tokio::test]
async fn two_authorization_headers_are_refused() {
    let s = start().await;
    let admin = s.token("admin", "system/*.cruds").await;
    let reader = s
        .token("reader", "system/Observation.rs system/Group.rs")
        .await;
    s.put(&admin, json!({"resourceType": "Patient", "id": "p1"}))
        .await;
    let (st, h, body) = s
        .send(Method::GET, "/$export?_type=Patient", Some(&admin), None)
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{body}");
    let status_url = h["content-location"].to_str().unwrap().to_owned();
    let manifest = s.manifest(&status_url, &admin).await;
    let file_url = manifest["output"][0]["url"].as_str().unwrap().to_owned();

    let client = reqwest::Client::new();
    for url in [
        format!("{}/Patient/p1", s.base),
        format!("{}/Patient?_id=p1", s.base),
        status_url.clone(),
        file_url.clone(),
    ] {
        for (first, second) in [
            (admin.as_str(), "not-a-token"),
            (reader.as_str(), admin.as_str()),
            (admin.as_str(), admin.as_str()),
        ] {
            let res = client
                .get(&url)
                .header("accept", "application/fhir+json")
                .header("authorization", format!("Bearer {first}"))
                .header("authorization", format!("Bearer {second}"))
                .send()
                .await
                .unwrap();
            let st = res.status();
            let challenge = res
                .headers()
                .get("www-authenticate")
                .map(|v| v.to_str().unwrap().to_owned());
            let body = res.text().await.unwrap();
            assert_outcome(st, StatusCode::BAD_REQUEST, &body);
            let challenge = challenge.unwrap_or_else(|| panic!("{url}: no WWW-Authenticate"));
            assert!(challenge.contains("invalid_request"), "{challenge}");
        }
    }
    // One header still works everywhere.
    s.get_ok("/Patient/p1", &admin).await;
    s.get_ok(&status_url, &admin).await;
    s.get_ok(&file_url, &admin).await;
}

/// `viewReference` by canonical url looks the stored ViewDefinitions up by that url, a search
/// of them: with `r` alone on ViewDefinition a client learned which urls exist (a run, or 400
/// "no stored ViewDefinition has this url"). It now needs `s` as well; a reference by id is a
/// read and needs `r`.
#[tokio::test]
async fn view_reference_by_url_needs_search_on_view_definition() {
    let s = start().await;
    let admin = s.token("admin", "system/*.cruds").await;
    s.put(
        &admin,
        json!({"resourceType": "ViewDefinition", "id": "v1", "name": "patients",
            "status": "active", "url": "https://example.org/views/patients", "resource": "Patient",
            "select": [{"column": [{"name": "id", "path": "getResourceKey()", "type": "id"}]}]}),
    )
    .await;
    s.put(&admin, json!({"resourceType": "Patient", "id": "p1"}))
        .await;
    let read_only = s
        .token("views", "system/ViewDefinition.r system/Patient.rs")
        .await;
    for url in [
        "https://example.org/views/patients",
        "https://example.org/views/none",
    ] {
        let path = format!("/$viewdefinition-run?viewReference={url}&_format=json");
        let (st, _, body) = s.send(Method::GET, &path, Some(&read_only), None).await;
        assert_outcome(st, StatusCode::FORBIDDEN, &body);
    }
    // By id: a read.
    let body = s
        .get_ok(
            "/$viewdefinition-run?viewReference=ViewDefinition/v1&_format=json",
            &read_only,
        )
        .await;
    assert!(body.contains("p1"), "{body}");
    // With `s` too, by url.
    let body = s
        .get_ok(
            "/$viewdefinition-run?viewReference=https://example.org/views/patients&_format=json",
            &admin,
        )
        .await;
    assert!(body.contains("p1"), "{body}");
}
