//! Cost of index extraction alone (no database): `SearchIndexer::entries` over NDJSON input.
//!
//! `cargo run --release -p search --example index_cost -- FILE.ndjson [LIMIT]`

use std::io::BufRead;
use std::time::Instant;

use store::Indexer;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let path = args.get(1).expect("FILE.ndjson");
    let limit: usize = args
        .get(2)
        .and_then(|l| l.parse().ok())
        .unwrap_or(usize::MAX);
    let file = std::io::BufReader::new(std::fs::File::open(path).expect("open"));
    let resources: Vec<serde_json::Value> = file
        .lines()
        .take(limit)
        .map(|l| serde_json::from_str(&l.expect("line")).expect("json"))
        .collect();
    let idx = search::SearchIndexer;
    let t = Instant::now();
    let mut rows = 0;
    for r in &resources {
        let ty = r["resourceType"].as_str().unwrap_or_default();
        rows += idx.entries(ty, r).len();
    }
    let s = t.elapsed().as_secs_f64();
    // A compiled `_typeFilter` predicate set, as export applies it to each scanned resource.
    let mut set = search::PredicateSet::new();
    set.add_type_filter(
        "Observation?code=http://loinc.org|8867-4,http://loinc.org|9279-1&date=ge2015",
    )
    .expect("filter");
    set.add_type_filter("Observation?value-quantity=gt100")
        .expect("filter");
    let tp = Instant::now();
    let kept = resources.iter().filter(|r| set.matches(r)).count();
    println!(
        "_typeFilter (2 ORed predicates): {kept} kept, {:.0} resources/s",
        resources.len() as f64 / tp.elapsed().as_secs_f64()
    );
    // The same parameters evaluated with the fhirpath crate's engine, for comparison.
    let t2 = Instant::now();
    let mut items = 0usize;
    let mut compiled = std::collections::HashMap::new();
    for r in &resources {
        let ty = r["resourceType"].as_str().unwrap_or_default();
        let Some(ti) = search::registry::type_index(ty) else {
            continue;
        };
        for p in &ti.params {
            for (path, _) in search::registry::param_branches(ty, &p.code) {
                let e = compiled
                    .entry(path.clone())
                    .or_insert_with(|| fhirpath::Expression::compile(&path).expect("compiles"));
                items += e
                    .evaluate(&fhirpath::EvalContext::new(r))
                    .map(|v| v.len())
                    .unwrap_or(0);
            }
        }
    }
    println!(
        "fhirpath crate, evaluation only: {:.2} s = {:.0} resources/s ({items} items)",
        t2.elapsed().as_secs_f64(),
        resources.len() as f64 / t2.elapsed().as_secs_f64()
    );
    println!(
        "{} resources, {rows} index rows ({:.1}/resource), {s:.2} s = {:.0} resources/s",
        resources.len(),
        rows as f64 / resources.len() as f64,
        resources.len() as f64 / s
    );
}
