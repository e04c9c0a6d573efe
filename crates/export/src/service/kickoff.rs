//! Kick-offs: an `$export` (or `$viewdefinition-export`) request validated, authorized, its
//! de-identification configuration fetched and compiled, planned into work items and queued; an
//! `$import` validated against the storage and queued.

use std::sync::Arc;

use serde_json::Value;

use super::{ExportError, ExportService, now_ms, without_queries};
use crate::access::{self, ExportAccess};
use crate::anonymization::{AnonymizationError, load_from_storage};
use crate::jobs::{Cleanup, ItemKind, JobRecord, JobState, QueueError};
use crate::record::{self, ExportRecord, JobRequest};
use crate::request::{ExportLevel, ExportRequest, RequestError, parameters_to_pairs};
use crate::run::{RunError, plan};

/// Largest work item of a de-identified export.
const DEID_ITEM_RESOURCES: u64 = 10_000;

impl ExportService {
    /// Validates a kick-off, authorizes the parsed request for `access` (the caller), fetches
    /// and compiles its de-identification configuration, plans its work items and queues it for
    /// the caller's client. `pairs` is the query, `body` the POST Parameters resource, if any.
    /// Without `_type`, a restricted caller's export covers exactly the types it may export.
    pub fn kickoff(
        self: &Arc<Self>,
        level: ExportLevel,
        pairs: Vec<(String, String)>,
        body: Option<&Value>,
        lenient: bool,
        request_url: String,
        access: &dyn ExportAccess,
    ) -> Result<String, ExportError> {
        self.kickoff_with(level, pairs, body, lenient, false, request_url, access)
    }

    /// [`ExportService::kickoff`] with `Prefer: separate-export-status` (`separate`): recorded
    /// with the job, so that every node answers its status polls with `200` and the job's
    /// status in `X-Export-Status`.
    #[allow(clippy::too_many_arguments)]
    pub fn kickoff_with(
        self: &Arc<Self>,
        level: ExportLevel,
        mut pairs: Vec<(String, String)>,
        body: Option<&Value>,
        lenient: bool,
        separate: bool,
        request_url: String,
        access: &dyn ExportAccess,
    ) -> Result<String, ExportError> {
        let is_post = body.is_some();
        if let Some(b) = body {
            pairs.extend(parameters_to_pairs(b)?);
        }
        // As many patients as a Group export may resolve, counted before anything is parsed.
        let max_patients = self.config.run.group_max_members;
        if pairs.iter().filter(|(k, _)| k == "patient").count() > max_patients {
            return Err(ExportError::TooCostly(RequestError {
                param: "patient".into(),
                message: format!(
                    "more than {max_patients} patient references (the most a Group export may resolve, --export-group-max-members): export a Group of them instead, or split the list over several exports"
                ),
            }));
        }
        let now = now_ms();
        // `_since` is checked, and an empty store's `transactionTime` taken, on the clock that
        // stamps `lastUpdated` (PostgreSQL: the database server's, shared by every node).
        let store_now = self.store.now_ms().map_err(ExportError::Store)?;
        let mut req = ExportRequest::parse(
            level.clone(),
            &pairs,
            is_post,
            lenient,
            store_now,
            request_url.clone(),
        )?;
        if req.container.as_deref() == Some(self.config.import_container.as_str()) {
            return Err(ExportError::Request(RequestError {
                param: "_container".into(),
                message: format!(
                    "'{}' is the container $import reads from (--import-container) and cannot receive exports",
                    self.config.import_container
                ),
            }));
        }
        crate::request::check_type_filter_limits(
            &req.type_filters,
            &self.config.type_filter_limits,
        )?;
        if req.types.is_empty()
            && let Some(allowed) = access::exportable_types(access)
        {
            if allowed.is_empty() {
                return Err(ExportError::Forbidden(
                    "the granted scopes allow exporting no resource type (export needs `r` and `s`, or v1 `read`)".into(),
                ));
            }
            // Recorded with the job, so its workers and later checks see the same list.
            pairs.push(("_type".into(), allowed.join(",")));
            req.types = allowed;
        }
        access::authorize(&req, access).map_err(ExportError::Forbidden)?;
        let client_id = access.client_id().map(str::to_string);
        if let ExportLevel::Group(id) = &level {
            match self.store.read("Group", id) {
                Ok(_) => {}
                Err(store::StoreError::NotFound { .. } | store::StoreError::Gone { .. }) => {
                    return Err(ExportError::GroupNotFound(id.clone()));
                }
                Err(e) => return Err(ExportError::Store(e)),
            }
        }
        // An early answer before the configuration is fetched and the export planned.
        self.admission(client_id.as_deref())?;
        // The configuration is fetched and compiled now: a bad one answers 400 here rather
        // than failing the job later.
        let anonymization = match &req.anonymization {
            None => None,
            Some(spec) => {
                let mut info = match &spec.collection {
                    None => load_from_storage(self.config.sink.as_ref(), spec)?,
                    Some(image) => match &self.config.image_configs {
                        Some(fetch) => fetch(image, &spec.config)?,
                        None => return Err(AnonymizationError::NotAllowed(image.clone()).into()),
                    },
                };
                if let Some(name) = &spec.key_set {
                    crate::anonymization::apply_key_set(&mut info, self.queue.as_ref(), name)?;
                }
                crate::anonymization::draw_missing_keys(&mut info)?;
                Some(info)
            }
        };
        // The server's default compression is pinned on the job, like its types.
        if self.config.gzip && req.gzip.is_none() && req.views.is_empty() {
            pairs.push(("_compression".into(), "gzip".into()));
            req.gzip = Some(true);
        }
        let wm = self.store.watermark().map_err(ExportError::Store)?;
        let transaction_time = wm
            .last_updated
            .unwrap_or_else(|| store::format_instant_ms(store_now));
        // De-identification is CPU-bound: smaller items let every worker share a large type.
        let item_resources = if anonymization.is_some() {
            self.config.run.item_resources.min(DEID_ITEM_RESOURCES)
        } else {
            self.config.run.item_resources
        };
        let mut items =
            plan(self.store.as_ref(), &req, wm.seq, item_resources).map_err(|e| match e {
                RunError::Store(e) => ExportError::Store(e),
                RunError::Queue(q) => ExportError::from(q),
                e => ExportError::Plan(Box::new(e)),
            })?;
        // A dry run writes no data: its finalize item runs the report over the export's scope.
        if req.anonymization.as_ref().is_some_and(|s| s.dry_run) {
            items.retain(|i| i.kind == store::jobs::ItemKind::Finalize);
        }
        let container = req
            .container
            .clone()
            .unwrap_or_else(|| self.config.default_container.clone());
        let id = self.queue_job(
            NewJob {
                request: JobRequest::Export(ExportRecord::new(
                    &level,
                    &pairs,
                    is_post,
                    lenient,
                    &request_url,
                    separate,
                )),
                watermark: wm.seq,
                transaction_time,
                client_id,
                container,
                anonymization: anonymization.as_ref().map(record::encode_anonymization),
                created_ms: now,
            },
            &items,
        )?;
        tracing::info!(job = %id, items = items.len(), "export queued");
        Ok(id)
    }

    /// The early answer to a kick-off while the server runs as many jobs as it may (429); the
    /// admission itself is decided atomically when the job is recorded ([`Self::queue_job`]).
    fn admission(&self, client: Option<&str>) -> Result<(), ExportError> {
        let active = self.queue.active_count()?;
        if active >= self.config.max_concurrent {
            return Err(ExportError::TooMany(active));
        }
        if let Some(client) = client {
            let mine = self.queue.active_count_of(client)?;
            if mine >= self.config.max_per_client {
                return Err(ExportError::TooManyForClient {
                    active: mine,
                    limit: self.config.max_per_client,
                });
            }
        }
        Ok(())
    }

    /// Queues the job of a kick-off (`$export` or `$import`) with its work items: its container
    /// prepared, a new id that also names its folder, state `Queued`; admitted to the
    /// concurrency limit in the transaction that records it. The job's id.
    fn queue_job(
        &self,
        new: NewJob,
        items: &[store::jobs::ItemPlan],
    ) -> Result<String, ExportError> {
        self.config
            .sink
            .ensure_container(&new.container)
            .map_err(|e| self.destination_error(&new.container, &e))?;
        let id = new_job_id();
        let job = JobRecord {
            id: id.clone(),
            state: JobState::Queued,
            request: new.request.encode(),
            watermark: new.watermark,
            transaction_time: new.transaction_time,
            client_id: new.client_id,
            container: new.container,
            folder: id.clone(),
            anonymization: new.anonymization,
            result: None,
            failure_status: None,
            created_ms: new.created_ms,
            finished_ms: None,
            cleanup: Cleanup::None,
        };
        let admission = store::jobs::Admission {
            max_active: self.config.max_concurrent,
            max_per_client: self.config.max_per_client,
        };
        self.queue
            .create_admitted(&job, items, admission)
            .map_err(|e| match e {
                QueueError::ClientFull(active) => ExportError::TooManyForClient {
                    active,
                    limit: admission.max_per_client,
                },
                e => ExportError::from(e),
            })?;
        self.notify();
        Ok(id)
    }

    /// A destination fault at kick-off: 503 while the destination is unreachable or overloaded
    /// (the client retries later), else why it refused. Named by kind and location, without
    /// secrets (queries dropped) or the destination's own answer text.
    fn destination_error(&self, container: &str, e: &crate::sink::SinkError) -> ExportError {
        let sink = self.config.sink.as_ref();
        let at = without_queries(&sink.location(container, ""));
        let kind = sink.kind();
        tracing::warn!(destination = kind, at = %at, error = %without_queries(&e.to_string()), "export destination fault at kick-off");
        match e {
            e if e.is_transient() => ExportError::DestinationUnavailable(format!(
                "the {kind} export destination at {at} is unavailable; retry later"
            )),
            crate::sink::SinkError::Refused(why) => ExportError::Destination(format!(
                "the {kind} export destination at {at} cannot be used: {why}"
            )),
            _ => ExportError::Destination(format!(
                "the {kind} export destination at {at} failed to prepare container '{container}'"
            )),
        }
    }

    /// Validates an `$import` kick-off (Azure's Parameters: `inputFormat`, `mode`, `input`
    /// entries naming objects of the configured storage), authorizes it for `access` (`c` and
    /// `u` on each type), checks the inputs exist and queues it: one item per input and a
    /// finalize item. InitialLoad is refused (409) unless the server has never stored a
    /// resource: it keeps the inputs' versions and instants, which only make sense in an empty
    /// server.
    pub fn import_kickoff(
        self: &Arc<Self>,
        body: &Value,
        request_url: String,
        access: &dyn ExportAccess,
    ) -> Result<String, ExportError> {
        let sink = self.config.sink.as_ref();
        let req = crate::import::ImportRequest::parse(
            body,
            sink,
            &self.config.import_container,
            request_url,
        )?;
        access::authorize_import(&req.types(), access).map_err(ExportError::Forbidden)?;
        if req.mode == ingest::import::ImportMode::InitialLoad {
            let wm = self.store.watermark().map_err(ExportError::Store)?;
            if wm.seq > 0 {
                return Err(ExportError::Conflict(
                    "InitialLoad needs an empty server (this one has stored resources); use IncrementalLoad to add to it".into(),
                ));
            }
        }
        for input in &req.inputs {
            match sink.stat(&input.container, &input.path) {
                Ok(_) => {}
                Err(
                    crate::sink::SinkError::NotFound(_)
                    | crate::sink::SinkError::ContainerNotFound(_),
                ) => {
                    return Err(ExportError::Request(RequestError {
                        param: "input".into(),
                        message: format!("input '{}' does not exist in the storage", input.url),
                    }));
                }
                Err(e) => return Err(self.destination_error(&input.container, &e)),
            }
        }
        self.admission(access.client_id())?;
        let now = now_ms();
        let mut items: Vec<store::jobs::ItemPlan> = req
            .inputs
            .iter()
            .map(|i| store::jobs::ItemPlan {
                kind: ItemKind::Scan,
                resource_type: i.resource_type.clone(),
                seq_after: 0,
                seq_up_to: i64::MAX,
                expected: 0,
            })
            .collect();
        items.push(store::jobs::ItemPlan {
            kind: ItemKind::Finalize,
            resource_type: String::new(),
            seq_after: 0,
            seq_up_to: 0,
            expected: 0,
        });
        let (inputs, mode) = (req.inputs.len(), req.mode.as_str());
        let id = self.queue_job(
            NewJob {
                request: JobRequest::Import(req),
                watermark: 0,
                transaction_time: store::format_instant_ms(
                    self.store.now_ms().map_err(ExportError::Store)?,
                ),
                client_id: access.client_id().map(str::to_string),
                container: self.config.default_container.clone(),
                anonymization: None,
                created_ms: now,
            },
            &items,
        )?;
        tracing::info!(job = %id, inputs, mode, "import queued");
        Ok(id)
    }
}

/// What the job of a kick-off records beside what every new job has (see
/// [`ExportService::queue_job`]).
struct NewJob {
    request: JobRequest,
    /// The pinned snapshot (`$import`: none, 0).
    watermark: i64,
    transaction_time: String,
    client_id: Option<String>,
    container: String,
    /// The encoded de-identification of an `$export`.
    anonymization: Option<String>,
    created_ms: i64,
}

/// A new job's id, which also names its folder and its status URL: a random UUID in 32
/// lowercase hexadecimal digits (see [`is_job_id`]).
fn new_job_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Whether `id` has the shape of the ids this server gives jobs (32 lowercase hexadecimal
/// digits): a status URL whose id has another shape names no job.
pub fn is_job_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    #[test]
    fn new_job_ids_have_the_job_id_shape() {
        for _ in 0..100 {
            assert!(super::is_job_id(&super::new_job_id()));
        }
        for bad in ["", "job1", &"A".repeat(32), &"a".repeat(33), "../x"] {
            assert!(!super::is_job_id(bad), "{bad}");
        }
    }
}
