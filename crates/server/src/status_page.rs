//! `GET /exports`: a status page of the recent export jobs, for people. Server-rendered HTML with
//! a little inline JavaScript (no framework, nothing fetched from elsewhere) that refreshes the
//! table every second from the same URL's JSON form (`?format=json`, or `Accept:
//! application/json` without `text/html`).
//!
//! It has the API's authorization: with `--auth smart` it needs a bearer token (a browser gets
//! there through a proxy that adds one) and shows only the caller's own jobs; with `--auth none`
//! every job. Each job shows its level and parameters, live progress, resources and bytes written,
//! throughput, why it failed, and links to its status URL (the manifest once complete) and files.

use std::fmt::Write as _;

use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use export::JobSummary;

use crate::AppState;
use crate::error::ApiError;
use auth::AuthContext;

/// The caller, as the export service sees it for listing: its client id.
struct Lister(AuthContext);

impl export::ExportAccess for Lister {
    fn client_id(&self) -> Option<&str> {
        self.0.client_id.as_deref()
    }
    fn owns(&self, owner: Option<&str>) -> bool {
        self.0.client_id.is_none() || self.0.client_id.as_deref() == owner
    }
    fn is_unrestricted(&self) -> bool {
        self.0.scopes.is_unrestricted()
    }
    fn allows(&self, _resource_type: &str, _permission: export::access::Permission) -> bool {
        // Listing shows the caller's own jobs only; it reads no resource.
        false
    }
    fn may_use_key_set(&self, _name: &str) -> bool {
        false
    }
}

fn wants_json(headers: &HeaderMap, query: Option<&str>) -> bool {
    if query.is_some_and(|q| {
        q.split('&')
            .any(|kv| kv == "format=json" || kv == "_format=json")
    }) {
        return true;
    }
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    accept.contains("json") && !accept.contains("text/html")
}

/// `GET /exports`.
pub async fn exports_page(
    State(state): State<AppState>,
    ctx: AuthContext,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let svc = state.export.clone();
    let jobs = crate::database_wait::run(state.database_wait, "export overview", move || {
        svc.overview(&Lister(ctx), export::RECENT_JOBS)
    })
    .await??;
    if wants_json(&headers, query.as_deref()) {
        let mut resp = serde_json::to_string(&serde_json::json!({ "jobs": jobs }))
            .map_err(|e| ApiError::internal("export overview", e))?
            .into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        resp.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        return Ok(resp);
    }
    let mut resp = page(&jobs).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // The page's own inline script and style, and nothing from anywhere else.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
    );
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    Ok(resp)
}

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn bytes_text(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

fn time_text(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_default()
}

/// One job's table row (the script renders the same markup from the JSON form).
fn row(out: &mut String, j: &JobSummary) {
    let params: Vec<String> = j
        .parameters
        .iter()
        .map(|(k, v)| format!("{}={}", esc(k), esc(v)))
        .collect();
    let level = match (j.kind, &j.group) {
        ("import", _) => "import".to_string(),
        (_, Some(g)) => format!("export group {}", esc(g)),
        (_, None) => format!("export {}", esc(&j.level)),
    };
    let _ = write!(
        out,
        "<tr id=\"job-{id}\" data-state=\"{state}\"><td><a href=\"{status}\">{id}</a><br><small>{created}</small></td>\
         <td>{level}</td><td class=\"params\">{params}</td>\
         <td class=\"state {state}\">{state}</td>\
         <td><progress max=\"100\" value=\"{pct:.1}\"></progress> <span class=\"pct\">{pct:.1}%</span><br><small class=\"progress\">{progress}</small></td>\
         <td class=\"resources\">{resources}</td><td>{bytes}</td><td>{rate:.0}/s</td><td class=\"error\">{error}</td><td class=\"files\">",
        id = esc(&j.id),
        status = esc(&j.status_url),
        created = time_text(j.created_ms),
        state = j.state,
        pct = j.percent,
        progress = esc(&j.progress),
        params = if params.is_empty() {
            "<small>(none)</small>".to_string()
        } else {
            params.join("<br>")
        },
        resources = j.resources,
        bytes = bytes_text(j.bytes),
        rate = j.resources_per_second,
        error = j.error.as_deref().map(esc).unwrap_or_default()
            + &if j.error_entries > 0 {
                format!(" {} resources in error files", j.error_entries)
            } else {
                String::new()
            },
    );
    if j.state == "complete" {
        let _ = write!(out, "<a href=\"{}\">manifest</a>", esc(&j.status_url));
        for f in &j.files {
            let _ = write!(
                out,
                "<br><a href=\"{}\">{}</a> <small>({})</small>",
                esc(&f.url),
                esc(&f.name),
                f.count
            );
        }
    } else if !j.files.is_empty() {
        let _ = write!(out, "{} files so far", j.files.len());
    }
    out.push_str("</td></tr>");
}

fn page(jobs: &[JobSummary]) -> String {
    let mut rows = String::new();
    for j in jobs {
        row(&mut rows, j);
    }
    if jobs.is_empty() {
        rows.push_str("<tr class=\"empty\"><td colspan=\"10\">no export jobs yet</td></tr>");
    }
    format!(
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Fhirhose exports</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; width: 100%; }}
th, td {{ border-bottom: 1px solid #ddd; padding: .4em .6em; text-align: left; vertical-align: top; }}
th {{ background: #f4f4f4; }}
.state.complete {{ color: #17702b; }} .state.failed {{ color: #b00020; }} .state.running {{ color: #0a58ca; }}
.error {{ color: #b00020; max-width: 25em; }} .params {{ font-family: monospace; max-width: 25em; word-break: break-all; }}
small {{ color: #666; }}
</style></head>
<body><h1>Exports</h1>
<p>The {n} most recent export jobs. <small id="updated">Refreshed every second.</small></p>
<table><thead><tr><th>Job</th><th>Kind</th><th>Parameters</th><th>State</th><th>Progress</th><th>Resources</th><th>Size</th><th>Throughput</th><th>Errors</th><th>Manifest and files</th></tr></thead>
<tbody id="jobs">{rows}</tbody></table>
<script>
"use strict";
function esc(s) {{ return String(s).replace(/[&<>"']/g, c => ({{"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;","'":"&#39;"}})[c]); }}
function size(n) {{ const u = ["B","KiB","MiB","GiB"]; let i = 0; while (n >= 1024 && i < 3) {{ n /= 1024; i++; }} return (i ? n.toFixed(1) : n) + " " + u[i]; }}
function when(ms) {{ return new Date(ms).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC"); }}
function row(j) {{
  const params = j.parameters.length ? j.parameters.map(p => esc(p[0]) + "=" + esc(p[1])).join("<br>") : "<small>(none)</small>";
  const level = j.kind === "import" ? "import" : "export " + (j.group ? "group " + esc(j.group) : esc(j.level));
  let err = j.error ? esc(j.error) : "";
  if (j.error_entries > 0) err += " " + j.error_entries + " resources in error files";
  let files = "";
  if (j.state === "complete") {{
    files = '<a href="' + esc(j.status_url) + '">manifest</a>' + j.files.map(f => '<br><a href="' + esc(f.url) + '">' + esc(f.name) + '</a> <small>(' + f.count + ')</small>').join("");
  }} else if (j.files.length) {{ files = j.files.length + " files so far"; }}
  return '<tr id="job-' + esc(j.id) + '" data-state="' + esc(j.state) + '"><td><a href="' + esc(j.status_url) + '">' + esc(j.id) + '</a><br><small>' + when(j.created_ms) + '</small></td>' +
    '<td>' + level + '</td><td class="params">' + params + '</td><td class="state ' + esc(j.state) + '">' + esc(j.state) + '</td>' +
    '<td><progress max="100" value="' + j.percent.toFixed(1) + '"></progress> <span class="pct">' + j.percent.toFixed(1) + '%</span><br><small class="progress">' + esc(j.progress) + '</small></td>' +
    '<td class="resources">' + j.resources + '</td><td>' + size(j.bytes) + '</td><td>' + Math.round(j.resources_per_second) + '/s</td>' +
    '<td class="error">' + err + '</td><td class="files">' + files + '</td></tr>';
}}
async function refresh() {{
  try {{
    const r = await fetch(location.pathname + "?format=json", {{ headers: {{ "Accept": "application/json" }}, cache: "no-store" }});
    if (r.ok) {{
      const data = await r.json();
      document.getElementById("jobs").innerHTML = data.jobs.length ? data.jobs.map(row).join("") : '<tr class="empty"><td colspan="10">no export jobs yet</td></tr>';
      document.getElementById("updated").textContent = "Updated " + new Date().toLocaleTimeString() + ".";
    }} else {{
      document.getElementById("updated").textContent = "Refresh failed: HTTP " + r.status + ".";
    }}
  }} catch (e) {{
    document.getElementById("updated").textContent = "Refresh failed: " + e + ".";
  }}
  setTimeout(refresh, 1000);
}}
setTimeout(refresh, 1000);
</script>
</body></html>
"#,
        n = export::RECENT_JOBS,
        rows = rows
    )
}
