//! NDJSON text: one JSON object per row, keys in column order, null cells as `null`.

use serde_json::{Map, Value as Json};

use crate::{Column, Row};

/// The row as a JSON object keyed by column name.
pub fn row_object(columns: &[Column], row: &Row) -> Json {
    let mut m = Map::with_capacity(columns.len());
    for (c, v) in columns.iter().zip(row) {
        m.insert(c.name.clone(), v.to_json());
    }
    Json::Object(m)
}

/// Appends the row as one NDJSON line to `out`.
pub fn write_row(columns: &[Column], row: &Row, out: &mut String) {
    out.push_str(&row_object(columns, row).to_string());
    out.push('\n');
}
