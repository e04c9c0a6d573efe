//! Utility functions: `iif()`, `trace()`, `not()` (FHIRPath §5.9, §6.5).

use crate::error::EvalError;
use crate::functions::Builtin;
use crate::node::Item;
use crate::parser::Expr;

use super::{Env, R, b, eval, lambda, misrouted, singleton_bool};

/// `iif()`, `trace()`, `not()`.
pub(super) fn call<'a>(
    f: Builtin,
    focus: Vec<Item<'a>>,
    args: &[Expr],
    env: &Env<'_, 'a>,
    input: &[Item<'a>],
) -> R<'a> {
    use Builtin as F;

    match f {
        F::Iif => {
            if focus.len() > 1 {
                return Err(EvalError::ty("iif(): focus has several items"));
            }
            let this = focus.first().cloned().unwrap_or_else(|| env.this.clone());
            let sub = Env {
                ctx: env.ctx,
                this: this.clone(),
                index: env.index,
                total: env.total,
                work: env.work,
            };
            let cin = if focus.is_empty() {
                input.to_vec()
            } else {
                focus
            };
            let cond = singleton_bool(&eval(&args[0], &sub, &cin)?)?;
            if cond == Some(true) {
                eval(&args[1], &sub, &cin)
            } else if let Some(other) = args.get(2) {
                eval(other, &sub, &cin)
            } else {
                Ok(Vec::new())
            }
        }
        F::Trace => {
            // Pure crate: tracing has no sink; evaluate the projection for its errors only.
            if let Some(p) = args.get(1) {
                for (i, item) in focus.iter().enumerate() {
                    lambda(p, env, item, i)?;
                }
            }
            Ok(focus)
        }
        F::Not => match singleton_bool(&focus)? {
            None => Ok(Vec::new()),
            Some(x) => b(!x),
        },
        _ => Err(misrouted(f)),
    }
}
