//! Parquet output (feature `parquet`, on by default): typed columns from the columns' declared
//! `type`, snappy, streamed row group by row group into any `Write` the caller gives.
//!
//! Column types (FHIR type → Parquet):
//! - `boolean` → BOOLEAN; `integer`/`positiveInt`/`unsignedInt` → INT32; `integer64` → INT64;
//! - `decimal` → DOUBLE. FHIR decimals carry their own precision per value, so a fixed
//!   DECIMAL(p, s) column would need every value seen before the schema is written (not streamable)
//!   or would round; DOUBLE is what analytics engines aggregate. Values beyond ~15 significant
//!   digits lose precision (the CSV/NDJSON outputs keep the exact text).
//! - `base64Binary` → BYTE_ARRAY holding the decoded bytes;
//! - everything else (string, code, id, uri, …, and date/dateTime/instant/time, which FHIR allows
//!   to be partial, e.g. `2020-03`, so no Parquet DATE/TIMESTAMP fits them honestly, and complex
//!   types as their JSON text, and columns without a declared type) → BYTE_ARRAY with the STRING
//!   logical type.
//!
//! Every column is nullable; a `collection: true` column is a three-level LIST of nullable
//! elements of its type. A value that does not convert to its column's type is a
//! [`ParquetError::Convert`] naming the column and the (1-based) row, never a silent null.
//!
//! Rows are converted into per-column buffers at [`ParquetWriter::write_row`] and written out as a
//! row group when it reaches [`Options::row_group_rows`] rows or about
//! [`Options::row_group_bytes`] bytes of values: at most one row group is held in memory.

use std::io::Write;
use std::sync::Arc;

use parquet::basic::{Compression, LogicalType, Repetition, Type as Physical};
use parquet::data_type::{BoolType, ByteArray, ByteArrayType, DoubleType, Int32Type, Int64Type};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::types::{Type, TypePtr};
use thiserror::Error;

use crate::{Column, Value, ValueKind};

/// Row group limits.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub row_group_rows: usize,
    /// Approximate: the sum of the buffered values' sizes.
    pub row_group_bytes: usize,
}

impl Default for Options {
    /// 1 M rows or 128 MiB, whichever comes first.
    fn default() -> Self {
        Options {
            row_group_rows: 1 << 20,
            row_group_bytes: 128 << 20,
        }
    }
}

#[derive(Debug, Error)]
pub enum ParquetError {
    #[error("row {row}, column '{column}': {value} is not a valid {ty}")]
    Convert {
        column: String,
        /// 1-based, over all rows given to the writer.
        row: u64,
        value: String,
        ty: &'static str,
    },
    #[error("row {row} has {found} values for {expected} columns")]
    Width {
        row: u64,
        found: usize,
        expected: usize,
    },
    #[error("parquet: {0}")]
    Write(#[from] parquet::errors::ParquetError),
}

/// The physical storage of one column (what its values convert to).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Storage {
    Bool,
    I32,
    I64,
    F64,
    Utf8,
    Bytes,
}

impl Storage {
    fn of(kind: ValueKind) -> Storage {
        match kind {
            ValueKind::Boolean => Storage::Bool,
            ValueKind::Integer => Storage::I32,
            ValueKind::Integer64 => Storage::I64,
            ValueKind::Decimal => Storage::F64,
            ValueKind::Binary => Storage::Bytes,
            ValueKind::String
            | ValueKind::Date
            | ValueKind::DateTime
            | ValueKind::Instant
            | ValueKind::Time
            | ValueKind::Complex => Storage::Utf8,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Storage::Bool => "boolean",
            Storage::I32 => "32-bit integer",
            Storage::I64 => "64-bit integer",
            Storage::F64 => "decimal (double)",
            Storage::Utf8 => "string",
            Storage::Bytes => "base64Binary",
        }
    }
}

enum Values {
    Bool(Vec<bool>),
    I32(Vec<i32>),
    I64(Vec<i64>),
    F64(Vec<f64>),
    Bytes(Vec<ByteArray>),
}

struct ColumnBuf {
    name: String,
    storage: Storage,
    collection: bool,
    values: Values,
    def: Vec<i16>,
    rep: Vec<i16>,
}

impl ColumnBuf {
    fn new(c: &Column) -> ColumnBuf {
        let storage = Storage::of(c.kind());
        let values = match storage {
            Storage::Bool => Values::Bool(Vec::new()),
            Storage::I32 => Values::I32(Vec::new()),
            Storage::I64 => Values::I64(Vec::new()),
            Storage::F64 => Values::F64(Vec::new()),
            Storage::Utf8 | Storage::Bytes => Values::Bytes(Vec::new()),
        };
        ColumnBuf {
            name: c.name.clone(),
            storage,
            collection: c.collection,
            values,
            def: Vec::new(),
            rep: Vec::new(),
        }
    }

    fn schema(&self) -> Result<TypePtr, ParquetError> {
        let (physical, logical) = match self.storage {
            Storage::Bool => (Physical::BOOLEAN, None),
            Storage::I32 => (Physical::INT32, None),
            Storage::I64 => (Physical::INT64, None),
            Storage::F64 => (Physical::DOUBLE, None),
            Storage::Utf8 => (Physical::BYTE_ARRAY, Some(LogicalType::String)),
            Storage::Bytes => (Physical::BYTE_ARRAY, None),
        };
        let leaf_name = if self.collection {
            "element"
        } else {
            &self.name
        };
        let leaf = Type::primitive_type_builder(leaf_name, physical)
            .with_repetition(Repetition::OPTIONAL)
            .with_logical_type(logical)
            .build()?;
        if !self.collection {
            return Ok(Arc::new(leaf));
        }
        let list = Type::group_type_builder("list")
            .with_repetition(Repetition::REPEATED)
            .with_fields(vec![Arc::new(leaf)])
            .build()?;
        Ok(Arc::new(
            Type::group_type_builder(&self.name)
                .with_repetition(Repetition::OPTIONAL)
                .with_logical_type(Some(LogicalType::List))
                .with_fields(vec![Arc::new(list)])
                .build()?,
        ))
    }

    /// Buffers one cell; returns the bytes it adds (approximate).
    fn push(&mut self, v: &Value, row: u64) -> Result<usize, ParquetError> {
        if !self.collection {
            return match v {
                Value::Null => {
                    self.def.push(0);
                    Ok(2)
                }
                v => {
                    let n = self.value(v, row)?;
                    self.def.push(1);
                    Ok(n + 2)
                }
            };
        }
        // LIST levels: 0 null list, 1 empty list, 2 null element, 3 element.
        let items: &[Value] = match v {
            Value::Null => {
                self.def.push(0);
                self.rep.push(0);
                return Ok(4);
            }
            Value::Collection(items) => items,
            one => std::slice::from_ref(one),
        };
        if items.is_empty() {
            self.def.push(1);
            self.rep.push(0);
            return Ok(4);
        }
        let mut bytes = 0;
        for (i, item) in items.iter().enumerate() {
            self.rep.push(if i == 0 { 0 } else { 1 });
            if item.is_null() {
                self.def.push(2);
            } else {
                bytes += self.value(item, row)?;
                self.def.push(3);
            }
            bytes += 4;
        }
        Ok(bytes)
    }

    fn value(&mut self, v: &Value, row: u64) -> Result<usize, ParquetError> {
        let (name, storage) = (&self.name, self.storage);
        let bad = || ParquetError::Convert {
            column: name.clone(),
            row,
            value: describe(v),
            ty: storage.name(),
        };
        match &mut self.values {
            Values::Bool(out) => {
                let b = match v {
                    Value::Boolean(b) => *b,
                    Value::String(s) if s == "true" => true,
                    Value::String(s) if s == "false" => false,
                    _ => return Err(bad()),
                };
                out.push(b);
                Ok(1)
            }
            Values::I32(out) => {
                let i = match v {
                    Value::Integer(i) => i32::try_from(*i).ok(),
                    Value::String(s) => s.parse().ok(),
                    _ => None,
                };
                out.push(i.ok_or_else(&bad)?);
                Ok(4)
            }
            Values::I64(out) => {
                let i = match v {
                    Value::Integer(i) => Some(*i),
                    Value::String(s) => s.parse().ok(),
                    _ => None,
                };
                out.push(i.ok_or_else(&bad)?);
                Ok(8)
            }
            Values::F64(out) => {
                let d = match v {
                    Value::Integer(i) => Some(*i as f64),
                    Value::Decimal(s) | Value::String(s) => {
                        s.parse::<f64>().ok().filter(|d| d.is_finite())
                    }
                    _ => None,
                };
                out.push(d.ok_or_else(&bad)?);
                Ok(8)
            }
            Values::Bytes(out) if storage == Storage::Bytes => {
                let bytes = match v {
                    Value::String(s) => base64_decode(s),
                    _ => None,
                };
                let bytes = bytes.ok_or_else(&bad)?;
                let n = bytes.len();
                out.push(ByteArray::from(bytes));
                Ok(n)
            }
            Values::Bytes(out) => {
                let text = match v {
                    Value::Collection(_) => return Err(bad()),
                    v => v.to_text().unwrap_or_default().into_owned(),
                };
                let n = text.len();
                out.push(ByteArray::from(text.into_bytes()));
                Ok(n)
            }
        }
    }

    fn clear(&mut self) {
        self.def.clear();
        self.rep.clear();
        match &mut self.values {
            Values::Bool(v) => v.clear(),
            Values::I32(v) => v.clear(),
            Values::I64(v) => v.clear(),
            Values::F64(v) => v.clear(),
            Values::Bytes(v) => v.clear(),
        }
    }
}

fn describe(v: &Value) -> String {
    let text = v.to_text().unwrap_or_default();
    let mut s: String = text.chars().take(64).collect();
    if s.len() < text.len() {
        s.push('…');
    }
    format!("'{s}'")
}

/// Standard base64 (RFC 4648, padding optional, ASCII whitespace ignored); `None` when invalid.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    fn sextet(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let clean: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    let body = clean
        .strip_suffix(b"==")
        .or_else(|| clean.strip_suffix(b"="))
        .unwrap_or(&clean);
    if body.len() % 4 == 1 || (clean.len() != body.len() && !clean.len().is_multiple_of(4)) {
        return None;
    }
    let mut out = Vec::with_capacity(body.len() / 4 * 3 + 2);
    for chunk in body.chunks(4) {
        let mut acc = 0u32;
        for &c in chunk {
            acc = (acc << 6) | sextet(c)?;
        }
        match chunk.len() {
            4 => out.extend_from_slice(&[(acc >> 16) as u8, (acc >> 8) as u8, acc as u8]),
            3 => out.extend_from_slice(&[(acc >> 10) as u8, (acc >> 2) as u8]),
            2 => out.push((acc >> 4) as u8),
            _ => return None,
        }
    }
    Some(out)
}

/// A Parquet file being written: [`write_row`](Self::write_row) each row, then
/// [`finish`](Self::finish). After an error the file is unusable (drop it).
pub struct ParquetWriter<W: Write + Send> {
    file: SerializedFileWriter<W>,
    columns: Vec<ColumnBuf>,
    options: Options,
    group_rows: usize,
    group_bytes: usize,
    rows: u64,
}

impl<W: Write + Send> ParquetWriter<W> {
    /// Starts a file for the view's columns (schema `message <name>`).
    pub fn new(
        name: &str,
        columns: &[Column],
        out: W,
        options: Options,
    ) -> Result<Self, ParquetError> {
        let bufs: Vec<ColumnBuf> = columns.iter().map(ColumnBuf::new).collect();
        let fields = bufs
            .iter()
            .map(ColumnBuf::schema)
            .collect::<Result<Vec<_>, _>>()?;
        let schema = Type::group_type_builder(name).with_fields(fields).build()?;
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_created_by(format!("fhirhose views {}", env!("CARGO_PKG_VERSION")))
            // We cut row groups ourselves.
            .set_max_row_group_row_count(None)
            .build();
        let file = SerializedFileWriter::new(out, Arc::new(schema), Arc::new(props))?;
        Ok(ParquetWriter {
            file,
            columns: bufs,
            options: Options {
                row_group_rows: options.row_group_rows.max(1),
                ..options
            },
            group_rows: 0,
            group_bytes: 0,
            rows: 0,
        })
    }

    /// Converts and buffers one row; writes a row group when the buffered one is full.
    pub fn write_row(&mut self, row: &[Value]) -> Result<(), ParquetError> {
        self.rows += 1;
        if row.len() != self.columns.len() {
            return Err(ParquetError::Width {
                row: self.rows,
                found: row.len(),
                expected: self.columns.len(),
            });
        }
        for (c, v) in self.columns.iter_mut().zip(row) {
            self.group_bytes += c.push(v, self.rows)?;
        }
        self.group_rows += 1;
        if self.group_rows >= self.options.row_group_rows
            || self.group_bytes >= self.options.row_group_bytes
        {
            self.flush_group()?;
        }
        Ok(())
    }

    /// Rows given so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    fn flush_group(&mut self) -> Result<(), ParquetError> {
        if self.group_rows == 0 {
            return Ok(());
        }
        let mut group = self.file.next_row_group()?;
        for c in &mut self.columns {
            let Some(mut w) = group.next_column()? else {
                break;
            };
            let def = Some(c.def.as_slice());
            let rep = c.collection.then_some(c.rep.as_slice());
            match &c.values {
                Values::Bool(v) => w.typed::<BoolType>().write_batch(v, def, rep)?,
                Values::I32(v) => w.typed::<Int32Type>().write_batch(v, def, rep)?,
                Values::I64(v) => w.typed::<Int64Type>().write_batch(v, def, rep)?,
                Values::F64(v) => w.typed::<DoubleType>().write_batch(v, def, rep)?,
                Values::Bytes(v) => w.typed::<ByteArrayType>().write_batch(v, def, rep)?,
            };
            w.close()?;
            c.clear();
        }
        group.close()?;
        self.group_rows = 0;
        self.group_bytes = 0;
        Ok(())
    }

    /// Writes the last row group and the footer; returns the writer.
    pub fn finish(mut self) -> Result<W, ParquetError> {
        self.flush_group()?;
        Ok(self.file.into_inner()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::View;

    #[test]
    fn base64_decodes_with_and_without_padding_and_refuses_garbage() {
        assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_decode("aGVsbG8").unwrap(), b"hello");
        assert_eq!(base64_decode("aGk=").unwrap(), b"hi");
        assert_eq!(base64_decode("").unwrap(), b"");
        assert!(base64_decode("a").is_none());
        assert!(base64_decode("a$==").is_none());
    }

    fn view(columns: &str) -> View {
        View::from_json_str(&format!(
            r#"{{"resource": "Patient", "select": [{{"column": {columns}}}]}}"#
        ))
        .unwrap()
    }

    #[test]
    fn a_value_that_does_not_convert_names_the_column_and_the_row() {
        let v = view(r#"[{"name": "n", "path": "id", "type": "integer"}]"#);
        let mut w = ParquetWriter::new("t", v.columns(), Vec::new(), Options::default()).unwrap();
        w.write_row(&[Value::Integer(1)]).unwrap();
        w.write_row(&[Value::Null]).unwrap();
        let err = w.write_row(&[Value::String("abc".into())]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("row 3") && text.contains("'n'"), "{text}");
        let err = w.write_row(&[Value::Integer(1 << 40)]).unwrap_err();
        assert!(matches!(err, ParquetError::Convert { row: 4, .. }), "{err}");
    }

    #[test]
    fn small_row_groups_make_a_valid_file() {
        let v = view(
            r#"[{"name": "id", "path": "id"}, {"name": "b", "path": "active", "type": "boolean"},
                {"name": "g", "path": "name.given", "type": "string", "collection": true}]"#,
        );
        let opts = Options {
            row_group_rows: 2,
            ..Options::default()
        };
        let mut w = ParquetWriter::new("t", v.columns(), Vec::new(), opts).unwrap();
        for i in 0..5 {
            w.write_row(&[
                Value::String(format!("p{i}")),
                if i % 2 == 0 {
                    Value::Null
                } else {
                    Value::Boolean(true)
                },
                Value::Collection((0..i).map(|j| Value::String(j.to_string())).collect()),
            ])
            .unwrap();
        }
        let bytes = w.finish().unwrap();
        assert_eq!(&bytes[..4], b"PAR1");
        assert_eq!(&bytes[bytes.len() - 4..], b"PAR1");
    }
}
