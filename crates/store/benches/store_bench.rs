//! `cargo bench -p store`: insert and scan throughput of the SQLite store on the 100-patient
//! Synthea set (testdata/synthea-r4-100); with `FHIRHOSE_BENCH_DATABASE=postgres://…` (e.g. from
//! `scripts/postgres.sh start DIR`) the same runs on PostgreSQL too, each run in a fresh database.
//! `FHIRHOSE_BENCH_COPIES=N` inserts the set N times (ids suffixed) for a larger store, and
//! `FHIRHOSE_BENCH_RUNS` sets the number of runs; each scan reports the growth of the process's
//! resident memory while it ran (sampled every 10,000 rows). A command, not a criterion bench: one insert of 38,970
//! resources and one full scan are the units of interest, repeated a few times.
//!
//! Insert: all Bundle entries as `WriteOp::Update` (keep id) in transactions of 1,000, measured
//! from `Vec<WriteOp>` to committed (stamping meta, serializing, inserting). Scan: every type,
//! current resources in seq order through `scan_type_each`, touching each row's JSON bytes.

use std::io::Read;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

use serde_json::Value;
use store::{PgOptions, PgStore, SeqBounds, SqliteOptions, SqliteStore, Store, WriteOp};

const SCANS: usize = 5;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Resident memory of this process in MB.
fn rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// `op` with its id suffixed by `-c{copy}` (copy 0: unchanged).
fn copy_of(op: &WriteOp, copy: usize) -> WriteOp {
    match op {
        WriteOp::Update {
            resource_type,
            id,
            resource,
            ..
        } if copy > 0 => {
            let id = format!("{id}-c{copy}");
            let mut resource = resource.clone();
            resource["id"] = Value::String(id.clone());
            WriteOp::Update {
                resource_type: resource_type.clone(),
                id,
                resource,
                if_match: None,
            }
        }
        other => other.clone(),
    }
}

fn main() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/synthea-r4-100");
    let ops = read_ops(&dir);
    println!("data: {} resources from {}", ops.len(), dir.display());
    bench("sqlite", &ops, None);
    if let Ok(url) = std::env::var("FHIRHOSE_BENCH_DATABASE") {
        bench("postgres", &ops, Some(&url));
    }
}

fn bench(backend: &str, ops: &[WriteOp], postgres: Option<&str>) {
    println!("== {backend}");
    let mut insert_rates = Vec::new();
    let mut scan_rates = Vec::new();
    let runs = env_usize("FHIRHOSE_BENCH_RUNS", 3);
    let copies = env_usize("FHIRHOSE_BENCH_COPIES", 1).max(1);
    for run in 0..runs {
        let tmp = tempfile::tempdir().expect("temp dir");
        let db = postgres.map(|url| store::testing::fresh_database(url).expect("create database"));
        let store: Box<dyn Store> = match &db {
            Some(db) => Box::new(PgStore::connect(&db.url, PgOptions::default()).expect("open")),
            None => Box::new(
                SqliteStore::open_data_dir(tmp.path(), SqliteOptions::default()).expect("open"),
            ),
        };
        let started = Instant::now();
        let mut n = 0usize;
        for copy in 0..copies {
            for chunk in ops.chunks(1000) {
                let chunk: Vec<WriteOp> = chunk.iter().map(|op| copy_of(op, copy)).collect();
                n += store.write(chunk).expect("write").len();
            }
        }
        let secs = started.elapsed().as_secs_f64();
        insert_rates.push(n as f64 / secs);
        println!(
            "run {run}: insert {n} in {secs:.3} s = {:.0} resources/s",
            n as f64 / secs
        );

        let as_of = store.current_seq().expect("seq");
        let types = store.types_present(as_of).expect("types");
        for scan in 0..SCANS {
            let started = Instant::now();
            let mut rows = 0u64;
            let mut bytes = 0usize;
            let rss_before = rss_mb();
            let mut rss_peak = rss_before;
            let mut seen = 0u64;
            for ty in &types {
                rows += store
                    .scan_type_each(ty, as_of, SeqBounds::ALL, &mut |row| {
                        bytes += row.json.len();
                        seen += 1;
                        if seen.is_multiple_of(10_000) {
                            rss_peak = rss_peak.max(rss_mb());
                        }
                        ControlFlow::Continue(())
                    })
                    .expect("scan");
            }
            let secs = started.elapsed().as_secs_f64();
            scan_rates.push(rows as f64 / secs);
            println!(
                "run {run} scan {scan}: {rows} rows, {:.1} MB in {secs:.4} s = {:.0} resources/s, RSS +{:.1} MB",
                bytes as f64 / 1e6,
                rows as f64 / secs,
                rss_peak - rss_before
            );
        }
        drop(store);
        drop(db);
    }
    let (m, sd) = mean_sd(&insert_rates);
    println!("{backend} insert: {m:.0} ± {sd:.0} resources/s ({runs} runs)");
    let (m, sd) = mean_sd(&scan_rates);
    println!(
        "{backend} scan:   {m:.0} ± {sd:.0} resources/s ({} scans)",
        scan_rates.len()
    );
}

fn mean_sd(v: &[f64]) -> (f64, f64) {
    let m = v.iter().sum::<f64>() / v.len() as f64;
    let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len().max(2) - 1) as f64;
    (m, var.sqrt())
}

/// Every Bundle entry resource of the data set as a create-or-update op (ids kept).
fn read_ops(dir: &PathBuf) -> Vec<WriteOp> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("testdata/synthea-r4-100")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.to_string_lossy().ends_with(".json.gz"))
        .collect();
    files.sort();
    let mut ops = Vec::new();
    for f in files {
        let mut text = String::new();
        flate2::read::GzDecoder::new(std::fs::File::open(&f).expect("open"))
            .read_to_string(&mut text)
            .expect("gunzip");
        let v: Value = serde_json::from_str(&text).expect("json");
        let resources: Vec<Value> = match v.get("entry").and_then(Value::as_array) {
            Some(entries) => entries
                .iter()
                .filter_map(|e| e.get("resource").cloned())
                .collect(),
            None => vec![v],
        };
        for r in resources {
            let ty = r["resourceType"].as_str().expect("type").to_string();
            let id = r["id"].as_str().expect("id").to_string();
            ops.push(WriteOp::Update {
                resource_type: ty,
                id,
                resource: r,
                if_match: None,
            });
        }
    }
    ops
}
