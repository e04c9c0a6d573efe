//! The CPU a `fhirhose load` parsing thread spends per resource, phase by phase, single-threaded.
//!
//! ```text
//! cargo run --release -p ingest --example parse_cost -- testdata/synthea-r4-100 [RUNS]
//! ```
//!
//! The inputs are read and decompressed once, outside the measured region. Each run then takes
//! every unit through the parsing thread's steps, one phase at a time per unit, measuring the
//! thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`) of each phase:
//! - `parse`: [`source::unit_items`] (JSON text → `serde_json::Value`, Bundle entries split);
//! - `rewrite`: [`ReferenceMap::rewrite`];
//! - `validate`: `fhir_model::r4().validate`;
//! - `put`: `Store::prepare_put` on a SQLite store without search indexes (serialization), which
//!   also drops the `Value`.
//!
//! It prints the median (and minimum) µs per resource of each phase over the runs, and a digest of
//! what the phases produced (the re-serialized resources after rewriting, the validation verdicts
//! and messages, the unresolved references), which must not change when the code gets faster.
//!
//! Then, as the loader's parsing threads do, each item is taken through all steps as soon as it
//! is parsed, timed per unit: `buffered` with [`source::unit_items`] (a Bundle is parsed whole,
//! then its entries are handled), `streamed` with [`source::stream_unit_items`] (each entry is
//! handled as soon as it is parsed).

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ingest::references::ReferenceMap;
use ingest::source::{self, Item, ItemContent, Unit, UnitEvent};
use serde_json::Value;
use store::{SqliteOptions, SqliteStore, Store};

#[repr(C)]
struct Timespec {
    tv_sec: i64,
    tv_nsec: i64,
}

unsafe extern "C" {
    fn clock_gettime(clock: i32, ts: *mut Timespec) -> i32;
}

/// CPU time of the calling thread, in nanoseconds.
fn thread_cpu_ns() -> u64 {
    const CLOCK_THREAD_CPUTIME_ID: i32 = 3;
    let mut ts = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is Linux's thread CPU clock.
    unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

const PHASES: [&str; 4] = ["parse", "rewrite", "validate", "put"];

fn copy_unit(u: &Unit) -> Unit {
    match u {
        Unit::Lines { first_line, lines } => Unit::Lines {
            first_line: *first_line,
            lines: lines.clone(),
        },
        Unit::Document(b) => Unit::Document(b.clone()),
    }
}

/// What the loader's `prepare_item` and `prepare_put` do with one item.
fn process(item: Item, refs: &ReferenceMap, store: &SqliteStore) -> u64 {
    let ItemContent::Resource(mut v) = item.content else {
        return 0;
    };
    let Some(ty) = v
        .get("resourceType")
        .and_then(Value::as_str)
        .map(str::to_string)
    else {
        return 0;
    };
    let id = source::loader_id(
        item.full_url.as_deref(),
        v.get("id").and_then(Value::as_str),
    );
    let mut unresolved = 0;
    refs.rewrite(&mut v, &ty, &mut |_, _| unresolved += 1);
    if fhir_model::r4().validate(&v).is_err() {
        return unresolved;
    }
    if let Some(id) = id {
        v["id"] = Value::String(id.clone());
        std::hint::black_box(store.prepare_put(&ty, &id, v).ok());
    }
    unresolved
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let input = PathBuf::from(
        args.first()
            .map(String::as_str)
            .unwrap_or("testdata/synthea-r4-100"),
    );
    let runs: usize = args.get(1).and_then(|r| r.parse().ok()).unwrap_or(7);

    let files = source::collect_inputs(std::slice::from_ref(&input)).expect("inputs");
    let mut refs = ReferenceMap::new();
    for f in &files {
        for (full_url, ty, id) in source::full_urls(f).expect("pre-pass") {
            refs.insert(full_url, &ty, &id);
        }
    }
    let mut units: Vec<(Arc<Path>, Unit)> = Vec::new();
    for f in &files {
        let name: Arc<Path> = Arc::from(f.as_path());
        source::read_units(f, &mut |u| {
            units.push((name.clone(), u));
            Ok(())
        })
        .expect("read");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open(&dir.path().join("x.db"), SqliteOptions::default()).expect("db");
    let model = fhir_model::r4();

    let mut per_run: Vec<[u64; 4]> = Vec::new();
    let mut pipeline: [Vec<u64>; 2] = [Vec::new(), Vec::new()];
    let mut resources = 0u64;
    let mut digest = 0u64;
    let mut invalid = 0u64;
    for run in 0..runs {
        let mut ns = [0u64; 4];
        let mut hasher = DefaultHasher::new();
        let mut count = 0u64;
        // `PARSE_COST_STREAMED_ONLY=1` runs only the streamed pipeline (for a profiler).
        let streamed_only = std::env::var_os("PARSE_COST_STREAMED_ONLY").is_some();
        let copies: Vec<(Arc<Path>, Unit)> = if streamed_only {
            Vec::new()
        } else {
            units
                .iter()
                .map(|(n, u)| (n.clone(), copy_unit(u)))
                .collect()
        };
        for (name, unit) in copies {
            let mut items: Vec<Item> = Vec::new();
            let t0 = thread_cpu_ns();
            let _ = source::unit_items(&name, unit, &mut |item| {
                match item {
                    Ok(item) => items.push(item),
                    Err((loc, message)) => (loc.to_string(), message).hash(&mut hasher),
                }
                Ok(())
            });
            let t1 = thread_cpu_ns();
            ns[0] += t1 - t0;

            let mut values: Vec<(String, Option<String>, Value)> = Vec::with_capacity(items.len());
            for item in items {
                if let ItemContent::Resource(v) = item.content {
                    let ty = v
                        .get("resourceType")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string();
                    let id = source::loader_id(
                        item.full_url.as_deref(),
                        v.get("id").and_then(Value::as_str),
                    );
                    values.push((ty, id, v));
                }
            }
            count += values.len() as u64;

            let t0 = thread_cpu_ns();
            let mut unresolved = Vec::new();
            for (ty, _, v) in values.iter_mut() {
                refs.rewrite(v, ty, &mut |r, at| unresolved.push((r.to_string(), at)));
            }
            let t1 = thread_cpu_ns();
            ns[1] += t1 - t0;
            unresolved.hash(&mut hasher);

            let mut verdicts = Vec::with_capacity(values.len());
            let t0 = thread_cpu_ns();
            for (_, _, v) in &values {
                verdicts.push(model.validate(v));
            }
            let t1 = thread_cpu_ns();
            ns[2] += t1 - t0;
            for verdict in verdicts {
                match verdict {
                    Ok(()) => 0u8.hash(&mut hasher),
                    Err(issues) => {
                        if run == 0 {
                            invalid += 1;
                        }
                        for i in issues {
                            i.to_string().hash(&mut hasher);
                        }
                    }
                }
            }
            if run == 0 {
                for (_, _, v) in &values {
                    serde_json::to_vec(v).expect("json").hash(&mut hasher);
                }
            }

            let t0 = thread_cpu_ns();
            for (ty, id, mut v) in values {
                if let Some(id) = id {
                    v["id"] = Value::String(id.clone());
                    std::hint::black_box(store.prepare_put(&ty, &id, v).ok());
                }
            }
            let t1 = thread_cpu_ns();
            ns[3] += t1 - t0;
        }
        if run == 0 {
            digest = hasher.finish();
        }
        // The two pipelines, in alternating order.
        for which in [run % 2, 1 - run % 2] {
            if streamed_only && which == 0 {
                continue;
            }
            let copies: Vec<(Arc<Path>, Unit)> = units
                .iter()
                .map(|(n, u)| (n.clone(), copy_unit(u)))
                .collect();
            let mut total = 0;
            for (name, unit) in copies {
                let t0 = thread_cpu_ns();
                if which == 0 {
                    let _ = source::unit_items(&name, unit, &mut |item| {
                        if let Ok(item) = item {
                            process(item, &refs, &store);
                        }
                        Ok(())
                    });
                } else {
                    let _ = source::stream_unit_items(&name, unit, &mut |event| {
                        if let UnitEvent::Item(Ok(item)) = event {
                            process(item, &refs, &store);
                        }
                        Ok(())
                    });
                }
                total += thread_cpu_ns() - t0;
            }
            pipeline[which].push(total);
        }
        resources = count;
        per_run.push(ns);
        eprintln!(
            "run {run}: {}",
            PHASES
                .iter()
                .zip(ns)
                .map(|(p, n)| format!("{p} {:.2}", n as f64 / 1000.0 / count as f64))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    println!("{} units, {resources} resources, {runs} runs", units.len());
    println!("digest {digest:016x} ({invalid} invalid)");
    println!("phase      median µs/res   min µs/res");
    let mut total = Vec::new();
    for (i, p) in PHASES.iter().enumerate() {
        let mut v: Vec<u64> = per_run.iter().map(|r| r[i]).collect();
        v.sort_unstable();
        let us = |n: u64| n as f64 / 1000.0 / resources as f64;
        println!("{p:<10} {:>10.2} {:>12.2}", us(v[v.len() / 2]), us(v[0]));
    }
    for r in &per_run {
        total.push(r.iter().sum::<u64>());
    }
    total.sort_unstable();
    for (name, mut v) in ["buffered", "streamed"].into_iter().zip(pipeline) {
        v.sort_unstable();
        println!(
            "{name:<10} {:>10.2} {:>12.2}",
            v[v.len() / 2] as f64 / 1000.0 / resources as f64,
            v[0] as f64 / 1000.0 / resources as f64
        );
    }
    println!(
        "{:<10} {:>10.2} {:>12.2}",
        "total",
        total[total.len() / 2] as f64 / 1000.0 / resources as f64,
        total[0] as f64 / 1000.0 / resources as f64
    );
}
