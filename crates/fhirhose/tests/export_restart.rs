//! Bulk `$export` survives a crash: the real binary loads the Synthea 100-patient data set, a
//! system export is kicked off, the server is killed with SIGKILL while the job runs, and a new
//! server on the same data directory resumes the job under the same status URL. The finished
//! export must hold every resource exactly once and leave no `.part` files behind.

use std::collections::{BTreeMap, HashSet};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

fn fhirhose() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fhirhose"));
    // Every setting is passed as a flag: nothing from the caller's environment may leak in.
    for (k, _) in std::env::vars() {
        if k.starts_with("FHIRHOSE_") {
            c.env_remove(k);
        }
    }
    c
}

/// A running `fhirhose serve`, killed when dropped.
struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn serve(data_dir: &Path, port: u16) -> Server {
    let child = fhirhose()
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
        ])
        .arg(data_dir)
        .env("FHIRHOSE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start fhirhose serve");
    let mut server = Server {
        child,
        base: format!("http://127.0.0.1:{port}"),
    };
    let client = reqwest::blocking::Client::new();
    for _ in 0..600 {
        if let Ok(Some(status)) = server.child.try_wait() {
            panic!("fhirhose serve exited early: {status}");
        }
        if client
            .get(format!("{}/metadata", server.base))
            .send()
            .is_ok_and(|r| r.status().is_success())
        {
            return server;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("fhirhose serve did not answer on {}", server.base);
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Distinct resources per type in testdata/synthea-r4-100 (see its PROVENANCE.md: the 452
/// Organization and Practitioner entries name 203 distinct resources each).
const EXPECTED: &[(&str, usize)] = &[
    ("Observation", 16_315),
    ("Claim", 6_083),
    ("Encounter", 3_697),
    ("ExplanationOfBenefit", 3_697),
    ("MedicationRequest", 2_386),
    ("Procedure", 2_351),
    ("Immunization", 1_287),
    ("DiagnosticReport", 897),
    ("Condition", 639),
    ("Organization", 203),
    ("Practitioner", 203),
    ("CareTeam", 278),
    ("CarePlan", 278),
    ("Patient", 100),
    ("AllergyIntolerance", 38),
    ("ImagingStudy", 16),
    ("Device", 4),
    ("Group", 1),
];

#[test]
fn system_export_resumes_after_sigkill_with_every_resource_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");

    let load = fhirhose()
        .args(["load", "--data-dir"])
        .arg(&data)
        .arg(repo_root().join("testdata/synthea-r4-100"))
        .env("FHIRHOSE_LOG", "warn")
        .output()
        .expect("run fhirhose load");
    assert!(
        load.status.success(),
        "load failed: {}",
        String::from_utf8_lossy(&load.stderr)
    );

    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("http client");
    let port = free_port();
    let mut first = serve(&data, port);
    let kick = client
        .get(format!("{}/$export", first.base))
        .header("Accept", "application/fhir+json")
        .header("Prefer", "respond-async")
        .send()
        .expect("kick-off");
    assert_eq!(kick.status().as_u16(), 202, "kick-off accepted");
    let status_url = kick
        .headers()
        .get("Content-Location")
        .and_then(|v| v.to_str().ok())
        .expect("Content-Location header")
        .to_owned();
    let job = status_url
        .rsplit('/')
        .next()
        .expect("job id in status URL")
        .to_owned();

    // Kill as soon as the job is known to be running (or finished on a fast machine: the
    // resume path then has nothing to do, which the assertions below still cover).
    for _ in 0..200 {
        let r = client.get(&status_url).send().expect("poll status");
        if r.status().as_u16() != 202 || r.headers().contains_key("X-Progress") {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // SIGKILL: no graceful shutdown, no chance to finish or tidy up.
    first.child.kill().expect("kill -9 server");
    first.child.wait().expect("reap server");
    drop(first);

    let second = serve(&data, port);
    let mut manifest = None;
    for _ in 0..3000 {
        let r = client.get(&status_url).send().expect("poll status");
        match r.status().as_u16() {
            202 => std::thread::sleep(Duration::from_millis(100)),
            200 => {
                manifest = Some(r.json::<Value>().expect("manifest JSON"));
                break;
            }
            other => panic!(
                "status after restart: {other} {}",
                r.text().unwrap_or_default()
            ),
        }
    }
    let manifest = manifest.expect("export finished after restart");
    let outputs = manifest["output"].as_array().expect("manifest output");

    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut seen: HashSet<(String, String)> = HashSet::new();
    for out in outputs {
        let rtype = out["type"].as_str().expect("output type").to_owned();
        let url = out["url"].as_str().expect("output url");
        let body = client
            .get(url)
            .header("Accept", "application/fhir+ndjson")
            .send()
            .expect("download")
            .text()
            .expect("ndjson text");
        for line in body.lines().filter(|l| !l.trim().is_empty()) {
            let res: Value = serde_json::from_str(line).expect("NDJSON line is JSON");
            assert_eq!(res["resourceType"].as_str(), Some(rtype.as_str()));
            let id = res["id"].as_str().expect("resource id").to_owned();
            assert!(
                seen.insert((rtype.clone(), id.clone())),
                "{rtype}/{id} exported twice"
            );
            *counts.entry(rtype.clone()).or_default() += 1;
        }
    }
    let expected: BTreeMap<String, usize> = EXPECTED
        .iter()
        .map(|(t, n)| ((*t).to_owned(), *n))
        .collect();
    assert_eq!(counts, expected, "resources per type after resume");

    let folder = data.join("storage/exports").join(&job);
    let entries: Vec<String> = std::fs::read_dir(&folder)
        .expect("export folder exists")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!entries.is_empty(), "export folder holds the files");
    assert!(
        entries.iter().all(|n| !n.ends_with(".part")),
        "no .part files left: {entries:?}"
    );
    drop(second);
}
