//! Versioned FHIR resource storage.
//!
//! - [`Store`]: the storage trait every caller uses (REST server, loader, search, export). It is
//!   synchronous and object safe (`Arc<dyn Store>`); async callers wrap calls in
//!   `tokio::task::spawn_blocking`. A PostgreSQL backend implements the same trait.
//! - [`SqliteStore`]: the SQLite implementation (bundled SQLite, WAL, one writer connection behind a
//!   mutex plus a small pool of reader connections). Its schema is documented in [`sqlite`].
//! - [`DataDirLock`]: the exclusive advisory lock on a data directory that `serve` and
//!   `load --data-dir` both take, so two processes never write one database.
//! - [`Indexer`]: the hook through which the search crate turns a resource into index rows, written
//!   in the same transaction as the resource.
//!
//! # Versions, sequence numbers and snapshots
//!
//! Every version row (create, update or delete tombstone) gets its own `seq`, a global strictly
//! increasing `i64`. The rows of one [`Store::write`] call take consecutive seqs and commit
//! atomically; the transaction is identified by its last seq. [`Store::watermark`] only ever returns
//! the last seq of a committed transaction, so "as of seq S" (the rows with `seq <= S` that were not
//! superseded by a row with `seq <= S`) is always the state after a whole transaction: the snapshot a
//! bulk export pins. `meta.lastUpdated` is the same instant for all rows of one transaction and
//! strictly increasing between transactions (millisecond precision, `Z`), so instants map onto seqs
//! monotonically ([`Store::seq_at_or_after`]).
//!
//! Stored resources are compact JSON bytes with `id`, `meta.versionId` and `meta.lastUpdated`
//! already set, ready to be written into an NDJSON file unchanged. Numbers keep their exact text.

pub mod conditions;
mod error;
pub mod format;
pub mod give_up;
mod index;
mod index_tables;
pub mod jobs;
pub mod keysets;
mod lock;
mod open;
mod ops;
pub mod plan;
pub mod postgres;
pub mod shared;
mod sql_plan;
pub mod sqlite;
mod stamp;
#[cfg(feature = "test-support")]
pub mod testing;

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

pub use conditions::{ConditionGuard, ConditionKey};
pub use error::StoreError;
pub use give_up::{GaveUp, Patience};
pub use index::{IndexEntry, IndexValue, Indexer, MAX_INDEXED_TEXT, index_text};
pub use jobs::{JobQueue, QueueError};
pub use lock::DataDirLock;
pub use open::{DATABASE_ENV, Database, DatabaseArg, OpenOptions, UnknownDatabase, open};
pub use postgres::{PgOptions, PgStore};
pub use shared::{AssertionRecord, SharedState};
pub use sqlite::{SqliteOptions, SqliteStore};
pub use stamp::{
    PreparedResource, format_instant_ms, is_valid_id, is_valid_type_name, parse_instant_ms,
};

/// One operation of an atomic [`Store::write`].
#[derive(Debug, Clone)]
pub enum WriteOp {
    /// Create a new resource; the type comes from `resource.resourceType`.
    ///
    /// If `resource.id` is present it is kept (the caller decided so: the REST `POST` handler removes
    /// a client id first, the bundle translation keeps ids it resolved); if that resource already
    /// exists (even deleted) the write fails with [`StoreError::AlreadyExists`]. Without an id the
    /// store assigns a fresh UUID.
    Create { resource: serde_json::Value },
    /// Update or create-on-update (`PUT Type/id`). `resource.resourceType` must equal
    /// `resource_type`; `resource.id`, if present, must equal `id` (else
    /// [`StoreError::InvalidResource`]). With `if_match`, the current version must be exactly that
    /// version (else [`StoreError::VersionConflict`]).
    Update {
        resource_type: String,
        id: String,
        resource: serde_json::Value,
        if_match: Option<i64>,
    },
    /// [`WriteOp::Update`] that never creates: when the resource does not exist or is deleted
    /// the write fails with [`StoreError::UpdateWouldCreate`] (a `PUT` of a client that may
    /// update the type but not create in it; decided inside the write, so that a delete between
    /// a check and the write cannot turn the update into a create).
    Replace {
        resource_type: String,
        id: String,
        resource: serde_json::Value,
        if_match: Option<i64>,
    },
    /// Delete: writes a tombstone version. Deleting a missing or already deleted resource is not an
    /// error and writes nothing (status [`WriteStatus::DeleteNotFound`]). With `if_match`, the
    /// current version must be that version.
    Delete {
        resource_type: String,
        id: String,
        if_match: Option<i64>,
    },
    /// Create-or-update (`PUT`, no If-Match) of a resource prepared ahead of the write by
    /// [`Store::prepare_put`] of the same store (the bulk loader's path: serialization and index
    /// extraction run on its worker threads, not under the write lock).
    Put(PreparedResource),
}

/// What a [`WriteOp`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteStatus {
    /// A new resource (version 1, or a re-creation after a delete) — HTTP 201.
    Created,
    /// A new version of an existing resource — HTTP 200.
    Updated,
    /// A tombstone was written — HTTP 204 (or 200).
    Deleted,
    /// Delete of a resource that does not exist or is already deleted; nothing written — HTTP 204.
    DeleteNotFound,
}

/// The result of one [`WriteOp`], in the order of the ops.
#[derive(Debug, Clone)]
pub struct WriteOutcome {
    pub resource_type: String,
    pub id: String,
    pub status: WriteStatus,
    /// The version written; for [`WriteStatus::DeleteNotFound`] the current (tombstone) version, or 0
    /// if the resource never existed.
    pub version: i64,
    /// The seq of the row written; 0 for [`WriteStatus::DeleteNotFound`].
    pub seq: i64,
    /// `meta.lastUpdated` of the row written (`2026-11-22T11:03:10.123Z`); for
    /// [`WriteStatus::DeleteNotFound`] the instant of the write call.
    pub last_updated: String,
    /// The stored JSON (compact, meta included) for creates and updates; `None` for deletes.
    pub json: Option<Vec<u8>>,
}

/// One stored version of a resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResource {
    pub resource_type: String,
    pub id: String,
    pub seq: i64,
    pub version: i64,
    pub last_updated: String,
    /// Compact JSON with `id` and `meta.versionId`/`meta.lastUpdated` set.
    pub json: Vec<u8>,
}

/// A row handed to the callback of [`Store::scan_type_each`], borrowed from the database cursor so
/// that scanning does not allocate per row.
#[derive(Debug, Clone, Copy)]
pub struct ScanRow<'a> {
    pub seq: i64,
    pub id: &'a str,
    pub version: i64,
    pub last_updated: &'a str,
    pub json: &'a [u8],
}

/// A deletion visible in a snapshot: the resource's current version at `as_of` is this tombstone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tombstone {
    pub resource_type: String,
    pub id: String,
    pub seq: i64,
    /// The version number of the tombstone itself.
    pub version: i64,
    pub last_updated: String,
}

/// The newest committed transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watermark {
    /// Last seq of the newest committed transaction; 0 for an empty store.
    pub seq: i64,
    /// Its `lastUpdated` instant; `None` for an empty store.
    pub last_updated: Option<String>,
}

/// Seq statistics of one type in a snapshot, for cutting export work items.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqStats {
    /// Smallest seq of a resource current at `as_of`.
    pub min_seq: i64,
    /// Largest seq of a resource current at `as_of`.
    pub max_seq: i64,
    /// Number of resources current (not deleted) at `as_of`.
    pub count: u64,
}

/// A half-open seq interval `(after, up_to]` for [`Store::scan_type_each`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqBounds {
    /// Exclusive lower bound (a keyset cursor, or a `_since` seq minus one); 0 scans from the start.
    pub after: i64,
    /// Inclusive upper bound; `i64::MAX` for no bound. Rows are also limited by `as_of`.
    pub up_to: i64,
}

impl SeqBounds {
    pub const ALL: SeqBounds = SeqBounds {
        after: 0,
        up_to: i64::MAX,
    };
}

/// Which history to read.
#[derive(Debug, Clone, Copy)]
pub enum HistoryScope<'a> {
    Instance { resource_type: &'a str, id: &'a str },
    Type(&'a str),
    System,
}

/// History parameters. Entries come newest first (seq descending).
#[derive(Debug, Clone, Default)]
pub struct HistoryQuery {
    /// `_since`: only versions with `lastUpdated >= since` (ms since the epoch, see
    /// [`parse_instant_ms`]).
    pub since_ms: Option<i64>,
    /// `_count` (page size). 0 means the default page size of 50.
    pub count: usize,
    /// Keyset cursor: only versions with `seq < before_seq` (from [`HistoryPage::next_before_seq`]).
    pub before_seq: Option<i64>,
    /// Pin the history to a snapshot: only versions with `seq <= as_of` (so that later pages do not
    /// shift when new versions arrive). `None` = everything committed.
    pub as_of: Option<i64>,
    /// Bytes of stored JSON one page holds at most (`None`: 16 MiB, the search default): the
    /// page ends before the version that would go over it, never before its first, with a
    /// cursor to the rest. Versions over 64 KiB are read only when the page takes them.
    pub max_bytes: Option<usize>,
}

/// How a version came to be, for `Bundle.entry.request.method` in history bundles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryMethod {
    Post,
    Put,
    Delete,
}

impl HistoryMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            HistoryMethod::Post => "POST",
            HistoryMethod::Put => "PUT",
            HistoryMethod::Delete => "DELETE",
        }
    }
}

/// One entry of a history page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    pub resource_type: String,
    pub id: String,
    pub seq: i64,
    pub version: i64,
    pub last_updated: String,
    pub method: HistoryMethod,
    /// The JSON of that version; `None` for a delete tombstone.
    pub json: Option<Vec<u8>>,
}

/// A page of history, newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryPage {
    pub entries: Vec<HistoryEntry>,
    /// Pass as [`HistoryQuery::before_seq`] to get the next (older) page; `None` on the last page.
    pub next_before_seq: Option<i64>,
}

/// Filter of the simple `GET /[type]` listing (before full search exists): current, non-deleted
/// resources only, in seq order.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// `_id`: any of these ids (`None` = no id filter; an empty list matches nothing).
    pub ids: Option<Vec<String>>,
    /// `_lastUpdated` lower bound, inclusive, ms since the epoch.
    pub updated_from_ms: Option<i64>,
    /// `_lastUpdated` upper bound, exclusive, ms since the epoch.
    pub updated_before_ms: Option<i64>,
}

/// A page of [`Store::list_type`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListPage {
    pub resources: Vec<StoredResource>,
    /// Pass as `after_seq` to get the next page; `None` on the last page.
    pub next_after_seq: Option<i64>,
}

/// The use of one database connection pool at one instant ([`Store::pool_stats`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolStats {
    /// Which pool: `store` (resources, search, exports' scans) or `jobs` (the job queue).
    pub name: String,
    /// Connections checked out now.
    pub in_use: u64,
    /// Open connections waiting in the pool.
    pub idle: u64,
    /// The most connections the pool opens.
    pub max: u64,
    /// Connection requests that found every connection in use and waited, since start.
    pub waits: u64,
    /// Waits that ended without a connection (the request failed with 503), since start.
    pub wait_timeouts: u64,
}
/// The [`Store`] methods both backends answer the same way: each backend has modules `writes`,
/// `reads`, `watermark`, `scans` and `index_upkeep` with functions of these names taking the
/// store first. Invoked inside `impl Store for …` of each backend, so the forwarding is written
/// once and a new method of that kind is added to both backends at once.
macro_rules! forward_to_backend_modules {
    () => {
        fn write(
            &self,
            ops: Vec<$crate::WriteOp>,
        ) -> Result<Vec<$crate::WriteOutcome>, $crate::StoreError> {
            writes::write(self, ops)
        }

        fn read(
            &self,
            resource_type: &str,
            id: &str,
        ) -> Result<$crate::StoredResource, $crate::StoreError> {
            reads::read(self, resource_type, id)
        }

        fn vread(
            &self,
            resource_type: &str,
            id: &str,
            version: i64,
        ) -> Result<$crate::StoredResource, $crate::StoreError> {
            reads::vread(self, resource_type, id, version)
        }

        fn history(
            &self,
            scope: $crate::HistoryScope<'_>,
            query: &$crate::HistoryQuery,
        ) -> Result<$crate::HistoryPage, $crate::StoreError> {
            reads::history(self, scope, query)
        }

        fn watermark(&self) -> Result<$crate::Watermark, $crate::StoreError> {
            watermark::watermark(self)
        }

        fn instant_of_seq(&self, seq: i64) -> Result<Option<String>, $crate::StoreError> {
            watermark::instant_of_seq(self, seq)
        }

        fn types_present(&self, as_of: i64) -> Result<Vec<String>, $crate::StoreError> {
            scans::types_present(self, as_of)
        }

        fn count_type(&self, resource_type: &str, as_of: i64) -> Result<u64, $crate::StoreError> {
            scans::count_type(self, resource_type, as_of)
        }

        fn seq_range(
            &self,
            resource_type: &str,
            as_of: i64,
        ) -> Result<Option<$crate::SeqStats>, $crate::StoreError> {
            scans::seq_range(self, resource_type, as_of)
        }

        fn scan_type_each(
            &self,
            resource_type: &str,
            as_of: i64,
            bounds: $crate::SeqBounds,
            f: &mut dyn FnMut($crate::ScanRow<'_>) -> std::ops::ControlFlow<()>,
        ) -> Result<u64, $crate::StoreError> {
            scans::scan_type_each(self, resource_type, as_of, bounds, f)
        }

        fn deleted_since(
            &self,
            resource_type: &str,
            since_seq: i64,
            as_of: i64,
            after_seq: i64,
            limit: usize,
        ) -> Result<Vec<$crate::Tombstone>, $crate::StoreError> {
            scans::deleted_since(self, resource_type, since_seq, as_of, after_seq, limit)
        }

        fn list_type(
            &self,
            resource_type: &str,
            filter: &$crate::ListFilter,
            count: usize,
            after_seq: Option<i64>,
        ) -> Result<$crate::ListPage, $crate::StoreError> {
            scans::list_type(self, resource_type, filter, count, after_seq)
        }

        fn count_list(
            &self,
            resource_type: &str,
            filter: &$crate::ListFilter,
        ) -> Result<u64, $crate::StoreError> {
            scans::count_list(self, resource_type, filter)
        }

        fn stored_bytes(&self) -> Result<u64, $crate::StoreError> {
            scans::stored_bytes(self)
        }

        fn suspend_index_upkeep(&self) -> Result<bool, $crate::StoreError> {
            index_upkeep::suspend_index_upkeep(self)
        }

        fn resume_index_upkeep(&self) -> Result<(), $crate::StoreError> {
            index_upkeep::resume_index_upkeep(self)
        }

        fn reindex(
            &self,
            resource_type: Option<&str>,
            progress: &mut dyn FnMut(&str, u64),
        ) -> Result<u64, $crate::StoreError> {
            index_upkeep::reindex(self, resource_type, progress)
        }
    };
}
pub(crate) use forward_to_backend_modules;

/// The storage trait. All methods are blocking; every implementation is `Send + Sync` and safe to
/// share as `Arc<dyn Store>`.
///
/// `as_of` arguments are seqs obtained from [`Store::watermark`] (or [`Store::current_seq`]); they
/// pin a consistent snapshot: rows written later are invisible.
pub trait Store: Send + Sync {
    /// Apply `ops` atomically: either every op is applied in one transaction, or none is and the
    /// first error is returned. Outcomes come in the order of `ops`. Several ops on the same resource
    /// within one call see each other (the second update creates version n+2).
    fn write(&self, ops: Vec<WriteOp>) -> Result<Vec<WriteOutcome>, StoreError>;

    /// Check, serialize and index `resource` for a later [`WriteOp::Put`] as `resource_type/id`,
    /// exactly as [`Store::write`] would for a [`WriteOp::Update`] without If-Match. Pure CPU
    /// work that takes no lock: call it from as many threads as there are cores.
    fn prepare_put(
        &self,
        resource_type: &str,
        id: &str,
        resource: serde_json::Value,
    ) -> Result<PreparedResource, StoreError>;

    /// The current version. [`StoreError::NotFound`] if the resource never existed,
    /// [`StoreError::Gone`] if its current version is a tombstone.
    fn read(&self, resource_type: &str, id: &str) -> Result<StoredResource, StoreError>;

    /// A specific version. [`StoreError::NotFound`] if there is no such version,
    /// [`StoreError::Gone`] if that version is a tombstone.
    fn vread(
        &self,
        resource_type: &str,
        id: &str,
        version: i64,
    ) -> Result<StoredResource, StoreError>;

    /// Instance, type or system history, newest first, keyset paged.
    fn history(
        &self,
        scope: HistoryScope<'_>,
        query: &HistoryQuery,
    ) -> Result<HistoryPage, StoreError>;

    /// The newest committed transaction (seq and instant).
    fn watermark(&self) -> Result<Watermark, StoreError>;

    /// Shorthand for `watermark()?.seq`.
    fn current_seq(&self) -> Result<i64, StoreError> {
        Ok(self.watermark()?.seq)
    }

    /// Now, in ms since the epoch, on the clock that stamps `lastUpdated`: what an instant a
    /// client passes (`_since`) is compared with, and an export's `transactionTime` when nothing
    /// was written yet. SQLite (one process): this process's clock. PostgreSQL: the database
    /// server's (`clock_timestamp()`), the one clock of every node sharing it.
    fn now_ms(&self) -> Result<i64, StoreError> {
        Ok(chrono::Utc::now().timestamp_millis())
    }

    /// The first seq whose `lastUpdated >= instant_ms`; `current_seq() + 1` if there is none. A
    /// `_since` instant becomes the seq bound `after = seq_at_or_after(since) - 1`.
    fn seq_at_or_after(&self, instant_ms: i64) -> Result<i64, StoreError>;

    /// The `lastUpdated` instant of the transaction containing `seq`, if any (e.g. to report an
    /// export's `transactionTime` for a pinned seq).
    fn instant_of_seq(&self, seq: i64) -> Result<Option<String>, StoreError>;

    /// Resource types with at least one resource current (not deleted) at `as_of`, sorted.
    fn types_present(&self, as_of: i64) -> Result<Vec<String>, StoreError>;

    /// Number of resources of a type current (not deleted) at `as_of`.
    fn count_type(&self, resource_type: &str, as_of: i64) -> Result<u64, StoreError>;

    /// Min/max seq and count of the resources of a type current at `as_of`; `None` if there are none.
    fn seq_range(&self, resource_type: &str, as_of: i64) -> Result<Option<SeqStats>, StoreError>;

    /// Keyset page of the resources of a type current at `as_of` with `seq > after_seq`, in seq
    /// order, at most `limit`. With `after_seq = s`, this is also "changed since seq s" (the `_since`
    /// scan of an export): a resource appears iff its version current at `as_of` is newer than `s`.
    fn scan_type(
        &self,
        resource_type: &str,
        as_of: i64,
        after_seq: i64,
        limit: usize,
    ) -> Result<Vec<StoredResource>, StoreError> {
        let mut out = Vec::with_capacity(limit.min(10_000));
        if limit == 0 {
            return Ok(out);
        }
        self.scan_type_each(
            resource_type,
            as_of,
            SeqBounds {
                after: after_seq,
                up_to: i64::MAX,
            },
            &mut |row| {
                out.push(StoredResource {
                    resource_type: resource_type.to_string(),
                    id: row.id.to_string(),
                    seq: row.seq,
                    version: row.version,
                    last_updated: row.last_updated.to_string(),
                    json: row.json.to_vec(),
                });
                if out.len() >= limit {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            },
        )?;
        Ok(out)
    }

    /// Streaming form of [`Store::scan_type`] for the export hot path: calls `f` for each resource of
    /// the type current at `as_of` with seq in `bounds`, in seq order, without allocating per row.
    /// `f` returns `ControlFlow::Break(())` to stop early. Returns the number of rows passed to `f`.
    /// Holds one reader connection for the whole scan; keep `f` fast or scan in bounded ranges.
    fn scan_type_each(
        &self,
        resource_type: &str,
        as_of: i64,
        bounds: SeqBounds,
        f: &mut dyn FnMut(ScanRow<'_>) -> ControlFlow<()>,
    ) -> Result<u64, StoreError>;

    /// Resources of a type whose version current at `as_of` is a tombstone written after
    /// `since_seq` (deleted since, and not re-created by `as_of`), keyset paged by seq
    /// (`after_seq`, `limit`), in seq order.
    fn deleted_since(
        &self,
        resource_type: &str,
        since_seq: i64,
        as_of: i64,
        after_seq: i64,
        limit: usize,
    ) -> Result<Vec<Tombstone>, StoreError>;

    /// The simple `GET /[type]` listing: current resources matching `filter`, in seq order,
    /// keyset paged (`after_seq` from [`ListPage::next_after_seq`]), at most `count`.
    fn list_type(
        &self,
        resource_type: &str,
        filter: &ListFilter,
        count: usize,
        after_seq: Option<i64>,
    ) -> Result<ListPage, StoreError>;

    /// Number of current resources matching `filter` (`_summary=count`, `Bundle.total`).
    fn count_list(&self, resource_type: &str, filter: &ListFilter) -> Result<u64, StoreError>;

    /// Rebuild the search index rows of the current resources of one type (or all types) with the
    /// store's [`Indexer`], calling `progress` after each type with (type, resources indexed);
    /// returns the number of resources indexed. Without an indexer, only removes index rows.
    ///
    /// Searches never see a reindex half-done: until it commits they read the old, complete
    /// index, after it the new one, and a reindex that stops half-way (killed, connection lost)
    /// leaves the old one as it was. One type: one transaction. All types (`None`, which also
    /// clears [`Store::indexes_stale`]): SQLite rebuilds every row in one transaction (the
    /// value indexes dropped first and built at the end, in it); PostgreSQL writes the rows into
    /// new tables beside the live ones, indexes them, catches up with the writes of other
    /// processes meanwhile, and swaps them in with one short transaction under the write lock.
    fn reindex(
        &self,
        resource_type: Option<&str>,
        progress: &mut dyn FnMut(&str, u64),
    ) -> Result<u64, StoreError>;

    /// About how many bytes of resources and indexes the store holds; a bulk loader compares its
    /// input with it (see [`Store::suspend_index_upkeep`]). Default: 0.
    fn stored_bytes(&self) -> Result<u64, StoreError> {
        Ok(0)
    }

    /// For a bulk load that brings at least as much data as the store holds: stop maintaining
    /// the secondary search structures that are cheaper to rebuild once, sorted, than to update
    /// row by row at random places (in SQLite, the value indexes of the index tables: random
    /// B-tree inserts that become disk-bound once the indexes outgrow the page cache). Index rows
    /// are still written with every resource; only their ordering for lookups waits.
    /// Returns whether upkeep was suspended. [`Store::resume_index_upkeep`] must follow, also
    /// when the load fails; a store that was left suspended (a crash) rebuilds on the next open.
    /// Searches run slowly (or not at all) while upkeep is suspended: call this only with the
    /// data directory held exclusively. Default: nothing suspended.
    fn suspend_index_upkeep(&self) -> Result<bool, StoreError> {
        Ok(false)
    }

    /// Rebuild what [`Store::suspend_index_upkeep`] suspended (nothing when it was not).
    fn resume_index_upkeep(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// One page of a search ([`plan`]): the matches in order, the included resources, the total
    /// when asked, and the cursor of the next page. `stop` is asked while statements run; once it
    /// answers true the search fails with [`StoreError::Cancelled`]. A search beyond what the
    /// database takes in one statement fails with [`StoreError::QueryTooLarge`].
    fn search(
        &self,
        plan: &plan::SearchPlan,
        stop: Option<&plan::StopCheck>,
    ) -> Result<plan::SearchRows, StoreError>;

    /// Locks the conditions `keys` (in any order, repeats allowed) of conditional interactions
    /// until the guard is dropped: hold it from before the conditions' searches until the write
    /// they decided has committed, and a request with the same condition (of this process or,
    /// on PostgreSQL, of any node on the database) waits for it. Keys are taken in one order
    /// (sorted), so two requests locking several never wait for each other. Waits at most
    /// `wait` in all, then [`StoreError::ConditionLocked`] (nothing held). The guard releases
    /// on drop, also on an error or a panic; on PostgreSQL a release that fails closes the
    /// session, which releases it too ([`conditions`]).
    fn lock_conditions(
        &self,
        keys: &[ConditionKey],
        wait: Duration,
    ) -> Result<ConditionGuard<'_>, StoreError>;

    /// Records whether the search indexes miss resources (a `load --no-index`), until a full
    /// reindex clears it. Default: nothing recorded (a store that always indexes).
    fn set_indexes_stale(&self, _stale: bool) -> Result<(), StoreError> {
        Ok(())
    }

    /// Whether resources were loaded without search indexes since the last full reindex.
    fn indexes_stale(&self) -> Result<bool, StoreError> {
        Ok(false)
    }

    /// The use of this store's database connection pools (metrics): one entry per pool.
    /// Default: none (SQLite has one writer connection and readers per thread, no pool to wait
    /// on).
    fn pool_stats(&self) -> Vec<PoolStats> {
        Vec::new()
    }

    /// Housekeeping the export sweeper runs periodically (SQLite: truncate the write-ahead log
    /// when no reader needs it). Returns whether there was something done. Default: nothing.
    fn checkpoint(&self) -> Result<bool, StoreError> {
        Ok(false)
    }

    /// The export job queue of this store, in the same database ([`jobs`]; SQLite keeps it in a
    /// file of its own, see [`sqlite::SqliteJobQueue`]). Every call returns the same queue.
    fn jobs(&self) -> Result<std::sync::Arc<dyn JobQueue>, QueueError>;

    /// State shared by every server process using this database ([`shared`]: the token signing
    /// key, the assertion replay cache). `None` (the default) when only one process can use the
    /// database (SQLite, behind the data-directory lock).
    fn shared_state(&self) -> Option<std::sync::Arc<dyn SharedState>> {
        None
    }

    /// Where accepted client assertions are recorded so that a restart does not forget them
    /// ([`AssertionRecord`]): the shared state's on a shared database, `exports.db` on SQLite.
    /// `None` (the default): the process keeps them in memory.
    fn assertion_record(&self) -> Option<std::sync::Arc<dyn AssertionRecord>> {
        self.shared_state()
            .map(|s| s as std::sync::Arc<dyn AssertionRecord>)
    }
}

/// Run `work` with `store`'s index upkeep suspended when `suspend` is true and the store can
/// ([`Store::suspend_index_upkeep`]; `work` is told whether it was), then rebuild — also when
/// `work` fails, so that what it wrote stays searchable. The first error wins. Returns `work`'s
/// value and, when upkeep was suspended, how long the rebuild took.
pub fn with_index_upkeep_suspended<T, E: From<StoreError>>(
    store: &dyn Store,
    suspend: bool,
    work: impl FnOnce(bool) -> Result<T, E>,
) -> Result<(T, Option<Duration>), E> {
    let suspended = suspend && store.suspend_index_upkeep()?;
    let done = work(suspended);
    if !suspended {
        return done.map(|value| (value, None));
    }
    let started = Instant::now();
    let built = store.resume_index_upkeep();
    let value = done?;
    built?;
    Ok((value, Some(started.elapsed())))
}
