//! `fhirhose synth --patients N --out DIR`.

use std::path::PathBuf;

use clap::Args;

use crate::progress::{counter, thousands};

#[derive(Debug, Args)]
pub struct SynthArgs {
    /// Number of synthetic patients (10,000 ≈ 4 million resources).
    #[arg(long)]
    pub patients: usize,
    /// Output folder (NDJSON per type).
    #[arg(long)]
    pub out: PathBuf,
    /// Folder of Synthea seed Bundles (default: testdata/synthea-seed of the source tree).
    #[arg(long)]
    pub seed_dir: Option<PathBuf>,
    /// Randomness seed: the same seed gives the same output.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

pub fn run(args: SynthArgs) -> Result<(), String> {
    let mut options = ingest::SynthOptions::new(args.patients, args.out.clone());
    if let Some(d) = args.seed_dir {
        options.seed_dir = d;
    }
    options.seed = args.seed;
    let bar = counter("synthesizing");
    let summary = ingest::synthesize(&options, &mut |p: &ingest::SynthProgress| {
        bar.set_message(format!(
            "{}/{} patients, {} resources",
            p.patients_done,
            p.patients_total,
            thousands(p.resources)
        ));
    })
    .map_err(|e| e.to_string())?;
    bar.finish_and_clear();
    let total: u64 = summary.per_type.values().sum();
    println!(
        "wrote {} resources for {} patients to {} in {:.1}s",
        thousands(total),
        summary.patients,
        args.out.display(),
        summary.elapsed.as_secs_f64()
    );
    for (t, n) in &summary.per_type {
        println!("  {t:<28} {:>12}", thousands(*n));
    }
    Ok(())
}
