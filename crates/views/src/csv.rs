//! CSV text (RFC 4180): a header line of column names, then one line per row. Null is an empty
//! field; a field is quoted when it contains a comma, a quote, CR or LF, or starts or ends with a
//! space (quotes doubled inside). Complex values and collections are their compact JSON text.

use crate::{Column, Value};

/// Appends the header line (`\n` line ends) to `out`.
pub fn write_header(columns: &[Column], out: &mut String) {
    for (i, c) in columns.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        field(&c.name, out);
    }
    out.push('\n');
}

/// Appends one row as a CSV line to `out`.
pub fn write_row(row: &[Value], out: &mut String) {
    for (i, v) in row.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        if let Some(text) = v.to_text() {
            field(&text, out);
        }
    }
    out.push('\n');
}

fn field(text: &str, out: &mut String) {
    let needs_quotes = text.is_empty()
        || text.contains([',', '"', '\n', '\r'])
        || text.starts_with(' ')
        || text.ends_with(' ');
    if !needs_quotes {
        out.push_str(text);
        return;
    }
    out.push('"');
    for ch in text.chars() {
        if ch == '"' {
            out.push('"');
        }
        out.push(ch);
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Value;

    #[test]
    fn fields_are_quoted_when_needed_and_null_is_empty() {
        let row = vec![
            Value::String("plain".into()),
            Value::String("a,b".into()),
            Value::String("say \"hi\"".into()),
            Value::String("two\nlines".into()),
            Value::Null,
            Value::String(String::new()),
            Value::Decimal("1.50".into()),
            Value::Boolean(true),
            Value::Collection(vec![Value::String("x".into()), Value::Integer(2)]),
        ];
        let mut out = String::new();
        write_row(&row, &mut out);
        assert_eq!(
            out,
            "plain,\"a,b\",\"say \"\"hi\"\"\",\"two\nlines\",,\"\",1.50,true,\"[\"\"x\"\",2]\"\n"
        );
    }
}
