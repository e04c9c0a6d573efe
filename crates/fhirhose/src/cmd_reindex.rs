//! `fhirhose reindex`: rebuild the search indexes of existing data.

use std::path::PathBuf;

use clap::Args;

use crate::failure::Failure;
use crate::progress::{counter, thousands};

#[derive(Debug, Args)]
pub struct ReindexArgs {
    /// Data directory (refused while a server holds it).
    #[arg(long, env = "FHIRHOSE_DATA_DIR", default_value = "./fhirhose-data")]
    pub data_dir: PathBuf,
    /// The database to reindex: `sqlite` (default: the data directory's) or a PostgreSQL URL.
    #[arg(long, env = "FHIRHOSE_DATABASE")]
    pub database: Option<store::DatabaseArg>,
}

pub fn run(args: ReindexArgs) -> Result<(), Failure> {
    let database = store::Database::from_flag(args.database.as_ref(), &args.data_dir);
    let store = server::open_database(&database, true)
        .map_err(|e| Failure::store(format!("cannot open {}", database.describe()), &e))?;
    let bar = counter("reindexing");
    let n = search::reindex(&*store, &mut |t: &str, n: u64| {
        bar.set_message(format!("{t}: {} resources", thousands(n)));
    })
    .map_err(|e| e.to_string())?;
    store
        .set_indexes_stale(false)
        .map_err(|e| Failure::store("cannot record the rebuilt indexes", &e))?;
    bar.finish_and_clear();
    println!("reindexed {} resources", thousands(n));
    Ok(())
}
