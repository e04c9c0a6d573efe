//! `run_export` against a real store (SQLite, or PostgreSQL with `FHIRHOSE_TEST_DATABASE`): levels, compartment de-duplication, Group member
//! rules, file rolling, snapshot pinning and `_typeFilter`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;

use export::LocalSink;
use export::request::{ExportLevel, ExportRequest};
use export::run::{RunOutput, RunSettings, run_export};
use serde_json::{Value, json};
use store::{Store, WriteOp};

fn create(store: &dyn Store, v: Value) {
    store
        .write(vec![WriteOp::Create { resource: v }])
        .expect("write");
}

fn seed(store: &dyn Store) {
    for p in ["p1", "p2", "p3"] {
        create(store, json!({"resourceType": "Patient", "id": p}));
    }
    create(
        store,
        json!({"resourceType": "Observation", "id": "o1", "status": "final",
        "code": {"text": "a"}, "subject": {"reference": "Patient/p1"}}),
    );
    create(
        store,
        json!({"resourceType": "Observation", "id": "o2", "status": "final",
        "code": {"text": "b"}, "subject": {"reference": "Patient/p2"}}),
    );
    // References two patients: exported once per export.
    create(
        store,
        json!({"resourceType": "Observation", "id": "o3", "status": "final",
        "code": {"text": "c"}, "subject": {"reference": "Patient/p1"}, "performer": [{"reference": "Patient/p2"}]}),
    );
    create(store, json!({"resourceType": "Organization", "id": "org1"}));
    create(
        store,
        json!({"resourceType": "Group", "id": "g1", "type": "person", "actual": true, "member": [
        {"entity": {"reference": "Patient/p1"}},
        {"entity": {"reference": "Patient/p2"}, "inactive": true},
        {"entity": {"reference": "Patient/p3"}, "period": {"end": "2001-01-01"}},
        {"entity": {"reference": "Group/g2"}}]}),
    );
    create(
        store,
        json!({"resourceType": "Group", "id": "g2", "type": "person", "actual": true, "member": [
        {"entity": {"reference": "Patient/p2"}}]}),
    );
    create(
        store,
        json!({"resourceType": "Group", "id": "empty", "type": "person", "actual": true}),
    );
}

/// `_since` = the instant of the seeded state; then `changes` are written strictly later.
/// Returns `_since` and the watermark after the changes.
fn since_then(store: &dyn Store, changes: Vec<WriteOp>) -> (String, i64) {
    let first = store.current_seq().expect("seq");
    let since = store.instant_of_seq(first).expect("instant").expect("some");
    let since_ms = store::parse_instant_ms(&since).expect("ms");
    // The next writes must carry a later lastUpdated than `since` (millisecond clock).
    while chrono::Utc::now().timestamp_millis() <= since_ms {
        std::thread::yield_now();
    }
    for op in changes {
        store.write(vec![op]).expect("write");
    }
    (since, store.current_seq().expect("seq"))
}

fn delete_o2() -> WriteOp {
    WriteOp::Delete {
        resource_type: "Observation".into(),
        id: "o2".into(),
        if_match: None,
    }
}

fn request(level: ExportLevel, pairs: &[(&str, &str)]) -> ExportRequest {
    parse(level, pairs, false, "http://x/$export")
}

/// A Patient-level export POSTed with these parameters.
fn patient_post(pairs: &[(&str, &str)]) -> ExportRequest {
    parse(
        ExportLevel::Patient,
        pairs,
        true,
        "http://x/Patient/$export",
    )
}

fn parse(level: ExportLevel, pairs: &[(&str, &str)], post: bool, url: &str) -> ExportRequest {
    let pairs: Vec<(String, String)> = pairs
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    ExportRequest::parse(level, &pairs, post, false, i64::MAX / 2, url.into())
        .expect("valid request")
}

/// Ids per type over every output file, with the number of files per type.
fn read_out(dir: &Path) -> (BTreeMap<String, Vec<String>>, BTreeMap<String, usize>) {
    let mut ids: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut files: BTreeMap<String, usize> = BTreeMap::new();
    // An export without files has no folder.
    let Ok(entries) = std::fs::read_dir(dir) else {
        return (ids, files);
    };
    for e in entries {
        let path = e.expect("entry").path();
        let name = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        assert!(name.ends_with(".ndjson"), "no leftover part files: {name}");
        for line in std::fs::read_to_string(&path).expect("read").lines() {
            let v: Value = serde_json::from_str(line).expect("json line");
            let t = v["resourceType"].as_str().expect("type").to_string();
            assert!(
                name.starts_with(&format!("{t}-")),
                "one type per file: {name}"
            );
            ids.entry(t)
                .or_default()
                .push(v["id"].as_str().expect("id").to_string());
        }
        let t = name.split('-').next().expect("type").to_string();
        *files.entry(t).or_default() += 1;
    }
    for v in ids.values_mut() {
        v.sort();
    }
    (ids, files)
}

/// Runs an export into `<root>/out/<folder>` with `max` resources per file and small work items
/// (so that types are split into several items).
fn export_to(
    store: &dyn Store,
    req: &ExportRequest,
    watermark: i64,
    root: &Path,
    folder: &str,
    max: u64,
) -> RunOutput {
    let settings = RunSettings {
        file_max_resources: max,
        item_resources: 2,
        ..RunSettings::default()
    };
    run_export(
        store,
        req,
        watermark,
        &LocalSink::new(root),
        "out",
        folder,
        &settings,
        None,
        &AtomicBool::new(false),
    )
    .expect("run")
}

fn run(store: &dyn Store, req: &ExportRequest, watermark: i64, dir: &Path, max: u64) {
    // `dir` is `<root>/out/<folder>`.
    let root = dir.parent().and_then(Path::parent).expect("root");
    let folder = dir
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    export_to(store, req, watermark, root, &folder, max);
}

#[test]
fn levels_membership_rolling_and_snapshot() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let db = store::testing::test_store(None);
    let store = &*db.store;
    seed(store);
    let wm = store.current_seq().expect("seq");
    // Written after the watermark: never in an export pinned to it.
    create(store, json!({"resourceType": "Patient", "id": "late"}));

    let out = tmp.path().join("out");
    let sys = out.join("sys");
    run(store, &request(ExportLevel::System, &[]), wm, &sys, 2);
    let (ids, files) = read_out(&sys);
    assert_eq!(ids["Patient"], ["p1", "p2", "p3"]);
    assert_eq!(ids["Observation"], ["o1", "o2", "o3"]);
    assert_eq!(ids["Organization"], ["org1"]);
    assert_eq!(files["Patient"], 2, "rolled at 2 resources per file");

    let pat = out.join("pat");
    run(store, &request(ExportLevel::Patient, &[]), wm, &pat, 5000);
    let (ids, _) = read_out(&pat);
    assert_eq!(
        ids["Observation"],
        ["o1", "o2", "o3"],
        "o3 once although it names two patients"
    );
    assert!(
        !ids.contains_key("Organization"),
        "not in the Patient compartment"
    );

    let grp = out.join("grp");
    run(
        store,
        &request(ExportLevel::Group("g1".into()), &[]),
        wm,
        &grp,
        5000,
    );
    let (ids, _) = read_out(&grp);
    // p2 is inactive in g1 but an active member of the nested g2; p3's membership ended.
    assert_eq!(ids["Patient"], ["p1", "p2"]);
    assert_eq!(ids["Observation"], ["o1", "o2", "o3"]);

    let empty = out.join("empty");
    run(
        store,
        &request(ExportLevel::Group("empty".into()), &[]),
        wm,
        &empty,
        5000,
    );
    assert!(
        read_out(&empty).0.is_empty(),
        "an empty Group exports nothing"
    );

    let filtered = out.join("filtered");
    let req = request(
        ExportLevel::System,
        &[
            ("_type", "Patient"),
            ("_typeFilter", "Patient?_id=p1"),
            ("_typeFilter", "Patient?_id=p3"),
        ],
    );
    run(store, &req, wm, &filtered, 5000);
    let (ids, _) = read_out(&filtered);
    assert_eq!(ids.keys().collect::<Vec<_>>(), ["Patient"]);
    assert_eq!(
        ids["Patient"],
        ["p1", "p3"],
        "repeated _typeFilter queries are ORed"
    );
}

/// A Group export is a snapshot at its transactionTime, membership included: the Group (and
/// each nested Group) as it was at the watermark. Before, membership was read from the live
/// Group when the job ran: a member added after the kick-off was exported, a Group deleted
/// while the job waited failed it, and a job resumed after a restart read it again.
#[test]
fn group_membership_is_read_as_of_the_watermark() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let db = store::testing::test_store(None);
    let store = &*db.store;
    seed(store);
    let wm = store.current_seq().expect("seq");
    let update = |id: &str, members: &[&str]| WriteOp::Update {
        resource_type: "Group".into(),
        id: id.into(),
        resource: json!({"resourceType": "Group", "id": id, "type": "person", "actual": true,
            "member": members.iter().map(|m| json!({"entity": {"reference": m}})).collect::<Vec<_>>()}),
        if_match: None,
    };
    // After the watermark: g1 gains p3 directly, the nested g2 loses p2, then g1 is deleted.
    store
        .write(vec![update(
            "g1",
            &["Patient/p1", "Patient/p3", "Group/g2"],
        )])
        .expect("update g1");
    store.write(vec![update("g2", &[])]).expect("update g2");
    let out = tmp.path().join("out");
    let grp = out.join("grp");
    let req = request(ExportLevel::Group("g1".into()), &[("_type", "Patient")]);
    run(store, &req, wm, &grp, 5000);
    assert_eq!(
        read_out(&grp).0["Patient"],
        ["p1", "p2"],
        "as at the watermark"
    );
    store
        .write(vec![WriteOp::Delete {
            resource_type: "Group".into(),
            id: "g1".into(),
            if_match: None,
        }])
        .expect("delete g1");
    let again = out.join("again");
    run(store, &req, wm, &again, 5000);
    assert_eq!(read_out(&again).0["Patient"], ["p1", "p2"], "deleted since");
    // At the current watermark: the Group is gone.
    let now = store.current_seq().expect("seq");
    let e = export::run::run_export(
        store,
        &req,
        now,
        &LocalSink::new(tmp.path()),
        "out",
        "now",
        &RunSettings::default(),
        None,
        &AtomicBool::new(false),
    );
    assert!(
        matches!(e, Err(export::run::RunError::GroupNotFound(_))),
        "{:?}",
        e.err()
    );
}

#[test]
fn since_exports_changes_and_lists_deletions() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let db = store::testing::test_store(None);
    let store = &*db.store;
    seed(store);
    let (since, wm) = since_then(
        store,
        vec![
            WriteOp::Update {
                resource_type: "Patient".into(),
                id: "p1".into(),
                resource: json!({"resourceType": "Patient", "id": "p1", "active": true}),
                if_match: None,
            },
            delete_o2(),
        ],
    );
    let req = request(
        ExportLevel::System,
        &[("_since", &since), ("_type", "Patient,Observation")],
    );
    let result = export_to(store, &req, wm, tmp.path(), "since", 5000);
    let out = tmp.path().join("out/since");
    let mut patients = Vec::new();
    let mut deleted = Vec::new();
    for f in &result.files {
        for line in std::fs::read_to_string(out.join(&f.name))
            .expect("read")
            .lines()
        {
            let v: Value = serde_json::from_str(line).expect("json");
            assert_ne!(
                v["resourceType"], "Observation",
                "nothing changed among Observations but a delete"
            );
            patients.push(v["id"].as_str().expect("id").to_string());
        }
    }
    assert_eq!(patients, ["p1"]);
    for f in &result.deleted {
        for line in std::fs::read_to_string(out.join(&f.name))
            .expect("read")
            .lines()
        {
            let b: Value = serde_json::from_str(line).expect("json");
            assert_eq!(b["type"], "transaction");
            for e in b["entry"].as_array().expect("entries") {
                assert_eq!(e["request"]["method"], "DELETE");
                deleted.push(e["request"]["url"].as_str().expect("url").to_string());
            }
        }
    }
    assert_eq!(deleted, ["Observation/o2"]);
}

#[test]
fn elements_keep_mandatory_and_tag_subsetted() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let db = store::testing::test_store(None);
    let store = &*db.store;
    seed(store);
    let wm = store.current_seq().expect("seq");
    let req = request(
        ExportLevel::System,
        &[
            ("_type", "Observation,Organization"),
            ("_elements", "Observation.subject"),
        ],
    );
    let result = export_to(store, &req, wm, tmp.path(), "elements", 5000);
    let out = tmp.path().join("out/elements");
    let mut seen = 0;
    for f in &result.files {
        for line in std::fs::read_to_string(out.join(&f.name))
            .expect("read")
            .lines()
        {
            let v: Value = serde_json::from_str(line).expect("json");
            let keys: Vec<&str> = v
                .as_object()
                .expect("object")
                .keys()
                .map(String::as_str)
                .collect();
            let tags = v["meta"]["tag"].as_array().cloned().unwrap_or_default();
            let subsetted = tags.iter().any(|t| t["code"] == "SUBSETTED");
            if v["resourceType"] == "Observation" {
                seen += 1;
                // status and code are mandatory (min 1); performer was not asked for.
                for k in ["resourceType", "id", "meta", "status", "code", "subject"] {
                    assert!(keys.contains(&k), "{k} kept in {v}");
                }
                assert!(!keys.contains(&"performer"), "performer dropped in {v}");
                assert!(subsetted);
            } else {
                assert!(!subsetted, "a type without _elements is not subsetted");
            }
        }
    }
    assert_eq!(seen, 3);
    let bad: Vec<(String, String)> = vec![("_elements".into(), "Nope.x".into())];
    assert!(
        ExportRequest::parse(ExportLevel::System, &bad, false, false, 0, String::new()).is_err()
    );
}

#[test]
fn associated_provenance_and_size_rolling() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let db = store::testing::test_store(None);
    let store = &*db.store;
    seed(store);
    let prov = |id: &str, target: &str, recorded: &str| {
        json!({"resourceType": "Provenance", "id": id, "recorded": recorded,
            "target": [{"reference": target}], "agent": [{"who": {"reference": "Organization/org1"}}]})
    };
    create(
        store,
        prov("pr-o1-old", "Observation/o1", "2020-01-01T00:00:00Z"),
    );
    create(
        store,
        prov("pr-o1-new", "Observation/o1", "2021-01-01T00:00:00Z"),
    );
    create(
        store,
        prov("pr-org", "Organization/org1", "2021-01-01T00:00:00Z"),
    );
    create(
        store,
        prov("pr-o2", "Observation/o2", "2019-01-01T00:00:00Z"),
    );
    let wm = store.current_seq().expect("seq");
    // Patient p1's Observations, and the Provenance of what is exported.
    let req = patient_post(&[
        ("_type", "Observation"),
        ("patient", "Patient/p1"),
        ("includeAssociatedData", "RelevantProvenanceResources"),
    ]);
    export_to(store, &req, wm, tmp.path(), "relevant", 5000);
    let (ids, _) = read_out(&tmp.path().join("out/relevant"));
    assert_eq!(ids["Observation"], ["o1", "o3"]);
    assert_eq!(ids["Provenance"], ["pr-o1-new", "pr-o1-old"]);
    let req = patient_post(&[
        ("_type", "Observation"),
        ("patient", "Patient/p1"),
        ("includeAssociatedData", "LatestProvenanceResources"),
    ]);
    export_to(store, &req, wm, tmp.path(), "latest", 5000);
    let (ids, _) = read_out(&tmp.path().join("out/latest"));
    assert_eq!(ids["Provenance"], ["pr-o1-new"]);
    let bad = vec![(
        "includeAssociatedData".to_string(),
        "_everything".to_string(),
    )];
    assert!(
        ExportRequest::parse(ExportLevel::System, &bad, false, false, 0, String::new()).is_err()
    );

    // Files roll by size too: each Observation line is over 100 bytes.
    let settings = RunSettings {
        file_max_bytes: 100,
        ..RunSettings::default()
    };
    let req = request(ExportLevel::System, &[("_type", "Observation")]);
    let out = run_export(
        store,
        &req,
        wm,
        &LocalSink::new(tmp.path()),
        "out",
        "bysize",
        &settings,
        None,
        &AtomicBool::new(false),
    )
    .expect("run");
    assert_eq!(out.files.len(), 3, "one Observation per file");
    assert!(out.files.iter().all(|f| f.count == 1 && f.bytes > 100));
}

#[test]
fn deidentified_deleted_entries_carry_hashed_ids() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let db = store::testing::test_store(None);
    let store = &*db.store;
    seed(store);
    let (since, wm) = since_then(store, vec![delete_o2()]);
    let config = r#"{"fhirVersion": "R4", "fhirPathRules": [{"path": "Resource.id", "method": "cryptoHash"}],
        "parameters": {"cryptoHashKey": "k"}}"#;
    let info = export::anonymization::from_bytes(
        "c.json",
        config.as_bytes().to_vec(),
        "storage",
        None,
        None,
        None,
    )
    .expect("config");
    let anonymizer = export::anonymization::Anonymizer::new(info, "f").expect("anonymizer");
    let req = request(ExportLevel::System, &[("_since", &since)]);
    let out = run_export(
        store,
        &req,
        wm,
        &LocalSink::new(tmp.path()),
        "out",
        "deid",
        &RunSettings::default(),
        Some(anonymizer),
        &AtomicBool::new(false),
    )
    .expect("run");
    assert_eq!(out.deleted.len(), 1);
    let text = std::fs::read_to_string(tmp.path().join("out/deid").join(&out.deleted[0].name))
        .expect("read");
    let b: Value = serde_json::from_str(text.trim()).expect("bundle");
    assert_eq!(
        b["entry"][0]["request"]["url"],
        json!(format!(
            "Observation/{}",
            deid::transforms::crypto_hash("k", "o2")
        ))
    );
}

/// Every scan kind (resources, `organizeOutputBy=Patient` blocks, view rows in Parquet,
/// associated Provenance) commits through the pipelined committer: when its job is cancelled
/// after the item was claimed, the commit refused by the queue ends the item with
/// `RunError::Stopped` (the committing thread's error reaches the item), and no file reaches the
/// export folder.
#[test]
fn a_refused_commit_ends_every_scan_kind() {
    use export::RunError;
    use export::jobs::{ItemKind, JobQueue, JobRecord, JobState, SqliteJobQueue};
    use export::run::{ItemContext, Prepared, execute_item, plan};

    let tmp = tempfile::tempdir().expect("tempdir");
    let db = store::testing::test_store(None);
    let store = &*db.store;
    seed(store);
    create(
        store,
        json!({"resourceType": "Provenance", "id": "pr1", "recorded": "2021-01-01T00:00:00Z",
            "target": [{"reference": "Observation/o1"}], "agent": [{"who": {"reference": "Organization/org1"}}]}),
    );
    let wm = store.current_seq().expect("seq");
    let view = json!({"resourceType": "ViewDefinition", "name": "obs", "status": "active",
        "resource": "Observation", "select": [{"column": [{"name": "id", "path": "id"}]}]})
    .to_string();
    let cases = [
        (
            "scan",
            patient_post(&[("_type", "Observation")]),
            ItemKind::Scan,
        ),
        (
            "organize",
            patient_post(&[("organizeOutputBy", "Patient")]),
            ItemKind::Scan,
        ),
        (
            "view",
            patient_post(&[("_view", view.as_str()), ("_viewFormat", "parquet")]),
            ItemKind::Scan,
        ),
        (
            "associated",
            patient_post(&[
                ("_type", "Observation"),
                ("includeAssociatedData", "RelevantProvenanceResources"),
            ]),
            ItemKind::Associated,
        ),
    ];
    let settings = RunSettings {
        file_max_resources: 1,
        ..RunSettings::default()
    };
    let sink = LocalSink::new(tmp.path());
    export::Sink::ensure_container(&sink, "out").expect("container");
    for (name, req, kind) in cases {
        let queue = SqliteJobQueue::open_in_memory().expect("queue");
        let job = JobRecord {
            id: name.into(),
            state: JobState::Queued,
            request: String::new(),
            watermark: wm,
            transaction_time: String::new(),
            client_id: None,
            container: "out".into(),
            folder: name.into(),
            anonymization: None,
            result: None,
            failure_status: None,
            created_ms: 0,
            finished_ms: None,
            cleanup: export::jobs::Cleanup::None,
        };
        let items = plan(store, &req, wm, 1000).expect("plan");
        queue.create(&job, &items, u64::MAX).expect("create");
        let item = std::iter::from_fn(|| queue.claim("w", 0, i64::MAX / 4, 1).expect("claim"))
            .find(|i| i.kind == kind)
            .unwrap_or_else(|| panic!("{name}: no {kind:?} item"));
        queue.cancel(name, 1).expect("cancel");
        let prepared = Prepared::new(store, job, req, None, &settings).expect("prepared");
        let ctx = ItemContext {
            store,
            queue: &queue,
            sink: &sink,
            prepared: &prepared,
            settings: &settings,
            cancel: &AtomicBool::new(false),
            shutdown: &AtomicBool::new(false),
            live_scanned: &|_| {},
            committed: &|| {},
        };
        let e = execute_item(&ctx, &item).expect_err(name);
        assert!(matches!(e, RunError::Stopped), "{name}: {e}");
        let folder = tmp.path().join("out").join(name);
        let published: Vec<String> = std::fs::read_dir(&folder)
            .into_iter()
            .flatten()
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n != "_parts")
            .collect();
        assert!(published.is_empty(), "{name}: {published:?}");
        assert!(queue.files(name).expect("files").is_empty(), "{name}");
    }
}

/// Defect: the finalize item was marked done before its job's completion was written, in a
/// separate transaction; when that write failed (a lost connection, a failover) the job stayed
/// `running` for ever with every item done (nothing claims such a job). Now the finalize item
/// stays held until the job completes with it (`JobQueue::complete_job`): a completion that
/// was never recorded leaves the item to be retried, and a retry finalizes and completes.
#[test]
fn a_finalize_whose_completion_was_not_recorded_is_run_again_and_completes() {
    use export::jobs::{ItemKind, JobQueue, JobRecord, JobState, Retry, SqliteJobQueue};
    use export::run::{ItemContext, Prepared, execute_item, plan};

    let tmp = tempfile::tempdir().expect("tempdir");
    let db = store::testing::test_store(None);
    let store = &*db.store;
    seed(store);
    let wm = store.current_seq().expect("seq");
    let req = patient_post(&[("_type", "Patient,Observation")]);
    let settings = RunSettings::default();
    let sink = LocalSink::new(tmp.path());
    export::Sink::ensure_container(&sink, "out").expect("container");
    let queue = SqliteJobQueue::open_in_memory().expect("queue");
    let job = JobRecord {
        id: "j".into(),
        state: JobState::Queued,
        request: String::new(),
        watermark: wm,
        transaction_time: String::new(),
        client_id: None,
        container: "out".into(),
        folder: "j".into(),
        anonymization: None,
        result: None,
        failure_status: None,
        created_ms: 0,
        finished_ms: None,
        cleanup: export::jobs::Cleanup::None,
    };
    let items = plan(store, &req, wm, 1000).expect("plan");
    queue.create(&job, &items, u64::MAX).expect("create");
    let prepared = Prepared::new(store, job, req, None, &settings).expect("prepared");
    let ctx = ItemContext {
        store,
        queue: &queue,
        sink: &sink,
        prepared: &prepared,
        settings: &settings,
        cancel: &AtomicBool::new(false),
        shutdown: &AtomicBool::new(false),
        live_scanned: &|_| {},
        committed: &|| {},
    };
    let claim = |now: i64| queue.claim("w", now, 600_000, 3).expect("claim");
    let fin = loop {
        let item = claim(10).expect("an item");
        execute_item(&ctx, &item).expect("item");
        if item.kind == ItemKind::Finalize {
            break item;
        }
    };
    // The worker's completion (manifest and job state) is not recorded: the write failed. Its
    // failure is recorded as any item's, retried.
    assert_eq!(
        queue.get("j").expect("get").expect("job").state,
        JobState::Running
    );
    let retry = Retry {
        max_attempts: 3,
        base_ms: 0,
        max_ms: 0,
    };
    assert!(
        !queue
            .fail_item(&fin, "the connection was lost", 500, Some(retry), 20)
            .expect("fail")
    );
    let again = claim(1_000).expect("the finalize item is claimable again");
    assert_eq!((again.kind, again.attempt), (ItemKind::Finalize, 2));
    execute_item(&ctx, &again).expect("finalize again");
    assert!(
        queue
            .complete_job(&again, 0, r#"{"output":[]}"#, false, 1_001)
            .expect("complete")
    );
    let j = queue.get("j").expect("get").expect("job");
    assert_eq!(j.state, JobState::Complete);
    assert_eq!(j.result.as_deref(), Some(r#"{"output":[]}"#));
    assert!(
        queue
            .item_states("j")
            .expect("items")
            .iter()
            .all(|(_, done)| *done)
    );
    assert!(claim(2_000).is_none());
}
