//! The store's indexing hook: every search parameter of the resource's type (composite and
//! special ones excepted) evaluated and converted into index entries.

use serde_json::Value as Json;
use store::{IndexEntry, Indexer};

use crate::evaluate::Scratch;
use crate::registry;

/// The [`Indexer`] to install in the store (`SqliteOptions::indexer`).
#[derive(Debug, Default, Clone, Copy)]
pub struct SearchIndexer;

impl Indexer for SearchIndexer {
    fn entries(&self, resource_type: &str, resource: &Json) -> Vec<IndexEntry> {
        let Some(ti) = registry::type_index(resource_type) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut vals = Vec::new();
        let mut scratch = Scratch::default();
        let bound = ti.is_root_of(resource);
        let mut root_vals = Vec::new();
        if bound {
            ti.root_members(resource, &mut root_vals);
        }
        let table = bound.then_some(root_vals.as_slice());
        for p in ti.row_params() {
            vals.clear();
            p.extract_with(resource, bound, table, &mut scratch, &mut vals);
            let start = out.len();
            for v in vals.drain(..) {
                // Repeated values (the same coding twice) add nothing but rows.
                if out[start..].iter().any(|e: &IndexEntry| e.value == v) {
                    continue;
                }
                out.push(IndexEntry {
                    param: p.code.clone(),
                    value: v,
                });
            }
        }
        out
    }
}
