//! Function-level vectors from tests/corpus/vectors (upstream unit tests). Prints pass counts.

use chrono::NaiveDate;
use deid::transforms::{self, Shifted};
use serde_json::Value as Json;

fn load(name: &str) -> Json {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus/vectors")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(p).expect("vector file")).expect("json")
}

fn arr<'a>(v: &'a Json, k: &str) -> &'a Vec<Json> {
    v[k].as_array().unwrap_or_else(|| panic!("{k}"))
}

fn s(v: &Json) -> &str {
    v.as_str().unwrap_or("")
}

#[test]
fn vectors() {
    let today = NaiveDate::from_ymd_opt(2026, 11, 22).unwrap();
    let mut failures = Vec::new();
    let mut n = 0;
    let mut check = |what: String, got: Option<String>, want: Option<String>| {
        n += 1;
        if got != want {
            failures.push(format!("{what}: got {got:?}, want {want:?}"));
        }
    };
    let h = load("crypto_hash.json");
    for v in arr(&h, "vectors") {
        check(
            format!("hash {}", v["input"]),
            Some(transforms::crypto_hash(s(&h["key"]), s(&v["input"]))),
            v["expected"].as_str().map(String::from),
        );
    }
    let d = load("date_shift_and_redact.json");
    for v in arr(&d, "offsetVectors") {
        check(
            format!("offset {v}"),
            Some(transforms::date_shift_offset(s(&v["prefix"]), s(&v["key"])).to_string()),
            Some(v["offset"].to_string()),
        );
    }
    let shifted = |r: Shifted, input: &str| match r {
        Shifted::Value(x) => Some(x),
        Shifted::Redacted(x) => x,
        Shifted::Unchanged => Some(input.to_string()),
        // The reference throws: no output, as a vector expecting none says.
        Shifted::OutOfRange => None,
    };
    for v in arr(&d, "shiftVectors_key_dummy_prefix_empty") {
        let r = transforms::shift_date(s(&v["input"]), s(&v["type"]) == "date", -21, false, today);
        check(
            format!("shift {v}"),
            shifted(r, s(&v["input"])),
            v["expected"].as_str().map(String::from),
        );
    }
    for v in arr(&d, "fixedOffsetVectors_derivedFromAlgorithm") {
        let off = v["fixedOffsetInDays"].as_i64().unwrap_or(0);
        let r = transforms::shift_date(s(&v["input"]), s(&v["type"]) == "date", off, false, today);
        check(
            format!("fixed {v}"),
            shifted(r, s(&v["input"])),
            v["expected"].as_str().map(String::from),
        );
    }
    for v in arr(&d, "dateShiftFallsBackToRedact") {
        let partial = v["enablePartialDatesForRedact"].as_bool().unwrap_or(false);
        let r =
            transforms::shift_date(s(&v["input"]), s(&v["type"]) == "date", -21, partial, today);
        check(
            format!("fallback {v}"),
            shifted(r, s(&v["input"])),
            v["expected"].as_str().map(String::from),
        );
    }
    for v in arr(&d, "redactVectors") {
        let partial = v["partial"].as_bool().unwrap_or(false);
        let r = transforms::redact_date(s(&v["input"]), s(&v["type"]) == "date", partial, today);
        check(
            format!("redact {v}"),
            r,
            v["expected"].as_str().map(String::from),
        );
    }
    let z = load("postal_code.json");
    for key in ["partialVectors", "partialVectors2"] {
        let restricted: Vec<String> = arr(&z[key], "restricted")
            .iter()
            .map(|x| s(x).to_string())
            .collect();
        for v in arr(&z[key], "vectors") {
            check(
                format!("zip {v}"),
                Some(transforms::redact_postal_code(s(&v["input"]), &restricted)),
                v["expected"].as_str().map(String::from),
            );
        }
    }
    let r = load("reference_transform.json");
    for v in arr(&r, "placeholderVectors") {
        check(
            format!("ref {v}"),
            Some(transforms::transform_reference(s(&v["input"]), &|_| {
                "@ID".to_string()
            })),
            v["expected"].as_str().map(String::from),
        );
    }
    let key = s(&r["hashedVectors"]["key"]).to_string();
    for v in arr(&r["hashedVectors"], "vectors") {
        check(
            format!("ref-hash {v}"),
            Some(transforms::transform_reference(s(&v["input"]), &|x| {
                transforms::crypto_hash(&key, x)
            })),
            v["expected"].as_str().map(String::from),
        );
    }
    let a = load("aes_encrypt.json");
    for v in arr(&a, "decryptVectors") {
        check(
            format!("aes {v}"),
            transforms::decrypt(s(&a["key"]), s(&v["ciphertext"])).ok(),
            v["plaintext"].as_str().map(String::from),
        );
    }
    for v in arr(&a, "invalidCiphertexts") {
        check(
            format!("aes-invalid {v}"),
            transforms::decrypt(s(&a["key"]), s(v)).ok(),
            None,
        );
    }
    println!(
        "vectors: {} passed, {} failed",
        n - failures.len(),
        failures.len()
    );
    for f in &failures {
        println!("FAIL {f}");
    }
    assert!(failures.is_empty());
}
