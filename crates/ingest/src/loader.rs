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
//! 1. a cheap pre-pass over the `.json` Bundles collecting `fullUrl → Type/id`, so that
//!    `urn:uuid:` references resolve across files (forward references included);
//! 2. the load pass: each resource keeps its id (or takes the uuid of its `urn:uuid:` fullUrl),
//!    references are rewritten, the resource is validated against the R4 model, and chunks of
//!    `chunk_size` resources are written as `PUT Type/id` (create-or-update), so loading the same
//!    data twice makes new versions rather than duplicates.
//!
//! Parsing and validation run on a second thread while the first writes, so the two cores both
//! work. Invalid resources are reported with file and line (or entry index) and skipped, or stop
//! the load with `strict`. References that resolve to nothing (a `urn:` that names no loaded
//! fullUrl) are left unchanged and counted. NDJSON files take no part in the pre-pass: a
//! `urn:uuid:` reference to a resource that only occurs in NDJSON does not resolve.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::{Duration, Instant};

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
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            strict: false,
            validate: true,
            chunk_size: 1000,
            max_reported_problems: 1000,
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
    pub elapsed: Duration,
}

impl LoadSummary {
    /// Resources written (creates and updates).
    pub fn written(&self) -> u64 {
        self.per_type.values().sum()
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
    run(&mut StoreSink { store }, paths, options, progress)
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
    run(&mut sink, paths, options, progress)
}

/// A chunk travelling from the reading thread to the writer.
struct Chunk {
    ops: Vec<(WriteOp, Location)>,
    problems: Vec<Problem>,
    unresolved: u64,
    files_done: usize,
}

fn run(
    sink: &mut dyn Sink,
    paths: &[PathBuf],
    options: &LoadOptions,
    progress: &mut dyn FnMut(&LoadProgress),
) -> Result<LoadSummary, LoadError> {
    let started = Instant::now();
    let files = source::collect_inputs(paths)?;
    let mut refs = ReferenceMap::new();
    for f in &files {
        source::collect_full_urls(f, &mut refs)?;
    }
    let mut summary = LoadSummary {
        files: files.len(),
        ..Default::default()
    };
    let mut state = LoadProgress {
        files_total: files.len(),
        ..Default::default()
    };
    progress(&state);

    let (tx, rx) = sync_channel::<Chunk>(4);
    let chunk_size = options.chunk_size.max(1);
    let validate = options.validate;
    let strict = options.strict;
    std::thread::scope(|scope| {
        let reader = scope.spawn(|| produce(&files, &refs, chunk_size, validate, strict, tx));
        let written = consume(
            sink,
            rx,
            options,
            &mut summary,
            &mut state,
            started,
            progress,
        );
        // The reader stops when the receiver is gone (after an error here); its own error wins
        // only if the writer finished cleanly.
        let read = reader
            .join()
            .unwrap_or_else(|_| Err(LoadError::Http("reader thread panicked".into())));
        written.and(read)
    })?;
    summary.elapsed = started.elapsed();
    Ok(summary)
}

fn consume(
    sink: &mut dyn Sink,
    rx: Receiver<Chunk>,
    options: &LoadOptions,
    summary: &mut LoadSummary,
    state: &mut LoadProgress,
    started: Instant,
    progress: &mut dyn FnMut(&LoadProgress),
) -> Result<(), LoadError> {
    for chunk in rx {
        for p in chunk.problems {
            if options.strict {
                return Err(LoadError::Invalid {
                    location: p.location,
                    message: p.message,
                });
            }
            summary.problem(p.location, p.message, options.max_reported_problems);
        }
        summary.unresolved_references += chunk.unresolved;
        if !chunk.ops.is_empty() {
            sink.write(chunk.ops, summary, options)?;
        }
        state.files_done = chunk.files_done;
        state.resources = summary.written() + summary.deleted;
        state.invalid = summary.invalid;
        state.elapsed = started.elapsed();
        progress(state);
    }
    Ok(())
}

/// The reading thread: parse, resolve, validate, and send chunks.
fn produce(
    files: &[PathBuf],
    refs: &ReferenceMap,
    chunk_size: usize,
    validate: bool,
    strict: bool,
    tx: SyncSender<Chunk>,
) -> Result<(), LoadError> {
    let mut chunk = new_chunk(chunk_size, 0);
    // A closed channel means the writer stopped (error or strict); stop quietly.
    struct Stop;
    let send = |chunk: Chunk| -> Result<(), Stop> { tx.send(chunk).map_err(|_| Stop) };
    for (i, file) in files.iter().enumerate() {
        let mut stopped = false;
        let result = source::read_items(file, &mut |item| {
            match item.and_then(|item| prepare(item, refs, validate, &mut chunk.unresolved)) {
                Ok(op) => chunk.ops.push(op),
                Err((location, message)) => chunk.problems.push(Problem {
                    location: location.to_string(),
                    message,
                }),
            }
            let full = chunk.ops.len() >= chunk_size;
            if full || (strict && !chunk.problems.is_empty()) {
                let files_done = chunk.files_done;
                let ready = std::mem::replace(&mut chunk, new_chunk(chunk_size, files_done));
                if send(ready).is_err() {
                    stopped = true;
                    // Any error value stops read_items; it is discarded below.
                    return Err(LoadError::Http(String::new()));
                }
            }
            Ok(())
        });
        if stopped {
            return Ok(());
        }
        result?;
        chunk.files_done = i + 1;
    }
    let _ = send(chunk);
    Ok(())
}

fn new_chunk(chunk_size: usize, files_done: usize) -> Chunk {
    Chunk {
        ops: Vec::with_capacity(chunk_size),
        problems: Vec::new(),
        unresolved: 0,
        files_done,
    }
}

/// Turn one input item into a write op: keep/derive the id, rewrite references, validate.
fn prepare(
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
    if validate && let Err(issues) = fhir_model::r4().validate(&resource) {
        let shown: Vec<String> = issues.iter().take(3).map(|i| i.to_string()).collect();
        let more = if issues.len() > 3 {
            format!(" (+{} more)", issues.len() - 3)
        } else {
            String::new()
        };
        return Err((location, format!("{}{more}", shown.join("; "))));
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

/// Where chunks go.
trait Sink {
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
            *summary
                .per_type
                .entry(resource_type.to_string())
                .or_insert(0) += 1;
        }
        WriteStatus::Deleted => summary.deleted += 1,
        WriteStatus::DeleteNotFound => {}
    }
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
                }
            })
            .collect();
        let body = json!({"resourceType": "Bundle", "type": "batch", "entry": entries});
        let body = serde_json::to_vec(&body).map_err(|e| LoadError::Http(e.to_string()))?;
        let response = self
            .client
            .post(&self.url)
            .header("Content-Type", "application/fhir+json")
            .header("Accept", "application/fhir+json")
            .body(body)
            .send()
            .map_err(|e| LoadError::Http(e.to_string()))?;
        let status = response.status().as_u16();
        let text = response
            .text()
            .map_err(|e| LoadError::Http(e.to_string()))?;
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

/// The files a load would read, for a dry run or a progress bar sized by bytes.
pub fn input_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, LoadError> {
    source::collect_inputs(paths)
}

/// Total size in bytes of `files` (compressed size for `.gz`).
pub fn total_bytes(files: &[PathBuf]) -> u64 {
    files
        .iter()
        .filter_map(|f| std::fs::metadata(Path::new(f)).ok())
        .map(|m| m.len())
        .sum()
}
