//! The evaluator: walks the compiled tree over collections of items.
//!
//! This file holds the environment, the tree walk (paths, variables, indexers, type operators)
//! and [`call`], which dispatches each builtin function to the module of its family:
//! [`collections`] (existence, filtering, subsetting, combining), [`conversion`], [`strings`],
//! [`math`], [`temporal`] (dates, times, precision and boundaries), [`types`], [`aggregate`],
//! [`tree`] (children, descendants, extension, resolve) and [`utility`] (iif, trace, not).
//! Binary operators are in [`operators`].

mod aggregate;
mod collections;
mod conversion;
mod math;
mod operators;
mod strings;
mod temporal;
mod tree;
mod types;
mod utility;

use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

use crate::EvalContext;
use crate::compare::equals;
use crate::error::EvalError;
use crate::functions::Builtin;
use crate::node::{Item, number_out_of_range};
use crate::parser::{Expr, Func};
use crate::quantity::Quantity;
use crate::value::SystemValue;

use operators::binary;
use tree::descendants_of_type;
use types::is_type;

type R<'a> = Result<Vec<Item<'a>>, EvalError>;

pub(crate) struct Env<'c, 'a> {
    ctx: &'c EvalContext<'a>,
    this: Item<'a>,
    index: Option<usize>,
    total: Option<&'c [Item<'a>]>,
    /// State of the whole evaluation, shared by every nested environment.
    work: &'c Work,
}

/// What one evaluation shares across its nested environments.
pub(crate) struct Work {
    /// Units left (see [`BUDGET`]).
    left: Cell<u64>,
    /// Patterns compiled at run time, by their final text (see [`Env::regex`]): a pattern computed
    /// by the expression is otherwise compiled again for every item it is applied to.
    regexes: RefCell<HashMap<String, Rc<regex::Regex>>>,
    /// Units spent and not yet charged to the caller's shared budget ([`crate::limits`]).
    unshared: Cell<u64>,
}

impl Work {
    fn new(units: u64) -> Self {
        Work {
            left: Cell::new(units),
            regexes: RefCell::new(HashMap::new()),
            unshared: Cell::new(0),
        }
    }

    /// Charges what is not charged yet to the caller's limits (every
    /// [`crate::limits::CHECK_EVERY`] units, and at the end of the evaluation).
    fn share(&self) -> Result<(), EvalError> {
        let units = self.unshared.replace(0);
        crate::limits::charge(units)
    }
}

/// The work one evaluation may do, in units: one per item any sub-expression produces, one per
/// 16 bytes of a computed string, one per item comparison of `distinct`, `union`,
/// `intersect`, `exclude`, `subsetOf` and `repeat`, one per 16 bytes of compiled program for a
/// regular expression compiled at run time. A few thousand units are typical of a
/// resource; the budget stops expressions whose results grow without bound
/// (`repeat($this + 1)`, a string doubled in a loop, nested `select`s of `descendants()`) with
/// [`EvalError::Budget`] while their memory and time are still small.
///
/// A step is charged for its result once it has built it ([`eval`]), so every step whose result
/// can be much larger than its (already charged) input first checks with [`Env::afford`] that
/// the budget can pay for it: no single step allocates much more than the budget allows
/// (a `replace` whose output is its input times the replacement would otherwise ask for
/// gigabytes before the charge).
pub(crate) const BUDGET: u64 = 4_000_000;

/// The units a computed string of `bytes` bytes costs.
fn string_units(bytes: usize) -> u64 {
    bytes as u64 / 16
}

/// The largest program a run-time pattern may compile to: the `regex` crate's default, which
/// patterns written as literals get when the expression is compiled.
const REGEX_SIZE_LIMIT: usize = 10 << 20;

/// The size limit of the first attempt at compiling a run-time pattern. Compile time grows with the
/// program's size, and a compile that outgrows its limit stops early, so a pattern is tried with
/// limits growing eightfold, each attempt charged for its limit: small patterns stay cheap and a
/// large one pays for what it costs. The limit also caps the cache its searches grow (2 MB by
/// default, per cached pattern); when that is too small the crate searches with another engine,
/// with the same results.
const REGEX_FIRST_LIMIT: usize = 64 << 10;

impl Env<'_, '_> {
    fn spend(&self, units: u64) -> Result<(), EvalError> {
        let left = self.work.left.get();
        if units > left {
            self.work.left.set(0);
            return Err(EvalError::Budget(BUDGET));
        }
        self.work.left.set(left - units);
        let unshared = self.work.unshared.get() + units;
        self.work.unshared.set(unshared);
        if unshared >= crate::limits::CHECK_EVERY {
            self.work.share()?;
        }
        Ok(())
    }

    /// Refuses, before anything is built, a result that would cost more than the units left. The
    /// charge itself comes when the step returns the result ([`eval`]).
    fn afford(&self, units: u64) -> Result<(), EvalError> {
        if units > self.work.left.get() {
            self.work.left.set(0);
            return Err(EvalError::Budget(BUDGET));
        }
        Ok(())
    }

    /// [`Env::afford`] for one computed string of `bytes` bytes.
    fn afford_string(&self, bytes: usize) -> Result<(), EvalError> {
        self.afford(string_units(bytes))
    }

    /// `pattern` compiled, from this evaluation's cache or charged to the budget (see
    /// [`REGEX_FIRST_LIMIT`]).
    fn regex(&self, pattern: &str) -> Result<Rc<regex::Regex>, EvalError> {
        if let Some(re) = self.work.regexes.borrow().get(pattern) {
            return Ok(Rc::clone(re));
        }
        let mut limit = REGEX_FIRST_LIMIT;
        loop {
            self.spend(string_units(limit))?;
            let built = regex::RegexBuilder::new(pattern)
                .size_limit(limit)
                .dfa_size_limit(limit)
                .build();
            match built {
                Ok(re) => {
                    let re = Rc::new(re);
                    self.work
                        .regexes
                        .borrow_mut()
                        .insert(pattern.to_string(), Rc::clone(&re));
                    return Ok(re);
                }
                Err(regex::Error::CompiledTooBig(_)) if limit < REGEX_SIZE_LIMIT => {
                    limit = limit.saturating_mul(8).min(REGEX_SIZE_LIMIT);
                }
                Err(e) => return Err(EvalError::ty(format!("invalid regex: {e}"))),
            }
        }
    }

    /// The cost of comparing each of `a` items with each of `b`.
    fn spend_pairs(&self, a: usize, b: usize) -> Result<(), EvalError> {
        self.spend((a as u64).saturating_mul(b as u64))
    }

    fn spend_items(&self, items: &[Item<'_>]) -> Result<(), EvalError> {
        let mut units = items.len() as u64;
        for i in items {
            if let Item::Value(SystemValue::String(Cow::Owned(s))) = i {
                units += string_units(s.len());
            }
        }
        self.spend(units)
    }
}

pub(crate) fn evaluate<'a>(expr: &Expr, ctx: &EvalContext<'a>) -> R<'a> {
    evaluate_with(expr, ctx, &Work::new(BUDGET))
}

fn evaluate_with<'a>(expr: &Expr, ctx: &EvalContext<'a>, work: &Work) -> R<'a> {
    let env = Env {
        ctx,
        this: ctx.focus.clone(),
        index: None,
        total: None,
        work,
    };
    let input = [ctx.focus.clone()];
    let out = eval(expr, &env, &input)?;
    work.share()?;
    Ok(out)
}

/// Singleton evaluation as a boolean (FHIRPath §4.5).
pub(crate) fn singleton_bool(items: &[Item<'_>]) -> Result<Option<bool>, EvalError> {
    match items {
        [] => Ok(None),
        [one] if valueless(one) => Ok(None),
        [one] => match one.to_system() {
            Some(SystemValue::Boolean(b)) => Ok(Some(b)),
            _ => Ok(Some(true)),
        },
        _ => Err(EvalError::ty(
            "expected a single boolean, found a collection of several items",
        )),
    }
}

/// A primitive that has only extensions (`"_given": [{…}]` with a null value) carries no value:
/// value-consuming operators and functions treat it as empty. So does a number no Decimal holds
/// (see [`number_out_of_range`]).
fn valueless(item: &Item<'_>) -> bool {
    matches!(item, Item::Node(n) if n.json().is_none() || number_out_of_range(n))
}

/// Like [`single`] but keeps a valueless primitive (type tests look at the node, not the value).
fn single_item<'x, 'a>(
    items: &'x [Item<'a>],
    what: &str,
) -> Result<Option<&'x Item<'a>>, EvalError> {
    match items {
        [] => Ok(None),
        [one] => Ok(Some(one)),
        _ => Err(EvalError::ty(format!(
            "{what}: expected a single item, found {}",
            items.len()
        ))),
    }
}

fn single<'x, 'a>(items: &'x [Item<'a>], what: &str) -> Result<Option<&'x Item<'a>>, EvalError> {
    match items {
        [] => Ok(None),
        [one] if valueless(one) => Ok(None),
        [one] => Ok(Some(one)),
        _ => Err(EvalError::ty(format!(
            "{what}: expected a single item, found {}",
            items.len()
        ))),
    }
}

fn single_sys<'a>(items: &[Item<'a>], what: &str) -> Result<Option<SystemValue<'a>>, EvalError> {
    match single(items, what)? {
        None => Ok(None),
        Some(i) => Ok(i.to_system()),
    }
}

fn single_string<'a>(items: &[Item<'a>], what: &str) -> Result<Option<Cow<'a, str>>, EvalError> {
    let Some(item) = single(items, what)? else {
        return Ok(None);
    };
    match item.to_system() {
        Some(SystemValue::String(s)) => Ok(Some(s)),
        _ => Err(EvalError::ty(format!(
            "{what}: expected a String, found {}",
            item.type_name()
        ))),
    }
}

fn single_int(items: &[Item<'_>], what: &str) -> Result<Option<i64>, EvalError> {
    match single_sys(items, what)? {
        None => Ok(None),
        Some(SystemValue::Integer(i)) => Ok(Some(i)),
        Some(other) => Err(EvalError::ty(format!(
            "{what}: expected an Integer, found {}",
            other.type_name()
        ))),
    }
}

/// An Integer result, empty outside FHIRPath's 32-bit Integer range (as for any overflow).
fn integer<'a>(i: Option<i64>) -> R<'a> {
    match i {
        Some(i) if i32::try_from(i).is_ok() => val(SystemValue::Integer(i)),
        _ => Ok(Vec::new()),
    }
}

fn b<'a>(v: bool) -> R<'a> {
    Ok(vec![Item::boolean(v)])
}

fn opt_b<'a>(v: Option<bool>) -> R<'a> {
    Ok(v.map(Item::boolean).into_iter().collect())
}

fn val<'a>(v: SystemValue<'a>) -> R<'a> {
    Ok(vec![Item::Value(v)])
}

fn contains_item(items: &[Item<'_>], x: &Item<'_>) -> bool {
    items.iter().any(|i| same_or_equal(i, x))
}

fn same_or_equal(a: &Item<'_>, b: &Item<'_>) -> bool {
    if let (Item::Node(x), Item::Node(y)) = (a, b)
        && x.same(y)
    {
        return true;
    }
    equals(a, b) == Some(true)
}

fn distinct<'a>(items: Vec<Item<'a>>) -> Vec<Item<'a>> {
    let mut out: Vec<Item<'a>> = Vec::with_capacity(items.len());
    for i in items {
        if !contains_item(&out, &i) {
            out.push(i);
        }
    }
    out
}

fn eval<'a>(expr: &Expr, env: &Env<'_, 'a>, input: &[Item<'a>]) -> R<'a> {
    let out = eval_node(expr, env, input)?;
    env.spend_items(&out)?;
    Ok(out)
}

fn eval_node<'a>(expr: &Expr, env: &Env<'_, 'a>, input: &[Item<'a>]) -> R<'a> {
    match expr {
        Expr::Empty => Ok(Vec::new()),
        Expr::Literal(v) => Ok(vec![Item::Value(v.clone())]),
        Expr::This => Ok(vec![env.this.clone()]),
        Expr::Index => Ok(env
            .index
            .map(|i| Item::Value(SystemValue::Integer(i as i64)))
            .into_iter()
            .collect()),
        Expr::Total => Ok(env.total.map(|t| t.to_vec()).unwrap_or_default()),
        Expr::Var(name) => variable(name, env),
        Expr::Member(base, name) => {
            let mut out = Vec::new();
            match base {
                Some(b) => {
                    let src = eval(b, env, input)?;
                    for item in &src {
                        member(item, name, &mut out);
                    }
                }
                None => {
                    // A resource type outside the model filters by its own name.
                    let own_type: Vec<_> = input
                        .iter()
                        .filter(|i| matches!(i, Item::Node(n) if n.fhir_type() == name.as_str()))
                        .cloned()
                        .collect();
                    if !own_type.is_empty() {
                        return Ok(own_type);
                    }
                    if name.starts_with(|c: char| c.is_ascii_uppercase())
                        && crate::typeinfo::info(name).is_some()
                    {
                        let filtered: Vec<_> = input
                            .iter()
                            .filter(|i| {
                                matches!(i, Item::Node(n) if n.info.is_some_and(|t| t.is_a(name)))
                            })
                            .cloned()
                            .collect();
                        if !filtered.is_empty() {
                            return Ok(filtered);
                        }
                    }
                    for item in input {
                        member(item, name, &mut out);
                    }
                }
            }
            Ok(out)
        }
        Expr::Indexer(base, idx) => {
            let items = eval(base, env, input)?;
            let i = eval(idx, env, input)?;
            let Some(i) = single_int(&i, "indexer")? else {
                return Ok(Vec::new());
            };
            Ok(usize::try_from(i)
                .ok()
                .and_then(|i| items.get(i).cloned())
                .into_iter()
                .collect())
        }
        Expr::Neg(e) => {
            let items = eval(e, env, input)?;
            match single_sys(&items, "unary -")? {
                None => Ok(Vec::new()),
                Some(SystemValue::Integer(i)) => integer(i.checked_neg()),
                Some(SystemValue::Decimal(d)) => val(SystemValue::Decimal(-d)),
                Some(SystemValue::Quantity(q)) => {
                    val(SystemValue::Quantity(Quantity::new(-q.value, q.unit)))
                }
                Some(other) => Err(EvalError::ty(format!(
                    "cannot negate {}",
                    other.type_name()
                ))),
            }
        }
        Expr::Is(e, spec) => {
            let items = eval(e, env, input)?;
            match single_item(&items, "is")? {
                None => Ok(Vec::new()),
                Some(i) => b(is_type(i, spec)),
            }
        }
        Expr::As(e, spec) => {
            let items = eval(e, env, input)?;
            if items.len() > 1 {
                return Err(EvalError::ty(format!(
                    "as: expected a single item, found {}",
                    items.len()
                )));
            }
            Ok(items.into_iter().filter(|i| is_type(i, spec)).collect())
        }
        Expr::Binary(op, l, r) => binary(*op, l, r, env, input),
        Expr::Call {
            base,
            func,
            args,
            regex,
        } => {
            // `descendants().ofType(T)`: filter while walking instead of materializing every node
            // (same items, same order).
            if let (Func::TypeTest(Builtin::OfType, spec), Some(b)) = (func, base)
                && let Expr::Call {
                    base: inner_base,
                    func: Func::Builtin(Builtin::Descendants),
                    ..
                } = b.as_ref()
            {
                let roots = match inner_base {
                    Some(ib) => eval(ib, env, input)?,
                    None => input.to_vec(),
                };
                return descendants_of_type(&roots, spec, env);
            }
            let focus = match base {
                Some(b) => eval(b, env, input)?,
                None => input.to_vec(),
            };
            match func {
                Func::Custom(entry) => {
                    let evaluated = eval_args(args, env, input)?;
                    (entry.func)(&focus, &evaluated)
                }
                Func::TypeTest(f, spec) => match f {
                    Builtin::Is => match single_item(&focus, "is()")? {
                        None => Ok(Vec::new()),
                        Some(i) => b(is_type(i, spec)),
                    },
                    Builtin::As if focus.len() > 1 => Err(EvalError::ty(format!(
                        "as(): expected a single item, found {}",
                        focus.len()
                    ))),
                    _ => Ok(focus.into_iter().filter(|i| is_type(i, spec)).collect()),
                },
                Func::Builtin(f) => call(*f, focus, args, regex.as_deref(), env, input),
            }
        }
    }
}

fn variable<'a>(name: &str, env: &Env<'_, 'a>) -> R<'a> {
    let ctx = env.ctx;
    let s = |v: String| Ok(vec![Item::string(v)]);
    match name {
        "resource" => Ok(vec![ctx.resource.clone()]),
        "rootResource" => Ok(vec![ctx.root_resource.clone()]),
        "context" => Ok(vec![ctx.focus.clone()]),
        "ucum" => s("http://unitsofmeasure.org".into()),
        "sct" => s("http://snomed.info/sct".into()),
        "loinc" => s("http://loinc.org".into()),
        _ => {
            if let Some((_, v)) = ctx.variables.iter().find(|(n, _)| n == name) {
                return Ok(v.clone());
            }
            if let Some(vs) = name.strip_prefix("vs-") {
                return s(format!("http://hl7.org/fhir/ValueSet/{vs}"));
            }
            if let Some(ext) = name.strip_prefix("ext-") {
                return s(format!("http://hl7.org/fhir/StructureDefinition/{ext}"));
            }
            Err(EvalError::UndefinedVariable(name.to_string()))
        }
    }
}

fn member<'a>(item: &Item<'a>, name: &str, out: &mut Vec<Item<'a>>) {
    match item {
        Item::Node(n) => n.push_children_named(name, out),
        Item::Value(SystemValue::TypeInfo {
            namespace,
            name: tn,
        }) => match name {
            "name" => out.push(Item::string(tn.clone())),
            "namespace" => out.push(Item::string(*namespace)),
            _ => {}
        },
        // A System Quantity exposes its parts like a FHIR Quantity.
        Item::Value(SystemValue::Quantity(q)) => match name {
            "value" => out.push(Item::Value(SystemValue::Decimal(q.value))),
            "unit" | "code" => out.push(Item::string(q.unit.clone())),
            _ => {}
        },
        Item::Value(_) => {}
    }
}

fn lambda<'a>(expr: &Expr, env: &Env<'_, 'a>, item: &Item<'a>, index: usize) -> R<'a> {
    let sub = Env {
        ctx: env.ctx,
        this: item.clone(),
        index: Some(index),
        total: env.total,
        work: env.work,
    };
    eval(expr, &sub, std::slice::from_ref(item))
}

fn eval_args<'a>(
    args: &[Expr],
    env: &Env<'_, 'a>,
    input: &[Item<'a>],
) -> Result<Vec<Vec<Item<'a>>>, EvalError> {
    args.iter().map(|a| eval(a, env, input)).collect()
}

/// A builtin function applied to `focus`: dispatch to its family's module.
fn call<'a>(
    f: Builtin,
    focus: Vec<Item<'a>>,
    args: &[Expr],
    regex: Option<&regex::Regex>,
    env: &Env<'_, 'a>,
    input: &[Item<'a>],
) -> R<'a> {
    use Builtin as F;
    match f {
        F::Empty
        | F::Exists
        | F::All
        | F::AllTrue
        | F::AnyTrue
        | F::AllFalse
        | F::AnyFalse
        | F::SubsetOf
        | F::SupersetOf
        | F::Count
        | F::Distinct
        | F::IsDistinct
        | F::Where
        | F::Select
        | F::Repeat
        | F::Single
        | F::First
        | F::Last
        | F::Tail
        | F::Skip
        | F::Take
        | F::Intersect
        | F::Exclude
        | F::Union
        | F::Combine => collections::call(f, focus, args, env, input),
        F::ToBoolean
        | F::ConvertsToBoolean
        | F::ToInteger
        | F::ConvertsToInteger
        | F::ToDecimal
        | F::ConvertsToDecimal
        | F::ToString
        | F::ConvertsToString
        | F::ToDate
        | F::ConvertsToDate
        | F::ToDateTime
        | F::ConvertsToDateTime
        | F::ToTime
        | F::ConvertsToTime
        | F::ToQuantity
        | F::ConvertsToQuantity => conversion::call(f, focus, args, env, input),
        F::IndexOf
        | F::LastIndexOf
        | F::Substring
        | F::StartsWith
        | F::EndsWith
        | F::Contains
        | F::Upper
        | F::Lower
        | F::Trim
        | F::ToChars
        | F::Length
        | F::Replace
        | F::Matches
        | F::MatchesFull
        | F::ReplaceMatches
        | F::Split
        | F::Join
        | F::Encode
        | F::Decode
        | F::Escape
        | F::Unescape => strings::call(f, focus, args, regex, env, input),
        F::Abs
        | F::Ceiling
        | F::Exp
        | F::Floor
        | F::Ln
        | F::Sqrt
        | F::Truncate
        | F::Round
        | F::Log
        | F::Power
        | F::Comparable => math::call(f, focus, args, env, input),
        F::Now
        | F::Today
        | F::TimeOfDay
        | F::YearOf
        | F::MonthOf
        | F::DayOf
        | F::HourOf
        | F::MinuteOf
        | F::SecondOf
        | F::MillisecondOf
        | F::TimezoneOffsetOf
        | F::DateOf
        | F::TimeOf
        | F::Precision
        | F::LowBoundary
        | F::HighBoundary => temporal::call(f, focus, args, env, input),
        F::Is
        | F::As
        | F::OfType
        | F::Type
        | F::HasValue
        | F::GetValue
        | F::ConformsTo
        | F::MemberOf
        | F::Subsumes
        | F::SubsumedBy
        | F::HtmlChecks
        | F::ElementDefinition
        | F::Slice
        | F::CheckModifiers => types::call(f, focus, args, env, input),
        F::Aggregate | F::Sum | F::Min | F::Max | F::Avg | F::Sort => {
            aggregate::call(f, focus, args, env, input)
        }
        F::Children | F::Descendants | F::Extension | F::Resolve => {
            tree::call(f, focus, args, env, input)
        }
        F::Iif | F::Trace | F::Not => utility::call(f, focus, args, env, input),
    }
}

/// The error of a family module given a builtin that [`call`] routes elsewhere (a bug in the
/// table above; no expression reaches it).
fn misrouted(f: Builtin) -> EvalError {
    EvalError::Unsupported(format!(
        "{}() (internal: dispatched to the wrong family)",
        f.name()
    ))
}

/// Test support: evaluation with a small budget, and the largest single allocation it made. A
/// step refused before it builds its result and one charged after building it end with the same
/// error; only the allocation tells them apart.
#[cfg(test)]
pub(crate) mod probe {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    use super::{EvalError, Work, evaluate_with};
    use crate::{EvalContext, Expression};

    struct Probe;

    thread_local! {
        static LARGEST: Cell<usize> = const { Cell::new(0) };
    }

    fn note(size: usize) {
        // `try_with`: the allocator also runs while a thread's locals are torn down.
        let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
    }

    // SAFETY: every call is forwarded unchanged to the system allocator.
    unsafe impl GlobalAlloc for Probe {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            note(layout.size());
            unsafe { System.alloc(layout) }
        }
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            note(layout.size());
            unsafe { System.alloc_zeroed(layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            note(new_size);
            unsafe { System.realloc(ptr, layout, new_size) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    #[global_allocator]
    static PROBE: Probe = Probe;

    /// Evaluates `src` on `doc` with `units` of budget; the results as JSON, and the largest
    /// allocation of the evaluation in bytes.
    pub(crate) fn run(
        doc: &serde_json::Value,
        src: &str,
        units: u64,
    ) -> (Result<Vec<serde_json::Value>, EvalError>, usize) {
        let expr = Expression::compile(src).expect("test expressions compile");
        let ctx = EvalContext::new(doc);
        let work = Work::new(units);
        LARGEST.with(|l| l.set(0));
        let out = evaluate_with(&expr.expr, &ctx, &work);
        let largest = LARGEST.with(Cell::get);
        (
            out.map(|v| v.iter().map(|i| i.as_json()).collect()),
            largest,
        )
    }

    /// [`run`] on a small Patient with the full budget, for tests of results.
    pub(crate) fn eval(src: &str) -> Result<Vec<serde_json::Value>, EvalError> {
        let doc = serde_json::json!({"resourceType": "Patient", "id": "p"});
        run(&doc, src, super::BUDGET).0
    }
}
