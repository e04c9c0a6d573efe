//! The search index tables both backends create with the same shapes (see the schema of each
//! backend): their names, and the value indexes that searches look values up in. The value
//! indexes stand apart from the schema because a bulk load may drop them and build them again at
//! its end ([`crate::Store::suspend_index_upkeep`]); every open creates the missing ones. On
//! PostgreSQL the `text` columns use the `C` collation (byte order, as SQLite compares), so
//! range and prefix comparisons can use these indexes.

/// The value indexes: (name, `CREATE INDEX IF NOT EXISTS` statement), valid on both backends.
pub(crate) const VALUE_INDEXES: [(&str, &str); 10] = [
    (
        "idx_token_value",
        "CREATE INDEX IF NOT EXISTS idx_token_value ON idx_token(type_no, param, code, system, k)",
    ),
    (
        "idx_token_text_value",
        "CREATE INDEX IF NOT EXISTS idx_token_text_value ON idx_token_text(type_no, param, text, k)",
    ),
    (
        "idx_string_value",
        "CREATE INDEX IF NOT EXISTS idx_string_value ON idx_string(type_no, param, normalized, k)",
    ),
    (
        "idx_date_value",
        "CREATE INDEX IF NOT EXISTS idx_date_value ON idx_date(type_no, param, lo, hi, k)",
    ),
    (
        "idx_number_value",
        "CREATE INDEX IF NOT EXISTS idx_number_value ON idx_number(type_no, param, value, k)",
    ),
    (
        "idx_quantity_value",
        "CREATE INDEX IF NOT EXISTS idx_quantity_value ON idx_quantity(type_no, param, value, k)",
    ),
    (
        "idx_reference_value",
        "CREATE INDEX IF NOT EXISTS idx_reference_value ON idx_reference(type_no, param, target_id, target_type, k)",
    ),
    (
        "idx_reference_url",
        "CREATE INDEX IF NOT EXISTS idx_reference_url ON idx_reference(type_no, param, url, k) WHERE url IS NOT NULL",
    ),
    (
        "idx_reference_identifier_value",
        "CREATE INDEX IF NOT EXISTS idx_reference_identifier_value ON idx_reference_identifier(type_no, param, value, system, k)",
    ),
    (
        "idx_uri_value",
        "CREATE INDEX IF NOT EXISTS idx_uri_value ON idx_uri(type_no, param, uri, k)",
    ),
];

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
