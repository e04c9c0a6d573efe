//! `fhirhose view VIEW.json INPUT… --format csv|ndjson|parquet --out DIR`: runs a SQL on FHIR
//! ViewDefinition over NDJSON / JSON files and folders (`.gz` too), for users who have an export.
//!
//! Lines are read in batches; worker threads parse and evaluate their share of a batch and format
//! its rows (Parquet: hands them back as rows); the batches' output is written in input order to `DIR/<view name>.<format>` through a
//! temporary file renamed at the end (a failed run leaves no partial output).

use std::fs;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::{Args, ValueEnum};
use serde_json::Value as Json;
use views::View;

use crate::progress;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Comma-separated, a header line of column names, RFC 4180 quoting, empty for null.
    Csv,
    /// One JSON object per row.
    Ndjson,
    /// Typed columns from the columns' `type`s, snappy, row groups of 1 M rows or 128 MiB.
    Parquet,
}

impl Format {
    fn extension(self) -> &'static str {
        match self {
            Format::Csv => "csv",
            Format::Ndjson => "ndjson",
            Format::Parquet => "parquet",
        }
    }
}

#[derive(Debug, Args)]
pub struct ViewArgs {
    /// The ViewDefinition (JSON).
    pub view: PathBuf,
    /// NDJSON files (`.ndjson`), JSON files (`.json`: a resource or a Bundle), `.gz` of either,
    /// or folders of them (walked recursively).
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value = "csv")]
    pub format: Format,
    /// Output folder: the rows go to `<view name>.<format>` in it (the view's `name`, else the
    /// ViewDefinition file's name).
    #[arg(long)]
    pub out: PathBuf,
    /// Count resources the view cannot turn into rows (or unreadable lines) and go on, instead of
    /// stopping at the first.
    #[arg(long)]
    pub skip_errors: bool,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,
}

const BATCH_LINES: usize = 8192;

#[derive(Default)]
struct Counts {
    resources: u64,
    matched: u64,
    rows: u64,
    skipped: u64,
}

pub fn run(args: ViewArgs) -> Result<(), String> {
    let text = fs::read_to_string(&args.view)
        .map_err(|e| format!("cannot read {}: {e}", args.view.display()))?;
    let view = View::from_json_str(&text).map_err(|e| format!("{}: {e}", args.view.display()))?;
    let mut files = Vec::new();
    for input in &args.inputs {
        collect(input, &mut files)?;
    }
    if files.is_empty() {
        return Err("no .ndjson or .json inputs found".into());
    }
    let stem = view.name().map(str::to_string).unwrap_or_else(|| {
        let name = args
            .view
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("view");
        match name.split('.').next() {
            Some(stem) if !stem.is_empty() => stem.to_string(),
            _ => "view".to_string(),
        }
    });
    let output = args.out.join(format!("{stem}.{}", args.format.extension()));
    fs::create_dir_all(&args.out)
        .map_err(|e| format!("cannot create {}: {e}", args.out.display()))?;
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let bar = if args.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        progress::counter("reading")
    };
    let started = Instant::now();
    let mut counts = Counts::default();
    let tmp = output.with_extension(format!(
        "{}.tmp{}",
        args.format.extension(),
        std::process::id()
    ));
    let result = (|| -> Result<(), String> {
        let f =
            fs::File::create(&tmp).map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
        let w = BufWriter::with_capacity(1 << 20, f);
        let werr = |e: std::io::Error| format!("cannot write {}: {e}", output.display());
        let perr = |e: views::parquet::ParquetError| format!("{}: {e}", output.display());
        let mut sink = if args.format == Format::Parquet {
            Sink::Parquet(Box::new(
                views::parquet::ParquetWriter::new(
                    &stem,
                    view.columns(),
                    w,
                    views::parquet::Options::default(),
                )
                .map_err(perr)?,
            ))
        } else {
            Sink::Text(w)
        };
        if let (Format::Csv, Sink::Text(w)) = (args.format, &mut sink) {
            let mut header = String::new();
            views::csv::write_header(view.columns(), &mut header);
            w.write_all(header.as_bytes()).map_err(werr)?;
        }
        let job = Job {
            view: &view,
            format: args.format,
            skip_errors: args.skip_errors,
            needle: format!("\"{}\"", view.resource_type()),
        };
        for file in &files {
            if !is_json_document(file) {
                let mut reader = open(file)?;
                let mut line_no = 0usize;
                loop {
                    let mut batch = Vec::with_capacity(BATCH_LINES);
                    while batch.len() < BATCH_LINES {
                        let mut l = String::new();
                        let n = reader
                            .read_line(&mut l)
                            .map_err(|e| format!("{}: {e}", file.display()))?;
                        if n == 0 {
                            break;
                        }
                        line_no += 1;
                        batch.push((line_no, l));
                    }
                    if batch.is_empty() {
                        break;
                    }
                    for (out, c) in job.batch(file, &batch, threads)? {
                        sink.write(out, &werr, &perr)?;
                        counts.add(&c);
                    }
                    bar.set_message(format!(
                        "{} resources, {} rows",
                        progress::thousands(counts.resources),
                        progress::thousands(counts.rows)
                    ));
                }
            } else {
                let mut text = String::new();
                open(file)?
                    .read_to_string(&mut text)
                    .map_err(|e| format!("{}: {e}", file.display()))?;
                let (out, c) = job.document(file, &text)?;
                sink.write(out, &werr, &perr)?;
                counts.add(&c);
            }
        }
        let mut w = match sink {
            Sink::Text(w) => w,
            Sink::Parquet(p) => p.finish().map_err(perr)?,
        };
        w.flush().map_err(werr)?;
        drop(w);
        fs::rename(&tmp, &output).map_err(|e| format!("cannot write {}: {e}", output.display()))
    })();
    bar.finish_and_clear();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "{} files, {} resources ({} of type {}{}), {} rows in {:.1} s ({} rows/s) -> {}",
        files.len(),
        progress::thousands(counts.resources),
        progress::thousands(counts.matched),
        view.resource_type(),
        if counts.skipped > 0 {
            format!(
                ", {} skipped for errors",
                progress::thousands(counts.skipped)
            )
        } else {
            String::new()
        },
        progress::thousands(counts.rows),
        secs,
        progress::thousands((counts.rows as f64 / secs.max(1e-9)) as u64),
        output.display()
    );
    Ok(())
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.resources += o.resources;
        self.matched += o.matched;
        self.rows += o.rows;
        self.skipped += o.skipped;
    }
}

/// A batch part's output: formatted text, or the rows themselves for Parquet.
enum Out {
    Text(String),
    Rows(Vec<views::Row>),
}

enum Sink {
    Text(BufWriter<fs::File>),
    Parquet(Box<views::parquet::ParquetWriter<BufWriter<fs::File>>>),
}

impl Sink {
    fn write(
        &mut self,
        out: Out,
        werr: &dyn Fn(std::io::Error) -> String,
        perr: &dyn Fn(views::parquet::ParquetError) -> String,
    ) -> Result<(), String> {
        match (self, out) {
            (Sink::Text(w), Out::Text(text)) => w.write_all(text.as_bytes()).map_err(werr),
            (Sink::Parquet(p), Out::Rows(rows)) => {
                rows.iter().try_for_each(|r| p.write_row(r)).map_err(perr)
            }
            _ => Err("internal error: output kind does not match the format".into()),
        }
    }
}

struct Job<'v> {
    view: &'v View,
    format: Format,
    skip_errors: bool,
    /// `"Patient"`: a line without it cannot hold a resource of the view's type.
    needle: String,
}

impl Job<'_> {
    /// A batch of NDJSON lines, split over the threads; each part's text and counts, in order.
    fn batch(
        &self,
        file: &Path,
        lines: &[(usize, String)],
        threads: usize,
    ) -> Result<Vec<(Out, Counts)>, String> {
        let chunk = lines.len().div_ceil(threads).max(1);
        if threads == 1 || lines.len() < 64 {
            return Ok(vec![self.lines(file, lines)?]);
        }
        std::thread::scope(|s| {
            let handles: Vec<_> = lines
                .chunks(chunk)
                .map(|part| s.spawn(move || self.lines(file, part)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err("a worker thread panicked".into()))
                })
                .collect()
        })
    }

    fn out(&self) -> Out {
        match self.format {
            Format::Parquet => Out::Rows(Vec::new()),
            Format::Csv | Format::Ndjson => Out::Text(String::new()),
        }
    }

    fn lines(&self, file: &Path, lines: &[(usize, String)]) -> Result<(Out, Counts), String> {
        let mut out = self.out();
        let mut c = Counts::default();
        for (line_no, line) in lines {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            c.resources += 1;
            if !line.contains(self.needle.as_str()) {
                continue;
            }
            let resource: Json = match serde_json::from_str(line) {
                Ok(r) => r,
                Err(e) if self.skip_errors => {
                    let _ = e;
                    c.skipped += 1;
                    continue;
                }
                Err(e) => return Err(format!("{}:{line_no}: invalid JSON: {e}", file.display())),
            };
            self.resource(file, *line_no, &resource, &mut out, &mut c)?;
        }
        Ok((out, c))
    }

    /// A `.json` file: one resource, or a Bundle whose entries are read (unless the view reads
    /// Bundles).
    fn document(&self, file: &Path, text: &str) -> Result<(Out, Counts), String> {
        let doc: Json = serde_json::from_str(text)
            .map_err(|e| format!("{}: invalid JSON: {e}", file.display()))?;
        let mut out = self.out();
        let mut c = Counts::default();
        let is_bundle = doc.get("resourceType").and_then(Json::as_str) == Some("Bundle");
        if is_bundle && self.view.resource_type() != "Bundle" {
            let entries = doc.get("entry").and_then(Json::as_array);
            for (i, e) in entries.into_iter().flatten().enumerate() {
                if let Some(r) = e.get("resource") {
                    c.resources += 1;
                    self.resource(file, i + 1, r, &mut out, &mut c)?;
                }
            }
        } else {
            c.resources += 1;
            self.resource(file, 1, &doc, &mut out, &mut c)?;
        }
        Ok((out, c))
    }

    fn resource(
        &self,
        file: &Path,
        at: usize,
        resource: &Json,
        out: &mut Out,
        c: &mut Counts,
    ) -> Result<(), String> {
        if resource.get("resourceType").and_then(Json::as_str) != Some(self.view.resource_type()) {
            return Ok(());
        }
        c.matched += 1;
        // A resource's error comes before its first row: it adds all its rows or none.
        let each = self.view.for_each_row(resource, |row| -> Result<(), ()> {
            match out {
                Out::Rows(all) => all.push(row.to_vec()),
                Out::Text(text) => match self.format {
                    Format::Ndjson => views::ndjson::write_row(self.view.columns(), row, text),
                    _ => views::csv::write_row(row, text),
                },
            }
            Ok(())
        });
        match each {
            Ok(n) => c.rows += n as u64,
            Err(views::EachRowError::Row(e)) => {
                if self.skip_errors {
                    c.skipped += 1;
                    return Ok(());
                }
                return Err(format!("{}:{at}: {e}", file.display()));
            }
            Err(views::EachRowError::Sink(())) => {}
        }
        Ok(())
    }
}

fn strip_gz(p: &Path) -> String {
    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
    name.strip_suffix(".gz").unwrap_or(name).to_string()
}

fn is_json_document(p: &Path) -> bool {
    strip_gz(p).ends_with(".json")
}

fn is_input(p: &Path) -> bool {
    let n = strip_gz(p);
    n.ends_with(".ndjson") || n.ends_with(".json")
}

/// A file as given (whatever its name, NDJSON unless it ends in `.json`/`.json.gz`), or the
/// inputs under a folder, sorted, recursively.
fn collect(p: &Path, out: &mut Vec<PathBuf>) -> Result<(), String> {
    let meta = fs::metadata(p).map_err(|e| format!("{}: {e}", p.display()))?;
    if !meta.is_dir() {
        out.push(p.to_path_buf());
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = fs::read_dir(p)
        .map_err(|e| format!("{}: {e}", p.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for e in entries {
        if e.is_dir() {
            collect(&e, out)?;
        } else if is_input(&e) {
            out.push(e);
        }
    }
    Ok(())
}

fn open(path: &Path) -> Result<Box<dyn BufRead>, String> {
    let f = fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(if path.extension().is_some_and(|e| e == "gz") {
        Box::new(BufReader::with_capacity(
            1 << 20,
            flate2::read::MultiGzDecoder::new(f),
        ))
    } else {
        Box::new(BufReader::with_capacity(1 << 20, f))
    })
}
