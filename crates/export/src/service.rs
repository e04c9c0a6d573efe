//! [`ExportService`]: what the HTTP layer calls (kick-off, status, cancel, files), and the pool
//! of workers that claim work items from the job queue.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use store::Store;
use store::format::thousands;

use crate::access::{self, ExportAccess};
use crate::anonymization::{AnonymizationError, AnonymizationInfo, Anonymizer, load_from_storage};
use crate::jobs::{
    Cleanup, FileKind, ItemKind, JobQueue, JobRecord, JobState, Orphans, QueueError, Retry,
    WorkItem, owner_name,
};
use crate::record::{self, ExportRecord, JobRequest, RecordError, export_request};
use crate::request::{ExportLevel, ExportRequest, RequestError, parameters_to_pairs};
use crate::run::{ItemContext, Prepared, RunError, RunSettings, execute_item, plan};
use crate::sink::{FileBody, Sink};

mod overview;
pub use overview::{FileSummary, JobSummary, RECENT_JOBS, Stats, stats};

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
    /// This node's stable id among the processes sharing the job queue (`--node-id`). Leases
    /// are owned by `<node id>/<incarnation>` (a new incarnation at every start); with an id, a
    /// restarted node releases its previous incarnation's leases at once. `None`: a random id
    /// (nothing released at start-up on a shared queue; other nodes take the items over after
    /// the heartbeat timeout).
    pub node_id: Option<String>,
    /// Exports queued or running at once; more get 429.
    pub max_concurrent: u64,
    /// A running work item without a heartbeat for this long is taken over.
    pub heartbeat_timeout: Duration,
    /// Claims per work item before the export fails.
    pub max_attempts: i64,
    /// Back-off after a transient failure: doubles per attempt from this, up to
    /// `retry_backoff_max`.
    pub retry_backoff: Duration,
    pub retry_backoff_max: Duration,
    /// How long a complete export's files are kept (then removed; status answers 410).
    pub retention: Duration,
    /// How often expired exports are removed and failed deletions retried.
    pub sweep_every: Duration,
    /// Base URL for file URLs in manifests.
    pub base_url: String,
    /// Whether downloads need a bearer token (the manifest's `requiresAccessToken`).
    pub requires_access_token: bool,
    /// OCI image configurations; `None` refuses `_anonymizationConfigCollectionReference`.
    pub image_configs: Option<Arc<ImageConfigFetcher>>,
    /// `--export-gzip`: NDJSON files are stored gzip-compressed unless the kick-off says
    /// `_compression=none` (recorded on the job at kick-off).
    pub gzip: bool,
}

impl std::fmt::Debug for ExportConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportConfig")
            .field("sink", &self.sink.kind())
            .field("default_container", &self.default_container)
            .field("run", &self.run)
            .field("workers", &self.workers)
            .field("node_id", &self.node_id)
            .field("max_concurrent", &self.max_concurrent)
            .field("heartbeat_timeout", &self.heartbeat_timeout)
            .field("max_attempts", &self.max_attempts)
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
}

impl ExportConfig {
    /// Defaults for a local folder destination at `storage_root`.
    pub fn local(storage_root: PathBuf, base_url: String) -> ExportConfig {
        ExportConfig {
            sink: Arc::new(crate::sink::LocalSink::new(storage_root)),
            default_container: crate::defaults::CONTAINER.into(),
            run: RunSettings::default(),
            workers: std::thread::available_parallelism().map_or(2, |n| n.get().max(2)),
            exclusive_queue: true,
            node_id: None,
            max_concurrent: crate::defaults::MAX_CONCURRENT,
            heartbeat_timeout: Duration::from_secs(crate::defaults::HEARTBEAT_TIMEOUT_SECS),
            max_attempts: crate::defaults::MAX_ATTEMPTS,
            retry_backoff: Duration::from_secs(2),
            retry_backoff_max: Duration::from_secs(60),
            retention: Duration::from_secs(crate::defaults::RETENTION_SECS),
            sweep_every: Duration::from_secs(60),
            base_url,
            requires_access_token: false,
            image_configs: None,
            gzip: false,
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
    /// The caller's current scopes do not cover what the export needs → 403.
    #[error("{0}")]
    Forbidden(String),
    /// No such file in a finished export → 404.
    #[error("no file '{0}' in this export")]
    UnknownFile(String),
    /// The export's retention period is over and its files are removed → 410.
    #[error("export '{0}' has expired: its files were removed after the retention period")]
    Expired(String),
    /// The export destination cannot be reached or is overloaded at kick-off → 503 with
    /// Retry-After. Names the destination, never its credentials or its answer.
    #[error("{0}")]
    DestinationUnavailable(String),
    /// The export destination refused at kick-off (credentials, missing bucket) → 500 naming
    /// the destination and the reason.
    #[error("{0}")]
    Destination(String),
    /// The request conflicts with the server's state (an `$import` InitialLoad into a server that
    /// holds data) → 409.
    #[error("{0}")]
    Conflict(String),
    /// Too many exports at once → 429 with Retry-After.
    #[error("too many exports in progress ({0}); retry later")]
    TooMany(u64),
    /// A payload of a job's record cannot be used (written by a newer version, or edited by
    /// hand; the cause kept as the source) → 500.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// An export worker thread could not be started → 500.
    #[error("cannot start an export thread")]
    Thread(#[source] std::io::Error),
    /// Planning the export's work items failed (the cause kept as the source) → 500.
    #[error("cannot plan the export")]
    Plan(#[source] Box<RunError>),
    /// The export settings are invalid (the cause kept as the source) → 500.
    #[error("invalid export settings")]
    Settings(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The resource store failed (its cause kept as the source): 503 when the database is
    /// unavailable, else 500.
    #[error("export: {0}")]
    Store(#[source] store::StoreError),
    /// The job queue failed (its cause kept as the source) → 500.
    #[error(transparent)]
    Queue(QueueError),
    /// A manifest page that this export does not have → 404.
    #[error("this export's manifest has no page {0}")]
    UnknownPage(i64),
}

/// What the status endpoint answers: the job's state, and whether the kick-off asked for
/// `Prefer: separate-export-status` (then the state travels in `X-Export-Status`).
#[derive(Debug, Clone)]
pub struct StatusView {
    pub status: Status,
    pub separate_status: bool,
}

impl From<QueueError> for ExportError {
    fn from(e: QueueError) -> Self {
        match e {
            QueueError::Full(n) => ExportError::TooMany(n),
            e => ExportError::Queue(e),
        }
    }
}

/// The state of a job as the status endpoint reports it.
#[derive(Debug, Clone)]
pub enum Status {
    /// `partial`: with `allowPartialManifests`, the manifest page of the files written so far.
    InProgress {
        progress: String,
        partial: Option<Value>,
    },
    /// `expires_ms`: when the files are removed (completion + retention).
    Complete {
        manifest: Value,
        expires_ms: i64,
    },
    Failed {
        diagnostics: String,
        status: u16,
    },
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Drops the query of every URL in `text` (an Azure SAS travels in it).
fn without_queries(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_query = false;
    for c in text.chars() {
        if c == '?' {
            in_query = true;
        } else if in_query && (c.is_whitespace() || matches!(c, '"' | '\'' | ')' | ',')) {
            in_query = false;
        }
        if !in_query {
            out.push(c);
        }
    }
    out
}

/// The diagnostics of a failed item: what failed and where, without secrets or server paths.
fn failure_text(e: &RunError, sink: &dyn Sink, job: Option<&JobRecord>) -> String {
    match e {
        RunError::Sink(crate::sink::SinkError::NoSpace(_)) => format!(
            "the {} export destination is full (no space left on the device): {e}",
            sink.kind()
        ),
        RunError::Sink(s) => {
            let at = job.map_or_else(String::new, |j| {
                format!(
                    " at {}",
                    without_queries(&sink.location(&j.container, &j.folder))
                )
            });
            let what = if s.is_transient() {
                "is unavailable"
            } else {
                "failed"
            };
            format!(
                "the {} export destination{at} {what}: {}",
                sink.kind(),
                without_queries(&s.to_string())
            )
        }
        e => e.to_string(),
    }
}

/// How long one node holds the deletion of an export's files ([`JobQueue::hold_cleanup`]);
/// if it dies meanwhile, another node retries after it.
const CLEANUP_HOLD: Duration = Duration::from_secs(600);

/// What [`ExportService::clean_up`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Deletion {
    /// The files are removed and it is recorded.
    Done,
    /// Another deletion (on this or another node) holds it, or there is none to do.
    Busy,
    /// It failed (the destination is down); retried later.
    Failed,
}

/// Failed deletions in a row after which the sweeper stops retrying a job in this process
/// (about 6 hours with the default 60 s sweep); the next start-up tries again.
const DELETION_MAX_FAILURES: u32 = 12;
/// Longest wait between two tries of a failed deletion.
const DELETION_BACKOFF_MAX: Duration = Duration::from_secs(3600);

/// The wait before the next try after `failures` failed deletions in a row: `every`, doubling,
/// at most an hour; `None` once this process gives up.
fn deletion_backoff(failures: u32, every: Duration) -> Option<Duration> {
    if failures >= DELETION_MAX_FAILURES {
        return None;
    }
    let factor = 1u32
        .checked_shl(failures.saturating_sub(1))
        .unwrap_or(u32::MAX);
    Some(every.saturating_mul(factor).min(DELETION_BACKOFF_MAX))
}

/// The export service: the job queue, this process's workers, and the per-job state they share.
pub struct ExportService {
    store: Arc<dyn Store>,
    queue: Arc<dyn JobQueue>,
    config: ExportConfig,
    /// This process's lease-owner name.
    node: String,
    prepared: Mutex<HashMap<String, Arc<Prepared>>>,
    /// Import jobs seen by this process's workers, with their requests.
    imports: Mutex<HashMap<String, (JobRecord, Arc<crate::import::ImportRequest>)>>,
    cancels: Mutex<HashMap<String, Arc<AtomicBool>>>,
    /// Resources scanned per running item of this process, finer than the heartbeats.
    live: Mutex<HashMap<(String, i64), (String, u64)>>,
    wake: (Mutex<u64>, Condvar),
    /// Set by [`ExportService::shutdown`]: workers stop claiming and give their items back.
    stopping: AtomicBool,
    /// The worker and sweeper threads, once started.
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// Failed deletions of the sweeper per job: failures in a row and when to try next (`None`:
    /// this process gave up; the next start-up tries again).
    deletions: Mutex<HashMap<String, (u32, Option<std::time::Instant>)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ExportService {
    /// Opens the store's job queue ([`Store::jobs`]). Nothing runs until [`ExportService::start_workers`]: the server
    /// starts them last, once everything else is validated and its port is bound, so that a
    /// start that fails claims no work (and uses up no attempt).
    pub fn open(
        store: Arc<dyn Store>,
        config: ExportConfig,
    ) -> Result<Arc<ExportService>, ExportError> {
        let queue = store.jobs()?;
        let random = || uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
        let node_id = config
            .node_id
            .clone()
            .unwrap_or_else(|| format!("{}-{}", std::process::id(), random()));
        let node = owner_name(&node_id, &random());
        let svc = Arc::new(ExportService {
            store,
            queue,
            config,
            node,
            prepared: Mutex::new(HashMap::new()),
            imports: Mutex::new(HashMap::new()),
            cancels: Mutex::new(HashMap::new()),
            live: Mutex::new(HashMap::new()),
            wake: (Mutex::new(0), Condvar::new()),
            stopping: AtomicBool::new(false),
            threads: Mutex::new(Vec::new()),
            deletions: Mutex::new(HashMap::new()),
        });
        Ok(svc)
    }

    /// Starts this process's workers and the sweeper (retention, deletions still to do). Items
    /// left running by a previous process are released first when the queue is exclusive: the
    /// store's data-directory lock guarantees that no other live process shares it. Their
    /// attempt stays counted, so a server that keeps crashing fails the export in the end.
    pub fn start_workers(self: &Arc<Self>) -> Result<(), ExportError> {
        let mut threads = lock(&self.threads);
        if !threads.is_empty() {
            return Ok(());
        }
        // Only leases known to be dead: every lease when this process is alone on the queue;
        // on a shared database those of this node's earlier incarnations (a node id is unique
        // in the cluster), never another node's (taken over after the heartbeat timeout).
        let orphans = match (&self.config.node_id, self.config.exclusive_queue) {
            (_, true) => Some(Orphans::All),
            (Some(node), false) => Some(Orphans::OfNode {
                node,
                current: &self.node,
            }),
            (None, false) => None,
        };
        if let Some(orphans) = orphans {
            let released = self.queue.release_orphans(orphans)?;
            if released > 0 {
                tracing::info!(
                    items = released,
                    "resuming export work left by a previous process"
                );
            }
        }
        tracing::info!(owner = %self.node, workers = self.config.workers, "export workers start");
        let spawn = |name: String, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name)
                .spawn(f)
                .map_err(ExportError::Thread)
        };
        let me = Arc::downgrade(self);
        threads.push(spawn(
            "export-sweeper".into(),
            Box::new(move || sweeper_loop(me)),
        )?);
        for n in 0..self.config.workers {
            let me = Arc::downgrade(self);
            threads.push(spawn(
                format!("export-worker-{n}"),
                Box::new(move || worker_loop(me)),
            )?);
        }
        Ok(())
    }

    /// Graceful shutdown: workers stop claiming; every running item of this process stops at
    /// its next check and is given back (un-claimed at its committed cursor, the attempt not
    /// counted) — or finishes. After `drain`, items still held are given back regardless (their
    /// workers can no longer commit). Returns how many items were given back here.
    pub fn shutdown(&self, drain: Duration) -> u64 {
        self.stopping.store(true, Ordering::SeqCst);
        self.notify();
        let deadline = std::time::Instant::now() + drain;
        let threads: Vec<_> = std::mem::take(&mut *lock(&self.threads));
        for t in threads {
            while !t.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
        match self.queue.release_owned(&self.node) {
            Ok(n) => {
                if n > 0 {
                    tracing::warn!(
                        items = n,
                        "export work still running at the drain timeout was given back"
                    );
                }
                n
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot give back export work at shutdown");
                0
            }
        }
    }

    /// Removes the files of a failed, cancelled or expired job and records it; a failure (the
    /// destination is down) leaves the deletion to the sweeper. The deletion is held in the
    /// queue first, so nodes sharing it never remove the same export at once.
    fn clean_up(&self, job: &JobRecord) -> Deletion {
        let hold = CLEANUP_HOLD.as_millis() as i64;
        match self.queue.hold_cleanup(&job.id, &self.node, now_ms(), hold) {
            Ok(true) => {}
            Ok(false) => return Deletion::Busy,
            Err(e) => {
                tracing::error!(job = %job.id, error = %e, "cannot hold an export's deletion");
                return Deletion::Failed;
            }
        }
        match self.config.sink.delete_prefix(&job.container, &job.folder) {
            Ok(()) => {
                if let Err(e) = self.queue.cleaned(&job.id) {
                    tracing::error!(job = %job.id, error = %e, "cannot record a finished deletion");
                    return Deletion::Failed;
                }
                tracing::info!(job = %job.id, state = job.state.as_str(), "export files removed");
                Deletion::Done
            }
            Err(e) => {
                tracing::warn!(job = %job.id, error = %without_queries(&e.to_string()), "cannot remove export files yet; retried later");
                Deletion::Failed
            }
        }
    }

    /// After an item stopped because its lease or its job ended: removes what this claim wrote
    /// that nobody will use. A stopped job's files all go, so the item's committed files too
    /// (another node may have listed the folder before this worker renamed one into it); a lost
    /// lease leaves committed parts to the new holder, so the claim's part folder goes only
    /// when none of its parts still waits for a rename.
    fn remove_own_writes(&self, item: &WorkItem, job_stopped: bool) {
        let Ok(Some(job)) = self.queue.get(&item.job_id) else {
            return;
        };
        // A job that completed meanwhile keeps its files: this claim only lost its lease. One
        // that was cancelled or failed meanwhile loses them all, whatever ended this claim.
        let job_stopped =
            (job_stopped || !job.state.is_active()) && job.state != JobState::Complete;
        let dir = crate::run::attempt_dir(&job.folder, item.item_no, item.attempt);
        let files = match self.queue.files(&job.id) {
            Ok(files) => files,
            Err(e) => {
                tracing::warn!(job = %job.id, error = %e, "cannot list an export's files");
                return;
            }
        };
        let mine: Vec<_> = files.iter().filter(|f| f.item_no == item.item_no).collect();
        let waiting = mine.iter().any(|f| {
            f.pending_rename
                .as_deref()
                .is_some_and(|t| t.starts_with(&format!("{dir}/")))
        });
        let sink = self.config.sink.as_ref();
        let mut paths = Vec::new();
        if job_stopped {
            // Cancelled or failed: every file of the export goes, and with them the folders
            // this claim created after the export's own deletion ran (a local folder keeps
            // empty directories: `_parts/`, the export's folder itself).
            paths.push(job.folder.clone());
        } else if !waiting {
            paths.push(dir);
        }
        for path in paths {
            if let Err(e) = sink.delete_prefix(&job.container, &path) {
                tracing::warn!(job = %job.id, error = %without_queries(&e.to_string()), "cannot remove a stopped work item's files");
            }
        }
    }

    /// Records a failed deletion of the sweeper and when to try again (back-off), or gives up in
    /// this process after `DELETION_MAX_FAILURES` in a row (logged; the deletion stays recorded).
    fn deletion_failed(&self, job: &str) {
        let mut deletions = lock(&self.deletions);
        let failures = deletions.get(job).map_or(0, |(n, _)| *n) + 1;
        let next = match deletion_backoff(failures, self.config.sweep_every) {
            Some(wait) => {
                tracing::warn!(
                    job,
                    failures,
                    retry_in_s = wait.as_secs(),
                    "export files not removed yet; retried with back-off"
                );
                Some(std::time::Instant::now() + wait)
            }
            None => {
                tracing::error!(
                    job,
                    failures,
                    "export files could not be removed; this process stops retrying (the deletion stays recorded and the next start tries again)"
                );
                None
            }
        };
        deletions.insert(job.to_string(), (failures, next));
    }

    /// One pass of the sweeper: expires complete jobs past the retention period, removes the
    /// files of every job whose deletion is still to do, and deletes the rows of removed jobs
    /// finished more than two retention periods ago. Returns the jobs cleaned.
    pub fn sweep(&self) -> Result<u64, ExportError> {
        let retention = self.config.retention.as_millis().min(i64::MAX as u128) as i64;
        let expired = self.queue.expire(now_ms().saturating_sub(retention))?;
        if expired > 0 {
            tracing::info!(jobs = expired, "exports past their retention period expire");
        }
        let mut cleaned = 0;
        for job in self.queue.cleanups()? {
            if self.stopping.load(Ordering::Relaxed) {
                break;
            }
            let waiting = match lock(&self.deletions).get(&job.id) {
                Some((_, None)) => true,
                Some((_, Some(next))) => std::time::Instant::now() < *next,
                None => false,
            };
            if waiting {
                continue;
            }
            match self.clean_up(&job) {
                Deletion::Done => {
                    cleaned += 1;
                    self.forget(&job.id);
                    lock(&self.deletions).remove(&job.id);
                }
                // Another node (or a worker here) is removing it.
                Deletion::Busy => {}
                Deletion::Failed => self.deletion_failed(&job.id),
            }
        }
        // The rows of jobs whose files are gone stay one more retention period (status answers
        // 410 or the failure meanwhile), then go.
        let purged = self
            .queue
            .purge(now_ms().saturating_sub(retention.saturating_mul(2)))?;
        if purged > 0 {
            tracing::info!(jobs = purged, "rows of removed exports purged");
        }
        if let Err(e) = self.store.checkpoint() {
            tracing::warn!(error = %e, "store checkpoint failed");
        }
        Ok(cleaned)
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
        let now = now_ms();
        let mut req = ExportRequest::parse(
            level.clone(),
            &pairs,
            is_post,
            lenient,
            now,
            request_url.clone(),
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
        // An early answer before the configuration is fetched and the export planned; the
        // admission itself is decided atomically when the job is recorded.
        let active = self.queue.active_count()?;
        if active >= self.config.max_concurrent {
            return Err(ExportError::TooMany(active));
        }
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
            .unwrap_or_else(|| store::format_instant_ms(now));
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
        let id = uuid::Uuid::new_v4().simple().to_string();
        let container = req
            .container
            .clone()
            .unwrap_or_else(|| self.config.default_container.clone());
        self.config
            .sink
            .ensure_container(&container)
            .map_err(|e| self.destination_error(&container, &e))?;
        let job = JobRecord {
            id: id.clone(),
            state: JobState::Queued,
            request: JobRequest::Export(ExportRecord::new(
                &level,
                &pairs,
                is_post,
                lenient,
                &request_url,
                separate,
            ))
            .encode(),
            watermark: wm.seq,
            transaction_time,
            client_id,
            container,
            folder: id.clone(),
            anonymization: anonymization.as_ref().map(record::encode_anonymization),
            result: None,
            failure_status: None,
            created_ms: now,
            finished_ms: None,
            cleanup: Cleanup::None,
        };
        self.queue
            .create(&job, &items, self.config.max_concurrent)?;
        tracing::info!(job = %id, items = items.len(), "export queued");
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

    /// The prepared state of a job, built once per job and process.
    fn prepare(&self, job_id: &str) -> Result<Arc<Prepared>, RunError> {
        if let Some(p) = lock(&self.prepared).get(job_id) {
            return Ok(p.clone());
        }
        let job = self.queue.get(job_id)?.ok_or(RunError::Stopped)?;
        let req = export_request(&job)?;
        let anonymizer = match record::anonymization(&job)? {
            None => None,
            Some(info) => Some(
                Anonymizer::new(info, &job.folder)
                    .map_err(|e| RunError::Anonymization(e.to_string()))?,
            ),
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
        lock(&self.imports).remove(job_id);
        lock(&self.cancels).remove(job_id);
    }

    /// Runs one claimed item and records the outcome.
    fn run_item(&self, item: WorkItem) {
        let job_id = item.job_id.clone();
        // Every line logged while the item runs carries the job, the item and its type, so a
        // log shows one export end to end (`job` also on kick-off and completion).
        let _span = tracing::info_span!("export_item", job = %job_id, item = item.item_no, kind = item.kind.as_str(), resource_type = %item.resource_type, attempt = item.attempt).entered();
        tracing::debug!("export work item claimed");
        let key = (job_id.clone(), item.item_no);
        let (result, import) = match self.import_of(&job_id) {
            Ok(Some((job, request))) => (self.run_import_item(&job, &request, &item, &key), true),
            Ok(None) => (self.run_export_item(&item, &key), false),
            Err(e) => (Err(e), false),
        };
        self.item_finished(item, result, import);
    }

    /// The job `job_id` and its import request, when it is an import (cached per process).
    fn import_of(
        &self,
        job_id: &str,
    ) -> Result<Option<(JobRecord, Arc<crate::import::ImportRequest>)>, RunError> {
        if lock(&self.prepared).contains_key(job_id) {
            return Ok(None);
        }
        if let Some((job, req)) = lock(&self.imports).get(job_id) {
            return Ok(Some((job.clone(), req.clone())));
        }
        let job = self.queue.get(job_id)?.ok_or(RunError::Stopped)?;
        if !record::is_import(&job) {
            return Ok(None);
        }
        let req = Arc::new(record::import_request(&job)?);
        lock(&self.imports).insert(job_id.to_string(), (job.clone(), req.clone()));
        Ok(Some((job, req)))
    }

    /// Runs one item of an import: an input, or the finalize item that writes the result.
    fn run_import_item(
        &self,
        job: &JobRecord,
        request: &crate::import::ImportRequest,
        item: &WorkItem,
        key: &(String, i64),
    ) -> Result<(), RunError> {
        let cancel = self.cancel_flag(&job.id);
        let loaded = match item.kind {
            ItemKind::Finalize => {
                let files = self.queue.files(&job.id)?;
                crate::run::finish_renames(
                    self.config.sink.as_ref(),
                    self.queue.as_ref(),
                    job,
                    &files,
                )?;
                let _ = self
                    .config
                    .sink
                    .delete_prefix(&job.container, &format!("{}/_parts", job.folder));
                0
            }
            _ => {
                let live = |n: u64| {
                    lock(&self.live).insert(key.clone(), (item.resource_type.clone(), n));
                };
                let ctx = crate::import::InputContext {
                    store: self.store.as_ref(),
                    queue: self.queue.as_ref(),
                    sink: self.config.sink.as_ref(),
                    job,
                    request,
                    cancel: &cancel,
                    shutdown: &self.stopping,
                    live: &live,
                };
                crate::import::run_input(&ctx, item)?
            }
        };
        let now = now_ms();
        if !self.queue.complete_item(item, loaded, now)? {
            return Err(match self.queue.heartbeat(item, loaded, now)? {
                crate::jobs::Lease::JobStopped => RunError::Stopped,
                _ => RunError::LeaseLost,
            });
        }
        if item.kind == ItemKind::Finalize {
            let result =
                crate::import::result(self.queue.as_ref(), job, request, &self.config.base_url)?;
            self.queue.finish(
                &job.id,
                JobState::Complete,
                Some(&result.to_string()),
                None,
                now_ms(),
            )?;
            tracing::info!(job = %job.id, "import complete");
            self.forget(&job.id);
        } else {
            tracing::info!(resources = loaded, "import input done");
        }
        Ok(())
    }

    /// Runs one item of an export.
    fn run_export_item(&self, item: &WorkItem, key: &(String, i64)) -> Result<(), RunError> {
        let job_id = item.job_id.clone();
        self.prepare(&job_id).and_then(|prepared| {
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
                shutdown: &self.stopping,
                live_scanned: &live_scanned,
            };
            execute_item(&ctx, item)?;
            if item.kind == ItemKind::Finalize {
                self.complete_job(&prepared)?;
            }
            Ok(())
        })
    }

    /// Records the outcome of an item (export or import).
    fn item_finished(&self, item: WorkItem, result: Result<(), RunError>, import: bool) {
        let job_id = item.job_id.clone();
        let key = (job_id.clone(), item.item_no);
        lock(&self.live).remove(&key);
        let result = match result {
            // A claim that fails after its export was cancelled or failed elsewhere (its folder
            // removed under a rename, its lease revoked) stopped: it records no failure and
            // removes what it wrote, like a claim that saw the stop itself.
            Err(e) if !matches!(e, RunError::Interrupted | RunError::Stopped) => {
                match self.queue.get(&job_id) {
                    Ok(Some(job)) if !job.state.is_active() && job.state != JobState::Complete => {
                        tracing::info!(job = %job_id, item = item.item_no, error = %e, "work item ended by an error after its export stopped");
                        Err(RunError::Stopped)
                    }
                    _ => Err(e),
                }
            }
            r => r,
        };
        match result {
            Ok(()) => {
                if let Ok(files) = self.queue.files(&job_id) {
                    let mine: Vec<_> = files
                        .into_iter()
                        .filter(|f| f.item_no == item.item_no)
                        .collect();
                    if !import {
                        tracing::info!(
                            files = mine.len(),
                            resources = mine.iter().map(|f| f.count).sum::<u64>(),
                            "export work item done"
                        );
                        overview::item_done(&mine);
                    }
                }
            }
            Err(RunError::LeaseLost) => {
                tracing::warn!(job = %job_id, item = item.item_no, attempt = item.attempt, owner = %self.node, "work item taken over elsewhere; its uncommitted parts are discarded");
                self.remove_own_writes(&item, false);
            }
            Err(RunError::Interrupted) => match self.queue.release(&item) {
                Ok(_) => {
                    tracing::info!(job = %job_id, item = item.item_no, "work item given back at shutdown")
                }
                Err(e) => {
                    tracing::error!(job = %job_id, item = item.item_no, error = %e, "cannot give back a work item")
                }
            },
            Err(RunError::Stopped) => {
                tracing::info!(job = %job_id, item = item.item_no, owner = %self.node, "work item stopped: its export was cancelled or failed");
                // Cancelled or failed: make sure nothing of this export remains (a deletion
                // that fails stays recorded for the sweeper; one another node holds is its).
                self.remove_own_writes(&item, true);
                if let Ok(Some(job)) = self.queue.get(&job_id)
                    && job.cleanup == Cleanup::Pending
                {
                    self.clean_up(&job);
                }
                self.forget(&job_id);
            }
            Err(e) => {
                let retry = e.is_transient().then_some(Retry {
                    max_attempts: self.config.max_attempts,
                    base_ms: self.config.retry_backoff.as_millis() as i64,
                    max_ms: self.config.retry_backoff_max.as_millis() as i64,
                });
                let job = self.queue.get(&job_id).ok().flatten();
                let text = failure_text(&e, self.config.sink.as_ref(), job.as_ref());
                tracing::error!(job = %job_id, item = item.item_no, attempt = item.attempt, error = %text, retry = retry.is_some(), "export work item failed");
                match self
                    .queue
                    .fail_item(&item, &text, e.status(), retry, now_ms())
                {
                    Ok(true) => {
                        overview::item_failed(false);
                        tracing::error!(job = %job_id, status = e.status(), "export failed");
                        if let Ok(Some(job)) = self.queue.get(&job_id) {
                            self.clean_up(&job);
                        }
                        self.forget(&job_id);
                    }
                    // Retried later under a new attempt, or taken over meanwhile (a paused
                    // node): either way this claim's uncommitted parts are never listed.
                    Ok(false) => {
                        overview::item_failed(true);
                        self.remove_own_writes(&item, false);
                    }
                    Err(qe) => {
                        tracing::error!(job = %job_id, error = %qe, "cannot record a failed work item")
                    }
                }
            }
        }
    }

    /// A manifest entry of a committed file. Files of an `organizeOutputBy` export hold several
    /// types: their entries carry no `type`.
    fn manifest_entry(
        &self,
        job: &JobRecord,
        f: &crate::jobs::FileRecord,
        organized: bool,
    ) -> Value {
        let url = format!(
            "{}/export-files/{}/{}",
            self.config.base_url, job.id, f.name
        );
        let mut e =
            json!({"type": f.resource_type, "url": url, "count": f.count, "fileSize": f.bytes});
        if organized
            && f.kind == FileKind::Output
            && let Some(o) = e.as_object_mut()
        {
            o.remove("type");
        }
        if let Some(sha) = &f.sha256 {
            e["extension"] = manifest::entry_extension(sha, f.name.ends_with(".gz"));
        }
        e
    }

    /// A manifest listing `files`: the job's fields, then `output`, `error` (and `deleted` with
    /// `_since`). `anonymization` is the de-identification extension, if any.
    fn manifest_of(
        &self,
        job: &JobRecord,
        req: &ExportRequest,
        anonymization: Option<Value>,
        files: &[crate::jobs::FileRecord],
    ) -> Value {
        let organized = req.organize_by_patient;
        let list = |kind: FileKind| -> Vec<Value> {
            files
                .iter()
                .filter(|f| f.kind == kind)
                .map(|f| self.manifest_entry(job, f, organized))
                .collect()
        };
        let mut storage = json!({
            "kind": self.config.sink.kind(),
            "container": job.container,
            "folder": job.folder,
            "location": self.config.sink.location(&job.container, &job.folder),
        });
        if let Some(a) = anonymization {
            storage["anonymization"] = a;
        }
        let mut manifest = json!({
            "transactionTime": job.transaction_time,
            "request": req.request_url,
            "requiresAccessToken": self.config.requires_access_token,
            "output": list(FileKind::Output),
            "error": list(FileKind::Error),
            "extension": {"storage": storage},
        });
        if organized {
            manifest["outputOrganizedBy"] = json!("Patient");
        }
        if req.since_ms.is_some() {
            manifest["deleted"] = Value::Array(list(FileKind::Deleted));
        }
        manifest
    }

    /// Writes the manifest of a job whose items are all done.
    fn complete_job(&self, prepared: &Prepared) -> Result<(), RunError> {
        let job = &prepared.job;
        let files = self.queue.files(&job.id)?;
        let anonymization = prepared
            .anonymizer
            .as_ref()
            .map(|a| a.info.manifest_extension());
        let manifest = self.manifest_of(job, &prepared.req, anonymization, &files);
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

    /// One page of the manifest of an `allowPartialManifests` export, running or complete. A
    /// page is the files of one work item (in item order; `page` is the item's number, the
    /// first item's by default); files appear on it once committed and renamed, and never
    /// change. `link` `next` names the next item with files once this item is done and every
    /// item between them is done without files: following the links from the first page
    /// lists every file of the export exactly once.
    fn manifest_page(
        &self,
        job: &JobRecord,
        req: &ExportRequest,
        page: Option<i64>,
    ) -> Result<Value, ExportError> {
        let items = self.queue.item_states(&job.id)?;
        let files: Vec<crate::jobs::FileRecord> = self
            .queue
            .files(&job.id)?
            .into_iter()
            .filter(|f| f.pending_rename.is_none())
            .collect();
        let no = match page {
            Some(n) => n,
            None => items.first().map_or(0, |(n, _)| *n),
        };
        let pos = items
            .iter()
            .position(|(n, _)| *n == no)
            .ok_or(ExportError::UnknownPage(no))?;
        let has_files = |n: i64| files.iter().any(|f| f.item_no == n);
        let mut next = None;
        if items[pos].1 {
            for (n, done) in &items[pos + 1..] {
                if has_files(*n) {
                    next = Some(*n);
                    break;
                }
                if !done {
                    break;
                }
            }
        }
        let mine: Vec<crate::jobs::FileRecord> =
            files.into_iter().filter(|f| f.item_no == no).collect();
        let anonymization = record::anonymization(job)?.map(|i| i.manifest_extension());
        let mut m = self.manifest_of(job, req, anonymization, &mine);
        if let Some(n) = next {
            m["link"] = json!([{
                "relation": "next",
                "url": format!("{}/export-status/{}?page={n}", self.config.base_url, job.id),
            }]);
        }
        Ok(m)
    }

    /// The job `id` if `access` may use it: another client's job is unknown (404), and the
    /// caller's current scopes must still cover everything the export needed, derived from its
    /// recorded request exactly as at kick-off (403). Status, files and cancel all come here.
    fn owned_job(&self, id: &str, access: &dyn ExportAccess) -> Result<JobRecord, ExportError> {
        let job = self
            .queue
            .get(id)?
            .ok_or_else(|| ExportError::UnknownJob(id.to_string()))?;
        if job.state == JobState::Cancelled || !access.owns(job.client_id.as_deref()) {
            return Err(ExportError::UnknownJob(id.to_string()));
        }
        if !access.is_unrestricted() {
            match JobRequest::decode(&job)? {
                JobRequest::Import(req) => {
                    access::authorize_import(&req.types(), access)
                        .map_err(ExportError::Forbidden)?;
                }
                JobRequest::Export(r) => {
                    let req = r.request(&job.id, job.created_ms)?;
                    access::authorize(&req, access).map_err(ExportError::Forbidden)?;
                }
            }
        }
        Ok(job)
    }

    /// Progress text such as `Observation 1,200,000 of 3,000,000 (2 of 17 types done)`.
    fn progress_text(&self, job_id: &str) -> Result<String, ExportError> {
        if let Some(job) = self.queue.get(job_id)?
            && record::is_import(&job)
        {
            return self.import_progress_text(job_id);
        }
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

    /// Progress text of an import such as `input 2 of 5 (Observation): 12,000 resources loaded
    /// (1 of 5 inputs done)`.
    fn import_progress_text(&self, job_id: &str) -> Result<String, ExportError> {
        let mut items: Vec<_> = self
            .queue
            .item_progress(job_id)?
            .into_iter()
            .filter(|i| i.kind != ItemKind::Finalize)
            .collect();
        for ((j, n), (_, live)) in lock(&self.live).iter() {
            if j == job_id
                && let Some(i) = items.iter_mut().find(|i| i.item_no == *n)
            {
                i.scanned = i.scanned.max(*live);
            }
        }
        let done = items.iter().filter(|i| i.done).count();
        let total = items.len();
        Ok(match items.iter().find(|i| !i.done) {
            Some(i) => format!(
                "input {} of {total} ({}): {} resources loaded ({done} of {total} inputs done)",
                i.item_no,
                i.resource_type,
                thousands(i.scanned)
            ),
            None => format!("finishing ({done} of {total} inputs done)"),
        })
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
        let req = crate::import::ImportRequest::parse(body, sink, request_url)?;
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
        let active = self.queue.active_count()?;
        if active >= self.config.max_concurrent {
            return Err(ExportError::TooMany(active));
        }
        let now = now_ms();
        let container = self.config.default_container.clone();
        self.config
            .sink
            .ensure_container(&container)
            .map_err(|e| self.destination_error(&container, &e))?;
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
        let id = uuid::Uuid::new_v4().simple().to_string();
        let job = JobRecord {
            id: id.clone(),
            state: JobState::Queued,
            request: JobRequest::Import(req.clone()).encode(),
            watermark: 0,
            transaction_time: store::format_instant_ms(now),
            client_id: access.client_id().map(str::to_string),
            container,
            folder: id.clone(),
            anonymization: None,
            result: None,
            failure_status: None,
            created_ms: now,
            finished_ms: None,
            cleanup: Cleanup::None,
        };
        self.queue
            .create(&job, &items, self.config.max_concurrent)?;
        tracing::info!(job = %id, inputs = req.inputs.len(), mode = req.mode.as_str(), "import queued");
        self.notify();
        Ok(id)
    }

    /// The state of a job, for a caller who may use it (see `owned_job`).
    pub fn status(&self, id: &str, access: &dyn ExportAccess) -> Result<Status, ExportError> {
        Ok(self.status_page(id, None, access)?.status)
    }

    /// [`ExportService::status`] with the manifest page `page` of an `allowPartialManifests`
    /// export (see `manifest_page`; `None`: the first), and the job's status preference.
    pub fn status_page(
        &self,
        id: &str,
        page: Option<i64>,
        access: &dyn ExportAccess,
    ) -> Result<StatusView, ExportError> {
        let job = self.owned_job(id, access)?;
        let recorded = JobRequest::decode(&job)?;
        let separate_status = matches!(&recorded, JobRequest::Export(r) if r.separate());
        let req = match recorded.export(&job) {
            Ok(req) => req,
            // Recorded parameters that no longer parse failed the job (400) when it ran: its
            // status is that failure.
            Err(RecordError::Request { .. }) if job.state == JobState::Failed => None,
            Err(e) => return Err(e.into()),
        };
        let allow_partial = req.as_ref().is_some_and(|r| r.allow_partial);
        if page.is_some() && !allow_partial {
            return Err(ExportError::Request(RequestError {
                param: "page".into(),
                message: "manifest pages exist only for exports kicked off with allowPartialManifests=true".into(),
            }));
        }
        let status = match job.state {
            JobState::Queued | JobState::Running | JobState::Cancelled => Status::InProgress {
                progress: self.progress_text(id)?,
                partial: match &req {
                    Some(r) if r.allow_partial => Some(self.manifest_page(&job, r, page)?),
                    _ => None,
                },
            },
            JobState::Expired => return Err(ExportError::Expired(id.to_string())),
            JobState::Complete => {
                let stored = record::manifest(&job)?.ok_or_else(|| RecordError::Invalid {
                    job: job.id.clone(),
                    column: crate::record::Column::Result,
                    reason: "a complete job without its manifest".into(),
                })?;
                Status::Complete {
                    manifest: match &req {
                        Some(r) if r.allow_partial => self.manifest_page(&job, r, page)?,
                        _ => stored,
                    },
                    expires_ms: job.finished_ms.unwrap_or_else(now_ms).saturating_add(
                        self.config.retention.as_millis().min(i64::MAX as u128) as i64,
                    ),
                }
            }
            JobState::Failed => Status::Failed {
                diagnostics: job.result.clone().unwrap_or_default(),
                status: job.failure_status.unwrap_or(500),
            },
        };
        Ok(StatusView {
            status,
            separate_status,
        })
    }

    /// Cancels a job (running or finished): its workers stop and its files are removed. The
    /// cancel is recorded first (with the deletion still to do), so a crash or a destination
    /// that is down only delays the deletion: the sweeper and the next start-up finish it.
    pub fn cancel(&self, id: &str, access: &dyn ExportAccess) -> Result<(), ExportError> {
        let job = self.owned_job(id, access)?;
        self.cancel_flag(id).store(true, Ordering::Relaxed);
        self.queue.cancel(id, now_ms())?;
        self.clean_up(&job);
        Ok(())
    }

    /// Where a file of a finished export is, for the download endpoint.
    pub fn file(
        &self,
        id: &str,
        name: &str,
        access: &dyn ExportAccess,
    ) -> Result<FileBody, ExportError> {
        let job = self.owned_job(id, access)?;
        // A running export's files are served once listed by a partial manifest.
        let listed_early = matches!(job.state, JobState::Queued | JobState::Running)
            && JobRequest::decode(&job)?
                .export(&job)?
                .is_some_and(|r| r.allow_partial);
        if job.state != JobState::Complete && !listed_early {
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

    /// The run settings (Group bounds for `$viewdefinition-run`'s `group`).
    pub fn run_settings(&self) -> &crate::run::RunSettings {
        &self.config.run
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
        if me.stopping.load(Ordering::SeqCst) {
            return;
        }
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

/// The sweeper: at start and then every `sweep_every`, expires exports past their retention,
/// finishes deletions still to do (interrupted by a crash, or refused by a destination that was
/// down) and checkpoints the store's WAL.
fn sweeper_loop(svc: std::sync::Weak<ExportService>) {
    loop {
        let Some(me) = svc.upgrade() else {
            return;
        };
        if me.stopping.load(Ordering::SeqCst) {
            return;
        }
        if let Err(e) = me.sweep() {
            tracing::error!(error = %e, "export sweep failed");
        }
        let every = me.config.sweep_every;
        let (m, cv) = &me.wake;
        let deadline = std::time::Instant::now() + every;
        let mut guard = lock(m);
        while !me.stopping.load(Ordering::SeqCst) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            guard = cv
                .wait_timeout(guard, left)
                .map_or_else(|p| p.into_inner().0, |r| r.0);
        }
        drop(guard);
        drop(me);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_dropped_from_urls() {
        assert_eq!(
            without_queries("GET http://a/b?sig=secret&sv=1 failed (http://c?x)"),
            "GET http://a/b failed (http://c)"
        );
    }

    #[test]
    fn failed_deletions_back_off_and_end() {
        let every = Duration::from_secs(60);
        let waits: Vec<Option<Duration>> = (1..=13).map(|n| deletion_backoff(n, every)).collect();
        assert_eq!(waits[0], Some(Duration::from_secs(60)));
        assert_eq!(waits[1], Some(Duration::from_secs(120)));
        assert_eq!(waits[5], Some(Duration::from_secs(1920)));
        assert_eq!(waits[6], Some(DELETION_BACKOFF_MAX));
        assert_eq!(waits[10], Some(DELETION_BACKOFF_MAX));
        assert_eq!(waits[11], None, "bounded");
        assert_eq!(waits[12], None);
        let total: Duration = waits.iter().flatten().sum();
        assert!(total < Duration::from_secs(8 * 3600), "{total:?}");
    }

    #[test]
    fn progress_numbers_have_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(3_000_000), "3,000,000");
    }
}
