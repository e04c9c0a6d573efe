//! Math functions (FHIRPath §5.7) and `comparable()` of quantities.

use rust_decimal::Decimal;
use rust_decimal::prelude::{FromPrimitive, ToPrimitive};

use crate::error::EvalError;
use crate::functions::Builtin;
use crate::node::Item;
use crate::parser::Expr;
use crate::quantity::Quantity;
use crate::value::SystemValue;

use super::{Env, R, b, eval, misrouted, single_int, single_sys, val};

use super::operators::dec;

/// `abs()` … `power()`, `comparable()`.
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
        F::Abs
        | F::Ceiling
        | F::Exp
        | F::Floor
        | F::Ln
        | F::Sqrt
        | F::Truncate
        | F::Round
        | F::Log
        | F::Power => math(f, &focus, args, env, input),
        F::Comparable => {
            let (Some(S::Quantity(p)), Some(S::Quantity(q))) = (
                single_sys(&focus, "comparable")?,
                single_sys(&eval(&args[0], env, input)?, "comparable")?,
            ) else {
                return Ok(Vec::new());
            };
            b(p.compare(&q).is_some())
        }
        _ => Err(misrouted(f)),
    }
}

fn math<'a>(
    f: Builtin,
    focus: &[Item<'a>],
    args: &[Expr],
    env: &Env<'_, 'a>,
    input: &[Item<'a>],
) -> R<'a> {
    use Builtin as F;
    use SystemValue as S;
    let Some(v) = single_sys(focus, f.name())? else {
        return Ok(Vec::new());
    };
    let d = match &v {
        S::Integer(i) => Decimal::from(*i),
        S::Decimal(d) => *d,
        S::Quantity(q) if matches!(f, F::Abs | F::Ceiling | F::Floor | F::Truncate | F::Round) => {
            // Rounding functions keep the unit.
            let r = math(f, &[Item::Value(S::Decimal(q.value))], args, env, input)?;
            return Ok(
                match r.first().and_then(Item::to_system).as_ref().and_then(dec) {
                    Some(v) => vec![Item::Value(S::Quantity(Quantity::new(v, q.unit.clone())))],
                    None => Vec::new(),
                },
            );
        }
        other => {
            return Err(EvalError::ty(format!(
                "{}(): expected a number, found {}",
                f.name(),
                other.type_name()
            )));
        }
    };
    let is_int = matches!(v, S::Integer(_));
    let float = |x: f64| -> R<'a> {
        if x.is_finite() {
            match Decimal::from_f64(x) {
                Some(d) => val(S::Decimal(d)),
                None => Ok(Vec::new()),
            }
        } else {
            Ok(Vec::new())
        }
    };
    let fx = d.to_f64().unwrap_or(f64::NAN);
    match f {
        F::Abs => {
            if is_int {
                val(S::Integer(d.abs().to_i64().unwrap_or(0)))
            } else {
                val(S::Decimal(d.abs()))
            }
        }
        F::Ceiling => val(S::Integer(d.ceil().to_i64().unwrap_or(0))),
        F::Floor => val(S::Integer(d.floor().to_i64().unwrap_or(0))),
        F::Truncate => val(S::Integer(d.trunc().to_i64().unwrap_or(0))),
        F::Exp => float(fx.exp()),
        F::Ln => {
            if fx <= 0.0 {
                return Ok(Vec::new());
            }
            float(fx.ln())
        }
        F::Sqrt => {
            if fx < 0.0 {
                return Ok(Vec::new());
            }
            float(fx.sqrt())
        }
        F::Log => {
            let Some(base) = single_sys(&eval(&args[0], env, input)?, "log")? else {
                return Ok(Vec::new());
            };
            let Some(bd) = dec(&base) else {
                return Err(EvalError::ty("log(): base must be a number"));
            };
            let bx = bd.to_f64().unwrap_or(f64::NAN);
            if fx <= 0.0 || bx <= 0.0 || bx == 1.0 {
                return Ok(Vec::new());
            }
            float(fx.ln() / bx.ln())
        }
        F::Power => {
            let Some(e) = single_sys(&eval(&args[0], env, input)?, "power")? else {
                return Ok(Vec::new());
            };
            if let (S::Integer(base), S::Integer(exp)) = (&v, &e)
                && *exp >= 0
            {
                return match u32::try_from(*exp).ok().and_then(|x| base.checked_pow(x)) {
                    Some(r) => val(S::Integer(r)),
                    None => Ok(Vec::new()),
                };
            }
            let Some(ed) = dec(&e) else {
                return Err(EvalError::ty("power(): exponent must be a number"));
            };
            let r = fx.powf(ed.to_f64().unwrap_or(f64::NAN));
            if r.is_nan() {
                return Ok(Vec::new());
            }
            float(r)
        }
        F::Round => {
            let p = match args.first() {
                Some(a) => single_int(&eval(a, env, input)?, "round")?.unwrap_or(0),
                None => 0,
            };
            if p < 0 {
                return Err(EvalError::ty("round(): precision must be >= 0"));
            }
            val(S::Decimal(d.round_dp_with_strategy(
                p as u32,
                rust_decimal::RoundingStrategy::MidpointAwayFromZero,
            )))
        }
        _ => Ok(Vec::new()),
    }
}
