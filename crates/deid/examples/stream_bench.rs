//! Times `Engine::anonymize_json` over NDJSON files (what the de-identified export calls per
//! stored resource), for profiling: `stream_bench CONFIG DIR [ROUNDS]`. Prints ns per resource
//! per round and how many resources streamed; the output bytes are checksummed so that two
//! builds can be compared for equal output.
use std::io::BufRead;
use std::time::Instant;

fn main() {
    let mut args = std::env::args().skip(1);
    let config = args.next().expect("CONFIG");
    let dir = args.next().expect("DIR");
    let rounds: usize = args.next().map_or(3, |r| r.parse().expect("ROUNDS"));
    let text = std::fs::read_to_string(&config).expect("config");
    let engine = deid::Engine::from_config_text(&text)
        .expect("config parses")
        .with_today(chrono::NaiveDate::from_ymd_opt(2026, 1, 1).expect("date"));
    let mut lines: Vec<Vec<u8>> = Vec::new();
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .expect("dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "ndjson"))
        .collect();
    paths.sort();
    for p in paths {
        let f = std::io::BufReader::new(std::fs::File::open(&p).expect("file"));
        for l in f.split(b'\n') {
            let l = l.expect("line");
            if !l.is_empty() {
                lines.push(l);
            }
        }
    }
    let mut out = Vec::with_capacity(1 << 16);
    for round in 0..rounds {
        let t = Instant::now();
        let mut streamed = 0usize;
        let mut sum = 0u64;
        for l in &lines {
            out.clear();
            let w = engine.anonymize_json(l, &mut out).expect("anonymized");
            streamed += usize::from(w.streamed);
            // Date shifts, hashes and labels are deterministic with fixed keys; perturb is not.
            let mut h = rustc_hash::FxHasher::default();
            std::hash::Hasher::write(&mut h, &out);
            sum = sum.wrapping_add(std::hash::Hasher::finish(&h));
        }
        let ns = t.elapsed().as_nanos() as f64 / lines.len() as f64;
        println!(
            "round {round}: {} resources, {streamed} streamed, {ns:.0} ns/resource, checksum {sum:016x}",
            lines.len()
        );
    }
}
