//! The crate's error: why a resource could not be anonymized.

use crate::config::{ConfigError, Rule};

/// Why a resource could not be anonymized.
#[derive(Debug, thiserror::Error)]
pub enum DeidError {
    #[error("configuration: {0}")]
    Config(#[from] ConfigError),
    /// Skippable with `processingErrors: skip` (generalize evaluation failures).
    #[error("rule {rule} ({path}): {message}")]
    Processing {
        rule: usize,
        path: String,
        message: String,
    },
    /// Not skippable: a method that cannot apply to the node, an unknown method, a bad value.
    #[error("rule {rule} ({path}): {message}")]
    Rule {
        rule: usize,
        path: String,
        message: String,
    },
    #[error("The input FHIR resource JSON is invalid: {0}")]
    InvalidInput(String),
}

/// A [`DeidError::Rule`] of `rule`.
pub(crate) fn rule_err(rule: &Rule, message: String) -> DeidError {
    DeidError::Rule {
        rule: rule.index,
        path: rule.path.clone(),
        message,
    }
}
