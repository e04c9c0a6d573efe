//! Search load generator for `scripts/bench-search-load.sh` (issue 24): N concurrent clients send
//! FHIR searches over real HTTP to one server for a fixed time and report requests/s, p50/p99
//! latency and per-query figures; `check` fetches every query once, page after page, and writes
//! what it found so that two servers' answers can be compared.
//!
//! ```text
//! search_load load  BASE QUERIES [--clients 16] [--seconds 30] [--label NAME]
//! search_load check BASE QUERIES OUT [--max-pages 50]
//! ```
//!
//! QUERIES has one search a line, `TEMPLATE<TAB>PATH?QUERY` (TEMPLATE names the query form, e.g.
//! `obs-by-patient`; the figures are grouped by it). `load` checks every answer cheaply (status
//! 200 and a `Bundle` in the first bytes) and counts anything else as an error; `check` parses
//! every page and follows `link` `next`, counting `match` and `include` entries.
//!
//! All clients share one current-thread runtime (one core at most), so the generator takes the
//! same share of the 2-core machine whichever server it measures.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

struct Query {
    template: String,
    path: String,
}

fn usage() -> ! {
    eprintln!(
        "usage: search_load load BASE QUERIES [--clients N] [--seconds S] [--label NAME]\n       search_load check BASE QUERIES OUT [--max-pages N]"
    );
    std::process::exit(2)
}

fn read_queries(path: &str) -> Vec<Query> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| {
        eprintln!("{path}: {e}");
        std::process::exit(2)
    });
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (template, path) = l.split_once('\t').unwrap_or_else(|| {
                eprintln!("{path}: a line without TEMPLATE<TAB>PATH: {l}");
                std::process::exit(2)
            });
            Query {
                template: template.to_string(),
                path: path.to_string(),
            }
        })
        .collect()
}

fn flag(args: &[String], name: &str, default: &str) -> String {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_string())
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        usage()
    }
    let base = args[1].trim_end_matches('/').to_string();
    let queries = read_queries(&args[2]);
    if queries.is_empty() {
        eprintln!("no queries");
        std::process::exit(2)
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    match args[0].as_str() {
        "load" => {
            let clients: usize = flag(&args, "--clients", "16")
                .parse()
                .unwrap_or_else(|_| usage());
            let seconds: f64 = flag(&args, "--seconds", "30")
                .parse()
                .unwrap_or_else(|_| usage());
            let label = flag(&args, "--label", &base);
            rt.block_on(load(
                base,
                queries,
                clients,
                Duration::from_secs_f64(seconds),
                label,
            ))
        }
        "check" => {
            let out = args.get(3).cloned().unwrap_or_else(|| usage());
            let max_pages: usize = flag(&args, "--max-pages", "50")
                .parse()
                .unwrap_or_else(|_| usage());
            if let Err(e) = rt.block_on(check(base, queries, &out, max_pages)) {
                eprintln!("check failed: {e}");
                std::process::exit(1)
            }
        }
        _ => usage(),
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .timeout(Duration::from_secs(60))
        .build()
        .expect("http client")
}

/// Status 200 and `"resourceType"` … `"Bundle"` within the first bytes of the body.
fn looks_like_bundle(body: &[u8]) -> bool {
    let head = &body[..body.len().min(512)];
    let s = String::from_utf8_lossy(head);
    s.contains("\"resourceType\"") && s.contains("\"Bundle\"")
}

async fn load(base: String, queries: Vec<Query>, clients: usize, time: Duration, label: String) {
    let queries = Arc::new(queries);
    let http = client();
    let start = Instant::now();
    let deadline = start + time;
    let mut tasks = Vec::new();
    for c in 0..clients {
        let queries = queries.clone();
        let http = http.clone();
        let base = base.clone();
        tasks.push(tokio::spawn(async move {
            // (template index into `queries`, latency µs, ok)
            let mut samples: Vec<(usize, u64, bool)> = Vec::new();
            let mut first_error: Option<String> = None;
            let mut i = c * queries.len() / clients.max(1);
            while Instant::now() < deadline {
                let q = i % queries.len();
                i += 1;
                let url = format!("{base}/{}", queries[q].path);
                let t0 = Instant::now();
                let result = async {
                    let resp = http
                        .get(&url)
                        .header("Accept", "application/fhir+json")
                        .send()
                        .await?;
                    let status = resp.status();
                    let body = resp.bytes().await?;
                    Ok::<_, reqwest::Error>((status, body))
                }
                .await;
                let micros = t0.elapsed().as_micros() as u64;
                let ok = match &result {
                    Ok((status, body)) => {
                        let ok = status.as_u16() == 200 && looks_like_bundle(body);
                        if !ok && first_error.is_none() {
                            first_error = Some(format!(
                                "{url}: {status} {}",
                                String::from_utf8_lossy(&body[..body.len().min(300)])
                            ));
                        }
                        ok
                    }
                    Err(e) => {
                        if first_error.is_none() {
                            first_error = Some(format!("{url}: {e}"));
                        }
                        false
                    }
                };
                samples.push((q, micros, ok));
            }
            (samples, first_error)
        }));
    }
    let mut all = Vec::new();
    let mut errors_seen = Vec::new();
    for t in tasks {
        let (samples, err) = t.await.expect("client task");
        all.extend(samples);
        errors_seen.extend(err);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let ok: Vec<&(usize, u64, bool)> = all.iter().filter(|s| s.2).collect();
    let errors = all.len() - ok.len();
    let mut lat: Vec<u64> = ok.iter().map(|s| s.1).collect();
    lat.sort_unstable();
    println!(
        "{label}: {} requests in {elapsed:.1} s = {:.1} requests/s ok, {errors} errors; latency ms p50 {:.2} p90 {:.2} p99 {:.2} max {:.2}",
        all.len(),
        ok.len() as f64 / elapsed,
        percentile(&lat, 0.50),
        percentile(&lat, 0.90),
        percentile(&lat, 0.99),
        percentile(&lat, 1.0),
    );
    let mut per: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for s in &ok {
        per.entry(queries[s.0].template.as_str())
            .or_default()
            .push(s.1);
    }
    for (t, mut v) in per {
        v.sort_unstable();
        println!(
            "  {label} {t:<28} n {:>6}  p50 {:>8.2} ms  p99 {:>8.2} ms",
            v.len(),
            percentile(&v, 0.5),
            percentile(&v, 0.99)
        );
    }
    for e in errors_seen.iter().take(3) {
        println!("  {label} error: {e}");
    }
}

/// Every query once, every page: `TEMPLATE<TAB>PATH<TAB>MATCHES<TAB>INCLUDES<TAB>PAGES<TAB>TOTAL`
/// (TOTAL is the Bundle's `total` when the first page has one, else `-`).
async fn check(
    base: String,
    queries: Vec<Query>,
    out: &str,
    max_pages: usize,
) -> Result<(), String> {
    let http = client();
    let mut file = std::fs::File::create(out).map_err(|e| format!("{out}: {e}"))?;
    for q in &queries {
        let mut url = format!("{base}/{}", q.path);
        let (mut matches, mut includes, mut pages) = (0usize, 0usize, 0usize);
        let mut total = String::from("-");
        loop {
            let resp = http
                .get(&url)
                .header("Accept", "application/fhir+json")
                .send()
                .await
                .map_err(|e| format!("{url}: {e}"))?;
            let status = resp.status();
            let body = resp.bytes().await.map_err(|e| format!("{url}: {e}"))?;
            if status.as_u16() != 200 {
                return Err(format!(
                    "{url}: {status} {}",
                    String::from_utf8_lossy(&body[..body.len().min(500)])
                ));
            }
            let bundle: Value = serde_json::from_slice(&body).map_err(|e| format!("{url}: {e}"))?;
            if bundle["resourceType"] != "Bundle" {
                return Err(format!("{url}: not a Bundle"));
            }
            if pages == 0
                && let Some(t) = bundle["total"].as_u64()
            {
                total = t.to_string();
            }
            pages += 1;
            for e in bundle["entry"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
            {
                match e["search"]["mode"].as_str() {
                    Some("include") => includes += 1,
                    Some("outcome") => {}
                    _ => matches += 1,
                }
            }
            let next = bundle["link"].as_array().and_then(|links| {
                links
                    .iter()
                    .find(|l| l["relation"] == "next")
                    .and_then(|l| l["url"].as_str())
            });
            match next {
                Some(n) if pages < max_pages => url = n.to_string(),
                _ => break,
            }
        }
        writeln!(
            file,
            "{}\t{}\t{matches}\t{includes}\t{pages}\t{total}",
            q.template, q.path
        )
        .map_err(|e| format!("{out}: {e}"))?;
    }
    Ok(())
}
