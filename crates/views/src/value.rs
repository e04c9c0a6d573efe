//! The row model: typed cell values, and the column kinds writers map to physical types.

use std::borrow::Cow;

use fhirpath::{Item, SystemValue};
use serde_json::Value as Json;

/// One cell. Text forms are kept as the resource wrote them (decimals keep their digits, dates
/// their precision).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Boolean(bool),
    Integer(i64),
    /// The decimal's exact text (`1.50`).
    Decimal(String),
    String(String),
    /// `YYYY`, `YYYY-MM` or `YYYY-MM-DD`.
    Date(String),
    /// A FHIR `dateTime` or `instant`, as written.
    DateTime(String),
    Time(String),
    /// A complex element (HumanName, Reference, …) as FHIR JSON.
    Json(Json),
    /// The values of a `collection: true` column (possibly empty).
    Collection(Vec<Value>),
}

impl Value {
    /// The cell of one FHIRPath result item.
    pub fn from_item(item: &Item<'_>) -> Value {
        match item {
            Item::Value(v) => Value::from_system(v),
            Item::Node(n) => match n.json() {
                None => Value::Null,
                Some(Json::Bool(b)) => Value::Boolean(*b),
                Some(Json::Number(num)) => {
                    let text = num.as_str();
                    let integral = !text.contains(['.', 'e', 'E']);
                    match (n.fhir_type(), text.parse::<i64>()) {
                        ("decimal", _) => Value::Decimal(text.to_string()),
                        (_, Ok(i)) if integral => Value::Integer(i),
                        _ => Value::Decimal(text.to_string()),
                    }
                }
                Some(Json::String(s)) => match n.fhir_type() {
                    "date" => Value::Date(s.clone()),
                    "dateTime" | "instant" => Value::DateTime(s.clone()),
                    "time" => Value::Time(s.clone()),
                    "integer64" => s
                        .parse()
                        .map(Value::Integer)
                        .unwrap_or_else(|_| Value::String(s.clone())),
                    _ => Value::String(s.clone()),
                },
                Some(other) => Value::Json(other.clone()),
            },
        }
    }

    fn from_system(v: &SystemValue<'_>) -> Value {
        match v {
            SystemValue::Boolean(b) => Value::Boolean(*b),
            SystemValue::String(s) => Value::String(s.to_string()),
            SystemValue::Integer(i) => Value::Integer(*i),
            SystemValue::Decimal(d) => Value::Decimal(d.to_string()),
            SystemValue::Date(t) => Value::Date(t.to_string()),
            SystemValue::DateTime(t) => Value::DateTime(t.to_string()),
            SystemValue::Time(t) => Value::Time(t.to_string()),
            SystemValue::Quantity(_) => Value::Json(v.to_json()),
            SystemValue::TypeInfo { .. } => Value::String(v.to_string()),
        }
    }

    /// JSON form (NDJSON output, the conformance suite): numbers as JSON numbers with their exact
    /// text, dates and times as strings, complex values as FHIR JSON, null as `null`.
    pub fn to_json(&self) -> Json {
        match self {
            Value::Null => Json::Null,
            Value::Boolean(b) => Json::Bool(*b),
            Value::Integer(i) => Json::from(*i),
            Value::Decimal(d) => {
                serde_json::from_str::<Json>(d).unwrap_or_else(|_| Json::String(d.clone()))
            }
            Value::String(s) | Value::Date(s) | Value::DateTime(s) | Value::Time(s) => {
                Json::String(s.clone())
            }
            Value::Json(j) => j.clone(),
            Value::Collection(vs) => Json::Array(vs.iter().map(Value::to_json).collect()),
        }
    }

    /// Text form (CSV): `None` for null; primitives as their FHIR text; complex values and
    /// collections as compact JSON.
    pub fn to_text(&self) -> Option<Cow<'_, str>> {
        Some(match self {
            Value::Null => return None,
            Value::Boolean(b) => Cow::Borrowed(if *b { "true" } else { "false" }),
            Value::Integer(i) => Cow::Owned(i.to_string()),
            Value::Decimal(s)
            | Value::String(s)
            | Value::Date(s)
            | Value::DateTime(s)
            | Value::Time(s) => Cow::Borrowed(s.as_str()),
            Value::Json(j) => Cow::Owned(j.to_string()),
            Value::Collection(_) => Cow::Owned(self.to_json().to_string()),
        })
    }

    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }
}

/// What a column holds, from its declared `type` (for typed writers such as Parquet). A column
/// without a declared type is `String` (the spec allows treating untyped columns as strings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueKind {
    Boolean,
    /// integer, positiveInt, unsignedInt (32-bit in FHIR).
    Integer,
    Integer64,
    Decimal,
    String,
    Date,
    DateTime,
    Instant,
    Time,
    /// base64Binary.
    Binary,
    /// A complex FHIR type (written as JSON text).
    Complex,
}

impl ValueKind {
    /// The kind of a declared FHIR type name.
    pub fn of_fhir_type(ty: &str) -> ValueKind {
        match ty {
            "boolean" => ValueKind::Boolean,
            "integer" | "positiveInt" | "unsignedInt" => ValueKind::Integer,
            "integer64" => ValueKind::Integer64,
            "decimal" => ValueKind::Decimal,
            "date" => ValueKind::Date,
            "dateTime" => ValueKind::DateTime,
            "instant" => ValueKind::Instant,
            "time" => ValueKind::Time,
            "base64Binary" => ValueKind::Binary,
            t if fhir_model::r4().is_primitive(t) => ValueKind::String,
            t if fhir_model::r4().type_def(t).is_some() => ValueKind::Complex,
            _ => ValueKind::String,
        }
    }
}
