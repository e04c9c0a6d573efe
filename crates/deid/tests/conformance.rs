//! Conformance runner over tests/corpus (a copy of shared/corpus/anonymizer, see PROVENANCE.md).
//! Comparison semantics are those of corpus/compare.py. Prints pass counts; fails on any failure
//! not listed in tests/known-failures.txt.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use chrono::NaiveDate;
use deid::{Config, Engine};
use serde_json::Value as Json;

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus")
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn norm_dt(s: &str) -> String {
    let re =
        regex::Regex::new(r"^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(\.\d+)?(Z|[+-]\d{2}:\d{2})$")
            .expect("regex");
    let Some(c) = re.captures(s) else {
        return s.to_string();
    };
    let mut frac = c
        .get(2)
        .map(|m| m.as_str())
        .unwrap_or("")
        .trim_end_matches('0')
        .to_string();
    if frac == "." {
        frac.clear();
    }
    let tz = if &c[3] == "Z" { "+00:00" } else { &c[3] };
    format!("{}{}{}", &c[1], frac, tz)
}

/// compare.py default rules: key order ignored, arrays ordered, numbers by exact text,
/// date-times normalised.
fn diff(a: &Json, b: &Json, path: &str, out: &mut Vec<String>) {
    match (a, b) {
        (Json::Object(x), Json::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                match (x.get(k), y.get(k)) {
                    (None, _) => out.push(format!("{path}/{k}: unexpected in actual")),
                    (_, None) => out.push(format!("{path}/{k}: missing in actual")),
                    (Some(p), Some(q)) => diff(p, q, &format!("{path}/{k}"), out),
                }
            }
        }
        (Json::Array(x), Json::Array(y)) => {
            if x.len() != y.len() {
                out.push(format!("{path}: array length {} != {}", x.len(), y.len()));
                return;
            }
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                diff(p, q, &format!("{path}[{i}]"), out);
            }
        }
        (Json::Number(x), Json::Number(y)) => {
            if x.to_string() != y.to_string() {
                out.push(format!("{path}: {x} != {y}"));
            }
        }
        (Json::String(x), Json::String(y)) => {
            if norm_dt(x) != norm_dt(y) {
                out.push(format!("{path}: {x:?} != {y:?}"));
            }
        }
        _ => {
            if a != b {
                out.push(format!("{path}: {a} != {b}"));
            }
        }
    }
}

fn known_failures() -> BTreeMap<String, String> {
    let text = read(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/known-failures.txt"));
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once(':'))
        .map(|(a, b)| (a.trim().to_string(), b.trim().to_string()))
        .collect()
}

fn dirs(p: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(p)
        .expect("corpus dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    v.sort();
    v
}

/// Runs one end-to-end case; `Ok(None)` = not applicable to R4.
fn run_case(dir: &Path) -> Result<Option<()>, String> {
    let case: Json =
        serde_json::from_str(&read(&dir.join("case.json"))).map_err(|e| e.to_string())?;
    let r4 = case["fhirVersions"]
        .as_array()
        .is_some_and(|a| a.iter().any(|v| v == "R4"));
    if !r4 {
        return Ok(None);
    }
    let today = NaiveDate::from_ymd_opt(2026, 11, 22).expect("date");
    let engine = match Config::parse(&read(&dir.join("config.json"))) {
        Ok(c) => Engine::new(c).with_today(today),
        Err(e) => {
            return if case["expect"] == "error" {
                Ok(Some(()))
            } else {
                Err(format!("config rejected: {e}"))
            };
        }
    };
    let result = engine.anonymize_str(&read(&dir.join("input.json")));
    match (case["expect"].as_str(), result) {
        (Some("error"), Err(_)) => Ok(Some(())),
        (Some("error"), Ok(o)) => Err(format!("expected an error, got {}", o.resource)),
        (_, Err(e)) => Err(format!("error: {e}")),
        (_, Ok(o)) => {
            let expected: Json = serde_json::from_str(
                read(&dir.join("expected.json")).trim_start_matches('\u{feff}'),
            )
            .map_err(|e| e.to_string())?;
            let mut out = Vec::new();
            diff(&expected, &o.resource, "", &mut out);
            if out.is_empty() {
                Ok(Some(()))
            } else {
                out.truncate(5);
                Err(out.join("; "))
            }
        }
    }
}

fn run_validation(dir: &Path) -> Result<(), String> {
    let case: Json =
        serde_json::from_str(&read(&dir.join("case.json"))).map_err(|e| e.to_string())?;
    let expect = match &case["expect"] {
        Json::Object(o) => o
            .get("R4")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string(),
        v => v.as_str().unwrap_or("").to_string(),
    };
    let parsed = Config::parse(&read(&dir.join("config.json")));
    match (expect.as_str(), parsed) {
        ("AnonymizerConfigurationException", Err(_)) => Ok(()),
        ("AnonymizerConfigurationException", Ok(_)) => Err("accepted an invalid config".into()),
        (_, Ok(_)) => Ok(()),
        (_, Err(e)) => Err(format!("rejected: {e}")),
    }
}

#[test]
fn conformance() {
    let known = known_failures();
    let mut unlisted = Vec::new();
    let (mut pass, mut fail, mut na) = (0, 0, 0);
    for dir in dirs(&corpus().join("cases")) {
        let id = dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("")
            .to_string();
        match run_case(&dir) {
            Ok(Some(())) => pass += 1,
            Ok(None) => na += 1,
            Err(e) => {
                fail += 1;
                println!("FAIL case {id}: {e}");
                if !known.contains_key(&id) {
                    unlisted.push(id);
                }
            }
        }
    }
    println!("cases: {pass} passed, {fail} failed, {na} not R4");
    let (mut vp, mut vf) = (0, 0);
    for dir in dirs(&corpus().join("config-validation")) {
        let id = dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("")
            .to_string();
        match run_validation(&dir) {
            Ok(()) => vp += 1,
            Err(e) => {
                vf += 1;
                println!("FAIL config-validation {id}: {e}");
                if !known.contains_key(&id) {
                    unlisted.push(id);
                }
            }
        }
    }
    println!("config-validation: {vp} passed, {vf} failed");
    assert!(unlisted.is_empty(), "unlisted failures: {unlisted:?}");
}
