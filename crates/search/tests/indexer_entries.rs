//! `SearchIndexer::entries` reads each resource's root members once into a table and skips
//! parameters whose first member is absent. This checks that it gives exactly the rows the
//! per-parameter extraction gives (which `evaluator_agrees_with_fhirpath` holds to the fhirpath
//! crate), on every Synthea resource and on resources with an unexpected shape.

mod support;

use search::SearchIndexer;
use search::registry::{self, Storage};
use serde_json::json;
use store::{IndexEntry, Indexer};

/// The rows of a resource built parameter by parameter (the stored ones, repeats dropped).
fn expected(ty: &str, r: &serde_json::Value) -> Vec<IndexEntry> {
    let mut out: Vec<IndexEntry> = Vec::new();
    let Some(ti) = registry::type_index(ty) else {
        return out;
    };
    for p in &ti.params {
        if p.storage != Storage::Rows {
            continue;
        }
        let start = out.len();
        for v in registry::extract_param(ty, &p.code, r) {
            if !out[start..].iter().any(|e| e.value == v) {
                out.push(IndexEntry {
                    param: p.code.clone(),
                    value: v,
                });
            }
        }
    }
    out
}

#[test]
fn entries_match_per_parameter_extraction_on_synthea() {
    let resources = support::synthea::load();
    let mut rows = 0;
    for r in &resources {
        let ty = r["resourceType"].as_str().unwrap_or_default();
        let got = SearchIndexer.entries(ty, r);
        assert_eq!(got, expected(ty, r), "{ty}/{}", r["id"]);
        rows += got.len();
    }
    assert!(rows > 300_000, "{rows}");
}

#[test]
fn entries_match_on_odd_shapes() {
    let cases = [
        // two types of one choice element (invalid FHIR): both, in the model's order
        json!({"resourceType":"Observation","valueString":"x","valueQuantity":{"value":1,"code":"mg"},
            "effectivePeriod":{"start":"2020"},"effectiveDateTime":"2021-01-01","code":{"text":"T"}}),
        // members of the wrong JSON kind
        json!({"resourceType":"Observation","code":"not an object","subject":[{"reference":"Patient/1"}],
            "status":7}),
        // a Patient given as an Observation, and no resourceType at all
        json!({"resourceType":"Patient","name":[{"family":"Doe"}],"gender":"female"}),
        json!({"code":{"text":"x"}}),
        // more than 16 members (looked up by hash rather than scanned)
        json!({"resourceType":"Patient","id":"p","name":[{"family":"A","given":["B"]}],"gender":"male",
            "birthDate":"1970","active":true,"deceasedBoolean":false,"telecom":[{"system":"email","value":"e"}],
            "address":[{"city":"C"}],"language":"en","identifier":[{"system":"s","value":"v"}],
            "managingOrganization":{"reference":"Organization/o"},"maritalStatus":{"text":"M"},
            "multipleBirthBoolean":false,"communication":[{"language":{"text":"en"}}],
            "generalPractitioner":[{"reference":"Practitioner/x"}],"link":[{"other":{"reference":"Patient/q"}}],
            "contact":[{"name":{"family":"F"}}],"photo":[],"text":{"status":"generated"}}),
    ];
    for r in &cases {
        for ty in ["Observation", "Patient"] {
            assert_eq!(SearchIndexer.entries(ty, r), expected(ty, r), "{ty} {r}");
        }
    }
}
