//! `--database` through the real binary: a PostgreSQL server that cannot be reached ends every
//! command that opens the store with one clear line and exit status 3 (no panic, no backtrace),
//! and a value that names no backend is refused when the flags are parsed.

mod common;

use std::process::Output;

// `closed_port`: a port nothing listens on (bound, then released).
use common::{fhirhose, free_port as closed_port};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Exit status 3, and stderr ends with one `error:` line naming the unreachable database,
/// without the password of the URL.
fn assert_unavailable(out: &Output, what: &str) {
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{what}: {stderr}");
    assert!(!stderr.contains("panicked"), "{what}: {stderr}");
    assert!(
        !stderr.contains("s3cret"),
        "{what} shows the password: {stderr}"
    );
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: ") && last.contains("unavailable") && last.contains("127.0.0.1"),
        "{what}: {stderr}"
    );
    assert_eq!(
        stderr.lines().filter(|l| l.starts_with("error:")).count(),
        1,
        "{what}: {stderr}"
    );
}

#[test]
fn an_unreachable_database_ends_each_command_with_one_line_and_status_3() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("postgres://fh:s3cret@127.0.0.1:{}/fhirhose", closed_port());
    let data = dir.path().join("data");
    let data = data.to_str().expect("utf-8 path");
    let ndjson = dir.path().join("p.ndjson");
    std::fs::write(&ndjson, "{\"resourceType\":\"Patient\",\"id\":\"a\"}\n").expect("write");

    let serve = fhirhose()
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir", data])
        .args(["--database", &url])
        .output()
        .expect("run serve");
    assert_unavailable(&serve, "serve");

    let load = fhirhose()
        .args(["load", "--data-dir", data])
        .arg(&ndjson)
        .env("FHIRHOSE_DATABASE", &url)
        .output()
        .expect("run load");
    assert_unavailable(&load, "load (database from the environment)");

    let reindex = fhirhose()
        .args(["reindex", "--data-dir", data, "--database", &url])
        .output()
        .expect("run reindex");
    assert_unavailable(&reindex, "reindex");

    let keys = fhirhose()
        .args(["keys", "--data-dir", data, "--database", &url, "list"])
        .output()
        .expect("run keys list");
    assert_unavailable(&keys, "keys list");

    let config = dir.path().join("config.json");
    std::fs::write(&config, r#"{"fhirPathRules":[]}"#).expect("write config");
    let out = dir.path().join("out");
    let anonymize = fhirhose()
        .args(["anonymize", "--data-dir", data, "--database", &url])
        .args(["--key-set", "research", "--config"])
        .arg(&config)
        .arg("-i")
        .arg(&ndjson)
        .arg("-o")
        .arg(&out)
        .output()
        .expect("run anonymize --key-set");
    assert_unavailable(&anonymize, "anonymize --key-set");
}

#[test]
fn a_database_value_naming_no_backend_is_refused_before_anything_opens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let out = fhirhose()
        .args(["reindex", "--data-dir", data.to_str().expect("utf-8 path")])
        .args(["--database", "postgress://127.0.0.1/fh"])
        .output()
        .expect("run reindex");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--database"), "{stderr}");
    assert!(
        stderr.contains("postgres:// or postgresql:// URL"),
        "{stderr}"
    );
    // Nothing was created: a typo must not start an empty SQLite store.
    assert!(!data.exists());
}
