//! [`ExportService`]: what the HTTP layer calls (kick-off, status, cancel, files), and the pool
//! of workers that claim work items from the job queue. The service's state is here; its parts
//! are in modules of their own: `config` ([`ExportConfig`]), `error` ([`ExportError`] and the
//! diagnostics of failed items), `kickoff` (`$export` and `$import` requests queued), `workers`
//! (the worker threads, items run and their outcomes recorded), `status` (status, manifests,
//! files, cancel), `cleanup` (deletions and the sweeper) and `overview` (the status page's jobs
//! and the metrics' counters).

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Condvar, Mutex};

use store::Store;

use crate::jobs::{JobQueue, JobRecord, owner_name};
use crate::run::Prepared;
use crate::sink::Sink;

mod cleanup;
mod config;
mod error;
mod kickoff;
mod overview;
mod status;
mod workers;

pub use config::{ExportConfig, ImageConfigFetcher};
pub use error::ExportError;
use error::{failure_text, without_queries};
pub use kickoff::is_job_id;
pub use overview::{FileSummary, JobSummary, RECENT_JOBS, Stats, stats};
pub use status::{PartialPage, Status, StatusView};

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The export service: the job queue, this process's workers, and the per-job state they share.
pub struct ExportService {
    store: Arc<dyn Store>,
    queue: Arc<dyn JobQueue>,
    config: ExportConfig,
    /// This process's lease-owner name.
    node: String,
    prepared: Mutex<HashMap<String, Arc<Prepared>>>,
    /// Jobs' recorded requests as status polls, downloads and cancels use them, parsed once
    /// (`status::Recorded`; at most `status::MAX_RECORDED`).
    recorded: Mutex<HashMap<String, status::Recorded>>,
    /// Import jobs seen by this process's workers, with their requests.
    imports: Mutex<HashMap<String, (JobRecord, Arc<crate::import::ImportRequest>)>>,
    cancels: Mutex<HashMap<String, Arc<AtomicBool>>>,
    /// Resources scanned per running item of this process, finer than the heartbeats.
    live: Mutex<HashMap<(String, i64), (String, u64)>>,
    wake: (Mutex<u64>, Condvar),
    /// Woken when this process commits export files, ends a work item or cancels a job: what a
    /// status request that waits for a change (`Prefer: wait`) looks at again.
    changed: tokio::sync::Notify,
    /// Set by [`ExportService::shutdown`]: workers stop claiming and give their items back.
    stopping: AtomicBool,
    /// Held shared by a worker from its claim until the item is in `held`; exclusively while
    /// the items claimed under this process's name but run by none of its workers are given
    /// back (so that no claim is half-way then).
    claiming: std::sync::RwLock<()>,
    /// The items this process's workers run (job id, item number).
    held: Mutex<std::collections::HashSet<(String, i64)>>,
    /// The items this process's workers ran since unheld items were last given back: one still
    /// `running` under this process's name had its outcome lost, and keeps its attempt when
    /// given back (any other unheld item is a claim whose answer was lost, which never ran).
    ran: Mutex<std::collections::HashSet<(String, i64)>>,
    /// A claim failed: the database may have committed it without the answer reaching this
    /// process. Unheld items are looked for before the next claim.
    claim_unsure: AtomicBool,
    /// Other nodes' new and given-back work, announced while the workers run (PostgreSQL);
    /// dropped at shutdown.
    work_watch: Mutex<Option<store::jobs::WorkWatch>>,
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
            recorded: Mutex::new(HashMap::new()),
            imports: Mutex::new(HashMap::new()),
            cancels: Mutex::new(HashMap::new()),
            live: Mutex::new(HashMap::new()),
            wake: (Mutex::new(0), Condvar::new()),
            changed: tokio::sync::Notify::new(),
            stopping: AtomicBool::new(false),
            claiming: std::sync::RwLock::new(()),
            held: Mutex::new(std::collections::HashSet::new()),
            ran: Mutex::new(std::collections::HashSet::new()),
            claim_unsure: AtomicBool::new(false),
            work_watch: Mutex::new(None),
            threads: Mutex::new(Vec::new()),
            deletions: Mutex::new(HashMap::new()),
        });
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

    /// Notified when this process commits export files, ends a work item or cancels a job
    /// (other nodes' progress is only seen by looking again).
    pub fn changes(&self) -> &tokio::sync::Notify {
        &self.changed
    }

    /// This process's lease-owner name on the job queue (`<node>/<incarnation>`).
    pub fn owner(&self) -> &str {
        &self.node
    }

    /// Whether [`ExportService::shutdown`] has begun (waiting status requests answer then).
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn cancel_flag(&self, job: &str) -> Arc<AtomicBool> {
        lock(&self.cancels)
            .entry(job.to_string())
            .or_insert_with(|| Arc::new(AtomicBool::new(false)))
            .clone()
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
