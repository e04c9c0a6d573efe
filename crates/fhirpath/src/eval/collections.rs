//! Existence, filtering, subsetting and combining functions (FHIRPath §5.1-5.4).

use crate::error::EvalError;
use crate::functions::Builtin;
use crate::node::Item;
use crate::parser::Expr;
use crate::value::SystemValue;

use super::{
    Env, R, b, contains_item, distinct, eval, lambda, misrouted, single_int, singleton_bool, val,
};

/// `empty()` … `combine()`.
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
        F::Empty => b(focus.is_empty()),
        F::Exists => {
            if let Some(crit) = args.first() {
                for (i, item) in focus.iter().enumerate() {
                    if singleton_bool(&lambda(crit, env, item, i)?)? == Some(true) {
                        return b(true);
                    }
                }
                return b(false);
            }
            b(!focus.is_empty())
        }
        F::All => {
            for (i, item) in focus.iter().enumerate() {
                if singleton_bool(&lambda(&args[0], env, item, i)?)? != Some(true) {
                    return b(false);
                }
            }
            b(true)
        }
        F::AllTrue | F::AnyTrue | F::AllFalse | F::AnyFalse => {
            let mut bools = Vec::with_capacity(focus.len());
            for i in &focus {
                match i.to_system() {
                    Some(S::Boolean(x)) => bools.push(x),
                    _ => return Err(EvalError::ty(format!("{}: expected Booleans", f.name()))),
                }
            }
            b(match f {
                F::AllTrue => bools.iter().all(|x| *x),
                F::AnyTrue => bools.iter().any(|x| *x),
                F::AllFalse => bools.iter().all(|x| !*x),
                _ => bools.iter().any(|x| !*x),
            })
        }
        F::SubsetOf | F::SupersetOf => {
            let other = eval(&args[0], env, input)?;
            let (small, big) = if f == F::SubsetOf {
                (&focus, &other)
            } else {
                (&other, &focus)
            };
            env.spend_pairs(small.len(), big.len())?;
            b(small.iter().all(|x| contains_item(big, x)))
        }
        F::Count => val(S::Integer(focus.len() as i64)),
        F::Distinct => {
            env.spend_pairs(focus.len(), focus.len())?;
            Ok(distinct(focus))
        }
        F::IsDistinct => {
            let n = focus.len();
            env.spend_pairs(n, n)?;
            b(distinct(focus).len() == n)
        }
        F::Where => {
            let mut out = Vec::new();
            for (i, item) in focus.iter().enumerate() {
                if singleton_bool(&lambda(&args[0], env, item, i)?)? == Some(true) {
                    out.push(item.clone());
                }
            }
            Ok(out)
        }
        F::Select => {
            let mut out = Vec::new();
            for (i, item) in focus.iter().enumerate() {
                out.extend(lambda(&args[0], env, item, i)?);
            }
            Ok(out)
        }
        F::Repeat => {
            let mut out: Vec<Item<'a>> = Vec::new();
            let mut queue = focus;
            while !queue.is_empty() {
                let mut next = Vec::new();
                for (i, item) in queue.iter().enumerate() {
                    let found = lambda(&args[0], env, item, i)?;
                    env.spend_pairs(found.len(), out.len())?;
                    for r in found {
                        if !contains_item(&out, &r) {
                            out.push(r.clone());
                            next.push(r);
                        }
                    }
                }
                queue = next;
            }
            Ok(out)
        }
        F::Single => match focus.len() {
            0 | 1 => Ok(focus),
            n => Err(EvalError::ty(format!("single(): {n} items"))),
        },
        F::First => Ok(focus.into_iter().take(1).collect()),
        F::Last => Ok(focus.last().cloned().into_iter().collect()),
        F::Tail => Ok(focus.into_iter().skip(1).collect()),
        F::Skip | F::Take => {
            let n = single_int(&eval(&args[0], env, input)?, f.name())?;
            let Some(n) = n else {
                return Ok(if f == F::Skip { focus } else { Vec::new() });
            };
            let n = usize::try_from(n.max(0)).unwrap_or(0);
            Ok(if f == F::Skip {
                focus.into_iter().skip(n).collect()
            } else {
                focus.into_iter().take(n).collect()
            })
        }
        F::Intersect => {
            let other = eval(&args[0], env, input)?;
            env.spend_pairs(focus.len(), other.len() + focus.len())?;
            Ok(distinct(
                focus
                    .into_iter()
                    .filter(|x| contains_item(&other, x))
                    .collect(),
            ))
        }
        F::Exclude => {
            let other = eval(&args[0], env, input)?;
            env.spend_pairs(focus.len(), other.len())?;
            Ok(focus
                .into_iter()
                .filter(|x| !contains_item(&other, x))
                .collect())
        }
        F::Union => {
            let mut all = focus;
            all.extend(eval(&args[0], env, input)?);
            env.spend_pairs(all.len(), all.len())?;
            Ok(distinct(all))
        }
        F::Combine => {
            let mut all = focus;
            all.extend(eval(&args[0], env, input)?);
            Ok(all)
        }
        _ => Err(misrouted(f)),
    }
}
