//! `fhirhose anonymize`: the reference tool's options (-i/-o/-c/-b/-r/-s) plus `.gz`, `--threads`,
//! a progress bar, a summary and `--decrypt`. Output goes to a temporary file renamed at the end.

use std::fs;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use deid::{Config, Engine};
use serde_json::Value as Json;

#[derive(Debug, Clone, clap::Args)]
pub struct AnonymizeArgs {
    /// Input file or folder (or give it as the last argument).
    #[arg(short = 'i', long = "input", required_unless_present = "input_arg")]
    pub input: Option<PathBuf>,
    #[arg(value_name = "INPUT", conflicts_with = "input")]
    pub input_arg: Option<PathBuf>,
    /// Output file or folder (not with --dry-run).
    #[arg(short = 'o', long, required_unless_present = "dry_run")]
    pub output: Option<PathBuf>,
    /// Anonymizer configuration (Microsoft FHIR anonymizer format).
    #[arg(short = 'c', long)]
    pub config: PathBuf,
    /// Inputs are NDJSON (one resource per line; `.ndjson` / `.ndjson.gz`).
    #[arg(short = 'b', long)]
    pub bulk: bool,
    /// Walk sub-folders of a folder input.
    #[arg(short = 'r', long)]
    pub recursive: bool,
    /// Skip inputs whose output already exists.
    #[arg(short = 's', long)]
    pub skip: bool,
    /// Worker threads for NDJSON (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Decrypt values produced by `encrypt` rules (with the config's encryptKey) instead of anonymizing.
    #[arg(long)]
    pub decrypt: bool,
    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Write no data: print a report of what the configuration would do (rules, untouched
    /// fields, residual PHI, k-anonymity of the output Patients).
    #[arg(long, conflicts_with = "decrypt")]
    pub dry_run: bool,
    /// The dry-run report as `table` (default) or `json`.
    #[arg(long, default_value = "table", value_parser = ["table", "json"])]
    pub report_format: String,
    /// Dry run: equivalence classes smaller than this are counted.
    #[arg(long, default_value_t = 5)]
    pub k: usize,
    /// Dry run: quasi-identifiers of the output Patients (birthYear, ageBand, gender, zip3, state).
    #[arg(long, value_delimiter = ',', default_value = "birthYear,gender,zip3")]
    pub quasi_identifiers: Vec<String>,
    /// Keys for the parameters the configuration leaves empty (a stored key set, resolved by
    /// the `fhirhose` binary from `--key-set`).
    #[arg(skip)]
    pub keys: Option<deid::keys::Keys>,
}

impl AnonymizeArgs {
    /// Arguments for a plain run (the library's callers).
    pub fn new(input: PathBuf, output: PathBuf, config: PathBuf) -> AnonymizeArgs {
        AnonymizeArgs {
            input: Some(input),
            input_arg: None,
            output: Some(output),
            config,
            bulk: false,
            recursive: false,
            skip: false,
            threads: None,
            decrypt: false,
            quiet: true,
            dry_run: false,
            report_format: "table".into(),
            k: 5,
            quasi_identifiers: vec!["birthYear".into(), "gender".into(), "zip3".into()],
            keys: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Config {
        path: PathBuf,
        source: deid::ConfigError,
    },
    #[error("{path}:{line}: {source}")]
    Resource {
        path: PathBuf,
        line: usize,
        source: deid::DeidError,
    },
    /// A socket, device or folder named as the input (a device may never end).
    #[error("{path}: not a regular file")]
    NotRegularFile { path: PathBuf },
    #[error("{0}")]
    Usage(String),
}

/// Longest NDJSON line, the same as the server's `$import` (`export::import::MAX_LINE_BYTES`):
/// a longer line is a bad line, found without holding more than this in memory (a gzip bomb
/// of one endless line must not exhaust memory).
pub const MAX_LINE_BYTES: usize = 64 * 1024 * 1024;

/// An entry of an input folder that was not read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedInput {
    pub path: PathBuf,
    pub reason: &'static str,
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub files: usize,
    pub files_skipped: usize,
    pub resources: u64,
    /// Resources replaced by the `processingErrors: skip` stub.
    pub resources_skipped: u64,
    /// (rule index, rule path, nodes processed).
    pub rule_hits: Vec<(usize, String, u64)>,
    /// `--dry-run`: the report (also printed to standard output).
    pub report: Option<deid::report::Report>,
    /// Entries of the input folder left alone: symbolic links (never followed, so a walk
    /// neither loops nor reads outside the input folder) and what is not a regular file.
    pub skipped: Vec<SkippedInput>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CliError + '_ {
    move |source| CliError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Opens a regular file (a link named by the user is followed: it is their choice), `.gz`
/// decompressed; or a FIFO named by the user (`-i <(zcat …)`: they write to it; a folder's walk
/// never yields one). Anything else is refused before it is opened: a device may never end.
fn open_text(path: &Path) -> Result<Box<dyn BufRead + Send>, CliError> {
    let readable = |m: &fs::Metadata| {
        #[cfg(unix)]
        let fifo = std::os::unix::fs::FileTypeExt::is_fifo(&m.file_type());
        #[cfg(not(unix))]
        let fifo = false;
        m.is_file() || fifo
    };
    if !readable(&fs::metadata(path).map_err(io(path))?) {
        return Err(CliError::NotRegularFile {
            path: path.to_path_buf(),
        });
    }
    let f = fs::File::open(path).map_err(io(path))?;
    // Replaced between the check and the open: still refused.
    if !readable(&f.metadata().map_err(io(path))?) {
        return Err(CliError::NotRegularFile {
            path: path.to_path_buf(),
        });
    }
    if path.extension().is_some_and(|e| e == "gz") {
        Ok(Box::new(BufReader::new(flate2::read::MultiGzDecoder::new(
            f,
        ))))
    } else {
        Ok(Box::new(BufReader::new(f)))
    }
}

/// Writes through a temporary sibling file, renamed over `path` only on success.
fn write_atomic(
    path: &Path,
    body: &mut dyn FnMut(&mut dyn Write) -> Result<(), CliError>,
) -> Result<(), CliError> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        fs::create_dir_all(dir).map_err(io(dir))?;
    }
    let tmp = path.with_extension(format!(
        "{}.tmp{}",
        path.extension().and_then(|e| e.to_str()).unwrap_or(""),
        std::process::id()
    ));
    let result = (|| {
        let f = fs::File::create(&tmp).map_err(io(&tmp))?;
        let mut w: Box<dyn Write> = if path.extension().is_some_and(|e| e == "gz") {
            Box::new(flate2::write::GzEncoder::new(
                BufWriter::new(f),
                flate2::Compression::default(),
            ))
        } else {
            Box::new(BufWriter::new(f))
        };
        body(&mut w)?;
        w.flush().map_err(io(&tmp))?;
        drop(w);
        fs::rename(&tmp, path).map_err(io(path))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn is_input(p: &Path, bulk: bool) -> bool {
    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let name = name.strip_suffix(".gz").unwrap_or(name);
    if bulk {
        name.ends_with(".ndjson")
    } else {
        name.ends_with(".json")
    }
}

/// The input files of folder `dir`, sorted. Symbolic links are never followed (a link to `.`
/// made the walk loop, and a link could lead out of the input folder): those the walk would
/// have read are reported in `skipped`, as are FIFOs, sockets and devices with an input's name.
fn collect(
    dir: &Path,
    recursive: bool,
    bulk: bool,
    out: &mut Vec<PathBuf>,
    skipped: &mut Vec<SkippedInput>,
) -> Result<(), CliError> {
    let mut entries: Vec<(PathBuf, fs::FileType)> = fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_type().ok().map(|t| (e.path(), t)))
        .collect();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    for (p, kind) in entries {
        if kind.is_symlink() {
            // Looked at only to decide whether to warn: a link to a folder matters with -r.
            let to_folder = fs::metadata(&p).is_ok_and(|m| m.is_dir());
            if (to_folder && recursive) || (!to_folder && is_input(&p, bulk)) {
                skipped.push(SkippedInput {
                    path: p,
                    reason: "a symbolic link (not followed)",
                });
            }
        } else if kind.is_dir() {
            if recursive {
                collect(&p, recursive, bulk, out, skipped)?;
            }
        } else if is_input(&p, bulk) {
            if kind.is_file() {
                out.push(p);
            } else {
                skipped.push(SkippedInput {
                    path: p,
                    reason: "not a regular file",
                });
            }
        }
    }
    Ok(())
}

/// Replaces every string that decrypts with the key by its plaintext.
fn decrypt_all(engine: &Engine, v: &mut Json) {
    match v {
        Json::String(s) => {
            if let Ok(p) = engine.decrypt(s) {
                *s = p;
            }
        }
        Json::Array(a) => a.iter_mut().for_each(|e| decrypt_all(engine, e)),
        Json::Object(o) => o.values_mut().for_each(|e| decrypt_all(engine, e)),
        _ => {}
    }
}

struct Job<'a> {
    engine: &'a Engine,
    decrypt: bool,
}

impl Job<'_> {
    fn one(
        &self,
        text: &str,
        path: &Path,
        line: usize,
        summary: &mut Summary,
    ) -> Result<Json, CliError> {
        let err = |source| CliError::Resource {
            path: path.to_path_buf(),
            line,
            source,
        };
        if self.decrypt {
            let mut v: Json = serde_json::from_str(text)
                .map_err(|e| err(deid::DeidError::InvalidInput(e.to_string())))?;
            decrypt_all(self.engine, &mut v);
            summary.resources += 1;
            return Ok(v);
        }
        let o = self.engine.anonymize_str(text).map_err(err)?;
        summary.resources += 1;
        if o.skipped {
            summary.resources_skipped += 1;
        }
        for (i, h) in o.rule_hits.iter().enumerate() {
            if let Some(slot) = summary.rule_hits.get_mut(i) {
                slot.2 += h;
            }
        }
        Ok(o.resource)
    }
}

/// Lines of NDJSON read and anonymized together: a unit of work for one thread.
const BATCH_LINES: usize = 1024;
/// A batch also ends once it holds this many bytes of input.
const BATCH_BYTES: usize = 1 << 20;
/// Batches read but not yet written, per worker thread (bounds memory: a few MB per thread).
const BATCHES_IN_FLIGHT: usize = 4;

/// Consecutive NDJSON lines: their text back to back, and where each ends.
struct Batch {
    /// Sequence number of the batch in the file (0, 1, ...): the output order.
    seq: u64,
    /// 1-based line number of the first line.
    first_line: usize,
    text: String,
    /// End offset in `text` of each line, line terminator excluded.
    ends: Vec<usize>,
    /// The line after the last one could not be read (too long, not UTF-8): the input's last
    /// batch, which fails there once its lines are done, so the first bad line is reported.
    bad_line: Option<String>,
}

/// How [`read_line`] ended.
#[derive(Debug, PartialEq, Eq)]
enum LineRead {
    End,
    /// A line in the buffer, without its terminator.
    Line,
    /// Longer than [`MAX_LINE_BYTES`]: the buffer holds its first bytes only.
    TooLong,
}

/// Reads one line into `buf`, reading at most [`MAX_LINE_BYTES`] + 1 bytes.
fn read_line(reader: &mut dyn BufRead, buf: &mut Vec<u8>) -> std::io::Result<LineRead> {
    buf.clear();
    let n = (&mut *reader)
        .take(MAX_LINE_BYTES as u64 + 1)
        .read_until(b'\n', buf)?;
    if n == 0 {
        return Ok(LineRead::End);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
    } else if buf.len() > MAX_LINE_BYTES {
        return Ok(LineRead::TooLong);
    }
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    Ok(LineRead::Line)
}

/// Why a line read by [`read_line`] is bad, `None` when it is text.
fn bad_line(read: &LineRead, line: &[u8]) -> Option<String> {
    match read {
        LineRead::TooLong => Some(format!("the line is longer than {MAX_LINE_BYTES} bytes")),
        _ if std::str::from_utf8(line).is_err() => Some("the line is not UTF-8".into()),
        _ => None,
    }
}

/// Reads the next batch of lines (`None` at the end of the input).
fn read_batch(
    reader: &mut dyn BufRead,
    seq: u64,
    first_line: usize,
    input: &Path,
) -> Result<Option<Batch>, CliError> {
    let mut text = String::new();
    let mut ends = Vec::with_capacity(BATCH_LINES);
    let mut line = Vec::new();
    let mut bad = None;
    while ends.len() < BATCH_LINES && text.len() < BATCH_BYTES {
        let read = read_line(reader, &mut line).map_err(io(input))?;
        if read == LineRead::End {
            break;
        }
        if let Some(why) = bad_line(&read, &line) {
            bad = Some(why);
            break;
        }
        text.push_str(&String::from_utf8_lossy(&line));
        ends.push(text.len());
    }
    Ok((!ends.is_empty() || bad.is_some()).then_some(Batch {
        seq,
        first_line,
        text,
        ends,
        bad_line: bad,
    }))
}

/// A summary with this run's rule list and no counts (a thread's own, merged at the end).
fn empty_summary(template: &Summary) -> Summary {
    Summary {
        rule_hits: template
            .rule_hits
            .iter()
            .map(|(i, p, _)| (*i, p.clone(), 0))
            .collect(),
        ..Summary::default()
    }
}

fn merge_summary(into: &mut Summary, local: Summary) {
    into.resources += local.resources;
    into.resources_skipped += local.resources_skipped;
    for (slot, l) in into.rule_hits.iter_mut().zip(local.rule_hits) {
        slot.2 += l.2;
    }
}

/// Anonymizes the lines of one batch into `out`, one output line each.
fn anonymize_lines(
    job: &Job<'_>,
    batch: &Batch,
    input: &Path,
    summary: &mut Summary,
    out: &mut Vec<u8>,
) -> Result<(), CliError> {
    let mut start = 0;
    for (i, &end) in batch.ends.iter().enumerate() {
        let line = &batch.text[start..end];
        start = end;
        let n = batch.first_line + i;
        if line.trim().is_empty() {
            return Err(CliError::Resource {
                path: input.to_path_buf(),
                line: n,
                source: deid::DeidError::InvalidInput("blank NDJSON line".into()),
            });
        }
        let v = job.one(line, input, n, summary)?;
        serde_json::to_writer(&mut *out, &v).map_err(|e| io(input)(e.into()))?;
        out.push(b'\n');
    }
    match &batch.bad_line {
        Some(why) => Err(CliError::Resource {
            path: input.to_path_buf(),
            line: batch.first_line + batch.ends.len(),
            source: deid::DeidError::InvalidInput(why.clone()),
        }),
        None => Ok(()),
    }
}

/// Anonymizes an NDJSON stream into `w`, keeping the input order. One thread does everything
/// when `threads` is 1; otherwise a reader thread hands batches of lines to `threads` workers,
/// each anonymizes and serializes its batch into one buffer, and the calling thread writes the
/// buffers in order — reading, anonymizing and writing overlap, and no thread waits for a whole
/// round of batches to finish.
fn anonymize_ndjson(
    job: &Job<'_>,
    mut reader: Box<dyn BufRead + Send>,
    w: &mut dyn Write,
    threads: usize,
    input: &Path,
    output: &Path,
    summary: &mut Summary,
) -> Result<(), CliError> {
    use std::sync::{Arc, Mutex, mpsc};
    if threads <= 1 {
        let mut out = Vec::new();
        let (mut seq, mut line) = (0, 1);
        while let Some(batch) = read_batch(&mut *reader, seq, line, input)? {
            out.clear();
            // A batch with a bad line fails here: nothing is read after it.
            anonymize_lines(job, &batch, input, summary, &mut out)?;
            w.write_all(&out).map_err(io(output))?;
            seq += 1;
            line += batch.ends.len();
        }
        return Ok(());
    }
    type Done = (u64, Result<Vec<u8>, CliError>);
    let in_flight = threads * BATCHES_IN_FLIGHT;
    // Credits: the reader takes one per batch, the writer gives it back once the batch is
    // written, so at most `in_flight` batches exist at a time however the workers interleave.
    let (credit_tx, credit_rx) = mpsc::sync_channel::<()>(in_flight);
    for _ in 0..in_flight {
        credit_tx.send(()).expect("the receiver is alive");
    }
    let (work_tx, work_rx) = mpsc::channel::<Batch>();
    let (done_tx, done_rx) = mpsc::channel::<Done>();
    // Owned by the workers only: once they are all gone the reader's sends fail and it stops.
    let work_rx = Arc::new(Mutex::new(work_rx));
    let template = empty_summary(summary);
    std::thread::scope(|s| {
        let reader_thread = s.spawn(move || -> Result<(), CliError> {
            let (mut seq, mut line) = (0, 1);
            loop {
                if credit_rx.recv().is_err() {
                    return Ok(()); // the writer stopped
                }
                let Some(batch) = read_batch(&mut *reader, seq, line, input)? else {
                    return Ok(());
                };
                seq += 1;
                line += batch.ends.len();
                // A batch with a bad line is the last: its worker fails at that line.
                let last = batch.bad_line.is_some();
                if work_tx.send(batch).is_err() || last {
                    return Ok(());
                }
            }
        });
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                let (work_rx, done_tx) = (Arc::clone(&work_rx), done_tx.clone());
                let mut local = template.clone();
                s.spawn(move || {
                    loop {
                        let next = work_rx.lock().map(|rx| rx.recv());
                        let Ok(Ok(batch)) = next else {
                            break;
                        };
                        let mut out = Vec::with_capacity(batch.text.len() + batch.text.len() / 4);
                        let r = anonymize_lines(job, &batch, input, &mut local, &mut out);
                        if done_tx.send((batch.seq, r.map(|()| out))).is_err() {
                            break;
                        }
                    }
                    local
                })
            })
            .collect();
        drop((work_rx, done_tx));
        // The writer: buffers arrive in any order and are written in sequence.
        let mut pending = std::collections::BTreeMap::new();
        let mut next = 0u64;
        let written = (|| -> Result<(), CliError> {
            for (seq, r) in done_rx.iter() {
                pending.insert(seq, r);
                while let Some(r) = pending.remove(&next) {
                    w.write_all(&r?).map_err(io(output))?;
                    next += 1;
                    let _ = credit_tx.send(());
                }
            }
            Ok(())
        })();
        // On an error this stops the reader (no credit) and the workers (no receiver).
        drop((credit_tx, done_rx));
        for h in workers {
            match h.join() {
                Ok(local) => merge_summary(summary, local),
                Err(_) => return Err(CliError::Usage("worker panicked".into())),
            }
        }
        let read = reader_thread
            .join()
            .unwrap_or_else(|_| Err(CliError::Usage("reader panicked".into())));
        written.and(read)
    })
}

/// `--dry-run`: every input resource through [`deid::report::DryRun`]; nothing is written.
fn dry_run(args: &AnonymizeArgs, config: &Config, input_root: &Path) -> Result<Summary, CliError> {
    let mut qis = Vec::new();
    for q in &args.quasi_identifiers {
        qis.push(deid::report::QuasiIdentifier::parse(q).ok_or_else(|| {
            CliError::Usage(format!(
                "unknown quasi-identifier '{q}' (birthYear, ageBand, gender, zip3, state)"
            ))
        })?);
    }
    let mut risk = deid::report::RiskOptions::new(chrono_today());
    risk.quasi_identifiers = qis;
    risk.k = args.k.max(1);
    let mut files = Vec::new();
    let mut summary = Summary::default();
    if input_root.is_dir() {
        collect(
            input_root,
            args.recursive,
            args.bulk,
            &mut files,
            &mut summary.skipped,
        )?;
    } else {
        files.push(input_root.to_path_buf());
    }
    let folder_name = input_root
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("")
        .to_string();
    let mut all: Option<deid::report::DryRun> = None;
    for input in &files {
        let file_name = input.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let engine = Engine::new(config.clone()).with_file_context(file_name, &folder_name);
        let mut dry = deid::report::DryRun::new(engine, risk.clone());
        let mut text = String::new();
        let mut reader = open_text(input)?;
        let one = |line: usize, t: &str, dry: &mut deid::report::DryRun| {
            let err = |source| CliError::Resource {
                path: input.clone(),
                line,
                source,
            };
            let v: Json = serde_json::from_str(t.trim_start_matches('\u{feff}'))
                .map_err(|e| err(deid::DeidError::InvalidInput(e.to_string())))?;
            // A resource the configuration fails on is counted in the report, not fatal.
            let _ = dry.add(&v);
            Ok::<(), CliError>(())
        };
        if args.bulk {
            let mut n = 0;
            let mut line = Vec::new();
            loop {
                let read = read_line(&mut *reader, &mut line).map_err(io(input))?;
                if read == LineRead::End {
                    break;
                }
                n += 1;
                if let Some(why) = bad_line(&read, &line) {
                    return Err(CliError::Resource {
                        path: input.clone(),
                        line: n,
                        source: deid::DeidError::InvalidInput(why),
                    });
                }
                let text = String::from_utf8_lossy(&line);
                if !text.trim().is_empty() {
                    one(n, &text, &mut dry)?;
                }
            }
        } else {
            reader.read_to_string(&mut text).map_err(io(input))?;
            one(1, &text, &mut dry)?;
        }
        summary.files += 1;
        match &mut all {
            None => all = Some(dry),
            Some(a) => a.merge(dry),
        }
    }
    let report = match all {
        Some(d) => d.report(),
        None => deid::report::DryRun::new(Engine::new(config.clone()), risk).report(),
    };
    summary.resources = report.resources;
    summary.resources_skipped = report.skipped;
    let mut out = std::io::stdout().lock();
    let printed = if args.report_format == "json" {
        serde_json::to_writer_pretty(&mut out, &report)
            .map_err(std::io::Error::from)
            .and_then(|()| writeln!(out))
    } else {
        write!(out, "{report}")
    };
    printed.map_err(io(Path::new("<stdout>")))?;
    summary.report = Some(report);
    Ok(summary)
}

/// Today's date, for the age-over-89 rule and age bands.
fn chrono_today() -> chrono::NaiveDate {
    chrono::Local::now().date_naive()
}

/// Runs the command. Fails (non-zero exit) on the first bad file, line or rule; no partial output.
pub fn run(args: &AnonymizeArgs) -> Result<Summary, CliError> {
    let input_root = args
        .input
        .as_ref()
        .or(args.input_arg.as_ref())
        .ok_or_else(|| CliError::Usage("no input given".into()))?
        .clone();
    let mut cfg_text = fs::read_to_string(&args.config).map_err(io(&args.config))?;
    if let Some(keys) = &args.keys {
        cfg_text = deid::keys::fill_empty(&cfg_text, keys)
            .map_err(|e| CliError::Usage(format!("{}: {e}", args.config.display())))?
            .0;
    }
    let config = Config::parse(&cfg_text).map_err(|source| CliError::Config {
        path: args.config.clone(),
        source,
    })?;
    if args.dry_run {
        return dry_run(args, &config, &input_root);
    }
    let output_root = args
        .output
        .clone()
        .ok_or_else(|| CliError::Usage("--output is required (or use --dry-run)".into()))?;
    let mut summary = Summary {
        rule_hits: config
            .rules
            .iter()
            .map(|r| (r.index, r.path.clone(), 0))
            .collect(),
        ..Summary::default()
    };
    let folder_mode = input_root.is_dir();
    let inputs: Vec<(PathBuf, PathBuf)> = if folder_mode {
        let (a, b) = (
            fs::canonicalize(&input_root).map_err(io(&input_root))?,
            fs::create_dir_all(&output_root)
                .and_then(|_| fs::canonicalize(&output_root))
                .map_err(io(&output_root))?,
        );
        if a == b {
            return Err(CliError::Usage(
                "input and output folders must differ".into(),
            ));
        }
        let mut files = Vec::new();
        collect(
            &input_root,
            args.recursive,
            args.bulk,
            &mut files,
            &mut summary.skipped,
        )?;
        files
            .into_iter()
            .map(|f| {
                let rel = f.strip_prefix(&input_root).unwrap_or(&f).to_path_buf();
                let out = output_root.join(rel);
                (f, out)
            })
            .collect()
    } else {
        vec![(input_root.clone(), output_root.clone())]
    };
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let bar = if args.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(inputs.len() as u64)
    };
    let folder_name = input_root
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("")
        .to_string();
    for (input, output) in &inputs {
        if args.skip && output.exists() {
            summary.files_skipped += 1;
            bar.inc(1);
            continue;
        }
        let file_name = input.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let engine = Engine::new(config.clone()).with_file_context(file_name, &folder_name);
        let job = Job {
            engine: &engine,
            decrypt: args.decrypt,
        };
        if args.bulk {
            // Streams: batches of lines go to the threads and come back in order.
            let mut reader = Some(open_text(input)?);
            write_atomic(output, &mut |w| match reader.take() {
                Some(r) => anonymize_ndjson(&job, r, w, threads, input, output, &mut summary),
                None => Ok(()),
            })?;
        } else {
            let mut text = String::new();
            open_text(input)?
                .read_to_string(&mut text)
                .map_err(io(input))?;
            let v = job.one(&text, input, 1, &mut summary)?;
            let pretty = serde_json::to_string_pretty(&v).unwrap_or_default();
            write_atomic(output, &mut |w| {
                w.write_all(pretty.as_bytes()).map_err(io(output))
            })?;
        }
        summary.files += 1;
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(summary)
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} files ({} skipped as existing), {} resources ({} replaced by the processing-error stub)",
            self.files, self.files_skipped, self.resources, self.resources_skipped
        )?;
        for (i, p, h) in &self.rule_hits {
            if *h > 0 {
                writeln!(f, "  rule {i} {p}: {h}")?;
            }
        }
        for s in &self.skipped {
            writeln!(f, "warning: skipped {}: {}", s.path.display(), s.reason)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts the bytes taken from the inner reader.
    struct Counted<R> {
        inner: R,
        taken: std::sync::Arc<std::sync::atomic::AtomicU64>,
    }

    impl<R: Read> Read for Counted<R> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.inner.read(buf)?;
            self.taken
                .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
            Ok(n)
        }
    }

    /// Security review: a line without a newline (a gzip bomb of `a`) was read whole, and
    /// aborted the process with a multi-gigabyte allocation.
    #[test]
    fn an_endless_line_is_a_bad_line_found_in_bounded_memory() {
        let taken = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut reader = BufReader::new(Counted {
            inner: std::io::repeat(b'a'),
            taken: taken.clone(),
        });
        let batch = read_batch(&mut reader, 0, 1, Path::new("in.ndjson"))
            .expect("read")
            .expect("a batch");
        assert!(batch.ends.is_empty());
        assert_eq!(
            batch.bad_line,
            Some(format!("the line is longer than {MAX_LINE_BYTES} bytes"))
        );
        let taken = taken.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            taken <= MAX_LINE_BYTES as u64 + 64 * 1024,
            "read {taken} bytes"
        );
    }

    #[test]
    fn lines_up_to_the_limit_are_read_and_the_bad_one_ends_the_batch() {
        let mut text = b"{\"a\":1}\r\n{}\n".to_vec();
        text.extend(std::iter::repeat_n(b'x', MAX_LINE_BYTES + 1));
        text.extend(b"\n{}\n");
        let mut reader = &text[..];
        let batch = read_batch(&mut reader, 0, 7, Path::new("in.ndjson"))
            .expect("read")
            .expect("a batch");
        assert_eq!(batch.text, "{\"a\":1}{}");
        assert_eq!(batch.ends, vec![7, 9]);
        assert!(batch.bad_line.is_some());
        let mut exact = vec![b'x'; MAX_LINE_BYTES];
        exact.push(b'\n');
        let batch = read_batch(&mut &exact[..], 0, 1, Path::new("in.ndjson"))
            .expect("read")
            .expect("a batch");
        assert_eq!((batch.ends.len(), batch.bad_line), (1, None));
        let batch = read_batch(&mut &b"{}\n\xff\n"[..], 0, 1, Path::new("in.ndjson"))
            .expect("read")
            .expect("a batch");
        assert_eq!(batch.ends.len(), 1);
        assert_eq!(batch.bad_line.as_deref(), Some("the line is not UTF-8"));
    }
}
