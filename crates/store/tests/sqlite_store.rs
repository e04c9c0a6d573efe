//! Behaviour of the stores through the `Store` trait, on temporary databases. The tests that use
//! `open()` run on the backend `FHIRHOSE_TEST_DATABASE` selects (unset: SQLite; a PostgreSQL URL:
//! a fresh database on that cluster, see `store::testing`); the others are SQLite's own.

use std::ops::ControlFlow;
use std::sync::Arc;

use serde_json::{Value, json};
use store::{
    HistoryMethod, HistoryQuery, HistoryScope, IndexEntry, IndexValue, Indexer, ListFilter,
    SeqBounds, SqliteOptions, SqliteStore, Store, StoreError, WriteOp, WriteStatus,
    parse_instant_ms,
};

/// A fresh store on the backend under test (its database lives as long as the `TestStore`).
fn open() -> store::testing::TestStore {
    store::testing::test_store(None)
}

fn open_sqlite() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open_data_dir(dir.path(), SqliteOptions::default()).unwrap();
    (dir, store)
}

fn put(store: &dyn Store, ty: &str, id: &str, body: Value) -> store::WriteOutcome {
    let mut outs = store
        .write(vec![WriteOp::Update {
            resource_type: ty.into(),
            id: id.into(),
            resource: body,
            if_match: None,
        }])
        .unwrap();
    outs.pop().unwrap()
}

fn del(store: &dyn Store, ty: &str, id: &str) -> store::WriteOutcome {
    store
        .write(vec![WriteOp::Delete {
            resource_type: ty.into(),
            id: id.into(),
            if_match: None,
        }])
        .unwrap()
        .pop()
        .unwrap()
}

fn json_of(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap()
}

#[test]
fn create_assigns_id_version_and_meta() {
    let t = open();
    let s: &dyn Store = &*t.store;
    let out = s
        .write(vec![WriteOp::Create {
            resource: json!({"resourceType": "Patient", "active": true}),
        }])
        .unwrap();
    assert_eq!(out[0].status, WriteStatus::Created);
    assert_eq!(out[0].version, 1);
    let stored = s.read("Patient", &out[0].id).unwrap();
    let v = json_of(&stored.json);
    assert_eq!(v["id"], out[0].id.as_str());
    assert_eq!(v["meta"]["versionId"], "1");
    assert_eq!(v["meta"]["lastUpdated"], out[0].last_updated.as_str());
    assert!(out[0].last_updated.ends_with('Z') && out[0].last_updated.len() == 24);
    assert_eq!(stored.json, out[0].json.clone().unwrap());
}

#[test]
fn create_with_existing_id_is_refused() {
    let t = open();
    let s: &dyn Store = &*t.store;
    let r = json!({"resourceType": "Patient", "id": "p1"});
    s.write(vec![WriteOp::Create {
        resource: r.clone(),
    }])
    .unwrap();
    match s.write(vec![WriteOp::Create { resource: r }]) {
        Err(StoreError::AlreadyExists { id, .. }) => assert_eq!(id, "p1"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn numbers_keep_their_exact_text() {
    let t = open();
    let s: &dyn Store = &*t.store;
    let out = put(
        s,
        "Observation",
        "o1",
        json!({"resourceType": "Observation", "status": "final",
               "valueQuantity": {"value": serde_json::from_str::<Value>("1.50").unwrap()}}),
    );
    let text = String::from_utf8(s.read("Observation", "o1").unwrap().json).unwrap();
    assert!(text.contains(r#""value":1.50"#), "{text}");
    assert_eq!(out.version, 1);
}

#[test]
fn versions_tombstones_and_vread() {
    let t = open();
    let s: &dyn Store = &*t.store;
    assert_eq!(
        put(
            s,
            "Patient",
            "p1",
            json!({"resourceType": "Patient", "gender": "male"})
        )
        .status,
        WriteStatus::Created
    );
    let u = put(
        s,
        "Patient",
        "p1",
        json!({"resourceType": "Patient", "id": "p1", "gender": "female"}),
    );
    assert_eq!((u.status, u.version), (WriteStatus::Updated, 2));
    let d = del(s, "Patient", "p1");
    assert_eq!((d.status, d.version), (WriteStatus::Deleted, 3));
    match s.read("Patient", "p1") {
        Err(StoreError::Gone { version: 3, .. }) => {}
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        s.read("Patient", "nope"),
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        s.read("Nothing", "nope"),
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(
        json_of(&s.vread("Patient", "p1", 1).unwrap().json)["gender"],
        "male"
    );
    assert_eq!(
        json_of(&s.vread("Patient", "p1", 2).unwrap().json)["gender"],
        "female"
    );
    assert!(matches!(
        s.vread("Patient", "p1", 3),
        Err(StoreError::Gone { .. })
    ));
    assert!(matches!(
        s.vread("Patient", "p1", 4),
        Err(StoreError::NotFound { .. })
    ));
    // Deleting again writes nothing; re-creating continues the version line.
    assert_eq!(del(s, "Patient", "p1").status, WriteStatus::DeleteNotFound);
    let c = put(s, "Patient", "p1", json!({"resourceType": "Patient"}));
    assert_eq!((c.status, c.version), (WriteStatus::Created, 4));
    assert_eq!(s.read("Patient", "p1").unwrap().version, 4);
    assert_eq!(
        del(s, "Patient", "never").status,
        WriteStatus::DeleteNotFound
    );
}

#[test]
fn update_rejects_mismatched_type_or_id_and_bad_ids() {
    let t = open();
    let s: &dyn Store = &*t.store;
    let err = s
        .write(vec![WriteOp::Update {
            resource_type: "Patient".into(),
            id: "a".into(),
            resource: json!({"resourceType": "Patient", "id": "b"}),
            if_match: None,
        }])
        .unwrap_err();
    assert!(matches!(err, StoreError::InvalidResource(_)), "{err:?}");
    let err = s
        .write(vec![WriteOp::Update {
            resource_type: "Patient".into(),
            id: "a".into(),
            resource: json!({"resourceType": "Observation"}),
            if_match: None,
        }])
        .unwrap_err();
    assert!(matches!(err, StoreError::InvalidResource(_)), "{err:?}");
    let err = s
        .write(vec![WriteOp::Update {
            resource_type: "Patient".into(),
            id: "a b".into(),
            resource: json!({"resourceType": "Patient"}),
            if_match: None,
        }])
        .unwrap_err();
    assert!(matches!(err, StoreError::InvalidId(_)), "{err:?}");
    let err = s
        .write(vec![WriteOp::Create {
            resource: json!(["not", "an", "object"]),
        }])
        .unwrap_err();
    assert!(matches!(err, StoreError::InvalidResource(_)), "{err:?}");
}

#[test]
fn if_match_conflicts() {
    let t = open();
    let s: &dyn Store = &*t.store;
    put(s, "Patient", "p1", json!({"resourceType": "Patient"}));
    put(s, "Patient", "p1", json!({"resourceType": "Patient"}));
    let err = s
        .write(vec![WriteOp::Update {
            resource_type: "Patient".into(),
            id: "p1".into(),
            resource: json!({"resourceType": "Patient"}),
            if_match: Some(1),
        }])
        .unwrap_err();
    match err {
        StoreError::VersionConflict {
            expected: 1,
            actual: Some(2),
            ..
        } => {}
        other => panic!("{other:?}"),
    }
    let ok = s
        .write(vec![WriteOp::Update {
            resource_type: "Patient".into(),
            id: "p1".into(),
            resource: json!({"resourceType": "Patient"}),
            if_match: Some(2),
        }])
        .unwrap();
    assert_eq!(ok[0].version, 3);
    let err = s
        .write(vec![WriteOp::Delete {
            resource_type: "Patient".into(),
            id: "p1".into(),
            if_match: Some(2),
        }])
        .unwrap_err();
    assert!(matches!(err, StoreError::VersionConflict { .. }));
    let err = s
        .write(vec![WriteOp::Update {
            resource_type: "Patient".into(),
            id: "new".into(),
            resource: json!({"resourceType": "Patient"}),
            if_match: Some(1),
        }])
        .unwrap_err();
    assert!(matches!(
        err,
        StoreError::VersionConflict { actual: None, .. }
    ));
}

#[test]
fn failing_batch_rolls_back_entirely() {
    let t = open();
    let s: &dyn Store = &*t.store;
    put(s, "Patient", "p1", json!({"resourceType": "Patient"}));
    let before = s.watermark().unwrap();
    let err = s
        .write(vec![
            WriteOp::Update {
                resource_type: "Patient".into(),
                id: "p2".into(),
                resource: json!({"resourceType": "Patient"}),
                if_match: None,
            },
            WriteOp::Create {
                resource: json!({"resourceType": "Observation", "id": "o1"}),
            },
            WriteOp::Update {
                resource_type: "Patient".into(),
                id: "p1".into(),
                resource: json!({"resourceType": "Patient"}),
                if_match: Some(7),
            },
        ])
        .unwrap_err();
    assert!(matches!(err, StoreError::VersionConflict { .. }));
    assert!(matches!(
        s.read("Patient", "p2"),
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        s.read("Observation", "o1"),
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(s.read("Patient", "p1").unwrap().version, 1);
    assert_eq!(s.watermark().unwrap(), before);
    // The next write continues the sequence without a gap.
    let next = put(s, "Patient", "p3", json!({"resourceType": "Patient"}));
    assert_eq!(next.seq, before.seq + 1);
    assert_eq!(
        s.count_type("Observation", s.current_seq().unwrap())
            .unwrap(),
        0
    );
}

#[test]
fn ops_on_one_resource_within_a_write_see_each_other() {
    let t = open();
    let s: &dyn Store = &*t.store;
    let out = s
        .write(vec![
            WriteOp::Update {
                resource_type: "Patient".into(),
                id: "p".into(),
                resource: json!({"resourceType": "Patient"}),
                if_match: None,
            },
            WriteOp::Update {
                resource_type: "Patient".into(),
                id: "p".into(),
                resource: json!({"resourceType": "Patient", "active": true}),
                if_match: Some(1),
            },
        ])
        .unwrap();
    assert_eq!(out[1].version, 2);
    assert_eq!(out[0].last_updated, out[1].last_updated);
    assert_eq!(out[1].seq, out[0].seq + 1);
}

#[test]
fn last_updated_is_strictly_increasing_between_transactions() {
    let t = open();
    let s: &dyn Store = &*t.store;
    let mut last = String::new();
    for i in 0..50 {
        let o = put(
            s,
            "Patient",
            &format!("p{i}"),
            json!({"resourceType": "Patient"}),
        );
        assert!(o.last_updated > last, "{} <= {}", o.last_updated, last);
        last = o.last_updated;
    }
    let w = s.watermark().unwrap();
    assert_eq!(w.seq, 50);
    assert_eq!(w.last_updated.as_deref(), Some(last.as_str()));
    assert_eq!(
        s.instant_of_seq(50).unwrap().as_deref(),
        Some(last.as_str())
    );
    assert_eq!(s.instant_of_seq(51).unwrap(), None);
}

#[test]
fn history_with_since_and_keyset_paging() {
    let t = open();
    let s: &dyn Store = &*t.store;
    put(s, "Patient", "a", json!({"resourceType": "Patient"}));
    put(
        s,
        "Observation",
        "o",
        json!({"resourceType": "Observation", "status": "final"}),
    );
    let second = put(
        s,
        "Patient",
        "a",
        json!({"resourceType": "Patient", "active": true}),
    );
    del(s, "Patient", "a");
    put(s, "Patient", "b", json!({"resourceType": "Patient"}));

    let inst = s
        .history(
            HistoryScope::Instance {
                resource_type: "Patient",
                id: "a",
            },
            &HistoryQuery::default(),
        )
        .unwrap();
    let methods: Vec<_> = inst.entries.iter().map(|e| (e.version, e.method)).collect();
    assert_eq!(
        methods,
        vec![
            (3, HistoryMethod::Delete),
            (2, HistoryMethod::Put),
            (1, HistoryMethod::Put)
        ]
    );
    assert!(inst.entries[0].json.is_none());

    let ty = s
        .history(HistoryScope::Type("Patient"), &HistoryQuery::default())
        .unwrap();
    assert_eq!(ty.entries.len(), 4);

    // System history, two per page, newest first, pages do not overlap.
    let mut seen = Vec::new();
    let mut q = HistoryQuery {
        count: 2,
        ..Default::default()
    };
    loop {
        let page = s.history(HistoryScope::System, &q).unwrap();
        seen.extend(page.entries.iter().map(|e| e.seq));
        match page.next_before_seq {
            Some(b) => q.before_seq = Some(b),
            None => break,
        }
    }
    assert_eq!(seen, vec![5, 4, 3, 2, 1]);

    // _since: the instant of the second write of Patient/a and later.
    let since = parse_instant_ms(&second.last_updated).unwrap();
    let page = s
        .history(
            HistoryScope::System,
            &HistoryQuery {
                since_ms: Some(since),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(
        page.entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![5, 4, 3]
    );
    assert_eq!(page.entries[2].resource_type, "Patient");

    match s.history(
        HistoryScope::Instance {
            resource_type: "Patient",
            id: "zzz",
        },
        &HistoryQuery::default(),
    ) {
        Err(StoreError::NotFound { .. }) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn as_of_snapshot_ignores_later_writes() {
    let t = open();
    let s: &dyn Store = &*t.store;
    for i in 0..10 {
        put(
            s,
            "Patient",
            &format!("p{i}"),
            json!({"resourceType": "Patient", "n": i}),
        );
    }
    let mark = s.current_seq().unwrap();
    // After the watermark: one update, one delete, one create.
    put(
        s,
        "Patient",
        "p1",
        json!({"resourceType": "Patient", "n": 100}),
    );
    del(s, "Patient", "p2");
    put(s, "Patient", "p99", json!({"resourceType": "Patient"}));

    let snap = s.scan_type("Patient", mark, 0, 1000).unwrap();
    assert_eq!(snap.len(), 10);
    let p1 = snap.iter().find(|r| r.id == "p1").unwrap();
    assert_eq!(json_of(&p1.json)["n"], 1);
    assert!(snap.iter().any(|r| r.id == "p2"));
    assert!(!snap.iter().any(|r| r.id == "p99"));
    assert_eq!(s.count_type("Patient", mark).unwrap(), 10);
    let st = s.seq_range("Patient", mark).unwrap().unwrap();
    assert_eq!((st.min_seq, st.max_seq, st.count), (1, 10, 10));

    let now = s.current_seq().unwrap();
    assert_eq!(s.count_type("Patient", now).unwrap(), 10);
    let cur = s.scan_type("Patient", now, 0, 1000).unwrap();
    assert_eq!(cur.len(), 10);
    assert!(!cur.iter().any(|r| r.id == "p2"));
    // Changed since the mark (an export's _since), and deleted since the mark.
    let changed: Vec<_> = s
        .scan_type("Patient", now, mark, 1000)
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(changed, vec!["p1", "p99"]);
    let gone = s.deleted_since("Patient", mark, now, 0, 100).unwrap();
    assert_eq!(gone.len(), 1);
    assert_eq!(gone[0].id, "p2");
    assert!(
        s.deleted_since("Patient", mark, mark, 0, 100)
            .unwrap()
            .is_empty()
    );
    assert_eq!(s.types_present(now).unwrap(), vec!["Patient"]);
    assert!(s.types_present(0).unwrap().is_empty());
}

#[test]
fn scan_pages_and_streaming_agree() {
    let t = open();
    let s: &dyn Store = &*t.store;
    let ops = (0..250)
        .map(|i| WriteOp::Update {
            resource_type: if i % 3 == 0 { "Patient" } else { "Observation" }.into(),
            id: format!("r{i}"),
            resource: json!({"resourceType": if i % 3 == 0 { "Patient" } else { "Observation" }, "status": "final"}),
            if_match: None,
        })
        .collect();
    s.write(ops).unwrap();
    let as_of = s.current_seq().unwrap();
    let mut paged = Vec::new();
    let mut after = 0;
    loop {
        let page = s.scan_type("Observation", as_of, after, 40).unwrap();
        let Some(last) = page.last() else { break };
        after = last.seq;
        paged.extend(page.into_iter().map(|r| r.seq));
    }
    let mut streamed = Vec::new();
    let n = s
        .scan_type_each("Observation", as_of, SeqBounds::ALL, &mut |row| {
            assert!(row.json.starts_with(b"{\"resourceType\":\"Observation\""));
            streamed.push(row.seq);
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(n as usize, streamed.len());
    assert_eq!(paged, streamed);
    assert_eq!(paged.len(), 166);
    assert!(paged.windows(2).all(|w| w[0] < w[1]));
    // Bounded range and early stop.
    let mut part = 0;
    s.scan_type_each(
        "Observation",
        as_of,
        SeqBounds {
            after: 10,
            up_to: 20,
        },
        &mut |_| {
            part += 1;
            ControlFlow::Continue(())
        },
    )
    .unwrap();
    assert_eq!(
        part,
        streamed.iter().filter(|q| **q > 10 && **q <= 20).count()
    );
    let mut one = 0;
    s.scan_type_each("Observation", as_of, SeqBounds::ALL, &mut |_| {
        one += 1;
        ControlFlow::Break(())
    })
    .unwrap();
    assert_eq!(one, 1);
}

#[test]
fn list_type_with_ids_last_updated_and_paging() {
    let t = open();
    let s: &dyn Store = &*t.store;
    for i in 0..7 {
        put(
            s,
            "Patient",
            &format!("p{i}"),
            json!({"resourceType": "Patient"}),
        );
    }
    del(s, "Patient", "p3");
    let all = ListFilter::default();
    assert_eq!(s.count_list("Patient", &all).unwrap(), 6);
    let mut ids = Vec::new();
    let mut after = None;
    loop {
        let page = s.list_type("Patient", &all, 4, after).unwrap();
        ids.extend(page.resources.into_iter().map(|r| r.id));
        match page.next_after_seq {
            Some(a) => after = Some(a),
            None => break,
        }
    }
    assert_eq!(ids, vec!["p0", "p1", "p2", "p4", "p5", "p6"]);

    let by_id = ListFilter {
        ids: Some(vec!["p5".into(), "p3".into(), "p0".into(), "zz".into()]),
        ..Default::default()
    };
    let page = s.list_type("Patient", &by_id, 10, None).unwrap();
    assert_eq!(
        page.resources
            .iter()
            .map(|r| r.id.as_str())
            .collect::<Vec<_>>(),
        vec!["p0", "p5"]
    );
    assert_eq!(s.count_list("Patient", &by_id).unwrap(), 2);

    let p4 = s.read("Patient", "p4").unwrap();
    let from = ListFilter {
        updated_from_ms: parse_instant_ms(&p4.last_updated),
        ..Default::default()
    };
    assert_eq!(s.count_list("Patient", &from).unwrap(), 3);
    let before = ListFilter {
        updated_before_ms: parse_instant_ms(&p4.last_updated),
        ..Default::default()
    };
    assert_eq!(s.count_list("Patient", &before).unwrap(), 3);
    assert_eq!(s.count_list("Observation", &all).unwrap(), 0);
}

struct CodeIndexer;

impl Indexer for CodeIndexer {
    fn entries(&self, _ty: &str, resource: &Value) -> Vec<IndexEntry> {
        let mut out = Vec::new();
        if let Some(g) = resource.get("gender").and_then(Value::as_str) {
            out.push(IndexEntry {
                param: "gender".into(),
                value: IndexValue::Token {
                    system: Some("http://hl7.org/fhir/administrative-gender".into()),
                    code: Some(g.into()),
                },
            });
        }
        if let Some(d) = resource.get("birthDate").and_then(Value::as_str) {
            let ms = parse_instant_ms(d).unwrap();
            out.push(IndexEntry {
                param: "birthdate".into(),
                value: IndexValue::Date { lo: ms, hi: ms + 1 },
            });
        }
        out
    }
}

/// A store on a temporary directory that indexes with [`CodeIndexer`].
fn open_indexed() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let s = SqliteStore::open_data_dir(
        dir.path(),
        SqliteOptions {
            indexer: Some(Arc::new(CodeIndexer)),
            ..Default::default()
        },
    )
    .unwrap();
    (dir, s)
}

#[test]
fn index_rows_follow_the_current_version() {
    let (_dir, s) = open_indexed();
    let count = |code: &str| -> i64 {
        s.with_reader(|c| {
            Ok(c.query_row(
                "SELECT count(*) FROM idx_token t
                 JOIN resource_versions rv ON rv.k = (t.type_no << 40) | (t.rowid >> 20)
                 WHERE t.param_no = (SELECT param_no FROM params WHERE name = 'gender')
                 AND t.code = ?1",
                [code],
                |r| r.get(0),
            )?)
        })
        .unwrap()
    };
    put(
        &s,
        "Patient",
        "a",
        json!({"resourceType": "Patient", "gender": "male", "birthDate": "2000"}),
    );
    put(
        &s,
        "Patient",
        "b",
        json!({"resourceType": "Patient", "gender": "male", "birthDate": "2000"}),
    );
    assert_eq!(count("male"), 2);
    put(
        &s,
        "Patient",
        "a",
        json!({"resourceType": "Patient", "gender": "female", "birthDate": "2001"}),
    );
    assert_eq!((count("male"), count("female")), (1, 1));
    del(&s, "Patient", "b");
    assert_eq!(count("male"), 0);
    let dates: i64 = s
        .with_reader(|c| Ok(c.query_row("SELECT count(*) FROM idx_date", [], |r| r.get(0))?))
        .unwrap();
    assert_eq!(dates, 1);
    // Reindex rebuilds the same rows.
    assert_eq!(s.reindex(None, &mut |_, _| {}).unwrap(), 1);
    assert_eq!((count("male"), count("female")), (0, 1));
}

#[test]
fn reopen_keeps_data_and_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let last = {
        let s = SqliteStore::open_data_dir(dir.path(), SqliteOptions::default()).unwrap();
        put(&s, "Patient", "a", json!({"resourceType": "Patient"}));
        put(&s, "Patient", "a", json!({"resourceType": "Patient"}))
    };
    let s = SqliteStore::open_data_dir(dir.path(), SqliteOptions::default()).unwrap();
    assert_eq!(s.read("Patient", "a").unwrap().version, 2);
    let next = put(&s, "Patient", "b", json!({"resourceType": "Patient"}));
    assert_eq!(next.seq, last.seq + 1);
    assert!(next.last_updated > last.last_updated);
}

#[test]
fn data_dir_lock_refuses_a_second_store() {
    let dir = tempfile::tempdir().unwrap();
    let _s = SqliteStore::open_data_dir(dir.path(), SqliteOptions::default()).unwrap();
    match SqliteStore::open_data_dir(dir.path(), SqliteOptions::default()) {
        Err(StoreError::Locked { .. }) => {}
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("second open succeeded"),
    }
}

#[test]
fn index_staleness_is_recorded_until_cleared() {
    let (dir, s) = open_sqlite();
    assert!(!s.indexes_stale().unwrap());
    s.set_indexes_stale(true).unwrap();
    assert!(s.indexes_stale().unwrap());
    drop(s);
    // It survives a reopen, and a clear removes it.
    let s = SqliteStore::open_data_dir(dir.path(), SqliteOptions::default()).unwrap();
    assert!(s.indexes_stale().unwrap());
    s.set_indexes_stale(false).unwrap();
    assert!(!s.indexes_stale().unwrap());
}

#[test]
fn a_prepared_put_stores_what_an_update_stores() {
    let body = json!({"resourceType": "Patient", "gender": "male", "birthDate": "2000",
        "meta": {"versionId": "x", "tag": [{"code": "t"}]}, "name": [{"family": "Ünï"}]});
    let (_d1, a) = open_indexed();
    let (_d2, b) = open_indexed();
    put(&a, "Patient", "p", body.clone());
    put(&a, "Patient", "p", body.clone());
    let prepared = b.prepare_put("Patient", "p", body.clone()).unwrap();
    b.write(vec![WriteOp::Put(prepared.clone())]).unwrap();
    let second = b
        .write(vec![WriteOp::Put(prepared)])
        .unwrap()
        .pop()
        .unwrap();
    assert_eq!(second.status, WriteStatus::Updated);
    assert_eq!(second.version, 2);
    let (ra, rb) = (
        a.read("Patient", "p").unwrap(),
        b.read("Patient", "p").unwrap(),
    );
    let mut ja = json_of(&ra.json);
    let mut jb = json_of(&rb.json);
    // Everything but the instant is the same, byte for byte.
    ja["meta"]["lastUpdated"] = Value::Null;
    jb["meta"]["lastUpdated"] = Value::Null;
    assert_eq!(
        serde_json::to_string(&ja).unwrap(),
        serde_json::to_string(&jb).unwrap()
    );
    assert_eq!(ja["meta"]["versionId"], "2");
    let rows = |s: &SqliteStore| -> i64 {
        s.with_reader(|c| {
            Ok(c.query_row(
                "SELECT (SELECT count(*) FROM idx_token) * 10 + (SELECT count(*) FROM idx_date)",
                [],
                |r| r.get(0),
            )?)
        })
        .unwrap()
    };
    assert_eq!((rows(&a), rows(&b)), (11, 11));
    // The same checks as an update.
    assert!(matches!(
        b.prepare_put("Patient", "q", json!({"resourceType": "Observation"})),
        Err(StoreError::InvalidResource(_))
    ));
    assert!(matches!(
        b.prepare_put("Patient", "bad id", json!({"resourceType": "Patient"})),
        Err(StoreError::InvalidId(_))
    ));
    // A resource prepared by a store without the indexer is refused by one with it.
    let (_d3, plain) = open_sqlite();
    let unindexed = plain.prepare_put("Patient", "u", body).unwrap();
    assert!(b.write(vec![WriteOp::Put(unindexed)]).is_err());
    assert!(matches!(
        b.read("Patient", "u"),
        Err(StoreError::NotFound { .. })
    ));
}

/// A full reindex removes every index row once and rebuilds type by type (one transaction),
/// reporting each type; a reindex of one type leaves the others' rows alone. A complete reindex
/// clears the stale flag; a store without an indexer (which only removes rows) sets it.
#[test]
fn a_full_reindex_clears_every_row_once_and_the_stale_flag_at_the_end() {
    let (dir, s) = open_indexed();
    let put = |ty: &str, id: &str, g: &str| WriteOp::Update {
        resource_type: ty.into(),
        id: id.into(),
        resource: json!({"resourceType": ty, "gender": g, "birthDate": "2000"}),
        if_match: None,
    };
    s.write(vec![
        put("Patient", "a", "male"),
        put("Patient", "b", "female"),
        put("Person", "c", "male"),
    ])
    .unwrap();
    let rows = |s: &SqliteStore| -> Vec<(i64, String)> {
        s.with_reader(|c| {
            let mut st = c.prepare("SELECT type_no, code FROM idx_token ORDER BY type_no, code")?;
            let v = st
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(v)
        })
        .unwrap()
    };
    let written = rows(&s);
    assert_eq!(written.len(), 3);

    let mut seen = Vec::new();
    assert_eq!(
        s.reindex(Some("Person"), &mut |t, n| seen.push((t.to_string(), n)))
            .unwrap(),
        1
    );
    assert_eq!(seen, [("Person".to_string(), 1)]);
    assert_eq!(rows(&s), written);

    s.set_indexes_stale(true).unwrap();
    seen.clear();
    assert_eq!(
        s.reindex(None, &mut |t, n| seen.push((t.to_string(), n)))
            .unwrap(),
        3
    );
    assert_eq!(
        seen,
        [("Patient".to_string(), 2), ("Person".to_string(), 1)]
    );
    assert_eq!(rows(&s), written);
    assert!(!s.indexes_stale().unwrap());
    drop(s);

    let plain = SqliteStore::open_data_dir(dir.path(), SqliteOptions::default()).unwrap();
    assert_eq!(plain.reindex(None, &mut |_, _| {}).unwrap(), 0);
    assert_eq!(rows(&plain), []);
    assert!(plain.indexes_stale().unwrap());
}

#[test]
fn one_transaction_that_rewrites_a_resource_keeps_only_the_last_versions_index_rows() {
    let (_dir, s) = open_indexed();
    let update = |g: &str| WriteOp::Update {
        resource_type: "Patient".into(),
        id: "a".into(),
        resource: json!({"resourceType": "Patient", "gender": g, "birthDate": "2000"}),
        if_match: None,
    };
    let delete = WriteOp::Delete {
        resource_type: "Patient".into(),
        id: "a".into(),
        if_match: None,
    };
    let rows = || -> Vec<(String, i64)> {
        s.with_reader(|c| {
            let mut st = c.prepare(
                "SELECT t.code, (SELECT count(*) FROM idx_date) FROM idx_token t ORDER BY t.code",
            )?;
            let v = st
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(v)
        })
        .unwrap()
    };
    s.write(vec![update("male"), update("female"), update("other")])
        .unwrap();
    assert_eq!(rows(), vec![("other".to_string(), 1)]);
    s.write(vec![update("unknown"), delete]).unwrap();
    assert_eq!(rows(), vec![]);
    assert_eq!(s.reindex(None, &mut |_, _| {}).unwrap(), 0);
}

/// The value indexes present, by name.
fn value_indexes(s: &SqliteStore) -> Vec<String> {
    s.with_reader(|c| {
        let mut stmt = c.prepare(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND name LIKE 'idx_%'
             AND name NOT LIKE '%\\_k' ESCAPE '\\' ORDER BY name",
        )?;
        let names = stmt
            .query_map([], |r| r.get(0))?
            .collect::<Result<Vec<String>, _>>()?;
        Ok(names)
    })
    .unwrap()
}

/// How `gender = code` is answered: through the value index, or `None` when SQLite would scan.
fn gender_lookup(s: &SqliteStore, code: &str) -> (i64, bool) {
    s.with_reader(|c| {
        let sql = "SELECT count(*) FROM idx_token WHERE type_no = 1
            AND param_no = (SELECT param_no FROM params WHERE name = 'gender') AND code = ?1";
        let n = c.query_row(sql, [code], |r| r.get(0))?;
        let plan: Vec<String> = c
            .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))?
            .query_map([code], |r| r.get(3))?
            .collect::<Result<_, _>>()?;
        Ok((n, plan.iter().any(|p| p.contains("idx_token_value"))))
    })
    .unwrap()
}

#[test]
fn a_bulk_load_with_suspended_index_upkeep_ends_with_the_same_indexes() {
    let (_dir, s) = open_indexed();
    let all = value_indexes(&s);
    assert_eq!(all.len(), 10, "{all:?}");
    assert!(s.suspend_index_upkeep().unwrap());
    assert!(value_indexes(&s).is_empty());
    // Rows are still written (and deleted with their versions) while upkeep is suspended.
    for (id, g) in [("a", "male"), ("b", "male"), ("c", "female")] {
        put(
            &s,
            "Patient",
            id,
            json!({"resourceType": "Patient", "gender": g}),
        );
    }
    put(
        &s,
        "Patient",
        "b",
        json!({"resourceType": "Patient", "gender": "female"}),
    );
    assert_eq!(gender_lookup(&s, "male"), (1, false));
    s.resume_index_upkeep().unwrap();
    assert_eq!(value_indexes(&s), all);
    assert_eq!(gender_lookup(&s, "male"), (1, true));
    assert_eq!(gender_lookup(&s, "female").0, 2);
    // Resuming twice changes nothing; a store without indexer suspends nothing.
    s.resume_index_upkeep().unwrap();
    assert_eq!(value_indexes(&s), all);
    let (_d2, plain) = open_sqlite();
    assert!(!plain.suspend_index_upkeep().unwrap());
    assert_eq!(value_indexes(&plain).len(), 10);
}

#[test]
fn a_store_left_with_suspended_index_upkeep_rebuilds_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let options = || SqliteOptions {
        indexer: Some(Arc::new(CodeIndexer)),
        ..Default::default()
    };
    {
        let s = SqliteStore::open_data_dir(dir.path(), options()).unwrap();
        assert!(s.suspend_index_upkeep().unwrap());
        put(
            &s,
            "Patient",
            "a",
            json!({"resourceType": "Patient", "gender": "male"}),
        );
        // Dropped without resuming, as after a crash.
    }
    let s = SqliteStore::open_data_dir(dir.path(), options()).unwrap();
    assert_eq!(value_indexes(&s).len(), 10);
    assert_eq!(gender_lookup(&s, "male"), (1, true));
}

#[test]
fn stored_bytes_grow_with_the_data() {
    let (_dir, s) = open_sqlite();
    let empty = s.stored_bytes().unwrap();
    assert!(empty > 0);
    for i in 0..200 {
        put(
            &s,
            "Patient",
            &format!("p{i}"),
            json!({"resourceType": "Patient", "name": [{"family": "x".repeat(500)}]}),
        );
    }
    // Counted before any checkpoint: pages committed to the write-ahead log count too.
    assert!(s.stored_bytes().unwrap() > empty + 100_000);
}

#[test]
fn suspended_index_upkeep_is_resumed_also_when_the_work_fails() {
    let (_dir, s) = open_indexed();
    let failed: Result<((), _), StoreError> =
        store::with_index_upkeep_suspended(&s, true, |suspended| {
            assert!(suspended);
            assert!(value_indexes(&s).is_empty());
            Err(StoreError::Corrupt("the work failed".into()))
        });
    assert!(matches!(failed, Err(StoreError::Corrupt(m)) if m == "the work failed"));
    assert_eq!(value_indexes(&s).len(), 10);
    // Not asked to suspend: nothing dropped, no rebuild time.
    let (n, build) = store::with_index_upkeep_suspended(&s, false, |suspended| {
        assert!(!suspended);
        Ok::<_, StoreError>(value_indexes(&s).len())
    })
    .unwrap();
    assert_eq!((n, build), (10, None));
    let (_, build) =
        store::with_index_upkeep_suspended(&s, true, |_| Ok::<_, StoreError>(())).unwrap();
    assert!(build.is_some());
}

/// Index rows by (table, parameter code): the codes through `params`.
fn rows_by_code(s: &SqliteStore) -> Vec<(String, String, i64)> {
    s.with_reader(|c| {
        let mut out = Vec::new();
        for t in ["idx_token", "idx_date"] {
            let mut st = c.prepare(&format!(
                "SELECT p.name, count(*) FROM {t} i JOIN params p ON p.param_no = i.param_no
                 GROUP BY p.name ORDER BY p.name"
            ))?;
            for r in st.query_map([], |r| Ok((t.to_string(), r.get(0)?, r.get(1)?)))? {
                out.push(r?);
            }
        }
        Ok(out)
    })
    .unwrap()
}

/// A database of schema version 1 (index rows carrying the parameter code as text) is migrated
/// at open to version 2 (parameter numbers): the same rows by code, the value indexes built, and
/// new writes and lookups use the numbers.
#[test]
fn a_schema_version_1_database_is_migrated_to_parameter_numbers() {
    let (dir, s) = open_indexed();
    put(
        &s,
        "Patient",
        "a",
        json!({"resourceType": "Patient", "gender": "male", "birthDate": "2000"}),
    );
    put(
        &s,
        "Patient",
        "b",
        json!({"resourceType": "Patient", "gender": "female", "birthDate": "2001"}),
    );
    put(
        &s,
        "Patient",
        "c",
        json!({"resourceType": "Patient", "gender": "male"}),
    );
    let before = rows_by_code(&s);
    let tokens = tokens_by_system(&s);
    assert_eq!(
        before,
        [
            ("idx_token".to_string(), "gender".to_string(), 3),
            ("idx_date".to_string(), "birthdate".to_string(), 2)
        ]
    );
    drop(s);
    // Version 1's shape: `param TEXT` in place of `param_no`, no `params` table.
    let conn = rusqlite::Connection::open(dir.path().join(store::sqlite::DB_FILE_NAME)).unwrap();
    let mut downgrade = String::from("BEGIN;");
    for name in value_index_names() {
        downgrade.push_str(&format!("DROP INDEX {name};"));
    }
    downgrade.push_str(&k_columns_added());
    for t in [
        "idx_token",
        "idx_token_text",
        "idx_string",
        "idx_date",
        "idx_number",
        "idx_quantity",
        "idx_reference",
        "idx_reference_identifier",
        "idx_uri",
    ] {
        downgrade.push_str(&format!(
            "ALTER TABLE {t} ADD COLUMN param TEXT;
             UPDATE {t} SET param = (SELECT name FROM params p WHERE p.param_no = {t}.param_no);
             ALTER TABLE {t} DROP COLUMN param_no;"
        ));
    }
    downgrade.push_str(TOKEN_SYSTEMS_AS_TEXT);
    downgrade.push_str(
        "DROP TABLE params; UPDATE store_meta SET value = '1' WHERE key = 'schema_version'; COMMIT;",
    );
    conn.execute_batch(&downgrade).unwrap();
    drop(conn);

    let s = reopen_migrated(dir.path(), &before, &tokens);
    put(
        &s,
        "Patient",
        "d",
        json!({"resourceType": "Patient", "gender": "male", "birthDate": "2002"}),
    );
    assert_eq!(gender_lookup(&s, "male"), (3, true));
}

/// Reopens the store of `dir`, whose database was rewritten to an older schema version, and
/// checks what the migration at open must give: the current schema version, the index rows by
/// code (`before`) and the token rows by system (`tokens`) of before the rewrite, the value
/// indexes, and a lookup of `gender=male` (two patients) through its index.
fn reopen_migrated(
    dir: &std::path::Path,
    before: &[(String, String, i64)],
    tokens: &[(Option<String>, String, i64)],
) -> SqliteStore {
    let s = SqliteStore::open_data_dir(
        dir,
        SqliteOptions {
            indexer: Some(Arc::new(CodeIndexer)),
            ..Default::default()
        },
    )
    .unwrap();
    let version: String = s
        .with_reader(|c| {
            Ok(c.query_row(
                "SELECT value FROM store_meta WHERE key = 'schema_version'",
                [],
                |r| r.get(0),
            )?)
        })
        .unwrap();
    assert_eq!(version, store::sqlite::SCHEMA_VERSION.to_string());
    assert_eq!(rows_by_code(&s), before);
    assert_eq!(tokens_by_system(&s), tokens);
    assert_eq!(value_indexes(&s), value_index_names());
    assert_eq!(gender_lookup(&s, "male"), (2, true));
    s
}

/// The index rows whose rowid is not in the range `(seq << 20) | n` of a current version of
/// their type, over all index tables, and the number of `(k)` indexes.
fn misplaced_rows_and_k_indexes(s: &SqliteStore) -> (i64, i64) {
    s.with_reader(|c| {
        let mut misplaced = 0;
        for t in INDEX_TABLES {
            misplaced += c.query_row(
                &format!(
                    "SELECT count(*) FROM {t} i WHERE NOT EXISTS (SELECT 1 FROM resource_versions rv
                     WHERE rv.k = (i.type_no << 40) | (i.rowid >> 20)
                     AND rv.superseded_seq IS NULL AND rv.deleted = 0)"
                ),
                [],
                |r| r.get::<_, i64>(0),
            )?;
        }
        let k_indexes = c.query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'index' AND name LIKE 'idx\\_%\\_k' ESCAPE '\\'",
            [],
            |r| r.get(0),
        )?;
        Ok((misplaced, k_indexes))
    })
    .unwrap()
}

/// How many index tables have a `k` column (versions 1 to 4 had one in each).
fn k_columns(s: &SqliteStore) -> i64 {
    s.with_reader(|c| {
        let mut n = 0;
        for t in INDEX_TABLES {
            n += c.query_row(
                &format!("SELECT count(*) FROM pragma_table_info('{t}') WHERE name = 'k'"),
                [],
                |r| r.get::<_, i64>(0),
            )?;
        }
        Ok(n)
    })
    .unwrap()
}

/// Versions 1 to 4 had a `k` column in every index table (the key of the row's version, which
/// its `type_no` and rowid give since version 3): added back, the value indexes dropped first.
fn k_columns_added() -> String {
    let mut sql = String::new();
    for t in INDEX_TABLES {
        sql.push_str(&format!(
            "ALTER TABLE {t} ADD COLUMN k INTEGER NOT NULL DEFAULT 0;
             UPDATE {t} SET k = (type_no << 40) | (rowid >> 20);"
        ));
    }
    sql
}

/// Versions 1 to 3 stored a token's system as text: `idx_token.system` (its value index
/// dropped first), no `systems` table.
const TOKEN_SYSTEMS_AS_TEXT: &str = "
    ALTER TABLE idx_token ADD COLUMN system TEXT;
    UPDATE idx_token SET system = (SELECT name FROM systems s WHERE s.system_no = idx_token.system_no);
    ALTER TABLE idx_token DROP COLUMN system_no;
    DROP TABLE systems;";

/// Token rows by (system, code), systems by their text.
fn tokens_by_system(s: &SqliteStore) -> Vec<(Option<String>, String, i64)> {
    s.with_reader(|c| {
        let mut st = c.prepare(
            "SELECT s.name, t.code, count(*) FROM idx_token t
             LEFT JOIN systems s ON s.system_no = t.system_no GROUP BY 1, 2 ORDER BY 1, 2",
        )?;
        let rows = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    })
    .unwrap()
}

const INDEX_TABLES: [&str; 9] = [
    "idx_token",
    "idx_token_text",
    "idx_string",
    "idx_date",
    "idx_number",
    "idx_quantity",
    "idx_reference",
    "idx_reference_identifier",
    "idx_uri",
];

/// A database of schema version 2 (plain rowids, an index on `(k)` per index table, token systems
/// as text) is migrated at open to the current version: the same rows, each version's rows in
/// its rowid range, no `(k)` indexes, the token systems numbered, the value indexes built;
/// superseding a version then deletes exactly its rows.
#[test]
fn a_schema_version_2_database_is_migrated_to_version_rowids_and_system_numbers() {
    let (dir, s) = open_indexed();
    for (id, g, b) in [
        ("a", "male", "2000"),
        ("b", "female", "2001"),
        ("c", "male", "2002"),
    ] {
        put(
            &s,
            "Patient",
            id,
            json!({"resourceType": "Patient", "gender": g, "birthDate": b}),
        );
    }
    let before = rows_by_code(&s);
    let tokens = tokens_by_system(&s);
    assert_eq!(tokens.len(), 2, "{tokens:?}");
    assert_eq!(misplaced_rows_and_k_indexes(&s), (0, 0));
    drop(s);
    // Version 2's shape: rowids numbered from 1, a `(k)` index per table, token systems as text.
    let conn = rusqlite::Connection::open(dir.path().join(store::sqlite::DB_FILE_NAME)).unwrap();
    let mut downgrade = String::from("BEGIN;");
    for name in value_index_names() {
        downgrade.push_str(&format!("DROP INDEX {name};"));
    }
    downgrade.push_str(&k_columns_added());
    for t in INDEX_TABLES {
        downgrade.push_str(&format!(
            "CREATE TEMP TABLE old AS SELECT * FROM {t} ORDER BY rowid;
             DELETE FROM {t};
             INSERT INTO {t} SELECT * FROM old;
             DROP TABLE old;
             CREATE INDEX {t}_k ON {t}(k);"
        ));
    }
    downgrade.push_str(TOKEN_SYSTEMS_AS_TEXT);
    downgrade.push_str("UPDATE store_meta SET value = '2' WHERE key = 'schema_version'; COMMIT;");
    conn.execute_batch(&downgrade).unwrap();
    drop(conn);

    let s = reopen_migrated(dir.path(), &before, &tokens);
    assert_eq!(misplaced_rows_and_k_indexes(&s), (0, 0));
    // A migrated version's rows go when it is superseded; the new version's rows come.
    put(
        &s,
        "Patient",
        "a",
        json!({"resourceType": "Patient", "gender": "female"}),
    );
    assert_eq!(gender_lookup(&s, "male"), (1, true));
    assert_eq!(gender_lookup(&s, "female"), (2, true));
    assert_eq!(misplaced_rows_and_k_indexes(&s), (0, 0));
}

/// A database of schema version 4 (every index row carrying its version's key `k`, which its
/// `type_no` and rowid already give) is migrated at open to version 5: the same rows without
/// the `k` column, the value indexes built without it; lookups, and superseding a migrated
/// version, work as before.
#[test]
fn a_schema_version_4_database_is_migrated_to_index_rows_without_k() {
    let (dir, s) = open_indexed();
    for (id, g, b) in [
        ("a", "male", "2000"),
        ("b", "female", "2001"),
        ("c", "male", "2002"),
    ] {
        put(
            &s,
            "Patient",
            id,
            json!({"resourceType": "Patient", "gender": g, "birthDate": b}),
        );
    }
    let before = rows_by_code(&s);
    let tokens = tokens_by_system(&s);
    drop(s);
    let conn = rusqlite::Connection::open(dir.path().join(store::sqlite::DB_FILE_NAME)).unwrap();
    let mut downgrade = String::from("BEGIN;");
    for name in value_index_names() {
        downgrade.push_str(&format!("DROP INDEX {name};"));
    }
    downgrade.push_str(&k_columns_added());
    downgrade.push_str("UPDATE store_meta SET value = '4' WHERE key = 'schema_version'; COMMIT;");
    conn.execute_batch(&downgrade).unwrap();
    drop(conn);

    let s = reopen_migrated(dir.path(), &before, &tokens);
    assert_eq!(k_columns(&s), 0);
    assert_eq!(misplaced_rows_and_k_indexes(&s), (0, 0));
    put(
        &s,
        "Patient",
        "a",
        json!({"resourceType": "Patient", "gender": "female"}),
    );
    assert_eq!(gender_lookup(&s, "male"), (1, true));
    assert_eq!(gender_lookup(&s, "female"), (2, true));
    assert_eq!(misplaced_rows_and_k_indexes(&s), (0, 0));
}

/// The names of the 10 value indexes, in [`value_indexes`]' order.
fn value_index_names() -> Vec<String> {
    let mut names: Vec<String> = [
        "idx_token_value",
        "idx_token_text_value",
        "idx_string_value",
        "idx_date_value",
        "idx_number_value",
        "idx_quantity_value",
        "idx_reference_value",
        "idx_reference_url",
        "idx_reference_identifier_value",
        "idx_uri_value",
    ]
    .iter()
    .map(|n| n.to_string())
    .collect();
    names.sort();
    names
}

/// Index rows go in by multi-row inserts of 64: a write of more resources than that, which
/// then rewrites and deletes resources whose rows were already inserted (and one whose rows are
/// still queued), keeps exactly the current versions' rows.
#[test]
fn a_large_write_that_rewrites_its_own_resources_keeps_only_current_rows() {
    let (_dir, s) = open_indexed();
    let update = |id: String, g: &str| WriteOp::Update {
        resource_type: "Patient".into(),
        id,
        resource: json!({"resourceType": "Patient", "gender": g, "birthDate": "2000"}),
        if_match: None,
    };
    let mut ops: Vec<WriteOp> = (0..150).map(|i| update(format!("p{i}"), "male")).collect();
    ops.push(update("p0".into(), "female"));
    ops.push(update("p149".into(), "female"));
    ops.push(WriteOp::Delete {
        resource_type: "Patient".into(),
        id: "p1".into(),
        if_match: None,
    });
    s.write(ops).unwrap();
    assert_eq!(gender_lookup(&s, "male").0, 147);
    assert_eq!(gender_lookup(&s, "female").0, 2);
    let dates: i64 = s
        .with_reader(|c| Ok(c.query_row("SELECT count(*) FROM idx_date", [], |r| r.get(0))?))
        .unwrap();
    assert_eq!(dates, 149);
    assert_eq!(s.reindex(None, &mut |_, _| {}).unwrap(), 149);
    assert_eq!(gender_lookup(&s, "male").0, 147);
    assert_eq!(gender_lookup(&s, "female").0, 2);
}

/// WAL frames are copied into the database file by the store's checkpointing thread, not by the
/// writer after its commit: once a commit leaves more than 16 MiB in the WAL, the database file
/// grows to hold them while nothing else is written.
#[test]
fn a_large_commit_is_checkpointed_by_the_background_thread() {
    let dir = tempfile::tempdir().unwrap();
    let s = SqliteStore::open_data_dir(dir.path(), SqliteOptions::default()).unwrap();
    let db = dir.path().join(store::sqlite::DB_FILE_NAME);
    let pad = "x".repeat(4000);
    let ops = (0..6000)
        .map(|i| WriteOp::Create {
            resource: json!({"resourceType": "Patient", "id": format!("p{i}"), "text": {"div": pad}}),
        })
        .collect();
    s.write(ops).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let size = std::fs::metadata(&db).unwrap().len();
        if size > 20 << 20 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the database file stayed at {size} bytes"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(s.watermark().unwrap().seq, 6000);
}
