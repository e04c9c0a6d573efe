//! Search benchmarks (docs/performance.md, "Search"): load throughput with indexing on, then a
//! token search and a date-range search over the loaded Observations.
//!
//! ```sh
//! cargo run --release -p search --example search_bench -- --input DIR_OR_FILES --db /tmp/bench.db
//! ```
//! `--input` takes what `fhirhose load` takes (NDJSON from `fhirhose synth`, or Bundles).
//! `--no-index` loads without the indexer, for comparison; `--cache-mib N` sets SQLite's page
//! cache per connection; `--no-validate` skips structural validation in the loader.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use search::{ParseOptions, SearchIndexer};
use store::{SqliteOptions, SqliteStore, Store};

fn stats(samples: &[f64]) -> (f64, f64) {
    let n = samples.len() as f64;
    let mean = samples.iter().sum::<f64>() / n;
    let var = samples.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (mean, var.sqrt())
}

fn time_query(store: &SqliteStore, ty: &str, q: &str, runs: usize) {
    let pairs = search::parse_query_string(q);
    let query = match search::parse_query(ty, &pairs, ParseOptions::default()) {
        Ok(q) => q,
        Err(e) => {
            eprintln!("{ty}?{q}: {e}");
            return;
        }
    };
    let mut ms = Vec::new();
    let mut last = None;
    for _ in 0..runs {
        let t = Instant::now();
        match search::execute(store, &query) {
            Ok(p) => last = Some(p),
            Err(e) => {
                eprintln!("{ty}?{q}: {e}");
                return;
            }
        }
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let (mean, sd) = stats(&ms);
    let p = last.unwrap_or_default();
    println!(
        "| `{ty}?{q}` | {} | {} | {mean:.2} ± {sd:.2} | {:.2} |",
        p.matches.len(),
        p.total.map_or("-".into(), |t| t.to_string()),
        ms.iter().cloned().fold(f64::INFINITY, f64::min)
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let db = PathBuf::from(arg("--db").unwrap_or_else(|| "/tmp/search-bench.db".into()));
    let index = !args.iter().any(|a| a == "--no-index");
    let runs: usize = arg("--runs").and_then(|r| r.parse().ok()).unwrap_or(7);
    let mut options = SqliteOptions {
        indexer: index.then(|| Arc::new(SearchIndexer) as Arc<dyn store::Indexer>),
        ..Default::default()
    };
    if let Some(mib) = arg("--cache-mib").and_then(|m| m.parse::<i64>().ok()) {
        options.cache_kib = mib * 1024;
    }
    if let Some(n) = arg("--synth") {
        let out = PathBuf::from(arg("--out").expect("--out DIR"));
        let patients: usize = n.parse().expect("--synth N");
        let t = Instant::now();
        let summary = ingest::synthesize(&ingest::SynthOptions::new(patients, out), &mut |_| {})
            .expect("synth");
        println!("synth: {summary:?} in {:.1} s", t.elapsed().as_secs_f64());
        return;
    }
    let store = SqliteStore::open(&db, options).expect("open store");
    if let Some(input) = arg("--input") {
        let paths = vec![PathBuf::from(input)];
        let load_opts = ingest::loader::LoadOptions {
            validate: !args.iter().any(|a| a == "--no-validate"),
            ..Default::default()
        };
        let t = Instant::now();
        let mut last_report = Instant::now();
        let summary = ingest::loader::load_into_store(&store, &paths, &load_opts, &mut |p| {
            if last_report.elapsed().as_secs() >= 10 {
                eprintln!(
                    "  {} resources, {:.0}/s",
                    p.resources,
                    p.resources as f64 / p.elapsed.as_secs_f64()
                );
                last_report = Instant::now();
            }
        })
        .expect("load");
        let secs = t.elapsed().as_secs_f64();
        println!(
            "load (index {index}, validate {}): {} resources in {secs:.1} s = {:.0} resources/s",
            load_opts.validate,
            summary.written(),
            summary.written() as f64 / secs
        );
    }
    let as_of = store.current_seq().expect("seq");
    println!(
        "Observations: {}",
        store.count_type("Observation", as_of).expect("count")
    );
    println!("| query | page | total | ms mean ± sd | ms min |\n|---|---|---|---|---|");
    for (ty, q) in [
        ("Observation", "code=http://loinc.org|8867-4&_count=100"),
        (
            "Observation",
            "code=http://loinc.org|8867-4&_count=100&_total=accurate",
        ),
        (
            "Observation",
            "code=http://loinc.org|2093-3&_count=100&_sort=-date",
        ),
        (
            "Observation",
            "date=ge2019-01-01&date=lt2019-01-08&_count=100",
        ),
        (
            "Observation",
            "date=ge2019-01-01&date=lt2019-01-08&_count=100&_total=accurate",
        ),
        (
            "Observation",
            "code=http://loinc.org|8867-4&date=ge2019-01-01&date=lt2019-02-01&_count=100",
        ),
        (
            "Observation",
            "value-quantity=gt180|http://unitsofmeasure.org|mg/dL&_count=100",
        ),
        ("Observation", "subject:Patient.name=abram&_count=100"),
    ] {
        time_query(&store, ty, q, runs);
    }
}
