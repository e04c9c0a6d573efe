//! Aggregates: `aggregate()`, `sum()`, `min()`, `max()`, `avg()` and `sort()`.

use std::cmp::Ordering;

use crate::compare::compare;
use crate::error::EvalError;
use crate::functions::Builtin;
use crate::node::Item;
use crate::parser::{BinOp, Expr};
use crate::value::SystemValue;

use super::{Env, R, eval, lambda, misrouted, val, valueless};

use super::operators::{arithmetic, dec};
use rust_decimal::Decimal;

/// `aggregate()`, `sum()` … `avg()`, `sort()`.
pub(super) fn call<'a>(
    f: Builtin,
    focus: Vec<Item<'a>>,
    args: &[Expr],
    env: &Env<'_, 'a>,
    input: &[Item<'a>],
) -> R<'a> {
    use Builtin as F;

    match f {
        F::Aggregate => {
            let mut total = match args.get(1) {
                Some(init) => eval(init, env, input)?,
                None => Vec::new(),
            };
            for (i, item) in focus.iter().enumerate() {
                let sub = Env {
                    ctx: env.ctx,
                    this: item.clone(),
                    index: Some(i),
                    total: Some(&total),
                    work: env.work,
                };
                let next = eval(&args[0], &sub, std::slice::from_ref(item))?;
                total = next;
            }
            Ok(total)
        }
        F::Sum | F::Min | F::Max | F::Avg => aggregate_simple(f, focus),
        F::Sort => sort(focus, args.first(), env),
        _ => Err(misrouted(f)),
    }
}

fn aggregate_simple<'a>(f: Builtin, focus: Vec<Item<'a>>) -> R<'a> {
    use SystemValue as S;
    if focus.iter().any(valueless) {
        return Ok(Vec::new());
    }
    let vals: Vec<SystemValue<'a>> = focus.iter().filter_map(|i| i.to_system()).collect();
    if vals.is_empty() || vals.len() != focus.len() {
        return Ok(Vec::new());
    }
    if matches!(f, Builtin::Sum | Builtin::Avg)
        && !vals.iter().all(|v| {
            matches!(
                v,
                SystemValue::Integer(_) | SystemValue::Decimal(_) | SystemValue::Quantity(_)
            )
        })
    {
        return Err(EvalError::ty(format!(
            "{}(): expected numbers or quantities",
            f.name()
        )));
    }
    if f == Builtin::Avg
        && vals
            .iter()
            .all(|v| matches!(v, S::Integer(_) | S::Decimal(_)))
    {
        return average(&vals);
    }
    match f {
        Builtin::Sum | Builtin::Avg => {
            let mut acc: Option<SystemValue<'a>> = None;
            for v in &vals {
                acc = Some(match acc {
                    None => v.clone(),
                    Some(a) => {
                        let r = arithmetic(BinOp::Add, a, v.clone())?;
                        match r.into_iter().next().and_then(|i| i.to_system()) {
                            Some(x) => x,
                            None => return Ok(Vec::new()),
                        }
                    }
                });
            }
            let Some(total) = acc else {
                return Ok(Vec::new());
            };
            if f == Builtin::Sum {
                return val(total);
            }
            arithmetic(BinOp::Div, total, S::Integer(vals.len() as i64))
        }
        _ => {
            let mut best = focus[0].clone();
            for i in focus.iter().skip(1) {
                let o = compare(i, &best)?;
                let better = match o {
                    Some(Ordering::Less) => f == Builtin::Min,
                    Some(Ordering::Greater) => f == Builtin::Max,
                    _ => false,
                };
                if better {
                    best = i.clone();
                }
            }
            Ok(vec![best])
        }
    }
}

/// `avg()` of numbers, summed as Decimals: the Integer sum of Integers may leave the 32-bit range
/// (and so be empty) although their average cannot. The result is a Decimal, normalized when every
/// item is an Integer, as `Integer / Integer` is.
fn average<'a>(vals: &[SystemValue<'a>]) -> R<'a> {
    let mut total = Decimal::ZERO;
    for v in vals {
        let Some(next) = dec(v).and_then(|d| total.checked_add(d)) else {
            return Ok(Vec::new());
        };
        total = next;
    }
    let Some(avg) = total.checked_div(Decimal::from(vals.len())) else {
        return Ok(Vec::new());
    };
    let all_integers = vals.iter().all(|v| matches!(v, SystemValue::Integer(_)));
    val(SystemValue::Decimal(if all_integers {
        avg.normalize()
    } else {
        avg
    }))
}

fn sort<'a>(focus: Vec<Item<'a>>, crit: Option<&Expr>, env: &Env<'_, 'a>) -> R<'a> {
    let (expr, desc) = match crit {
        Some(Expr::Neg(inner)) => (Some(inner.as_ref()), true),
        Some(e) => (Some(e), false),
        None => (None, false),
    };
    let mut keyed = Vec::with_capacity(focus.len());
    for (i, item) in focus.into_iter().enumerate() {
        let mut key = match expr {
            Some(e) => lambda(e, env, &item, i)?,
            None => vec![item.clone()],
        };
        // A key without a value sorts as an empty one instead of failing the comparison.
        if key.first().is_some_and(valueless) {
            key.clear();
        }
        keyed.push((key, item));
    }
    let mut err = None;
    keyed.sort_by(|(a, _), (b, _)| {
        let o = match (a.first(), b.first()) {
            (None, None) => Ordering::Equal,
            (None, Some(_)) => Ordering::Less,
            (Some(_), None) => Ordering::Greater,
            (Some(x), Some(y)) => match compare(x, y) {
                Ok(Some(o)) => o,
                Ok(None) => Ordering::Equal,
                Err(e) => {
                    err = Some(e);
                    Ordering::Equal
                }
            },
        };
        if desc { o.reverse() } else { o }
    });
    if let Some(e) = err {
        return Err(e);
    }
    Ok(keyed.into_iter().map(|(_, i)| i).collect())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::eval::probe::eval;

    /// The sum of two large Integers leaves the 32-bit range, their average does not: `avg()`
    /// used to be empty because it summed as Integers.
    #[test]
    fn avg_does_not_overflow_where_its_result_fits() {
        assert_eq!(
            eval("(2147483647 | 2147483646).avg()").unwrap(),
            vec![json!(2147483646.5)]
        );
        assert_eq!(eval("(1 | 2).avg()").unwrap(), vec![json!(1.5)]);
        assert_eq!(eval("(1 | 3).avg()").unwrap(), vec![json!(2)]);
        assert_eq!(eval("(1.0 | 2).avg()").unwrap(), vec![json!(1.5)]);
        // `sum()` is an Integer, so it still overflows like `+`.
        assert!(eval("(2147483647 | 1).sum()").unwrap().is_empty());
    }
}
