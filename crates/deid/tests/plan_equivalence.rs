//! The compiled plan (one walk per resource, plan.rs) against the rule-by-rule walker: the same
//! output for every corpus input and for Synthea resources and Bundles, under every R4
//! configuration of the corpus and two written to stress rule order, nesting, seals and the
//! date-shift id. Random methods are made deterministic first (`encrypt` → `cryptoHash`,
//! `perturb` with span 0). Prints how many resources took the plan.

use std::io::Read;
use std::path::{Path, PathBuf};

use chrono::NaiveDate;
use deid::{Config, Engine};
use serde_json::{Value as Json, json};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus")
}

fn read_json(p: &Path) -> Option<Json> {
    let text = std::fs::read_to_string(p).ok()?;
    serde_json::from_str(text.trim_start_matches('\u{feff}')).ok()
}

/// encrypt and perturb draw random numbers; make them deterministic.
fn deterministic(mut config: Json) -> Json {
    if let Some(Json::Array(rules)) = config.get_mut("fhirPathRules") {
        for r in rules.iter_mut() {
            match r
                .get("method")
                .and_then(Json::as_str)
                .map(str::to_lowercase)
            {
                Some(m) if m == "encrypt" => r["method"] = json!("cryptoHash"),
                Some(m) if m == "perturb" => {
                    r["span"] = json!(0);
                    r["rangeType"] = json!("fixed");
                }
                _ => {}
            }
        }
    }
    config
}

fn stress_configs() -> Vec<(String, Json)> {
    let params = json!({"dateShiftKey": "k", "cryptoHashKey": "h", "encryptKey": "",
        "enablePartialDatesForRedact": true, "enablePartialZipCodesForRedact": true,
        "enablePartialAgesForRedact": true});
    let order = json!({"fhirVersion": "R4", "processingErrors": "raise", "parameters": params,
    "fhirPathRules": [
        {"path": "nodesByType('HumanName').family", "method": "keep"},
        {"path": "Patient.name", "method": "redact"},
        {"path": "nodesByName('birthDate')", "method": "dateShift"},
        {"path": "Resource.id", "method": "cryptoHash"},
        {"path": "nodesByType('dateTime')", "method": "dateShift"},
        {"path": "nodesByType('Reference').reference", "method": "cryptoHash"},
        {"path": "Bundle.entry.resource.meta", "method": "keep"},
        {"path": "Bundle.entry.fullUrl", "method": "cryptoHash"},
        {"path": "nodesByName('value')", "method": "keep"},
        {"path": "nodesByType('Quantity')", "method": "perturb", "span": 0, "rangeType": "fixed", "roundTo": 1},
        {"path": "Observation.component.value", "method": "perturb", "span": 0, "rangeType": "fixed"},
        {"path": "nodesByType('Identifier')", "method": "redact"},
        {"path": "Patient.address.postalCode", "method": "redact"},
        {"path": "nodesByType('Address')", "method": "redact"},
        {"path": "nodesByType('date')", "method": "redact"},
        {"path": "nodesByName('contained')", "method": "keep"},
        {"path": "Encounter", "method": "redact"},
        {"path": "nodesByType('Coding').display", "method": "redact"},
        {"path": "nodesByName('text')", "method": "redact"}
    ]});
    let seals = json!({"fhirVersion": "R4", "processingErrors": "raise", "parameters": params,
    "fhirPathRules": [
        {"path": "nodesByType('Quantity').unit", "method": "redact"},
        {"path": "Observation.value", "method": "perturb", "span": 0, "rangeType": "fixed", "roundTo": 0},
        {"path": "nodesByName('value')", "method": "redact"},
        {"path": "nodesByType('Reference')", "method": "cryptoHash"},
        {"path": "Resource.id", "method": "cryptoHash"},
        {"path": "nodesByType('instant')", "method": "dateShift"},
        {"path": "Resource", "method": "keep"},
        {"path": "nodesByType('string')", "method": "redact"}
    ]});
    // The same rules with one date shift per patient (our `patient` scope).
    let mut patient = order.clone();
    patient["parameters"]["dateShiftScope"] = json!("patient");
    vec![
        ("stress-order".into(), order),
        ("stress-seals".into(), seals),
        ("stress-patient".into(), patient),
    ]
}

fn configs() -> Vec<(String, Json)> {
    let mut out = stress_configs();
    for entry in std::fs::read_dir(dir().join("shipped-configs")).unwrap() {
        let p = entry.unwrap().path();
        if p.file_name().unwrap().to_string_lossy().starts_with("r4-")
            && let Some(c) = read_json(&p)
        {
            out.push((p.display().to_string(), c));
        }
    }
    for entry in std::fs::read_dir(dir().join("cases")).unwrap() {
        let p = entry.unwrap().path().join("config.json");
        if let Some(c) = read_json(&p) {
            out.push((p.display().to_string(), c));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn inputs() -> Vec<Json> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir().join("cases")).unwrap() {
        if let Some(v) = read_json(&entry.unwrap().path().join("input.json")) {
            out.push(v);
        }
    }
    let synthea = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/synthea-r4-100");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&synthea)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".json.gz"))
        .collect();
    files.sort();
    for f in files.iter().take(2) {
        let mut text = String::new();
        flate2::read::GzDecoder::new(std::fs::File::open(f).unwrap())
            .read_to_string(&mut text)
            .unwrap();
        let bundle: Json = serde_json::from_str(&text).unwrap();
        for e in bundle["entry"].as_array().unwrap() {
            out.push(e["resource"].clone());
        }
        out.push(bundle);
    }
    // Nesting: a contained resource inside a Bundle entry.
    out.push(
        json!({"resourceType": "Bundle", "id": "b1", "type": "collection", "entry": [
        {"fullUrl": "urn:uuid:1", "resource": {"resourceType": "Observation", "id": "o1",
            "status": "final", "code": {"text": "x"},
            "contained": [{"resourceType": "Patient", "id": "p1", "birthDate": "1950-02-03",
                "name": [{"family": "F", "given": ["G"]}], "address": [{"postalCode": "03601"}]}],
            "subject": {"reference": "#p1"},
            "valueQuantity": {"value": 12.34, "unit": "mg"},
            "component": [{"code": {"text": "c"}, "valueQuantity": {"value": 5.5, "unit": "kg"}}],
            "effectiveDateTime": "2020-01-02T03:04:05Z"}}]}),
    );
    out
}

#[test]
fn compiled_plan_matches_rule_by_rule() {
    let today = NaiveDate::from_ymd_opt(2026, 1, 1).unwrap();
    let inputs = inputs();
    let (mut compared, mut planned, mut errors) = (0usize, 0usize, 0usize);
    for (name, config) in configs() {
        let text = deterministic(config).to_string();
        // One parse: empty keys are filled with random ones.
        let Ok(config) = Config::parse(&text) else {
            continue; // invalid or STU3 configurations (the config-validation cases)
        };
        let fast = Engine::new(config.clone()).with_today(today);
        let slow = Engine::new(config).with_today(today).rule_by_rule();
        for input in &inputs {
            compared += 1;
            planned += usize::from(fast.takes_plan(input));
            let a = fast.anonymize(input.clone());
            let b = slow.anonymize(input.clone());
            match (a, b) {
                (Ok(a), Ok(b)) => {
                    assert_eq!(
                        a.resource.to_string(),
                        b.resource.to_string(),
                        "{name}: {} {}",
                        input["resourceType"],
                        input["id"]
                    );
                    assert_eq!(a.skipped, b.skipped, "{name}");
                }
                (Err(a), Err(b)) => {
                    errors += 1;
                    assert_eq!(a.to_string(), b.to_string(), "{name}");
                }
                (a, b) => panic!(
                    "{name}: {} {}: plan {:?} vs rule by rule {:?}",
                    input["resourceType"],
                    input["id"],
                    a.map(|o| o.resource),
                    b.map(|o| o.resource)
                ),
            }
        }
    }
    println!(
        "plan equivalence: {compared} (config, resource) pairs equal, {planned} through the plan, {errors} equal errors"
    );
    assert!(
        planned * 2 > compared,
        "the plan should take most resources"
    );
}
