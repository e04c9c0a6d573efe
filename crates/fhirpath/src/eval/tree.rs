//! Tree navigation: `children()`, `descendants()` (and its `ofType` fast path), `extension()`,
//! `resolve()`.

use std::borrow::Cow;

use crate::EvalContext;
use crate::functions::Builtin;
use crate::node::Item;
use crate::node::Node;
use crate::parser::{Expr, TypeSpec};
use crate::value::SystemValue;

use super::types::is_type;
use super::{Env, R, eval, misrouted, single_string};
use crate::error::EvalError;

/// `children()`, `descendants()`, `extension()`, `resolve()`.
pub(super) fn call<'a>(
    f: Builtin,
    focus: Vec<Item<'a>>,
    args: &[Expr],
    env: &Env<'_, 'a>,
    input: &[Item<'a>],
) -> R<'a> {
    use Builtin as F;

    match f {
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
            // Breadth-first in one vector: each node's children are appended behind it. The
            // vector is checked against the budget as it grows, since a large document (or many
            // copies of one in the focus) has millions of nodes.
            let mut out = Vec::new();
            for i in &focus {
                if let Item::Node(n) = i {
                    n.push_children(&mut out);
                    env.afford(out.len() as u64)?;
                }
            }
            let mut next = 0;
            while next < out.len() {
                if let Item::Node(n) = &out[next] {
                    let n = n.clone();
                    n.push_children(&mut out);
                    env.afford(out.len() as u64)?;
                }
                next += 1;
            }
            Ok(out)
        }
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
        F::Resolve => Ok(focus.iter().filter_map(|i| resolve(i, env.ctx)).collect()),
        _ => Err(misrouted(f)),
    }
}

/// Breadth-first like `descendants()`, keeping only nodes of type `spec`; leaves without children
/// are tested and dropped at once. Like `descendants()`, the items held are checked against the
/// budget as they grow.
pub(super) fn descendants_of_type<'a>(
    roots: &[Item<'a>],
    spec: &TypeSpec,
    env: &Env<'_, 'a>,
) -> Result<Vec<Item<'a>>, EvalError> {
    let mut out = Vec::new();
    let mut level: Vec<Item<'a>> = Vec::new();
    let leaves = spec.matches_leaves;
    for r in roots {
        if let Item::Node(n) = r {
            n.push_children_with(&mut level, leaves);
            env.afford(level.len() as u64)?;
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
                env.afford((out.len() + next.len()) as u64)?;
            }
        }
        std::mem::swap(&mut level, &mut next);
    }
    Ok(out)
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::error::EvalError;
    use crate::eval::probe::run;
    use crate::node::Item;

    /// A document of 12 960 nodes, none with more than 80 children.
    fn wide_patient() -> serde_json::Value {
        let coding: Vec<_> = (0..80).map(|_| json!({"code": "a"})).collect();
        let identifiers: Vec<_> = (0..80)
            .map(|_| json!({"type": {"coding": coding}}))
            .collect();
        json!({"resourceType": "Patient", "identifier": identifiers})
    }

    /// `descendants()` collected every node of the document before the budget saw any: its vector
    /// now stops growing within one node's children of the budget (here 1000 items, far from
    /// 12 960).
    #[test]
    fn descendants_stop_at_the_budget_while_they_are_collected() {
        let doc = wide_patient();
        let item = std::mem::size_of::<Item<'_>>();
        for src in ["descendants()", "descendants().ofType(Coding)"] {
            let (out, largest) = run(&doc, src, 1000);
            assert!(matches!(out, Err(EvalError::Budget(_))), "{src}: {out:?}");
            assert!(largest < 3000 * item, "{src}: allocated {largest} bytes");
            let (all, _) = run(&doc, &format!("{src}.count()"), 100_000);
            assert!(all.is_ok(), "{src}: {all:?}");
        }
    }
}
