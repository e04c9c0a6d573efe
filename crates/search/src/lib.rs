//! FHIR search for Fhirhose.
//!
//! - [`query`]: parsing and validation of search requests into a typed [`SearchQuery`].
//! - [`values`]: dates as millisecond ranges, decimals with precision, string normalization.
//! - [`registry`] and [`extract`]: each type's indexable parameters with their FHIRPath
//!   expressions compiled once (by `evaluate`, a walker over the R4 model for the FHIRPath subset
//!   that SearchParameter expressions use; the `evaluator_agrees_with_fhirpath` test holds it to
//!   the fhirpath crate), and conversion of the selected values into index values. Parameters
//!   that restrict or unite others (`patient`, `combo-code`) are aliases with no rows of their own.
//! - [`indexer`]: the store's indexing hook ([`SearchIndexer`]).
//! - [`matching`]: what each search value means against index values (in memory).
//! - [`exec`]: a query compiled into the store's backend-neutral search plan (the store owns the
//!   SQL); [`execute`] runs a search page, [`search_bundle`] does parse + execute + Bundle for
//!   the server.
//! - [`predicate`]: compiled predicates for bulk export `_typeFilter` ([`Predicate`],
//!   [`PredicateSet`]).
//! - [`bundle`], [`elements`], [`subset`]: the searchset Bundle, and `_elements` and
//!   `_summary` (parameters, and the subset of a resource cut from its stored bytes).
//! - [`reindex`](reindex()): rebuild the index of existing data.
//!
//! Architecture invariant: the same extraction code feeds the index tables and the in-memory
//! predicates, so a database search and an export `_typeFilter` select the same resources.

pub mod bundle;
pub mod elements;
pub mod error;
mod evaluate;
pub mod exec;
pub mod extract;
pub mod indexer;
pub mod matching;
pub mod predicate;
pub mod query;
pub mod registry;
mod reindex;
pub mod subset;
pub mod values;

pub use bundle::{
    BundleBytes, PageRows, ResourceHead, SearchPage, into_searchset_bundle, searchset_bundle,
    write_searchset,
};
pub use error::SearchError;
pub use exec::{
    CancelOnDrop, ExecOptions, SearchControl, compile, execute, execute_rows, execute_with,
    search_bundle,
};
pub use indexer::SearchIndexer;
pub use predicate::{Predicate, PredicateSet};
pub use query::{
    Filter, Ignored, Include, ParseOptions, Prefix, SearchLimits, SearchQuery, SortKey,
    StringMatch, TotalMode, Value, parse_query, parse_query_string,
};
pub use reindex::reindex;
pub use subset::{Subset, Summary};
