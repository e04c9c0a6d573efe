//! SQL on FHIR v2 ViewDefinitions.
//!
//! A ViewDefinition (JSON) is parsed, validated and compiled once into a [`View`]: every
//! `path`, `forEach`, `forEachOrNull`, `repeat` and `where` becomes a compiled
//! [`fhirpath::Expression`] (with `getResourceKey()` and `getReferenceKey([type])` added), constants
//! become typed variables, and the output columns get their positions and declared types. A view
//! then turns each parsed resource into [`Row`]s of typed [`Value`]s, walking the select tree
//! against the resource's nodes without re-parsing anything.
//!
//! ```
//! let view = views::View::from_json_str(r#"{"resource": "Patient", "select": [
//!     {"column": [{"name": "id", "path": "getResourceKey()", "type": "id"}]},
//!     {"forEach": "name", "column": [{"name": "family", "path": "family", "type": "string"}]}]}"#).unwrap();
//! let patient = serde_json::json!({"resourceType": "Patient", "id": "p1",
//!     "name": [{"family": "Chalmers"}, {"family": "Windsor"}]});
//! let rows = view.rows(&patient).unwrap();
//! assert_eq!(rows.len(), 2);
//! assert_eq!(rows[1][1], views::Value::String("Windsor".into()));
//! ```
//!
//! Architecture Invariant: pure — no IO, no async (like `deid`). Writers (CSV/NDJSON here in
//! [`csv`] and [`ndjson`] as text formatting, Parquet in `parquet` (feature `parquet`, default)
//! into a caller-given `Write`) take rows; files and HTTP are the callers' business.

mod error;
mod functions;
mod run;
mod value;
mod view;

pub mod csv;
pub mod ndjson;
#[cfg(feature = "parquet")]
pub mod parquet;

pub use error::{Reason, RowError, RowReason, ViewError};
/// The stop condition of [`fhirpath::with_stop`], for callers of views that do not depend on
/// the evaluator themselves.
pub use fhirpath::with_stop;
pub use functions::{registry as fhirpath_functions, split_reference};
pub use run::{
    EachRowError, MAX_BUFFERED_CELLS, MAX_REPEAT_DEPTH, MAX_RESOURCE_WORK, MAX_ROWS_PER_RESOURCE,
    Row,
};
pub use value::{Value, ValueKind};
pub use view::{Column, View};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn view_is_send_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<View>();
    }
}
