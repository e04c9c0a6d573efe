//! SMART scopes enforced by the REST API over real HTTP: per-type read / search / write, chains,
//! `_has`, `_include`, batches, 401 without a token. (Owned by the auth crate's author; the test
//! keys are the auth crate's, see crates/auth/tests/data/PROVENANCE.md.)

mod common;

use reqwest::StatusCode;
use serde_json::{Value, json};

use common::SmartServer as Server;

async fn start() -> Server {
    common::start_smart(
        "ec-p384.pem",
        &[
            ("admin", "system/*.cruds"),
            ("patients", "system/Patient.rs"),
            ("observations", "system/Observation.rs"),
        ],
        1 << 20,
    )
    .await
}

impl Server {
    /// [`Server::send`] with the body read as JSON (`Null` when it is not JSON).
    async fn json(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let (status, _, text) = self.send(method, path, token, body).await;
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }
}

fn forbidden(status: StatusCode, body: &Value) {
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["resourceType"], "OperationOutcome");
    assert_eq!(body["issue"][0]["code"], "forbidden");
}

#[tokio::test]
async fn per_type_scopes_on_the_rest_api() {
    let s = start().await;
    use reqwest::Method as M;

    // Open endpoints, and 401 without a token.
    assert_eq!(
        s.json(M::GET, "/metadata", None, None).await.0,
        StatusCode::OK
    );
    assert_eq!(
        s.json(M::GET, "/.well-known/smart-configuration", None, None)
            .await
            .0,
        StatusCode::OK
    );
    let (st, body) = s.json(M::GET, "/Patient", None, None).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    assert_eq!(body["resourceType"], "OperationOutcome");

    let admin = s.token("admin", "system/*.cruds").await;
    let (st, _) = s
        .json(
            M::PUT,
            "/Patient/p1",
            Some(&admin),
            Some(json!({"resourceType": "Patient", "id": "p1", "name": [{"family": "Doe"}]})),
        )
        .await;
    assert!(st.is_success(), "{st}");
    let (st, _) = s
        .json(
            M::PUT,
            "/Observation/o1",
            Some(&admin),
            Some(
                json!({"resourceType": "Observation", "id": "o1", "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "1234-5"}]},
                "subject": {"reference": "Patient/p1"}}),
            ),
        )
        .await;
    assert!(st.is_success(), "{st}");

    let patients = s.token("patients", "system/Patient.rs").await;
    assert_eq!(
        s.json(M::GET, "/Patient/p1", Some(&patients), None).await.0,
        StatusCode::OK
    );
    assert_eq!(
        s.json(M::GET, "/Patient?family=Doe", Some(&patients), None)
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        s.json(M::GET, "/Patient/p1/_history", Some(&patients), None)
            .await
            .0,
        StatusCode::OK
    );
    let (st, b) = s
        .json(M::GET, "/Observation/o1", Some(&patients), None)
        .await;
    forbidden(st, &b);
    let (st, b) = s
        .json(M::GET, "/Observation?code=1234-5", Some(&patients), None)
        .await;
    forbidden(st, &b);
    // Writes need c / u / d.
    let (st, b) = s
        .json(
            M::POST,
            "/Patient",
            Some(&patients),
            Some(json!({"resourceType": "Patient"})),
        )
        .await;
    forbidden(st, &b);
    let (st, b) = s
        .json(
            M::PUT,
            "/Patient/p1",
            Some(&patients),
            Some(json!({"resourceType": "Patient", "id": "p1"})),
        )
        .await;
    forbidden(st, &b);
    let (st, b) = s
        .json(M::DELETE, "/Patient/p1", Some(&patients), None)
        .await;
    forbidden(st, &b);
    // `_has` searches Observation: needs its scope.
    let (st, b) = s
        .json(
            M::GET,
            "/Patient?_has:Observation:subject:code=1234-5",
            Some(&patients),
            None,
        )
        .await;
    forbidden(st, &b);
    // A batch entry of a type outside the scopes.
    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Observation/o1"}}
    ]});
    let (st, b) = s.json(M::POST, "/", Some(&patients), Some(batch)).await;
    forbidden(st, &b);

    let observations = s.token("observations", "system/Observation.rs").await;
    // A chain searches Patient: needs its scope.
    let (st, b) = s
        .json(
            M::GET,
            "/Observation?subject:Patient.family=Doe",
            Some(&observations),
            None,
        )
        .await;
    forbidden(st, &b);
    // `_include` with an explicit unreadable target: 403; without a target: the Patient is withheld.
    let (st, b) = s
        .json(
            M::GET,
            "/Observation?_include=Observation:subject:Patient",
            Some(&observations),
            None,
        )
        .await;
    forbidden(st, &b);
    let (st, b) = s
        .json(
            M::GET,
            "/Observation?_include=Observation:subject",
            Some(&observations),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{b}");
    let types: Vec<&str> = b["entry"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["resource"]["resourceType"].as_str())
        .collect();
    assert_eq!(types, vec!["Observation"], "{b}");
    // The admin gets both.
    let (_, b) = s
        .json(
            M::GET,
            "/Observation?_include=Observation:subject",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(b["entry"].as_array().unwrap().len(), 2, "{b}");

    // System history needs read on every type.
    let (st, b) = s.json(M::GET, "/_history", Some(&patients), None).await;
    forbidden(st, &b);
    assert_eq!(
        s.json(M::GET, "/_history", Some(&admin), None).await.0,
        StatusCode::OK
    );

    // A token whose signature does not verify.
    let (st, _) = s
        .json(M::GET, "/Patient/p1", Some(&format!("{patients}x")), None)
        .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
}

/// Type and system history list a whole type, as a search does (SMART v2 puts them under `s`):
/// a client that may read Observations by id but not search them (`system/Observation.r`)
/// listed every Observation through `GET /Observation/_history`, its earlier versions too.
/// They now need `r` and `s`; instance history still needs `r` alone.
#[tokio::test]
async fn type_and_system_history_need_search_as_well_as_read() {
    let s = start().await;
    use reqwest::Method as M;
    let admin = s.token("admin", "system/*.cruds").await;
    let (st, _) = s
        .json(
            M::PUT,
            "/Observation/o1",
            Some(&admin),
            Some(
                json!({"resourceType": "Observation", "id": "o1", "status": "final",
                "code": {"text": "secret"}}),
            ),
        )
        .await;
    assert!(st.is_success(), "{st}");

    let read_only = s.token("observations", "system/Observation.r").await;
    assert_eq!(
        s.json(M::GET, "/Observation/o1", Some(&read_only), None)
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        s.json(M::GET, "/Observation/o1/_history", Some(&read_only), None)
            .await
            .0,
        StatusCode::OK
    );
    let (st, b) = s
        .json(M::GET, "/Observation?code=x", Some(&read_only), None)
        .await;
    forbidden(st, &b);
    let (st, b) = s
        .json(M::GET, "/Observation/_history", Some(&read_only), None)
        .await;
    forbidden(st, &b);
    assert!(!b.to_string().contains("secret"), "{b}");
    // The same interaction as a batch entry.
    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Observation/_history"}}
    ]});
    let (st, b) = s.json(M::POST, "/", Some(&read_only), Some(batch)).await;
    forbidden(st, &b);
    // Search alone does not read earlier versions either.
    let search_only = s.token("observations", "system/Observation.s").await;
    let (st, b) = s
        .json(M::GET, "/Observation/_history", Some(&search_only), None)
        .await;
    forbidden(st, &b);
    // `rs` (v1 `read`) lists them.
    for scope in ["system/Observation.rs", "system/Observation.read"] {
        let token = s.token("observations", scope).await;
        let (st, b) = s
            .json(M::GET, "/Observation/_history", Some(&token), None)
            .await;
        assert_eq!(st, StatusCode::OK, "{scope}: {b}");
        assert_eq!(b["entry"][0]["resource"]["id"], "o1", "{scope}: {b}");
    }

    // System history: `r` on every type is not enough, `rs` is.
    let read_all = s.token("admin", "system/*.r").await;
    let (st, b) = s.json(M::GET, "/_history", Some(&read_all), None).await;
    forbidden(st, &b);
    let rs_all = s.token("admin", "system/*.rs").await;
    assert_eq!(
        s.json(M::GET, "/_history", Some(&rs_all), None).await.0,
        StatusCode::OK
    );
}
