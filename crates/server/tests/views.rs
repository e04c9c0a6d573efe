//! SQL on FHIR v2 over real HTTP (issue 20): stored ViewDefinitions, `$viewdefinition-run` in
//! every format (streamed from the store, inline resources, stored instance, by reference),
//! `$viewdefinition-export` through the `$export` job queue into the storage folder (Parquet read
//! back by pyarrow when `FHIRHOSE_TEST_PYARROW` is set), de-identified views, invalid
//! ViewDefinitions as 400 OperationOutcomes, and SMART scopes. Small data written over HTTP.
//! (Test keys: crates/auth/tests/data, see PROVENANCE.md there.)

mod common;

use std::path::Path;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

fn patients_view() -> Value {
    json!({"resourceType": "ViewDefinition", "name": "patients", "status": "active",
        "url": "https://example.org/views/patients", "resource": "Patient",
        "select": [{"column": [
            {"name": "id", "path": "getResourceKey()", "type": "id"},
            {"name": "family", "path": "name.first().family", "type": "string"},
            {"name": "birth", "path": "birthDate", "type": "date"},
            {"name": "active", "path": "active", "type": "boolean"}]}]})
}

fn observations_view() -> Value {
    json!({"resourceType": "ViewDefinition", "name": "observations", "status": "active",
        "resource": "Observation",
        "select": [
            {"column": [
                {"name": "id", "path": "getResourceKey()", "type": "id"},
                {"name": "patient", "path": "subject.getReferenceKey(Patient)", "type": "string"}]},
            {"forEach": "component", "column": [
                {"name": "code", "path": "code.coding.first().code", "type": "code"},
                {"name": "value", "path": "value.ofType(Quantity).value", "type": "decimal"}]}]})
}

/// Three patients, each with one blood pressure Observation (two components).
fn resources() -> Vec<Value> {
    let mut out = Vec::new();
    for (i, family) in ["Chalmers", "Windsor", "Baker"].iter().enumerate() {
        out.push(
            json!({"resourceType": "Patient", "id": format!("p{i}"), "active": i != 1,
            "birthDate": format!("198{i}-02-03"), "name": [{"family": family, "given": ["Pat"]}]}),
        );
        out.push(
            json!({"resourceType": "Observation", "id": format!("o{i}"), "status": "final",
            "code": {"text": "BP"}, "subject": {"reference": format!("Patient/p{i}")},
            "component": [
                {"code": {"coding": [{"code": "8480-6"}]}, "valueQuantity": {"value": 120 + i}},
                {"code": {"coding": [{"code": "8462-4"}]}, "valueQuantity": {"value": 80.5}}]}),
        );
    }
    out
}

struct Server {
    base: String,
    c: reqwest::Client,
    token: Option<String>,
    dir: tempfile::TempDir,
    _db: store::testing::TestStore,
}

impl Server {
    /// A server without authorization over the small data set.
    async fn start() -> Server {
        let s = common::start(&[], server::config::ExportOptions::default()).await;
        let server = Server {
            base: s.base,
            c: s.c,
            token: None,
            dir: s.dir,
            _db: s.db,
        };
        server.load().await;
        server
    }

    async fn load(&self) {
        for r in resources() {
            let path = format!(
                "/{}/{}",
                r["resourceType"].as_str().unwrap(),
                r["id"].as_str().unwrap()
            );
            let (st, body) = self.json(Method::PUT, &path, Some(r)).await;
            assert!(st.is_success(), "{path}: {body}");
        }
    }

    async fn send(&self, method: Method, path: &str, body: Option<Value>) -> reqwest::Response {
        let url = if path.starts_with("http") {
            path.to_string()
        } else {
            format!("{}{path}", self.base)
        };
        let mut req = self.c.request(method, url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req
                .header("content-type", "application/fhir+json")
                .body(b.to_string());
        }
        req.send().await.unwrap()
    }

    async fn json(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let r = self.send(method, path, body).await;
        let st = r.status();
        let text = r.text().await.unwrap();
        (
            st,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// `POST /$viewdefinition-run` with an inline view; the status, Content-Type and body.
    async fn run(
        &self,
        view: Value,
        extra: Vec<Value>,
        query: &str,
    ) -> (StatusCode, String, Vec<u8>) {
        let mut params = vec![json!({"name": "viewResource", "resource": view})];
        params.extend(extra);
        let body = json!({"resourceType": "Parameters", "parameter": params});
        let r = self
            .send(
                Method::POST,
                &format!("/$viewdefinition-run{query}"),
                Some(body),
            )
            .await;
        let st = r.status();
        let ct = r
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        (st, ct, r.bytes().await.unwrap().to_vec())
    }

    /// POSTs an asynchronous kick-off (`path`: `/$viewdefinition-export` or `/$export`) of
    /// these parameters, with the client's token if it has one.
    async fn kick_off(&self, path: &str, params: Vec<Value>) -> reqwest::Response {
        let body = json!({"resourceType": "Parameters", "parameter": params});
        let mut req = self
            .c
            .post(format!("{}{path}", self.base))
            .header("accept", "application/fhir+json")
            .header("prefer", "respond-async")
            .header("content-type", "application/fhir+json")
            .body(body.to_string());
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        req.send().await.unwrap()
    }

    /// Kicks off a view export (202), polls to the manifest.
    async fn export(&self, params: Vec<Value>) -> Value {
        let r = self.kick_off("/$viewdefinition-export", params).await;
        assert_eq!(
            r.status(),
            StatusCode::ACCEPTED,
            "{}",
            r.text().await.unwrap()
        );
        let status_url = r.headers()["content-location"]
            .to_str()
            .unwrap()
            .to_string();
        for _ in 0..600 {
            let r = self.c.get(&status_url).send().await.unwrap();
            match r.status() {
                StatusCode::OK => return r.json().await.unwrap(),
                StatusCode::ACCEPTED => {
                    assert!(r.headers().contains_key("x-progress"));
                }
                StatusCode::TOO_MANY_REQUESTS => {}
                other => panic!("status {other}: {}", r.text().await.unwrap()),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the view export did not complete");
    }
}

fn lines(body: &[u8]) -> Vec<Value> {
    std::str::from_utf8(body)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `(types, rows, data)` of a Parquet file read by pyarrow, or `None` without pyarrow.
fn pyarrow_read(file: &Path) -> Option<Value> {
    const READER: &str = r#"
import json, sys
import pyarrow.parquet as pq
t = pq.read_table(sys.argv[1])
print(json.dumps({"types": {f.name: str(f.type) for f in t.schema}, "rows": t.num_rows,
  "data": t.to_pylist(), "codec": pq.ParquetFile(sys.argv[1]).metadata.row_group(0).column(0).compression}, default=str))
"#;
    let python = match std::env::var("FHIRHOSE_TEST_PYARROW") {
        Ok(p) if !p.is_empty() => p,
        _ => {
            assert!(
                std::env::var("FHIRHOSE_REQUIRE_EXTERNAL").as_deref() != Ok("1"),
                "FHIRHOSE_TEST_PYARROW is not set (run scripts/pyarrow.sh)"
            );
            eprintln!("skipped the pyarrow read-back: FHIRHOSE_TEST_PYARROW is not set");
            return None;
        }
    };
    let out = std::process::Command::new(python)
        .args(["-c", READER, file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(serde_json::from_slice(&out.stdout).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn view_definitions_are_stored_searched_and_listed() {
    let s = Server::start().await;
    let mut v = patients_view();
    v["id"] = json!("patients");
    let (st, body) = s
        .json(Method::PUT, "/ViewDefinition/patients", Some(v))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
    let (st, read) = s.json(Method::GET, "/ViewDefinition/patients", None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(read["name"], "patients");
    assert_eq!(read["meta"]["versionId"], "1");
    for q in [
        "name=patients",
        "url=https://example.org/views/patients",
        "",
    ] {
        let (st, b) = s
            .json(Method::GET, &format!("/ViewDefinition?{q}"), None)
            .await;
        assert_eq!(st, StatusCode::OK, "{b}");
        assert_eq!(b["entry"].as_array().unwrap().len(), 1, "{q}: {b}");
        assert_eq!(b["entry"][0]["resource"]["id"], "patients");
    }
    let (_, b) = s
        .json(Method::GET, "/ViewDefinition?name=other", None)
        .await;
    assert_eq!(b["entry"].as_array().unwrap().len(), 0);
    let (st, b) = s
        .json(Method::GET, "/ViewDefinition?status=active", None)
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{b}");

    // An invalid ViewDefinition is not stored.
    let mut bad = patients_view();
    bad["id"] = json!("bad");
    bad["select"][0]["column"][1]["path"] = json!("name.frobnicate()");
    let (st, b) = s.json(Method::PUT, "/ViewDefinition/bad", Some(bad)).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{b}");
    assert_eq!(
        b["issue"][0]["expression"][0],
        "ViewDefinition.select[0].column[1].path"
    );
    assert!(
        b.to_string().contains("unknown function 'frobnicate'"),
        "{b}"
    );

    let (_, cap) = s.json(Method::GET, "/metadata", None).await;
    let rest = &cap["rest"][0];
    let vd = rest["resource"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["type"] == "ViewDefinition")
        .expect("ViewDefinition in the CapabilityStatement");
    for op in ["viewdefinition-run", "viewdefinition-export"] {
        assert!(
            vd["operation"]
                .as_array()
                .unwrap()
                .iter()
                .any(|o| o["name"] == op),
            "{op}"
        );
        assert!(
            rest["operation"]
                .as_array()
                .unwrap()
                .iter()
                .any(|o| o["name"] == op),
            "{op}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_answers_every_format_streamed_from_the_store() {
    let s = Server::start().await;
    // json
    let (st, ct, body) = s.run(patients_view(), vec![], "").await;
    assert_eq!(st, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    assert!(ct.starts_with("application/json"), "{ct}");
    let rows: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        rows,
        json!([
            {"id": "p0", "family": "Chalmers", "birth": "1980-02-03", "active": true},
            {"id": "p1", "family": "Windsor", "birth": "1981-02-03", "active": false},
            {"id": "p2", "family": "Baker", "birth": "1982-02-03", "active": true}])
    );
    // ndjson, forEach: two rows per Observation
    let (st, ct, body) = s
        .run(
            observations_view(),
            vec![json!({"name": "_format", "valueCode": "ndjson"})],
            "",
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    assert!(ct.contains("ndjson"), "{ct}");
    let rows = lines(&body);
    assert_eq!(rows.len(), 6);
    assert_eq!(
        rows[0],
        json!({"id": "o0", "patient": "p0", "code": "8480-6", "value": 120})
    );
    // csv with and without header; _limit in the query
    let (_, ct, body) = s.run(patients_view(), vec![], "?_format=csv").await;
    assert!(ct.starts_with("text/csv"), "{ct}");
    assert_eq!(
        String::from_utf8(body).unwrap(),
        "id,family,birth,active\np0,Chalmers,1980-02-03,true\np1,Windsor,1981-02-03,false\np2,Baker,1982-02-03,true\n"
    );
    let (_, _, body) = s
        .run(
            patients_view(),
            vec![json!({"name": "header", "valueBoolean": false})],
            "?_format=text/csv&_limit=2",
        )
        .await;
    assert_eq!(
        String::from_utf8(body).unwrap(),
        "p0,Chalmers,1980-02-03,true\np1,Windsor,1981-02-03,false\n"
    );
    // patient: one patient's compartment
    let (_, _, body) = s
        .run(
            observations_view(),
            vec![
                json!({"name": "patient", "valueReference": {"reference": "Patient/p1"}}),
                json!({"name": "_format", "valueCode": "ndjson"}),
            ],
            "",
        )
        .await;
    let rows = lines(&body);
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r["patient"] == "p1"), "{rows:?}");
    // _since: only what changed after it
    tokio::time::sleep(Duration::from_millis(20)).await;
    let since = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut p = resources()[2].clone();
    assert_eq!(p["id"], "p1");
    p["active"] = json!(true);
    let (st, b) = s.json(Method::PUT, "/Patient/p1", Some(p)).await;
    assert!(st.is_success(), "{b}");
    let (_, _, body) = s
        .run(
            patients_view(),
            vec![
                json!({"name": "_since", "valueInstant": since}),
                json!({"name": "_format", "valueCode": "ndjson"}),
            ],
            "",
        )
        .await;
    let rows = lines(&body);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["id"], "p1");
    assert_eq!(rows[0]["active"], true);
    // inline resources instead of server data
    let inline = json!({"resourceType": "Patient", "id": "x1", "name": [{"family": "Inline"}]});
    let (_, _, body) = s
        .run(
            patients_view(),
            vec![
                json!({"name": "resource", "resource": inline}),
                json!({"name": "_format", "valueCode": "ndjson"}),
            ],
            "",
        )
        .await;
    assert_eq!(
        lines(&body),
        vec![json!({"id": "x1", "family": "Inline", "birth": null, "active": null})]
    );
    // parquet
    let (st, ct, body) = s.run(patients_view(), vec![], "?_format=parquet").await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(ct, "application/vnd.apache.parquet");
    assert_eq!(&body[..4], b"PAR1");
    assert_eq!(&body[body.len() - 4..], b"PAR1");
    let file = s.dir.path().join("run.parquet");
    std::fs::write(&file, &body).unwrap();
    if let Some(t) = pyarrow_read(&file) {
        assert_eq!(t["rows"], 3);
        assert_eq!(t["types"]["active"], "bool");
        assert_eq!(t["types"]["family"], "string");
        assert_eq!(t["data"][0]["family"], "Chalmers");
    }
    // an unknown format is a 400 naming _format
    let (st, _, body) = s.run(patients_view(), vec![], "?_format=xml").await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&body).contains("_format"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_view_runs_at_instance_level_and_by_reference() {
    let s = Server::start().await;
    let mut v = observations_view();
    v["id"] = json!("obs");
    v["url"] = json!("https://example.org/views/obs");
    let (st, b) = s.json(Method::PUT, "/ViewDefinition/obs", Some(v)).await;
    assert_eq!(st, StatusCode::CREATED, "{b}");
    for path in [
        "/ViewDefinition/obs/$viewdefinition-run?_format=csv",
        "/$viewdefinition-run?viewReference=ViewDefinition/obs&_format=csv",
        "/ViewDefinition/$viewdefinition-run?viewReference=https://example.org/views/obs&_format=csv",
    ] {
        let r = s.send(Method::GET, path, None).await;
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        let text = r.text().await.unwrap();
        assert_eq!(text.lines().count(), 7, "{path}: {text}");
        assert_eq!(text.lines().next(), Some("id,patient,code,value"));
    }
    let (st, b) = s
        .json(
            Method::GET,
            "/ViewDefinition/nope/$viewdefinition-run",
            None,
        )
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{b}");
    let (st, b) = s
        .json(
            Method::GET,
            "/$viewdefinition-run?viewReference=ViewDefinition/nope",
            None,
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{b}");
}

/// Two stored views of one canonical url (a second one planted by another client, or the real
/// one moved behind it in the store's order by an update): a reference by that url is refused
/// as ambiguous, naming both, instead of running whichever the store lists first; `url|version`
/// and `ViewDefinition/id` still tell them apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canonical_url_of_several_stored_views_is_refused_as_ambiguous() {
    let s = Server::start().await;
    let mut real = observations_view();
    real["id"] = json!("real");
    real["url"] = json!("https://example.org/views/obs");
    real["version"] = json!("1");
    let (st, b) = s
        .json(Method::PUT, "/ViewDefinition/real", Some(real.clone()))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{b}");
    let by_url = "/$viewdefinition-run?viewReference=https://example.org/views/obs&_format=csv";
    let r = s.send(Method::GET, by_url, None).await;
    assert_eq!(r.status(), StatusCode::OK);

    let mut planted = patients_view();
    planted["id"] = json!("planted");
    planted["url"] = json!("https://example.org/views/obs");
    planted["version"] = json!("2");
    let (st, b) = s
        .json(Method::PUT, "/ViewDefinition/planted", Some(planted))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{b}");
    // The real one updated: it now comes after the planted one in the store's order.
    let (st, b) = s
        .json(Method::PUT, "/ViewDefinition/real", Some(real))
        .await;
    assert_eq!(st, StatusCode::OK, "{b}");

    let (st, b) = s.json(Method::GET, by_url, None).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{b}");
    let text = b.to_string();
    assert!(
        text.contains("is ambiguous: 2 stored ViewDefinitions"),
        "{text}"
    );
    assert!(text.contains("planted, real"), "{text}");
    for (path, header) in [
        (
            "/$viewdefinition-run?viewReference=https://example.org/views/obs|1&_format=csv",
            "id,patient,code,value",
        ),
        (
            "/$viewdefinition-run?viewReference=ViewDefinition/real&_format=csv",
            "id,patient,code,value",
        ),
    ] {
        let r = s.send(Method::GET, path, None).await;
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        let text = r.text().await.unwrap();
        assert_eq!(text.lines().next(), Some(header), "{path}: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_view_definitions_are_400_naming_element_and_reason() {
    let s = Server::start().await;
    let unknown_function = {
        let mut v = patients_view();
        v["select"][0]["column"][1]["path"] = json!("name.frobnicate()");
        v
    };
    let collision = {
        let mut v = patients_view();
        v["select"][0]["column"][1]["name"] = json!("id");
        v
    };
    let union = json!({"resourceType": "ViewDefinition", "name": "u", "resource": "Patient", "select": [
        {"unionAll": [
            {"column": [{"name": "a", "path": "id"}]},
            {"column": [{"name": "b", "path": "id"}]}]}]});
    let cases = [
        (
            unknown_function,
            "select[0].column[1].path",
            "unknown function 'frobnicate'",
        ),
        (
            collision,
            "select[0].column[1]",
            "column name 'id' is already defined",
        ),
        (union, "select[0].unionAll[1]", "unionAll branch"),
    ];
    for (view, element, reason) in cases {
        let (st, _, body) = s.run(view.clone(), vec![], "").await;
        let oo: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(st, StatusCode::BAD_REQUEST, "{oo}");
        assert_eq!(oo["resourceType"], "OperationOutcome");
        let expr = oo["issue"][0]["expression"][0].as_str().unwrap();
        assert!(
            expr.starts_with(&format!("ViewDefinition.{element}")),
            "{expr} vs {element}"
        );
        assert!(oo.to_string().contains(reason), "{oo}");
        // the same at export kick-off
        let r = s
            .kick_off(
                "/$viewdefinition-export",
                vec![json!({"name": "view", "part": [{"name": "viewResource", "resource": view}]})],
            )
            .await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let oo: Value = r.json().await.unwrap();
        assert!(oo.to_string().contains(reason), "{oo}");
    }
    // Not JSON of a view at all, and no view.
    let (st, _, _) = s
        .run(json!({"resourceType": "ViewDefinition"}), vec![], "")
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let (st, b) = s
        .json(
            Method::POST,
            "/$viewdefinition-run",
            Some(json!({"resourceType": "Parameters"})),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{b}");
    // A malformed `parameter` is refused, not skipped: before, its `patient` was dropped and
    // the run covered every patient.
    let view = json!({"resourceType": "ViewDefinition", "resource": "Patient", "status": "active",
        "select": [{"column": [{"name": "id", "path": "id"}]}]});
    for body in [
        json!({"resourceType": "Parameters", "parameter": {"name": "patient", "valueString": "p1"}}),
        json!({"resourceType": "Parameters", "parameters": [{"name": "viewResource", "resource": view}]}),
    ] {
        let (st, b) = s
            .json(Method::POST, "/$viewdefinition-run", Some(body))
            .await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{b}");
        assert!(b.to_string().contains("parameter"), "{b}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn view_export_writes_numbered_files_of_each_format_to_the_folder() {
    let s = Server::start().await;
    let mut stored = observations_view();
    stored["id"] = json!("obs");
    assert!(
        s.json(Method::PUT, "/ViewDefinition/obs", Some(stored))
            .await
            .0
            .is_success()
    );
    for (format, ext) in [("parquet", "parquet"), ("csv", "csv"), ("ndjson", "ndjson")] {
        let m = s
            .export(vec![
                json!({"name": "view", "part": [{"name": "viewResource", "resource": patients_view()}]}),
                json!({"name": "view", "part": [{"name": "name", "valueString": "obs_rows"},
                    {"name": "viewReference", "valueReference": {"reference": "ViewDefinition/obs"}}]}),
                json!({"name": "_format", "valueCode": format}),
            ])
            .await;
        let out = m["output"].as_array().unwrap();
        let find = |t: &str| {
            out.iter()
                .find(|o| o["type"] == t)
                .unwrap_or_else(|| panic!("{t}: {m}"))
        };
        assert_eq!(find("patients")["count"], 3, "{m}");
        assert_eq!(find("obs_rows")["count"], 6, "{m}");
        let folder = s
            .dir
            .path()
            .join("storage")
            .join(m["extension"]["storage"]["container"].as_str().unwrap())
            .join(m["extension"]["storage"]["folder"].as_str().unwrap());
        let patients = folder.join(format!("patients-1.{ext}"));
        assert!(patients.exists(), "{m}");
        assert!(folder.join(format!("obs_rows-1.{ext}")).exists());
        let resp =
            s.c.get(find("patients")["url"].as_str().unwrap())
                .send()
                .await
                .unwrap();
        // Each file says what it is (CSV and Parquet were sent as FHIR NDJSON before).
        let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
        let expected = match format {
            "csv" => "text/csv; charset=utf-8",
            "parquet" => "application/vnd.apache.parquet",
            _ => "application/fhir+ndjson",
        };
        assert_eq!(ct, expected);
        let bytes = resp.bytes().await.unwrap();
        assert_eq!(bytes.as_ref(), std::fs::read(&patients).unwrap());
        match format {
            "csv" => {
                assert!(String::from_utf8_lossy(&bytes).starts_with("id,family,birth,active\n"))
            }
            "ndjson" => assert_eq!(lines(&bytes)[1]["family"], "Windsor"),
            _ => {
                assert_eq!(&bytes[..4], b"PAR1");
                if let Some(t) = pyarrow_read(&folder.join("obs_rows-1.parquet")) {
                    assert_eq!(t["rows"], 6);
                    assert_eq!(t["types"]["value"], "double");
                    assert_eq!(t["types"]["code"], "string");
                    assert_eq!(t["codec"], "SNAPPY");
                    assert_eq!(t["data"][1]["value"], 80.5);
                }
                if let Some(t) = pyarrow_read(&patients) {
                    assert_eq!(t["rows"], 3);
                    assert_eq!(t["types"]["active"], "bool");
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deidentified_view_sees_the_deidentified_resource() {
    let s = Server::start().await;
    let configs = s.dir.path().join("storage/anonymization");
    std::fs::create_dir_all(&configs).unwrap();
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deid/tests/corpus/shipped-configs/r4-configuration-sample.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    cfg["parameters"]["dateShiftKey"] = json!("date-shift-key-for-tests");
    cfg["parameters"]["cryptoHashKey"] = json!("crypto-hash-key-for-tests");
    cfg["parameters"]["encryptKey"] = json!("0123456789abcdef0123456789abcdef");
    std::fs::write(configs.join("sample.json"), cfg.to_string()).unwrap();
    // (The sample configuration removes Observation.code and .component.)
    let subjects = json!({"resourceType": "ViewDefinition", "name": "subjects", "resource": "Observation",
        "select": [{"column": [
            {"name": "id", "path": "getResourceKey()", "type": "id"},
            {"name": "patient", "path": "subject.getReferenceKey(Patient)", "type": "string"},
            {"name": "code", "path": "code.text", "type": "string"}]}]});
    let m = s
        .export(vec![
            json!({"name": "view", "part": [{"name": "viewResource", "resource": patients_view()}]}),
            json!({"name": "view", "part": [{"name": "viewResource", "resource": subjects}]}),
            json!({"name": "_format", "valueCode": "ndjson"}),
            json!({"name": "_container", "valueString": "deid"}),
            json!({"name": "_anonymizationConfig", "valueString": "sample.json"}),
        ])
        .await;
    assert!(
        m["extension"]["storage"]["anonymization"].is_object(),
        "{m}"
    );
    let mut rows = Vec::new();
    for o in m["output"].as_array().unwrap() {
        let b =
            s.c.get(o["url"].as_str().unwrap())
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
        rows.extend(lines(&b));
    }
    assert_eq!(rows.len(), 6, "{m}: {rows:?}");
    let text = serde_json::to_string(&rows).unwrap();
    for phi in [
        "Chalmers",
        "Windsor",
        "Baker",
        "\"p0\"",
        "\"p1\"",
        "1980-02-03",
        "BP",
    ] {
        assert!(!text.contains(phi), "{phi} in {text}");
    }
    // Ids are hashed the same way in the resource and in references: the views still join.
    let patient_ids: std::collections::HashSet<&str> = rows
        .iter()
        .filter(|r| r.get("family").is_some())
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(patient_ids.len(), 3);
    assert!(
        rows.iter()
            .filter(|r| r.get("patient").is_some())
            .all(|r| patient_ids.contains(r["patient"].as_str().unwrap())),
        "{rows:?}"
    );
}

/// `forEach` over every name of the resource, nested `depth` deep: `names ^ depth` rows.
fn nested_names_view(depth: usize) -> Value {
    let mut select = Value::Null;
    for level in (0..depth).rev() {
        let mut s = json!({"forEach": "%resource.name",
            "column": [{"name": format!("c{level}"), "path": "family"}]});
        if !select.is_null() {
            s["select"] = json!([select]);
        }
        select = s;
    }
    json!({"resourceType": "ViewDefinition", "resource": "Patient", "status": "active",
        "select": [select]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_run_gives_its_rows_or_an_error_never_a_short_answer_that_looks_whole() {
    let s = Server::start().await;
    let names: Vec<Value> = (0..100)
        .map(|i| json!({"family": format!("f{i}")}))
        .collect();
    let (st, _) = s
        .json(
            Method::PUT,
            "/Patient/many",
            Some(json!({"resourceType": "Patient", "id": "many", "name": names})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED);
    // 1,000,000 rows of one resource (the bound): generated one at a time and all sent.
    let (st, _, body) = s.run(nested_names_view(3), vec![], "?_format=csv").await;
    assert_eq!(st, StatusCode::OK);
    let text = String::from_utf8(body).unwrap();
    assert_eq!(text.lines().count(), 1 + 3 + 1_000_000);
    assert!(text.ends_with("\nf99,f99,f99\n"));
    // Beyond the bound, before the first byte: the status is the error's, with its outcome.
    let (st, ct, body) = s.run(nested_names_view(4), vec![], "?_format=csv").await;
    assert_eq!(
        st,
        StatusCode::BAD_REQUEST,
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert!(ct.contains("fhir+json"), "{ct}");
    let oo: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(oo["resourceType"], "OperationOutcome");
    assert_eq!(oo["issue"][0]["code"], "too-costly");
    assert!(
        oo["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("Patient/many"),
        "{oo}"
    );
    // A column of several values: 422.
    let bad = json!({"resourceType": "ViewDefinition", "resource": "Patient", "status": "active",
        "select": [{"column": [{"name": "family", "path": "name.family"}]}]});
    let (st, _, body) = s.run(bad.clone(), vec![], "").await;
    assert_eq!(
        st,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        String::from_utf8_lossy(&body)
    );
    // After rows were sent: the body is cut off, an error for the client. 5,000 rows come
    // before the resource that fails (written after `many`, scanned after it).
    let addresses: Vec<Value> = (0..5000)
        .map(|i| json!({"city": format!("city number {i:05} of the wide patient")}))
        .collect();
    s.json(Method::DELETE, "/Patient/many", None).await;
    for (id, resource) in [
        (
            "wide",
            json!({"resourceType": "Patient", "id": "wide", "name": [{"family": "W"}], "address": addresses}),
        ),
        (
            "two",
            json!({"resourceType": "Patient", "id": "two", "name": [{"family": "A"}, {"family": "B"}]}),
        ),
    ] {
        let (st, _) = s
            .json(Method::PUT, &format!("/Patient/{id}"), Some(resource))
            .await;
        assert_eq!(st, StatusCode::CREATED);
    }
    let view = json!({"resourceType": "ViewDefinition", "resource": "Patient", "status": "active",
        "select": [{"column": [{"name": "family", "path": "name.family"}]},
                   {"forEach": "address", "column": [{"name": "city", "path": "city"}]}]});
    let body = json!({"resourceType": "Parameters", "parameter": [
        {"name": "viewResource", "resource": view}, {"name": "_format", "valueCode": "csv"}]});
    // The head and the first chunk may not even be out when the error comes (hyper then
    // closes the connection before the head): either way the client gets an error.
    let sent =
        s.c.post(format!("{}/$viewdefinition-run", s.base))
            .header("content-type", "application/fhir+json")
            .body(body.to_string())
            .send()
            .await;
    if let Ok(r) = sent {
        assert_eq!(r.status(), StatusCode::OK);
        let read = r.bytes().await;
        assert!(
            read.is_err(),
            "a cut-off run read as whole: {} bytes",
            read.map(|b| b.len()).unwrap_or(0)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_writes_at_most_max_views_views() {
    let s = Server::start().await;
    let max = export::request::MAX_VIEWS;
    let named = |i: usize| {
        let mut v = patients_view();
        v["name"] = json!(format!("v{i}"));
        v
    };
    let views = |n: usize| -> Vec<Value> {
        (0..n)
            .map(|i| json!({"name": "view", "part": [{"name": "viewResource", "resource": named(i)}]}))
            .collect()
    };
    // One more than the bound: refused at kick-off by $viewdefinition-export; $export takes no
    // views at all.
    let r = s.kick_off("/$viewdefinition-export", views(max + 1)).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let oo: Value = r.json().await.unwrap();
    assert_eq!(oo["issue"][0]["code"], "too-costly", "{oo}");
    let direct: Vec<Value> = (0..=max)
        .map(|i| json!({"name": "_view", "valueString": named(i).to_string()}))
        .collect();
    let r = s.kick_off("/$export", direct).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let oo: Value = r.json().await.unwrap();
    assert!(
        oo["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("_view is a parameter of $viewdefinition-export"),
        "{oo}"
    );
    // The bound itself is served: a file per view.
    let m = s.export(views(max)).await;
    assert_eq!(m["output"].as_array().unwrap().len(), max, "{m}");
}

/// A SMART server; the clients' scopes decide.
async fn smart_server() -> (Server, auth::ClientKey, String) {
    let smart = common::start_smart(
        "rsa-a.pem",
        &[
            ("admin", "system/*.cruds"),
            ("patients", "system/Patient.rs system/ViewDefinition.rs"),
            ("search-only", "system/Patient.s"),
        ],
        1 << 20,
    )
    .await;
    let s = Server {
        base: smart.base,
        c: reqwest::Client::new(),
        token: None,
        dir: smart.dir,
        _db: smart.db,
    };
    (s, smart.key, smart.token_url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_and_exports_need_the_scopes_of_the_views_type() {
    let (mut s, key, token_url) = smart_server().await;
    let token = |client: &'static str, scope: &'static str| {
        let (key, url) = (&key, token_url.clone());
        async move { test_support::smart::token(&url, client, key, scope).await }
    };
    s.token = Some(token("admin", "system/*.cruds").await);
    s.load().await;
    let mut v = observations_view();
    v["id"] = json!("obs");
    assert!(
        s.json(Method::PUT, "/ViewDefinition/obs", Some(v))
            .await
            .0
            .is_success()
    );

    s.token = Some(token("patients", "system/Patient.rs system/ViewDefinition.rs").await);
    let (st, _, body) = s.run(patients_view(), vec![], "?_format=ndjson").await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(lines(&body).len(), 3);
    let (st, _, body) = s.run(observations_view(), vec![], "").await;
    assert_eq!(
        st,
        StatusCode::FORBIDDEN,
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert!(String::from_utf8_lossy(&body).contains("Observation"));
    let (st, _) = s
        .json(Method::GET, "/ViewDefinition/obs/$viewdefinition-run", None)
        .await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    // A view over inline resources reads no server data.
    let inline = json!({"resourceType": "Observation", "id": "i", "status": "final", "code": {}});
    let (st, _, _) = s
        .run(
            observations_view(),
            vec![json!({"name": "resource", "resource": inline})],
            "",
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    // Export: the same rule, decided at kick-off by the $export authorization.
    let r = s
        .kick_off(
            "/$viewdefinition-export",
            vec![json!({"name": "view", "part": [{"name": "viewReference", "valueReference": {"reference": "ViewDefinition/obs"}}]})],
        )
        .await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert!(r.text().await.unwrap().contains("Observation"));

    // `s` alone is not enough to read a type's data through a view, nor to read a stored view.
    s.token = Some(token("search-only", "system/Patient.s").await);
    let (st, _, _) = s.run(patients_view(), vec![], "").await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    let (st, _) = s.json(Method::GET, "/ViewDefinition/obs", None).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
}
