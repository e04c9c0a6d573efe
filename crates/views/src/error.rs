//! Errors: a ViewDefinition that cannot run ([`ViewError`], names the element and the reason) and a
//! resource that a valid view cannot turn into rows ([`RowError`]).

use thiserror::Error;

/// An invalid ViewDefinition. `element` is the FHIRPath-style location in the definition
/// (`select[0].column[1].path`; empty for the definition itself).
#[derive(Debug, Clone, PartialEq, Error)]
#[error("ViewDefinition{}: {reason}", at(element))]
pub struct ViewError {
    pub element: String,
    pub reason: Reason,
}

fn at(element: &str) -> String {
    if element.is_empty() {
        String::new()
    } else {
        format!(".{element}")
    }
}

impl ViewError {
    pub(crate) fn new(element: impl Into<String>, reason: Reason) -> Self {
        ViewError {
            element: element.into(),
            reason,
        }
    }
}

/// Why a ViewDefinition is invalid.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum Reason {
    #[error("not valid JSON: {0}")]
    Json(String),
    #[error("is required")]
    Missing,
    #[error("must be {0}")]
    WrongType(&'static str),
    #[error("must not be empty")]
    Empty,
    #[error("unknown element '{0}'")]
    UnknownElement(String),
    #[error("unknown resource type '{0}'")]
    UnknownResourceType(String),
    #[error("unknown FHIR type '{0}'")]
    UnknownType(String),
    #[error("'{0}' is not a valid name (a letter, then letters, digits or '_')")]
    InvalidName(String),
    #[error("unknown function '{function}' in '{path}'")]
    UnknownFunction { function: String, path: String },
    #[error("invalid FHIRPath '{path}': {source}")]
    InvalidPath {
        path: String,
        source: fhirpath::ParseError,
    },
    #[error("undefined constant %{name} in '{path}'")]
    UndefinedConstant { name: String, path: String },
    #[error("a constant needs exactly one value[x] of a primitive type")]
    ConstantValue,
    #[error("constant value is not a valid {0}")]
    ConstantInvalid(String),
    #[error("constant '{0}' is defined twice")]
    DuplicateConstant(String),
    #[error("column name '{0}' is already defined")]
    ColumnCollision(String),
    #[error(
        "unionAll branch has columns {found:?} where the first branch has {expected:?} (same names, order and types required)"
    )]
    UnionMismatch {
        expected: Vec<String>,
        found: Vec<String>,
    },
    #[error("only one of forEach, forEachOrNull and repeat may be given")]
    ConflictingIteration,
}

/// A resource the view cannot turn into rows (the view is valid; the data or a path's result is
/// not what the view allows).
#[derive(Debug, Clone, PartialEq, Error)]
#[error("{}{element}: {reason}", resource.as_deref().map(|r| format!("{r}: ")).unwrap_or_default())]
pub struct RowError {
    /// `Type/id` of the resource, when it has an id.
    pub resource: Option<String>,
    /// Where in the view (`select[0].column[1]`, `where[0]`).
    pub element: String,
    pub reason: RowReason,
}

#[derive(Debug, Clone, PartialEq, Error)]
pub enum RowReason {
    #[error("FHIRPath evaluation failed: {0}")]
    Eval(#[from] fhirpath::EvalError),
    #[error("column '{column}' has {count} values but is not a collection (set collection: true)")]
    MultipleValues { column: String, count: usize },
    #[error("where path must give a single boolean, found {0}")]
    WhereNotBoolean(String),
    #[error("repeat goes deeper than {0} levels")]
    RepeatTooDeep(usize),
    #[error("the resource gives more than {0} rows")]
    TooManyRows(usize),
}
