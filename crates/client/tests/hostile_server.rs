//! `fhirhose export` against servers that try to take its token, its memory, its disk or its
//! process: real local HTTP servers (`test_support::raw_http`) speaking to the real client.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use serde_json::{Value, json};
use test_support::raw_http::{Reply, Server};

/// 200 with a JSON body.
fn ok(body: impl Into<Vec<u8>>) -> Reply {
    Reply::json(body)
}

/// A [`Server`] answering each request's target with `answer`.
fn start(answer: impl Fn(&str) -> Reply + Send + Sync + 'static) -> Server {
    Server::start(move |r| answer(&r.target))
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: client::ExportArgs,
}

fn key_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/rsa-a.jwk.json")
}

/// `fhirhose export BASE --out OUT` with credentials and `extra`, on a thread: `None` when it
/// takes longer than a minute (a hang).
fn export(base: &str, out: &Path, extra: &[&str]) -> Option<Result<client::Summary, String>> {
    let mut argv: Vec<String> = ["x", base, "--out"].iter().map(|s| s.to_string()).collect();
    argv.push(out.display().to_string());
    for a in [
        "--client-id",
        "test-client",
        "--key",
        key_file().to_str().unwrap(),
        "--quiet",
        "--retries",
        "0",
        "--poll-interval",
        "1",
    ] {
        argv.push(a.to_owned());
    }
    argv.extend(extra.iter().map(|s| s.to_string()));
    let args = Cli::try_parse_from(argv).unwrap().args;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(client::run(args).map_err(|e| e.to_string()));
    });
    rx.recv_timeout(Duration::from_secs(60)).ok()
}

const LINE: &str = "{\"resourceType\":\"Patient\",\"id\":\"p1\"}\n";

fn manifest(requires_token: bool, output: Vec<Value>, next: Option<String>) -> String {
    let mut m = json!({"transactionTime": "2026-01-01T00:00:00Z", "request": "x",
        "requiresAccessToken": requires_token, "output": output, "error": []});
    if let Some(n) = next {
        m["link"] = json!([{"relation": "next", "url": n}]);
    }
    m.to_string()
}

/// The FHIR server: SMART configuration, token endpoint (tokens of 300 s), a kick-off answered
/// with `status`, and `rest` for any other path.
fn fhir_server(
    status: impl Fn(&str) -> String + Send + Sync + 'static,
    rest: impl Fn(&str, &str) -> Reply + Send + Sync + 'static,
) -> Server {
    fhir_server_with(300, status, rest)
}

/// [`fhir_server`] with tokens said to live `lifetime` seconds.
fn fhir_server_with(
    lifetime: u64,
    status: impl Fn(&str) -> String + Send + Sync + 'static,
    rest: impl Fn(&str, &str) -> Reply + Send + Sync + 'static,
) -> Server {
    let base: Arc<Mutex<String>> = Arc::default();
    let b = base.clone();
    let server = start(move |path| {
        let base = b.lock().unwrap().clone();
        if path.starts_with("/fhir/.well-known/smart-configuration") {
            return ok(json!({"token_endpoint": format!("{base}/token")}).to_string());
        }
        if path.starts_with("/token") {
            return ok(json!({"access_token": "SECRET", "token_type": "bearer",
                "expires_in": lifetime})
            .to_string());
        }
        if path.contains("$export") {
            return Reply::status(202, "").header("content-location", status(&base));
        }
        rest(&base, path)
    });
    *base.lock().unwrap() = server.base().to_owned();
    server
}

fn assert_no_token(server: &Server) {
    for (path, auth) in server.seen() {
        assert_eq!(auth, None, "{path} on another origin got the token");
    }
}

/// A token endpoint saying its token lives u64::MAX seconds: taken as a day (an Instant that
/// far ahead does not exist; adding it panicked).
#[test]
fn a_token_lifetime_past_a_day_is_taken_as_a_day() {
    let home = fhir_server_with(
        u64::MAX,
        |base| format!("{base}/status"),
        |_, _| ok(manifest(false, vec![], None)),
    );
    let out = tempfile::tempdir().unwrap();
    let summary = export(&format!("{}/fhir", home.base()), out.path(), &[])
        .expect("the client panicked or hung")
        .unwrap();
    assert_eq!(summary.tokens, 1);
}

/// A status URL and a manifest page on another origin are read without the token.
#[test]
fn the_token_stays_on_the_fhir_servers_origin() {
    let other = start(|path| match path {
        "/page2" => ok(manifest(false, vec![], None)),
        "/Patient.ndjson" => ok(LINE),
        _ => ok(manifest(false, vec![], Some("/page2".into()))),
    });
    let other_base = other.base().to_owned();
    let home = fhir_server(
        move |_| format!("{other_base}/status"),
        |_, _| Reply::status(404, ""),
    );
    let out = tempfile::tempdir().unwrap();
    let r = export(&format!("{}/fhir", home.base()), out.path(), &[]).expect("hung");
    r.unwrap();
    assert_no_token(&other);
    assert!(
        other.seen().iter().any(|(p, _)| p == "/page2"),
        "{:?}",
        other.seen()
    );
    let home_seen = home.seen();
    let kickoff = home_seen
        .iter()
        .find(|(p, _)| p.contains("$export"))
        .unwrap();
    assert_eq!(kickoff.1.as_deref(), Some("Bearer SECRET"));
}

/// A file the manifest says needs the token, on another origin, is refused with the reason;
/// `--token-origin` lets the token go there.
#[test]
fn a_file_needing_the_token_on_another_origin_is_refused() {
    let other = start(|_| ok(LINE));
    let file = format!("{}/Patient.ndjson", other.base());
    let home = fhir_server(
        |base| format!("{base}/status"),
        move |_, _| {
            ok(manifest(
                true,
                vec![json!({"type": "Patient", "url": file})],
                None,
            ))
        },
    );
    let out = tempfile::tempdir().unwrap();
    let err = export(&format!("{}/fhir", home.base()), out.path(), &[])
        .expect("hung")
        .unwrap_err();
    assert!(err.contains("needs the access token"), "{err}");
    assert_no_token(&other);
    let out = tempfile::tempdir().unwrap();
    export(
        &format!("{}/fhir", home.base()),
        out.path(),
        &["--token-origin", other.base()],
    )
    .expect("hung")
    .unwrap();
    assert!(
        other
            .seen()
            .iter()
            .any(|(_, a)| a.as_deref() == Some("Bearer SECRET"))
    );
}

/// A file body past the manifest's `fileSize` (no Content-Length: chunked) stops the run with an
/// error, and no part of it is left on the disk.
#[test]
fn a_body_past_its_file_size_is_stopped() {
    let home = fhir_server(
        |base| format!("{base}/status"),
        |base, path| match path {
            "/endless.ndjson" => Reply::Chunked {
                status: 200,
                chunk: LINE.repeat(1000).into_bytes(),
                times: 100,
                written: Arc::default(),
            },
            _ => ok(manifest(
                false,
                vec![
                    json!({"type": "Patient", "url": format!("{base}/endless.ndjson"),
                    "fileSize": 100_000}),
                ],
                None,
            )),
        },
    );
    let out = tempfile::tempdir().unwrap();
    let err = export(&format!("{}/fhir", home.base()), out.path(), &[])
        .expect("hung")
        .unwrap_err();
    assert!(err.contains("more than 100000 bytes"), "{err}");
    assert!(!out.path().join("Patient.1.ndjson.part").exists());
    // Without a fileSize, --max-file-bytes bounds it.
    let home = fhir_server(
        |base| format!("{base}/status"),
        |base, path| match path {
            "/endless.ndjson" => Reply::Chunked {
                status: 200,
                chunk: LINE.repeat(1000).into_bytes(),
                times: 100,
                written: Arc::default(),
            },
            _ => ok(manifest(
                false,
                vec![json!({"type": "Patient", "url": format!("{base}/endless.ndjson")})],
                None,
            )),
        },
    );
    let err = export(
        &format!("{}/fhir", home.base()),
        out.path(),
        &["--max-file-bytes", "1000000"],
    )
    .expect("hung")
    .unwrap_err();
    assert!(err.contains("more than 1000000 bytes"), "{err}");
}

/// A manifest larger than the bound is refused; a huge error body is read only as far as its
/// reason needs.
#[test]
fn a_huge_manifest_or_an_endless_error_body_is_not_held_in_memory() {
    let home = fhir_server(
        |base| format!("{base}/status"),
        |_, _| {
            let pad = "A".repeat(manifest::MAX_MANIFEST_BYTES as usize);
            ok(format!("{{\"output\":[],\"error\":[],\"pad\":\"{pad}\"}}"))
        },
    );
    let out = tempfile::tempdir().unwrap();
    let err = export(&format!("{}/fhir", home.base()), out.path(), &[])
        .expect("hung")
        .unwrap_err();
    assert!(
        err.contains(&format!("more than {} bytes", manifest::MAX_MANIFEST_BYTES)),
        "{err}"
    );
    // 256 MiB of error body: the client reads the first few KiB and hangs up; the server
    // could write no more than the sockets' buffers hold after that.
    let written: Arc<AtomicUsize> = Arc::default();
    let w = written.clone();
    let home = fhir_server(
        |base| format!("{base}/status"),
        move |_, _| Reply::Chunked {
            status: 400,
            chunk: vec![b'x'; 65536],
            times: 4096,
            written: w.clone(),
        },
    );
    let err = export(&format!("{}/fhir", home.base()), out.path(), &[])
        .expect("hung")
        .unwrap_err();
    assert!(err.contains("HTTP 400"), "{err}");
    // The server notices the hang-up at its next write.
    std::thread::sleep(Duration::from_millis(500));
    let written = written.load(Ordering::Relaxed);
    assert!(
        written < 64 << 20,
        "the client read {written} bytes of an error body"
    );
}
