//! Every export ends, and nothing it wrote outlives it: over real HTTP against the real router,
//! served by `server::serve_connections` (what `fhirhose serve` runs) on a socket.
//!
//! - admission of the concurrent-export limit is atomic (16 simultaneous kick-offs, limit 4);
//! - a destination that stays down fails the export with a 503 naming it, after bounded,
//!   backed-off retries, and frees its slot; DELETE meanwhile answers 202;
//! - a full disk fails the export with 507 and removes its files;
//! - a cancel recorded but not carried out (a crash between the two) is finished by the sweeper;
//! - retention: `Expires` is completion + retention; then the files go and status answers 410;
//! - manifests and error texts show no server paths;
//! - slowloris: a half-sent header is dropped after the header-read timeout, and so is a
//!   connection that sends nothing; a request body slower than the minimum rate gets 408;
//! - slow reading: a connection whose client does not read its response (HTTP/1.1 with a
//!   closed TCP window, HTTP/2 with no window granted) is closed after the send timeout and its
//!   request slot is free again; a client that reads steadily gets its whole response;
//! - the connection cap holds.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use store::{Store, WriteOp};

struct Server {
    base: String,
    c: reqwest::Client,
    dir: tempfile::TempDir,
    export: Arc<export::ExportService>,
    /// The store (SQLite, or PostgreSQL with `FHIRHOSE_TEST_DATABASE`) and its database's guard.
    db: store::testing::TestStore,
}

/// `patients` Patients of about `pad` bytes each.
fn fill(store: &dyn Store, patients: usize, pad: usize) {
    let text = "x".repeat(pad);
    let ops: Vec<WriteOp> = (0..patients)
        .map(|i| WriteOp::Create {
            resource: json!({"resourceType": "Patient", "id": format!("p{i}"),
                "text": {"status": "generated", "div": format!("<div xmlns=\"http://www.w3.org/1999/xhtml\">{text}</div>")}}),
        })
        .collect();
    store.write(ops).unwrap();
}

/// A server over a fresh data directory with `patients` Patients, export settings adjusted
/// by `tune` (short back-offs and sweeps so that tests stay fast).
async fn start(
    patients: usize,
    limits: server::ConnectionLimits,
    tune: impl FnOnce(&Path, &mut export::ExportConfig),
) -> Server {
    start_with(patients, limits, tune, |_| {}).await
}

/// [`start`], with the application state adjusted by `state_tune` too.
async fn start_with(
    patients: usize,
    limits: server::ConnectionLimits,
    tune: impl FnOnce(&Path, &mut export::ExportConfig),
    state_tune: impl FnOnce(&mut server::AppState),
) -> Server {
    let dir = tempfile::tempdir().unwrap();
    // Store calls block (PostgreSQL's client): off the async workers.
    let db = tokio::task::block_in_place(|| {
        let db = store::testing::test_store(Some(Arc::new(search::SearchIndexer)));
        fill(&*db.store, patients, 200);
        db
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let mut config = server::config::ExportOptions::default()
        .export_config(dir.path(), base.clone())
        .unwrap();
    config.workers = 2;
    config.retry_backoff = Duration::from_millis(50);
    config.retry_backoff_max = Duration::from_millis(200);
    config.sweep_every = Duration::from_millis(100);
    config.run.heartbeat_every = Duration::from_millis(100);
    tune(dir.path(), &mut config);
    let state = tokio::task::block_in_place(|| {
        server::AppState::with_export(
            db.store.clone(),
            base.clone(),
            auth::Auth::none(),
            1 << 20,
            config,
        )
    })
    .unwrap();
    let mut state = state;
    state_tune(&mut state);
    let export = state.export.clone();
    tokio::spawn(server::serve_connections(
        listener,
        server::router(state),
        limits,
        std::future::pending(),
        Duration::from_secs(1),
    ));
    Server {
        base,
        c: reqwest::Client::new(),
        dir,
        export,
        db,
    }
}

fn limits() -> server::ConnectionLimits {
    server::ConnectionLimits {
        header_read_timeout: Duration::from_secs(10),
        max_connections: 1024,
        max_connections_per_address: 256,
        min_body_rate: 1024,
        send_timeout: Duration::from_secs(60),
    }
}

/// An S3 destination on a port where nothing listens.
fn dead_s3() -> export::ObjectStoreSink {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    export::ObjectStoreSink::new(
        export::RemoteConfig::S3 {
            bucket: "fhirhose-test".into(),
            region: "us-east-1".into(),
            endpoint: Some(format!("http://127.0.0.1:{port}")),
            access_key_id: Some("AKIDTEST".into()),
            secret_access_key: Some("very-secret-key".into()),
            allow_http: true,
        },
        export::RemoteSettings {
            connect_timeout: Duration::from_millis(200),
            request_timeout: Duration::from_secs(1),
            max_retries: 0,
            retry_timeout: Duration::from_millis(100),
        },
    )
    .unwrap()
}

/// [`dead_s3`] that went down just after the kick-off: its probe at kick-off succeeds (a
/// destination down at kick-off is answered 503 there, `a_destination_down_at_kick_off_is_503`),
/// everything after it fails.
fn down_after_kickoff() -> test_support::sink::FaultySink {
    use test_support::sink::{Call, Fault, FaultySink};
    FaultySink::with_hook(Arc::new(dead_s3()), |call| match call {
        Call::EnsureContainer { .. } => Some(Fault::Skip),
        _ => None,
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_destination_down_at_kick_off_is_503() {
    let s = start(300, limits(), |_, c| {
        c.sink = Arc::new(dead_s3());
    })
    .await;
    let r = s.kickoff().await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.headers().contains_key("retry-after"));
    let text = r.text().await.unwrap();
    assert!(
        text.contains("OperationOutcome") && !text.contains("very-secret-key"),
        "{text}"
    );
}

impl Server {
    async fn kickoff(&self) -> reqwest::Response {
        self.c
            .get(format!("{}/$export", self.base))
            .header("accept", "application/fhir+json")
            .header("prefer", "respond-async")
            .send()
            .await
            .unwrap()
    }

    async fn kickoff_ok(&self) -> String {
        let r = self.kickoff().await;
        assert_eq!(
            r.status(),
            StatusCode::ACCEPTED,
            "{}",
            r.text().await.unwrap()
        );
        r.headers()["content-location"]
            .to_str()
            .unwrap()
            .to_string()
    }

    /// Polls until the status is no longer 202 (bounded), returning the final answer.
    async fn settle(&self, status_url: &str) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            let r = self.c.get(status_url).send().await.unwrap();
            match r.status() {
                StatusCode::ACCEPTED | StatusCode::TOO_MANY_REQUESTS => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                s => {
                    let h = r.headers().clone();
                    return (s, h, r.json().await.unwrap_or(Value::Null));
                }
            }
        }
        panic!("the export did not end within the bound");
    }

    fn folder(&self, status_url: &str) -> PathBuf {
        let job = status_url.rsplit('/').next().unwrap();
        self.dir.path().join("storage/exports").join(job)
    }
}

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting until {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_simultaneous_kickoffs_with_a_limit_of_four_admit_exactly_four() {
    // No workers: admitted exports stay queued, so each holds its slot.
    let s = Arc::new(
        start(200, limits(), |_, c| {
            c.workers = 0;
            c.max_concurrent = 4;
        })
        .await,
    );
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move { s.kickoff().await.status() }));
    }
    let mut accepted = 0;
    for t in tasks {
        match t.await.unwrap() {
            StatusCode::ACCEPTED => accepted += 1,
            StatusCode::TOO_MANY_REQUESTS => {}
            other => panic!("kick-off answered {other}"),
        }
    }
    assert_eq!(accepted, 4, "exactly the limit is admitted");
    assert_eq!(s.kickoff().await.status(), StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_destination_that_stays_down_fails_the_export_with_503_naming_it_and_frees_its_slot() {
    let s = start(300, limits(), |_, c| {
        c.sink = Arc::new(down_after_kickoff());
        c.max_attempts = 3;
        c.max_concurrent = 1;
    })
    .await;
    let status_url = s.kickoff_ok().await;
    let (code, _, body) = s.settle(&status_url).await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["resourceType"], "OperationOutcome");
    let text = body.to_string();
    assert!(
        text.contains("s3://fhirhose-test/exports/"),
        "names the destination: {text}"
    );
    assert!(
        text.contains("3 times"),
        "says the attempts were used up: {text}"
    );
    assert!(
        !text.contains("very-secret-key") && !text.contains("/tmp"),
        "{text}"
    );
    // The slot is free again.
    let again = s.kickoff().await;
    assert_eq!(again.status(), StatusCode::ACCEPTED);
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_while_the_destination_is_down_answers_202() {
    let s = start(300, limits(), |_, c| {
        c.sink = Arc::new(down_after_kickoff());
        // The export keeps retrying for the length of this test.
        c.max_attempts = 1000;
        c.retry_backoff = Duration::from_secs(60);
    })
    .await;
    let status_url = s.kickoff_ok().await;
    let r = s.c.delete(&status_url).send().await.unwrap();
    assert_eq!(
        r.status(),
        StatusCode::ACCEPTED,
        "{}",
        r.text().await.unwrap()
    );
    assert_eq!(
        s.c.get(&status_url).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
}

/// A tmpfs of `kib` KiB mounted at `at`, unmounted when dropped; `None` where mounting is not
/// allowed (not root): the test is then skipped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, kib: u64) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).ok()?;
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={kib}k"), "tmpfs"])
            .arg(at)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// With `--export-full-wait 0` a full disk fails the export at once, as before exports waited
/// for space (the wait itself is the fault suite's `disk-full` cases).
#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_fails_the_export_with_507_and_removes_its_files() {
    let mut mounted = None;
    // About 600 KB of Patients into a 256 KiB file system.
    let s = start(2500, limits(), |dir, c| {
        mounted = Tmpfs::mount(&dir.join("storage"), 256);
        c.max_attempts = 2;
        c.full_wait = Duration::ZERO;
    })
    .await;
    if mounted.is_none() {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    }
    let status_url = s.kickoff_ok().await;
    let (code, _, body) = s.settle(&status_url).await;
    assert_eq!(code.as_u16(), 507, "{body}");
    let text = body.to_string();
    assert!(text.contains("no space left"), "{text}");
    assert!(
        !text.contains(&s.dir.path().display().to_string()),
        "no server paths: {text}"
    );
    let folder = s.folder(&status_url);
    wait_until("the failed export's files are removed", || !folder.exists()).await;
    drop(mounted);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancel_recorded_before_a_crash_has_its_files_removed_by_the_sweeper() {
    let s = start(300, limits(), |_, _| {}).await;
    let status_url = s.kickoff_ok().await;
    let (code, _, manifest) = s.settle(&status_url).await;
    assert_eq!(code, StatusCode::OK, "{manifest}");
    let folder = s.folder(&status_url);
    assert!(folder.exists());
    // What a DELETE interrupted by kill -9 leaves: the cancel recorded, the files still there.
    let job = status_url.rsplit('/').next().unwrap();
    tokio::task::block_in_place(|| s.db.jobs().unwrap().cancel(job, 0)).unwrap();
    wait_until("the cancelled export's files are removed", || {
        !folder.exists()
    })
    .await;
    assert_eq!(
        s.c.get(&status_url).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_complete_export_expires_after_the_retention_period() {
    let s = start(300, limits(), |_, c| {
        c.retention = Duration::from_secs(2);
    })
    .await;
    let status_url = s.kickoff_ok().await;
    let (code, headers, manifest) = s.settle(&status_url).await;
    assert_eq!(code, StatusCode::OK, "{manifest}");
    let expires = httpdate::parse_http_date(headers["expires"].to_str().unwrap()).unwrap();
    assert!(
        expires < std::time::SystemTime::now() + Duration::from_secs(3600),
        "Expires is completion + retention (2 s), not a day from now"
    );
    // No server path in the manifest: the location is container-relative.
    let location = manifest["extension"]["storage"]["location"]
        .as_str()
        .unwrap();
    assert!(location.starts_with("exports/"), "{location}");
    assert!(
        !manifest
            .to_string()
            .contains(&s.dir.path().display().to_string())
    );
    let file_url = manifest["output"][0]["url"].as_str().unwrap().to_string();
    let folder = s.folder(&status_url);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = s.c.get(&status_url).send().await.unwrap();
        if r.status() == StatusCode::GONE {
            break;
        }
        assert_eq!(r.status(), StatusCode::OK);
        assert!(Instant::now() < deadline, "the export never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_until("the expired export's files are removed", || {
        !folder.exists()
    })
    .await;
    assert_eq!(
        s.c.get(&file_url).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    // The service agrees (and holds no slot for it).
    assert_eq!(
        tokio::task::block_in_place(|| s.export.resume()).unwrap(),
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_half_sent_header_is_dropped_after_the_header_read_timeout() {
    let s = start(0, short_limits(1024), |_, _| {}).await;
    let (answer, _) =
        sent_then_closed(&s, b"GET /metadata HTTP/1.1\r\nHost: x\r\nAccept: appl").await;
    // Bounded: a server without a header timeout never answers nor closes.
    let text = answer.expect("the server closed the connection (no read timeout on our side)");
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "closed, at most with a 408: {text}"
    );
    // The server still serves.
    let ok =
        s.c.get(format!("{}/metadata", s.base))
            .send()
            .await
            .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
}

/// The answers hyper makes itself, for requests it cannot parse, carry an OperationOutcome too.
#[tokio::test(flavor = "multi_thread")]
async fn requests_that_cannot_be_parsed_get_an_operation_outcome() {
    let s = start(0, limits(), |_, _| {}).await;
    let a = s.base.trim_start_matches("http://").to_string();
    let many_fields: String = (0..101).map(|i| format!("X-F{i}: v\r\n")).collect();
    let cases = [
        (
            "GARBAGE\r\n\r\n".to_string(),
            "400 Bad Request",
            "structure",
        ),
        (
            format!("GET /metadata HTTP/1.1\r\nHost: {a}\r\nBad Header\r\n\r\n"),
            "400 Bad Request",
            "structure",
        ),
        (
            format!(
                "GET /Patient?name={} HTTP/1.1\r\nHost: {a}\r\n\r\n",
                "a".repeat(70_000)
            ),
            "414 URI Too Long",
            "too-long",
        ),
        (
            format!("GET /metadata HTTP/1.1\r\nHost: {a}\r\n{many_fields}\r\n"),
            "431 Request Header Fields Too Large",
            "too-long",
        ),
        // A good request first on the same connection: its answer is left as it is.
        (
            format!("GET /metadata HTTP/1.1\r\nHost: {a}\r\n\r\nGARBAGE\r\n\r\n"),
            "400 Bad Request",
            "structure",
        ),
    ];
    for (request, status, code) in cases {
        let a = a.clone();
        let answer = tokio::task::spawn_blocking(move || {
            let mut conn = TcpStream::connect(&a).unwrap();
            conn.write_all(request.as_bytes()).unwrap();
            until_closed(&mut conn).unwrap()
        })
        .await
        .unwrap();
        // The last answer on the connection is the error.
        let at = answer.rfind("HTTP/1.1 ").unwrap();
        let (before, last) = answer.split_at(at);
        if !before.is_empty() {
            assert!(before.starts_with("HTTP/1.1 200 OK\r\n"), "{before}");
            assert!(before.contains("CapabilityStatement"), "{before}");
        }
        let (head, body) = last.split_once("\r\n\r\n").unwrap();
        assert!(
            head.starts_with(&format!("HTTP/1.1 {status}\r\n")),
            "{head}"
        );
        assert!(
            head.contains("content-type: application/fhir+json"),
            "{head}"
        );
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        let outcome: Value = serde_json::from_str(body).unwrap();
        assert_eq!(outcome["resourceType"], "OperationOutcome", "{body}");
        assert_eq!(outcome["issue"][0]["code"], code, "{body}");
    }
}

/// Connection limits of the slow-client tests: a 1 s header-read timeout (and idle limit).
fn short_limits(min_body_rate: u64) -> server::ConnectionLimits {
    server::ConnectionLimits {
        header_read_timeout: Duration::from_secs(1),
        max_connections: 1024,
        max_connections_per_address: 256,
        min_body_rate,
        send_timeout: Duration::from_secs(60),
    }
}

/// Connects to `s`, sends `first` (perhaps nothing), and reads until the server closes: what
/// it sent, and how long after `first` it closed.
async fn sent_then_closed(s: &Server, first: &'static [u8]) -> (std::io::Result<String>, Duration) {
    let addr = s.base.trim_start_matches("http://").to_string();
    tokio::task::spawn_blocking(move || {
        let mut conn = TcpStream::connect(&addr).unwrap();
        conn.write_all(first).unwrap();
        let t0 = Instant::now();
        (until_closed(&mut conn), t0.elapsed())
    })
    .await
    .unwrap()
}

/// Reads what the server sends on `conn` until it closes (at most 20 s).
fn until_closed(conn: &mut TcpStream) -> std::io::Result<String> {
    conn.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut buf = Vec::new();
    conn.read_to_end(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// POSTs a Patient padded with spaces to 4,000 bytes in `chunks` pieces `every` apart; what the
/// server answered.
fn post_slowly(addr: &str, chunks: usize, every: Duration) -> std::io::Result<String> {
    let mut body = br#"{"resourceType":"Patient","active":true}"#.to_vec();
    body.resize(4000, b' ');
    let mut conn = TcpStream::connect(addr)?;
    write!(
        conn,
        "POST /Patient HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/fhir+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    for piece in body.chunks(body.len().div_ceil(chunks)) {
        if conn.write_all(piece).is_err() {
            break; // the server gave up on the body and closed
        }
        std::thread::sleep(every);
    }
    until_closed(&mut conn)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_that_sends_nothing_is_closed_after_the_header_read_timeout() {
    let s = start(0, short_limits(1024), |_, _| {}).await;
    let (answer, took) = sent_then_closed(&s, b"").await;
    // Without the guard, hyper waits for a first byte for ever: the read above times out.
    let answer = answer.expect("the server closed the silent connection");
    assert_eq!(answer, "", "closed unanswered");
    assert!(took < Duration::from_secs(10), "closed after {took:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_http2_connection_is_closed_after_the_header_read_timeout() {
    let s = start(0, short_limits(1024), |_, _| {}).await;
    // HTTP/2 with prior knowledge: the preface and an empty SETTINGS frame, then nothing.
    let (answer, took) =
        sent_then_closed(&s, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0").await;
    // Without the guard the server keeps the connection (hyper has no idle limit for HTTP/2):
    // the read above times out.
    let answer = answer.expect("the server closed the idle HTTP/2 connection");
    assert!(
        answer.len() >= 9,
        "the server's SETTINGS came first: {answer:?}"
    );
    assert!(took < Duration::from_secs(10), "closed after {took:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_body_slower_than_the_minimum_rate_gets_408_and_a_steady_one_is_read() {
    let s = start(0, short_limits(1000), |_, _| {}).await;
    let addr = s.base.trim_start_matches("http://").to_string();
    // 10 bytes every 100 ms: 100 bytes a second against 1,000, after a 1 s grace.
    let a = addr.clone();
    let slow = tokio::task::spawn_blocking(move || {
        let t0 = Instant::now();
        (
            post_slowly(&a, 400, Duration::from_millis(100)),
            t0.elapsed(),
        )
    });
    let (answer, took) = slow.await.unwrap();
    let answer = answer.expect("answered and closed");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.contains("OperationOutcome") && answer.contains("--min-body-rate"),
        "{answer}"
    );
    assert!(took < Duration::from_secs(10), "answered after {took:?}");
    // 200 bytes every 100 ms: 2,000 bytes a second, for longer than the idle limit (1 s): a
    // request in progress is not idle.
    let steady =
        tokio::task::spawn_blocking(move || post_slowly(&addr, 20, Duration::from_millis(100)));
    let answer = steady.await.unwrap().expect("answered");
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
}

/// The start of an HTTP/2 (prior knowledge) connection to `authority` that asks for `path`
/// (shorter than 127 bytes): the preface, an empty SETTINGS frame, and one HEADERS frame
/// (END_STREAM | END_HEADERS) with HPACK indexed `:method GET` and `:scheme http`, literal
/// `:path` and `:authority` without Huffman coding.
fn h2_get(authority: &str, path: &str) -> Vec<u8> {
    let mut request = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0".to_vec();
    let mut block = vec![0x82, 0x86, 0x04, u8::try_from(path.len()).unwrap()];
    block.extend_from_slice(path.as_bytes());
    block.extend_from_slice(&[0x01, u8::try_from(authority.len()).unwrap()]);
    block.extend_from_slice(authority.as_bytes());
    let len = u32::try_from(block.len()).unwrap().to_be_bytes();
    request.extend_from_slice(&[len[1], len[2], len[3], 0x01, 0x05, 0, 0, 0, 1]);
    request.extend_from_slice(&block);
    request
}

/// Connection limits of the slow-reader tests: a 2 s send timeout.
fn stall_limits() -> server::ConnectionLimits {
    server::ConnectionLimits {
        send_timeout: Duration::from_secs(2),
        ..limits()
    }
}

/// A server whose search `GET /Patient?_count=40` answers about 4 MB (40 Patients of 100 KB),
/// with at most `requests` requests in progress (all of them from one address if need be).
async fn start_big_pages(requests: usize) -> Server {
    let s = start_with(
        0,
        stall_limits(),
        |_, _| {},
        move |state| state.in_flight = server::in_flight::InFlight::new(requests, requests),
    )
    .await;
    tokio::task::block_in_place(|| fill(&*s.db.store, 40, 100_000));
    s
}

/// Asks for the 4 MB page of [`start_big_pages`] over HTTP/1.1 from `from` with a 4 KiB
/// receive buffer, and reads nothing.
async fn unread_page(s: &Server, from: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let (mut conn, addr) = connect_with(s, from, Some(4096)).await;
    conn.write_all(format!("GET /Patient?_count=40 HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    conn
}

/// Reads `conn` to its end (at most 20 s, else panics): the bytes read, whether the server
/// closed or reset it.
async fn read_until_closed(mut conn: tokio::net::TcpStream) -> usize {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 65_536];
    let mut total = 0;
    let read = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => total += n,
            }
        }
    });
    read.await.expect("the server closed the connection");
    total
}

/// A client that asks for a large response and does not read it held its request slot for
/// ever (two such requests and every request of the server was answered 503); now the
/// connection is closed once the response has waited `--send-timeout` for it, and the slots are
/// free again.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_does_not_read_its_response_loses_its_connection_and_slot() {
    let s = start_big_pages(2).await;
    let t0 = Instant::now();
    let stalled = vec![
        unread_page(&s, "127.0.0.1").await,
        unread_page(&s, "127.0.0.2").await,
    ];
    wait_until_async(&s, "fhirhose_requests_in_progress", 2).await;
    // Every slot held: another client gets 503 meanwhile.
    let refused = metadata_from(&s, "127.0.0.3").await;
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    // Within the 2 s send timeout (and the watch's 1 s tick) both are closed, having taken a
    // part of the 4 MB page only.
    wait_until_async(&s, "fhirhose_requests_in_progress", 0).await;
    let freed = t0.elapsed();
    assert!(freed >= Duration::from_secs(2), "freed after {freed:?}");
    for conn in stalled {
        let read = read_until_closed(conn).await;
        assert!(read < 4_000_000, "read {read} bytes of the page");
    }
    assert!(metric(&s, "fhirhose_stalled_connections_closed_total").await >= 2);
    let served = metadata_from(&s, "127.0.0.3").await;
    assert!(served.starts_with("HTTP/1.1 200"), "{served}");
}

/// The send timeout bounds each wait for the client, not the response: a client that reads
/// steadily but slowly (4 MB at about 1 MB/s, twice the timeout) gets all of it.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_reads_slowly_but_steadily_gets_its_whole_response() {
    use tokio::io::AsyncReadExt;
    let s = start_big_pages(2).await;
    let mut conn = unread_page(&s, "127.0.0.1").await;
    let mut buf = vec![0u8; 32_768];
    let mut answer = Vec::new();
    let t0 = Instant::now();
    while !answer.ends_with(b"]}") {
        let n = tokio::time::timeout(Duration::from_secs(20), conn.read(&mut buf))
            .await
            .expect("the answer goes on")
            .unwrap();
        assert!(n > 0, "closed after {} bytes", answer.len());
        answer.extend_from_slice(&buf[..n]);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let took = t0.elapsed();
    assert!(took > Duration::from_secs(2), "read in {took:?}");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 200"), "{}", &text[..200]);
    let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
    // Chunked or not, the 40 Patients are all there.
    assert_eq!(body.matches("\"resourceType\":\"Patient\"").count(), 40);
}

/// HTTP/2: a stream that the client grants no window beyond the initial 64 KiB waits with its
/// socket idle (no TCP back-pressure); it held its slot for ever too.
#[tokio::test(flavor = "multi_thread")]
async fn an_http2_stream_granted_no_window_loses_its_connection_and_slot() {
    let s = start_big_pages(2).await;
    let a = s.base.trim_start_matches("http://").to_string();
    let request = h2_get(&a, "/Patient?_count=40");
    let t0 = Instant::now();
    let read = tokio::task::spawn_blocking(move || {
        let mut conn = TcpStream::connect(&a).unwrap();
        conn.write_all(&request).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut buf = Vec::new();
        // No WINDOW_UPDATE, no SETTINGS acknowledgement: read until the server closes.
        let ended = conn.read_to_end(&mut buf);
        (ended.map_err(|e| e.kind()), buf.len())
    });
    wait_until_async(&s, "fhirhose_requests_in_progress", 1).await;
    let (ended, bytes) = read.await.unwrap();
    assert!(
        !matches!(
            ended,
            Err(std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
        ),
        "the server kept the connection: {ended:?}"
    );
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(15),
        "closed after {took:?}"
    );
    assert!(
        bytes < 200_000,
        "{bytes} bytes sent within the initial window"
    );
    wait_until_async(&s, "fhirhose_requests_in_progress", 0).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_connection_cap_holds() {
    let s = start(0, capped(2, 2), |_, _| {}).await;
    let held = held_connections(&s, 2).await;
    let quick = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let third = quick.get(format!("{}/metadata", s.base)).send().await;
    assert!(
        third.is_err(),
        "a third connection is not served while two are open"
    );
    drop(held);
    let patient = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let r = patient
        .get(format!("{}/metadata", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "served once a connection closed"
    );
}

/// At most `max` connections, `per_address` from one address; a long header-read timeout.
fn capped(max: usize, per_address: usize) -> server::ConnectionLimits {
    server::ConnectionLimits {
        header_read_timeout: Duration::from_secs(30),
        max_connections: max,
        max_connections_per_address: per_address,
        min_body_rate: 1024,
        send_timeout: Duration::from_secs(60),
    }
}

/// `n` kept-alive connections to `s` from 127.0.0.1, each served once and then idle.
async fn held_connections(s: &Server, n: usize) -> Vec<TcpStream> {
    let a = s.base.trim_start_matches("http://").to_string();
    tokio::task::spawn_blocking(move || {
        (0..n)
            .map(|_| {
                let mut conn = TcpStream::connect(&a).unwrap();
                conn.write_all(format!("GET /metadata HTTP/1.1\r\nHost: {a}\r\n\r\n").as_bytes())
                    .unwrap();
                conn.set_read_timeout(Some(Duration::from_secs(20)))
                    .unwrap();
                let mut first = [0u8; 9];
                conn.read_exact(&mut first).unwrap();
                assert_eq!(&first, b"HTTP/1.1 ", "served");
                conn
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap()
}

/// A new connection to `s` from the local address `from` (127.0.0.2 and so on are this
/// machine's loopback too), and the server's address.
async fn connect_from(s: &Server, from: &str) -> (tokio::net::TcpStream, std::net::SocketAddr) {
    connect_with(s, from, None).await
}

/// [`connect_from`], with a receive buffer of `recv_buffer` bytes when one is given.
async fn connect_with(
    s: &Server,
    from: &str,
    recv_buffer: Option<u32>,
) -> (tokio::net::TcpStream, std::net::SocketAddr) {
    let addr: std::net::SocketAddr = s.base.trim_start_matches("http://").parse().unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    if let Some(size) = recv_buffer {
        socket.set_recv_buffer_size(size).unwrap();
    }
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    (socket.connect(addr).await.unwrap(), addr)
}

/// `GET /metadata` on a new connection from the local address `from`, read until the server
/// closes it (`Connection: close`).
async fn metadata_from(s: &Server, from: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut conn, addr) = connect_from(s, from).await;
    conn.write_all(
        format!("GET /metadata HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), conn.read_to_end(&mut answer))
        .await
        .expect("the server closed the connection")
        .unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn one_client_address_cannot_hold_every_connection() {
    let s = start(0, capped(8, 2), |_, _| {}).await;
    let held = held_connections(&s, 2).await;
    // A third connection from the same address: answered at once, 503 with an
    // OperationOutcome, and closed; it holds no slot.
    let third = metadata_from(&s, "127.0.0.1").await;
    assert!(third.starts_with("HTTP/1.1 503"), "{third}");
    let lower = third.to_ascii_lowercase();
    assert!(lower.contains("\r\nretry-after: 1\r\n"), "{third}");
    assert!(
        third.contains("OperationOutcome")
            && third.contains("throttled")
            && third.contains("--max-connections-per-address"),
        "{third}"
    );
    // Another client (127.0.0.2 is also this machine's loopback) is served meanwhile.
    let other = metadata_from(&s, "127.0.0.2").await;
    assert!(other.starts_with("HTTP/1.1 200"), "{other}");
    // The same address again once one of its connections closed.
    drop(held);
    let mut again = String::new();
    for _ in 0..50 {
        again = metadata_from(&s, "127.0.0.1").await;
        if again.starts_with("HTTP/1.1 200") {
            break;
        }
        // The server sees the close a moment after the client made it.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(again.starts_with("HTTP/1.1 200"), "{again}");
}

/// A POST from the local address `from` whose 100-byte body is half sent: its request stays in
/// progress until [`finish_post`].
async fn half_sent_post(s: &Server, from: &str) -> TcpStream {
    let (conn, addr) = connect_from(s, from).await;
    let mut conn = conn.into_std().unwrap();
    conn.set_nonblocking(false).unwrap();
    write!(
        conn,
        "POST /Patient HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/fhir+json\r\nContent-Length: 100\r\nConnection: close\r\n\r\n{}",
        &half_patient()[..50]
    )
    .unwrap();
    conn
}

fn half_patient() -> String {
    let mut body = r#"{"resourceType":"Patient","active":true}"#.to_string();
    body.push_str(&" ".repeat(100 - body.len()));
    body
}

/// Sends the rest of a [`half_sent_post`]'s body: the server's answer.
fn finish_post(mut conn: TcpStream) -> String {
    conn.write_all(&half_patient().as_bytes()[50..]).unwrap();
    until_closed(&mut conn).unwrap()
}

/// The value of the `/metrics` line `name`.
async fn metric(s: &Server, name: &str) -> u64 {
    let text =
        s.c.get(format!("{}/metrics", s.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} in {text}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_address_holds_its_share_of_the_requests_in_progress() {
    // 3 requests in progress at once, 2 of them from one address.
    let s = start_with(
        0,
        limits(),
        |_, _| {},
        |state| {
            state.in_flight = server::in_flight::InFlight::new(3, 2);
        },
    )
    .await;
    let held = vec![
        half_sent_post(&s, "127.0.0.1").await,
        half_sent_post(&s, "127.0.0.1").await,
    ];
    wait_until_async(&s, "fhirhose_requests_in_progress", 2).await;
    // A third request from the same address: 503 at once, with an OperationOutcome.
    let third = metadata_from(&s, "127.0.0.1").await;
    assert!(third.starts_with("HTTP/1.1 503"), "{third}");
    assert!(
        third
            .to_ascii_lowercase()
            .contains("\r\nretry-after: 1\r\n"),
        "{third}"
    );
    assert!(
        third.contains("OperationOutcome")
            && third.contains("throttled")
            && third.contains("--max-requests"),
        "{third}"
    );
    // Another address is served meanwhile.
    let other = metadata_from(&s, "127.0.0.2").await;
    assert!(other.starts_with("HTTP/1.1 200"), "{other}");
    // With a third request held (from 127.0.0.2), the server's bound: a fourth address waits
    // for nothing and is answered 503 too; `/metrics` is still served.
    let more = half_sent_post(&s, "127.0.0.2").await;
    wait_until_async(&s, "fhirhose_requests_in_progress", 3).await;
    let fourth = metadata_from(&s, "127.0.0.3").await;
    assert!(fourth.starts_with("HTTP/1.1 503"), "{fourth}");
    assert_eq!(metric(&s, "fhirhose_requests_refused_total").await, 2);
    // The held requests complete; then the first address is served again.
    let answers = tokio::task::spawn_blocking(move || {
        held.into_iter()
            .chain([more])
            .map(finish_post)
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    for a in answers {
        assert!(a.starts_with("HTTP/1.1 201"), "{a}");
    }
    let again = metadata_from(&s, "127.0.0.1").await;
    assert!(again.starts_with("HTTP/1.1 200"), "{again}");
}

/// Downloads of export files have a bound of their own (`--max-downloads`): with every download
/// slot taken a download gets 503 naming it while other requests are served, and with every
/// request slot taken downloads are still served.
#[tokio::test(flavor = "multi_thread")]
async fn downloads_and_other_requests_have_bounds_of_their_own() {
    use server::in_flight::{InFlight, Pool};
    let requests = InFlight::new(2, 2);
    let downloads = InFlight::of(Pool::Downloads, 1, 1);
    let (r, d) = (requests.clone(), downloads.clone());
    let s = start_with(
        20,
        limits(),
        |_, _| {},
        move |state| {
            state.in_flight = r;
            state.downloads_in_flight = d;
        },
    )
    .await;
    let status_url = s.kickoff_ok().await;
    let (code, _, manifest) = s.settle(&status_url).await;
    assert_eq!(code, StatusCode::OK, "{manifest}");
    let file_url = manifest["output"][0]["url"].as_str().unwrap().to_string();
    assert!(
        file_url.contains(server::in_flight::DOWNLOADS_PATH),
        "{file_url}"
    );

    // The download slot taken (as a download in progress takes it).
    let held = downloads.enter(None).unwrap();
    let refused = s.c.get(&file_url).send().await.unwrap();
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.headers()["retry-after"], "1");
    let outcome = refused.text().await.unwrap();
    assert!(
        outcome.contains("throttled") && outcome.contains("--max-downloads"),
        "{outcome}"
    );
    assert_eq!(
        s.c.get(&status_url).send().await.unwrap().status(),
        StatusCode::OK,
        "a status request is served while the downloads are at their bound"
    );
    assert_eq!(metric(&s, "fhirhose_downloads_in_progress").await, 1);
    assert_eq!(metric(&s, "fhirhose_downloads_refused_total").await, 1);
    assert_eq!(metric(&s, "fhirhose_requests_refused_total").await, 0);
    drop(held);

    // Every request slot taken: a download is served, another request is not.
    let held: Vec<_> = (0..2).map(|_| requests.enter(None).unwrap()).collect();
    let file = s.c.get(&file_url).send().await.unwrap();
    assert_eq!(file.status(), StatusCode::OK);
    let ndjson = file.text().await.unwrap();
    assert!(ndjson.lines().count() > 0 && ndjson.contains("resourceType"));
    let status = s.c.get(&status_url).send().await.unwrap();
    assert_eq!(status.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(status.text().await.unwrap().contains("--max-requests"));
    drop(held);
    assert_eq!(
        s.c.get(&status_url).send().await.unwrap().status(),
        StatusCode::OK
    );
    assert_eq!(metric(&s, "fhirhose_downloads_in_progress").await, 0);
}

/// Waits (at most 20 s) until the `/metrics` gauge `name` reads `value`.
async fn wait_until_async(s: &Server, name: &str, value: u64) {
    for _ in 0..400 {
        if metric(s, name).await == value {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{name} never reached {value}");
}

/// An HTTP/2 (prior knowledge) connection over the per-address cap is answered 503 too.
#[tokio::test(flavor = "multi_thread")]
async fn an_http2_connection_over_the_address_cap_gets_503() {
    let s = start(0, capped(8, 1), |_, _| {}).await;
    let _held = held_connections(&s, 1).await;
    let a = s.base.trim_start_matches("http://").to_string();
    let request = h2_get(&a, "/metadata");
    let answer = tokio::task::spawn_blocking(move || {
        let mut conn = TcpStream::connect(&a).unwrap();
        conn.write_all(&request).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut buf = Vec::new();
        // Closed by the server within its 2 s; a reset after the answer ends the read too.
        let _ = conn.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
    .await
    .unwrap();
    assert!(
        answer.contains("OperationOutcome")
            && answer.contains("throttled")
            && answer.contains("--max-connections-per-address"),
        "{answer:?}"
    );
}

/// An HTTP/2 request whose `:path` is longer than hyper's default header list (16 KiB) reaches
/// the search's own limits and gets their OperationOutcome, as over HTTP/1.1.
#[tokio::test(flavor = "multi_thread")]
async fn a_long_http2_search_gets_an_operation_outcome() {
    let s = start(0, capped(8, 8), |_, _| {}).await;
    let a = s.base.trim_start_matches("http://").to_string();
    let path = format!("/Patient?name={}", "a".repeat(40_000));
    // HPACK: indexed `:method GET` and `:scheme http`; `:path` and `:authority` as literals
    // without indexing (indexed names 4 and 1), lengths as HPACK integers with a 7-bit prefix.
    fn literal(block: &mut Vec<u8>, name_index: u8, value: &[u8]) {
        block.push(name_index);
        let mut n = value.len();
        if n < 127 {
            block.push(u8::try_from(n).unwrap());
        } else {
            block.push(127);
            n -= 127;
            while n >= 128 {
                block.push(u8::try_from(n % 128).unwrap() | 0x80);
                n /= 128;
            }
            block.push(u8::try_from(n).unwrap());
        }
        block.extend_from_slice(value);
    }
    let mut block = vec![0x82, 0x86];
    literal(&mut block, 0x04, path.as_bytes());
    literal(&mut block, 0x01, a.as_bytes());
    // The preface, an empty SETTINGS frame, then the block in frames of at most 16 KiB (the
    // default SETTINGS_MAX_FRAME_SIZE): HEADERS (END_STREAM), CONTINUATION…, the last with
    // END_HEADERS.
    let mut request = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0".to_vec();
    let pieces: Vec<&[u8]> = block.chunks(16_384).collect();
    for (i, piece) in pieces.iter().enumerate() {
        let len = u32::try_from(piece.len()).unwrap().to_be_bytes();
        let kind = if i == 0 { 0x01 } else { 0x09 };
        let mut flags = if i == 0 { 0x01 } else { 0 };
        if i == pieces.len() - 1 {
            flags |= 0x04;
        }
        request.extend_from_slice(&[len[1], len[2], len[3], kind, flags, 0, 0, 0, 1]);
        request.extend_from_slice(piece);
    }
    let answer = tokio::task::spawn_blocking(move || {
        let mut conn = TcpStream::connect(&a).unwrap();
        conn.write_all(&request).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 65_536];
        // Read until the OperationOutcome has come (the connection stays open) or nothing more does.
        while let Ok(n) = conn.read(&mut chunk) {
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            if String::from_utf8_lossy(&buf).contains("]}]}") {
                break;
            }
        }
        String::from_utf8_lossy(&buf).into_owned()
    })
    .await
    .unwrap();
    assert!(
        answer.contains("OperationOutcome")
            && answer.contains("too-costly")
            && answer.contains("at most 8192 are allowed"),
        "{answer:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn request_bodies_in_memory_share_one_budget() {
    let s = start_with(
        0,
        short_limits(1024),
        |_, _| {},
        |state| {
            state.body_budget = server::body_budget::BodyBudget::new(10_000);
        },
    )
    .await;
    let addr = s.base.trim_start_matches("http://").to_string();
    // A body of 8,000 bytes, of which 7,000 come at once and the rest after a pause: its bytes
    // are held while it is read.
    let a = addr.clone();
    let first = tokio::task::spawn_blocking(move || {
        let mut body = br#"{"resourceType":"Patient","active":true}"#.to_vec();
        body.resize(8000, b' ');
        let mut conn = TcpStream::connect(&a).unwrap();
        conn.write_all(
            format!(
                "POST /Patient HTTP/1.1\r\nHost: {a}\r\nContent-Type: application/fhir+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        )
        .unwrap();
        conn.write_all(&body[..7000]).unwrap();
        std::thread::sleep(Duration::from_millis(700));
        conn.write_all(&body[7000..]).unwrap();
        until_closed(&mut conn)
    });
    // Meanwhile another body of 4,000 bytes would go over 10,000.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let patient =
        json!({"resourceType": "Patient", "active": true, "name": [{"family": "x".repeat(3900)}]});
    let post = || {
        s.c.post(format!("{}/Patient", s.base))
            .header("content-type", "application/fhir+json")
            .body(patient.to_string())
            .send()
    };
    let refused = post().await.unwrap();
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.headers()["retry-after"], "5");
    let outcome: Value = refused.json().await.unwrap();
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    assert_eq!(outcome["issue"][0]["code"], "transient");
    assert!(
        outcome["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("--max-body-memory"),
        "{outcome}"
    );
    let answer = first.await.unwrap().expect("answered");
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
    // Once the first request is answered its bytes are given back.
    let created = post().await.unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
}
