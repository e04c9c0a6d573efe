//! Bulk Data export manifests as Fhirhose writes them, and their verification.
//!
//! Each entry of `output`, `error` and `deleted` carries `count` (resources, i.e. lines) and
//! `fileSize` (bytes as stored; the Bulk Data STU4 names) and, in its `extension` object, the
//! `sha256` (lowercase hex) of the stored bytes and, for a gzip-compressed file (`.ndjson.gz`),
//! `"compression": "gzip"`. The digest is computed while the file is written ([`DigestWriter`]),
//! never by reading it back.
//!
//! [`verify`] checks an export against its manifest: every file read once, streamed, one per
//! core at a time (sizes, SHA-256, line counts, every line a JSON resource of the entry's type),
//! and whether the references of the output resolve to resources of the export, in memory of
//! about 30 bytes per resource up to a budget of about 64 MiB, beyond it in sorted runs written
//! to a temporary directory and merged at the end (the few lines that name a dangling reference
//! are read again to list them). Files come from a [`Source`]: [`HttpSource`] (the manifest's URLs, with an
//! optional bearer token for one origin) or [`DirSource`] (a folder holding the files under the names their
//! URLs end with, or under the export client's names). `fhirhose verify` and the export
//! client's `--verify` are this function.
//!
//! A paged manifest (Bulk Data `allowPartialManifests`: each page's `link` `next`) is read
//! whole with [`PageWalk`] (bounded, a page never read twice) and verified as one.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

use serde_json::Value;
use sha2::Digest as _;

mod limits;
mod refs;

pub use limits::{MAX_LINE_BYTES, MAX_MANIFEST_BYTES};

/// Lowercase hex of a digest.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Standard base64 of a digest (some servers write `sha256` so).
fn base64_of(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A writer that passes bytes through to `inner` while counting them and computing their
/// SHA-256: the digest of exactly what was stored, at no extra read.
pub struct DigestWriter<W> {
    inner: W,
    hasher: sha2::Sha256,
    bytes: u64,
}

impl<W> DigestWriter<W> {
    pub fn new(inner: W) -> DigestWriter<W> {
        DigestWriter {
            inner,
            hasher: sha2::Sha256::new(),
            bytes: 0,
        }
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    /// The inner writer, the byte count and the lowercase hex SHA-256 of what was written.
    pub fn into_parts(self) -> (W, u64, String) {
        (self.inner, self.bytes, hex(&self.hasher.finalize()))
    }
}

impl<W: Write> Write for DigestWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// A reader that counts and hashes what passes through it.
struct DigestReader<R> {
    inner: R,
    hasher: sha2::Sha256,
    bytes: u64,
}

impl<R: Read> Read for DigestReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// The `extension` object of a manifest entry: its digest, and its compression when gzip.
pub fn entry_extension(sha256: &str, gzip: bool) -> Value {
    let mut e = serde_json::Map::new();
    e.insert("sha256".into(), Value::String(sha256.to_string()));
    if gzip {
        e.insert("compression".into(), Value::String("gzip".into()));
    }
    Value::Object(e)
}

/// Why a file or manifest could not be read at all.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{what}: {message}")]
    Read { what: String, message: String },
    /// A body past its bound ([`MAX_MANIFEST_BYTES`]): read no further.
    #[error("{what}: more than {limit} bytes; refused")]
    TooLarge { what: String, limit: u64 },
    #[error("HTTP {status} for {url}")]
    Status { url: String, status: u16 },
    #[error("the manifest is not a Bulk Data manifest: {0}")]
    NotAManifest(String),
    /// A page's `next` link names a page already read: following it would never end.
    #[error(
        "manifest page {page} links to {url} as `next`, a page already read: the pages loop; refused"
    )]
    PageLoop { page: usize, url: String },
    /// More pages than the bound.
    #[error(
        "the manifest has more than {max} pages; refused (raise --max-pages if the export really has more work items)"
    )]
    TooManyPages { max: usize },
    /// A page that does not belong to the manifest (a bad `next` URL, a page of another export).
    #[error("manifest page {page}: {message}")]
    BadPage { page: usize, message: String },
    /// The reference check could not write or read its temporary files (a full disk).
    #[error(
        "the reference check's temporary files in {dir}: {message} (a full disk? TMPDIR sets where they go)"
    )]
    Spill { dir: String, message: String },
}

/// Where the files of a manifest are read from: shared by the threads [`verify`] reads with,
/// each opening files of its own.
pub trait Source: Sync {
    /// The bytes of the file an entry's `url` names, as stored.
    fn open(&self, url: &str) -> Result<Box<dyn Read + '_>, VerifyError>;
}

/// The files over HTTP, at their manifest URLs. Files are read as stored (a `.ndjson.gz` is not
/// decoded by the transport).
///
/// The bearer token, when given, goes to one origin only (scheme, host and port:
/// [`HttpSource::send_token_to`]; none until it is named): the manifest's pages and files are
/// URLs a server chose, and a hostile one would otherwise collect the token by naming its own
/// host. Files get it only when the manifest says `requiresAccessToken`
/// ([`HttpSource::files_need_token`]). The scheme is part of the origin, so an `https` origin's
/// token never goes over `http`; and a redirect from `https` to `http` is refused.
pub struct HttpSource {
    client: reqwest::blocking::Client,
    token: Option<String>,
    /// The origin the token is sent to.
    token_origin: Option<reqwest::Url>,
    files_need_token: bool,
}

/// Seconds without a byte from a server before `verify` gives a request up (as `fhirhose export
/// --timeout`).
pub const DEFAULT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// How `verify` and the export client follow redirects: at most 10, and never from https to
/// http (reqwest itself drops the Authorization header on a redirect to another host or port;
/// a downgrade on the same one would send the token in clear).
pub fn redirect_policy() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        let downgrade = attempt.url().scheme() == "http"
            && attempt.previous().iter().any(|u| u.scheme() == "https");
        if downgrade {
            attempt.error("a redirect from https to http (refused)")
        } else if attempt.previous().len() >= 10 {
            attempt.error("more than 10 redirects")
        } else {
            attempt.follow()
        }
    })
}

impl HttpSource {
    /// A source with the token for no origin yet and [`DEFAULT_TIMEOUT`].
    pub fn new(token: Option<String>) -> Result<HttpSource, VerifyError> {
        HttpSource::with_timeout(token, DEFAULT_TIMEOUT)
    }

    /// `timeout`: the longest wait for a connection, for an answer and for each read of a
    /// body (a server that stops sending would otherwise hold `verify` forever).
    pub fn with_timeout(
        token: Option<String>,
        timeout: std::time::Duration,
    ) -> Result<HttpSource, VerifyError> {
        let client = reqwest::blocking::Client::builder()
            .connect_timeout(timeout.min(std::time::Duration::from_secs(30)))
            // Blocking reqwest: the wait for the answer's head and for each read of its body.
            .timeout(timeout)
            .redirect(redirect_policy())
            .build()
            .map_err(|e| VerifyError::Read {
                what: "HTTP client".into(),
                message: e.to_string(),
            })?;
        Ok(HttpSource {
            client,
            token,
            token_origin: None,
            files_need_token: false,
        })
    }

    /// Sends the token to the origin (scheme, host, port) of `url`, and to no other.
    pub fn send_token_to(mut self, url: &str) -> Result<HttpSource, VerifyError> {
        let u = reqwest::Url::parse(url).map_err(|e| VerifyError::Read {
            what: url.to_string(),
            message: format!("not a URL: {e}"),
        })?;
        if !matches!(u.scheme(), "http" | "https") {
            return Err(VerifyError::Read {
                what: url.to_string(),
                message: "not an http(s) URL".into(),
            });
        }
        self.token_origin = Some(u);
        Ok(self)
    }

    /// Whether the files get the token (the manifest's `requiresAccessToken`), on the token's
    /// origin only.
    pub fn files_need_token(&mut self, yes: bool) {
        self.files_need_token = yes;
    }

    /// The token for a request to `url`, if it may have it.
    fn token_for(&self, url: &str, file: bool) -> Option<&str> {
        let token = self.token.as_deref()?;
        let origin = self.token_origin.as_ref()?;
        if file && !self.files_need_token {
            return None;
        }
        let u = reqwest::Url::parse(url).ok()?;
        (u.origin() == origin.origin()).then_some(token)
    }

    fn get(
        &self,
        url: &str,
        accept: &str,
        file: bool,
    ) -> Result<reqwest::blocking::Response, VerifyError> {
        let mut req = self.client.get(url).header("accept", accept);
        if let Some(t) = self.token_for(url, file) {
            req = req.bearer_auth(t);
        }
        let resp = req.send().map_err(|e| VerifyError::Read {
            what: url.to_string(),
            message: transport_reason(&e, || e.to_string()),
        })?;
        if !resp.status().is_success() {
            return Err(VerifyError::Status {
                url: url.to_string(),
                status: resp.status().as_u16(),
            });
        }
        Ok(resp)
    }

    /// The manifest at a status URL (which must answer 200 with the manifest: the export is
    /// complete; with `Prefer: separate-export-status` the `X-Export-Status` header must say
    /// `200` too), at most [`MAX_MANIFEST_BYTES`]. A paged manifest's first page only: see
    /// [`HttpSource::manifest_pages`].
    pub fn manifest(&self, url: &str) -> Result<Value, VerifyError> {
        let resp = self.get(url, "application/json", false)?;
        if let Some(s) = resp
            .headers()
            .get("x-export-status")
            .and_then(|v| v.to_str().ok())
            && !s.trim_start().starts_with("200")
        {
            return Err(VerifyError::Read {
                what: url.to_string(),
                message: format!("the export is not complete (X-Export-Status: {s})"),
            });
        }
        let body = limits::read_at_most(resp, MAX_MANIFEST_BYTES)
            .map_err(|e| VerifyError::Read {
                what: url.to_string(),
                message: e.to_string(),
            })?
            .ok_or_else(|| VerifyError::TooLarge {
                what: url.to_string(),
                limit: MAX_MANIFEST_BYTES,
            })?;
        let text = String::from_utf8(body)
            .map_err(|_| VerifyError::NotAManifest("not UTF-8 text".into()))?;
        parse_manifest(&text)
    }

    /// The whole manifest at a status URL: its first page and every page its `link` `next`
    /// leads to, merged ([`PageWalk`]; at most `max_pages`, no page read twice).
    pub fn manifest_pages(&self, url: &str, max_pages: usize) -> Result<PageWalk, VerifyError> {
        let first = self.manifest(url)?;
        self.follow(PageWalk::new(first, Some(url), max_pages)?)
    }

    /// Reads the pages after those `walk` has read.
    pub fn follow(&self, mut walk: PageWalk) -> Result<PageWalk, VerifyError> {
        while let Some(next) = walk.next_url()? {
            let page = self.manifest(&next)?;
            walk.push(page)?;
        }
        Ok(walk)
    }
}

/// Why a request failed, in words: a timeout or a refused connection says so, `other` words
/// the rest, and the innermost cause is named (reqwest's own message is "error sending
/// request" whatever happened). `fhirhose verify` and the export client both word theirs so.
pub fn transport_reason(e: &reqwest::Error, other: impl FnOnce() -> String) -> String {
    use std::error::Error as _;
    let mut reason = if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_connect() {
        "cannot connect".to_owned()
    } else {
        other()
    };
    let mut source = e.source();
    while let Some(s) = source {
        if s.source().is_none() {
            reason.push_str(&format!(" ({s})"));
        }
        source = s.source();
    }
    reason
}

impl Source for HttpSource {
    fn open(&self, url: &str) -> Result<Box<dyn Read + '_>, VerifyError> {
        Ok(Box::new(self.get(
            url,
            "application/fhir+ndjson, */*",
            true,
        )?))
    }
}

/// The names `fhirhose export --out DIR` saves a manifest's files under, relative to DIR:
/// `output` entries as `<Type>.<n>.ndjson`, `error` and `deleted` ones under `error/` and
/// `deleted/`, `n` counting from 1 per type and section in manifest order, `.ndjson.gz` for a
/// gzip-compressed file. The type is reduced to letters and digits (at most 64), whatever the
/// server says, so a name never leaves DIR.
#[derive(Default)]
pub struct DownloadLayout {
    seen: HashMap<(String, &'static str), u32>,
}

impl DownloadLayout {
    /// The next entry of `section` (`output`, `error` or `deleted`): its type as a file name
    /// part and its path relative to DIR.
    pub fn next(&mut self, section: &'static str, entry: &Value) -> (String, PathBuf) {
        let rtype: String = entry
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("")
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(64)
            .collect();
        let rtype = if rtype.is_empty() {
            "file".to_owned()
        } else {
            rtype
        };
        let n = self.seen.entry((rtype.clone(), section)).or_default();
        *n += 1;
        let suffix = if is_gzip(entry) {
            "ndjson.gz"
        } else {
            "ndjson"
        };
        let name = format!("{rtype}.{n}.{suffix}");
        let path = match section {
            "output" => PathBuf::from(name),
            other => Path::new(other).join(name),
        };
        (rtype, path)
    }
}

/// The files in a folder: by the last path segment of their URLs (a copy of a Fhirhose export
/// folder), or else where `fhirhose export --out` saved them ([`DownloadLayout`]).
pub struct DirSource {
    dir: PathBuf,
    /// URL to the path `fhirhose export` saves it under.
    downloaded: HashMap<String, PathBuf>,
    /// Only the download names ([`DirSource::downloaded`]).
    only_downloaded: bool,
}

impl DirSource {
    /// The folder `dir` holding the files of `manifest`.
    pub fn new(dir: impl Into<PathBuf>, manifest: &Value) -> DirSource {
        let dir = dir.into();
        let mut layout = DownloadLayout::default();
        let mut downloaded = HashMap::new();
        for section in ["output", "error", "deleted"] {
            for e in entries(manifest, section) {
                let (_, path) = layout.next(section, e);
                if let Some(url) = e.get("url").and_then(Value::as_str) {
                    downloaded.entry(url.to_string()).or_insert(dir.join(path));
                }
            }
        }
        DirSource {
            dir,
            downloaded,
            only_downloaded: false,
        }
    }

    /// The folder `fhirhose export --out DIR` filled: every file at its [`DownloadLayout`]
    /// name, never by its URL's last segment (which may name another file of the folder).
    pub fn downloaded(dir: impl Into<PathBuf>, manifest: &Value) -> DirSource {
        DirSource {
            only_downloaded: true,
            ..DirSource::new(dir, manifest)
        }
    }

    /// Where the file of `url` is read from: by its URL's last segment when that file exists,
    /// else at its download name when that one does ([`DirSource::downloaded`]: the download
    /// name).
    pub fn path_of(&self, url: &str) -> PathBuf {
        if self.only_downloaded
            && let Some(d) = self.downloaded.get(url)
        {
            return d.clone();
        }
        let name = url
            .split(['?', '#'])
            .next()
            .unwrap_or(url)
            .rsplit('/')
            .next()
            .unwrap_or(url);
        let by_name = self.dir.join(name);
        match self.downloaded.get(url) {
            Some(d) if !by_name.is_file() && d.is_file() => d.clone(),
            _ => by_name,
        }
    }
}

impl Source for DirSource {
    fn open(&self, url: &str) -> Result<Box<dyn Read + '_>, VerifyError> {
        let path = self.path_of(url);
        Ok(Box::new(open_regular(&self.dir, &path)?))
    }
}

/// Opens `path` if it is a regular file in `dir`: a symbolic link is followed only to a regular
/// file inside `dir` (a manifest names files, not whatever a link in the folder points to), and
/// a FIFO, socket or device is reported, never opened (opening a FIFO waits for a writer).
fn open_regular(dir: &Path, path: &Path) -> Result<std::fs::File, VerifyError> {
    let fail = |message: String| VerifyError::Read {
        what: path.display().to_string(),
        message,
    };
    let meta = std::fs::symlink_metadata(path).map_err(|e| fail(e.to_string()))?;
    if meta.file_type().is_symlink() {
        let target = std::fs::canonicalize(path).map_err(|e| fail(e.to_string()))?;
        let root = std::fs::canonicalize(dir).map_err(|e| fail(e.to_string()))?;
        if !target.starts_with(&root) {
            return Err(fail(format!(
                "a symbolic link to {}, outside the folder; not read",
                target.display()
            )));
        }
    }
    let meta = std::fs::metadata(path).map_err(|e| fail(e.to_string()))?;
    if !meta.is_file() {
        return Err(fail(
            "not a regular file (a FIFO, socket, device or folder); not read".into(),
        ));
    }
    let f = std::fs::File::open(path).map_err(|e| fail(e.to_string()))?;
    // The file checked may have been replaced meanwhile: what was opened is checked too.
    match f.metadata() {
        Ok(m) if m.is_file() => Ok(f),
        Ok(_) => Err(fail("not a regular file; not read".into())),
        Err(e) => Err(fail(e.to_string())),
    }
}

/// Pages a manifest may have by default: a page is one work item of the export (Bulk Data
/// `allowPartialManifests`), so real exports have far fewer; the bound stops a server that links
/// page after page forever.
pub const MAX_PAGES: usize = 10_000;

/// The `url` of a manifest page's `link` entry with relation `next` (Bulk Data
/// `allowPartialManifests`), if any.
pub fn next_link(page: &Value) -> Option<&str> {
    page.get("link")?
        .as_array()?
        .iter()
        .find(|l| l.get("relation").and_then(Value::as_str) == Some("next"))?
        .get("url")?
        .as_str()
}

/// The check of a paged manifest's `link` `next` URLs, page after page, on its own (no page
/// merged): each `next` resolved against the page it is on, an http(s) URL, never a page
/// already read (the first page's URL included), and at most `max_pages` pages in all.
/// [`PageWalk`] checks its links with it, and so does the export client while it follows the
/// pages of a running export (`--partial-manifests`), which are read but not merged.
#[derive(Debug, Clone)]
pub struct PageLinks {
    seen: HashSet<String>,
    /// The URL of the page read last (relative `next` URLs resolve against it).
    current: Option<reqwest::Url>,
    pages: usize,
    max_pages: usize,
}

impl PageLinks {
    /// The links from the first page, read from `url` (`None`: a file, whose `next` links must
    /// then be absolute).
    pub fn new(url: Option<&str>, max_pages: usize) -> Result<PageLinks, VerifyError> {
        let mut links = PageLinks {
            seen: HashSet::new(),
            current: None,
            pages: 1,
            max_pages: max_pages.max(1),
        };
        if let Some(u) = url {
            let u = reqwest::Url::parse(u).map_err(|e| VerifyError::BadPage {
                page: 1,
                message: format!("{u} is not a URL: {e}"),
            })?;
            links.seen.insert(u.to_string());
            links.current = Some(u);
        }
        Ok(links)
    }

    /// The absolute URL of the page the current page's `next` link names, checked; it is then
    /// the current page (counted as read). Refused: a `next` that is not a URL or not http(s)
    /// ([`VerifyError::BadPage`]), a page already read ([`VerifyError::PageLoop`]), a page
    /// beyond `max_pages` ([`VerifyError::TooManyPages`]).
    pub fn follow(&mut self, next: &str) -> Result<String, VerifyError> {
        let url = match &self.current {
            Some(base) => base.join(next),
            None => reqwest::Url::parse(next),
        }
        .map_err(|e| VerifyError::BadPage {
            page: self.pages,
            message: format!("its `next` link {next} is not a URL: {e}"),
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(VerifyError::BadPage {
                page: self.pages,
                message: format!("its `next` link {url} is not an http(s) URL"),
            });
        }
        if !self.seen.insert(url.to_string()) {
            return Err(VerifyError::PageLoop {
                page: self.pages,
                url: url.to_string(),
            });
        }
        if self.pages >= self.max_pages {
            return Err(VerifyError::TooManyPages {
                max: self.max_pages,
            });
        }
        self.pages += 1;
        self.current = Some(url.clone());
        Ok(url.to_string())
    }

    /// Pages so far: the first and every one a `next` link led to.
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// The URL of the current page (`None`: the first page, from a file).
    pub fn current(&self) -> Option<&str> {
        self.current.as_ref().map(reqwest::Url::as_str)
    }
}

/// Following a paged manifest's `link` `next` from its first page to its last, whatever
/// fetches the pages ([`HttpSource::manifest`] here, the export client's session there): the
/// pages' `output`, `error` and `deleted` entries are merged, in page order, into one manifest
/// (the first page's other fields, no `link`). The links are checked by [`PageLinks`]: a `next`
/// URL already read (the status URL of the first page included) is refused as a loop, and so
/// is a page beyond `max_pages`, before anything is fetched; a page with another
/// `transactionTime` than the first is refused.
pub struct PageWalk {
    merged: Value,
    /// Pages read (and merged) so far.
    pages: usize,
    links: PageLinks,
    next: Option<String>,
}

impl PageWalk {
    /// The walk from the first page, read from `url` (`None`: a file).
    pub fn new(first: Value, url: Option<&str>, max_pages: usize) -> Result<PageWalk, VerifyError> {
        if !first.get("output").is_some_and(Value::is_array) {
            return Err(VerifyError::NotAManifest("no `output` array".into()));
        }
        let mut walk = PageWalk {
            next: next_link(&first).map(str::to_string),
            merged: first,
            pages: 1,
            links: PageLinks::new(url, max_pages)?,
        };
        if let Some(obj) = walk.merged.as_object_mut() {
            obj.remove("link");
        }
        Ok(walk)
    }

    /// The URL of the next page to read, checked ([`PageLinks::follow`]): `None` when the last
    /// page was read.
    pub fn next_url(&mut self) -> Result<Option<String>, VerifyError> {
        let Some(next) = self.next.take() else {
            return Ok(None);
        };
        self.links.follow(&next).map(Some)
    }

    /// Adds the page read from the URL [`PageWalk::next_url`] gave.
    pub fn push(&mut self, page: Value) -> Result<(), VerifyError> {
        self.pages += 1;
        let n = self.pages;
        if !page.get("output").is_some_and(Value::is_array) {
            return Err(VerifyError::BadPage {
                page: n,
                message: "no `output` array".into(),
            });
        }
        let time = |m: &Value| m.get("transactionTime").cloned();
        if let (Some(first), Some(this)) = (time(&self.merged), time(&page))
            && first != this
        {
            return Err(VerifyError::BadPage {
                page: n,
                message: format!(
                    "transactionTime {this} differs from the first page's {first}: not the same export"
                ),
            });
        }
        self.next = next_link(&page).map(str::to_string);
        for section in ["output", "error", "deleted"] {
            let Some(more) = page.get(section).and_then(Value::as_array) else {
                continue;
            };
            if more.is_empty() {
                continue;
            }
            if let Some(obj) = self.merged.as_object_mut() {
                let list = obj
                    .entry(section)
                    .or_insert_with(|| Value::Array(Vec::new()));
                if let Some(list) = list.as_array_mut() {
                    list.extend(more.iter().cloned());
                }
            }
        }
        Ok(())
    }

    /// Whether the last page read links to a next one.
    pub fn has_next(&self) -> bool {
        self.next.is_some()
    }

    /// Pages read so far.
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// The merged manifest.
    pub fn finish(self) -> Value {
        self.merged
    }
}

/// Parses a manifest text and checks its shape.
pub fn parse_manifest(text: &str) -> Result<Value, VerifyError> {
    let v: Value =
        serde_json::from_str(text).map_err(|e| VerifyError::NotAManifest(e.to_string()))?;
    if !v.get("output").is_some_and(Value::is_array) {
        return Err(VerifyError::NotAManifest("no `output` array".into()));
    }
    Ok(v)
}

/// Reads a manifest file.
pub fn read_manifest_file(path: &Path) -> Result<Value, VerifyError> {
    let text = std::fs::read_to_string(path).map_err(|e| VerifyError::Read {
        what: path.display().to_string(),
        message: e.to_string(),
    })?;
    parse_manifest(&text)
}

/// How unresolved references count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dangling {
    /// A reference to a type the export has files of, to an id it does not hold, is a failure
    /// (the default: a full or de-identified export must be closed).
    #[default]
    Fail,
    /// Reported, not a failure (a `_since` delta points into its baseline).
    Warn,
}

/// Options of [`verify`].
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub dangling: Dangling,
}

/// The outcome for one manifest entry.
#[derive(Debug, Clone)]
pub struct FileReport {
    /// `output`, `error` or `deleted`.
    pub section: String,
    pub resource_type: String,
    pub url: String,
    /// Lines (resources) read.
    pub lines: u64,
    /// Bytes as stored.
    pub bytes: u64,
    pub sha256: String,
    /// What the manifest lacks (not failures: a manifest of another server may lack digests).
    pub unchecked: Vec<&'static str>,
    /// Mismatches and unreadable lines; empty when the file is good.
    pub problems: Vec<String>,
}

/// A reference that resolves to no resource of the export.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DanglingRef {
    /// The referencing resource, `Type/id`.
    pub from: String,
    pub reference: String,
}

/// What [`verify`] found.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub files: Vec<FileReport>,
    /// Problems with the manifest itself.
    pub manifest_problems: Vec<String>,
    /// References checked (relative `Type/id` references in output resources).
    pub references: u64,
    /// Unresolved references to types the export has files of: the first [`MAX_LISTED`]
    /// missing targets, each with the first resource that refers to it.
    pub dangling: Vec<DanglingRef>,
    /// Unresolved references in all (each reference counts).
    pub dangling_total: u64,
    /// References to types the export has no file of, by type (not checked).
    pub outside: BTreeMap<String, u64>,
    pub dangling_fails: bool,
    /// Why the reference check could not be done to the end ([`VerifyError::Spill`]); its
    /// counts are then incomplete. A failure.
    pub reference_error: Option<String>,
}

/// How many problems of one kind are listed.
pub const MAX_LISTED: usize = 20;

impl Report {
    /// Whether every check passed.
    pub fn ok(&self) -> bool {
        self.manifest_problems.is_empty()
            && self.files.iter().all(|f| f.problems.is_empty())
            && !(self.dangling_fails && self.dangling_total > 0)
            && self.reference_error.is_none()
    }

    /// Resources in `output` files.
    pub fn resources(&self) -> u64 {
        self.files
            .iter()
            .filter(|f| f.section == "output")
            .map(|f| f.lines)
            .sum()
    }

    /// The number of failed checks.
    pub fn problem_count(&self) -> usize {
        self.manifest_problems.len()
            + self.files.iter().map(|f| f.problems.len()).sum::<usize>()
            + usize::from(self.dangling_fails && self.dangling_total > 0)
            + usize::from(self.reference_error.is_some())
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bytes: u64 = self.files.iter().map(|f| f.bytes).sum();
        writeln!(
            f,
            "{} files, {} resources in output, {} bytes",
            self.files.len(),
            self.resources(),
            bytes
        )?;
        for p in &self.manifest_problems {
            writeln!(f, "  FAIL  manifest: {p}")?;
        }
        for file in &self.files {
            let name = file.url.rsplit('/').next().unwrap_or(&file.url);
            if file.problems.is_empty() {
                write!(
                    f,
                    "  ok    {:<8} {:<28} {:>9} lines {:>12} bytes  sha256 {}",
                    file.section,
                    name,
                    file.lines,
                    file.bytes,
                    &file.sha256[..12.min(file.sha256.len())]
                )?;
                if !file.unchecked.is_empty() {
                    write!(f, "  (manifest has no {})", file.unchecked.join(", "))?;
                }
                writeln!(f)?;
            } else {
                writeln!(f, "  FAIL  {:<8} {name}", file.section)?;
                for p in &file.problems {
                    writeln!(f, "          {p}")?;
                }
            }
        }
        writeln!(
            f,
            "references: {} checked, {} dangling",
            self.references, self.dangling_total
        )?;
        if let Some(e) = &self.reference_error {
            writeln!(f, "  FAIL  references not checked to the end: {e}")?;
        }
        for d in &self.dangling {
            writeln!(f, "  dangling: {} -> {}", d.from, d.reference)?;
        }
        if self.dangling_total > self.dangling.len() as u64 {
            writeln!(
                f,
                "  … {} more",
                self.dangling_total - self.dangling.len() as u64
            )?;
        }
        if !self.outside.is_empty() {
            let types: Vec<String> = self
                .outside
                .iter()
                .map(|(t, n)| format!("{t} ({n})"))
                .collect();
            writeln!(
                f,
                "references to types not in the export (not checked): {}",
                types.join(", ")
            )?;
        }
        if self.ok() {
            writeln!(f, "result: OK")
        } else {
            writeln!(f, "result: FAILED ({} problems)", self.problem_count())
        }
    }
}

/// The entries of a manifest section.
fn entries<'m>(manifest: &'m Value, section: &str) -> &'m [Value] {
    manifest
        .get(section)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

/// Whether an entry is a gzip-compressed file.
pub fn is_gzip(entry: &Value) -> bool {
    entry
        .pointer("/extension/compression")
        .and_then(Value::as_str)
        == Some("gzip")
        || entry
            .get("url")
            .and_then(Value::as_str)
            .and_then(|u| u.split(['?', '#']).next())
            .is_some_and(|u| u.ends_with(".gz"))
}

/// A relative literal reference `Type/id` (or `Type/id/_history/v`), as `Type/id`.
fn relative_reference(r: &str) -> Option<(&str, &str)> {
    let mut parts = r.split('/');
    let t = parts.next()?;
    let id = parts.next()?;
    match (parts.next(), parts.next(), parts.next()) {
        (None, _, _) | (Some("_history"), Some(_), None) => {}
        _ => return None,
    }
    let type_ok = t.chars().next().is_some_and(|c| c.is_ascii_uppercase())
        && t.chars().all(|c| c.is_ascii_alphanumeric());
    let id_ok = !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    (type_ok && id_ok).then_some((t, id))
}

/// Every `reference` string in a resource.
fn references<'v>(v: &'v Value, out: &mut Vec<&'v str>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("reference", Value::String(s)) => out.push(s),
                    _ => references(x, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| references(x, out)),
        _ => {}
    }
}

/// Checks the files of `manifest` read from `source`; see the crate documentation. The files
/// are read one per core at a time; the report lists them in manifest order.
pub fn verify(manifest: &Value, source: &dyn Source, options: &Options) -> Report {
    let mut report = Report {
        dangling_fails: options.dangling == Dangling::Fail,
        ..Report::default()
    };
    let mut types: HashSet<String> = HashSet::new();
    // The files to read, in manifest order (the reference check may read a few lines again).
    let mut planned: Vec<Planned> = Vec::new();
    let mut seen_urls = HashSet::new();
    // `organizeOutputBy` (Bulk Data STU3): output files hold blocks of several types and their
    // entries carry no `type`; each line's own type counts.
    let organized = manifest.get("outputOrganizedBy").is_some();
    for section in ["output", "deleted", "error"] {
        for entry in entries(manifest, section) {
            let url = entry.get("url").and_then(Value::as_str).unwrap_or("");
            let resource_type = match (entry.get("type").and_then(Value::as_str), section) {
                (None, "output") if organized => ANY_TYPE,
                // What these files hold whatever the server says (Bulk Data): an entry without
                // a `type` is not refused for it.
                (None, "error") => "OperationOutcome",
                (None, "deleted") => "Bundle",
                (t, _) => t.unwrap_or(""),
            };
            if url.is_empty() || resource_type.is_empty() {
                report
                    .manifest_problems
                    .push(format!("a `{section}` entry has no `url` or no `type`"));
                continue;
            }
            if !seen_urls.insert(url) {
                report
                    .manifest_problems
                    .push(format!("{url} is listed twice"));
                continue;
            }
            if section == "output" && resource_type != ANY_TYPE {
                types.insert(resource_type.to_string());
            }
            planned.push(Planned {
                section,
                entry,
                url,
                resource_type,
            });
        }
    }
    // FHIRHOSE_VERIFY_BUDGET: the hashes the reference check holds in memory before it writes
    // them to temporary files (for measuring; the default is refs::DEFAULT_BUDGET).
    let check = match std::env::var("FHIRHOSE_VERIFY_BUDGET")
        .ok()
        .and_then(|b| b.trim().parse().ok())
    {
        Some(budget) => refs::RefCheck::with_budget(budget),
        None => refs::RefCheck::new(),
    };
    report.files = read_all(&planned, source, &check);
    if organized {
        types.extend(check.line_types());
    }
    let read: Vec<refs::FileRef> = planned
        .iter()
        .map(|p| refs::FileRef {
            url: p.url.to_string(),
            gzip: is_gzip(p.entry),
        })
        .collect();
    let outcome = check.finish(&types, &read, source);
    report.references = outcome.references;
    report.dangling = outcome.dangling;
    report.dangling_total = outcome.dangling_total;
    report.outside = outcome.outside;
    report.reference_error = outcome.error.map(|e| e.to_string());
    report
}

/// The `type` of an output entry of an `organizeOutputBy` manifest: any resource type.
const ANY_TYPE: &str = "*";

/// A manifest entry to read.
#[derive(Clone, Copy)]
struct Planned<'m> {
    section: &'static str,
    entry: &'m Value,
    url: &'m str,
    resource_type: &'m str,
}

/// Reads the `planned` files, one per core at a time on scoped threads, each streamed through
/// its own buffered reader (never a whole file in memory, so the peak does not grow with the
/// files' number or size: each reader holds its buffer, the line it parses and that line's
/// JSON); the output files feed `check`. The reports in the order of `planned`.
fn read_all(planned: &[Planned], source: &dyn Source, check: &refs::RefCheck) -> Vec<FileReport> {
    let at_once = std::thread::available_parallelism()
        .map_or(2, std::num::NonZero::get)
        .min(planned.len());
    let next = AtomicUsize::new(0);
    let done: Mutex<Vec<Option<FileReport>>> = Mutex::new(vec![None; planned.len()]);
    let work = || {
        loop {
            let n = next.fetch_add(1, Ordering::Relaxed);
            let Some(p) = planned.get(n) else {
                break;
            };
            let file_no = u32::try_from(n).unwrap_or(u32::MAX);
            let report = check_file(
                p,
                source,
                (p.section == "output").then_some((check, file_no)),
            );
            done.lock().unwrap_or_else(PoisonError::into_inner)[n] = Some(report);
        }
    };
    std::thread::scope(|s| {
        for _ in 1..at_once {
            s.spawn(work);
        }
        work();
    });
    done.into_inner()
        .unwrap_or_else(PoisonError::into_inner)
        .into_iter()
        .flatten()
        .collect()
}

fn check_file(
    planned: &Planned,
    source: &dyn Source,
    refs: Option<(&refs::RefCheck, u32)>,
) -> FileReport {
    let Planned {
        section,
        entry,
        url,
        resource_type,
    } = *planned;
    let mut file = FileReport {
        section: section.to_string(),
        resource_type: resource_type.to_string(),
        url: url.to_string(),
        lines: 0,
        bytes: 0,
        sha256: String::new(),
        unchecked: Vec::new(),
        problems: Vec::new(),
    };
    let raw = match source.open(url) {
        Ok(r) => r,
        Err(e) => {
            file.problems.push(format!("cannot be read: {e}"));
            return file;
        }
    };
    let mut digest = DigestReader {
        inner: raw,
        hasher: sha2::Sha256::new(),
        bytes: 0,
    };
    let gzip = is_gzip(entry);
    let mut bad_lines = 0u64;
    {
        let decoded: Box<dyn Read> = if gzip {
            Box::new(flate2::read::MultiGzDecoder::new(&mut digest))
        } else {
            Box::new(&mut digest)
        };
        let mut reader = BufReader::with_capacity(256 * 1024, decoded);
        let mut line = Vec::new();
        loop {
            line.clear();
            match limits::read_line(&mut reader, &mut line, MAX_LINE_BYTES) {
                Ok(limits::Line::End) => break,
                Ok(limits::Line::Read) => {}
                Ok(limits::Line::TooLong) => {
                    file.lines += 1;
                    bad_lines += 1;
                    if bad_lines <= 5 {
                        file.problems.push(format!(
                            "line {} is longer than {MAX_LINE_BYTES} bytes (not read)",
                            file.lines
                        ));
                    }
                    continue;
                }
                Err(e) => {
                    file.problems.push(format!(
                        "read failed after line {}: {e}{}",
                        file.lines,
                        if gzip { " (gzip)" } else { "" }
                    ));
                    break;
                }
            }
            let text = line.strip_suffix(b"\n").unwrap_or(&line);
            let text = text.strip_suffix(b"\r").unwrap_or(text);
            if text.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            file.lines += 1;
            let n = file.lines;
            let mut bad = |file: &mut FileReport, msg: String| {
                bad_lines += 1;
                if bad_lines <= 5 {
                    file.problems.push(msg);
                }
            };
            let v: Value = match serde_json::from_slice(text) {
                Ok(v) => v,
                Err(e) => {
                    bad(&mut file, format!("line {n} is not JSON: {e}"));
                    continue;
                }
            };
            let rt = v.get("resourceType").and_then(Value::as_str).unwrap_or("");
            let type_ok = rt == resource_type || (resource_type == ANY_TYPE && !rt.is_empty());
            if !type_ok {
                bad(
                    &mut file,
                    format!(
                        "line {n} is a {} where the manifest says {resource_type}",
                        if rt.is_empty() {
                            "resource without resourceType"
                        } else {
                            rt
                        }
                    ),
                );
                continue;
            }
            if let Some((check, file_no)) = refs {
                check.resource(rt, &v, file_no, n);
            }
        }
        // Read what a reader that stopped early left, so the size and digest cover the file.
        let _ = std::io::copy(reader.get_mut(), &mut std::io::sink());
    }
    let _ = std::io::copy(&mut digest, &mut std::io::sink());
    if bad_lines > 5 {
        file.problems
            .push(format!("… {} bad lines in all", bad_lines));
    }
    file.bytes = digest.bytes;
    let digest_bytes = digest.hasher.finalize();
    file.sha256 = hex(&digest_bytes);
    // Other servers' names too: `size` (Bulk Data before STU4), a `sha256` beside `url`, in hex
    // or base64.
    let size = ["fileSize", "size"]
        .iter()
        .find_map(|k| entry.get(*k).and_then(Value::as_u64));
    match size {
        Some(size) if size != file.bytes => file.problems.push(format!(
            "size is {} bytes, the manifest says {size}",
            file.bytes
        )),
        Some(_) => {}
        None => file.unchecked.push("fileSize"),
    }
    let sha256 = entry
        .pointer("/extension/sha256")
        .or_else(|| entry.get("sha256"))
        .and_then(Value::as_str)
        .map(str::trim);
    match sha256 {
        Some(h) if !h.eq_ignore_ascii_case(&file.sha256) && h != base64_of(&digest_bytes) => {
            file.problems.push(format!(
                "SHA-256 is {}, the manifest says {h} (the content changed)",
                file.sha256
            ))
        }
        Some(_) => {}
        None => file.unchecked.push("sha256"),
    }
    match entry.get("count").and_then(Value::as_u64) {
        Some(c) if c != file.lines => file.problems.push(format!(
            "{} resources (lines), the manifest says {c}",
            file.lines
        )),
        Some(_) => {}
        None => file.unchecked.push("count"),
    }
    file
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn write(dir: &Path, name: &str, text: &str) -> (u64, String) {
        let mut w = DigestWriter::new(Vec::new());
        w.write_all(text.as_bytes()).unwrap();
        let (bytes, n, sha) = w.into_parts();
        std::fs::write(dir.join(name), bytes).unwrap();
        (n, sha)
    }

    fn page(urls: &[&str], next: Option<&str>) -> Value {
        let output: Vec<Value> = urls
            .iter()
            .map(|u| json!({"type": "Patient", "url": u}))
            .collect();
        let mut m = json!({"transactionTime": "2026-01-01T00:00:00Z", "output": output,
            "error": [], "requiresAccessToken": false});
        if let Some(n) = next {
            m["link"] = json!([{"relation": "next", "url": n}]);
        }
        m
    }

    #[test]
    fn pages_are_merged_in_order_and_a_loop_or_too_many_pages_is_refused() {
        let status = "http://s/export-status/j";
        let mut walk = PageWalk::new(
            page(&["http://s/f/1"], Some("http://s/export-status/j?page=2")),
            Some(status),
            10,
        )
        .unwrap();
        assert_eq!(
            walk.next_url().unwrap().as_deref(),
            Some("http://s/export-status/j?page=2")
        );
        // A relative link resolves against the page it is on.
        walk.push(page(&["http://s/f/2", "http://s/f/3"], Some("j?page=3")))
            .unwrap();
        assert_eq!(
            walk.next_url().unwrap().as_deref(),
            Some("http://s/export-status/j?page=3")
        );
        walk.push(page(&["http://s/f/4"], None)).unwrap();
        assert_eq!(walk.next_url().unwrap(), None);
        assert_eq!(walk.pages(), 3);
        let m = walk.finish();
        let urls: Vec<&str> = m["output"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["url"].as_str().unwrap())
            .collect();
        assert_eq!(
            urls,
            [
                "http://s/f/1",
                "http://s/f/2",
                "http://s/f/3",
                "http://s/f/4"
            ]
        );
        assert!(m.get("link").is_none());

        // A first page whose next link is itself.
        let mut walk =
            PageWalk::new(page(&["http://s/f/1"], Some(status)), Some(status), 10).unwrap();
        let e = walk.next_url().unwrap_err();
        assert!(matches!(e, VerifyError::PageLoop { page: 1, .. }), "{e}");
        assert!(e.to_string().contains("the pages loop"), "{e}");
        // Page 3 leading back to page 2.
        let p2 = "http://s/export-status/j?page=2";
        let mut walk = PageWalk::new(page(&[], Some(p2)), Some(status), 10).unwrap();
        walk.next_url().unwrap();
        walk.push(page(&[], Some("http://s/export-status/j?page=3")))
            .unwrap();
        walk.next_url().unwrap();
        walk.push(page(&[], Some(p2))).unwrap();
        assert!(matches!(
            walk.next_url(),
            Err(VerifyError::PageLoop { page: 3, .. })
        ));
        // Ever new pages: refused at the bound.
        let mut walk = PageWalk::new(page(&[], Some("?page=1")), Some(status), 3).unwrap();
        let mut n = 1;
        let e = loop {
            match walk.next_url() {
                Ok(_) => {
                    n += 1;
                    walk.push(page(&[], Some(&format!("?page={n}")))).unwrap();
                }
                Err(e) => break e,
            }
        };
        assert!(matches!(e, VerifyError::TooManyPages { max: 3 }), "{e}");
        assert_eq!(walk.pages(), 3);
        // A page of another export.
        let mut walk = PageWalk::new(page(&[], Some(p2)), Some(status), 10).unwrap();
        walk.next_url().unwrap();
        let mut other = page(&[], None);
        other["transactionTime"] = json!("2020-01-01T00:00:00Z");
        assert!(matches!(
            walk.push(other),
            Err(VerifyError::BadPage { page: 2, .. })
        ));
        // A file manifest's next link must be absolute.
        let mut walk = PageWalk::new(page(&[], Some("?page=2")), None, 10).unwrap();
        assert!(matches!(walk.next_url(), Err(VerifyError::BadPage { .. })));
    }

    #[test]
    fn page_links_resolve_relative_links_and_refuse_loops_schemes_and_too_many_pages() {
        let status = "http://s/export-status/j";
        let mut links = PageLinks::new(Some(status), 10).unwrap();
        assert_eq!(links.pages(), 1);
        assert_eq!(links.current(), Some(status));
        // Relative links resolve against the page they are on, which then is the current one.
        assert_eq!(
            links.follow("j?page=2").unwrap(),
            "http://s/export-status/j?page=2"
        );
        assert_eq!(links.current(), Some("http://s/export-status/j?page=2"));
        assert_eq!(
            links.follow("/export-status/j?page=3").unwrap(),
            "http://s/export-status/j?page=3"
        );
        assert_eq!(
            links.follow("https://t/other?page=4").unwrap(),
            "https://t/other?page=4"
        );
        assert_eq!(links.pages(), 4);

        // A loop: back to an earlier page, or to the first page (the status URL).
        for back in ["http://s/export-status/j?page=2", "/export-status/j"] {
            let mut links = PageLinks::new(Some(status), 10).unwrap();
            links.follow("?page=2").unwrap();
            links.follow("?page=3").unwrap();
            let e = links.follow(back).unwrap_err();
            assert!(matches!(e, VerifyError::PageLoop { page: 3, .. }), "{e}");
            assert!(
                e.to_string().contains("the pages loop")
                    && e.to_string().contains("export-status/j"),
                "{e}"
            );
        }

        // Not http(s), or not a URL at all.
        let mut links = PageLinks::new(Some(status), 10).unwrap();
        for bad in ["file:///etc/passwd", "ftp://s/page2", "javascript:alert(1)"] {
            let e = links.follow(bad).unwrap_err();
            assert!(matches!(e, VerifyError::BadPage { page: 1, .. }), "{e}");
            assert!(e.to_string().contains("not an http(s) URL"), "{e}");
        }
        let mut links = PageLinks::new(Some(status), 10).unwrap();
        assert!(matches!(
            links.follow("http://[::1"),
            Err(VerifyError::BadPage { page: 1, .. })
        ));
        // Without a URL for the first page, a relative link is not a URL.
        let mut links = PageLinks::new(None, 10).unwrap();
        let e = links.follow("?page=2").unwrap_err();
        assert!(e.to_string().contains("is not a URL"), "{e}");
        assert_eq!(links.follow("http://s/p2").unwrap(), "http://s/p2");
        assert!(PageLinks::new(Some("not a url"), 10).is_err());

        // Ever new pages: at most max_pages in all (the first included); 0 means 1.
        let mut links = PageLinks::new(Some(status), 3).unwrap();
        links.follow("?page=2").unwrap();
        links.follow("?page=3").unwrap();
        let e = links.follow("?page=4").unwrap_err();
        assert!(matches!(e, VerifyError::TooManyPages { max: 3 }), "{e}");
        assert!(e.to_string().contains("more than 3 pages"), "{e}");
        assert_eq!(links.pages(), 3);
        let mut links = PageLinks::new(Some(status), 0).unwrap();
        assert!(matches!(
            links.follow("?page=2"),
            Err(VerifyError::TooManyPages { max: 1 })
        ));
    }

    #[test]
    fn an_organized_export_has_files_of_several_types() {
        let dir = tempfile::tempdir().unwrap();
        let text = "{\"resourceType\":\"Parameters\",\"parameter\":[{\"name\":\"header\",\"valueReference\":{\"reference\":\"Patient/p1\"}}]}\n{\"resourceType\":\"Patient\",\"id\":\"p1\"}\n{\"resourceType\":\"Observation\",\"id\":\"o1\",\"subject\":{\"reference\":\"Patient/p1\"}}\n";
        let (n, sha) = write(dir.path(), "output-1.ndjson", text);
        let m = json!({"outputOrganizedBy": "Patient", "output": [
            {"url": "http://x/f/output-1.ndjson", "count": 3, "fileSize": n, "extension": entry_extension(&sha, false)}
        ], "error": []});
        let src = DirSource::new(dir.path(), &m);
        let r = verify(&m, &src, &Options::default());
        assert!(r.ok(), "{r}");
        assert_eq!(r.references, 2);
        assert_eq!(r.dangling_total, 0);
        // Without outputOrganizedBy an entry needs its type.
        let mut plain = m.clone();
        plain.as_object_mut().unwrap().remove("outputOrganizedBy");
        assert!(!verify(&plain, &src, &Options::default()).ok());
    }

    #[test]
    fn a_good_export_passes_and_each_tampering_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = "{\"resourceType\":\"Patient\",\"id\":\"p1\"}\n";
        let o = "{\"resourceType\":\"Observation\",\"id\":\"o1\",\"subject\":{\"reference\":\"Patient/p1\"},\"performer\":[{\"reference\":\"Practitioner/x\"}]}\n{\"resourceType\":\"Observation\",\"id\":\"o2\",\"subject\":{\"reference\":\"Patient/p1/_history/2\"}}\n";
        let (pn, ps) = write(dir.path(), "Patient-1.ndjson", p);
        let (on, os) = write(dir.path(), "Observation-1.ndjson", o);
        let m = json!({"output": [
            {"type": "Patient", "url": "http://x/f/Patient-1.ndjson", "count": 1, "fileSize": pn, "extension": entry_extension(&ps, false)},
            {"type": "Observation", "url": "http://x/f/Observation-1.ndjson", "count": 2, "fileSize": on, "extension": entry_extension(&os, false)}
        ], "error": []});
        let src = DirSource::new(dir.path(), &m);
        let r = verify(&m, &src, &Options::default());
        assert!(r.ok(), "{r}");
        assert_eq!(r.references, 3);
        assert_eq!(r.outside.get("Practitioner"), Some(&1));

        // One line removed: count, size and digest all differ.
        std::fs::write(
            dir.path().join("Observation-1.ndjson"),
            o.lines().next().unwrap().to_string() + "\n",
        )
        .unwrap();
        let r = verify(&m, &src, &Options::default());
        assert!(!r.ok());
        let text = r.to_string();
        assert!(
            text.contains("1 resources (lines), the manifest says 2"),
            "{text}"
        );
        assert!(text.contains("SHA-256"), "{text}");
        // One byte changed, same size: only the digest (and here the reference) tell.
        std::fs::write(
            dir.path().join("Observation-1.ndjson"),
            o.replace("p1", "p2"),
        )
        .unwrap();
        let r = verify(&m, &src, &Options::default());
        let text = r.to_string();
        assert!(!r.ok() && text.contains("the content changed"), "{text}");
        assert!(
            text.contains("dangling: Observation/o1 -> Patient/p2"),
            "{text}"
        );
        assert!(!text.contains("size is"), "{text}");
        let r = verify(
            &m,
            &src,
            &Options {
                dangling: Dangling::Warn,
            },
        );
        assert_eq!(r.problem_count(), 1, "{r}");
    }

    #[test]
    fn dangling_targets_are_counted_by_reference_and_listed_once_in_reading_order() {
        let dir = tempfile::tempdir().unwrap();
        // 25 observations, each to its own patient; o0 again and o25 to p0 too. The patients
        // file (read after) holds p0..p2; a condition file (read last) refers back to p1.
        let mut obs = String::new();
        for i in 0..25 {
            obs += &format!(
                "{{\"resourceType\":\"Observation\",\"id\":\"o{i}\",\"subject\":{{\"reference\":\"Patient/p{i}\"}}}}\n"
            );
            if i == 10 {
                obs += "\n"; // a blank line is not counted as a line
            }
        }
        obs += "{\"resourceType\":\"Observation\",\"id\":\"o25\",\"subject\":{\"reference\":\"Patient/p0\"},\"focus\":[{\"reference\":\"Patient/p24/_history/1\"}]}\n";
        let pats = "{\"resourceType\":\"Patient\",\"id\":\"p0\"}\n{\"resourceType\":\"Patient\",\"id\":\"p1\"}\n{\"resourceType\":\"Patient\",\"id\":\"p2\"}\n";
        let conds = "{\"resourceType\":\"Condition\",\"id\":\"c1\",\"subject\":{\"reference\":\"Patient/p1\"}}\n";
        let m = json!({"output": [
            {"type": "Observation", "url": "http://x/f/Observation-1.ndjson", "count": 26},
            {"type": "Patient", "url": "http://x/f/Patient-1.ndjson", "count": 3},
            {"type": "Condition", "url": "http://x/f/Condition-1.ndjson", "count": 1}
        ]});
        write(dir.path(), "Observation-1.ndjson", &obs);
        write(dir.path(), "Patient-1.ndjson", pats);
        write(dir.path(), "Condition-1.ndjson", conds);
        let r = verify(&m, &DirSource::new(dir.path(), &m), &Options::default());
        assert_eq!(r.references, 28);
        // p3..p24 are missing; p24 is referred to twice.
        assert_eq!(r.dangling_total, 23, "{r}");
        assert!(!r.ok());
        let listed: Vec<(String, String)> = r
            .dangling
            .iter()
            .map(|d| (d.from.clone(), d.reference.clone()))
            .collect();
        let expected: Vec<(String, String)> = (3..3 + MAX_LISTED)
            .map(|i| (format!("Observation/o{i}"), format!("Patient/p{i}")))
            .collect();
        assert_eq!(listed, expected);
        assert!(r.to_string().contains("23 dangling"), "{r}");
    }

    #[test]
    fn gzip_files_are_hashed_as_stored_and_read_decoded() {
        let dir = tempfile::tempdir().unwrap();
        let mut gz = DigestWriter::new(flate2::write::GzEncoder::new(
            Vec::new(),
            flate2::Compression::fast(),
        ));
        gz.write_all(b"{\"resourceType\":\"Patient\",\"id\":\"p1\"}\n")
            .unwrap();
        let (enc, _, _) = gz.into_parts();
        let mut stored = DigestWriter::new(Vec::new());
        stored.write_all(&enc.finish().unwrap()).unwrap();
        let (bytes, n, sha) = stored.into_parts();
        std::fs::write(dir.path().join("Patient-1.ndjson.gz"), bytes).unwrap();
        let m = json!({"output": [{"type": "Patient", "url": "Patient-1.ndjson.gz", "count": 1,
            "fileSize": n, "extension": entry_extension(&sha, true)}]});
        let r = verify(&m, &DirSource::new(dir.path(), &m), &Options::default());
        assert!(r.ok(), "{r}");
        let m = json!({"output": [{"type": "Observation", "url": "Patient-1.ndjson.gz"}]});
        let r = verify(&m, &DirSource::new(dir.path(), &m), &Options::default());
        assert!(
            r.to_string()
                .contains("line 1 is a Patient where the manifest says Observation"),
            "{r}"
        );
    }
}
