//! The real binary for issue 21: `fhirhose keys` (a key set created while the server runs, used
//! by a de-identified export and by `fhirhose anonymize --key-set`, same ids) and `fhirhose verify`
//! (URL and file forms; exit 1 with a clear message on a tampered file).

use std::io::Write;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

fn fhirhose() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fhirhose"));
    for (k, _) in std::env::vars() {
        if k.starts_with("FHIRHOSE_") {
            c.env_remove(k);
        }
    }
    c
}

fn run(args: &[&str]) -> Output {
    fhirhose().args(args).output().expect("run fhirhose")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

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

fn serve(data_dir: &Path) -> Server {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port");
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
    let server = serve(&data);
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
