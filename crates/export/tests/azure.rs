//! The Azure Blob destination against a real Azurite (started by `scripts/test.sh`, which sets
//! `FHIRHOSE_TEST_AZURITE` to its blob endpoint). Without that variable the tests say so and pass,
//! unless `FHIRHOSE_REQUIRE_EXTERNAL=1` (as in `scripts/test.sh`), where they fail.

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use export::run::{RunSettings, run_export};
use export::{
    ExportConfig, ExportLevel, ExportRequest, ExportService, ObjectStoreSink, RemoteConfig,
    RemoteSettings, Sink, SinkError, Status,
};
use serde_json::{Value, json};
use store::sqlite::{SqliteOptions, SqliteStore};
use store::{Store, WriteOp};

const DEV_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// Azurite's endpoint, or `None` (test skipped) when it is not running here.
fn azurite() -> Option<String> {
    match std::env::var("FHIRHOSE_TEST_AZURITE") {
        Ok(e) if !e.is_empty() => Some(e),
        _ => {
            assert!(
                std::env::var("FHIRHOSE_REQUIRE_EXTERNAL").as_deref() != Ok("1"),
                "FHIRHOSE_TEST_AZURITE is not set but external components are required"
            );
            eprintln!("skipped: FHIRHOSE_TEST_AZURITE not set (run ./scripts/test.sh)");
            None
        }
    }
}

fn sink(endpoint: &str) -> ObjectStoreSink {
    sink_with(endpoint, RemoteSettings::default())
}

fn sink_with(endpoint: &str, settings: RemoteSettings) -> ObjectStoreSink {
    let conn = format!(
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={DEV_KEY};BlobEndpoint={endpoint};"
    );
    ObjectStoreSink::new(
        RemoteConfig::azure_from_connection_string(&conn).expect("connection string"),
        settings,
    )
    .expect("sink")
}

/// Reads `r` to its end a MiB at a time with `pause` after each: what it gave.
fn read_slowly(mut r: impl Read, pause: Duration) -> std::io::Result<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut since_pause = 0;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(got);
        }
        got.extend_from_slice(&buf[..n]);
        since_pause += n;
        if since_pause >= 1 << 20 {
            since_pause = 0;
            std::thread::sleep(pause);
        }
    }
}

/// A download is read at its HTTP client's pace, through one GET of the object whose answer
/// the store client's request timeout (60 s by default) bounds as a whole: a client slower than
/// that (a 64 MB file below about 1 MB/s) got an error part way through. (object_store asks
/// for the rest itself only within its retry timeout from the first request, 30 s by default:
/// never after a 60 s timeout.) The read now asks for the rest again from where the answer
/// stopped. Here the timeouts are 1 s and 0.5 s, in the defaults' order, and each of the 12 MiB
/// is read 250 ms apart; the whole object and a range of it come back byte for byte.
#[test]
fn a_read_slower_than_the_request_timeout_gets_every_byte() {
    let Some(endpoint) = azurite() else { return };
    let _alone = big_uploads();
    let sink = sink_with(
        &endpoint,
        RemoteSettings {
            request_timeout: Duration::from_secs(1),
            retry_timeout: Duration::from_millis(500),
            ..RemoteSettings::default()
        },
    );
    let container = fresh("slowread");
    sink.ensure_container(&container).expect("container");
    let data: Vec<u8> = (0..12u32 << 20)
        .map(|i| u8::try_from(i % 251).unwrap())
        .collect();
    let mut part = sink.create(&container, "big.ndjson").expect("create");
    std::io::Write::write_all(&mut part, &data).expect("write");
    part.finish().expect("finish");
    let pause = Duration::from_millis(250);
    let whole = read_slowly(
        sink.open_read(&container, "big.ndjson").expect("open"),
        pause,
    )
    .expect("read whole");
    assert_eq!(whole.len(), data.len());
    assert!(whole == data, "the bytes differ");
    let etag = sink.stat(&container, "big.ndjson").expect("stat").etag;
    let range = 1_000_000..9_500_000u64;
    let part = read_slowly(
        sink.open_range(&container, "big.ndjson", range.clone(), Some(&etag))
            .expect("open range"),
        pause,
    )
    .expect("read range");
    assert!(part == data[1_000_000..9_500_000], "the range differs");
    sink.delete_prefix(&container, "").ok();
}

/// Held by the tests that upload many MiB: the 1 s request timeout of
/// `a_read_slower_than_the_request_timeout_gets_every_byte` is not met by an Azurite busy with
/// another test's 20 MiB.
fn big_uploads() -> std::sync::MutexGuard<'static, ()> {
    static BIG: std::sync::Mutex<()> = std::sync::Mutex::new(());
    BIG.lock().unwrap_or_else(|p| p.into_inner())
}

/// A container name no earlier run used.
fn fresh(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

fn seeded(dir: &std::path::Path, patients: usize) -> Arc<SqliteStore> {
    let store = SqliteStore::open(&dir.join("db.sqlite"), SqliteOptions::default()).expect("store");
    let mut ops = Vec::new();
    for i in 0..patients {
        ops.push(WriteOp::Create {
            resource: json!({"resourceType": "Patient", "id": format!("p{i}"),
                "name": [{"family": format!("Family{i}")}]}),
        });
        ops.push(WriteOp::Create {
            resource: json!({"resourceType": "Observation", "id": format!("o{i}"), "status": "final",
                "code": {"text": "x"}, "subject": {"reference": format!("Patient/p{i}")}}),
        });
    }
    store.write(ops).expect("write");
    Arc::new(store)
}

fn read_all(sink: &dyn Sink, container: &str, path: &str) -> String {
    let mut s = String::new();
    sink.open_read(container, path)
        .expect("open")
        .read_to_string(&mut s)
        .expect("read");
    s
}

#[test]
fn parts_uploads_renames_and_errors_on_azurite() {
    let Some(endpoint) = azurite() else { return };
    let _alone = big_uploads();
    let sink = sink(&endpoint);
    let c = fresh("parts");
    sink.ensure_container(&c).expect("create container");
    sink.ensure_container(&c).expect("creating again is fine");

    // A part larger than one upload chunk, streamed: invisible until finished and renamed.
    let mut w = sink.create(&c, "job/_parts/p-1.ndjson").expect("create");
    let line = format!(
        "{{\"resourceType\":\"Basic\",\"x\":\"{}\"}}\n",
        "y".repeat(1000)
    );
    let mut expected = 0u64;
    while expected < 20 * 1024 * 1024 {
        w.write_all(line.as_bytes()).expect("write");
        expected += line.len() as u64;
    }
    assert!(matches!(
        sink.read_limited(&c, "job/_parts/p-1.ndjson", 1 << 30),
        Err(SinkError::NotFound(_))
    ));
    assert_eq!(w.finish().expect("finish"), expected);
    sink.rename(&c, "job/_parts/p-1.ndjson", "job/Basic-1.ndjson")
        .expect("rename");
    sink.rename(&c, "job/_parts/p-1.ndjson", "job/Basic-1.ndjson")
        .expect("a repeated rename is a no-op");
    let text = read_all(&sink, &c, "job/Basic-1.ndjson");
    assert_eq!(text.len() as u64, expected);

    // An abandoned part leaves nothing.
    let mut w = sink.create(&c, "job/_parts/p-2.ndjson").expect("create");
    w.write_all(b"{}\n").expect("write");
    drop(w);
    assert!(matches!(
        sink.read_limited(&c, "job/_parts/p-2.ndjson", 100),
        Err(SinkError::NotFound(_))
    ));

    // Small reads with ETags and limits; missing container vs missing object.
    let mut w = sink.create(&c, "cfg.json").expect("create");
    w.write_all(b"{\"a\": 1}").expect("write");
    w.finish().expect("finish");
    let (bytes, etag) = sink.read_limited(&c, "cfg.json", 100).expect("read");
    assert_eq!(bytes, b"{\"a\": 1}");
    assert!(!etag.is_empty() && !etag.contains('"'), "{etag}");
    assert!(matches!(
        sink.read_limited(&c, "cfg.json", 3),
        Err(SinkError::TooLarge { .. })
    ));
    assert!(matches!(
        sink.read_limited(&c, "nothing.json", 100),
        Err(SinkError::NotFound(_))
    ));
    assert!(matches!(
        sink.read_limited(&fresh("absent"), "cfg.json", 100),
        Err(SinkError::ContainerNotFound(_))
    ));

    sink.delete_prefix(&c, "job").expect("delete");
    assert!(matches!(
        sink.read_limited(&c, "job/Basic-1.ndjson", 1 << 30),
        Err(SinkError::NotFound(_))
    ));
}

#[test]
fn an_export_into_azurite() {
    let Some(endpoint) = azurite() else { return };
    let sink = sink(&endpoint);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = seeded(dir.path(), 300);
    let wm = store.current_seq().expect("seq");
    let c = fresh("run");
    let req = ExportRequest::parse(
        ExportLevel::System,
        &[],
        false,
        false,
        i64::MAX / 2,
        "http://x/$export".into(),
    )
    .expect("request");
    let settings = RunSettings {
        file_max_resources: 100,
        item_resources: 150,
        ..RunSettings::default()
    };
    let out = run_export(
        store.as_ref(),
        &req,
        wm,
        &sink,
        &c,
        "job",
        &settings,
        None,
        &AtomicBool::new(false),
    )
    .expect("export");
    let mut ids: BTreeMap<String, usize> = BTreeMap::new();
    for f in &out.files {
        let text = read_all(&sink, &c, &format!("job/{}", f.name));
        for l in text.lines() {
            let v: Value = serde_json::from_str(l).expect("json");
            *ids.entry(v["resourceType"].as_str().expect("type").to_string())
                .or_default() += 1;
        }
    }
    assert_eq!(ids["Patient"], 300);
    assert_eq!(ids["Observation"], 300);
    assert!(out.files.len() >= 6);
}

#[test]
fn a_deidentified_export_service_on_azurite() {
    let Some(endpoint) = azurite() else { return };
    let sink: Arc<dyn Sink> = Arc::new(self::sink(&endpoint));
    // The configuration lives in the destination's `anonymization` container.
    sink.ensure_container("anonymization").expect("container");
    let name = format!("{}.json", fresh("cfg"));
    let mut w = sink.create("anonymization", &name).expect("create");
    w.write_all(
        br#"{"fhirVersion": "R4", "fhirPathRules": [
            {"path": "Resource.id", "method": "cryptoHash"},
            {"path": "nodesByType('HumanName')", "method": "redact"},
            {"path": "nodesByType('Reference').reference", "method": "cryptoHash"}],
            "parameters": {"cryptoHashKey": "azure-test-key"}}"#,
    )
    .expect("write");
    w.finish().expect("finish");
    let (_, etag) = sink
        .read_limited("anonymization", &name, 1 << 20)
        .expect("read back");

    let dir = tempfile::tempdir().expect("tempdir");
    let store = seeded(dir.path(), 50);
    let mut config = ExportConfig::local(dir.path().join("unused"), "http://fhirhose.test".into());
    config.sink = sink.clone();
    let svc = ExportService::open(store, config).expect("service");
    svc.start_workers().expect("workers");
    let container = fresh("deid");
    let kick = |extra: &[(&str, &str)]| {
        let mut pairs: Vec<(String, String)> = vec![
            ("_container".into(), container.clone()),
            ("_anonymizationConfig".into(), name.clone()),
        ];
        pairs.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        svc.kickoff(
            ExportLevel::System,
            pairs,
            None,
            false,
            "http://x/$export".into(),
            &export::Unrestricted,
        )
    };
    let wrong = kick(&[("_anonymizationConfigEtag", "\"0x0\"")]).expect_err("etag mismatch");
    assert!(wrong.to_string().contains(&etag), "{wrong}");
    let id = kick(&[("_anonymizationConfigEtag", &format!("\"{etag}\""))]).expect("kickoff");
    let deadline = Instant::now() + Duration::from_secs(60);
    let manifest = loop {
        match svc.status(&id, &export::Unrestricted).expect("status") {
            Status::Complete { manifest, .. } => break manifest,
            Status::Failed { diagnostics, .. } => panic!("failed: {diagnostics}"),
            Status::InProgress { .. } => {
                assert!(Instant::now() < deadline, "export did not finish");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    assert_eq!(manifest["extension"]["storage"]["kind"], "azure");
    assert_eq!(
        manifest["extension"]["storage"]["anonymization"]["etag"],
        json!(etag)
    );
    let mut n = 0;
    for o in manifest["output"].as_array().expect("output") {
        let file = o["url"]
            .as_str()
            .expect("url")
            .rsplit('/')
            .next()
            .expect("name");
        let body = match svc.file(&id, file, &export::Unrestricted).expect("file") {
            export::FileBody::Remote {
                container, path, ..
            } => read_all(sink.as_ref(), &container, &path),
            export::FileBody::Local { .. } => panic!("a remote file expected, got a local one"),
        };
        for l in body.lines() {
            let v: Value = serde_json::from_str(l).expect("json");
            assert_eq!(v["id"].as_str().map(str::len), Some(64), "hashed id");
            assert!(!l.contains("Family"), "names removed: {l}");
            n += 1;
        }
    }
    assert_eq!(n, 100);
}

/// The blobs of `container` with uncommitted ones (`include=uncommittedblobs`, SharedKey): the
/// listing's XML. An ordinary listing (object_store's) never shows staged blocks.
fn list_with_uncommitted(endpoint: &str, container: &str) -> String {
    use base64::Engine;
    use hmac::{KeyInit, Mac};
    let account = "devstoreaccount1";
    let base = endpoint.trim_end_matches('/');
    let path_prefix = base
        .split_once("://")
        .and_then(|(_, rest)| rest.split_once('/'))
        .map(|(_, p)| format!("/{p}"))
        .unwrap_or_default();
    let date = chrono::Utc::now()
        .format("%a, %d %b %Y %H:%M:%S GMT")
        .to_string();
    let version = "2021-08-06";
    let to_sign = format!(
        "GET\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n/{account}{path_prefix}/{container}\ncomp:list\ninclude:uncommittedblobs\nrestype:container"
    );
    let key = base64::engine::general_purpose::STANDARD
        .decode(DEV_KEY)
        .expect("key");
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).expect("hmac");
    mac.update(to_sign.as_bytes());
    let signature = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    let url = format!("{base}/{container}?restype=container&comp=list&include=uncommittedblobs");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let resp = reqwest::Client::new()
            .get(&url)
            .header("x-ms-date", date)
            .header("x-ms-version", version)
            .header("Authorization", format!("SharedKey {account}:{signature}"))
            .send()
            .await
            .expect("list");
        let status = resp.status();
        let body = resp.text().await.expect("listing");
        assert!(status.is_success(), "{status}: {body}");
        body
    })
}

/// D1: a part dropped unfinished (a cancel, a failed or retried attempt) after some of its
/// chunks were uploaded leaves no staged blocks. Aborting a multipart upload does nothing on
/// Azure: the blocks (the export's bytes) stayed uncommitted for a week, invisible to listings
/// and so to the export's deletion.
#[test]
fn a_dropped_part_leaves_no_uncommitted_blocks_on_azurite() {
    let Some(endpoint) = azurite() else { return };
    let _alone = big_uploads();
    let sink = sink(&endpoint);
    let c = fresh("dropped");
    sink.ensure_container(&c).expect("create container");
    let name = "job/_parts/1-1/Patient-1.ndjson";
    let mut w = sink.create(&c, name).expect("create");
    let line = format!(
        "{{\"resourceType\":\"Patient\",\"x\":\"{}\"}}\n",
        "y".repeat(1000)
    );
    let mut written = 0u64;
    while written < 20 * 1024 * 1024 {
        w.write_all(line.as_bytes()).expect("write");
        written += line.len() as u64;
    }
    // Blocks are staged (uploaded in the background): the listing with uncommitted blobs
    // shows the part.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut staged = list_with_uncommitted(&endpoint, &c);
    while !staged.contains(name) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        staged = list_with_uncommitted(&endpoint, &c);
    }
    assert!(staged.contains(name), "blocks staged: {staged}");
    drop(w);
    let left = list_with_uncommitted(&endpoint, &c);
    assert!(
        !left.contains("<Blob>"),
        "an unfinished part leaves no blob, committed or not: {left}"
    );
    // A finished part is unaffected.
    let mut w = sink.create(&c, name).expect("create");
    w.write_all(line.as_bytes()).expect("write");
    assert_eq!(w.finish().expect("finish"), line.len() as u64);
    assert_eq!(read_all(&sink, &c, name), line);
    sink.delete_prefix(&c, "").ok();
}

/// D4: a remote file carries the size the export recorded when it committed it, so that the
/// download refuses an object replaced in the store after the manifest (a different size)
/// rather than serve it as the export's.
#[test]
fn a_remote_file_carries_its_recorded_size_on_azurite() {
    let Some(endpoint) = azurite() else { return };
    let sink: Arc<dyn Sink> = Arc::new(self::sink(&endpoint));
    let dir = tempfile::tempdir().expect("tempdir");
    let store = seeded(dir.path(), 20);
    let mut config = ExportConfig::local(dir.path().join("unused"), "http://fhirhose.test".into());
    config.sink = sink.clone();
    let svc = ExportService::open(store, config).expect("service");
    svc.start_workers().expect("workers");
    let id = svc
        .kickoff(
            ExportLevel::System,
            vec![("_container".into(), fresh("recorded"))],
            None,
            false,
            "http://x/$export".into(),
            &export::Unrestricted,
        )
        .expect("kickoff");
    let deadline = Instant::now() + Duration::from_secs(60);
    let manifest = loop {
        match svc.status(&id, &export::Unrestricted).expect("status") {
            Status::Complete { manifest, .. } => break manifest,
            Status::Failed { diagnostics, .. } => panic!("failed: {diagnostics}"),
            Status::InProgress { .. } => {
                assert!(Instant::now() < deadline, "export did not finish");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    let url = manifest["output"][0]["url"].as_str().expect("url");
    let file = url.rsplit('/').next().expect("name");
    let export::FileBody::Remote {
        container,
        path,
        size,
    } = svc.file(&id, file, &export::Unrestricted).expect("file")
    else {
        panic!("a remote file expected");
    };
    let stored = sink.stat(&container, &path).expect("stat").size;
    assert_eq!(size, Some(stored), "the recorded size is the stored one");
    // Replaced in the store after the manifest: the sizes differ, the download refuses it.
    let mut w = sink.create(&container, &path).expect("create");
    w.write_all(b"{\"resourceType\":\"Patient\",\"id\":\"planted\"}\n")
        .expect("write");
    w.finish().expect("finish");
    let replaced = sink.stat(&container, &path).expect("stat").size;
    assert_ne!(size, Some(replaced));
    sink.delete_prefix(&container, "").ok();
}
