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
    async fn put(&self, token: &str, resource: Value) {
        let path = format!(
            "/{}/{}",
            resource["resourceType"].as_str().unwrap(),
            resource["id"].as_str().unwrap()
        );
        let (st, _, body) = self
            .send(Method::PUT, &path, Some(token), Some(resource))
            .await;
        assert!(st.is_success(), "{path}: {body}");
    }

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
