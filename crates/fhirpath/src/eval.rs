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
use std::cell::Cell;

use crate::EvalContext;
use crate::compare::equals;
use crate::error::EvalError;
use crate::functions::Builtin;
use crate::node::Item;
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
    /// Work left to this evaluation (see [`BUDGET`]), shared by every nested environment.
    budget: &'c Cell<u64>,
}

/// The work one evaluation may do, in units: one per item any sub-expression produces, one per
/// 16 bytes of a computed string, one per item comparison of `distinct`, `union`,
/// `intersect`, `exclude`, `subsetOf` and `repeat`. A few thousand units are typical of a
/// resource; the budget stops expressions whose results grow without bound
/// (`repeat($this + 1)`, a string doubled in a loop, nested `select`s of `descendants()`) with
/// [`EvalError::Budget`] while their memory and time are still small.
pub(crate) const BUDGET: u64 = 4_000_000;

impl Env<'_, '_> {
    fn spend(&self, units: u64) -> Result<(), EvalError> {
        let left = self.budget.get();
        if units > left {
            self.budget.set(0);
            return Err(EvalError::Budget(BUDGET));
        }
        self.budget.set(left - units);
        Ok(())
    }

    /// The cost of comparing each of `a` items with each of `b`.
    fn spend_pairs(&self, a: usize, b: usize) -> Result<(), EvalError> {
        self.spend((a as u64).saturating_mul(b as u64))
    }

    fn spend_items(&self, items: &[Item<'_>]) -> Result<(), EvalError> {
        let mut units = items.len() as u64;
        for i in items {
            if let Item::Value(SystemValue::String(Cow::Owned(s))) = i {
                units += s.len() as u64 / 16;
            }
        }
        self.spend(units)
    }
}

pub(crate) fn evaluate<'a>(expr: &Expr, ctx: &EvalContext<'a>) -> R<'a> {
    let budget = Cell::new(BUDGET);
    let env = Env {
        ctx,
        this: ctx.focus.clone(),
        index: None,
        total: None,
        budget: &budget,
    };
    let input = [ctx.focus.clone()];
    eval(expr, &env, &input)
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
/// value-consuming operators and functions treat it as empty.
fn valueless(item: &Item<'_>) -> bool {
    matches!(item, Item::Node(n) if n.json().is_none())
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
                Some(SystemValue::Integer(i)) => match i.checked_neg() {
                    Some(n) => val(SystemValue::Integer(n)),
                    None => Ok(Vec::new()),
                },
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
                return Ok(descendants_of_type(&roots, spec));
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
        budget: env.budget,
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
