//! `cargo bench -p fhirpath`: compiled evaluation of the expressions in `benches/expressions.txt`
//! over the entry resources of Synthea bundles (`testdata/synthea-r4-100`), one resource at a time
//! as the de-identification engine does. Prints `name<TAB>resources<TAB>items<TAB>ms per pass`
//! (best of the passes). `benches/compare.sh` runs this and fhirpath.js side by side.
//!
//! Environment: `FHIRPATH_BENCH_BUNDLES` (default 20), `FHIRPATH_BENCH_PASSES` (default 5),
//! `FHIRPATH_BENCH_REPEAT` (evaluations of each resource in a row, default 1),
//! `FHIRPATH_BENCH_ONLY` (one expression name).

use std::io::Read;
use std::path::Path;
use std::time::Instant;

use fhirpath::{EvalContext, Expression, FunctionRegistry};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // `cargo bench` passes `--bench`; ignore other harness flags.
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let data_dir = manifest.join("../../testdata/synthea-r4-100");
    let bundles = env_usize("FHIRPATH_BENCH_BUNDLES", 20);
    let passes = env_usize("FHIRPATH_BENCH_PASSES", 5).max(1);
    // Evaluations of one resource in a row: 1 streams the data set through the cache once per pass;
    // more models a de-identification run, which applies many rules to one resource while it is hot.
    let repeat = env_usize("FHIRPATH_BENCH_REPEAT", 1).max(1);

    let mut files: Vec<_> = std::fs::read_dir(&data_dir)
        .expect("testdata/synthea-r4-100 exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(".json.gz"))
        .collect();
    files.sort();
    files.truncate(bundles);
    let mut resources = Vec::new();
    for f in &files {
        let mut text = String::new();
        flate2::read::GzDecoder::new(std::fs::File::open(f).expect("bundle readable"))
            .read_to_string(&mut text)
            .expect("gzip bundle");
        let mut bundle: serde_json::Value = serde_json::from_str(&text).expect("bundle JSON");
        if let Some(entries) = bundle.get_mut("entry").and_then(|e| e.as_array_mut()) {
            for e in entries {
                if let Some(r) = e.get_mut("resource") {
                    resources.push(r.take());
                }
            }
        }
    }

    let registry = FunctionRegistry::with_anonymizer_functions();
    let list =
        std::fs::read_to_string(manifest.join("benches/expressions.txt")).expect("expressions.txt");
    for line in list
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let mut cols = line.split('\t');
        let (Some(name), Some(src)) = (cols.next(), cols.next()) else {
            continue;
        };
        if std::env::var("FHIRPATH_BENCH_ONLY").is_ok_and(|only| only != name) {
            continue;
        }
        let expr = Expression::compile_with(src, &registry).expect("benchmark expression compiles");
        let mut items = 0;
        for r in &resources {
            items += expr
                .evaluate(&EvalContext::new(r))
                .expect("evaluates")
                .len();
        }
        let mut times = Vec::with_capacity(passes);
        for _ in 0..passes {
            let t0 = Instant::now();
            let mut n = 0;
            for r in &resources {
                for _ in 0..repeat {
                    n += expr
                        .evaluate(&EvalContext::new(r))
                        .map(|v| v.len())
                        .unwrap_or(0);
                }
            }
            std::hint::black_box(n);
            times.push(t0.elapsed().as_secs_f64() * 1000.0);
        }
        // Best pass, in ms per pass over all resources (once each): the machine is shared, and the
        // minimum is the least disturbed measurement.
        times.sort_by(|a, b| a.total_cmp(b));
        println!(
            "{name}\t{}\t{items}\t{:.2}",
            resources.len(),
            times[0] / repeat as f64
        );
    }
}
