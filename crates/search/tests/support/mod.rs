#![allow(dead_code)]
pub mod oracle;
pub mod synthea;

use std::sync::Arc;

use search::SearchIndexer;
use serde_json::Value;
use store::testing::TestStore;
use store::{SqliteOptions, SqliteStore, Store, WriteOp};

/// A fresh store with the search indexer on the backend `FHIRHOSE_TEST_DATABASE` selects
/// (SQLite in a temporary directory when unset, else a new PostgreSQL database), holding
/// `resources` (written in batches, as the loader does). Returns the stored resources (meta set).
pub fn load_store(resources: &[Value]) -> (TestStore, Vec<Value>) {
    let store = store::testing::test_store(Some(Arc::new(SearchIndexer)));
    let stored = create_all(&*store, resources);
    (store, stored)
}

/// [`load_store`] on SQLite whatever the environment says (tests of SQLite's own tables).
pub fn load_sqlite_store(resources: &[Value]) -> (tempfile::TempDir, SqliteStore, Vec<Value>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open(
        &dir.path().join("t.db"),
        SqliteOptions {
            indexer: Some(Arc::new(SearchIndexer)),
            ..Default::default()
        },
    )
    .expect("open store");
    let stored = create_all(&store, resources);
    (dir, store, stored)
}

/// Create `resources` in `store`, 1,000 per transaction; returns them as stored (meta set).
pub fn create_all(store: &dyn Store, resources: &[Value]) -> Vec<Value> {
    let mut stored = Vec::with_capacity(resources.len());
    for chunk in resources.chunks(1000) {
        let ops = chunk
            .iter()
            .map(|r| WriteOp::Create {
                resource: r.clone(),
            })
            .collect();
        for o in store.write(ops).expect("write") {
            stored.push(serde_json::from_slice(&o.json.expect("json")).expect("stored json"));
        }
    }
    stored
}

/// All ids a search returns, following the next-page cursors.
pub fn search_ids(
    store: &dyn Store,
    ty: &str,
    query: &str,
) -> Result<Vec<String>, search::SearchError> {
    let mut pairs = search::parse_query_string(query);
    let mut out = Vec::new();
    loop {
        let q = search::parse_query(ty, &pairs, search::ParseOptions::default())?;
        let page = search::execute(store, &q)?;
        out.extend(
            page.matches
                .iter()
                .map(|r| r["id"].as_str().unwrap_or_default().to_string()),
        );
        match page.next_cursor {
            Some(c) => {
                pairs.retain(|(k, _)| k != "_cursor");
                pairs.push(("_cursor".into(), c));
            }
            None => return Ok(out),
        }
    }
}

/// Evaluates a (resolve-free) search expression branch with the FHIRPath engine (the fhirpath
/// crate), independent of the search crate's own expression evaluator. Compiled expressions are
/// cached per thread.
pub fn fhirpath_eval(expr: &str, r: &Value) -> Vec<Value> {
    thread_local! {
        static CACHE: std::cell::RefCell<std::collections::HashMap<String, fhirpath::Expression>> =
            Default::default();
    }
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        let e = c.entry(expr.to_string()).or_insert_with(|| {
            fhirpath::Expression::compile(expr).unwrap_or_else(|e| panic!("FHIRPath '{expr}': {e}"))
        });
        e.evaluate(&fhirpath::EvalContext::new(r))
            .unwrap_or_else(|err| panic!("FHIRPath '{expr}': {err}"))
            .iter()
            .map(|i| i.as_json())
            .collect()
    })
}
