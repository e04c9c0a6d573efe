//! De-identification of FHIR R4 resources with Microsoft FHIR anonymizer configurations
//! (docs/specs/anonymizer.md; the `§` numbers in this crate are its sections). Pure: no IO.

pub mod config;

pub use config::{Config, ConfigError, DateShiftScope, Method, Parameters, ProcessingErrors, Rule};
pub mod engine;
mod error;
pub mod keys;
mod methods;
mod patient;
mod plan;
pub mod report;
pub mod transforms;
mod typing;

pub use engine::{DeidError, Engine, Outcome, Written};
