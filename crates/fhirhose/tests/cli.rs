//! The real `fhirhose` binary, end to end: `serve --help`, start-up validation, `load` into a data
//! directory and into a running server over HTTP, the data-directory lock, and a few REST behaviours
//! that only show over a real socket (gzip, `Prefer`, `_lastUpdated`). The tests that store data run
//! on PostgreSQL too, in a database of their own, when `FHIRHOSE_TEST_DATABASE` is set.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::Output;

use serde_json::Value;

use common::{Serve, TestDb, fhirhose};

fn run(args: &[&str]) -> Output {
    fhirhose().args(args).output().expect("run fhirhose")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn serve(data_dir: &Path, db: &TestDb) -> Serve {
    common::serve(data_dir, Some(db), &[])
}

fn write_ndjson(path: &Path, lines: &[&str]) {
    let mut f = std::fs::File::create(path).expect("create ndjson");
    for l in lines {
        writeln!(f, "{l}").expect("write ndjson");
    }
}

fn get_json(client: &reqwest::blocking::Client, url: &str) -> (u16, Value) {
    let r = client.get(url).send().expect("GET");
    let status = r.status().as_u16();
    (status, r.json().expect("JSON body"))
}

#[test]
fn serve_help_documents_every_option_and_its_variable() {
    let out = run(&["serve", "--help"]);
    assert!(out.status.success());
    let help = text(&out.stdout);
    for (flag, env) in [
        ("--listen", "FHIRHOSE_LISTEN"),
        ("--data-dir", "FHIRHOSE_DATA_DIR"),
        ("--base-url", "FHIRHOSE_BASE_URL"),
        ("--max-body-bytes", "FHIRHOSE_MAX_BODY_BYTES"),
        ("--log-format", "FHIRHOSE_LOG_FORMAT"),
    ] {
        assert!(
            help.contains(flag),
            "{flag} missing from serve --help:\n{help}"
        );
        assert!(
            help.contains(env),
            "{env} missing from serve --help:\n{help}"
        );
    }
    assert!(
        help.contains("127.0.0.1:8080"),
        "default listen address shown"
    );
    assert!(
        help.contains("./fhirhose-data"),
        "default data directory shown"
    );
}

#[test]
fn invalid_configuration_fails_at_start_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let cases: [(&[&str], &str); 4] = [
        (
            &["serve", "--listen", "nowhere", "--data-dir", d],
            "--listen",
        ),
        (
            &[
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                d,
                "--base-url",
                "ftp://x",
            ],
            "--base-url",
        ),
        (
            &[
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                d,
                "--max-body-bytes",
                "10",
            ],
            "--max-body-bytes",
        ),
        (
            &[
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                d,
                "--log-format",
                "xml",
            ],
            "--log-format",
        ),
    ];
    for (args, needle) in cases {
        let out = run(args);
        assert!(!out.status.success(), "{args:?} must fail");
        let err = text(&out.stderr);
        assert!(
            err.contains(needle),
            "{args:?}: message names {needle}: {err}"
        );
    }
    // The same validation reads the environment variables.
    let out = fhirhose()
        .args(["serve", "--data-dir", d])
        .env("FHIRHOSE_LISTEN", "not-an-address")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("FHIRHOSE_LISTEN") || text(&out.stderr).contains("--listen")
    );
}

#[test]
fn load_into_a_data_dir_then_serve_then_load_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::fresh();
    let data = dir.path().join("data");
    let first = dir.path().join("first.ndjson");
    write_ndjson(
        &first,
        &[
            r#"{"resourceType":"Patient","id":"p1","birthDate":"1970-01-02"}"#,
            // The decimal's text (72.50) must survive loading and reading unchanged.
            r#"{"resourceType":"Observation","id":"o1","status":"final","code":{"text":"weight"},"subject":{"reference":"Patient/p1"},"valueQuantity":{"value":72.50,"unit":"kg"}}"#,
            r#"{"resourceType":"Patient","id":"bad","unknownElement":true}"#,
        ],
    );
    let out = db
        .apply(&mut fhirhose())
        .args(["load", "--data-dir"])
        .arg(&data)
        .arg(&first)
        .output()
        .unwrap();
    assert!(out.status.success(), "load: {}", text(&out.stderr));
    let summary = text(&out.stdout);
    assert!(summary.contains("loaded 2 resources"), "{summary}");
    assert!(
        summary.contains("Observation") && summary.contains("Patient"),
        "{summary}"
    );
    // The invalid line is reported with its file and line, and skipped.
    let err = text(&out.stderr);
    assert!(
        err.contains("first.ndjson") && err.contains("unknownElement"),
        "{err}"
    );

    // --strict stops instead (into a database of its own).
    let strict = dir.path().join("strict-data");
    let strict_db = TestDb::fresh();
    let out = strict_db
        .apply(&mut fhirhose())
        .args(["load", "--strict", "--data-dir"])
        .arg(&strict)
        .arg(&first)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "--strict fails on an invalid resource"
    );

    let server = serve(&data, &db);
    let client = reqwest::blocking::Client::new();

    // What the loader wrote is served, decimals exactly as loaded.
    let r = client
        .get(format!("{}/Observation/o1", server.base))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.headers()["etag"], "W/\"1\"");
    let body = r.text().unwrap();
    assert!(body.contains("72.50"), "decimal text kept: {body}");

    // A second loader may not write while the server holds the SQLite file's directory
    // (PostgreSQL takes writers from several processes).
    if !db.is_postgres() {
        let out = fhirhose()
            .args(["load", "--data-dir"])
            .arg(&data)
            .arg(&first)
            .output()
            .unwrap();
        assert!(!out.status.success(), "load must refuse a held data dir");
        let err = text(&out.stderr);
        assert!(err.contains("in use"), "clear refusal: {err}");
        // Nor a reindex: on SQLite a reindex never runs beside a server's searches.
        let out = fhirhose()
            .args(["reindex", "--data-dir"])
            .arg(&data)
            .output()
            .unwrap();
        assert!(!out.status.success(), "reindex must refuse a held data dir");
        let err = text(&out.stderr);
        assert!(err.contains("in use"), "clear refusal: {err}");
    }

    // ... but it can send batches to the server.
    let second = dir.path().join("second.ndjson");
    write_ndjson(
        &second,
        &[
            r#"{"resourceType":"Patient","id":"p2"}"#,
            r#"{"resourceType":"Patient","id":"p3"}"#,
        ],
    );
    let out = fhirhose()
        .args(["load", "--server", &server.base])
        .arg(&second)
        .output()
        .unwrap();
    assert!(out.status.success(), "load --server: {}", text(&out.stderr));
    let (st, b) = get_json(&client, &format!("{}/Patient?_summary=count", server.base));
    assert_eq!(st, 200);
    assert_eq!(b["total"], 3);
}

#[test]
fn load_over_http_sends_a_batch_again_when_the_server_asks_to_retry() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::fresh();
    // One client may hold 1,024 bytes of request bodies (the smallest settings).
    let server = common::serve(
        &dir.path().join("data"),
        Some(&db),
        &["--max-body-bytes", "1024", "--max-body-memory", "4096"],
    );
    let addr = server.base.trim_start_matches("http://").to_string();
    // A body of 1,000 bytes, held half-sent: this address's share is taken.
    let mut body = br#"{"resourceType":"Patient","id":"held"}"#.to_vec();
    body.resize(1000, b' ');
    let mut held = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        held,
        "PUT /Patient/held HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/fhir+json\r\nContent-Length: 1000\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    held.write_all(&body[..900]).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    // A load from the same address meanwhile: its batch (PUTs) is answered 503 with
    // Retry-After, and sent again.
    let ndjson = dir.path().join("two.ndjson");
    write_ndjson(
        &ndjson,
        &[
            r#"{"resourceType":"Patient","id":"a"}"#,
            r#"{"resourceType":"Patient","id":"b"}"#,
        ],
    );
    let load = fhirhose()
        .args(["load", "--server", &server.base])
        .arg(&ndjson)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let client = reqwest::blocking::Client::new();
    let refused = || {
        let m = client
            .get(format!("{}/metrics", server.base))
            .send()
            .and_then(|r| r.text())
            .unwrap();
        m.lines()
            .find_map(|l| l.strip_prefix("fhirhose_request_bodies_refused_total "))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while refused() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the load's batch was never refused"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // The held body ends: its share is given back.
    held.write_all(&body[900..]).unwrap();
    let mut answer = String::new();
    held.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
    let out = load.wait_with_output().unwrap();
    assert!(out.status.success(), "load --server: {}", text(&out.stderr));
    let (st, b) = get_json(&client, &format!("{}/Patient?_summary=count", server.base));
    assert_eq!(st, 200);
    assert_eq!(b["total"], 3);
    // A body over --max-body-bytes can never succeed: 413, not the share's 503 "retry later"
    // (the share here is one largest body, as under the defaults), declared or chunked.
    let mut big = br#"{"resourceType":"Patient","id":"big"}"#.to_vec();
    big.resize(2000, b' ');
    for chunked in [false, true] {
        let body = if chunked {
            reqwest::blocking::Body::new(std::io::Cursor::new(big.clone()))
        } else {
            reqwest::blocking::Body::from(big.clone())
        };
        let r = client
            .put(format!("{}/Patient/big", server.base))
            .header("content-type", "application/fhir+json")
            .body(body)
            .send()
            .unwrap();
        assert_eq!(r.status(), 413, "chunked {chunked}: {}", r.text().unwrap());
    }
}

#[test]
fn rest_behaviours_over_a_real_socket() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::fresh();
    let server = serve(&dir.path().join("data"), &db);
    let client = reqwest::blocking::Client::builder()
        .no_gzip()
        .build()
        .unwrap();
    let base = &server.base;

    // Prefer: return=minimal -> 201 with headers and no body.
    let r = client
        .post(format!("{base}/Patient"))
        .header("content-type", "application/fhir+json")
        .header("prefer", "return=minimal")
        .body(r#"{"resourceType":"Patient","gender":"female"}"#)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    assert_eq!(r.headers()["etag"], "W/\"1\"");
    assert!(r.headers().contains_key("last-modified"));
    let location = r.headers()["location"].to_str().unwrap().to_string();
    assert!(
        location.starts_with(&format!("{base}/Patient/")),
        "{location}"
    );
    assert!(r.bytes().unwrap().is_empty(), "return=minimal has no body");

    // Prefer: return=OperationOutcome -> an OperationOutcome instead of the resource.
    let r = client
        .post(format!("{base}/Patient"))
        .header("content-type", "application/json")
        .header("prefer", "return=OperationOutcome")
        .body(r#"{"resourceType":"Patient"}"#)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let v: Value = r.json().unwrap();
    assert_eq!(v["resourceType"], "OperationOutcome");

    // The default is the stored resource, with server-assigned id and meta.
    let r = client
        .post(format!("{base}/Patient"))
        .header("content-type", "application/fhir+json")
        .body(r#"{"resourceType":"Patient"}"#)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let created: Value = r.json().unwrap();
    let id = created["id"].as_str().unwrap().to_string();
    let last_updated = created["meta"]["lastUpdated"].as_str().unwrap().to_string();
    assert_eq!(created["meta"]["versionId"], "1");

    // _lastUpdated with prefixes, and _id.
    let count = |q: &str| -> Value {
        let (st, b) = get_json(&client, &format!("{base}/Patient?{q}"));
        assert_eq!(st, 200, "{q}: {b}");
        b["total"].clone()
    };
    let entries = |q: &str| -> usize {
        let (st, b) = get_json(&client, &format!("{base}/Patient?{q}"));
        assert_eq!(st, 200, "{q}: {b}");
        b["entry"].as_array().map_or(0, Vec::len)
    };
    assert_eq!(count("_summary=count"), 3);
    assert_eq!(entries(&format!("_lastUpdated=ge{last_updated}")), 1);
    assert_eq!(entries(&format!("_lastUpdated=lt{last_updated}")), 2);
    assert_eq!(entries(&format!("_lastUpdated=le{last_updated}")), 3);
    assert_eq!(entries(&format!("_lastUpdated=eq{last_updated}")), 1);
    assert_eq!(count("_summary=count&_lastUpdated=gt2999-01-01"), 0);
    assert_eq!(count(&format!("_summary=count&_id={id}")), 1);

    // Responses are gzip-compressed when the client asks.
    let r = client
        .get(format!("{base}/metadata"))
        .header("accept-encoding", "gzip")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.headers()["content-encoding"], "gzip");
    let mut json = String::new();
    std::io::Read::read_to_string(
        &mut flate2::read::GzDecoder::new(&r.bytes().unwrap()[..]),
        &mut json,
    )
    .unwrap();
    let cs: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(cs["resourceType"], "CapabilityStatement");

    // Every response carries a request id: the client's own, or a new one.
    let r = client
        .get(format!("{base}/metadata"))
        .header("x-request-id", "trace-me-42")
        .send()
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "trace-me-42");
    let r = client.get(format!("{base}/Nope/x/y/z")).send().unwrap();
    assert_eq!(r.status().as_u16(), 404);
    assert!(!r.headers()["x-request-id"].is_empty());

    // Delete, then read -> 410 Gone with an OperationOutcome; vread of version 1 still works.
    let r = client
        .delete(format!("{base}/Patient/{id}"))
        .send()
        .unwrap();
    assert!(matches!(r.status().as_u16(), 200 | 204));
    let (st, b) = get_json(&client, &format!("{base}/Patient/{id}"));
    assert_eq!(st, 410);
    assert_eq!(b["resourceType"], "OperationOutcome");
    let (st, b) = get_json(&client, &format!("{base}/Patient/{id}/_history/1"));
    assert_eq!(st, 200);
    assert_eq!(b["id"], id.as_str());
}

/// `_summary=count` combined with `_lastUpdated=ge…` / `lt…` answered 500: the search SQL bound
/// both seq bounds but the count query used only one ("Wrong number of parameters passed to
/// query. Got 4, needed 3", `crates/search/src/sql.rs` `last_updated_values`).
#[test]
fn regression_summary_count_with_last_updated_lower_bound() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::fresh();
    let server = serve(&dir.path().join("data"), &db);
    let client = reqwest::blocking::Client::new();
    let r = client
        .post(format!("{}/Patient", server.base))
        .header("content-type", "application/fhir+json")
        .body(r#"{"resourceType":"Patient"}"#)
        .send()
        .unwrap();
    let created: Value = r.json().unwrap();
    let t = created["meta"]["lastUpdated"].as_str().unwrap().to_string();
    for (q, n) in [(format!("ge{t}"), 1), (format!("lt{t}"), 0)] {
        let (st, b) = get_json(
            &client,
            &format!("{}/Patient?_summary=count&_lastUpdated={q}", server.base),
        );
        assert_eq!(st, 200, "{q}: {b}");
        assert_eq!(b["total"], n, "{q}");
    }
}

/// Totals of searches that read every kind of index table the Synthea data fills (token, token
/// text, string, date, quantity, reference, a chain), from a server of `data`.
fn search_totals(data: &Path, db: &TestDb) -> Vec<(&'static str, u64)> {
    const QUERIES: &[&str] = &[
        "Patient?gender=female",
        "Patient?name=a",
        "Observation?code=http://loinc.org|8302-2",
        "Observation?code:text=blood",
        "Observation?date=ge2015-01-01",
        "Observation?value-quantity=gt100",
        "Encounter?subject:Patient.gender=male",
        "Condition?patient:missing=false",
    ];
    let server = serve(data, db);
    let client = reqwest::blocking::Client::new();
    QUERIES
        .iter()
        .map(|q| {
            let (status, body) = get_json(&client, &format!("{}/{q}&_summary=count", server.base));
            assert_eq!(status, 200, "{q}: {body}");
            (*q, body["total"].as_u64().expect("a total"))
        })
        .collect()
}

/// `fhirhose reindex` of `data` (not waited for).
fn reindex(data: &Path, db: &TestDb) -> std::process::Child {
    db.apply(&mut fhirhose())
        .args(["reindex", "--data-dir"])
        .arg(data)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start reindex")
}

/// A reindex killed with SIGKILL half-way (an operator's kill -9, an OOM kill, a lost node)
/// leaves every search answering as before it — SQLite rolls its one transaction back,
/// PostgreSQL keeps its live tables until the swap — and the next reindex finishes, clearing
/// what the killed one left (PostgreSQL's `_rebuild` tables).
#[test]
fn a_reindex_killed_half_way_leaves_searches_whole_and_the_next_one_finishes() {
    use std::time::Instant;
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::fresh();
    let data = dir.path().join("data");
    let out = db
        .apply(&mut fhirhose())
        .args(["load", "--data-dir"])
        .arg(&data)
        .arg(test_support::synthea_100())
        .output()
        .unwrap();
    assert!(out.status.success(), "load: {}", text(&out.stderr));
    let before = search_totals(&data, &db);
    assert!(
        before.iter().filter(|(_, n)| *n > 0).count() >= 6,
        "the searches find something: {before:?}"
    );

    // A whole reindex, timed: the kills below land inside one.
    let started = Instant::now();
    let whole = reindex(&data, &db).wait_with_output().expect("reindex");
    assert!(whole.status.success(), "reindex: {}", text(&whole.stderr));
    let took = started.elapsed();
    assert_eq!(search_totals(&data, &db), before, "after a whole reindex");

    // kill -9, and SIGTERM (what a service manager sends first): neither may leave a
    // half-built index behind.
    let mut killed = 0;
    for (fraction, signal) in [(0.5, "-KILL"), (0.3, "-TERM"), (0.7, "-KILL")] {
        let mut child = reindex(&data, &db);
        std::thread::sleep(took.mul_f64(fraction));
        if child.try_wait().expect("reindex state").is_none() {
            let sent = std::process::Command::new("kill")
                .arg(signal)
                .arg(child.id().to_string())
                .status()
                .expect("kill");
            assert!(sent.success(), "kill {signal}");
            killed += 1;
            let status = child.wait().expect("reap");
            assert!(
                !status.success(),
                "a reindex stopped by {signal} must not report success: {status}"
            );
        }
        child.wait().expect("reap");
        assert_eq!(
            search_totals(&data, &db),
            before,
            "after a reindex stopped by {signal} at {fraction} of its time"
        );
    }
    eprintln!("{killed} of 3 reindexes stopped while running (a whole one took {took:?})");
    assert!(killed > 0, "no reindex was still running when killed");

    let again = reindex(&data, &db).wait_with_output().expect("reindex");
    assert!(again.status.success(), "reindex: {}", text(&again.stderr));
    assert_eq!(search_totals(&data, &db), before, "after the next reindex");
    if let Some(pg) = db.postgres() {
        let mut c = postgres::Client::connect(&pg.url, postgres::NoTls).expect("connect");
        let left: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'idx\\_%\\_rebuild'",
                &[],
            )
            .expect("tables")
            .get(0);
        assert_eq!(left, 0, "the killed reindexes' tables are gone");
    }
}

/// The server's resident memory, from `/proc/<pid>/status` (Linux).
fn resident_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kb * 1024
}

/// An attacker polls `/export-status/<id>` with `Prefer: wait` and ids of jobs that do not
/// exist, each as long as a request line allows. Every answer is 404, yet the server kept the
/// time of each poll under its id for pacing (and forgot none before 10,000 were kept): 4,000
/// such polls of 60 KB ids held about 280 MB of the server's memory, and more polls more.
/// Only job-shaped ids are paced now, and the poll times kept are bounded.
#[test]
fn status_polls_of_ids_that_name_no_job_hold_no_memory() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::serve(&dir.path().join("data"), None, &[]);
    let client = reqwest::blocking::Client::new();
    let pid = server.child.id();
    let poll = |id: &str| {
        let r = client
            .get(server.url(&format!("/export-status/{id}")))
            .header("prefer", "wait=1")
            .send()
            .expect("status poll");
        assert_eq!(r.status().as_u16(), 404);
    };
    // The server's own allocations settle first.
    for i in 0..50 {
        poll(&format!("{i:08}{}", "a".repeat(60_000)));
    }
    let before = resident_bytes(pid);
    for i in 50..4_000 {
        poll(&format!("{i:08}{}", "a".repeat(60_000)));
    }
    let grown = resident_bytes(pid).saturating_sub(before);
    assert!(
        grown < 64 << 20,
        "4,000 status polls of jobs that do not exist grew the server by {} MB",
        grown >> 20
    );
}
