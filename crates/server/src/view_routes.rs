//! SQL on FHIR v2 over HTTP (issue 20): the `ViewDefinition` resource, `$viewdefinition-run`
//! (synchronous, streamed from the store) and `$viewdefinition-export` (asynchronous, a job of
//! the `$export` queue).
//!
//! `ViewDefinition` is not an R4 resource: SQL on FHIR v2 defines it as a logical model whose
//! instances are JSON with `"resourceType": "ViewDefinition"`. The store is type-agnostic (types
//! get their number on first write), so a ViewDefinition is stored, versioned, read and deleted
//! like any resource; it is validated on write by compiling it ([`views::View::compile`]), not by
//! the R4 model, and searched here (`name`, `url`) by a bounded scan of its type — there are few
//! of them and the R4 search registry has no parameters for a type it does not know. It is not a
//! profile of `Basic`: the v2 specification's JSON form is what clients send and what the
//! operations take inline, so storing that same form keeps `viewReference` and `viewResource`
//! interchangeable.
//!
//! Authorization: running a view over server data needs what exporting the view's resource type
//! needs — `r` and `s` on it (the same scopes `$export` asks) — plus `r` on `ViewDefinition` for a
//! stored view and on `Group` for `group`. A run over inline `resource` entries reads no server data.

use std::collections::HashSet;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{OriginalUri, Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::negotiate::json_object;
use crate::{AppState, fhir_json};
use auth::AuthContext;

/// The resource type of stored ViewDefinitions.
pub const VIEW_DEFINITION: &str = "ViewDefinition";

/// Search results of `GET /ViewDefinition` at most.
const MAX_SEARCH: usize = 1000;

/// Rows per Parquet row group of a streamed run (the writer holds one group).
const RUN_ROW_GROUP_ROWS: usize = 64 * 1024;
const RUN_ROW_GROUP_BYTES: usize = 16 << 20;

/// Resources read from the store per page of a run.
const RUN_PAGE: usize = 500;

/// Output formats of `$viewdefinition-run`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunFormat {
    Json,
    Ndjson,
    Csv,
    Parquet,
}

impl RunFormat {
    pub fn parse(s: &str) -> Option<RunFormat> {
        // A `+` decoded as a space is the same media type.
        let s = s.trim().replace(' ', "+").to_ascii_lowercase();
        Some(match s.as_str() {
            "json" | "application/json" | "application/fhir+json" => RunFormat::Json,
            "ndjson"
            | "application/ndjson"
            | "application/x-ndjson"
            | "application/fhir+ndjson" => RunFormat::Ndjson,
            "csv" | "text/csv" => RunFormat::Csv,
            "parquet" | "application/parquet" | "application/vnd.apache.parquet" => {
                RunFormat::Parquet
            }
            _ => return None,
        })
    }

    fn content_type(self) -> &'static str {
        match self {
            RunFormat::Json => "application/json",
            RunFormat::Ndjson => "application/x-ndjson",
            RunFormat::Csv => "text/csv; charset=utf-8",
            RunFormat::Parquet => "application/vnd.apache.parquet",
        }
    }
}

fn bad_format(v: &str) -> ApiError {
    ApiError::invalid(
        format!("_format '{v}' is not supported (json, ndjson, csv, parquet)"),
        "_format",
    )
}

/// An invalid ViewDefinition: 400 naming the element and the reason.
pub fn view_error(e: &views::ViewError) -> ApiError {
    let at = if e.element.is_empty() {
        VIEW_DEFINITION.to_string()
    } else {
        format!("{VIEW_DEFINITION}.{}", e.element)
    };
    ApiError::invalid(e.to_string(), at)
}

/// Compiles a ViewDefinition (400 when invalid).
pub fn compile(v: &Value) -> Result<views::View, ApiError> {
    views::View::compile(v).map_err(|e| view_error(&e))
}

/// Checks a ViewDefinition body on create and update.
pub fn check_view_definition(v: &Value) -> Result<(), ApiError> {
    compile(v).map(|_| ())
}

async fn blocking<T: Send + 'static>(
    wait: std::time::Duration,
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    crate::database_wait::run_api(wait, "store work", f).await
}

// ---- the parameters ----

/// The parameters of a run, from the query and a POST `Parameters` body.
#[derive(Default)]
struct RunParams {
    view_reference: Option<String>,
    view_resource: Option<Value>,
    resources: Vec<Value>,
    format: Option<RunFormat>,
    header: Option<bool>,
    limit: Option<u64>,
    since_ms: Option<i64>,
    patient: Option<String>,
    group: Option<String>,
}

fn parse_bool(name: &str, v: &str) -> Result<bool, ApiError> {
    match v {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(ApiError::invalid(
            format!("{name} '{v}' must be true or false"),
            name.to_string(),
        )),
    }
}

fn parse_since(v: &str) -> Result<i64, ApiError> {
    let text = if v.len() == 10 {
        format!("{v}T00:00:00Z")
    } else {
        v.to_string()
    };
    store::parse_instant_ms(&text).ok_or_else(|| {
        ApiError::invalid(
            format!("_since '{v}' is not an instant such as 2024-01-01T00:00:00Z"),
            "_since",
        )
    })
}

fn typed_id(name: &str, v: &str, ty: &str) -> Result<String, ApiError> {
    let id = v.strip_prefix(&format!("{ty}/")).unwrap_or(v);
    if store::is_valid_id(id) {
        Ok(id.to_string())
    } else {
        Err(ApiError::invalid(
            format!("{name} '{v}' is not a {ty} reference"),
            name.to_string(),
        ))
    }
}

impl RunParams {
    fn set(&mut self, name: &str, v: &str) -> Result<(), ApiError> {
        match name {
            "viewReference" => self.view_reference = Some(v.to_string()),
            "_format" => self.format = Some(RunFormat::parse(v).ok_or_else(|| bad_format(v))?),
            "header" => self.header = Some(parse_bool(name, v)?),
            "_limit" => {
                let n: u64 = v.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                    ApiError::invalid(format!("_limit '{v}' must be a positive integer"), "_limit")
                })?;
                self.limit = Some(n);
            }
            "_since" => self.since_ms = Some(parse_since(v)?),
            "patient" => self.patient = Some(typed_id(name, v, "Patient")?),
            "group" => self.group = Some(typed_id(name, v, "Group")?),
            "_pretty" => {}
            other => {
                return Err(ApiError::invalid(
                    format!("unknown $viewdefinition-run parameter '{other}'"),
                    other.to_string(),
                ));
            }
        }
        Ok(())
    }

    /// A POST body: `Parameters` with `viewReference`, `viewResource`, `resource` and the
    /// query parameters as `value[x]`.
    fn set_body(&mut self, body: &Value) -> Result<(), ApiError> {
        if body.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
            return Err(ApiError::invalid(
                "$viewdefinition-run takes a Parameters resource",
                "resourceType",
            ));
        }
        for (i, p) in parameters(body)?.enumerate() {
            let at = format!("Parameters.parameter[{i}]");
            let name = p
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| ApiError::invalid("every parameter needs a name", at.clone()))?;
            match name {
                "viewResource" => {
                    self.view_resource = Some(part_resource(p, &at)?.clone());
                }
                "resource" => self.resources.push(part_resource(p, &at)?.clone()),
                _ => {
                    let v = part_value(p).ok_or_else(|| {
                        ApiError::invalid(
                            format!("parameter '{name}' needs a value[x]"),
                            at.clone(),
                        )
                    })?;
                    self.set(name, &v)?;
                }
            }
        }
        Ok(())
    }
}

/// The `parameter` array of a Parameters body; a malformed body is refused (see
/// [`export::request::parameter_list`]).
fn parameters(body: &Value) -> Result<impl Iterator<Item = &Value>, ApiError> {
    export::request::parameter_list(body)
        .map(|list| list.iter())
        .map_err(|e| ApiError::invalid(e.message, e.param))
}

fn part_resource<'a>(p: &'a Value, at: &str) -> Result<&'a Value, ApiError> {
    p.get("resource").filter(|r| r.is_object()).ok_or_else(|| {
        ApiError::invalid(
            format!(
                "parameter '{}' needs a resource",
                p.get("name").and_then(Value::as_str).unwrap_or("")
            ),
            at.to_string(),
        )
    })
}

/// The text of a parameter's `value[x]`: strings as they are, references as their `reference`,
/// booleans and numbers as JSON text.
fn part_value(p: &Value) -> Option<String> {
    let (_, v) = p
        .as_object()?
        .iter()
        .find(|(k, _)| k.starts_with("value"))?;
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Bool(_) | Value::Number(_) => Some(v.to_string()),
        Value::Object(o) => o
            .get("reference")
            .and_then(Value::as_str)
            .map(str::to_string),
        _ => None,
    }
}

// ---- ViewDefinition lookup ----

/// The ViewDefinitions current in the store, in order, passed to `f` until it says stop.
fn each_stored_view(
    store: &dyn store::Store,
    f: &mut dyn FnMut(&store::StoredResource, &Value) -> bool,
) -> Result<(), ApiError> {
    let as_of = store.current_seq()?;
    let mut after = 0;
    loop {
        let page = store.scan_type(VIEW_DEFINITION, as_of, after, 200)?;
        let Some(last) = page.last() else {
            return Ok(());
        };
        after = last.seq;
        for r in &page {
            let Ok(v) = serde_json::from_slice::<Value>(&r.json) else {
                continue;
            };
            if !f(r, &v) {
                return Ok(());
            }
        }
    }
}

/// What resolving `reference` ([`resolve_reference`]) needs: `ViewDefinition/id` reads one
/// (`r`); a canonical `url` searches the stored ViewDefinitions by it (`r` and `s`: whether a
/// view of that url exists is a search's answer).
fn authorize_reference(ctx: &AuthContext, reference: &str) -> Result<(), ApiError> {
    ctx.require_read(VIEW_DEFINITION)?;
    if !reference.starts_with("ViewDefinition/") {
        ctx.require_search(VIEW_DEFINITION)?;
    }
    Ok(())
}

/// A stored ViewDefinition by `ViewDefinition/id` or by canonical `url` (`url|version` too).
fn resolve_reference(store: &dyn store::Store, reference: &str) -> Result<Value, ApiError> {
    if let Some(id) = reference.strip_prefix("ViewDefinition/") {
        if !store::is_valid_id(id) {
            return Err(ApiError::invalid(
                format!("viewReference '{reference}' is not a ViewDefinition reference"),
                "viewReference",
            ));
        }
        let r = store.read(VIEW_DEFINITION, id).map_err(|e| match e {
            store::StoreError::NotFound { .. } | store::StoreError::Gone { .. } => {
                ApiError::invalid(
                    format!("viewReference '{reference}': no such ViewDefinition"),
                    "viewReference",
                )
            }
            e => e.into(),
        })?;
        return serde_json::from_slice(&r.json).map_err(|e| ApiError::internal("view", e));
    }
    let (url, version) = match reference.split_once('|') {
        Some((u, v)) => (u, Some(v)),
        None => (reference, None),
    };
    // Every match is looked for, not the first: two stored views of one url (another client may
    // create one, or an update may move the real one behind it in the store's order) would make
    // the view that runs a matter of store order, so a reference that names several is refused.
    let mut found = None;
    let mut ids = Vec::new();
    each_stored_view(store, &mut |r, v| {
        let matches = v.get("url").and_then(Value::as_str) == Some(url)
            && version.is_none_or(|ver| v.get("version").and_then(Value::as_str) == Some(ver));
        if matches {
            ids.push(r.id.clone());
            found.get_or_insert_with(|| v.clone());
        }
        true
    })?;
    if ids.len() > 1 {
        ids.sort();
        let shown = ids.len().min(MAX_AMBIGUOUS_SHOWN);
        return Err(ApiError::invalid(
            format!(
                "viewReference '{reference}' is ambiguous: {} stored ViewDefinitions have this \
                 url{} ({}{}); name one by `ViewDefinition/id`{}",
                ids.len(),
                if version.is_some() {
                    " and version"
                } else {
                    ""
                },
                ids[..shown].join(", "),
                if shown < ids.len() { ", …" } else { "" },
                if version.is_some() {
                    ""
                } else {
                    " or by `url|version`"
                },
            ),
            "viewReference",
        ));
    }
    found.ok_or_else(|| {
        ApiError::invalid(
            format!("viewReference '{reference}': no stored ViewDefinition has this url"),
            "viewReference",
        )
    })
}

/// How many ids of the stored views an ambiguous canonical reference names in its refusal.
const MAX_AMBIGUOUS_SHOWN: usize = 5;

/// `GET /ViewDefinition?name=&url=&_count=`: a bounded scan of the stored ViewDefinitions.
pub async fn search(
    state: AppState,
    ctx: AuthContext,
    pairs: Vec<(String, String)>,
) -> Result<Response, ApiError> {
    ctx.require_search(VIEW_DEFINITION)?;
    // It answers with the stored views: a search that returns resources reads them (`r`).
    ctx.require_read(VIEW_DEFINITION)?;
    let (mut name, mut url, mut count) = (None, None, 100usize);
    for (k, v) in &pairs {
        match k.as_str() {
            "name" => name = Some(v.clone()),
            "url" => url = Some(v.clone()),
            "_count" => {
                count = v.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                    ApiError::invalid("_count must be a positive integer", "_count")
                })?;
                count = count.min(MAX_SEARCH);
            }
            "_format" | "_pretty" => {}
            other => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "not-supported",
                    format!("ViewDefinition is searched by name and url only, not '{other}'"),
                )
                .at(other.to_string()));
            }
        }
    }
    let store = state.store.clone();
    let base = state.base_url.clone();
    let entries = blocking(state.database_wait, move || {
        let mut out = Vec::new();
        each_stored_view(store.as_ref(), &mut |r, v| {
            let keep = name
                .as_deref()
                .is_none_or(|n| v.get("name").and_then(Value::as_str) == Some(n))
                && url
                    .as_deref()
                    .is_none_or(|u| v.get("url").and_then(Value::as_str) == Some(u));
            if keep {
                out.push(
                    json!({"fullUrl": format!("{base}/{VIEW_DEFINITION}/{}", r.id),
                    "resource": v, "search": {"mode": "match"}}),
                );
            }
            out.len() < count
        })?;
        Ok(out)
    })
    .await?;
    Ok(fhir_json(
        &json!({"resourceType": "Bundle", "type": "searchset", "entry": entries}),
    ))
}

// ---- $viewdefinition-run ----

/// `GET|POST /$viewdefinition-run` and `/ViewDefinition/$viewdefinition-run`.
pub async fn run(
    State(state): State<AppState>,
    ctx: AuthContext,
    method: Method,
    RawQuery(raw): RawQuery,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    run_request(state, ctx, None, method, raw, body).await
}

/// `GET|POST /{type}/$viewdefinition-run`: only `ViewDefinition` has it.
pub async fn type_run(
    State(state): State<AppState>,
    ctx: AuthContext,
    Path(rtype): Path<String>,
    method: Method,
    RawQuery(raw): RawQuery,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    if rtype != VIEW_DEFINITION {
        return Err(ApiError::not_found(format!(
            "no such endpoint: /{rtype}/$viewdefinition-run"
        )));
    }
    run_request(state, ctx, None, method, raw, body).await
}

/// `ViewDefinition/{id}/$viewdefinition-run` (dispatched from the instance operation route).
pub async fn instance_run(
    state: AppState,
    ctx: AuthContext,
    id: String,
    method: Method,
    raw: Option<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    if !store::is_valid_id(&id) {
        return Err(ApiError::invalid(format!("invalid id '{id}'"), "id"));
    }
    run_request(state, ctx, Some(id), method, raw, body).await
}

async fn run_request(
    state: AppState,
    ctx: AuthContext,
    instance: Option<String>,
    method: Method,
    raw: Option<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let mut params = RunParams::default();
    for (k, v) in raw
        .as_deref()
        .map(search::parse_query_string)
        .unwrap_or_default()
    {
        params.set(&k, &v)?;
    }
    if method == Method::POST {
        let body = json_object(body)?;
        params.set_body(&body)?;
    }
    if params.resources.len() > state.policy.max_bundle_entries {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-costly",
            format!(
                "more than {} inline resources (the Bundle entry limit)",
                state.policy.max_bundle_entries
            ),
        )
        .at("resource"));
    }
    // The view: the instance, a reference or inline.
    let given = [
        instance.is_some(),
        params.view_reference.is_some(),
        params.view_resource.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    if given != 1 {
        return Err(ApiError::invalid(
            "exactly one view is run: give viewReference or viewResource (or run a stored ViewDefinition instance)",
            "viewReference",
        ));
    }
    let json = match (
        &instance,
        &params.view_reference,
        params.view_resource.take(),
    ) {
        (_, _, Some(v)) => v,
        (Some(id), _, _) => {
            ctx.require_read(VIEW_DEFINITION)?;
            let store = state.store.clone();
            let reference = format!("{VIEW_DEFINITION}/{id}");
            blocking(state.database_wait, move || {
                match store.read(VIEW_DEFINITION, &reference[VIEW_DEFINITION.len() + 1..]) {
                    Ok(r) => {
                        serde_json::from_slice(&r.json).map_err(|e| ApiError::internal("view", e))
                    }
                    Err(e) => Err(e.into()),
                }
            })
            .await?
        }
        (None, Some(reference), None) => {
            authorize_reference(&ctx, reference)?;
            let store = state.store.clone();
            let reference = reference.clone();
            blocking(state.database_wait, move || {
                resolve_reference(store.as_ref(), &reference)
            })
            .await?
        }
        (None, None, None) => unreachable_view()?,
    };
    let view = Arc::new(compile(&json)?);
    let format = params.format.unwrap_or(RunFormat::Json);
    let header = params.header.unwrap_or(true);
    let name = view.name().unwrap_or("view").to_string();
    let source = if params.resources.is_empty() {
        let rt = view.resource_type().to_string();
        ctx.require_read(&rt)?;
        ctx.require_search(&rt)?;
        if params.group.is_some() {
            ctx.require_read("Group")?;
        }
        let store = state.store.clone();
        let (patient, group, since_ms) = (
            params.patient.clone(),
            params.group.clone(),
            params.since_ms,
        );
        let settings = state.export.run_settings().clone();
        let prepared = blocking(state.database_wait, move || {
            let as_of = store.current_seq()?;
            let since_after = match since_ms {
                Some(ms) => (store.seq_at_or_after(ms.saturating_add(1))? - 1).max(0),
                None => 0,
            };
            let mut scope: Option<HashSet<String>> = None;
            if let Some(g) = &group {
                scope = Some(
                    export::run::group_members(
                        store.as_ref(),
                        g,
                        &settings,
                        export::run::Snapshot {
                            seq: as_of,
                            at_ms: chrono::Utc::now().timestamp_millis(),
                        },
                    )
                    .map_err(|e| match e {
                        export::run::RunError::GroupNotFound(_) => {
                            ApiError::not_found(format!("Group/{g} not found"))
                        }
                        export::run::RunError::GroupTooLarge(m) => {
                            ApiError::new(StatusCode::BAD_REQUEST, "too-costly", m).at("group")
                        }
                        other => ApiError::internal("view run group", other),
                    })?,
                );
            }
            if let Some(p) = patient {
                scope = Some(match scope {
                    Some(s) => s.into_iter().filter(|x| *x == p).collect(),
                    None => HashSet::from([p]),
                });
            }
            Ok((as_of, since_after, scope))
        })
        .await?;
        Source::Store {
            store: state.store.clone(),
            as_of: prepared.0,
            after: prepared.1,
            scope: prepared.2,
            wait: state.database_wait,
            runtime: tokio::runtime::Handle::current(),
        }
    } else {
        Source::Inline(std::mem::take(&mut params.resources))
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Bytes, StreamError>>(4);
    let span = tracing::Span::current();
    let limit = params.limit;
    tokio::task::spawn_blocking(move || {
        let _request = span.enter();
        let fail = tx.clone();
        let out = ChannelWriter {
            tx,
            buf: Vec::with_capacity(CHUNK),
        };
        // The client's going away also stops an evaluation in the middle of one resource
        // (`stream_rows` looks between resources; one resource of a costly view takes seconds).
        let gone = fail.clone();
        let run = views::with_stop(std::rc::Rc::new(move || gone.is_closed()), || {
            stream_rows(&view, source, format, header, limit, &name, out)
        });
        if let Err(e) = run {
            tracing::warn!(error = %e, "view run stopped");
            // Before the first chunk the answer becomes the error's OperationOutcome; after it,
            // the body is cut off (an error for the client, never a short answer that looks
            // whole).
            let _ = fail.blocking_send(Err(e));
        }
    });
    // The status waits for the first chunk (or the end of a small answer).
    let first = match rx.recv().await {
        Some(Err(e)) => return Err(run_error(e)),
        first => first,
    };
    // Fused: a body may be asked again after its end (an unfold must not be).
    let rest = futures::stream::unfold(rx, |mut rx| async move {
        let chunk = rx.recv().await?;
        Some((chunk, rx))
    })
    .fuse();
    let mut resp = Body::from_stream(futures::stream::iter(first).chain(rest)).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    Ok(resp)
}

/// The answer for a run that stopped before its first byte.
fn run_error(e: StreamError) -> ApiError {
    match e {
        StreamError::Row(e) if matches!(e.reason, views::RowReason::TooManyRows(_)) => {
            ApiError::new(StatusCode::BAD_REQUEST, "too-costly", e.to_string())
        }
        StreamError::Row(e) => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "processing",
            e.to_string(),
        ),
        StreamError::Parquet(e) => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "processing",
            e.to_string(),
        ),
        StreamError::Store(e) => e.into(),
        StreamError::Database(e) => e,
        StreamError::Io(e) => ApiError::internal("view run", e),
    }
}

fn unreachable_view() -> Result<Value, ApiError> {
    Err(ApiError::invalid("no view given", "viewReference"))
}

enum Source {
    Inline(Vec<Value>),
    Store {
        store: Arc<dyn store::Store>,
        as_of: i64,
        after: i64,
        scope: Option<HashSet<String>>,
        /// `--database-wait`: the bound on each page read.
        wait: Duration,
        /// The server's runtime, which the run's thread waits on for each page read.
        runtime: tokio::runtime::Handle,
    },
}

const CHUNK: usize = 64 * 1024;

/// An error once the response body was dropped: the client went away.
fn client_gone<T>(tx: &tokio::sync::mpsc::Sender<T>) -> std::io::Result<()> {
    if tx.is_closed() {
        Err(std::io::Error::new(
            std::io::ErrorKind::BrokenPipe,
            "the client went away",
        ))
    } else {
        Ok(())
    }
}

/// A `Write` into the response body: chunks of [`CHUNK`] bytes through a bounded channel (the
/// run waits for a slow client; it stops when the client went away, and [`stream_rows`] also
/// looks before each resource, for a run that writes nothing for a long time).
struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<Result<Bytes, StreamError>>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        self.tx.blocking_send(Ok(chunk)).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the client went away")
        })
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Row(#[from] views::RowError),
    #[error("{0}")]
    Parquet(#[from] views::parquet::ParquetError),
    #[error("{0}")]
    Store(#[from] store::StoreError),
    /// A page read that the database did not answer within `--database-wait`.
    #[error("{}", .0.issues.first().map_or("database wait", |i| i.diagnostics.as_str()))]
    Database(ApiError),
}

/// Rows into one of the formats.
enum RowWriter<W: Write + Send> {
    Text {
        w: W,
        format: RunFormat,
        rows: u64,
        line: String,
    },
    Parquet(Box<views::parquet::ParquetWriter<W>>),
}

impl<W: Write + Send> RowWriter<W> {
    fn write_row(&mut self, view: &views::View, row: &[views::Value]) -> Result<(), StreamError> {
        match self {
            RowWriter::Parquet(p) => p.write_row(row)?,
            RowWriter::Text {
                w,
                format,
                rows,
                line,
            } => {
                line.clear();
                match format {
                    RunFormat::Csv => views::csv::write_row(row, line),
                    RunFormat::Json => {
                        line.push_str(if *rows == 0 { "[" } else { "," });
                        views::ndjson::write_row(view.columns(), row, line);
                        line.pop();
                    }
                    _ => views::ndjson::write_row(view.columns(), row, line),
                }
                *rows += 1;
                w.write_all(line.as_bytes())?;
            }
        }
        Ok(())
    }

    fn finish(self) -> Result<W, StreamError> {
        match self {
            RowWriter::Parquet(p) => Ok(p.finish()?),
            RowWriter::Text {
                mut w,
                format,
                rows,
                ..
            } => {
                if format == RunFormat::Json {
                    w.write_all(if rows == 0 { b"[]" } else { b"]" })?;
                }
                Ok(w)
            }
        }
    }
}

fn stream_rows(
    view: &views::View,
    source: Source,
    format: RunFormat,
    header: bool,
    limit: Option<u64>,
    name: &str,
    mut out: ChannelWriter,
) -> Result<(), StreamError> {
    let probe = out.tx.clone();
    tracing::debug!(resource_type = %view.resource_type(), "view run running");
    let mut w = match format {
        RunFormat::Parquet => RowWriter::Parquet(Box::new(views::parquet::ParquetWriter::new(
            name,
            view.columns(),
            out,
            views::parquet::Options {
                row_group_rows: RUN_ROW_GROUP_ROWS,
                row_group_bytes: RUN_ROW_GROUP_BYTES,
            },
        )?)),
        _ => {
            if format == RunFormat::Csv && header {
                let mut h = String::new();
                views::csv::write_header(view.columns(), &mut h);
                out.write_all(h.as_bytes())?;
            }
            RowWriter::Text {
                w: out,
                format,
                rows: 0,
                line: String::new(),
            }
        }
    };
    let limit = limit.unwrap_or(u64::MAX);
    let mut written = 0u64;
    // One resource: its rows, until the limit (`Sink(None)`: the limit is reached).
    let mut one = |w: &mut RowWriter<ChannelWriter>, r: &Value| -> Result<bool, StreamError> {
        let each = view.for_each_row(r, |row| {
            if written >= limit {
                return Err(None);
            }
            w.write_row(view, row).map_err(Some)?;
            written += 1;
            Ok(())
        });
        match each {
            Ok(_) => Ok(written < limit),
            Err(views::EachRowError::Row(e)) => Err(e.into()),
            Err(views::EachRowError::Sink(None)) => Ok(false),
            Err(views::EachRowError::Sink(Some(e))) => Err(e),
        }
    };
    match source {
        Source::Inline(resources) => {
            for r in &resources {
                client_gone(&probe)?;
                if !one(&mut w, r)? {
                    break;
                }
            }
        }
        Source::Store {
            store,
            as_of,
            mut after,
            scope,
            wait,
            runtime,
        } => {
            let rt = view.resource_type();
            let compartment = export::run::compartment_params(rt);
            let mut looked_at = 0u64;
            'pages: loop {
                // A bounded page at a time: no reader connection is held while the client reads.
                // Each page read waits at most `--database-wait`, as every request's store work
                // does: a database that stops answering ends the run (503 before its first
                // byte, a cut-off body after it) instead of holding its answer for as long.
                let (store, ty) = (store.clone(), rt.to_string());
                let page = runtime
                    .block_on(crate::database_wait::run(
                        wait,
                        "view run page",
                        move || store.scan_type(&ty, as_of, after, RUN_PAGE),
                    ))
                    .map_err(StreamError::Database)??;
                let Some(last) = page.last() else {
                    break;
                };
                after = last.seq;
                for stored in &page {
                    // A view whose rows are few (or none, or outside the patient's compartment)
                    // sends nothing for a long time: without this look it ran through the whole
                    // type after its client had gone.
                    // The client gone: logged with how far the run got, then the run ends.
                    let gone = |looked_at: u64| {
                        client_gone(&probe).map_err(|e| {
                            tracing::info!(
                                resources = looked_at,
                                "view run stopped: the client went away"
                            );
                            StreamError::from(e)
                        })
                    };
                    gone(looked_at)?;
                    looked_at += 1;
                    let Ok(r) = serde_json::from_slice::<Value>(&stored.json) else {
                        continue;
                    };
                    if scope.is_some() && !export::run::in_compartment(rt, &r, &compartment, &scope)
                    {
                        continue;
                    }
                    // An error of a resource whose client is gone is the stop condition ending
                    // its evaluations (`views::with_stop`): the client went away.
                    let more = match one(&mut w, &r) {
                        Ok(more) => more,
                        Err(e) => {
                            gone(looked_at)?;
                            return Err(e);
                        }
                    };
                    if !more {
                        break 'pages;
                    }
                }
            }
        }
    }
    let mut out = w.finish()?;
    out.flush()?;
    Ok(())
}

// ---- $viewdefinition-export ----

/// `POST /$viewdefinition-export` (and `/ViewDefinition/$viewdefinition-export`): the views and
/// parameters become an `$export` kick-off with the views recorded on the job (`_view`), run by
/// the export workers; status, files and cancel are the `$export` routes.
pub async fn export_kickoff(
    State(state): State<AppState>,
    ctx: AuthContext,
    headers: HeaderMap,
    OriginalUri(uri): OriginalUri,
    RawQuery(raw): RawQuery,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = json_object(body)?;
    if body.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
        return Err(ApiError::invalid(
            "$viewdefinition-export takes a Parameters resource",
            "resourceType",
        ));
    }
    // Pairs in the `$export` request's form; views resolved to their JSON now, so the job runs
    // exactly the views of the kick-off.
    let mut out: Vec<Value> = Vec::new();
    let string = |name: &str, v: &str| json!({"name": name, "valueString": v});
    let mut views_given: Vec<(Option<String>, ViewSource)> = Vec::new();
    let (mut patients, mut group) = (Vec::new(), None);
    let query: Vec<(String, String)> = raw
        .as_deref()
        .map(search::parse_query_string)
        .unwrap_or_default();
    let mut body_pairs: Vec<(String, String)> = Vec::new();
    for (i, p) in parameters(&body)?.enumerate() {
        let at = format!("Parameters.parameter[{i}]");
        let name = p
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::invalid("every parameter needs a name", at.clone()))?;
        match name {
            "view" => {
                let mut vname = None;
                let mut src = None;
                for part in p
                    .get("part")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    match part.get("name").and_then(Value::as_str) {
                        Some("name") => vname = part_value(part),
                        Some("viewReference") => src = part_value(part).map(ViewSource::Reference),
                        Some("viewResource") => {
                            src = Some(ViewSource::Inline(part_resource(part, &at)?.clone()))
                        }
                        other => {
                            return Err(ApiError::invalid(
                                format!("unknown part '{}' of view", other.unwrap_or("")),
                                at.clone(),
                            ));
                        }
                    }
                }
                let src = src.ok_or_else(|| {
                    ApiError::invalid("a view needs viewReference or viewResource", at.clone())
                })?;
                views_given.push((vname, src));
            }
            "viewResource" => {
                views_given.push((None, ViewSource::Inline(part_resource(p, &at)?.clone())))
            }
            _ => {
                let v = part_value(p).ok_or_else(|| {
                    ApiError::invalid(format!("parameter '{name}' needs a value[x]"), at.clone())
                })?;
                body_pairs.push((name.to_string(), v));
            }
        }
    }
    for (k, v) in query.into_iter().chain(body_pairs) {
        match k.as_str() {
            "viewReference" => views_given.push((None, ViewSource::Reference(v))),
            "_format" => {
                let f = RunFormat::parse(&v)
                    .filter(|f| *f != RunFormat::Json)
                    .ok_or_else(|| {
                        ApiError::invalid(
                            format!("_format '{v}' is not supported (ndjson, csv, parquet)"),
                            "_format",
                        )
                    })?;
                let f = match f {
                    RunFormat::Csv => "csv",
                    RunFormat::Parquet => "parquet",
                    _ => "ndjson",
                };
                out.push(string("_viewFormat", f));
            }
            "header" => out.push(string(
                "_viewHeader",
                &parse_bool("header", &v)?.to_string(),
            )),
            "patient" => patients.push(typed_id("patient", &v, "Patient")?),
            "group" => group = Some(typed_id("group", &v, "Group")?),
            "clientTrackingId" => {}
            "_since"
            | "_until"
            | "_container"
            | "_typeFilter"
            | "_anonymizationConfig"
            | "_anonymizationConfigEtag"
            | "_anonymizationConfigCollectionReference" => out.push(string(&k, &v)),
            other => {
                return Err(ApiError::invalid(
                    format!("unknown $viewdefinition-export parameter '{other}'"),
                    other.to_string(),
                ));
            }
        }
    }
    if views_given.is_empty() {
        return Err(ApiError::invalid(
            "$viewdefinition-export needs at least one view",
            "view",
        ));
    }
    if views_given.len() > export::request::MAX_VIEWS {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "too-costly",
            format!(
                "at most {} views per export (each writes files of its own): split them over several exports",
                export::request::MAX_VIEWS
            ),
        )
        .at("view"));
    }
    for (_, source) in &views_given {
        if let ViewSource::Reference(r) = source {
            authorize_reference(&ctx, r)?;
        }
    }
    let store = state.store.clone();
    let resolved = blocking(state.database_wait, move || {
        let mut list = Vec::new();
        let mut names = HashSet::new();
        for (i, (name, src)) in views_given.into_iter().enumerate() {
            let mut v = match src {
                ViewSource::Inline(v) => v,
                ViewSource::Reference(r) => resolve_reference(store.as_ref(), &r)?,
            };
            if let (Some(n), Some(obj)) = (name, v.as_object_mut()) {
                obj.insert("name".into(), Value::String(n));
            }
            let view = compile(&v).map_err(|e| {
                let mut e = e;
                if let Some(issue) = e.issues.first_mut() {
                    issue.expression = issue
                        .expression
                        .take()
                        .map(|x| format!("view[{i}].{x}"));
                }
                e
            })?;
            let Some(n) = view.name() else {
                return Err(ApiError::invalid(
                    "every exported view needs a name (the view's name or the view parameter's name part): it names the files",
                    format!("view[{i}].name"),
                ));
            };
            if !names.insert(n.to_string()) {
                return Err(ApiError::invalid(
                    format!("two views are named '{n}': names must be unique, they name the files"),
                    format!("view[{i}].name"),
                ));
            }
            list.push(v);
        }
        Ok(list)
    })
    .await?;
    for v in resolved {
        out.push(string("_view", &v.to_string()));
    }
    for p in &patients {
        out.push(
            json!({"name": "patient", "valueReference": {"reference": format!("Patient/{p}")}}),
        );
    }
    let level = match (group, patients.is_empty()) {
        (Some(g), _) => export::ExportLevel::Group(g),
        (None, false) => export::ExportLevel::Patient,
        (None, true) => export::ExportLevel::System,
    };
    let params = json!({"resourceType": "Parameters", "parameter": out});
    let body = Bytes::from(params.to_string());
    crate::export_routes::kickoff(
        state,
        ctx,
        level,
        Method::POST,
        headers,
        uri.path().to_string(),
        None,
        Ok(body),
        crate::export_routes::Views::Checked,
    )
    .await
}

enum ViewSource {
    Reference(String),
    Inline(Value),
}

/// The CapabilityStatement entry of the ViewDefinition type.
pub fn capability_resource() -> Value {
    json!({
        "type": VIEW_DEFINITION,
        "profile": "https://sql-on-fhir.org/ig/StructureDefinition/ViewDefinition",
        "interaction": [
            {"code": "read"}, {"code": "vread"}, {"code": "update"}, {"code": "delete"},
            {"code": "history-instance"}, {"code": "history-type"}, {"code": "create"},
            {"code": "search-type"}
        ],
        "versioning": "versioned",
        "readHistory": true,
        "updateCreate": true,
        "searchParam": [
            {"name": "name", "type": "string"},
            {"name": "url", "type": "uri"}
        ],
        "operation": capability_operations(),
    })
}

/// The two operations, as listed at system level and on the ViewDefinition type.
pub fn capability_operations() -> Value {
    json!([
        {"name": "viewdefinition-run", "definition": "https://sql-on-fhir.org/ig/OperationDefinition/ViewDefinitionRun"},
        {"name": "viewdefinition-export", "definition": "https://sql-on-fhir.org/ig/OperationDefinition/ViewDefinitionExport"}
    ])
}
