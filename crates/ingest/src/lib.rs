//! The single write path of Fhirhose, shared by `POST /` and the bulk loader.
//!
//! - [`bundle`]: batch/transaction Bundles → store writes and a response Bundle
//!   ([`process_bundle`]; the pure part is [`bundle::translate`]).
//! - [`loader`]: `fhirhose load --data-dir DIR PATH...` ([`load_into_store`]) and
//!   `fhirhose load --server URL PATH...` ([`load_to_server`]), with [`LoadOptions`], a progress
//!   callback ([`LoadProgress`]) and a per-type [`LoadSummary`].
//! - [`import`]: `$import`'s write step, a chunk of NDJSON lines of one input checked like the
//!   loader's resources and written in one store transaction, idempotently
//!   ([`import::import_lines`]).
//! - [`synth`]: `fhirhose synth --patients N --out DIR` ([`synth::synthesize`]).
//! - [`references`]: `fullUrl` → `Type/id` resolution and reference rewriting.
//! - [`source`]: input discovery and streaming (NDJSON, Bundle JSON, `.gz`); the JSON parse and
//!   the streaming of Bundle entries on serde_json's public API in `source/json.rs`, the fullUrl
//!   pre-pass in `source/prepass.rs`.
//! - [`strict_json`]: the JSON reader of every ingestion path (REST bodies, the loader,
//!   `$import`): serde_json's `Value`, but a duplicate object key is an error.
//! - [`outcome`]: OperationOutcome building and the store-error → HTTP status mapping, which the
//!   server should reuse so that bundle entries and plain requests answer alike.

pub mod bundle;
pub mod error;
pub mod import;
pub mod loader;
pub mod outcome;
pub mod references;
mod sched;
pub mod source;
pub mod strict_json;
pub mod synth;

pub use bundle::{BundleOptions, process_bundle};
pub use error::{BundleError, EntryError, LoadError, SynthError};
pub use loader::{
    IndexBuild, LoadOptions, LoadProgress, LoadSummary, Problem, load_into_store, load_to_server,
};
pub use synth::{SynthOptions, SynthProgress, SynthSummary, synthesize};
