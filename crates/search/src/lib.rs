//! FHIR search for Fhirhose.
//!
//! - [`query`]: parsing and validation of search requests into a typed [`SearchQuery`].
//! - [`values`]: dates as millisecond ranges, decimals with precision, string normalization.

pub mod elements;
pub mod error;
pub mod extract;
pub mod matching;
pub mod query;
pub mod values;

pub use error::SearchError;
pub use query::{
    Filter, Ignored, Include, ParseOptions, Prefix, SearchQuery, SortKey, StringMatch, TotalMode,
    Value, parse_query, parse_query_string,
};
