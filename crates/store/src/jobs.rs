//! Export job persistence: the [`JobQueue`] contract and its typed records, implemented by each
//! backend in the same database as the resources ([`crate::Store::jobs`]):
//! [`crate::sqlite::SqliteJobQueue`] and the PostgreSQL queue.
//!
//! ```text
//!   kick-off ──> queued ──> running ──> complete ──(retention)──> expired
//!                  │           │  └───> failed
//!                  └───────────┴──────> cancelled
//!   failed, cancelled and expired jobs have their files removed: `cleanup` is set to
//!   `pending` in the same transaction as the state, and to `done` once the deletion succeeded
//!   (retried by the sweeper and at start-up until then). A complete job whose temporary
//!   `_parts` folder could not be removed at its completion has `cleanup` = `parts` until the
//!   sweeper removed it (then `none`). Rows of jobs whose files are removed are deleted by
//!   [`JobQueue::purge`] once they are older than the sweeper's horizon: failed and cancelled
//!   ones counted from their end, expired ones from their expiry (`expired_ms`).
//!
//!   work item:  pending ──claim──> running ──> done
//!                  ^                  │  └──> failed (attempts exhausted, or not retryable)
//!                  ├── failed transiently: pending again after a back-off (attempt counted)
//!                  ├── released at shutdown: pending at once, the attempt given back
//!                  ├── its destination full: pending after a wait that grows with the time
//!                  │   waited, the attempt given back, until a commit of it succeeds or it
//!                  │   waited longer than the limit (then it fails its job)
//!                  └── heartbeat older than the timeout: taken over by another worker,
//!                      which resumes from the item's committed cursor
//! ```
//!
//! An export is planned at kick-off into work items: one per (resource type, sequence range), an
//! optional Provenance item, and one `finalize` item that becomes claimable only when every other
//! item of its job is done (it writes `deleted` and warnings and the manifest). Workers claim
//! items, heartbeat them, and commit progress **per finished file part** (the file's number is
//! allocated at commit, so files of a type are numbered 1, 2, … without gaps whatever the order in
//! which items finish). A file row records its temporary name until the rename to its final name
//! is done; a worker that takes an item over first finishes such renames.
//!
//! States are stored as text constrained by `CHECK (… IN (…))` in both backends and read back
//! through [`std::str::FromStr`]: a value this version does not know is an error
//! ([`QueueError::Unknown`]), never another state.

use std::str::FromStr;

pub use crate::error::{QueueError, UnknownName};

/// A state enum stored as text: `as_str`, `NAMES` (for the `CHECK` constraints) and a `FromStr`
/// that refuses unknown text.
macro_rules! text_enum {
    ($t:ident { $($v:ident = $name:literal),+ $(,)? }) => {
        impl $t {
            /// Every stored name, in declaration order.
            pub const NAMES: &'static [&'static str] = &[$($name),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($t::$v => $name,)+
                }
            }
        }

        impl FromStr for $t {
            type Err = UnknownName;

            fn from_str(s: &str) -> Result<$t, UnknownName> {
                match s {
                    $($name => Ok($t::$v),)+
                    _ => Err(UnknownName { what: $t::WHAT, value: s.to_string() }),
                }
            }
        }
    };
}

impl JobState {
    const WHAT: &'static str = "job state";
}
impl Cleanup {
    const WHAT: &'static str = "cleanup state";
}
impl ItemKind {
    const WHAT: &'static str = "item kind";
}
impl FileKind {
    const WHAT: &'static str = "file kind";
}

/// The states of a work item (stored in `export_item.state`; not part of the records).
pub const ITEM_STATES: &[&str] = &["pending", "running", "done", "failed"];

/// `col IN ('a', 'b')` for a `CHECK` constraint over stored names.
pub(crate) fn check_in(column: &str, names: &[&str]) -> String {
    let list: Vec<String> = names.iter().map(|n| format!("'{n}'")).collect();
    format!("CHECK ({column} IN ({}))", list.join(", "))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    Queued,
    Running,
    Complete,
    Failed,
    Cancelled,
    /// Complete, and removed after the retention period.
    Expired,
}

text_enum!(JobState {
    Queued = "queued",
    Running = "running",
    Complete = "complete",
    Failed = "failed",
    Cancelled = "cancelled",
    Expired = "expired",
});

/// Whether a finished job's files still have to be removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cleanup {
    /// Nothing to remove (an active or complete job).
    None,
    /// The job failed, was cancelled or expired: its files are to be removed.
    Pending,
    /// Its files are removed.
    Done,
    /// A complete job whose temporary parts folder (`<folder>/_parts`) could not be removed
    /// when it completed: only that folder is to be removed, its files stay (SQLite job schema
    /// 6, PostgreSQL migration 8).
    Parts,
}

text_enum!(Cleanup {
    None = "none",
    Pending = "pending",
    Done = "done",
    Parts = "parts",
});

impl JobState {
    pub fn is_active(self) -> bool {
        matches!(self, JobState::Queued | JobState::Running)
    }
}

/// One export job.
#[derive(Debug, Clone)]
pub struct JobRecord {
    pub id: String,
    pub state: JobState,
    /// The request as JSON (level, parameters) so any worker, in any process, can run it.
    pub request: String,
    /// The pinned snapshot.
    pub watermark: i64,
    pub transaction_time: String,
    /// The client that started the job (`None` without authorization).
    pub client_id: Option<String>,
    pub container: String,
    /// The export's folder inside the container.
    pub folder: String,
    /// De-identification of the export (JSON: source, name, etag/digest, fingerprint and the
    /// configuration text itself, so a resumed job uses exactly the kick-off's rules).
    pub anonymization: Option<String>,
    /// Manifest JSON when complete; diagnostics when failed.
    pub result: Option<String>,
    /// HTTP status of a failure (4xx for a bad request found late, 5xx otherwise).
    pub failure_status: Option<u16>,
    pub created_ms: i64,
    pub finished_ms: Option<i64>,
    /// Whether the job's files are still to be removed.
    pub cleanup: Cleanup,
}

/// How a transiently failed item is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    /// Claims per item; the failure of the last one fails the job.
    pub max_attempts: i64,
    /// Back-off after attempt n: `base_ms * 2^(n-1)`, at most `max_ms`.
    pub base_ms: i64,
    pub max_ms: i64,
}

impl Retry {
    /// When an item failed in its `attempt`-th claim may be claimed again.
    pub fn not_before(&self, attempt: i64, now_ms: i64) -> i64 {
        let shift = (attempt - 1).clamp(0, 20) as u32;
        now_ms + self.base_ms.saturating_mul(1i64 << shift).min(self.max_ms)
    }
}

/// How an item whose destination is full waits for space ([`JobQueue::wait_for_space`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpaceWait {
    /// The wait before the item may be claimed again is the time it has waited so far, at
    /// least `min_ms` and at most `max_ms`: so the waits double (5 s, 5 s, 10 s, 20 s, …).
    pub min_ms: i64,
    pub max_ms: i64,
    /// How long the item may wait in all, from the first full destination after its last
    /// commit: the next full destination after it fails the job.
    pub limit_ms: i64,
}

impl SpaceWait {
    /// When an item waiting since `since_ms` may be claimed again, at `now_ms` (never after
    /// its limit); `None` when it has waited `limit_ms` or longer.
    pub fn next_try(&self, since_ms: i64, now_ms: i64) -> Option<i64> {
        let waited = now_ms.saturating_sub(since_ms).max(0);
        if waited >= self.limit_ms {
            return None;
        }
        let delay = waited.max(self.min_ms).min(self.max_ms.max(self.min_ms));
        Some(
            now_ms
                .saturating_add(delay)
                .min(since_ms.saturating_add(self.limit_ms)),
        )
    }
}

/// The failure of a job whose item waited `waited_ms` for space in vain: `message` (what the
/// full destination said) and how long it waited; the same text on every backend.
pub(crate) fn space_wait_over(message: &str, waited_ms: i64) -> String {
    format!(
        "{message}; still full after waiting {} s for space",
        waited_ms / 1000
    )
}

/// What [`JobQueue::wait_for_space`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpaceWaited {
    /// Given back: claimable again after `retry_in_ms`; it has waited `waited_ms` so far.
    Waiting { waited_ms: i64, retry_in_ms: i64 },
    /// It waited longer than the limit: the item and its job failed (its files to be removed).
    JobFailed,
    /// This claim no longer holds the item (taken over, or its job stopped): nothing changed.
    NotHeld,
}

/// What a work item does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemKind {
    /// Scan one resource type over a sequence range.
    Scan,
    /// Provenance of exported resources (`includeAssociatedData`).
    Associated,
    /// Deleted entries, warnings, the manifest: runs after every other item is done.
    Finalize,
}

text_enum!(ItemKind {
    Scan = "scan",
    Associated = "associated",
    Finalize = "finalize",
});

/// A planned work item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemPlan {
    pub kind: ItemKind,
    pub resource_type: String,
    /// Sequence range `(seq_after, seq_up_to]`.
    pub seq_after: i64,
    pub seq_up_to: i64,
    /// Resources expected in the range (for progress).
    pub expected: u64,
}

/// A claimed work item.
#[derive(Debug, Clone)]
pub struct WorkItem {
    pub job_id: String,
    pub item_no: i64,
    pub kind: ItemKind,
    pub resource_type: String,
    pub seq_after: i64,
    pub seq_up_to: i64,
    /// Last sequence number covered by committed files (resume point).
    pub cursor: i64,
    pub expected: u64,
    /// Resources scanned so far, as of the last heartbeat or commit.
    pub scanned: u64,
    /// This claim's attempt number (1 = first); part names include it so that two workers
    /// never write the same temporary object.
    pub attempt: i64,
    pub owner: String,
}

/// The lease-owner name of a worker process: `<node>/<incarnation>`. `node` is the stable node
/// id (`--node-id`, or a random one), `incarnation` is new at every start, so a restarted node
/// can tell its previous incarnation's leases from its own ([`Orphans::OfNode`]).
pub fn owner_name(node: &str, incarnation: &str) -> String {
    format!("{node}/{incarnation}")
}

/// Which running items [`JobQueue::release_orphans`] releases at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Orphans<'a> {
    /// Every running item: this process is the only one using the queue (SQLite, behind the
    /// data-directory lock), so any lease belongs to a dead process.
    All,
    /// The items of earlier incarnations of node `node` (owners `<node>/…` other than
    /// `current`): on a database shared by several nodes only a node's own previous leases are
    /// known to be dead; every other node's items are taken over after the heartbeat timeout.
    OfNode { node: &'a str, current: &'a str },
}

/// What a heartbeat learns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lease {
    Held,
    /// Another worker took the item over, or it is no longer running.
    Lost,
    /// The job was cancelled or failed: stop.
    JobStopped,
}

/// A file part to commit.
#[derive(Debug, Clone)]
pub struct NewFile {
    /// `output`, `deleted` or `error`.
    pub kind: FileKind,
    /// Type in the manifest (`Patient`, `Bundle`, `OperationOutcome`).
    pub resource_type: String,
    /// Name prefix: the file is `<prefix>-<n>.ndjson`.
    pub prefix: String,
    pub count: u64,
    pub bytes: u64,
    /// SHA-256 (lowercase hex) of the stored bytes, computed while writing.
    pub sha256: Option<String>,
    /// Temporary path inside the container.
    pub temp_path: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Output,
    Deleted,
    Error,
}

text_enum!(FileKind {
    Output = "output",
    Deleted = "deleted",
    Error = "error",
});

/// The final name of file `number` of `prefix`: `<prefix>-<n>.ndjson`, or `<stem>-<n>.<ext>`
/// for a prefix `<stem>.<ext>` (`$viewdefinition-export`: `patients.parquet` →
/// `patients-1.parquet`; resource type prefixes have no dot).
pub fn file_name(prefix: &str, number: i64) -> String {
    // A gzip-compressed export's prefixes end in `.ndjson.gz`: `Patient-1.ndjson.gz`.
    if let Some(stem) = prefix.strip_suffix(".ndjson.gz") {
        return format!("{stem}-{number}.ndjson.gz");
    }
    match prefix.rsplit_once('.') {
        Some((stem, ext)) if matches!(ext, "ndjson" | "csv" | "parquet") => {
            format!("{stem}-{number}.{ext}")
        }
        _ => format!("{prefix}-{number}.ndjson"),
    }
}

/// A committed file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRecord {
    pub kind: FileKind,
    pub resource_type: String,
    pub number: i64,
    /// Final name in the export folder, e.g. `Patient-2.ndjson`.
    pub name: String,
    pub count: u64,
    pub bytes: u64,
    /// SHA-256 (lowercase hex) of the stored bytes (`None` for files of older versions).
    pub sha256: Option<String>,
    pub item_no: i64,
    /// Set while the temporary object still has to be renamed to `name`.
    pub pending_rename: Option<String>,
}

/// Progress of one type, summed over its items.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeProgress {
    pub resource_type: String,
    pub scanned: u64,
    pub expected: u64,
    pub done: bool,
}

/// Progress of one work item ([`JobQueue::item_progress`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemProgress {
    pub item_no: i64,
    pub kind: ItemKind,
    pub resource_type: String,
    /// Its committed cursor.
    pub cursor: i64,
    /// Its scanned count as of the last heartbeat or commit.
    pub scanned: u64,
    pub done: bool,
}

/// The limits a new job is admitted under ([`JobQueue::create_admitted`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    /// Jobs queued or running at once, over every client.
    pub max_active: u64,
    /// Jobs queued or running at once of the new job's client (`client_id`); a job without a
    /// client (no authentication: every caller is the same principal) is held only to
    /// `max_active`.
    pub max_per_client: u64,
}

/// The job queue contract shared by every backend.
pub trait JobQueue: Send + Sync {
    /// [`JobQueue::create_admitted`] without a per-client limit.
    fn create(
        &self,
        job: &JobRecord,
        items: &[ItemPlan],
        max_active: u64,
    ) -> Result<(), QueueError> {
        self.create_admitted(
            job,
            items,
            Admission {
                max_active,
                max_per_client: u64::MAX,
            },
        )
    }
    /// Inserts a job and its work items atomically, unless `admission.max_active` jobs are
    /// queued or running already ([`QueueError::Full`]), or `admission.max_per_client` of the
    /// job's client ([`QueueError::ClientFull`]): admission is decided in the same transaction,
    /// under the lock that serializes admissions, so two kick-offs never both take the last
    /// slot (of the server or of one client).
    fn create_admitted(
        &self,
        job: &JobRecord,
        items: &[ItemPlan],
        admission: Admission,
    ) -> Result<(), QueueError>;
    /// Jobs of `client` queued or running.
    fn active_count_of(&self, client: &str) -> Result<u64, QueueError>;
    fn get(&self, id: &str) -> Result<Option<JobRecord>, QueueError>;
    /// Jobs queued or running.
    fn active_count(&self) -> Result<u64, QueueError>;
    /// Claims the next runnable item: a pending one, or a running one whose heartbeat is older
    /// than `timeout_ms` (taken over) — at most `max_attempts` claims per item. An item whose
    /// attempts are used up (stale, or left pending by a crash) fails its job here.
    fn claim(
        &self,
        owner: &str,
        now_ms: i64,
        timeout_ms: i64,
        max_attempts: i64,
    ) -> Result<Option<WorkItem>, QueueError>;
    /// Refreshes the lease and records the scanned count.
    fn heartbeat(&self, item: &WorkItem, scanned: u64, now_ms: i64) -> Result<Lease, QueueError>;
    /// Commits finished file parts and the item's new cursor atomically; allocates the files'
    /// numbers; ends the item's wait for space, if any (its destination took the parts). `None`
    /// when the lease is lost or the job stopped (the caller discards the parts).
    fn commit_files(
        &self,
        item: &WorkItem,
        files: &[NewFile],
        cursor: i64,
        scanned: u64,
        now_ms: i64,
    ) -> Result<Option<Vec<FileRecord>>, QueueError>;
    /// Records that a committed file's temporary object was renamed to its final name.
    fn renamed(&self, job_id: &str, name: &str) -> Result<(), QueueError>;
    /// Marks the item done (only by its lease holder).
    fn complete_item(&self, item: &WorkItem, scanned: u64, now_ms: i64)
    -> Result<bool, QueueError>;
    /// Gives the item back for another attempt after a back-off (`retry`, while attempts
    /// remain), or fails the whole job (its files then to be removed). Returns whether the job
    /// failed.
    fn fail_item(
        &self,
        item: &WorkItem,
        message: &str,
        status: u16,
        retry: Option<Retry>,
        now_ms: i64,
    ) -> Result<bool, QueueError>;
    /// Gives a held item back without counting the attempt (graceful shutdown): claimable at
    /// once, resumed at its committed cursor.
    fn release(&self, item: &WorkItem) -> Result<bool, QueueError>;
    /// Gives a held item back because its destination is full (`message`, `status`: what its
    /// job fails with once the wait is over). The attempt is not counted (a full disk is not
    /// the item's fault), and the item is claimable again after the wait `wait` gives for the
    /// time it has waited since its first full destination after its last commit (recorded
    /// with the item, so every node and a restarted one see the same wait; a commit of the item
    /// ends it, [`JobQueue::commit_files`]). Past `wait.limit_ms` the item and its job fail
    /// instead, as by [`JobQueue::fail_item`] without a retry.
    fn wait_for_space(
        &self,
        item: &WorkItem,
        message: &str,
        status: u16,
        wait: SpaceWait,
        now_ms: i64,
    ) -> Result<SpaceWaited, QueueError>;
    /// How long (ms, at `now_ms`) the longest waiting item of job `id` has been waiting for
    /// space at its destination ([`JobQueue::wait_for_space`]); `None` when none waits.
    fn space_wait(&self, id: &str, now_ms: i64) -> Result<Option<i64>, QueueError>;
    /// [`JobQueue::release`] for every item `owner` holds.
    fn release_owned(&self, owner: &str) -> Result<u64, QueueError>;
    /// Makes the items running under `owner` that are not in `held` (job id, item number)
    /// claimable at once: claims `owner` made whose answer never reached it (the connection
    /// died after the database committed the claim), which no worker of `owner` runs. Without
    /// this they would wait for the heartbeat timeout. Such an item never ran: its attempt is
    /// not counted, as by [`JobQueue::release`]. An item in `ran` did run but its outcome could
    /// not be recorded: its attempt stays counted (it must not be retried for ever).
    fn release_unheld(
        &self,
        owner: &str,
        held: &[(String, i64)],
        ran: &[(String, i64)],
    ) -> Result<u64, QueueError>;
    /// Ends a job `complete` with its `result` (the manifest) in the same transaction that marks
    /// its finalize `item` done (only by the item's lease holder), so that a job is never left
    /// `running` with every item done and no result: a failure of the write leaves both as
    /// they were (the item still held, its outcome recorded again or retried). True when the job
    /// is complete, also when this call repeats one that committed but whose answer was lost
    /// (the same item, owner and attempt); false when the lease is lost or the job stopped
    /// (a cancelled or failed job is never overwritten). `parts_left`: the job's temporary
    /// parts folder could not be removed, recorded as [`Cleanup::Parts`] in the same
    /// transaction (the sweeper removes it later).
    fn complete_job(
        &self,
        item: &WorkItem,
        scanned: u64,
        result: &str,
        parts_left: bool,
        now_ms: i64,
    ) -> Result<bool, QueueError>;
    /// Jobs left `running` with every item done (an older version marked the finalize item
    /// done and completed the job in two writes; the second was lost): their finalize item is
    /// made claimable again, its attempt not counted, so that a worker writes the manifest and
    /// completes the job (finalize is idempotent: its committed files are kept). Only finalize
    /// items done more than `timeout_ms` before `now_ms` are taken (as a stale heartbeat: an
    /// older node may still be between its two writes). Returns how many jobs.
    fn requeue_stranded(&self, now_ms: i64, timeout_ms: i64) -> Result<u64, QueueError>;
    /// Cancels a job durably (its files to be removed): a queued or running job, or a complete
    /// one (its status then answers 404, as after any cancel). A failed, expired or cancelled
    /// job keeps its state, its failure and its finish time (its files are removed already or
    /// still to be).
    fn cancel(&self, id: &str, now_ms: i64) -> Result<(), QueueError>;
    /// Complete jobs finished at or before `finished_before_ms` become `expired` (their files to
    /// be removed), their expiry recorded at `now_ms` ([`JobQueue::purge`] counts from it).
    /// Returns how many.
    fn expire(&self, finished_before_ms: i64, now_ms: i64) -> Result<u64, QueueError>;
    /// Jobs whose files are still to be removed: [`Cleanup::Pending`] (the job's folder) and
    /// [`Cleanup::Parts`] (only its temporary parts folder).
    fn cleanups(&self) -> Result<Vec<JobRecord>, QueueError>;
    /// The most recent jobs (by creation, newest first), at most `limit`; only `client`'s when
    /// given (the status page: a client sees its own jobs).
    fn recent(&self, limit: u64, client: Option<&str>) -> Result<Vec<JobRecord>, QueueError>;
    /// How many jobs are in each state, apart for exports (`false`) and imports (`true`: the
    /// recorded request holds `"operation":"import"`), for the metrics endpoint; states without
    /// jobs are left out.
    fn count_by_state(&self) -> Result<Vec<(JobState, bool, u64)>, QueueError>;
    /// Records that a job's files are removed (its cleanup was [`Cleanup::Pending`]).
    fn cleaned(&self, id: &str) -> Result<(), QueueError>;
    /// Records that a complete job's temporary parts folder is removed (its cleanup was
    /// [`Cleanup::Parts`]; then [`Cleanup::None`]) and ends the deletion's hold. A cleanup that
    /// became [`Cleanup::Pending`] meanwhile (the job expired or was cancelled) stays.
    fn parts_cleaned(&self, id: &str) -> Result<(), QueueError>;
    fn files(&self, job_id: &str) -> Result<Vec<FileRecord>, QueueError>;
    /// The de-identification key sets kept in the same database ([`crate::keysets`]).
    fn key_sets(&self) -> Option<&dyn crate::keysets::KeySets> {
        None
    }
    fn progress(&self, job_id: &str) -> Result<Vec<TypeProgress>, QueueError>;
    /// Every work item of a job in item order: its number and whether it is done (the pages of
    /// a partial manifest, `allowPartialManifests`).
    fn item_states(&self, job_id: &str) -> Result<Vec<(i64, bool)>, QueueError>;
    /// Every item of a job, in item order (`$import` reports per input, one item each).
    fn item_progress(&self, job_id: &str) -> Result<Vec<ItemProgress>, QueueError>;
    /// Start-up: the running items that belong to a process that is gone are made claimable at
    /// once instead of after the heartbeat timeout ([`Orphans`] says which), and the deletions
    /// such a process held ([`JobQueue::hold_cleanup`]) can be taken at once. Their attempt stays
    /// counted. Returns how many items.
    fn release_orphans(&self, orphans: Orphans<'_>) -> Result<u64, QueueError>;
    /// Takes the deletion of job `id`'s files for `hold_ms` on behalf of `owner` (a lease owner,
    /// [`owner_name`]): true when its cleanup is pending (or its parts folder left,
    /// [`Cleanup::Parts`]) and no other deletion holds it
    /// (cluster-wide: two nodes never remove the same export's files at once). The hold ends
    /// with [`JobQueue::cleaned`], or lapses (a deletion that failed, or a node that died, is
    /// retried by anyone after `hold_ms`), or is released at once by the next start of the
    /// owner's node ([`JobQueue::release_orphans`]).
    fn hold_cleanup(
        &self,
        id: &str,
        owner: &str,
        now_ms: i64,
        hold_ms: i64,
    ) -> Result<bool, QueueError>;
    /// Ends `owner`'s hold on the deletion of job `id`'s files ([`JobQueue::hold_cleanup`]) at
    /// once: the deletion failed (the destination is down) and is to be retried by the next
    /// sweep, on this or another node, rather than after the hold lapses. A hold of another
    /// owner, or none, is left as it is.
    fn release_cleanup(&self, id: &str, owner: &str) -> Result<(), QueueError>;
    /// Deletes the rows (job, items, files) of failed, cancelled and expired jobs whose files are
    /// removed (`cleanup` done): failed and cancelled ones that finished at or before
    /// `finished_before_ms`, expired ones that expired at or before `expired_before_ms` (an
    /// expired job's status answers 410 until then, however long ago it completed; one expired
    /// by an older version, without its expiry recorded, counts from its completion as
    /// `finished_before_ms`). Returns how many jobs.
    fn purge(&self, finished_before_ms: i64, expired_before_ms: i64) -> Result<u64, QueueError>;
    /// Calls `wake` whenever another process may have made work claimable (a kick-off, items
    /// given back), as soon as it is committed, until the returned watch is dropped; `None`
    /// when no other process shares the queue (SQLite: this process's own kick-offs and
    /// releases wake its workers directly). Workers poll the queue besides: a missed wake-up
    /// delays work, never loses it.
    fn watch_work(
        &self,
        _wake: std::sync::Arc<dyn Fn() + Send + Sync>,
    ) -> Result<Option<WorkWatch>, QueueError> {
        Ok(None)
    }
}

/// A running [`JobQueue::watch_work`]: the watching stops when it is dropped.
pub struct WorkWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl WorkWatch {
    /// A watch that stops its watcher by setting `stop`.
    pub fn new(stop: std::sync::Arc<std::sync::atomic::AtomicBool>) -> WorkWatch {
        WorkWatch { stop }
    }
}

impl Drop for WorkWatch {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl std::fmt::Debug for WorkWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkWatch").finish_non_exhaustive()
    }
}
