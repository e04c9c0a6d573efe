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
/// so a few of them over large collections could otherwise exhaust memory.
pub const MAX_ROWS_PER_RESOURCE: usize = 1_000_000;

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
}

impl View {
    /// The rows of one resource (none when it is not of the view's resource type or a `where`
    /// excludes it).
    pub fn rows(&self, resource: &Json) -> Result<Vec<Row>, RowError> {
        let mut out = Vec::new();
        self.rows_into(resource, &mut out)?;
        Ok(out)
    }

    /// Appends the rows of one resource to `out`; returns how many were added.
    pub fn rows_into(&self, resource: &Json, out: &mut Vec<Row>) -> Result<usize, RowError> {
        if resource.get("resourceType").and_then(Json::as_str) != Some(self.resource.as_str()) {
            return Ok(0);
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
                    [] => return Ok(0),
                    [one] => match one.to_system() {
                        Some(SystemValue::Boolean(true)) => {}
                        Some(SystemValue::Boolean(false)) => return Ok(0),
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
        let rows = process(&self.root, &root, 0, &env)?;
        let n = rows.len();
        out.extend(rows);
        Ok(n)
    }
}

fn process<'a>(
    s: &Select,
    focus: &Item<'a>,
    row_index: usize,
    env: &Env<'a>,
) -> Result<Vec<Row>, RowError> {
    let foci: Vec<(Item<'a>, usize)> = match &s.iteration {
        Iteration::None => vec![(focus.clone(), row_index)],
        Iteration::ForEach(e) | Iteration::ForEachOrNull(e) => {
            let items = e
                .evaluate(&env.ctx(focus, row_index))
                .map_err(|err| env.err(&s.element, RowReason::Eval(err)))?;
            if items.is_empty() && matches!(s.iteration, Iteration::ForEachOrNull(_)) {
                return Ok(vec![s.null_row.clone()]);
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
    };
    let mut out = Vec::new();
    for (f, i) in &foci {
        let ctx = env.ctx(f, *i);
        let mut own = Vec::with_capacity(s.null_row.len());
        for c in &s.columns {
            let items = c
                .expr
                .evaluate(&ctx)
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
        let mut acc: Vec<Row> = vec![own];
        for sub in &s.selects {
            let rows = process(sub, f, *i, env)?;
            acc = product(acc, &rows, s, env)?;
            if acc.is_empty() {
                break;
            }
        }
        if !acc.is_empty() && !s.union.is_empty() {
            let mut urows = Vec::new();
            for u in &s.union {
                urows.extend(process(u, f, *i, env)?);
            }
            acc = product(acc, &urows, s, env)?;
        }
        if out.len() + acc.len() > MAX_ROWS_PER_RESOURCE {
            return Err(env.err(&s.element, RowReason::TooManyRows(MAX_ROWS_PER_RESOURCE)));
        }
        out.extend(acc);
    }
    Ok(out)
}

/// Every row of `left` followed by every row of `right` (left-major order), refused beyond
/// [`MAX_ROWS_PER_RESOURCE`].
fn product(left: Vec<Row>, right: &[Row], s: &Select, env: &Env<'_>) -> Result<Vec<Row>, RowError> {
    if left.len().saturating_mul(right.len()) > MAX_ROWS_PER_RESOURCE {
        return Err(env.err(&s.element, RowReason::TooManyRows(MAX_ROWS_PER_RESOURCE)));
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
