//! The search index tables both backends create with the same shapes (see the schema of each
//! backend): their names, and the value indexes that searches look values up in. The value
//! indexes stand apart from the schema because a bulk load may drop them and build them again at
//! its end ([`crate::Store::suspend_index_upkeep`]); every open creates the missing ones. On
//! PostgreSQL the `text` columns use the `C` collation (byte order, as SQLite compares), so
//! range and prefix comparisons can use these indexes.
//!
//! Index rows name their search parameter by number (`param_no`, from the `params` table), not
//! by its code: the rows are narrower, and every value index starts with two integers
//! `(type_no, param_no)`, so building one sorts on integer prefixes before the value instead
//! of comparing the code's text in nearly every comparison (issue 24).

use std::collections::HashMap;
use std::sync::RwLock;

/// The value indexes: (name, `CREATE INDEX IF NOT EXISTS` statement), valid on both backends
/// (SQLite's index rows have no `k` column since schema version 5: its statements leave out
/// the trailing `k`, the rowid that ends every index entry gives it).
pub(crate) const VALUE_INDEXES: [(&str, &str); 10] = [
    (
        "idx_token_value",
        "CREATE INDEX IF NOT EXISTS idx_token_value ON idx_token(type_no, param_no, code, system, k)",
    ),
    (
        "idx_token_text_value",
        "CREATE INDEX IF NOT EXISTS idx_token_text_value ON idx_token_text(type_no, param_no, text, k)",
    ),
    (
        "idx_string_value",
        "CREATE INDEX IF NOT EXISTS idx_string_value ON idx_string(type_no, param_no, normalized, k)",
    ),
    (
        "idx_date_value",
        "CREATE INDEX IF NOT EXISTS idx_date_value ON idx_date(type_no, param_no, lo, hi, k)",
    ),
    (
        "idx_number_value",
        "CREATE INDEX IF NOT EXISTS idx_number_value ON idx_number(type_no, param_no, value, k)",
    ),
    (
        "idx_quantity_value",
        "CREATE INDEX IF NOT EXISTS idx_quantity_value ON idx_quantity(type_no, param_no, value, k)",
    ),
    (
        "idx_reference_value",
        "CREATE INDEX IF NOT EXISTS idx_reference_value ON idx_reference(type_no, param_no, target_id, target_type, k)",
    ),
    (
        "idx_reference_url",
        "CREATE INDEX IF NOT EXISTS idx_reference_url ON idx_reference(type_no, param_no, url, k) WHERE url IS NOT NULL",
    ),
    (
        "idx_reference_identifier_value",
        "CREATE INDEX IF NOT EXISTS idx_reference_identifier_value ON idx_reference_identifier(type_no, param_no, value, system, k)",
    ),
    (
        "idx_uri_value",
        "CREATE INDEX IF NOT EXISTS idx_uri_value ON idx_uri(type_no, param_no, uri, k)",
    ),
];

/// Most names a [`ParamNumbers`] cache holds: parameter codes are bounded by the definitions,
/// token systems by the data (a few dozen in practice), and the cache must not grow with it.
pub(crate) const MAX_CACHED_NUMBERS: usize = 65_536;

/// The index tables, for deleting a version's rows and for reindexing.
pub(crate) const INDEX_TABLES: [&str; 9] = [
    "idx_token",
    "idx_token_text",
    "idx_string",
    "idx_date",
    "idx_number",
    "idx_quantity",
    "idx_reference",
    "idx_reference_identifier",
    "idx_uri",
];

/// The numbers of the search parameter codes (`params(param_no, name)`), as far as this process
/// has seen them. A number is assigned the first time a transaction writes an index row of the
/// code, in that transaction (a backend's `param_no_in`), and enters this cache only after the
/// transaction committed; numbers never change and are never reused, so a cached number stays
/// right for the life of the database.
///
/// Why a table of names numbered on first use rather than numbers derived from the model's
/// search parameter definitions: the store does not know the model (the [`crate::Indexer`]
/// decides which codes exist), and a fixed numbering would change meaning whenever the list of
/// definitions changes, silently pointing old rows at another parameter; the table keeps the
/// mapping in the database it describes, like `types`.
///
/// The SQLite store numbers token systems the same way (`systems(system_no, name)`).
#[derive(Default)]
pub(crate) struct ParamNumbers {
    map: RwLock<HashMap<String, i64>>,
}

impl ParamNumbers {
    pub(crate) fn get(&self, code: &str) -> Option<i64> {
        self.map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(code)
            .copied()
    }

    /// Numbers read from the database or assigned by a committed transaction; beyond
    /// [`MAX_CACHED_NUMBERS`] names the cache stops growing (the others are looked up in the
    /// database each time).
    pub(crate) fn extend(&self, numbers: impl IntoIterator<Item = (String, i64)>) {
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        for (name, no) in numbers {
            if map.len() >= MAX_CACHED_NUMBERS {
                break;
            }
            map.insert(name, no);
        }
    }
}
