//! FHIRPath 2.0 over FHIR R4 JSON.
//!
//! An [`Expression`] is parsed and resolved once ([`Expression::compile`]) and evaluated many times
//! against a `serde_json::Value` resource through an [`EvalContext`]. Results are [`Item`]s: document
//! nodes that know their location ([`NodePath`]) and FHIR type, or computed System values.
//!
//! ```
//! use fhirpath::{EvalContext, Expression};
//! let patient = serde_json::json!({"resourceType": "Patient",
//!     "name": [{"use": "official", "family": "Chalmers"}]});
//! let expr = Expression::compile("Patient.name.where(use = 'official').family").unwrap();
//! let out = expr.evaluate(&EvalContext::new(&patient)).unwrap();
//! assert_eq!(out[0].path().unwrap().to_string(), "name[0].family");
//! ```
//!
//! Architecture Invariant: pure — no IO, no async. Type information comes from `fhir_model::r4()`.

mod boundary;
pub mod cli;
mod compare;
mod error;
mod eval;
mod eval_strings;
mod functions;
mod lexer;
mod limits;
mod node;
mod parser;
mod quantity;
mod registry;
mod temporal;
mod typeinfo;
mod value;

use chrono::{DateTime, FixedOffset};
use serde_json::Value as Json;

pub use error::{EvalError, ParseError};
pub use limits::{with_shared_budget, with_stop};
pub use node::{Item, Node, NodePath, Segment};
pub use quantity::Quantity;
pub use registry::{CustomFn, FunctionRegistry, walk_without_subresources};
pub use rust_decimal::Decimal;
pub use temporal::{Precision, Temporal, TemporalKind};
pub use value::SystemValue;

/// A compiled FHIRPath expression. Immutable, `Send + Sync`: compile once, share, evaluate often.
#[derive(Debug, Clone)]
pub struct Expression {
    source: String,
    expr: parser::Expr,
}

impl Expression {
    /// Compiles with the built-in functions only.
    pub fn compile(src: &str) -> Result<Expression, ParseError> {
        Self::compile_with(src, &FunctionRegistry::new())
    }

    /// Compiles with additional functions (e.g. [`FunctionRegistry::with_anonymizer_functions`]).
    pub fn compile_with(src: &str, registry: &FunctionRegistry) -> Result<Expression, ParseError> {
        Ok(Expression {
            source: src.to_string(),
            expr: parser::parse(src, registry)?,
        })
    }

    /// The source text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The names of the `%variables` the expression reads (each once, in order of first
    /// appearance), so a caller can check them against what it will define before evaluating.
    pub fn variables(&self) -> Vec<&str> {
        let mut all = Vec::new();
        self.expr.collect_variables(&mut all);
        let mut out: Vec<&str> = Vec::new();
        for v in all {
            if !out.contains(&v) {
                out.push(v);
            }
        }
        out
    }

    /// Evaluates against the context's focus (the resource unless another focus was set).
    pub fn evaluate<'a>(&self, ctx: &EvalContext<'a>) -> Result<Vec<Item<'a>>, EvalError> {
        eval::evaluate(&self.expr, ctx)
    }

    /// Evaluates as a condition: `Some(b)` for a single boolean (or a single non-boolean item, which
    /// counts as true), `None` for an empty result; an error for more than one item.
    pub fn evaluate_bool(&self, ctx: &EvalContext<'_>) -> Result<Option<bool>, EvalError> {
        let out = self.evaluate(ctx)?;
        eval::singleton_bool(&out)
    }
}

/// What an expression is evaluated against.
#[derive(Debug, Clone)]
pub struct EvalContext<'a> {
    pub(crate) root: &'a Json,
    pub(crate) resource: Item<'a>,
    pub(crate) root_resource: Item<'a>,
    pub(crate) focus: Item<'a>,
    /// Caller variables: few, so a list (a hash map's random state costs more than the scan).
    pub(crate) variables: Vec<(String, Vec<Item<'a>>)>,
    /// Set by `with_now`, or on the first use of `now()` (reading the clock is not free).
    pub(crate) now: std::sync::OnceLock<DateTime<FixedOffset>>,
}

impl<'a> EvalContext<'a> {
    /// `root` is the document: its `resourceType` gives its FHIR type; result paths are relative to
    /// it. It is the focus, `%resource`, `%rootResource` and `%context`. `now()` is read once, on first use.
    pub fn new(root: &'a Json) -> Self {
        let node = Item::Node(Node::root(root));
        EvalContext {
            root,
            resource: node.clone(),
            root_resource: node.clone(),
            focus: node,
            variables: Vec::new(),
            now: std::sync::OnceLock::new(),
        }
    }

    /// Starts evaluation at a node of the document or at a computed value (`$this`, `%context`).
    pub fn with_focus(mut self, focus: Item<'a>) -> Self {
        self.focus = focus;
        self
    }

    /// Starts evaluation at the node at `path`, typed through the R4 model. `%resource` becomes the
    /// nearest resource that contains it.
    pub fn with_focus_path(mut self, path: &NodePath) -> Result<Self, EvalError> {
        let node = Node::at_path(self.root, path)
            .ok_or_else(|| EvalError::NoSuchNode(path.to_string()))?;
        // The nearest enclosing resource: walk the prefixes of the path.
        for len in (0..=path.0.len()).rev() {
            let prefix = NodePath(path.0[..len].to_vec());
            if let Some(n) = Node::at_path(self.root, &prefix)
                && n.is_resource()
            {
                self.resource = Item::Node(n);
                break;
            }
        }
        self.focus = Item::Node(node);
        Ok(self)
    }

    /// Like [`EvalContext::with_focus_path`], with the node's FHIR type given by the caller (e.g. a
    /// profile-constrained type the model does not infer).
    pub fn with_focus_path_typed(
        self,
        path: &NodePath,
        fhir_type: &'a str,
    ) -> Result<Self, EvalError> {
        let mut ctx = self.with_focus_path(path)?;
        if let Item::Node(n) = &mut ctx.focus {
            n.set_type(fhir_type);
        }
        Ok(ctx)
    }

    /// Sets `%resource` (e.g. a Bundle entry's resource node while the root stays the Bundle).
    pub fn with_resource(mut self, resource: Item<'a>) -> Self {
        self.resource = resource;
        self
    }

    /// Defines `%name` as a collection of items.
    pub fn with_variable(mut self, name: &str, items: Vec<Item<'a>>) -> Self {
        self.set_variable(name, items);
        self
    }

    /// Defines `%name` as a collection of JSON values (not located in the document).
    pub fn with_json_variable(
        mut self,
        name: &str,
        values: impl IntoIterator<Item = &'a Json>,
    ) -> Self {
        let items = values
            .into_iter()
            .map(|v| Item::Node(Node::detached(v, "")))
            .collect();
        self.set_variable(name, items);
        self
    }

    /// Fixes the instant `now()`, `today()` and `timeOfDay()` report.
    pub fn with_now(self, now: DateTime<FixedOffset>) -> Self {
        let cell = std::sync::OnceLock::new();
        let _ = cell.set(now);
        EvalContext { now: cell, ..self }
    }

    /// The instant `now()` reports for this context.
    pub fn now(&self) -> DateTime<FixedOffset> {
        *self.now.get_or_init(|| chrono::Local::now().fixed_offset())
    }

    fn set_variable(&mut self, name: &str, items: Vec<Item<'a>>) {
        match self.variables.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = items,
            None => self.variables.push((name.to_string(), items)),
        }
    }

    /// The document root.
    pub fn root(&self) -> &'a Json {
        self.root
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn variables_lists_each_read_variable_once() {
        let e = Expression::compile("name.where(use = %a).given[%b] | %a.select(%c) is String")
            .unwrap();
        assert_eq!(e.variables(), vec!["a", "b", "c"]);
        assert!(Expression::compile("'%a'").unwrap().variables().is_empty());
    }

    #[test]
    fn type_specifier_arguments_reach_custom_functions_as_names() {
        let mut reg = FunctionRegistry::new();
        reg.register_with_type_args("typeName", 0, 1, |_focus, args| {
            Ok(args.first().cloned().unwrap_or_default())
        });
        let patient = serde_json::json!({"resourceType": "Patient", "id": "p"});
        let ctx = EvalContext::new(&patient);
        for (src, want) in [
            ("typeName(Patient)", "Patient"),
            ("typeName(FHIR.Observation)", "Observation"),
            ("typeName('Group')", "Group"),
        ] {
            let out = Expression::compile_with(src, &reg)
                .unwrap()
                .evaluate(&ctx)
                .unwrap();
            assert_eq!(out.len(), 1, "{src}");
            assert_eq!(out[0].as_json(), serde_json::json!(want), "{src}");
        }
    }

    #[test]
    fn expression_is_send_sync() {
        assert_send_sync::<Expression>();
        assert_send_sync::<FunctionRegistry>();
    }
}
