//! Batch and transaction Bundles (`POST /`).
//!
//! [`translate`] is pure: it checks each entry, decides every resource's id, resolves `fullUrl`s
//! (`urn:uuid:X` → `Type/id`), rewrites references everywhere in the resources and validates them.
//! [`process_bundle`] runs the result against a [`Store`] and builds the response Bundle:
//! a transaction is one atomic [`Store::write`]; a batch applies each entry independently (it
//! tries all writes in one transaction first and falls back to one per entry if that fails).
//!
//! Id policy: `POST` keeps `resource.id` when it is present and valid (Bundles written with
//! `fullUrl` `urn:uuid:X` and `resource.id` X, as Synthea's are, keep their ids) and assigns a new
//! UUID otherwise, unless the caller takes the client's ids away first
//! ([`BundlePlan::assign_create_ids`]: the server does for a client that may not read the type,
//! for which a kept id made the `409` of an existing one an existence oracle); `PUT Type/id` uses
//! the URL's id. Processing order inside a transaction follows FHIR: DELETE, POST, PUT, then GET
//! (reads run after the write committed); the response lists the entries in request order.
//!
//! Conditional create (`request.ifNoneExist`): the condition is a search, which this crate
//! cannot run; the caller runs it after [`plan`] and before [`BundlePlan::translate`] and settles
//! the entry with what it found ([`BundlePlan::settle`]): nothing → the entry creates; one
//! resource → the entry answers 200 with it, writes nothing, and the Bundle's references to its
//! `fullUrl` name that resource; several → 412. An entry nobody settled is refused (501).

use std::collections::{HashMap, HashSet, VecDeque};

use serde_json::{Map, Value, json};
use store::{
    Store, StoreError, WriteOp, WriteOutcome, WriteStatus, is_valid_id, is_valid_type_name,
};

use crate::error::{BundleError, EntryError};
use crate::outcome::status_line;
use crate::references::ReferenceMap;

/// The interaction an entry's `request` performs, from `request.method` and `request.url` alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interaction {
    /// `GET|HEAD Type/id`
    Read,
    /// `GET|HEAD Type/id/_history/vid`
    VRead,
    /// `GET Type/id/_history`, `GET Type/_history`, `GET _history`
    History,
    /// `GET Type?query`, `POST Type/_search`, `GET ?query` (system level)
    Search,
    /// `GET metadata`
    Capabilities,
    /// `POST Type`
    Create,
    /// `POST Type` with `ifNoneExist`
    ConditionalCreate,
    /// `PUT Type/id`
    Update,
    /// `PUT Type?query`
    ConditionalUpdate,
    /// `DELETE Type/id`
    Delete,
    /// `DELETE Type?query`
    ConditionalDelete,
    /// `PATCH Type/id`
    Patch,
    /// `PATCH Type?query`
    ConditionalPatch,
    /// `$name` at system, type or instance level
    Operation,
}

/// An entry's `request`, parsed: what it does and to which type, id and version. Authorization
/// decides on this form and [`translate`] plans the entry from the same value, so the type that
/// is checked is the type that is acted on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryRequest {
    pub interaction: Interaction,
    /// `None` at system level (`_history`, `?query`, `$op`, `metadata`).
    pub resource_type: Option<String>,
    pub id: Option<String>,
    pub version: Option<i64>,
    /// The URL's query (search and conditional interactions); for `ifNoneExist`, its query.
    pub query: Option<String>,
    /// The operation's name without `$` ([`Interaction::Operation`]).
    pub operation: Option<String>,
}

impl EntryRequest {
    /// Parses `request.method`, `request.url` and `request.ifNoneExist`. The error is the message
    /// and the field of the entry it concerns.
    pub fn parse(
        method: &str,
        url: &str,
        if_none_exist: Option<&str>,
    ) -> Result<EntryRequest, (String, &'static str)> {
        let bad_url = |m: String| (m, ".request.url");
        if url.contains("://") {
            return Err(bad_url(format!(
                "absolute request URL '{url}' is not supported; use Type or Type/id"
            )));
        }
        let (path, query) = match url.split_once('?') {
            Some((p, q)) => (p, Some(q.to_string())),
            None => (url, None),
        };
        let path = path.trim_start_matches('/').trim_end_matches('/');
        let segments: Vec<&str> = if path.is_empty() {
            Vec::new()
        } else {
            path.split('/').collect()
        };
        let check_type = |t: &str| -> Result<String, (String, &'static str)> {
            if is_valid_type_name(t) && fhir_model::r4().resource_types().iter().any(|r| r == t) {
                Ok(t.to_string())
            } else {
                Err(bad_url(format!(
                    "unknown resource type '{t}' in request.url"
                )))
            }
        };
        let check_id = |id: &str| -> Result<String, (String, &'static str)> {
            if is_valid_id(id) {
                Ok(id.to_string())
            } else {
                Err(bad_url(format!("invalid id '{id}' in request.url")))
            }
        };
        // `$name` → `name`.
        let operation = |s: &str| {
            s.strip_prefix('$')
                .filter(|n| !n.is_empty())
                .map(str::to_string)
                .ok_or_else(|| bad_url(format!("invalid operation in '{url}'")))
        };
        let mut r = EntryRequest {
            interaction: Interaction::Read,
            resource_type: None,
            id: None,
            version: None,
            query: query.clone(),
            operation: None,
        };
        use Interaction as I;
        let reads = matches!(method, "GET" | "HEAD");
        if !matches!(method, "GET" | "HEAD" | "POST" | "PUT" | "DELETE" | "PATCH") {
            return Err((
                format!("unknown request.method '{method}'"),
                ".request.method",
            ));
        }
        r.interaction = match (method, segments.as_slice()) {
            (_, [op]) if op.starts_with('$') => {
                r.operation = Some(operation(op)?);
                I::Operation
            }
            (_, [ty, op]) if op.starts_with('$') => {
                r.resource_type = Some(check_type(ty)?);
                r.operation = Some(operation(op)?);
                I::Operation
            }
            (_, [ty, id, op]) if op.starts_with('$') => {
                r.resource_type = Some(check_type(ty)?);
                r.id = Some(check_id(id)?);
                r.operation = Some(operation(op)?);
                I::Operation
            }
            (_, []) if reads => I::Search,
            ("POST", ["_search"]) => I::Search,
            (_, ["metadata"]) if reads => I::Capabilities,
            (_, ["_history"]) if reads => I::History,
            (_, [ty]) if reads => {
                r.resource_type = Some(check_type(ty)?);
                I::Search
            }
            ("POST", [ty, "_search"]) => {
                r.resource_type = Some(check_type(ty)?);
                I::Search
            }
            (_, [ty, "_history"]) if reads => {
                r.resource_type = Some(check_type(ty)?);
                I::History
            }
            ("POST", [ty]) => {
                r.resource_type = Some(check_type(ty)?);
                if query.is_some() {
                    return Err(bad_url(format!(
                        "POST {url}: a create URL has no query; use ifNoneExist"
                    )));
                }
                match if_none_exist {
                    Some(q) => {
                        r.query = Some(q.trim_start_matches('?').to_string());
                        I::ConditionalCreate
                    }
                    None => I::Create,
                }
            }
            ("PUT" | "DELETE" | "PATCH", [ty]) => {
                r.resource_type = Some(check_type(ty)?);
                if query.is_none() {
                    return Err(bad_url(format!("{method} {url} needs an id or a query")));
                }
                match method {
                    "PUT" => I::ConditionalUpdate,
                    "DELETE" => I::ConditionalDelete,
                    _ => I::ConditionalPatch,
                }
            }
            (_, [ty, id]) => {
                r.resource_type = Some(check_type(ty)?);
                r.id = Some(check_id(id)?);
                match method {
                    "GET" | "HEAD" => I::Read,
                    "PUT" => I::Update,
                    "DELETE" => I::Delete,
                    "PATCH" => I::Patch,
                    _ => return Err(bad_url(format!("{method} {url} is not an interaction"))),
                }
            }
            (_, [ty, id, "_history"]) if reads => {
                r.resource_type = Some(check_type(ty)?);
                r.id = Some(check_id(id)?);
                I::History
            }
            (_, [ty, id, "_history", v]) if reads => {
                r.resource_type = Some(check_type(ty)?);
                r.id = Some(check_id(id)?);
                r.version = Some(
                    v.parse::<i64>()
                        .ok()
                        .filter(|v| *v > 0)
                        .ok_or_else(|| bad_url(format!("invalid version '{v}'")))?,
                );
                I::VRead
            }
            _ => return Err(bad_url(format!("{method} {url} is not an interaction"))),
        };
        if if_none_exist.is_some() && r.interaction != I::ConditionalCreate {
            return Err((
                "ifNoneExist applies only to a POST create".to_string(),
                ".request.ifNoneExist",
            ));
        }
        Ok(r)
    }

    /// The resource this entry changes, as a key for the duplicate check of a transaction:
    /// `Type/id`, or `Type?query` for a conditional change.
    fn changed_resource(&self) -> Option<String> {
        let ty = self.resource_type.as_deref()?;
        match self.interaction {
            Interaction::Update | Interaction::Delete | Interaction::Patch => {
                Some(format!("{ty}/{}", self.id.as_deref()?))
            }
            Interaction::ConditionalCreate
            | Interaction::ConditionalUpdate
            | Interaction::ConditionalDelete
            | Interaction::ConditionalPatch => {
                let mut pairs: Vec<&str> = self
                    .query
                    .as_deref()?
                    .split('&')
                    .filter(|p| !p.is_empty())
                    .collect();
                pairs.sort_unstable();
                Some(format!("{ty}?{}", pairs.join("&")))
            }
            _ => None,
        }
    }
}

/// Options of [`process_bundle`].
#[derive(Debug, Clone)]
pub struct BundleOptions {
    /// Validate each resource against the R4 model (structural validation).
    pub validate: bool,
    /// Put the stored resource into each response entry (`Prefer: return=representation`).
    pub return_resources: bool,
    /// Bytes of stored resources the read entries (`GET Type/id`, `GET Type/id/_history/v`) put
    /// into the response together. A read that would go over it, and every read after it, is
    /// answered `400 too-costly` in its entry without being read; the first read is always
    /// answered (it alone is what a read of its own gives). Without it, a Bundle of 10,000
    /// reads of one large resource made a response 10,000 times its size in memory.
    pub max_read_bytes: usize,
}

impl Default for BundleOptions {
    fn default() -> Self {
        BundleOptions {
            validate: true,
            return_resources: false,
            max_read_bytes: store::plan::DEFAULT_MAX_PAGE_BYTES,
        }
    }
}

/// `Bundle.type` of a processable Bundle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BundleKind {
    Transaction,
    Batch,
}

/// What one entry asks for, after translation.
#[derive(Debug, Clone)]
pub enum EntryAction {
    Write(WriteOp),
    Read {
        resource_type: String,
        id: String,
        version: Option<i64>,
    },
    /// A conditional create whose condition matched this resource: answered 200 with its
    /// location, nothing written; with the resource as a REST conditional create answers it.
    Existing {
        resource_type: String,
        id: String,
        version: i64,
        last_updated: String,
        resource: MatchedResource,
    },
}

/// What the entry of a matched conditional create carries of the resource it matched (a REST
/// conditional create answers the same: the resource under `Prefer: return=representation`
/// when the client may read it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MatchedResource {
    /// Not returned: no `return=representation`, or a client that may not read the type.
    Withheld,
    /// The matched version's stored JSON, returned as the entry's `resource`.
    Included(Vec<u8>),
    /// Left out because the resources the Bundle's entries return reached their byte limit
    /// ([`BundleOptions::max_read_bytes`]): the entry's response says so.
    OverLimit,
}

/// What the condition of a conditional create (`request.ifNoneExist`) found, run as a search by
/// the caller ([`BundlePlan::settle`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConditionMatch {
    /// No resource: the entry creates its own.
    Nothing,
    /// Exactly one resource, current at this version: the entry answers with it.
    One {
        id: String,
        version: i64,
        last_updated: String,
        resource: MatchedResource,
    },
}

/// A translated entry.
#[derive(Debug, Clone)]
pub struct PlannedEntry {
    pub index: usize,
    pub action: EntryAction,
}

/// The result of [`translate`]: entries in request order, each planned or failed.
#[derive(Debug)]
pub struct Translated {
    pub kind: BundleKind,
    pub entries: Vec<Result<PlannedEntry, EntryError>>,
    /// In a batch, the planned entries whose references name (by `fullUrl`) the resource another
    /// planned entry writes: [`execute`] fails such an entry when that one fails (an entry whose
    /// target failed in translation has failed already).
    pub dependencies: Vec<Dependency>,
}

/// Batch entry `entry` has a reference (the first one, at `expression`) to `reference`, the
/// `fullUrl` of entry `on`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dependency {
    pub entry: usize,
    pub on: usize,
    pub reference: String,
    pub expression: String,
}

impl Dependency {
    /// The failure of `entry` because `on` failed with the status line `on_status`.
    fn failure(&self, on_status: String) -> EntryError {
        EntryError::Dependency {
            index: self.entry,
            on: self.on,
            on_status,
            reference: self.reference.clone(),
            expression: self.expression.clone(),
        }
    }
}

/// A Bundle whose entries' requests are parsed ([`plan`]): every entry's typed
/// [`EntryRequest`] is known, nothing is resolved or validated yet. Authorization checks
/// [`BundlePlan::requests`]; [`BundlePlan::translate`] then plans the very same entries.
#[derive(Debug)]
pub struct BundlePlan {
    pub kind: BundleKind,
    entries: Vec<(Option<EntryRequest>, Result<Parsed, EntryError>)>,
}

/// Reads a Bundle's type and parses every entry's request (method, URL) into its typed form.
pub fn plan(bundle: Value) -> Result<BundlePlan, BundleError> {
    let Value::Object(mut bundle) = bundle else {
        return Err(not_processable("the body is not a JSON object", "Bundle"));
    };
    if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return Err(not_processable(
            "POST / expects a Bundle of type transaction or batch",
            "Bundle.resourceType",
        ));
    }
    let kind = match bundle.get("type").and_then(Value::as_str) {
        Some("transaction") => BundleKind::Transaction,
        Some("batch") => BundleKind::Batch,
        Some(other) => {
            return Err(not_processable(
                format!("Bundle.type must be transaction or batch, not '{other}'"),
                "Bundle.type",
            ));
        }
        None => return Err(not_processable("Bundle.type is missing", "Bundle.type")),
    };
    let entries = match bundle.remove("entry") {
        None => Vec::new(),
        Some(Value::Array(a)) => a,
        Some(_) => {
            return Err(not_processable(
                "Bundle.entry must be an array",
                "Bundle.entry",
            ));
        }
    };
    let entries = entries
        .into_iter()
        .enumerate()
        .map(|(i, e)| parse_entry(i, e))
        .collect();
    Ok(BundlePlan { kind, entries })
}

impl BundlePlan {
    /// The typed request of every entry whose `request` parsed, with the entry's index: every
    /// interaction the Bundle can perform is among these.
    pub fn requests(&self) -> impl Iterator<Item = (usize, &EntryRequest)> {
        self.entries
            .iter()
            .enumerate()
            .filter_map(|(i, (r, _))| r.as_ref().map(|r| (i, r)))
    }

    /// The conditional creates ([`Interaction::ConditionalCreate`]) to [`BundlePlan::settle`]:
    /// each entry's index, type and condition (the `ifNoneExist` query, without `?`).
    pub fn conditions(&self) -> Vec<(usize, String, String)> {
        self.entries
            .iter()
            .enumerate()
            .filter_map(|(i, (_, p))| {
                let p = p.as_ref().ok()?;
                if p.request.interaction != Interaction::ConditionalCreate {
                    return None;
                }
                Some((
                    i,
                    p.request.resource_type.clone()?,
                    p.request.query.clone().unwrap_or_default(),
                ))
            })
            .collect()
    }

    /// Settles the condition of entry `index` (one of [`BundlePlan::conditions`]) with what its
    /// search found, or with the error that stops the entry (several matches: 412; a condition
    /// that is no valid search: its status). An entry that is not a conditional create is left
    /// as it is.
    pub fn settle(&mut self, index: usize, found: Result<ConditionMatch, EntryError>) {
        let Some((_, slot)) = self.entries.get_mut(index) else {
            return;
        };
        let Ok(entry) = slot else { return };
        if entry.request.interaction != Interaction::ConditionalCreate {
            return;
        }
        match found {
            Err(e) => *slot = Err(e),
            Ok(ConditionMatch::Nothing) => entry.settled = true,
            Ok(ConditionMatch::One {
                id,
                version,
                last_updated,
                resource,
            }) => {
                entry.settled = true;
                entry.action = EntryAction::Existing {
                    resource_type: entry.request.resource_type.clone().unwrap_or_default(),
                    id,
                    version,
                    last_updated,
                    resource,
                };
            }
        }
    }

    /// Gives every create (`POST`, conditional or not) of a type for which `keep_id` answers
    /// false a new id in place of the one its resource came with, as FHIR's create does.
    /// References to the entry's `fullUrl` follow it; an `id` kept would be written as given and
    /// answered `409` when that resource exists.
    pub fn assign_create_ids(&mut self, keep_id: impl Fn(&str) -> bool) {
        for (_, p) in &mut self.entries {
            let Ok(entry) = p else { continue };
            if let EntryAction::Write(WriteOp::Create { resource }) = &mut entry.action {
                let keep = resource
                    .get("resourceType")
                    .and_then(Value::as_str)
                    .is_some_and(&keep_id);
                if !keep {
                    resource["id"] = Value::String(uuid::Uuid::new_v4().to_string());
                }
            }
        }
    }

    /// Makes every update (`PUT`) of a type for which `may_create` answers false a
    /// [`WriteOp::Replace`]: it updates a resource that exists and fails (`403`) instead of
    /// creating one, as the client may update that type but not create in it.
    pub fn updates_never_create(&mut self, may_create: impl Fn(&str) -> bool) {
        for (_, p) in &mut self.entries {
            let Ok(entry) = p else { continue };
            let EntryAction::Write(op) = &mut entry.action else {
                continue;
            };
            if let WriteOp::Update { resource_type, .. } = op
                && !may_create(resource_type)
            {
                let WriteOp::Update {
                    resource_type,
                    id,
                    resource,
                    if_match,
                } = std::mem::replace(
                    op,
                    WriteOp::Create {
                        resource: Value::Null,
                    },
                )
                else {
                    unreachable!("matched above")
                };
                *op = WriteOp::Replace {
                    resource_type,
                    id,
                    resource,
                    if_match,
                };
            }
        }
    }

    /// Decides ids, resolves `fullUrl`s, rewrites references and validates (`validate`). For a
    /// transaction, the first failing entry fails the whole Bundle, and so do two entries that
    /// change the same resource (FHIR: their identities SHALL NOT overlap).
    pub fn translate(self, validate: bool) -> Result<Translated, BundleError> {
        let kind = self.kind;
        let mut parsed: Vec<Result<Parsed, EntryError>> = self
            .entries
            .into_iter()
            .map(|(_, p)| match p {
                Ok(p) if p.request.interaction == Interaction::ConditionalCreate && !p.settled => {
                    Err(EntryError::NotSupported {
                        index: p.index,
                        message: "conditional create (ifNoneExist) is not supported here".into(),
                        expression: format!("Bundle.entry[{}].request.ifNoneExist", p.index),
                    })
                }
                p => p,
            })
            .collect();
        if kind == BundleKind::Transaction {
            check_overlaps(&parsed)?;
        }
        // bdl-7: a fullUrl names one entry. Two entries with the same one made a reference to
        // it ambiguous, and it followed the last of them silently (a Patient's `urn:uuid` could
        // send an Observation's subject to a Group); the second is refused, and with it a
        // transaction.
        let mut full_urls: HashMap<String, usize> = HashMap::new();
        for p in parsed.iter_mut() {
            let Ok(entry) = p else { continue };
            let Some(full_url) = &entry.full_url else {
                continue;
            };
            if let Some(first) = full_urls.get(full_url) {
                let index = entry.index;
                *p = Err(EntryError::Invalid {
                    index,
                    message: format!(
                        "entries {first} and {index} have the same fullUrl `{full_url}`; a fullUrl names one entry of a Bundle"
                    ),
                    expression: format!("Bundle.entry[{index}].fullUrl"),
                });
            } else {
                full_urls.insert(full_url.clone(), entry.index);
            }
        }
        // Every fullUrl is known before references are rewritten.
        let mut refs = ReferenceMap::new();
        for p in parsed.iter().flatten() {
            if let (Some(full_url), Some((ty, id))) = (&p.full_url, p.target()) {
                refs.insert(full_url.clone(), ty, id);
            }
        }
        // In a batch, which entries each entry's references name by fullUrl (the first reference
        // to each): FHIR lets a server resolve them, but an entry whose target fails must fail.
        let mut dependencies: Vec<Dependency> = Vec::new();
        for p in parsed.iter_mut() {
            let Ok(entry) = p else { continue };
            let index = entry.index;
            let Some(resource) = entry.resource_mut() else {
                continue;
            };
            let first = dependencies.len();
            let mut resolved = |full_url: &str, path: &dyn Fn() -> String| {
                if kind != BundleKind::Batch {
                    return;
                }
                let Some(&on) = full_urls.get(full_url) else {
                    return;
                };
                if on != index && !dependencies[first..].iter().any(|d| d.on == on) {
                    dependencies.push(Dependency {
                        entry: index,
                        on,
                        reference: full_url.to_string(),
                        expression: path(),
                    });
                }
            };
            if let Err(e) = check_resource_tracking(
                resource,
                &refs,
                &format!("Bundle.entry[{index}].resource"),
                validate,
                &mut resolved,
            ) {
                *p = Err(e.at_entry(index));
            }
        }
        if kind == BundleKind::Batch {
            fail_dependents(&mut parsed, &mut dependencies);
        }

        let mut entries = Vec::with_capacity(parsed.len());
        for p in parsed {
            match p {
                Err(e) if kind == BundleKind::Transaction => return Err(BundleError::Entry(e)),
                p => entries.push(p.map(Parsed::into_planned)),
            }
        }
        Ok(Translated {
            kind,
            entries,
            dependencies,
        })
    }
}

/// Why a resource cannot be written, found before the store by [`check_resource`].
#[derive(Debug)]
pub enum ResourceProblem {
    /// A `urn:` reference that names no resource being written with it. → 400 `invalid`.
    UnresolvedReference {
        reference: String,
        /// Where, below the `root` given to [`check_resource`].
        expression: String,
    },
    /// The resource fails structural validation. → 400 `invalid` (one issue per problem; paths
    /// relative to the resource).
    Invalid(Vec<fhir_model::ValidationIssue>),
}

impl ResourceProblem {
    /// The problem as the failure of Bundle entry `index`.
    pub fn at_entry(self, index: usize) -> EntryError {
        match self {
            ResourceProblem::UnresolvedReference {
                reference,
                expression,
            } => EntryError::UnresolvedReference {
                index,
                reference,
                expression,
            },
            ResourceProblem::Invalid(issues) => EntryError::Validation { index, issues },
        }
    }
}

/// The checks every resource written through `ingest` passes before the store: its references
/// rewritten with `refs` (`fullUrl` → `Type/id`), a `urn:` reference that `refs` does not know
/// refused, and (with `validate`) structural validation against the R4 model. Each Bundle entry
/// goes through it with the Bundle's `fullUrl`s, and so does a single REST create or update
/// (`POST /{type}`, `PUT /{type}/{id}`) with an empty map: outside a Bundle no `urn:` reference
/// names anything. (The bulk loader resolves across files and counts what stays unresolved
/// instead, see [`crate::loader`].) `root` prefixes the expression of an unresolved reference.
pub fn check_resource(
    resource: &mut Value,
    refs: &ReferenceMap,
    root: &str,
    validate: bool,
) -> Result<(), ResourceProblem> {
    check_resource_tracking(resource, refs, root, validate, &mut |_, _| {})
}

/// [`check_resource`], and each reference rewritten goes to `resolved` (the fullUrl it named and
/// its location), as [`ReferenceMap::rewrite_tracking`] reports it.
fn check_resource_tracking(
    resource: &mut Value,
    refs: &ReferenceMap,
    root: &str,
    validate: bool,
    resolved: &mut dyn FnMut(&str, &dyn Fn() -> String),
) -> Result<(), ResourceProblem> {
    let mut unresolved = None;
    refs.rewrite_tracking(
        resource,
        root,
        &mut |r, path| {
            if unresolved.is_none() {
                unresolved = Some((r.to_string(), path));
            }
        },
        resolved,
    );
    if let Some((reference, expression)) = unresolved {
        return Err(ResourceProblem::UnresolvedReference {
            reference,
            expression,
        });
    }
    if let Some(issue) = subsetted_issue(resource) {
        return Err(ResourceProblem::Invalid(vec![issue]));
    }
    if validate {
        fhir_model::r4()
            .validate(resource)
            .map_err(ResourceProblem::Invalid)?;
    }
    Ok(())
}

/// A resource tagged `SUBSETTED` (read with `_summary` or `_elements`) is refused on every
/// write path — REST, Bundles, the loader, `$import`: stored, it would replace the whole
/// resource by the part that was read, and carry the tag into every later read and export.
pub(crate) fn subsetted_issue(resource: &Value) -> Option<fhir_model::ValidationIssue> {
    let i = fhir_model::subsetted_tag(resource)?;
    let rtype = resource
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap_or("Resource");
    Some(fhir_model::ValidationIssue {
        path: format!("{rtype}.meta.tag[{i}]"),
        message: "the resource is tagged SUBSETTED (read with _summary or _elements): it is \
            incomplete and is not stored; write the whole resource"
            .to_string(),
    })
}

/// Fails (in place) every batch entry that depends on a failed entry, transitively, and keeps
/// in `dependencies` only those between entries still planned.
fn fail_dependents(parsed: &mut [Result<Parsed, EntryError>], dependencies: &mut Vec<Dependency>) {
    let mut dependents: HashMap<usize, Vec<usize>> = HashMap::new();
    for (i, d) in dependencies.iter().enumerate() {
        dependents.entry(d.on).or_default().push(i);
    }
    let mut failed: Vec<usize> = parsed
        .iter()
        .enumerate()
        .filter_map(|(i, p)| p.is_err().then_some(i))
        .collect();
    while let Some(on) = failed.pop() {
        let on_status = match &parsed[on] {
            Err(e) => status_line(e.status()),
            Ok(_) => continue,
        };
        for &d in dependents.get(&on).map(Vec::as_slice).unwrap_or_default() {
            let d = &dependencies[d];
            if parsed[d.entry].is_ok() {
                parsed[d.entry] = Err(d.failure(on_status.clone()));
                failed.push(d.entry);
            }
        }
    }
    dependencies.retain(|d| parsed[d.entry].is_ok() && parsed[d.on].is_ok());
}

/// Two entries of a transaction that change the same resource (`Type/id`, or the same
/// conditional URL) fail it; the second one is reported.
fn check_overlaps(parsed: &[Result<Parsed, EntryError>]) -> Result<(), BundleError> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    for p in parsed.iter().flatten() {
        let key = match p.request.interaction {
            Interaction::Create => p.target().map(|(t, i)| format!("{t}/{i}")),
            _ => p.request.changed_resource(),
        };
        let Some(key) = key else { continue };
        if let Some(first) = seen.insert(key.clone(), p.index) {
            return Err(BundleError::Entry(EntryError::Invalid {
                index: p.index,
                message: format!(
                    "entries {first} and {} both change {key}; a transaction changes each resource at most once",
                    p.index
                ),
                expression: format!("Bundle.entry[{}].request.url", p.index),
            }));
        }
    }
    Ok(())
}

/// Parse, resolve and validate a Bundle without touching a store: [`plan`], then
/// [`BundlePlan::translate`].
pub fn translate(bundle: Value, validate: bool) -> Result<Translated, BundleError> {
    plan(bundle)?.translate(validate)
}

/// Process a `POST /` Bundle against the store and return the response Bundle
/// (`transaction-response` / `batch-response`). A failing transaction returns the error of the
/// entry that failed and writes nothing.
pub fn process_bundle(
    store: &dyn Store,
    bundle: Value,
    options: &BundleOptions,
) -> Result<Value, BundleError> {
    execute(store, translate(bundle, options.validate)?, options)
}

/// Runs translated entries against the store and builds the response Bundle.
pub fn execute(
    store: &dyn Store,
    translated: Translated,
    options: &BundleOptions,
) -> Result<Value, BundleError> {
    let n = translated.entries.len();
    let dependencies = translated.dependencies;
    let mut responses: Vec<Option<Value>> = vec![None; n];
    // Bytes of stored resources the response returns for read entries and matched conditional
    // creates, bounded by `max_read_bytes` together.
    let mut read_bytes = 0usize;
    let mut writes: Vec<(usize, WriteOp)> = Vec::new();
    let mut reads: Vec<(usize, String, String, Option<i64>)> = Vec::new();
    for e in translated.entries {
        match e {
            Ok(PlannedEntry {
                index,
                action: EntryAction::Write(op),
            }) => writes.push((index, op)),
            Ok(PlannedEntry {
                index,
                action:
                    EntryAction::Read {
                        resource_type,
                        id,
                        version,
                    },
            }) => reads.push((index, resource_type, id, version)),
            Ok(PlannedEntry {
                index,
                action:
                    EntryAction::Existing {
                        resource_type,
                        id,
                        version,
                        last_updated,
                        resource,
                    },
            }) => {
                let included = match &resource {
                    MatchedResource::Included(json) => {
                        read_bytes = read_bytes.saturating_add(json.len());
                        Some(json.as_slice())
                    }
                    MatchedResource::Withheld | MatchedResource::OverLimit => None,
                };
                let mut entry = found_entry(&resource_type, &id, version, &last_updated, included);
                if resource == MatchedResource::OverLimit {
                    entry["response"]["outcome"] = json!({"resourceType": "OperationOutcome",
                            "issue": [{"severity": "information", "code": "too-costly",
                            "diagnostics": format!("{resource_type}/{id} is not included: the resources this Bundle's entries return \
                                reached {} bytes; read it at its location", options.max_read_bytes)}]});
                }
                responses[index] = Some(entry)
            }
            Err(err) => responses[err.index()] = Some(error_entry(&err)),
        }
    }
    // FHIR processing order: DELETE, POST, PUT (stable within each).
    writes.sort_by_key(|(_, op)| match op {
        WriteOp::Delete { .. } => 0,
        WriteOp::Create { .. } => 1,
        WriteOp::Update { .. } | WriteOp::Replace { .. } | WriteOp::Put(_) => 2,
    });

    match translated.kind {
        BundleKind::Transaction => {
            let indexes: Vec<usize> = writes.iter().map(|(i, _)| *i).collect();
            let keys: Vec<Option<(String, String)>> =
                writes.iter().map(|(_, op)| op_key(op)).collect();
            let ops = writes.into_iter().map(|(_, op)| op).collect();
            match store.write(ops) {
                Ok(outcomes) => {
                    for (index, outcome) in indexes.into_iter().zip(outcomes) {
                        responses[index] = Some(write_entry(&outcome, options.return_resources));
                    }
                }
                Err(e) => {
                    return Err(match failing_entry(&e, &keys) {
                        Some(pos) => BundleError::Entry(EntryError::Store {
                            index: indexes[pos],
                            source: e,
                        }),
                        None => BundleError::Store(e),
                    });
                }
            }
        }
        BundleKind::Batch => {
            // All writes in one transaction first; if that fails, each alone from a copy that
            // keeps resources as JSON text (a clone of their trees took ~10× the body).
            let retry: Vec<(usize, RetryCopy)> = writes
                .iter()
                .map(|(index, op)| (*index, RetryCopy::of(op)))
                .collect();
            let all: Vec<WriteOp> = writes.into_iter().map(|(_, op)| op).collect();
            match store.write(all) {
                Ok(outcomes) => {
                    for ((index, _), outcome) in retry.iter().zip(outcomes) {
                        responses[*index] = Some(write_entry(&outcome, options.return_resources));
                    }
                }
                // The connection lost during the call: the transaction may have committed (its
                // reply lost), and writing the entries again would create the POSTs twice. The
                // whole batch is 503 (a client resends only what it knows to be idempotent, as
                // `fhirhose load --server` does). Any other failure rolled everything back.
                Err(e @ store::StoreError::Unavailable { .. }) => {
                    return Err(BundleError::Store(e));
                }
                Err(_) => retry_alone(store, retry, &dependencies, options, &mut responses),
            }
        }
    }

    // Reads are answered in entry order until their bytes (with the matched resources') reach
    // `max_read_bytes`.
    let mut reads_over = false;
    for (index, resource_type, id, version) in reads {
        let too_costly = |read_bytes: usize| {
            error_entry(&EntryError::TooCostly {
                index,
                message: format!(
                    "the response already holds {read_bytes} bytes of resources read by earlier entries, \
                     and reads together may hold {} bytes: read {resource_type}/{id} in a request of its own",
                    options.max_read_bytes
                ),
            })
        };
        if reads_over {
            responses[index] = Some(too_costly(read_bytes));
            continue;
        }
        let result = match version {
            Some(v) => store.vread(&resource_type, &id, v),
            None => store.read(&resource_type, &id),
        };
        responses[index] = Some(match result {
            Ok(r)
                if read_bytes > 0
                    && read_bytes.saturating_add(r.json.len()) > options.max_read_bytes =>
            {
                reads_over = true;
                too_costly(read_bytes)
            }
            Ok(r) => {
                read_bytes += r.json.len();
                found_entry(
                    &resource_type,
                    &id,
                    r.version,
                    &r.last_updated,
                    Some(&r.json),
                )
            }
            Err(source) => error_entry(&EntryError::Store { index, source }),
        });
    }

    let entry: Vec<Value> = responses
        .into_iter()
        .map(|r| r.unwrap_or_else(|| json!({"response": {"status": status_line(500)}})))
        .collect();
    let ty = match translated.kind {
        BundleKind::Transaction => "transaction-response",
        BundleKind::Batch => "batch-response",
    };
    Ok(json!({
        "resourceType": "Bundle",
        "id": uuid::Uuid::new_v4().to_string(),
        "type": ty,
        "entry": entry,
    }))
}

/// A batch's writes after their single transaction failed: each alone, in the order given,
/// except that an entry whose references name another entry's resource waits for that entry,
/// and fails (424) when it failed. Entries that name each other in a circle are written
/// together, atomically; when that fails, the entry the store error names (else the first)
/// fails, and the others are tried again.
fn retry_alone(
    store: &dyn Store,
    retry: Vec<(usize, RetryCopy)>,
    dependencies: &[Dependency],
    options: &BundleOptions,
    responses: &mut [Option<Value>],
) {
    let order: Vec<usize> = retry.iter().map(|(i, _)| *i).collect();
    let mut copies: HashMap<usize, RetryCopy> = retry.into_iter().collect();
    let mut state = RetryState::new(&order, dependencies, responses, options.return_resources);
    loop {
        while let Some(index) = state.next_ready() {
            if state.fail_if_dependency_failed(index) {
                continue;
            }
            let Some(copy) = copies.remove(&index) else {
                continue;
            };
            let written = store
                .write(vec![copy.into_op()])
                .and_then(|mut outcomes| outcomes.pop().ok_or_else(no_outcome));
            state.record(index, written);
        }
        // What is left waits in a circle (or behind one). Those that depend on a failed entry
        // fail first; the rest is written together.
        let group = state.unsettled(&order);
        if group.is_empty() {
            return;
        }
        let mut failed_one = false;
        for &index in &group {
            failed_one |= state.fail_if_dependency_failed(index);
        }
        if failed_one {
            continue;
        }
        // Only the first circle that waits for nothing else: writing everything left at once
        // made one failing entry behind a circle cost a rewrite of all the others, again for
        // each such entry (quadratic in the Bundle's entries); those behind are written one by
        // one once the circle is settled.
        let group = state.closed_group(&group);
        let keys: Vec<Option<(String, String)>> = group
            .iter()
            .map(|i| copies.get(i).and_then(|c| op_key(&c.op)))
            .collect();
        let ops: Vec<WriteOp> = group
            .iter()
            .filter_map(|i| copies.get(i).cloned().map(RetryCopy::into_op))
            .collect();
        match store.write(ops) {
            Ok(outcomes) => {
                // An entry the store did not answer for failed.
                let mut outcomes = outcomes.into_iter();
                for &index in &group {
                    copies.remove(&index);
                    state.record(index, outcomes.next().ok_or_else(no_outcome));
                }
            }
            Err(source) => {
                let index = group[failing_entry(&source, &keys).unwrap_or(0)];
                copies.remove(&index);
                state.record(index, Err(source));
            }
        }
    }
}

/// The error of a write the store answered without an outcome.
fn no_outcome() -> StoreError {
    StoreError::Corrupt("no outcome".into())
}

/// Where the one-by-one retry of a batch's writes stands ([`retry_alone`]): which entries are
/// settled (written or failed) with their response entry, which wait for entries they depend
/// on, and which are ready to be written.
struct RetryState<'a> {
    /// Settled writes: `true` written, `false` failed. Entries that are not written here
    /// (reads, matched conditional creates) never fail now, so they are no one's obstacle.
    settled: HashMap<usize, bool>,
    /// Each retried entry's dependencies on other retried entries.
    on: HashMap<usize, Vec<&'a Dependency>>,
    /// The retried entries that depend on each retried entry.
    dependents: HashMap<usize, Vec<usize>>,
    /// How many unsettled entries each waiting entry still depends on.
    waiting: HashMap<usize, usize>,
    /// Entries that wait for no one, in the order to write them.
    ready: VecDeque<usize>,
    /// The response entries of the whole Bundle, by entry index.
    responses: &'a mut [Option<Value>],
    /// `Prefer: return=representation` ([`BundleOptions::return_resources`]).
    return_resources: bool,
}

impl<'a> RetryState<'a> {
    /// The state before the first write of the entries `order` (in the order to write them).
    fn new(
        order: &[usize],
        dependencies: &'a [Dependency],
        responses: &'a mut [Option<Value>],
        return_resources: bool,
    ) -> RetryState<'a> {
        let retried: HashSet<usize> = order.iter().copied().collect();
        let mut on: HashMap<usize, Vec<&Dependency>> = HashMap::new();
        let mut dependents: HashMap<usize, Vec<usize>> = HashMap::new();
        let mut waiting: HashMap<usize, usize> = HashMap::new();
        for d in dependencies {
            if retried.contains(&d.entry) && retried.contains(&d.on) {
                on.entry(d.entry).or_default().push(d);
                dependents.entry(d.on).or_default().push(d.entry);
                *waiting.entry(d.entry).or_default() += 1;
            }
        }
        let ready = order
            .iter()
            .copied()
            .filter(|i| !waiting.contains_key(i))
            .collect();
        RetryState {
            settled: HashMap::new(),
            on,
            dependents,
            waiting,
            ready,
            responses,
            return_resources,
        }
    }

    /// The next unsettled entry that waits for no one.
    fn next_ready(&mut self) -> Option<usize> {
        while let Some(index) = self.ready.pop_front() {
            if !self.settled.contains_key(&index) {
                return Some(index);
            }
        }
        None
    }

    /// The entries of `order` not settled yet, in that order.
    fn unsettled(&self, order: &[usize]) -> Vec<usize> {
        order
            .iter()
            .copied()
            .filter(|i| !self.settled.contains_key(i))
            .collect()
    }

    /// The first strongly connected set of `group` (unsettled entries, each waiting for another)
    /// that depends on no unsettled entry outside itself: a circle of entries that name each
    /// other, to be written together, in `group`'s order. Tarjan's algorithm without recursion
    /// (a Bundle's entries may be many); the first set it completes reaches no other.
    fn closed_group(&self, group: &[usize]) -> Vec<usize> {
        let pos: HashMap<usize, usize> = group.iter().enumerate().map(|(k, &i)| (i, k)).collect();
        let edges = |k: usize| -> Vec<usize> {
            self.on
                .get(&group[k])
                .map(|ds| ds.iter().filter_map(|d| pos.get(&d.on).copied()).collect())
                .unwrap_or_default()
        };
        let n = group.len();
        let (mut index, mut low) = (vec![usize::MAX; n], vec![0; n]);
        let mut on_stack = vec![false; n];
        let (mut stack, mut next) = (Vec::new(), 0);
        for root in 0..n {
            if index[root] != usize::MAX {
                continue;
            }
            index[root] = next;
            low[root] = next;
            next += 1;
            stack.push(root);
            on_stack[root] = true;
            let mut calls: Vec<(usize, Vec<usize>, usize)> = vec![(root, edges(root), 0)];
            while let Some(top) = calls.last_mut() {
                let v = top.0;
                if let Some(&w) = top.1.get(top.2) {
                    top.2 += 1;
                    if index[w] == usize::MAX {
                        index[w] = next;
                        low[w] = next;
                        next += 1;
                        stack.push(w);
                        on_stack[w] = true;
                        calls.push((w, edges(w), 0));
                    } else if on_stack[w] {
                        low[v] = low[v].min(index[w]);
                    }
                    continue;
                }
                calls.pop();
                if let Some(parent) = calls.last() {
                    low[parent.0] = low[parent.0].min(low[v]);
                }
                if low[v] == index[v] {
                    let mut members = Vec::new();
                    while let Some(w) = stack.pop() {
                        on_stack[w] = false;
                        members.push(w);
                        if w == v {
                            break;
                        }
                    }
                    members.sort_unstable();
                    return members.into_iter().map(|k| group[k]).collect();
                }
            }
        }
        group.to_vec()
    }

    /// Records the store's answer to the write of `index`: written, or failed with its error.
    fn record(&mut self, index: usize, written: Result<WriteOutcome, StoreError>) {
        match written {
            Ok(outcome) => {
                let response = write_entry(&outcome, self.return_resources);
                self.settle(index, true, response);
            }
            Err(source) => {
                let response = error_entry(&EntryError::Store { index, source });
                self.settle(index, false, response);
            }
        }
    }

    /// Fails `index` (424) when an entry it depends on failed. Whether it did.
    fn fail_if_dependency_failed(&mut self, index: usize) -> bool {
        let Some(failure) = self.failed_dependency(index) else {
            return false;
        };
        let response = error_entry(&failure);
        self.settle(index, false, response);
        true
    }

    /// The failure of `index` because an entry it depends on failed, if one did.
    fn failed_dependency(&self, index: usize) -> Option<EntryError> {
        let d = self
            .on
            .get(&index)?
            .iter()
            .find(|d| self.settled.get(&d.on) == Some(&false))?;
        let on_status = self.responses[d.on]
            .as_ref()
            .and_then(|r| r["response"]["status"].as_str())
            .unwrap_or_default()
            .to_string();
        Some(d.failure(on_status))
    }

    /// Settles `index` with its response, and queues the entries that waited for it alone.
    fn settle(&mut self, index: usize, written: bool, response: Value) {
        self.settled.insert(index, written);
        self.responses[index] = Some(response);
        for d in self
            .dependents
            .get(&index)
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            if let Some(w) = self.waiting.get_mut(d) {
                *w -= 1;
                if *w == 0 {
                    self.waiting.remove(d);
                    self.ready.push_back(*d);
                }
            }
        }
    }
}

/// A batch write kept for a retry: the op with its resource as JSON text (`op` holds `null`
/// in its place).
#[derive(Clone)]
struct RetryCopy {
    op: WriteOp,
    json: Option<Vec<u8>>,
}

impl RetryCopy {
    fn of(op: &WriteOp) -> RetryCopy {
        let json = op_resource(op).and_then(|r| serde_json::to_vec(r).ok());
        let op = match op {
            WriteOp::Create { .. } => WriteOp::Create {
                resource: Value::Null,
            },
            WriteOp::Update {
                resource_type,
                id,
                if_match,
                ..
            } => WriteOp::Update {
                resource_type: resource_type.clone(),
                id: id.clone(),
                resource: Value::Null,
                if_match: *if_match,
            },
            WriteOp::Replace {
                resource_type,
                id,
                if_match,
                ..
            } => WriteOp::Replace {
                resource_type: resource_type.clone(),
                id: id.clone(),
                resource: Value::Null,
                if_match: *if_match,
            },
            other => other.clone(),
        };
        RetryCopy { op, json }
    }

    fn into_op(self) -> WriteOp {
        let mut op = self.op;
        if let (Some(slot), Some(json)) = (op_resource_mut(&mut op), self.json) {
            *slot = serde_json::from_slice(&json).unwrap_or(Value::Null);
        }
        op
    }
}

/// The resource a create, update or replace writes.
fn op_resource(op: &WriteOp) -> Option<&Value> {
    match op {
        WriteOp::Create { resource }
        | WriteOp::Update { resource, .. }
        | WriteOp::Replace { resource, .. } => Some(resource),
        WriteOp::Delete { .. } | WriteOp::Put(_) => None,
    }
}

/// [`op_resource`], to change.
fn op_resource_mut(op: &mut WriteOp) -> Option<&mut Value> {
    match op {
        WriteOp::Create { resource }
        | WriteOp::Update { resource, .. }
        | WriteOp::Replace { resource, .. } => Some(resource),
        WriteOp::Delete { .. } | WriteOp::Put(_) => None,
    }
}

/// The response entry of a successful write.
pub fn write_entry(o: &WriteOutcome, return_resource: bool) -> Value {
    let status = match o.status {
        WriteStatus::Created => 201,
        WriteStatus::Updated => 200,
        WriteStatus::Deleted | WriteStatus::DeleteNotFound => 204,
    };
    let mut response = Map::new();
    response.insert("status".into(), Value::String(status_line(status)));
    if matches!(o.status, WriteStatus::Created | WriteStatus::Updated) {
        response.insert(
            "location".into(),
            Value::String(format!(
                "{}/{}/_history/{}",
                o.resource_type, o.id, o.version
            )),
        );
        response.insert("etag".into(), Value::String(format!("W/\"{}\"", o.version)));
    }
    if o.status != WriteStatus::DeleteNotFound {
        response.insert("lastModified".into(), Value::String(o.last_updated.clone()));
    }
    let mut entry = Map::new();
    if return_resource
        && let Some(json) = &o.json
        && let Ok(v) = serde_json::from_slice::<Value>(json)
    {
        entry.insert("resource".into(), v);
    }
    entry.insert("response".into(), Value::Object(response));
    Value::Object(entry)
}

/// The `200` response entry of a stored version that an entry found (a read, or the match of a
/// conditional create), with the version's stored JSON as its `resource` when given.
fn found_entry(
    resource_type: &str,
    id: &str,
    version: i64,
    last_updated: &str,
    json: Option<&[u8]>,
) -> Value {
    let mut entry = json!({"response": {
        "status": status_line(200),
        "location": format!("{resource_type}/{id}/_history/{version}"),
        "etag": format!("W/\"{version}\""),
        "lastModified": last_updated,
    }});
    if let Some(v) = json.and_then(|j| serde_json::from_slice::<Value>(j).ok()) {
        entry["resource"] = v;
    }
    entry
}

/// The response entry of a failed batch entry.
pub fn error_entry(e: &EntryError) -> Value {
    json!({"response": {
        "status": status_line(e.status()),
        "outcome": e.to_operation_outcome(),
    }})
}

fn op_key(op: &WriteOp) -> Option<(String, String)> {
    match op {
        WriteOp::Create { resource } => Some((
            resource.get("resourceType")?.as_str()?.to_string(),
            resource.get("id")?.as_str()?.to_string(),
        )),
        WriteOp::Update {
            resource_type, id, ..
        }
        | WriteOp::Replace {
            resource_type, id, ..
        }
        | WriteOp::Delete {
            resource_type, id, ..
        } => Some((resource_type.clone(), id.clone())),
        WriteOp::Put(p) => Some((p.resource_type().to_string(), p.id().to_string())),
    }
}

/// Which op a store error belongs to, from the resource it names.
fn failing_entry(e: &StoreError, keys: &[Option<(String, String)>]) -> Option<usize> {
    let (ty, id) = match e {
        StoreError::NotFound { resource_type, id }
        | StoreError::Gone {
            resource_type, id, ..
        }
        | StoreError::VersionConflict {
            resource_type, id, ..
        }
        | StoreError::AlreadyExists { resource_type, id }
        | StoreError::UpdateWouldCreate { resource_type, id } => (resource_type, id),
        _ => return None,
    };
    keys.iter()
        .position(|k| k.as_ref().is_some_and(|(t, i)| t == ty && i == id))
}

fn not_processable(message: impl Into<String>, expression: &str) -> BundleError {
    BundleError::NotProcessable {
        message: message.into(),
        expression: expression.to_string(),
    }
}

/// An entry after parsing, before reference rewriting.
#[derive(Debug)]
struct Parsed {
    index: usize,
    full_url: Option<String>,
    request: EntryRequest,
    action: EntryAction,
    /// A conditional create's condition was run ([`BundlePlan::settle`]).
    settled: bool,
}

impl Parsed {
    /// The resource this entry creates or updates.
    fn target(&self) -> Option<(&str, &str)> {
        match &self.action {
            EntryAction::Write(WriteOp::Create { resource }) => Some((
                resource.get("resourceType")?.as_str()?,
                resource.get("id")?.as_str()?,
            )),
            EntryAction::Write(
                WriteOp::Update {
                    resource_type, id, ..
                }
                | WriteOp::Replace {
                    resource_type, id, ..
                },
            )
            | EntryAction::Existing {
                resource_type, id, ..
            } => Some((resource_type, id)),
            _ => None,
        }
    }

    fn resource_mut(&mut self) -> Option<&mut Value> {
        match &mut self.action {
            EntryAction::Write(op) => op_resource_mut(op),
            _ => None,
        }
    }

    fn into_planned(self) -> PlannedEntry {
        PlannedEntry {
            index: self.index,
            action: self.action,
        }
    }
}

/// Parses one entry: its typed request (when `request` parses), and its planned action or why
/// it cannot be performed.
fn parse_entry(index: usize, entry: Value) -> (Option<EntryRequest>, Result<Parsed, EntryError>) {
    let at = |field: &str| format!("Bundle.entry[{index}]{field}");
    let invalid = |message: String, field: &str| EntryError::Invalid {
        index,
        message,
        expression: at(field),
    };
    let Value::Object(mut entry) = entry else {
        return (None, Err(invalid("an entry must be an object".into(), "")));
    };
    let Some(Value::Object(request)) = entry.remove("request") else {
        return (
            None,
            Err(invalid(
                "entry.request (method and url) is required in a batch or transaction".into(),
                ".request",
            )),
        );
    };
    let method = request.get("method").and_then(Value::as_str).unwrap_or("");
    let Some(url) = request.get("url").and_then(Value::as_str) else {
        return (
            None,
            Err(invalid(
                "entry.request.url is required".into(),
                ".request.url",
            )),
        );
    };
    let if_none_exist = match request.get("ifNoneExist") {
        None => None,
        Some(Value::String(s)) => Some(s.as_str()),
        Some(_) => {
            return (
                None,
                Err(invalid(
                    "ifNoneExist must be a string".into(),
                    ".request.ifNoneExist",
                )),
            );
        }
    };
    let typed = match EntryRequest::parse(method, url, if_none_exist) {
        Ok(t) => t,
        Err((message, field)) => return (None, Err(invalid(message, field))),
    };
    let planned = plan_entry(index, &mut entry, &request, &typed, method, url);
    (
        Some(typed.clone()),
        planned.map(|(full_url, action)| Parsed {
            index,
            full_url,
            request: typed,
            action,
            settled: false,
        }),
    )
}

/// The action of an entry whose request parsed as `typed`.
fn plan_entry(
    index: usize,
    entry: &mut Map<String, Value>,
    request: &Map<String, Value>,
    typed: &EntryRequest,
    method: &str,
    url: &str,
) -> Result<(Option<String>, EntryAction), EntryError> {
    let at = |field: &str| format!("Bundle.entry[{index}]{field}");
    let invalid = |message: String, field: &str| EntryError::Invalid {
        index,
        message,
        expression: at(field),
    };
    let not_supported = |message: String, field: &str| EntryError::NotSupported {
        index,
        message,
        expression: at(field),
    };
    let full_url = match entry.get("fullUrl") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(invalid("fullUrl must be a string".into(), ".fullUrl")),
    };
    // Whatever the interaction, a resource of another type than the URL's is refused: the entry
    // acts on the URL's type, and a decoy body must not make it look like something else.
    let resource = match entry.remove("resource") {
        None => None,
        Some(Value::Object(r)) => {
            match (
                r.get("resourceType").and_then(Value::as_str),
                typed.resource_type.as_deref(),
            ) {
                (Some(t), Some(ty)) if t != ty => {
                    return Err(invalid(
                        format!("resourceType '{t}' does not match request.url type '{ty}'"),
                        ".resource.resourceType",
                    ));
                }
                (Some(_), _) => Some(r),
                (None, _) => {
                    return Err(invalid(
                        "resource.resourceType is missing".into(),
                        ".resource.resourceType",
                    ));
                }
            }
        }
        Some(_) => {
            return Err(invalid(
                "entry.resource must be an object".into(),
                ".resource",
            ));
        }
    };
    let if_match = match request.get("ifMatch") {
        None => None,
        Some(Value::String(s)) => Some(parse_etag(s).ok_or_else(|| {
            invalid(
                format!("ifMatch '{s}' is not a version ETag such as W/\"3\""),
                ".request.ifMatch",
            )
        })?),
        Some(_) => {
            return Err(invalid(
                "ifMatch must be a string".into(),
                ".request.ifMatch",
            ));
        }
    };
    let needs_resource = |resource: Option<Map<String, Value>>| {
        resource
            .map(Value::Object)
            .ok_or_else(|| invalid(format!("{method} needs entry.resource"), ".resource"))
    };
    let ty = typed.resource_type.clone().unwrap_or_default();
    let id = typed.id.clone().unwrap_or_default();
    let action = match typed.interaction {
        // A conditional create is planned as a create; its condition settles it before
        // translation (`BundlePlan::settle`).
        Interaction::Create | Interaction::ConditionalCreate => {
            let mut resource = needs_resource(resource)?;
            let id = match resource.get("id") {
                Some(Value::String(id)) if is_valid_id(id) => id.clone(),
                Some(Value::String(id)) => {
                    return Err(invalid(format!("invalid id '{id}'"), ".resource.id"));
                }
                Some(_) => return Err(invalid("id must be a string".into(), ".resource.id")),
                None => uuid::Uuid::new_v4().to_string(),
            };
            resource["id"] = Value::String(id);
            EntryAction::Write(WriteOp::Create { resource })
        }
        Interaction::Update => {
            let resource = needs_resource(resource)?;
            match resource.get("id") {
                None => {}
                Some(Value::String(body)) if *body == id => {}
                Some(other) => {
                    return Err(invalid(
                        format!("resource.id {other} differs from the id '{id}' in request.url"),
                        ".resource.id",
                    ));
                }
            }
            EntryAction::Write(WriteOp::Update {
                resource_type: ty,
                id,
                resource,
                if_match,
            })
        }
        Interaction::Delete => EntryAction::Write(WriteOp::Delete {
            resource_type: ty,
            id,
            if_match,
        }),
        Interaction::Read | Interaction::VRead if method == "GET" => {
            // A subset asked of a read entry would be answered with the whole resource: refused
            // rather than ignored (a direct read cuts it). Other parameters (`_format`,
            // `_pretty`) change nothing here, as on a direct read.
            if let Some(name) = subset_parameter(typed.query.as_deref()) {
                return Err(not_supported(
                    format!(
                        "{name} on a read is not supported in a Bundle entry; read {ty}/{id} directly"
                    ),
                    ".request.url",
                ));
            }
            EntryAction::Read {
                resource_type: ty,
                id,
                version: typed.version,
            }
        }
        // `PATCH`, and `HEAD` of a read.
        Interaction::Patch
        | Interaction::ConditionalPatch
        | Interaction::Read
        | Interaction::VRead => {
            return Err(not_supported(
                format!("{method} is not supported in a Bundle"),
                ".request.method",
            ));
        }
        Interaction::Search | Interaction::ConditionalUpdate | Interaction::ConditionalDelete
            if url.contains('?') =>
        {
            return Err(not_supported(
                format!("conditional or search URL '{url}' is not supported in a Bundle"),
                ".request.url",
            ));
        }
        _ => {
            return Err(not_supported(
                format!("{method} {url} is not supported in a Bundle"),
                ".request.url",
            ));
        }
    };
    Ok((full_url, action))
}

/// The first parameter of a read's `query` that asks for a subset of the resource: `_elements`,
/// or `_summary` other than `false`.
fn subset_parameter(query: Option<&str>) -> Option<&'static str> {
    query?.split('&').find_map(|pair| {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        match name {
            "_elements" => Some("_elements"),
            "_summary" if value != "false" => Some("_summary"),
            _ => None,
        }
    })
}

/// The version an `If-Match` ETag names: `W/"3"` → 3, and the strong form `"3"` that clients
/// send too. FHIR compares the `versionId` in the quotes as a string, and the versions this
/// server writes are `1`, `2`, ...: anything else (`W/"01"`, `W/"+2"`, an unquoted `3`, an empty
/// or lowercase-`w/` tag) is a malformed ETag, `None`, which callers answer 400. Whitespace
/// around the tag (a header's optional whitespace) is ignored.
pub fn parse_etag(s: &str) -> Option<i64> {
    let s = s.trim();
    let tag = s.strip_prefix("W/").unwrap_or(s);
    let version = tag.strip_prefix('"')?.strip_suffix('"')?;
    // The exact text of a version this server writes: decimal digits without a leading zero.
    if version.is_empty()
        || version.starts_with('0')
        || !version.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    version.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags() {
        assert_eq!(parse_etag("W/\"3\""), Some(3));
        assert_eq!(parse_etag("\"12\""), Some(12));
        assert_eq!(parse_etag(" W/\"7\" "), Some(7));
        assert_eq!(parse_etag("W/\"x\""), None);
        assert_eq!(parse_etag("0"), None);
    }

    /// FHIR compares the versionId as a string: a tag whose text is not exactly a version this
    /// server writes names no version, and is malformed rather than a mismatch.
    #[test]
    fn etags_compare_the_version_text_exactly() {
        for bad in [
            "W/\"01\"",
            "W/\"+2\"",
            "W/\"-1\"",
            "W/\"0\"",
            "W/\" 2\"",
            "W/\"2 \"",
            "W/\"2.0\"",
            "W/\"\"",
            "W/\"99999999999999999999\"",
            "\"01\"",
            "3",
            "+3",
            "W/3",
            "w/\"3\"",
            "W/\"3",
            "\"3",
            "3\"",
            "W/\"3\"x",
            "*",
            "",
        ] {
            assert_eq!(parse_etag(bad), None, "{bad}");
        }
        assert_eq!(parse_etag("W/\"10\""), Some(10));
        assert_eq!(parse_etag("W/\"9223372036854775807\""), Some(i64::MAX));
    }

    #[test]
    fn a_bundle_if_match_that_is_no_version_etag_is_invalid() {
        for bad in ["W/\"01\"", "3"] {
            let b = json!({"resourceType": "Bundle", "type": "batch", "entry": [
                {"request": {"method": "DELETE", "url": "Patient/p", "ifMatch": bad}}]});
            let t = translate(b, true).unwrap();
            let err = t.entries[0].as_ref().unwrap_err();
            assert_eq!(err.status(), 400, "{bad}");
            assert!(err.to_string().contains("ifMatch"), "{err}");
        }
    }

    #[test]
    fn post_keeps_resource_id_and_rewrites_urns() {
        let b = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"fullUrl": "urn:uuid:aaaa", "resource": {"resourceType": "Patient", "id": "aaaa"},
             "request": {"method": "POST", "url": "Patient"}},
            {"fullUrl": "urn:uuid:bbbb", "resource": {"resourceType": "Observation", "status": "final",
              "code": {"text": "x"}, "subject": {"reference": "urn:uuid:aaaa"}},
             "request": {"method": "POST", "url": "Observation"}}
        ]});
        let t = translate(b, true).unwrap();
        let ops: Vec<_> = t.entries.into_iter().map(|e| e.unwrap()).collect();
        let EntryAction::Write(WriteOp::Create { resource: p }) = &ops[0].action else {
            panic!()
        };
        assert_eq!(p["id"], "aaaa");
        let EntryAction::Write(WriteOp::Create { resource: o }) = &ops[1].action else {
            panic!()
        };
        assert_eq!(o["subject"]["reference"], "Patient/aaaa");
        // No id in the resource: a fresh uuid, used consistently by references.
        assert!(is_valid_id(o["id"].as_str().unwrap()));
    }

    #[test]
    fn conditional_create_is_settled_by_the_caller() {
        let b = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"fullUrl": "urn:uuid:cccc", "resource": {"resourceType": "Patient"},
             "request": {"method": "POST", "url": "Patient", "ifNoneExist": "identifier=x|1"}},
            {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
              "subject": {"reference": "urn:uuid:cccc"}},
             "request": {"method": "POST", "url": "Observation"}}
        ]});
        // Nobody ran the condition: refused, as before conditional create existed.
        match translate(b.clone(), true) {
            Err(BundleError::Entry(EntryError::NotSupported { index: 0, .. })) => {}
            other => panic!("{other:?}"),
        }
        let mut p = plan(b).unwrap();
        assert_eq!(
            p.conditions(),
            vec![(0, "Patient".to_string(), "identifier=x|1".to_string())]
        );
        p.settle(
            0,
            Ok(ConditionMatch::One {
                id: "p9".into(),
                version: 3,
                last_updated: "2024-01-01T00:00:00.000Z".into(),
                resource: MatchedResource::Withheld,
            }),
        );
        let ops: Vec<_> = p
            .translate(true)
            .unwrap()
            .entries
            .into_iter()
            .map(|e| e.unwrap())
            .collect();
        assert!(
            matches!(&ops[0].action, EntryAction::Existing { id, version: 3, .. } if id == "p9"),
            "{:?}",
            ops[0].action
        );
        let EntryAction::Write(WriteOp::Create { resource: o }) = &ops[1].action else {
            panic!()
        };
        assert_eq!(o["subject"]["reference"], "Patient/p9");
    }

    #[test]
    fn a_fullurl_names_one_entry() {
        let entries = json!([
            {"fullUrl": "urn:uuid:aaaa", "resource": {"resourceType": "Patient"},
             "request": {"method": "POST", "url": "Patient"}},
            {"fullUrl": "urn:uuid:aaaa", "resource": {"resourceType": "Group", "type": "person", "actual": true},
             "request": {"method": "POST", "url": "Group"}},
            {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                          "subject": {"reference": "urn:uuid:aaaa"}},
             "request": {"method": "POST", "url": "Observation"}}
        ]);
        let bundle = |kind: &str| json!({"resourceType": "Bundle", "type": kind, "entry": entries});
        let Err(BundleError::Entry(e)) = translate(bundle("transaction"), true) else {
            panic!("a transaction with a fullUrl twice was accepted");
        };
        assert!(e.to_string().contains("same fullUrl"), "{e}");
        // In a batch the second entry fails alone, and the reference follows the first.
        let t = translate(bundle("batch"), true).unwrap();
        assert!(t.entries[1].is_err());
        let EntryAction::Write(WriteOp::Create { resource: o }) =
            &t.entries[2].as_ref().unwrap().action
        else {
            panic!()
        };
        assert!(
            o["subject"]["reference"]
                .as_str()
                .unwrap()
                .starts_with("Patient/"),
            "{o}"
        );
    }

    #[test]
    fn transaction_fails_on_first_bad_entry() {
        let b = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": {"resourceType": "Patient"}, "request": {"method": "POST", "url": "Patient"}},
            {"resource": {"resourceType": "Patient", "birthDate": "not a date"},
             "request": {"method": "POST", "url": "Patient"}}
        ]});
        match translate(b, true) {
            Err(BundleError::Entry(EntryError::Validation { index: 1, .. })) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_entries_are_reported_with_their_path() {
        let b = json!({"resourceType": "Bundle", "type": "batch", "entry": [
            {"resource": {"resourceType": "Patient"}},
            {"resource": {"resourceType": "Patient"}, "request": {"method": "PUT", "url": "Patient/a"}},
            {"resource": {"resourceType": "Observation"}, "request": {"method": "POST", "url": "Patient"}},
            {"request": {"method": "DELETE", "url": "Patient?name=x"}},
            {"resource": {"resourceType": "Patient", "id": "b"}, "request": {"method": "PUT", "url": "Patient/a"}},
            {"resource": {"resourceType": "Patient", "link": [{"other": {"reference": "urn:uuid:nope"}, "type": "seealso"}]},
             "request": {"method": "POST", "url": "Patient"}},
            {"request": {"method": "FROB", "url": "Patient/a"}}
        ]});
        let t = translate(b, true).unwrap();
        let statuses: Vec<Option<u16>> = t
            .entries
            .iter()
            .map(|e| e.as_ref().err().map(EntryError::status))
            .collect();
        assert_eq!(
            statuses,
            vec![
                Some(400),
                None,
                Some(400),
                Some(501),
                Some(400),
                Some(400),
                Some(400)
            ]
        );
        let e = t.entries[5].as_ref().unwrap_err();
        assert_eq!(
            e.issues()[0].expression.as_deref(),
            Some("Bundle.entry[5].resource.link[0].other.reference")
        );
    }

    #[test]
    fn not_a_transaction_or_batch() {
        for b in [
            json!([]),
            json!({"resourceType": "Patient"}),
            json!({"resourceType": "Bundle", "type": "collection"}),
        ] {
            assert_eq!(translate(b, true).unwrap_err().status(), 400);
        }
    }
}
