//! What a caller sees of a job: its status (progress text, the manifest or its pages with
//! `allowPartialManifests`, the failure), its files, its cancel — each for the job's own client
//! only, with the scopes its request needs.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde_json::{Value, json};
use store::format::thousands;

use super::{ExportError, ExportService, lock, now_ms};
use crate::access::{self, ExportAccess, JobKind};
use crate::jobs::{FileKind, ItemKind, JobRecord, JobState};
use crate::record::{self, JobRequest, RecordError};
use crate::request::{ExportRequest, RequestError};
use crate::sink::{FileBody, SinkError};

/// What the status endpoint answers: the job's state, and whether the kick-off asked for
/// `Prefer: separate-export-status` (then the state travels in `X-Export-Status`).
#[derive(Debug, Clone)]
pub struct StatusView {
    pub status: Status,
    pub separate_status: bool,
}

/// The state of a job as the status endpoint reports it.
#[derive(Debug, Clone)]
pub enum Status {
    /// `partial`: with `allowPartialManifests`, the manifest page of the files written so far.
    InProgress {
        progress: String,
        partial: Option<PartialPage>,
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

/// A manifest page of a running `allowPartialManifests` export. A page only grows: files are
/// added at its end (a listed file never changes), and once its work item and the items before
/// the next page's are done it gains `link` `next` and never changes again.
#[derive(Debug, Clone)]
pub struct PartialPage {
    /// The page as the status endpoint sends it.
    pub manifest: Value,
    /// The page's number (the `page` of its URL).
    pub page: i64,
    /// Files listed (every section).
    pub files: usize,
    /// Their bytes.
    pub bytes: u64,
    /// The next page's number, once the page is final.
    pub next: Option<i64>,
}

impl PartialPage {
    /// Whether the page links the next one: it never changes again.
    pub fn is_final(&self) -> bool {
        self.next.is_some()
    }

    /// A weak validator of the page as it is now, without reading its JSON: its number, what
    /// it lists and its `next` (everything that changes on a page that only grows).
    pub fn etag(&self) -> String {
        let next = self.next.map(|n| format!("-{n}")).unwrap_or_default();
        format!("W/\"p{}-{}-{}{next}\"", self.page, self.files, self.bytes)
    }
}

/// A job's recorded request as status polls, downloads and cancels use it: decoded and parsed
/// once per job in this process ([`ExportService::recorded`]) rather than at every poll. An
/// export's `patient` list is dropped (those paths never read it: up to
/// `--export-group-max-members` ids, and a poll parsed them all, twice for a restricted
/// caller). A job's request never changes once recorded, so the parsed form stays true.
#[derive(Debug, Clone)]
pub(super) enum Recorded {
    Export(Arc<ExportRequest>),
    /// An import: the types it writes (what authorizes its caller).
    Import(Arc<Vec<String>>),
}

/// Parsed requests kept at once (a few KiB each without their patients): beyond it the kept
/// ones are dropped and parsed again when next polled.
pub(super) const MAX_RECORDED: usize = 1024;

impl ExportService {
    /// The request recorded on `job`, parsed once (see [`Recorded`]).
    pub(super) fn recorded(&self, job: &JobRecord) -> Result<Recorded, RecordError> {
        if let Some(r) = lock(&self.recorded).get(&job.id) {
            return Ok(r.clone());
        }
        let r = match JobRequest::decode(job)? {
            JobRequest::Import(req) => Recorded::Import(Arc::new(req.types())),
            JobRequest::Export(rec) => {
                let mut req = rec.request(&job.id)?;
                req.patients = Vec::new();
                Recorded::Export(Arc::new(req))
            }
        };
        let mut kept = lock(&self.recorded);
        if kept.len() >= MAX_RECORDED {
            kept.clear();
        }
        kept.insert(job.id.clone(), r.clone());
        Ok(r)
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
        let (req, separate_status) = match self.recorded(&job) {
            Ok(Recorded::Export(req)) => {
                let separate = req.separate_status;
                (Some(req), separate)
            }
            Ok(Recorded::Import(_)) => (None, false),
            // Recorded parameters that no longer parse failed the job (400) when it ran: its
            // status is that failure.
            Err(RecordError::Request { .. }) if job.state == JobState::Failed => {
                let separate =
                    matches!(JobRequest::decode(&job)?, JobRequest::Export(r) if r.separate());
                (None, separate)
            }
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
                        Some(r) if r.allow_partial => self.manifest_page(&job, r, page)?.manifest,
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
        self.changed.notify_waiters();
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
            && matches!(self.recorded(&job)?, Recorded::Export(r) if r.allow_partial);
        if job.state != JobState::Complete && !listed_early {
            return Err(ExportError::UnknownFile(name.to_string()));
        }
        let Some(recorded) = self
            .queue
            .files(id)?
            .into_iter()
            .find(|f| f.name == name && f.pending_rename.is_none())
        else {
            return Err(ExportError::UnknownFile(name.to_string()));
        };
        // A listed file that is gone, or is no longer an object (a link planted in its place),
        // is not served.
        self.config
            .sink
            .body(&job.container, &format!("{}/{name}", job.folder))
            .map_err(|e| match e {
                SinkError::NotFound(_) => ExportError::UnknownFile(name.to_string()),
                SinkError::Refused(why) => {
                    tracing::warn!(job = %id, reason = %why, "export file is not an object");
                    ExportError::UnknownFile(name.to_string())
                }
                // The folder could not be looked at (as an open that failed before: 500).
                other => ExportError::Destination(other.to_string()),
            })
            .map(|body| match body {
                // The download compares it with the stored object's size: a file replaced in
                // the store after the manifest is not served as the export's.
                FileBody::Remote {
                    container, path, ..
                } => FileBody::Remote {
                    container,
                    path,
                    size: Some(recorded.bytes),
                },
                local => local,
            })
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
        let kind = if record::is_import(&job) {
            JobKind::Import
        } else {
            JobKind::Export
        };
        if access.job_kind().is_some_and(|k| k != kind) {
            return Err(ExportError::UnknownJob(id.to_string()));
        }
        if !access.is_unrestricted() {
            match self.recorded(&job)? {
                Recorded::Import(types) => {
                    access::authorize_import(&types, access).map_err(ExportError::Forbidden)?;
                }
                Recorded::Export(req) => {
                    access::authorize(&req, access).map_err(ExportError::Forbidden)?;
                }
            }
        }
        Ok(job)
    }

    /// Progress text such as `Observation 1,200,000 of 3,000,000 (2 of 17 types done)`, after
    /// `waiting for space at the destination (full for 2 min 5 s; fails after 15 min): `
    /// while an item of the job waits for space at its full destination (every node sees it:
    /// the wait is recorded with the item).
    pub(super) fn progress_text(&self, job_id: &str) -> Result<String, ExportError> {
        let text = match self.queue.get(job_id)? {
            Some(job) if record::is_import(&job) => self.import_progress_text(job_id)?,
            _ => self.export_progress_text(job_id)?,
        };
        Ok(match self.queue.space_wait(job_id, now_ms())? {
            Some(waited_ms) => format!(
                "waiting for space at the destination (full for {}; fails after {}): {text}",
                spoken(waited_ms.max(0) as u64 / 1000),
                spoken(self.config.full_wait.as_secs())
            ),
            None => text,
        })
    }

    /// [`ExportService::progress_text`] of an export, without its wait for space.
    fn export_progress_text(&self, job_id: &str) -> Result<String, ExportError> {
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
    pub(super) fn manifest_of(
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
    ) -> Result<PartialPage, ExportError> {
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
        Ok(PartialPage {
            manifest: m,
            page: no,
            files: mine.len(),
            bytes: mine.iter().map(|f| f.bytes).sum(),
            next,
        })
    }
}

/// A duration of `secs` seconds as people say it: `45 s`, `2 min 5 s`, `15 min`, `1 h 3 min`.
fn spoken(secs: u64) -> String {
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    match (h, m, s) {
        (0, 0, s) => format!("{s} s"),
        (0, m, 0) => format!("{m} min"),
        (0, m, s) => format!("{m} min {s} s"),
        (h, 0, _) => format!("{h} h"),
        (h, m, _) => format!("{h} h {m} min"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_spoken() {
        assert_eq!(spoken(0), "0 s");
        assert_eq!(spoken(45), "45 s");
        assert_eq!(spoken(125), "2 min 5 s");
        assert_eq!(spoken(900), "15 min");
        assert_eq!(spoken(3600), "1 h");
        assert_eq!(spoken(3790), "1 h 3 min");
    }

    #[test]
    fn progress_numbers_have_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(3_000_000), "3,000,000");
    }

    #[test]
    fn a_partial_page_tag_changes_with_everything_that_changes_on_a_page() {
        let page = |page, files, bytes, next| PartialPage {
            manifest: json!({}),
            page,
            files,
            bytes,
            next,
        };
        let empty = page(1, 0, 0, None);
        assert!(!empty.is_final());
        assert_eq!(empty.etag(), "W/\"p1-0-0\"");
        let tags: std::collections::HashSet<String> = [
            empty,
            page(2, 0, 0, None),
            page(1, 1, 10, None),
            page(1, 1, 12, None),
            page(1, 1, 12, Some(3)),
        ]
        .iter()
        .map(PartialPage::etag)
        .collect();
        assert_eq!(tags.len(), 5);
        assert!(page(1, 1, 12, Some(3)).is_final());
    }
}
