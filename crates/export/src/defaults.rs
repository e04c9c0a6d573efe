//! The export settings' default values, written once: [`crate::RunSettings::default`],
//! [`crate::ExportConfig::local`] and the `fhirhose serve` flags (`server::config`, whose help
//! shows them) all read these.

/// Resources per NDJSON file before it is rolled to the next number.
pub const FILE_MAX_RESOURCES: u64 = 5000;
/// Megabytes per NDJSON file before it is rolled (whichever limit comes first).
pub const FILE_MAX_MB: u64 = 64;
/// Resources per work item when an export is planned.
pub const ITEM_RESOURCES: u64 = 250_000;
/// Deepest Group nesting a Group-level export follows.
pub const GROUP_MAX_DEPTH: usize = 100;
/// Most member entries (over all nested Groups) a Group-level export resolves.
pub const GROUP_MAX_MEMBERS: usize = 1_000_000;
/// Exports queued or running at once.
pub const MAX_CONCURRENT: u64 = 4;

/// Exports queued or running at once of one client, by default: half of `max_concurrent`, at
/// least one, so that one client never holds every slot while another is refused.
pub const fn max_per_client(max_concurrent: u64) -> u64 {
    if max_concurrent < 2 {
        1
    } else {
        max_concurrent / 2
    }
}
/// Seconds without a heartbeat after which a running work item is taken over.
pub const HEARTBEAT_TIMEOUT_SECS: u64 = 600;
/// Seconds an idle export worker waits before it looks at the job queue again unwoken (work of
/// other nodes is announced at once on PostgreSQL; this poll is the fallback).
pub const POLL_SECS: u64 = 2;
/// Claims per work item before the export fails.
pub const MAX_ATTEMPTS: i64 = 5;
/// Seconds an export waits for space at a full local destination before it fails (507).
pub const FULL_WAIT_SECS: u64 = 15 * 60;
/// Seconds of the first wait for space; each next wait is the time waited so far, at most
/// [`SPACE_WAIT_MAX_SECS`] (so 5 s, 5 s, 10 s, 20 s, 40 s, 60 s, 60 s, …).
pub const SPACE_WAIT_MIN_SECS: u64 = 5;
/// Longest wait between two tries of a full destination.
pub const SPACE_WAIT_MAX_SECS: u64 = 60;
/// Seconds a complete export's files are kept.
pub const RETENTION_SECS: u64 = 24 * 3600;
/// Container used when a kick-off has no `_container`.
pub const CONTAINER: &str = "exports";
/// The one container `$import` reads its inputs from (and exports may not write into).
pub const IMPORT_CONTAINER: &str = "imports";
