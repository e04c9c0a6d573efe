//! `fhirhose reindex`: rebuild the search index of the data already stored.

use store::Store;

use crate::error::SearchError;

/// Rebuilds the index rows of every stored resource type with the store's indexer (open the
/// store with [`crate::SearchIndexer`] installed), as [`Store::reindex`] of all types does:
/// searches meanwhile see the old, complete index, and the new one once it is complete (the
/// value indexes are built once, sorted, after the rows). `progress` is called after each type
/// with (type, resources indexed). Returns the total number of resources.
pub fn reindex(store: &dyn Store, progress: &mut dyn FnMut(&str, u64)) -> Result<u64, SearchError> {
    store.reindex(None, progress).map_err(SearchError::from)
}
