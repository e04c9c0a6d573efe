//! `fhirhose export URL --out DIR`: a Bulk Data `$export` client for any FHIR server.
//!
//! 1. Kick-off (system, `Patient` or `Group/ID` level; GET, or POST with a `Parameters` body
//!    when `--patient` is given or `--post` asked) with every Bulk Data parameter plus the
//!    Azure/Fhirhose extensions (`_container`, `_anonymizationConfig`, ...) and any other through
//!    `--param`.
//! 2. SMART Backend Services: a client assertion signed with the key file (PEM or private JWK),
//!    exchanged at the token endpoint (`--token-url`, else the server's
//!    `.well-known/smart-configuration`); renewed before it expires and once after a 401.
//! 3. Polling that waits as long as `Retry-After` says (429 on a status URL is a wait, not an
//!    error) and shows `X-Progress`.
//! 4. A paged manifest (Bulk Data `allowPartialManifests`: `link` `next`) is read page after
//!    page with the same auth and retries (at most `--max-pages`, a page never read twice),
//!    and `manifest.json` in the output folder is the merged manifest: every page's entries, in
//!    page order, without `link`. Files are downloaded once the export is complete.
//! 5. Downloads of every `output`, `error` and `deleted` file, `--parallel` at a time, into
//!    `NAME.part` files; a dropped connection resumes with `Range: bytes=<part length>-` and
//!    `If-Range: <ETag>` (a server answering 200 instead restarts the file), then renames.
//! 6. `--verify`: the folder checked by [`manifest::verify`] (what `fhirhose verify` runs): line
//!    counts against `count`, sizes against `fileSize`/`size`, SHA-256 against `sha256` when
//!    the manifest has them, every line a JSON resource of the file's type, and the references
//!    of the output resolving to exported resources (`--dangling`).
//!
//! Ctrl-C with `--cancel-on-interrupt` sends `DELETE` to the status URL before exiting.

mod download;
mod error;
mod key;
mod session;
mod verify;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

pub use error::ClientError;
/// `Retry-After` as the client reads it (seconds or an HTTP date), for other HTTP callers.
pub use session::retry_after;
use session::{Credentials, Policy, Session, header};
pub use verify::Verified;

/// `fhirhose export`.
#[derive(Debug, Clone, clap::Args)]
pub struct ExportArgs {
    /// The server's FHIR base URL (e.g. `https://fhir.example.org/r4`), or a complete kick-off URL
    /// ending in `$export`.
    pub url: String,
    /// Folder the files are written to (created when missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Patient-level export (`[base]/Patient/$export`).
    #[arg(long, conflicts_with = "group")]
    pub patient_level: bool,
    /// Group-level export of this Group id (`[base]/Group/ID/$export`).
    #[arg(long)]
    pub group: Option<String>,
    /// `_type`: resource types (comma-separated or repeated).
    #[arg(long = "type", value_delimiter = ',')]
    pub types: Vec<String>,
    /// `_since`: only resources changed after this FHIR instant.
    #[arg(long)]
    pub since: Option<String>,
    /// `_until`: only resources changed before this FHIR instant.
    #[arg(long)]
    pub until: Option<String>,
    /// `_till` (the draft name of `_until` some servers still read).
    #[arg(long)]
    pub till: Option<String>,
    /// `_typeFilter` (repeatable), e.g. `Observation?status=final`.
    #[arg(long = "type-filter")]
    pub type_filters: Vec<String>,
    /// `_elements` (comma-separated or repeated).
    #[arg(long, value_delimiter = ',')]
    pub elements: Vec<String>,
    /// `patient`: a Patient reference to export (repeatable; the kick-off becomes a POST).
    #[arg(long = "patient")]
    pub patients: Vec<String>,
    /// `includeAssociatedData` (comma-separated or repeated), e.g. `LatestProvenanceResources`.
    #[arg(long, value_delimiter = ',')]
    pub include_associated_data: Vec<String>,
    /// `_outputFormat` (e.g. `application/fhir+ndjson`).
    #[arg(long)]
    pub output_format: Option<String>,
    /// `_container` (Azure / Fhirhose: the destination container).
    #[arg(long)]
    pub container: Option<String>,
    /// `_anonymizationConfig` (Azure / Fhirhose: de-identified export).
    #[arg(long)]
    pub anonymization_config: Option<String>,
    /// `_anonymizationConfigEtag`.
    #[arg(long)]
    pub anonymization_config_etag: Option<String>,
    /// `_anonymizationConfigCollectionReference` (an OCI image reference).
    #[arg(long)]
    pub anonymization_config_collection_reference: Option<String>,
    /// Any other kick-off parameter, `NAME=VALUE` (repeatable).
    #[arg(long = "param", value_parser = parse_param)]
    pub params: Vec<(String, String)>,
    /// Kick off with POST and a `Parameters` body instead of GET.
    #[arg(long)]
    pub post: bool,
    /// SMART Backend Services client id (with --key).
    #[arg(long, env = "FHIRHOSE_EXPORT_CLIENT_ID", requires = "key")]
    pub client_id: Option<String>,
    /// The client's private key: PKCS#8 PEM (RSA, EC P-256/P-384) or a private JWK / JWKS.
    #[arg(long, env = "FHIRHOSE_EXPORT_KEY", requires = "client_id")]
    pub key: Option<PathBuf>,
    /// Another origin (e.g. `https://files.example.org`) the access token may be sent to
    /// (repeatable). By default it goes to the FHIR base URL's origin (scheme, host, port)
    /// only: a status, manifest page or file URL elsewhere is read without it, and a file there
    /// the manifest says needs it (`requiresAccessToken`) is refused.
    #[arg(long = "token-origin")]
    pub token_origins: Vec<String>,
    /// Token endpoint (default: from `BASE/.well-known/smart-configuration`).
    #[arg(long)]
    pub token_url: Option<String>,
    /// Scopes to request.
    #[arg(long, default_value = "system/*.read")]
    pub scope: String,
    /// Key id (default: the JWK's `kid`, else the RFC 7638 thumbprint).
    #[arg(long)]
    pub kid: Option<String>,
    /// Signing algorithm: RS384, RS256, ES384 or ES256 (default: from the key).
    #[arg(long)]
    pub alg: Option<String>,
    /// The most bytes one file may have: a download passing it stops with an error (besides
    /// the manifest's `fileSize` and the answer's Content-Length, which always bound it).
    #[arg(long)]
    pub max_file_bytes: Option<u64>,
    /// Files downloaded at once.
    #[arg(long, default_value_t = 4)]
    pub parallel: usize,
    /// Retries of a request (and resumptions of one file) on transport errors, 429 and 5xx.
    #[arg(long, default_value_t = 5)]
    pub retries: u32,
    /// Seconds without a byte from the server before a request is given up (and retried).
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
    /// Seconds between status polls when the server sends no Retry-After.
    #[arg(long, default_value_t = 2)]
    pub poll_interval: u64,
    /// Check the downloaded files as `fhirhose verify` does: line counts, sizes and hashes the
    /// manifest lists, every line a resource of the file's type, and the references between
    /// exported resources.
    #[arg(long)]
    pub verify: bool,
    /// With --verify, references to an exported type that resolve to no exported resource:
    /// `fail` or `warn` (default: `warn` with --since or --type-filter, whose exports are
    /// partial by design, else `fail`).
    #[arg(long, value_parser = ["fail", "warn"], requires = "verify")]
    pub dangling: Option<String>,
    /// On Ctrl-C, cancel the export on the server (DELETE on the status URL) before exiting.
    #[arg(long)]
    pub cancel_on_interrupt: bool,
    /// A paged manifest (`allowPartialManifests`, `link` `next`) is followed page by page into
    /// one merged `manifest.json`; more pages than this, or a `next` link to a page already
    /// read, ends the run with an error.
    #[arg(long, default_value_t = manifest::MAX_PAGES)]
    pub max_pages: usize,
    /// Download while the export runs: kick off with `allowPartialManifests=true` and fetch each
    /// file as soon as a manifest page of the running export lists it (the pages are followed
    /// by their `link` `next`); `manifest.json` is still the complete manifest, written at the
    /// end. With `--status-url`, the export must have been kicked off so.
    #[arg(long)]
    pub partial_manifests: bool,
    /// Resume a kicked-off export: poll this status URL instead of starting one.
    #[arg(long)]
    pub status_url: Option<String>,
    /// No progress bar (logs only).
    #[arg(long)]
    pub quiet: bool,
}

fn parse_param(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err("expected NAME=VALUE".to_owned()),
    }
}

/// What an export run did.
#[derive(Debug, Clone)]
pub struct Summary {
    pub status_url: String,
    pub files: usize,
    /// Manifest pages read (1 unless the manifest is paged).
    pub pages: usize,
    pub bytes: u64,
    pub resources: Option<u64>,
    pub resumed: u32,
    /// Files whose download started while the export ran (`--partial-manifests`).
    pub early: usize,
    pub tokens: u32,
    pub export_seconds: f64,
    pub download_seconds: f64,
    /// What `--verify` found, when asked.
    pub verified: Option<Verified>,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mb = self.bytes as f64 / 1e6;
        write!(
            f,
            "{} files{}, {:.1} MB downloaded in {:.1} s ({:.1} MB/s) after {:.1} s of export",
            self.files,
            if self.pages > 1 {
                format!(" from {} manifest pages", self.pages)
            } else {
                String::new()
            },
            mb,
            self.download_seconds,
            mb / self.download_seconds.max(1e-3),
            self.export_seconds
        )?;
        if let Some(r) = self.resources {
            write!(f, "; {r} resources")?;
        }
        if self.early > 0 {
            write!(f, "; {} files fetched while the export ran", self.early)?;
        }
        if self.resumed > 0 {
            write!(f, "; {} downloads resumed by Range", self.resumed)?;
        }
        if self.tokens > 0 {
            write!(f, "; {} access tokens", self.tokens)?;
        }
        if let Some(v) = &self.verified {
            write!(
                f,
                "; verified in {:.1} s, {} references checked",
                v.seconds, v.references
            )?;
            if v.dangling > 0 {
                write!(
                    f,
                    " ({} resolve to no exported resource, e.g. {}: --dangling warn)",
                    v.dangling,
                    v.first_dangling.as_deref().unwrap_or("?")
                )?;
            }
        }
        Ok(())
    }
}

/// Runs the export on a new runtime, handling Ctrl-C. The summary line to print on success.
pub fn run(args: ExportArgs) -> Result<Summary, ClientError> {
    let rt = tokio::runtime::Runtime::new()
        .map_err(|e| ClientError::Usage(format!("cannot start the runtime: {e}")))?;
    rt.block_on(run_async(args))
}

/// [`run`] on the caller's runtime.
pub async fn run_async(args: ExportArgs) -> Result<Summary, ClientError> {
    let session = Arc::new(session_for(&args)?);
    let status_slot: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
    let work = export(&args, session.clone(), status_slot.clone());
    tokio::select! {
        r = work => r,
        _ = tokio::signal::ctrl_c() => {
            let status = status_slot.lock().map(|s| s.clone()).unwrap_or(None);
            let mut cancelled = false;
            if args.cancel_on_interrupt && let Some(url) = status {
                eprintln!("interrupted: cancelling the export ({url})");
                match session.send(Method::DELETE, &url, &HeaderMap::new(), None, true, session::IDEMPOTENT).await {
                    Ok(r) if r.status().is_success() => cancelled = true,
                    Ok(r) => eprintln!("the server did not cancel: {}", session.fail(&url, r, 1).await),
                    Err(e) => eprintln!("the server did not cancel: {e}"),
                }
            }
            Err(ClientError::Interrupted { cancelled })
        }
    }
}

fn session_for(args: &ExportArgs) -> Result<Session, ClientError> {
    let credentials = match (&args.client_id, &args.key) {
        (Some(client_id), Some(path)) => Some(Credentials {
            client_id: client_id.clone(),
            key: key::load(path, args.kid.clone(), args.alg.as_deref())?,
            token_url: args.token_url.clone(),
            scope: args.scope.clone(),
        }),
        _ => None,
    };
    let mut session = Session::new(
        base_of(&args.url),
        &args.token_origins,
        credentials,
        args.retries,
        Duration::from_secs(args.timeout.max(1)),
    )?;
    session.max_file_bytes = args.max_file_bytes;
    Ok(session)
}

/// The FHIR base of a base or kick-off URL.
fn base_of(url: &str) -> &str {
    let url = url.split('?').next().unwrap_or(url);
    match url.find("/$export") {
        Some(i) => {
            let head = &url[..i];
            // [base]/Patient/$export or [base]/Group/ID/$export
            if let Some(j) = head.rfind("/Patient")
                && j + "/Patient".len() == head.len()
            {
                return &head[..j];
            }
            if let Some(j) = head.rfind("/Group/") {
                return &head[..j];
            }
            head
        }
        None => url.trim_end_matches('/'),
    }
}

impl ExportArgs {
    fn kickoff_url(&self) -> String {
        if self.url.contains("$export") {
            return self.url.clone();
        }
        let base = self.url.trim_end_matches('/');
        match (&self.group, self.patient_level) {
            (Some(g), _) => format!("{base}/Group/{g}/$export"),
            (None, true) => format!("{base}/Patient/$export"),
            (None, false) => format!("{base}/$export"),
        }
    }

    /// The kick-off parameters, in the order a reader expects.
    fn parameters(&self) -> Vec<(String, String)> {
        let mut p: Vec<(String, String)> = Vec::new();
        let mut one = |k: &str, v: &Option<String>| {
            if let Some(v) = v {
                p.push((k.to_owned(), v.clone()));
            }
        };
        one("_outputFormat", &self.output_format);
        one("_since", &self.since);
        one("_until", &self.until);
        one("_till", &self.till);
        one("_container", &self.container);
        one("_anonymizationConfig", &self.anonymization_config);
        one("_anonymizationConfigEtag", &self.anonymization_config_etag);
        one(
            "_anonymizationConfigCollectionReference",
            &self.anonymization_config_collection_reference,
        );
        if !self.types.is_empty() {
            p.push(("_type".to_owned(), self.types.join(",")));
        }
        if !self.elements.is_empty() {
            p.push(("_elements".to_owned(), self.elements.join(",")));
        }
        if !self.include_associated_data.is_empty() {
            p.push((
                "includeAssociatedData".to_owned(),
                self.include_associated_data.join(","),
            ));
        }
        for f in &self.type_filters {
            p.push(("_typeFilter".to_owned(), f.clone()));
        }
        for r in &self.patients {
            p.push(("patient".to_owned(), r.clone()));
        }
        p.extend(self.params.iter().cloned());
        if self.partial_manifests && !p.iter().any(|(k, _)| k == "allowPartialManifests") {
            p.push(("allowPartialManifests".to_owned(), "true".to_owned()));
        }
        p
    }
}

/// The `Parameters` body of a POST kick-off.
fn parameters_body(params: &[(String, String)]) -> Value {
    let parameter: Vec<Value> = params
        .iter()
        .map(|(k, v)| match k.as_str() {
            "patient" => json!({"name": k, "valueReference": {"reference": v}}),
            "_since" | "_until" | "_till" => json!({"name": k, "valueInstant": v}),
            "allowPartialManifests" if v == "true" || v == "false" => {
                json!({"name": k, "valueBoolean": v == "true"})
            }
            _ => json!({"name": k, "valueString": v}),
        })
        .collect();
    json!({"resourceType": "Parameters", "parameter": parameter})
}

async fn kickoff(args: &ExportArgs, session: &Session) -> Result<String, ClientError> {
    let url = args.kickoff_url();
    let params = args.parameters();
    let mut headers = header("accept", "application/fhir+json");
    headers.insert(
        "prefer",
        reqwest::header::HeaderValue::from_static("respond-async"),
    );
    // A kick-off that reached the server may have started a job: only 429/503 are retried.
    let policy = Policy {
        idempotent: false,
        pass_429: false,
    };
    let resp = if args.post || !args.patients.is_empty() {
        let body = parameters_body(&params).to_string();
        session
            .send(
                Method::POST,
                &url,
                &headers,
                Some(("application/fhir+json", body)),
                true,
                policy,
            )
            .await?
    } else {
        let mut u = reqwest::Url::parse(&url)
            .map_err(|e| ClientError::Usage(format!("{url} is not a URL: {e}")))?;
        if !params.is_empty() {
            let mut q = u.query_pairs_mut();
            for (k, v) in &params {
                q.append_pair(k, v);
            }
        }
        session
            .send(Method::GET, u.as_str(), &headers, None, true, policy)
            .await?
    };
    if resp.status() != StatusCode::ACCEPTED {
        let status = resp.status();
        let err = session.fail(&url, resp, 1).await;
        return Err(if status.is_success() {
            ClientError::Protocol(format!("the kick-off answered {status}, not 202 Accepted"))
        } else {
            err
        });
    }
    resp.headers()
        .get("content-location")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .ok_or_else(|| ClientError::Protocol("202 without Content-Location".to_owned()))
}

/// The largest status answer or manifest page read (as `fhirhose verify` reads them).
const MAX_PAGE_BYTES: usize = manifest::MAX_MANIFEST_BYTES as usize;

/// Seconds a status request asks the server to hold its answer until something changes
/// (`Prefer: wait`, RFC 7240; servers that do not know it answer at once, as before), at most
/// half of `--timeout`.
const WAIT_SECONDS: u64 = 20;

/// The least time between two polls of a page when the server holds its answers.
const MIN_ASK_AGAIN: Duration = Duration::from_millis(100);

/// Polls until the manifest is ready: its first page. Each poll asks the server to answer
/// only once something changed (`Prefer: wait`, with the last answer's `ETag` in
/// `If-None-Match`; a manifest page not read yet is first asked for without it); a server
/// that takes the preference (`Preference-Applied: wait`) is asked again at once, any other
/// after `Retry-After` (or `--poll-interval`). With `early`
/// (`--partial-manifests`), the running export's manifest pages are read as they grow and
/// followed by their `link` `next`, and their files started.
async fn poll(
    args: &ExportArgs,
    session: &Session,
    status_url: &str,
    bar: &indicatif::ProgressBar,
    mut early: Option<&mut download::Early>,
) -> Result<Value, ClientError> {
    let policy = Policy {
        idempotent: true,
        pass_429: true,
    };
    let mut slow_down = 0u32;
    let mut url = status_url.to_owned();
    let mut etag: Option<reqwest::header::HeaderValue> = None;
    // The pages followed while the export runs (read, not merged): none twice, at most
    // --max-pages.
    let mut pages = manifest::PageLinks::new(Some(status_url), args.max_pages).map_err(paging)?;
    let prefer = format!("wait={}", (args.timeout / 2).clamp(1, WAIT_SECONDS));
    loop {
        let mut headers = header("accept", "application/json");
        // A page not read yet is asked for at once (its files so far), then waited on.
        if (early.is_none() || etag.is_some())
            && let Ok(v) = reqwest::header::HeaderValue::from_str(&prefer)
        {
            headers.insert("prefer", v);
        }
        if let Some(tag) = &etag {
            headers.insert("if-none-match", tag.clone());
        }
        let sent = tokio::time::Instant::now();
        let resp = or_failed(
            early.as_deref_mut(),
            session.send(Method::GET, &url, &headers, None, true, policy),
        )
        .await?;
        let status = resp.status();
        let wait = session::retry_after(resp.headers());
        let waits = resp
            .headers()
            .get_all("preference-applied")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split([',', ';']).any(|p| p.trim().starts_with("wait")));
        let new_etag = resp.headers().get("etag").cloned();
        // `Prefer: separate-export-status` (Bulk Data STU4 ballot): every poll is 200, the
        // job's own status is in X-Export-Status.
        let export_status = resp
            .headers()
            .get("x-export-status")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let status = match (status, export_status.as_deref()) {
            (StatusCode::OK, Some(s)) if s.trim_start().starts_with("202") => StatusCode::ACCEPTED,
            (StatusCode::OK, Some(s)) if !s.trim_start().starts_with("200") => {
                return Err(ClientError::ExportFailed(format!("X-Export-Status: {s}")));
            }
            _ => status,
        };
        let body = |resp: reqwest::Response, url: String| async move {
            session::read_body(resp, &url, MAX_PAGE_BYTES).await
        };
        match status {
            StatusCode::OK if url != status_url => {
                // The export ended while a later page was being read: its manifest starts
                // on the first page.
                url = status_url.to_owned();
                etag = None;
                continue;
            }
            StatusCode::OK => {
                let body = or_failed(early.as_deref_mut(), body(resp, url)).await?;
                return serde_json::from_str(&body)
                    .map_err(|_| ClientError::Protocol("the manifest is not JSON".to_owned()));
            }
            StatusCode::ACCEPTED => {
                slow_down = 0;
                let progress = resp
                    .headers()
                    .get("x-progress")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                if !progress.is_empty() {
                    bar.set_message(format!("exporting: {progress}"));
                    tracing::debug!(progress, "export in progress");
                }
                if let Some(early) = early.as_deref_mut() {
                    let text = or_failed(Some(&mut *early), body(resp, url.clone())).await?;
                    // A running export's manifest page (`allowPartialManifests`), if any.
                    if let Ok(page) = serde_json::from_str::<Value>(&text)
                        && page.get("output").is_some_and(Value::is_array)
                    {
                        early.page(&page, &progress)?;
                        if let Some(next) = manifest::next_link(&page) {
                            url = pages.follow(next).map_err(paging)?;
                            etag = None;
                            continue;
                        }
                    }
                }
                let unread = early.is_some() && etag.is_none();
                etag = new_etag;
                if waits || (unread && etag.is_some()) {
                    // Asked again at once, but never more than 10 times a second, whatever a
                    // server that claims to wait does.
                    or_failed(early.as_deref_mut(), async {
                        tokio::time::sleep_until(sent + MIN_ASK_AGAIN).await;
                        Ok(())
                    })
                    .await?;
                    continue;
                }
            }
            StatusCode::TOO_MANY_REQUESTS => {
                // Polled too early: wait as told (or longer each time) and ask again.
                slow_down += 1;
            }
            _ => {
                let err = session.fail(&url, resp, 1).await;
                return Err(match err {
                    ClientError::ServerError { reason, .. }
                    | ClientError::Refused { reason, .. }
                        if status.is_server_error() || status == StatusCode::NOT_FOUND =>
                    {
                        ClientError::ExportFailed(format!("HTTP {}: {reason}", status.as_u16()))
                    }
                    other => other,
                });
            }
        }
        let default = Duration::from_secs(args.poll_interval.max(1) << slow_down.min(4));
        let pause = wait.unwrap_or(default).max(Duration::from_millis(200));
        or_failed(early.as_deref_mut(), async {
            tokio::time::sleep(pause).await;
            Ok(())
        })
        .await?;
    }
}

/// A link of the manifest pages refused ([`manifest::PageLinks`], [`manifest::PageWalk`]).
fn paging(e: manifest::VerifyError) -> ClientError {
    ClientError::Protocol(e.to_string())
}

/// `work`, or the error of a download started while the export runs that failed meanwhile
/// ([`download::Early::failure`]): such a failure ends the run at once, not when the server
/// next answers (a status answer may be held for many seconds).
async fn or_failed<T>(
    early: Option<&mut download::Early>,
    work: impl std::future::Future<Output = Result<T, ClientError>>,
) -> Result<T, ClientError> {
    match early {
        Some(early) => tokio::select! {
            r = work => r,
            e = early.failure() => Err(e),
        },
        None => work.await,
    }
}

/// The whole manifest of a complete export from its first page: the pages its `link` `next`
/// leads to, read with the session's auth and retries, merged (see [`manifest::PageWalk`]), and
/// the number of pages.
async fn all_pages(
    args: &ExportArgs,
    session: &Session,
    status_url: &str,
    first: Value,
) -> Result<(Value, usize), ClientError> {
    let mut walk =
        manifest::PageWalk::new(first, Some(status_url), args.max_pages).map_err(paging)?;
    let headers = header("accept", "application/json");
    while let Some(url) = walk.next_url().map_err(paging)? {
        tracing::debug!(
            url,
            page = walk.pages() + 1,
            "reading the next manifest page"
        );
        let resp = session
            .send(Method::GET, &url, &headers, None, true, session::IDEMPOTENT)
            .await?;
        if resp.status() != StatusCode::OK {
            return Err(session.fail(&url, resp, 1).await);
        }
        let body = session::read_body(resp, &url, MAX_PAGE_BYTES).await?;
        let page: Value = serde_json::from_str(&body)
            .map_err(|_| ClientError::Protocol(format!("the manifest page {url} is not JSON")))?;
        walk.push(page).map_err(paging)?;
    }
    let pages = walk.pages();
    Ok((walk.finish(), pages))
}

/// Kick-off (or `--status-url`), poll, download, verify.
async fn export(
    args: &ExportArgs,
    session: Arc<Session>,
    status_slot: Arc<std::sync::Mutex<Option<String>>>,
) -> Result<Summary, ClientError> {
    if args.parallel == 0 {
        return Err(ClientError::Usage(
            "--parallel must be at least 1".to_owned(),
        ));
    }
    std::fs::create_dir_all(&args.out).map_err(|e| ClientError::io(&args.out, e))?;
    let bar = if args.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        let b = indicatif::ProgressBar::new_spinner();
        b.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        b.enable_steady_tick(Duration::from_millis(200));
        b
    };
    let started = Instant::now();
    let status_url = match &args.status_url {
        Some(u) => u.clone(),
        None => {
            bar.set_message("kick-off");
            kickoff(args, &session).await?
        }
    };
    if let Ok(mut s) = status_slot.lock() {
        *s = Some(status_url.clone());
    }
    tracing::info!(status_url, "export started");
    bar.set_message("exporting");
    let mut early = args
        .partial_manifests
        .then(|| download::Early::new(session.clone(), &args.out, args.parallel, bar.clone()));
    let first = poll(args, &session, &status_url, &bar, early.as_mut()).await?;
    let (manifest, pages) = all_pages(args, &session, &status_url, first).await?;
    let export_seconds = started.elapsed().as_secs_f64();
    let files = download::plan(&manifest, &args.out)?;
    if let Some(early) = early.as_mut() {
        // A file fetched while the export ran that its manifest does not list: refused before
        // the manifest is written.
        early.check(&files).await?;
    }
    write_atomically(
        &args.out.join("manifest.json"),
        &serde_json::to_vec_pretty(&manifest).unwrap_or_default(),
    )?;
    let requires_token = manifest
        .get("requiresAccessToken")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    // One scheduler for every download: the files started while the export ran are awaited,
    // the others (all of them without --partial-manifests) downloaded now.
    let downloads = early.unwrap_or_else(|| {
        download::Early::new(session.clone(), &args.out, args.parallel, bar.clone())
    });
    let dl_started = downloads.started.unwrap_or_else(Instant::now);
    let outcome = downloads.finish(&files, requires_token).await?;
    let download_seconds = dl_started.elapsed().as_secs_f64();
    let verified = if args.verify {
        let dangling = match args.dangling.as_deref() {
            Some("warn") => manifest::Dangling::Warn,
            Some(_) => manifest::Dangling::Fail,
            None if args.since.is_some() || !args.type_filters.is_empty() => {
                manifest::Dangling::Warn
            }
            None => manifest::Dangling::Fail,
        };
        let started = Instant::now();
        let mut v = verify::all(&manifest, &args.out, &files, dangling).await?;
        v.seconds = started.elapsed().as_secs_f64();
        Some(v)
    } else {
        None
    };
    let resources = files
        .iter()
        .filter(|f| f.kind == download::Kind::Output)
        .map(|f| f.count)
        .sum::<Option<u64>>();
    Ok(Summary {
        status_url,
        files: files.len(),
        pages,
        bytes: outcome.bytes,
        resources,
        resumed: outcome.resumed,
        early: outcome.early,
        tokens: session.tokens.load(std::sync::atomic::Ordering::Relaxed),
        export_seconds,
        download_seconds,
        verified,
    })
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), ClientError> {
    let tmp = path.with_extension("json.part");
    std::fs::write(&tmp, bytes).map_err(|e| ClientError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| ClientError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ExportArgs,
    }

    fn args(a: &[&str]) -> ExportArgs {
        Cli::try_parse_from(std::iter::once("x").chain(a.iter().copied()))
            .unwrap()
            .args
    }

    #[test]
    fn kickoff_urls_and_parameters() {
        let a = args(&["http://h/fhir/", "--out", "d"]);
        assert_eq!(a.kickoff_url(), "http://h/fhir/$export");
        assert_eq!(base_of(&a.url), "http://h/fhir");
        let a = args(&[
            "http://h/fhir",
            "--out",
            "d",
            "--group",
            "g1",
            "--type",
            "Patient,Observation",
            "--type",
            "Encounter",
            "--since",
            "2020-01-01T00:00:00Z",
            "--type-filter",
            "Observation?status=final",
            "--param",
            "organizeOutputBy=Patient",
        ]);
        assert_eq!(a.kickoff_url(), "http://h/fhir/Group/g1/$export");
        let p = a.parameters();
        assert!(p.contains(&("_type".into(), "Patient,Observation,Encounter".into())));
        assert!(p.contains(&("_typeFilter".into(), "Observation?status=final".into())));
        assert!(p.contains(&("organizeOutputBy".into(), "Patient".into())));
        assert_eq!(
            base_of("http://h/fhir/Group/g1/$export?_type=A"),
            "http://h/fhir"
        );
        assert_eq!(base_of("http://h/fhir/Patient/$export"), "http://h/fhir");
        let body = parameters_body(&[
            ("patient".into(), "Patient/1".into()),
            ("_since".into(), "2020".into()),
        ]);
        assert_eq!(
            body["parameter"][0]["valueReference"]["reference"],
            "Patient/1"
        );
        assert_eq!(body["parameter"][1]["valueInstant"], "2020");
    }
}
