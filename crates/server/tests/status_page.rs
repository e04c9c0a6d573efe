//! The export status page (`GET /exports`) and the metrics endpoint (`GET /metrics`) over real
//! HTTP: what they show after an export, who may see them with `--auth smart` (a client its own
//! jobs; metrics protected or off), and the page in a real headless browser (Debian's chromium
//! and chromedriver, installed by `scripts/chromium.sh`; `FHIRHOSE_TEST_CHROMEDRIVER` is the
//! chromedriver binary, else `chromedriver` on PATH; the browser test is skipped with a printed
//! reason when there is none), driven over plain WebDriver HTTP: a job appears, its progress
//! moves as the page refreshes itself, it ends complete.
//! (Test keys: crates/auth/tests/data, see PROVENANCE.md there.)

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

/// A few Synthea patients (their Bundles).
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

/// A sample value of the exposition text: `name{labels} value` (labels as written).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .and_then(|v| v.trim().parse().ok())
}

/// Everything logged in this test binary, as JSON lines.
static LOG: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

struct Capture;

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOG.lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture_logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_writer(|| Capture)
            .finish();
        let _ = tracing::subscriber::set_global_default(subscriber);
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_and_the_status_page_show_an_export() {
    capture_logs();
    let s = common::start(&some_patients(2), server::config::ExportOptions::default()).await;
    let (status_url, manifest) = s
        .export_with_status("/$export?_type=Patient,Observation")
        .await;
    let total: u64 = manifest["output"]
        .as_array()
        .expect("output")
        .iter()
        .map(|o| o["count"].as_u64().expect("count"))
        .sum();
    let first = manifest["output"][0]["url"]
        .as_str()
        .expect("url")
        .to_string();
    let body =
        s.c.get(&first)
            .send()
            .await
            .expect("download")
            .bytes()
            .await
            .expect("body");

    // Metrics: Prometheus text, requests by route template and status with a histogram, jobs by
    // state, the export's resources and bytes, downloaded bytes.
    let r =
        s.c.get(format!("{}/metrics", s.base))
            .send()
            .await
            .expect("metrics");
    assert_eq!(r.status(), StatusCode::OK);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .expect("type")
            .starts_with("text/plain; version=0.0.4"),
        "{:?}",
        r.headers()
    );
    let text = r.text().await.expect("text");
    assert!(
        sample(
            &text,
            r#"fhirhose_http_requests_total{method="GET",route="/export-status/{job}",status="200"}"#
        )
        .is_some_and(|n| n >= 1.0),
        "{text}"
    );
    assert!(
        sample(
            &text,
            r#"fhirhose_http_request_duration_seconds_bucket{method="GET",route="/$export",status="202",le="+Inf"}"#
        ) == Some(1.0),
        "{text}"
    );
    assert!(text.contains("# TYPE fhirhose_http_request_duration_seconds histogram"));
    assert!(
        !text.contains(&status_url.rsplit('/').next().expect("id").to_string()),
        "route templates, never concrete paths: {text}"
    );
    assert_eq!(
        sample(&text, r#"fhirhose_export_jobs{state="complete"}"#),
        Some(1.0),
        "{text}"
    );
    assert!(
        !text.contains("fhirhose_import_jobs{"),
        "no import ran: {text}"
    );
    // Process-wide counters (other tests of this binary may add to them).
    assert!(
        sample(&text, "fhirhose_export_resources_total").is_some_and(|n| n >= total as f64),
        "{text}"
    );
    assert!(
        sample(&text, "fhirhose_export_bytes_total").is_some_and(|n| n > 0.0),
        "{text}"
    );
    assert!(
        sample(&text, "fhirhose_export_item_retries_total").is_some(),
        "{text}"
    );
    assert!(
        sample(&text, "fhirhose_export_download_bytes_total")
            .is_some_and(|n| n >= body.len() as f64),
        "{text}"
    );
    // Database pools: PostgreSQL's `store` and `jobs` pools (through `Store::pool_stats`);
    // SQLite has none and shows no family.
    if store::testing::test_database_url().is_some() {
        for pool in ["store", "jobs"] {
            let max = sample(&text, &format!(r#"fhirhose_db_pool_max{{pool="{pool}"}}"#));
            assert!(max.is_some_and(|n| n >= 1.0), "{pool}: {text}");
            let in_use = sample(
                &text,
                &format!(r#"fhirhose_db_pool_connections{{pool="{pool}",state="in_use"}}"#),
            )
            .expect("in use");
            let idle = sample(
                &text,
                &format!(r#"fhirhose_db_pool_connections{{pool="{pool}",state="idle"}}"#),
            )
            .expect("idle");
            assert!(in_use + idle <= max.unwrap_or(0.0), "{pool}: {text}");
            assert!(
                sample(
                    &text,
                    &format!(r#"fhirhose_db_pool_waits_total{{pool="{pool}"}}"#)
                )
                .is_some(),
                "{text}"
            );
        }
        // The export ran on the pools: connections were opened (idle once it finished).
        assert!(
            sample(
                &text,
                r#"fhirhose_db_pool_connections{pool="store",state="idle"}"#
            )
            .is_some_and(|n| n >= 1.0),
            "{text}"
        );
    } else {
        assert!(!text.contains("fhirhose_db_pool"), "{text}");
    }

    // The status page's JSON form: the job with its parameters, resources, files.
    let r =
        s.c.get(format!("{}/exports?format=json", s.base))
            .send()
            .await
            .expect("exports");
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.expect("json");
    let job = &v["jobs"][0];
    assert_eq!(job["state"], "complete", "{v}");
    assert_eq!(job["kind"], "export", "{v}");
    assert_eq!(job["status_url"], status_url.as_str());
    assert_eq!(job["resources"], total, "{v}");
    assert_eq!(job["percent"], 100.0);
    assert_eq!(
        job["parameters"][0],
        json!(["_type", "Patient,Observation"]),
        "{v}"
    );
    assert_eq!(job["files"][0]["url"], first.as_str(), "{v}");
    // The HTML page: server-rendered rows with links to the manifest and the files.
    let r =
        s.c.get(format!("{}/exports", s.base))
            .header("accept", "text/html,*/*;q=0.8")
            .send()
            .await
            .expect("page");
    assert_eq!(r.status(), StatusCode::OK);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .expect("type")
            .starts_with("text/html")
    );
    assert!(r.headers().contains_key("content-security-policy"));
    let html = r.text().await.expect("html");
    assert!(html.contains(&format!("href=\"{status_url}\"")), "{html}");
    assert!(html.contains(&format!("href=\"{first}\"")), "{html}");
    assert!(html.contains("_type=Patient,Observation"), "{html}");

    // The log shows the job end to end: queued, each work item inside its `export_item` span
    // (job, item, type), complete.
    let id = status_url.rsplit('/').next().expect("id").to_string();
    let log = String::from_utf8_lossy(&LOG.lock().unwrap_or_else(|p| p.into_inner())).to_string();
    let lines: Vec<Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.to_string().contains(&id))
        .collect();
    let message = |v: &Value| v["fields"]["message"].as_str().unwrap_or("").to_string();
    assert!(lines.iter().any(|v| message(v) == "export queued"), "{log}");
    let done: Vec<&Value> = lines
        .iter()
        .filter(|v| message(v) == "export work item done")
        .collect();
    assert!(
        done.len() >= 2,
        "one line per item (Patient, Observation, finalize): {log}"
    );
    for v in &done {
        assert_eq!(v["span"]["name"], "export_item", "{v}");
        assert_eq!(v["span"]["job"], id.as_str(), "{v}");
        assert!(
            v["span"]["item"].is_number() || v["span"]["item"].is_string(),
            "{v}"
        );
        assert!(v["span"]["resource_type"].is_string(), "{v}");
    }
    let complete = lines
        .iter()
        .find(|v| message(v) == "export complete")
        .expect("export complete logged");
    assert_eq!(complete["span"]["name"], "export_item", "{complete}");
}

/// A job row whose recorded payload this version cannot read (an unknown level in its request,
/// a manifest that is not JSON), written straight into the job table through the store's
/// queue: the status page (HTML and JSON) still answers 200 and lists the readable jobs, leaving
/// out the unreadable one with an error log naming job and column; the job's own status URL
/// answers 500 with an OperationOutcome naming the job, the column and the cause.
#[tokio::test(flavor = "multi_thread")]
async fn an_unreadable_job_record_is_refused_on_its_own_status_url_not_in_the_list() {
    capture_logs();
    let s = common::start(&some_patients(1), server::config::ExportOptions::default()).await;
    let (good_url, _) = s.export_with_status("/$export?_type=Patient").await;
    let good = good_url.rsplit('/').next().expect("id").to_string();

    let bad_request = format!("bad-request-{}", uuid::Uuid::new_v4().simple());
    let bad_result = format!("bad-result-{}", uuid::Uuid::new_v4().simple());
    let store = s.db.store.clone();
    let (a, b) = (bad_request.clone(), bad_result.clone());
    common::blocking(move || {
        let queue = store.jobs().expect("job queue");
        let row = |id: &str, request: &str, result: &str| export::JobRecord {
            id: id.to_string(),
            state: export::JobState::Complete,
            request: request.to_string(),
            watermark: 0,
            transaction_time: "2026-01-01T00:00:00Z".into(),
            client_id: None,
            container: "exports".into(),
            folder: id.to_string(),
            anonymization: None,
            result: Some(result.to_string()),
            failure_status: None,
            created_ms: chrono::Utc::now().timestamp_millis(),
            finished_ms: Some(chrono::Utc::now().timestamp_millis()),
            cleanup: export::jobs::Cleanup::None,
        };
        let request = r#"{"level":"cohort","group":null,"params":[],"post":false,"lenient":true,"url":"http://x/$export"}"#;
        queue
            .create(&row(&a, request, r#"{"output":[]}"#), &[], 100)
            .expect("insert the bad request row");
        let readable = request.replace("cohort", "system");
        queue
            .create(&row(&b, &readable, "{not json"), &[], 100)
            .expect("insert the bad result row");
    })
    .await;

    // The list: 200, the readable jobs, the unreadable one left out.
    let r =
        s.c.get(format!("{}/exports?format=json", s.base))
            .send()
            .await
            .expect("exports");
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.expect("json");
    let ids: Vec<&str> = v["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .filter_map(|j| j["id"].as_str())
        .collect();
    assert!(ids.contains(&good.as_str()), "{v}");
    assert!(
        ids.contains(&bad_result.as_str()),
        "the list reads no manifest: {v}"
    );
    assert!(!ids.contains(&bad_request.as_str()), "{v}");
    let r =
        s.c.get(format!("{}/exports", s.base))
            .header("accept", "text/html,*/*;q=0.8")
            .send()
            .await
            .expect("page");
    assert_eq!(r.status(), StatusCode::OK);
    let html = r.text().await.expect("html");
    assert!(html.contains(&good), "{html}");
    assert!(!html.contains(&bad_request), "{html}");
    let log = String::from_utf8_lossy(&LOG.lock().unwrap_or_else(|p| p.into_inner())).to_string();
    let logged = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["fields"]["job"] == bad_request.as_str() && v["level"] == "ERROR")
        .unwrap_or_else(|| panic!("the skipped row is logged: {log}"));
    assert_eq!(logged["fields"]["column"], "request", "{logged}");

    // Each job's own status URL: 500, an OperationOutcome naming job, column and cause.
    for (id, column, cause) in [
        (&bad_request, "request", "unknown variant `cohort`"),
        (&bad_result, "result", "key must be a string"),
    ] {
        let r =
            s.c.get(format!("{}/export-status/{id}", s.base))
                .send()
                .await
                .expect("status");
        assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let oo: Value = r.json().await.expect("an OperationOutcome");
        assert_eq!(oo["resourceType"], "OperationOutcome", "{oo}");
        let text = oo["issue"][0]["diagnostics"].as_str().unwrap_or("");
        assert!(
            text.contains(&format!("the recorded {column} of job {id}")),
            "{oo}"
        );
        assert!(text.contains(cause), "the cause is kept: {oo}");
    }
    // The readable job is unaffected.
    let r = s.c.get(&good_url).send().await.expect("status");
    assert_eq!(r.status(), StatusCode::OK);
}

/// A SMART server where `alice` and `bob` may export Patients, and a plain client.
struct Smart {
    server: common::SmartServer,
    c: reqwest::Client,
}

impl std::ops::Deref for Smart {
    type Target = common::SmartServer;

    fn deref(&self) -> &common::SmartServer {
        &self.server
    }
}

async fn start_smart(mode: Option<server::metrics::MetricsMode>) -> Smart {
    let server = common::start_smart_with(
        "rsa-a.pem",
        &[("alice", "system/Patient.rs"), ("bob", "system/Patient.rs")],
        1 << 20,
        // As `serve` decides it: protected by default with SMART.
        |state| server::AppState {
            metrics_mode: mode.unwrap_or(server::metrics::MetricsMode::Protected),
            ..state
        },
    )
    .await;
    Smart {
        server,
        c: reqwest::Client::new(),
    }
}

impl Smart {
    async fn token(&self, client: &str) -> String {
        self.server.token(client, "system/Patient.rs").await
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn with_smart_a_client_sees_its_own_jobs_and_metrics_need_a_token() {
    let s = start_smart(None).await;
    let (alice, bob) = (s.token("alice").await, s.token("bob").await);
    let mut ids = Vec::new();
    for t in [&alice, &bob] {
        let r =
            s.c.get(format!("{}/$export?_type=Patient", s.base))
                .bearer_auth(t)
                .header("accept", "application/fhir+json")
                .header("prefer", "respond-async")
                .send()
                .await
                .expect("kick-off");
        assert_eq!(r.status(), StatusCode::ACCEPTED);
        let loc = r.headers()["content-location"]
            .to_str()
            .expect("loc")
            .to_string();
        ids.push(loc.rsplit('/').next().expect("id").to_string());
    }
    let list = |t: &str| {
        s.c.get(format!("{}/exports?format=json", s.base))
            .bearer_auth(t.to_string())
            .send()
    };
    let v: Value = list(&alice)
        .await
        .expect("alice")
        .json()
        .await
        .expect("json");
    let seen: Vec<&str> = v["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .map(|j| j["id"].as_str().expect("id"))
        .collect();
    assert_eq!(seen, [ids[0].as_str()], "alice sees only her job: {v}");
    let v: Value = list(&bob).await.expect("bob").json().await.expect("json");
    assert_eq!(v["jobs"][0]["id"], ids[1].as_str(), "{v}");
    assert_eq!(v["jobs"].as_array().expect("jobs").len(), 1);

    // Without a token: 401 OperationOutcomes, for the page and for the metrics.
    for path in ["/exports", "/metrics"] {
        let r =
            s.c.get(format!("{}{path}", s.base))
                .send()
                .await
                .expect("no token");
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{path}");
        let oo: Value = r.json().await.expect("json");
        assert_eq!(oo["resourceType"], "OperationOutcome", "{path}");
    }
    let r =
        s.c.get(format!("{}/metrics", s.base))
            .bearer_auth(&alice)
            .send()
            .await
            .expect("metrics");
    assert_eq!(r.status(), StatusCode::OK);

    // Off: no endpoint at all (404 OperationOutcome), with or without a token.
    let off = start_smart(Some(server::metrics::MetricsMode::Off)).await;
    let t = off.token("alice").await;
    let r = off
        .c
        .get(format!("{}/metrics", off.base))
        .bearer_auth(&t)
        .send()
        .await
        .expect("off");
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let oo: Value = r.json().await.expect("json");
    assert_eq!(oo["resourceType"], "OperationOutcome");
}

/// chromedriver on a free port, stopped when dropped.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn chromedriver() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("FHIRHOSE_TEST_CHROMEDRIVER")
        && !p.is_empty()
    {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("chromedriver"))
            .find(|p| p.is_file())
    })
}

async fn webdriver(
    c: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    body: Option<Value>,
) -> Value {
    let mut r = c.request(method, url);
    if let Some(b) = body {
        r = r.json(&b);
    }
    let resp = r.send().await.expect("webdriver request");
    let status = resp.status();
    let v: Value = resp.json().await.expect("webdriver json");
    assert!(status.is_success(), "webdriver {url}: {status} {v}");
    v["value"].clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_status_page_follows_a_job_to_completion_in_a_browser() {
    let Some(driver_bin) = chromedriver() else {
        eprintln!(
            "skipped: no chromedriver (run ./scripts/chromium.sh, or set FHIRHOSE_TEST_CHROMEDRIVER)"
        );
        return;
    };
    // The server, its export workers not started yet: the job waits, queued, until the page
    // has shown it.
    let dir = tempfile::tempdir().expect("dir");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let options = server::config::ExportOptions {
        export_file_resources: 100,
        ..Default::default()
    };
    let export = options
        .export_config(dir.path(), base.clone())
        .expect("config");
    let url = base.clone();
    let paths = some_patients(3);
    let (db, state) = tokio::task::spawn_blocking(move || {
        let db = common::test_store();
        ingest::load_into_store(
            &*db.store,
            &paths,
            &ingest::LoadOptions::default(),
            &mut |_| {},
        )
        .expect("load");
        let state = server::AppState::with_export_idle(
            db.store.clone(),
            url,
            auth::Auth::none(),
            1 << 20,
            export,
        )
        .expect("state");
        (db, state)
    })
    .await
    .expect("start");
    let service = state.export.clone();
    tokio::spawn(async move {
        axum::serve(listener, server::router(state))
            .await
            .expect("serve")
    });
    let c = reqwest::Client::new();

    // chromedriver on a free port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr")
        .port();
    let child = Command::new(&driver_bin)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver starts");
    let driver = Driver {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    let mut ready = false;
    for _ in 0..100 {
        if let Ok(r) = c.get(format!("{}/status", driver.url)).send().await
            && r.status().is_success()
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "chromedriver did not answer");
    let session = webdriver(
        &c,
        reqwest::Method::POST,
        &format!("{}/session", driver.url),
        Some(json!({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
        }}}})),
    )
    .await;
    let sid = session["sessionId"]
        .as_str()
        .expect("session id")
        .to_string();
    let session_url = format!("{}/session/{sid}", driver.url);

    // The page, before any export.
    webdriver(
        &c,
        reqwest::Method::POST,
        &format!("{session_url}/url"),
        Some(json!({"url": format!("{base}/exports")})),
    )
    .await;
    let title = webdriver(
        &c,
        reqwest::Method::GET,
        &format!("{session_url}/title"),
        None,
    )
    .await;
    assert_eq!(title, "Fhirhose exports");

    // Kick-off; the page (not reloaded) shows the job queued, then, once workers run, complete.
    let r = c
        .get(format!(
            "{base}/$export?_type=Patient,Observation,Encounter"
        ))
        .header("accept", "application/fhir+json")
        .header("prefer", "respond-async")
        .send()
        .await
        .expect("kick-off");
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let id = r.headers()["content-location"]
        .to_str()
        .expect("loc")
        .rsplit('/')
        .next()
        .expect("id")
        .to_string();
    let script = json!({"script": format!(
        "const r = document.getElementById('job-{id}'); return r ? [r.dataset.state, r.querySelector('.pct').textContent, r.querySelector('.resources').textContent, r.querySelectorAll('.files a').length] : null"
    ), "args": []});
    let mut seen: Vec<Value> = Vec::new();
    let mut started = false;
    for _ in 0..300 {
        let row = webdriver(
            &c,
            reqwest::Method::POST,
            &format!("{session_url}/execute/sync"),
            Some(script.clone()),
        )
        .await;
        if !row.is_null() && seen.last() != Some(&row) {
            seen.push(row.clone());
        }
        if !row.is_null() && !started {
            // The job is on the page: let the workers run it.
            let svc = service.clone();
            tokio::task::spawn_blocking(move || svc.start_workers())
                .await
                .expect("join")
                .expect("workers");
            started = true;
        }
        if row[0] == "complete" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = c.delete(&session_url).send().await;
    drop(driver);
    let first = seen.first().expect("the job appeared on the page");
    let last = seen.last().expect("rows");
    assert_eq!(first[0], "queued", "{seen:?}");
    assert_eq!(first[1], "0.0%", "{seen:?}");
    assert_eq!(
        last[0], "complete",
        "the page followed the job to its end: {seen:?}"
    );
    assert_eq!(last[1], "100.0%", "{seen:?}");
    let resources: u64 = last[2].as_str().expect("count").parse().expect("number");
    assert!(resources > 0, "{seen:?}");
    assert!(
        last[3].as_u64().expect("links") >= 2,
        "manifest and file links: {seen:?}"
    );
    // The same job as the API reports it.
    let v: Value = c
        .get(format!("{base}/exports?format=json"))
        .send()
        .await
        .expect("json")
        .json()
        .await
        .expect("json");
    assert_eq!(v["jobs"][0]["resources"], resources);
    drop(db);
    let _ = Arc::strong_count(&service);
}
