//! `fhirhose reindex` (`search::reindex`): resources stored without index rows become searchable,
//! with the same results as when indexed at write time, and the value indexes are rebuilt; on
//! both backends (`FHIRHOSE_TEST_DATABASE`), searches during a full reindex see a whole index,
//! writes meanwhile are kept, and a reindex killed half-way leaves the old index.

mod support;

use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use search::SearchIndexer;
use serde_json::{Value, json};
use store::testing::{Backend, TestStore};
use store::{PgOptions, PgStore, SqliteOptions, SqliteStore, Store, WriteOp};

const QUERIES: [(&str, &str); 6] = [
    ("Observation", "code=http://loinc.org|8302-2"),
    ("Observation", "date=ge2015-01-01&date=lt2016-01-01"),
    ("Patient", "gender=female"),
    ("Patient", "name=a"),
    ("Encounter", "class=AMB"),
    ("Condition", "subject:missing=false"),
];

fn value_indexes(store: &SqliteStore) -> usize {
    store
        .with_reader(|c| {
            Ok(c.query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'index' AND name LIKE 'idx_%'
                 AND name NOT LIKE '%\\_k' ESCAPE '\\'",
                [],
                |r| r.get::<_, i64>(0),
            )?)
        })
        .unwrap() as usize
}

#[test]
fn reindex_makes_unindexed_data_searchable_as_if_indexed_at_write_time() {
    let resources: Vec<_> = support::synthea::load().into_iter().take(6000).collect();
    let (_d1, indexed, _) = support::load_sqlite_store(&resources);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    {
        let plain = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
        support::create_all(&plain, &resources);
    }
    let store = SqliteStore::open(
        &path,
        SqliteOptions {
            indexer: Some(Arc::new(SearchIndexer)),
            ..Default::default()
        },
    )
    .unwrap();
    let (ty, q) = QUERIES[0];
    assert!(support::search_ids(&store, ty, q).unwrap().is_empty());

    let mut types = Vec::new();
    let n = search::reindex(&store, &mut |t, _| types.push(t.to_string())).unwrap();
    assert_eq!(n as usize, resources.len());
    assert!(types.contains(&"Observation".to_string()));
    assert_eq!(value_indexes(&store), value_indexes(&indexed));
    assert_eq!(value_indexes(&store), 10);
    // Ids differ (each store assigned its own on create): compare the number of matches.
    for (ty, q) in QUERIES {
        let a = support::search_ids(&indexed, ty, q).unwrap();
        let b = support::search_ids(&store, ty, q).unwrap();
        assert_eq!(a.len(), b.len(), "{ty}?{q}");
        assert!(!a.is_empty(), "{ty}?{q} matches something");
    }
    // A second reindex changes nothing.
    let before: i64 = store
        .with_reader(|c| Ok(c.query_row("SELECT count(*) FROM idx_token", [], |r| r.get(0))?))
        .unwrap();
    search::reindex(&store, &mut |_, _| {}).unwrap();
    let after: i64 = store
        .with_reader(|c| Ok(c.query_row("SELECT count(*) FROM idx_token", [], |r| r.get(0))?))
        .unwrap();
    assert_eq!(before, after);
}

/// Searches whose answers the writes of these tests leave alone (Observation, Encounter,
/// Condition), with the number of matches before, during and after a reindex.
const STEADY: [(&str, &str); 4] = [
    ("Observation", "code=http://loinc.org|8302-2"),
    ("Observation", "date=ge2015-01-01&date=lt2016-01-01"),
    ("Encounter", "class=AMB"),
    ("Condition", "subject:missing=false"),
];

/// The number of matches of `ty?query` (`_summary=count`).
fn count(store: &dyn Store, ty: &str, query: &str) -> u64 {
    let mut pairs = search::parse_query_string(query);
    pairs.push(("_summary".into(), "count".into()));
    let q = search::parse_query(ty, &pairs, search::ParseOptions::default()).expect("query");
    search::execute(store, &q)
        .expect("search")
        .total
        .expect("a total")
}

fn counts(store: &dyn Store) -> Vec<u64> {
    STEADY.iter().map(|(ty, q)| count(store, ty, q)).collect()
}

/// `resource` with a `meta.tag` of `urn:test|code` (its other `meta` left to the store).
fn tagged(resource: &Value, code: &str) -> Value {
    let mut r = resource.clone();
    r["meta"] = json!({"tag": [{"system": "urn:test", "code": code}]});
    r
}

fn update(resource: Value) -> WriteOp {
    WriteOp::Update {
        resource_type: resource["resourceType"].as_str().unwrap().to_string(),
        id: resource["id"].as_str().unwrap().to_string(),
        resource,
        if_match: None,
    }
}

/// Resources of the Synthea set of several types, and the ones the tests write to: the first
/// type in name order (rebuilt first) and Patient (rebuilt later), two of each (one to update,
/// one to delete), tagged `old` and `doomed` before the reindex.
struct Data {
    store: TestStore,
    first: String,
    targets: Vec<Value>,
}

/// Resources the tests of a live reindex load.
const LIVE: usize = 3000;

fn data() -> Data {
    let resources: Vec<_> = support::synthea::load().into_iter().take(LIVE).collect();
    let (store, stored) = support::load_store(&resources);
    let first = stored
        .iter()
        .filter_map(|r| r["resourceType"].as_str())
        .min()
        .unwrap()
        .to_string();
    assert!(
        first != "Patient" && STEADY.iter().all(|(ty, _)| *ty != first),
        "the writes must leave the steady searches alone: {first}"
    );
    let mut targets = Vec::new();
    for ty in [first.as_str(), "Patient"] {
        let of_type: Vec<&Value> = stored.iter().filter(|r| r["resourceType"] == ty).collect();
        assert!(of_type.len() >= 2, "two {ty}");
        targets.push(tagged(of_type[0], "old"));
        targets.push(tagged(of_type[1], "doomed"));
    }
    store
        .write(targets.iter().cloned().map(update).collect())
        .unwrap();
    Data {
        store,
        first,
        targets,
    }
}

/// The tags the writes during the reindex leave, by type: `old` → `updated` (the first of each
/// pair rewritten), `doomed` → deleted, and one `created` resource of each type and of a type
/// new to the store (Basic).
fn write_during_reindex(store: &dyn Store, targets: &[Value]) {
    let mut ops = Vec::new();
    for pair in targets.chunks(2) {
        ops.push(update(tagged(&pair[0], "updated")));
        ops.push(WriteOp::Delete {
            resource_type: pair[1]["resourceType"].as_str().unwrap().to_string(),
            id: pair[1]["id"].as_str().unwrap().to_string(),
            if_match: None,
        });
        let mut created = tagged(&pair[0], "created");
        created.as_object_mut().unwrap().remove("id");
        ops.push(WriteOp::Create { resource: created });
    }
    // A resource of a type the store had not seen.
    ops.push(WriteOp::Create {
        resource: tagged(
            &json!({"resourceType": "Basic", "code": {"text": "new type"}}),
            "created",
        ),
    });
    store.write(ops).unwrap();
}

/// What [`write_during_reindex`] left is what searches find.
fn assert_writes_searchable(store: &dyn Store, types: &[&str]) {
    assert_eq!(count(store, "Basic", "_tag=urn:test|created"), 1, "Basic");
    for ty in types {
        for (tag, n) in [("old", 0), ("doomed", 0), ("updated", 1), ("created", 1)] {
            assert_eq!(
                count(store, ty, &format!("_tag=urn:test|{tag}")),
                n,
                "{ty}?_tag={tag} after the reindex"
            );
        }
    }
}

/// A full reindex on one connection (a node running `fhirhose reindex`) while another store on
/// the same database (another node, or on SQLite another connection) searches without pause:
/// every search gives the whole answer — before the fix the index tables were emptied first
/// and the types not yet rebuilt searched as empty. Writes of the other store during the
/// reindex (an update and a delete of a resource of a type already rebuilt and of one not yet,
/// and a creation of each) are searchable afterwards, exactly.
#[test]
fn searches_during_a_full_reindex_see_a_whole_index_and_writes_meanwhile_are_kept() {
    let Data {
        store,
        first,
        targets,
    } = data();
    let expected = counts(&*store.store);
    assert!(expected.iter().all(|n| *n > 0), "{expected:?}");
    let other = store.reopen(Some(Arc::new(SearchIndexer)));
    let rounds = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let wrong = Mutex::new(Vec::new());
    let (write_tx, write_rx) = mpsc::channel::<()>();
    let (written_tx, written_rx) = mpsc::channel::<()>();
    let waits_for_write = store.backend == Backend::Postgres;
    let mut seen = Vec::new();
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while !stop.load(Ordering::SeqCst) {
                let got = counts(&*other);
                if got != expected {
                    wrong.lock().unwrap().push(got);
                }
                rounds.fetch_add(1, Ordering::SeqCst);
            }
        });
        let (writer_store, targets) = (&other, &targets);
        let writer = scope.spawn(move || {
            if write_rx.recv().is_ok() {
                write_during_reindex(&**writer_store, targets);
                let _ = written_tx.send(());
            }
        });
        let total = search::reindex(&*store.store, &mut |ty, n| {
            seen.push((ty.to_string(), n));
            // At least one whole round of searches while the index is as this type left it.
            let at = rounds.load(Ordering::SeqCst);
            while rounds.load(Ordering::SeqCst) < at + 2 {
                std::thread::sleep(Duration::from_millis(1));
            }
            if ty == first {
                write_tx.send(()).unwrap();
                // PostgreSQL: the write lands while the reindex goes on. SQLite has one
                // writer: the write waits for the reindex's commit.
                if waits_for_write {
                    written_rx.recv().unwrap();
                }
            }
        });
        stop.store(true, Ordering::SeqCst);
        drop(write_tx);
        writer.join().unwrap();
        // All, or on PostgreSQL, where the writes come in meanwhile, all less the two
        // Patients written before their type was read, plus the five versions caught up.
        let total = total.unwrap() as usize;
        assert!((LIVE..=LIVE + 3).contains(&total), "{total}");
    });
    assert!(seen.len() > 5, "{seen:?}");
    assert_eq!(wrong.into_inner().unwrap(), Vec::<Vec<u64>>::new());
    assert!(rounds.load(Ordering::SeqCst) > seen.len() as u64);
    assert_eq!(counts(&*store.store), expected);
    assert_eq!(counts(&*other), expected);
    assert_writes_searchable(&*store.store, &[&first, "Patient"]);
    assert_writes_searchable(&*other, &[&first, "Patient"]);
    assert!(!store.indexes_stale().unwrap());
}

/// The environment of [`killed_reindex_child`]: where the store is (`sqlite:PATH` or a
/// PostgreSQL URL).
const CHILD_ENV: &str = "FHIRHOSE_REINDEX_CHILD";

/// Not a test of its own: the process [`a_reindex_killed_half_way_leaves_the_old_index_and_the_next_one_works`]
/// starts and kills. Runs a full reindex and, once the first type is rebuilt, says so on stdout
/// and waits to be killed.
#[test]
#[ignore = "a child process of a_reindex_killed_half_way_leaves_the_old_index_and_the_next_one_works"]
fn killed_reindex_child() {
    let Ok(location) = std::env::var(CHILD_ENV) else {
        return;
    };
    let indexer = Some(Arc::new(SearchIndexer) as Arc<dyn store::Indexer>);
    let store: Box<dyn Store> = match location.strip_prefix("sqlite:") {
        Some(path) => Box::new(
            SqliteStore::open(
                std::path::Path::new(path),
                SqliteOptions {
                    indexer,
                    ..Default::default()
                },
            )
            .unwrap(),
        ),
        None => Box::new(
            PgStore::connect(
                &location,
                PgOptions {
                    indexer,
                    ..Default::default()
                },
            )
            .unwrap(),
        ),
    };
    let _ = search::reindex(&*store, &mut |_, _| {
        let mut out = std::io::stdout();
        out.write_all(b"HALF-WAY\n").unwrap();
        out.flush().unwrap();
        std::thread::sleep(Duration::from_secs(120));
    });
    panic!("killed_reindex_child was not killed");
}

/// A `fhirhose reindex` process killed with SIGKILL half-way (the first type rebuilt; on
/// PostgreSQL its connection drops with it) leaves the old index whole and searchable — before
/// the fix it had emptied every index table first — and what it left (PostgreSQL: its
/// `_rebuild` tables) keeps neither the next open (migrations) nor the next reindex from
/// working; the value and `k` indexes keep their names.
#[test]
fn a_reindex_killed_half_way_leaves_the_old_index_and_the_next_one_works() {
    let Data {
        store,
        first,
        targets,
    } = data();
    let expected = counts(&*store.store);
    let location = match store.backend {
        Backend::Sqlite => format!("sqlite:{}", store.location),
        Backend::Postgres => store.location.clone(),
    };
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "killed_reindex_child",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env(CHILD_ENV, &location)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let half_way = lines.any(|l| l.is_ok_and(|l| l == "HALF-WAY"));
    assert!(half_way, "the child reindex reached its first type");
    // Half-way: searches see the whole old index.
    assert_eq!(counts(&*store.store), expected);
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(counts(&*store.store), expected);

    // The next open (migrations, missing indexes) and a writer, then the next reindex.
    let reopened = store.reopen(Some(Arc::new(SearchIndexer)));
    assert_eq!(counts(&*reopened), expected);
    write_during_reindex(&*reopened, &targets);
    search::reindex(&*reopened, &mut |_, _| {}).unwrap();
    assert_eq!(counts(&*reopened), expected);
    assert_writes_searchable(&*reopened, &[&first, "Patient"]);
    assert_writes_searchable(&*store.store, &[&first, "Patient"]);
    if let Backend::Postgres = store.backend {
        // No `_rebuild` table left, and the 19 indexes of the index tables under their names.
        store::testing::admin_batch(
            &store.location,
            r"DO $$
              DECLARE left_tables text; indexes text; n int;
              BEGIN
                SELECT string_agg(tablename, ', ') INTO left_tables FROM pg_tables
                  WHERE tablename LIKE '%rebuild%';
                IF left_tables IS NOT NULL THEN
                  RAISE EXCEPTION 'tables left: %', left_tables;
                END IF;
                SELECT count(*), string_agg(indexname, ', ') INTO n, indexes FROM pg_indexes
                  WHERE tablename LIKE 'idx\_%';
                IF n <> 19 OR indexes LIKE '%rebuild%' THEN
                  RAISE EXCEPTION 'indexes: %', indexes;
                END IF;
              END $$",
        )
        .expect("no leftovers, canonical index names");
    }
}

/// PostgreSQL: the swap waits for a session that holds a live index table (a long search, here
/// a lock held on `idx_token`), giving way every 200 ms (`lock_timeout`) and trying again, and
/// completes once that session lets go; nothing is lost meanwhile.
#[test]
fn the_swap_waits_for_a_session_holding_a_live_table_and_then_completes() {
    if store::testing::test_database_url().is_none() {
        return;
    }
    let Data {
        store,
        first,
        targets,
    } = data();
    let expected = counts(&*store.store);
    let other = store.reopen(Some(Arc::new(SearchIndexer)));
    std::thread::scope(|scope| {
        let mut released = None;
        let total = search::reindex(&*store.store, &mut |ty, _| {
            if ty != first {
                return;
            }
            // A write meanwhile, then a session holding `idx_token` until the swap waits.
            write_during_reindex(&*other, &targets);
            let lock = store::testing::lock_tables(&store.location, &["idx_token"]).unwrap();
            let url = store.location.clone();
            released = Some(scope.spawn(move || {
                store::testing::admin_batch(
                    &url,
                    "DO $$ BEGIN
                       LOOP
                         EXIT WHEN EXISTS (SELECT 1 FROM pg_locks
                           WHERE NOT granted AND relation = 'idx_token'::regclass);
                         PERFORM pg_sleep(0.01);
                       END LOOP;
                     END $$",
                )
                .unwrap();
                // Long enough for the swap to time out and try again a few times.
                std::thread::sleep(Duration::from_millis(700));
                drop(lock);
            }));
        });
        released.expect("the first type").join().unwrap();
        total.unwrap();
    });
    assert_eq!(counts(&*store.store), expected);
    assert_eq!(counts(&*other), expected);
    assert_writes_searchable(&*other, &[&first, "Patient"]);
}
