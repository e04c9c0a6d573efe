//! `fhirhose reindex` (`search::reindex`): resources stored without index rows become searchable,
//! with the same results as when indexed at write time, and the value indexes are rebuilt.

mod support;

use std::sync::Arc;

use search::SearchIndexer;
use store::{SqliteOptions, SqliteStore};

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
