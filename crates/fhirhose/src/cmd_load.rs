//! `fhirhose load`: straight into a data directory, or over HTTP into a running server.

use std::path::PathBuf;

use clap::Args;

use crate::failure::Failure;
use crate::progress::{counter, thousands};

#[derive(Debug, Args)]
pub struct LoadArgs {
    /// Data directory to load into (refused while a server holds it).
    #[arg(long, env = "FHIRHOSE_DATA_DIR", conflicts_with = "server")]
    pub data_dir: Option<PathBuf>,
    /// The database to load into: `sqlite` (default: the data directory's) or a PostgreSQL URL.
    #[arg(long, env = "FHIRHOSE_DATABASE", conflicts_with = "server")]
    pub database: Option<store::DatabaseArg>,
    /// Base URL of a running Fhirhose server to send batches to instead.
    #[arg(long)]
    pub server: Option<String>,
    /// Stop at the first invalid resource instead of skipping it.
    #[arg(long)]
    pub strict: bool,
    /// Write no search index rows (a faster bulk load); searches miss these resources until
    /// `fhirhose reindex`, and the server warns at start. Export does not need the indexes.
    #[arg(long, conflicts_with = "server")]
    pub no_index: bool,
    /// How the search indexes are built: `inline` puts every index row into its value index as
    /// it is written; `rebuild` drops the value indexes at the start and builds them once,
    /// sorted, at the end (much faster for large loads);
    /// `auto` rebuilds when the input is at least as large as the data already stored.
    #[arg(long, value_enum, default_value_t = IndexBuildArg::Auto, conflicts_with_all = ["server", "no_index"])]
    pub index_build: IndexBuildArg,
    /// Resources per store transaction (default 5000), or per batch Bundle with `--server`
    /// (default 500).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub batch_size: Option<u32>,
    /// Files or folders of NDJSON, Bundle JSON, or .gz of either.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum IndexBuildArg {
    Auto,
    Inline,
    Rebuild,
}

pub fn run(args: LoadArgs) -> Result<(), Failure> {
    let bar = counter("starting");
    let mut on_progress = |p: &ingest::LoadProgress| {
        if p.building_indexes {
            bar.set_message(format!(
                "{} resources written, building search indexes",
                thousands(p.resources)
            ));
            return;
        }
        let secs = p.elapsed.as_secs_f64().max(1e-3);
        bar.set_message(format!(
            "{} resources ({:.0}/s), {} invalid, file {}/{}",
            thousands(p.resources),
            p.resources as f64 / secs,
            thousands(p.invalid),
            p.files_done,
            p.files_total
        ));
    };
    let summary = match (&args.server, &args.data_dir) {
        (Some(url), _) => {
            let mut options = ingest::LoadOptions::for_server();
            options.strict = args.strict;
            if let Some(n) = args.batch_size {
                options.chunk_size = n as usize;
            }
            ingest::load_to_server(
                url.trim_end_matches('/'),
                &args.paths,
                &options,
                &mut on_progress,
            )
            .map_err(|e| e.to_string())?
        }
        (None, dir) => {
            let dir = dir
                .clone()
                .unwrap_or_else(|| PathBuf::from("./fhirhose-data"));
            let database = store::Database::from_flag(args.database.as_ref(), &dir);
            let store = server::open_database(&database, !args.no_index)
                .map_err(|e| Failure::store(format!("cannot open {}", database.describe()), &e))?;
            if args.no_index {
                store
                    .set_indexes_stale(true)
                    .map_err(|e| Failure::store("cannot record --no-index", &e))?;
            }
            let mut options = ingest::LoadOptions {
                strict: args.strict,
                index_build: match args.index_build {
                    IndexBuildArg::Auto => ingest::IndexBuild::Auto,
                    IndexBuildArg::Inline => ingest::IndexBuild::Inline,
                    IndexBuildArg::Rebuild => ingest::IndexBuild::Rebuild,
                },
                ..ingest::LoadOptions::default()
            };
            if let Some(n) = args.batch_size {
                options.chunk_size = n as usize;
            }
            ingest::load_into_store(&*store, &args.paths, &options, &mut on_progress)
                .map_err(|e| e.to_string())?
        }
    };
    bar.finish_and_clear();
    let secs = summary.elapsed.as_secs_f64().max(1e-3);
    println!(
        "loaded {} resources from {} files in {:.1}s ({:.0} resources/s); {} invalid skipped; {} deletes",
        thousands(summary.written()),
        summary.files,
        secs,
        summary.written() as f64 / secs,
        thousands(summary.invalid),
        summary.deleted
    );
    if let Some(took) = summary.index_build {
        println!(
            "  search indexes built after the load in {:.1}s (included above)",
            took.as_secs_f64()
        );
    }
    for (t, n) in &summary.per_type {
        println!("  {t:<28} {:>12}", thousands(*n));
    }
    if summary.unresolved_references > 0 {
        println!(
            "  {} urn: references named no fullUrl of the inputs (left unchanged)",
            summary.unresolved_references
        );
    }
    for p in &summary.problems {
        eprintln!("invalid: {}: {}", p.location, p.message);
    }
    if args.strict && summary.invalid > 0 {
        return Err(Failure::from(
            "invalid resources found (--strict)".to_string(),
        ));
    }
    Ok(())
}
