//! [`ExportService`]: what the HTTP layer calls (kick-off, status, cancel, files), and the pool
//! of workers that claim work items from the job queue.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use store::{SqliteStore, Store};

use crate::anonymization::{AnonymizationError, AnonymizationInfo, Anonymizer, load_from_storage};
use crate::jobs::{
    FileKind, ItemKind, JobQueue, JobRecord, JobState, QueueError, SqliteJobQueue, WorkItem,
};
use crate::request::{ExportLevel, ExportRequest, RequestError, parameters_to_pairs};
use crate::run::{ItemContext, Prepared, RunError, RunSettings, execute_item, plan};
use crate::sink::{FileBody, Sink};

/// Fetches an anonymizer configuration out of an OCI image (`_anonymizationConfigCollectionReference`):
/// `(image reference, file name)` → the configuration. Supplied by the server, which owns the
/// registry client and its allow-list.
pub type ImageConfigFetcher =
    dyn Fn(&str, &str) -> Result<AnonymizationInfo, AnonymizationError> + Send + Sync;

/// Largest work item of a de-identified export.
const DEID_ITEM_RESOURCES: u64 = 10_000;

/// Export settings from the server configuration.
#[derive(Clone)]
pub struct ExportConfig {
    /// Where export folders are written (a local folder by default).
    pub sink: Arc<dyn Sink>,
    /// `<data-dir>/exports.db`: the job queue.
    pub jobs_db: PathBuf,
    /// Container used without `_container`.
    pub default_container: String,
    /// File cutting and item sizes.
    pub run: RunSettings,
    /// Worker threads in this process (0: this process only answers kick-off, status and
    /// downloads; other processes sharing the queue do the work).
    pub workers: usize,
    /// Whether this process is the only one using the job queue (SQLite beside a locked data
    /// directory): then work left running at start-up is released at once instead of after the
    /// heartbeat timeout.
    pub exclusive_queue: bool,
    /// Exports queued or running at once; more get 429.
    pub max_concurrent: u64,
    /// A running work item without a heartbeat for this long is taken over.
    pub heartbeat_timeout: Duration,
    /// Claims per work item before the export fails.
    pub max_attempts: i64,
    /// Base URL for file URLs in manifests.
    pub base_url: String,
    /// Whether downloads need a bearer token (the manifest's `requiresAccessToken`).
    pub requires_access_token: bool,
    /// OCI image configurations; `None` refuses `_anonymizationConfigCollectionReference`.
    pub image_configs: Option<Arc<ImageConfigFetcher>>,
}

impl std::fmt::Debug for ExportConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportConfig")
            .field("sink", &self.sink.kind())
            .field("jobs_db", &self.jobs_db)
            .field("default_container", &self.default_container)
            .field("run", &self.run)
            .field("workers", &self.workers)
            .field("max_concurrent", &self.max_concurrent)
            .field("heartbeat_timeout", &self.heartbeat_timeout)
            .finish_non_exhaustive()
    }
}

impl ExportConfig {
    /// Defaults for a local folder destination at `storage_root`.
    pub fn local(storage_root: PathBuf, jobs_db: PathBuf, base_url: String) -> ExportConfig {
        ExportConfig {
            sink: Arc::new(crate::sink::LocalSink::new(storage_root)),
            jobs_db,
            default_container: "exports".into(),
            run: RunSettings::default(),
            workers: std::thread::available_parallelism().map_or(2, |n| n.get().max(2)),
            exclusive_queue: true,
            max_concurrent: 4,
            heartbeat_timeout: Duration::from_secs(600),
            max_attempts: 5,
            base_url,
            requires_access_token: false,
            image_configs: None,
        }
    }
}

/// Errors of the export API; each names the HTTP status it maps to.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// A kick-off parameter is invalid → 400.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// The Group of a Group-level export does not exist → 404.
    #[error("Group/{0} not found")]
    GroupNotFound(String),
    /// The de-identification configuration is missing, invalid or not allowed → 400
    /// (503 when the storage could not be read).
    #[error(transparent)]
    Anonymization(#[from] AnonymizationError),
    /// No such job, or not the caller's → 404.
    #[error("no export job '{0}'")]
    UnknownJob(String),
    /// No such file in a finished export → 404.
    #[error("no file '{0}' in this export")]
    UnknownFile(String),
    /// Too many exports at once → 429 with Retry-After.
    #[error("too many exports in progress ({0}); retry later")]
    TooMany(u64),
    /// Storage or job-table failure → 500.
    #[error("export storage failure: {0}")]
    Internal(String),
}

impl From<QueueError> for ExportError {
    fn from(e: QueueError) -> Self {
        ExportError::Internal(e.to_string())
    }
}

/// The state of a job as the status endpoint reports it.
#[derive(Debug, Clone)]
pub enum Status {
    InProgress { progress: String },
    Complete { manifest: Value },
    Failed { diagnostics: String, status: u16 },
}

/// Persisted form of a kick-off, parsed again by whichever worker runs the job.
fn request_json(
    level: &ExportLevel,
    pairs: &[(String, String)],
    is_post: bool,
    lenient: bool,
    url: &str,
) -> String {
    let (lv, gid) = match level {
        ExportLevel::System => ("system", None),
        ExportLevel::Patient => ("patient", None),
        ExportLevel::Group(g) => ("group", Some(g.clone())),
    };
    json!({"level": lv, "group": gid, "params": pairs, "post": is_post, "lenient": lenient, "url": url}).to_string()
}

fn parse_request_json(s: &str, now_ms: i64) -> Option<ExportRequest> {
    let v: Value = serde_json::from_str(s).ok()?;
    let level = match v["level"].as_str()? {
        "system" => ExportLevel::System,
        "patient" => ExportLevel::Patient,
        _ => ExportLevel::Group(v["group"].as_str()?.to_string()),
    };
    let pairs: Vec<(String, String)> = serde_json::from_value(v["params"].clone()).ok()?;
    ExportRequest::parse(
        level,
        &pairs,
        v["post"].as_bool()?,
        v["lenient"].as_bool()?,
        now_ms,
        v["url"].as_str()?.to_string(),
    )
    .ok()
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// `1234567` → `1,234,567`.
fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The export service: the job queue, this process's workers, and the per-job state they share.
pub struct ExportService {
    store: Arc<SqliteStore>,
    queue: Arc<dyn JobQueue>,
    config: ExportConfig,
    /// This process's lease-owner name.
    node: String,
    prepared: Mutex<HashMap<String, Arc<Prepared>>>,
    cancels: Mutex<HashMap<String, Arc<AtomicBool>>>,
    /// Resources scanned per running item of this process, finer than the heartbeats.
    live: Mutex<HashMap<(String, i64), (String, u64)>>,
    wake: (Mutex<u64>, Condvar),
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ExportService {
    /// Opens the job queue and starts this process's workers. Items left running by a previous
    /// process are released at once: the store's data-directory lock guarantees that no other
    /// live process shares this queue.
    pub fn open(
        store: Arc<SqliteStore>,
        config: ExportConfig,
    ) -> Result<Arc<ExportService>, ExportError> {
        let queue = Arc::new(SqliteJobQueue::open(&config.jobs_db)?);
        let released = queue.release_orphans()?;
        if released > 0 {
            tracing::info!(
                items = released,
                "resuming export work left by a previous process"
            );
        }
        let node = format!(
            "{}-{}",
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let svc = Arc::new(ExportService {
            store,
            queue,
            config,
            node,
            prepared: Mutex::new(HashMap::new()),
            cancels: Mutex::new(HashMap::new()),
            live: Mutex::new(HashMap::new()),
            wake: (Mutex::new(0), Condvar::new()),
        });
        for n in 0..svc.config.workers {
            let me = Arc::downgrade(&svc);
            let spawned = std::thread::Builder::new()
                .name(format!("export-worker-{n}"))
                .spawn(move || worker_loop(me));
            if let Err(e) = spawned {
                return Err(ExportError::Internal(format!(
                    "cannot start an export worker: {e}"
                )));
            }
        }
        Ok(svc)
    }

    /// The number of exports queued or running (they resume on their own).
    pub fn resume(self: &Arc<Self>) -> Result<u64, ExportError> {
        Ok(self.queue.active_count()?)
    }

    fn notify(&self) {
        let (m, cv) = &self.wake;
        *lock(m) += 1;
        cv.notify_all();
    }

    fn cancel_flag(&self, job: &str) -> Arc<AtomicBool> {
        lock(&self.cancels)
            .entry(job.to_string())
            .or_insert_with(|| Arc::new(AtomicBool::new(false)))
            .clone()
    }

    /// Validates a kick-off, fetches and compiles its de-identification configuration, plans its
    /// work items and queues it. `body` is the POST Parameters resource, if any.
    #[allow(clippy::too_many_arguments)]
    pub fn kickoff(
        self: &Arc<Self>,
        level: ExportLevel,
        mut pairs: Vec<(String, String)>,
        body: Option<&Value>,
        lenient: bool,
        request_url: String,
        client_id: Option<String>,
    ) -> Result<String, ExportError> {
        let is_post = body.is_some();
        if let Some(b) = body {
            pairs.extend(parameters_to_pairs(b)?);
        }
        let now = now_ms();
        let req = ExportRequest::parse(
            level.clone(),
            &pairs,
            is_post,
            lenient,
            now,
            request_url.clone(),
        )?;
        if let ExportLevel::Group(id) = &level {
            match self.store.read("Group", id) {
                Ok(_) => {}
                Err(store::StoreError::NotFound { .. } | store::StoreError::Gone { .. }) => {
                    return Err(ExportError::GroupNotFound(id.clone()));
                }
                Err(e) => return Err(ExportError::Internal(e.to_string())),
            }
        }
        let active = self.queue.active_count()?;
        if active >= self.config.max_concurrent {
            return Err(ExportError::TooMany(active));
        }
        // The configuration is fetched and compiled now: a bad one answers 400 here rather
        // than failing the job later.
        let anonymization = match &req.anonymization {
            None => None,
            Some(spec) => Some(match &spec.collection {
                None => load_from_storage(self.config.sink.as_ref(), spec)?,
                Some(image) => match &self.config.image_configs {
                    Some(fetch) => fetch(image, &spec.config)?,
                    None => return Err(AnonymizationError::NotAllowed(image.clone()).into()),
                },
            }),
        };
        let wm = self
            .store
            .watermark()
            .map_err(|e| ExportError::Internal(e.to_string()))?;
        let transaction_time = wm
            .last_updated
            .unwrap_or_else(|| store::format_instant_ms(now));
        // De-identification is CPU-bound: smaller items let every worker share a large type.
        let item_resources = if anonymization.is_some() {
            self.config.run.item_resources.min(DEID_ITEM_RESOURCES)
        } else {
            self.config.run.item_resources
        };
        let items = plan(self.store.as_ref(), &req, wm.seq, item_resources)
            .map_err(|e| ExportError::Internal(e.to_string()))?;
        let id = uuid::Uuid::new_v4().simple().to_string();
        let container = req
            .container
            .clone()
            .unwrap_or_else(|| self.config.default_container.clone());
        self.config
            .sink
            .ensure_container(&container)
            .map_err(|e| ExportError::Internal(e.to_string()))?;
        let job = JobRecord {
            id: id.clone(),
            state: JobState::Queued,
            request: request_json(&level, &pairs, is_post, lenient, &request_url),
            watermark: wm.seq,
            transaction_time,
            client_id,
            container,
            folder: id.clone(),
            anonymization: anonymization.map(|a| serde_json::to_string(&a).unwrap_or_default()),
            result: None,
            failure_status: None,
            created_ms: now,
            finished_ms: None,
        };
        self.queue.create(&job, &items)?;
        tracing::info!(job = %id, items = items.len(), "export queued");
        self.notify();
        Ok(id)
    }

    /// The prepared state of a job, built once per job and process.
    fn prepare(&self, job_id: &str) -> Result<Arc<Prepared>, RunError> {
        if let Some(p) = lock(&self.prepared).get(job_id) {
            return Ok(p.clone());
        }
        let job = self.queue.get(job_id)?.ok_or(RunError::Stopped)?;
        let req = parse_request_json(&job.request, job.created_ms).ok_or(RunError::BadRequest)?;
        let anonymizer = match &job.anonymization {
            None => None,
            Some(text) => {
                let info: AnonymizationInfo =
                    serde_json::from_str(text).map_err(|_| RunError::BadRequest)?;
                Some(
                    Anonymizer::new(info, &job.folder)
                        .map_err(|e| RunError::Anonymization(e.to_string()))?,
                )
            }
        };
        let p = Arc::new(Prepared::new(
            self.store.as_ref(),
            job,
            req,
            anonymizer,
            &self.config.run,
        )?);
        lock(&self.prepared).insert(job_id.to_string(), p.clone());
        Ok(p)
    }

    fn forget(&self, job_id: &str) {
        lock(&self.prepared).remove(job_id);
        lock(&self.cancels).remove(job_id);
    }

    /// Runs one claimed item and records the outcome.
    fn run_item(&self, item: WorkItem) {
        let job_id = item.job_id.clone();
        let key = (job_id.clone(), item.item_no);
        let result = self.prepare(&job_id).and_then(|prepared| {
            let cancel = self.cancel_flag(&job_id);
            let live_scanned = |n: u64| {
                lock(&self.live).insert(key.clone(), (item.resource_type.clone(), n));
            };
            let ctx = ItemContext {
                store: self.store.as_ref(),
                queue: self.queue.as_ref(),
                sink: self.config.sink.as_ref(),
                prepared: &prepared,
                settings: &self.config.run,
                cancel: &cancel,
                live_scanned: &live_scanned,
            };
            execute_item(&ctx, &item)?;
            if item.kind == ItemKind::Finalize {
                self.complete_job(&prepared)?;
            }
            Ok(())
        });
        lock(&self.live).remove(&key);
        match result {
            Ok(()) => {}
            Err(RunError::LeaseLost) => {
                tracing::warn!(job = %job_id, item = item.item_no, "work item taken over elsewhere");
            }
            Err(RunError::Stopped) => {
                // Cancelled or failed: make sure nothing of this export remains.
                if let Ok(Some(job)) = self.queue.get(&job_id) {
                    let _ = self.config.sink.delete_prefix(&job.container, &job.folder);
                }
                self.forget(&job_id);
            }
            Err(e) => {
                let retry = e.is_transient();
                tracing::error!(job = %job_id, item = item.item_no, error = %e, retry, "export work item failed");
                let _ = self
                    .queue
                    .fail_item(&item, &e.to_string(), e.status(), retry, now_ms());
                if !retry {
                    if let Ok(Some(job)) = self.queue.get(&job_id) {
                        let _ = self.config.sink.delete_prefix(&job.container, &job.folder);
                    }
                    self.forget(&job_id);
                }
            }
        }
    }

    /// Writes the manifest of a job whose items are all done.
    fn complete_job(&self, prepared: &Prepared) -> Result<(), RunError> {
        let job = &prepared.job;
        let files = self.queue.files(&job.id)?;
        let url = |name: &str| format!("{}/export-files/{}/{}", self.config.base_url, job.id, name);
        let list = |kind: FileKind| -> Vec<Value> {
            files
                .iter()
                .filter(|f| f.kind == kind)
                .map(|f| json!({"type": f.resource_type, "url": url(&f.name), "count": f.count}))
                .collect()
        };
        let mut storage = json!({
            "kind": self.config.sink.kind(),
            "container": job.container,
            "folder": job.folder,
            "location": self.config.sink.location(&job.container, &job.folder),
        });
        if let Some(a) = &prepared.anonymizer {
            storage["anonymization"] = a.info.manifest_extension();
        }
        let mut manifest = json!({
            "transactionTime": job.transaction_time,
            "request": prepared.req.request_url,
            "requiresAccessToken": self.config.requires_access_token,
            "output": list(FileKind::Output),
            "error": list(FileKind::Error),
            "extension": {"storage": storage},
        });
        if prepared.req.since_ms.is_some() {
            manifest["deleted"] = Value::Array(list(FileKind::Deleted));
        }
        self.queue.finish(
            &job.id,
            JobState::Complete,
            Some(&manifest.to_string()),
            None,
            now_ms(),
        )?;
        let total: u64 = files
            .iter()
            .filter(|f| f.kind == FileKind::Output)
            .map(|f| f.count)
            .sum();
        tracing::info!(job = %job.id, files = files.len(), resources = total, "export complete");
        self.forget(&job.id);
        Ok(())
    }

    fn owned_job(
        &self,
        id: &str,
        may_see: &dyn Fn(Option<&str>) -> bool,
    ) -> Result<JobRecord, ExportError> {
        let job = self
            .queue
            .get(id)?
            .ok_or_else(|| ExportError::UnknownJob(id.to_string()))?;
        if job.state == JobState::Cancelled || !may_see(job.client_id.as_deref()) {
            return Err(ExportError::UnknownJob(id.to_string()));
        }
        Ok(job)
    }

    /// Progress text such as `Observation 1,200,000 of 3,000,000 (2 of 17 types done)`.
    fn progress_text(&self, job_id: &str) -> Result<String, ExportError> {
        let mut types = self.queue.progress(job_id)?;
        for ((j, _), (t, n)) in lock(&self.live).iter() {
            if j == job_id
                && let Some(tp) = types.iter_mut().find(|tp| &tp.resource_type == t)
            {
                tp.scanned = tp.scanned.max(*n);
            }
        }
        let done = types.iter().filter(|t| t.done).count();
        Ok(match types.iter().find(|t| !t.done) {
            Some(t) => format!(
                "{} {} of {} ({done} of {} types done)",
                t.resource_type,
                // `expected` is estimated from the item ranges; a resumed item rescans a little.
                thousands(if t.expected > 0 {
                    t.scanned.min(t.expected)
                } else {
                    t.scanned
                }),
                thousands(t.expected),
                types.len()
            ),
            None if types.is_empty() => "queued".to_string(),
            None => format!("finishing ({done} of {} types done)", types.len()),
        })
    }

    /// The state of a job; `may_see` decides whether the caller may see a job of that client.
    pub fn status(
        &self,
        id: &str,
        may_see: &dyn Fn(Option<&str>) -> bool,
    ) -> Result<Status, ExportError> {
        let job = self.owned_job(id, may_see)?;
        Ok(match job.state {
            JobState::Queued | JobState::Running | JobState::Cancelled => Status::InProgress {
                progress: self.progress_text(id)?,
            },
            JobState::Complete => Status::Complete {
                manifest: job
                    .result
                    .as_deref()
                    .and_then(|s| serde_json::from_str(s).ok())
                    .unwrap_or(Value::Null),
            },
            JobState::Failed => Status::Failed {
                diagnostics: job.result.unwrap_or_default(),
                status: job.failure_status.unwrap_or(500),
            },
        })
    }

    /// Cancels a job (running or finished): its workers stop and its files are removed.
    pub fn cancel(
        &self,
        id: &str,
        may_see: &dyn Fn(Option<&str>) -> bool,
    ) -> Result<(), ExportError> {
        let job = self.owned_job(id, may_see)?;
        self.cancel_flag(id).store(true, Ordering::Relaxed);
        self.queue.cancel(id, now_ms())?;
        self.config
            .sink
            .delete_prefix(&job.container, &job.folder)
            .map_err(|e| ExportError::Internal(e.to_string()))?;
        Ok(())
    }

    /// Where a file of a finished export is, for the download endpoint.
    pub fn file(
        &self,
        id: &str,
        name: &str,
        may_see: &dyn Fn(Option<&str>) -> bool,
    ) -> Result<FileBody, ExportError> {
        let job = self.owned_job(id, may_see)?;
        if job.state != JobState::Complete {
            return Err(ExportError::UnknownFile(name.to_string()));
        }
        let known = self
            .queue
            .files(id)?
            .into_iter()
            .any(|f| f.name == name && f.pending_rename.is_none());
        if !known {
            return Err(ExportError::UnknownFile(name.to_string()));
        }
        Ok(self
            .config
            .sink
            .body(&job.container, &format!("{}/{name}", job.folder)))
    }

    /// The destination, for serving remote file bodies.
    pub fn sink(&self) -> &Arc<dyn Sink> {
        &self.config.sink
    }
}

/// A worker: claims items until the service is dropped; waits for a kick-off (or polls, for
/// work other processes release) when there is none.
fn worker_loop(svc: std::sync::Weak<ExportService>) {
    const POLL: Duration = Duration::from_secs(2);
    loop {
        let Some(me) = svc.upgrade() else {
            return;
        };
        let seen = *lock(&me.wake.0);
        let claimed = me.queue.claim(
            &me.node,
            now_ms(),
            me.config.heartbeat_timeout.as_millis() as i64,
            me.config.max_attempts,
        );
        match claimed {
            Ok(Some(item)) => {
                me.run_item(item);
                continue;
            }
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "cannot claim export work"),
        }
        {
            let (m, cv) = &me.wake;
            let guard = lock(m);
            if *guard == seen {
                let _ = cv.wait_timeout(guard, POLL);
            }
        }
        drop(me);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_numbers_have_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(3_000_000), "3,000,000");
    }
}
