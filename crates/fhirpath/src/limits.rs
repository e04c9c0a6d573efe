//! Limits over many evaluations on one thread: a budget they share and a stop condition they
//! look at as they work.
//!
//! One evaluation is bounded by its own budget ([`crate::eval`]'s 4,000,000 units), but a caller
//! that evaluates many expressions per resource (a ViewDefinition's `where` clauses, columns and
//! `forEach`es, as many as the view lists) multiplies it: a review made one `$viewdefinition-run`
//! cost about an hour of CPU with each evaluation inside its budget. A caller sets a shared
//! budget for what belongs together ([`with_shared_budget`], e.g. one resource's rows) and a
//! stop condition ([`with_stop`], e.g. the client went away or a job was cancelled), and every
//! evaluation inside charges the shared budget too and looks at the condition every
//! [`CHECK_EVERY`] units (so also in the middle of one long evaluation).
//!
//! Thread-local: evaluations run on the caller's thread, and the evaluator's API stays as it is.

use std::cell::RefCell;
use std::rc::Rc;

use crate::EvalError;

/// Units an evaluation does between two looks at the shared budget and the stop condition.
pub(crate) const CHECK_EVERY: u64 = 1 << 12;

#[derive(Default)]
struct Scope {
    stop: Option<Rc<dyn Fn() -> bool>>,
    /// Units left of the shared budget, and the budget (for the error).
    shared: Option<(u64, u64)>,
}

thread_local! {
    static SCOPE: RefCell<Scope> = RefCell::new(Scope::default());
}

/// Runs `f` with `stop` looked at by every evaluation on this thread (besides any stop condition
/// already set by an enclosing call): once it answers true, evaluations end with
/// [`EvalError::Stopped`].
pub fn with_stop<T>(stop: Rc<dyn Fn() -> bool>, f: impl FnOnce() -> T) -> T {
    let outer = SCOPE.with(|s| s.borrow().stop.clone());
    let combined: Rc<dyn Fn() -> bool> = match outer.clone() {
        Some(o) => Rc::new(move || o() || stop()),
        None => stop,
    };
    SCOPE.with(|s| s.borrow_mut().stop = Some(combined));
    let mut outer = Some(outer);
    let _restore = OnDrop(move || {
        let outer = outer.take().flatten();
        SCOPE.with(|s| s.borrow_mut().stop = outer);
    });
    f()
}

/// Runs `f` with a budget of `units` shared by every evaluation on this thread: together they
/// may do at most that much work ([`EvalError::Budget`] beyond it). Replaces an enclosing shared
/// budget for the time of `f`.
pub fn with_shared_budget<T>(units: u64, f: impl FnOnce() -> T) -> T {
    let outer = SCOPE.with(|s| s.borrow_mut().shared.replace((units, units)));
    let _restore = OnDrop(move || SCOPE.with(|s| s.borrow_mut().shared = outer));
    f()
}

/// Runs its closure when dropped: the scope is restored also when `f` panics.
struct OnDrop<F: FnMut()>(F);

impl<F: FnMut()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

/// Charges `units` done by an evaluation to the shared budget and looks at the stop condition.
pub(crate) fn charge(units: u64) -> Result<(), EvalError> {
    SCOPE.with(|s| {
        let mut s = s.borrow_mut();
        if let Some((left, budget)) = &mut s.shared {
            if units > *left {
                *left = 0;
                return Err(EvalError::Budget(*budget));
            }
            *left -= units;
        }
        let stop = s.stop.clone();
        drop(s);
        match stop {
            Some(stop) if stop() => Err(EvalError::Stopped),
            _ => Ok(()),
        }
    })
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;
    use crate::{EvalContext, Expression};

    fn eval(src: &str) -> Result<usize, EvalError> {
        let doc = serde_json::json!({"resourceType": "Patient", "name": [{"given": ["a", "b"]}]});
        let e = Expression::compile(src).expect("compiles");
        e.evaluate(&EvalContext::new(&doc)).map(|v| v.len())
    }

    #[test]
    fn evaluations_share_a_budget_and_stop_when_asked() {
        // One evaluation of (1 | 2 ... ) repeated within its own budget, many of them not.
        let src = "(1 | 2 | 3 | 4).repeat($this).count()";
        assert!(eval(src).is_ok());
        let outcome = with_shared_budget(10_000, || {
            (0..1_000).map(|_| eval(src)).find(Result::is_err)
        });
        assert!(
            matches!(outcome, Some(Err(EvalError::Budget(10_000)))),
            "{outcome:?}"
        );
        // Outside, the evaluations are their own again.
        assert!(eval(src).is_ok());
        let asked = Rc::new(Cell::new(0u32));
        let seen = asked.clone();
        let stopped = with_stop(
            Rc::new(move || {
                seen.set(seen.get() + 1);
                true
            }),
            || eval("(1 | 2 | 3).repeat($this).select(descendants()).count()"),
        );
        // A small evaluation ends before a look: it is charged at its end, and stopped there.
        assert!(matches!(stopped, Err(EvalError::Stopped)), "{stopped:?}");
        assert!(asked.get() >= 1);
        assert!(eval(src).is_ok(), "the condition is gone with the scope");
    }
}
