//! Snapshot correctness under concurrent writers (both backends, through `store::testing`), and
//! the PostgreSQL backend's faults: a database unreachable at open, a connection lost during a
//! call (the pool recovers), several processes migrating one database at once.
//!
//! The PostgreSQL-only tests need `FHIRHOSE_TEST_DATABASE` or `FHIRHOSE_TEST_POSTGRES` (a cluster
//! from `scripts/postgres.sh start DIR`); without either they return early, unless
//! `FHIRHOSE_REQUIRE_EXTERNAL=1` (as `scripts/test.sh` sets), where they fail.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};

use serde_json::json;
use store::testing::{fresh_database, test_database_url, test_store};
use store::{PgOptions, PgStore, SeqBounds, Store, StoreError, WriteOp, WriteStatus};

fn postgres_url(test: &str) -> Option<String> {
    let url = test_database_url().or_else(|| {
        std::env::var("FHIRHOSE_TEST_POSTGRES")
            .ok()
            .filter(|u| !u.is_empty())
    });
    if url.is_none() {
        if std::env::var("FHIRHOSE_REQUIRE_EXTERNAL").is_ok_and(|v| v == "1") {
            panic!(
                "{test} needs FHIRHOSE_TEST_DATABASE or FHIRHOSE_TEST_POSTGRES (scripts/postgres.sh start DIR)"
            );
        }
        eprintln!("{test}: skipped, FHIRHOSE_TEST_DATABASE is not set");
    }
    url
}

/// One committed version: (type, id) → (version, seq, deleted).
type Written = Vec<(String, String, i64, i64, bool)>;

/// The state at `as_of` from the write log: (type, id) → version, for resources alive then.
fn expected_at(log: &Written, as_of: i64) -> BTreeMap<(String, String), (i64, i64)> {
    let mut newest: BTreeMap<(String, String), (i64, i64, bool)> = BTreeMap::new();
    for (t, id, version, seq, deleted) in log {
        if *seq > as_of {
            continue;
        }
        let e = newest
            .entry((t.clone(), id.clone()))
            .or_insert((*version, *seq, *deleted));
        if *seq >= e.1 {
            *e = (*version, *seq, *deleted);
        }
    }
    newest
        .into_iter()
        .filter(|(_, (_, _, deleted))| !deleted)
        .map(|(k, (v, s, _))| (k, (v, s)))
        .collect()
}

/// Every resource of `types` current at `as_of` with seq in `(after, as_of]`.
fn scan(
    store: &dyn Store,
    types: &[&str],
    as_of: i64,
    after: i64,
) -> BTreeMap<(String, String), (i64, i64)> {
    let mut out = BTreeMap::new();
    for t in types {
        store
            .scan_type_each(
                t,
                as_of,
                SeqBounds {
                    after,
                    up_to: i64::MAX,
                },
                &mut |row| {
                    let json: serde_json::Value = serde_json::from_slice(row.json).unwrap();
                    assert_eq!(json["meta"]["versionId"], row.version.to_string());
                    let dup =
                        out.insert((t.to_string(), row.id.to_string()), (row.version, row.seq));
                    assert!(dup.is_none(), "{t}/{} twice in one scan", row.id);
                    ControlFlow::Continue(())
                },
            )
            .unwrap();
    }
    out
}

/// Hundreds of write transactions from several threads (creates, updates, deletes, of one or
/// several resources) race repeated export-like reads: pin the watermark W, scan everything as of
/// W, and scan what changed in (previous W, W] (the next `_since` export). Afterwards every
/// snapshot must equal the state the write log gives for its W, and every pair of consecutive
/// reads must hold each resource's version exactly once: in the snapshot when it was written up
/// to the earlier W, in the `_since` scan when after it — never in both, never in neither.
#[test]
fn concurrent_writes_land_in_exactly_one_of_a_snapshot_and_the_next_since_scan() {
    let t = test_store(None);
    let store = Arc::clone(&t.store);
    const THREADS: usize = 4;
    const TXNS: usize = 100;
    let types = ["Patient", "Observation"];
    let done = Arc::new(AtomicBool::new(false));
    let start = Arc::new(Barrier::new(THREADS + 1));
    let writers: Vec<_> = (0..THREADS)
        .map(|w| {
            let store = Arc::clone(&store);
            let start = Arc::clone(&start);
            std::thread::spawn(move || {
                let mut log: Written = Vec::new();
                let mut alive: Vec<(String, String)> = Vec::new();
                start.wait();
                for n in 0..TXNS {
                    let mut ops = Vec::new();
                    // A new resource in every transaction, sometimes two of different types.
                    let ty = if n % 3 == 0 { "Observation" } else { "Patient" };
                    let id = format!("w{w}-{n}");
                    ops.push(WriteOp::Update {
                        resource_type: ty.into(),
                        id: id.clone(),
                        resource: json!({"resourceType": ty, "id": id, "n": n}),
                        if_match: None,
                    });
                    if n % 4 == 1 && !alive.is_empty() {
                        let (ty, id) = alive[n % alive.len()].clone();
                        ops.push(WriteOp::Update {
                            resource_type: ty.clone(),
                            id: id.clone(),
                            resource: json!({"resourceType": ty, "id": id, "touched": n}),
                            if_match: None,
                        });
                    }
                    if n % 7 == 6 && alive.len() > 2 {
                        let (ty, id) = alive.remove(0);
                        ops.push(WriteOp::Delete {
                            resource_type: ty,
                            id,
                            if_match: None,
                        });
                    }
                    let outs = store.write(ops).unwrap();
                    for o in outs {
                        match o.status {
                            WriteStatus::Created | WriteStatus::Updated => log.push((
                                o.resource_type.clone(),
                                o.id.clone(),
                                o.version,
                                o.seq,
                                false,
                            )),
                            WriteStatus::Deleted => log.push((
                                o.resource_type.clone(),
                                o.id.clone(),
                                o.version,
                                o.seq,
                                true,
                            )),
                            WriteStatus::DeleteNotFound => {}
                        }
                        if o.status == WriteStatus::Created {
                            alive.push((o.resource_type, o.id));
                        }
                    }
                }
                log
            })
        })
        .collect();

    // The reader: pinned snapshots and `_since` scans while the writers run.
    let reader = {
        let store = Arc::clone(&store);
        let done = Arc::clone(&done);
        let start = Arc::clone(&start);
        std::thread::spawn(move || {
            let mut reads = Vec::new();
            let mut previous = 0i64;
            start.wait();
            loop {
                let finished = done.load(Ordering::SeqCst);
                let w = store.watermark().unwrap().seq;
                let snapshot = scan(&*store, &types, w, 0);
                let since = scan(&*store, &types, w, previous);
                reads.push((previous, w, snapshot, since));
                previous = w;
                if finished {
                    return reads;
                }
            }
        })
    };
    let mut log: Written = Vec::new();
    for h in writers {
        log.extend(h.join().unwrap());
    }
    done.store(true, Ordering::SeqCst);
    let reads = reader.join().unwrap();

    // Seqs are unique and the final watermark covers every write.
    let seqs: BTreeSet<i64> = log.iter().map(|w| w.3).collect();
    assert_eq!(seqs.len(), log.len(), "a seq was given twice");
    let final_w = reads.last().unwrap().1;
    assert_eq!(final_w, *seqs.iter().max().unwrap());
    assert!(
        reads.len() >= 3,
        "the reader should have raced the writers a few times (got {} reads)",
        reads.len()
    );
    for (before, w, snapshot, since) in &reads {
        assert_eq!(
            snapshot,
            &expected_at(&log, *w),
            "the snapshot as of {w} is not the committed state at {w}"
        );
        let want_since: BTreeMap<_, _> = expected_at(&log, *w)
            .into_iter()
            .filter(|(_, (_, seq))| seq > before)
            .collect();
        assert_eq!(since, &want_since, "the _since scan ({before}, {w}]");
    }
    // Consecutive reads: the snapshot at W1 and the `_since` scan (W1, W2] hold each version
    // current at W2 exactly once.
    for pair in reads.windows(2) {
        let (_, w1, snap1, _) = &pair[0];
        let (_, w2, _, since2) = &pair[1];
        for (key, (version, seq)) in expected_at(&log, *w2) {
            let in_snapshot = snap1.get(&key) == Some(&(version, seq));
            let in_since = since2.get(&key) == Some(&(version, seq));
            assert!(
                in_snapshot ^ in_since,
                "{key:?} version {version} (seq {seq}): in the snapshot at {w1}: {in_snapshot}, \
                 in the _since scan ({w1}, {w2}]: {in_since}"
            );
        }
    }
}

/// A database that cannot be reached at open is `StoreError::Unavailable` naming host:port,
/// without the password, and no panic. (Needs no cluster: the port is closed.)
#[test]
fn an_unreachable_database_at_open_is_unavailable_and_names_host_and_port() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("postgres://fh:s3cret-pw@127.0.0.1:{port}/fhir");
    let err = PgStore::connect(&url, PgOptions::default()).unwrap_err();
    match &err {
        StoreError::Unavailable { target, .. } => assert_eq!(target, &format!("127.0.0.1:{port}")),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    let text = err.to_string();
    assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
    assert!(!text.contains("s3cret"), "the password leaked: {text}");

    // Not a URL the driver takes: also a clear error, still without the password.
    let err = PgStore::connect(
        "postgres://fh:s3cret-pw@127.0.0.1:notaport/x",
        PgOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");
    assert!(!err.to_string().contains("s3cret"), "{err}");
}

/// The backends of the store's connections are terminated from another connection while a scan
/// runs on a connection taken from the idle list: the scan goes on from its last row on a new
/// connection (no row twice); terminated again there, it fails with `Unavailable` (no panic), and
/// the next calls work on new connections (the pool dropped the dead ones). Idle connections
/// terminated between calls cost the next read nothing (it runs again on a new one).
#[test]
fn a_lost_connection_is_unavailable_and_the_pool_recovers() {
    let Some(base) = postgres_url("a_lost_connection_is_unavailable_and_the_pool_recovers") else {
        return;
    };
    let db = fresh_database(&base).unwrap();
    let store = PgStore::connect(
        &db.url,
        PgOptions {
            pool_size: 3,
            ..PgOptions::default()
        },
    )
    .unwrap();
    for chunk in 0..5 {
        let ops = (0..1000)
            .map(|i| WriteOp::Update {
                resource_type: "Patient".into(),
                id: format!("p{}", chunk * 1000 + i),
                resource: json!({"resourceType": "Patient", "active": true}),
                if_match: None,
            })
            .collect();
        store.write(ops).unwrap();
    }
    // Fill the pool with idle connections too.
    std::thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(|| store.read("Patient", "p1").unwrap());
        }
    });
    let mut admin = postgres::Client::connect(&base, postgres::NoTls).unwrap();
    let kill = |admin: &mut postgres::Client| -> i64 {
        admin
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                 WHERE datname = $1 AND pid <> pg_backend_pid()",
                &[&db.name],
            )
            .unwrap()
            .get(0)
    };
    let w = store.watermark().unwrap().seq;
    let mut seen = BTreeSet::new();
    let mut killed = Vec::new();
    let result = store.scan_type_each("Patient", w, SeqBounds::ALL, &mut |row| {
        assert!(seen.insert(row.id.to_string()), "{} handed twice", row.id);
        // Once on the pooled connection the scan started on, once on the one it went on with.
        if seen.len() == 1 || seen.len() == 2500 {
            killed.push(kill(&mut admin));
        }
        ControlFlow::Continue(())
    });
    assert!(killed.iter().all(|k| *k >= 1), "{killed:?}");
    match result {
        Err(StoreError::Unavailable { target, .. }) => {
            assert!(db.url.contains(&target), "{target}")
        }
        other => panic!("expected Unavailable after the backend was terminated, got {other:?}"),
    }
    assert!(
        seen.len() > 1000 && seen.len() < 5000,
        "the scan did not go on once, or went on after its second connection was terminated: {} rows",
        seen.len()
    );

    // The pool recovers: reads, writes and a whole scan work again.
    assert_eq!(store.read("Patient", "p42").unwrap().version, 1);
    let out = store
        .write(vec![WriteOp::Delete {
            resource_type: "Patient".into(),
            id: "p42".into(),
            if_match: None,
        }])
        .unwrap();
    assert_eq!(out[0].status, WriteStatus::Deleted);
    assert_eq!(store.count_type("Patient", i64::MAX).unwrap(), 4999);

    // Terminated while idle (as a restart does): the next read works at once.
    std::thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(|| store.read("Patient", "p1").unwrap());
        }
    });
    assert!(kill(&mut admin) >= 1);
    assert_eq!(store.read("Patient", "p7").unwrap().version, 1);
    drop(store);
}

/// A call that finds every pooled connection in use waits at most `pool_timeout` (from the URL)
/// and is then Unavailable (503), instead of waiting without end; the pool serves again once a
/// connection is returned. Before, the call waited until a connection came back.
#[test]
fn a_call_waiting_for_a_busy_pool_is_unavailable_after_pool_timeout() {
    let Some(base) =
        postgres_url("a_call_waiting_for_a_busy_pool_is_unavailable_after_pool_timeout")
    else {
        return;
    };
    let db = fresh_database(&base).unwrap();
    let sep = if db.url.contains('?') { '&' } else { '?' };
    let store = PgStore::connect(
        &format!("{}{sep}pool_timeout=0.5", db.url),
        PgOptions {
            pool_size: 1,
            ..PgOptions::default()
        },
    )
    .unwrap();
    let ops = (0..3)
        .map(|i| WriteOp::Create {
            resource: json!({"resourceType": "Patient", "id": format!("p{i}")}),
        })
        .collect();
    store.write(ops).unwrap();
    let w = store.watermark().unwrap().seq;
    let (held_tx, held_rx) = std::sync::mpsc::channel::<()>();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let (answer_tx, answer_rx) = std::sync::mpsc::channel();
    let store = &store;
    std::thread::scope(|s| {
        // The pool's one connection, held by a scan until released.
        s.spawn(move || {
            let mut first = true;
            store
                .scan_type_each("Patient", w, SeqBounds::ALL, &mut |_| {
                    if std::mem::take(&mut first) {
                        held_tx.send(()).unwrap();
                        release_rx.recv().unwrap();
                    }
                    ControlFlow::Continue(())
                })
                .unwrap();
        });
        held_rx.recv().unwrap();
        s.spawn(move || answer_tx.send(store.read("Patient", "p1")).unwrap());
        // Bounded so that a call waiting without end fails the test instead of hanging it.
        let answer = answer_rx.recv_timeout(std::time::Duration::from_secs(60));
        release_tx.send(()).unwrap();
        match answer {
            Ok(Err(StoreError::Unavailable { reason, .. })) => {
                assert!(reason.contains("pool_timeout"), "{reason}")
            }
            other => panic!("expected Unavailable while the pool was busy, got {other:?}"),
        }
    });
    assert_eq!(store.read("Patient", "p1").unwrap().version, 1);
    // A pool_timeout that is not a number of seconds is refused at open.
    match PgStore::connect(
        &format!("{}{sep}pool_timeout=soon", db.url),
        PgOptions::default(),
    ) {
        Err(StoreError::Unavailable { reason, .. }) => assert!(reason.contains("pool_timeout")),
        other => panic!("{:?}", other.map(|_| ())),
    }
}

/// Several processes starting at once on a new database: the advisory lock lets each migration
/// run once, and every store works.
#[test]
fn concurrent_opens_apply_each_migration_once() {
    let Some(base) = postgres_url("concurrent_opens_apply_each_migration_once") else {
        return;
    };
    let db = fresh_database(&base).unwrap();
    let stores: Vec<PgStore> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..6)
            .map(|_| s.spawn(|| PgStore::connect(&db.url, PgOptions::default())))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap().unwrap())
            .collect()
    });
    let mut admin = postgres::Client::connect(&db.url, postgres::NoTls).unwrap();
    let rows = admin
        .query(
            "SELECT version FROM schema_migrations ORDER BY version",
            &[],
        )
        .unwrap();
    let versions: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    let expected: Vec<i64> = store::postgres::MIGRATIONS.iter().map(|m| m.0).collect();
    assert_eq!(versions, expected);
    // Writes from every store interleave with strictly increasing seqs and instants.
    let mut last = (0, String::new());
    for (i, s) in stores.iter().enumerate() {
        let out = s
            .write(vec![WriteOp::Create {
                resource: json!({"resourceType": "Patient", "id": format!("p{i}")}),
            }])
            .unwrap();
        assert!(out[0].seq > last.0 && out[0].last_updated > last.1);
        last = (out[0].seq, out[0].last_updated.clone());
    }
    drop(stores);
}

/// Emits one entry of every index kind, so that every index table's COPY runs.
struct EveryKind;

impl store::Indexer for EveryKind {
    fn entries(&self, _ty: &str, r: &serde_json::Value) -> Vec<store::IndexEntry> {
        use store::{IndexEntry, IndexValue};
        let code = r["code"].as_str().unwrap_or("none").to_string();
        let e = |param: &str, value| IndexEntry {
            param: param.into(),
            value,
        };
        vec![
            e(
                "code",
                IndexValue::Token {
                    system: Some("http://s".into()),
                    code: Some(code.clone()),
                },
            ),
            e(
                "code",
                IndexValue::Token {
                    system: None,
                    code: None,
                },
            ),
            e("code-text", IndexValue::TokenText(code.to_lowercase())),
            e(
                "name",
                IndexValue::String {
                    normalized: code.to_lowercase(),
                    exact: code.clone(),
                },
            ),
            e(
                "date",
                IndexValue::Date {
                    lo: 1_000,
                    hi: 2_000,
                },
            ),
            e("n", IndexValue::Number(1.5)),
            e(
                "q",
                IndexValue::Quantity {
                    value: 2.5,
                    system: Some("http://unitsofmeasure.org".into()),
                    code: Some("mg".into()),
                    unit: None,
                },
            ),
            e(
                "subject",
                IndexValue::Reference {
                    target_type: "Patient".into(),
                    id: "p1".into(),
                },
            ),
            e(
                "subject",
                IndexValue::ReferenceUrl("http://x/Patient/9".into()),
            ),
            e(
                "subject",
                IndexValue::ReferenceIdentifier {
                    system: None,
                    value: Some("mrn-1".into()),
                },
            ),
            e("url", IndexValue::Uri("urn:x".into())),
        ]
    }
}

fn index_counts(admin: &mut postgres::Client) -> Vec<(String, i64)> {
    [
        "idx_token",
        "idx_token_text",
        "idx_string",
        "idx_date",
        "idx_number",
        "idx_quantity",
        "idx_reference",
        "idx_reference_identifier",
        "idx_uri",
    ]
    .iter()
    .map(|t| {
        let n: i64 = admin
            .query_one(&format!("SELECT count(*) FROM {t}"), &[])
            .unwrap()
            .get(0);
        (t.to_string(), n)
    })
    .collect()
}

/// Index rows (every kind, through binary COPY) describe exactly the current, non-deleted
/// versions — also when one write rewrites a resource twice — and `reindex` rebuilds the same
/// rows; suspending index upkeep drops the value and `k` indexes (the rows of versions superseded
/// meanwhile are deleted at the resume, or at the next open after a crash) and resuming builds
/// them again.
#[test]
fn index_rows_of_every_kind_follow_the_current_version_and_reindex_rebuilds_them() {
    let Some(base) = postgres_url("index_rows_of_every_kind_follow_the_current_version") else {
        return;
    };
    let db = fresh_database(&base).unwrap();
    let store = PgStore::connect(
        &db.url,
        PgOptions {
            indexer: Some(Arc::new(EveryKind)),
            ..PgOptions::default()
        },
    )
    .unwrap();
    let obs = |id: &str, code: &str| WriteOp::Update {
        resource_type: "Observation".into(),
        id: id.into(),
        resource: json!({"resourceType": "Observation", "code": code}),
        if_match: None,
    };
    store
        .write(vec![obs("o1", "A"), obs("o2", "B"), obs("o3", "C")])
        .unwrap();
    // One transaction rewrites o1 twice and deletes o2: only o1's last version keeps rows.
    store
        .write(vec![
            obs("o1", "A2"),
            obs("o1", "A3"),
            WriteOp::Delete {
                resource_type: "Observation".into(),
                id: "o2".into(),
                if_match: None,
            },
        ])
        .unwrap();
    // A prepared put (the bulk loader's path) of a new and an existing resource.
    let p4 = store
        .prepare_put(
            "Observation",
            "o4",
            json!({"resourceType": "Observation", "code": "D"}),
        )
        .unwrap();
    let p3 = store
        .prepare_put(
            "Observation",
            "o3",
            json!({"resourceType": "Observation", "code": "C2"}),
        )
        .unwrap();
    store
        .write(vec![WriteOp::Put(p4), WriteOp::Put(p3)])
        .unwrap();

    let mut admin = postgres::Client::connect(&db.url, postgres::NoTls).unwrap();
    let expected: Vec<(String, i64)> = [
        ("idx_token", 6),
        ("idx_token_text", 3),
        ("idx_string", 3),
        ("idx_date", 3),
        ("idx_number", 3),
        ("idx_quantity", 3),
        ("idx_reference", 6),
        ("idx_reference_identifier", 3),
        ("idx_uri", 3),
    ]
    .iter()
    .map(|(t, n)| (t.to_string(), *n))
    .collect();
    assert_eq!(index_counts(&mut admin), expected);
    let codes: Vec<String> = admin
        .query(
            "SELECT i.code FROM idx_token i JOIN resource_versions rv ON rv.k = i.k
             WHERE i.code IS NOT NULL ORDER BY rv.id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(codes, ["A3", "C2", "D"]);
    let q: (f64, Option<String>, Option<String>) = {
        let r = admin
            .query_one("SELECT value, code, unit FROM idx_quantity LIMIT 1", &[])
            .unwrap();
        (r.get(0), r.get(1), r.get(2))
    };
    assert_eq!(q, (2.5, Some("mg".into()), None));

    // A full reindex rebuilds into new tables, reporting each type, and swaps them in with
    // their indexes under the canonical names (counted below); the stale flag goes with it.
    store.set_indexes_stale(true).unwrap();
    let mut seen = Vec::new();
    assert_eq!(
        store
            .reindex(None, &mut |t, n| seen.push((t.to_string(), n)))
            .unwrap(),
        3
    );
    assert!(seen.contains(&("Observation".to_string(), 3)), "{seen:?}");
    assert_eq!(index_counts(&mut admin), expected);
    assert!(!store.indexes_stale().unwrap());
    assert_eq!(store.reindex(Some("Patient"), &mut |_, _| {}).unwrap(), 0);
    assert_eq!(
        store.reindex(Some("Observation"), &mut |_, _| {}).unwrap(),
        3
    );
    assert_eq!(index_counts(&mut admin), expected);

    let value_indexes = |admin: &mut postgres::Client| -> i64 {
        admin
            .query_one(
                "SELECT count(*) FROM pg_indexes WHERE indexname LIKE 'idx\\_%\\_value' OR indexname = 'idx_reference_url'",
                &[],
            )
            .unwrap()
            .get(0)
    };
    // The index tables' `k` indexes, and index rows whose version is no longer current.
    let k_indexes = |admin: &mut postgres::Client| -> i64 {
        admin
            .query_one(
                "SELECT count(*) FROM pg_indexes WHERE indexname LIKE 'idx\\_%\\_k'",
                &[],
            )
            .unwrap()
            .get(0)
    };
    let stale_rows = |admin: &mut postgres::Client| -> i64 {
        index_counts(admin)
            .iter()
            .map(|(t, _)| {
                admin
                    .query_one(
                        &format!(
                            "SELECT count(*) FROM {t} i JOIN resource_versions rv ON rv.k = i.k
                             WHERE rv.superseded_seq IS NOT NULL OR rv.deleted = 1"
                        ),
                        &[],
                    )
                    .unwrap()
                    .get::<_, i64>(0)
            })
            .sum()
    };
    assert_eq!(value_indexes(&mut admin), 10);
    assert_eq!(k_indexes(&mut admin), 9);
    assert!(store.suspend_index_upkeep().unwrap());
    assert_eq!(value_indexes(&mut admin), 0);
    // The `k` indexes go too; the rows of the versions a suspended load supersedes stay until
    // the resume deletes them in one pass.
    assert_eq!(k_indexes(&mut admin), 0);
    store.write(vec![obs("o5", "E"), obs("o1", "A4")]).unwrap();
    assert!(stale_rows(&mut admin) > 0);
    store.resume_index_upkeep().unwrap();
    assert_eq!(value_indexes(&mut admin), 10);
    assert_eq!(k_indexes(&mut admin), 9);
    assert_eq!(stale_rows(&mut admin), 0);
    let current_codes = |admin: &mut postgres::Client| -> Vec<String> {
        admin
            .query(
                "SELECT i.code FROM idx_token i JOIN resource_versions rv ON rv.k = i.k
                 WHERE i.code IS NOT NULL ORDER BY rv.id",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    assert_eq!(current_codes(&mut admin), ["A4", "C2", "D", "E"]);
    // A store left suspended (a crash during a load) builds them, and deletes the rows left
    // behind, on the next open.
    assert!(store.suspend_index_upkeep().unwrap());
    store.write(vec![obs("o3", "C3")]).unwrap();
    drop(store);
    let _reopened = PgStore::connect(&db.url, PgOptions::default()).unwrap();
    assert_eq!(value_indexes(&mut admin), 10);
    assert_eq!(k_indexes(&mut admin), 9);
    assert_eq!(stale_rows(&mut admin), 0);
    assert_eq!(current_codes(&mut admin), ["A4", "C3", "D", "E"]);
}

/// `sslmode=require` against a server whose certificate is not signed by a trusted root (the test
/// cluster's private CA, not named by `sslrootcert`) or that has no TLS: refused at open with
/// `Unavailable`, never a panic and never a silent plain-text or unverified connection.
#[test]
fn sslmode_require_without_a_trusted_certificate_is_unavailable() {
    let Some(base) = postgres_url("sslmode_require_without_a_trusted_certificate_is_unavailable")
    else {
        return;
    };
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}sslmode=require");
    match PgStore::connect(&url, PgOptions::default()) {
        Err(StoreError::Unavailable { .. }) => {}
        Err(other) => panic!("expected Unavailable, got {other:?}"),
        Ok(_) => panic!("connected although the certificate cannot be verified"),
    }
}

/// TLS end to end: `sslmode=require&sslrootcert=CA` (the cluster's private CA from
/// scripts/postgres.sh, named by `FHIRHOSE_TEST_POSTGRES_CA`) connects, verifies the certificate,
/// and the server reports the store's own connections as encrypted.
#[test]
fn sslmode_require_with_sslrootcert_connects_over_tls() {
    let Some(base) = postgres_url("sslmode_require_with_sslrootcert_connects_over_tls") else {
        return;
    };
    let Ok(ca) = std::env::var("FHIRHOSE_TEST_POSTGRES_CA") else {
        eprintln!("skipped: FHIRHOSE_TEST_POSTGRES_CA (the cluster's ca.pem) is not set");
        return;
    };
    let db = fresh_database(&base).unwrap();
    let sep = if db.url.contains('?') { '&' } else { '?' };
    let url = format!("{}{sep}sslmode=require&sslrootcert={ca}", db.url);
    let store = PgStore::connect(&url, PgOptions::default()).unwrap();
    store
        .write(vec![WriteOp::Create {
            resource: json!({"resourceType": "Patient", "id": "tls"}),
        }])
        .unwrap();
    assert_eq!(store.read("Patient", "tls").unwrap().version, 1);
    let mut admin = postgres::Client::connect(&base, postgres::NoTls).unwrap();
    let encrypted: Vec<bool> = admin
        .query(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a ON a.pid = s.pid
             WHERE a.datname = $1",
            &[&db.name],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(!encrypted.is_empty());
    assert!(encrypted.iter().all(|e| *e), "{encrypted:?}");
    drop(store);
}

/// A PostgreSQL cluster of this test's own (scripts/postgres.sh in a temporary folder), to be
/// stopped and started; stopped on drop, also when an assertion fails.
struct PrivateCluster {
    script: std::path::PathBuf,
    dir: tempfile::TempDir,
}

impl PrivateCluster {
    fn new() -> PrivateCluster {
        PrivateCluster {
            script: std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../scripts/postgres.sh"),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// `postgres.sh CMD DIR`; the last line of its output (the URL, for `start`).
    fn run(&self, cmd: &str) -> String {
        let out = std::process::Command::new("bash")
            .arg(&self.script)
            .arg(cmd)
            .arg(self.dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "postgres.sh {cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .to_string()
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let _ = std::process::Command::new("bash")
            .arg(&self.script)
            .arg("stop")
            .arg(self.dir.path())
            .output();
    }
}

/// A store of `pool_size` connections on a private cluster of its own (to stop and start), with
/// the cluster's URL.
fn restartable_store(pool_size: usize) -> (PrivateCluster, String, PgStore) {
    let cluster = PrivateCluster::new();
    let url = cluster.run("start");
    let store = PgStore::connect(
        &url,
        PgOptions {
            pool_size,
            ..PgOptions::default()
        },
    )
    .unwrap();
    (cluster, url, store)
}

/// The database goes away and comes back (a private cluster from scripts/postgres.sh, stopped and
/// started on the same port): calls fail with `Unavailable` while it is down, no panic, and the
/// same store works again once it is back, without reopening.
#[test]
fn the_pool_recovers_after_the_server_restarts() {
    if postgres_url("the_pool_recovers_after_the_server_restarts").is_none() {
        return;
    }
    let (cluster, url, store) = restartable_store(2);
    store
        .write(vec![WriteOp::Create {
            resource: json!({"resourceType": "Patient", "id": "before"}),
        }])
        .unwrap();

    cluster.run("stop");
    for _ in 0..3 {
        match store.read("Patient", "before") {
            Err(StoreError::Unavailable { .. }) => {}
            other => panic!("expected Unavailable while the server is down, got {other:?}"),
        }
    }
    match store.write(vec![WriteOp::Create {
        resource: json!({"resourceType": "Patient", "id": "down"}),
    }]) {
        Err(StoreError::Unavailable { .. }) => {}
        other => panic!("expected Unavailable while the server is down, got {other:?}"),
    }

    assert_eq!(
        cluster.run("start"),
        url,
        "the cluster came back on another port"
    );
    // Reads run again on a new connection when the pooled one was closed by the restart.
    assert_eq!(store.read("Patient", "before").unwrap().version, 1);
    store
        .write(vec![WriteOp::Create {
            resource: json!({"resourceType": "Patient", "id": "after"}),
        }])
        .unwrap();
    assert_eq!(store.count_type("Patient", i64::MAX).unwrap(), 2);
    drop(store);
}

/// Index rows by (table, parameter code): the codes through `params`.
fn rows_by_code(admin: &mut postgres::Client) -> Vec<(String, String, i64)> {
    let mut out = Vec::new();
    for (t, _) in index_counts(admin) {
        for r in admin
            .query(
                &format!(
                    "SELECT p.name, count(*) FROM {t} i JOIN params p ON p.param_no = i.param_no
                     GROUP BY p.name ORDER BY p.name"
                ),
                &[],
            )
            .unwrap()
        {
            out.push((t.clone(), r.get(0), r.get(1)));
        }
    }
    out
}

/// A database migrated up to version 4 (index rows carrying the parameter code as text) gets
/// migration 5 at open (parameter numbers): the same rows by code, the `k` and value indexes
/// built, and new writes numbered alike.
#[test]
fn a_version_4_database_is_migrated_to_parameter_numbers() {
    let Some(base) = postgres_url("a_version_4_database_is_migrated_to_parameter_numbers") else {
        return;
    };
    let db = fresh_database(&base).unwrap();
    let options = || PgOptions {
        indexer: Some(Arc::new(EveryKind)),
        ..PgOptions::default()
    };
    let obs = |id: &str, code: &str| WriteOp::Update {
        resource_type: "Observation".into(),
        id: id.into(),
        resource: json!({"resourceType": "Observation", "code": code}),
        if_match: None,
    };
    let store = PgStore::connect(&db.url, options()).unwrap();
    store
        .write(vec![obs("o1", "A"), obs("o2", "B"), obs("o3", "C")])
        .unwrap();
    drop(store);
    let mut admin = postgres::Client::connect(&db.url, postgres::NoTls).unwrap();
    let before = rows_by_code(&mut admin);
    // One code per table, one or two rows per resource.
    assert_eq!(before.len(), 9, "{before:?}");
    assert!(
        before.iter().all(|(_, _, n)| *n == 3 || *n == 6),
        "{before:?}"
    );
    // Version 4's shape: `param text` in place of `param_no`, no `params` table.
    let mut downgrade = String::new();
    for (t, _) in index_counts(&mut admin) {
        downgrade.push_str(&format!(
            "ALTER TABLE {t} ADD COLUMN param text COLLATE \"C\";
             UPDATE {t} i SET param = p.name FROM params p WHERE p.param_no = i.param_no;
             ALTER TABLE {t} ALTER COLUMN param SET NOT NULL;
             ALTER TABLE {t} DROP COLUMN param_no;"
        ));
    }
    downgrade.push_str("DROP TABLE params; DELETE FROM schema_migrations WHERE version = 5;");
    admin.batch_execute(&downgrade).unwrap();

    let store = PgStore::connect(&db.url, options()).unwrap();
    assert_eq!(rows_by_code(&mut admin), before);
    let indexes: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_indexes WHERE indexname LIKE 'idx\\_%'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(indexes, 19, "9 `k` indexes and 10 value indexes");
    store.write(vec![obs("o4", "D")]).unwrap();
    let expected: Vec<(String, String, i64)> = before
        .iter()
        .map(|(t, c, n)| (t.clone(), c.clone(), n / 3 * 4))
        .collect();
    assert_eq!(rows_by_code(&mut admin), expected);
    let codes: i64 = admin
        .query_one("SELECT count(*) FROM params", &[])
        .unwrap()
        .get(0);
    assert_eq!(codes, 8);
}

/// Regression: after a PostgreSQL restart, the first read that took an idle pooled connection
/// (closed by the restart, which the pool learns only by using it) failed with `Unavailable`
/// (HTTP 503) although the database was back. Now a read — of a resource, a search, a scan, an
/// export job's status — runs once more on a new connection and succeeds at once, on the store's
/// pool and on the job queue's.
#[test]
fn a_read_right_after_a_restart_runs_again_on_a_new_connection() {
    if postgres_url("a_read_right_after_a_restart_runs_again_on_a_new_connection").is_none() {
        return;
    }
    let (cluster, url, store) = restartable_store(3);
    store
        .write(vec![WriteOp::Update {
            resource_type: "Patient".into(),
            id: "p1".into(),
            resource: json!({"resourceType": "Patient", "active": true}),
            if_match: None,
        }])
        .unwrap();
    let queue = store.jobs().unwrap();
    let plan = store::plan::SearchPlan {
        resource_type: "Patient".into(),
        filters: Vec::new(),
        sort: Vec::new(),
        page_size: 10,
        count_total: true,
        cursor: None,
        includes: Vec::new(),
        revincludes: Vec::new(),
        max_included: 0,
        max_page_bytes: store::plan::DEFAULT_MAX_PAGE_BYTES,
    };
    type Read<'a> = (&'a str, Box<dyn Fn() -> Result<(), String> + Sync + 'a>);
    let reads: Vec<Read<'_>> = vec![
        (
            "read",
            Box::new(|| {
                let r = store.read("Patient", "p1").map_err(|e| e.to_string())?;
                assert_eq!(r.version, 1);
                Ok(())
            }),
        ),
        (
            "scan",
            Box::new(|| {
                let mut n = 0;
                store
                    .scan_type_each("Patient", i64::MAX, SeqBounds::ALL, &mut |_| {
                        n += 1;
                        ControlFlow::Continue(())
                    })
                    .map_err(|e| e.to_string())?;
                assert_eq!(n, 1);
                Ok(())
            }),
        ),
        (
            "search",
            Box::new(|| {
                let rows = store.search(&plan, None).map_err(|e| e.to_string())?;
                assert_eq!(rows.matches.len(), 1);
                Ok(())
            }),
        ),
        (
            "export job status",
            Box::new(|| {
                let job = queue.get("no-such-job").map_err(|e| e.to_string())?;
                assert!(job.is_none());
                Ok(())
            }),
        ),
    ];
    for (what, read) in &reads {
        // Idle connections in both pools, used just now (younger than the pool's idle check).
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    read().unwrap();
                    queue.get("no-such-job").unwrap();
                });
            }
        });
        let restarted = std::time::Instant::now();
        cluster.run("stop");
        assert_eq!(
            cluster.run("start"),
            url,
            "the cluster came back on another port"
        );
        if let Err(e) = read() {
            panic!("{what} right after the restart failed: {e}");
        }
        // Beyond the pool's idle check (5 s), the round-trip check found the closed connections
        // before the read ran, and this round proved nothing about the second run.
        eprintln!(
            "{what}: read {:?} after the connections went idle",
            restarted.elapsed()
        );
    }
    // The store goes before its cluster.
    drop(reads);
    drop(store);
}

/// `PUT Patient/{id}` of a minimal active Patient.
fn patient(id: &str) -> WriteOp {
    WriteOp::Update {
        resource_type: "Patient".into(),
        id: id.into(),
        resource: json!({"resourceType": "Patient", "active": true}),
        if_match: None,
    }
}

/// A database that refuses writes (a standby after a failover, a replica named by mistake, or
/// `default_transaction_read_only` during maintenance) answers SQLSTATE 25006: the store's
/// writes and the job queue's are `Unavailable` (503 with Retry-After), not a 500, reads go
/// on, and writes succeed again once the database accepts them. Before, a job-queue write
/// (an export kick-off) was `StoreError::Postgres` → 500 "internal server error".
#[test]
fn a_database_that_refuses_writes_is_unavailable_until_it_accepts_them() {
    let Some(base) =
        postgres_url("a_database_that_refuses_writes_is_unavailable_until_it_accepts_them")
    else {
        return;
    };
    let db = fresh_database(&base).unwrap();
    let store = PgStore::connect(&db.url, PgOptions::default()).unwrap();
    let queue = store.jobs().unwrap();
    store.write(vec![patient("before")]).unwrap();
    assert_eq!(queue.purge(0, 0).unwrap(), 0);
    let mut admin = postgres::Client::connect(&base, postgres::NoTls).unwrap();
    let set_read_only = |admin: &mut postgres::Client, on: bool| {
        admin
            .batch_execute(&format!(
                "ALTER DATABASE {} SET default_transaction_read_only = {on}",
                db.name
            ))
            .unwrap();
        // Sessions take a database default when they start: end the pooled ones.
        admin
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE datname = $1 AND pid <> pg_backend_pid()",
                &[&db.name],
            )
            .unwrap();
    };
    set_read_only(&mut admin, true);
    // The first call after the sessions ended may meet a closed pooled connection (already
    // Unavailable); the ones after it meet the read-only database.
    for _ in 0..3 {
        match store.write(vec![patient("during")]) {
            Err(StoreError::Unavailable { .. }) => {}
            other => panic!("a write to a read-only database: {other:?}"),
        }
        match queue.purge(0, 0) {
            Err(e) if e.is_unavailable() => {}
            other => panic!("a job-queue write to a read-only database: {other:?}"),
        }
    }
    assert_eq!(store.read("Patient", "before").unwrap().version, 1);
    set_read_only(&mut admin, false);
    // Writable again: the next calls succeed (a first one may meet a terminated connection).
    let mut ok = false;
    for _ in 0..3 {
        if store.write(vec![patient("after")]).is_ok() && queue.purge(0, 0).is_ok() {
            ok = true;
            break;
        }
    }
    assert!(ok, "writes did not succeed once the database accepted them");
    assert!(store.read("Patient", "during").is_err());
    assert_eq!(store.read("Patient", "after").unwrap().version, 1);
}

/// A write the database cancels by its own `statement_timeout` (here: blocked behind another
/// session holding the write lock) is transient — 503 with Retry-After, nothing written —
/// rather than `StoreError::Postgres` → 500 "internal storage error"; the next write, once the
/// lock is free, succeeds.
#[test]
fn a_write_cancelled_by_the_databases_statement_timeout_is_transient() {
    let Some(base) =
        postgres_url("a_write_cancelled_by_the_databases_statement_timeout_is_transient")
    else {
        return;
    };
    let db = fresh_database(&base).unwrap();
    postgres::Client::connect(&base, postgres::NoTls)
        .unwrap()
        .batch_execute(&format!(
            "ALTER DATABASE {} SET statement_timeout = '300ms'",
            db.name
        ))
        .unwrap();
    let store = PgStore::connect(&db.url, PgOptions::default()).unwrap();
    store.write(vec![patient("before")]).unwrap();
    // Another session of the same database holds the store's write lock.
    let mut holder = postgres::Client::connect(&db.url, postgres::NoTls).unwrap();
    holder
        .execute(
            "SELECT pg_advisory_lock($1)",
            &[&store::postgres::WRITE_LOCK],
        )
        .unwrap();
    match store.write(vec![patient("blocked")]) {
        Err(e) => assert!(e.is_transient(), "not transient: {e:?}"),
        Ok(o) => panic!("a write behind a held write lock succeeded: {o:?}"),
    }
    holder
        .execute(
            "SELECT pg_advisory_unlock($1)",
            &[&store::postgres::WRITE_LOCK],
        )
        .unwrap();
    store.write(vec![patient("after")]).unwrap();
    assert!(store.read("Patient", "blocked").is_err());
    assert_eq!(store.read("Patient", "after").unwrap().version, 1);
}

/// Each pooled connection keeps the statements it prepared (searches, reads, writes). A reindex
/// swaps new index tables in (the old ones dropped, the new renamed): searches, reads and writes
/// on the same single connection, which prepared its statements before the swap, still find
/// the right rows after it, and a second reindex and more searches too.
#[test]
fn searches_on_one_pooled_connection_still_work_after_a_reindex_swap() {
    let Some(base) =
        postgres_url("searches_on_one_pooled_connection_still_work_after_a_reindex_swap")
    else {
        return;
    };
    let db = fresh_database(&base).unwrap();
    let store = PgStore::connect(
        &db.url,
        PgOptions {
            indexer: Some(Arc::new(EveryKind)),
            pool_size: 1,
            ..PgOptions::default()
        },
    )
    .unwrap();
    let obs = |id: &str, code: &str| WriteOp::Update {
        resource_type: "Observation".into(),
        id: id.into(),
        resource: json!({"resourceType": "Observation", "code": code}),
        if_match: None,
    };
    store
        .write(vec![obs("o1", "A"), obs("o2", "B"), obs("o3", "A")])
        .unwrap();
    let by_code = |code: &str| store::plan::SearchPlan {
        resource_type: "Observation".into(),
        filters: vec![store::plan::PlanFilter::Param {
            on: store::plan::ParamOn::Index(store::plan::ParamMatch::Own("code".into())),
            kind: store::plan::ParamKind::Token,
            values: vec![store::plan::PlanValue::Token {
                system: Some("http://s".into()),
                code: Some(code.into()),
            }],
            negate: false,
        }],
        sort: Vec::new(),
        page_size: 10,
        count_total: true,
        cursor: None,
        includes: Vec::new(),
        revincludes: Vec::new(),
        max_included: 0,
        max_page_bytes: store::plan::DEFAULT_MAX_PAGE_BYTES,
    };
    let total = |code: &str| store.search(&by_code(code), None).unwrap().total;
    for _ in 0..3 {
        assert_eq!(total("A"), Some(2));
        assert_eq!(total("B"), Some(1));
    }
    assert_eq!(store.reindex(None, &mut |_, _| {}).unwrap(), 3);
    assert_eq!(total("A"), Some(2));
    assert_eq!(total("B"), Some(1));
    // Writes after the swap land in the new tables; the next searches see them.
    store.write(vec![obs("o2", "A")]).unwrap();
    assert_eq!(total("A"), Some(3));
    assert_eq!(total("B"), Some(0));
    assert_eq!(store.read("Observation", "o2").unwrap().version, 2);
    assert_eq!(store.reindex(None, &mut |_, _| {}).unwrap(), 3);
    assert_eq!(total("A"), Some(3));
    let history = store
        .history(
            store::HistoryScope::Instance {
                resource_type: "Observation",
                id: "o2",
            },
            &store::HistoryQuery::default(),
        )
        .unwrap();
    assert_eq!(history.entries.len(), 2);
}
