//! Conformance runner over the HL7 FHIRPath suite and the section files in `tests/corpus/cases`.
//!
//! Prints `passed/total` per file. Fails when a case that is not listed in `tests/known-failures.txt`
//! fails, or when fewer than 95% of the enabled cases of `fhir-r4.yaml` pass.
//! `FHIRPATH_WRITE_KNOWN_FAILURES=1` rewrites the list from the current failures (review the diff).

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use fhirpath::{EvalContext, Expression, FunctionRegistry, Item, SystemValue, Temporal};
use serde_json::Value as Json;

struct Case {
    file: String,
    desc: String,
    expression: String,
    input: Option<Json>,
    expected: Vec<Json>,
    error: bool,
    variables: Vec<(String, Json)>,
}

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus")
}

fn load_cases(file: &Path, resources: &mut HashMap<String, Json>) -> (Vec<Case>, usize) {
    let text = fs::read_to_string(file).expect("case file is readable");
    let doc: Json = serde_norway::from_str(&text).expect("case file is valid YAML");
    let name = file
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("")
        .to_string();
    let default_subject = doc.get("subject").cloned();
    let mut out = Vec::new();
    let mut disabled = 0;
    if let Some(tests) = doc.get("tests").and_then(Json::as_array) {
        walk(
            tests,
            &name,
            &default_subject,
            resources,
            &mut out,
            &mut disabled,
        );
    }
    (out, disabled)
}

fn walk(
    list: &[Json],
    file: &str,
    subject: &Option<Json>,
    resources: &mut HashMap<String, Json>,
    out: &mut Vec<Case>,
    disabled: &mut usize,
) {
    for entry in list {
        let Some(obj) = entry.as_object() else {
            continue;
        };
        if let Some((_, inner)) = obj.iter().find(|(k, _)| k.starts_with("group")) {
            if let Some(inner) = inner.as_array() {
                walk(inner, file, subject, resources, out, disabled);
            }
            continue;
        }
        let Some(expr) = obj.get("expression") else {
            continue;
        };
        if obj.get("disable").and_then(Json::as_bool) == Some(true) {
            *disabled += 1;
            continue;
        }
        let expression = match expr {
            Json::String(s) => s.clone(),
            other => other.to_string(),
        };
        let input = if let Some(f) = obj.get("inputfile").and_then(Json::as_str) {
            Some(
                resources
                    .entry(f.to_string())
                    .or_insert_with(|| {
                        let p = corpus().join("resources/r4").join(f);
                        serde_json::from_str(&fs::read_to_string(p).expect("input resource exists"))
                            .expect("input resource is JSON")
                    })
                    .clone(),
            )
        } else if let Some(s) = obj.get("subject") {
            Some(s.clone())
        } else {
            subject.clone()
        };
        let expected = match obj.get("result") {
            Some(Json::Array(a)) => a.clone(),
            Some(Json::Null) | None => Vec::new(),
            Some(other) => vec![other.clone()],
        };
        let variables = obj
            .get("variables")
            .and_then(Json::as_object)
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        out.push(Case {
            file: file.to_string(),
            desc: obj
                .get("desc")
                .and_then(Json::as_str)
                .unwrap_or("")
                .trim()
                .to_string(),
            expression,
            input,
            expected,
            error: match obj.get("error") {
                Some(Json::Bool(b)) => *b,
                Some(Json::Array(a)) => a.iter().any(|x| x.as_bool() == Some(true)),
                _ => false,
            },
            variables,
        });
    }
}

fn num_eq(a: &str, b: &str) -> bool {
    match (
        a.parse::<fhirpath::Decimal>(),
        b.parse::<fhirpath::Decimal>(),
    ) {
        (Ok(x), Ok(y)) => x == y,
        _ => match (a.parse::<f64>(), b.parse::<f64>()) {
            (Ok(x), Ok(y)) => (x - y).abs() < 1e-9,
            _ => false,
        },
    }
}

fn json_match(expected: &Json, actual: &Json) -> bool {
    match (expected, actual) {
        (Json::Number(x), Json::Number(y)) => num_eq(&x.to_string(), &y.to_string()),
        (Json::Object(x), Json::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_match(v, w)))
        }
        (Json::Array(x), Json::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| json_match(p, q))
        }
        _ => expected == actual,
    }
}

fn temporal_text_eq(expected: &str, actual: &str) -> bool {
    let e = expected.trim_start_matches('@');
    let a = actual.trim_start_matches('@');
    if e == a {
        return true;
    }
    let parse = |s: &str| {
        let s = s.trim_start_matches('T');
        Temporal::parse_datetime(s).or_else(|| Temporal::parse_time(s))
    };
    match (parse(e), parse(a)) {
        (Some(x), Some(y)) => {
            x.precision == y.precision && x.compare(&y) == Some(std::cmp::Ordering::Equal)
        }
        _ => false,
    }
}

fn item_matches(expected: &Json, item: &Item<'_>) -> bool {
    match item {
        Item::Value(v) => match (expected, v) {
            (Json::Bool(e), SystemValue::Boolean(a)) => e == a,
            (Json::String(e), SystemValue::String(a)) => e == a.as_ref(),
            (Json::Number(e), SystemValue::Integer(_) | SystemValue::Decimal(_)) => {
                num_eq(&e.to_string(), &v.to_string())
            }
            (
                Json::String(e),
                SystemValue::Date(t) | SystemValue::DateTime(t) | SystemValue::Time(t),
            ) => temporal_text_eq(e, &t.to_string()),
            (Json::String(e), SystemValue::Quantity(q)) => {
                let e = e.trim();
                let (n, unit) = e.split_once(' ').unwrap_or((e, "'1'"));
                let unit = unit.trim().trim_matches('\'');
                num_eq(n, &q.value.to_string())
                    && (unit == q.unit || fhirpath_calendar(unit).is_some_and(|c| c == q.unit))
            }
            (Json::Object(_), SystemValue::Quantity(_)) => json_match(expected, &v.to_json()),
            (Json::String(e), other) => e == &other.to_string(),
            _ => false,
        },
        Item::Node(_) => {
            let actual = item.as_json();
            match (expected, &actual) {
                (Json::String(e), Json::String(a)) if e != a => {
                    // Dates and times compare by their FHIRPath text.
                    temporal_text_eq(e, a)
                }
                _ => json_match(expected, &actual),
            }
        }
    }
}

fn fhirpath_calendar(u: &str) -> Option<&'static str> {
    Some(match u {
        "year" | "years" => "year",
        "month" | "months" => "month",
        "week" | "weeks" => "week",
        "day" | "days" => "day",
        "hour" | "hours" => "hour",
        "minute" | "minutes" => "minute",
        "second" | "seconds" => "second",
        "millisecond" | "milliseconds" => "millisecond",
        _ => return None,
    })
}

/// Runs one case: `Ok(())` when it passes, `Err(reason)` otherwise.
fn run_case(case: &Case, registry: &FunctionRegistry) -> Result<(), String> {
    let expr = match Expression::compile_with(&case.expression, registry) {
        Ok(e) => e,
        Err(e) if case.error => {
            let _ = e;
            return Ok(());
        }
        Err(e) => return Err(format!("parse error: {e}")),
    };
    let null = Json::Null;
    let input = case.input.as_ref().unwrap_or(&null);
    let mut ctx = EvalContext::new(input);
    for (name, v) in &case.variables {
        ctx = match v {
            Json::Array(a) => ctx.with_json_variable(name, a.iter()),
            Json::Null => ctx.with_variable(name, Vec::new()),
            other => ctx.with_json_variable(name, std::iter::once(other)),
        };
    }
    let now = chrono::Local::now().fixed_offset();
    let ctx = ctx.with_now(now);
    match expr.evaluate(&ctx) {
        Err(e) if case.error => {
            let _ = e;
            Ok(())
        }
        Err(e) => Err(format!("evaluation error: {e}")),
        Ok(_) if case.error => Err("expected an error, evaluation succeeded".into()),
        Ok(items) => {
            let ok = items.len() == case.expected.len()
                && case
                    .expected
                    .iter()
                    .zip(&items)
                    .all(|(e, a)| item_matches(e, a));
            if ok {
                Ok(())
            } else {
                let got: Vec<String> = items.iter().map(|i| i.as_json().to_string()).collect();
                let want: Vec<String> = case.expected.iter().map(|e| e.to_string()).collect();
                Err(format!(
                    "expected [{}], got [{}]",
                    want.join(", "),
                    got.join(", ")
                ))
            }
        }
    }
}

fn known_failures_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/known-failures.txt")
}

type Key = (String, String, String);

/// A case's identity in the list: file, description and expression (several cases share a
/// description, some have none).
fn key(c: &Case) -> Key {
    let expr = c
        .expression
        .replace('\\', "\\\\")
        .replace('\n', "\\n")
        .replace('\r', "\\r")
        .replace('\t', "\\t");
    (c.file.clone(), c.desc.clone(), expr)
}

/// `file<TAB>desc<TAB>expression<TAB>reason` lines (expression with `\n`, `\r`, `\t`, `\\` escaped);
/// `#` comments.
fn load_known() -> BTreeMap<Key, String> {
    let text = fs::read_to_string(known_failures_path()).unwrap_or_default();
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let mut parts = l.splitn(4, '\t');
            Some((
                (
                    parts.next()?.to_string(),
                    parts.next()?.to_string(),
                    parts.next()?.to_string(),
                ),
                parts.next().unwrap_or("").to_string(),
            ))
        })
        .collect()
}

#[test]
fn conformance() {
    let registry = FunctionRegistry::with_anonymizer_functions();
    let mut files: Vec<PathBuf> = fs::read_dir(corpus().join("cases"))
        .expect("cases directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    let known = load_known();
    let mut resources = HashMap::new();
    let mut failures: Vec<(Key, String)> = Vec::new();
    let mut unexpected = Vec::new();
    let mut r4_rate = 0.0;
    let (mut all_pass, mut all_total) = (0, 0);
    for f in &files {
        let (cases, disabled) = load_cases(f, &mut resources);
        let mut passed = 0;
        for c in &cases {
            match run_case(c, &registry) {
                Ok(()) => passed += 1,
                Err(reason) => {
                    let reason = reason.replace(['\t', '\n', '\r'], " ");
                    if !known.contains_key(&key(c)) {
                        unexpected.push(format!(
                            "{} :: {} :: `{}` :: {}",
                            c.file, c.desc, c.expression, reason
                        ));
                    }
                    failures.push((key(c), reason));
                }
            }
        }
        let name = f.file_name().and_then(|n| n.to_str()).unwrap_or("");
        println!(
            "{name}: {passed}/{} passed ({disabled} disabled)",
            cases.len()
        );
        if name == "fhir-r4.yaml" {
            r4_rate = passed as f64 / cases.len().max(1) as f64;
        }
        all_pass += passed;
        all_total += cases.len();
    }
    println!("all files: {all_pass}/{all_total} passed");
    if std::env::var_os("FHIRPATH_WRITE_KNOWN_FAILURES").is_some() {
        let mut text = String::from(
            "# Cases of tests/corpus/cases that fail: file<TAB>description<TAB>expression<TAB>reason.\n\
             # The conformance test fails when a case not listed here fails.\n",
        );
        for (k, reason) in &failures {
            let note = known.get(k).filter(|r| !r.is_empty()).unwrap_or(reason);
            text.push_str(&format!("{}\t{}\t{}\t{note}\n", k.0, k.1, k.2));
        }
        fs::write(known_failures_path(), text).expect("write known failures");
        return;
    }
    let failing: std::collections::BTreeSet<_> = failures.iter().map(|(k, _)| k.clone()).collect();
    let stale: Vec<_> = known.keys().filter(|k| !failing.contains(*k)).collect();
    if !stale.is_empty() {
        println!(
            "{} listed known failures now pass (remove them from the list):",
            stale.len()
        );
        for (f, d, e) in stale {
            println!("  {f} :: {d} :: {e}");
        }
    }
    for u in &unexpected {
        println!("UNEXPECTED FAILURE: {u}");
    }
    assert!(
        unexpected.is_empty(),
        "{} cases failed that are not in known-failures.txt",
        unexpected.len()
    );
    assert!(
        r4_rate >= 0.95,
        "fhir-r4.yaml pass rate {:.1}% is below 95%",
        r4_rate * 100.0
    );
}
