#![allow(dead_code)]
pub mod oracle;
pub mod synthea;

use std::sync::Arc;

use search::SearchIndexer;
use serde_json::Value;
use store::{SqliteOptions, SqliteStore, Store, WriteOp};

/// A fresh SQLite store in a temporary directory with the search indexer, holding `resources`
/// (written in batches, as the loader does). Returns the stored resources (meta set).
pub fn load_store(resources: &[Value]) -> (tempfile::TempDir, SqliteStore, Vec<Value>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open(
        &dir.path().join("t.db"),
        SqliteOptions {
            indexer: Some(Arc::new(SearchIndexer)),
            ..Default::default()
        },
    )
    .expect("open store");
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
    (dir, store, stored)
}

/// All ids a search returns, following the next-page cursors.
pub fn search_ids(
    store: &SqliteStore,
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

/// The oracle's own evaluation of a (resolve-free) search expression branch: a schema-less JSON
/// walk where a member name also matches choice keys (`value` → `valueQuantity`), and
/// `ofType(T)` keeps the items whose choice key ends in T. Independent of the crate's
/// model-driven evaluator on purpose.
pub fn fhirpath_eval(expr: &str, r: &Value) -> Vec<Value> {
    let mut e = expr.trim();
    while e.starts_with('(') && e.ends_with(')') {
        e = &e[1..e.len() - 1];
    }
    if let Some((x, _)) = e.split_once(".exists() and ") {
        let items = fhirpath_eval(x, r);
        if items.is_empty() {
            return vec![];
        }
        return vec![Value::Bool(items.iter().any(|v| *v != Value::Bool(false)))];
    }
    // segments split on '.' outside parentheses
    let mut segs = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in e.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            '.' if depth == 0 => {
                segs.push(&e[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    segs.push(&e[start..]);
    let head = segs[0].trim();
    let owned: Vec<Value>;
    let mut items: Vec<(Option<String>, &Value)> = if head.starts_with('(') {
        // a parenthesized head: `(X.value.ofType(CodeableConcept)).text`
        owned = fhirpath_eval(head, r);
        owned.iter().map(|v| (None, v)).collect()
    } else {
        vec![(None, r)]
    };
    for seg in segs.iter().skip(1) {
        let mut next = Vec::new();
        if let Some(t) = seg
            .strip_prefix("ofType(")
            .and_then(|s| s.strip_suffix(')'))
        {
            next = items
                .into_iter()
                .filter(|(ct, _)| ct.as_deref().is_some_and(|c| c.eq_ignore_ascii_case(t)))
                .collect();
        } else if let Some(cond) = seg.strip_prefix("where(").and_then(|s| s.strip_suffix(')')) {
            let (f, lit) = cond.split_once('=').unwrap();
            let lit = lit.trim().trim_matches('\'');
            next = items
                .into_iter()
                .filter(|(_, v)| v.get(f.trim()).and_then(Value::as_str) == Some(lit))
                .collect();
        } else {
            let (name, index) = match seg.split_once('[') {
                Some((n, i)) => (n, Some(i.trim_end_matches(']').parse::<usize>().unwrap())),
                None => (*seg, None),
            };
            for (_, v) in &items {
                let Some(o) = v.as_object() else { continue };
                for (k, child) in o {
                    let choice = if k == name {
                        None
                    } else if k.len() > name.len()
                        && k.starts_with(name)
                        && k[name.len()..].starts_with(|c: char| c.is_ascii_uppercase())
                    {
                        Some(k[name.len()..].to_string())
                    } else {
                        continue;
                    };
                    match child {
                        Value::Array(a) => next.extend(a.iter().map(|c| (choice.clone(), c))),
                        c => next.push((choice, c)),
                    }
                }
            }
            if let Some(i) = index {
                next = next.into_iter().nth(i).into_iter().collect();
            }
        }
        items = next;
    }
    items.into_iter().map(|(_, v)| v.clone()).collect()
}
