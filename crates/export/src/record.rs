//! The typed payloads of a job record (issue 23 item 2). The job queue stores three JSON texts
//! per job ([`JobRecord::request`], [`JobRecord::anonymization`], [`JobRecord::result`]); this
//! module is the one place that writes and reads them, through serde structs:
//!
//! - the request: [`JobRequest::Export`] (`{"level", "group", "params", "post", "lenient",
//!   "url", "separate"}`) or [`JobRequest::Import`] (`{"operation": "import", "mode",
//!   "inputFormat", "inputs", "url"}`);
//! - the de-identification: [`AnonymizationInfo`];
//! - the result: the manifest of a complete job ([`manifest()`]), the diagnostics text of a
//!   failed one.
//!
//! Decoding is strict: a field this version does not know, a missing or mistyped field, an
//! invalid value or a `format` newer than [`FORMAT`] is a [`RecordError`] naming the job and the
//! column, with the cause as its source — never a default. The rows written are the same bytes
//! as before this module (format 1 is not written: a row without `format` is format 1), so no
//! migration is needed on either backend.

use ingest::import::ImportMode;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::anonymization::AnonymizationInfo;
pub use crate::error::{Column, RecordError};
use crate::import::{INPUT_FORMAT, ImportInput, ImportRequest};
use crate::jobs::JobRecord;
use crate::request::{ExportLevel, ExportRequest};

/// The payload format this version writes and reads.
pub const FORMAT: u32 = 1;

fn is_current(format: &u32) -> bool {
    *format == FORMAT
}

fn current() -> u32 {
    FORMAT
}

/// The level of a recorded export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Level {
    System,
    Patient,
    Group,
}

/// An export's recorded kick-off: enough for any worker, in any process, to parse it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportRecord {
    #[serde(default = "current", skip_serializing_if = "is_current")]
    format: u32,
    level: Level,
    /// The Group's id (Group level only).
    group: Option<String>,
    /// The kick-off parameters as sent (with the server's pinned defaults added).
    pub params: Vec<(String, String)>,
    post: bool,
    lenient: bool,
    url: String,
    /// `Prefer: separate-export-status` (absent in jobs recorded before it existed).
    #[serde(default)]
    separate: bool,
}

impl ExportRecord {
    pub fn new(
        level: &ExportLevel,
        params: &[(String, String)],
        post: bool,
        lenient: bool,
        url: &str,
        separate: bool,
    ) -> ExportRecord {
        let (level, group) = match level {
            ExportLevel::System => (Level::System, None),
            ExportLevel::Patient => (Level::Patient, None),
            ExportLevel::Group(g) => (Level::Group, Some(g.clone())),
        };
        ExportRecord {
            format: FORMAT,
            level,
            group,
            params: params.to_vec(),
            post,
            lenient,
            url: url.to_string(),
            separate,
        }
    }

    /// `system`, `patient` or `group`.
    pub fn level_name(&self) -> &'static str {
        match self.level {
            Level::System => "system",
            Level::Patient => "patient",
            Level::Group => "group",
        }
    }

    /// Whether the kick-off asked for `Prefer: separate-export-status`.
    pub fn separate(&self) -> bool {
        self.separate
    }

    /// The Group's id of a Group export.
    pub fn group(&self) -> Option<&str> {
        self.group.as_deref()
    }

    /// The request parsed again from the recorded parameters. `_since` was checked against the
    /// store's clock at kick-off (PostgreSQL: the database server's); it is not judged again
    /// here, against the clock of the node that happens to run the job (or its creation time on
    /// the kick-off node's clock, which may be behind the database's).
    pub fn request(&self, job: &str) -> Result<ExportRequest, RecordError> {
        let level = match (self.level, &self.group) {
            (Level::System, None) => ExportLevel::System,
            (Level::Patient, None) => ExportLevel::Patient,
            (Level::Group, Some(g)) => ExportLevel::Group(g.clone()),
            (Level::Group, None) => return Err(invalid(job, "a Group export without its Group")),
            (_, Some(_)) => return Err(invalid(job, "a Group id on a non-Group export")),
        };
        let mut req = ExportRequest::parse(
            level,
            &self.params,
            self.post,
            self.lenient,
            i64::MAX,
            self.url.clone(),
        )
        .map_err(|source| RecordError::Request {
            job: job.to_string(),
            source,
        })?;
        req.separate_status = self.separate;
        Ok(req)
    }
}

fn invalid(job: &str, reason: &str) -> RecordError {
    RecordError::Invalid {
        job: job.to_string(),
        column: Column::Request,
        reason: reason.to_string(),
    }
}

/// The `operation` of an import's record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Operation {
    Import,
}

/// An `$import`'s recorded request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportRecord {
    #[serde(default = "current", skip_serializing_if = "is_current")]
    format: u32,
    operation: Operation,
    mode: String,
    #[serde(rename = "inputFormat")]
    input_format: String,
    inputs: Vec<ImportInput>,
    url: String,
}

/// What a job records as its request.
#[derive(Debug, Clone)]
pub enum JobRequest {
    Export(ExportRecord),
    Import(ImportRequest),
}

impl JobRequest {
    /// The JSON text recorded in [`JobRecord::request`].
    pub fn encode(&self) -> String {
        let v = match self {
            JobRequest::Export(r) => serde_json::to_value(r),
            JobRequest::Import(r) => serde_json::to_value(ImportRecord {
                format: FORMAT,
                operation: Operation::Import,
                mode: r.mode.as_str().to_string(),
                input_format: INPUT_FORMAT.to_string(),
                inputs: r.inputs.clone(),
                url: r.request_url.clone(),
            }),
        };
        // Serializing these structs cannot fail (string keys, no maps of other keys).
        v.map(|v| v.to_string()).unwrap_or_default()
    }

    /// The request recorded on `job`.
    pub fn decode(job: &JobRecord) -> Result<JobRequest, RecordError> {
        let decode_err = |source| RecordError::Decode {
            job: job.id.clone(),
            column: Column::Request,
            source,
        };
        let v: Value = serde_json::from_str(&job.request).map_err(decode_err)?;
        check_format(&job.id, Column::Request, &v)?;
        if v.get("operation").is_none() {
            return serde_json::from_value(v)
                .map(JobRequest::Export)
                .map_err(decode_err);
        }
        let r: ImportRecord = serde_json::from_value(v).map_err(decode_err)?;
        let invalid = |reason: String| RecordError::Invalid {
            job: job.id.clone(),
            column: Column::Request,
            reason,
        };
        let mode = ImportMode::parse(&r.mode)
            .ok_or_else(|| invalid(format!("unknown import mode '{}'", r.mode)))?;
        if r.input_format != INPUT_FORMAT {
            return Err(invalid(format!(
                "unknown input format '{}'",
                r.input_format
            )));
        }
        Ok(JobRequest::Import(ImportRequest {
            mode,
            inputs: r.inputs,
            request_url: r.url,
        }))
    }

    /// The export request of an export job (`None` for an import).
    pub fn export(&self, job: &JobRecord) -> Result<Option<ExportRequest>, RecordError> {
        match self {
            JobRequest::Export(r) => r.request(&job.id).map(Some),
            JobRequest::Import(_) => Ok(None),
        }
    }
}

/// The import request recorded on `job`, which must be an import.
pub fn import_request(job: &JobRecord) -> Result<ImportRequest, RecordError> {
    match JobRequest::decode(job)? {
        JobRequest::Import(r) => Ok(r),
        JobRequest::Export(_) => Err(RecordError::Invalid {
            job: job.id.clone(),
            column: Column::Request,
            reason: "an export, not an import".into(),
        }),
    }
}

/// The export request recorded on `job`, which must be an export.
pub fn export_request(job: &JobRecord) -> Result<ExportRequest, RecordError> {
    JobRequest::decode(job)?
        .export(job)?
        .ok_or_else(|| RecordError::Invalid {
            job: job.id.clone(),
            column: Column::Request,
            reason: "an import, not an export".into(),
        })
}

/// Whether a job's recorded request is an import (an unreadable one is not: reading it as an
/// export then fails, naming why).
pub fn is_import(job: &JobRecord) -> bool {
    matches!(JobRequest::decode(job), Ok(JobRequest::Import(_)))
}

/// A `format` member newer than this version is refused before the shape is looked at.
fn check_format(job: &str, column: Column, v: &Value) -> Result<(), RecordError> {
    match v.get("format").map(Value::as_u64) {
        None => Ok(()),
        Some(Some(f)) if f == u64::from(FORMAT) => Ok(()),
        Some(found) => Err(RecordError::Format {
            job: job.to_string(),
            column,
            found: found
                .and_then(|f| u32::try_from(f).ok())
                .unwrap_or(u32::MAX),
        }),
    }
}

/// The JSON text recorded in [`JobRecord::anonymization`].
pub fn encode_anonymization(info: &AnonymizationInfo) -> String {
    serde_json::to_string(info).unwrap_or_default()
}

/// The de-identification recorded on `job` (`None`: a plain export).
pub fn anonymization(job: &JobRecord) -> Result<Option<AnonymizationInfo>, RecordError> {
    let Some(text) = &job.anonymization else {
        return Ok(None);
    };
    let v: Value = serde_json::from_str(text).map_err(|source| RecordError::Decode {
        job: job.id.clone(),
        column: Column::Anonymization,
        source,
    })?;
    check_format(&job.id, Column::Anonymization, &v)?;
    let mut v = v;
    if let Some(o) = v.as_object_mut() {
        o.remove("format");
    }
    serde_json::from_value(v)
        .map(Some)
        .map_err(|source| RecordError::Decode {
            job: job.id.clone(),
            column: Column::Anonymization,
            source,
        })
}

/// The manifest recorded on a complete job (`None` before it completes).
pub fn manifest(job: &JobRecord) -> Result<Option<Value>, RecordError> {
    let Some(text) = &job.result else {
        return Ok(None);
    };
    let v: Value = serde_json::from_str(text).map_err(|source| RecordError::Decode {
        job: job.id.clone(),
        column: Column::Result,
        source,
    })?;
    if !v.is_object() {
        return Err(RecordError::Invalid {
            job: job.id.clone(),
            column: Column::Result,
            reason: "the manifest is not a JSON object".into(),
        });
    }
    Ok(Some(v))
}

#[cfg(test)]
mod tests {
    use std::error::Error;

    use super::*;
    use crate::jobs::{Cleanup, JobState};

    fn job(request: &str) -> JobRecord {
        JobRecord {
            id: "j1".into(),
            state: JobState::Queued,
            request: request.into(),
            watermark: 0,
            transaction_time: String::new(),
            client_id: None,
            container: "exports".into(),
            folder: "j1".into(),
            anonymization: None,
            result: None,
            failure_status: None,
            created_ms: 0,
            finished_ms: None,
            cleanup: Cleanup::None,
        }
    }

    /// The text the service recorded before this module (its `json!` call): rows stay the same
    /// bytes, so no migration.
    const EXPORT_ROW: &str = r#"{"level":"group","group":"g1","params":[["_type","Patient"]],"post":false,"lenient":true,"url":"http://x/Group/g1/$export","separate":true}"#;
    const IMPORT_ROW: &str = r#"{"operation":"import","mode":"InitialLoad","inputFormat":"application/fhir+ndjson","inputs":[{"type":"Patient","url":"imports/p.ndjson","container":"imports","path":"p.ndjson"}],"url":"http://x/$import"}"#;

    #[test]
    fn rows_are_written_as_before_and_read_back() {
        let export = ExportRecord::new(
            &ExportLevel::Group("g1".into()),
            &[("_type".into(), "Patient".into())],
            false,
            true,
            "http://x/Group/g1/$export",
            true,
        );
        assert_eq!(JobRequest::Export(export).encode(), EXPORT_ROW);
        let JobRequest::Export(r) = JobRequest::decode(&job(EXPORT_ROW)).expect("decodes") else {
            panic!("an export");
        };
        let req = r.request("j1").expect("parses");
        assert_eq!(req.level, ExportLevel::Group("g1".into()));
        assert!(req.separate_status);

        let JobRequest::Import(import) = JobRequest::decode(&job(IMPORT_ROW)).expect("decodes")
        else {
            panic!("an import");
        };
        assert_eq!(import.mode, ImportMode::InitialLoad);
        assert_eq!(JobRequest::Import(import).encode(), IMPORT_ROW);
    }

    #[test]
    fn rows_of_before_separate_status_read_as_without_it() {
        let old = r#"{"level":"system","group":null,"params":[],"post":false,"lenient":true,"url":"http://x/$export"}"#;
        let JobRequest::Export(r) = JobRequest::decode(&job(old)).expect("decodes") else {
            panic!("an export");
        };
        assert!(!r.request("j1").expect("parses").separate_status);
    }

    #[test]
    fn unknown_or_invalid_payloads_are_refused_with_their_cause() {
        let cases = [
            // An unknown member (a newer version's, or a typo).
            (
                EXPORT_ROW.replace(r#""post""#, r#""extra":1,"post""#),
                "cannot be read",
            ),
            // A level this version does not know: never another level.
            (
                EXPORT_ROW.replace(r#""group","group""#, r#""cohort","group""#),
                "cannot be read",
            ),
            // A missing member.
            (
                EXPORT_ROW.replace(r#""lenient":true,"#, ""),
                "cannot be read",
            ),
            ("not json".to_string(), "cannot be read"),
            (EXPORT_ROW.replace('{', r#"{"format":2,"#), "has format 2"),
            (
                EXPORT_ROW.replace(r#""group":"g1""#, r#""group":null"#),
                "without its Group",
            ),
            (
                IMPORT_ROW.replace("InitialLoad", "Upsert"),
                "unknown import mode",
            ),
            (
                IMPORT_ROW.replace(r#""operation":"import""#, r#""operation":"delete""#),
                "cannot be read",
            ),
        ];
        for (row, says) in cases {
            let j = job(&row);
            let e = JobRequest::decode(&j)
                .and_then(|r| r.export(&j))
                .expect_err(&row);
            assert!(e.to_string().contains(says), "{row}: {e}");
            assert!(e.to_string().contains("job j1"), "{e}");
            if says == "cannot be read" {
                assert!(e.source().is_some(), "{row}: the cause is kept");
            }
            assert_eq!(e.status(), 500);
        }
        // Recorded parameters that no longer parse: a bad request found late (400).
        let row = EXPORT_ROW
            .replace(r#"["_type","Patient"]"#, r#"["_type","NoSuchType"]"#)
            .replace(r#""lenient":true"#, r#""lenient":false"#);
        let JobRequest::Export(r) = JobRequest::decode(&job(&row)).expect("decodes") else {
            panic!("an export");
        };
        let e = r.request("j1").expect_err("refused");
        assert_eq!(e.status(), 400);
        assert!(e.source().is_some());
    }

    #[test]
    fn anonymization_and_manifest_are_read_strictly() {
        let info = AnonymizationInfo {
            source: "storage".into(),
            name: "c.json".into(),
            etag: Some("e".into()),
            image: None,
            digest: None,
            fingerprint: "f".into(),
            config_text: "{}".into(),
            key_set: None,
            key_set_version: None,
        };
        let mut j = job(EXPORT_ROW);
        j.anonymization = Some(encode_anonymization(&info));
        assert_eq!(anonymization(&j).expect("reads"), Some(info));
        let text = j.anonymization.clone().unwrap_or_default();
        j.anonymization = Some(text.replace(r#""name""#, r#""surprise":true,"name""#));
        let e = anonymization(&j).expect_err("unknown member");
        assert!(e.to_string().contains("anonymization of job j1"), "{e}");
        assert!(e.source().is_some());

        j.result = Some(r#"{"output":[]}"#.into());
        assert!(manifest(&j).expect("reads").is_some());
        j.result = Some("[1]".into());
        assert!(manifest(&j).is_err());
        j.result = Some("{".into());
        assert!(manifest(&j).expect_err("not JSON").source().is_some());
    }
}
