//! `fhirhose reindex`: rebuild the search index of the data already stored.

use store::Store;

use crate::error::SearchError;

/// Rebuilds the index rows of every stored resource type, one type per transaction, with the
/// store's indexer (open the store with [`crate::SearchIndexer`] installed): every row is removed
/// once, then each type's rows are written again ([`Store::reindex`]). Every row is rewritten, so
/// the store's value indexes are suspended meanwhile and built once at the end
/// ([`Store::suspend_index_upkeep`]; hold the data directory exclusively). `progress` is called
/// after each type with (type, resources indexed). Returns the total number of resources.
pub fn reindex(store: &dyn Store, progress: &mut dyn FnMut(&str, u64)) -> Result<u64, SearchError> {
    store::with_index_upkeep_suspended(store, true, |_| {
        store.reindex(None, progress).map_err(SearchError::from)
    })
    .map(|(total, _)| total)
}
