//! Shared helpers of the ingest integration tests.
#![allow(dead_code)] // each test binary uses a different subset

use std::collections::{BTreeMap, HashSet};
use std::ops::ControlFlow;
use std::path::PathBuf;

use serde_json::Value;
use store::{SeqBounds, Store};

pub fn testdata(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata")
        .join(name)
}

/// A fresh store without search indexing, on the backend `FHIRHOSE_TEST_DATABASE` selects
/// (SQLite without it), and the guard of its database (keep it alive).
pub fn temp_store() -> (store::testing::TestStore, std::sync::Arc<dyn Store>) {
    let db = store::testing::test_store(None);
    let store = db.store.clone();
    (db, store)
}

/// Current resources per type, and the references that do not resolve (to a stored resource,
/// or for `#x` to a contained resource of the same resource).
pub fn check_references(store: &dyn Store) -> (BTreeMap<String, u64>, Vec<String>) {
    let as_of = store.current_seq().unwrap();
    let mut present = HashSet::new();
    let mut counts = BTreeMap::new();
    let mut resources = Vec::new();
    for ty in store.types_present(as_of).unwrap() {
        let n = store
            .scan_type_each(&ty, as_of, SeqBounds::ALL, &mut |row| {
                present.insert(format!("{ty}/{}", row.id));
                resources.push(serde_json::from_slice::<Value>(row.json).unwrap());
                ControlFlow::Continue(())
            })
            .unwrap();
        assert_eq!(n, store.count_type(&ty, as_of).unwrap());
        counts.insert(ty, n);
    }
    let mut broken = Vec::new();
    for r in &resources {
        let contained: HashSet<String> = r
            .get("contained")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|c| c.get("id").and_then(Value::as_str))
                    .map(|id| format!("#{id}"))
                    .collect()
            })
            .unwrap_or_default();
        let mut refs = Vec::new();
        collect_refs(r, &mut refs);
        for reference in refs {
            let ok = if reference.starts_with('#') {
                contained.contains(&reference)
            } else {
                present.contains(&reference)
            };
            if !ok {
                broken.push(format!("{}/{} -> {reference}", r["resourceType"], r["id"]));
            }
        }
    }
    (counts, broken)
}

fn collect_refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, c) in m {
                match (k.as_str(), c) {
                    ("reference", Value::String(s)) => out.push(s.clone()),
                    _ => collect_refs(c, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|c| collect_refs(c, out)),
        _ => {}
    }
}
