//! Kick-off parameters (`GET` query or `POST` Parameters), validated at kick-off.

use serde_json::Value;

/// The three export levels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportLevel {
    System,
    Patient,
    Group(String),
}

/// A validated export request.
#[derive(Debug, Clone)]
pub struct ExportRequest {
    pub level: ExportLevel,
    /// `_type`; empty = every type the level covers.
    pub types: Vec<String>,
    /// `_since` in ms since the epoch.
    pub since_ms: Option<i64>,
    /// `_until` / `_till` in ms since the epoch.
    pub until_ms: Option<i64>,
    /// `_typeFilter` queries, `Type?query` each.
    pub type_filters: Vec<String>,
    /// The same queries compiled once, ORed per type.
    pub filters: search::PredicateSet,
    /// `patient` references (POST only; not at system level): patient ids.
    pub patients: Vec<String>,
    /// `_container`.
    pub container: Option<String>,
    /// `_elements`: `(type, element)`; a `None` type applies to every type.
    pub elements: Vec<(Option<String>, String)>,
    /// `includeAssociatedData` (the least restrictive of the values given).
    pub associated: Option<Associated>,
    /// De-identification (`_anonymizationConfig` and friends).
    pub anonymization: Option<AnonymizationSpec>,
    /// Problems accepted under `handling=lenient`: they go to the manifest's `error` file.
    pub warnings: Vec<String>,
    /// The kick-off URL, for the manifest's `request`.
    pub request_url: String,
    /// `$viewdefinition-export` (`_view`, one per view, the ViewDefinition's JSON): each
    /// resource of the views' types becomes rows of each view of its type, written as
    /// `<view name>-<n>.<ext>` files, instead of the resource itself. Empty for `$export`.
    pub views: Vec<std::sync::Arc<views::View>>,
    /// `_viewFormat`: the file format of view rows.
    pub view_format: ViewFormat,
    /// `_viewHeader`: CSV files start with the header line (default true).
    pub view_header: bool,
    /// `_compression=gzip`: NDJSON files are stored gzip-compressed (`.ndjson.gz`); `None`
    /// leaves it to the server's `--export-gzip`.
    pub gzip: Option<bool>,
    /// `allowPartialManifests=true` (Bulk Data STU3): the status answers `202` with the files
    /// written so far, and manifests are paged (`link` `next`), one page per work item.
    pub allow_partial: bool,
    /// `organizeOutputBy=Patient` (Bulk Data STU3): output files hold blocks of one patient
    /// each (a header `Parameters`, the Patient, then its compartment resources).
    pub organize_by_patient: bool,
    /// `Prefer: separate-export-status` at kick-off (not a parameter; recorded with the job):
    /// status polls answer `200` with the job's status in `X-Export-Status`.
    pub separate_status: bool,
}

/// The file format of `$viewdefinition-export` output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViewFormat {
    Ndjson,
    Csv,
    Parquet,
}

impl ViewFormat {
    /// The file name extension.
    pub fn extension(self) -> &'static str {
        match self {
            ViewFormat::Ndjson => "ndjson",
            ViewFormat::Csv => "csv",
            ViewFormat::Parquet => "parquet",
        }
    }
}

/// `includeAssociatedData` values: Provenance of the exported resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Associated {
    /// `LatestProvenanceResources`: the latest Provenance (by `recorded`) per exported resource.
    Latest,
    /// `RelevantProvenanceResources`: every Provenance whose target is exported.
    Relevant,
}

/// Where the anonymizer configuration of a de-identified export comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnonymizationSpec {
    /// `_anonymizationConfig`: the file name (in the `anonymization` container, or in the image).
    pub config: String,
    /// `_anonymizationConfigEtag`: the stored object's expected ETag, quotes removed.
    pub etag: Option<String>,
    /// `_anonymizationConfigCollectionReference`: an OCI image reference.
    pub collection: Option<String>,
    /// `_anonymizationKeySet`: a stored key set supplying the keys the configuration leaves
    /// empty (docs/deid-consistency.md).
    pub key_set: Option<String>,
    /// `_anonymizationDryRun=true`: the export writes the dry-run report instead of data.
    pub dry_run: bool,
}

/// Whether an anonymization config name is a plain relative name: no `..` segment, not absolute,
/// no backslash or control characters.
pub fn valid_config_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 1024
        && !name.starts_with('/')
        && !name.contains('\\')
        && !name.chars().any(char::is_control)
        && name
            .split('/')
            .all(|seg| !seg.is_empty() && seg != "." && seg != "..")
}

/// Checks the `_typeFilter` queries of a kick-off against `limits` (the server's `--search-*`
/// bounds). Each query is evaluated in memory on every resource of its type, and a type's
/// queries all on each of its resources: together they may ask no more than one search
/// request may (parameters, their bytes, OR-ed values), else one kick-off could make every
/// resource of a type cost a worker as much as millions of searches.
pub fn check_type_filter_limits(
    type_filters: &[String],
    limits: &search::SearchLimits,
) -> Result<(), RequestError> {
    // Per type: its queries' (name, value) pairs and their values.
    type Asked<'a> = (&'a str, Vec<(String, String)>, usize);
    let mut by_type: Vec<Asked<'_>> = Vec::new();
    for filter in type_filters {
        let Some((ty, query)) = filter.split_once('?') else {
            continue;
        };
        let pairs = search::parse_query_string(query.trim_start_matches('?'));
        let i = match by_type.iter().position(|(t, ..)| *t == ty) {
            Some(i) => i,
            None => {
                by_type.push((ty, Vec::new(), 0));
                by_type.len() - 1
            }
        };
        let too_costly = |why: String| {
            err(
                "_typeFilter",
                format!(
                    "the _typeFilter queries of {ty} together ask more than one search may: {why}"
                ),
            )
        };
        let (_, all, values) = &mut by_type[i];
        all.extend(pairs.iter().cloned());
        limits
            .check_request(all)
            .map_err(|e| too_costly(e.to_string()))?;
        let options = search::ParseOptions {
            lenient: false,
            predicate_only: true,
        };
        if let Ok(q) = search::parse_query(ty, &pairs, options) {
            *values += q
                .filters
                .iter()
                .map(search::Filter::value_count)
                .sum::<usize>();
        }
        if *values > limits.max_values {
            return Err(too_costly(format!(
                "more than {} search values (comma-separated values count one each)",
                limits.max_values
            )));
        }
    }
    Ok(())
}

/// A kick-off parameter problem: 400 with an OperationOutcome naming the parameter.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{param}: {message}")]
pub struct RequestError {
    pub param: String,
    pub message: String,
}

fn err(param: &str, message: impl Into<String>) -> RequestError {
    RequestError {
        param: param.to_string(),
        message: message.into(),
    }
}

/// Problems accepted under `handling=lenient` that are listed (the rest are counted as one).
pub const MAX_WARNINGS: usize = 100;

/// The names of the top-level elements of every R4 resource type (what an `_elements` name
/// without a type may be), built once.
fn resource_element_names() -> &'static std::collections::HashSet<String> {
    static NAMES: std::sync::OnceLock<std::collections::HashSet<String>> =
        std::sync::OnceLock::new();
    NAMES.get_or_init(|| {
        let model = fhir_model::r4();
        model
            .resource_types()
            .iter()
            .filter_map(|t| model.type_def(t))
            .flat_map(|d| d.elements.iter().map(|e| e.name.clone()))
            .collect()
    })
}

/// Views one export may write. Each running work item keeps an open part file per view, with
/// its write buffer (1 MiB on a local folder, up to 8 MiB of multipart upload on Azure or S3):
/// 32 views are at most 256 MiB per worker in the worst case, and 32 file handles.
pub const MAX_VIEWS: usize = 32;

/// Containers the server keeps for itself: the de-identification configurations
/// (`anonymization`, read at kick-off) must never be written or overwritten by an export.
pub const RESERVED_CONTAINERS: [&str; 1] = [CONFIG_CONTAINER];

/// The container holding anonymizer configurations, beside the export containers.
pub const CONFIG_CONTAINER: &str = "anonymization";

const OUTPUT_FORMATS: [&str; 3] = ["application/fhir+ndjson", "application/ndjson", "ndjson"];

/// Azure container rules: 3–63 characters of lowercase letters, digits and single hyphens,
/// starting and ending with a letter or digit.
pub fn valid_container(name: &str) -> bool {
    (3..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--")
}

fn parse_instant(param: &str, v: &str) -> Result<i64, RequestError> {
    // Full instants; a date alone is accepted as its midnight UTC.
    let text = if v.len() == 10 {
        format!("{v}T00:00:00Z")
    } else {
        v.to_string()
    };
    store::parse_instant_ms(&text).ok_or_else(|| {
        err(
            param,
            format!("'{v}' is not an instant such as 2024-01-01T00:00:00Z"),
        )
    })
}

/// The `value[x]` types a kick-off parameter may be given as in a POST Parameters body: the
/// Bulk Data types, and `valueString` for every text parameter. Anything else is a 400, so a
/// value can never slip past the checks on its parsed form. Unknown parameters are reported
/// as such by [`ExportRequest::parse`].
fn value_type_allowed(name: &str, ty: &str) -> bool {
    match name {
        "patient" => ty == "Reference",
        "_since" | "_until" | "_till" => matches!(ty, "Instant" | "DateTime" | "String"),
        "_type" | "_outputFormat" | "includeAssociatedData" | "organizeOutputBy" => {
            matches!(ty, "String" | "Code")
        }
        "allowPartialManifests" => matches!(ty, "Boolean" | "String"),
        "_typeFilter"
        | "_elements"
        | "_container"
        | "_format"
        | "_anonymizationConfig"
        | "_anonymizationConfigEtag"
        | "_anonymizationConfigCollectionReference"
        | "_anonymizationKeySet" => ty == "String",
        _ => matches!(
            ty,
            "String" | "Code" | "Uri" | "Boolean" | "Integer" | "Instant" | "DateTime"
        ),
    }
}

/// The `parameter` array of a Parameters body (empty without one), or what is wrong with it
/// (the element named, and why).
///
/// A member an operation does not read is refused, never skipped: a misspelt or malformed
/// `parameter` (an object for the array, `parameters`) dropped every parameter in it, and a
/// body meant to narrow an export or a view run to one patient covered the whole population.
pub fn parameter_list(body: &Value) -> Result<&[Value], RequestError> {
    if let Some(other) = body.as_object().into_iter().flatten().find_map(|(k, _)| {
        (!matches!(
            k.as_str(),
            "resourceType" | "id" | "meta" | "implicitRules" | "language" | "parameter"
        ))
        .then_some(k)
    }) {
        return Err(err(
            "body",
            format!(
                "a Parameters resource has no member `{}` (the parameters go in the `parameter` array)",
                other.chars().take(40).collect::<String>()
            ),
        ));
    }
    match body.get("parameter") {
        None => Ok(&[]),
        Some(Value::Array(a)) => Ok(a.as_slice()),
        Some(_) => Err(err("parameter", "`parameter` is an array of parameters")),
    }
}

/// Parameters from a `POST` Parameters body into (name, value) pairs; `patient` references
/// become `patient` pairs with the reference text.
pub fn parameters_to_pairs(body: &Value) -> Result<Vec<(String, String)>, RequestError> {
    if body.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
        return Err(err("body", "a POST kick-off takes a Parameters resource"));
    }
    let parameters = parameter_list(body)?;
    let mut pairs = Vec::new();
    for p in parameters {
        let Some(name) = p.get("name").and_then(Value::as_str) else {
            return Err(err("parameter", "every parameter needs a name"));
        };
        let values: Vec<(&String, &Value)> = p
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, _)| k.starts_with("value"))
            .collect();
        let [(key, v)] = values.as_slice() else {
            return Err(err(
                name,
                "the parameter needs exactly one value[x] (e.g. valueString)",
            ));
        };
        let key = key.strip_prefix("value").unwrap_or_default();
        if !value_type_allowed(name, key) {
            return Err(err(
                name,
                format!(
                    "value{} is not a value type of this parameter",
                    key.chars()
                        .filter(char::is_ascii_alphanumeric)
                        .take(40)
                        .collect::<String>()
                ),
            ));
        }
        let value = match v {
            Value::String(s) => Some(s.clone()),
            Value::Bool(b) if key == "Boolean" => Some(b.to_string()),
            Value::Object(_) if key == "Reference" => v
                .get("reference")
                .and_then(Value::as_str)
                .map(str::to_string),
            _ => None,
        };
        match value {
            Some(v) => pairs.push((name.to_string(), v)),
            None => return Err(err(name, format!("value{key} must be a string value"))),
        }
    }
    Ok(pairs)
}

/// The combinations `organizeOutputBy=Patient` refuses (400 naming `organizeOutputBy`): a block
/// is a patient's compartment, so system level (resources outside every compartment) has none;
/// a block's header references the Patient by id, which a de-identified export must not carry;
/// views write rows, not resources; associated Provenance belongs to no one patient's block.
fn organize_by_patient_allowed(r: &ExportRequest, deidentified: bool) -> Result<(), RequestError> {
    let refuse = |why: &str| {
        Err(err(
            "organizeOutputBy",
            format!("organizeOutputBy=Patient {why}"),
        ))
    };
    if r.level == ExportLevel::System {
        return refuse(
            "needs a Patient or Group level export (/Patient/$export, /Group/[id]/$export)",
        );
    }
    if deidentified {
        return refuse(
            "cannot be combined with a de-identified export: the block headers reference patients by id",
        );
    }
    if !r.views.is_empty() {
        return refuse("does not apply to $viewdefinition-export");
    }
    if r.associated.is_some() {
        return refuse("cannot be combined with includeAssociatedData");
    }
    Ok(())
}

impl ExportRequest {
    /// Validates kick-off parameters. `now_ms` rejects `_since` in the future; `lenient` turns
    /// recoverable problems into warnings.
    pub fn parse(
        level: ExportLevel,
        pairs: &[(String, String)],
        is_post: bool,
        lenient: bool,
        now_ms: i64,
        request_url: String,
    ) -> Result<ExportRequest, RequestError> {
        let model = fhir_model::r4();
        let mut r = ExportRequest {
            level,
            types: Vec::new(),
            since_ms: None,
            until_ms: None,
            type_filters: Vec::new(),
            filters: search::PredicateSet::new(),
            patients: Vec::new(),
            container: None,
            elements: Vec::new(),
            associated: None,
            anonymization: None,
            warnings: Vec::new(),
            request_url,
            views: Vec::new(),
            view_format: ViewFormat::Ndjson,
            view_header: true,
            gzip: None,
            allow_partial: false,
            organize_by_patient: false,
            separate_status: false,
        };
        let (mut anon_config, mut anon_etag, mut anon_collection) = (None, None, None);
        let (mut anon_key_set, mut anon_dry_run) = (None, false);
        let mut elements_seen: std::collections::HashSet<&str> = std::collections::HashSet::new();
        let soft = |r: &mut ExportRequest, e: RequestError| -> Result<(), RequestError> {
            if !lenient {
                return Err(e);
            }
            // Each warning is a line of the manifest's error file: a few, not one per item of
            // a list of millions.
            if r.warnings.len() < MAX_WARNINGS {
                r.warnings.push(e.to_string());
            } else if r.warnings.len() == MAX_WARNINGS {
                r.warnings
                    .push("further problems of this request are not listed".into());
            }
            Ok(())
        };
        for (name, value) in pairs {
            match name.as_str() {
                "_outputFormat" => {
                    // A `+` decoded as a space is the same format.
                    let f = value.replace(' ', "+");
                    if !OUTPUT_FORMATS.contains(&f.as_str()) {
                        return Err(err(
                            "_outputFormat",
                            format!("'{value}' is not supported; use application/fhir+ndjson"),
                        ));
                    }
                }
                "_since" => {
                    let ms = parse_instant("_since", value)?;
                    if ms > now_ms {
                        return Err(err("_since", format!("'{value}' is in the future")));
                    }
                    r.since_ms = Some(ms);
                }
                "_until" | "_till" => r.until_ms = Some(parse_instant(name, value)?),
                "_type" => {
                    for t in value.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                        if model.resource_types().iter().any(|k| k == t) {
                            if !r.types.iter().any(|k| k == t) {
                                r.types.push(t.to_string());
                            }
                        } else {
                            soft(&mut r, err("_type", format!("unknown resource type '{t}'")))?;
                        }
                    }
                }
                "_typeFilter" => {
                    let Some((t, q)) = value.split_once('?') else {
                        return Err(err(
                            "_typeFilter",
                            format!("'{value}' is not of the form Type?query"),
                        ));
                    };
                    match search::Predicate::compile(t, q) {
                        Ok(p) => {
                            r.type_filters.push(value.clone());
                            r.filters.add(p);
                        }
                        Err(e) => soft(&mut r, err("_typeFilter", e.to_string()))?,
                    }
                }
                "_container" => {
                    if !valid_container(value) {
                        return Err(err(
                            "_container",
                            format!(
                                "'{value}' is not a valid container name (3-63 lowercase letters, digits and single hyphens)"
                            ),
                        ));
                    }
                    if RESERVED_CONTAINERS.contains(&value.as_str()) {
                        return Err(err(
                            "_container",
                            format!(
                                "'{value}' is reserved by the server and cannot receive exports"
                            ),
                        ));
                    }
                    r.container = Some(value.clone());
                }
                "patient" => {
                    if !is_post {
                        return Err(err(
                            "patient",
                            "the patient parameter is only accepted in a POST kick-off",
                        ));
                    }
                    if r.level == ExportLevel::System {
                        return Err(err(
                            "patient",
                            "the patient parameter is not allowed at system level",
                        ));
                    }
                    let id = value.strip_prefix("Patient/").unwrap_or(value);
                    if !store::is_valid_id(id) {
                        return Err(err(
                            "patient",
                            format!("'{value}' is not a Patient reference"),
                        ));
                    }
                    r.patients.push(id.to_string());
                }
                "_elements" => {
                    for part in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                        // Each name once: an export compares every key of every resource
                        // with the kept names.
                        if !elements_seen.insert(part) {
                            continue;
                        }
                        let (ty, elem) = match part.split_once('.') {
                            Some((t, e)) => (Some(t.to_string()), e),
                            None => (None, part),
                        };
                        let known = match ty.as_deref() {
                            Some(t) => model.is_resource(t) && model.element(t, elem).is_some(),
                            None => resource_element_names().contains(elem),
                        };
                        if known {
                            r.elements.push((ty, elem.to_string()));
                        } else {
                            soft(
                                &mut r,
                                err(
                                    "_elements",
                                    format!(
                                        "'{part}' is not a top-level element of {} (use the element's name: `value` for value[x])",
                                        ty.as_deref().unwrap_or("any resource type")
                                    ),
                                ),
                            )?;
                        }
                    }
                }
                "includeAssociatedData" => {
                    for v in value.split(',').map(str::trim).filter(|v| !v.is_empty()) {
                        let a = match v {
                            "LatestProvenanceResources" => Associated::Latest,
                            "RelevantProvenanceResources" => Associated::Relevant,
                            other => {
                                soft(
                                    &mut r,
                                    err(
                                        name,
                                        format!(
                                            "'{other}' is not supported (LatestProvenanceResources, RelevantProvenanceResources)"
                                        ),
                                    ),
                                )?;
                                continue;
                            }
                        };
                        // Conflicting values: the least restrictive applies.
                        r.associated = Some(r.associated.map_or(a, |b| b.max(a)));
                    }
                }
                "_anonymizationConfig" => {
                    if !valid_config_name(value) {
                        return Err(err(
                            name,
                            format!("'{value}' is not a valid configuration name"),
                        ));
                    }
                    anon_config = Some(value.clone());
                }
                "_anonymizationConfigEtag" => {
                    let e = value.trim().trim_matches('"').to_string();
                    if e.is_empty() {
                        return Err(err(name, "the ETag is empty"));
                    }
                    anon_etag = Some(e);
                }
                "_anonymizationConfigCollectionReference" => {
                    anon_collection = Some(value.trim().to_string());
                }
                "_anonymizationKeySet" => {
                    let v = value.trim();
                    if v.is_empty() || v.len() > 64 {
                        return Err(err(name, "the key set name is empty or too long"));
                    }
                    anon_key_set = Some(v.to_string());
                }
                "_anonymizationDryRun" => {
                    anon_dry_run = match value.as_str() {
                        "true" => true,
                        "false" => false,
                        other => {
                            return Err(err(name, format!("'{other}' is not true or false")));
                        }
                    }
                }
                "_compression" => {
                    r.gzip = match value.as_str() {
                        "gzip" => Some(true),
                        "none" => Some(false),
                        other => {
                            return Err(err(
                                name,
                                format!("'{other}' is not a compression (gzip, none)"),
                            ));
                        }
                    }
                }
                "allowPartialManifests" => {
                    r.allow_partial = match value.as_str() {
                        "true" => true,
                        "false" => false,
                        other => {
                            return Err(err(name, format!("'{other}' is not true or false")));
                        }
                    }
                }
                "organizeOutputBy" => {
                    r.organize_by_patient = match value.as_str() {
                        "Patient" => true,
                        other => {
                            return Err(err(
                                name,
                                format!(
                                    "'{other}' is not supported: output can be organized by Patient only"
                                ),
                            ));
                        }
                    }
                }
                "_format" => {}
                "_view" => {
                    if r.views.len() >= MAX_VIEWS {
                        return Err(err(
                            "view",
                            format!(
                                "at most {MAX_VIEWS} views per export (each writes files of its own): split them over several exports"
                            ),
                        ));
                    }
                    let v: Value = serde_json::from_str(value)
                        .map_err(|e| err("view", format!("not a ViewDefinition: {e}")))?;
                    let view = views::View::compile(&v).map_err(|e| err("view", e.to_string()))?;
                    r.views.push(std::sync::Arc::new(view));
                }
                "_viewFormat" => {
                    r.view_format = match value.as_str() {
                        "ndjson" => ViewFormat::Ndjson,
                        "csv" => ViewFormat::Csv,
                        "parquet" => ViewFormat::Parquet,
                        other => {
                            return Err(err(
                                "_format",
                                format!("'{other}' is not a view format (ndjson, csv, parquet)"),
                            ));
                        }
                    }
                }
                "_viewHeader" => r.view_header = value != "false",
                other => soft(&mut r, err(other, "unknown $export parameter"))?,
            }
        }
        if let (Some(since), Some(until)) = (r.since_ms, r.until_ms)
            && since > until
        {
            return Err(err(
                "_until",
                "`_until` (`_till`) is before `_since`: no resource can be in the export",
            ));
        }
        if !r.views.is_empty() {
            if !r.elements.is_empty() || r.associated.is_some() {
                return Err(err(
                    "view",
                    "_elements and includeAssociatedData do not apply to views",
                ));
            }
            // The views' types, in the order of the views.
            r.types.clear();
            for v in &r.views {
                if !r.types.iter().any(|t| t == v.resource_type()) {
                    r.types.push(v.resource_type().to_string());
                }
            }
        }
        if r.organize_by_patient {
            organize_by_patient_allowed(&r, anon_config.is_some())?;
        }
        if anon_config.is_some()
            || anon_etag.is_some()
            || anon_collection.is_some()
            || anon_key_set.is_some()
            || anon_dry_run
        {
            let Some(config) = anon_config else {
                return Err(err(
                    "_anonymizationConfig",
                    "Missing '_anonymizationConfig' for anonymized export",
                ));
            };
            if r.container.is_none() {
                return Err(err(
                    "_container",
                    "Missing '_container' for anonymized export",
                ));
            }
            if anon_etag.is_some() && anon_collection.is_some() {
                return Err(err(
                    "_anonymizationConfigEtag",
                    "_anonymizationConfigEtag and _anonymizationConfigCollectionReference cannot be used together",
                ));
            }
            r.anonymization = Some(AnonymizationSpec {
                config,
                etag: anon_etag,
                collection: anon_collection,
                key_set: anon_key_set,
                dry_run: anon_dry_run,
            });
        }
        Ok(r)
    }

    /// The types this export writes, in order.
    pub fn effective_types(&self, present: &[String]) -> Vec<String> {
        let model = fhir_model::r4();
        let in_level = |t: &str| match self.level {
            ExportLevel::System => true,
            _ => t == "Patient" || model.patient_compartment(t).is_some(),
        };
        let base: Vec<String> = if self.types.is_empty() {
            present.to_vec()
        } else {
            self.types.clone()
        };
        base.into_iter().filter(|t| in_level(t)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn validates_parameters() {
        let now = 2_000_000_000_000;
        let ok = ExportRequest::parse(
            ExportLevel::System,
            &pairs(&[
                ("_type", "Patient,Observation"),
                ("_outputFormat", "application/fhir ndjson"),
                ("_since", "2020-01-01T00:00:00Z"),
            ]),
            false,
            false,
            now,
            String::new(),
        )
        .unwrap();
        assert_eq!(ok.types, ["Patient", "Observation"]);
        let bad = |p: &[(&str, &str)]| {
            ExportRequest::parse(
                ExportLevel::System,
                &pairs(p),
                false,
                false,
                now,
                String::new(),
            )
            .unwrap_err()
            .param
        };
        assert_eq!(bad(&[("_type", "Unicorn")]), "_type");
        assert_eq!(bad(&[("_since", "2999-01-01T00:00:00Z")]), "_since");
        assert_eq!(bad(&[("_since", "nope")]), "_since");
        let window = |since: &str, until: &str| {
            ExportRequest::parse(
                ExportLevel::System,
                &pairs(&[("_since", since), ("_till", until)]),
                false,
                false,
                now,
                String::new(),
            )
            .map_err(|e| e.param)
        };
        assert_eq!(
            window("2020-01-02T00:00:00Z", "2020-01-01T00:00:00Z").unwrap_err(),
            "_until"
        );
        assert!(window("2020-01-01T00:00:00Z", "2020-01-01T00:00:00Z").is_ok());
        assert_eq!(bad(&[("_container", "Bad_Name")]), "_container");
        assert_eq!(bad(&[("_container", "../x")]), "_container");
        assert_eq!(bad(&[("_container", "anonymization")]), "_container");
        assert_eq!(bad(&[("_outputFormat", "text/csv")]), "_outputFormat");
        assert_eq!(
            bad(&[("_typeFilter", "Observation?nonsense=1")]),
            "_typeFilter"
        );
        let lenient = ExportRequest::parse(
            ExportLevel::System,
            &pairs(&[("_type", "Unicorn,Patient")]),
            false,
            true,
            now,
            String::new(),
        )
        .unwrap();
        assert_eq!(lenient.types, ["Patient"]);
        assert_eq!(lenient.warnings.len(), 1);
    }

    #[test]
    fn elements_are_model_elements_kept_once_and_warnings_are_bounded() {
        let parse = |elements: &str, lenient: bool| {
            ExportRequest::parse(
                ExportLevel::System,
                &pairs(&[("_elements", elements)]),
                false,
                lenient,
                0,
                String::new(),
            )
        };
        let r = parse("gender,gender,Patient.gender,Observation.value,id", false).unwrap();
        assert_eq!(r.elements.len(), 4, "{:?}", r.elements);
        for bad in [
            "nonsense",
            "Patient.value",
            "Patient.valueQuantity",
            "Nope.id",
        ] {
            assert_eq!(parse(bad, false).unwrap_err().param, "_elements", "{bad}");
        }
        let many: Vec<String> = (0..500).map(|i| format!("x{i}")).collect();
        let r = parse(&many.join(","), true).unwrap();
        assert!(r.elements.is_empty());
        assert_eq!(r.warnings.len(), MAX_WARNINGS + 1);
    }

    #[test]
    fn a_malformed_parameters_body_is_refused_not_skipped() {
        let one =
            serde_json::json!({"name": "patient", "valueReference": {"reference": "Patient/p1"}});
        let ok = serde_json::json!({"resourceType": "Parameters", "id": "x", "parameter": [one]});
        assert_eq!(
            parameters_to_pairs(&ok).unwrap(),
            [("patient".to_string(), "Patient/p1".to_string())]
        );
        // Each of these narrowed nothing before: every parameter was dropped, and the export
        // covered the whole population.
        for bad in [
            serde_json::json!({"resourceType": "Parameters", "parameter": one}),
            serde_json::json!({"resourceType": "Parameters", "parameters": [one]}),
            serde_json::json!({"resourceType": "Parameters", "parameter": "patient"}),
        ] {
            assert!(parameters_to_pairs(&bad).is_err(), "{bad}");
        }
        let empty = serde_json::json!({"resourceType": "Parameters"});
        assert!(parameters_to_pairs(&empty).unwrap().is_empty());
    }

    #[test]
    fn container_rules() {
        assert!(valid_container("exports-2024"));
        for bad in [
            "ab",
            "-ab",
            "ab-",
            "a--b",
            "UPPER",
            "a/b",
            "a..b",
            &"a".repeat(64),
        ] {
            assert!(!valid_container(bad), "{bad}");
        }
    }
}
