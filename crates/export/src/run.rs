//! Running one export: scans of the pinned snapshot, filtered by level and `_typeFilter`, written
//! as NDJSON files rolled at a fixed number of resources.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::{Value, json};
use store::{IndexValue, SeqBounds, Store};

use crate::request::{ExportLevel, ExportRequest};

/// One output file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputFile {
    pub resource_type: String,
    pub name: String,
    pub count: u64,
}

/// What an export wrote.
#[derive(Debug, Default)]
pub struct RunOutput {
    pub files: Vec<OutputFile>,
    pub deleted: Vec<OutputFile>,
    pub errors: Vec<OutputFile>,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cancelled")]
    Cancelled,
    #[error("Group/{0} not found")]
    GroupNotFound(String),
    #[error("store: {0}")]
    Store(#[from] store::StoreError),
    #[error("writing {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("_typeFilter: {0}")]
    Filter(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RunError + '_ {
    move |source| RunError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// NDJSON files of one type, rolled every `max` resources; each file is written under a
/// `.part` name and renamed when complete.
struct Roller<'a> {
    dir: &'a Path,
    prefix: String,
    resource_type: String,
    max: u64,
    current: Option<(BufWriter<File>, PathBuf, PathBuf, u64)>,
    number: u32,
    done: Vec<OutputFile>,
}

impl<'a> Roller<'a> {
    fn new(dir: &'a Path, prefix: &str, resource_type: &str, max: u64) -> Self {
        Roller {
            dir,
            prefix: prefix.to_string(),
            resource_type: resource_type.to_string(),
            max: max.max(1),
            current: None,
            number: 0,
            done: Vec::new(),
        }
    }

    fn write(&mut self, line: &[u8]) -> Result<(), RunError> {
        if self.current.is_none() {
            self.number += 1;
            let name = format!("{}-{}.ndjson", self.prefix, self.number);
            let final_path = self.dir.join(&name);
            let part = self.dir.join(format!("{name}.part"));
            let f = File::create(&part).map_err(io(&part))?;
            self.current = Some((BufWriter::with_capacity(1 << 20, f), part, final_path, 0));
        }
        let Some((w, part, _, n)) = self.current.as_mut() else {
            return Ok(());
        };
        w.write_all(line).map_err(io(part))?;
        w.write_all(b"\n").map_err(io(part))?;
        *n += 1;
        if *n >= self.max {
            self.close()?;
        }
        Ok(())
    }

    fn close(&mut self) -> Result<(), RunError> {
        if let Some((w, part, final_path, n)) = self.current.take() {
            let f = w.into_inner().map_err(|e| RunError::Io {
                path: part.display().to_string(),
                source: e.into_error(),
            })?;
            f.sync_data().map_err(io(&part))?;
            fs::rename(&part, &final_path).map_err(io(&final_path))?;
            self.done.push(OutputFile {
                resource_type: self.resource_type.clone(),
                name: final_path
                    .file_name()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                count: n,
            });
        }
        Ok(())
    }
}

/// Which patients an export is about: `None` = every patient (Patient level without `patient`).
fn patient_scope(
    store: &dyn Store,
    req: &ExportRequest,
) -> Result<Option<HashSet<String>>, RunError> {
    let mut set: Option<HashSet<String>> = match &req.level {
        ExportLevel::System | ExportLevel::Patient => None,
        ExportLevel::Group(id) => {
            let mut members = HashSet::new();
            let mut seen = HashSet::new();
            group_members(store, id, &mut members, &mut seen, true)?;
            Some(members)
        }
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

/// Active members of a Group (nested Groups followed once): `inactive` members and members
/// whose `period` does not cover now are left out.
fn group_members(
    store: &dyn Store,
    id: &str,
    out: &mut HashSet<String>,
    seen: &mut HashSet<String>,
    top: bool,
) -> Result<(), RunError> {
    if !seen.insert(id.to_string()) {
        return Ok(());
    }
    let g = match store.read("Group", id) {
        Ok(g) => g,
        Err(store::StoreError::NotFound { .. } | store::StoreError::Gone { .. }) if top => {
            return Err(RunError::GroupNotFound(id.to_string()));
        }
        Err(store::StoreError::NotFound { .. } | store::StoreError::Gone { .. }) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let v: Value = serde_json::from_slice(&g.json).unwrap_or(Value::Null);
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    for m in v
        .get("member")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if m.get("inactive").and_then(Value::as_bool) == Some(true) {
            continue;
        }
        let start = m.pointer("/period/start").and_then(Value::as_str);
        let end = m.pointer("/period/end").and_then(Value::as_str);
        // Date-times compare as text when both are UTC ISO forms; partial dates compare by prefix.
        if start.is_some_and(|s| s > now.as_str())
            || end.is_some_and(|e| e < &now[..e.len().min(now.len())])
        {
            continue;
        }
        let Some(r) = m.pointer("/entity/reference").and_then(Value::as_str) else {
            continue;
        };
        if let Some(pid) = r.strip_prefix("Patient/") {
            out.insert(pid.to_string());
        } else if let Some(gid) = r.strip_prefix("Group/") {
            group_members(store, gid, out, seen, false)?;
        }
    }
    Ok(())
}

/// Whether a resource belongs to the Patient compartment of a patient in scope.
fn in_compartment(
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
                tags.push(json!({"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"}));
            }
        }
    }
    v
}

/// Runs the export into `dir` (which must be empty). `progress` is told about each type.
pub fn run_export(
    store: &dyn Store,
    req: &ExportRequest,
    watermark: i64,
    dir: &Path,
    file_max: u64,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(&str),
) -> Result<RunOutput, RunError> {
    fs::create_dir_all(dir).map_err(io(dir))?;
    let mut out = RunOutput::default();
    let mut filters = search::PredicateSet::new();
    for f in &req.type_filters {
        filters
            .add_type_filter(f)
            .map_err(|e| RunError::Filter(e.to_string()))?;
    }
    let scope = patient_scope(store, req)?;
    let by_patient = !matches!(req.level, ExportLevel::System) || !req.patients.is_empty();
    let since_after = match req.since_ms {
        // "Changed after the supplied time" (Bulk Data IG): lastUpdated > _since. Instants are
        // strictly increasing between transactions, so the next millisecond is the bound.
        Some(ms) => store.seq_at_or_after(ms.saturating_add(1))? - 1,
        None => 0,
    };
    let present = store.types_present(watermark)?;
    let types = req.effective_types(&present);
    let model = fhir_model::r4();
    for t in &types {
        let total = store.count_type(t, watermark)?;
        let compartment: Vec<String> = model
            .patient_compartment(t)
            .map(<[String]>::to_vec)
            .unwrap_or_default();
        let mut roller = Roller::new(dir, t, t, file_max);
        let mut seen: u64 = 0;
        let mut failure: Option<RunError> = None;
        let subset = element_subset(req, t);
        let needs_json = by_patient || filters.filters_type(t) || subset.is_some();
        let bounds = SeqBounds {
            after: since_after.max(0),
            up_to: i64::MAX,
        };
        store.scan_type_each(t, watermark, bounds, &mut |row| {
            seen += 1;
            if seen.is_multiple_of(2048) && cancel.load(Ordering::Relaxed) {
                failure = Some(RunError::Cancelled);
                return ControlFlow::Break(());
            }
            if seen.is_multiple_of(50_000) {
                progress(&format!("{t} {seen} of {total}"));
            }
            if let Some(until) = req.until_ms
                && store::parse_instant_ms(row.last_updated).is_some_and(|ms| ms > until)
            {
                return ControlFlow::Continue(());
            }
            let mut subsetted: Option<Vec<u8>> = None;
            if needs_json {
                let Ok(v) = serde_json::from_slice::<Value>(row.json) else {
                    return ControlFlow::Continue(());
                };
                if by_patient && !in_compartment(t, &v, &compartment, &scope) {
                    return ControlFlow::Continue(());
                }
                if !filters.matches(&v) {
                    return ControlFlow::Continue(());
                }
                if let Some(keep) = &subset {
                    subsetted = Some(apply_subset(v, keep).to_string().into_bytes());
                }
            }
            if let Err(e) = roller.write(subsetted.as_deref().unwrap_or(row.json)) {
                failure = Some(e);
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        })?;
        if let Some(e) = failure {
            return Err(e);
        }
        roller.close()?;
        out.files.extend(roller.done);
        progress(&format!("{t} {total} of {total}"));
    }
    // Deletions since `_since`, as transaction Bundles of DELETE entries (system level: a
    // tombstone carries no content to decide compartment membership).
    if req.since_ms.is_some() && matches!(req.level, ExportLevel::System) && req.patients.is_empty()
    {
        let all_types: Vec<String> = if req.types.is_empty() {
            model.resource_types().to_vec()
        } else {
            req.types.clone()
        };
        let mut roller = Roller::new(dir, "Deleted", "Bundle", file_max);
        for t in &all_types {
            let mut after = 0;
            loop {
                let page = store.deleted_since(t, since_after, watermark, after, 5000)?;
                if page.is_empty() {
                    break;
                }
                after = page.last().map_or(after, |p| p.seq);
                let entries: Vec<Value> = page
                    .iter()
                    .map(|d| json!({"request": {"method": "DELETE", "url": format!("{}/{}", d.resource_type, d.id)}}))
                    .collect();
                let b = json!({"resourceType": "Bundle", "type": "transaction", "entry": entries});
                roller.write(b.to_string().as_bytes())?;
            }
        }
        roller.close()?;
        out.deleted = roller.done;
    }
    if !req.warnings.is_empty() {
        let mut roller = Roller::new(dir, "OperationOutcome", "OperationOutcome", file_max);
        for w in &req.warnings {
            let oo = json!({"resourceType": "OperationOutcome", "issue": [{"severity": "warning", "code": "processing", "diagnostics": w}]});
            roller.write(oo.to_string().as_bytes())?;
        }
        roller.close()?;
        out.errors = roller.done;
    }
    Ok(out)
}
