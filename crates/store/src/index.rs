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

/// The most bytes of a text kept in a value index. PostgreSQL refuses a B-tree row over 2,704
/// bytes (a third of a page), and a token or identifier row holds two texts: without a bound, a
/// resource with a 3,000-character name was refused with 500 there. Longer texts are indexed by
/// their first 1,024 bytes (cut at a character boundary; `IndexValue::bounded`), and searches
/// cut their values the same way, on every backend: a search compares the first 1,024 bytes of a
/// longer value (`:exact` on a string compares it whole, from a column no index holds).
pub const MAX_INDEXED_TEXT: usize = 1024;

/// `s`, or its longest prefix of at most [`MAX_INDEXED_TEXT`] bytes that ends at a character
/// boundary.
pub fn index_text(s: &str) -> &str {
    if s.len() <= MAX_INDEXED_TEXT {
        return s;
    }
    let mut end = MAX_INDEXED_TEXT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn cut(mut s: String) -> String {
    let n = index_text(&s).len();
    s.truncate(n);
    s
}

impl IndexValue {
    /// The value with every text an index holds cut by [`index_text`] (a string's `exact`
    /// form, which no index holds, and a quantity's texts are kept whole).
    pub(crate) fn bounded(self) -> IndexValue {
        match self {
            IndexValue::Token { system, code } => IndexValue::Token {
                system: system.map(cut),
                code: code.map(cut),
            },
            IndexValue::TokenText(t) => IndexValue::TokenText(cut(t)),
            IndexValue::String { normalized, exact } => IndexValue::String {
                normalized: cut(normalized),
                exact,
            },
            IndexValue::Reference { target_type, id } => IndexValue::Reference {
                target_type: cut(target_type),
                id: cut(id),
            },
            IndexValue::ReferenceUrl(u) => IndexValue::ReferenceUrl(cut(u)),
            IndexValue::ReferenceIdentifier { system, value } => IndexValue::ReferenceIdentifier {
                system: system.map(cut),
                value: value.map(cut),
            },
            IndexValue::Uri(u) => IndexValue::Uri(cut(u)),
            other @ (IndexValue::Date { .. }
            | IndexValue::Number(_)
            | IndexValue::Quantity { .. }) => other,
        }
    }
}

/// What `indexer` gives for `resource`, every text cut by [`IndexValue::bounded`]: the store
/// writes no index row another limit (PostgreSQL's) would refuse, whichever [`Indexer`] it has.
pub(crate) fn bounded_entries(
    indexer: &dyn Indexer,
    resource_type: &str,
    resource: &serde_json::Value,
) -> Vec<IndexEntry> {
    let mut entries = indexer.entries(resource_type, resource);
    for e in &mut entries {
        e.value = std::mem::replace(&mut e.value, IndexValue::Number(0.0)).bounded();
    }
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_texts_are_cut_at_a_character_boundary() {
        assert_eq!(index_text("short"), "short");
        let exact = "a".repeat(MAX_INDEXED_TEXT);
        assert_eq!(index_text(&exact), exact);
        // A two-byte character across the bound is left out whole.
        let s = format!("{}é tail", "a".repeat(MAX_INDEXED_TEXT - 1));
        assert_eq!(index_text(&s), "a".repeat(MAX_INDEXED_TEXT - 1));
        let long = "x".repeat(5000);
        let v = IndexValue::String {
            normalized: long.clone(),
            exact: long.clone(),
        }
        .bounded();
        assert_eq!(
            v,
            IndexValue::String {
                normalized: "x".repeat(MAX_INDEXED_TEXT),
                exact: long.clone()
            }
        );
        let t = IndexValue::Token {
            system: Some(long.clone()),
            code: Some(long),
        }
        .bounded();
        let IndexValue::Token { system, code } = t else {
            unreachable!()
        };
        assert_eq!(system.unwrap().len(), MAX_INDEXED_TEXT);
        assert_eq!(code.unwrap().len(), MAX_INDEXED_TEXT);
    }
}
