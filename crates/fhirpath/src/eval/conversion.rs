//! Conversion functions `toX()` / `convertsToX()` (FHIRPath §5.5).

use std::borrow::Cow;

use rust_decimal::Decimal;

use crate::functions::Builtin;
use crate::node::Item;
use crate::parser::Expr;
use crate::quantity::{Quantity, calendar_unit};
use crate::temporal::{Temporal, TemporalKind};
use crate::value::SystemValue;

use super::{Env, R, b, eval, misrouted, single, single_string};

/// `toBoolean()` … `convertsToQuantity()`.
pub(super) fn call<'a>(
    f: Builtin,
    focus: Vec<Item<'a>>,
    args: &[Expr],
    env: &Env<'_, 'a>,
    input: &[Item<'a>],
) -> R<'a> {
    use Builtin as F;
    use SystemValue as S;
    match f {
        F::ToBoolean | F::ConvertsToBoolean => convert(f, &focus, to_boolean),
        F::ToInteger | F::ConvertsToInteger => convert(f, &focus, to_integer),
        F::ToDecimal | F::ConvertsToDecimal => convert(f, &focus, to_decimal),
        F::ToString | F::ConvertsToString => convert(f, &focus, to_string),
        F::ToDate | F::ConvertsToDate => convert(f, &focus, |v| to_temporal(v, TemporalKind::Date)),
        F::ToDateTime | F::ConvertsToDateTime => {
            convert(f, &focus, |v| to_temporal(v, TemporalKind::DateTime))
        }
        F::ToTime | F::ConvertsToTime => convert(f, &focus, |v| to_temporal(v, TemporalKind::Time)),
        F::ToQuantity | F::ConvertsToQuantity => {
            let unit = match args.first() {
                Some(a) => single_string(&eval(a, env, input)?, f.name())?.map(|s| {
                    calendar_unit(&s)
                        .map(str::to_string)
                        .unwrap_or_else(|| s.into_owned())
                }),
                None => None,
            };
            convert(f, &focus, |v| {
                let q = to_quantity(v)?;
                match &unit {
                    Some(u) => match q {
                        S::Quantity(q) => q.convert_to(u).map(S::Quantity),
                        _ => None,
                    },
                    None => Some(q),
                }
            })
        }
        _ => Err(misrouted(f)),
    }
}

fn convert<'a>(
    f: crate::functions::Builtin,
    focus: &[Item<'a>],
    conv: impl Fn(SystemValue<'a>) -> Option<SystemValue<'a>>,
) -> R<'a> {
    let Some(item) = single(focus, f.name())? else {
        return Ok(Vec::new());
    };
    let r = item.to_system().and_then(conv);
    if f.name().starts_with("convertsTo") {
        b(r.is_some())
    } else {
        Ok(r.map(Item::Value).into_iter().collect())
    }
}

fn to_boolean<'a>(v: SystemValue<'a>) -> Option<SystemValue<'a>> {
    use SystemValue as S;
    Some(S::Boolean(match v {
        S::Boolean(b) => b,
        S::Integer(1) => true,
        S::Integer(0) => false,
        S::Decimal(d) if d == Decimal::ONE => true,
        S::Decimal(d) if d.is_zero() => false,
        S::String(s) => match s.to_lowercase().as_str() {
            "true" | "t" | "yes" | "y" | "1" | "1.0" => true,
            "false" | "f" | "no" | "n" | "0" | "0.0" => false,
            _ => return None,
        },
        _ => return None,
    }))
}

fn to_integer<'a>(v: SystemValue<'a>) -> Option<SystemValue<'a>> {
    use SystemValue as S;
    match v {
        S::Integer(i) => Some(S::Integer(i)),
        S::Boolean(b) => Some(S::Integer(i64::from(b))),
        S::String(s) => {
            let t = s.strip_prefix(['+', '-']).unwrap_or(&s);
            if t.is_empty() || !t.bytes().all(|c| c.is_ascii_digit()) {
                return None;
            }
            s.parse::<i32>().ok().map(|i| S::Integer(i64::from(i)))
        }
        _ => None,
    }
}

fn is_decimal_text(s: &str) -> bool {
    let t = s.strip_prefix(['+', '-']).unwrap_or(s);
    let (int, frac) = match t.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (t, None),
    };
    !int.is_empty()
        && int.bytes().all(|c| c.is_ascii_digit())
        && frac.is_none_or(|f| !f.is_empty() && f.bytes().all(|c| c.is_ascii_digit()))
}

fn to_decimal<'a>(v: SystemValue<'a>) -> Option<SystemValue<'a>> {
    use SystemValue as S;
    match v {
        S::Integer(i) => Some(S::Decimal(Decimal::from(i))),
        S::Decimal(d) => Some(S::Decimal(d)),
        S::Boolean(b) => Some(S::Decimal(if b { Decimal::ONE } else { Decimal::ZERO })),
        S::String(s) if is_decimal_text(&s) => s.parse().ok().map(S::Decimal),
        _ => None,
    }
}

fn to_string<'a>(v: SystemValue<'a>) -> Option<SystemValue<'a>> {
    match v {
        SystemValue::String(s) => Some(SystemValue::String(s)),
        SystemValue::TypeInfo { .. } => None,
        other => Some(SystemValue::String(Cow::Owned(other.to_string()))),
    }
}

pub(super) fn to_temporal<'a>(v: SystemValue<'a>, kind: TemporalKind) -> Option<SystemValue<'a>> {
    use SystemValue as S;
    let t = match (v, kind) {
        (S::Date(t) | S::DateTime(t), TemporalKind::Date | TemporalKind::DateTime) => {
            t.with_kind(kind)
        }
        (S::Time(t), TemporalKind::Time) => t,
        (S::String(s), TemporalKind::Time) => Temporal::parse_time(&s)?,
        (S::String(s), _) => {
            let t = Temporal::parse_datetime(&s)?;
            t.with_kind(kind)
        }
        _ => return None,
    };
    Some(SystemValue::temporal(t))
}

fn to_quantity<'a>(v: SystemValue<'a>) -> Option<SystemValue<'a>> {
    use SystemValue as S;
    Some(S::Quantity(match v {
        S::Quantity(q) => q,
        S::Integer(i) => Quantity::new(Decimal::from(i), "1"),
        S::Decimal(d) => Quantity::new(d, "1"),
        S::Boolean(b) => Quantity::new(if b { Decimal::ONE } else { Decimal::ZERO }, "1"),
        S::String(s) => {
            let s = s.trim();
            let split = s
                .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
                .unwrap_or(s.len());
            let (n, rest) = s.split_at(split);
            if !is_decimal_text(n) {
                return None;
            }
            let value: Decimal = n.parse().ok()?;
            let rest = rest.trim();
            let unit = if rest.is_empty() {
                "1".to_string()
            } else if let Some(u) = rest.strip_prefix('\'').and_then(|r| r.strip_suffix('\'')) {
                u.to_string()
            } else {
                calendar_unit(rest)?.to_string()
            };
            Quantity::new(value, unit)
        }
        _ => return None,
    }))
}
