//! Running export work items: planning an export into items at kick-off, and executing one
//! claimed item — a scan of the pinned snapshot filtered by level, `_typeFilter` and `_since`,
//! optionally subsetted and de-identified, written as NDJSON parts committed per file.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use store::{IndexValue, SeqBounds, Store};

use crate::anonymization::Anonymizer;
use crate::jobs::{
    FileKind, FileRecord, ItemKind, ItemPlan, JobQueue, JobRecord, Lease, NewFile, WorkItem,
};
use crate::request::{Associated, ExportLevel, ExportRequest};
use crate::sink::{PartWriter, Sink, SinkError};

pub use crate::error::RunError;

/// How files are cut and how often a worker reports.
#[derive(Debug, Clone)]
pub struct RunSettings {
    /// Resources per NDJSON file.
    pub file_max_resources: u64,
    /// Bytes per NDJSON file (a file is closed after the resource that passes it).
    pub file_max_bytes: u64,
    /// Resources per work item when an export is planned.
    pub item_resources: u64,
    /// How often a running item refreshes its lease.
    pub heartbeat_every: Duration,
    /// Deepest Group nesting followed for a Group-level export (the Group itself is depth 0).
    pub group_max_depth: usize,
    /// Most member entries (patients and nested Groups, over all levels) a Group-level export
    /// resolves.
    pub group_max_members: usize,
}

impl Default for RunSettings {
    fn default() -> Self {
        RunSettings {
            file_max_resources: crate::defaults::FILE_MAX_RESOURCES,
            file_max_bytes: crate::defaults::FILE_MAX_MB * 1024 * 1024,
            item_resources: crate::defaults::ITEM_RESOURCES,
            heartbeat_every: Duration::from_secs(10),
            group_max_depth: crate::defaults::GROUP_MAX_DEPTH,
            group_max_members: crate::defaults::GROUP_MAX_MEMBERS,
        }
    }
}

/// Everything an item of one job needs, prepared once per job and process: the request, the
/// compiled `_typeFilter` predicates, the patients in scope, the compiled de-identification.
pub struct Prepared {
    pub job: JobRecord,
    pub req: ExportRequest,
    filters: search::PredicateSet,
    scope: Option<HashSet<String>>,
    by_patient: bool,
    /// `_since` as a sequence number (resources with a newer current version are exported).
    since_after: i64,
    pub anonymizer: Option<Anonymizer>,
}

impl Prepared {
    pub fn new(
        store: &dyn Store,
        job: JobRecord,
        req: ExportRequest,
        anonymizer: Option<Anonymizer>,
        settings: &RunSettings,
    ) -> Result<Prepared, RunError> {
        let filters = req.filters.clone();
        // Membership as of the export's transactionTime, whenever (and on whichever node, after
        // however many restarts) this runs: the export is a snapshot at that time.
        let at = Snapshot {
            seq: job.watermark,
            at_ms: store::parse_instant_ms(&job.transaction_time)
                .unwrap_or_else(|| chrono::Utc::now().timestamp_millis()),
        };
        let scope = patient_scope(store, &req, settings, at)?;
        let by_patient = !matches!(req.level, ExportLevel::System) || !req.patients.is_empty();
        let since_after = since_seq(store, &req)?;
        Ok(Prepared {
            job,
            req,
            filters,
            scope,
            by_patient,
            since_after,
            anonymizer,
        })
    }
}

fn since_seq(store: &dyn Store, req: &ExportRequest) -> Result<i64, store::StoreError> {
    Ok(match req.since_ms {
        // "Changed after the supplied time" (Bulk Data IG): lastUpdated > _since. Instants are
        // strictly increasing between transactions, so the next millisecond is the bound.
        Some(ms) => (store.seq_at_or_after(ms.saturating_add(1))? - 1).max(0),
        None => 0,
    })
}

/// Splits an export into work items: per type, sequence ranges of about
/// `item_resources` resources each; a Provenance item for `includeAssociatedData`; a final item.
pub fn plan(
    store: &dyn Store,
    req: &ExportRequest,
    watermark: i64,
    item_resources: u64,
) -> Result<Vec<ItemPlan>, RunError> {
    let since_after = since_seq(store, req)?;
    let present = store.types_present(watermark)?;
    let types = req.effective_types(&present);
    let mut items = Vec::new();
    if req.organize_by_patient {
        // Items are ranges of Patients (all of them: with `_since`, an unchanged patient's
        // changed resources still form its block).
        plan_ranges(
            store,
            "Patient",
            watermark,
            0,
            ORGANIZE_ITEM_PATIENTS,
            &mut items,
        )?;
        items.push(ItemPlan {
            kind: ItemKind::Finalize,
            resource_type: String::new(),
            seq_after: 0,
            seq_up_to: 0,
            expected: 0,
        });
        return Ok(items);
    }
    for t in &types {
        let Some(stats) = store.seq_range(t, watermark)? else {
            continue;
        };
        let lo = since_after.max(stats.min_seq - 1);
        let hi = stats.max_seq;
        if hi <= lo || stats.count == 0 {
            continue;
        }
        // Equal sequence widths: types are written interleaved, so the widths hold about equal
        // numbers of resources.
        let parts = stats.count.div_ceil(item_resources.max(1)).max(1) as i64;
        let width = ((hi - lo) + parts - 1) / parts;
        let mut after = lo;
        while after < hi {
            let up_to = (after + width).min(hi);
            items.push(ItemPlan {
                kind: ItemKind::Scan,
                resource_type: t.clone(),
                seq_after: after,
                seq_up_to: up_to,
                expected: stats.count / parts as u64,
            });
            after = up_to;
        }
    }
    if req.associated.is_some() && !types.iter().any(|t| t == "Provenance") {
        items.push(ItemPlan {
            kind: ItemKind::Associated,
            resource_type: "Provenance".into(),
            seq_after: 0,
            seq_up_to: watermark,
            expected: 0,
        });
    }
    items.push(ItemPlan {
        kind: ItemKind::Finalize,
        resource_type: String::new(),
        seq_after: 0,
        seq_up_to: 0,
        expected: 0,
    });
    Ok(items)
}

/// Patients per work item of an `organizeOutputBy=Patient` export: an item holds its patients'
/// resources in memory until their blocks are written.
const ORGANIZE_ITEM_PATIENTS: u64 = 100;

/// Sequence ranges of about `per_item` resources of `t` (after `since_after`) as scan items.
fn plan_ranges(
    store: &dyn Store,
    t: &str,
    watermark: i64,
    since_after: i64,
    per_item: u64,
    items: &mut Vec<ItemPlan>,
) -> Result<(), RunError> {
    let Some(stats) = store.seq_range(t, watermark)? else {
        return Ok(());
    };
    let lo = since_after.max(stats.min_seq - 1);
    let hi = stats.max_seq;
    if hi <= lo || stats.count == 0 {
        return Ok(());
    }
    let parts = stats.count.div_ceil(per_item.max(1)).max(1) as i64;
    let width = ((hi - lo) + parts - 1) / parts;
    let mut after = lo;
    while after < hi {
        let up_to = (after + width).min(hi);
        items.push(ItemPlan {
            kind: ItemKind::Scan,
            resource_type: t.to_string(),
            seq_after: after,
            seq_up_to: up_to,
            expected: stats.count / parts as u64,
        });
        after = up_to;
    }
    Ok(())
}

/// Which patients an export is about: `None` = every patient (Patient level without `patient`).
fn patient_scope(
    store: &dyn Store,
    req: &ExportRequest,
    settings: &RunSettings,
    at: Snapshot,
) -> Result<Option<HashSet<String>>, RunError> {
    let mut set: Option<HashSet<String>> = match &req.level {
        ExportLevel::System | ExportLevel::Patient => None,
        ExportLevel::Group(id) => Some(group_members(store, id, settings, at)?),
    };
    if !req.patients.is_empty() {
        let wanted: HashSet<String> = req.patients.iter().cloned().collect();
        set = Some(match set {
            Some(s) => s.intersection(&wanted).cloned().collect(),
            None => wanted,
        });
    }
    Ok(set)
}

/// Whether a member `period` covers `now_ms`: bounds are FHIR dateTimes of any precision; a
/// partial date covers its whole span (a start of `2024` begins 2024-01-01, an end of `2024`
/// lasts to the end of 2024).
fn period_covers(start: Option<&str>, end: Option<&str>, now_ms: i64) -> bool {
    let range = |s: &str| search::values::parse_date_range(s).ok();
    let starts_ok = start.is_none_or(|s| range(s).is_none_or(|r| r.lo <= now_ms));
    let ends_ok = end.is_none_or(|e| range(e).is_none_or(|r| now_ms < r.hi));
    starts_ok && ends_ok
}

/// The moment an export (or a view run) sees the data at: its watermark and transactionTime.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot {
    /// Versions with `seq <= seq` are visible.
    pub seq: i64,
    /// The instant member periods are judged at (ms since the epoch).
    pub at_ms: i64,
}

/// The version of `Group/id` current at `seq`: the live one could have been updated or deleted
/// since the export's transactionTime (a member added after the kick-off was exported, a Group
/// deleted while the job waited failed it, and a job resumed after a restart mixed two
/// memberships in one export).
fn group_as_of(store: &dyn Store, id: &str, seq: i64) -> Result<Vec<u8>, store::StoreError> {
    let page = store.history(
        store::HistoryScope::Instance {
            resource_type: "Group",
            id,
        },
        &store::HistoryQuery {
            count: 1,
            as_of: Some(seq),
            ..Default::default()
        },
    )?;
    let gone = |version| store::StoreError::Gone {
        resource_type: "Group".into(),
        id: id.into(),
        version,
    };
    match page.entries.into_iter().next() {
        Some(v) => {
            let version = v.version;
            v.json.ok_or_else(|| gone(version))
        }
        None => Err(store::StoreError::NotFound {
            resource_type: "Group".into(),
            id: id.into(),
        }),
    }
}

/// Active patient members of a Group as of `at`: the Group's version (and each nested Group's)
/// current at `at.seq`; `inactive` members and members whose `period` does not cover `at.at_ms`
/// are left out; nested Groups are followed once each (a cycle ends there), breadth first with
/// an explicit queue, so that no nesting depth can exhaust the stack. Nesting deeper than
/// `group_max_depth` or more than `group_max_members` member entries fail the export.
pub fn group_members(
    store: &dyn Store,
    id: &str,
    settings: &RunSettings,
    at: Snapshot,
) -> Result<HashSet<String>, RunError> {
    let mut out = HashSet::new();
    let mut seen: HashSet<String> = HashSet::from([id.to_string()]);
    let mut queue: std::collections::VecDeque<(String, usize)> =
        std::collections::VecDeque::from([(id.to_string(), 0)]);
    let mut entries = 0usize;
    let now = at.at_ms;
    while let Some((gid, depth)) = queue.pop_front() {
        let g = match group_as_of(store, &gid, at.seq) {
            Ok(g) => g,
            Err(store::StoreError::NotFound { .. } | store::StoreError::Gone { .. })
                if gid == id =>
            {
                return Err(RunError::GroupNotFound(id.to_string()));
            }
            Err(store::StoreError::NotFound { .. } | store::StoreError::Gone { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        let v: Value = serde_json::from_slice(&g).unwrap_or(Value::Null);
        for m in v
            .get("member")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            entries += 1;
            if entries > settings.group_max_members {
                return Err(RunError::GroupTooLarge(format!(
                    "Group/{id} has more than {} members (nested Groups included); the limit is --export-group-max-members",
                    settings.group_max_members
                )));
            }
            if m.get("inactive").and_then(Value::as_bool) == Some(true) {
                continue;
            }
            let start = m.pointer("/period/start").and_then(Value::as_str);
            let end = m.pointer("/period/end").and_then(Value::as_str);
            if !period_covers(start, end, now) {
                continue;
            }
            let Some(r) = m.pointer("/entity/reference").and_then(Value::as_str) else {
                continue;
            };
            if let Some(pid) = r.strip_prefix("Patient/") {
                out.insert(pid.to_string());
            } else if let Some(nested) = r.strip_prefix("Group/")
                && seen.insert(nested.to_string())
            {
                if depth + 1 > settings.group_max_depth {
                    return Err(RunError::GroupTooLarge(format!(
                        "Group/{id} nests Groups more than {} levels deep; the limit is --export-group-max-depth",
                        settings.group_max_depth
                    )));
                }
                queue.push_back((nested.to_string(), depth + 1));
            }
        }
    }
    Ok(out)
}

/// Whether a resource belongs to the Patient compartment of a patient in scope.
pub fn in_compartment(
    resource_type: &str,
    resource: &Value,
    params: &[String],
    scope: &Option<HashSet<String>>,
) -> bool {
    if resource_type == "Patient" {
        let id = resource.get("id").and_then(Value::as_str).unwrap_or("");
        return scope.as_ref().is_none_or(|s| s.contains(id));
    }
    params.iter().any(|code| {
        search::registry::extract_param(resource_type, code, resource)
            .iter()
            .any(|v| match v {
                IndexValue::Reference { target_type, id } if target_type == "Patient" => {
                    scope.as_ref().is_none_or(|s| s.contains(id))
                }
                _ => false,
            })
    })
}

pub fn compartment_params(resource_type: &str) -> Vec<String> {
    fhir_model::r4()
        .patient_compartment(resource_type)
        .map(<[String]>::to_vec)
        .unwrap_or_default()
}

/// The `_elements` subset of one type: `None` when the type is not subsetted, else the kept
/// top-level element names (requested ones plus the mandatory ones, `id` and `meta`).
fn element_subset(req: &ExportRequest, resource_type: &str) -> Option<HashSet<String>> {
    let mut keep: HashSet<String> = req
        .elements
        .iter()
        .filter(|(t, _)| t.as_deref().is_none_or(|t| t == resource_type))
        .map(|(_, e)| e.clone())
        .collect();
    if keep.is_empty() {
        return None;
    }
    keep.extend(["resourceType", "id", "meta"].map(String::from));
    if let Some(def) = fhir_model::r4().type_def(resource_type) {
        keep.extend(
            def.elements
                .iter()
                .filter(|e| e.min > 0)
                .map(|e| e.name.clone()),
        );
    }
    Some(keep)
}

/// Keeps the subset's elements (a choice element `value` keeps `valueQuantity`, a primitive keeps
/// its `_` shadow) and tags the result `SUBSETTED`.
fn apply_subset(mut v: Value, keep: &HashSet<String>) -> Value {
    if let Some(obj) = v.as_object_mut() {
        let kept = |key: &str| {
            let key = key.strip_prefix('_').unwrap_or(key);
            keep.contains(key)
                || keep.iter().any(|k| {
                    key.strip_prefix(k.as_str())
                        .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_uppercase()))
                })
        };
        obj.retain(|k, _| kept(k));
        let meta = obj.entry("meta").or_insert_with(|| json!({}));
        if let Some(meta) = meta.as_object_mut() {
            let tags = meta.entry("tag").or_insert_with(|| json!([]));
            if let Some(tags) = tags.as_array_mut() {
                tags.push(json!({"system": fhir_model::SUBSETTED_SYSTEM, "code": fhir_model::SUBSETTED_CODE}));
            }
        }
    }
    v
}

/// The pieces one item execution works with.
pub struct ItemContext<'a> {
    pub store: &'a dyn Store,
    pub queue: &'a dyn JobQueue,
    pub sink: &'a dyn Sink,
    pub prepared: &'a Prepared,
    pub settings: &'a RunSettings,
    /// Set by a cancel in this process (other processes learn it at their next heartbeat).
    pub cancel: &'a AtomicBool,
    /// Set when this process shuts down: the item stops at its next check, to be released.
    pub shutdown: &'a AtomicBool,
    /// Resources scanned, shared with the status endpoint of this process.
    pub live_scanned: &'a dyn Fn(u64),
    /// Called after parts are committed and renamed (from the committing thread): status
    /// requests waiting for a change look again.
    pub committed: &'a (dyn Fn() + Sync),
}

/// NDJSON parts of one prefix in one item, cut by count and size; a finished part is handed to
/// the caller to commit.
struct Roller<'s> {
    sink: &'s dyn Sink,
    container: String,
    folder: String,
    item_no: i64,
    attempt: i64,
    kind: FileKind,
    resource_type: String,
    prefix: String,
    max_resources: u64,
    max_bytes: u64,
    current: Option<(Box<dyn PartWriter>, String, u64, u64)>,
    parts: u32,
    /// Parts are stored gzip-compressed (`.ndjson.gz`).
    gzip: bool,
}

impl<'s> Roller<'s> {
    fn new(
        ctx: &ItemContext<'s>,
        item: &WorkItem,
        kind: FileKind,
        resource_type: &str,
        prefix: &str,
    ) -> Roller<'s> {
        Roller {
            sink: ctx.sink,
            container: ctx.prepared.job.container.clone(),
            folder: ctx.prepared.job.folder.clone(),
            item_no: item.item_no,
            attempt: item.attempt,
            kind,
            resource_type: resource_type.to_string(),
            prefix: prefix.to_string(),
            max_resources: ctx.settings.file_max_resources.max(1),
            max_bytes: ctx.settings.file_max_bytes.max(1),
            current: None,
            parts: 0,
            gzip: ctx.prepared.req.gzip == Some(true) && ctx.prepared.req.views.is_empty(),
        }
    }

    fn write(&mut self, line: &[u8]) -> Result<(), RunError> {
        if self.current.is_none() {
            self.parts += 1;
            let temp = format!(
                "{}/{}-{}.ndjson{}",
                attempt_dir(&self.folder, self.item_no, self.attempt),
                self.prefix,
                self.parts,
                if self.gzip { ".gz" } else { "" }
            );
            let w = crate::part::create(self.sink, &self.container, &temp, self.gzip)?;
            self.current = Some((w, temp, 0, 0));
        }
        if let Some((w, temp, n, bytes)) = self.current.as_mut() {
            let io = |e: std::io::Error| SinkError::from_io(temp, e);
            w.write_all(line).map_err(io)?;
            w.write_all(b"\n").map_err(io)?;
            *n += 1;
            *bytes += line.len() as u64 + 1;
        }
        Ok(())
    }

    fn full(&self) -> bool {
        self.current
            .as_ref()
            .is_some_and(|(_, _, n, b)| *n >= self.max_resources || *b >= self.max_bytes)
    }

    /// Finishes the current part, if any, for committing.
    fn take(&mut self) -> Result<Option<NewFile>, RunError> {
        self.take_unfinished().map(Unfinished::finish).transpose()
    }

    /// The current part, if any, still to be finished (made durable) before its commit.
    fn take_unfinished(&mut self) -> Option<Unfinished> {
        let (writer, temp, count, _) = self.current.take()?;
        Some(Unfinished {
            body: PartBody::Written(writer),
            kind: self.kind,
            resource_type: self.resource_type.clone(),
            prefix: if self.gzip {
                format!("{}.ndjson.gz", self.prefix)
            } else {
                self.prefix.clone()
            },
            count,
            temp_path: temp,
        })
    }
}

/// A part whose rows are all given but which is not yet durable: [`Unfinished::finish`] writes
/// what is still buffered (a Parquet file's last row group and footer), flushes and syncs it (the
/// expensive step: an `fdatasync` of a local file, the upload's completion of a remote one) and
/// describes it for the commit.
struct Unfinished {
    body: PartBody,
    kind: FileKind,
    resource_type: String,
    prefix: String,
    count: u64,
    temp_path: String,
}

/// What an [`Unfinished`] part still holds.
enum PartBody {
    /// Every byte written to the destination's writer.
    Written(Box<dyn PartWriter>),
    /// A view's Parquet file: its last row group and footer are encoded when it is finished.
    Parquet(Box<view_items::ParquetFile>),
}

impl Unfinished {
    fn finish(self) -> Result<NewFile, RunError> {
        let writer = match self.body {
            PartBody::Written(w) => w,
            PartBody::Parquet(file) => view_items::finish_parquet(*file, &self.temp_path)?,
        };
        let (bytes, sha256) = writer.finish_digest()?;
        Ok(NewFile {
            kind: self.kind,
            resource_type: self.resource_type,
            prefix: self.prefix,
            count: self.count,
            bytes,
            sha256,
            temp_path: self.temp_path,
        })
    }
}

/// The folder of one claim's temporary parts, `<folder>/_parts/<item>-<attempt>`: a worker
/// writes only there until a part is committed (the attempt is the lease's fencing token, so a
/// worker that lost its lease never writes where the new holder does), and only committed
/// parts are renamed into the export folder.
pub fn attempt_dir(folder: &str, item_no: i64, attempt: i64) -> String {
    format!("{folder}/_parts/{item_no}-{attempt}")
}

/// Commits finished parts with the item's cursor and renames them to their final names.
fn commit(
    ctx: &ItemContext<'_>,
    item: &WorkItem,
    parts: Vec<NewFile>,
    cursor: i64,
    scanned: u64,
) -> Result<(), RunError> {
    Committer::of(ctx).commit(item, parts, cursor, scanned)
}

/// The commit a scan has handed to its committing thread, if any.
type PendingCommit<'scope> = Option<std::thread::ScopedJoinHandle<'scope, Result<(), RunError>>>;

/// What a commit needs of an [`ItemContext`]: the parts shared between threads, so that a
/// scan can hand its finished parts to a committing thread and go on writing the next ones
/// ([`Committer::pipelined`]).
#[derive(Clone, Copy)]
struct Committer<'a> {
    queue: &'a dyn JobQueue,
    sink: &'a dyn Sink,
    job: &'a JobRecord,
    committed: &'a (dyn Fn() + Sync),
}

impl<'a> Committer<'a> {
    fn of(ctx: &ItemContext<'a>) -> Committer<'a> {
        Committer {
            queue: ctx.queue,
            sink: ctx.sink,
            job: &ctx.prepared.job,
            committed: ctx.committed,
        }
    }

    fn commit(
        self,
        item: &WorkItem,
        parts: Vec<NewFile>,
        cursor: i64,
        scanned: u64,
    ) -> Result<(), RunError> {
        let now = chrono::Utc::now().timestamp_millis();
        let Some(records) = self
            .queue
            .commit_files(item, &parts, cursor, scanned, now)?
        else {
            for p in &parts {
                let _ = self.sink.delete_prefix(&self.job.container, &p.temp_path);
            }
            return Err(lease_error(self.queue.heartbeat(item, scanned, now)?));
        };
        finish_renames(self.sink, self.queue, self.job, &records)?;
        (self.committed)();
        Ok(())
    }

    /// Makes the parts durable, then commits them. On an error the parts already finished are
    /// left in the claim's part folder, which the item's failure path removes.
    fn finish_and_commit(
        self,
        item: &WorkItem,
        parts: Vec<Unfinished>,
        cursor: i64,
        scanned: u64,
    ) -> Result<(), RunError> {
        let parts = parts
            .into_iter()
            .map(Unfinished::finish)
            .collect::<Result<Vec<_>, _>>()?;
        self.commit(item, parts, cursor, scanned)
    }

    /// Runs the scan of an item with its commits pipelined: each [`Pipeline::commit`] hands its
    /// parts to a thread of their own that makes them durable (the `fdatasync` of a
    /// 5,000-resource file, about 15 ms here), commits and renames them, while the scan writes
    /// the next parts. At most one commit is in flight and commits stay in cursor order: the
    /// next commit waits for the previous one, whose error ends the scan there. The commit in
    /// flight has ended when this returns, whatever the scan's outcome; the scan's own error
    /// wins over it.
    fn pipelined<T>(
        self,
        item: &'a WorkItem,
        scan: impl for<'scope> FnOnce(&mut Pipeline<'scope, 'a>) -> Result<T, RunError>,
    ) -> Result<T, RunError> {
        std::thread::scope(|threads| {
            let mut pipeline = Pipeline {
                committer: self,
                item,
                threads,
                pending: None,
            };
            let scan_result = scan(&mut pipeline);
            let committed = pipeline.wait();
            let out = scan_result?;
            committed.map(|()| out)
        })
    }
}

/// The committing side of one item's scan ([`Committer::pipelined`]).
struct Pipeline<'scope, 'a> {
    committer: Committer<'a>,
    item: &'a WorkItem,
    threads: &'scope std::thread::Scope<'scope, 'a>,
    pending: PendingCommit<'scope>,
}

impl<'scope, 'a> Pipeline<'scope, 'a> {
    /// Commits `parts` (nothing when there are none) with the cursor up to which they hold the
    /// item's output: waits for the commit in flight (returning its error), then hands these
    /// parts to a committing thread.
    fn commit(
        &mut self,
        parts: impl IntoIterator<Item = Unfinished>,
        cursor: i64,
        scanned: u64,
    ) -> Result<(), RunError> {
        let parts: Vec<Unfinished> = parts.into_iter().collect();
        if parts.is_empty() {
            return Ok(());
        }
        self.wait()?;
        let (committer, item) = (self.committer, self.item);
        self.pending = Some(
            self.threads
                .spawn(move || committer.finish_and_commit(item, parts, cursor, scanned)),
        );
        Ok(())
    }

    /// Waits for the commit in flight, if any.
    fn wait(&mut self) -> Result<(), RunError> {
        self.pending.take().map_or(Ok(()), |h| {
            h.join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

/// Renames committed parts still under their temporary names (also after a crash).
pub fn finish_renames(
    sink: &dyn Sink,
    queue: &dyn JobQueue,
    job: &JobRecord,
    files: &[FileRecord],
) -> Result<(), RunError> {
    for f in files {
        if let Some(temp) = &f.pending_rename {
            sink.rename(&job.container, temp, &format!("{}/{}", job.folder, f.name))?;
            queue.renamed(&job.id, &f.name)?;
        }
    }
    Ok(())
}

fn lease_error(lease: Lease) -> RunError {
    match lease {
        Lease::JobStopped => RunError::Stopped,
        _ => RunError::LeaseLost,
    }
}

/// Watches the clock and the cancel flag for a running item.
struct Pulse {
    last: Instant,
}

impl Pulse {
    fn beat(
        &mut self,
        ctx: &ItemContext<'_>,
        item: &WorkItem,
        scanned: u64,
    ) -> Result<(), RunError> {
        if ctx.cancel.load(Ordering::Relaxed) {
            return Err(RunError::Stopped);
        }
        if ctx.shutdown.load(Ordering::Relaxed) {
            return Err(RunError::Interrupted);
        }
        (ctx.live_scanned)(scanned);
        if self.last.elapsed() >= ctx.settings.heartbeat_every {
            self.last = Instant::now();
            let now = chrono::Utc::now().timestamp_millis();
            match ctx.queue.heartbeat(item, scanned, now)? {
                Lease::Held => {}
                other => return Err(lease_error(other)),
            }
        }
        Ok(())
    }
}

/// Executes one claimed item to its end (files committed, item done) or to an error. The
/// finalize item is the exception: its files are committed and renamed, but it is left running
/// for the caller, which writes the manifest and marks the item done with its job complete in
/// one transaction ([`store::JobQueue::complete_job`]).
pub fn execute_item(ctx: &ItemContext<'_>, item: &WorkItem) -> Result<(), RunError> {
    // A previous holder may have committed parts without renaming them.
    let mine: Vec<FileRecord> = ctx
        .queue
        .files(&item.job_id)?
        .into_iter()
        .filter(|f| f.item_no == item.item_no)
        .collect();
    finish_renames(ctx.sink, ctx.queue, &ctx.prepared.job, &mine)?;
    let scanned = match item.kind {
        ItemKind::Scan => scan_item(ctx, item)?,
        ItemKind::Associated => associated_item(ctx, item)?,
        ItemKind::Finalize => {
            // Marked done only with the job's completion: a job whose items are all done
            // while it still runs would never be claimed (nor completed) again.
            finalize_item(ctx, item)?;
            return Ok(());
        }
    };
    let now = chrono::Utc::now().timestamp_millis();
    if !ctx.queue.complete_item(item, scanned, now)? {
        return Err(lease_error(ctx.queue.heartbeat(item, scanned, now)?));
    }
    Ok(())
}

/// Whether a row changed after the request's `_until` (such rows are left out of the export).
fn changed_after_until(req: &ExportRequest, last_updated: &str) -> bool {
    req.until_ms
        .is_some_and(|until| store::parse_instant_ms(last_updated).is_some_and(|ms| ms > until))
}

/// Scans a type of the snapshot with a fallible step per row; the first error stops the scan.
fn scan_rows(
    store: &dyn Store,
    resource_type: &str,
    as_of: i64,
    bounds: SeqBounds,
    step: &mut dyn FnMut(store::ScanRow<'_>) -> Result<(), RunError>,
) -> Result<(), RunError> {
    let mut failure = None;
    store.scan_type_each(resource_type, as_of, bounds, &mut |row| match step(row) {
        Ok(()) => ControlFlow::Continue(()),
        Err(e) => {
            failure = Some(e);
            ControlFlow::Break(())
        }
    })?;
    failure.map_or(Ok(()), Err)
}

/// The output and `error` parts of one item.
struct Outputs<'s> {
    out: Roller<'s>,
    errors: Roller<'s>,
}

impl<'s> Outputs<'s> {
    fn new(ctx: &ItemContext<'s>, item: &WorkItem, resource_type: &str) -> Outputs<'s> {
        Outputs {
            out: Roller::new(ctx, item, FileKind::Output, resource_type, resource_type),
            errors: Roller::new(
                ctx,
                item,
                FileKind::Error,
                "OperationOutcome",
                "OperationOutcome",
            ),
        }
    }

    fn emit(&mut self, e: Emit) -> Result<(), RunError> {
        match e {
            Emit::Skip => Ok(()),
            Emit::Line(line) => self.out.write(&line),
            Emit::Stub(stub, outcome) => {
                self.out.write(&stub)?;
                self.errors.write(&outcome)
            }
        }
    }

    fn full(&self) -> bool {
        self.out.full() || self.errors.full()
    }

    /// The current parts, still to be finished, for one commit.
    fn take_unfinished(&mut self) -> Vec<Unfinished> {
        [self.out.take_unfinished(), self.errors.take_unfinished()]
            .into_iter()
            .flatten()
            .collect()
    }
}

/// What one resource becomes in the output.
enum Emit {
    Skip,
    Line(Vec<u8>),
    /// De-identification failed with `processingErrors: skip`: the stub, and an
    /// OperationOutcome line for the `error` file.
    Stub(Vec<u8>, Vec<u8>),
}

fn transform(
    p: &Prepared,
    t: &str,
    json: &[u8],
    compartment: &[String],
    subset: &Option<HashSet<String>>,
    needs_value: bool,
) -> Result<Emit, RunError> {
    if !needs_value {
        return Ok(match &p.anonymizer {
            None => Emit::Line(json.to_vec()),
            Some(a) => emit(a.apply_bytes(json)?),
        });
    }
    let Ok(v) = serde_json::from_slice::<Value>(json) else {
        return Ok(Emit::Skip);
    };
    if p.by_patient && !in_compartment(t, &v, compartment, &p.scope) {
        return Ok(Emit::Skip);
    }
    if !p.filters.matches(&v) {
        return Ok(Emit::Skip);
    }
    let v = match subset {
        Some(keep) => apply_subset(v, keep),
        None => v,
    };
    Ok(match &p.anonymizer {
        None => Emit::Line(v.to_string().into_bytes()),
        Some(a) => emit(a.apply_value(v)?),
    })
}

fn emit((line, error): (Vec<u8>, Option<Vec<u8>>)) -> Emit {
    match error {
        None => Emit::Line(line),
        Some(outcome) => Emit::Stub(line, outcome),
    }
}

fn scan_item(ctx: &ItemContext<'_>, item: &WorkItem) -> Result<u64, RunError> {
    if !ctx.prepared.req.views.is_empty() {
        return view_items::scan_views(ctx, item);
    }
    if ctx.prepared.req.organize_by_patient {
        return organize_item(ctx, item);
    }
    let p = ctx.prepared;
    let t = item.resource_type.as_str();
    let compartment = compartment_params(t);
    let subset = element_subset(&p.req, t);
    let needs_value = p.by_patient || p.filters.filters_type(t) || subset.is_some();
    let mut outputs = Outputs::new(ctx, item, t);
    let mut pulse = Pulse {
        last: Instant::now(),
    };
    let mut scanned = item.scanned;
    let bounds = SeqBounds {
        after: item.cursor.max(p.since_after),
        up_to: item.seq_up_to,
    };
    // A full part is made durable and committed on a thread of its own while the scan writes
    // the next one.
    Committer::of(ctx).pipelined(item, |pipeline| {
        scan_rows(ctx.store, t, p.job.watermark, bounds, &mut |row| {
            scanned += 1;
            if scanned.is_multiple_of(1024) {
                pulse.beat(ctx, item, scanned)?;
            }
            if changed_after_until(&p.req, row.last_updated) {
                return Ok(());
            }
            if !needs_value && p.anonymizer.is_none() {
                // The common plain case: stored bytes straight to the file.
                outputs.out.write(row.json)?;
            } else {
                outputs.emit(transform(
                    p,
                    t,
                    row.json,
                    &compartment,
                    &subset,
                    needs_value,
                )?)?;
            }
            if outputs.full() {
                pipeline.commit(outputs.take_unfinished(), row.seq, scanned)?;
            }
            Ok(())
        })?;
        pipeline.commit(outputs.take_unfinished(), item.seq_up_to, scanned)
    })?;
    Ok(scanned)
}

/// `$viewdefinition-export` items: the same scan, rows of views instead of resources.
mod view_items;

/// The patient whose block a resource goes to in an `organizeOutputBy=Patient` export: the
/// first patient in scope that its compartment parameters reference (in the
/// CompartmentDefinition's order), so that a resource in several patients' compartments is
/// written once, like in a plain export.
fn owner_patient(
    resource_type: &str,
    resource: &Value,
    params: &[String],
    scope: &Option<HashSet<String>>,
) -> Option<String> {
    params.iter().find_map(|code| {
        search::registry::extract_param(resource_type, code, resource)
            .into_iter()
            .find_map(|v| match v {
                IndexValue::Reference { target_type, id }
                    if target_type == "Patient"
                        && scope.as_ref().is_none_or(|s| s.contains(&id)) =>
                {
                    Some(id)
                }
                _ => None,
            })
    })
}

/// A patient's block being gathered: the Patient's sequence number and id, its own line (when
/// exported) and its resources' lines.
type Block = (i64, String, Option<Vec<u8>>, Vec<Vec<u8>>);

/// One item of an `organizeOutputBy=Patient` export: the Patients of its range, then every
/// exported compartment type of the snapshot scanned once for the resources whose owner
/// ([`owner_patient`]) is one of them; then one block per patient, in Patient order — a header
/// `Parameters` (`header` → the Patient), the Patient, its resources — into `output-<n>.ndjson`
/// files cut only between blocks (a patient's block is never split). Commits carry the last
/// written Patient's sequence number as the cursor; a resumed item rebuilds the blocks of the
/// patients after it.
fn organize_item(ctx: &ItemContext<'_>, item: &WorkItem) -> Result<u64, RunError> {
    let p = ctx.prepared;
    let present = ctx.store.types_present(p.job.watermark)?;
    let types = p.req.effective_types(&present);
    let mut pulse = Pulse {
        last: Instant::now(),
    };
    let mut scanned = item.scanned;
    let until_ok = |last_updated: &str| !changed_after_until(&p.req, last_updated);
    let mut blocks: Vec<Block> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let with_patient = types.iter().any(|t| t == "Patient");
    let patient_subset = element_subset(&p.req, "Patient");
    let bounds = SeqBounds {
        after: item.cursor,
        up_to: item.seq_up_to,
    };
    scan_rows(ctx.store, "Patient", p.job.watermark, bounds, &mut |row| {
        scanned += 1;
        if scanned.is_multiple_of(1024) {
            pulse.beat(ctx, item, scanned)?;
        }
        if !p.scope.as_ref().is_none_or(|s| s.contains(row.id)) {
            return Ok(());
        }
        let line = if with_patient && row.seq > p.since_after && until_ok(row.last_updated) {
            match transform(p, "Patient", row.json, &[], &patient_subset, true)? {
                Emit::Line(l) => Some(l),
                _ => None,
            }
        } else {
            None
        };
        index.insert(row.id.to_string(), blocks.len());
        blocks.push((row.seq, row.id.to_string(), line, Vec::new()));
        Ok(())
    })?;
    if !blocks.is_empty() {
        for t in types.iter().filter(|t| t.as_str() != "Patient") {
            let compartment = compartment_params(t);
            if compartment.is_empty() {
                continue;
            }
            let subset = element_subset(&p.req, t);
            let all = SeqBounds {
                after: p.since_after,
                up_to: p.job.watermark,
            };
            scan_rows(ctx.store, t, p.job.watermark, all, &mut |row| {
                scanned += 1;
                if scanned.is_multiple_of(1024) {
                    pulse.beat(ctx, item, scanned)?;
                }
                if !until_ok(row.last_updated) {
                    return Ok(());
                }
                let Ok(v) = serde_json::from_slice::<Value>(row.json) else {
                    return Ok(());
                };
                let Some(owner) = owner_patient(t, &v, &compartment, &p.scope) else {
                    return Ok(());
                };
                let Some(&i) = index.get(&owner) else {
                    return Ok(());
                };
                if !p.filters.matches(&v) {
                    return Ok(());
                }
                let v = match &subset {
                    Some(keep) => apply_subset(v, keep),
                    None => v,
                };
                blocks[i].3.push(v.to_string().into_bytes());
                Ok(())
            })?;
        }
    }
    let mut roller = Roller::new(ctx, item, FileKind::Output, "", "output");
    Committer::of(ctx).pipelined(item, |pipeline| {
        for (seq, id, line, lines) in blocks {
            if line.is_none() && lines.is_empty() {
                continue;
            }
            let header = json!({"resourceType": "Parameters", "parameter": [{"name": "header", "valueReference": {"reference": format!("Patient/{id}")}}]});
            roller.write(header.to_string().as_bytes())?;
            if let Some(l) = line {
                roller.write(&l)?;
            }
            for l in lines {
                roller.write(&l)?;
            }
            if roller.full() {
                pipeline.commit(roller.take_unfinished(), seq, scanned)?;
            }
        }
        pipeline.commit(roller.take_unfinished(), item.seq_up_to, scanned)
    })?;
    Ok(scanned)
}

/// The ids a Provenance `target` points at, as `Type/id`.
fn provenance_targets(v: &Value) -> Vec<String> {
    v.get("target")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|r| r.get("reference").and_then(Value::as_str))
        .map(|r| r.to_string())
        .collect()
}

/// `includeAssociatedData`: Provenance resources whose target is a resource of this export
/// (all of them for `RelevantProvenanceResources`, the latest `recorded` per target for
/// `LatestProvenanceResources`). Membership of a target is decided on its current version.
fn associated_item(ctx: &ItemContext<'_>, item: &WorkItem) -> Result<u64, RunError> {
    let p = ctx.prepared;
    let present = ctx.store.types_present(p.job.watermark)?;
    let types: HashSet<String> = p.req.effective_types(&present).into_iter().collect();
    let mut member_cache: HashMap<String, bool> = HashMap::new();
    let mut is_exported = |reference: &str| -> bool {
        if let Some(&known) = member_cache.get(reference) {
            return known;
        }
        let Some((t, id)) = reference.split_once('/') else {
            return false;
        };
        let answer = types.contains(t)
            && match ctx.store.read(t, id) {
                Ok(r) => {
                    let v: Value = serde_json::from_slice(&r.json).unwrap_or(Value::Null);
                    (!p.by_patient || in_compartment(t, &v, &compartment_params(t), &p.scope))
                        && p.filters.matches(&v)
                        && p.since_after < r.seq
                }
                Err(_) => false,
            };
        member_cache.insert(reference.to_string(), answer);
        answer
    };
    // First pass: which Provenance resources qualify.
    let latest_only = p.req.associated == Some(Associated::Latest);
    let mut chosen: HashSet<String> = HashSet::new();
    let mut latest: HashMap<String, (String, String)> = HashMap::new();
    let mut scanned = 0u64;
    let mut pulse = Pulse {
        last: Instant::now(),
    };
    let all = SeqBounds {
        after: 0,
        up_to: i64::MAX,
    };
    scan_rows(ctx.store, "Provenance", p.job.watermark, all, &mut |row| {
        scanned += 1;
        if scanned.is_multiple_of(1024) {
            pulse.beat(ctx, item, scanned)?;
        }
        let Ok(v) = serde_json::from_slice::<Value>(row.json) else {
            return Ok(());
        };
        let recorded = v
            .get("recorded")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        for target in provenance_targets(&v) {
            if !is_exported(&target) {
                continue;
            }
            if latest_only {
                let e = latest
                    .entry(target)
                    .or_insert_with(|| (String::new(), String::new()));
                if recorded >= e.0 {
                    *e = (recorded.clone(), row.id.to_string());
                }
            } else {
                chosen.insert(row.id.to_string());
            }
        }
        Ok(())
    })?;
    chosen.extend(latest.into_values().map(|(_, id)| id));
    // Second pass: write them in sequence order, committed once at the end (after a crash the
    // item is run again whole; its uncommitted parts are discarded).
    let mut outputs = Outputs::new(ctx, item, "Provenance");
    Committer::of(ctx).pipelined(item, |pipeline| {
        scan_rows(ctx.store, "Provenance", p.job.watermark, all, &mut |row| {
            if chosen.contains(row.id) {
                outputs.emit(transform(p, "Provenance", row.json, &[], &None, false)?)?;
            }
            Ok(())
        })?;
        pipeline.commit(outputs.take_unfinished(), item.seq_up_to, scanned)
    })?;
    Ok(scanned)
}

/// Deleted entries (system level with `_since`), kick-off warnings, and the final renames. Its
/// parts are committed together at the end, so a rerun after a crash either finds them all
/// committed or starts over.
fn finalize_item(ctx: &ItemContext<'_>, item: &WorkItem) -> Result<u64, RunError> {
    let p = ctx.prepared;
    let files = ctx.queue.files(&item.job_id)?;
    if !files.iter().any(|f| f.item_no == item.item_no) {
        let parts = finalize_parts(ctx, item)?;
        if !parts.is_empty() {
            commit(ctx, item, parts, 0, 0)?;
        }
    }
    let all = ctx.queue.files(&item.job_id)?;
    finish_renames(ctx.sink, ctx.queue, &p.job, &all)?;
    // The temporary parts folder goes with the completion ([`remove_parts`]), which records
    // it when it stays.
    Ok(0)
}

/// The folder of a job's temporary parts (`<folder>/_parts`, see [`attempt_dir`]).
pub fn parts_dir(folder: &str) -> String {
    format!("{folder}/_parts")
}

/// Removes a finished job's temporary parts folder after its last rename. A failure (the
/// destination down) does not fail the export, whose files are all in place: it is logged and
/// reported (`false`) so that the completion records it ([`store::jobs::Cleanup::Parts`]) and
/// the sweeper removes the folder later; before, it was ignored and the folder stayed for
/// ever.
pub fn remove_parts(sink: &dyn Sink, job: &JobRecord) -> bool {
    let dir = parts_dir(&job.folder);
    match sink.delete_prefix(&job.container, &dir) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(
                job = %job.id,
                container = %job.container,
                path = %dir,
                error = %e,
                transient = e.is_transient(),
                "cannot remove the export's temporary parts folder; recorded for the sweeper to retry"
            );
            false
        }
    }
}

/// `_anonymizationDryRun=true`: the export's resources (its types, `_since`, level, patients
/// and `_typeFilter`, as the scan items would select them) go through the dry run instead of
/// into files; the report is the one output file, `DeidReport-1.ndjson` (one JSON line, type
/// `DeidReport`).
fn dry_run_parts(
    ctx: &ItemContext<'_>,
    item: &WorkItem,
    a: &crate::anonymization::Anonymizer,
) -> Result<Vec<NewFile>, RunError> {
    let p = ctx.prepared;
    let present = ctx.store.types_present(p.job.watermark)?;
    let mut dry = a.dry_run();
    let mut scanned = 0u64;
    let mut pulse = Pulse {
        last: Instant::now(),
    };
    for t in p.req.effective_types(&present) {
        let compartment = compartment_params(&t);
        let bounds = SeqBounds {
            after: p.since_after,
            up_to: p.job.watermark,
        };
        scan_rows(ctx.store, &t, p.job.watermark, bounds, &mut |row| {
            scanned += 1;
            if scanned.is_multiple_of(1024) {
                pulse.beat(ctx, item, scanned)?;
            }
            if changed_after_until(&p.req, row.last_updated) {
                return Ok(());
            }
            let Ok(v) = serde_json::from_slice::<Value>(row.json) else {
                return Ok(());
            };
            if p.by_patient && !in_compartment(&t, &v, &compartment, &p.scope) {
                return Ok(());
            }
            if !p.filters.matches(&v) {
                return Ok(());
            }
            // A resource the configuration fails on is counted in the report.
            let _ = dry.add(&v);
            Ok(())
        })?;
    }
    let report = serde_json::to_value(dry.report())
        .map_err(|e| RunError::Anonymization(format!("dry-run report: {e}")))?;
    let mut line = json!({"resourceType": "DeidReport"});
    if let (Some(o), Value::Object(r)) = (line.as_object_mut(), report) {
        o.extend(r);
    }
    let mut roller = Roller::new(ctx, item, FileKind::Output, "DeidReport", "DeidReport");
    roller.write(line.to_string().as_bytes())?;
    Ok(roller.take()?.into_iter().collect())
}

fn finalize_parts(ctx: &ItemContext<'_>, item: &WorkItem) -> Result<Vec<NewFile>, RunError> {
    let p = ctx.prepared;
    let req = &p.req;
    let model = fhir_model::r4();
    let mut parts = Vec::new();
    if let Some(a) = &p.anonymizer
        && req.anonymization.as_ref().is_some_and(|s| s.dry_run)
    {
        parts.extend(dry_run_parts(ctx, item, a)?);
    }
    let mut warnings = req.warnings.clone();
    // A tombstone carries no content to decide compartment membership: `deleted` is written at
    // system level only.
    if req.since_ms.is_some()
        && matches!(req.level, ExportLevel::System)
        && req.patients.is_empty()
        && req.views.is_empty()
        && parts.is_empty()
    {
        let all_types: Vec<String> = if req.types.is_empty() {
            model.resource_types().to_vec()
        } else {
            req.types.clone()
        };
        let mut roller = Roller::new(ctx, item, FileKind::Deleted, "Bundle", "Deleted");
        let mut unlisted = 0u64;
        for t in &all_types {
            let mut after = 0;
            loop {
                let page =
                    ctx.store
                        .deleted_since(t, p.since_after, p.job.watermark, after, 5000)?;
                if page.is_empty() {
                    break;
                }
                after = page.last().map_or(after, |d| d.seq);
                let entries: Vec<Value> = page
                    .iter()
                    .filter_map(|d| {
                        let id = match &p.anonymizer {
                            // The version before the tombstone: the content last exported.
                            Some(a) => {
                                let last = ctx
                                    .store
                                    .vread(&d.resource_type, &d.id, d.version - 1)
                                    .ok();
                                a.deleted_id(
                                    &d.resource_type,
                                    &d.id,
                                    last.as_ref().map(|r| r.json.as_slice()),
                                )
                            }
                            None => Some(d.id.clone()),
                        };
                        if id.is_none() {
                            unlisted += 1;
                        }
                        id.map(|id| json!({"request": {"method": "DELETE", "url": format!("{}/{}", d.resource_type, id)}}))
                    })
                    .collect();
                if entries.is_empty() {
                    continue;
                }
                let b = json!({"resourceType": "Bundle", "type": "transaction", "entry": entries});
                roller.write(b.to_string().as_bytes())?;
                if roller.full() {
                    parts.extend(roller.take()?);
                }
            }
        }
        parts.extend(roller.take()?);
        if unlisted > 0 {
            warnings.push(format!(
                "{unlisted} deleted resources are not listed in `deleted`: the anonymization configuration removes resource ids"
            ));
        }
    }
    if !warnings.is_empty() {
        let mut roller = Roller::new(
            ctx,
            item,
            FileKind::Error,
            "OperationOutcome",
            "OperationOutcome",
        );
        for w in &warnings {
            let oo = json!({"resourceType": "OperationOutcome", "issue": [{"severity": "warning", "code": "processing", "diagnostics": w}]});
            roller.write(oo.to_string().as_bytes())?;
            if roller.full() {
                parts.extend(roller.take()?);
            }
        }
        parts.extend(roller.take()?);
    }
    Ok(parts)
}

/// What [`run_export`] wrote.
#[derive(Debug, Default)]
pub struct RunOutput {
    pub files: Vec<FileRecord>,
    pub deleted: Vec<FileRecord>,
    pub errors: Vec<FileRecord>,
}

/// Runs a whole export in the calling thread into `container`/`folder` of `sink`, through the
/// same planning, items and commits as the service (with a private in-memory queue).
#[allow(clippy::too_many_arguments)]
pub fn run_export(
    store: &dyn Store,
    req: &ExportRequest,
    watermark: i64,
    sink: &dyn Sink,
    container: &str,
    folder: &str,
    settings: &RunSettings,
    anonymizer: Option<Anonymizer>,
    cancel: &AtomicBool,
) -> Result<RunOutput, RunError> {
    let queue = crate::jobs::SqliteJobQueue::open_in_memory()?;
    let job = JobRecord {
        id: "run".into(),
        state: crate::jobs::JobState::Queued,
        request: String::new(),
        watermark,
        transaction_time: store.instant_of_seq(watermark)?.unwrap_or_default(),
        client_id: None,
        container: container.to_string(),
        folder: folder.to_string(),
        anonymization: None,
        result: None,
        failure_status: None,
        created_ms: 0,
        finished_ms: None,
        cleanup: crate::jobs::Cleanup::None,
    };
    queue.create(
        &job,
        &plan(store, req, watermark, settings.item_resources)?,
        u64::MAX,
    )?;
    sink.ensure_container(container)?;
    let prepared = Prepared::new(store, job, req.clone(), anonymizer, settings)?;
    let ctx = ItemContext {
        store,
        queue: &queue,
        sink,
        prepared: &prepared,
        settings,
        cancel,
        shutdown: &AtomicBool::new(false),
        live_scanned: &|_| {},
        committed: &|| {},
    };
    while let Some(item) = queue.claim("local", 0, i64::MAX / 4, 1)? {
        execute_item(&ctx, &item)?;
    }
    // One run, no sweeper: a parts folder that cannot be removed is only logged.
    remove_parts(sink, &prepared.job);
    let mut out = RunOutput::default();
    for f in queue.files("run")? {
        match f.kind {
            FileKind::Output => out.files.push(f),
            FileKind::Deleted => out.deleted.push(f),
            FileKind::Error => out.errors.push(f),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_periods_compare_as_instants_at_any_precision() {
        let now = store::parse_instant_ms("2026-06-15T12:00:00Z").expect("now");
        assert!(period_covers(None, None, now));
        assert!(period_covers(Some("2026"), Some("2026"), now));
        assert!(period_covers(Some("2026-06-15"), None, now));
        assert!(!period_covers(Some("2026-06-16"), None, now));
        assert!(!period_covers(None, Some("2026-06-14"), now));
        assert!(period_covers(None, Some("2026-06-15"), now));
        // Offsets are honoured (text comparison would get this wrong).
        assert!(period_covers(Some("2026-06-15T13:30:00+02:00"), None, now));
        assert!(!period_covers(None, Some("2026-06-15T13:30:00+02:00"), now));
    }
}
