//! `verify` against servers and folders that try to take its token, its memory or its time:
//! real local HTTP servers (`test_support::raw_http`), real files.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use test_support::raw_http::{Reply, Server};

/// A [`Server`] answering each request's target with a status and body, or with `None` by
/// holding the connection open without answering.
fn start(answer: impl Fn(&str) -> Option<(u16, Vec<u8>)> + Send + Sync + 'static) -> Server {
    Server::start(move |r| match answer(&r.target) {
        Some((status, body)) => Reply::status(status, body),
        None => Reply::Hold(Duration::from_secs(3600)),
    })
}

const LINE: &str = "{\"resourceType\":\"Patient\",\"id\":\"p1\"}\n";

fn manifest(files: &[String], next: Option<String>) -> Vec<u8> {
    let output: Vec<Value> = files
        .iter()
        .map(|u| json!({"type": "Patient", "url": u}))
        .collect();
    let mut m = json!({"transactionTime": "2026-01-01T00:00:00Z", "request": "x",
        "requiresAccessToken": true, "output": output, "error": []});
    if let Some(n) = next {
        m["link"] = json!([{"relation": "next", "url": n}]);
    }
    m.to_string().into_bytes()
}

/// Runs `work` on a thread; `None` when it takes longer than `limit` (a hang).
fn within<T: Send + 'static>(
    limit: Duration,
    work: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(work());
    });
    rx.recv_timeout(limit).ok()
}

/// The token goes to the status URL's origin only: a `next` page and a file on another host
/// are read without it, however the manifest says `requiresAccessToken`.
#[test]
fn the_token_goes_only_to_the_status_urls_origin() {
    let other = start(|path| {
        Some(match path {
            "/page2" => (200, manifest(&[], None)),
            _ => (200, LINE.as_bytes().to_vec()),
        })
    });
    let other_base = other.base().to_owned();
    let home = start(move |path| {
        Some(match path {
            "/status" => (
                200,
                manifest(
                    &[format!("{other_base}/stolen.ndjson")],
                    Some(format!("{other_base}/page2")),
                ),
            ),
            _ => (200, LINE.as_bytes().to_vec()),
        })
    });
    let status = format!("{}/status", home.base());
    let mut source = manifest::HttpSource::new(Some("SECRET".into()))
        .unwrap()
        .send_token_to(&status)
        .unwrap();
    let walk = source.manifest_pages(&status, 10).unwrap();
    assert_eq!(walk.pages(), 2);
    let mut m = walk.finish();
    // A file on the token's origin too: it gets the token, as the manifest requires.
    m["output"]
        .as_array_mut()
        .unwrap()
        .push(json!({"type": "Patient", "url": format!("{}/own.ndjson", home.base())}));
    source.files_need_token(true);
    let report = manifest::verify(&m, &source, &manifest::Options::default());
    assert!(report.ok(), "{report}");
    for (path, auth) in other.seen() {
        assert_eq!(auth, None, "{path} on another origin got the token");
    }
    let home_seen = home.seen();
    assert!(
        home_seen
            .iter()
            .all(|(_, a)| a.as_deref() == Some("Bearer SECRET")),
        "{home_seen:?}"
    );
    // Without a named origin (a saved manifest) the token goes nowhere.
    let source = manifest::HttpSource::new(Some("SECRET".into())).unwrap();
    source.manifest(&status).unwrap();
    assert_eq!(home.seen().last().unwrap().1, None);
}

/// A manifest past MAX_MANIFEST_BYTES is refused, not read into memory to its end.
#[test]
fn a_manifest_larger_than_the_bound_is_refused() {
    let pad = "A".repeat(manifest::MAX_MANIFEST_BYTES as usize);
    let body = format!("{{\"output\":[],\"pad\":\"{pad}\"}}").into_bytes();
    let body = std::sync::Arc::new(body);
    let server = start(move |_| Some((200, body.to_vec())));
    let source = manifest::HttpSource::new(None).unwrap();
    match source.manifest(&format!("{}/status", server.base())) {
        Err(manifest::VerifyError::TooLarge { limit, .. }) => {
            assert_eq!(limit, manifest::MAX_MANIFEST_BYTES)
        }
        // Not the manifest itself: 64 MiB in a test's output.
        Ok(_) => panic!("a manifest of more than MAX_MANIFEST_BYTES was read"),
        Err(e) => panic!("{e}"),
    }
}

/// A server that never answers is given up after the timeout.
#[test]
fn a_server_that_never_answers_times_out() {
    let server = start(|_| None);
    let url = format!("{}/status", server.base());
    let outcome = within(Duration::from_secs(30), move || {
        let source = manifest::HttpSource::with_timeout(None, Duration::from_secs(1)).unwrap();
        source.manifest(&url).map(|_| ()).map_err(|e| e.to_string())
    });
    match outcome {
        Some(Err(e)) => assert!(e.contains("timed out") || e.contains("timeout"), "{e}"),
        other => panic!("no timeout: {other:?}"),
    }
}

fn folder_manifest(dir: &Path, names: &[&str], gzip: bool) -> Value {
    let output: Vec<Value> = names
        .iter()
        .map(|n| {
            let mut e = json!({"type": "Patient", "url": format!("http://s/{n}")});
            if gzip {
                e["extension"] = json!({"compression": "gzip"});
            }
            e
        })
        .collect();
    let m = json!({"transactionTime": "2026-01-01T00:00:00Z", "output": output, "error": []});
    std::fs::write(dir.join("manifest.json"), m.to_string()).unwrap();
    m
}

/// A gzip bomb of one line without a newline is a bad line, read in bounded memory.
#[test]
fn a_line_longer_than_the_bound_is_a_bad_line() {
    use flate2::write::GzEncoder;
    let dir = tempfile::tempdir().unwrap();
    let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let block = vec![b'A'; 1 << 20];
    for _ in 0..(manifest::MAX_LINE_BYTES / block.len() + 2) {
        gz.write_all(&block).unwrap();
    }
    gz.write_all(b"\n").unwrap();
    gz.write_all(LINE.as_bytes()).unwrap();
    std::fs::write(dir.path().join("bomb.ndjson.gz"), gz.finish().unwrap()).unwrap();
    let m = folder_manifest(dir.path(), &["bomb.ndjson.gz"], true);
    let report = manifest::verify(
        &m,
        &manifest::DirSource::new(dir.path(), &m),
        &manifest::Options::default(),
    );
    let problems = &report.files[0].problems;
    assert!(
        problems.iter().any(|p| p.contains("line 1 is longer than")),
        "{problems:?}"
    );
    // The line after it is read and counted.
    assert_eq!(report.files[0].lines, 2);
}

/// A folder's FIFO is reported, not opened (which would wait for a writer forever), and a
/// symbolic link out of the folder is not followed.
#[test]
fn a_fifo_or_a_link_out_of_the_folder_is_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret.ndjson"), LINE).unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(
        outside.path().join("secret.ndjson"),
        dir.path().join("link.ndjson"),
    )
    .unwrap();
    std::fs::write(dir.path().join("real.ndjson"), LINE).unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(
        dir.path().join("real.ndjson"),
        dir.path().join("inside.ndjson"),
    )
    .unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(dir.path().join("fifo.ndjson"))
        .status()
        .unwrap();
    assert!(made.success());
    let m = folder_manifest(
        dir.path(),
        &["fifo.ndjson", "link.ndjson", "inside.ndjson"],
        false,
    );
    let root = dir.path().to_path_buf();
    let report = within(Duration::from_secs(30), move || {
        manifest::verify(
            &m,
            &manifest::DirSource::new(&root, &m),
            &manifest::Options::default(),
        )
    })
    .expect("verify hung on the FIFO");
    let problems = |i: usize| report.files[i].problems.join("; ");
    assert!(
        problems(0).contains("not a regular file"),
        "{}",
        problems(0)
    );
    assert!(
        problems(1).contains("outside the folder"),
        "{}",
        problems(1)
    );
    assert!(report.files[2].problems.is_empty(), "{}", problems(2));
}
