//! Evaluation: one resource to rows.
//!
//! The resource is parsed once by the caller; every path was compiled once with the view. Each
//! selection structure is evaluated against its focus nodes (the resource, or the items of its
//! `forEach`/`forEachOrNull`/`repeat`), and its rows are the Cartesian product of its parts — its
//! columns, each nested select's rows, its unionAll's rows — concatenated in column order (each
//! part covers a contiguous run of output columns, so a row is built by appending).

use fhirpath::{EvalContext, Item, Node, SystemValue};
use serde_json::Value as Json;

use crate::error::{RowError, RowReason};
use crate::value::Value;
use crate::view::{Iteration, Select, View};

/// One output row: the cells in [`View::columns`] order.
pub type Row = Vec<Value>;

/// How deep `repeat` may recurse (a path that does not descend would otherwise never end).
pub const MAX_REPEAT_DEPTH: usize = 256;

/// How many rows one resource may produce: sibling `forEach`es multiply (their Cartesian product),
/// and nested ones too, so a few of them over large collections could otherwise run for ever.
pub const MAX_ROWS_PER_RESOURCE: usize = 1_000_000;

/// How many cells of one resource's rows [`View::for_each_row`] holds at once. Beyond it the
/// rows are counted first (every error found) and then generated one at a time, so a resource
/// allowed [`MAX_ROWS_PER_RESOURCE`] rows costs time, not memory.
pub const MAX_BUFFERED_CELLS: usize = 64 * 1024;

/// Why [`View::for_each_row`] stopped.
#[derive(Debug)]
pub enum EachRowError<E> {
    /// The resource's rows cannot be made; it gave none of them.
    Row(RowError),
    /// The caller's function refused a row.
    Sink(E),
}

impl<E> From<RowError> for EachRowError<E> {
    fn from(e: RowError) -> Self {
        EachRowError::Row(e)
    }
}

/// Why a walk over the select tree stopped.
enum Stop<E> {
    Row(RowError),
    /// More rows than the walk may hold (only when it was given a bound below
    /// [`MAX_ROWS_PER_RESOURCE`]).
    Held,
    Sink(E),
}

impl<E> From<RowError> for Stop<E> {
    fn from(e: RowError) -> Self {
        Stop::Row(e)
    }
}

struct Env<'a> {
    base: EvalContext<'a>,
    uses_row_index: bool,
    resource: &'a Json,
}

impl<'a> Env<'a> {
    fn ctx(&self, focus: &Item<'a>, row_index: usize) -> EvalContext<'a> {
        let ctx = self.base.clone().with_focus(focus.clone());
        if self.uses_row_index {
            ctx.with_variable(
                "rowIndex",
                vec![Item::from_value(SystemValue::Integer(row_index as i64))],
            )
        } else {
            ctx
        }
    }

    fn err(&self, element: &str, reason: RowReason) -> RowError {
        let rt = self.resource.get("resourceType").and_then(Json::as_str);
        let id = self.resource.get("id").and_then(Json::as_str);
        RowError {
            resource: match (rt, id) {
                (Some(t), Some(i)) => Some(format!("{t}/{i}")),
                _ => None,
            },
            element: element.to_string(),
            reason,
        }
    }

    /// The stop for more than `max` rows: [`RowReason::TooManyRows`] at the resource's bound,
    /// [`Stop::Held`] below it.
    fn over<E>(&self, element: &str, max: usize) -> Stop<E> {
        if max < MAX_ROWS_PER_RESOURCE {
            Stop::Held
        } else {
            Stop::Row(self.err(element, RowReason::TooManyRows(MAX_ROWS_PER_RESOURCE)))
        }
    }
}

/// The FHIRPath work all of one resource's evaluations may do together (every `where`, `forEach`
/// and column, for every row), in the evaluator's units: four single evaluations' budgets. A
/// view has as many expressions as it lists, each bounded by its own budget, so without this a
/// view of many clauses made one resource cost minutes of CPU (a review: an hour for one run of
/// 100 Patients). Real views spend a few thousand units per resource.
pub const MAX_RESOURCE_WORK: u64 = 16_000_000;

impl View {
    /// The rows of one resource (none when it is not of the view's resource type or a `where`
    /// excludes it).
    pub fn rows(&self, resource: &Json) -> Result<Vec<Row>, RowError> {
        let mut out = Vec::new();
        self.rows_into(resource, &mut out)?;
        Ok(out)
    }

    /// Appends the rows of one resource to `out`; returns how many were added. Holds them all:
    /// [`View::for_each_row`] is the bounded way.
    pub fn rows_into(&self, resource: &Json, out: &mut Vec<Row>) -> Result<usize, RowError> {
        fhirpath::with_shared_budget(MAX_RESOURCE_WORK, || {
            self.rows_into_unlimited(resource, out)
        })
    }

    fn rows_into_unlimited(&self, resource: &Json, out: &mut Vec<Row>) -> Result<usize, RowError> {
        let Some(env) = self.env(resource)? else {
            return Ok(0);
        };
        let root = Item::Node(Node::root(resource));
        let rows = match process::<()>(&self.root, &root, 0, &env, MAX_ROWS_PER_RESOURCE) {
            Ok(rows) => rows,
            Err(Stop::Row(e)) => return Err(e),
            Err(Stop::Held | Stop::Sink(())) => unreachable!("no bound below the resource's"),
        };
        let n = rows.len();
        out.extend(rows);
        Ok(n)
    }

    /// Calls `sink` with each row of one resource, in order; returns how many there were. A
    /// resource gives all its rows or, when they cannot be made, none: its error comes before its
    /// first row. At most [`MAX_BUFFERED_CELLS`] cells are held: rows beyond them are counted
    /// first (which finds every error) and then generated one at a time.
    pub fn for_each_row<E>(
        &self,
        resource: &Json,
        sink: impl FnMut(&[Value]) -> Result<(), E>,
    ) -> Result<usize, EachRowError<E>> {
        let held = MAX_BUFFERED_CELLS / self.columns().len().max(1);
        self.for_each_row_holding(resource, held, sink)
    }

    /// [`View::for_each_row`] holding at most `held` rows (tests force the generated path with 1).
    #[doc(hidden)]
    pub fn for_each_row_holding<E>(
        &self,
        resource: &Json,
        held: usize,
        sink: impl FnMut(&[Value]) -> Result<(), E>,
    ) -> Result<usize, EachRowError<E>> {
        fhirpath::with_shared_budget(MAX_RESOURCE_WORK, || {
            self.for_each_row_unlimited(resource, held, sink)
        })
    }

    fn for_each_row_unlimited<E>(
        &self,
        resource: &Json,
        held: usize,
        mut sink: impl FnMut(&[Value]) -> Result<(), E>,
    ) -> Result<usize, EachRowError<E>> {
        let Some(env) = self.env(resource)? else {
            return Ok(0);
        };
        let root = Item::Node(Node::root(resource));
        let held = held.clamp(1, MAX_ROWS_PER_RESOURCE - 1);
        match process::<E>(&self.root, &root, 0, &env, held) {
            Ok(rows) => {
                for r in &rows {
                    sink(r).map_err(EachRowError::Sink)?;
                }
                return Ok(rows.len());
            }
            Err(Stop::Row(e)) => return Err(EachRowError::Row(e)),
            Err(Stop::Sink(e)) => return Err(EachRowError::Sink(e)),
            Err(Stop::Held) => {}
        }
        let n = count(&self.root, &root, 0, &env)?;
        let mut row = Vec::with_capacity(self.columns().len());
        emit(&self.root, &root, 0, &env, &mut row, &mut |r: &mut Row| {
            sink(r).map_err(Stop::Sink)
        })
        .map_err(|stop| match stop {
            Stop::Row(e) => EachRowError::Row(e),
            Stop::Sink(e) => EachRowError::Sink(e),
            Stop::Held => unreachable!("generating rows holds none"),
        })?;
        Ok(n)
    }

    /// The evaluation context for `resource`, or `None` when it is not of the view's type or a
    /// `where` excludes it.
    fn env<'a>(&'a self, resource: &'a Json) -> Result<Option<Env<'a>>, RowError> {
        if resource.get("resourceType").and_then(Json::as_str) != Some(self.resource.as_str()) {
            return Ok(None);
        }
        let mut base = EvalContext::new(resource);
        for c in &self.constants {
            base = base.with_variable(
                &c.name,
                vec![Item::Node(Node::detached(&c.value, c.fhir_type))],
            );
        }
        let env = Env {
            base,
            uses_row_index: self.uses_row_index,
            resource,
        };
        let root = Item::Node(Node::root(resource));
        if !self.wheres.is_empty() {
            let ctx = env.ctx(&root, 0);
            for (element, expr) in &self.wheres {
                let result = expr
                    .evaluate(&ctx)
                    .map_err(|e| env.err(element, RowReason::Eval(e)))?;
                match result.as_slice() {
                    [] => return Ok(None),
                    [one] => match one.to_system() {
                        Some(SystemValue::Boolean(true)) => {}
                        Some(SystemValue::Boolean(false)) => return Ok(None),
                        _ => {
                            return Err(env.err(
                                element,
                                RowReason::WhereNotBoolean(one.type_name().to_string()),
                            ));
                        }
                    },
                    many => {
                        return Err(env.err(
                            element,
                            RowReason::WhereNotBoolean(format!("{} items", many.len())),
                        ));
                    }
                }
            }
        }
        Ok(Some(env))
    }
}

/// The foci of `s` at `focus` (with their `%rowIndex`), or `None` for `forEachOrNull` over an
/// empty collection (its one null row).
fn foci<'a>(
    s: &Select,
    focus: &Item<'a>,
    row_index: usize,
    env: &Env<'a>,
) -> Result<Option<Vec<(Item<'a>, usize)>>, RowError> {
    Ok(Some(match &s.iteration {
        Iteration::None => vec![(focus.clone(), row_index)],
        Iteration::ForEach(e) | Iteration::ForEachOrNull(e) => {
            let items = e
                .evaluate(&env.ctx(focus, row_index))
                .map_err(|err| env.err(&s.element, RowReason::Eval(err)))?;
            if items.is_empty() && matches!(s.iteration, Iteration::ForEachOrNull(_)) {
                return Ok(None);
            }
            items
                .into_iter()
                .enumerate()
                .map(|(i, it)| (it, i))
                .collect()
        }
        Iteration::Repeat(paths) => {
            let mut found = Vec::new();
            traverse(paths, focus, row_index, env, &s.element, 0, &mut found)?;
            found
                .into_iter()
                .enumerate()
                .map(|(i, it)| (it, i))
                .collect()
        }
    }))
}

/// The cells of `s`'s own columns at one focus.
fn own_cells(s: &Select, ctx: &EvalContext<'_>, env: &Env<'_>) -> Result<Row, RowError> {
    let mut own = Vec::with_capacity(s.null_row.len());
    for c in &s.columns {
        let items = c
            .expr
            .evaluate(ctx)
            .map_err(|e| env.err(&c.element, RowReason::Eval(e)))?;
        own.push(if c.collection {
            Value::Collection(items.iter().map(Value::from_item).collect())
        } else {
            match items.as_slice() {
                [] => Value::Null,
                [one] => Value::from_item(one),
                many => {
                    return Err(env.err(
                        &c.element,
                        RowReason::MultipleValues {
                            column: c.name.clone(),
                            count: many.len(),
                        },
                    ));
                }
            }
        });
    }
    Ok(own)
}

/// The rows of `s` at `focus`, held: at most `max` rows at any step ([`Env::over`] beyond).
fn process<'a, E>(
    s: &Select,
    focus: &Item<'a>,
    row_index: usize,
    env: &Env<'a>,
    max: usize,
) -> Result<Vec<Row>, Stop<E>> {
    let Some(foci) = foci(s, focus, row_index, env)? else {
        return Ok(vec![s.null_row.clone()]);
    };
    let mut out = Vec::new();
    for (f, i) in &foci {
        let own = own_cells(s, &env.ctx(f, *i), env)?;
        let mut acc: Vec<Row> = vec![own];
        for sub in &s.selects {
            let rows = process(sub, f, *i, env, max)?;
            acc = product(acc, &rows, s, env, max)?;
            if acc.is_empty() {
                break;
            }
        }
        if !acc.is_empty() && !s.union.is_empty() {
            let mut urows = Vec::new();
            for u in &s.union {
                urows.extend(process(u, f, *i, env, max)?);
            }
            acc = product(acc, &urows, s, env, max)?;
        }
        if out.len() + acc.len() > max {
            return Err(env.over(&s.element, max));
        }
        out.extend(acc);
    }
    Ok(out)
}

/// How many rows `s` gives at `focus`, with every error [`process`] would find (the same
/// evaluations, nothing held).
fn count<'a>(
    s: &Select,
    focus: &Item<'a>,
    row_index: usize,
    env: &Env<'a>,
) -> Result<usize, RowError> {
    let too_many = || env.err(&s.element, RowReason::TooManyRows(MAX_ROWS_PER_RESOURCE));
    let Some(foci) = foci(s, focus, row_index, env)? else {
        return Ok(1);
    };
    let mut out = 0usize;
    for (f, i) in &foci {
        own_cells(s, &env.ctx(f, *i), env)?;
        let mut acc = 1usize;
        for sub in &s.selects {
            let n = count(sub, f, *i, env)?;
            acc = acc.saturating_mul(n);
            if acc > MAX_ROWS_PER_RESOURCE {
                return Err(too_many());
            }
            if acc == 0 {
                break;
            }
        }
        if acc != 0 && !s.union.is_empty() {
            let mut u = 0usize;
            for sub in &s.union {
                u = u.saturating_add(count(sub, f, *i, env)?);
            }
            acc = acc.saturating_mul(u);
            if acc > MAX_ROWS_PER_RESOURCE {
                return Err(too_many());
            }
        }
        out += acc;
        if out > MAX_ROWS_PER_RESOURCE {
            return Err(too_many());
        }
    }
    Ok(out)
}

/// Generates the rows of `s` at `focus` one at a time: each is `row` (the cells before this
/// select's) followed by this select's cells, handed to `next`, which may extend it further.
fn emit<'a, E>(
    s: &Select,
    focus: &Item<'a>,
    row_index: usize,
    env: &Env<'a>,
    row: &mut Row,
    next: &mut dyn FnMut(&mut Row) -> Result<(), Stop<E>>,
) -> Result<(), Stop<E>> {
    let start = row.len();
    let Some(foci) = foci(s, focus, row_index, env)? else {
        row.extend(s.null_row.iter().cloned());
        let done = next(row);
        row.truncate(start);
        return done;
    };
    for (f, i) in &foci {
        row.extend(own_cells(s, &env.ctx(f, *i), env)?);
        let done = emit_parts(s, 0, f, *i, env, row, next);
        row.truncate(start);
        done?;
    }
    Ok(())
}

/// The product of `s`'s parts from nested select `part` on (then its unionAll), left-major.
fn emit_parts<'a, E>(
    s: &Select,
    part: usize,
    focus: &Item<'a>,
    row_index: usize,
    env: &Env<'a>,
    row: &mut Row,
    next: &mut dyn FnMut(&mut Row) -> Result<(), Stop<E>>,
) -> Result<(), Stop<E>> {
    if let Some(sub) = s.selects.get(part) {
        return emit(sub, focus, row_index, env, row, &mut |r: &mut Row| {
            emit_parts(s, part + 1, focus, row_index, env, r, next)
        });
    }
    if s.union.is_empty() {
        return next(row);
    }
    for u in &s.union {
        emit(u, focus, row_index, env, row, next)?;
    }
    Ok(())
}

/// Every row of `left` followed by every row of `right` (left-major order), refused beyond
/// `max` rows.
fn product<E>(
    left: Vec<Row>,
    right: &[Row],
    s: &Select,
    env: &Env<'_>,
    max: usize,
) -> Result<Vec<Row>, Stop<E>> {
    if left.len().saturating_mul(right.len()) > max {
        return Err(env.over(&s.element, max));
    }
    Ok(product_unchecked(left, right))
}

fn product_unchecked(left: Vec<Row>, right: &[Row]) -> Vec<Row> {
    if right.len() == 1 {
        let r = &right[0];
        return left
            .into_iter()
            .map(|mut l| {
                l.extend(r.iter().cloned());
                l
            })
            .collect();
    }
    let mut out = Vec::with_capacity(left.len() * right.len());
    for l in &left {
        for r in right {
            let mut row = Vec::with_capacity(l.len() + r.len());
            row.extend(l.iter().cloned());
            row.extend(r.iter().cloned());
            out.push(row);
        }
    }
    out
}

/// `repeat`: the nodes each path reaches from `node`, recursively, depth first (each node before
/// what is reached from it; paths in their order).
fn traverse<'a>(
    paths: &[fhirpath::Expression],
    node: &Item<'a>,
    row_index: usize,
    env: &Env<'a>,
    element: &str,
    depth: usize,
    out: &mut Vec<Item<'a>>,
) -> Result<(), RowError> {
    if depth >= MAX_REPEAT_DEPTH {
        return Err(env.err(element, RowReason::RepeatTooDeep(MAX_REPEAT_DEPTH)));
    }
    let ctx = env.ctx(node, row_index);
    for p in paths {
        let children = p
            .evaluate(&ctx)
            .map_err(|e| env.err(element, RowReason::Eval(e)))?;
        for c in children {
            out.push(c.clone());
            if out.len() > MAX_ROWS_PER_RESOURCE {
                return Err(env.err(element, RowReason::TooManyRows(MAX_ROWS_PER_RESOURCE)));
            }
            traverse(paths, &c, row_index, env, element, depth + 1, out)?;
        }
    }
    Ok(())
}
