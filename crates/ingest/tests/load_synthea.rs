//! Loading the 100-patient Synthea set (testdata/synthea-r4-100, gzipped) into a store.

mod support;

use std::collections::BTreeMap;

use ingest::{LoadOptions, load_into_store};

/// Bundle entries per type, from testdata/synthea-r4-100/PROVENANCE.md (the data README table).
const ENTRIES: [(&str, u64); 17] = [
    ("AllergyIntolerance", 38),
    ("CarePlan", 278),
    ("CareTeam", 278),
    ("Claim", 6083),
    ("Condition", 639),
    ("Device", 4),
    ("DiagnosticReport", 897),
    ("Encounter", 3697),
    ("ExplanationOfBenefit", 3697),
    ("ImagingStudy", 16),
    ("Immunization", 1287),
    ("MedicationRequest", 2386),
    ("Observation", 16315),
    ("Organization", 452),
    ("Patient", 100),
    ("Practitioner", 452),
    ("Procedure", 2351),
];

#[test]
fn loads_all_of_synthea_100_with_every_reference_resolved() {
    let (_dir, store) = support::temp_store();
    let mut last = None;
    let summary = load_into_store(
        &*store,
        &[support::testdata("synthea-r4-100")],
        &LoadOptions::default(),
        &mut |p| last = Some(p.clone()),
    )
    .unwrap();
    assert!(
        summary.problems.is_empty(),
        "{:?}",
        &summary.problems[..5.min(summary.problems.len())]
    );
    assert_eq!(summary.invalid, 0);
    assert_eq!(summary.unresolved_references, 0);
    assert_eq!(summary.files, 103);
    let last = last.unwrap();
    assert_eq!(last.files_done, 103);
    assert_eq!(last.resources, 38_971);

    // Every bundle entry was written once, plus the Group.
    let mut expected: BTreeMap<String, u64> =
        ENTRIES.iter().map(|(t, n)| (t.to_string(), *n)).collect();
    expected.insert("Group".into(), 1);
    assert_eq!(summary.per_type, expected);
    assert_eq!(summary.written(), 38_971);

    // Organizations and Practitioners repeat across files under one id: 203 distinct each.
    let (current, broken) = support::check_references(&*store);
    expected.insert("Organization".into(), 203);
    expected.insert("Practitioner".into(), 203);
    assert_eq!(current, expected);
    assert!(
        broken.is_empty(),
        "{} broken, e.g. {:?}",
        broken.len(),
        &broken[..3.min(broken.len())]
    );

    // Ids are kept and references point at Type/id.
    let group = store
        .read("Group", "d9f31445-f448-48c0-af57-295c005e07df")
        .unwrap();
    let group: serde_json::Value = serde_json::from_slice(&group.json).unwrap();
    assert_eq!(group["member"].as_array().unwrap().len(), 100);
    let first = group["member"][0]["entity"]["reference"].as_str().unwrap();
    assert!(first.starts_with("Patient/"), "{first}");
    store.read("Patient", &first["Patient/".len()..]).unwrap();

    // Loading again makes new versions, not duplicates.
    let again = load_into_store(
        &*store,
        &[support::testdata(
            "synthea-r4-100/groupInformation1588766256867.json.gz",
        )],
        &LoadOptions::default(),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(again.written(), 1);
    let g = store
        .read("Group", "d9f31445-f448-48c0-af57-295c005e07df")
        .unwrap();
    assert_eq!(g.version, 2);
}
