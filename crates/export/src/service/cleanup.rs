//! Removing what exports leave behind: a stopped job's files (held in the queue so that nodes
//! never remove the same export at once), a stopped claim's own writes, and the sweeper thread
//! that expires complete exports after the retention period and retries failed deletions with
//! back-off.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{ExportError, ExportService, lock, now_ms, without_queries};
use crate::jobs::{Cleanup, JobRecord, JobState, WorkItem};

/// How long one node holds the deletion of an export's files ([`JobQueue::hold_cleanup`]);
/// if it dies meanwhile, another node retries after it.
const CLEANUP_HOLD: Duration = Duration::from_secs(600);

/// What [`ExportService::clean_up`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Deletion {
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

impl ExportService {
    /// Removes the files of a failed, cancelled or expired job and records it; a failure (the
    /// destination is down) leaves the deletion to the sweeper. The deletion is held in the
    /// queue first, so nodes sharing it never remove the same export at once. Of a complete job
    /// whose temporary parts folder was left at its completion ([`Cleanup::Parts`]) only that
    /// folder goes.
    pub(super) fn clean_up(&self, job: &JobRecord) -> Deletion {
        let hold = CLEANUP_HOLD.as_millis() as i64;
        match self.queue.hold_cleanup(&job.id, &self.node, now_ms(), hold) {
            Ok(true) => {}
            Ok(false) => return Deletion::Busy,
            Err(e) => {
                tracing::error!(job = %job.id, error = %e, "cannot hold an export's deletion");
                return Deletion::Failed;
            }
        }
        if job.cleanup == Cleanup::Parts {
            return self.clean_up_parts(job);
        }
        match self.config.sink.delete_prefix(&job.container, &job.folder) {
            Ok(()) => {
                if let Err(e) = self.queue.cleaned(&job.id) {
                    tracing::error!(job = %job.id, error = %e, "cannot record a finished deletion");
                    self.release_cleanup(&job.id);
                    return Deletion::Failed;
                }
                tracing::info!(job = %job.id, state = job.state.as_str(), "export files removed");
                Deletion::Done
            }
            Err(e) => {
                tracing::warn!(job = %job.id, error = %without_queries(&e.to_string()), "cannot remove export files yet; retried later");
                // The sweeper's back-off (60 s, 120 s, ...) retries it: the hold, taken for a
                // deletion in progress, would refuse those tries (`Busy`) until it lapsed.
                self.release_cleanup(&job.id);
                Deletion::Failed
            }
        }
    }

    /// The held deletion of a complete job's temporary parts folder, left at its completion: the
    /// export's files stay. Recorded done, or released for the sweeper's next try.
    fn clean_up_parts(&self, job: &JobRecord) -> Deletion {
        let dir = crate::run::parts_dir(&job.folder);
        match self.config.sink.delete_prefix(&job.container, &dir) {
            Ok(()) => {
                let recorded = self.queue.parts_cleaned(&job.id);
                // The hold ends with the record, unless the job expired or was cancelled
                // meanwhile (its whole folder now to go): then it is released here.
                self.release_cleanup(&job.id);
                if let Err(e) = recorded {
                    tracing::error!(job = %job.id, error = %e, "cannot record a removed parts folder");
                    return Deletion::Failed;
                }
                tracing::info!(job = %job.id, container = %job.container, path = %dir, "temporary parts folder of a complete export removed");
                Deletion::Done
            }
            Err(e) => {
                tracing::warn!(job = %job.id, container = %job.container, path = %dir, error = %without_queries(&e.to_string()), "cannot remove a complete export's temporary parts folder yet; retried later");
                self.release_cleanup(&job.id);
                Deletion::Failed
            }
        }
    }

    /// Ends this node's hold on a deletion that failed, so that the next sweep (here or on
    /// another node) retries it; if even that fails, the hold lapses after [`CLEANUP_HOLD`].
    fn release_cleanup(&self, job: &str) {
        if let Err(e) = self.queue.release_cleanup(job, &self.node) {
            tracing::warn!(job, error = %e, "cannot release the hold on a failed deletion; it lapses");
        }
    }

    /// After an item stopped because its lease or its job ended: removes what this claim wrote
    /// that nobody will use. A stopped job's files all go, so the item's committed files too
    /// (another node may have listed the folder before this worker renamed one into it); a lost
    /// lease leaves committed parts to the new holder, so the claim's part folder goes only
    /// when none of its parts still waits for a rename.
    pub(super) fn remove_own_writes(&self, item: &WorkItem, job_stopped: bool) {
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

    /// One pass of the sweeper: makes the finalize item of jobs left running with every item
    /// done claimable again, expires complete jobs past the retention period, removes the
    /// files of every job whose deletion is still to do (and the temporary parts folders of
    /// complete jobs left at their completion), and deletes the rows of removed jobs: failed
    /// and cancelled ones two retention periods after they ended, expired ones one retention
    /// period after their expiry. Returns the deletions done.
    pub fn sweep(&self) -> Result<u64, ExportError> {
        let retention = self.config.retention.as_millis().min(i64::MAX as u128) as i64;
        let timeout = self
            .config
            .heartbeat_timeout
            .as_millis()
            .min(i64::MAX as u128) as i64;
        // An older version completed a job in two writes; a job whose second write was lost
        // is `running` with every item done, which no claim takes.
        match self.queue.requeue_stranded(now_ms(), timeout) {
            Ok(0) => {}
            Ok(jobs) => {
                tracing::warn!(
                    jobs,
                    "exports left running with every work item done are finalized again"
                );
                self.notify();
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot look for exports left running with every work item done")
            }
        }
        let now = now_ms();
        let expired = self.queue.expire(now.saturating_sub(retention), now)?;
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
        // The rows of jobs whose files are gone stay a while, then go: a failed or cancelled
        // job's two retention periods after it ended (its failure is answered meanwhile), an
        // expired job's one retention period after its expiry (410 meanwhile) — counted from
        // the expiry, not the completion: a job completed long before (the server was down)
        // is expired and still answers 410 for the whole period.
        let now = now_ms();
        let purged = self.queue.purge(
            now.saturating_sub(retention.saturating_mul(2)),
            now.saturating_sub(retention),
        )?;
        if purged > 0 {
            tracing::info!(jobs = purged, "rows of removed exports purged");
        }
        if let Err(e) = self.store.checkpoint() {
            tracing::warn!(error = %e, "store checkpoint failed");
        }
        Ok(cleaned)
    }
}

/// The sweeper: at start and then every `sweep_every`, expires exports past their retention,
/// finishes deletions still to do (interrupted by a crash, or refused by a destination that was
/// down) and checkpoints the store's WAL.
pub(super) fn sweeper_loop(svc: std::sync::Weak<ExportService>) {
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
        me.give_back_unheld();
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
}
