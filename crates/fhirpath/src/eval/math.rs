//! Math functions (FHIRPath §5.7) and `comparable()` of quantities.

use rust_decimal::Decimal;
use rust_decimal::prelude::{FromPrimitive, ToPrimitive};

use crate::error::EvalError;
use crate::functions::Builtin;
use crate::node::Item;
use crate::parser::Expr;
use crate::quantity::Quantity;
use crate::value::SystemValue;

use super::{Env, R, b, eval, integer, misrouted, single_int, single_sys, val};

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
        // Integer results outside the 32-bit range are empty, like an overflowing `+`.
        F::Abs => {
            if is_int {
                integer(d.abs().to_i64())
            } else {
                val(S::Decimal(d.abs()))
            }
        }
        F::Ceiling => integer(d.ceil().to_i64()),
        F::Floor => integer(d.floor().to_i64()),
        F::Truncate => integer(d.trunc().to_i64()),
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
                return integer(u32::try_from(*exp).ok().and_then(|x| base.checked_pow(x)));
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::eval::probe::eval;

    /// FHIRPath's Integer is 32-bit: a rounding or power whose result leaves that range is empty,
    /// as `2147483647 + 1` is. Out-of-range results used to be returned as 64-bit numbers, and
    /// beyond 64 bits as 0.
    #[test]
    fn integer_results_outside_32_bits_are_empty() {
        for src in [
            "99999999999999999999.5.floor()",
            "3000000000.5.floor()",
            "3000000000.5.ceiling()",
            "(0 - 3000000000.5).truncate()",
            "(0 - 2147483647 - 1).abs()",
            "2.power(40)",
            "(0 - 2147483647 - 1).abs().exists().not().not()",
        ] {
            let out = eval(src).unwrap();
            assert!(
                out.is_empty() || out == vec![json!(false)],
                "{src}: {out:?}"
            );
        }
        for (src, want) in [
            ("2147483647.5.floor()", json!(2147483647)),
            ("(0 - 2147483648.5).ceiling()", json!(-2147483648)),
            ("2.power(30)", json!(1073741824)),
            ("(0 - 5).abs()", json!(5)),
        ] {
            assert_eq!(eval(src).unwrap(), vec![want], "{src}");
        }
    }
}
