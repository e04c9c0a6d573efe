//! Items of a FHIRPath collection: document nodes and computed System values.

use std::borrow::Cow;
use std::fmt;

use rust_decimal::Decimal;
use serde_json::Value as Json;

use crate::node::{Node, NodePath, is_integer_text};
use crate::quantity::Quantity;
use crate::temporal::{Temporal, TemporalKind};

/// A value of a FHIRPath System type.
#[derive(Debug, Clone, PartialEq)]
pub enum SystemValue<'a> {
    Boolean(bool),
    String(Cow<'a, str>),
    Integer(i64),
    Decimal(Decimal),
    Date(Temporal),
    DateTime(Temporal),
    Time(Temporal),
    Quantity(Quantity),
    /// The result of `type()`: a namespace (`FHIR`, `System`) and a type name.
    TypeInfo {
        namespace: &'static str,
        name: Cow<'a, str>,
    },
}

impl<'a> SystemValue<'a> {
    /// The System type name (`Integer`, `String`, …).
    pub fn type_name(&self) -> &'static str {
        match self {
            SystemValue::Boolean(_) => "Boolean",
            SystemValue::String(_) => "String",
            SystemValue::Integer(_) => "Integer",
            SystemValue::Decimal(_) => "Decimal",
            SystemValue::Date(_) => "Date",
            SystemValue::DateTime(_) => "DateTime",
            SystemValue::Time(_) => "Time",
            SystemValue::Quantity(_) => "Quantity",
            SystemValue::TypeInfo { .. } => "TypeInfo",
        }
    }

    pub fn into_owned(self) -> SystemValue<'static> {
        match self {
            SystemValue::String(s) => SystemValue::String(Cow::Owned(s.into_owned())),
            SystemValue::Boolean(b) => SystemValue::Boolean(b),
            SystemValue::Integer(i) => SystemValue::Integer(i),
            SystemValue::Decimal(d) => SystemValue::Decimal(d),
            SystemValue::Date(t) => SystemValue::Date(t),
            SystemValue::DateTime(t) => SystemValue::DateTime(t),
            SystemValue::Time(t) => SystemValue::Time(t),
            SystemValue::Quantity(q) => SystemValue::Quantity(q),
            SystemValue::TypeInfo { namespace, name } => SystemValue::TypeInfo {
                namespace,
                name: Cow::Owned(name.into_owned()),
            },
        }
    }

    pub(crate) fn temporal(t: Temporal) -> SystemValue<'a> {
        match t.kind {
            TemporalKind::Date => SystemValue::Date(t),
            TemporalKind::DateTime => SystemValue::DateTime(t),
            TemporalKind::Time => SystemValue::Time(t),
        }
    }

    /// JSON form: numbers and booleans as JSON, dates/times as strings, Quantity as FHIR JSON.
    pub fn to_json(&self) -> Json {
        match self {
            SystemValue::Boolean(b) => Json::Bool(*b),
            SystemValue::String(s) => Json::String(s.to_string()),
            SystemValue::Integer(i) => Json::from(*i),
            SystemValue::Decimal(d) => decimal_json(d),
            SystemValue::Date(t) | SystemValue::DateTime(t) | SystemValue::Time(t) => {
                Json::String(t.to_string())
            }
            SystemValue::Quantity(q) => {
                let mut m = serde_json::Map::new();
                m.insert("value".into(), decimal_json(&q.value));
                if let Some(cal) = crate::quantity::calendar_unit(&q.unit).filter(|c| *c == q.unit)
                {
                    m.insert("unit".into(), Json::String(cal.to_string()));
                } else {
                    m.insert("unit".into(), Json::String(q.unit.clone()));
                    m.insert("system".into(), Json::String(UCUM.into()));
                    m.insert("code".into(), Json::String(q.unit.clone()));
                }
                Json::Object(m)
            }
            SystemValue::TypeInfo { namespace, name } => {
                serde_json::json!({"namespace": namespace, "name": name})
            }
        }
    }
}

pub(crate) const UCUM: &str = "http://unitsofmeasure.org";

fn decimal_json(d: &Decimal) -> Json {
    // With arbitrary_precision the text is kept exactly.
    serde_json::from_str(&d.to_string()).unwrap_or(Json::Null)
}

impl fmt::Display for SystemValue<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SystemValue::Boolean(b) => write!(f, "{b}"),
            SystemValue::String(s) => f.write_str(s),
            SystemValue::Integer(i) => write!(f, "{i}"),
            SystemValue::Decimal(d) => write!(f, "{d}"),
            SystemValue::Date(t) | SystemValue::DateTime(t) | SystemValue::Time(t) => {
                write!(f, "{t}")
            }
            SystemValue::Quantity(q) => write!(f, "{q}"),
            SystemValue::TypeInfo { namespace, name } => write!(f, "{namespace}.{name}"),
        }
    }
}

/// One element of a FHIRPath result collection.
#[derive(Debug, Clone)]
pub enum Item<'a> {
    /// A node of the evaluated document (or of a variable's JSON value).
    Node(Node<'a>),
    /// A computed value (literal, arithmetic, function result); it has no location.
    Value(SystemValue<'a>),
}

impl<'a> Item<'a> {
    pub fn from_value(v: SystemValue<'a>) -> Self {
        Item::Value(v)
    }

    pub(crate) fn boolean(b: bool) -> Self {
        Item::Value(SystemValue::Boolean(b))
    }

    pub(crate) fn string(s: impl Into<Cow<'a, str>>) -> Self {
        Item::Value(SystemValue::String(s.into()))
    }

    /// The node, when this item is part of a document.
    pub fn as_node(&self) -> Option<&Node<'a>> {
        match self {
            Item::Node(n) => Some(n),
            Item::Value(_) => None,
        }
    }

    /// Location in the document; `None` for computed values and detached nodes.
    pub fn path(&self) -> Option<NodePath> {
        self.as_node()?.path()
    }

    /// Location of a primitive's `_name` shadow.
    pub fn shadow_path(&self) -> Option<NodePath> {
        self.as_node()?.shadow_path()
    }

    /// The type name: the FHIR type for nodes (`HumanName`, `dateTime`), the System type for values.
    pub fn type_name(&self) -> &str {
        match self {
            Item::Node(n) => n.type_name(),
            Item::Value(v) => v.type_name(),
        }
    }

    /// `FHIR` for nodes, `System` for computed values.
    pub fn namespace(&self) -> &'static str {
        match self {
            Item::Node(n) if !n.ty.is_empty() => "FHIR",
            Item::Node(_) => "System",
            Item::Value(_) => "System",
        }
    }

    /// JSON form: FHIR JSON for complex nodes, the JSON primitive for primitive nodes, strings for
    /// dates and times.
    pub fn as_json(&self) -> Json {
        match self {
            Item::Node(n) => match n.value {
                Some(v) => v.clone(),
                None => Json::Null,
            },
            Item::Value(v) => v.to_json(),
        }
    }

    /// The System value of a primitive (FHIR primitives map to System types) or of a Quantity node.
    pub fn to_system(&self) -> Option<SystemValue<'a>> {
        match self {
            Item::Value(v) => Some(v.clone()),
            Item::Node(n) => node_system_value(n),
        }
    }

    /// Children of a node (`children()`); computed values have none.
    pub fn children(&self) -> Vec<Item<'a>> {
        match self {
            Item::Node(n) => n.children(),
            Item::Value(_) => Vec::new(),
        }
    }
}

/// The System value of a FHIR primitive node, typed by its FHIR type (or by its JSON kind when
/// untyped), or of a Quantity-typed complex node.
pub(crate) fn node_system_value<'a>(n: &Node<'a>) -> Option<SystemValue<'a>> {
    let v = n.value?;
    let ty = n.ty;
    match v {
        Json::String(s) => {
            let s: &'a str = s.as_str();
            Some(match ty {
                "date" => SystemValue::Date(Temporal::parse_date(s)?),
                "dateTime" | "instant" => SystemValue::DateTime(Temporal::parse_datetime(s)?),
                "time" => SystemValue::Time(Temporal::parse_time(s)?),
                "integer" | "positiveInt" | "unsignedInt" => SystemValue::Integer(s.parse().ok()?),
                "decimal" => SystemValue::Decimal(s.parse().ok()?),
                "boolean" => SystemValue::Boolean(s.parse().ok()?),
                _ => SystemValue::String(Cow::Borrowed(s)),
            })
        }
        Json::Bool(b) => Some(SystemValue::Boolean(*b)),
        Json::Number(num) => {
            let text = num.as_str();
            if ty == "decimal" || (ty.is_empty() && !is_integer_text(text)) {
                Some(SystemValue::Decimal(parse_decimal(text)?))
            } else {
                match text.parse::<i64>() {
                    Ok(i) => Some(SystemValue::Integer(i)),
                    Err(_) => Some(SystemValue::Decimal(parse_decimal(text)?)),
                }
            }
        }
        Json::Object(m) => {
            let quantity_like = n.info.is_some_and(|i| i.is_a("Quantity"));
            let untyped_quantity = ty.is_empty()
                && m.contains_key("value")
                && (m.contains_key("unit") || m.contains_key("code"));
            if !quantity_like && !untyped_quantity {
                return None;
            }
            let value = match m.get("value")? {
                Json::Number(num) => parse_decimal(num.as_str())?,
                _ => return None,
            };
            Some(SystemValue::Quantity(Quantity::new(
                value,
                fhir_quantity_unit(m),
            )))
        }
        _ => None,
    }
}

/// The unit a FHIR Quantity contributes: the UCUM code when coded in UCUM (calendar-like UCUM codes
/// for years/months stay UCUM), otherwise the unit text, mapped to a calendar keyword when it is one.
fn fhir_quantity_unit(m: &serde_json::Map<String, Json>) -> String {
    let system = m.get("system").and_then(Json::as_str);
    let code = m.get("code").and_then(Json::as_str);
    let unit = m.get("unit").and_then(Json::as_str);
    if let (Some(UCUM), Some(c)) = (system, code) {
        return c.to_string();
    }
    if let Some(u) = unit {
        if let Some(cal) = crate::quantity::calendar_unit(u) {
            return cal.to_string();
        }
        return u.to_string();
    }
    code.unwrap_or("1").to_string()
}

pub(crate) fn parse_decimal(text: &str) -> Option<Decimal> {
    if text.contains(['e', 'E']) {
        Decimal::from_scientific(text).ok()
    } else {
        text.parse().ok()
    }
}
