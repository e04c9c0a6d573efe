//! The Fhirhose side of `scripts/bench-fhirpath.sh`: "cold" FHIRPath evaluation. For each resource
//! of the first BUNDLES Synthea bundles, each expression of the list that applies to the
//! resource's type is compiled and evaluated once (no compiled expression is kept), the same loop
//! as the fhirpath.js side (`scripts/bench-fhirpath/cold.js`). Set `anonymizer` compiles with the
//! de-identification engine's functions (`nodesByType`, `nodesByName`), set `view` with the SQL on
//! FHIR functions of this crate.
//!
//! Prints one JSON line: engine, resources, evaluations, items (total and per expression), seconds
//! of the timed loop (wall and CPU), peak RSS (KiB, `VmHWM`).
//!
//! Usage: `fhirpath_cold EXPRESSIONS.tsv DATA_DIR BUNDLES`

use std::io::Read;
use std::time::Instant;

use fhirpath::{EvalContext, Expression, FunctionRegistry};
use serde_json::Value as Json;

/// The allocator of the `fhirhose` binary (crates/fhirhose/src/main.rs), which runs this engine in
/// `fhirhose fhirpath`, de-identification and views.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// CPU time of this (single) thread in ns: the first field of `/proc/thread-self/schedstat`. On a
/// shared machine it is steadier than the wall clock, which also counts time spent waiting for a core.
fn cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [expr_file, data_dir, bundles] = args.as_slice() else {
        eprintln!("usage: fhirpath_cold EXPRESSIONS.tsv DATA_DIR BUNDLES");
        std::process::exit(2);
    };
    let bundles: usize = bundles.parse().expect("BUNDLES is a number");

    let mut files: Vec<_> = std::fs::read_dir(data_dir)
        .expect("data directory readable")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(".json.gz"))
        .collect();
    files.sort();
    files.truncate(bundles);
    let mut resources: Vec<Json> = Vec::new();
    for f in &files {
        let mut text = String::new();
        flate2::read::GzDecoder::new(std::fs::File::open(f).expect("bundle readable"))
            .read_to_string(&mut text)
            .expect("gzip JSON");
        let mut doc: Json = serde_json::from_str(&text).expect("JSON");
        if doc["resourceType"] == "Bundle" {
            if let Some(entries) = doc.get_mut("entry").and_then(Json::as_array_mut) {
                for e in entries {
                    if let Some(r) = e.get_mut("resource") {
                        resources.push(r.take());
                    }
                }
            }
        } else {
            resources.push(doc);
        }
    }

    let anonymizer = FunctionRegistry::with_anonymizer_functions();
    let views = views::fhirpath_functions();
    let list = std::fs::read_to_string(expr_file).expect("expression list readable");
    let exprs: Vec<(&FunctionRegistry, &str, &str)> = list
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let cols: Vec<&str> = l.split('\t').collect();
            let registry = if cols[0] == "view" {
                views
            } else {
                &anonymizer
            };
            (registry, cols[1], cols[2])
        })
        .collect();

    let mut items = vec![0usize; exprs.len()];
    let mut evaluations = 0usize;
    let cpu0 = cpu_ns();
    let t0 = Instant::now();
    for r in &resources {
        let ty = r["resourceType"].as_str().unwrap_or("");
        for (i, (registry, on, src)) in exprs.iter().enumerate() {
            if *on != "*" && *on != ty {
                continue;
            }
            let expr = Expression::compile_with(src, registry).expect("expression compiles");
            items[i] += expr
                .evaluate(&EvalContext::new(r))
                .expect("expression evaluates")
                .len();
            evaluations += 1;
        }
    }
    let seconds = t0.elapsed().as_secs_f64();
    let cpu_seconds = cpu_ns().saturating_sub(cpu0) as f64 / 1e9;
    let peak_rss_kib: u64 = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0);
    println!(
        "{}",
        serde_json::json!({
            "engine": "fhirhose",
            "resources": resources.len(),
            "evaluations": evaluations,
            "items_total": items.iter().sum::<usize>(),
            "items": items,
            "seconds": seconds,
            "cpu_seconds": cpu_seconds,
            "peak_rss_kib": peak_rss_kib,
        })
    );
}
