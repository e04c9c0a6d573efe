//! The search-indexing hook. The search crate implements [`Indexer`]; the store writes its entries
//! into the `idx_*` tables (see [`crate::sqlite`]) in the same transaction as the resource version,
//! and removes the entries of the version it supersedes, so the index always describes exactly the
//! current, non-deleted resources.

/// Turns a resource into search index entries. Called with the resource about to be stored, its
/// `id` set but `meta.versionId`/`meta.lastUpdated` not yet stamped (`_lastUpdated` is answered from
/// the version rows, not from index entries) — inside the write transaction, or ahead of it on a
/// loader's worker thread ([`crate::Store::prepare_put`]). It must be fast, deterministic and must
/// not touch the store.
pub trait Indexer: Send + Sync {
    fn entries(&self, resource_type: &str, resource: &serde_json::Value) -> Vec<IndexEntry>;
}

/// One indexed value of one search parameter (`param` is the parameter code, e.g. `code`,
/// `subject`, `_lastUpdated`).
#[derive(Debug, Clone, PartialEq)]
pub struct IndexEntry {
    pub param: String,
    pub value: IndexValue,
}

/// An index value; each variant goes to its own table (named in the variant's doc).
#[derive(Debug, Clone, PartialEq)]
pub enum IndexValue {
    /// `idx_token(system, code)`: a coded value; `system` is `None` when the element has none,
    /// `code` is `None` for a Coding with only a system.
    Token {
        system: Option<String>,
        code: Option<String>,
    },
    /// `idx_token_text(text)`: normalized display / text of a token, for `:text`.
    TokenText(String),
    /// `idx_string(normalized, exact)`: normalized for prefix/contains, and as written for `:exact`.
    String { normalized: String, exact: String },
    /// `idx_date(lo, hi)`: the time range `[lo, hi)` in ms since the epoch.
    Date { lo: i64, hi: i64 },
    /// `idx_number(value)`.
    Number(f64),
    /// `idx_quantity(value, system, code, unit)`.
    Quantity {
        value: f64,
        system: Option<String>,
        code: Option<String>,
        unit: Option<String>,
    },
    /// `idx_reference(target_type, target_id, url NULL)`: a relative reference `Type/id`.
    Reference { target_type: String, id: String },
    /// `idx_reference(target_type NULL, target_id NULL, url)`: an absolute or unresolved reference,
    /// or a canonical.
    ReferenceUrl(String),
    /// `idx_reference_identifier(system, value)`: `Reference.identifier`, for `:identifier`.
    ReferenceIdentifier {
        system: Option<String>,
        value: Option<String>,
    },
    /// `idx_uri(uri)`.
    Uri(String),
}
