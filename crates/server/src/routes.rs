//! The REST handlers.

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use store::{
    HistoryMethod, HistoryPage, HistoryQuery, HistoryScope, StoredResource, WriteOp, WriteOutcome,
};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::compression::predicate::{DefaultPredicate, NotForContentType, Predicate};
use tower_http::compression::{CompressionLayer, CompressionLevel};
use tower_http::decompression::RequestDecompressionLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnResponse, TraceLayer};

use crate::error::ApiError;
use crate::negotiate::{self, json_body};
use crate::{AppState, fhir_bytes, fhir_json};
use auth::AuthContext;

/// `/{type}/{id}/{op}`: `/Group/{id}/$export` and `/ViewDefinition/{id}/$viewdefinition-run`
/// (the router depends on both route modules; neither on the other's dispatch).
// One argument per axum extractor: a struct would only rename them.
#[allow(clippy::too_many_arguments)]
async fn instance_operation(
    State(state): State<AppState>,
    ctx: AuthContext,
    Path((rtype, id, op)): Path<(String, String, String)>,
    method: axum::http::Method,
    headers: HeaderMap,
    axum::extract::OriginalUri(uri): axum::extract::OriginalUri,
    RawQuery(raw): RawQuery,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    if rtype == crate::view_routes::VIEW_DEFINITION && op == "$viewdefinition-run" {
        return crate::view_routes::instance_run(state, ctx, id, method, raw, body).await;
    }
    if rtype != "Group" || op != "$export" {
        return Err(ApiError::not_found(format!(
            "no such endpoint: /{rtype}/{id}/{op}"
        )));
    }
    crate::export_routes::group_export(state, ctx, id, method, headers, uri, raw, body).await
}

/// Builds the router with every layer.
pub fn router(state: AppState) -> Router {
    let auth = state.auth.clone();
    let fhir = Router::new()
        .route("/", post(bundle))
        .route(
            "/$export",
            get(crate::export_routes::system_export).post(crate::export_routes::system_export),
        )
        .route(
            "/$viewdefinition-run",
            get(crate::view_routes::run).post(crate::view_routes::run),
        )
        .route(
            "/{rtype}/$viewdefinition-run",
            get(crate::view_routes::type_run).post(crate::view_routes::type_run),
        )
        .route(
            "/$viewdefinition-export",
            post(crate::view_routes::export_kickoff),
        )
        .route(
            "/ViewDefinition/$viewdefinition-export",
            post(crate::view_routes::export_kickoff),
        )
        .route(
            "/{rtype}/$export",
            get(crate::export_routes::type_export).post(crate::export_routes::type_export),
        )
        .route(
            "/{rtype}/{id}/{operation}",
            get(instance_operation).post(instance_operation),
        )
        .route(
            "/export-status/{job}",
            get(crate::export_routes::status).delete(crate::export_routes::cancel),
        )
        .route(
            "/export-files/{job}/{file}",
            get(crate::export_routes::download),
        )
        .route("/$import", post(crate::export_routes::import_kickoff))
        .route(
            "/import-status/{job}",
            get(crate::export_routes::status).delete(crate::export_routes::cancel),
        )
        .route(
            "/import-files/{job}/{file}",
            get(crate::export_routes::download),
        )
        .route("/exports", get(crate::status_page::exports_page))
        .route("/_history", get(history_system))
        .route("/{rtype}", get(search_get).post(create))
        .route("/{rtype}/_search", post(search_post))
        .route("/{rtype}/_history", get(history_type))
        .route("/{rtype}/{id}", get(read).put(update).delete(delete))
        .route("/{rtype}/{id}/_history", get(history_instance))
        .route("/{rtype}/{id}/_history/{vid}", get(vread));
    // `GET /metrics` (`--metrics`): behind the authorization layer when protected.
    let metrics = Router::new().route("/metrics", get(crate::metrics::metrics));
    let (open_metrics, fhir) = match state.metrics_mode {
        crate::metrics::MetricsMode::Off => (Router::new(), fhir),
        crate::metrics::MetricsMode::Open => (metrics, fhir),
        crate::metrics::MetricsMode::Protected => (Router::new(), fhir.merge(metrics)),
    };
    let fhir = auth.protect(fhir);
    Router::new()
        .route("/metadata", get(metadata))
        .merge(open_metrics)
        .merge(auth.routes())
        .merge(fhir)
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        // Every routed request is counted under its route template, with its latency.
        .layer(axum::middleware::from_fn_with_state(
            state.metrics.clone(),
            crate::metrics::track,
        ))
        // Inside the negotiation (which refuses other encodings with an OperationOutcome): a
        // gzip body is decoded as it is read, so the body limit applies to the decoded size.
        // Counted as decoded (inside the decompression), held until the handler answered.
        .layer(axum::middleware::from_fn_with_state(
            state.body_budget.clone(),
            crate::body_budget::hold,
        ))
        .layer(RequestDecompressionLayer::new())
        .layer(axum::middleware::from_fn_with_state(
            state.policy.clone(),
            negotiate::negotiate,
        ))
        .layer(DefaultBodyLimit::max(state.max_body_bytes))
        // gzip at the fastest level: at the default level (6) deflate was the largest share of
        // the server's CPU under search load (issue 24, scripts/bench-search-load.sh).
        // Not what is gzip already (`_compression=gzip` export files): compressed again it
        // grew and cost the CPU of every download.
        .layer(
            CompressionLayer::new()
                .quality(CompressionLevel::Fastest)
                .compress_when(
                    DefaultPredicate::new()
                        .and(NotForContentType::const_new("application/gzip")),
                ),
        )
        // One INFO span per request with the fields an operator filters on; the response line
        // adds status and latency.
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|req: &axum::http::Request<axum::body::Body>| {
                    let request_id = req
                        .headers()
                        .get("x-request-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    tracing::info_span!("request", method = %req.method(), path = %auth::log_safe(req.uri().path()), request_id = %auth::log_safe(request_id))
                })
                .on_response(
                    DefaultOnResponse::new()
                        .level(tracing::Level::INFO)
                        .latency_unit(tower_http::LatencyUnit::Millis),
                ),
        )
        .layer(CatchPanicLayer::custom(
            |_panic: Box<dyn std::any::Any + Send>| {
                tracing::error!("a request handler panicked");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "exception",
                    "internal server error",
                )
                .into_response()
            },
        ))
        // Before any work (and outside the logging, which would log a flood line by line): a
        // request over `--max-requests` (a download: `--max-downloads`) or its client's share
        // is answered 503 at once.
        .layer(axum::middleware::from_fn_with_state(
            (state.in_flight.clone(), state.downloads_in_flight.clone()),
            crate::in_flight::admit,
        ))
        // Every answer, refusals of the admission above included.
        .layer(axum::middleware::map_response(protective_headers))
        // Outermost: every request gets an `x-request-id` (the client's, or a new UUID), seen by
        // the trace span and echoed on the response, panics included.
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .with_state(state)
}

/// What every answer carries unless its handler chose otherwise. The data is clinical: no cache
/// (a browser's, or a proxy's in front of a token-adding gateway) keeps it, validators (`ETag`,
/// `Last-Modified`) still serve revalidation and resumed downloads. And no browser reads a body
/// as anything but its declared type: a stored resource, view row or export file holding markup
/// is never rendered as a page of this origin.
async fn protective_headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    h.entry(header::X_CONTENT_TYPE_OPTIONS)
        .or_insert(HeaderValue::from_static("nosniff"));
    resp
}

async fn unknown_route(uri: Uri) -> ApiError {
    ApiError::not_found(format!("no such endpoint: {}", uri.path()))
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "not-supported",
        "this method is not allowed on this endpoint",
    )
}

async fn metadata(State(state): State<AppState>) -> Response {
    fhir_json(&crate::capability::capability_statement(&state))
}

/// Runs blocking store work off the async runtime.
async fn blocking<T: Send + 'static>(
    wait: std::time::Duration,
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    crate::database_wait::run_api(wait, "store work", f).await
}

/// The resource type in a URL must be a concrete R4 resource type.
fn check_type(rtype: &str) -> Result<(), ApiError> {
    // ViewDefinition (SQL on FHIR v2's logical model) is stored like a resource: view_routes.
    if rtype == crate::view_routes::VIEW_DEFINITION
        || fhir_model::r4().resource_types().iter().any(|t| t == rtype)
    {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not-supported",
            format!("unknown resource type '{rtype}'"),
        ))
    }
}

fn check_id(id: &str) -> Result<(), ApiError> {
    if store::is_valid_id(id) {
        Ok(())
    } else {
        Err(ApiError::invalid(
            format!("invalid id '{id}': 1-64 characters of A-Z a-z 0-9 - ."),
            "id",
        ))
    }
}

/// Checks a request body as a resource of the URL's type, through the checks every write
/// through `ingest` makes ([`ingest::bundle::check_resource`]: a `urn:` reference, which names
/// nothing outside a Bundle, is refused; structural validation). A ViewDefinition is validated
/// by `views`.
fn check_resource(v: &mut Value, rtype: &str) -> Result<(), ApiError> {
    match v.get("resourceType").and_then(Value::as_str) {
        None => {
            return Err(ApiError::invalid(
                "the resource has no resourceType",
                "resourceType",
            ));
        }
        Some(rt) if rt != rtype => {
            return Err(ApiError::invalid(
                format!("resourceType '{rt}' does not match the URL's type '{rtype}'"),
                "resourceType",
            ));
        }
        Some(_) => {}
    }
    if rtype == crate::view_routes::VIEW_DEFINITION {
        return crate::view_routes::check_view_definition(v);
    }
    let no_refs = ingest::references::ReferenceMap::new();
    match ingest::bundle::check_resource(v, &no_refs, rtype, true) {
        Ok(()) => Ok(()),
        Err(ingest::bundle::ResourceProblem::UnresolvedReference {
            reference,
            expression,
        }) => Err(ApiError::invalid(
            format!(
                "reference '{reference}' names no resource: a urn: reference resolves only inside a Bundle"
            ),
            expression,
        )),
        Err(ingest::bundle::ResourceProblem::Invalid(issues)) => {
            let mut err = ApiError::new(StatusCode::BAD_REQUEST, "invalid", "invalid resource");
            err.issues = issues
                .iter()
                .map(|i| {
                    ingest::outcome::OutcomeIssue::error("invalid", i.message.clone())
                        .at(i.path.clone())
                })
                .collect();
            Err(err)
        }
    }
}

fn etag(version: i64) -> HeaderValue {
    HeaderValue::from_str(&format!("W/\"{version}\""))
        .unwrap_or(HeaderValue::from_static("W/\"0\""))
}

fn http_date(instant: &str) -> Option<HeaderValue> {
    let ms = store::parse_instant_ms(instant)?;
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(u64::try_from(ms).ok()?);
    HeaderValue::from_str(&httpdate::fmt_http_date(t)).ok()
}

fn resource_response(status: StatusCode, r: &StoredResource) -> Response {
    let mut resp = fhir_bytes(r.json.clone());
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::ETAG, etag(r.version));
    if let Some(d) = http_date(&r.last_updated) {
        h.insert(header::LAST_MODIFIED, d);
    }
    resp
}

async fn read(
    State(state): State<AppState>,
    ctx: AuthContext,
    Path((rtype, id)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    check_type(&rtype)?;
    ctx.require_read(&rtype)?;
    check_id(&id)?;
    let subset = search::elements::read_subset(&query_pairs(raw.as_deref()))?;
    let store = state.store.clone();
    let r = blocking(state.database_wait, move || Ok(store.read(&rtype, &id)?)).await?;
    read_response(r, subset)
}

async fn vread(
    State(state): State<AppState>,
    ctx: AuthContext,
    Path((rtype, id, vid)): Path<(String, String, String)>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    check_type(&rtype)?;
    ctx.require_read(&rtype)?;
    check_id(&id)?;
    let subset = search::elements::read_subset(&query_pairs(raw.as_deref()))?;
    let version: i64 = vid
        .parse()
        .ok()
        .filter(|v| *v > 0)
        .ok_or_else(|| ApiError::not_found(format!("no version '{vid}' of {rtype}/{id}")))?;
    let store = state.store.clone();
    let r = blocking(state.database_wait, move || {
        Ok(store.vread(&rtype, &id, version)?)
    })
    .await?;
    read_response(r, subset)
}

/// A read's answer: the stored bytes, or under `_elements` or `_summary=true|text|data` (taken
/// as search takes them, [`search::elements::read_subset`]) the subset cut from them, tagged
/// `SUBSETTED`. A subset asked for is never ignored: a client must not take a whole resource
/// for the subset it asked for.
fn read_response(r: StoredResource, subset: Option<search::Subset>) -> Result<Response, ApiError> {
    let Some(subset) = subset else {
        return Ok(resource_response(StatusCode::OK, &r));
    };
    let json = subset.apply(&r.json)?;
    Ok(resource_response(
        StatusCode::OK,
        &StoredResource { json, ..r },
    ))
}

/// The answer to a create or update, honouring `Prefer: return=`.
fn write_response(state: &AppState, headers: &HeaderMap, o: &WriteOutcome) -> Response {
    let status = match o.status {
        store::WriteStatus::Created => StatusCode::CREATED,
        _ => StatusCode::OK,
    };
    let mut resp = match negotiate::prefer(headers, "return").as_deref() {
        Some("minimal") => status.into_response(),
        Some("operationoutcome") => {
            let oo = json!({"resourceType": "OperationOutcome", "issue": [{"severity": "information", "code": "informational",
                "diagnostics": format!("{} {}/{} version {}", if status == StatusCode::CREATED { "created" } else { "updated" }, o.resource_type, o.id, o.version)}]});
            fhir_json(&oo)
        }
        _ => fhir_bytes(o.json.clone().unwrap_or_default()),
    };
    *resp.status_mut() = status;
    version_headers(
        &mut resp,
        state,
        (&o.resource_type, &o.id, o.version),
        &o.last_updated,
    );
    resp
}

/// ETag, Last-Modified, Location and Content-Location of the version `(type, id, version)`.
fn version_headers(
    resp: &mut Response,
    state: &AppState,
    (resource_type, id, version): (&str, &str, i64),
    last_updated: &str,
) {
    let h = resp.headers_mut();
    h.insert(header::ETAG, etag(version));
    if let Some(d) = http_date(last_updated) {
        h.insert(header::LAST_MODIFIED, d);
    }
    let location = format!(
        "{}/{}/{}/_history/{}",
        state.base_url, resource_type, id, version
    );
    if let Ok(v) = HeaderValue::from_str(&location) {
        h.insert(header::LOCATION, v.clone());
        h.insert(header::CONTENT_LOCATION, v);
    }
}

/// `POST /{type}`, with `If-None-Exist` a conditional create (FHIR http.html#ccreate).
async fn create(
    State(state): State<AppState>,
    ctx: AuthContext,
    Path(rtype): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    check_type(&rtype)?;
    ctx.require(&rtype, auth::Permission::Create)?;
    let condition = match headers.get("if-none-exist") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .map_err(|_| ApiError::invalid("If-None-Exist is not ASCII text", "If-None-Exist"))?
                .trim_start_matches('?')
                .to_string(),
        ),
    };
    // The condition is a search: answered 200, 201 or 412 by whether resources match, it
    // tells a client that may not search the type whether they exist.
    if condition.is_some() {
        ctx.require_search(&rtype)?;
    }
    let mut v = json_body(body, state.policy.max_bundle_entries)?;
    check_resource(&mut v, &rtype)?;
    // The server assigns the id of a created resource.
    if let Some(obj) = v.as_object_mut() {
        obj.remove("id");
    }
    let store = state.store.clone();
    let Some(condition) = condition else {
        let outcomes = blocking(state.database_wait, move || {
            Ok(store.write(vec![WriteOp::Create { resource: v }])?)
        })
        .await?;
        let o = outcomes
            .first()
            .ok_or_else(|| ApiError::internal("create", "store returned no outcome"))?;
        return Ok(write_response(&state, &headers, o));
    };
    let (condition, _stop_when_dropped) =
        Condition::prepare(&state, &ctx, &rtype, &condition).map_err(|e| e.at("If-None-Exist"))?;
    // The condition's lock is held from before its search until the create has committed: a
    // conditional create with the same condition (on any node of a shared database) waits, and
    // then finds what this one created.
    enum Decided {
        Created(Vec<WriteOutcome>),
        Matched(StoredResource),
        Several,
    }
    let decided = blocking(state.database_wait, move || {
        let _held = store.lock_conditions(&[condition.key], CONDITION_LOCK_WAIT)?;
        Ok(
            match condition.run(&*store).map_err(|e| e.at("If-None-Exist"))? {
                Found::Nothing => {
                    Decided::Created(store.write(vec![WriteOp::Create { resource: v }])?)
                }
                Found::One(r) => Decided::Matched(r),
                Found::Several => Decided::Several,
            },
        )
    })
    .await?;
    match decided {
        Decided::Created(outcomes) => {
            let o = outcomes
                .first()
                .ok_or_else(|| ApiError::internal("create", "store returned no outcome"))?;
            Ok(write_response(&state, &headers, o))
        }
        Decided::Matched(r) => Ok(matched_response(&state, &ctx, &headers, &r)),
        Decided::Several => Err(ApiError::new(
            StatusCode::PRECONDITION_FAILED,
            "duplicate",
            format!("the condition (If-None-Exist) matches more than one {rtype}"),
        )
        .at("If-None-Exist")),
    }
}

/// How long a conditional create waits for its condition's lock, held by a request with the
/// same condition from its search to its commit (on PostgreSQL by any node), before it is
/// answered 503 with `Retry-After`.
pub const CONDITION_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// What the condition of a conditional create found ([`Condition::run`]).
enum Found {
    Nothing,
    One(StoredResource),
    Several,
}

/// The condition of a conditional create (`If-None-Exist`, a Bundle entry's
/// `request.ifNoneExist`), parsed and authorized as the search it is, with the key of its lock.
struct Condition {
    query: search::SearchQuery,
    exec: search::ExecOptions,
    key: store::ConditionKey,
}

impl Condition {
    /// The condition's search: the same limits and the same scope rules as that query at the
    /// top level (the caller checked `s` on the type; chains and `_has` need `s` on the types
    /// they search), the same time limit (counted from when it runs). Only whether it matches
    /// none, one or more resources is asked: no includes, sort, paging or total; at most two
    /// matches are read. The guard stops the search when the request's handler is dropped.
    fn prepare(
        state: &AppState,
        ctx: &AuthContext,
        rtype: &str,
        condition: &str,
    ) -> Result<(Condition, search::CancelOnDrop), ApiError> {
        let pairs: Vec<(String, String)> = search::parse_query_string(condition)
            .into_iter()
            .filter(|(k, _)| k != "_format")
            .collect();
        if pairs.is_empty() {
            return Err(ApiError::invalid(
                "the condition of a conditional create is empty",
                "If-None-Exist",
            ));
        }
        let limits = state.search_limits;
        limits.check_request(&pairs)?;
        let opts = search::ParseOptions {
            lenient: false,
            predicate_only: false,
        };
        let mut q = search::parse_query(rtype, &pairs, opts)?;
        limits.check_query(&q)?;
        authorize_search(ctx, &mut q)?;
        q.includes.clear();
        q.revincludes.clear();
        q.sort.clear();
        q.cursor = None;
        q.elements = None;
        q.summary = search::Summary::False;
        q.total = search::TotalMode::None;
        q.count = 2;
        let (exec, stop_when_dropped) = search::ExecOptions::under(&limits);
        let key = store::ConditionKey::new(rtype, &pairs);
        Ok((
            Condition {
                query: q,
                exec,
                key,
            },
            stop_when_dropped,
        ))
    }

    /// Runs the search (blocking: call it off the async workers, holding the condition's lock).
    fn run(&self, store: &dyn store::Store) -> Result<Found, ApiError> {
        let rows = search::execute_rows(store, &self.query, &self.exec.from_now())?;
        // A page ends early at its byte limit (never before its first match): a next page
        // means more matches.
        match (rows.matches.as_slice(), &rows.next_cursor) {
            ([], _) => Ok(Found::Nothing),
            ([one], None) => {
                let head = search::ResourceHead::read(one)?;
                let id = head
                    .id
                    .ok_or_else(|| ApiError::internal("condition", "a match without an id"))?;
                match store.read(&self.query.resource_type, &id) {
                    Ok(r) => Ok(Found::One(r)),
                    // Deleted since the search ran: nothing matches any more.
                    Err(store::StoreError::Gone { .. } | store::StoreError::NotFound { .. }) => {
                        Ok(Found::Nothing)
                    }
                    Err(e) => Err(e.into()),
                }
            }
            _ => Ok(Found::Several),
        }
    }
}

/// The 200 of a conditional create whose condition matched `r`: its Location, ETag and
/// Last-Modified; its content only for a client that may read it (the condition needs `s`,
/// not `r`), else an OperationOutcome.
fn matched_response(
    state: &AppState,
    ctx: &AuthContext,
    headers: &HeaderMap,
    r: &StoredResource,
) -> Response {
    let readable = ctx.scopes.can_read(&r.resource_type);
    let outcome = || {
        fhir_json(&json!({"resourceType": "OperationOutcome", "issue": [{
            "severity": "information", "code": "informational",
            "diagnostics": format!("the condition matched {}/{} version {}: nothing created",
                r.resource_type, r.id, r.version)}]}))
    };
    let mut resp = match negotiate::prefer(headers, "return").as_deref() {
        Some("minimal") => StatusCode::OK.into_response(),
        Some("operationoutcome") => outcome(),
        _ if readable => fhir_bytes(r.json.clone()),
        _ => outcome(),
    };
    *resp.status_mut() = StatusCode::OK;
    version_headers(
        &mut resp,
        state,
        (&r.resource_type, &r.id, r.version),
        &r.last_updated,
    );
    resp
}

fn if_match(headers: &HeaderMap) -> Result<Option<i64>, ApiError> {
    match headers.get(header::IF_MATCH) {
        None => Ok(None),
        Some(v) => {
            let s = v.to_str().unwrap_or("");
            ingest::bundle::parse_etag(s).map(Some).ok_or_else(|| {
                ApiError::invalid(
                    format!("If-Match '{s}' is not a version ETag such as W/\"3\""),
                    "If-Match",
                )
            })
        }
    }
}

async fn update(
    State(state): State<AppState>,
    ctx: AuthContext,
    Path((rtype, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    check_type(&rtype)?;
    ctx.require(&rtype, auth::Permission::Update)?;
    check_id(&id)?;
    let mut v = json_body(body, state.policy.max_bundle_entries)?;
    match v.get("id") {
        None => {
            return Err(ApiError::invalid(
                format!("the resource has no id; an update of {rtype}/{id} needs \"id\": \"{id}\""),
                "id",
            ));
        }
        Some(Value::String(body_id)) if body_id != &id => {
            return Err(ApiError::invalid(
                format!("the id in the body ('{body_id}') differs from the id in the URL ('{id}')"),
                "id",
            ));
        }
        _ => {}
    }
    check_resource(&mut v, &rtype)?;
    let expected = if_match(&headers)?;
    // An update that would create needs `c` as well: a client with `u` alone updates what
    // exists and gets 403 for what does not (decided inside the write).
    let may_create = ctx.scopes.allows(&rtype, auth::Permission::Create);
    let store = state.store.clone();
    let outcomes = blocking(state.database_wait, move || {
        let op = if may_create {
            WriteOp::Update {
                resource_type: rtype,
                id,
                resource: v,
                if_match: expected,
            }
        } else {
            WriteOp::Replace {
                resource_type: rtype,
                id,
                resource: v,
                if_match: expected,
            }
        };
        Ok(store.write(vec![op])?)
    })
    .await?;
    let o = outcomes
        .first()
        .ok_or_else(|| ApiError::internal("update", "store returned no outcome"))?;
    Ok(write_response(&state, &headers, o))
}

async fn delete(
    State(state): State<AppState>,
    ctx: AuthContext,
    Path((rtype, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_type(&rtype)?;
    ctx.require(&rtype, auth::Permission::Delete)?;
    check_id(&id)?;
    let expected = if_match(&headers)?;
    let store = state.store.clone();
    let outcomes = blocking(state.database_wait, move || {
        Ok(store.write(vec![WriteOp::Delete {
            resource_type: rtype,
            id,
            if_match: expected,
        }])?)
    })
    .await?;
    let mut resp = StatusCode::NO_CONTENT.into_response();
    if let Some(o) = outcomes
        .first()
        .filter(|o| o.status == store::WriteStatus::Deleted)
    {
        resp.headers_mut().insert(header::ETAG, etag(o.version));
    }
    Ok(resp)
}

/// `POST /`: a batch or transaction Bundle, through the write path the loader shares.
async fn bundle(
    State(state): State<AppState>,
    ctx: AuthContext,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let v = json_body(body, state.policy.max_bundle_entries)?;
    if v.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return Err(ApiError::invalid(
            "POST / expects a Bundle of type batch or transaction",
            "resourceType",
        ));
    }
    // The entries' typed requests are authorized, then the same plan is translated and run.
    let mut plan = ingest::bundle::plan(v)?;
    authorize_bundle(&ctx, &plan)?;
    // A create keeps the id its resource came with only for a client that may read the type:
    // for any other the `409` of an id that exists (even deleted) told it which ones do.
    plan.assign_create_ids(|t| ctx.scopes.can_read(t));
    plan.updates_never_create(|t| ctx.scopes.allows(t, auth::Permission::Create));
    let return_resources =
        negotiate::prefer(&headers, "return").as_deref() == Some("representation");
    let options = ingest::BundleOptions {
        validate: true,
        return_resources,
        // The resources read by its entries are bounded as a search page's are.
        max_read_bytes: state.search_limits.max_page_bytes,
    };
    // Conditional creates: each condition run as a search before the Bundle is translated, so
    // that references to the entry's fullUrl name what it matched, and a transaction writes
    // what it creates atomically with its other entries. Every condition's lock is taken (in
    // one order) before the first search and held until the Bundle's writes have committed.
    let mut conditions = Vec::new();
    let mut stop_when_dropped = Vec::new();
    for (index, rtype, condition) in plan.conditions() {
        match Condition::prepare(&state, &ctx, &rtype, &condition) {
            Ok((c, stop)) => {
                stop_when_dropped.push(stop);
                conditions.push((index, rtype, c));
            }
            Err(e) => plan.settle(index, Err(condition_failure(index, e))),
        }
    }
    let store = state.store.clone();
    let readable: Vec<bool> = conditions
        .iter()
        .map(|(_, rtype, _)| ctx.scopes.can_read(rtype))
        .collect();
    let response = blocking(state.database_wait, move || {
        let keys: Vec<store::ConditionKey> = conditions.iter().map(|(_, _, c)| c.key).collect();
        let _held = if keys.is_empty() {
            None
        } else {
            Some(store.lock_conditions(&keys, CONDITION_LOCK_WAIT)?)
        };
        // The matched resources the response returns, bounded with the read entries' by
        // `max_read_bytes` (never before the first).
        let mut returned = 0usize;
        for ((index, rtype, c), readable) in conditions.into_iter().zip(readable) {
            let found = match c.run(&*store) {
                Ok(Found::Nothing) => Ok(ingest::bundle::ConditionMatch::Nothing),
                Ok(Found::One(r)) => {
                    use ingest::bundle::MatchedResource as M;
                    let resource = if !(options.return_resources && readable) {
                        M::Withheld
                    } else if returned > 0
                        && returned.saturating_add(r.json.len()) > options.max_read_bytes
                    {
                        M::OverLimit
                    } else {
                        returned = returned.saturating_add(r.json.len());
                        M::Included(r.json)
                    };
                    Ok(ingest::bundle::ConditionMatch::One {
                        id: r.id,
                        version: r.version,
                        last_updated: r.last_updated,
                        resource,
                    })
                }
                Ok(Found::Several) => Err(ingest::EntryError::Condition {
                    index,
                    status: StatusCode::PRECONDITION_FAILED.as_u16(),
                    code: "duplicate",
                    message: format!("the condition (ifNoneExist) matches more than one {rtype}"),
                }),
                Err(e) => Err(condition_failure(index, e)),
            };
            plan.settle(index, found);
        }
        let translated = plan.translate(options.validate)?;
        Ok(ingest::bundle::execute(
            store.as_ref(),
            translated,
            &options,
        )?)
    })
    .await?;
    Ok(fhir_json(&response))
}

/// The failure of a Bundle entry whose condition is no valid search, or could not be run.
fn condition_failure(index: usize, e: ApiError) -> ingest::EntryError {
    ingest::EntryError::Condition {
        index,
        status: e.status.as_u16(),
        code: e.issues.first().map_or("invalid", |i| i.code),
        message: e.issues.first().map_or_else(
            || "invalid condition".to_string(),
            |i| i.diagnostics.clone(),
        ),
    }
}

/// Every entry of a Bundle needs the scope of the interaction its `request` performs, on the
/// type in its URL (never the type of the entry's `resource`, which ingest refuses when it
/// differs).
fn authorize_bundle(ctx: &AuthContext, plan: &ingest::bundle::BundlePlan) -> Result<(), ApiError> {
    for (index, request) in plan.requests() {
        authorize_entry(ctx, request)
            .map_err(|e| e.at(format!("Bundle.entry[{index}].request")))?;
    }
    Ok(())
}

fn authorize_entry(
    ctx: &AuthContext,
    request: &ingest::bundle::EntryRequest,
) -> Result<(), ApiError> {
    use auth::Permission as P;
    use ingest::bundle::Interaction as I;
    let needs: &[P] = match request.interaction {
        I::Capabilities => return Ok(()),
        I::Read | I::VRead => &[P::Read],
        // Instance history reads one resource; type and system history list a whole type.
        I::History if request.id.is_some() => &[P::Read],
        I::History => &[P::Read, P::Search],
        I::Search => &[P::Search],
        I::Create => &[P::Create],
        I::ConditionalCreate => &[P::Create, P::Search],
        I::Update | I::Patch => &[P::Update],
        // A conditional update creates the resource when nothing matches.
        I::ConditionalUpdate => &[P::Create, P::Update, P::Search],
        I::ConditionalPatch => &[P::Update, P::Search],
        I::Delete => &[P::Delete],
        I::ConditionalDelete => &[P::Delete, P::Search],
        I::Operation => &P::ALL,
    };
    match &request.resource_type {
        Some(t) => {
            for p in needs {
                ctx.require(t, *p)?;
            }
        }
        // System level (`_history`, `?query`, `$op`): every type, ViewDefinition included.
        None => ctx.require_on_every_type(needs, "a system-level entry")?,
    }
    // The query of a search or conditional interaction: chains, `_has` and includes need what
    // the same query needs at the top level (a search without a query too: it returns every
    // resource). A query that does not parse is never run.
    if let Some(t) = &request.resource_type
        && needs.contains(&P::Search)
    {
        let pairs = search::parse_query_string(request.query.as_deref().unwrap_or(""));
        let opts = search::ParseOptions {
            lenient: false,
            predicate_only: false,
        };
        if let Ok(mut parsed) = search::parse_query(t, &pairs, opts) {
            authorize_search(ctx, &mut parsed)?;
            if request.interaction == I::Search {
                authorize_results(ctx, &parsed)?;
            }
        }
    }
    Ok(())
}

// ---- history ----

fn query_pairs(raw: Option<&str>) -> Vec<(String, String)> {
    raw.map(search::parse_query_string).unwrap_or_default()
}

fn history_query(pairs: &[(String, String)]) -> Result<HistoryQuery, ApiError> {
    let mut q = HistoryQuery::default();
    for (k, v) in pairs {
        match k.as_str() {
            "_since" => {
                q.since_ms = Some(store::parse_instant_ms(v).ok_or_else(|| {
                    ApiError::invalid(
                        format!("_since '{v}' is not an instant such as 2024-01-01T00:00:00Z"),
                        "_since",
                    )
                })?)
            }
            "_count" => {
                let n: usize = v.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                    ApiError::invalid(format!("_count '{v}' must be a positive integer"), "_count")
                })?;
                q.count = n.min(1000);
            }
            "_before" => {
                q.before_seq = Some(
                    v.parse()
                        .map_err(|_| ApiError::invalid("invalid paging cursor", "_before"))?,
                )
            }
            "_asof" => {
                q.as_of = Some(
                    v.parse()
                        .map_err(|_| ApiError::invalid("invalid paging cursor", "_asof"))?,
                )
            }
            "_format" => {}
            other => {
                return Err(ApiError::invalid(
                    format!("unknown history parameter '{other}'"),
                    other.to_string(),
                ));
            }
        }
    }
    Ok(q)
}

/// The history Bundle of `page`, written around the versions' stored JSON
/// ([`search::BundleBytes`]: no version is parsed into a tree and written again).
fn history_bundle(
    base_url: &str,
    path: &str,
    q: &HistoryQuery,
    as_of: i64,
    page: HistoryPage,
) -> Result<Vec<Vec<u8>>, ApiError> {
    let mut params: Vec<String> = Vec::new();
    if let Some(s) = q.since_ms {
        params.push(format!("_since={}", store::format_instant_ms(s)));
    }
    if q.count > 0 {
        params.push(format!("_count={}", q.count));
    }
    let self_url = format!(
        "{}{}{}{}",
        base_url,
        path,
        if params.is_empty() { "" } else { "?" },
        params.join("&")
    );
    let mut links = vec![json!({"relation": "self", "url": self_url})];
    if let Some(before) = page.next_before_seq {
        let mut p = params.clone();
        p.push(format!("_asof={as_of}"));
        p.push(format!("_before={before}"));
        links.push(
            json!({"relation": "next", "url": format!("{}{}?{}", base_url, path, p.join("&"))}),
        );
    }
    let mut b = search::BundleBytes::default();
    b.raw(r#"{"resourceType":"Bundle","type":"history","link":"#);
    b.value(&Value::Array(links));
    b.raw(r#","entry":["#);
    for (i, e) in page.entries.into_iter().enumerate() {
        b.raw(if i == 0 {
            r#"{"fullUrl":"#
        } else {
            r#",{"fullUrl":"#
        });
        b.string(&format!("{}/{}/{}", base_url, e.resource_type, e.id));
        if let Some(bytes) = e.json {
            // The whole version is checked to be one JSON object; only its type and id are read.
            search::ResourceHead::read(&bytes).map_err(|err| ApiError::internal("history", err))?;
            b.raw(r#","resource":"#);
            b.resource(bytes);
        }
        let url = match e.method {
            HistoryMethod::Post => e.resource_type.clone(),
            _ => format!("{}/{}", e.resource_type, e.id),
        };
        let status = match e.method {
            HistoryMethod::Post => "201 Created",
            HistoryMethod::Put => "200 OK",
            HistoryMethod::Delete => "204 No Content",
        };
        b.raw(r#","request":"#);
        b.value(&json!({"method": e.method.as_str(), "url": url}));
        b.raw(r#","response":"#);
        b.value(&json!({"status": status, "etag": format!("W/\"{}\"", e.version), "lastModified": e.last_updated}));
        b.raw("}");
    }
    b.raw("]}");
    Ok(b.finish())
}

async fn history(
    state: AppState,
    path: String,
    scope: (Option<String>, Option<String>),
    raw: Option<String>,
) -> Result<Response, ApiError> {
    let pairs = query_pairs(raw.as_deref());
    let mut q = history_query(&pairs)?;
    let store = state.store.clone();
    let base_url = state.base_url.clone();
    let chunks = blocking(state.database_wait, move || {
        let as_of = match q.as_of {
            Some(a) => a,
            None => store.current_seq()?,
        };
        q.as_of = Some(as_of);
        let scope = match (&scope.0, &scope.1) {
            (Some(t), Some(id)) => HistoryScope::Instance {
                resource_type: t,
                id,
            },
            (Some(t), None) => HistoryScope::Type(t),
            _ => HistoryScope::System,
        };
        let page = store.history(scope, &q)?;
        history_bundle(&base_url, &path, &q, as_of, page)
    })
    .await?;
    Ok(crate::chunks::fhir_chunks(chunks))
}

async fn history_system(
    State(state): State<AppState>,
    ctx: AuthContext,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    // System history lists every stored type's versions, ViewDefinitions too: it needs `r`
    // and `s` on all of them (e.g. `system/*.rs`), as type history does on its type.
    ctx.require_on_every_type(
        &[auth::Permission::Read, auth::Permission::Search],
        "system history",
    )?;
    history(state, "/_history".into(), (None, None), raw).await
}

async fn history_type(
    State(state): State<AppState>,
    ctx: AuthContext,
    Path(rtype): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    check_type(&rtype)?;
    // Type history lists every resource of the type, as a search does (SMART v2 puts type and
    // system history under `s`), with their earlier versions (`r`): it needs both.
    ctx.require_read(&rtype)?;
    ctx.require_search(&rtype)?;
    history(
        state,
        format!("/{rtype}/_history"),
        (Some(rtype), None),
        raw,
    )
    .await
}

async fn history_instance(
    State(state): State<AppState>,
    ctx: AuthContext,
    Path((rtype, id)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    check_type(&rtype)?;
    ctx.require_read(&rtype)?;
    check_id(&id)?;
    // An instance history of a resource that never existed is a 404.
    let store = state.store.clone();
    let (t, i) = (rtype.clone(), id.clone());
    blocking(state.database_wait, move || match store.read(&t, &i) {
        Ok(_) | Err(store::StoreError::Gone { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    })
    .await?;
    history(
        state,
        format!("/{rtype}/{id}/_history"),
        (Some(rtype), Some(id)),
        raw,
    )
    .await
}

// ---- search ----

async fn search_get(
    State(state): State<AppState>,
    ctx: AuthContext,
    Path(rtype): Path<String>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let pairs = query_pairs(raw.as_deref());
    run_search(state, ctx, rtype, &headers, pairs).await
}

/// Every type a search touches needs scope: chained and `_has` filters search the types they
/// name (`s`); an `_include` reads its targets (`r`, also the type it follows references from);
/// a `_revinclude` searches its source type by reference (`r` and `s` on it, as type history
/// does). An `_include` without a target type (or `*`) is restricted here to the types the
/// client may read, so that the search never fetches, counts or pages by a resource the client
/// may not see (those used to be fetched, counted against `--search-max-included` and
/// `--search-max-page-bytes` and withheld only when the Bundle was written: an oracle).
fn authorize_search(ctx: &AuthContext, q: &mut search::SearchQuery) -> Result<(), ApiError> {
    fn filter(ctx: &AuthContext, f: &search::Filter) -> Result<(), ApiError> {
        match f {
            search::Filter::Chain {
                target_types,
                inner,
                ..
            } => {
                for t in target_types {
                    ctx.require_search(t)?;
                }
                filter(ctx, inner)
            }
            search::Filter::Has {
                source_type, inner, ..
            } => {
                ctx.require_search(source_type)?;
                filter(ctx, inner)
            }
            _ => Ok(()),
        }
    }
    for f in &q.filters {
        filter(ctx, f)?;
    }
    for inc in &q.includes {
        ctx.require_read(&inc.source_type)?;
        if let Some(t) = &inc.target_type {
            ctx.require_read(t)?;
        }
    }
    for inc in &q.revincludes {
        ctx.require_read(&inc.source_type)?;
        ctx.require_search(&inc.source_type)?;
        if let Some(t) = &inc.target_type {
            ctx.require_read(t)?;
        }
    }
    if !q.includes.is_empty() && !ctx.scopes.allows_on_every_type(auth::Permission::Read) {
        q.include_only_targets(&ctx.scopes.readable_types());
    }
    Ok(())
}

/// A search that returns resources reads them: `r` on the searched type beside its `s`. With
/// `s` alone a client gets a total only (`_summary=count`, `_count=0`): without this a client
/// holding `s` but not `r` read every resource of the type through a search.
fn authorize_results(ctx: &AuthContext, q: &search::SearchQuery) -> Result<(), ApiError> {
    if q.returns_resources() && !ctx.scopes.can_read(&q.resource_type) {
        return Err(auth::AuthRejection::Forbidden(format!(
            "a search that returns {t} resources needs `r` on {t}; with `s` alone use _summary=count",
            t = q.resource_type
        ))
        .into());
    }
    Ok(())
}

async fn search_post(
    State(state): State<AppState>,
    ctx: AuthContext,
    Path(rtype): Path<String>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let bytes = crate::negotiate::body_bytes(body)?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| ApiError::invalid("the form body is not UTF-8", "body"))?;
    let mut pairs = query_pairs(raw.as_deref());
    pairs.extend(search::parse_query_string(text));
    run_search(state, ctx, rtype, &headers, pairs).await
}

async fn run_search(
    state: AppState,
    ctx: AuthContext,
    rtype: String,
    headers: &HeaderMap,
    pairs: Vec<(String, String)>,
) -> Result<Response, ApiError> {
    check_type(&rtype)?;
    if rtype == crate::view_routes::VIEW_DEFINITION {
        return crate::view_routes::search(state, ctx, pairs).await;
    }
    ctx.require_search(&rtype)?;
    let pairs: Vec<(String, String)> = pairs.into_iter().filter(|(k, _)| k != "_format").collect();
    let opts = search::ParseOptions {
        lenient: negotiate::lenient(headers),
        predicate_only: false,
    };
    let limits = state.search_limits;
    limits.check_request(&pairs)?;
    let mut q = search::parse_query(&rtype, &pairs, opts)?;
    limits.check_query(&q)?;
    authorize_search(&ctx, &mut q)?;
    authorize_results(&ctx, &q)?;
    let store = state.store.clone();
    // The blocking search outlives this future when the client goes away (axum drops the
    // handler, not the blocking task): the guard stops it then, SQLite checks the time limit.
    let (exec, _stop_when_dropped) = search::ExecOptions::under(&limits);
    let span = tracing::Span::current();
    let base = state.base_url.clone();
    let chunks = blocking(state.database_wait, move || {
        let _request = span.enter();
        tracing::debug!(resource_type = %q.resource_type, "search running");
        let result = search::execute_rows(&*store, &q, &exec);
        match &result {
            Err(search::SearchError::Cancelled) => {
                tracing::info!(resource_type = %q.resource_type, "search stopped: the client went away");
            }
            Err(search::SearchError::Timeout { limit }) => {
                tracing::warn!(resource_type = %q.resource_type, limit = ?limit, "search stopped: time limit");
            }
            _ => {}
        }
        // The Bundle is written around the stored bytes (each resource's type and id read,
        // nothing parsed into a tree). The includes were restricted to readable types by
        // `authorize_search`; the check as it is written only keeps that so.
        Ok(search::write_searchset(
            &base,
            &q,
            &pairs,
            result?,
            &|t| ctx.scopes.can_read(t),
        )?)
    })
    .await?;
    Ok(crate::chunks::fhir_chunks(chunks))
}
