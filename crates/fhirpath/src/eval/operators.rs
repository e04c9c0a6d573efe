//! Binary operators: boolean logic, equality, comparison, membership, arithmetic (FHIRPath §6).

use std::cmp::Ordering;

use rust_decimal::Decimal;
use rust_decimal::prelude::{FromPrimitive, ToPrimitive};

use crate::compare::{compare, equals, equivalent};
use crate::error::EvalError;
use crate::node::Item;
use crate::parser::{BinOp, Expr};
use crate::quantity::{Quantity, is_calendar, ucum_to_calendar};
use crate::temporal::TemporalKind;
use crate::value::SystemValue;

use super::{
    Env, R, b, distinct, eval, integer, opt_b, single, single_string, single_sys, singleton_bool,
    val,
};

pub(super) fn binary<'a>(
    op: BinOp,
    l: &Expr,
    r: &Expr,
    env: &Env<'_, 'a>,
    input: &[Item<'a>],
) -> R<'a> {
    // Short-circuit the boolean operators where the left side decides.
    match op {
        BinOp::And | BinOp::Or | BinOp::Implies | BinOp::Xor => {
            let lv = singleton_bool(&eval(l, env, input)?)?;
            match (op, lv) {
                (BinOp::And, Some(false)) => return b(false),
                (BinOp::Or, Some(true)) => return b(true),
                (BinOp::Implies, Some(false)) => return b(true),
                _ => {}
            }
            let rv = singleton_bool(&eval(r, env, input)?)?;
            return opt_b(match op {
                BinOp::And => match (lv, rv) {
                    (_, Some(false)) => Some(false),
                    (Some(true), Some(true)) => Some(true),
                    _ => None,
                },
                BinOp::Or => match (lv, rv) {
                    (_, Some(true)) => Some(true),
                    (Some(false), Some(false)) => Some(false),
                    _ => None,
                },
                BinOp::Xor => match (lv, rv) {
                    (Some(x), Some(y)) => Some(x != y),
                    _ => None,
                },
                _ => match (lv, rv) {
                    (Some(true), r) => r,
                    (None, Some(true)) => Some(true),
                    _ => None,
                },
            });
        }
        _ => {}
    }
    let lv = eval(l, env, input)?;
    let rv = eval(r, env, input)?;
    match op {
        BinOp::Union => {
            let mut all = lv;
            all.extend(rv);
            env.spend_pairs(all.len(), all.len())?;
            Ok(distinct(all))
        }
        BinOp::Eq | BinOp::NotEq => {
            if lv.is_empty() || rv.is_empty() {
                return Ok(Vec::new());
            }
            let mut res = Some(lv.len() == rv.len());
            if res == Some(true) {
                for (x, y) in lv.iter().zip(&rv) {
                    // Two strings are compared byte by byte: `=` of two 1 MiB strings is no
                    // one-unit step (a review compared them 500,000 times per resource).
                    if let (Some(SystemValue::String(p)), Some(SystemValue::String(q))) =
                        (x.to_system(), y.to_system())
                    {
                        env.spend(super::string_units(p.len().min(q.len())))?;
                    }
                    match equals(x, y) {
                        Some(true) => {}
                        Some(false) => {
                            res = Some(false);
                            break;
                        }
                        None => res = None,
                    }
                }
            }
            opt_b(if op == BinOp::NotEq {
                res.map(|x| !x)
            } else {
                res
            })
        }
        BinOp::Equiv | BinOp::NotEquiv => {
            let res = if lv.is_empty() && rv.is_empty() {
                true
            } else if lv.len() != rv.len() {
                false
            } else {
                lv.iter().all(|x| rv.iter().any(|y| equivalent(x, y)))
            };
            b(if op == BinOp::NotEquiv { !res } else { res })
        }
        BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge => {
            let (Some(x), Some(y)) = (single(&lv, "comparison")?, single(&rv, "comparison")?)
            else {
                return Ok(Vec::new());
            };
            let Some(o) = compare(x, y)? else {
                return Ok(Vec::new());
            };
            b(match op {
                BinOp::Lt => o == Ordering::Less,
                BinOp::Le => o != Ordering::Greater,
                BinOp::Gt => o == Ordering::Greater,
                _ => o != Ordering::Less,
            })
        }
        BinOp::In | BinOp::Contains => {
            let (needle, hay) = if op == BinOp::In {
                (&lv, &rv)
            } else {
                (&rv, &lv)
            };
            let Some(x) = single(needle, "in/contains")? else {
                return Ok(Vec::new());
            };
            b(hay.iter().any(|h| equals(x, h) == Some(true)))
        }
        BinOp::Concat => {
            let x = single_string(&lv, "&")?.unwrap_or_default();
            let y = single_string(&rv, "&")?.unwrap_or_default();
            env.afford_string(x.len().saturating_add(y.len()))?;
            Ok(vec![Item::string(format!("{x}{y}"))])
        }
        _ => {
            let (Some(x), Some(y)) = (
                single_sys(&lv, "arithmetic")?,
                single_sys(&rv, "arithmetic")?,
            ) else {
                if single(&lv, "arithmetic")?.is_some() && single(&rv, "arithmetic")?.is_some() {
                    return Err(EvalError::ty("arithmetic on non-primitive values"));
                }
                return Ok(Vec::new());
            };
            if let (BinOp::Add, SystemValue::String(p), SystemValue::String(q)) = (op, &x, &y) {
                env.afford_string(p.len().saturating_add(q.len()))?;
            }
            arithmetic(op, x, y)
        }
    }
}

pub(super) fn dec(v: &SystemValue<'_>) -> Option<Decimal> {
    match v {
        SystemValue::Integer(i) => Some(Decimal::from(*i)),
        SystemValue::Decimal(d) => Some(*d),
        _ => None,
    }
}

pub(super) fn arithmetic<'a>(op: BinOp, x: SystemValue<'a>, y: SystemValue<'a>) -> R<'a> {
    use SystemValue as S;
    let none = || Ok(Vec::new());
    match (op, &x, &y) {
        (BinOp::Add, S::String(p), S::String(q)) => {
            return Ok(vec![Item::string(format!("{p}{q}"))]);
        }
        (BinOp::Add | BinOp::Sub, S::Date(t) | S::DateTime(t) | S::Time(t), S::Quantity(q)) => {
            let unit = if is_calendar(&q.unit) {
                q.unit.as_str()
            } else {
                match ucum_to_calendar(&q.unit) {
                    Some(u) => u,
                    None => {
                        return Err(EvalError::ty(format!(
                            "cannot add '{}' to a date/time",
                            q.unit
                        )));
                    }
                }
            };
            let amount = if op == BinOp::Sub { -q.value } else { q.value };
            if t.kind == TemporalKind::Time && matches!(unit, "year" | "month" | "week" | "day") {
                return Err(EvalError::ty("cannot add a date unit to a Time"));
            }
            return match t.add(amount, unit) {
                Some(r) => val(SystemValue::temporal(r)),
                None => none(),
            };
        }
        (_, S::Integer(p), S::Integer(q)) => {
            let r = match op {
                BinOp::Add => p.checked_add(*q),
                BinOp::Sub => p.checked_sub(*q),
                BinOp::Mul => p.checked_mul(*q),
                BinOp::IntDiv => p.checked_div(*q),
                BinOp::Mod => p.checked_rem(*q),
                BinOp::Div => {
                    if *q == 0 {
                        return none();
                    }
                    return match Decimal::from(*p).checked_div(Decimal::from(*q)) {
                        Some(d) => val(S::Decimal(d.normalize())),
                        None => none(),
                    };
                }
                _ => None,
            };
            return integer(r);
        }
        (_, S::Quantity(p), S::Quantity(q)) => return quantity_arith(op, p, q),
        (BinOp::Add | BinOp::Sub, S::Quantity(p), n) if dec(n).is_some() => {
            let n = dec(n).unwrap_or_default();
            return quantity_arith(op, p, &Quantity::new(n, "1"));
        }
        (BinOp::Add | BinOp::Sub | BinOp::Div, n, S::Quantity(q)) if dec(n).is_some() => {
            let n = dec(n).unwrap_or_default();
            return quantity_arith(op, &Quantity::new(n, "1"), q);
        }
        (BinOp::Mul | BinOp::Div, S::Quantity(p), n) if dec(n).is_some() => {
            let n = dec(n).unwrap_or_default();
            return quantity_arith(op, p, &Quantity::new(n, "1"));
        }
        (BinOp::Mul, n, S::Quantity(q)) if dec(n).is_some() => {
            let n = dec(n).unwrap_or_default();
            return quantity_arith(op, &Quantity::new(n, "1"), q);
        }
        _ => {}
    }
    let (Some(p), Some(q)) = (dec(&x), dec(&y)) else {
        return Err(EvalError::ty(format!(
            "cannot apply {op:?} to {} and {}",
            x.type_name(),
            y.type_name()
        )));
    };
    let r = match op {
        BinOp::Add => p.checked_add(q),
        BinOp::Sub => p.checked_sub(q),
        BinOp::Mul => p.checked_mul(q),
        BinOp::Div => {
            if q.is_zero() {
                None
            } else {
                p.checked_div(q)
            }
        }
        BinOp::IntDiv => {
            if q.is_zero() {
                return none();
            }
            return integer(p.checked_div(q).and_then(|d| d.trunc().to_i64()));
        }
        BinOp::Mod => {
            if q.is_zero() {
                None
            } else {
                p.checked_rem(q)
            }
        }
        _ => None,
    };
    match r {
        Some(d) => val(S::Decimal(d)),
        None => none(),
    }
}

fn quantity_arith<'a>(op: BinOp, p: &Quantity, q: &Quantity) -> R<'a> {
    let none = || Ok(Vec::new());
    match op {
        BinOp::Add | BinOp::Sub => {
            // The result is expressed in the finer of the two units (`7 days + 12 hours` = 180 hours).
            if let Some(r) = Quantity::unit_ratio(ucum_of(&q.unit), ucum_of(&p.unit))
                && r < 1.0
                && let Some(p2) = p.convert_to(&q.unit)
            {
                return quantity_arith(op, &p2, q);
            }
            let Some(q2) = q.convert_to(&p.unit) else {
                return Err(EvalError::ty(format!(
                    "incompatible units '{}' and '{}'",
                    p.unit, q.unit
                )));
            };
            let v = if op == BinOp::Add {
                p.value.checked_add(q2.value)
            } else {
                p.value.checked_sub(q2.value)
            };
            match v {
                Some(v) => val(SystemValue::Quantity(Quantity::new(v, p.unit.clone()))),
                None => none(),
            }
        }
        BinOp::Mul | BinOp::Div => {
            let pu = ucum_of(&p.unit);
            let qu = ucum_of(&q.unit);
            // Same dimension: convert so the units cancel (`2 'm' / 1 'cm'`).
            let (qv, unit) = match Quantity::unit_ratio(qu, pu) {
                Some(ratio) if op == BinOp::Div && pu != "1" => {
                    let v = Decimal::from_f64(q.value.to_f64().unwrap_or(0.0) * ratio)
                        .unwrap_or(q.value);
                    (v, "1".to_string())
                }
                _ => (q.value, Quantity::combine_unit(pu, qu, op == BinOp::Div)),
            };
            let v = if op == BinOp::Mul {
                p.value.checked_mul(qv)
            } else if qv.is_zero() {
                None
            } else {
                p.value.checked_div(qv)
            };
            match v {
                Some(v) => val(SystemValue::Quantity(Quantity::new(v.normalize(), unit))),
                None => none(),
            }
        }
        _ => Err(EvalError::ty("unsupported quantity operation")),
    }
}

fn ucum_of(unit: &str) -> &str {
    match unit {
        "week" => "wk",
        "day" => "d",
        "hour" => "h",
        "minute" => "min",
        "second" => "s",
        "millisecond" => "ms",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::eval::probe::eval;

    #[test]
    fn integer_operators_stay_within_32_bits() {
        for src in [
            "2147483647 + 1",
            "-(0 - 2147483647 - 1)",
            "10000000000.0 div 1",
        ] {
            assert_eq!(eval(src).unwrap(), Vec::<serde_json::Value>::new(), "{src}");
        }
        assert_eq!(eval("7.5 div 2").unwrap(), vec![json!(3)]);
        assert_eq!(eval("'ab' + 'c' & 'd'").unwrap(), vec![json!("abcd")]);
    }
}
