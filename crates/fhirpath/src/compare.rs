//! Equality (`=`), equivalence (`~`) and ordering of single items.

use std::cmp::Ordering;

use rust_decimal::Decimal;
use serde_json::Value as Json;

use crate::error::EvalError;
use crate::node::Item;
use crate::value::SystemValue;

fn num(v: &SystemValue<'_>) -> Option<Decimal> {
    match v {
        SystemValue::Integer(i) => Some(Decimal::from(*i)),
        SystemValue::Decimal(d) => Some(*d),
        _ => None,
    }
}

/// `=` on two items: `None` when the result is empty (date/time precision, incomparable units).
pub(crate) fn equals(a: &Item<'_>, b: &Item<'_>) -> Option<bool> {
    match (a.to_system(), b.to_system()) {
        (Some(x), Some(y)) => sys_equals(&x, &y),
        (None, None) => match (a, b) {
            (Item::Node(x), Item::Node(y)) => match (x.value, y.value) {
                (Some(p), Some(q)) => Some(json_equal(p, q)),
                _ => Some(false),
            },
            _ => Some(false),
        },
        _ => Some(false),
    }
}

pub(crate) fn sys_equals(x: &SystemValue<'_>, y: &SystemValue<'_>) -> Option<bool> {
    use SystemValue as S;
    match (x, y) {
        (S::Boolean(p), S::Boolean(q)) => Some(p == q),
        (S::String(p), S::String(q)) => Some(p == q),
        (S::Integer(p), S::Integer(q)) => Some(p == q),
        (S::Date(p) | S::DateTime(p), S::Date(q) | S::DateTime(q)) => {
            p.compare(q).map(|o| o == Ordering::Equal)
        }
        (S::Time(p), S::Time(q)) => p.compare(q).map(|o| o == Ordering::Equal),
        (S::Quantity(p), S::Quantity(q)) => p.compare(q).map(|o| o == Ordering::Equal),
        (S::Quantity(p), n) | (n, S::Quantity(p)) if num(n).is_some() => {
            let q = crate::Quantity::new(num(n).unwrap_or_default(), "1");
            p.compare(&q).map(|o| o == Ordering::Equal).or(Some(false))
        }
        (
            S::TypeInfo {
                namespace: n1,
                name: a,
            },
            S::TypeInfo {
                namespace: n2,
                name: b,
            },
        ) => Some(n1 == n2 && a == b),
        _ => match (num(x), num(y)) {
            (Some(p), Some(q)) => Some(p == q),
            _ => Some(false),
        },
    }
}

/// Structural JSON equality with numbers compared by value.
fn json_equal(a: &Json, b: &Json) -> bool {
    match (a, b) {
        (Json::Number(x), Json::Number(y)) => {
            match (
                crate::value::parse_decimal(x.as_str()),
                crate::value::parse_decimal(y.as_str()),
            ) {
                (Some(p), Some(q)) => p == q,
                _ => x == y,
            }
        }
        (Json::Object(x), Json::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_equal(v, w)))
        }
        (Json::Array(x), Json::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| json_equal(p, q))
        }
        _ => a == b,
    }
}

/// Calendar years/months as their definite UCUM counterparts (for equivalence only).
fn definite(u: &str) -> &str {
    match u {
        "year" => "a",
        "month" => "mo",
        other => other,
    }
}

/// Equivalence ignores case and treats every whitespace character as a space (without trimming or
/// collapsing runs).
fn normalize_ws(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_whitespace() { ' ' } else { c })
        .collect::<String>()
        .to_lowercase()
}

/// `~` on two items.
pub(crate) fn equivalent(a: &Item<'_>, b: &Item<'_>) -> bool {
    use SystemValue as S;
    match (a.to_system(), b.to_system()) {
        (Some(x), Some(y)) => match (&x, &y) {
            (S::String(p), S::String(q)) => normalize_ws(p) == normalize_ws(q),
            (S::Date(p) | S::DateTime(p), S::Date(q) | S::DateTime(q))
            | (S::Time(p), S::Time(q)) => {
                p.precision.min(crate::Precision::Second)
                    == q.precision.min(crate::Precision::Second)
                    && p.compare(q) == Some(Ordering::Equal)
            }
            (S::Quantity(p), S::Quantity(q)) => {
                // Calendar and definite durations are equivalent where equal is undefined.
                match p.compare(q) {
                    Some(o) => o == Ordering::Equal,
                    None => {
                        let pu = definite(&p.unit);
                        let qu = definite(&q.unit);
                        crate::Quantity::new(p.value, pu)
                            .compare(&crate::Quantity::new(q.value, qu))
                            == Some(Ordering::Equal)
                    }
                }
            }
            _ => match (num(&x), num(&y)) {
                (Some(p), Some(q)) => {
                    let scale = p.scale().min(q.scale());
                    p.round_dp(scale) == q.round_dp(scale)
                }
                _ => sys_equals(&x, &y) == Some(true),
            },
        },
        (None, None) => match (a, b) {
            (Item::Node(x), Item::Node(y)) => match (x.value, y.value) {
                (Some(p), Some(q)) => json_equal(p, q),
                _ => false,
            },
            _ => false,
        },
        _ => false,
    }
}

/// Ordering for `<`, `>`, `<=`, `>=`: `Ok(None)` when the answer is empty (precision), an error
/// when the operands cannot be compared.
pub(crate) fn compare(a: &Item<'_>, b: &Item<'_>) -> Result<Option<Ordering>, EvalError> {
    use SystemValue as S;
    let (Some(x), Some(y)) = (a.to_system(), b.to_system()) else {
        return Err(EvalError::ty("cannot compare complex values"));
    };
    Ok(match (&x, &y) {
        (S::String(p), S::String(q)) => Some(p.as_ref().cmp(q.as_ref())),
        (S::Date(p) | S::DateTime(p), S::Date(q) | S::DateTime(q)) => p.compare(q),
        (S::Time(p), S::Time(q)) => p.compare(q),
        (S::Quantity(p), S::Quantity(q)) => p.compare(q),
        (S::Quantity(p), n) if num(n).is_some() => {
            p.compare(&crate::Quantity::new(num(n).unwrap_or_default(), "1"))
        }
        (n, S::Quantity(q)) if num(n).is_some() => {
            crate::Quantity::new(num(n).unwrap_or_default(), "1").compare(q)
        }
        (S::Boolean(_), S::Boolean(_)) => {
            return Err(EvalError::ty("Boolean values are not ordered"));
        }
        _ => match (num(&x), num(&y)) {
            (Some(p), Some(q)) => Some(p.cmp(&q)),
            _ => {
                return Err(EvalError::ty(format!(
                    "cannot compare {} with {}",
                    x.type_name(),
                    y.type_name()
                )));
            }
        },
    })
}
