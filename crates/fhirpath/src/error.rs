//! Errors of compilation and evaluation.

use thiserror::Error;

/// An expression that does not parse or does not resolve (unknown function, wrong arity).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("FHIRPath parse error at position {position}: expected {expected}, found {found}")]
pub struct ParseError {
    /// Byte offset in the source where the problem was found.
    pub position: usize,
    /// What the parser expected there.
    pub expected: String,
    /// What it found instead.
    pub found: String,
}

impl ParseError {
    pub(crate) fn new(position: usize, expected: &str, found: &str) -> Self {
        ParseError {
            position,
            expected: expected.to_string(),
            found: found.to_string(),
        }
    }
}

/// A failure while evaluating a compiled expression.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EvalError {
    /// A function or operator met operands it cannot handle (e.g. `'a' + 1`, `single()` on two items).
    #[error("{0}")]
    Type(String),
    /// A function of the specification this engine does not implement (terminology services).
    #[error("unsupported FHIRPath function: {0}")]
    Unsupported(String),
    /// `%name` that the context does not define.
    #[error("undefined variable %{0}")]
    UndefinedVariable(String),
    /// The starting node given to the context is not in the document.
    #[error("no node at {0}")]
    NoSuchNode(String),
    /// A custom function reported a failure.
    #[error("{name}: {message}")]
    Function { name: String, message: String },
    /// The evaluation did more work than one evaluation may (collections or strings growing
    /// without bound); the number is the budget.
    #[error(
        "the expression needs more than {0} evaluation steps (its collections or strings grow too large)"
    )]
    Budget(u64),
    /// The caller's stop condition ([`crate::with_stop`]) asked the evaluation to end: the
    /// client went away, the job was cancelled.
    #[error("the evaluation was stopped (the request ended or was cancelled)")]
    Stopped,
}

impl EvalError {
    pub(crate) fn ty(msg: impl Into<String>) -> Self {
        EvalError::Type(msg.into())
    }
}
