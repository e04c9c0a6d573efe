//! What the status page (`GET /exports`) and the metrics endpoint (`GET /metrics`) read of the
//! export service: a summary of recent jobs, job counts by state, and this process's counters.

use std::error::Error as _;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use super::{ExportError, ExportService, lock, now_ms};
use crate::access::ExportAccess;
use crate::jobs::{FileKind, FileRecord, JobRecord, JobState};

static RESOURCES: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);
static FILES: AtomicU64 = AtomicU64::new(0);
static RETRIES: AtomicU64 = AtomicU64::new(0);
static ITEMS_DONE: AtomicU64 = AtomicU64::new(0);
static ITEMS_FAILED: AtomicU64 = AtomicU64::new(0);

/// The export work of this process since it started (every service in it together).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Resources in files of work items finished here.
    pub resources: u64,
    /// Bytes of those files.
    pub bytes: u64,
    pub files: u64,
    /// Items that failed transiently and were given back for another attempt.
    pub retries: u64,
    pub items_done: u64,
    /// Items whose failure failed their export.
    pub items_failed: u64,
}

pub fn stats() -> Stats {
    Stats {
        resources: RESOURCES.load(Ordering::Relaxed),
        bytes: BYTES.load(Ordering::Relaxed),
        files: FILES.load(Ordering::Relaxed),
        retries: RETRIES.load(Ordering::Relaxed),
        items_done: ITEMS_DONE.load(Ordering::Relaxed),
        items_failed: ITEMS_FAILED.load(Ordering::Relaxed),
    }
}

/// A work item finished: counts the files it committed.
pub(super) fn item_done(files: &[FileRecord]) {
    ITEMS_DONE.fetch_add(1, Ordering::Relaxed);
    for f in files {
        FILES.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(f.bytes, Ordering::Relaxed);
        if f.kind == FileKind::Output {
            RESOURCES.fetch_add(f.count, Ordering::Relaxed);
        }
    }
}

/// A work item failed: given back for another attempt (`retried`), or its export failed.
pub(super) fn item_failed(retried: bool) {
    if retried {
        RETRIES.fetch_add(1, Ordering::Relaxed);
    } else {
        ITEMS_FAILED.fetch_add(1, Ordering::Relaxed);
    }
}

/// One file of an export as the status page lists it.
#[derive(Debug, Clone, Serialize)]
pub struct FileSummary {
    pub name: String,
    /// `output`, `deleted` or `error`.
    pub kind: &'static str,
    #[serde(rename = "type")]
    pub resource_type: String,
    pub count: u64,
    pub bytes: u64,
    /// The download URL (served once the export is complete).
    pub url: String,
}

/// One export job as the status page shows it.
#[derive(Debug, Clone, Serialize)]
pub struct JobSummary {
    pub id: String,
    /// `export` or `import` (`$import` jobs run on the same queue).
    pub kind: &'static str,
    pub state: &'static str,
    /// `system`, `patient` or `group` (an import: `system`).
    pub level: String,
    pub group: Option<String>,
    /// The kick-off parameters, as given.
    pub parameters: Vec<(String, String)>,
    pub container: String,
    pub created_ms: i64,
    pub finished_ms: Option<i64>,
    pub transaction_time: String,
    /// The status endpoint's progress text.
    pub progress: String,
    /// Share of the expected resources scanned, 0 to 100 (100 when complete).
    pub percent: f64,
    /// Resources in the files committed so far.
    pub resources: u64,
    pub bytes: u64,
    /// Resources written per second, from kick-off to the end (or to now).
    pub resources_per_second: f64,
    /// Why the export failed (failed jobs).
    pub error: Option<String>,
    /// Resources that could not be exported (entries of the `error` files).
    pub error_entries: u64,
    /// The status URL; answers with the manifest once complete.
    pub status_url: String,
    pub files: Vec<FileSummary>,
}

/// Jobs the status page lists at most.
pub const RECENT_JOBS: u64 = 50;

/// Parameters shown per job in the overview (the status page refreshes it every second).
const SHOWN_PARAMETERS: usize = 20;
/// Characters shown of one parameter's value.
const SHOWN_VALUE_CHARS: usize = 200;

/// A job's parameters as the overview shows them: the first [`SHOWN_PARAMETERS`], each value
/// cut at [`SHOWN_VALUE_CHARS`] characters, and a count of the rest. A kick-off may carry a
/// million `patient` references (68 MB): listed whole, each refresh of the status page sent
/// them all (46 MB a second for one open tab).
fn shortened(parameters: Vec<(String, String)>) -> Vec<(String, String)> {
    let total = parameters.len();
    let mut shown: Vec<(String, String)> = parameters
        .into_iter()
        .take(SHOWN_PARAMETERS)
        .map(|(k, v)| {
            let v = match v.char_indices().nth(SHOWN_VALUE_CHARS) {
                Some((at, _)) => format!("{}…", &v[..at]),
                None => v,
            };
            (k, v)
        })
        .collect();
    if total > SHOWN_PARAMETERS {
        shown.push((
            "…".to_string(),
            format!("{} more parameters", total - SHOWN_PARAMETERS),
        ));
    }
    shown
}

impl ExportService {
    /// Jobs by state and kind (`export` or `import`), over the whole job queue.
    pub fn job_counts(&self) -> Result<Vec<(&'static str, &'static str, u64)>, ExportError> {
        Ok(self
            .queue
            .count_by_state()?
            .into_iter()
            .map(|(s, import, n)| (if import { "import" } else { "export" }, s.as_str(), n))
            .collect())
    }

    /// The most recent jobs `access` may see (a client its own; everything without
    /// authorization), newest first.
    pub fn overview(
        &self,
        access: &dyn ExportAccess,
        limit: u64,
    ) -> Result<Vec<JobSummary>, ExportError> {
        let jobs = self.queue.recent(limit, access.client_id())?;
        let mut out = Vec::with_capacity(jobs.len());
        for job in &jobs {
            match self.summary(job) {
                Ok(s) => out.push(s),
                // A row this version cannot read is left out of the list (its own status URL
                // answers 500 naming it): one bad row never hides the others.
                Err(ExportError::Record(e)) => {
                    let cause = e.source().map(ToString::to_string);
                    tracing::error!(
                        job = %job.id,
                        column = %e.column(),
                        error = %e,
                        cause,
                        "a job record this version cannot read is left out of the overview"
                    );
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    fn summary(&self, job: &JobRecord) -> Result<JobSummary, ExportError> {
        let request = crate::record::JobRequest::decode(job)?;
        let parameters: Vec<(String, String)> = match &request {
            // An import's parameters: its mode and each input as `type url`.
            crate::record::JobRequest::Import(req) => {
                std::iter::once(("mode".to_string(), req.mode.as_str().to_string()))
                    .chain(req.inputs.iter().map(|i| {
                        (
                            "input".to_string(),
                            format!("{} {}", i.resource_type, i.url),
                        )
                    }))
                    .collect()
            }
            crate::record::JobRequest::Export(r) => r.params.clone(),
        };
        let parameters = shortened(parameters);
        let (level, group) = match &request {
            crate::record::JobRequest::Export(r) => (r.level_name(), r.group().map(str::to_string)),
            crate::record::JobRequest::Import(_) => ("system", None),
        };
        let (kind, paths) = match request {
            crate::record::JobRequest::Import(_) => ("import", ("import-status", "import-files")),
            crate::record::JobRequest::Export(_) => ("export", ("export-status", "export-files")),
        };
        let files: Vec<FileRecord> = self
            .queue
            .files(&job.id)?
            .into_iter()
            .filter(|f| f.pending_rename.is_none())
            .collect();
        // An import writes no output files: its resources are those its inputs loaded.
        let resources = if kind == "import" {
            self.queue
                .item_progress(&job.id)?
                .iter()
                .filter(|i| i.kind != store::jobs::ItemKind::Finalize)
                .map(|i| i.scanned)
                .sum()
        } else {
            files
                .iter()
                .filter(|f| f.kind == FileKind::Output)
                .map(|f| f.count)
                .sum()
        };
        let error_entries = files
            .iter()
            .filter(|f| f.kind == FileKind::Error)
            .map(|f| f.count)
            .sum();
        let bytes = files.iter().map(|f| f.bytes).sum();
        let active = job.state.is_active();
        let (progress, percent) = if active {
            let mut types = self.queue.progress(&job.id)?;
            for ((j, _), (t, n)) in lock(&self.live).iter() {
                if j == &job.id
                    && let Some(tp) = types.iter_mut().find(|tp| &tp.resource_type == t)
                {
                    tp.scanned = tp.scanned.max(*n);
                }
            }
            let expected: u64 = types.iter().map(|t| t.expected).sum();
            let scanned: u64 = types
                .iter()
                .map(|t| {
                    if t.done {
                        t.expected
                    } else {
                        t.scanned.min(t.expected)
                    }
                })
                .sum();
            let percent = if expected == 0 {
                0.0
            } else {
                (scanned as f64 * 100.0 / expected as f64).min(99.9)
            };
            (self.progress_text(&job.id)?, percent)
        } else {
            let percent = if job.state == JobState::Complete {
                100.0
            } else {
                0.0
            };
            (job.state.as_str().to_string(), percent)
        };
        let end = job.finished_ms.unwrap_or_else(now_ms);
        let seconds = (end.saturating_sub(job.created_ms) as f64 / 1000.0).max(0.001);
        let url = |name: &str| format!("{}/{}/{}/{}", self.config.base_url, paths.1, job.id, name);
        Ok(JobSummary {
            id: job.id.clone(),
            kind,
            state: job.state.as_str(),
            level: level.to_string(),
            group,
            parameters,
            container: job.container.clone(),
            created_ms: job.created_ms,
            finished_ms: job.finished_ms,
            transaction_time: job.transaction_time.clone(),
            progress,
            percent,
            resources,
            bytes,
            resources_per_second: resources as f64 / seconds,
            error: (job.state == JobState::Failed).then(|| job.result.clone().unwrap_or_default()),
            error_entries,
            status_url: format!("{}/{}/{}", self.config.base_url, paths.0, job.id),
            files: files
                .iter()
                .map(|f| FileSummary {
                    name: f.name.clone(),
                    kind: f.kind.as_str(),
                    resource_type: f.resource_type.clone(),
                    count: f.count,
                    bytes: f.bytes,
                    url: url(&f.name),
                })
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_overview_shows_a_bounded_part_of_many_or_long_parameters() {
        let many: Vec<(String, String)> = (0..1000)
            .map(|i| ("patient".to_string(), format!("Patient/p{i}")))
            .collect();
        let shown = shortened(many);
        assert_eq!(shown.len(), SHOWN_PARAMETERS + 1);
        assert_eq!(shown[SHOWN_PARAMETERS].1, "980 more parameters");
        let long = shortened(vec![("_typeFilter".into(), "é".repeat(5000))]);
        assert_eq!(long.len(), 1);
        assert_eq!(long[0].1.chars().count(), SHOWN_VALUE_CHARS + 1);
        let few = vec![("_type".to_string(), "Patient".to_string())];
        assert_eq!(shortened(few.clone()), few);
    }
}
