//! Caller-defined functions, and the anonymizer's `nodesByType` / `nodesByName`.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use crate::error::EvalError;
use crate::node::Item;
use crate::node::Node;
use crate::value::SystemValue;

/// A custom function: receives the focus collection and the evaluated arguments (each a collection,
/// evaluated against the same focus as the call), returns the result collection.
pub type CustomFn =
    dyn for<'a> Fn(&[Item<'a>], &[Vec<Item<'a>>]) -> Result<Vec<Item<'a>>, EvalError> + Send + Sync;

pub(crate) struct CustomEntry {
    pub name: String,
    pub min_args: usize,
    pub max_args: usize,
    /// Arguments are type specifiers (`getReferenceKey(Patient)`): an identifier argument reaches
    /// the function as a string instead of being evaluated as a path.
    pub type_args: bool,
    pub func: Box<CustomFn>,
}

impl fmt::Debug for CustomEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}()", self.name)
    }
}

/// Functions available to expressions compiled with [`crate::Expression::compile_with`], in addition
/// to the built-in ones. A registered name takes precedence over a built-in function of that name.
#[derive(Clone, Default)]
pub struct FunctionRegistry {
    fns: HashMap<String, Arc<CustomEntry>>,
}

impl fmt::Debug for FunctionRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.fns.keys()).finish()
    }
}

impl FunctionRegistry {
    /// No custom functions.
    pub fn new() -> Self {
        Self::default()
    }

    /// `nodesByType('T')` and `nodesByName('n')` as the Microsoft FHIR anonymizer defines them.
    pub fn with_anonymizer_functions() -> Self {
        let mut r = Self::new();
        r.register("nodesByType", 1, 1, nodes_by_type);
        r.register("nodesByName", 1, 1, nodes_by_name);
        r
    }

    /// Registers `name` taking between `min_args` and `max_args` arguments.
    pub fn register<F>(&mut self, name: &str, min_args: usize, max_args: usize, func: F)
    where
        F: for<'a> Fn(&[Item<'a>], &[Vec<Item<'a>>]) -> Result<Vec<Item<'a>>, EvalError>
            + Send
            + Sync
            + 'static,
    {
        self.insert(name, min_args, max_args, false, Box::new(func));
    }

    /// Registers `name` whose arguments are type specifiers, like `ofType(T)`: an identifier
    /// (`Patient`, `FHIR.Patient`) is passed as a one-string collection holding its name; other
    /// arguments are evaluated as usual.
    pub fn register_with_type_args<F>(
        &mut self,
        name: &str,
        min_args: usize,
        max_args: usize,
        func: F,
    ) where
        F: for<'a> Fn(&[Item<'a>], &[Vec<Item<'a>>]) -> Result<Vec<Item<'a>>, EvalError>
            + Send
            + Sync
            + 'static,
    {
        self.insert(name, min_args, max_args, true, Box::new(func));
    }

    fn insert(
        &mut self,
        name: &str,
        min_args: usize,
        max_args: usize,
        type_args: bool,
        func: Box<CustomFn>,
    ) {
        self.fns.insert(
            name.to_string(),
            Arc::new(CustomEntry {
                name: name.to_string(),
                min_args,
                max_args,
                type_args,
                func,
            }),
        );
    }

    pub fn contains(&self, name: &str) -> bool {
        self.fns.contains_key(name)
    }

    pub(crate) fn get(&self, name: &str) -> Option<Arc<CustomEntry>> {
        self.fns.get(name).cloned()
    }
}

fn string_arg(fname: &str, args: &[Vec<Item<'_>>]) -> Result<String, EvalError> {
    match args.first().map(|a| a.as_slice()) {
        Some([item]) => match item.to_system() {
            Some(SystemValue::String(s)) => Ok(s.into_owned()),
            _ => Err(EvalError::Function {
                name: fname.to_string(),
                message: "argument must be a string".into(),
            }),
        },
        _ => Err(EvalError::Function {
            name: fname.to_string(),
            message: "argument must be a single string".into(),
        }),
    }
}

/// The focus node and its descendants depth-first in document order, never yielding or entering a
/// child that is a resource (docs/specs/anonymizer.md §3.3).
pub fn walk_without_subresources<'a>(node: &Node<'a>, visit: &mut dyn FnMut(&Node<'a>)) {
    walk(node, true, visit);
}

/// `leaves` false skips primitives without children (when the visitor looks for complex types).
fn walk<'a>(node: &Node<'a>, leaves: bool, visit: &mut dyn FnMut(&Node<'a>)) {
    visit(node);
    let mut buf = Vec::new();
    walk_children(node, leaves, &mut buf, visit);
}

/// Depth-first over one shared buffer: a node's children occupy a range that is truncated away
/// once they are done.
fn walk_children<'a>(
    node: &Node<'a>,
    leaves: bool,
    buf: &mut Vec<Item<'a>>,
    visit: &mut dyn FnMut(&Node<'a>),
) {
    let start = buf.len();
    node.push_children_with(buf, leaves);
    for i in start..buf.len() {
        let Item::Node(c) = &buf[i] else { continue };
        if c.is_resource() {
            continue;
        }
        visit(c);
        if c.has_children() {
            let c = c.clone();
            walk_children(&c, leaves, buf, visit);
        }
    }
    buf.truncate(start);
}

fn nodes_by_type<'a>(
    focus: &[Item<'a>],
    args: &[Vec<Item<'a>>],
) -> Result<Vec<Item<'a>>, EvalError> {
    let ty = string_arg("nodesByType", args)?;
    // Complex types never sit in primitive leaves: skip building those.
    let leaves = !fhir_model::r4()
        .type_def(&ty)
        .is_some_and(|t| t.kind != fhir_model::TypeKind::Primitive);
    // `type_name()` differs from `fhir_type()` only for backbone elements (`BackboneElement`, or
    // `Element`) and untyped JSON (`string`, `boolean`, `integer`, `decimal`): for any other type
    // asked for, comparing `fhir_type()` alone is the same test.
    let by_name = matches!(
        ty.as_str(),
        "BackboneElement" | "Element" | "string" | "boolean" | "integer" | "decimal"
    );
    let mut out = Vec::new();
    for item in focus {
        if let Item::Node(n) = item {
            walk(n, leaves, &mut |c| {
                if c.fhir_type() == ty || (by_name && c.type_name() == ty) {
                    out.push(Item::Node(c.clone()));
                }
            });
        }
    }
    Ok(out)
}

fn nodes_by_name<'a>(
    focus: &[Item<'a>],
    args: &[Vec<Item<'a>>],
) -> Result<Vec<Item<'a>>, EvalError> {
    let name = string_arg("nodesByName", args)?;
    let mut out = Vec::new();
    for item in focus {
        if let Item::Node(n) = item {
            walk_without_subresources(n, &mut |c| {
                if c.name() == name {
                    out.push(Item::Node(c.clone()));
                }
            });
        }
    }
    Ok(out)
}
