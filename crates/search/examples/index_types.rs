//! Cost of `SearchIndexer::entries` per resource type over mixed NDJSON (parsing excluded).
//!
//! `cargo run --release -p search --example index_types -- FILE.ndjson [ROUNDS] [--dump OUT]`
//!
//! Every round runs `entries()` over all resources in file order (the overall rate), then over
//! each type's resources on their own (the per-type rates); the report gives the median round's
//! resources/s and µs per resource, from the thread's CPU time. `--dump`
//! writes every resource's entries (Debug format, one resource per line) to OUT, to check that a
//! change keeps the output identical (`cmp` two dumps).

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::time::Instant;

use store::Indexer;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let path = args.get(1).expect("FILE.ndjson");
    let rounds: usize = args.get(2).and_then(|l| l.parse().ok()).unwrap_or(5).max(1);
    let dump = args
        .iter()
        .position(|a| a == "--dump")
        .and_then(|i| args.get(i + 1));
    let file = std::io::BufReader::new(std::fs::File::open(path).expect("open"));
    let resources: Vec<(String, serde_json::Value)> = file
        .lines()
        .map(|l| {
            let r: serde_json::Value = serde_json::from_str(&l.expect("line")).expect("json");
            (
                r["resourceType"].as_str().unwrap_or_default().to_string(),
                r,
            )
        })
        .collect();
    let idx = search::SearchIndexer;
    if let Some(out) = dump {
        let mut w = std::io::BufWriter::new(std::fs::File::create(out).expect("create"));
        for (ty, r) in &resources {
            writeln!(w, "{:?}", idx.entries(ty, r)).expect("write");
        }
    }
    // Warm-up: compiles every type's parameters once.
    for (ty, r) in &resources {
        std::hint::black_box(idx.entries(ty, r));
    }
    // Rates are from the thread's CPU time (`/proc/thread-self/schedstat`), not wall time: on
    // a shared 2-core machine the wall clock mostly measures the other processes.
    let mut by_type: BTreeMap<&str, Vec<&serde_json::Value>> = BTreeMap::new();
    for (ty, r) in &resources {
        by_type.entry(ty.as_str()).or_default().push(r);
    }
    // type -> (count, rows, per-round CPU seconds)
    let mut per: BTreeMap<&str, (usize, usize, Vec<f64>)> = BTreeMap::new();
    let mut totals = Vec::new();
    let mut walls = Vec::new();
    for _ in 0..rounds {
        // All resources in file order (types mixed, as a load sees them).
        let (c, w) = (cpu_ns(), Instant::now());
        for (ty, r) in &resources {
            std::hint::black_box(idx.entries(ty, r));
        }
        totals.push((cpu_ns() - c) as f64 / 1e9);
        walls.push(w.elapsed().as_secs_f64());
        // Each type on its own, repeated to at least 5,000 calls (the CPU clock ticks coarsely).
        for (ty, rs) in &by_type {
            let reps = 5000usize.div_ceil(rs.len());
            let c = cpu_ns();
            let mut rows = 0;
            for _ in 0..reps {
                for r in rs {
                    rows += std::hint::black_box(idx.entries(ty, r)).len();
                }
            }
            let e = per.entry(ty).or_default();
            e.2.push((cpu_ns() - c) as f64 / 1e9 / reps as f64);
            e.0 = rs.len();
            e.1 = rows / reps;
        }
    }
    // As a loader sees them: each resource parsed just before its `entries()` call (its JSON
    // tree in cache), the call timed alone; calls over 1 ms (the thread was preempted on this
    // shared machine) are left out and counted.
    let lines: Vec<String> = std::io::BufReader::new(std::fs::File::open(path).expect("open"))
        .lines()
        .map(|l| l.expect("line"))
        .collect();
    let mut fresh: BTreeMap<String, (usize, Vec<f64>)> = BTreeMap::new();
    let mut fresh_all = Vec::new();
    let mut dropped = 0;
    for _ in 0..rounds {
        let mut sums: BTreeMap<&str, (usize, f64)> = BTreeMap::new();
        let mut all = (0usize, 0f64);
        for (line, (ty, _)) in lines.iter().zip(&resources) {
            let r: serde_json::Value = serde_json::from_str(line).expect("json");
            let t = Instant::now();
            let e = std::hint::black_box(idx.entries(ty, &r));
            let el = t.elapsed().as_secs_f64();
            drop(e);
            if el > 1e-3 {
                dropped += 1;
                continue;
            }
            let x = sums.entry(ty.as_str()).or_default();
            x.0 += 1;
            x.1 += el;
            all.0 += 1;
            all.1 += el;
        }
        for (ty, (n, secs)) in sums {
            let e = fresh.entry(ty.to_string()).or_default();
            e.0 = e.0.max(n);
            e.1.push(secs / n as f64);
        }
        fresh_all.push(all.1 / all.0 as f64);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!("fresh (each resource parsed just before, {dropped} preempted calls left out):");
    let mut fsorted: Vec<_> = fresh.into_iter().collect();
    fsorted.sort_by_key(|(_, (n, _))| std::cmp::Reverse(*n));
    for (ty, (n, mut per_call)) in fsorted {
        let s = median(&mut per_call);
        println!("{ty:<28} {n:>7} {:>12.0} {:>8.1}", 1.0 / s, s * 1e6);
    }
    let s = median(&mut fresh_all);
    println!(
        "{:<28} {:>7} {:>12.0} {:>8.1}",
        "ALL",
        resources.len(),
        1.0 / s,
        s * 1e6
    );
    println!("pre-parsed (all trees in memory, CPU time):");
    let mut rows_all = 0;
    println!(
        "{:<28} {:>7} {:>9} {:>12} {:>8}",
        "type", "count", "rows/res", "resources/s", "µs/res"
    );
    let mut sorted: Vec<_> = per.into_iter().collect();
    sorted.sort_by_key(|(_, (n, _, _))| std::cmp::Reverse(*n));
    for (ty, (n, rows, mut secs)) in sorted {
        rows_all += rows;
        let s = median(&mut secs);
        println!(
            "{ty:<28} {n:>7} {:>9.1} {:>12.0} {:>8.1}",
            rows as f64 / n as f64,
            n as f64 / s,
            s * 1e6 / n as f64
        );
    }
    let s = median(&mut totals);
    let wall = median(&mut walls);
    let n = resources.len();
    println!(
        "{:<28} {n:>7} {:>9.1} {:>12.0} {:>8.1}   (median of {rounds} rounds: {s:.3} s CPU, {wall:.3} s wall)",
        "ALL",
        rows_all as f64 / n as f64,
        n as f64 / s,
        s * 1e6 / n as f64
    );
}

/// CPU time of this thread in ns (0 where `/proc/thread-self/schedstat` is missing).
fn cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}
