//! The FHIR R4 model, generated from the official definitions.
//!
//! The tables come from `data/r4-model.json`, which `scripts/gen-fhir-model.py` generates from the
//! R4 StructureDefinitions, SearchParameters and the Patient CompartmentDefinition. They are embedded
//! in the binary and indexed once, on first use of [`r4()`].
//!
//! Architecture Invariant: this crate is pure — no IO, no async, no global state besides the lazily
//! built model.

mod model;
mod primitives;
mod subsetted;
mod validate;

pub use model::{
    ChildRef, ElementDef, KeyWords, Model, SearchParam, SearchParamType, TypeDef, TypeKind, r4,
};
pub use primitives::{primitive_text_ok, primitive_value_ok};
pub use subsetted::{SUBSETTED_CODE, SUBSETTED_SYSTEM, subsetted_tag};
pub use validate::ValidationIssue;
