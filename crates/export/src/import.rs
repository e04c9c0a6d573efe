//! `$import` in the Azure FHIR service's shape, run by the export job machinery.
//!
//! ```text
//! POST /$import  Prefer: respond-async
//! {"resourceType": "Parameters", "parameter": [
//!   {"name": "inputFormat", "valueString": "application/fhir+ndjson"},
//!   {"name": "mode", "valueString": "InitialLoad" | "IncrementalLoad"},
//!   {"name": "input", "part": [{"name": "type", "valueString": "Patient"},
//!                              {"name": "url", "valueUri": "<storage location>"}]}, …]}
//! ```
//!
//! An import is a job of the export queue ([`crate::jobs`]): its request (recorded as JSON with
//! `"operation": "import"`) lists the inputs, and it has one `scan` item per input, in input
//! order (item `n` reads input `n`), and a `finalize` item that writes the result. So it is
//! durable, leased, retried, resumed and cancelled exactly like an export. An input item reads
//! its NDJSON (`.gz` decompressed) from the configured storage ([`crate::sink::Sink`]: the local
//! folder, Azure or S3 — the same one exports write to) in chunks of lines; each chunk is
//! written to the store in one transaction ([`ingest::import::import_lines`], the loader's
//! checks) and then committed to the queue with the item's cursor (lines consumed), its count
//! of loaded resources and the chunk's error part (the refused lines as OperationOutcome
//! NDJSON). A crash between the two transactions re-runs the chunk, which is idempotent (see
//! [`ingest::import`]): every resource ends up stored and counted exactly once.
//!
//! Only objects of the import container of the configured storage can be named
//! (`--import-container`, `imports` by default): an input URL must be the storage's location of
//! an object there ([`Sink::location`]: `<container>/<path>` for the local folder,
//! `https://<account>.blob.core.windows.net/<container>/<path>` for Azure,
//! `s3://<bucket>/<container>/<path>` for S3), without query, fragment, `%` escapes or `..`;
//! anything else is refused at kick-off (400), so a client can neither read server files nor
//! make the server fetch an arbitrary URL, nor load (and learn the ids of, through the error
//! file's `Type/id` of each refused line) another client's export output: exports are written
//! to other containers, and none may write into the import container.

use std::io::{BufRead, BufReader, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};

use ingest::import::{ImportMode, import_lines};
use serde_json::{Value, json};
use store::Store;

use crate::error::{Column, RecordError};
use crate::jobs::{FileKind, JobQueue, JobRecord, NewFile, WorkItem};
use crate::request::RequestError;
use crate::run::{RunError, attempt_dir, finish_renames};
use crate::sink::{Sink, SinkError};

/// The one input format (`inputFormat`).
pub const INPUT_FORMAT: &str = "application/fhir+ndjson";
/// Most inputs in one request.
pub const MAX_INPUTS: usize = 1000;
/// Longest input URL.
const MAX_URL: usize = 2048;
/// Lines per chunk (one store transaction and one queue commit each).
pub const CHUNK_LINES: usize = 1000;
/// Bytes per chunk: a chunk ends after the line that passes it.
const CHUNK_BYTES: usize = 32 * 1024 * 1024;
/// Longest NDJSON line; a longer one is refused (an error line) without being held in memory.
pub const MAX_LINE_BYTES: usize = 64 * 1024 * 1024;

/// One input: a resource type and where its NDJSON is in the storage.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImportInput {
    #[serde(rename = "type")]
    pub resource_type: String,
    /// As the client sent it (reported back in the result).
    pub url: String,
    pub container: String,
    pub path: String,
}

/// A validated `$import` request, recorded with its job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportRequest {
    pub mode: ImportMode,
    pub inputs: Vec<ImportInput>,
    /// The kick-off URL (the result's `request`).
    pub request_url: String,
}

fn bad(param: &str, message: impl Into<String>) -> RequestError {
    RequestError {
        param: param.to_string(),
        message: message.into(),
    }
}

/// The string value of a Parameters `parameter` (or part): `valueString`, `valueUri`,
/// `valueUrl` or `valueCode`.
fn string_value(p: &Value) -> Option<&str> {
    ["valueString", "valueUri", "valueUrl", "valueCode"]
        .iter()
        .find_map(|k| p.get(*k).and_then(Value::as_str))
}

/// Where `url` lies in the storage of `sink`: `(container, path)` when it is the location of an
/// object there ([`Sink::location`]), else `None`.
pub fn storage_object(sink: &dyn Sink, url: &str) -> Option<(String, String)> {
    if url.len() > MAX_URL
        || url
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || matches!(c, '?' | '#' | '%' | '\\'))
    {
        return None;
    }
    let probe = sink.location("c0ntainer", "p4th");
    let base = probe.strip_suffix("c0ntainer/p4th")?;
    let rest = url.strip_prefix(base)?;
    let (container, path) = rest.split_once('/')?;
    if !crate::request::valid_container(container)
        || crate::request::RESERVED_CONTAINERS.contains(&container)
    {
        return None;
    }
    let segments_ok = path
        .split('/')
        .all(|s| !s.is_empty() && s != "." && s != ".." && !s.starts_with('.'));
    if !segments_ok || path.len() > 1024 {
        return None;
    }
    Some((container.to_string(), path.to_string()))
}

impl ImportRequest {
    /// Parses and checks the kick-off's Parameters: the format, the mode, and each input's type
    /// (an R4 resource type) and URL (an object of `sink`'s storage in `import_container`).
    pub fn parse(
        body: &Value,
        sink: &dyn Sink,
        import_container: &str,
        request_url: String,
    ) -> Result<ImportRequest, RequestError> {
        if body.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
            return Err(bad("resourceType", "$import takes a Parameters resource"));
        }
        let params = crate::request::parameter_list(body)?;
        if params.is_empty() {
            return Err(bad("parameter", "the Parameters resource has no parameter"));
        }
        let mut format = None;
        let mut mode = None;
        let mut inputs = Vec::new();
        for p in params {
            let name = p.get("name").and_then(Value::as_str).unwrap_or("");
            match name {
                "inputFormat" => format = string_value(p),
                "mode" => {
                    let text = string_value(p).unwrap_or("");
                    mode = Some(ImportMode::parse(text).ok_or_else(|| {
                        bad(
                            "mode",
                            format!("mode '{text}' is neither InitialLoad nor IncrementalLoad"),
                        )
                    })?);
                }
                "input" => {
                    if inputs.len() >= MAX_INPUTS {
                        return Err(bad(
                            "input",
                            format!("at most {MAX_INPUTS} inputs per request"),
                        ));
                    }
                    let parts = p.get("part").and_then(Value::as_array);
                    let part = |n: &str| {
                        parts.and_then(|ps| {
                            ps.iter()
                                .find(|x| x.get("name").and_then(Value::as_str) == Some(n))
                                .and_then(string_value)
                        })
                    };
                    let Some(ty) = part("type") else {
                        return Err(bad("input", "an input needs a `type` part"));
                    };
                    if !fhir_model::r4().resource_types().iter().any(|t| t == ty) {
                        return Err(bad("input", format!("'{ty}' is not an R4 resource type")));
                    }
                    let Some(url) = part("url") else {
                        return Err(bad("input", "an input needs a `url` part"));
                    };
                    let Some((container, path)) = storage_object(sink, url)
                        .filter(|(container, _)| container == import_container)
                    else {
                        return Err(bad(
                            "input",
                            format!(
                                "input url '{}' is not an object of the import container of the server's {} storage (expected {})",
                                url.chars().take(200).collect::<String>(),
                                sink.kind(),
                                sink.location(import_container, "<path>")
                            ),
                        ));
                    };
                    inputs.push(ImportInput {
                        resource_type: ty.to_string(),
                        url: url.to_string(),
                        container,
                        path,
                    });
                }
                // Azure's optional parameters that change nothing here.
                "storageDetail" | "force" => {}
                other => {
                    return Err(bad(other, format!("unknown $import parameter '{other}'")));
                }
            }
        }
        match format {
            Some(INPUT_FORMAT) => {}
            Some(other) => {
                return Err(bad(
                    "inputFormat",
                    format!("inputFormat '{other}' is not supported (only {INPUT_FORMAT})"),
                ));
            }
            None => {
                return Err(bad(
                    "inputFormat",
                    format!("inputFormat is required ({INPUT_FORMAT})"),
                ));
            }
        }
        let mode =
            mode.ok_or_else(|| bad("mode", "mode is required (InitialLoad or IncrementalLoad)"))?;
        if inputs.is_empty() {
            return Err(bad("input", "at least one input is required"));
        }
        Ok(ImportRequest {
            mode,
            inputs,
            request_url,
        })
    }

    /// The resource types it writes.
    pub fn types(&self) -> Vec<String> {
        let mut types: Vec<String> = self
            .inputs
            .iter()
            .map(|i| i.resource_type.clone())
            .collect();
        types.sort();
        types.dedup();
        types
    }
}

/// What one input item needs.
pub struct InputContext<'a> {
    pub store: &'a dyn Store,
    pub queue: &'a dyn JobQueue,
    pub sink: &'a dyn Sink,
    pub job: &'a JobRecord,
    pub request: &'a ImportRequest,
    pub cancel: &'a AtomicBool,
    pub shutdown: &'a AtomicBool,
    /// Resources loaded so far by this item, for the status of this process.
    pub live: &'a dyn Fn(u64),
}

/// Reads one line into `buf` (without its newline), at most [`MAX_LINE_BYTES`]: `Ok(None)` at
/// the end, `Ok(Some(false))` for a longer line (skipped to its end, `buf` cleared).
fn read_line(reader: &mut dyn BufRead, buf: &mut Vec<u8>) -> std::io::Result<Option<bool>> {
    buf.clear();
    let n = (&mut *reader)
        .take(MAX_LINE_BYTES as u64 + 1)
        .read_until(b'\n', buf)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
        return Ok(Some(true));
    }
    if buf.len() <= MAX_LINE_BYTES {
        // The last line, without a newline.
        return Ok(Some(true));
    }
    // Too long: skip to the end of the line.
    buf.clear();
    loop {
        let chunk = reader.fill_buf()?;
        if chunk.is_empty() {
            break;
        }
        match chunk.iter().position(|b| *b == b'\n') {
            Some(i) => {
                reader.consume(i + 1);
                break;
            }
            None => {
                let len = chunk.len();
                reader.consume(len);
            }
        }
    }
    Ok(Some(false))
}

fn lease_stopped(queue: &dyn JobQueue, item: &WorkItem, scanned: u64) -> RunError {
    let now = chrono::Utc::now().timestamp_millis();
    match queue.heartbeat(item, scanned, now) {
        Ok(crate::jobs::Lease::JobStopped) => RunError::Stopped,
        Ok(_) => RunError::LeaseLost,
        Err(e) => RunError::Queue(e),
    }
}

/// Runs the item of one input from its committed cursor to the end of the input. Returns the
/// resources loaded by the item in all (this claim and the ones before it).
pub fn run_input(ctx: &InputContext<'_>, item: &WorkItem) -> Result<u64, RunError> {
    let input = usize::try_from(item.item_no - 1)
        .ok()
        .and_then(|index| ctx.request.inputs.get(index))
        .ok_or_else(|| RecordError::Invalid {
            job: ctx.job.id.clone(),
            column: Column::Request,
            reason: format!("work item {} names no recorded input", item.item_no),
        })?;
    // A previous holder may have committed error parts without renaming them.
    let mine: Vec<_> = ctx
        .queue
        .files(&item.job_id)?
        .into_iter()
        .filter(|f| f.item_no == item.item_no)
        .collect();
    finish_renames(ctx.sink, ctx.queue, ctx.job, &mine)?;
    let raw = ctx.sink.open_read(&input.container, &input.path)?;
    let raw: Box<dyn Read + Send> = if input.path.ends_with(".gz") {
        Box::new(flate2::read::MultiGzDecoder::new(raw))
    } else {
        raw
    };
    let mut reader = BufReader::with_capacity(256 * 1024, raw);
    let io = |e: std::io::Error| RunError::Sink(SinkError::from_io(&input.path, e));
    let mut line_no: u64 = 0;
    let mut buf = Vec::new();
    // Skip what committed chunks consumed.
    let cursor = u64::try_from(item.cursor).unwrap_or(0);
    while line_no < cursor {
        if read_line(&mut reader, &mut buf).map_err(io)?.is_none() {
            break;
        }
        line_no += 1;
    }
    let mut loaded = item.scanned;
    let mut parts = 0u32;
    // The job's start on the store's clock (its `transactionTime`, taken at kick-off from
    // `Store::now_ms`: PostgreSQL's clock, not the kick-off node's), the same in a re-run.
    let stamp_ms = store::parse_instant_ms(&ctx.job.transaction_time).unwrap_or(ctx.job.created_ms);
    loop {
        if ctx.cancel.load(Ordering::Relaxed) {
            return Err(RunError::Stopped);
        }
        if ctx.shutdown.load(Ordering::Relaxed) {
            return Err(RunError::Interrupted);
        }
        let mut lines: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut too_long: Vec<u64> = Vec::new();
        let mut bytes = 0usize;
        let mut end = false;
        while lines.len() < CHUNK_LINES && bytes < CHUNK_BYTES {
            match read_line(&mut reader, &mut buf).map_err(io)? {
                None => {
                    end = true;
                    break;
                }
                Some(ok) => {
                    line_no += 1;
                    if !ok {
                        too_long.push(line_no);
                    } else if !buf.iter().all(u8::is_ascii_whitespace) {
                        bytes += buf.len();
                        lines.push((line_no, std::mem::take(&mut buf)));
                    }
                }
            }
        }
        if lines.is_empty() && too_long.is_empty() && end {
            break;
        }
        let mut outcome = import_lines(
            ctx.store,
            &lines,
            &input.resource_type,
            ctx.request.mode,
            stamp_ms,
        )?;
        for n in too_long {
            outcome.errors.push(ingest::import::LineError {
                line: n,
                resource: None,
                message: format!("the line is longer than {MAX_LINE_BYTES} bytes"),
                code: "too-costly",
            });
        }
        outcome.errors.sort_by_key(|e| e.line);
        loaded += outcome.loaded;
        let mut files = Vec::new();
        if !outcome.errors.is_empty() {
            parts += 1;
            let temp = format!(
                "{}/errors-{}.ndjson",
                attempt_dir(&ctx.job.folder, item.item_no, item.attempt),
                parts
            );
            let mut w = crate::part::create(ctx.sink, &ctx.job.container, &temp, false)?;
            for e in &outcome.errors {
                let line = e.to_outcome().to_string();
                let werr = |err: std::io::Error| SinkError::from_io(&temp, err);
                w.write_all(line.as_bytes()).map_err(werr)?;
                w.write_all(b"\n").map_err(werr)?;
            }
            let (size, sha256) = w.finish_digest()?;
            files.push(NewFile {
                kind: FileKind::Error,
                resource_type: "OperationOutcome".into(),
                prefix: format!("errors-{}", item.item_no),
                count: outcome.errors.len() as u64,
                bytes: size,
                sha256,
                temp_path: temp,
            });
        }
        let now = chrono::Utc::now().timestamp_millis();
        let cursor = i64::try_from(line_no).unwrap_or(i64::MAX);
        let Some(records) = ctx.queue.commit_files(item, &files, cursor, loaded, now)? else {
            for f in &files {
                let _ = ctx.sink.delete_prefix(&ctx.job.container, &f.temp_path);
            }
            return Err(lease_stopped(ctx.queue, item, loaded));
        };
        finish_renames(ctx.sink, ctx.queue, ctx.job, &records)?;
        (ctx.live)(loaded);
        if end {
            break;
        }
    }
    Ok(loaded)
}

/// The result of a finished import (the status answer's body), in Azure's shape: per input
/// its count loaded, and each error file with the input it belongs to.
pub fn result(
    queue: &dyn JobQueue,
    job: &JobRecord,
    request: &ImportRequest,
    base_url: &str,
) -> Result<Value, RunError> {
    let items = queue.item_progress(&job.id)?;
    let files = queue.files(&job.id)?;
    let mut output = Vec::new();
    let mut error = Vec::new();
    for (i, input) in request.inputs.iter().enumerate() {
        let item_no = i as i64 + 1;
        let count = items
            .iter()
            .find(|p| p.item_no == item_no)
            .map_or(0, |p| p.scanned);
        output.push(json!({"type": input.resource_type, "count": count, "inputUrl": input.url}));
        for f in files
            .iter()
            .filter(|f| f.item_no == item_no && f.kind == FileKind::Error)
        {
            error.push(json!({
                "type": "OperationOutcome",
                "count": f.count,
                "inputUrl": input.url,
                "url": format!("{base_url}/import-files/{}/{}", job.id, f.name),
            }));
        }
    }
    Ok(json!({
        "transactionTime": job.transaction_time,
        "request": request.request_url,
        "output": output,
        "error": error,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::LocalSink;

    #[test]
    fn only_objects_of_the_storage_are_inputs() {
        let sink = LocalSink::new("/nonexistent-root");
        assert_eq!(
            storage_object(&sink, "imports/a/Patient.ndjson"),
            Some(("imports".into(), "a/Patient.ndjson".into()))
        );
        for url in [
            "/etc/passwd",
            "../etc/passwd",
            "imports/../../etc/passwd",
            "imports/a/../b.ndjson",
            "imports/%2e%2e/b",
            "http://169.254.169.254/latest/meta-data",
            "file:///etc/passwd",
            "imports/",
            "imports//x",
            "imports/.hidden",
            "anonymization/config.json",
            "Imports/x.ndjson",
            "imports/x.ndjson?sig=1",
            "imports",
        ] {
            assert_eq!(storage_object(&sink, url), None, "{url}");
        }
    }

    #[test]
    fn parameters_are_checked() {
        let sink = LocalSink::new("/nonexistent-root");
        let p = |params: Value| json!({"resourceType": "Parameters", "parameter": params});
        let input = |t: &str, u: &str| json!({"name": "input", "part": [{"name": "type", "valueString": t}, {"name": "url", "valueUri": u}]});
        let ok = ImportRequest::parse(
            &p(json!([
                {"name": "inputFormat", "valueString": INPUT_FORMAT},
                {"name": "mode", "valueString": "InitialLoad"},
                input("Patient", "imports/Patient.ndjson.gz"),
            ])),
            &sink,
            "imports",
            "u".into(),
        )
        .expect("valid");
        assert_eq!(ok.mode, ImportMode::InitialLoad);
        assert_eq!(ok.inputs[0].path, "Patient.ndjson.gz");
        let job = JobRecord {
            id: "j".into(),
            state: crate::jobs::JobState::Queued,
            request: crate::record::JobRequest::Import(ok.clone()).encode(),
            watermark: 0,
            transaction_time: String::new(),
            client_id: None,
            container: "exports".into(),
            folder: "j".into(),
            anonymization: None,
            result: None,
            failure_status: None,
            created_ms: 0,
            finished_ms: None,
            cleanup: crate::jobs::Cleanup::None,
        };
        assert_eq!(crate::record::import_request(&job).expect("an import"), ok);
        for (params, param) in [
            (
                json!([{"name": "mode", "valueString": "InitialLoad"}, input("Patient", "imports/p.ndjson")]),
                "inputFormat",
            ),
            (
                json!([{"name": "inputFormat", "valueString": "text/csv"}, {"name": "mode", "valueString": "InitialLoad"}, input("Patient", "imports/p.ndjson")]),
                "inputFormat",
            ),
            (
                json!([{"name": "inputFormat", "valueString": INPUT_FORMAT}, input("Patient", "imports/p.ndjson")]),
                "mode",
            ),
            (
                json!([{"name": "inputFormat", "valueString": INPUT_FORMAT}, {"name": "mode", "valueString": "Merge"}]),
                "mode",
            ),
            (
                json!([{"name": "inputFormat", "valueString": INPUT_FORMAT}, {"name": "mode", "valueString": "InitialLoad"}]),
                "input",
            ),
            (
                json!([{"name": "inputFormat", "valueString": INPUT_FORMAT}, {"name": "mode", "valueString": "InitialLoad"}, input("Patientt", "imports/p.ndjson")]),
                "input",
            ),
            (
                json!([{"name": "inputFormat", "valueString": INPUT_FORMAT}, {"name": "mode", "valueString": "InitialLoad"}, input("Patient", "/etc/passwd")]),
                "input",
            ),
            // Another container of the storage: export output, above all.
            (
                json!([{"name": "inputFormat", "valueString": INPUT_FORMAT}, {"name": "mode", "valueString": "InitialLoad"}, input("Patient", "exports/0123456789abcdef0123456789abcdef/Patient-1.ndjson")]),
                "input",
            ),
        ] {
            let e = ImportRequest::parse(&p(params.clone()), &sink, "imports", "u".into())
                .expect_err("refused");
            assert_eq!(e.param, param, "{params}: {}", e.message);
        }
    }
}
