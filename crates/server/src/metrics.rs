//! `GET /metrics`: the server's counters in the Prometheus text exposition format (version 0.0.4).
//!
//! A small registry of its own (a few counters and one histogram family need no crate):
//!
//! - `fhirhose_http_requests_total{method,route,status}` and
//!   `fhirhose_http_request_duration_seconds{method,route,status}` (histogram): every request,
//!   labelled by its route *template* (`/{rtype}/{id}`, never the concrete path, so the label set
//!   stays small); requests that match no route are `route="unmatched"`.
//! - `fhirhose_export_jobs{state}`, `fhirhose_import_jobs{state}`: export and `$import` jobs by
//!   state, read from the job queue at scrape time.
//! - `fhirhose_export_resources_total`, `fhirhose_export_bytes_total`,
//!   `fhirhose_export_files_total`, `fhirhose_export_items_total{outcome}`,
//!   `fhirhose_export_item_retries_total`: the export work of this process
//!   ([`export::service::stats`]).
//! - `fhirhose_export_download_bytes_total`: file bytes sent to clients.
//! - `fhirhose_db_pool_connections{pool,state}` (`in_use`, `idle`), `fhirhose_db_pool_max{pool}`,
//!   `fhirhose_db_pool_waits_total{pool}` and `fhirhose_db_pool_wait_timeouts_total{pool}`: the
//!   database connection pools of this process (PostgreSQL: `store` and `jobs`), read through
//!   [`store::Store::pool_stats`]; absent on SQLite, which has no pool.
//!
//! Who may read it is `--metrics` ([`MetricsMode`]).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::AppState;
use crate::error::ApiError;

/// Who may read `GET /metrics` (`--metrics`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MetricsMode {
    /// No metrics endpoint (404).
    Off,
    /// Anyone who reaches the server.
    Open,
    /// Only with a valid access token (with `--auth smart`; the same as `open` without it).
    Protected,
}

/// Upper bounds (seconds) of the latency histogram's buckets.
const BUCKETS: [f64; 12] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Default)]
struct Histogram {
    buckets: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// The request counters of one server.
#[derive(Default)]
pub struct Metrics {
    /// (method, route template, status) -> latency histogram.
    requests: Mutex<BTreeMap<(String, String, u16), Histogram>>,
    download_bytes: AtomicU64,
}

impl Metrics {
    pub fn record(&self, method: &str, route: &str, status: u16, seconds: f64) {
        let mut m = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        let h = m
            .entry((method.to_string(), route.to_string(), status))
            .or_default();
        h.count += 1;
        h.sum += seconds;
        for (i, le) in BUCKETS.iter().enumerate() {
            if seconds <= *le {
                h.buckets[i] += 1;
            }
        }
    }

    /// File bytes sent by downloads.
    pub fn downloaded(&self, bytes: u64) {
        self.download_bytes.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// The middleware that times every request and counts it under its route template.
pub async fn track(
    State(metrics): State<std::sync::Arc<Metrics>>,
    req: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let method = req.method().as_str().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let resp = next.run(req).await;
    metrics.record(
        &method,
        &route,
        resp.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    resp
}

/// A label value with `\`, `"` and newlines escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// The exposition text.
pub fn render(state: &AppState) -> String {
    let mut out = String::new();
    {
        let m = state
            .metrics
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        family(
            &mut out,
            "fhirhose_http_requests_total",
            "counter",
            "HTTP requests by method, route template and status.",
        );
        for ((method, route, status), h) in m.iter() {
            let _ = writeln!(
                out,
                "fhirhose_http_requests_total{{method=\"{}\",route=\"{}\",status=\"{status}\"}} {}",
                label(method),
                label(route),
                h.count
            );
        }
        family(
            &mut out,
            "fhirhose_http_request_duration_seconds",
            "histogram",
            "HTTP request latency (until the response head) by method, route template and status.",
        );
        for ((method, route, status), h) in m.iter() {
            let labels = format!(
                "method=\"{}\",route=\"{}\",status=\"{status}\"",
                label(method),
                label(route)
            );
            for (le, n) in BUCKETS.iter().zip(h.buckets.iter()) {
                let _ = writeln!(
                    out,
                    "fhirhose_http_request_duration_seconds_bucket{{{labels},le=\"{le}\"}} {n}"
                );
            }
            let _ = writeln!(
                out,
                "fhirhose_http_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                out,
                "fhirhose_http_request_duration_seconds_sum{{{labels}}} {}",
                h.sum
            );
            let _ = writeln!(
                out,
                "fhirhose_http_request_duration_seconds_count{{{labels}}} {}",
                h.count
            );
        }
    }
    match state.export.job_counts() {
        Ok(counts) => {
            for kind in ["export", "import"] {
                family(
                    &mut out,
                    &format!("fhirhose_{kind}_jobs"),
                    "gauge",
                    &format!(
                        "{} jobs in the job queue by state (all nodes sharing the database).",
                        if kind == "export" { "Export" } else { "Import" }
                    ),
                );
                for (_, s, n) in counts.iter().filter(|c| c.0 == kind) {
                    let _ = writeln!(out, "fhirhose_{kind}_jobs{{state=\"{s}\"}} {n}");
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "metrics: cannot count export jobs"),
    }
    let s = export::service::stats();
    for (name, kind, help, value) in [
        (
            "fhirhose_export_resources_total",
            "counter",
            "Resources written to export files by this process.",
            s.resources,
        ),
        (
            "fhirhose_export_bytes_total",
            "counter",
            "Bytes of export files written by this process.",
            s.bytes,
        ),
        (
            "fhirhose_export_files_total",
            "counter",
            "Export files written by this process.",
            s.files,
        ),
        (
            "fhirhose_export_item_retries_total",
            "counter",
            "Export work items that failed transiently and were given back for another attempt.",
            s.retries,
        ),
        (
            "fhirhose_export_download_bytes_total",
            "counter",
            "Export file bytes sent to clients (whole files and ranges).",
            state.metrics.download_bytes.load(Ordering::Relaxed),
        ),
        (
            "fhirhose_request_body_bytes_held",
            "gauge",
            "Bytes of request bodies held in memory now (being read, or until their request is answered).",
            state.body_budget.in_use() as u64,
        ),
        (
            "fhirhose_request_body_bytes_limit",
            "gauge",
            "The most bytes of request bodies held in memory at once (--max-body-memory).",
            state.body_budget.total() as u64,
        ),
        (
            "fhirhose_requests_in_progress",
            "gauge",
            "Requests in progress now (from arrival to the end of the response body).",
            state.in_flight.current() as u64,
        ),
        (
            "fhirhose_requests_limit",
            "gauge",
            "The most requests in progress at once (--max-requests).",
            state.in_flight.limit() as u64,
        ),
        (
            "fhirhose_requests_refused_total",
            "counter",
            "Requests answered 503 because --max-requests or the client address's share of it was reached.",
            state.in_flight.refused(),
        ),
        (
            "fhirhose_downloads_in_progress",
            "gauge",
            "Downloads of export files in progress now (not counted in fhirhose_requests_in_progress).",
            state.downloads_in_flight.current() as u64,
        ),
        (
            "fhirhose_downloads_limit",
            "gauge",
            "The most downloads of export files in progress at once (--max-downloads).",
            state.downloads_in_flight.limit() as u64,
        ),
        (
            "fhirhose_downloads_refused_total",
            "counter",
            "Downloads answered 503 because --max-downloads or the client address's share of it was reached.",
            state.downloads_in_flight.refused(),
        ),
        (
            "fhirhose_stalled_connections_closed_total",
            "counter",
            "Connections closed because a response waited --send-timeout for its client to read it.",
            crate::slow_clients::stalled_closed(),
        ),
        (
            "fhirhose_request_bodies_refused_total",
            "counter",
            "Request bodies answered 503 because the bodies in memory were at --max-body-memory.",
            state.body_budget.refused(),
        ),
    ] {
        family(&mut out, name, kind, help);
        let _ = writeln!(out, "{name} {value}");
    }
    family(
        &mut out,
        "fhirhose_export_items_total",
        "counter",
        "Export work items run by this process, by outcome.",
    );
    for (outcome, n) in [("done", s.items_done), ("failed", s.items_failed)] {
        let _ = writeln!(
            out,
            "fhirhose_export_items_total{{outcome=\"{outcome}\"}} {n}"
        );
    }
    render_pools(&mut out, &state.store.pool_stats());
    out
}

/// The database pool families (nothing when the store has no pool).
fn render_pools(out: &mut String, pools: &[store::PoolStats]) {
    if pools.is_empty() {
        return;
    }
    family(
        out,
        "fhirhose_db_pool_connections",
        "gauge",
        "Database connections of this process by pool and state (in_use, idle).",
    );
    for p in pools {
        let pool = label(&p.name);
        let _ = writeln!(
            out,
            "fhirhose_db_pool_connections{{pool=\"{pool}\",state=\"in_use\"}} {}",
            p.in_use
        );
        let _ = writeln!(
            out,
            "fhirhose_db_pool_connections{{pool=\"{pool}\",state=\"idle\"}} {}",
            p.idle
        );
    }
    for (name, kind, help, value) in [
        (
            "fhirhose_db_pool_max",
            "gauge",
            "The most connections a database pool opens.",
            (|p: &store::PoolStats| p.max) as fn(&store::PoolStats) -> u64,
        ),
        (
            "fhirhose_db_pool_waits_total",
            "counter",
            "Connection requests that found every connection of the pool in use and waited.",
            |p| p.waits,
        ),
        (
            "fhirhose_db_pool_wait_timeouts_total",
            "counter",
            "Waits for a pooled connection that timed out (the request answered 503).",
            |p| p.wait_timeouts,
        ),
    ] {
        family(out, name, kind, help);
        for p in pools {
            let _ = writeln!(out, "{name}{{pool=\"{}\"}} {}", label(&p.name), value(p));
        }
    }
}

/// `GET /metrics`.
pub async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let text = tokio::task::spawn_blocking(move || render(&state))
        .await
        .map_err(|e| ApiError::internal("metrics", e))?;
    let mut resp = text.into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    Ok(resp)
}
