//! De-identified export: the anonymizer configuration is fetched and compiled at kick-off (from
//! the destination's `anonymization` container, or from an OCI image), recorded on the job with
//! its ETag or digest and a fingerprint, and applied to every resource on the way out.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::RunError;
use crate::request::AnonymizationSpec;
use crate::sink::{Sink, SinkError, sha256_hex};

/// The container holding anonymizer configurations, beside the export containers (written
/// in [`crate::request`], which reserves it).
pub use crate::request::CONFIG_CONTAINER;
/// Largest accepted configuration.
pub const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// Why a de-identified export cannot start: each answers 400 at kick-off.
#[derive(Debug, thiserror::Error)]
pub enum AnonymizationError {
    #[error("Anonymization container not found on the destination storage.")]
    ContainerNotFound,
    #[error("Anonymization configuration '{0}' not found.")]
    NotFound(String),
    #[error("Anonymization configuration is too large > 1MB.")]
    TooLarge,
    #[error(
        "The ETag of anonymization configuration '{name}' is \"{actual}\", not the requested \"{expected}\"."
    )]
    EtagMismatch {
        name: String,
        expected: String,
        actual: String,
    },
    #[error("Failed to parse anonymization configuration '{name}': {message}")]
    Invalid { name: String, message: String },
    #[error("{0}")]
    Registry(String),
    #[error("Anonymization key set '{0}' not found.")]
    UnknownKeySet(String),
    #[error("The configuration collection reference '{0}' is not configured.")]
    NotAllowed(String),
    /// The storage could not be read (transient): 503 rather than 400.
    #[error("Failed to fetch anonymization configuration: {0}")]
    Fetch(String),
    /// The storage's final answer about this name (a directory, no permission, a refused
    /// read): 400, since another attempt cannot succeed and a 503 would be retried forever.
    #[error("Anonymization configuration '{name}' cannot be read: {reason}")]
    Unreadable { name: String, reason: String },
}

/// What the job records about its configuration. The text itself is kept so that a resumed job,
/// on any node, applies exactly the rules fetched at kick-off.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AnonymizationInfo {
    /// `storage` or `oci`.
    pub source: String,
    /// `_anonymizationConfig`.
    pub name: String,
    /// Storage: the object's ETag.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// OCI: the image reference and the manifest digest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// SHA-256 of the configuration as compiled (see [`fingerprint`]).
    pub fingerprint: String,
    /// The configuration as applied: with a key set, the keys it left empty filled in (the
    /// job's record is in the database, beside the key set; never in a manifest or status).
    pub config_text: String,
    /// `_anonymizationKeySet`: the key set's name and version at kick-off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_set: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_set_version: Option<i64>,
}

impl AnonymizationInfo {
    /// The manifest's description (without the configuration text).
    pub fn manifest_extension(&self) -> Value {
        let mut v = json!({"source": self.source, "configuration": self.name, "fingerprint": self.fingerprint});
        if let Some(e) = &self.etag {
            v["etag"] = json!(e);
        }
        if let Some(i) = &self.image {
            v["image"] = json!(i);
        }
        if let Some(d) = &self.digest {
            v["digest"] = json!(d);
        }
        if let Some(k) = &self.key_set {
            v["keySet"] = json!(k);
            v["keySetVersion"] = json!(self.key_set_version);
        }
        v
    }
}

/// Supplies the keys the configuration leaves empty from the stored key set `name`, at
/// kick-off: the job then records the keys it used (a rotation during the export changes
/// nothing in it), and the fingerprint covers them (hashed).
pub fn apply_key_set(
    info: &mut AnonymizationInfo,
    queue: &dyn store::JobQueue,
    name: &str,
) -> Result<(), AnonymizationError> {
    let sets = queue
        .key_sets()
        .ok_or_else(|| AnonymizationError::UnknownKeySet(name.to_string()))?;
    let set = sets
        .key_set(name)
        .map_err(|e| AnonymizationError::Fetch(format!("key set {name}: {e}")))?
        .ok_or_else(|| AnonymizationError::UnknownKeySet(name.to_string()))?;
    let keys = deid::keys::Keys {
        crypto_hash_key: set.crypto_hash_key,
        encrypt_key: set.encrypt_key,
        date_shift_key: set.date_shift_key,
    };
    let (text, supplied) = deid::keys::fill_empty(&info.config_text, &keys).map_err(|e| {
        AnonymizationError::Invalid {
            name: info.name.clone(),
            message: e.to_string(),
        }
    })?;
    compile(&info.name, &text)?;
    tracing::info!(key_set = %name, version = set.version, fingerprint = %keys.fingerprint(), supplied = ?supplied, "export uses a stored key set");
    info.fingerprint = fingerprint(&text);
    info.config_text = text;
    info.key_set = Some(name.to_string());
    info.key_set_version = Some(set.version);
    Ok(())
}

/// Fills the keys the configuration still leaves empty (no key set supplied them) with fresh
/// random keys, at kick-off, so that the job records them. Left empty, each compilation of the
/// configuration draws its own (the reference's per-process default), and the job's
/// configuration is compiled once per process: the work a restarted server (or another node)
/// resumed hashed ids and shifted dates with other keys than the files written before, so the
/// references of one export no longer resolved within it. The keys stay in the job's record
/// in the database, never in a manifest or status; the fingerprint stays that of the
/// configuration as given.
pub fn draw_missing_keys(info: &mut AnonymizationInfo) -> Result<(), AnonymizationError> {
    let keys = deid::keys::Keys::generate();
    let (text, supplied) = deid::keys::fill_empty(&info.config_text, &keys).map_err(|e| {
        AnonymizationError::Invalid {
            name: info.name.clone(),
            message: e.to_string(),
        }
    })?;
    if supplied.is_empty() {
        return Ok(());
    }
    compile(&info.name, &text)?;
    info.config_text = text;
    Ok(())
}

/// Compiles a configuration text, naming the file in errors. A method that is not built in is
/// refused here, at kick-off: the reference only warns (a .NET host may register a custom
/// processor of that name) and fails at run time, whatever `processingErrors` says; this server
/// has no custom processors, so such a rule could only fail the job later.
pub fn compile(name: &str, text: &str) -> Result<deid::Engine, AnonymizationError> {
    deid::Engine::from_config_text(text)
        .and_then(|engine| {
            engine.config().require_built_in_methods()?;
            Ok(engine)
        })
        .map_err(|e| AnonymizationError::Invalid {
            name: name.to_string(),
            message: e.to_string(),
        })
}

/// A fingerprint of the configuration's rules and parameters: SHA-256 over its JSON with each
/// key replaced by the key's own SHA-256, so that it identifies rules and keys without revealing
/// them; whitespace and formatting do not change it. (A configuration with comments, which
/// Newtonsoft accepts, is fingerprinted by its exact text.)
pub fn fingerprint(config_text: &str) -> String {
    let text = config_text.trim_start_matches('\u{feff}');
    let Ok(mut v) = serde_json::from_str::<Value>(text) else {
        return sha256_hex(text.as_bytes());
    };
    if let Some(params) = v.get_mut("parameters").and_then(Value::as_object_mut) {
        for key in ["dateShiftKey", "cryptoHashKey", "encryptKey"] {
            if let Some(Value::String(k)) = params.get_mut(key) {
                *k = sha256_hex(k.as_bytes());
            }
        }
    }
    sha256_hex(v.to_string().as_bytes())
}

fn strip_quotes(etag: &str) -> &str {
    let e = etag.trim();
    let e = e.strip_prefix("W/").unwrap_or(e);
    e.trim_matches('"')
}

/// Fetches the configuration from the destination's `anonymization` container and checks it.
pub fn load_from_storage(
    sink: &dyn Sink,
    spec: &AnonymizationSpec,
) -> Result<AnonymizationInfo, AnonymizationError> {
    let (bytes, etag) = sink
        .read_limited(CONFIG_CONTAINER, &spec.config, MAX_CONFIG_BYTES)
        .map_err(|e| match e {
            SinkError::ContainerNotFound(_) => AnonymizationError::ContainerNotFound,
            SinkError::NotFound(_) => AnonymizationError::NotFound(spec.config.clone()),
            SinkError::TooLarge { .. } => AnonymizationError::TooLarge,
            // Only what the sink classes as worth another attempt (unreachable, throttled,
            // full for now) is a 503 with Retry-After.
            e if e.is_transient() || matches!(e, SinkError::NoSpace(_)) => {
                AnonymizationError::Fetch(e.to_string())
            }
            // The rest is permanent for this name: a directory, no permission, a refused read.
            // (The local sink's I/O errors arrive as text, without their `io::ErrorKind`.)
            other => AnonymizationError::Unreadable {
                name: spec.config.clone(),
                reason: other.to_string(),
            },
        })?;
    let etag = strip_quotes(&etag).to_string();
    if let Some(expected) = &spec.etag
        && strip_quotes(expected) != etag
    {
        return Err(AnonymizationError::EtagMismatch {
            name: spec.config.clone(),
            expected: strip_quotes(expected).to_string(),
            actual: etag,
        });
    }
    from_bytes(&spec.config, bytes, "storage", Some(etag), None, None)
}

/// Checks and compiles a fetched configuration into what the job records.
pub fn from_bytes(
    name: &str,
    bytes: Vec<u8>,
    source: &str,
    etag: Option<String>,
    image: Option<String>,
    digest: Option<String>,
) -> Result<AnonymizationInfo, AnonymizationError> {
    let text = String::from_utf8(bytes).map_err(|_| AnonymizationError::Invalid {
        name: name.to_string(),
        message: "the configuration is not UTF-8 text".into(),
    })?;
    compile(name, &text)?;
    Ok(AnonymizationInfo {
        source: source.to_string(),
        name: name.to_string(),
        etag,
        image,
        digest,
        fingerprint: fingerprint(&text),
        config_text: text,
        key_set: None,
        key_set_version: None,
    })
}

/// A compiled configuration applied to the resources of one export.
#[derive(Clone)]
pub struct Anonymizer {
    engine: Arc<deid::Engine>,
    pub info: AnonymizationInfo,
}

/// One compact JSON line. `serde_json::to_vec` writes straight into the buffer; `to_string`
/// goes through `fmt::Display` and its formatter, which cost a tenth of a de-identified
/// export's instructions (issue 24, callgrind).
pub(crate) fn json_line(v: &Value) -> Result<Vec<u8>, RunError> {
    serde_json::to_vec(v).map_err(|e| RunError::Anonymization(format!("serialising: {e}")))
}

impl Anonymizer {
    /// Compiles the recorded configuration once per export and process. `folder` is the
    /// export's folder, the date-shift prefix of a `folder`-scoped configuration (a `file`
    /// scope has no stable file name at transform time and uses the folder too).
    pub fn new(info: AnonymizationInfo, folder: &str) -> Result<Anonymizer, AnonymizationError> {
        let engine = compile(&info.name, &info.config_text)?.with_file_context(folder, folder);
        Ok(Anonymizer {
            engine: Arc::new(engine),
            info,
        })
    }

    /// A dry run of this configuration (`_anonymizationDryRun=true`): the report's default
    /// quasi-identifiers and k (docs/deid-consistency.md), ages at today's date.
    pub fn dry_run(&self) -> deid::report::DryRun {
        let today = chrono::Utc::now().date_naive();
        deid::report::DryRun::new(
            (*self.engine).clone(),
            deid::report::RiskOptions::new(today),
        )
    }

    /// De-identifies one stored resource: the output line, and with `processingErrors: skip`
    /// an OperationOutcome line for the `error` file when the stub was written instead.
    /// The stored bytes go to [`deid::Engine::anonymize_json`], which rewrites them without a
    /// JSON tree where the configuration allows (issue 24) and is byte for byte what
    /// [`Anonymizer::apply_value`] writes.
    pub fn apply_bytes(&self, json: &[u8]) -> Result<(Vec<u8>, Option<Vec<u8>>), RunError> {
        let mut line = Vec::with_capacity(json.len() + 256);
        match self.engine.anonymize_json(json, &mut line) {
            Ok(w) if !w.skipped => Ok((line, None)),
            // The rare cases: the stub, an error or unreadable bytes take the tree path's words.
            _ => {
                let v: Value = serde_json::from_slice(json).map_err(|e| {
                    RunError::Anonymization(format!("stored resource unreadable: {e}"))
                })?;
                self.apply_value(v)
            }
        }
    }

    pub fn apply_value(&self, v: Value) -> Result<(Vec<u8>, Option<Vec<u8>>), RunError> {
        // Kept for the error texts only (the resource is consumed); named there by `describe`.
        let text = |key: &str| v.get(key).and_then(Value::as_str).map(str::to_string);
        let (resource_type, id) = (text("resourceType"), text("id"));
        match self.engine.anonymize(v) {
            Ok(out) if out.skipped => {
                let what = self.describe(resource_type.as_deref(), id.as_deref());
                let oo = json!({"resourceType": "OperationOutcome", "issue": [{
                    "severity": "error", "code": "processing",
                    "diagnostics": format!("{what} could not be de-identified; the redacted stub was written (processingErrors: skip)")
                }]});
                Ok((json_line(&out.resource)?, Some(json_line(&oo)?)))
            }
            Ok(out) => Ok((json_line(&out.resource)?, None)),
            Err(e) => {
                let what = self.describe(resource_type.as_deref(), id.as_deref());
                Err(RunError::Anonymization(format!(
                    "Failed to anonymize resource {what}. The job is marked as failed: {e}"
                )))
            }
        }
    }

    /// How the error file, the job's status and the logs name a resource that could not be
    /// de-identified. Its stored id is real data that the export must not reveal: it appears
    /// only as the configuration's `cryptoHash` makes it (the id of the `deleted` entries, from
    /// [`Anonymizer::deleted_id`] on the bare resource, which the failing content cannot stop),
    /// and not at all when the configuration keeps, encrypts (reversible), removes or otherwise
    /// rewrites it.
    fn describe(&self, resource_type: Option<&str>, id: Option<&str>) -> String {
        // A stored resource's type is a FHIR type name; anything else is not echoed.
        let ty = resource_type
            .filter(|t| {
                !t.is_empty() && t.len() <= 64 && t.bytes().all(|b| b.is_ascii_alphanumeric())
            })
            .unwrap_or("resource");
        let hashed = id.and_then(|id| {
            let out = self.deleted_id(ty, id, None)?;
            let key = &self.engine.config().parameters.crypto_hash_key;
            (out == deid::transforms::crypto_hash(key, id)).then_some(out)
        });
        match hashed {
            Some(h) => format!("{ty}/{h}"),
            None => format!("{ty} (id withheld: the configuration does not hash it)"),
        }
    }

    /// The id a `deleted` entry carries: the id the configuration gave the resource when it was
    /// last exported, found by running the configuration on its last stored version (`last`,
    /// the version before the tombstone) — the same rules, in the same order, on the same
    /// content, so rules that depend on content (`where()`, `processingErrors: skip`) decide as
    /// they did. Without that version (history purged) the bare `{resourceType, id}` stands in.
    /// `None` when the configuration removes the id (or the last version could not be
    /// de-identified): the entry cannot be written without revealing the id.
    pub fn deleted_id(&self, resource_type: &str, id: &str, last: Option<&[u8]>) -> Option<String> {
        let resource = last
            .and_then(|json| serde_json::from_slice::<Value>(json).ok())
            .filter(|v| {
                v.get("resourceType").and_then(Value::as_str) == Some(resource_type)
                    && v.get("id").and_then(Value::as_str) == Some(id)
            })
            .unwrap_or_else(|| json!({"resourceType": resource_type, "id": id}));
        let out = self.engine.anonymize(resource).ok()?;
        if out.skipped {
            return None;
        }
        out.resource
            .get("id")
            .and_then(Value::as_str)
            .map(str::to_string)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::LocalSink;

    const CONFIG: &str = r#"{
        "fhirVersion": "R4",
        "fhirPathRules": [
            {"path": "Resource.id", "method": "cryptoHash"},
            {"path": "nodesByType('HumanName')", "method": "redact"}
        ],
        "parameters": {"cryptoHashKey": "secret-key", "dateShiftKey": "d"}
    }"#;

    fn spec(name: &str, etag: Option<&str>) -> AnonymizationSpec {
        AnonymizationSpec {
            config: name.into(),
            etag: etag.map(str::to_string),
            collection: None,
            key_set: None,
            dry_run: false,
        }
    }

    #[test]
    fn storage_configs_are_found_checked_and_compiled() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sink = LocalSink::new(dir.path());
        assert!(matches!(
            load_from_storage(&sink, &spec("c.json", None)),
            Err(AnonymizationError::ContainerNotFound)
        ));
        std::fs::create_dir_all(dir.path().join("anonymization")).expect("mkdir");
        assert!(matches!(
            load_from_storage(&sink, &spec("c.json", None)),
            Err(AnonymizationError::NotFound(_))
        ));
        std::fs::write(dir.path().join("anonymization/c.json"), CONFIG).expect("write");
        let info = load_from_storage(&sink, &spec("c.json", None)).expect("load");
        let etag = sha256_hex(CONFIG.as_bytes());
        assert_eq!(info.etag.as_deref(), Some(etag.as_str()));
        // Quotes are optional on the requested ETag.
        let quoted = format!("\"{etag}\"");
        load_from_storage(&sink, &spec("c.json", Some(&quoted))).expect("etag matches");
        let e = load_from_storage(&sink, &spec("c.json", Some("abc"))).expect_err("mismatch");
        assert!(
            e.to_string().contains("abc") && e.to_string().contains(&etag),
            "{e}"
        );

        std::fs::write(
            dir.path().join("anonymization/bad.json"),
            "{\"fhirPathRules\": 3}",
        )
        .expect("write");
        assert!(matches!(
            load_from_storage(&sink, &spec("bad.json", None)),
            Err(AnonymizationError::Invalid { .. })
        ));
        let big = vec![b' '; MAX_CONFIG_BYTES as usize + 1];
        std::fs::write(dir.path().join("anonymization/big.json"), big).expect("write");
        assert!(matches!(
            load_from_storage(&sink, &spec("big.json", None)),
            Err(AnonymizationError::TooLarge)
        ));
    }

    /// Security review: the error file and the failed job's status named a resource that could
    /// not be de-identified by its real id. They carry the id only as the configuration hashes
    /// it, and no id when the configuration does not hash ids.
    #[test]
    fn regression_error_texts_carry_no_real_ids() {
        const ID: &str = "6c5d9ca9-54d7-42f5-bfae-a7c19cd217f2";
        let patient = format!(
            r#"{{"resourceType":"Patient","id":"{ID}","birthDate":"1970-01-01","name":[{{"family":"Doe"}}]}}"#
        );
        let config = |errors: &str, id_method: &str| {
            format!(
                r#"{{"fhirVersion":"R4","processingErrors":"{errors}","fhirPathRules":[{{"path":"Resource.id","method":"{id_method}"}},{{"path":"Patient.birthDate","method":"generalize","cases":{{"$this":"%nonexistent"}}}},{{"path":"Patient.name","method":"redact"}}],"parameters":{{"cryptoHashKey":"secret","encryptKey":"0123456789abcdef"}}}}"#
            )
        };
        let anonymizer = |text: String| {
            let info =
                from_bytes("c.json", text.into_bytes(), "storage", None, None, None).expect("info");
            Anonymizer::new(info, "folder").expect("anonymizer")
        };
        let hashed = deid::transforms::crypto_hash("secret", ID);

        // skip: the stub, and an error line naming the hashed id.
        let a = anonymizer(config("skip", "cryptoHash"));
        for (line, error) in [
            a.apply_bytes(patient.as_bytes()).expect("stub"),
            a.apply_value(serde_json::from_str(&patient).expect("json"))
                .expect("stub"),
        ] {
            let line = String::from_utf8(line).expect("utf-8");
            let error = String::from_utf8(error.expect("an error line")).expect("utf-8");
            assert!(line.contains("REDACTED") && !line.contains(ID), "{line}");
            assert!(!error.contains(ID), "{error}");
            assert!(error.contains(&format!("Patient/{hashed}")), "{error}");
        }
        // raise: the job's error text.
        let a = anonymizer(config("raise", "cryptoHash"));
        let e = a
            .apply_bytes(patient.as_bytes())
            .expect_err("fails")
            .to_string();
        assert!(!e.contains(ID) && e.contains(&hashed), "{e}");

        // Ids kept or encrypted (reversible) are not shown at all.
        for method in ["keep", "encrypt", "redact"] {
            let a = anonymizer(config("skip", method));
            let (_, error) = a.apply_bytes(patient.as_bytes()).expect("stub");
            let error = String::from_utf8(error.expect("an error line")).expect("utf-8");
            assert!(!error.contains(ID), "{method}: {error}");
            assert!(error.contains("Patient (id withheld"), "{method}: {error}");
            let a = anonymizer(config("raise", method));
            let e = a
                .apply_bytes(patient.as_bytes())
                .expect_err("fails")
                .to_string();
            assert!(!e.contains(ID), "{method}: {e}");
        }
    }

    /// Security review: a configuration with an unknown method passed kick-off and failed the
    /// job at run time, even with `processingErrors: skip`; a perturb span of 1e300 passed and
    /// added no noise. Both are refused at kick-off now (400).
    #[test]
    fn regression_configs_that_cannot_run_are_refused_at_kickoff() {
        for text in [
            r#"{"fhirVersion":"R4","processingErrors":"skip","fhirPathRules":[{"path":"Patient.name","method":"scramble"}]}"#,
            r#"{"fhirVersion":"R4","fhirPathRules":[{"path":"Observation.value","method":"perturb","span":1e300}]}"#,
        ] {
            let e = from_bytes("c.json", text.into(), "storage", None, None, None).expect_err(text);
            assert!(matches!(e, AnonymizationError::Invalid { .. }), "{e}");
        }
    }

    /// Security review: a configuration name that is a directory answered 503 (transient, with
    /// Retry-After), so clients retried forever. It is a permanent error (400).
    #[test]
    fn regression_a_directory_is_not_a_transient_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sink = LocalSink::new(dir.path());
        std::fs::create_dir_all(dir.path().join("anonymization/subdir")).expect("mkdir");
        let e = load_from_storage(&sink, &spec("subdir", None)).expect_err("a directory");
        assert!(
            matches!(&e, AnonymizationError::Unreadable { name, .. } if name == "subdir"),
            "{e:?}"
        );
        assert!(
            !e.to_string().contains(&dir.path().display().to_string()),
            "{e}"
        );
    }

    #[test]
    fn fingerprints_hide_keys_and_deleted_ids_follow_the_rules() {
        let info = from_bytes(
            "c.json",
            CONFIG.as_bytes().to_vec(),
            "storage",
            None,
            None,
            None,
        )
        .expect("info");
        assert_eq!(info.fingerprint.len(), 64);
        let other = CONFIG.replace("secret-key", "other-key");
        let info2 =
            from_bytes("c.json", other.into_bytes(), "storage", None, None, None).expect("info");
        assert_ne!(info.fingerprint, info2.fingerprint);
        let reformatted = CONFIG.replace('\n', " ");
        let info3 = from_bytes(
            "c.json",
            reformatted.into_bytes(),
            "storage",
            None,
            None,
            None,
        )
        .expect("info");
        assert_eq!(info.fingerprint, info3.fingerprint);
        assert!(!info.manifest_extension().to_string().contains("secret-key"));

        let a = Anonymizer::new(info, "folder").expect("anonymizer");
        // A deleted entry carries the id exactly as the exported resource would.
        let hashed = a
            .deleted_id("Observation", "obs-1", None)
            .expect("hashed id");
        let (line, _) = a
            .apply_bytes(br#"{"resourceType":"Observation","id":"obs-1","status":"final","code":{"text":"x"}}"#)
            .expect("apply");
        let v: Value = serde_json::from_slice(&line).expect("json");
        assert_eq!(v["id"], json!(hashed));
        assert_ne!(hashed, "obs-1");
        let (line, error) = a
            .apply_bytes(br#"{"resourceType":"Patient","id":"p1","name":[{"family":"Doe"}]}"#)
            .expect("apply");
        assert!(error.is_none());
        let v: Value = serde_json::from_slice(&line).expect("json");
        assert_eq!(v["id"].as_str().map(str::len), Some(64));
        assert!(v.get("name").is_none());

        // Content-dependent id rules decide on the last stored version, as the export did.
        let restricted = r#"{"fhirPathRules": [{"path": "Resource.where(meta.security.code = 'R').id", "method": "cryptoHash"}],
            "parameters": {"cryptoHashKey": "k"}}"#;
        let info =
            from_bytes("r.json", restricted.into(), "storage", None, None, None).expect("info");
        let a = Anonymizer::new(info, "folder").expect("anonymizer");
        let last = br#"{"resourceType":"Observation","id":"o-1","meta":{"security":[{"code":"R"}]},"status":"final","code":{"text":"x"}}"#;
        assert_eq!(
            a.deleted_id("Observation", "o-1", Some(last)).as_deref(),
            Some(deid::transforms::crypto_hash("k", "o-1").as_str())
        );
        // A version of another resource is not used.
        assert_eq!(
            a.deleted_id("Observation", "o-2", Some(last)).as_deref(),
            Some("o-2")
        );
    }
}
