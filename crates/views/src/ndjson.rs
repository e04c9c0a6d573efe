//! NDJSON text: one JSON object per row, keys in column order, null cells as `null`. Written
//! straight into the output text (no intermediate JSON map per row).

use serde_json::{Map, Value as Json};

use crate::{Column, Row, Value};

/// The row as a JSON object keyed by column name.
pub fn row_object(columns: &[Column], row: &Row) -> Json {
    let mut m = Map::with_capacity(columns.len());
    for (c, v) in columns.iter().zip(row) {
        m.insert(c.name.clone(), v.to_json());
    }
    Json::Object(m)
}

/// Appends the row as one NDJSON line to `out` (the same object as [`row_object`]).
pub fn write_row(columns: &[Column], row: &[Value], out: &mut String) {
    out.push('{');
    for (i, (c, v)) in columns.iter().zip(row).enumerate() {
        if i > 0 {
            out.push(',');
        }
        string(&c.name, out);
        out.push(':');
        value(v, out);
    }
    out.push_str("}\n");
}

fn value(v: &Value, out: &mut String) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Boolean(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Integer(i) => out.push_str(&i.to_string()),
        // The decimal's text is a JSON number already (from the resource or from the engine);
        // anything else falls back to the JSON form.
        Value::Decimal(d) if is_json_number(d) => out.push_str(d),
        Value::String(s) | Value::Date(s) | Value::DateTime(s) | Value::Time(s) => string(s, out),
        Value::Collection(vs) => {
            out.push('[');
            for (i, v) in vs.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                value(v, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_json().to_string()),
    }
}

fn is_json_number(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = |b: &[u8]| !b.is_empty() && b.iter().all(u8::is_ascii_digit);
    let body = b.strip_prefix(b"-").unwrap_or(b);
    let (int, frac) = match body.iter().position(|&c| c == b'.') {
        Some(p) => (&body[..p], Some(&body[p + 1..])),
        None => (body, None),
    };
    digits(int) && (int.len() == 1 || int[0] != b'0') && frac.is_none_or(digits)
}

fn string(s: &str, out: &mut String) {
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_lines_parse_to_the_row_object() {
        let columns: Vec<Column> = ["a", "b\"q", "c", "d", "e", "f", "g", "h"]
            .iter()
            .map(|n| Column {
                name: n.to_string(),
                path: "x".into(),
                ty: None,
                collection: false,
                description: None,
            })
            .collect();
        let row = vec![
            Value::String("quote \" back \\ nl \n tab \t ctl \u{1} é 😀".into()),
            Value::Decimal("1.50".into()),
            Value::Decimal("-0.95000000".into()),
            Value::Decimal("1E+3".into()),
            Value::Null,
            Value::Collection(vec![Value::Integer(-3), Value::Boolean(false)]),
            Value::Json(serde_json::json!({"system": "s", "code": "c"})),
            Value::DateTime("2021-01-01T00:00:00Z".into()),
        ];
        let mut line = String::new();
        write_row(&columns, &row, &mut line);
        assert!(line.ends_with('\n') && line.matches('\n').count() == 1);
        let parsed: Json = serde_json::from_str(&line).unwrap();
        assert_eq!(parsed, row_object(&columns, &row));
        assert!(line.contains(r#""b\"q":1.50"#), "{line}");
    }
}
