//! The server configured with `--export-destination s3` against a real S3-compatible server: moto
//! (PyPI `moto[server]`), which `scripts/s3.sh` installs and starts; `FHIRHOSE_TEST_S3` is its
//! endpoint. A system export over real HTTP lands in the bucket and every manifest URL is served
//! by the server; a file larger than 64 MB goes up as a multipart upload; a cancel removes the
//! objects; wrong credentials fail the export at once (no retries) with an OperationOutcome that
//! names the cause.
//!
//! moto accepts any credentials unless its IAM checks are switched on; the wrong-credentials test
//! therefore starts its own moto (`INITIAL_NO_AUTH_ACTION_COUNT=0`, every key unknown) on a free
//! port from the same installation (`FHIRHOSE_TEST_MOTO_SERVER`, default
//! `.tools/moto/venv/bin/moto_server`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

mod common;

use test_support::destination::{Destination, Kind};

/// A bucket of its own for one test (moto creates it on an unsigned `PUT /<bucket>`).
async fn new_bucket(endpoint: &str) -> String {
    let bucket = format!("fh-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let r = reqwest::Client::new()
        .put(format!("{endpoint}/{bucket}"))
        .send()
        .await
        .expect("create bucket");
    assert!(r.status().is_success(), "create bucket: {}", r.status());
    bucket
}

/// Keys and sizes under `prefix` (unsigned ListObjectsV2; moto's checks are off by default).
async fn list(endpoint: &str, bucket: &str, prefix: &str) -> Vec<(String, u64)> {
    let body = reqwest::Client::new()
        .get(format!("{endpoint}/{bucket}?list-type=2&prefix={prefix}"))
        .send()
        .await
        .expect("list objects")
        .text()
        .await
        .expect("listing");
    let mut out = Vec::new();
    for contents in body.split("<Contents>").skip(1) {
        let field = |name: &str| {
            contents
                .split(&format!("<{name}>"))
                .nth(1)
                .and_then(|s| s.split(&format!("</{name}>")).next())
                .unwrap_or_default()
                .to_string()
        };
        out.push((field("Key"), field("Size").parse().unwrap_or(0)));
    }
    out
}

fn s3_options(endpoint: &str, bucket: &str) -> server::config::ExportOptions {
    server::config::ExportOptions {
        export_destination: "s3".into(),
        s3_bucket: Some(bucket.into()),
        s3_endpoint: Some(endpoint.into()),
        s3_access_key_id: Some("test".into()),
        s3_secret_access_key: Some("test".into()),
        ..Default::default()
    }
}

/// Reads a manifest file through the server: its NDJSON lines.
async fn download(c: &reqwest::Client, url: &str) -> Vec<Value> {
    let r = c.get(url).send().await.expect("download");
    assert_eq!(r.status(), StatusCode::OK, "{url}");
    assert_eq!(r.headers()["content-type"], "application/fhir+ndjson");
    let body = r.text().await.expect("body");
    body.lines()
        .map(|l| serde_json::from_str(l).expect("NDJSON line"))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn system_export_to_s3_is_served_by_the_server_and_cancel_removes_the_objects() {
    let Some(endpoint) = common::external("FHIRHOSE_TEST_S3", "./scripts/s3.sh") else {
        return;
    };
    let bucket = new_bucket(&endpoint).await;
    // One Synthea patient (its Bundle: a few hundred resources).
    let one = common::synthea().join("Abram_Lemke_6c5d9ca9-54d7-42f5-bfae-a7c19cd217f2.json.gz");
    let options = server::config::ExportOptions {
        export_file_resources: 50,
        ..s3_options(&endpoint, &bucket)
    };
    let s = common::start(&[one], options).await;

    let container = "s3srv";
    let (status, manifest) = s
        .export_with_status(&format!("/$export?_container={container}"))
        .await;
    let storage = &manifest["extension"]["storage"];
    assert_eq!(storage["container"], container, "{manifest}");
    let outputs = manifest["output"].as_array().expect("output").clone();
    assert!(outputs.len() > 3, "rolled at 50 resources: {manifest}");

    let (mut total, mut counted) = (0u64, 0u64);
    for o in &outputs {
        let url = o["url"].as_str().expect("url");
        assert!(url.starts_with(&s.base), "served by the server: {url}");
        counted += o["count"].as_u64().expect("count");
        for v in download(&s.c, url).await {
            assert_eq!(v["resourceType"], o["type"]);
            total += 1;
        }
    }
    assert_eq!(total, counted);

    // The objects are in the bucket under the container prefix, one per manifest file, and no
    // part is left over.
    let objects = list(&endpoint, &bucket, &format!("{container}/")).await;
    let finals: Vec<_> = objects
        .iter()
        .filter(|(k, _)| k.ends_with(".ndjson"))
        .collect();
    assert_eq!(finals.len(), outputs.len(), "{objects:?}");
    assert!(
        objects.iter().all(|(k, _)| !k.contains("_parts")),
        "{objects:?}"
    );

    // Cancel: status and file URLs answer 404 and the objects are gone from the bucket.
    let first = outputs[0]["url"].as_str().expect("url").to_string();
    let r = s.c.delete(&status).send().await.expect("cancel");
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(
        s.c.get(&status).send().await.expect("status").status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        s.c.get(&first).send().await.expect("file").status(),
        StatusCode::NOT_FOUND
    );
    let left = list(&endpoint, &bucket, &format!("{container}/")).await;
    assert!(left.is_empty(), "objects left after cancel: {left:?}");
}

/// `n` Binary resources of `bytes` bytes of (base64) data each, as NDJSON in `dir`.
fn large_binaries(dir: &Path, n: usize, bytes: usize) -> PathBuf {
    use std::io::Write;
    let path = dir.join("Binary.ndjson");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).expect("create ndjson"));
    let chunk = "QUJDRAAA"; // valid base64 (8 characters, 6 bytes)
    let data = chunk.repeat(bytes / chunk.len());
    for i in 0..n {
        writeln!(
            f,
            r#"{{"resourceType":"Binary","id":"big-{i}","contentType":"application/octet-stream","data":"{data}"}}"#
        )
        .expect("write ndjson");
    }
    f.flush().expect("flush");
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_over_64_mb_goes_up_as_one_multipart_upload_and_downloads_whole() {
    // A moto of its own: its request log shows how the file went up.
    let Some(moto) = Moto::start(false) else {
        return;
    };
    let endpoint = moto.endpoint.clone();
    let bucket = new_bucket(&endpoint).await;
    let input = tempfile::tempdir().expect("temp dir");
    // 70 resources of 1 MiB: one Binary file of about 70 MiB.
    let ndjson = large_binaries(input.path(), 70, 1 << 20);
    let options = server::config::ExportOptions {
        export_file_mb: 256,
        export_file_resources: 1_000_000,
        ..s3_options(&endpoint, &bucket)
    };
    let s = common::start(&[ndjson], options).await;
    let container = "s3big";
    let manifest = s
        .export(&format!("/$export?_container={container}&_type=Binary"))
        .await;
    let outputs = manifest["output"].as_array().expect("output");
    assert_eq!(outputs.len(), 1, "one file: {manifest}");
    assert_eq!(outputs[0]["count"], 70);

    let objects = list(&endpoint, &bucket, &format!("{container}/")).await;
    assert_eq!(objects.len(), 1, "{objects:?}");
    let (key, size) = &objects[0];
    assert!(*size > 64 * 1024 * 1024, "{key}: {size} bytes");
    // The file went up as one multipart upload of several parts (CreateMultipartUpload,
    // UploadPart × n, CompleteMultipartUpload), under `_parts/`, then was renamed (copied) to its
    // final name.
    let log = moto.requests();
    let upload: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(&format!("/{bucket}/{container}/")) && l.contains("/_parts/"))
        .collect();
    let created = upload
        .iter()
        .filter(|l| l.contains("POST ") && l.contains("?uploads"))
        .count();
    let parts = upload
        .iter()
        .filter(|l| l.contains("PUT ") && l.contains("partNumber="))
        .count();
    let completed = upload
        .iter()
        .filter(|l| l.contains("POST ") && l.contains("uploadId=") && l.contains("\" 200"))
        .count();
    assert_eq!((created, completed), (1, 1), "{upload:#?}");
    assert!(parts > 1, "parts: {upload:#?}");
    eprintln!("{key}: {size} bytes uploaded in {parts} parts");

    // Downloaded through the server: every resource whole.
    let lines = download(&s.c, outputs[0]["url"].as_str().expect("url")).await;
    assert_eq!(lines.len(), 70);
    for (i, v) in lines.iter().enumerate() {
        assert_eq!(v["resourceType"], "Binary");
        assert_eq!(
            v["data"].as_str().map(str::len),
            Some(1 << 20),
            "resource {i}"
        );
    }
}

/// A moto of the test's own on a free port (killed when dropped); its request log (one line
/// per HTTP request) goes to a file.
struct Moto {
    dest: Destination,
    endpoint: String,
    _dir: tempfile::TempDir,
}

impl Moto {
    /// `iam_checks`: every request must be signed by a key moto's IAM knows (none is).
    fn start(iam_checks: bool) -> Option<Moto> {
        let dir = tempfile::tempdir().expect("temp dir");
        let env: &[(&str, &str)] = if iam_checks {
            &[("INITIAL_NO_AUTH_ACTION_COUNT", "0")]
        } else {
            &[]
        };
        let dest =
            Destination::with_env(Kind::Moto, dir.path(), env).unwrap_or_else(|e| panic!("{e}"))?;
        Some(Moto {
            endpoint: dest.endpoint(),
            dest,
            _dir: dir,
        })
    }

    fn requests(&self) -> String {
        self.dest.log_text()
    }
}

/// Issue 17: refused credentials are permanent. With 1,000 attempts allowed (back-off up to 60 s
/// between them) a failure taken for transient would keep the export at 202 for hours; it must
/// end at its first attempt, failed (500, not the 503 of an unavailable destination), naming the
/// refusal and the destination.
#[tokio::test(flavor = "multi_thread")]
async fn wrong_s3_credentials_fail_the_export_with_an_outcome_naming_the_cause() {
    let Some(moto) = Moto::start(true) else {
        return;
    };
    let one = common::synthea().join("Abram_Lemke_6c5d9ca9-54d7-42f5-bfae-a7c19cd217f2.json.gz");
    let options = server::config::ExportOptions {
        export_max_attempts: 1000,
        ..s3_options(&moto.endpoint, "fh-denied")
    };
    let s = common::start(&[one], options).await;
    let r = s.kickoff("/$export").await;
    let code = r.status();
    let outcome: Value = if code == StatusCode::ACCEPTED {
        // Accepted: the job must end failed (not retry forever), with the cause.
        let status = r.headers()["content-location"]
            .to_str()
            .expect("status url")
            .to_string();
        let mut ended = None;
        for _ in 0..1500 {
            let r = s.c.get(&status).send().await.expect("status");
            if r.status() != StatusCode::ACCEPTED {
                ended = Some((r.status(), r.json::<Value>().await.expect("outcome")));
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let (code, outcome) = ended.expect("the export ended (not retried as transient)");
        assert_eq!(code, StatusCode::INTERNAL_SERVER_ERROR, "{outcome}");
        outcome
    } else {
        assert!(
            code.is_client_error() || code.is_server_error(),
            "kick-off {code}"
        );
        r.json().await.expect("outcome")
    };
    eprintln!("wrong credentials: {outcome}");
    assert_eq!(outcome["resourceType"], "OperationOutcome", "{outcome}");
    let text = outcome.to_string().to_ascii_lowercase();
    assert!(
        text.contains("destination refused the credentials") && text.contains("invalidaccesskeyid"),
        "the cause is named: {outcome}"
    );
    assert!(
        text.contains("s3") || text.contains("destination") || text.contains("fh-denied"),
        "the destination is named: {outcome}"
    );
}
