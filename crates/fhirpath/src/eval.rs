//! The evaluator: walks the compiled tree over collections of items.

use std::borrow::Cow;
use std::cell::Cell;
use std::cmp::Ordering;

use rust_decimal::Decimal;
use rust_decimal::prelude::{FromPrimitive, ToPrimitive};

use crate::EvalContext;
use crate::compare::{compare, equals, equivalent};
use crate::error::EvalError;
use crate::functions::Builtin;
use crate::node::Node;
use crate::parser::{BinOp, Expr, Func, TypeSpec};
use crate::quantity::{Quantity, calendar_unit, is_calendar, ucum_to_calendar};
use crate::temporal::{Precision, Temporal, TemporalKind};
use crate::value::{Item, SystemValue};

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

/// Breadth-first like `descendants()`, keeping only nodes of type `spec`; leaves without children
/// are tested and dropped at once.
fn descendants_of_type<'a>(roots: &[Item<'a>], spec: &TypeSpec) -> Vec<Item<'a>> {
    let mut out = Vec::new();
    let mut level: Vec<Item<'a>> = Vec::new();
    let leaves = spec.matches_leaves;
    for r in roots {
        if let Item::Node(n) = r {
            n.push_children_with(&mut level, leaves);
        }
    }
    let mut next = Vec::new();
    while !level.is_empty() {
        for item in level.drain(..) {
            if is_type(&item, spec) {
                out.push(item.clone());
            }
            if let Item::Node(n) = &item
                && n.has_children()
            {
                n.push_children_with(&mut next, leaves);
            }
        }
        std::mem::swap(&mut level, &mut next);
    }
    out
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

const SYSTEM_TYPES: [&str; 9] = [
    "Boolean", "String", "Integer", "Decimal", "Date", "DateTime", "Time", "Quantity", "Long",
];

pub(crate) fn is_type(item: &Item<'_>, spec: &TypeSpec) -> bool {
    let ns = spec.namespace.as_deref();
    let name = spec.name.as_str();
    match item {
        Item::Node(n) if !n.ty.is_empty() => {
            if ns == Some("System") {
                return false;
            }
            match (&spec.subtypes, n.info) {
                (Some(list), Some(i)) => list.contains(&(std::ptr::from_ref(i) as usize)),
                (None, Some(i)) => i.is_a(name),
                (_, None) => n.ty == name,
            }
        }
        _ => {
            if ns == Some("FHIR") {
                return false;
            }
            if ns.is_none() && !SYSTEM_TYPES.contains(&name) {
                return false;
            }
            item.to_system().is_some_and(|v| v.type_name() == name)
        }
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

fn binary<'a>(op: BinOp, l: &Expr, r: &Expr, env: &Env<'_, 'a>, input: &[Item<'a>]) -> R<'a> {
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
            arithmetic(op, x, y)
        }
    }
}

fn dec(v: &SystemValue<'_>) -> Option<Decimal> {
    match v {
        SystemValue::Integer(i) => Some(Decimal::from(*i)),
        SystemValue::Decimal(d) => Some(*d),
        _ => None,
    }
}

fn arithmetic<'a>(op: BinOp, x: SystemValue<'a>, y: SystemValue<'a>) -> R<'a> {
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
            return match r {
                Some(i) if (i32::MIN as i64..=i32::MAX as i64).contains(&i) => val(S::Integer(i)),
                _ => none(),
            };
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
            return match p.checked_div(q).and_then(|d| d.trunc().to_i64()) {
                Some(i) => val(S::Integer(i)),
                None => none(),
            };
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

fn call<'a>(
    f: Builtin,
    focus: Vec<Item<'a>>,
    args: &[Expr],
    regex: Option<&regex::Regex>,
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
                budget: env.budget,
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
        F::IndexOf | F::LastIndexOf => {
            let Some(s) = single_string(&focus, f.name())? else {
                return Ok(Vec::new());
            };
            let Some(sub) = single_string(&eval(&args[0], env, input)?, f.name())? else {
                return Ok(Vec::new());
            };
            let pos = if f == F::IndexOf {
                s.find(sub.as_ref())
            } else {
                s.rfind(sub.as_ref())
            };
            val(S::Integer(
                pos.map(|p| s[..p].chars().count() as i64).unwrap_or(-1),
            ))
        }
        F::Substring => {
            let Some(s) = single_string(&focus, "substring")? else {
                return Ok(Vec::new());
            };
            let Some(start) = single_int(&eval(&args[0], env, input)?, "substring")? else {
                return Ok(Vec::new());
            };
            let len = match args.get(1) {
                Some(a) => single_int(&eval(a, env, input)?, "substring")?,
                None => None,
            };
            let count = s.chars().count() as i64;
            if start < 0 || start >= count {
                return Ok(Vec::new());
            }
            let take = len.map(|l| l.max(0)).unwrap_or(count);
            let r: String = s.chars().skip(start as usize).take(take as usize).collect();
            Ok(vec![Item::string(r)])
        }
        F::StartsWith | F::EndsWith | F::Contains => {
            let Some(s) = single_string(&focus, f.name())? else {
                return Ok(Vec::new());
            };
            let Some(arg) = single_string(&eval(&args[0], env, input)?, f.name())? else {
                return Ok(Vec::new());
            };
            b(match f {
                F::StartsWith => s.starts_with(arg.as_ref()),
                F::EndsWith => s.ends_with(arg.as_ref()),
                _ => s.contains(arg.as_ref()),
            })
        }
        F::Upper | F::Lower | F::Trim | F::ToChars | F::Length => {
            let Some(s) = single_string(&focus, f.name())? else {
                return Ok(Vec::new());
            };
            match f {
                F::Upper => Ok(vec![Item::string(s.to_uppercase())]),
                F::Lower => Ok(vec![Item::string(s.to_lowercase())]),
                F::Trim => Ok(vec![Item::string(s.trim().to_string())]),
                F::Length => val(S::Integer(s.chars().count() as i64)),
                _ => Ok(s.chars().map(|c| Item::string(c.to_string())).collect()),
            }
        }
        F::Replace => {
            let Some(s) = single_string(&focus, "replace")? else {
                return Ok(Vec::new());
            };
            let (Some(pat), Some(rep)) = (
                single_string(&eval(&args[0], env, input)?, "replace")?,
                single_string(&eval(&args[1], env, input)?, "replace")?,
            ) else {
                return Ok(Vec::new());
            };
            let r = if pat.is_empty() {
                // Insert the replacement between every character, as the specification shows.
                let mut out = String::from(rep.as_ref());
                for c in s.chars() {
                    out.push(c);
                    out.push_str(&rep);
                }
                out
            } else {
                s.replace(pat.as_ref(), &rep)
            };
            Ok(vec![Item::string(r)])
        }
        F::Matches | F::MatchesFull | F::ReplaceMatches => {
            let Some(s) = single_string(&focus, f.name())? else {
                return Ok(Vec::new());
            };
            let owned;
            let re = match regex {
                Some(r) => r,
                None => {
                    let Some(p) = single_string(&eval(&args[0], env, input)?, f.name())? else {
                        return Ok(Vec::new());
                    };
                    let pat = if f == F::MatchesFull {
                        format!("^(?:{p})$")
                    } else {
                        format!("(?s:{p})")
                    };
                    owned = regex::Regex::new(&pat)
                        .map_err(|e| EvalError::ty(format!("invalid regex: {e}")))?;
                    &owned
                }
            };
            if f == F::ReplaceMatches {
                let Some(rep) = single_string(&eval(&args[1], env, input)?, f.name())? else {
                    return Ok(Vec::new());
                };
                return Ok(vec![Item::string(
                    re.replace_all(&s, rep.as_ref()).into_owned(),
                )]);
            }
            b(re.is_match(&s))
        }
        F::Split => {
            let Some(s) = single_string(&focus, "split")? else {
                return Ok(Vec::new());
            };
            let Some(sep) = single_string(&eval(&args[0], env, input)?, "split")? else {
                return Ok(Vec::new());
            };
            Ok(s.split(sep.as_ref())
                .map(|p| Item::string(p.to_string()))
                .collect())
        }
        F::Join => {
            let sep = match args.first() {
                Some(a) => single_string(&eval(a, env, input)?, "join")?.unwrap_or_default(),
                None => Cow::Borrowed(""),
            };
            if focus.is_empty() {
                return Ok(Vec::new());
            }
            let mut parts = Vec::new();
            for i in focus.iter().filter(|i| !valueless(i)) {
                match i.to_system() {
                    Some(S::String(s)) => parts.push(s.into_owned()),
                    _ => return Err(EvalError::ty("join(): expected Strings")),
                }
            }
            Ok(vec![Item::string(parts.join(&sep))])
        }
        F::Encode | F::Decode | F::Escape | F::Unescape => {
            let Some(s) = single_string(&focus, f.name())? else {
                return Ok(Vec::new());
            };
            let Some(fmt) = single_string(&eval(&args[0], env, input)?, f.name())? else {
                return Ok(Vec::new());
            };
            if f == F::Decode && fmt == "hex" && s.len() % 2 != 0 {
                return Err(EvalError::ty("decode('hex'): odd number of hex digits"));
            }
            Ok(crate::eval_strings::codec(f, &s, &fmt)
                .map(Item::string)
                .into_iter()
                .collect())
        }
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
        F::Children => {
            let mut out = Vec::new();
            for i in &focus {
                if let Item::Node(n) = i {
                    n.push_children(&mut out);
                }
            }
            Ok(out)
        }
        F::Descendants => {
            // Breadth-first in one vector: each node's children are appended behind it.
            let mut out = Vec::new();
            for i in &focus {
                if let Item::Node(n) = i {
                    n.push_children(&mut out);
                }
            }
            let mut next = 0;
            while next < out.len() {
                if let Item::Node(n) = &out[next] {
                    let n = n.clone();
                    n.push_children(&mut out);
                }
                next += 1;
            }
            Ok(out)
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
        F::Now => val(S::DateTime(Temporal::from_chrono(&env.ctx.now()))),
        F::Today => val(S::Date(
            Temporal::from_chrono(&env.ctx.now()).with_kind(TemporalKind::Date),
        )),
        F::TimeOfDay => {
            let mut t = Temporal::from_chrono(&env.ctx.now());
            t.kind = TemporalKind::Time;
            t.offset_minutes = None;
            val(S::Time(t))
        }
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
                    budget: env.budget,
                };
                let next = eval(&args[0], &sub, std::slice::from_ref(item))?;
                total = next;
            }
            Ok(total)
        }
        F::Sum | F::Min | F::Max | F::Avg => aggregate_simple(f, focus),
        F::Is | F::As | F::OfType => {
            Err(EvalError::ty(format!("{}() needs a type name", f.name())))
        }
        F::Type => Ok(focus
            .iter()
            .map(|i| {
                Item::Value(S::TypeInfo {
                    namespace: i.namespace(),
                    name: Cow::Owned(i.type_name().to_string()),
                })
            })
            .collect()),
        F::Not => match singleton_bool(&focus)? {
            None => Ok(Vec::new()),
            Some(x) => b(!x),
        },
        F::Extension => {
            let Some(url) = single_string(&eval(&args[0], env, input)?, "extension")? else {
                return Ok(Vec::new());
            };
            let mut exts = Vec::new();
            for i in &focus {
                if let Item::Node(n) = i {
                    n.push_children_named("extension", &mut exts);
                }
            }
            Ok(exts
                .into_iter()
                .filter(|e| {
                    e.as_node()
                        .and_then(|n| n.json())
                        .and_then(|j| j.get("url"))
                        .and_then(|u| u.as_str())
                        == Some(url.as_ref())
                })
                .collect())
        }
        F::HasValue => b(match focus.as_slice() {
            [Item::Node(n)] => n.is_primitive() && n.json().is_some() && n.fhir_type() != "xhtml",
            [Item::Value(v)] => !matches!(v, S::Quantity(_) | S::TypeInfo { .. }),
            _ => false,
        }),
        F::GetValue => Ok(match focus.as_slice() {
            [i @ Item::Node(n)] if n.is_primitive() && n.fhir_type() != "xhtml" => {
                i.to_system().map(Item::Value).into_iter().collect()
            }
            [Item::Value(v)] if !matches!(v, S::Quantity(_) | S::TypeInfo { .. }) => focus.clone(),
            _ => Vec::new(),
        }),
        F::YearOf
        | F::MonthOf
        | F::DayOf
        | F::HourOf
        | F::MinuteOf
        | F::SecondOf
        | F::MillisecondOf
        | F::TimezoneOffsetOf
        | F::DateOf
        | F::TimeOf => {
            let v = match single_sys(&focus, f.name())? {
                Some(S::String(s)) => to_temporal(S::String(s), TemporalKind::DateTime),
                other => other,
            };
            let t = match v {
                Some(S::Date(t) | S::DateTime(t) | S::Time(t)) => t,
                _ => return Ok(Vec::new()),
            };
            Ok(temporal_component(f, &t)
                .map(Item::Value)
                .into_iter()
                .collect())
        }
        F::Resolve => Ok(focus.iter().filter_map(|i| resolve(i, env.ctx)).collect()),
        F::Sort => sort(focus, args.first(), env),
        F::Precision => {
            let Some(v) = single_sys(&focus, "precision")? else {
                return Ok(Vec::new());
            };
            let p = match v {
                S::Decimal(d) => d.scale() as i64,
                S::Integer(_) => 0,
                S::Date(t) | S::DateTime(t) | S::Time(t) => temporal_digits(&t) as i64,
                _ => return Ok(Vec::new()),
            };
            val(S::Integer(p))
        }
        F::LowBoundary | F::HighBoundary => {
            let Some(v) = single_sys(&focus, f.name())? else {
                return Ok(Vec::new());
            };
            let precision = match args.first() {
                Some(a) => single_int(&eval(a, env, input)?, f.name())?,
                None => None,
            };
            Ok(
                crate::boundary::boundary(&v, precision, f == F::HighBoundary)
                    .map(Item::Value)
                    .into_iter()
                    .collect(),
            )
        }
        F::Comparable => {
            let (Some(S::Quantity(p)), Some(S::Quantity(q))) = (
                single_sys(&focus, "comparable")?,
                single_sys(&eval(&args[0], env, input)?, "comparable")?,
            ) else {
                return Ok(Vec::new());
            };
            b(p.compare(&q).is_some())
        }
        F::ConformsTo => {
            let Some(url) = single_string(&eval(&args[0], env, input)?, "conformsTo")? else {
                return Ok(Vec::new());
            };
            // Only the core definitions are known: a profile URL needs a profile registry.
            let Some(ty) = url.strip_prefix("http://hl7.org/fhir/StructureDefinition/") else {
                return Err(EvalError::Unsupported(format!(
                    "conformsTo('{url}'): profiles are not available"
                )));
            };
            if fhir_model::r4().type_def(ty).is_none() {
                return Err(EvalError::Unsupported(format!(
                    "conformsTo('{url}'): profiles are not available"
                )));
            }
            let Some(item) = single(&focus, "conformsTo")? else {
                return Ok(Vec::new());
            };
            b(match item {
                Item::Node(n) => fhir_model::r4().is_subtype_of(n.fhir_type(), ty),
                Item::Value(_) => false,
            })
        }
        F::MemberOf
        | F::Subsumes
        | F::SubsumedBy
        | F::HtmlChecks
        | F::ElementDefinition
        | F::Slice
        | F::CheckModifiers => Err(EvalError::Unsupported(format!(
            "{}() needs terminology services or profiles, which this engine does not have",
            f.name()
        ))),
    }
}

/// `yearOf()` … `timeOf()`: a component when the value is precise enough to have it.
fn temporal_component<'a>(f: Builtin, t: &Temporal) -> Option<SystemValue<'a>> {
    use Builtin as F;
    let is_time = t.kind == TemporalKind::Time;
    let int = |p: Precision, v: i64| (t.precision >= p).then_some(SystemValue::Integer(v));
    match f {
        F::YearOf if !is_time => int(Precision::Year, i64::from(t.year)),
        F::MonthOf if !is_time => int(Precision::Month, i64::from(t.month)),
        F::DayOf if !is_time => int(Precision::Day, i64::from(t.day)),
        F::HourOf if t.kind != TemporalKind::Date => int(Precision::Hour, i64::from(t.hour)),
        F::MinuteOf if t.kind != TemporalKind::Date => int(Precision::Minute, i64::from(t.minute)),
        F::SecondOf if t.kind != TemporalKind::Date => int(Precision::Second, i64::from(t.second)),
        F::MillisecondOf if t.kind != TemporalKind::Date => {
            int(Precision::Millisecond, i64::from(t.nanos / 1_000_000))
        }
        F::TimezoneOffsetOf if t.kind == TemporalKind::DateTime => t
            .offset_minutes
            .map(|m| SystemValue::Decimal(Decimal::from(m) / Decimal::from(60))),
        F::DateOf if !is_time => Some(SystemValue::Date(t.with_kind(TemporalKind::Date))),
        F::TimeOf if t.kind == TemporalKind::DateTime && t.precision >= Precision::Hour => {
            let mut r = *t;
            r.kind = TemporalKind::Time;
            r.offset_minutes = None;
            Some(SystemValue::Time(r))
        }
        _ => None,
    }
}

fn temporal_digits(t: &Temporal) -> usize {
    let date = match t.precision {
        Precision::Year => 4,
        Precision::Month => 6,
        _ => 8,
    };
    let time = match t.precision {
        Precision::Year | Precision::Month | Precision::Day => 0,
        Precision::Hour => 2,
        Precision::Minute => 4,
        Precision::Second => 6,
        Precision::Millisecond => 9,
    };
    match t.kind {
        TemporalKind::Time => time,
        _ => date + time,
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

fn to_temporal<'a>(v: SystemValue<'a>, kind: TemporalKind) -> Option<SystemValue<'a>> {
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

fn sort<'a>(focus: Vec<Item<'a>>, crit: Option<&Expr>, env: &Env<'_, 'a>) -> R<'a> {
    let (expr, desc) = match crit {
        Some(Expr::Neg(inner)) => (Some(inner.as_ref()), true),
        Some(e) => (Some(e), false),
        None => (None, false),
    };
    let mut keyed = Vec::with_capacity(focus.len());
    for (i, item) in focus.into_iter().enumerate() {
        let key = match expr {
            Some(e) => lambda(e, env, &item, i)?,
            None => vec![item.clone()],
        };
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

/// `resolve()`: a Reference (or a reference string) to the resource it points at, looked up in the
/// current resource's contained resources, the root resource and an enclosing Bundle's entries.
fn resolve<'a>(item: &Item<'a>, ctx: &EvalContext<'a>) -> Option<Item<'a>> {
    let reference: Cow<'a, str> = match item {
        Item::Node(n) => match n.json()? {
            serde_json::Value::Object(m) => Cow::Borrowed(m.get("reference")?.as_str()?),
            serde_json::Value::String(s) => Cow::Borrowed(s.as_str()),
            _ => return None,
        },
        Item::Value(SystemValue::String(s)) => s.clone(),
        _ => return None,
    };
    let reference = reference.as_ref();
    if let Some(id) = reference.strip_prefix('#') {
        let res = ctx.resource.as_node()?;
        if id.is_empty() {
            return Some(ctx.resource.clone());
        }
        let mut contained = Vec::new();
        res.push_children_named("contained", &mut contained);
        return contained.into_iter().find(|c| {
            c.as_node()
                .and_then(|n| n.json())
                .and_then(|j| j.get("id"))
                .and_then(|v| v.as_str())
                == Some(id)
        });
    }
    let trimmed = match reference.find("/_history/") {
        Some(i) => &reference[..i],
        None => reference,
    };
    let mut parts = trimmed.rsplit('/');
    let id = parts.next()?;
    let ty = parts.next().unwrap_or("");
    let matches_resource = |n: &Node<'a>| {
        let j = n.json();
        j.and_then(|j| j.get("id")).and_then(|v| v.as_str()) == Some(id)
            && j.and_then(|j| j.get("resourceType"))
                .and_then(|v| v.as_str())
                == Some(ty)
    };
    let root = Node::root(ctx.root);
    if root.type_name() == "Bundle" {
        let mut entries = Vec::new();
        root.push_children_named("entry", &mut entries);
        for e in &entries {
            let Some(en) = e.as_node() else { continue };
            let full = en
                .json()
                .and_then(|j| j.get("fullUrl"))
                .and_then(|v| v.as_str());
            let mut res = Vec::new();
            en.push_children_named("resource", &mut res);
            let Some(Item::Node(rn)) = res.into_iter().next() else {
                continue;
            };
            if full == Some(reference) || matches_resource(&rn) {
                return Some(Item::Node(rn));
            }
        }
    }
    if matches_resource(&root) {
        return Some(Item::Node(root));
    }
    let mut contained = Vec::new();
    root.push_children_named("contained", &mut contained);
    contained
        .into_iter()
        .find(|c| c.as_node().is_some_and(matches_resource))
}
