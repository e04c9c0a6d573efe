//! SMART scopes on Bulk Data `$export` and `$import` over real HTTP: per-type checks at
//! kick-off, the type list without `_type`, and status, cancel and downloads (export files,
//! import error files) only for the client that started the job.
//! (Test keys: crates/auth/tests/data, see PROVENANCE.md there.)

mod common;

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use common::SmartServer as Server;

async fn start() -> Server {
    common::start_smart(
        "rsa-a.pem",
        &[
            ("admin", "system/*.cruds"),
            ("exporter", "system/Patient.rs system/Observation.read"),
            ("other", "system/Patient.rs system/Observation.read"),
            ("observations", "system/Observation.rs"),
            ("importer", "system/Patient.cruds system/Observation.rs"),
        ],
        1 << 20,
    )
    .await
}

impl Server {
    async fn kickoff(&self, path: &str, token: &str) -> (StatusCode, String) {
        let (st, h, body) = self.send(Method::GET, path, Some(token), None).await;
        let loc = h
            .get("content-location")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or(body);
        (st, loc)
    }
}

fn assert_forbidden(st: StatusCode, body: &str, needle: &str) {
    assert_eq!(st, StatusCode::FORBIDDEN, "{body}");
    assert!(
        body.contains("OperationOutcome") && body.contains(needle),
        "{body}"
    );
}

#[tokio::test]
async fn export_is_limited_to_scopes_and_to_its_client() {
    let s = start().await;
    let admin = s.token("admin", "system/*.cruds").await;
    for (path, resource) in [
        (
            "/Patient/p1",
            json!({"resourceType": "Patient", "id": "p1"}),
        ),
        (
            "/Observation/o1",
            json!({"resourceType": "Observation", "id": "o1", "status": "final",
                "code": {"text": "x"}, "subject": {"reference": "Patient/p1"}}),
        ),
        (
            "/Encounter/e1",
            json!({"resourceType": "Encounter", "id": "e1", "status": "finished",
                "class": {"code": "AMB"}, "subject": {"reference": "Patient/p1"}}),
        ),
        (
            "/Group/g1",
            json!({"resourceType": "Group", "id": "g1", "type": "person", "actual": true,
                "member": [{"entity": {"reference": "Patient/p1"}}]}),
        ),
    ] {
        let (st, _, body) = s
            .send(Method::PUT, path, Some(&admin), Some(resource))
            .await;
        assert!(st.is_success(), "{path}: {body}");
    }

    let exporter = s.token("exporter", "system/*.read").await;
    let other = s.token("other", "system/*.read").await;
    let observations = s.token("observations", "system/Observation.rs").await;

    // Kick-off: without a token 401; every requested type needs read + search.
    let (st, _, _) = s.send(Method::GET, "/$export", None, None).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let (st, body) = s
        .kickoff("/$export?_type=Patient,Encounter", &exporter)
        .await;
    assert_forbidden(st, &body, "Encounter");
    // Patient-level export needs Patient; Group-level needs Group too.
    let (st, body) = s
        .kickoff("/Patient/$export?_type=Observation", &observations)
        .await;
    assert_forbidden(st, &body, "Patient");
    let (st, body) = s.kickoff("/Group/g1/$export", &exporter).await;
    assert_forbidden(st, &body, "Group");

    // Without `_type`: exactly the types the scopes allow (Encounter and Group are withheld).
    let (st, status_url) = s.kickoff("/$export", &exporter).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{status_url}");
    // Another client cannot see, poll or cancel it.
    let (st, _, _) = s.send(Method::GET, &status_url, Some(&other), None).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let manifest = s.manifest(&status_url, &exporter).await;
    assert_eq!(manifest["requiresAccessToken"], true);
    let mut types: Vec<&str> = manifest["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["type"].as_str().unwrap())
        .collect();
    types.sort();
    assert_eq!(types, vec!["Observation", "Patient"], "{manifest}");

    // Downloads: the token is required, and only the exporting client gets the file.
    let file_url = manifest["output"][0]["url"].as_str().unwrap().to_owned();
    let (st, _, _) = s.send(Method::GET, &file_url, None, None).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let (st, _, _) = s.send(Method::GET, &file_url, Some(&other), None).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (st, _, _) = s.send(Method::GET, &file_url, Some(&admin), None).await;
    assert_eq!(st, StatusCode::NOT_FOUND, "even a client with wider scopes");
    let (st, _, ndjson) = s.send(Method::GET, &file_url, Some(&exporter), None).await;
    assert_eq!(st, StatusCode::OK);
    assert!(!ndjson.trim().is_empty());

    // Cancel: others get 404 and the job stays; the owner's cancel removes it.
    let (st, _, _) = s
        .send(Method::DELETE, &status_url, Some(&other), None)
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (st, _, _) = s
        .send(Method::GET, &status_url, Some(&exporter), None)
        .await;
    assert_eq!(st, StatusCode::OK);
    let (st, _, _) = s
        .send(Method::DELETE, &status_url, Some(&exporter), None)
        .await;
    assert_eq!(st, StatusCode::ACCEPTED);
    let (st, _, _) = s
        .send(Method::GET, &status_url, Some(&exporter), None)
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);

    // An explicit `_type` within the scopes is accepted, at Patient level too.
    let (st, status_url) = s
        .kickoff("/Patient/$export?_type=Observation", &exporter)
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{status_url}");
    let manifest = s.manifest(&status_url, &exporter).await;
    let types: Vec<&str> = manifest["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, vec!["Observation"], "{manifest}");
    // The admin may export the Group.
    let (st, _) = s.kickoff("/Group/g1/$export", &admin).await;
    assert_eq!(st, StatusCode::ACCEPTED);
}

#[tokio::test]
async fn expired_or_foreign_tokens_cannot_poll() {
    let s = start().await;
    let exporter = s.token("exporter", "system/Patient.rs").await;
    let (st, status_url) = s.kickoff("/$export?_type=Patient", &exporter).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{status_url}");
    let scopes = auth::Scopes::parse("system/Patient.rs").unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    // Issued by this server for the owner, but past its lifetime.
    let expired = s
        .auth
        .smart_auth()
        .unwrap()
        .issuer()
        .issue("exporter", &scopes, now - 1000)
        .unwrap();
    let (st, h, body) = s.send(Method::GET, &status_url, Some(&expired), None).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    assert!(body.contains("expired"), "{body}");
    assert!(h.get("www-authenticate").is_some());
    // Signed by another server process's key.
    let foreign = auth::TokenIssuer::new(s.base.clone(), Duration::from_secs(300))
        .issue("exporter", &scopes, now)
        .unwrap();
    let (st, _, _) = s.send(Method::GET, &status_url, Some(&foreign), None).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    // The owner's live token still works.
    let (st, _, _) = s
        .send(Method::GET, &status_url, Some(&exporter), None)
        .await;
    assert!(st == StatusCode::OK || st == StatusCode::ACCEPTED, "{st}");
}

/// One client holds at most its share of the export slots (`--export-max-per-client`, by
/// default half of `--export-max-concurrent`): before, a client kicking off four exports took
/// every slot of the default four and every other client's kick-off answered 429 until they
/// ended. Its kick-offs beyond the share answer 429 with Retry-After, another client's are
/// still admitted, and the global limit still holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_client_cannot_hold_every_export_slot() {
    // No workers: admitted exports stay queued, so each holds its slot.
    let s = std::sync::Arc::new(
        common::start_smart_export(
            "rsa-a.pem",
            &[
                ("exporter", "system/Patient.rs"),
                ("other", "system/Patient.rs"),
                ("third", "system/Patient.rs"),
            ],
            1 << 20,
            |c| {
                c.workers = 0;
                c.max_concurrent = 4;
            },
        )
        .await,
    );
    let exporter = s.token("exporter", "system/Patient.rs").await;
    let other = s.token("other", "system/Patient.rs").await;
    let third = s.token("third", "system/Patient.rs").await;
    // Six simultaneous kick-offs of one client: two admitted (its share), atomically.
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let (s, t) = (s.clone(), exporter.clone());
        tasks.push(tokio::spawn(async move {
            s.send(Method::GET, "/$export?_type=Patient", Some(&t), None)
                .await
        }));
    }
    let mut accepted = Vec::new();
    for t in tasks {
        let (st, h, body) = t.await.unwrap();
        match st {
            StatusCode::ACCEPTED => {
                accepted.push(h["content-location"].to_str().unwrap().to_owned())
            }
            StatusCode::TOO_MANY_REQUESTS => {
                assert!(h.contains_key("retry-after"), "{h:?}");
                assert!(
                    body.contains("OperationOutcome") && body.contains("throttled"),
                    "{body}"
                );
            }
            other => panic!("kick-off answered {other}: {body}"),
        }
    }
    assert_eq!(accepted.len(), 2, "one client's share of four slots");
    // Another client is still admitted, up to its own share.
    for _ in 0..2 {
        let (st, _, body) = s
            .send(Method::GET, "/$export?_type=Patient", Some(&other), None)
            .await;
        assert_eq!(st, StatusCode::ACCEPTED, "{body}");
    }
    // Every slot is taken now: the global limit refuses a third client.
    let (st, h, body) = s
        .send(Method::GET, "/$export?_type=Patient", Some(&third), None)
        .await;
    assert_eq!(st, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert!(h.contains_key("retry-after"));
    // A cancelled export gives its client's slot back.
    let (st, _, _) = s
        .send(Method::DELETE, &accepted[0], Some(&exporter), None)
        .await;
    assert_eq!(st, StatusCode::ACCEPTED);
    let (st, _, body) = s
        .send(Method::GET, "/$export?_type=Patient", Some(&exporter), None)
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{body}");
}

/// A stored de-identification key set is used only by the clients granted it (`key_sets` in
/// the clients file, `"*"` for every one): before, any client that could export could name any
/// key set, and a client that may read the raw data could pair a raw export with a
/// de-identified one under another release's key set — the map from real ids and dates to that
/// release's pseudonyms and shifts. A key set not granted answers 403 whether it exists or not
/// (its name tells nothing), and a de-identified export without a key set stays allowed.
#[tokio::test(flavor = "multi_thread")]
async fn a_key_set_is_used_only_by_the_clients_granted_it() {
    let s = common::start_smart_registered(
        "rsa-a.pem",
        &[
            json!({"client_id": "releaser", "scope": "system/Patient.rs", "key_sets": ["research"]}),
            json!({"client_id": "reader", "scope": "system/Patient.rs"}),
            json!({"client_id": "steward", "scope": "system/Patient.rs", "key_sets": ["*"]}),
        ],
        1 << 20,
        |c| c.workers = 0,
    )
    .await;
    let config = json!({"fhirVersion": "R4", "fhirPathRules": [
        {"path": "Resource.id", "method": "cryptoHash"}
    ]});
    let dir = s.dir.path().join("storage/anonymization");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("empty-keys.json"), config.to_string()).unwrap();
    let queue = s.db.store.jobs().unwrap();
    tokio::task::spawn_blocking(move || {
        for name in ["research", "other"] {
            let keys = deid::keys::Keys::generate();
            let set = store::keysets::KeySet {
                name: name.into(),
                version: 1,
                crypto_hash_key: keys.crypto_hash_key,
                encrypt_key: keys.encrypt_key,
                date_shift_key: keys.date_shift_key,
                created_ms: 0,
                rotated_ms: None,
            };
            assert!(queue.key_sets().unwrap().create_key_set(&set).unwrap());
        }
    })
    .await
    .unwrap();
    let kickoff = |key_set: &str| {
        let mut path =
            "/$export?_type=Patient&_container=deid&_anonymizationConfig=empty-keys.json"
                .to_string();
        if !key_set.is_empty() {
            path.push_str("&_anonymizationKeySet=");
            path.push_str(key_set);
        }
        path
    };
    let releaser = s.token("releaser", "system/Patient.rs").await;
    let reader = s.token("reader", "system/Patient.rs").await;
    let steward = s.token("steward", "system/Patient.rs").await;
    for (token, key_set, allowed) in [
        (&releaser, "research", true),
        (&releaser, "other", false),
        (&reader, "research", false),
        (&reader, "nope", false),
        (&reader, "", true),
        (&steward, "other", true),
    ] {
        let (st, _, body) = s
            .send(Method::GET, &kickoff(key_set), Some(token), None)
            .await;
        if allowed {
            assert_eq!(st, StatusCode::ACCEPTED, "{key_set}: {body}");
        } else {
            assert_forbidden(st, &body, &format!("key set `{key_set}`"));
        }
    }
    // A key set that does not exist, granted: the kick-off's 400 as before.
    let (st, _, body) = s
        .send(Method::GET, &kickoff("nope"), Some(&steward), None)
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.contains("\"_anonymizationKeySet\""), "{body}");
}

/// `$import` Parameters (IncrementalLoad) with one input per `(type, url)`.
fn import_parameters(inputs: &[(&str, &str)]) -> Value {
    let mut params = vec![
        json!({"name": "inputFormat", "valueString": "application/fhir+ndjson"}),
        json!({"name": "mode", "valueString": "IncrementalLoad"}),
    ];
    for (t, url) in inputs {
        params.push(json!({"name": "input", "part": [
            {"name": "type", "valueString": t},
            {"name": "url", "valueUri": url},
        ]}));
    }
    json!({"resourceType": "Parameters", "parameter": params})
}

#[tokio::test]
async fn import_is_limited_to_write_scopes_and_to_its_client() {
    let s = start().await;
    // Objects of the server's storage (local folder: <storage>/<container>/<path>).
    let imports = s.dir.path().join("storage/imports");
    std::fs::create_dir_all(&imports).unwrap();
    std::fs::write(
        imports.join("patients.ndjson"),
        "{\"resourceType\":\"Patient\",\"id\":\"p1\"}\nnot json\n",
    )
    .unwrap();
    std::fs::write(
        imports.join("obs.ndjson"),
        "{\"resourceType\":\"Observation\",\"id\":\"o1\",\"status\":\"final\",\"code\":{\"text\":\"x\"}}\n",
    )
    .unwrap();
    let admin = s.token("admin", "system/*.cruds").await;
    let importer = s
        .token("importer", "system/Patient.cruds system/Observation.rs")
        .await;
    let other = s.token("other", "system/*.read").await;
    let both = import_parameters(&[
        ("Patient", "imports/patients.ndjson"),
        ("Observation", "imports/obs.ndjson"),
    ]);

    // Without a token 401; without `c`/`u` on one input type 403, and nothing is loaded.
    let (st, _, _) = s
        .send(Method::POST, "/$import", None, Some(both.clone()))
        .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let (st, _, body) = s
        .send(Method::POST, "/$import", Some(&importer), Some(both))
        .await;
    assert_forbidden(st, &body, "Observation");
    assert!(
        !body.contains("importing Patient"),
        "only the refused type: {body}"
    );
    let (st, _, body) = s
        .send(
            Method::POST,
            "/$import",
            Some(&other),
            Some(import_parameters(&[("Patient", "imports/patients.ndjson")])),
        )
        .await;
    assert_forbidden(st, &body, "Patient");
    tokio::time::sleep(Duration::from_millis(300)).await;
    for path in ["/Patient/p1", "/Observation/o1"] {
        let (st, _, _) = s.send(Method::GET, path, Some(&admin), None).await;
        assert_eq!(st, StatusCode::NOT_FOUND, "{path} was loaded");
    }

    // Within its scopes the import runs; only its client sees, polls and cancels it.
    let patients = import_parameters(&[("Patient", "imports/patients.ndjson")]);
    let (st, h, body) = s
        .send(Method::POST, "/$import", Some(&importer), Some(patients))
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{body}");
    let status_url = h["content-location"].to_str().unwrap().to_owned();
    for token in [&other, &admin] {
        let (st, _, body) = s.send(Method::GET, &status_url, Some(token), None).await;
        assert_eq!(st, StatusCode::NOT_FOUND, "{body}");
        assert!(body.contains("OperationOutcome"), "{body}");
    }
    let (st, _, _) = s.send(Method::GET, &status_url, None, None).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let (st, _, _) = s
        .send(Method::DELETE, &status_url, Some(&other), None)
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let result = s.manifest(&status_url, &importer).await;
    assert_eq!(result["output"][0]["count"], 1, "{result}");
    let (st, _, _) = s.send(Method::GET, "/Patient/p1", Some(&admin), None).await;
    assert_eq!(st, StatusCode::OK);

    // The error file ("not json" on line 2): the token is required, only the importer gets it.
    let error_url = result["error"][0]["url"].as_str().unwrap().to_owned();
    assert!(error_url.contains("/import-files/"), "{error_url}");
    let (st, _, _) = s.send(Method::GET, &error_url, None, None).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    for token in [&other, &admin] {
        let (st, _, body) = s.send(Method::GET, &error_url, Some(token), None).await;
        assert_eq!(st, StatusCode::NOT_FOUND, "{body}");
    }
    let (st, _, text) = s.send(Method::GET, &error_url, Some(&importer), None).await;
    assert_eq!(st, StatusCode::OK);
    assert!(
        text.contains("OperationOutcome") && text.contains("line 2"),
        "{text}"
    );

    // Cancel: another client's DELETE is 404 and the job stays; the importer's removes it.
    let (st, _, _) = s
        .send(Method::DELETE, &status_url, Some(&other), None)
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (st, _, _) = s
        .send(Method::GET, &status_url, Some(&importer), None)
        .await;
    assert_eq!(st, StatusCode::OK);
    let (st, _, _) = s
        .send(Method::DELETE, &status_url, Some(&importer), None)
        .await;
    assert_eq!(st, StatusCode::ACCEPTED);
    let (st, _, _) = s
        .send(Method::GET, &status_url, Some(&importer), None)
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
}

/// `$import` reads only the import container (`--import-container`, `imports` by default).
/// Before, an input could be any object of the storage outside `anonymization`: another
/// client's export output too (its folder is the export's job id), and the import's error
/// file named each refused line's `Type/id`, so an importer with `c` and `u` on Patient learnt
/// the ids in an export of Observations it may not read. Such inputs are refused (400 naming
/// `input`, before any object is read), and no export may write into the import container.
#[tokio::test]
async fn import_reads_only_the_import_container() {
    let s = start().await;
    let admin = s.token("admin", "system/*.cruds").await;
    for resource in [
        json!({"resourceType": "Patient", "id": "p1"}),
        json!({"resourceType": "Observation", "id": "o1", "status": "final",
                "code": {"text": "x"}, "subject": {"reference": "Patient/p1"}}),
    ] {
        s.put(&admin, resource).await;
    }
    let exporter = s.token("exporter", "system/*.read").await;
    let (st, status_url) = s.kickoff("/$export?_type=Observation", &exporter).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{status_url}");
    let manifest = s.manifest(&status_url, &exporter).await;
    let location = manifest["extension"]["storage"]["location"]
        .as_str()
        .unwrap();
    let url = manifest["output"][0]["url"].as_str().unwrap();
    let name = url.rsplit('/').next().unwrap();
    let exported = format!("{location}/{name}");

    let importer = s
        .token("importer", "system/Patient.cruds system/Observation.rs")
        .await;
    // Another container of the storage, e.g. a file an operator left beside the exports.
    let elsewhere = s.dir.path().join("storage/other");
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::fs::write(
        elsewhere.join("p.ndjson"),
        "{\"resourceType\": \"Patient\", \"id\": \"p9\"}\n",
    )
    .unwrap();
    for input in [exported.as_str(), "other/p.ndjson"] {
        let (st, _, body) = s
            .send(
                Method::POST,
                "/$import",
                Some(&importer),
                Some(import_parameters(&[("Patient", input)])),
            )
            .await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{input}: {body}");
        assert!(
            body.contains("OperationOutcome") && body.contains("input") && body.contains("imports"),
            "{input}: {body}"
        );
    }
    // No export writes into the import container.
    let (st, body) = s
        .kickoff("/$export?_type=Observation&_container=imports", &exporter)
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.contains("_container"), "{body}");
}
