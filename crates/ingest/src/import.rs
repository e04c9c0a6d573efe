//! `$import`'s write step: a chunk of NDJSON lines of one input, each checked like a resource of
//! the bulk loader (JSON, type, id, the R4 model) and prepared for the store on every core
//! ([`store::Store::prepare_put`]), then written in **one** store transaction.
//!
//! A chunk may be run again after a crash (the job queue records an input's progress after the
//! chunk's write, in another transaction), so a chunk is idempotent:
//!
//! - [`ImportMode::InitialLoad`] keeps each line's `id`, `meta.versionId` and
//!   `meta.lastUpdated` ([`store::PreparedResource::keeping_version`]): the stored bytes are the
//!   line's bytes when they came from a Fhirhose export. A `lastUpdated` later than the store's
//!   now is a line error, not clamped (why: `kept_version`). It never overwrites: a resource
//!   that exists already is a line error — unless it holds exactly the version the line
//!   describes (same version, same stored bytes), which is a re-run and counts as loaded.
//! - [`ImportMode::IncrementalLoad`] keeps ids and writes a new version like a `PUT` — unless the
//!   current version already has exactly the line's content, which writes nothing (a re-run,
//!   or an unchanged resource) and counts as loaded. Several lines of one id in a chunk are
//!   written in line order (a version each, none for a line equal to the one before); when the
//!   current version already has the content of the chunk's **last** line of that id, the chunk
//!   wrote them before a crash (or nothing changes): none is written again.
//!
//! Lines without an id are refused (a generated id would differ in a re-run and duplicate the
//! resource).

use std::collections::{HashMap, HashSet};

use rayon::prelude::*;
use serde_json::Value;
use store::{PreparedResource, Store, StoreError, WriteOp};

/// How `$import` writes (the `mode` parameter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportMode {
    /// Into an empty server, keeping `meta.versionId` and `meta.lastUpdated`.
    InitialLoad,
    /// New versions like a `PUT`.
    IncrementalLoad,
}

impl ImportMode {
    /// The parameter value (`InitialLoad`, `IncrementalLoad`).
    pub fn as_str(self) -> &'static str {
        match self {
            ImportMode::InitialLoad => "InitialLoad",
            ImportMode::IncrementalLoad => "IncrementalLoad",
        }
    }

    /// The mode named by `text` (exact, as Azure spells it).
    pub fn parse(text: &str) -> Option<ImportMode> {
        match text {
            "InitialLoad" => Some(ImportMode::InitialLoad),
            "IncrementalLoad" => Some(ImportMode::IncrementalLoad),
            _ => None,
        }
    }
}

/// One refused line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    /// 1-based line number in the input.
    pub line: u64,
    /// The resource, when the line named one (`Patient/p1`).
    pub resource: Option<String>,
    pub message: String,
    /// The OperationOutcome issue code (`invalid`, `structure`, `duplicate`).
    pub code: &'static str,
}

impl LineError {
    /// The line's OperationOutcome, one NDJSON line of the input's error file.
    pub fn to_outcome(&self) -> Value {
        let mut diagnostics = format!("line {}", self.line);
        if let Some(r) = &self.resource {
            diagnostics.push_str(&format!(" ({r})"));
        }
        diagnostics.push_str(": ");
        diagnostics.push_str(&self.message);
        serde_json::json!({
            "resourceType": "OperationOutcome",
            "issue": [{
                "severity": "error",
                "code": self.code,
                "diagnostics": diagnostics,
                "expression": [format!("line {}", self.line)],
            }]
        })
    }
}

/// What a chunk did.
#[derive(Debug, Clone, Default)]
pub struct ChunkOutcome {
    /// Lines whose resource is in the store now (written, or already there as the line says).
    pub loaded: u64,
    /// Lines refused, in line order.
    pub errors: Vec<LineError>,
}

fn line_error(
    line: u64,
    resource: Option<String>,
    code: &'static str,
    message: String,
) -> LineError {
    LineError {
        line,
        resource,
        message,
        code,
    }
}

/// A parsed, checked and prepared line.
struct Ready {
    line: u64,
    id: String,
    prepared: PreparedResource,
}

/// Parses and checks one line (CPU only; runs on the rayon pool).
fn prepare_line(
    store: &dyn Store,
    line: u64,
    bytes: &[u8],
    resource_type: &str,
    mode: ImportMode,
    stamps: Stamps,
) -> Result<Ready, LineError> {
    // The reader of every ingestion path: a repeated key is refused as REST refuses it.
    let resource: Value = crate::strict_json::from_slice(bytes)
        .map_err(|e| line_error(line, None, "structure", format!("not a JSON resource: {e}")))?;
    let Some(ty) = resource.get("resourceType").and_then(Value::as_str) else {
        return Err(line_error(
            line,
            None,
            "structure",
            "not a resource (no resourceType)".into(),
        ));
    };
    if ty != resource_type {
        return Err(line_error(
            line,
            None,
            "invalid",
            format!("resourceType '{ty}' is not the input's type '{resource_type}'"),
        ));
    }
    let id = match resource.get("id") {
        Some(Value::String(id)) if store::is_valid_id(id) => id.clone(),
        Some(Value::String(id)) => {
            return Err(line_error(
                line,
                None,
                "invalid",
                format!("invalid id '{id}'"),
            ));
        }
        _ => {
            return Err(line_error(
                line,
                None,
                "required",
                "an imported resource needs an id".into(),
            ));
        }
    };
    let named = || Some(format!("{resource_type}/{id}"));
    if let Some(message) = crate::loader::validation_problem(&resource) {
        return Err(line_error(line, named(), "invalid", message));
    }
    let kept = match mode {
        ImportMode::IncrementalLoad => None,
        ImportMode::InitialLoad => Some(
            kept_version(resource.get("meta"), stamps)
                .map_err(|message| line_error(line, named(), "invalid", message))?,
        ),
    };
    let prepared = store
        .prepare_put(resource_type, &id, resource)
        .map_err(|e| line_error(line, named(), "invalid", e.to_string()))?;
    let prepared = match kept {
        Some((version, ms)) => prepared.keeping_version(version, ms),
        None => prepared,
    };
    Ok(Ready { line, id, prepared })
}

/// The instants an InitialLoad line's `meta.lastUpdated` is set or bounded by.
#[derive(Debug, Clone, Copy)]
struct Stamps {
    /// What a line without `meta.lastUpdated` keeps: the job's start, the same in a re-run.
    default_ms: i64,
    /// The store's now, read before the chunk's write: the latest `meta.lastUpdated` kept.
    now_ms: i64,
}

/// The greatest `meta.versionId` InitialLoad keeps: 2^53 - 1, an integer every JSON reader
/// holds exactly, and far enough from `i64::MAX` that the versions later updates add never
/// overflow.
const MAX_KEPT_VERSION: i64 = (1 << 53) - 1;

/// The earliest `meta.lastUpdated` InitialLoad keeps, `0001-01-01T00:00:00Z`: an earlier
/// instant would be stored with a year FHIR's `instant` does not have (`0000`, or negative).
const MIN_KEPT_INSTANT_MS: i64 = -62_135_596_800_000;

/// The `(versionId, lastUpdated in ms)` an InitialLoad line keeps from its `meta`, or why the
/// line is refused.
///
/// `versionId` is the decimal text of a version this server writes (`1`, `2`, …, at most
/// [`MAX_KEPT_VERSION`]; `01` or `+1` are refused as `If-Match` refuses them); without one the
/// line is version 1. `lastUpdated` is a FHIR `instant` (date, time with seconds, time zone),
/// from `0001-01-01T00:00:00Z` on; without one the line keeps `stamps.default_ms`.
///
/// A `lastUpdated` later than the store's now (`stamps.now_ms`) is **refused**, not clamped.
/// Every `lastUpdated` this server stores is at most the instant of the transaction that wrote
/// it, and what reads by time rest on that: a `_since` export turns its instant into the first
/// transaction at or after it and its `transactionTime` is the instant of its last one, so a
/// version stamped in the future would be exported with a `lastUpdated` after the export's own
/// `transactionTime` (a client that takes its next `_since` from the newest `lastUpdated` it
/// received asks for a `_since` in the future, which is refused, or skips what was written in
/// between), and `_history?_since` and `_lastUpdated` searches would find it again until that
/// instant, out of history order. Clamping it to now would keep the data but silently change
/// the one thing InitialLoad promises to keep (the stored bytes are the line's bytes), and
/// make the line's content differ between a run and its re-run after a crash, which the
/// idempotence check compares. A future `lastUpdated` in a migration's data means the source's
/// clock or the data is wrong: the operator learns it from the line's error (and may load
/// those lines with IncrementalLoad, which stamps its own instants). Azure's `$import` is no
/// guide here: its documentation keeps `lastUpdated` only in incremental mode and does not say
/// what it does with a future one.
fn kept_version(meta: Option<&Value>, stamps: Stamps) -> Result<(i64, i64), String> {
    let version = match meta.and_then(|m| m.get("versionId")) {
        None => 1,
        Some(Value::String(v)) => canonical_version(v).ok_or_else(|| {
            format!(
                "meta.versionId '{v}' is not a version number from 1 to {MAX_KEPT_VERSION} \
                 without leading zeros (InitialLoad keeps it)"
            )
        })?,
        Some(_) => return Err("meta.versionId is not a string".into()),
    };
    let last_updated = match meta.and_then(|m| m.get("lastUpdated")) {
        None => stamps.default_ms,
        Some(Value::String(t)) => {
            let ms = instant_ms(t).ok_or_else(|| {
                format!(
                    "meta.lastUpdated '{t}' is not an instant (a date and a time with seconds \
                     and a time zone, from year 0001)"
                )
            })?;
            if ms > stamps.now_ms {
                return Err(format!(
                    "meta.lastUpdated '{t}' is in the future (the server's time is {}); \
                     InitialLoad keeps lastUpdated, and a version stamped after it was written \
                     would come back in every _since export and history until then: correct \
                     the source data, or load it with IncrementalLoad, which stamps the time \
                     of the write",
                    store::format_instant_ms(stamps.now_ms)
                ));
            }
            ms
        }
        Some(_) => return Err("meta.lastUpdated is not a string".into()),
    };
    Ok((version, last_updated))
}

/// The version `text` names when it is the text of one this server writes: decimal digits
/// without a leading zero, at most [`MAX_KEPT_VERSION`].
fn canonical_version(text: &str) -> Option<i64> {
    if text.is_empty() || text.starts_with('0') || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse::<i64>()
        .ok()
        .filter(|v| (1..=MAX_KEPT_VERSION).contains(v))
}

/// `text` as ms since the epoch when it is a FHIR `instant` (`YYYY-MM-DDThh:mm:ss[.s+]` and
/// `Z` or `±hh:mm`) no earlier than [`MIN_KEPT_INSTANT_MS`].
fn instant_ms(text: &str) -> Option<i64> {
    // RFC 3339 as chrono reads it also takes a lowercase `t`/`z` and a space for the `T`,
    // which FHIR's instant does not.
    let b = text.as_bytes();
    if b.len() < 20 || b.get(10) != Some(&b'T') || text.contains(['t', 'z', ' ']) {
        return None;
    }
    let t = chrono::DateTime::parse_from_rfc3339(text).ok()?;
    Some(t.timestamp_millis()).filter(|ms| *ms >= MIN_KEPT_INSTANT_MS)
}

/// A prepared line's content, to compare two lines of one id (the same version and instant on
/// both sides).
fn content(p: &PreparedResource) -> Vec<u8> {
    p.stored_json(1, "1970-01-01T00:00:00Z")
}

/// Checks, prepares and writes `lines` (`(line number, bytes)`, blank lines already left out)
/// of an input of `resource_type` in one store transaction. `default_last_updated_ms` is what an
/// InitialLoad line without `meta.lastUpdated` keeps (the job's start, the same in a re-run).
/// A store failure is the error (nothing of the chunk is written); refused lines are in the
/// outcome.
pub fn import_lines(
    store: &dyn Store,
    lines: &[(u64, Vec<u8>)],
    resource_type: &str,
    mode: ImportMode,
    default_last_updated_ms: i64,
) -> Result<ChunkOutcome, StoreError> {
    let stamps = Stamps {
        default_ms: default_last_updated_ms,
        now_ms: match mode {
            ImportMode::InitialLoad => store.now_ms()?,
            ImportMode::IncrementalLoad => i64::MAX,
        },
    };
    let prepared: Vec<Result<Ready, LineError>> = lines
        .par_iter()
        .map(|(n, bytes)| prepare_line(store, *n, bytes, resource_type, mode, stamps))
        .collect();
    let mut outcome = ChunkOutcome::default();
    let mut ready: Vec<Ready> = Vec::with_capacity(prepared.len());
    for r in prepared {
        match r {
            Ok(r) => ready.push(r),
            Err(e) => outcome.errors.push(e),
        }
    }
    // The index of each id's last line in this chunk.
    let mut last_of: HashMap<&str, usize> = HashMap::new();
    for (i, r) in ready.iter().enumerate() {
        last_of.insert(r.id.as_str(), i);
    }
    // IncrementalLoad, an id with several lines here: the content its latest line leaves
    // (`None`: the chunk's lines of it are in the store already).
    let mut chain: HashMap<&str, Option<Vec<u8>>> = HashMap::new();
    let mut seen: HashSet<&str> = HashSet::new();
    let mut write = vec![false; ready.len()];
    for (i, r) in ready.iter().enumerate() {
        let name = format!("{resource_type}/{}", r.id);
        if !seen.insert(r.id.as_str()) {
            if mode == ImportMode::InitialLoad {
                outcome.errors.push(line_error(
                    r.line,
                    Some(name),
                    "duplicate",
                    "the id occurs twice in this input (InitialLoad writes one version per id)"
                        .into(),
                ));
            } else if let Some(Some(before)) = chain.get_mut(r.id.as_str()) {
                let mine = content(&r.prepared);
                if *before == mine {
                    outcome.loaded += 1;
                } else {
                    *before = mine;
                    write[i] = true;
                }
            } else {
                outcome.loaded += 1;
            }
            continue;
        }
        let current = match store.read(resource_type, &r.id) {
            Ok(c) => Some(c),
            Err(StoreError::NotFound { .. }) => None,
            Err(StoreError::Gone { .. }) if mode == ImportMode::IncrementalLoad => None,
            Err(StoreError::Gone { .. }) => {
                outcome.errors.push(line_error(
                    r.line,
                    Some(name),
                    "duplicate",
                    "the resource exists (deleted) in the server; InitialLoad never overwrites (use IncrementalLoad)".into(),
                ));
                continue;
            }
            Err(e) => return Err(e),
        };
        match mode {
            ImportMode::InitialLoad => match current {
                None => write[i] = true,
                Some(c) => {
                    let same = r.prepared.kept_version().is_some_and(|(v, lu)| {
                        c.version == v && c.json == r.prepared.stored_json(v, lu)
                    });
                    if same {
                        // A re-run of a chunk written before a crash.
                        outcome.loaded += 1;
                    } else {
                        outcome.errors.push(line_error(
                            r.line,
                            Some(name),
                            "duplicate",
                            format!(
                                "the resource exists in the server (version {}); InitialLoad never overwrites (use IncrementalLoad)",
                                c.version
                            ),
                        ));
                    }
                }
            },
            ImportMode::IncrementalLoad => {
                // Whether the current version has exactly `p`'s content.
                let is_current = |p: &PreparedResource| {
                    current
                        .as_ref()
                        .is_some_and(|c| c.json == p.stored_json(c.version, &c.last_updated))
                };
                let last = last_of[r.id.as_str()];
                if last != i && is_current(&ready[last].prepared) {
                    // The chunk's last line of this id is the current version: written by
                    // this chunk before a crash (or unchanged); none of its lines is rewritten.
                    chain.insert(r.id.as_str(), None);
                    outcome.loaded += 1;
                } else {
                    if last != i {
                        chain.insert(r.id.as_str(), Some(content(&r.prepared)));
                    }
                    if is_current(&r.prepared) {
                        // Unchanged (or a re-run of a chunk written before a crash).
                        outcome.loaded += 1;
                    } else {
                        write[i] = true;
                    }
                }
            }
        }
    }
    let ops: Vec<WriteOp> = ready
        .into_iter()
        .zip(write)
        .filter_map(|(r, w)| w.then_some(WriteOp::Put(r.prepared)))
        .collect();
    if !ops.is_empty() {
        outcome.loaded += store.write(ops)?.len() as u64;
    }
    outcome.errors.sort_by_key(|e| e.line);
    Ok(outcome)
}
