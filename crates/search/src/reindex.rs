//! `fhirhose reindex`: rebuild the search index of the data already stored.

use store::Store;

use crate::error::SearchError;

/// Rebuilds the index rows of every stored resource type, one type per transaction, with the
/// store's indexer (open the store with [`crate::SearchIndexer`] installed). Every row is
/// rewritten, so the store's value indexes are suspended meanwhile and built once at the end
/// ([`Store::suspend_index_upkeep`]; hold the data directory exclusively). `progress` is called
/// after each type with (type, resources indexed). Returns the total number of resources.
pub fn reindex(store: &dyn Store, progress: &mut dyn FnMut(&str, u64)) -> Result<u64, SearchError> {
    store::with_index_upkeep_suspended(store, true, |_| reindex_types(store, progress))
        .map(|(total, _)| total)
}

fn reindex_types(
    store: &dyn Store,
    progress: &mut dyn FnMut(&str, u64),
) -> Result<u64, SearchError> {
    let as_of = store.current_seq()?;
    let mut total = 0;
    for t in store.types_present(as_of)? {
        let n = store.reindex(Some(&t))?;
        progress(&t, n);
        total += n;
    }
    Ok(total)
}
