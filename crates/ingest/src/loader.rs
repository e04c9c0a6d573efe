//! The bulk loader behind `fhirhose load`.
//!
//! ```text
//! fhirhose load --data-dir DIR PATH...   → load_into_store(&store, paths, &options, &mut progress)
//! fhirhose load --server URL PATH...     → load_to_server(url, paths, &options, &mut progress)
//! ```
//! (the binary opens the store with `store::SqliteStore::open_data_dir`, which refuses while a
//! server holds the directory, and draws a progress bar from [`LoadProgress`]).
//!
//! Both read the inputs the same way ([`crate::source`]) in two streaming passes:
//! 1. a cheap pre-pass over the `.json` Bundles collecting `fullUrl → Type/id` (one thread per
//!    core), so that `urn:uuid:` references resolve across files (forward references included);
//! 2. the load pass: each resource keeps its id (or takes the uuid of its `urn:uuid:` fullUrl),
//!    references are rewritten, the resource is validated against the R4 model, and chunks of
//!    `chunk_size` resources are written as `PUT Type/id` (create-or-update), so loading the same
//!    data twice makes new versions rather than duplicates.
//!
//! The load pass is a pipeline: one thread reads and decompresses the files into units (NDJSON
//! line batches, whole `.json` files), one parsing thread per core parses, resolves, validates
//! and — for a store — serializes and indexes each resource ([`store::Store::prepare_put`]), and
//! the calling thread gathers the units in input order into chunks that a writing thread writes
//! (one chunk written while the next is gathered), so the single database writer only inserts
//! rows. Invalid resources are reported with file and line (or entry index) and skipped, or, with
//! `strict`, stop the load after the resources before them are written. References that resolve
//! to nothing (a `urn:` that names no loaded fullUrl) are left unchanged and counted. NDJSON files
//! take no part in the pre-pass: a `urn:uuid:` reference to a resource that only occurs in NDJSON
//! does not resolve.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, channel, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rayon::prelude::*;
use serde_json::{Value, json};
use store::{Store, WriteOp, WriteStatus};

use crate::error::LoadError;
use crate::references::ReferenceMap;
use crate::source::{self, Item, ItemContent, Location};

/// Options of a load.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Stop at the first invalid resource instead of skipping it.
    pub strict: bool,
    /// Validate resources against the R4 model before writing them.
    pub validate: bool,
    /// Resources per store transaction (`--data-dir`) or per batch Bundle (`--server`).
    pub chunk_size: usize,
    /// At most this many problems are kept in [`LoadSummary::problems`] (all are counted).
    pub max_reported_problems: usize,
    /// How a store with search indexes builds them (`load --data-dir` only).
    pub index_build: IndexBuild,
}

/// How the search indexes of a bulk load are built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IndexBuild {
    /// [`IndexBuild::Rebuild`] when the input is at least as large as the data already stored
    /// (gzipped input counted at five times its size), else [`IndexBuild::Inline`].
    #[default]
    Auto,
    /// Every index row goes into its value index as it is written.
    Inline,
    /// Index rows are written with their resources, the value indexes are dropped at the start
    /// and built once, sorted, at the end ([`Store::suspend_index_upkeep`]).
    Rebuild,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            strict: false,
            validate: true,
            chunk_size: 5000,
            max_reported_problems: 1000,
            index_build: IndexBuild::Auto,
        }
    }
}

impl LoadOptions {
    /// Defaults for `load --server`: batch Bundles of 500 entries.
    pub fn for_server() -> LoadOptions {
        LoadOptions {
            chunk_size: 500,
            ..LoadOptions::default()
        }
    }
}

/// Progress, reported after every chunk.
#[derive(Debug, Clone, Default)]
pub struct LoadProgress {
    pub files_total: usize,
    pub files_done: usize,
    /// Resources written so far (creates, updates and deletes).
    pub resources: u64,
    /// Resources skipped as invalid so far.
    pub invalid: u64,
    pub elapsed: Duration,
    /// All resources are written; the search indexes are being built.
    pub building_indexes: bool,
}

/// One skipped resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// `file:line` or `file entry N`.
    pub location: String,
    pub message: String,
}

/// What a load did.
#[derive(Debug, Clone, Default)]
pub struct LoadSummary {
    pub files: usize,
    /// Resources written per type (creates and updates).
    pub per_type: BTreeMap<String, u64>,
    /// Deletes applied.
    pub deleted: u64,
    /// Resources skipped as invalid.
    pub invalid: u64,
    /// The first [`LoadOptions::max_reported_problems`] problems.
    pub problems: Vec<Problem>,
    /// `urn:` references that named no fullUrl of the inputs (left unchanged).
    pub unresolved_references: u64,
    /// The whole load, index build included.
    pub elapsed: Duration,
    /// How long building the value indexes at the end took, when they were rebuilt
    /// ([`IndexBuild::Rebuild`]).
    pub index_build: Option<Duration>,
}

impl LoadSummary {
    /// Resources written (creates and updates).
    pub fn written(&self) -> u64 {
        self.per_type.values().sum()
    }

    /// Add what a chunk's write counted (`part`) to this summary.
    fn merge(&mut self, part: LoadSummary, max: usize) {
        for (t, n) in part.per_type {
            *self.per_type.entry(t).or_insert(0) += n;
        }
        self.deleted += part.deleted;
        self.invalid += part.invalid;
        let room = max.saturating_sub(self.problems.len());
        self.problems.extend(part.problems.into_iter().take(room));
    }

    fn problem(&mut self, location: String, message: String, max: usize) {
        self.invalid += 1;
        if self.problems.len() < max {
            self.problems.push(Problem { location, message });
        }
    }
}

/// Load files or folders straight into a store (`fhirhose load --data-dir`).
pub fn load_into_store(
    store: &dyn Store,
    paths: &[PathBuf],
    options: &LoadOptions,
    progress: &mut dyn FnMut(&LoadProgress),
) -> Result<LoadSummary, LoadError> {
    // Updates are serialized and indexed by the parsing threads; the writer only inserts rows.
    let prepare = |op: WriteOp| match op {
        WriteOp::Update {
            resource_type,
            id,
            resource,
            if_match: None,
        } => store
            .prepare_put(&resource_type, &id, resource)
            .map(WriteOp::Put)
            .map_err(|e| e.to_string()),
        other => Ok(other),
    };
    let files = source::collect_inputs(paths)?;
    let rebuild = match options.index_build {
        IndexBuild::Inline => false,
        IndexBuild::Rebuild => true,
        IndexBuild::Auto => input_bytes(&files)? >= store.stored_bytes()?,
    };
    let (mut summary, build) = store::with_index_upkeep_suspended(store, rebuild, |suspended| {
        let loaded = run(&mut StoreSink { store }, &prepare, files, options, progress);
        if suspended {
            let mut state = LoadProgress {
                building_indexes: true,
                ..Default::default()
            };
            if let Ok(summary) = &loaded {
                state.files_total = summary.files;
                state.files_done = summary.files;
                state.resources = summary.written() + summary.deleted;
                state.invalid = summary.invalid;
                state.elapsed = summary.elapsed;
            }
            progress(&state);
        }
        loaded
    })?;
    if let Some(took) = build {
        summary.index_build = Some(took);
        summary.elapsed += took;
    }
    Ok(summary)
}

/// Bytes of input, gzipped files counted at five times their size (JSON compresses about 5–10x).
fn input_bytes(files: &[PathBuf]) -> Result<u64, LoadError> {
    let mut total = 0u64;
    for f in files {
        let len = std::fs::metadata(f)
            .map_err(|source| LoadError::Io {
                path: f.clone(),
                source,
            })?
            .len();
        let factor = if source::is_gzip(f) { 5 } else { 1 };
        total = total.saturating_add(len.saturating_mul(factor));
    }
    Ok(total)
}

/// Load files or folders into a running server (`fhirhose load --server URL`): batch Bundles of
/// `PUT Type/id` entries to `POST {base_url}/`.
pub fn load_to_server(
    base_url: &str,
    paths: &[PathBuf],
    options: &LoadOptions,
    progress: &mut dyn FnMut(&LoadProgress),
) -> Result<LoadSummary, LoadError> {
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()
        .map_err(|e| LoadError::Http(e.to_string()))?;
    let mut sink = HttpSink {
        client,
        url: format!("{}/", base_url.trim_end_matches('/')),
    };
    let files = source::collect_inputs(paths)?;
    run(&mut sink, &|op| Ok(op), files, options, progress)
}

/// Turns a validated op into what the sink writes, on a parsing thread; an `Err` is reported as
/// a problem of that resource.
type PrepareFn<'a> = dyn Fn(WriteOp) -> Result<WriteOp, String> + Sync + 'a;

/// A unit of one file travelling from the reading thread to a parsing thread.
struct Work {
    seq: u64,
    file: usize,
    /// The file's last unit: when it is written, the file is done.
    last_of_file: bool,
    unit: Result<Option<source::Unit>, LoadError>,
}

/// A parsed unit travelling from a parsing thread to the writer.
struct Parsed {
    seq: u64,
    file: usize,
    last_of_file: bool,
    ops: Vec<(WriteOp, Location)>,
    /// Each problem with the number of `ops` that precede it in the unit.
    problems: Vec<(usize, Problem)>,
    unresolved: u64,
    failed: Option<LoadError>,
}

/// The pipeline: one thread reads and decompresses the inputs into units (NDJSON line batches or
/// whole `.json` files), as many threads as there are cores parse, resolve, validate and prepare
/// them, and the calling thread gathers them in input order into chunks of `chunk_size`
/// resources, each written as one transaction by a writing thread ([`write_in_order`]). At most `2 × parsers + 2` units are in flight. Parsing threads run at a lower
/// priority than the writer, the one serial stage (see [`crate::sched`]).
fn run(
    sink: &mut dyn Sink,
    prepare: &PrepareFn<'_>,
    files: Vec<PathBuf>,
    options: &LoadOptions,
    progress: &mut dyn FnMut(&LoadProgress),
) -> Result<LoadSummary, LoadError> {
    let started = Instant::now();
    let parsers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let refs = collect_references(&files)?;
    let mut summary = LoadSummary {
        files: files.len(),
        ..Default::default()
    };
    let mut state = LoadProgress {
        files_total: files.len(),
        ..Default::default()
    };
    progress(&state);

    let names: Vec<Arc<Path>> = files.iter().map(|f| Arc::from(f.as_path())).collect();
    let in_flight = 2 * parsers + 2;
    let (permit_tx, permit_rx) = sync_channel::<()>(in_flight);
    let (work_tx, work_rx) = sync_channel::<Work>(in_flight);
    let work_rx = Mutex::new(work_rx);
    let (parsed_tx, parsed_rx) = channel::<Parsed>();
    let validate = options.validate;
    std::thread::scope(|scope| {
        let files = &files;
        scope.spawn(move || read_all(files, permit_tx, work_tx));
        for _ in 0..parsers {
            let parsed_tx = parsed_tx.clone();
            let (work_rx, names, refs) = (&work_rx, &names, &refs);
            scope.spawn(move || {
                crate::sched::lower_this_threads_priority();
                loop {
                    let next = work_rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                    let Ok(work) = next else { break };
                    let parsed = parse_unit(work, names, refs, validate, prepare);
                    if parsed_tx.send(parsed).is_err() {
                        break;
                    }
                }
            });
        }
        drop(parsed_tx);
        // Returning (on error too) drops the receivers, which stops the other threads.
        write_in_order(
            sink,
            parsed_rx,
            permit_rx,
            options,
            &mut summary,
            &mut state,
            started,
            progress,
        )
    })?;
    summary.elapsed = started.elapsed();
    Ok(summary)
}

/// The pre-pass over the `.json` inputs (`fullUrl → Type/id`), files read in parallel (rayon);
/// entries are added in input order, so a later file wins as in a sequential pass.
fn collect_references(files: &[PathBuf]) -> Result<ReferenceMap, LoadError> {
    let found: Vec<_> = files.par_iter().map(|f| source::full_urls(f)).collect();
    let mut refs = ReferenceMap::new();
    for r in found {
        for (full_url, ty, id) in r? {
            refs.insert(full_url, &ty, &id);
        }
    }
    Ok(refs)
}

/// The reading thread: every file's units in order, each behind a permit (the writer returns
/// one per unit written). Stops quietly when the writer has gone.
fn read_all(files: &[PathBuf], permits: SyncSender<()>, work: SyncSender<Work>) {
    let mut seq = 0u64;
    let mut send =
        |file: usize, last_of_file: bool, unit: Result<Option<source::Unit>, LoadError>| {
            permits.send(()).map_err(|_| ())?;
            seq += 1;
            work.send(Work {
                seq,
                file,
                last_of_file,
                unit,
            })
            .map_err(|_| ())
        };
    for (i, file) in files.iter().enumerate() {
        // One unit is held back, so that the file's last one is known as such.
        let mut held: Option<source::Unit> = None;
        let mut stopped = false;
        let read = source::read_units(file, &mut |unit| {
            if let Some(prev) = held.replace(unit)
                && send(i, false, Ok(Some(prev))).is_err()
            {
                stopped = true;
                // Any error value stops read_units; it is discarded.
                return Err(LoadError::Http(String::new()));
            }
            Ok(())
        });
        if stopped {
            return;
        }
        let last = match read {
            Ok(()) => Ok(held),
            Err(e) => Err(e),
        };
        let failed = last.is_err();
        if send(i, true, last).is_err() || failed {
            return;
        }
    }
}

/// A parsing thread's work on one unit.
fn parse_unit(
    work: Work,
    names: &[Arc<Path>],
    refs: &ReferenceMap,
    validate: bool,
    prepare: &PrepareFn<'_>,
) -> Parsed {
    let mut parsed = Parsed {
        seq: work.seq,
        file: work.file,
        last_of_file: work.last_of_file,
        ops: Vec::new(),
        problems: Vec::new(),
        unresolved: 0,
        failed: None,
    };
    let unit = match work.unit {
        Ok(Some(unit)) => unit,
        Ok(None) => return parsed,
        Err(e) => {
            parsed.failed = Some(e);
            return parsed;
        }
    };
    let problem = |parsed: &mut Parsed, location: Location, message: String| {
        let at = parsed.ops.len();
        parsed.problems.push((
            at,
            Problem {
                location: location.to_string(),
                message,
            },
        ));
    };
    let file = &names[work.file];
    // Each Bundle entry is handled as soon as it is parsed, while it is in the CPU caches.
    // `stream_unit_items` only fails when the callback does, which this one never does.
    let _ = source::stream_unit_items(file, unit, &mut |event| {
        let item = match event {
            source::UnitEvent::Item(item) => item,
            // The document proved malformed after some entries: they are void.
            source::UnitEvent::Restart => {
                parsed.ops.clear();
                parsed.problems.clear();
                parsed.unresolved = 0;
                return Ok(());
            }
        };
        let mut unresolved = 0;
        match item.and_then(|item| prepare_item(item, refs, validate, &mut unresolved)) {
            Ok((op, location)) => match prepare(op) {
                Ok(op) => parsed.ops.push((op, location)),
                Err(message) => problem(&mut parsed, location, message),
            },
            Err((location, message)) => problem(&mut parsed, location, message),
        }
        parsed.unresolved += unresolved;
        Ok(())
    });
    parsed
}

/// The writer: parsed units in input order (out-of-order arrivals wait in a small buffer),
/// resources gathered into transactions of `chunk_size`. With `strict`, the resources before the
/// first invalid one are written, then the load stops.
///
/// The sink writes on a thread of its own, one chunk at a time: while chunk N is written, this
/// thread gathers chunk N+1 (so the parsing threads keep working while the database does; on
/// PostgreSQL the database's work on a chunk is as long as parsing it). Chunk N+1 is handed over
/// only after chunk N succeeded, so a failed write stops the load before anything after it is
/// written, as before; at most two chunks are held in memory.
#[allow(clippy::too_many_arguments)]
fn write_in_order(
    sink: &mut dyn Sink,
    parsed: Receiver<Parsed>,
    permits: Receiver<()>,
    options: &LoadOptions,
    summary: &mut LoadSummary,
    state: &mut LoadProgress,
    started: Instant,
    progress: &mut dyn FnMut(&LoadProgress),
) -> Result<(), LoadError> {
    let chunk_size = options.chunk_size.max(1);
    std::thread::scope(|scope| {
        let (chunk_tx, chunk_rx) = sync_channel::<Vec<(WriteOp, Location)>>(0);
        let (done_tx, done_rx) = sync_channel::<Result<LoadSummary, LoadError>>(1);
        scope.spawn(move || {
            for chunk in chunk_rx {
                let mut part = LoadSummary::default();
                let written = sink.write(chunk, &mut part, options).map(|()| part);
                if done_tx.send(written).is_err() {
                    break;
                }
            }
        });
        let mut writing = false;
        // Collect the chunk being written (if any) into `summary`; then hand `batch` over, and
        // with `wait` also wait until it is written.
        let mut flush = |batch: &mut Vec<(WriteOp, Location)>,
                         wait: bool,
                         summary: &mut LoadSummary,
                         state: &mut LoadProgress,
                         progress: &mut dyn FnMut(&LoadProgress)|
         -> Result<(), LoadError> {
            let collect = |writing: &mut bool, summary: &mut LoadSummary| {
                if std::mem::take(writing) {
                    let part = done_rx.recv().map_err(|_| LoadError::WriterStopped)??;
                    summary.merge(part, options.max_reported_problems);
                }
                Ok::<(), LoadError>(())
            };
            collect(&mut writing, summary)?;
            if !batch.is_empty() {
                let full = std::mem::replace(batch, Vec::with_capacity(chunk_size));
                chunk_tx.send(full).map_err(|_| LoadError::WriterStopped)?;
                writing = true;
                if wait {
                    collect(&mut writing, summary)?;
                }
            }
            state.resources = summary.written() + summary.deleted;
            state.invalid = summary.invalid;
            state.elapsed = started.elapsed();
            progress(state);
            Ok(())
        };
        let mut waiting: BTreeMap<u64, Parsed> = BTreeMap::new();
        let mut next = 1u64;
        let mut batch: Vec<(WriteOp, Location)> = Vec::with_capacity(chunk_size);
        for unit in parsed {
            waiting.insert(unit.seq, unit);
            while let Some(unit) = waiting.remove(&next) {
                next += 1;
                let _ = permits.try_recv();
                if let Some(e) = unit.failed {
                    flush(&mut batch, true, summary, state, progress)?;
                    return Err(e);
                }
                summary.unresolved_references += unit.unresolved;
                let mut problems = unit.problems.into_iter().peekable();
                for (i, op) in unit.ops.into_iter().enumerate() {
                    while let Some((_, p)) = problems.next_if(|(at, _)| *at <= i) {
                        report(p, &mut batch, summary, state, options, &mut flush, progress)?;
                    }
                    batch.push(op);
                    if batch.len() >= chunk_size {
                        flush(&mut batch, false, summary, state, progress)?;
                    }
                }
                for (_, p) in problems {
                    report(p, &mut batch, summary, state, options, &mut flush, progress)?;
                }
                if unit.last_of_file {
                    state.files_done = unit.file + 1;
                }
            }
        }
        flush(&mut batch, true, summary, state, progress)
    })
}

type FlushFn<'a> = dyn FnMut(
        &mut Vec<(WriteOp, Location)>,
        bool,
        &mut LoadSummary,
        &mut LoadProgress,
        &mut dyn FnMut(&LoadProgress),
    ) -> Result<(), LoadError>
    + 'a;

/// Count a skipped resource, or with `strict` write what precedes it and stop.
fn report(
    p: Problem,
    batch: &mut Vec<(WriteOp, Location)>,
    summary: &mut LoadSummary,
    state: &mut LoadProgress,
    options: &LoadOptions,
    flush: &mut FlushFn<'_>,
    progress: &mut dyn FnMut(&LoadProgress),
) -> Result<(), LoadError> {
    if options.strict {
        flush(batch, true, summary, state, progress)?;
        return Err(LoadError::Invalid {
            location: p.location,
            message: p.message,
        });
    }
    summary.problem(p.location, p.message, options.max_reported_problems);
    Ok(())
}

/// Turn one input item into a write op: keep/derive the id, rewrite references, validate.
fn prepare_item(
    item: Item,
    refs: &ReferenceMap,
    validate: bool,
    unresolved: &mut u64,
) -> Result<(WriteOp, Location), (Location, String)> {
    let location = item.location;
    let mut resource = match item.content {
        ItemContent::Delete { resource_type, id } => {
            if !store::is_valid_id(&id) || !store::is_valid_type_name(&resource_type) {
                return Err((
                    location,
                    format!("invalid DELETE target {resource_type}/{id}"),
                ));
            }
            return Ok((
                WriteOp::Delete {
                    resource_type,
                    id,
                    if_match: None,
                },
                location,
            ));
        }
        ItemContent::Resource(r) => r,
    };
    let Some(resource_type) = resource
        .get("resourceType")
        .and_then(Value::as_str)
        .map(str::to_string)
    else {
        return Err((location, "not a resource (no resourceType)".into()));
    };
    let own_id = resource.get("id").and_then(Value::as_str);
    if let Some(id) = own_id
        && !store::is_valid_id(id)
    {
        return Err((location, format!("{resource_type}.id: invalid id '{id}'")));
    }
    let id = source::loader_id(item.full_url.as_deref(), own_id);
    refs.rewrite(&mut resource, &resource_type, &mut |_, _| *unresolved += 1);
    if validate && let Some(message) = validation_problem(&resource) {
        return Err((location, message));
    }
    let op = match id {
        Some(id) => {
            resource["id"] = Value::String(id.clone());
            WriteOp::Update {
                resource_type,
                id,
                resource,
                if_match: None,
            }
        }
        None => WriteOp::Create { resource },
    };
    Ok((op, location))
}

/// What the R4 model finds wrong with `resource` (its first three issues), or `None` when it is
/// valid: the loader's check, shared with `$import` ([`crate::import`]).
pub(crate) fn validation_problem(resource: &Value) -> Option<String> {
    if let Some(issue) = crate::bundle::subsetted_issue(resource) {
        return Some(issue.to_string());
    }
    let issues = fhir_model::r4().validate(resource).err()?;
    let shown: Vec<String> = issues.iter().take(3).map(|i| i.to_string()).collect();
    let more = if issues.len() > 3 {
        format!(" (+{} more)", issues.len() - 3)
    } else {
        String::new()
    };
    Some(format!("{}{more}", shown.join("; ")))
}

/// Where chunks go (written on a thread of their own, see [`write_in_order`]).
trait Sink: Send {
    fn write(
        &mut self,
        ops: Vec<(WriteOp, Location)>,
        summary: &mut LoadSummary,
        options: &LoadOptions,
    ) -> Result<(), LoadError>;
}

struct StoreSink<'a> {
    store: &'a dyn Store,
}

impl Sink for StoreSink<'_> {
    fn write(
        &mut self,
        ops: Vec<(WriteOp, Location)>,
        summary: &mut LoadSummary,
        _options: &LoadOptions,
    ) -> Result<(), LoadError> {
        let ops: Vec<WriteOp> = ops.into_iter().map(|(op, _)| op).collect();
        // Validated create-or-update ops without If-Match cannot conflict: a failure here is a
        // storage failure and stops the load.
        for o in self.store.write(ops)? {
            count(summary, &o.resource_type, o.status);
        }
        Ok(())
    }
}

fn count(summary: &mut LoadSummary, resource_type: &str, status: WriteStatus) {
    match status {
        WriteStatus::Created | WriteStatus::Updated => {
            match summary.per_type.get_mut(resource_type) {
                Some(n) => *n += 1,
                None => {
                    summary.per_type.insert(resource_type.to_string(), 1);
                }
            }
        }
        WriteStatus::Deleted => summary.deleted += 1,
        WriteStatus::DeleteNotFound => {}
    }
}

/// Sends of one batch answered 503 or 429 before `load --server` gives up.
const REMOTE_TRIES: u32 = 6;

/// How long the server asks `load --server` to wait: its `Retry-After` as the export client
/// reads it (seconds or an HTTP date), 1 s when absent, at most 30 s.
fn retry_after(response: &reqwest::blocking::Response) -> std::time::Duration {
    client::retry_after(response.headers())
        .unwrap_or(std::time::Duration::from_secs(1))
        .clamp(
            std::time::Duration::from_secs(1),
            std::time::Duration::from_secs(30),
        )
}

struct HttpSink {
    client: reqwest::blocking::Client,
    url: String,
}

impl Sink for HttpSink {
    fn write(
        &mut self,
        ops: Vec<(WriteOp, Location)>,
        summary: &mut LoadSummary,
        options: &LoadOptions,
    ) -> Result<(), LoadError> {
        // `load_to_server` prepares nothing (its ops stay JSON); a prepared op has no body to send.
        if ops.iter().any(|(op, _)| matches!(op, WriteOp::Put(_))) {
            return Err(LoadError::Http(
                "a store-prepared resource cannot be sent to a server".into(),
            ));
        }
        let mut kinds = Vec::with_capacity(ops.len());
        let mut locations = Vec::with_capacity(ops.len());
        let entries: Vec<Value> = ops
            .into_iter()
            .map(|(op, location)| {
                locations.push(location);
                match op {
                    WriteOp::Update {
                        resource_type,
                        id,
                        resource,
                        ..
                    }
                    | WriteOp::Replace {
                        resource_type,
                        id,
                        resource,
                        ..
                    } => {
                        let url = format!("{resource_type}/{id}");
                        kinds.push((resource_type, false));
                        json!({"resource": resource, "request": {"method": "PUT", "url": url}})
                    }
                    WriteOp::Create { resource } => {
                        let ty = resource
                            .get("resourceType")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_string();
                        kinds.push((ty.clone(), false));
                        json!({"resource": resource, "request": {"method": "POST", "url": ty}})
                    }
                    WriteOp::Delete {
                        resource_type, id, ..
                    } => {
                        let url = format!("{resource_type}/{id}");
                        kinds.push((resource_type, true));
                        json!({"request": {"method": "DELETE", "url": url}})
                    }
                    // Refused above.
                    WriteOp::Put(_) => Value::Null,
                }
            })
            .collect();
        // Only a batch of PUTs and DELETEs may be sent again: a POST that was made before the
        // server answered would be made twice.
        let idempotent = entries.iter().all(|e| e["request"]["method"] != "POST");
        let body = json!({"resourceType": "Bundle", "type": "batch", "entry": entries});
        // Shared, not copied, by each send.
        let body = bytes::Bytes::from(
            serde_json::to_vec(&body).map_err(|e| LoadError::Http(e.to_string()))?,
        );
        let mut tries = 0;
        let (status, text) = loop {
            let response = self
                .client
                .post(&self.url)
                .header("Content-Type", "application/fhir+json")
                .header("Accept", "application/fhir+json")
                .body(body.clone())
                .send()
                .map_err(|e| LoadError::Http(e.to_string()))?;
            let status = response.status().as_u16();
            let wait = retry_after(&response);
            let text = response
                .text()
                .map_err(|e| LoadError::Http(e.to_string()))?;
            tries += 1;
            // 503 and 429 (the database restarting, the server's body memory or connection
            // share in use): the server says when to come back.
            if matches!(status, 429 | 503) && idempotent && tries < REMOTE_TRIES {
                tracing::warn!(
                    status,
                    wait_secs = wait.as_secs(),
                    try_no = tries,
                    "the server asks to retry the batch later"
                );
                std::thread::sleep(wait);
                continue;
            }
            break (status, text);
        };
        if status != 200 {
            return Err(LoadError::Server {
                status,
                body: text.chars().take(2000).collect(),
            });
        }
        let reply: Value = serde_json::from_str(&text)
            .map_err(|e| LoadError::Http(format!("response is not JSON: {e}")))?;
        let replies = reply
            .get("entry")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if replies.len() != kinds.len() {
            return Err(LoadError::Http(format!(
                "batch response has {} entries for {} requests",
                replies.len(),
                kinds.len()
            )));
        }
        for ((entry, (ty, delete)), location) in replies.iter().zip(kinds).zip(locations) {
            let st = entry
                .pointer("/response/status")
                .and_then(Value::as_str)
                .unwrap_or("");
            if st.starts_with('2') {
                if delete {
                    summary.deleted += 1;
                } else {
                    *summary.per_type.entry(ty).or_insert(0) += 1;
                }
            } else {
                let message = entry
                    .pointer("/response/outcome/issue/0/diagnostics")
                    .and_then(Value::as_str)
                    .map_or_else(|| format!("server answered {st}"), |d| format!("{st}: {d}"));
                if options.strict {
                    return Err(LoadError::Invalid {
                        location: location.to_string(),
                        message,
                    });
                }
                summary.problem(location.to_string(), message, options.max_reported_problems);
            }
        }
        Ok(())
    }
}
