//! Bulk Data `$export`: kick-off at system, Patient and Group level, status polling, cancel,
//! and downloads of the files listed in the manifest.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{MatchedPath, OriginalUri, Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use export::{ExportError, ExportLevel, Status};

use crate::error::ApiError;
use crate::negotiate::{self, json_object};
use crate::{AppState, fhir_json};
use auth::AuthContext;

impl From<ExportError> for ApiError {
    fn from(e: ExportError) -> ApiError {
        match &e {
            ExportError::Request(r) => ApiError::invalid(e.to_string(), r.param.clone()),
            ExportError::TooCostly(r) => {
                ApiError::new(StatusCode::BAD_REQUEST, "too-costly", e.to_string())
                    .at(r.param.clone())
            }
            ExportError::GroupNotFound(_)
            | ExportError::UnknownJob(_)
            | ExportError::UnknownFile(_)
            | ExportError::UnknownPage(_) => ApiError::not_found(e.to_string()),
            ExportError::Forbidden(reason) => auth::AuthRejection::Forbidden(reason.clone()).into(),
            ExportError::Expired(_) => ApiError::new(StatusCode::GONE, "not-found", e.to_string()),
            ExportError::DestinationUnavailable(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "transient", e.to_string())
                    .with_header(header::RETRY_AFTER, HeaderValue::from_static("30"))
            }
            ExportError::Destination(_) => {
                tracing::error!(error = %e, "export destination refused at kick-off");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "exception",
                    e.to_string(),
                )
            }
            ExportError::Conflict(_) => {
                ApiError::new(StatusCode::CONFLICT, "conflict", e.to_string())
            }
            ExportError::TooMany(_) | ExportError::TooManyForClient { .. } => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "throttled", e.to_string())
                    .with_header(header::RETRY_AFTER, HeaderValue::from_static("30"))
            }
            ExportError::Anonymization(a) => match a {
                export::AnonymizationError::Fetch(_) => {
                    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "transient", e.to_string())
                        .with_header(header::RETRY_AFTER, HeaderValue::from_static("30"))
                }
                export::AnonymizationError::NotAllowed(_)
                | export::AnonymizationError::Registry(_) => {
                    ApiError::invalid(e.to_string(), "_anonymizationConfigCollectionReference")
                }
                export::AnonymizationError::UnknownKeySet(_) => {
                    ApiError::invalid(e.to_string(), "_anonymizationKeySet")
                }
                _ => ApiError::invalid(e.to_string(), "_anonymizationConfig"),
            },
            // A job record this version cannot read: refused loudly, naming the job, the
            // column and the cause (a server-side payload, no secret in it).
            ExportError::Record(r) => {
                let detail = crate::error::Chain(&e).to_string();
                tracing::error!(job = %r.job(), column = %r.column(), error = %detail, "unreadable job record");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "exception", detail)
            }
            ExportError::Thread(_) | ExportError::Plan(_) | ExportError::Settings(_) => {
                ApiError::internal("export", crate::error::Chain(&e))
            }
            ExportError::Store(db @ store::StoreError::Unavailable { .. }) => {
                ApiError::database_unavailable("export", db)
            }
            ExportError::Store(db) => ApiError::internal("export", db),
            ExportError::Queue(store::QueueError::Db(
                db @ store::StoreError::Unavailable { .. },
            )) => ApiError::database_unavailable("export job queue", db),
            ExportError::Queue(q) => ApiError::internal("export job queue", q),
        }
    }
}

/// The caller as the export service sees it: its client and its current token's scopes. The
/// service decides on the parsed request (kick-off) or the job's recorded one (status, files,
/// cancel). On a job's route, the kind of job the route serves: status, cancel and files of an
/// export at `/export-…`, of an `$import` at `/import-…`; a job of the other kind is unknown
/// there.
struct Caller(AuthContext, Option<export::access::JobKind>);

/// The kind of job `route` serves.
fn route_kind(route: &MatchedPath) -> Option<export::access::JobKind> {
    let p = route.as_str();
    Some(
        if p.contains("/import-status/") || p.contains("/import-files/") {
            export::access::JobKind::Import
        } else {
            export::access::JobKind::Export
        },
    )
}

impl export::ExportAccess for Caller {
    fn client_id(&self) -> Option<&str> {
        self.0.client_id.as_deref()
    }
    fn owns(&self, owner: Option<&str>) -> bool {
        self.0.owns(owner)
    }
    fn is_unrestricted(&self) -> bool {
        self.0.scopes.is_unrestricted()
    }
    fn allows(&self, resource_type: &str, permission: export::access::Permission) -> bool {
        let p = match permission {
            export::access::Permission::Read => auth::Permission::Read,
            export::access::Permission::Search => auth::Permission::Search,
            export::access::Permission::Create => auth::Permission::Create,
            export::access::Permission::Update => auth::Permission::Update,
        };
        self.0.scopes.allows(resource_type, p)
    }
    fn may_use_key_set(&self, name: &str) -> bool {
        self.0.key_sets.allows(name)
    }
    fn job_kind(&self) -> Option<export::access::JobKind> {
        self.1
    }
}

/// `Accept: application/fhir+json` and `Prefer: respond-async` are required at kick-off.
fn check_kickoff_headers(headers: &HeaderMap) -> Result<(), ApiError> {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let accept_ok = accept.split(',').any(|m| {
        m.split(';')
            .next()
            .unwrap_or("")
            .trim()
            .eq_ignore_ascii_case("application/fhir+json")
    });
    if !accept_ok {
        return Err(ApiError::invalid(
            "$export requires the header Accept: application/fhir+json",
            "Accept",
        ));
    }
    if !crate::negotiate::prefer_token(headers, "respond-async") {
        return Err(ApiError::invalid(
            "$export requires the header Prefer: respond-async",
            "Prefer",
        ));
    }
    Ok(())
}

/// Whether a kick-off may carry views (`_view`, `_viewFormat`, `_viewHeader`): the job
/// parameters `$viewdefinition-export` records, after it has checked its views (names unique,
/// each named: they name the files). Given to `$export` itself they skipped those checks (two
/// views of one name wrote files of two schemas under one type).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Views {
    Refused,
    Checked,
}

const VIEW_PARAMETERS: [&str; 3] = ["_view", "_viewFormat", "_viewHeader"];

// One argument per axum extractor (and the level): a struct would only rename them.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn kickoff(
    state: AppState,
    ctx: AuthContext,
    level: ExportLevel,
    method: Method,
    headers: HeaderMap,
    uri: String,
    raw: Option<String>,
    body: Result<Bytes, BytesRejection>,
    views: Views,
) -> Result<Response, ApiError> {
    // The router answers HEAD with a GET route: a HEAD must not start an export.
    if method != Method::GET && method != Method::POST {
        return Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "not-supported",
            format!("$export is kicked off by GET or POST, not {method}"),
        )
        .with_header(header::ALLOW, HeaderValue::from_static("GET, POST")));
    }
    check_kickoff_headers(&headers)?;
    let pairs: Vec<(String, String)> = raw
        .as_deref()
        .map(search::parse_query_string)
        .unwrap_or_default();
    let body = if method == Method::POST {
        Some(json_object(body)?)
    } else {
        None
    };
    if views == Views::Refused
        && let Some(name) = pairs
            .iter()
            .map(|(k, _)| k.as_str())
            .chain(
                // A malformed body is refused by the kick-off's own parse.
                body.iter()
                    .flat_map(|b| export::request::parameter_list(b).unwrap_or(&[]))
                    .filter_map(|p| p.get("name").and_then(serde_json::Value::as_str)),
            )
            .find(|n| VIEW_PARAMETERS.contains(n))
    {
        return Err(ApiError::invalid(
            format!("{name} is a parameter of $viewdefinition-export, not of $export"),
            name.to_string(),
        ));
    }
    // The service parses the request once and authorizes the typed request for this caller.
    let request_url = format!("{}{}", state.base_url, uri);
    let lenient = negotiate::lenient(&headers);
    let separate = negotiate::prefer_token(&headers, SEPARATE_EXPORT_STATUS);
    let svc = state.export.clone();
    let id = crate::database_wait::run(state.database_wait, "export kick-off", move || {
        svc.kickoff_with(
            level,
            pairs,
            body.as_ref(),
            lenient,
            separate,
            request_url,
            &Caller(ctx, None),
        )
    })
    .await??;
    let location = format!("{}/export-status/{id}", state.base_url);
    let mut resp = StatusCode::ACCEPTED.into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::CONTENT_LOCATION, v);
    }
    if separate {
        resp.headers_mut().insert(
            "preference-applied",
            HeaderValue::from_static("respond-async, separate-export-status"),
        );
    }
    Ok(resp)
}

/// The `Prefer` token of Bulk Data STU3's separate export status: status polls answer `200`
/// and carry the job's own status in `X-Export-Status`.
const SEPARATE_EXPORT_STATUS: &str = "separate-export-status";

/// `POST /$import` (Azure's shape: a Parameters body with `inputFormat`, `mode` and `input`
/// entries naming NDJSON objects of the configured storage; `Prefer: respond-async`): 202 with
/// the status URL `/import-status/{id}` in Content-Location.
pub async fn import_kickoff(
    State(state): State<AppState>,
    ctx: AuthContext,
    headers: HeaderMap,
    OriginalUri(uri): OriginalUri,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    if !crate::negotiate::prefer_token(&headers, "respond-async") {
        return Err(ApiError::invalid(
            "$import requires the header Prefer: respond-async",
            "Prefer",
        ));
    }
    let body = json_object(body)?;
    let request_url = format!("{}{}", state.base_url, uri);
    let svc = state.export.clone();
    let id = crate::database_wait::run(state.database_wait, "import kick-off", move || {
        svc.import_kickoff(&body, request_url, &Caller(ctx, None))
    })
    .await??;
    let location = format!("{}/import-status/{id}", state.base_url);
    let mut resp = StatusCode::ACCEPTED.into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::CONTENT_LOCATION, v);
    }
    Ok(resp)
}

pub async fn system_export(
    State(state): State<AppState>,
    ctx: AuthContext,
    method: Method,
    headers: HeaderMap,
    OriginalUri(uri): OriginalUri,
    RawQuery(raw): RawQuery,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    kickoff(
        state,
        ctx,
        ExportLevel::System,
        method,
        headers,
        uri.to_string(),
        raw,
        body,
        Views::Refused,
    )
    .await
}

/// `/{type}/$export`: only `Patient` has a type-level export.
// One argument per axum extractor (and the level): a struct would only rename them.
#[allow(clippy::too_many_arguments)]
pub async fn type_export(
    State(state): State<AppState>,
    ctx: AuthContext,
    Path(rtype): Path<String>,
    method: Method,
    headers: HeaderMap,
    OriginalUri(uri): OriginalUri,
    RawQuery(raw): RawQuery,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    if rtype != "Patient" {
        return Err(ApiError::not_found(format!(
            "{rtype} has no $export operation (Patient and Group do)"
        )));
    }
    kickoff(
        state,
        ctx,
        ExportLevel::Patient,
        method,
        headers,
        uri.to_string(),
        raw,
        body,
        Views::Refused,
    )
    .await
}

/// `/{type}/{id}/$export`: only `Group` has an instance-level export (the router's
/// `instance_operation` sends `/Group/{id}/$export` here).
// One argument per axum extractor (and the level): a struct would only rename them.
#[allow(clippy::too_many_arguments)]
pub async fn group_export(
    state: AppState,
    ctx: AuthContext,
    id: String,
    method: Method,
    headers: HeaderMap,
    uri: axum::http::Uri,
    raw: Option<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    if !store::is_valid_id(&id) {
        return Err(ApiError::invalid(format!("invalid id '{id}'"), "id"));
    }
    kickoff(
        state,
        ctx,
        ExportLevel::Group(id),
        method,
        headers,
        uri.to_string(),
        raw,
        body,
        Views::Refused,
    )
    .await
}

/// Polling faster than this answers 429 (a status request that waits for a change is held
/// back to this pace instead).
const MIN_POLL_INTERVAL: Duration = Duration::from_millis(100);
/// The longest a status request waits for a change (`Prefer: wait=N`, RFC 7240).
const MAX_STATUS_WAIT: Duration = Duration::from_secs(30);
/// A waiting status request looks again at least this often without being woken (another
/// node's progress wakes nobody here).
const STATUS_RECHECK: Duration = Duration::from_millis(250);
/// ... and at most this often, however often this process's workers commit: with
/// [`MAX_WAITING_STATUS`], at most 320 looks a second for all waiting requests together.
const STATUS_RECHECK_MIN: Duration = Duration::from_millis(50);
/// Status requests waiting at once; beyond this a request answers at once, as without `wait`.
const MAX_WAITING_STATUS: usize = 16;

/// Polls whose time is kept at once (about 100 bytes each): beyond it, polls older than
/// [`MIN_POLL_INTERVAL`] (which pace nothing any more) are forgotten, and while every kept poll
/// is younger a new key is not kept (its poll is paced as a first one).
const MAX_POLL_KEYS: usize = 10_000;

/// Time since the previous poll of `key` (`None`: the first), recording this one. Only the
/// status URLs of jobs are kept (`job` as the server names them, 32 hexadecimal digits): any
/// other text in the path, up to a URI's 64 KiB, is a job nobody has and must not take memory.
fn since_last_poll(job: &str, key: &str) -> Option<Duration> {
    static LAST: OnceLock<Mutex<HashMap<String, Instant>>> = OnceLock::new();
    if !export::is_job_id(job) {
        return None;
    }
    let mut last = LAST
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let now = Instant::now();
    if last.len() >= MAX_POLL_KEYS && !last.contains_key(key) {
        last.retain(|_, t| now.duration_since(*t) < MIN_POLL_INTERVAL);
        if last.len() >= MAX_POLL_KEYS {
            return None;
        }
    }
    last.insert(key.to_string(), now)
        .map(|prev| now.duration_since(prev))
}

fn polled_too_often(job: &str, key: &str) -> bool {
    since_last_poll(job, key).is_some_and(|d| d < MIN_POLL_INTERVAL)
}

/// `Prefer: wait=N` (whole seconds, at most [`MAX_STATUS_WAIT`]); anything else is no wait.
fn prefer_wait(headers: &HeaderMap) -> Option<Duration> {
    let n: u64 = crate::negotiate::prefer(headers, "wait")?.parse().ok()?;
    (n > 0).then(|| Duration::from_secs(n).min(MAX_STATUS_WAIT))
}

/// The validator of a running export's status answer: its manifest page with
/// `allowPartialManifests` ([`export::PartialPage::etag`]), else the same for the whole run.
fn progress_tag(partial: Option<&export::PartialPage>) -> String {
    partial.map_or_else(|| "W/\"running\"".to_string(), export::PartialPage::etag)
}

/// The `page` of a status URL (a manifest page of an `allowPartialManifests` export); any
/// other query parameter is ignored.
fn status_page_param(raw: Option<&str>) -> Result<Option<i64>, ApiError> {
    let pairs = raw.map(search::parse_query_string).unwrap_or_default();
    match pairs.iter().find(|(k, _)| k == "page") {
        None => Ok(None),
        Some((_, v)) => v
            .parse::<i64>()
            .map(Some)
            .map_err(|_| ApiError::invalid(format!("page '{v}' is not a page number"), "page")),
    }
}

/// `GET` of a status URL (or of a manifest page of it). `Prefer: wait=N` (RFC 7240) holds the
/// answer while the export runs unchanged, at most N seconds (30 at most): until it ends, or,
/// with `allowPartialManifests`, until its page lists more files or links the next page
/// (unchanged = the page whose `ETag` the request names in `If-None-Match`, else the page as
/// it was when the request came; a page that links the next is final and answered at once).
/// A client learns of each file and of the end at once, without polling every few hundred
/// milliseconds; `Preference-Applied: wait` says the preference was taken (the answer may come
/// at once, when the page already differs from the one named). Such requests are paced (one
/// answer per 100 ms and page) instead of refused with 429.
pub async fn status(
    State(state): State<AppState>,
    ctx: AuthContext,
    route: MatchedPath,
    Path(job): Path<String>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    static WAITING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_WAITING_STATUS);
    let page = status_page_param(raw.as_deref())?;
    let svc = state.export.clone();
    // Per manifest page: a client following the `next` links of a running export is not
    // polling too often.
    let key = match page {
        Some(n) => format!("{job}?page={n}"),
        None => job.clone(),
    };
    let waiting = prefer_wait(&headers).and_then(|w| Some((w, WAITING.try_acquire().ok()?)));
    let mut base = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let started = Instant::now();
    if waiting.is_some()
        && let Some(since) = since_last_poll(&job, &key)
        && since < MIN_POLL_INTERVAL
    {
        tokio::time::sleep(MIN_POLL_INTERVAL - since).await;
    }
    // `Preference-Applied: wait` whenever the preference was taken (also when the answer was
    // ready at once): the client may then ask again at once, the pacing is the server's.
    let waited = waiting.is_some();
    let kind = route_kind(&route);
    let view = loop {
        // Registered before looking, so that a change made while looking still wakes.
        let changed = svc.changes().notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let (s, j, c) = (svc.clone(), job.clone(), ctx.clone());
        let looked = Instant::now();
        let view = crate::database_wait::run(state.database_wait, "export status", move || {
            s.status_page(&j, page, &Caller(c, kind))
        })
        .await??;
        let Some((wait, _)) = &waiting else {
            break view;
        };
        let Status::InProgress { partial, .. } = &view.status else {
            break view;
        };
        // A page that links the next one is final: it never changes again.
        let last_page = partial.as_ref().is_none_or(|p| !p.is_final());
        let tag = progress_tag(partial.as_ref());
        if *base.get_or_insert_with(|| tag.clone()) != tag || !last_page {
            break view;
        }
        let deadline = started + *wait;
        let now = Instant::now();
        if now >= deadline || svc.is_stopping() {
            break view;
        }
        let _ = tokio::time::timeout((deadline - now).min(STATUS_RECHECK), changed).await;
        let next = (looked + STATUS_RECHECK_MIN).min(deadline);
        tokio::time::sleep_until(next.into()).await;
    };
    let separate = view.separate_status;
    // With `separate-export-status`, the poll itself succeeds (200) and the job's status is
    // in `X-Export-Status`: `202 Accepted`, `200 OK`, or the failure's code.
    let separated = |mut resp: Response| -> Response {
        if waited && resp.status().is_success() {
            resp.headers_mut()
                .insert("preference-applied", HeaderValue::from_static("wait"));
        }
        if separate {
            let code = resp.status();
            let text = format!(
                "{} {}",
                code.as_u16(),
                code.canonical_reason().unwrap_or("")
            );
            if let Ok(v) = HeaderValue::from_str(text.trim_end()) {
                resp.headers_mut().insert("x-export-status", v);
            }
            *resp.status_mut() = StatusCode::OK;
        }
        resp
    };
    match view.status {
        Status::InProgress { progress, partial } => {
            let tag = progress_tag(partial.as_ref());
            if waiting.is_none() && polled_too_often(&job, &key) {
                return Err(ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "throttled",
                    "polled too often; wait for Retry-After",
                )
                .with_header(header::RETRY_AFTER, HeaderValue::from_static("1")));
            }
            let mut resp = match partial {
                // `allowPartialManifests`: the files written so far.
                Some(p) => {
                    let mut r = (StatusCode::ACCEPTED, p.manifest.to_string()).into_response();
                    r.headers_mut().insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    );
                    r
                }
                None => StatusCode::ACCEPTED.into_response(),
            };
            let h = resp.headers_mut();
            h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            if let Ok(v) = HeaderValue::from_str(&progress) {
                h.insert("x-progress", v);
            }
            if let Ok(v) = HeaderValue::from_str(&tag) {
                h.insert(header::ETAG, v);
            }
            Ok(separated(resp))
        }
        Status::Complete {
            manifest,
            expires_ms,
        } => {
            let mut resp = (StatusCode::OK, manifest.to_string()).into_response();
            let h = resp.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            // When the retention period ends and the files are removed.
            let expires = std::time::UNIX_EPOCH
                + Duration::from_millis(u64::try_from(expires_ms).unwrap_or(0));
            if let Ok(v) = HeaderValue::from_str(&httpdate::fmt_http_date(expires)) {
                h.insert(header::EXPIRES, v);
            }
            Ok(separated(resp))
        }
        Status::Failed {
            diagnostics,
            status,
        } => {
            let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let issue = if code.is_client_error() {
                "invalid"
            } else if code == StatusCode::SERVICE_UNAVAILABLE {
                "transient"
            } else {
                "exception"
            };
            let e = ApiError::new(code, issue, format!("export failed: {diagnostics}"));
            if separate {
                return Ok(separated(e.into_response()));
            }
            Err(e)
        }
    }
}

pub async fn cancel(
    State(state): State<AppState>,
    ctx: AuthContext,
    route: MatchedPath,
    Path(job): Path<String>,
) -> Result<Response, ApiError> {
    let svc = state.export.clone();
    let kind = route_kind(&route);
    crate::database_wait::run(state.database_wait, "export cancel", move || {
        svc.cancel(&job, &Caller(ctx, kind))
    })
    .await??;
    let oo = serde_json::json!({"resourceType": "OperationOutcome", "issue": [{"severity": "information", "code": "informational", "diagnostics": "export cancelled; its files are removed"}]});
    let mut resp = fhir_json(&oo);
    *resp.status_mut() = StatusCode::ACCEPTED;
    Ok(resp)
}

/// `GET /export-files/{job}/{file}`: a file of a finished export, streamed from its destination
/// (a local folder, Azure Blob or S3), never read whole. Range requests ([`crate::ranges`]): one
/// byte range answers `206` with `Content-Range`; `Accept-Ranges: bytes`, a strong `ETag` and
/// `Last-Modified` on every answer; `If-Range` resumes only the same version.
pub async fn download(
    State(state): State<AppState>,
    ctx: AuthContext,
    route: MatchedPath,
    Path((job, file)): Path<(String, String)>,
    method: Method,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let svc = state.export.clone();
    let kind = route_kind(&route);
    let media = media_type(&file);
    let name = file.clone();
    let body = crate::database_wait::run(state.database_wait, "export download", move || {
        svc.file(&job, &file, &Caller(ctx, kind))
    })
    .await??;
    let head_only = method == Method::HEAD;
    let mut resp = match body {
        export::FileBody::Local { mut file, meta } => {
            use std::io::Seek;
            let info = export::ObjectInfo {
                size: meta.len(),
                etag: export::sink::local_etag(&meta),
                last_modified: meta.modified().ok(),
            };
            let (status, range, head) = plan_download(&headers, &info)?;
            if !head_only {
                state.metrics.downloaded(range.end - range.start);
            }
            let body = if head_only || range.is_empty() {
                Body::empty()
            } else {
                // A seek on an open file only moves its offset: no wait on the disk.
                file.seek(std::io::SeekFrom::Start(range.start))
                    .map_err(|e| ApiError::internal("export download", e))?;
                let part = std::io::Read::take(file, range.end - range.start);
                blocking_body(part)
            };
            file_response(status, head, body)
        }
        export::FileBody::Remote {
            container,
            path,
            size,
        } => {
            let sink = state.export.sink().clone();
            let (c, p, s) = (container.clone(), path.clone(), sink.clone());
            let info = tokio::task::spawn_blocking(move || s.stat(&c, &p))
                .await
                .map_err(|e| ApiError::internal("export download", e))?
                .map_err(download_error)?;
            // The object is not the one the export committed (replaced in the store after the
            // manifest): refused rather than served as the export's file.
            if let Some(recorded) = size.filter(|&n| n != info.size) {
                tracing::warn!(file = %name, recorded, stored = info.size, "export download: the stored file changed after the export");
                return Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "exception",
                    format!(
                        "the stored file '{name}' changed after the export ({} bytes stored, {recorded} recorded in the manifest); it is not served",
                        info.size
                    ),
                ));
            }
            let (status, range, head) = plan_download(&headers, &info)?;
            if !head_only {
                state.metrics.downloaded(range.end - range.start);
            }
            let body = if head_only || range.is_empty() {
                Body::empty()
            } else {
                remote_body(sink, container, path, range, info.etag).await?
            };
            file_response(status, head, body)
        }
    };
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(media));
    // A file to save, never a page to show (whatever the resources in it hold).
    headers.insert(header::CONTENT_DISPOSITION, attachment(&name));
    Ok(resp)
}

/// `attachment`, with the file's name when it is plain (export files are `Type-N.ndjson`,
/// views' names are checked at kick-off; anything else is left for the client to name).
fn attachment(name: &str) -> HeaderValue {
    let plain = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if plain {
        HeaderValue::from_str(&format!("attachment; filename=\"{name}\""))
            .unwrap_or(HeaderValue::from_static("attachment"))
    } else {
        HeaderValue::from_static("attachment")
    }
}

/// The media type of an export file, by its name: resources as FHIR NDJSON, the outputs of
/// `$viewdefinition-export` as CSV or Parquet, a `.ndjson.gz` file (`--export-gzip`,
/// `_compression=gzip`) as the gzip it is stored as.
fn media_type(file: &str) -> &'static str {
    match file.rsplit_once('.').map(|(_, ext)| ext) {
        Some("gz") => "application/gzip",
        Some("csv") => "text/csv; charset=utf-8",
        Some("parquet") => "application/vnd.apache.parquet",
        Some("json") => "application/json",
        _ => "application/fhir+ndjson",
    }
}

/// The status, the bytes and the headers of a download answer; `416` as an OperationOutcome.
fn plan_download(
    headers: &HeaderMap,
    info: &export::ObjectInfo,
) -> Result<(StatusCode, std::ops::Range<u64>, HeaderMap), ApiError> {
    let mut head = HeaderMap::new();
    head.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    let decision = crate::ranges::decide(headers, info.size, &info.etag, info.last_modified);
    let (status, range) = match decision {
        crate::ranges::Decision::Full => (StatusCode::OK, 0..info.size),
        crate::ranges::Decision::Partial { start, end } => {
            if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{}", info.size)) {
                head.insert(header::CONTENT_RANGE, v);
            }
            (StatusCode::PARTIAL_CONTENT, start..end + 1)
        }
        crate::ranges::Decision::Unsatisfiable => {
            let size = HeaderValue::from_str(&format!("bytes */{}", info.size))
                .unwrap_or(HeaderValue::from_static("bytes */0"));
            return Err(ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "invalid",
                format!(
                    "the Range header asks for no byte of this {}-byte file (one range of bytes=FIRST-LAST, FIRST- or -SUFFIX)",
                    info.size
                ),
            )
            .at("Range")
            .with_header(header::CONTENT_RANGE, size)
            .with_header(header::ACCEPT_RANGES, HeaderValue::from_static("bytes")));
        }
    };
    // A whole file may leave gzip-encoded (the compression layer): another representation,
    // another tag. A partial answer is never compressed (it has a Content-Range).
    let may_be_gzip = status == StatusCode::OK && crate::ranges::accepts_gzip(headers);
    if let Some(tag) = crate::ranges::etag_header(&info.etag, may_be_gzip)
        && let Ok(v) = HeaderValue::from_str(&tag)
    {
        head.insert(header::ETAG, v);
    }
    if let Some(t) = info.last_modified
        && let Ok(v) = HeaderValue::from_str(&httpdate::fmt_http_date(t))
    {
        head.insert(header::LAST_MODIFIED, v);
    }
    head.insert(
        header::CONTENT_LENGTH,
        HeaderValue::from(range.end - range.start),
    );
    head.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/fhir+ndjson"),
    );
    Ok((status, range, head))
}

fn file_response(status: StatusCode, head: HeaderMap, body: Body) -> Response {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    resp.headers_mut().extend(head);
    resp
}

/// A destination's error while serving a file.
fn download_error(e: export::SinkError) -> ApiError {
    match e {
        export::SinkError::NotFound(_) => ApiError::not_found("the export file is gone"),
        export::SinkError::Unavailable(_) => {
            tracing::warn!(error = %e, "export download: destination unavailable");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "transient",
                "the export destination is unavailable; retry later",
            )
            .with_header(header::RETRY_AFTER, HeaderValue::from_static("5"))
        }
        other => ApiError::internal("export download", other),
    }
}

/// Streams bytes `range` of an object of a remote destination through the server: a blocking
/// reader on a worker thread feeds a pipe whose other end is the response body.
async fn remote_body(
    sink: std::sync::Arc<dyn export::Sink>,
    container: String,
    path: String,
    range: std::ops::Range<u64>,
    etag: String,
) -> Result<Body, ApiError> {
    let reader = tokio::task::spawn_blocking(move || {
        let etag = (!etag.is_empty()).then_some(etag);
        sink.open_range(&container, &path, range, etag.as_deref())
    })
    .await
    .map_err(|e| ApiError::internal("export download", e))?
    .map_err(download_error)?;
    Ok(blocking_body(reader))
}

/// Bytes read per chunk of a download body: one blocking read per MiB (with
/// `tokio::fs::File` and 64 KiB chunks, each 64 KiB cost a blocking-pool round trip and a copy
/// out of the file's own buffer; issue 24, scripts/bench-export-e2e.sh).
const DOWNLOAD_CHUNK: usize = 1 << 20;
/// Chunks read ahead of the connection, per download.
const DOWNLOAD_AHEAD: usize = 4;
/// Chunk buffers kept for the next chunks of any download once the connection has written
/// them: at most this many ([`DOWNLOAD_CHUNK`] bytes each), so that a download allocates,
/// zeroes and faults in no memory per chunk.
const IDLE_BUFFERS: usize = 16;

/// The idle chunk buffers ([`IDLE_BUFFERS`] at most), shared by every download.
static IDLE: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());

/// An idle chunk buffer, or a new one.
fn chunk_buffer() -> Vec<u8> {
    let idle = IDLE.lock().unwrap_or_else(|p| p.into_inner()).pop();
    idle.unwrap_or_else(|| vec![0u8; DOWNLOAD_CHUNK])
}

/// The first `len` bytes of a chunk buffer, as a body chunk; dropped (written to the
/// connection, or the download abandoned), the buffer goes back to [`IDLE`].
struct Chunk {
    buf: Vec<u8>,
    len: usize,
}

impl AsRef<[u8]> for Chunk {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        let mut idle = IDLE.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < IDLE_BUFFERS {
            idle.push(buf);
        }
    }
}

/// A response body fed by a blocking reader on a worker thread: chunks of [`DOWNLOAD_CHUNK`]
/// bytes, read straight into the (reused) buffer that becomes the chunk, at most
/// [`DOWNLOAD_AHEAD`] of them waiting for the client. The reader stops when the client goes
/// away.
fn blocking_body(mut reader: impl std::io::Read + Send + 'static) -> Body {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(DOWNLOAD_AHEAD);
    tokio::task::spawn_blocking(move || {
        loop {
            let mut buf = chunk_buffer();
            let mut filled = 0;
            let result = loop {
                match reader.read(&mut buf[filled..]) {
                    Ok(0) => break Ok(()),
                    Ok(n) => {
                        filled += n;
                        if filled == buf.len() {
                            break Ok(());
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => break Err(e),
                }
            };
            let last = filled < buf.len();
            let chunk = Chunk { buf, len: filled };
            if filled > 0 && tx.blocking_send(Ok(Bytes::from_owner(chunk))).is_err() {
                return; // the client went away
            }
            if let Err(e) = result {
                tracing::error!(error = %e, "export download interrupted");
                let _ = tx.blocking_send(Err(e));
                return;
            }
            if last {
                return;
            }
        }
    });
    let mut rx = rx;
    // `poll_recv` may be polled again after the end (hyper does): it keeps answering `None`.
    Body::from_stream(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)))
}
