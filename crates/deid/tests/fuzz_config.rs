//! Property tests (fuzzing) of the anonymizer configuration loader and plan compiler: the
//! configurations of the corpus (shipped samples, validation cases, conformance cases), mutated
//! as text (cuts, stray brackets, quotes, comments) and as JSON (rules with generated or hostile
//! FHIRPath, methods with odd parameters, parameters of the wrong type). Properties: loading
//! never panics; a configuration that loads compiles to a plan and anonymizes the corpus inputs
//! without panicking or running without bound; comments and trailing commas (which the loader
//! accepts) change nothing.
//!
//! `PROPTEST_CASES` sets the cases per property, `FUZZ_SCALE` multiplies the small defaults
//! below (CI runs them as they are; the long run is `scripts/fuzz-long.sh`). Failures are not persisted: a failing case is printed, minimized, and
//! becomes a named regression test.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use deid::{Config, Engine};
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;
use serde_json::{Value, json};

fn config(default_cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            // `FUZZ_SCALE` multiplies every property's own default (scripts/fuzz-long.sh).
            let scale: u32 = std::env::var("FUZZ_SCALE")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(1);
            default_cases.saturating_mul(scale)
        });
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus")
}

fn files_named(dir: &Path, suffix: &str, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            files_named(&p, suffix, out);
        } else if p.to_string_lossy().ends_with(suffix) {
            out.push(p);
        }
    }
}

/// Every configuration text of the corpus.
fn config_texts() -> &'static Vec<String> {
    static TEXTS: OnceLock<Vec<String>> = OnceLock::new();
    TEXTS.get_or_init(|| {
        let mut paths = Vec::new();
        files_named(&corpus().join("shipped-configs"), ".json", &mut paths);
        files_named(
            &corpus().join("config-validation"),
            "config.json",
            &mut paths,
        );
        files_named(&corpus().join("cases"), "config.json", &mut paths);
        let texts: Vec<String> = paths
            .iter()
            .filter_map(|p| std::fs::read_to_string(p).ok())
            .collect();
        assert!(texts.len() > 50, "{}", texts.len());
        texts
    })
}

/// A few resources of the corpus to anonymize (inputs of the conformance cases).
fn inputs() -> &'static Vec<Value> {
    static INPUTS: OnceLock<Vec<Value>> = OnceLock::new();
    INPUTS.get_or_init(|| {
        let mut paths = Vec::new();
        files_named(&corpus().join("cases"), "input.json", &mut paths);
        let mut v: Vec<Value> = paths
            .iter()
            .filter_map(|p| serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok())
            .collect();
        v.truncate(12);
        assert!(!v.is_empty());
        v
    })
}

const PATHS: &[&str] = &[
    "nodesByType('HumanName')",
    "nodesByType('Extension').url",
    "nodesByName('birthDate')",
    "Patient",
    "Patient.name.given",
    "Resource.id",
    "Observation.value",
    "Bundle.entry.resource",
    "Patient.address.where(state = 'x').postalCode",
    "descendants()",
    "nodesByType('date') | nodesByType('dateTime')",
    "Patient.repeat($this)",
    "%resource.descendants().select(%resource.descendants())",
    "1.repeat($this + 1)",
    "Patient.name.select($this & $this)",
    "Unknown.thing",
    "Patient..name",
    "nodesByType(",
    "",
    "Patient.name[99999999999999999999]",
];

fn fhirpath() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(PATHS).prop_map(str::to_string),
        1 => "[A-Za-z().'|$%\\[\\]0-9 ]{0,30}".prop_map(|s| s),
        1 => (1usize..3000).prop_map(|n| format!("Patient{}", ".name".repeat(n))),
        1 => (1usize..3000).prop_map(|n| format!("{}1{}", "(".repeat(n), ")".repeat(n))),
    ]
}

fn odd_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|i| json!(i)),
        any::<f64>().prop_map(|f| json!(f)),
        Just(json!(1e308)),
        Just(json!(-0.0)),
        Just(serde_json::from_str::<Value>("123456789012345678901234567890.5").unwrap()),
        "\\PC{0,20}".prop_map(Value::String),
        Just(json!("NaN")),
        Just(json!("-1")),
        Just(json!("29")),
        Just(json!([])),
        Just(json!({})),
        Just(json!([{"x": 1}])),
    ]
}

fn rule() -> impl Strategy<Value = Value> {
    let method = prop::sample::select(
        &[
            "keep",
            "redact",
            "dateShift",
            "cryptoHash",
            "encrypt",
            "substitute",
            "perturb",
            "generalize",
            "Redact",
            "unknownMethod",
            "",
        ][..],
    );
    (
        fhirpath(),
        method,
        prop::collection::vec(
            (
                prop::sample::select(
                    &[
                        "span",
                        "rangeType",
                        "roundTo",
                        "replaceWith",
                        "cases",
                        "otherValues",
                        "extra",
                    ][..],
                ),
                prop_oneof![
                    3 => odd_value(),
                    1 => (fhirpath(), fhirpath())
                        .prop_map(|(k, v)| json!({ k: v })),
                    1 => Just(json!("fixed")),
                    1 => Just(json!("proportional")),
                    1 => Just(json!({"resourceType": "Patient", "id": "x"})),
                ],
            ),
            0..4,
        ),
    )
        .prop_map(|(path, method, extra)| {
            let mut r = json!({"path": path, "method": method});
            for (k, v) in extra {
                r[k] = v;
            }
            r
        })
}

/// The corpus configurations that are JSON objects as they are (no comments).
fn config_objects() -> Vec<Value> {
    config_texts()
        .iter()
        .filter_map(|t| serde_json::from_str::<Value>(t).ok())
        .filter(Value::is_object)
        .collect()
}

/// A corpus configuration with JSON-level edits.
fn mutated_json() -> impl Strategy<Value = Value> {
    (
        prop::sample::select(config_objects()),
        prop::collection::vec(
            (0u8..6, rule(), any::<prop::sample::Index>(), odd_value()),
            1..5,
        ),
    )
        .prop_map(|(mut v, edits)| {
            for (kind, r, at, odd) in edits {
                let rules = v.get_mut("fhirPathRules").and_then(Value::as_array_mut);
                match (kind, rules) {
                    (0, Some(rules)) => rules.push(r),
                    (1, Some(rules)) if !rules.is_empty() => {
                        let i = at.index(rules.len());
                        rules[i] = r;
                    }
                    (2, Some(rules)) if !rules.is_empty() => {
                        let i = at.index(rules.len());
                        rules.remove(i);
                    }
                    (3, _) => {
                        let k = [
                            "dateShiftKey",
                            "dateShiftScope",
                            "dateShiftFixedOffsetInDays",
                            "cryptoHashKey",
                            "encryptKey",
                            "enablePartialAgesForRedact",
                            "enablePartialDatesForRedact",
                            "enablePartialZipCodesForRedact",
                            "restrictedZipCodeTabulationAreas",
                        ];
                        let key = k[at.index(k.len())];
                        if !v["parameters"].is_object() {
                            v["parameters"] = json!({});
                        }
                        v["parameters"][key] = odd;
                    }
                    (4, _) => {
                        let k = [
                            "fhirVersion",
                            "processingErrors",
                            "fhirPathRules",
                            "parameters",
                        ];
                        v[k[at.index(k.len())]] = odd;
                    }
                    _ => {}
                }
            }
            v
        })
}

/// A corpus configuration with text-level edits.
fn mutated_text() -> impl Strategy<Value = String> {
    (
        prop::sample::select(config_texts().clone()),
        prop::collection::vec(
            (
                any::<prop::sample::Index>(),
                0u8..4,
                prop::sample::select(
                    &[
                        "{",
                        "}",
                        "[",
                        "]",
                        ",",
                        ":",
                        "\"",
                        "\\",
                        "//",
                        "/*",
                        "*/",
                        "\n",
                        ",}",
                        "\u{feff}",
                        "é",
                        "\"a\":1,",
                        "\"path\":\"x\",",
                    ][..],
                ),
            ),
            1..4,
        ),
    )
        .prop_map(|(mut t, edits)| {
            for (at, kind, piece) in edits {
                let cuts: Vec<usize> = t.char_indices().map(|(i, _)| i).chain([t.len()]).collect();
                let i = cuts[at.index(cuts.len())];
                match kind {
                    0 => t.insert_str(i, piece),
                    1 => {
                        let end = cuts.iter().copied().find(|&c| c > i).unwrap_or(i);
                        t.replace_range(i..end, "");
                    }
                    2 => t.truncate(i),
                    _ => {
                        let s = t[i..].chars().take(40).collect::<String>();
                        t.insert_str(i, &s);
                    }
                }
            }
            t
        })
}

/// Loads; when it loads, compiles the plan and anonymizes the corpus inputs (plan and
/// rule-by-rule). Errors are fine; panics, stack overflows and hangs are not.
fn check(text: &str) {
    let Ok(cfg) = Config::parse(text) else {
        return;
    };
    let today = chrono::NaiveDate::from_ymd_opt(2024, 5, 6).unwrap();
    let engine = Engine::new(cfg.clone()).with_today(today);
    let walker = Engine::new(cfg).with_today(today).rule_by_rule();
    for r in inputs() {
        let _ = engine.anonymize(r.clone());
        let _ = walker.anonymize(r.clone());
    }
}

/// Writes JSON with comments and trailing commas, as the loader accepts.
fn with_comments(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => {
            out.push_str("{ /* o */\n");
            for (k, x) in m {
                out.push_str(&serde_json::to_string(k).unwrap());
                out.push_str(": ");
                with_comments(x, out);
                out.push_str(", // m\n");
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for x in a {
                with_comments(x, out);
                out.push_str(" , ");
            }
            out.push_str("/* end */]");
        }
        other => out.push_str(&other.to_string()),
    }
}

fn summary(text: &str) -> String {
    match Config::parse(text) {
        Ok(c) => format!("{:?} {:?} {:?}", c.processing_errors, c.rules, c.warnings),
        Err(e) => format!("error {e}"),
    }
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn mutated_json_configs_load_and_run_without_panic(v in mutated_json()) {
        check(&v.to_string());
    }

    #[test]
    fn mutated_config_texts_never_panic(t in mutated_text()) {
        check(&t);
    }

    #[test]
    fn arbitrary_text_never_panics(t in "[{}\\[\\],:\"\\\\/*a-z0-9 \n]{0,80}") {
        let _ = Config::parse(&t);
    }

    /// Comments and trailing commas are accepted and change nothing.
    #[test]
    fn comments_and_trailing_commas_change_nothing(v in mutated_json()) {
        let plain = v.to_string();
        let mut commented = String::new();
        with_comments(&v, &mut commented);
        let a = summary(&plain);
        // Error texts may name positions; only the verdicts of loadable configurations must agree.
        if !a.starts_with("error") {
            prop_assert_eq!(summary(&commented), a);
        }
    }
}

// Regressions found by the properties above, minimized.

/// A fixed date-shift offset beyond chrono's range of days panicked in `TimeDelta::days` while
/// anonymizing (`dateShiftFixedOffsetInDays` comes from the configuration, which an export's
/// requester can supply). Such an offset is refused at load now (the shift it overflowed left
/// the date as it was: security review); the shift itself still does not panic on it.
#[test]
fn huge_fixed_date_shift_offset_does_not_panic() {
    for days in [i64::MAX, i64::from(i32::MAX)] {
        let text = json!({
            "fhirVersion": "R4",
            "fhirPathRules": [{"path": "Patient.birthDate", "method": "dateShift"}],
            "parameters": {"dateShiftFixedOffsetInDays": days},
        })
        .to_string();
        let e = Engine::from_config_text(&text).expect_err("refused at load");
        assert!(e.to_string().contains("dateShiftFixedOffsetInDays"), "{e}");
    }
    let today = chrono::NaiveDate::from_ymd_opt(2024, 5, 6).unwrap();
    let _ = deid::transforms::shift_date("1980-02-03", true, i64::MAX, false, today);
}
