//! `fhirhose reindex`: rebuild the search indexes of existing data.

use std::path::PathBuf;

use clap::Args;

use crate::progress::{counter, thousands};

#[derive(Debug, Args)]
pub struct ReindexArgs {
    /// Data directory (refused while a server holds it).
    #[arg(long, env = "FHIRHOSE_DATA_DIR", default_value = "./fhirhose-data")]
    pub data_dir: PathBuf,
}

pub fn run(args: ReindexArgs) -> Result<(), String> {
    let store = server::open_store(&args.data_dir)
        .map_err(|e| format!("cannot open {}: {e}", args.data_dir.display()))?;
    let bar = counter("reindexing");
    let n = search::reindex(&store, &mut |t: &str, n: u64| {
        bar.set_message(format!("{t}: {} resources", thousands(n)));
    })
    .map_err(|e| e.to_string())?;
    store.set_indexes_stale(false).map_err(|e| e.to_string())?;
    bar.finish_and_clear();
    println!("reindexed {} resources", thousands(n));
    Ok(())
}
