//! Downloading the manifest's files: `--parallel` at a time, each into `NAME.part`; a body cut
//! short (connection dropped, read timeout, fewer bytes than announced) is resumed with
//! `Range: bytes=<part length>-` and `If-Range` naming the version already received (its strong
//! ETag, else its Last-Modified date). A `200` answer to a ranged request means the server sent
//! the whole file (another version, or no range support): the part is started over. The part
//! is renamed to its final name only when complete.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use futures::StreamExt;
use reqwest::header::{HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::error::ClientError;
use crate::session::{self, Session};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Output,
    Error,
    Deleted,
}

/// One file of the manifest and where it goes (what `--verify` checks comes from the manifest
/// itself: [`manifest::verify`]).
#[derive(Debug, Clone)]
pub struct File {
    pub kind: Kind,
    pub url: String,
    pub dest: PathBuf,
    pub count: Option<u64>,
    pub size: Option<u64>,
}

/// The sections of a manifest and the kind of their files.
const SECTIONS: [(&str, Kind); 3] = [
    ("output", Kind::Output),
    ("error", Kind::Error),
    ("deleted", Kind::Deleted),
];

/// The files of `manifest`: `output` as `DIR/<Type>.<n>.ndjson`, `error` and `deleted` under
/// `DIR/error/` and `DIR/deleted/` (n counts from 1 per type and kind; manifest::DownloadLayout,
/// which also names the folders: each file's folder is created here).
pub fn plan(manifest: &Value, out: &Path) -> Result<Vec<File>, ClientError> {
    let mut files = Vec::new();
    let mut layout = manifest::DownloadLayout::default();
    let mut urls: std::collections::HashSet<&str> = Default::default();
    for (key, kind) in SECTIONS {
        let Some(entries) = manifest.get(key).and_then(Value::as_array) else {
            if key == "output" {
                return Err(ClientError::Protocol(
                    "the manifest has no output array".to_owned(),
                ));
            }
            continue;
        };
        for e in entries {
            let file = entry_file(&mut layout, key, kind, e, out)?;
            // Each file once, even when a (paged) manifest lists it twice.
            if !urls.insert(e["url"].as_str().unwrap_or_default()) {
                return Err(ClientError::Protocol(format!(
                    "the manifest lists {} twice",
                    file.url
                )));
            }
            files.push(file);
        }
    }
    Ok(files)
}

/// The [`File`] of one entry of a manifest's section `key`, named by `layout` (the next name of
/// its type and section), its folder created.
fn entry_file(
    layout: &mut manifest::DownloadLayout,
    key: &'static str,
    kind: Kind,
    e: &Value,
    out: &Path,
) -> Result<File, ClientError> {
    let url = e
        .get("url")
        .and_then(Value::as_str)
        .ok_or_else(|| ClientError::Protocol(format!("a manifest {key} entry has no url")))?;
    // The name (manifest::DownloadLayout, which `fhirhose verify DIR/manifest.json` also
    // knows): the type as letters and digits only, whatever the server says.
    let (_, rel) = layout.next(key, e);
    let dest = out.join(rel);
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir).map_err(|e| ClientError::io(dir, e))?;
    }
    let number = |names: &[&str]| names.iter().find_map(|k| e.get(*k).and_then(Value::as_u64));
    Ok(File {
        kind,
        dest,
        url: url.to_owned(),
        count: number(&["count"]),
        size: number(&["fileSize", "size"]),
    })
}

pub struct Outcome {
    pub bytes: u64,
    pub resumed: u32,
    /// Files started while the export ran (`--partial-manifests`).
    pub early: usize,
}

/// The run's downloads, `parallel` at a time, each a task of its own (so that `parallel`
/// downloads receive and write on as many of the runtime's threads: in one task they would
/// share one thread, and receiving and writing hundreds of MB is CPU work). The first failure
/// ends the run; dropping the scheduler aborts the downloads still running.
///
/// Files are started in two ways. While the export runs (`fhirhose export --partial-manifests`),
/// [`Early::page`] starts each file as soon as a manifest page of the running export lists it
/// (a listed file never changes), under the name [`plan`] gives it in the complete manifest
/// (pages are read in order and a page's files only ever grow at its end, so the names agree;
/// a file the complete manifest names otherwise is moved once every download has ended).
/// [`Early::finish`] then takes the complete manifest's files: those started early are awaited,
/// the others downloaded now — for an export downloaded after it ended, that is every file.
/// Once the complete manifest is known, the progress bar shows its total size when every
/// entry gives one (`fileSize`).
pub struct Early {
    session: Arc<Session>,
    out: PathBuf,
    permits: Arc<tokio::sync::Semaphore>,
    bar: indicatif::ProgressBar,
    resumed: Arc<AtomicU32>,
    layout: manifest::DownloadLayout,
    /// By URL: where each file started while the export ran goes.
    running: std::collections::HashMap<String, PathBuf>,
    /// The downloads not ended yet (dropped: aborted).
    tasks: futures::stream::FuturesUnordered<Aborting>,
    /// Bytes of the downloads ended so far, and how many ended.
    bytes: u64,
    done: usize,
    /// When the first download started.
    pub started: Option<std::time::Instant>,
}

impl Early {
    /// `bar`: the run's progress bar (hidden with --quiet), which now counts bytes too.
    pub fn new(
        session: Arc<Session>,
        out: &Path,
        parallel: usize,
        bar: indicatif::ProgressBar,
    ) -> Early {
        bar.set_style(style(SPINNER));
        Early {
            session,
            out: out.to_path_buf(),
            permits: Arc::new(tokio::sync::Semaphore::new(parallel.max(1))),
            bar,
            resumed: Arc::default(),
            layout: manifest::DownloadLayout::default(),
            running: Default::default(),
            tasks: Default::default(),
            bytes: 0,
            done: 0,
            started: None,
        }
    }

    /// Starts the files of a manifest page (of the running export) not started yet; the
    /// first download that failed ends the run here.
    pub fn page(&mut self, page: &Value, progress: &str) -> Result<(), ClientError> {
        self.ended()?;
        let requires_token = page
            .get("requiresAccessToken")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        for (key, kind) in SECTIONS {
            for e in page
                .get(key)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let Some(url) = e.get("url").and_then(Value::as_str) else {
                    continue;
                };
                if self.running.contains_key(url) {
                    continue;
                }
                let file = entry_file(&mut self.layout, key, kind, e, &self.out)?;
                self.running.insert(file.url.clone(), file.dest.clone());
                self.start(file, requires_token);
            }
        }
        self.bar.set_message(format!(
            "{} files listed while exporting: {progress}",
            self.running.len()
        ));
        Ok(())
    }

    /// The error of the first download that fails from now on (the others that end meanwhile
    /// are counted); never, while none does. Cancel-safe: for racing whatever the run awaits
    /// while the export runs, so that a failed download ends the run at once.
    pub async fn failure(&mut self) -> ClientError {
        loop {
            match self.tasks.next().await {
                Some(Ok(bytes)) => self.count(bytes),
                Some(Err(e)) => return e,
                None => std::future::pending::<()>().await,
            }
        }
    }

    /// Counts the downloads that ended; the error of one that failed, if any.
    fn ended(&mut self) -> Result<(), ClientError> {
        use futures::FutureExt;
        while let Some(Some(result)) = self.tasks.next().now_or_never() {
            self.count(result?);
        }
        Ok(())
    }

    fn count(&mut self, bytes: u64) {
        self.bytes += bytes;
        self.done += 1;
    }

    fn start(&mut self, file: File, requires_token: bool) {
        self.started.get_or_insert_with(std::time::Instant::now);
        let (session, bar, resumed, permits) = (
            self.session.clone(),
            self.bar.clone(),
            self.resumed.clone(),
            self.permits.clone(),
        );
        self.tasks.push(Aborting(tokio::spawn(async move {
            let _permit = permits
                .acquire_owned()
                .await
                .map_err(|_| ClientError::Interrupted { cancelled: false })?;
            one(&session, &file, requires_token, &bar, &resumed).await
        })));
    }

    /// Awaits every download started, counting them, `n` files in all; the first failure
    /// ends the run.
    async fn drain(&mut self, n: usize) -> Result<(), ClientError> {
        while let Some(result) = self.tasks.next().await {
            self.count(result?);
            self.bar.set_message(format!("{}/{n} files", self.done));
        }
        Ok(())
    }

    /// Checks the files started while the export ran against its complete manifest (`files`,
    /// from [`plan`]): each must be in it. One that is not ends the run (a protocol error):
    /// every download is stopped and the files listed only while the export ran are removed,
    /// so that no name of the folder holds a file the manifest does not list.
    pub async fn check(&mut self, files: &[File]) -> Result<(), ClientError> {
        let listed: std::collections::HashSet<&str> =
            files.iter().map(|f| f.url.as_str()).collect();
        let mut strays: Vec<(&String, &PathBuf)> = self
            .running
            .iter()
            .filter(|(url, _)| !listed.contains(url.as_str()))
            .collect();
        if strays.is_empty() {
            return Ok(());
        }
        strays.sort();
        for task in self.tasks.iter() {
            task.0.abort();
        }
        // Every download ended (aborted ones included) before their files are removed.
        while self.tasks.next().await.is_some() {}
        for (_, dest) in &strays {
            for path in [dest.to_path_buf(), part_path(dest)] {
                let _ = std::fs::remove_file(path);
            }
        }
        let (url, _) = strays[0];
        Err(ClientError::Protocol(format!(
            "{url} was listed while the export ran but is not in its manifest{}",
            match strays.len() {
                1 => String::new(),
                n => format!(" ({} more such files)", n - 1),
            }
        )))
    }

    /// Every file of the complete manifest (`files`, from [`plan`]): those started while the
    /// export ran are awaited (and moved where `files` names them, if elsewhere), the others
    /// downloaded now.
    pub async fn finish(
        mut self,
        files: &[File],
        requires_token: bool,
    ) -> Result<Outcome, ClientError> {
        self.check(files).await?;
        let n = files.len();
        let started_early = self.running.len();
        let mut moves = Vec::new();
        let mut late = Vec::new();
        for f in files {
            match self.running.remove(&f.url) {
                Some(dest) if dest != f.dest => moves.push((dest, f.dest.clone())),
                Some(_) => {}
                None => late.push(f.clone()),
            }
        }
        if let Some(total) = files.iter().map(|f| f.size).sum::<Option<u64>>() {
            // The bar counts the bytes received so far (those of the early files included).
            self.bar.set_length(total);
            self.bar.set_style(style(BAR));
        }
        if started_early == 0 {
            // A download after the export: the time and rate are the download's.
            self.bar.reset_elapsed();
            self.bar.reset_eta();
        }
        self.bar.set_message(format!("{}/{n} files", self.done));
        if !moves.is_empty() {
            // Every early file in place first: a name may be another early file's.
            self.drain(n).await?;
            tracing::warn!(
                files = moves.len(),
                "the complete manifest orders files otherwise than its pages did: renaming them"
            );
            let parked = |i: usize, from: &Path| from.with_extension(format!("early-{i}"));
            for (i, (from, _)) in moves.iter().enumerate() {
                std::fs::rename(from, parked(i, from)).map_err(|e| ClientError::io(from, e))?;
            }
            for (i, (from, to)) in moves.iter().enumerate() {
                std::fs::rename(parked(i, from), to).map_err(|e| ClientError::io(to, e))?;
            }
        }
        for f in late {
            self.start(f, requires_token);
        }
        self.drain(n).await?;
        self.bar.finish_and_clear();
        Ok(Outcome {
            bytes: self.bytes,
            resumed: self.resumed.load(Ordering::Relaxed),
            early: started_early,
        })
    }
}

/// The progress bar's look: bytes and rate while the total size is unknown (no time left to
/// show), ...
const SPINNER: &str = "{spinner} {elapsed_precise} {bytes} {binary_bytes_per_sec} {msg}";
/// ... a bar of the total bytes once it is known (every manifest entry gives its `fileSize`),
/// with the rate and the time left at the recent rate (indicatif's estimate).
const BAR: &str = "{spinner} {elapsed_precise} [{bar:30}] {bytes}/{total_bytes} \
                   {binary_bytes_per_sec}, {eta} left {msg}";

fn style(template: &str) -> indicatif::ProgressStyle {
    indicatif::ProgressStyle::with_template(template)
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner())
        .progress_chars("=> ")
}

/// A spawned download that is aborted when dropped (the run ended on another file's error).
struct Aborting(tokio::task::JoinHandle<Result<u64, ClientError>>);

impl std::future::Future for Aborting {
    type Output = Result<u64, ClientError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0)
            .poll(cx)
            .map(|joined| match joined {
                Ok(r) => r,
                // A panic of the download is the caller's too.
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                // Cancelled: when the runtime shuts down under it, or aborted by
                // [`Early::check`].
                Err(_) => Err(ClientError::Interrupted { cancelled: false }),
            })
    }
}

impl Drop for Aborting {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn part_path(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(".part");
    dest.with_file_name(name)
}

/// The validator of the bytes received so far, for `If-Range`.
fn validator(headers: &HeaderMap) -> Option<HeaderValue> {
    if let Some(etag) = headers.get("etag")
        && !etag.as_bytes().starts_with(b"W/")
    {
        return Some(etag.clone());
    }
    headers.get("last-modified").cloned()
}

/// `Content-Range: bytes START-END/SIZE` → (START, SIZE).
fn content_range(headers: &HeaderMap) -> Option<(u64, Option<u64>)> {
    let v = headers.get("content-range")?.to_str().ok()?;
    let rest = v.strip_prefix("bytes ")?;
    let (range, size) = rest.split_once('/')?;
    let size = size.parse().ok();
    let start = match range.split_once('-') {
        Some((s, _)) => s.parse().ok()?,
        None => return Some((0, size)), // `*/SIZE`
    };
    Some((start, size))
}

async fn one(
    session: &Session,
    file: &File,
    requires_token: bool,
    bar: &indicatif::ProgressBar,
    resumed: &AtomicU32,
) -> Result<u64, ClientError> {
    if requires_token && session.has_credentials() && !session.token_may_go_to(&file.url) {
        // The token stays on its origins (see Session); fetched without it, such a file would
        // only be refused (401) by a server that means it, and a server naming another host
        // for it wants the token there. Refused with the reason instead.
        return Err(ClientError::TokenWithheld {
            url: file.url.clone(),
            origin: session.base_origin(),
        });
    }
    let part = part_path(&file.dest);
    let _ = tokio::fs::remove_file(&part).await;
    let mut have: u64 = 0;
    let mut validator_seen: Option<HeaderValue> = None;
    let mut attempt: u32 = 0;
    loop {
        let mut headers = session::header("accept", "application/fhir+ndjson");
        headers.insert("accept-encoding", HeaderValue::from_static("identity"));
        let ranged = have > 0 && validator_seen.is_some();
        if ranged {
            if let Ok(v) = HeaderValue::from_str(&format!("bytes={have}-")) {
                headers.insert("range", v);
            }
            if let Some(v) = &validator_seen {
                headers.insert("if-range", v.clone());
            }
        }
        let resp = session
            .send(
                Method::GET,
                &file.url,
                &headers,
                None,
                requires_token,
                session::IDEMPOTENT,
            )
            .await?;
        let status = resp.status();
        let (append, expected_total) = match status {
            StatusCode::OK => (false, resp.content_length()),
            StatusCode::PARTIAL_CONTENT if ranged => match content_range(resp.headers()) {
                Some((start, size)) if start == have => (true, size),
                _ => {
                    return Err(ClientError::Protocol(format!(
                        "{}: a 206 answer for bytes {have}- does not start there",
                        file.url
                    )));
                }
            },
            StatusCode::RANGE_NOT_SATISFIABLE if ranged => {
                match content_range(resp.headers()) {
                    // The part already holds the whole file.
                    Some((_, Some(size))) if size == have => break,
                    _ => {
                        // Start over.
                        bar.dec(have);
                        have = 0;
                        validator_seen = None;
                        attempt += 1;
                        if attempt > session.retries {
                            return Err(ClientError::Protocol(format!(
                                "{}: the server cannot resume this file (416)",
                                file.url
                            )));
                        }
                        continue;
                    }
                }
            }
            _ => return Err(session.fail(&file.url, resp, 1).await),
        };
        if !append && have > 0 {
            tracing::info!(url = %file.url, "the server sent the whole file again; starting it over");
            bar.dec(have);
            have = 0;
        }
        if !append {
            validator_seen = validator(resp.headers());
        }
        let f = tokio::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(&part)
            .await
            .map_err(|e| ClientError::io(&part, e))?;
        let f = f.into_std().await;
        // Given back when this answer's body has ended, however it ends (dropped).
        let reserved = match to_reserve(have, expected_total, file.size) {
            Some(len) => {
                Some(Reservation::new(&f, have, len).map_err(|e| ClientError::io(&part, e))?)
            }
            None => None,
        };
        let mut w = BodyWriter::new(f);
        let mut resp = resp;
        let before = have;
        let mut dropped: Option<String> = None;
        // No file grows past the size its manifest entry gives, the size the answer announces,
        // or --max-file-bytes: an endless body would otherwise fill the disk.
        let limit = [file.size, expected_total, session.max_file_bytes]
            .into_iter()
            .flatten()
            .min();
        loop {
            match resp.chunk().await {
                Ok(Some(bytes)) => {
                    let n = bytes.len() as u64;
                    if let Some(limit) = limit
                        && have + n > limit
                    {
                        drop(w);
                        drop(reserved);
                        let _ = tokio::fs::remove_file(&part).await;
                        return Err(ClientError::TooLarge {
                            url: file.url.clone(),
                            limit,
                        });
                    }
                    w.push(bytes).await.map_err(|e| ClientError::io(&part, e))?;
                    have += n;
                    bar.inc(n);
                }
                Ok(None) => break,
                Err(e) => {
                    dropped = Some(session::transport_reason(&e));
                    break;
                }
            }
        }
        w.finish().await.map_err(|e| ClientError::io(&part, e))?;
        drop(reserved);
        let short = expected_total.is_some_and(|t| have < t);
        if dropped.is_none() && !short {
            break;
        }
        let reason = dropped.unwrap_or_else(|| "the body ended early".to_owned());
        if have > before {
            attempt = 0; // progress was made: a flaky link gets its retries again
        }
        attempt += 1;
        if attempt > session.retries {
            return Err(ClientError::Transport {
                url: file.url.clone(),
                attempts: attempt,
                reason: format!("{reason} at byte {have}"),
            });
        }
        resumed.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(url = %file.url, at = have, %reason, "download interrupted; resuming by Range");
        bar.suspend(|| {
            eprintln!(
                "{}: interrupted at byte {have} ({reason}); resuming by Range",
                file.dest.display()
            )
        });
        tokio::time::sleep(session::backoff(attempt)).await;
    }
    // Inline, not on the blocking pool: an aborted download (`Early::check`) stops at an await,
    // so its file either has its final name before the abort lands or never gets it. A rename
    // handed to the pool would go on after the abort and could land after `check` removed the
    // file. One metadata call per file.
    std::fs::rename(&part, &file.dest).map_err(|e| ClientError::io(&file.dest, e))?;
    Ok(have)
}

/// Reserves the disk space of the `len` bytes still to come from `offset` on, without changing
/// the part file's size (`FALLOC_FL_KEEP_SIZE`: a resume still starts at its length, and a file
/// cut short keeps no zeros). A full disk or quota then shows when a file starts, not after most
/// of it was received, and the filesystem allocates the file's blocks at once instead of on each
/// write (ext4's delayed allocation: about a seventh of the kernel time of writing 550 MB here).
/// A filesystem or system without it writes as before.
fn reserve(file: &std::fs::File, offset: u64, len: u64) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use rustix::fs::{FallocateFlags, fallocate};
        use rustix::io::Errno;
        match fallocate(file, FallocateFlags::KEEP_SIZE, offset, len) {
            Err(e) if e == Errno::NOSPC || e == Errno::DQUOT => return Err(e.into()),
            // Not supported here (EOPNOTSUPP, ENOSYS), too large a size (EFBIG, EINVAL): the
            // writes find out as before.
            _ => {}
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len);
    Ok(())
}

/// How many bytes to reserve from `have` on: up to the size the manifest gives for the file
/// (`known`), never past the size the answer announces (`announced`: Content-Length, or the
/// size in Content-Range), nothing without the manifest's size (an answer may announce any
/// size and then trickle), and at most [`MAX_RESERVE`] (a manifest may lie too).
fn to_reserve(have: u64, announced: Option<u64>, known: Option<u64>) -> Option<u64> {
    let end = known?.min(announced.unwrap_or(u64::MAX));
    end.checked_sub(have)
        .map(|len| len.min(MAX_RESERVE))
        .filter(|len| *len > 0)
}

/// The most disk space reserved ahead for one answer's body: the reservation only spares the
/// filesystem allocating block by block, so a larger file loses little by reserving part of it.
const MAX_RESERVE: u64 = 1 << 30;

/// The space [`reserve`]d for one answer's body, given back when dropped: whether the body
/// ended whole, cut short (about to be resumed) or failed, or the download was aborted, the
/// part file keeps no blocks past its length — a server announcing more than it sends would
/// otherwise leave them allocated, through the resumes, in the final file.
///
/// Holds its own handle of the part file: dropped after the body's last write has landed
/// (an aborted download may still have one in flight: its part file is never resumed).
struct Reservation(std::fs::File);

impl Reservation {
    fn new(file: &std::fs::File, offset: u64, len: u64) -> std::io::Result<Reservation> {
        reserve(file, offset, len)?;
        Ok(Reservation(file.try_clone()?))
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Err(e) = release(&self.0) {
            tracing::debug!(error = %e, "the part file's reserved blocks were not given back");
        }
    }
}

/// Frees the blocks allocated past the end of `file` (by [`reserve`]): truncating a file to its
/// own length does on ext4 and tmpfs (measured here: 4 MiB reserved past 5,000 bytes, 8,208
/// blocks of 512 bytes before, 16 after); a filesystem that keeps them only costs the space.
fn release(file: &std::fs::File) -> std::io::Result<()> {
    file.set_len(file.metadata()?.len())
}

/// Bytes gathered before one write: large writes let the page cache take whole large folios
/// (a third of the kernel time of 8 KiB writes for the same bytes here).
const WRITE_BATCH: usize = 1 << 20;

/// A body's chunks written to its part file as they come, without copying them: gathered as
/// received (`Bytes` share the receive buffers) until [`WRITE_BATCH`], then written with one
/// vectored write on the blocking pool while the next batch is received (at most one write in
/// flight, so at most two batches held per download).
struct BodyWriter {
    /// The file, when no write holds it.
    file: Option<std::fs::File>,
    in_flight: Option<tokio::task::JoinHandle<(std::fs::File, std::io::Result<()>)>>,
    batch: Vec<bytes::Bytes>,
    batched: usize,
}

impl BodyWriter {
    fn new(file: std::fs::File) -> BodyWriter {
        BodyWriter {
            file: Some(file),
            in_flight: None,
            batch: Vec::new(),
            batched: 0,
        }
    }

    async fn push(&mut self, chunk: bytes::Bytes) -> std::io::Result<()> {
        self.batched += chunk.len();
        self.batch.push(chunk);
        if self.batched >= WRITE_BATCH {
            self.submit().await?;
        }
        Ok(())
    }

    /// Hands the batch to the blocking pool (after the write in flight has ended).
    async fn submit(&mut self) -> std::io::Result<()> {
        let mut file = self.settle().await?;
        let batch = std::mem::take(&mut self.batch);
        self.batched = 0;
        self.in_flight = Some(tokio::task::spawn_blocking(move || {
            let written = write_chunks(&mut file, &batch);
            (file, written)
        }));
        Ok(())
    }

    /// Waits for the write in flight; the file is then free.
    async fn settle(&mut self) -> std::io::Result<std::fs::File> {
        if let Some(write) = self.in_flight.take() {
            let (file, written) = write.await.map_err(std::io::Error::other)?;
            written?;
            return Ok(file);
        }
        self.file
            .take()
            .ok_or_else(|| std::io::Error::other("a failed write left no file"))
    }

    /// Writes what is left and waits for every write: the file then holds every byte pushed.
    async fn finish(mut self) -> std::io::Result<()> {
        if !self.batch.is_empty() {
            self.submit().await?;
        }
        self.settle().await.map(drop)
    }
}

/// Writes every chunk, in order, with as few vectored writes as the file takes.
fn write_chunks(file: &mut std::fs::File, chunks: &[bytes::Bytes]) -> std::io::Result<()> {
    use std::io::{IoSlice, Write};
    let mut slices: Vec<IoSlice<'_>> = chunks.iter().map(|c| IoSlice::new(c)).collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        match file.write_vectored(rest) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserving_space_keeps_the_part_files_size() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.ndjson.part");
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(b"{}\n").unwrap();
        reserve(&f, 3, 4 << 20).unwrap();
        // A resume starts at the bytes written, not at the reservation.
        assert_eq!(f.metadata().unwrap().len(), 3);
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::fs::MetadataExt;
            // 512-byte blocks: the 4 MiB reserved are 8,192 of them.
            let blocks = f.metadata().unwrap().blocks();
            let reserved = blocks >= 8192;
            // A filesystem without fallocate allocates no more than the 3 bytes written take
            // (at most an 8 KiB block; none while they are only in the page cache).
            let unsupported = blocks <= 16;
            assert!(
                reserved || unsupported,
                "{blocks} blocks of 512 bytes: neither the 8,192 reserved nor the at most 16 of \
                 3 bytes written without a reservation"
            );
        }
        // More than any disk here: refused as a full disk, or left to the writes.
        match reserve(&f, 3, 1 << 60) {
            Ok(()) => {}
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::StorageFull, "{e}"),
        }
        assert_eq!(f.metadata().unwrap().len(), 3);
    }

    /// What [`reserve`] took past the part file's end, [`Reservation`] gives back when dropped;
    /// never more is reserved than the manifest's size of the file.
    #[test]
    fn a_reservation_is_given_back_past_the_part_files_end() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.ndjson.part");
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(&[b' '; 5000]).unwrap();
        let reserved = Reservation::new(&f, 5000, 4 << 20).unwrap();
        drop(reserved);
        assert_eq!(f.metadata().unwrap().len(), 5000);
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::fs::MetadataExt;
            let (blocks, block) = (
                f.metadata().unwrap().blocks(),
                f.metadata().unwrap().blksize(),
            );
            // 512-byte blocks: at most the 5,000 bytes in whole filesystem blocks.
            let whole_blocks = 5000u64.div_ceil(block) * block / 512;
            assert!(
                blocks <= whole_blocks,
                "{blocks} blocks allocated for 5,000 bytes ({whole_blocks} in whole blocks)"
            );
        }
        // From 100 on: up to the manifest's size, never past what the answer announces.
        // Nothing without the manifest's size, whatever the answer announces; at most
        // MAX_RESERVE.
        assert_eq!(to_reserve(100, Some(1000), None), None);
        assert_eq!(
            to_reserve(100, Some(20 << 30), Some(20 << 30)),
            Some(MAX_RESERVE)
        );
        assert_eq!(to_reserve(100, None, Some(1000)), Some(900));
        assert_eq!(to_reserve(100, Some(1000), Some(400)), Some(300));
        assert_eq!(to_reserve(100, Some(1000), Some(50)), None);
        assert_eq!(to_reserve(100, None, Some(400)), Some(300));
        assert_eq!(to_reserve(1000, Some(1000), None), None);
    }

    /// A template indicatif refuses would fall back to a bare spinner without a word.
    #[test]
    fn the_progress_bar_shows_the_time_left_only_with_a_total() {
        for template in [SPINNER, BAR] {
            assert!(
                indicatif::ProgressStyle::with_template(template).is_ok(),
                "{template}"
            );
        }
        assert!(BAR.contains("{eta}") && BAR.contains("{binary_bytes_per_sec}"));
        assert!(!SPINNER.contains("{eta}"));
    }

    #[test]
    fn plan_names_files_safely() {
        let m = serde_json::json!({
            "output": [
                {"type": "Patient", "url": "http://s/1", "count": 3, "fileSize": 10, "sha256": "ab"},
                {"type": "Patient", "url": "http://s/2"},
                {"type": "../../etc", "url": "http://s/3"}],
            "error": [{"type": "OperationOutcome", "url": "http://s/e"}]
        });
        let dir = tempfile::tempdir().unwrap();
        let files = plan(&m, dir.path()).unwrap();
        let names: Vec<_> = files
            .iter()
            .map(|f| {
                f.dest
                    .strip_prefix(dir.path())
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        assert_eq!(
            names,
            [
                "Patient.1.ndjson",
                "Patient.2.ndjson",
                "etc.1.ndjson",
                "error/OperationOutcome.1.ndjson"
            ]
        );
        assert_eq!((files[0].count, files[0].size), (Some(3), Some(10)));
        // Each file's folder is there; no empty `deleted/`.
        assert!(dir.path().join("error").is_dir());
        assert!(!dir.path().join("deleted").exists());
        let mut h = HeaderMap::new();
        h.insert(
            "content-range",
            HeaderValue::from_static("bytes 100-199/200"),
        );
        assert_eq!(content_range(&h), Some((100, Some(200))));
        h.insert("content-range", HeaderValue::from_static("bytes */200"));
        assert_eq!(content_range(&h), Some((0, Some(200))));
    }
}
