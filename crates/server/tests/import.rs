//! `$import` over real HTTP (Azure's shape): an export of Synthea data imported into an empty
//! server (InitialLoad) and exported again gives the same bytes, resource for resource; refused
//! requests (URLs outside the storage, bad parameters, InitialLoad into a server with data),
//! per-line errors in the error files, IncrementalLoad's versions, cancel, and a chunk run again
//! after a crash loading nothing twice (also with an id on several lines of a chunk). On SQLite,
//! or PostgreSQL with `FHIRHOSE_TEST_DATABASE`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

/// The first `n` Synthea patients (their Bundles).
fn some_patients(n: usize) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(common::synthea())
        .expect("synthea")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.to_string_lossy().ends_with(".json.gz"))
        .collect();
    files.sort();
    files.truncate(n);
    files
}

fn parameters(mode: &str, inputs: &[(&str, &str)]) -> Value {
    let mut params = vec![
        json!({"name": "inputFormat", "valueString": "application/fhir+ndjson"}),
        json!({"name": "mode", "valueString": mode}),
    ];
    for (t, url) in inputs {
        params.push(json!({"name": "input", "part": [
            {"name": "type", "valueString": t},
            {"name": "url", "valueUri": url},
        ]}));
    }
    json!({"resourceType": "Parameters", "parameter": params})
}

async fn kickoff(s: &common::Server, body: &Value) -> reqwest::Response {
    s.c.post(format!("{}/$import", s.base))
        .header("prefer", "respond-async")
        .header("content-type", "application/fhir+json")
        .json(body)
        .send()
        .await
        .expect("kick-off")
}

/// Kicks off an import (202 expected) and polls it to its result.
async fn import(s: &common::Server, body: &Value) -> Value {
    let r = kickoff(s, body).await;
    assert_eq!(
        r.status(),
        StatusCode::ACCEPTED,
        "{}",
        r.text().await.unwrap()
    );
    let status = r.headers()["content-location"]
        .to_str()
        .expect("location")
        .to_string();
    assert!(
        status.starts_with(&format!("{}/import-status/", s.base)),
        "{status}"
    );
    s.wait(&status).await
}

/// Every file of a manifest, downloaded: type -> the set of its NDJSON lines.
async fn lines_by_type(
    s: &common::Server,
    manifest: &Value,
) -> BTreeMap<String, BTreeSet<Vec<u8>>> {
    let mut out: BTreeMap<String, BTreeSet<Vec<u8>>> = BTreeMap::new();
    for f in manifest["output"].as_array().expect("output") {
        let body =
            s.c.get(f["url"].as_str().expect("url"))
                .send()
                .await
                .expect("get");
        assert_eq!(body.status(), StatusCode::OK);
        let bytes = body.bytes().await.expect("body");
        let set = out
            .entry(f["type"].as_str().expect("type").to_string())
            .or_default();
        for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            assert!(set.insert(line.to_vec()), "a line twice in one export");
        }
    }
    out
}

/// Writes `text` as `<storage>/<container>/<name>` of server `s` (gzipped for `.gz`).
fn put_file(s: &common::Server, container: &str, name: &str, text: &[u8]) {
    let dir = s.dir.path().join("storage").join(container);
    std::fs::create_dir_all(&dir).expect("mkdir");
    let mut f = std::fs::File::create(dir.join(name)).expect("create");
    if name.ends_with(".gz") {
        let mut gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
        gz.write_all(text).expect("write");
        gz.finish().expect("finish");
    } else {
        f.write_all(text).expect("write");
    }
}

async fn read(s: &common::Server, path: &str) -> (StatusCode, Value) {
    let r =
        s.c.get(format!("{}/{path}", s.base))
            .send()
            .await
            .expect("read");
    (r.status(), r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread")]
async fn an_export_imported_into_an_empty_server_exports_the_same_bytes() {
    let a = common::start(&some_patients(8), server::config::ExportOptions::default()).await;
    let first = a.export("/$export").await;
    let exported = lines_by_type(&a, &first).await;
    // An export's job is unknown on the import routes (and so is its file).
    let file = first["output"][0]["url"].as_str().expect("url");
    let job = file.rsplit('/').nth(1).expect("job");
    for url in [
        file.replacen("/export-files/", "/import-files/", 1),
        format!("{}/import-status/{job}", a.base),
    ] {
        let r = a.c.get(&url).send().await.expect("get");
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{url}");
    }
    let r = a.c.get(file).send().await.expect("get");
    assert_eq!(r.status(), StatusCode::OK, "{file}");
    let total: usize = exported.values().map(BTreeSet::len).sum();
    assert!(
        exported.len() >= 10 && total > 1000,
        "{} types, {total} resources",
        exported.len()
    );

    // The export's files, copied into the storage of an empty server (Patient gzipped).
    let b = common::start(&[], server::config::ExportOptions::default()).await;
    let mut inputs: Vec<(String, String)> = Vec::new();
    let folder = first["extension"]["storage"]["folder"]
        .as_str()
        .expect("folder");
    let src = a.dir.path().join("storage/exports").join(folder);
    for f in first["output"].as_array().expect("output") {
        let name = f["url"]
            .as_str()
            .expect("url")
            .rsplit('/')
            .next()
            .expect("name")
            .to_string();
        let bytes = std::fs::read(src.join(&name)).expect("export file");
        let name = if f["type"] == "Patient" {
            format!("{name}.gz")
        } else {
            name
        };
        put_file(&b, "imports", &name, &bytes);
        inputs.push((
            f["type"].as_str().expect("type").into(),
            format!("imports/{name}"),
        ));
    }
    let refs: Vec<(&str, &str)> = inputs
        .iter()
        .map(|(t, u)| (t.as_str(), u.as_str()))
        .collect();
    let result = import(&b, &parameters("InitialLoad", &refs)).await;
    assert_eq!(result["error"], json!([]), "{result}");
    let loaded: u64 = result["output"]
        .as_array()
        .expect("output")
        .iter()
        .map(|o| o["count"].as_u64().expect("count"))
        .sum();
    assert_eq!(loaded, total as u64, "{result}");
    assert_eq!(result["output"][0]["inputUrl"], inputs[0].1.as_str());

    let second = b.export("/$export").await;
    let again = lines_by_type(&b, &second).await;
    assert_eq!(
        exported.keys().collect::<Vec<_>>(),
        again.keys().collect::<Vec<_>>()
    );
    for (t, lines) in &exported {
        let other = &again[t];
        assert_eq!(lines.len(), other.len(), "{t}");
        assert!(lines == other, "{t}: the lines differ");
    }

    // InitialLoad into a server with data is refused.
    let r = kickoff(&b, &parameters("InitialLoad", &refs[..1])).await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let oo: Value = r.json().await.expect("json");
    assert_eq!(oo["resourceType"], "OperationOutcome");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_and_urls_outside_the_storage_are_refused() {
    let s = common::start(&[], server::config::ExportOptions::default()).await;
    put_file(
        &s,
        "imports",
        "p.ndjson",
        b"{\"resourceType\":\"Patient\",\"id\":\"a\"}\n",
    );
    // A file beside the storage that must not be reachable.
    std::fs::write(s.dir.path().join("secret.ndjson"), "{}\n").expect("secret");
    for url in [
        "/etc/passwd",
        "../secret.ndjson",
        "imports/../../secret.ndjson",
        "http://127.0.0.1:1/x.ndjson",
        "https://example.org/p.ndjson",
        "file:///etc/passwd",
        "imports/%2e%2e/secret.ndjson",
        "anonymization/p.ndjson",
        "imports/missing.ndjson",
    ] {
        let r = kickoff(&s, &parameters("IncrementalLoad", &[("Patient", url)])).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{url}");
        let oo: Value = r.json().await.expect("json");
        assert_eq!(oo["resourceType"], "OperationOutcome", "{url}");
        let text = oo.to_string();
        assert!(
            !text.contains(&s.dir.path().display().to_string()),
            "{text}"
        );
    }
    let ok = [("Patient", "imports/p.ndjson")];
    let mut no_format = parameters("IncrementalLoad", &ok);
    no_format["parameter"]
        .as_array_mut()
        .expect("params")
        .remove(0);
    for body in [
        no_format,
        parameters("Merge", &ok),
        parameters("IncrementalLoad", &[]),
        parameters("IncrementalLoad", &[("Patientx", "imports/p.ndjson")]),
        json!({"resourceType": "Patient"}),
    ] {
        let r = kickoff(&s, &body).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{body}");
    }
    // Without Prefer: respond-async.
    let r =
        s.c.post(format!("{}/$import", s.base))
            .header("content-type", "application/fhir+json")
            .json(&parameters("IncrementalLoad", &ok))
            .send()
            .await
            .expect("post");
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
}

/// Security review: a symbolic link in the import container (to another client's export
/// output, or to any server file) was imported; links are not objects of the storage.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread")]
async fn symbolic_links_in_the_import_container_are_not_inputs() {
    use std::os::unix::fs::symlink;
    let s = common::start(&[], server::config::ExportOptions::default()).await;
    let patient = b"{\"resourceType\":\"Patient\",\"id\":\"other\"}\n";
    let other = s.dir.path().join("storage/exports/other");
    std::fs::create_dir_all(&other).expect("mkdir");
    std::fs::write(other.join("Patient.ndjson"), patient).expect("export file");
    let secret = s.dir.path().join("secret.ndjson");
    std::fs::write(&secret, patient).expect("secret");
    put_file(&s, "imports", "real.ndjson", patient);
    let imports = s.dir.path().join("storage/imports");
    symlink(
        "../exports/other/Patient.ndjson",
        imports.join("rel.ndjson"),
    )
    .expect("link");
    symlink(&secret, imports.join("abs.ndjson")).expect("link");
    symlink("../exports/other", imports.join("folder")).expect("link");
    for url in [
        "imports/rel.ndjson",
        "imports/abs.ndjson",
        "imports/folder/Patient.ndjson",
    ] {
        let r = kickoff(&s, &parameters("IncrementalLoad", &[("Patient", url)])).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{url}");
    }
    assert_eq!(read(&s, "Patient/other").await.0, StatusCode::NOT_FOUND);
    // The same file, not through a link, is an input.
    import(
        &s,
        &parameters("IncrementalLoad", &[("Patient", "imports/real.ndjson")]),
    )
    .await;
    assert_eq!(read(&s, "Patient/other").await.0, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread")]
async fn line_errors_go_to_error_files_and_incremental_load_makes_versions() {
    let s = common::start(&[], server::config::ExportOptions::default()).await;
    let patients = [
        r#"{"resourceType":"Patient","id":"p1","gender":"female"}"#,
        "not json",
        "",
        r#"{"resourceType":"Observation","id":"o1","status":"final","code":{"text":"x"}}"#,
        r#"{"resourceType":"Patient","gender":"male"}"#,
        r#"{"resourceType":"Patient","id":"p2","birthDate":12}"#,
        r#"{"resourceType":"Patient","id":"p3","meta":{"versionId":"7","lastUpdated":"2020-01-02T03:04:05.678Z"}}"#,
    ]
    .join("\n");
    put_file(&s, "imports", "patients.ndjson", patients.as_bytes());
    put_file(
        &s,
        "imports",
        "obs.ndjson.gz",
        br#"{"resourceType":"Observation","id":"o1","status":"final","code":{"text":"x"}}"#,
    );
    let body = parameters(
        "IncrementalLoad",
        &[
            ("Patient", "imports/patients.ndjson"),
            ("Observation", "imports/obs.ndjson.gz"),
        ],
    );
    let result = import(&s, &body).await;
    assert_eq!(result["output"][0]["count"], 2, "{result}");
    assert_eq!(result["output"][1]["count"], 1, "{result}");
    let errors = result["error"].as_array().expect("errors");
    assert_eq!(errors.len(), 1, "{result}");
    assert_eq!(errors[0]["count"], 4);
    assert_eq!(errors[0]["inputUrl"], "imports/patients.ndjson");
    let url = errors[0]["url"].as_str().expect("url");
    assert!(
        url.starts_with(&format!("{}/import-files/", s.base)),
        "{url}"
    );
    let text =
        s.c.get(url)
            .send()
            .await
            .expect("errors")
            .text()
            .await
            .expect("text");
    let outcomes: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    let lines: Vec<String> = outcomes
        .iter()
        .map(|o| {
            assert_eq!(o["resourceType"], "OperationOutcome");
            o["issue"][0]["expression"][0]
                .as_str()
                .expect("line")
                .to_string()
        })
        .collect();
    assert_eq!(lines, ["line 2", "line 4", "line 5", "line 6"], "{text}");

    // The status page and the metrics show it as an import, not as an export.
    let (st, page) = read(&s, "exports?format=json").await;
    assert_eq!(st, StatusCode::OK);
    let job = &page["jobs"][0];
    assert_eq!(job["kind"], "import", "{page}");
    assert_eq!(job["resources"], 3, "{page}");
    assert_eq!(
        job["parameters"],
        json!([
            ["mode", "IncrementalLoad"],
            ["input", "Patient imports/patients.ndjson"],
            ["input", "Observation imports/obs.ndjson.gz"]
        ]),
        "{page}"
    );
    assert!(
        job["status_url"]
            .as_str()
            .is_some_and(|u| u.starts_with(&format!("{}/import-status/", s.base))),
        "{page}"
    );
    assert_eq!(job["files"][0]["url"], url, "{page}");
    let html =
        s.c.get(format!("{}/exports", s.base))
            .send()
            .await
            .expect("page")
            .text()
            .await
            .expect("html");
    assert!(html.contains("<td>import</td>"), "{html}");
    let metrics =
        s.c.get(format!("{}/metrics", s.base))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
    assert!(
        metrics
            .lines()
            .any(|l| l == r#"fhirhose_import_jobs{state="complete"} 1"#),
        "{metrics}"
    );
    assert!(
        !metrics.contains("fhirhose_export_jobs{"),
        "no export ran: {metrics}"
    );

    // IncrementalLoad writes like a PUT: new versions at the server's time.
    let (st, p3) = read(&s, "Patient/p3").await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(p3["meta"]["versionId"], "1");
    assert_ne!(p3["meta"]["lastUpdated"], "2020-01-02T03:04:05.678Z");
    put_file(
        &s,
        "imports",
        "changed.ndjson",
        concat!(
            r#"{"resourceType":"Patient","id":"p1","gender":"male"}"#,
            "\n",
            r#"{"resourceType":"Patient","id":"p3"}"#,
            "\n"
        )
        .as_bytes(),
    );
    let result = import(
        &s,
        &parameters("IncrementalLoad", &[("Patient", "imports/changed.ndjson")]),
    )
    .await;
    assert_eq!(result["output"][0]["count"], 2, "{result}");
    let (_, p1) = read(&s, "Patient/p1").await;
    assert_eq!(p1["meta"]["versionId"], "2");
    assert_eq!(p1["gender"], "male");
    // An unchanged resource gets no new version (so a chunk run again writes nothing twice).
    let (_, p3) = read(&s, "Patient/p3").await;
    assert_eq!(p3["meta"]["versionId"], "1", "{p3}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_line_with_a_duplicate_key_is_a_line_error() {
    let s = common::start(&[], server::config::ExportOptions::default()).await;
    let lines = [
        r#"{"resourceType":"Patient","id":"d1"}"#,
        r#"{"resourceType":"Patient","id":"x","gender":"male","gender":"female"}"#,
        r#"{"resourceType":"Patient","id":"d2"}"#,
    ]
    .join("\n");
    put_file(&s, "imports", "dup.ndjson", lines.as_bytes());
    let result = import(
        &s,
        &parameters("IncrementalLoad", &[("Patient", "imports/dup.ndjson")]),
    )
    .await;
    assert_eq!(result["output"][0]["count"], 2, "{result}");
    let errors = result["error"].as_array().expect("errors");
    assert_eq!(errors[0]["count"], 1, "{result}");
    let text =
        s.c.get(errors[0]["url"].as_str().expect("url"))
            .send()
            .await
            .expect("errors")
            .text()
            .await
            .expect("text");
    let outcome: Value = serde_json::from_str(text.trim()).expect("json");
    assert_eq!(outcome["issue"][0]["expression"][0], "line 2", "{text}");
    let d = outcome["issue"][0]["diagnostics"].as_str().unwrap_or("");
    assert!(d.contains("duplicate key \"gender\""), "{text}");
    assert_eq!(read(&s, "Patient/x").await.0, StatusCode::NOT_FOUND);
    assert_eq!(read(&s, "Patient/d2").await.0, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread")]
async fn initial_load_keeps_versions_and_refuses_what_exists() {
    let s = common::start(&[], server::config::ExportOptions::default()).await;
    put_file(
        &s,
        "imports",
        "p.ndjson",
        concat!(
            r#"{"resourceType":"Patient","id":"a","meta":{"versionId":"3","lastUpdated":"2021-05-06T07:08:09.123Z"},"gender":"female"}"#,
            "\n",
            r#"{"resourceType":"Patient","id":"a","meta":{"versionId":"4","lastUpdated":"2021-05-06T07:08:09.123Z"}}"#,
            "\n",
            r#"{"resourceType":"Patient","id":"b","meta":{"versionId":"x"}}"#,
            "\n",
            r#"{"resourceType":"Patient","id":"c"}"#,
            "\n",
        )
        .as_bytes(),
    );
    let result = import(
        &s,
        &parameters("InitialLoad", &[("Patient", "imports/p.ndjson")]),
    )
    .await;
    assert_eq!(result["output"][0]["count"], 2, "{result}");
    assert_eq!(result["error"][0]["count"], 2, "{result}");
    let (_, a) = read(&s, "Patient/a").await;
    assert_eq!(a["meta"]["versionId"], "3");
    assert_eq!(a["meta"]["lastUpdated"], "2021-05-06T07:08:09.123Z");
    let r =
        s.c.get(format!("{}/Patient/a/_history/3", s.base))
            .send()
            .await
            .expect("vread");
    assert_eq!(r.status(), StatusCode::OK);
    let (st, c) = read(&s, "Patient/c").await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(c["meta"]["versionId"], "1");
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_cancels_an_import() {
    // No workers: the job stays queued until it is cancelled.
    let options = server::config::ExportOptions {
        export_workers: Some(0),
        ..Default::default()
    };
    let s = common::start(&[], options).await;
    put_file(
        &s,
        "imports",
        "p.ndjson",
        br#"{"resourceType":"Patient","id":"a"}"#,
    );
    let r = kickoff(
        &s,
        &parameters("IncrementalLoad", &[("Patient", "imports/p.ndjson")]),
    )
    .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let status = r.headers()["content-location"]
        .to_str()
        .expect("loc")
        .to_string();
    let r = s.c.get(&status).send().await.expect("poll");
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert!(
        r.headers()["x-progress"]
            .to_str()
            .expect("progress")
            .contains("input 1 of 1")
    );
    let r = s.c.delete(&status).send().await.expect("cancel");
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    tokio::time::sleep(Duration::from_millis(150)).await;
    let r = s.c.get(&status).send().await.expect("poll");
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let (st, _) = read(&s, "Patient/a").await;
    assert_eq!(st, StatusCode::NOT_FOUND);
}

/// A crash after a chunk's store write and before its commit in the job queue: the item runs
/// the chunk again from its committed cursor, and nothing is stored or counted twice.
#[tokio::test(flavor = "multi_thread")]
async fn a_chunk_run_again_after_a_crash_loads_nothing_twice() {
    let options = server::config::ExportOptions {
        export_workers: Some(0),
        ..Default::default()
    };
    let s = common::start(&[], options).await;
    let n = export::import::CHUNK_LINES + 500;
    let text: String = (0..n)
        .map(|i| format!("{{\"resourceType\":\"Patient\",\"id\":\"p{i}\",\"meta\":{{\"versionId\":\"2\",\"lastUpdated\":\"2022-01-01T00:00:00.000Z\"}}}}\n"))
        .collect();
    put_file(&s, "imports", "p.ndjson", text.as_bytes());
    let r = kickoff(
        &s,
        &parameters("InitialLoad", &[("Patient", "imports/p.ndjson")]),
    )
    .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let status = r.headers()["content-location"]
        .to_str()
        .expect("loc")
        .to_string();

    // The "crashed" worker: it claimed the input and wrote its first chunk to the store, and
    // died before committing it.
    let store = s.db.store.clone();
    let lines: Vec<(u64, Vec<u8>)> = text
        .lines()
        .take(export::import::CHUNK_LINES)
        .enumerate()
        .map(|(i, l)| (i as u64 + 1, l.as_bytes().to_vec()))
        .collect();
    common::blocking(move || {
        let queue = store.jobs().expect("queue");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis() as i64;
        let item = queue
            .claim("dead/1", now, 600_000, 5)
            .expect("claim")
            .expect("an item");
        assert_eq!(item.item_no, 1);
        let done = ingest::import::import_lines(
            &*store,
            &lines,
            "Patient",
            ingest::import::ImportMode::InitialLoad,
            0,
        )
        .expect("write");
        assert_eq!(done.loaded, export::import::CHUNK_LINES as u64);
        assert_eq!(
            queue
                .release_orphans(store::jobs::Orphans::All)
                .expect("release"),
            1
        );
    })
    .await;

    // A new process's workers take the item over from its committed cursor (0).
    let dir = s.dir.path().to_path_buf();
    let store = s.db.store.clone();
    let base = s.base.clone();
    let svc = common::blocking(move || {
        let config = server::config::ExportOptions::default()
            .export_config(&dir, base)
            .expect("config");
        let svc = export::ExportService::open(store, config).expect("service");
        svc.start_workers().expect("workers");
        svc
    })
    .await;
    let result = s.wait(&status).await;
    assert_eq!(result["output"][0]["count"], n as u64, "{result}");
    assert_eq!(result["error"], json!([]), "{result}");
    let (_, p0) = read(&s, "Patient/p0").await;
    assert_eq!(p0["meta"]["versionId"], "2");
    // A rewrite would have been refused (InitialLoad only creates) and failed the job: every
    // line is loaded once, with the version it names.
    let (_, last) = read(&s, &format!("Patient/p{}", n - 1)).await;
    assert_eq!(last["meta"]["versionId"], "2");
    drop(svc);
}

/// IncrementalLoad with one id on several lines of a chunk: a version per line in line order
/// (none for a line equal to the one before), and the chunk run again (a crash before its
/// commit) writes none of them again, so the last line stays the current version.
#[test]
fn a_chunk_with_an_id_twice_run_again_writes_nothing() {
    let db = common::test_store();
    let store = &db.store;
    {
        let lines: Vec<(u64, Vec<u8>)> = [
            r#"{"resourceType":"Patient","id":"p1","gender":"female"}"#,
            r#"{"resourceType":"Patient","id":"p1","gender":"male"}"#,
            r#"{"resourceType":"Patient","id":"p2","gender":"male"}"#,
            r#"{"resourceType":"Patient","id":"p1","gender":"male"}"#,
            r#"{"resourceType":"Patient","id":"p1","gender":"other"}"#,
        ]
        .iter()
        .enumerate()
        .map(|(i, l)| (i as u64 + 1, l.as_bytes().to_vec()))
        .collect();
        let run = || {
            ingest::import::import_lines(
                &**store,
                &lines,
                "Patient",
                ingest::import::ImportMode::IncrementalLoad,
                0,
            )
            .expect("write")
        };
        let current = |id: &str| {
            let c = store.read("Patient", id).expect("read");
            (c.version, String::from_utf8_lossy(&c.json).into_owned())
        };
        for attempt in ["first run", "run again"] {
            let done = run();
            assert_eq!(done.loaded, 5, "{attempt}");
            assert!(done.errors.is_empty(), "{attempt}: {:?}", done.errors);
            let (version, json) = current("p1");
            assert_eq!(version, 3, "{attempt}: female, male, other: {json}");
            assert!(json.contains(r#""gender":"other""#), "{attempt}: {json}");
            assert_eq!(current("p2").0, 1, "{attempt}");
        }
    }
}
