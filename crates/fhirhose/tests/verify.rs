//! The real binary for issue 21: `fhirhose keys` (a key set created while the server runs, used
//! by a de-identified export and by `fhirhose anonymize --key-set`, same ids) and `fhirhose verify`
//! (URL and file forms; exit 1 with a clear message on a tampered file); a paged manifest
//! (`allowPartialManifests`) verified and exported (`fhirhose export`) page by page, and a
//! server whose pages loop or never end refused by both.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use serde_json::{Value, json};
use test_support::raw_http::{Reply, Server};

use common::{Serve, fhirhose};

fn run(args: &[&str]) -> Output {
    fhirhose().args(args).output().expect("run fhirhose")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn serve(data_dir: &Path, extra: &[&str]) -> Serve {
    common::serve(data_dir, None, extra)
}

const CONFIG: &str = r#"{"fhirVersion": "R4", "fhirPathRules": [
    {"path": "Resource.id", "method": "cryptoHash"},
    {"path": "nodesByType('Reference').reference", "method": "cryptoHash"},
    {"path": "nodesByType('date')", "method": "dateShift"}
], "parameters": {"dateShiftScope": "patient"}}"#;

#[test]
fn key_sets_and_verify_through_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let configs = data.join("storage/anonymization");
    std::fs::create_dir_all(&configs).unwrap();
    std::fs::write(configs.join("c.json"), CONFIG).unwrap();
    let server = serve(&data, &[]);
    let d = data.to_str().unwrap();

    // A key set, created and listed while the server runs; no key is printed.
    let out = run(&["keys", "create", "research", "--data-dir", d]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let created = text(&out.stdout);
    assert!(
        created.contains("created key set research (version 1, fingerprint "),
        "{created}"
    );
    let out = run(&["keys", "create", "research", "--data-dir", d]);
    assert!(!out.status.success() && text(&out.stderr).contains("exists"));
    let out = run(&["keys", "list", "--data-dir", d]);
    let listed = text(&out.stdout);
    assert!(
        listed.contains("research") && listed.lines().count() == 2,
        "{listed}"
    );

    let c = reqwest::blocking::Client::new();
    let patient = json!({"resourceType": "Patient", "id": "pat-1", "birthDate": "1960-05-05"});
    let obs = json!({"resourceType": "Observation", "id": "obs-1", "status": "final",
        "code": {"text": "x"}, "subject": {"reference": "Patient/pat-1"}});
    for r in [&patient, &obs] {
        let url = format!(
            "{}/{}/{}",
            server.base,
            r["resourceType"].as_str().unwrap(),
            r["id"].as_str().unwrap()
        );
        let resp = c
            .put(url)
            .header("content-type", "application/fhir+json")
            .body(r.to_string())
            .send()
            .unwrap();
        assert!(resp.status().is_success());
    }
    let kick = |q: &str| {
        c.get(format!("{}/$export?{q}", server.base))
            .header("accept", "application/fhir+json")
            .header("prefer", "respond-async")
            .send()
            .unwrap()
    };
    let r = kick("_container=deid&_anonymizationConfig=c.json&_anonymizationKeySet=unknown");
    assert_eq!(r.status().as_u16(), 400);
    assert_eq!(
        r.json::<Value>().unwrap()["resourceType"],
        "OperationOutcome"
    );
    let r = kick("_container=deid&_anonymizationConfig=c.json&_anonymizationKeySet=research");
    assert_eq!(r.status().as_u16(), 202, "{}", r.text().unwrap());
    let status = r.headers()["content-location"]
        .to_str()
        .unwrap()
        .to_string();
    let mut manifest = Value::Null;
    for _ in 0..600 {
        let r = c.get(&status).send().unwrap();
        if r.status().as_u16() == 200 {
            manifest = r.json().unwrap();
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(manifest.is_object(), "export finished");
    let exported: Vec<Value> = manifest["output"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|o| {
            let body = c
                .get(o["url"].as_str().unwrap())
                .send()
                .unwrap()
                .text()
                .unwrap();
            body.lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap())
                .collect::<Vec<_>>()
        })
        .collect();
    let exported_patient = exported
        .iter()
        .find(|r| r["resourceType"] == "Patient")
        .unwrap();

    // `anonymize --key-set`: the same id and the same shifted birth date as the export.
    let input = dir.path().join("in.ndjson");
    let mut f = std::fs::File::create(&input).unwrap();
    writeln!(f, "{patient}").unwrap();
    let cfg = dir.path().join("c.json");
    std::fs::write(&cfg, CONFIG).unwrap();
    let out_file = dir.path().join("out.ndjson");
    let out = run(&[
        "anonymize",
        "-b",
        "--quiet",
        "-c",
        cfg.to_str().unwrap(),
        "-i",
        input.to_str().unwrap(),
        "-o",
        out_file.to_str().unwrap(),
        "--key-set",
        "research",
        "--data-dir",
        d,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let written = std::fs::read_to_string(&out_file).unwrap();
    let local: Value = serde_json::from_str(written.lines().next().unwrap()).unwrap();
    assert_eq!(local["id"], exported_patient["id"]);
    assert_eq!(local["birthDate"], exported_patient["birthDate"]);
    assert_ne!(local["birthDate"], patient["birthDate"]);
    let out = run(&[
        "anonymize",
        "-b",
        "--quiet",
        "-c",
        cfg.to_str().unwrap(),
        "-i",
        input.to_str().unwrap(),
        "-o",
        out_file.to_str().unwrap(),
        "--key-set",
        "nope",
        "--data-dir",
        d,
    ]);
    assert!(!out.status.success() && text(&out.stderr).contains("no key set named 'nope'"));

    // verify URL: passes.
    let out = run(&["verify", &status]);
    let report = text(&out.stdout);
    assert!(out.status.success(), "{report}{}", text(&out.stderr));
    assert!(
        report.contains("result: OK") && report.contains("references: 1 checked, 0 dangling"),
        "{report}"
    );

    // verify FILE, the files beside it: passes; then with a line removed it fails, naming why.
    let folder = data
        .join("storage/deid")
        .join(manifest["extension"]["storage"]["folder"].as_str().unwrap());
    let saved = folder.join("manifest.json");
    std::fs::write(&saved, manifest.to_string()).unwrap();
    let out = run(&["verify", saved.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stdout));
    let obs_file = folder.join("Observation-1.ndjson");
    std::fs::write(&obs_file, "").unwrap();
    let out = run(&["verify", saved.to_str().unwrap()]);
    let report = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert!(
        report.contains("0 resources (lines), the manifest says 1"),
        "{report}"
    );
    assert!(text(&out.stderr).contains("does not match its manifest"));

    let out = run(&["keys", "rotate", "research", "--data-dir", d]);
    assert!(
        text(&out.stdout).contains("version 2"),
        "{}",
        text(&out.stderr)
    );
    let out = run(&["keys", "delete", "research", "--data-dir", d]);
    assert!(out.status.success());
    drop(server);
}

/// The status URL of a finished export, polled directly.
fn finished(c: &reqwest::blocking::Client, base: &str, query: &str) -> (String, Value) {
    let r = c
        .get(format!("{base}/$export?{query}"))
        .header("accept", "application/fhir+json")
        .header("prefer", "respond-async")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let status = r.headers()["content-location"]
        .to_str()
        .unwrap()
        .to_string();
    for _ in 0..600 {
        let r = c.get(&status).send().unwrap();
        if r.status().as_u16() == 200 {
            return (status, r.json().unwrap());
        }
        assert_eq!(r.status().as_u16(), 202);
        std::thread::sleep(Duration::from_millis(150));
    }
    panic!("the export did not finish");
}

/// An `allowPartialManifests` export of 300 Patients and 300 Observations in items of 100
/// resources and files of 40: several pages of several files. `fhirhose verify STATUS_URL`
/// follows the pages and checks every file of every page once (references over all of them);
/// `fhirhose export` downloads every file of every page once and writes the merged manifest.
#[test]
fn a_paged_manifest_is_verified_and_exported_page_by_page() {
    let dir = tempfile::tempdir().unwrap();
    let ndjson = dir.path().join("data.ndjson");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&ndjson).unwrap());
    for i in 0..300 {
        let p = json!({"resourceType": "Patient", "id": format!("p{i}"), "gender": "female"});
        let o = json!({"resourceType": "Observation", "id": format!("o{i}"), "status": "final",
            "code": {"text": "x"}, "subject": {"reference": format!("Patient/p{i}")}});
        writeln!(f, "{p}\n{o}").unwrap();
    }
    drop(f);
    let data = dir.path().join("data");
    let out = fhirhose()
        .args(["load", "--data-dir"])
        .arg(&data)
        .arg(&ndjson)
        .output()
        .unwrap();
    assert!(out.status.success(), "load: {}", text(&out.stderr));
    let server = serve(
        &data,
        &[
            "--export-item-resources",
            "100",
            "--export-file-resources",
            "40",
        ],
    );
    let c = reqwest::blocking::Client::new();
    let (status, first) = finished(
        &c,
        &server.base,
        "allowPartialManifests=true&_type=Patient,Observation",
    );
    // The pages as the server lists them.
    let mut urls: Vec<String> = Vec::new();
    let mut page = first;
    let mut pages = 1;
    loop {
        for e in page["output"].as_array().unwrap() {
            urls.push(e["url"].as_str().unwrap().to_string());
        }
        let Some(next) = page["link"][0]["url"].as_str().map(str::to_string) else {
            break;
        };
        page = c.get(next).send().unwrap().json().unwrap();
        pages += 1;
    }
    assert!(pages >= 3, "{pages} pages");
    assert!(urls.len() > pages, "pages of several files");
    let names: Vec<&str> = urls.iter().map(|u| u.rsplit('/').next().unwrap()).collect();

    // verify URL: every page's files, each once.
    let out = run(&["verify", &status]);
    let report = text(&out.stdout);
    assert!(out.status.success(), "{report}{}", text(&out.stderr));
    assert!(
        report.contains(&format!("manifest: {pages} pages")),
        "{report}"
    );
    assert!(
        report.contains(&format!("{} files, 600 resources in output", urls.len())),
        "{report}"
    );
    assert!(
        report.contains("references: 300 checked, 0 dangling"),
        "{report}"
    );
    for name in &names {
        let lines = report
            .lines()
            .filter(|l| l.starts_with("  ok ") && l.contains(&format!(" {name} ")))
            .count();
        assert_eq!(lines, 1, "{name} checked once: {report}");
    }

    // export: every file of every page downloaded once, the merged manifest written.
    let out_dir = dir.path().join("out");
    let out = fhirhose()
        .args(["export", &server.base, "--quiet", "--verify"])
        .args(["--type", "Patient,Observation"])
        .args(["--param", "allowPartialManifests=true", "--out"])
        .arg(&out_dir)
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(&format!("from {pages} manifest pages")),
        "{err}"
    );
    assert!(err.contains("verified"), "{err}");
    let merged: Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("manifest.json")).unwrap()).unwrap();
    assert!(merged.get("link").is_none(), "{merged}");
    assert_eq!(merged["output"].as_array().unwrap().len(), urls.len());
    let mut ids = std::collections::BTreeMap::<String, usize>::new();
    let mut files = 0;
    for e in std::fs::read_dir(&out_dir).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_some_and(|x| x == "ndjson") {
            files += 1;
            for line in std::fs::read_to_string(&path).unwrap().lines() {
                let v: Value = serde_json::from_str(line).unwrap();
                *ids.entry(format!("{}/{}", v["resourceType"], v["id"]))
                    .or_default() += 1;
            }
        }
    }
    assert_eq!(files, urls.len());
    assert_eq!(ids.len(), 600);
    assert!(ids.values().all(|n| *n == 1));
    drop(server);
}

/// A hostile status endpoint: `/loop` is a manifest page whose `next` is itself, `/endless`
/// links page after page for ever (`?page=N` → `?page=N+1`). Answers every request, one per
/// connection.
fn hostile_server() -> String {
    let base = std::sync::Arc::new(std::sync::OnceLock::<String>::new());
    let b = base.clone();
    let server = Server::start(move |r| {
        let b = b.get().expect("the base is set before any request");
        let next = if r.target.starts_with("/loop") {
            format!("{b}/loop")
        } else {
            let n: u64 = r
                .target
                .rsplit("page=")
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(1);
            format!("{b}/endless?page={}", n + 1)
        };
        Reply::json(
            json!({"transactionTime": "2026-01-01T00:00:00Z", "request": b,
                "requiresAccessToken": false, "output": [], "error": [],
                "link": [{"relation": "next", "url": next}]})
            .to_string(),
        )
    });
    base.set(server.base().to_owned()).unwrap();
    server.base().to_owned()
}

/// `fhirhose verify` and `fhirhose export` refuse a manifest whose `next` page is one already
/// read, and one with more pages than `--max-pages`, with one clear line (they do not loop).
#[test]
fn pages_that_loop_or_never_end_are_refused() {
    let base = hostile_server();
    let dir = tempfile::tempdir().unwrap();
    let looping = format!("{base}/loop");
    let endless = format!("{base}/endless");
    let out = run(&["verify", &looping]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("manifest page 1 links to {looping} as `next`, a page already read: the pages loop; refused")),
        "{err}"
    );
    let out = run(&["verify", &endless, "--max-pages", "5"]);
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("the manifest has more than 5 pages"), "{err}");

    for (status, max, expected) in [
        (&looping, "10", "a page already read: the pages loop"),
        (&endless, "5", "the manifest has more than 5 pages"),
    ] {
        let out = fhirhose()
            .args(["export", &base, "--quiet", "--status-url", status])
            .args(["--max-pages", max, "--out"])
            .arg(dir.path().join("out"))
            .output()
            .unwrap();
        let err = text(&out.stderr);
        assert!(!out.status.success());
        assert!(err.contains(expected), "{err}");
    }
}

/// A status endpoint that records each request's path and `Authorization` header: `/status` is a
/// manifest page whose `next` is `next` (if any), any other path the last page.
fn recording_server(next: Option<String>) -> Server {
    Server::start(move |r| {
        let mut m = json!({"transactionTime": "2026-01-01T00:00:00Z", "request": "x",
            "requiresAccessToken": true, "output": [], "error": []});
        if r.target == "/status"
            && let Some(n) = &next
        {
            m["link"] = json!([{"relation": "next", "url": n}]);
        }
        Reply::json(m.to_string())
    })
}

/// `fhirhose verify --token` sends the token to the status URL's origin only (not to a `next`
/// page on another host), and from a manifest file to no origin unless `--token-origin` names it.
#[test]
fn verify_sends_its_token_only_to_the_origin_the_user_named() {
    let other_server = recording_server(None);
    let other = other_server.base();
    let home_server = recording_server(Some(format!("{other}/page2")));
    let home = home_server.base();
    let out = run(&["verify", &format!("{home}/status"), "--token", "SECRET"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        home_server.seen(),
        [("/status".to_string(), Some("Bearer SECRET".to_string()))]
    );
    assert_eq!(other_server.seen(), [("/page2".to_string(), None)]);

    // A saved first page whose `next` is on `home`.
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("manifest.json");
    let first = json!({"transactionTime": "2026-01-01T00:00:00Z", "request": "x",
        "requiresAccessToken": true, "output": [], "error": [],
        "link": [{"relation": "next", "url": format!("{home}/page2")}]});
    std::fs::write(&manifest, first.to_string()).unwrap();
    let m = manifest.to_str().unwrap();
    let out = run(&["verify", m, "--token", "SECRET"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(home_server.seen().last().unwrap().1, None);
    let out = run(&["verify", m, "--token", "SECRET", "--token-origin", home]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        home_server.seen().last().unwrap().1.as_deref(),
        Some("Bearer SECRET")
    );
}
