//! This process's workers: started once the server's port is bound, each claims work items
//! from the queue and runs them (an export's scan, an import's input, a job's finalize item), then
//! records the outcome — done, given back at shutdown, stopped, retried or failed; a graceful
//! shutdown gives running items back.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::cleanup::sweeper_loop;
use super::{ExportError, ExportService, failure_text, lock, now_ms, overview};
use crate::anonymization::Anonymizer;
use crate::jobs::{
    Cleanup, FileKind, ItemKind, JobRecord, JobState, Lease, Orphans, Retry, SpaceWaited, WorkItem,
};
use crate::record::{self, export_request};
use crate::run::{ItemContext, Prepared, RunError, execute_item};
use crate::sink::SinkError;
use store::QueueError;

impl ExportService {
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
        // Work that other nodes add or give back wakes these workers at once (PostgreSQL
        // LISTEN/NOTIFY); without a watch they find it at their next poll.
        let me = Arc::downgrade(self);
        let wake: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
            if let Some(svc) = me.upgrade() {
                svc.notify();
            }
        });
        match self.queue.watch_work(wake) {
            Ok(watch) => *lock(&self.work_watch) = watch,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch for other nodes' export work; polling the queue only")
            }
        }
        Ok(())
    }

    /// Graceful shutdown: workers stop claiming; every running item of this process stops at
    /// its next check and is given back (un-claimed at its committed cursor, the attempt not
    /// counted) — or finishes. After `drain`, items still held are given back regardless (their
    /// workers can no longer commit). Returns how many items were given back here.
    pub fn shutdown(&self, drain: Duration) -> u64 {
        self.stopping.store(true, Ordering::SeqCst);
        lock(&self.work_watch).take();
        self.notify();
        // Status requests waiting for a change answer now, not at their deadline.
        self.changed.notify_waiters();
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

    pub(super) fn forget(&self, job_id: &str) {
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
        if item.kind == ItemKind::Finalize {
            let result =
                crate::import::result(self.queue.as_ref(), job, request, &self.config.base_url)?;
            self.record_completion(job, item, loaded, &result.to_string())?;
            tracing::info!(job = %job.id, "import complete");
            self.forget(&job.id);
        } else {
            if !self.queue.complete_item(item, loaded, now_ms())? {
                return Err(self.not_held(item, loaded)?);
            }
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
                committed: &|| self.changed.notify_waiters(),
            };
            execute_item(&ctx, item)?;
            if item.kind == ItemKind::Finalize {
                self.complete_job(&prepared, item)?;
            }
            Ok(())
        })
    }

    /// Records the outcome of an item (export or import).
    fn item_finished(&self, item: WorkItem, result: Result<(), RunError>, import: bool) {
        self.record_outcome(item, result, import);
        self.changed.notify_waiters();
    }

    fn record_outcome(&self, item: WorkItem, result: Result<(), RunError>, import: bool) {
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
            // A full destination (a local disk; remote ones have no ENOSPC) is the operator's to
            // fix: the item waits for space rather than failing its export at once.
            Err(e @ RunError::Sink(SinkError::NoSpace(_))) => self.wait_for_space(item, e),
            Err(e) => {
                let retry = e.is_transient().then_some(Retry {
                    max_attempts: self.config.max_attempts,
                    base_ms: self.config.retry_backoff.as_millis() as i64,
                    max_ms: self.config.retry_backoff_max.as_millis() as i64,
                });
                let job = self.queue.get(&job_id).ok().flatten();
                let text = failure_text(&e, self.config.sink.as_ref(), job.as_ref());
                tracing::error!(job = %job_id, item = item.item_no, attempt = item.attempt, error = %text, retry = retry.is_some(), "export work item failed");
                match self.until_recorded(|| {
                    self.queue
                        .fail_item(&item, &text, e.status(), retry, now_ms())
                }) {
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

    /// An item whose destination is full (`e`): its partial part is removed and it is given
    /// back to wait for space, its attempt not spent; once it has waited `--export-full-wait`,
    /// its export fails with 507 and the export's files are removed, as any failure's.
    fn wait_for_space(&self, item: WorkItem, e: RunError) {
        let job_id = item.job_id.clone();
        let job = self.queue.get(&job_id).ok().flatten();
        let text = failure_text(&e, self.config.sink.as_ref(), job.as_ref());
        // Before the item is given back: it is claimed again under the same attempt (a wait
        // spends none), so into the same part folder, and the partial part holds space.
        self.remove_own_writes(&item, false);
        let wait = self.config.space_wait();
        let waited = self.until_recorded(|| {
            self.queue
                .wait_for_space(&item, &text, e.status(), wait, now_ms())
        });
        match waited {
            Ok(SpaceWaited::Waiting {
                waited_ms,
                retry_in_ms,
            }) => {
                overview::item_failed(true);
                tracing::warn!(job = %job_id, item = item.item_no, waited_s = waited_ms / 1000, retry_in_s = retry_in_ms / 1000, limit_s = self.config.full_wait.as_secs(), error = %text, "export destination full: the work item waits for space");
            }
            Ok(SpaceWaited::JobFailed) => {
                overview::item_failed(false);
                tracing::error!(job = %job_id, item = item.item_no, status = e.status(), limit_s = self.config.full_wait.as_secs(), error = %text, "export failed: its destination stayed full");
                if let Ok(Some(job)) = self.queue.get(&job_id) {
                    self.clean_up(&job);
                }
                self.forget(&job_id);
            }
            Ok(SpaceWaited::NotHeld) => {
                tracing::info!(job = %job_id, item = item.item_no, "work item taken over or stopped while its destination was full");
            }
            Err(qe) => {
                tracing::error!(job = %job_id, item = item.item_no, error = %qe, "cannot record a work item's wait for space")
            }
        }
    }

    /// `record` (an item's outcome on the job queue), tried again while the queue's database is
    /// unavailable (a restart, a failover), until the service stops. An outcome not recorded
    /// leaves its item `running` under this node, which no worker here runs any more and no
    /// other node takes before the heartbeat timeout (10 minutes by default): the export would
    /// stand still that long after the database came back.
    fn until_recorded<T>(
        &self,
        mut record: impl FnMut() -> Result<T, QueueError>,
    ) -> Result<T, QueueError> {
        let mut wait = Duration::from_millis(100);
        let mut warned = false;
        loop {
            match record() {
                Err(e) if e.is_unavailable() && !self.stopping.load(Ordering::SeqCst) => {
                    if !warned {
                        tracing::warn!(
                            "the export job table is unavailable: recording the work item's outcome again until it is back"
                        );
                        warned = true;
                    }
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(Duration::from_secs(2));
                }
                done => return done,
            }
        }
    }

    /// Gives back the items running under this process's name that none of its workers runs:
    /// claims whose answer was lost (the connection died after the database committed), or an
    /// outcome that could not be recorded. Run before the next claim after a failed one, and
    /// by every sweep. A lost claim's attempt is not counted (the item never ran); a lost
    /// outcome's stays counted ([`store::JobQueue::release_unheld`]).
    pub(super) fn give_back_unheld(&self) {
        // No claim is between the database and `held` meanwhile.
        let _claiming = self.claiming.write().unwrap_or_else(|p| p.into_inner());
        // `ran` before `held`: a worker adds its item to `ran` before it leaves `held`.
        let ran: Vec<(String, i64)> = lock(&self.ran).iter().cloned().collect();
        let held: Vec<(String, i64)> = lock(&self.held).iter().cloned().collect();
        match self.queue.release_unheld(&self.node, &held, &ran) {
            Ok(n) => {
                // Every item of `ran` is now recorded or given back: forgotten, so that the set
                // holds at most the items run between two sweeps.
                let mut left = lock(&self.ran);
                for key in &ran {
                    left.remove(key);
                }
                drop(left);
                self.claim_unsure.store(false, Ordering::SeqCst);
                if n > 0 {
                    tracing::warn!(
                        items = n,
                        owner = %self.node,
                        "export work claimed by this process but run by none of its workers is given back"
                    );
                    self.notify();
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot look for unheld export work yet"),
        }
    }

    /// Writes the manifest of a job whose other items are all done, with its finalize item
    /// (`item`, its files committed and renamed) done.
    fn complete_job(&self, prepared: &Prepared, item: &WorkItem) -> Result<(), RunError> {
        let job = &prepared.job;
        let files = self.queue.files(&job.id)?;
        let anonymization = prepared
            .anonymizer
            .as_ref()
            .map(|a| a.info.manifest_extension());
        let manifest = self.manifest_of(job, &prepared.req, anonymization, &files);
        self.record_completion(job, item, 0, &manifest.to_string())?;
        let total: u64 = files
            .iter()
            .filter(|f| f.kind == FileKind::Output)
            .map(|f| f.count)
            .sum();
        tracing::info!(job = %job.id, files = files.len(), resources = total, "export complete");
        self.forget(&job.id);
        Ok(())
    }
}

impl ExportService {
    /// Marks a job's finalize `item` done and the job complete with `result` (its manifest) in
    /// one transaction, tried again while the job table is unavailable: a completion whose write
    /// failed must not leave the job `running` with every item done, which nothing would claim
    /// again. Should it still fail, the item stays held and its failure is recorded as any other
    /// (retried, so finalized again, while attempts remain). The job's temporary parts folder
    /// is removed first; one that could not be is recorded with the completion for the sweeper.
    fn record_completion(
        &self,
        job: &JobRecord,
        item: &WorkItem,
        scanned: u64,
        result: &str,
    ) -> Result<(), RunError> {
        let parts_left = !crate::run::remove_parts(self.config.sink.as_ref(), job);
        if self.until_recorded(|| {
            self.queue
                .complete_job(item, scanned, result, parts_left, now_ms())
        })? {
            Ok(())
        } else {
            Err(self.not_held(item, scanned)?)
        }
    }

    /// Why an item's outcome could not be recorded by this claim: its job stopped (cancelled or
    /// failed) or its lease went to another worker.
    fn not_held(&self, item: &WorkItem, scanned: u64) -> Result<RunError, RunError> {
        Ok(match self.queue.heartbeat(item, scanned, now_ms())? {
            Lease::JobStopped => RunError::Stopped,
            _ => RunError::LeaseLost,
        })
    }
}

/// A worker: claims items until the service is dropped; when there is none, waits to be woken
/// (a kick-off or a release of this process, or another node's announced through the queue's
/// work watch) or for the poll interval (`ExportConfig::poll`), whichever comes first.
fn worker_loop(svc: std::sync::Weak<ExportService>) {
    loop {
        let Some(me) = svc.upgrade() else {
            return;
        };
        if me.stopping.load(Ordering::SeqCst) {
            return;
        }
        let seen = *lock(&me.wake.0);
        if me.claim_unsure.load(Ordering::SeqCst) {
            me.give_back_unheld();
        }
        let claimed = {
            let _claiming = me.claiming.read().unwrap_or_else(|p| p.into_inner());
            let claimed = me.queue.claim(
                &me.node,
                now_ms(),
                me.config.heartbeat_timeout.as_millis() as i64,
                me.config.max_attempts,
            );
            if let Ok(Some(item)) = &claimed {
                lock(&me.held).insert((item.job_id.clone(), item.item_no));
            }
            claimed
        };
        match claimed {
            Ok(Some(item)) => {
                let key = (item.job_id.clone(), item.item_no);
                me.run_item(item);
                lock(&me.ran).insert(key.clone());
                lock(&me.held).remove(&key);
                continue;
            }
            Ok(None) => {}
            Err(e) => {
                me.claim_unsure.store(true, Ordering::SeqCst);
                tracing::error!(error = %e, "cannot claim export work");
            }
        }
        {
            let (m, cv) = &me.wake;
            let guard = lock(m);
            if *guard == seen {
                // Under the lock: no wake-up is counted between this line and the wait.
                tracing::debug!(
                    wakes = seen,
                    poll_s = me.config.poll.as_secs(),
                    "export worker idle"
                );
                let _ = cv.wait_timeout(guard, me.config.poll);
            }
        }
        drop(me);
    }
}
