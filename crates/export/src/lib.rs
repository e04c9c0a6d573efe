//! FHIR Bulk Data `$export`.
//!
//! - [`defaults`]: the settings' default values, shared with the `serve` flags.
//! - [`request`]: kick-off parameters, parsed and validated ([`ExportRequest`]).
//! - [`jobs`]: the durable job queue ([`JobQueue`]), re-exported from the store, which keeps it
//!   in its own database ([`store::Store::jobs`]).
//! - [`run`]: executing one export against a pinned store snapshot into NDJSON files.
//! - [`access`]: who may start, see and use an export, decided on the parsed request.
//! - [`import`]: `$import` (Azure's shape) as jobs of the same queue: one item per input,
//!   NDJSON read from the configured storage and written through [`ingest::import`].
//! - [`error`]: [`RunError`] (running a work item) and [`RecordError`] (reading a job's record).
//! - [`record`]: the typed payloads of a job record (request, de-identification, result),
//!   decoded strictly ([`RecordError`]).
//! - [`service`]: [`ExportService`], what the HTTP layer calls: kick-off, status, cancel, files.
//!
//! Architecture Invariant: an export reads only through a store snapshot — every scan is
//! `as_of` the watermark recorded at kick-off, which is the manifest's `transactionTime`.
//! Architecture Invariant: files are written under a temporary name and renamed when complete;
//! a job that was interrupted is run again from its pinned snapshot into a cleared folder, so a
//! restart never duplicates or loses a resource and never leaves a half file.

pub mod access;
pub mod anonymization;
pub mod defaults;
pub mod error;
pub mod import;
pub mod jobs;
pub mod part;
pub mod record;
pub mod remote;
pub mod request;
pub mod run;
pub mod service;
pub mod sink;

pub use access::{ExportAccess, Unrestricted};
pub use anonymization::{AnonymizationError, AnonymizationInfo};
pub use error::{RecordError, RunError};
pub use jobs::{JobQueue, JobRecord, JobState, QueueError};
pub use record::JobRequest;
pub use remote::{ObjectStoreSink, RemoteConfig, RemoteSettings};
pub use request::{ExportLevel, ExportRequest, RequestError};
pub use run::RunSettings;
pub use service::{
    ExportConfig, ExportError, ExportService, FileSummary, ImageConfigFetcher, JobSummary,
    PartialPage, RECENT_JOBS, Status, StatusView, is_job_id,
};
pub use sink::{FileBody, LocalSink, ObjectInfo, Sink, SinkError};
