//! [`ExportConfig`]: the export settings the server builds from its configuration, and the
//! OCI image fetcher it supplies ([`ImageConfigFetcher`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::anonymization::{AnonymizationError, AnonymizationInfo};
use crate::run::RunSettings;
use crate::sink::Sink;

/// Fetches an anonymizer configuration out of an OCI image (`_anonymizationConfigCollectionReference`):
/// `(image reference, file name)` → the configuration. Supplied by the server, which owns the
/// registry client and its allow-list.
pub type ImageConfigFetcher =
    dyn Fn(&str, &str) -> Result<AnonymizationInfo, AnonymizationError> + Send + Sync;

/// Export settings from the server configuration.
#[derive(Clone)]
pub struct ExportConfig {
    /// Where export folders are written (a local folder by default).
    pub sink: Arc<dyn Sink>,
    /// Container used without `_container`.
    pub default_container: String,
    /// The container `$import` inputs must be in (`--import-container`); exports may not write
    /// into it. Any other object of the storage — another client's export output above all —
    /// is refused as an input.
    pub import_container: String,
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
    /// Exports (and imports) queued or running at once of one SMART client; more of that
    /// client get 429, so that one client cannot hold every slot of `max_concurrent`. Jobs
    /// without a client (`--auth none`) are held to `max_concurrent` only.
    pub max_per_client: u64,
    /// A running work item without a heartbeat for this long is taken over.
    pub heartbeat_timeout: Duration,
    /// How long an idle worker waits before it looks at the job queue again without being
    /// woken: this process's own kick-offs and releases wake it, and on PostgreSQL other nodes'
    /// too ([`store::JobQueue::watch_work`]); the poll catches whatever a wake-up missed.
    pub poll: Duration,
    /// Claims per work item before the export fails.
    pub max_attempts: i64,
    /// Back-off after a transient failure: doubles per attempt from this, up to
    /// `retry_backoff_max`.
    pub retry_backoff: Duration,
    pub retry_backoff_max: Duration,
    /// How long an item may wait for space at a full destination (`--export-full-wait`): an
    /// item that meets one is given back without spending an attempt and tried again after
    /// `space_wait_min`, then after the time it has waited so far (at most `space_wait_max`);
    /// when it has waited this long, its export fails with 507 and its files are removed.
    pub full_wait: Duration,
    pub space_wait_min: Duration,
    pub space_wait_max: Duration,
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
    /// What the `_typeFilter` queries of one kick-off may ask for, per type (the server's
    /// search bounds, `--search-max-*`): beyond it the kick-off is refused (400).
    pub type_filter_limits: search::SearchLimits,
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
            .field("max_per_client", &self.max_per_client)
            .field("heartbeat_timeout", &self.heartbeat_timeout)
            .field("poll", &self.poll)
            .field("max_attempts", &self.max_attempts)
            .field("full_wait", &self.full_wait)
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
}

impl ExportConfig {
    /// How an item waits for space at a full destination ([`store::JobQueue::wait_for_space`]).
    pub fn space_wait(&self) -> store::jobs::SpaceWait {
        let ms = |d: Duration| d.as_millis().min(i64::MAX as u128) as i64;
        store::jobs::SpaceWait {
            min_ms: ms(self.space_wait_min),
            max_ms: ms(self.space_wait_max),
            limit_ms: ms(self.full_wait),
        }
    }

    /// Defaults for a local folder destination at `storage_root`, which must exist when the
    /// service writes (nothing creates it later: [`crate::LocalSink::create_root`] at start).
    pub fn local(storage_root: PathBuf, base_url: String) -> ExportConfig {
        ExportConfig {
            sink: Arc::new(crate::sink::LocalSink::new(storage_root)),
            default_container: crate::defaults::CONTAINER.into(),
            import_container: crate::defaults::IMPORT_CONTAINER.into(),
            run: RunSettings::default(),
            workers: std::thread::available_parallelism().map_or(2, |n| n.get().max(2)),
            exclusive_queue: true,
            node_id: None,
            max_concurrent: crate::defaults::MAX_CONCURRENT,
            max_per_client: crate::defaults::max_per_client(crate::defaults::MAX_CONCURRENT),
            heartbeat_timeout: Duration::from_secs(crate::defaults::HEARTBEAT_TIMEOUT_SECS),
            poll: Duration::from_secs(crate::defaults::POLL_SECS),
            max_attempts: crate::defaults::MAX_ATTEMPTS,
            retry_backoff: Duration::from_secs(2),
            retry_backoff_max: Duration::from_secs(60),
            full_wait: Duration::from_secs(crate::defaults::FULL_WAIT_SECS),
            space_wait_min: Duration::from_secs(crate::defaults::SPACE_WAIT_MIN_SECS),
            space_wait_max: Duration::from_secs(crate::defaults::SPACE_WAIT_MAX_SECS),
            retention: Duration::from_secs(crate::defaults::RETENTION_SECS),
            sweep_every: Duration::from_secs(60),
            base_url,
            requires_access_token: false,
            image_configs: None,
            gzip: false,
            type_filter_limits: search::SearchLimits::default(),
        }
    }
}
