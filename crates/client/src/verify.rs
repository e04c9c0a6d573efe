//! `--verify`: the downloaded folder checked by [`manifest::verify`], the verifier
//! `fhirhose verify` runs too — each file's `count` (lines), `fileSize`/`size` (bytes) and
//! `sha256` (hex or base64) against its manifest entry, every line a JSON resource of the
//! entry's type, and the references of the output resolving within the export. It reads the
//! files one per core at a time, streamed, on a blocking thread of the runtime.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::download::File;
use crate::error::ClientError;

/// How many problems the error names (the rest are counted).
const NAMED: usize = 3;

/// What a passed verification found: references checked and, when dangling ones are only
/// warned of, how many and the first.
#[derive(Debug, Clone, Default)]
pub struct Verified {
    pub references: u64,
    pub dangling: u64,
    pub first_dangling: Option<String>,
    /// How long it took.
    pub seconds: f64,
}

/// Verifies the files of `manifest` saved in `out` (where `files` says).
pub async fn all(
    manifest: &Value,
    out: &Path,
    files: &[File],
    dangling: manifest::Dangling,
) -> Result<Verified, ClientError> {
    let (manifest, out) = (manifest.clone(), out.to_path_buf());
    let options = manifest::Options { dangling };
    let report = tokio::task::spawn_blocking(move || {
        manifest::verify(
            &manifest,
            &manifest::DirSource::downloaded(&out, &manifest),
            &options,
        )
    })
    .await
    .map_err(|e| ClientError::Verify(format!("the verification stopped: {e}")))?;
    let paths: HashMap<&str, &PathBuf> = files.iter().map(|f| (f.url.as_str(), &f.dest)).collect();
    outcome(&report, &paths)
}

/// The report as the client says it: an error naming the first [`NAMED`] problems, each with
/// the file it was found in (its local path).
fn outcome(
    report: &manifest::Report,
    paths: &HashMap<&str, &PathBuf>,
) -> Result<Verified, ClientError> {
    let first_dangling = report
        .dangling
        .first()
        .map(|d| format!("{} -> {}", d.from, d.reference));
    if report.ok() {
        return Ok(Verified {
            references: report.references,
            dangling: report.dangling_total,
            first_dangling,
            seconds: 0.0,
        });
    }
    let mut problems: Vec<String> = report
        .manifest_problems
        .iter()
        .map(|p| format!("manifest: {p}"))
        .collect();
    for f in &report.files {
        let name = paths
            .get(f.url.as_str())
            .map_or_else(|| f.url.clone(), |p| p.display().to_string());
        problems.extend(f.problems.iter().map(|p| format!("{name}: {p}")));
    }
    if report.dangling_fails && report.dangling_total > 0 {
        problems.push(format!(
            "{} references resolve to no exported resource{} (--dangling warn if the export is partial)",
            report.dangling_total,
            first_dangling
                .map(|d| format!(", the first {d}"))
                .unwrap_or_default()
        ));
    }
    let more = problems.len().saturating_sub(NAMED);
    problems.truncate(NAMED);
    let more = if more > 0 {
        format!(" (and {more} more)")
    } else {
        String::new()
    };
    Err(ClientError::Verify(format!(
        "{}{more}",
        problems.join("; ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::download::plan;
    use serde_json::json;
    use sha2::{Digest, Sha256};

    fn check(m: &Value, out: &Path) -> Result<Verified, ClientError> {
        let files = plan(m, out).unwrap();
        let report = manifest::verify(
            m,
            &manifest::DirSource::downloaded(out, m),
            &manifest::Options::default(),
        );
        let paths = files.iter().map(|f| (f.url.as_str(), &f.dest)).collect();
        outcome(&report, &paths)
    }

    #[test]
    fn counts_sizes_hashes_types_and_references_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let body = "{\"resourceType\":\"Patient\",\"id\":\"a\"}\n{\"resourceType\":\"Patient\",\"id\":\"b\",\"link\":[{\"other\":{\"reference\":\"Patient/a\"}}]}\n";
        // The URL's last segment names another file of the folder: the download name counts.
        std::fs::write(dir.path().join("Patient.1.ndjson"), body).unwrap();
        std::fs::write(dir.path().join("Patient.2.ndjson"), "").unwrap();
        let hex: String = Sha256::digest(body.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let mut m = json!({"output": [{"type": "Patient", "url": "http://s/f/Patient.2.ndjson",
            "count": 2, "size": body.len(), "sha256": hex}]});
        let path = dir.path().join("Patient.1.ndjson").display().to_string();
        let v = check(&m, dir.path()).unwrap();
        assert_eq!((v.references, v.dangling), (1, 0));
        // Base64 digests (some servers) pass too.
        use base64::Engine;
        m["output"][0]["sha256"] = json!(
            base64::engine::general_purpose::STANDARD.encode(Sha256::digest(body.as_bytes()))
        );
        check(&m, dir.path()).unwrap();

        m["output"][0]["count"] = json!(3);
        let e = check(&m, dir.path()).unwrap_err().to_string();
        assert!(
            e.contains(&format!("{path}: 2 resources (lines), the manifest says 3")),
            "{e}"
        );
        m["output"][0]["count"] = json!(2);
        m["output"][0]["sha256"] = json!("00");
        let e = check(&m, dir.path()).unwrap_err().to_string();
        assert!(e.contains(&format!("{path}: SHA-256")), "{e}");
        m["output"][0]["sha256"] = json!(null);
        m["output"][0]["size"] = json!(null);
        std::fs::write(
            dir.path().join("Patient.1.ndjson"),
            body.replacen("Patient", "Observation", 1),
        )
        .unwrap();
        let e = check(&m, dir.path()).unwrap_err().to_string();
        assert!(
            e.contains(&format!(
                "{path}: line 1 is a Observation where the manifest says Patient"
            )),
            "{e}"
        );
        // A reference to an exported type that resolves to nothing.
        std::fs::write(
            dir.path().join("Patient.1.ndjson"),
            body.replace("Patient/a", "Patient/x"),
        )
        .unwrap();
        let m = json!({"output": [{"type": "Patient", "url": "http://s/f/Patient.2.ndjson"}]});
        let e = check(&m, dir.path()).unwrap_err().to_string();
        assert!(
            e.contains(
                "1 references resolve to no exported resource, the first Patient/b -> Patient/x"
            ),
            "{e}"
        );
    }
}
