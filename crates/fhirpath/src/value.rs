//! The computed System values of FHIRPath (the other kind of item, a document node, is
//! [`crate::node`]'s).

use std::borrow::Cow;
use std::fmt;

use rust_decimal::Decimal;
use serde_json::Value as Json;

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

/// `None` beyond Decimal's range (about ±7.9e28, see `node::number_out_of_range`). Digits beyond
/// its 28 decimal places are rounded away (`1e-33` is 0), FHIRPath's Decimal precision.
pub(crate) fn parse_decimal(text: &str) -> Option<Decimal> {
    if !text.contains(['e', 'E']) {
        // The plain notation rounds what lies beyond 28 places itself.
        return text.parse().ok();
    }
    if let Ok(d) = Decimal::from_scientific(text) {
        return Some(d);
    }
    // `from_scientific` refuses more than 28 places (`1e-33`, `1.5e-28`) rather than round them
    // as the plain notation does: round them here too. A positive exponent is a value too large.
    let (mantissa, exponent) = text.split_once(['e', 'E'])?;
    let exponent: i32 = exponent.parse().ok()?;
    if exponent >= 0 {
        return None;
    }
    let m: Decimal = mantissa.parse().ok()?;
    let scale = u64::from(m.scale()) + u64::from(exponent.unsigned_abs());
    let drop = scale.saturating_sub(28);
    // A Decimal mantissa has at most 29 digits: dropping more leaves 0.
    let digits = match u32::try_from(drop).ok().filter(|d| *d <= 29) {
        Some(d) => {
            let p = 10_i128.pow(d);
            let (q, r) = (m.mantissa() / p, m.mantissa() % p);
            q + if r.abs() * 2 >= p { r.signum() } else { 0 }
        }
        None => 0,
    };
    Decimal::try_from_i128_with_scale(digits, scale.min(28) as u32).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scientific notation with more than 28 decimal places was refused (and the number, now
    /// out of range, would be empty) where the plain notation of the same value rounds.
    #[test]
    fn tiny_numbers_round_to_28_places_in_both_notations() {
        for (text, want) in [
            ("1e-33", "0.0000000000000000000000000000"),
            (
                "0.000000000000000000000000000000001",
                "0.0000000000000000000000000000",
            ),
            ("1.5e-28", "0.0000000000000000000000000002"),
            ("-2.5e-29", "0.0000000000000000000000000000"),
            ("1e-28", "0.0000000000000000000000000001"),
            ("1.25e2", "125"),
            ("3e-1000000", "0.0000000000000000000000000000"),
        ] {
            assert_eq!(
                parse_decimal(text).map(|d| d.to_string()),
                Some(want.to_string()),
                "{text}"
            );
        }
        for text in ["1e300", "79228162514264337593543950336", "1e29"] {
            assert_eq!(parse_decimal(text), None, "{text}");
        }
    }
}
