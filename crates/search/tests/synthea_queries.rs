//! Search over the 100-patient Synthea data set, checked against a brute-force oracle: every
//! query's ids from the SQLite index (all pages followed) must equal the ids computed by
//! evaluating the parameter's expression over every resource (`support::oracle`), and the
//! compiled `_typeFilter` predicate must select the same resources.

mod support;

use std::collections::BTreeSet;

use search::Predicate;

const PATIENT: &str = "6c5d9ca9-54d7-42f5-bfae-a7c19cd217f2";

/// (type, query). Values contain no `&`/`=`/`%` so the oracle's naive split applies.
const QUERIES: &[(&str, &str)] = &[
    // token
    ("Observation", "code=http://loinc.org|8867-4"),
    ("Observation", "code=8867-4,9279-1"),
    ("Observation", "code=|8867-4"),
    ("Observation", "code=http://loinc.org|"),
    ("Observation", "code:not=http://loinc.org|8867-4"),
    ("Observation", "category=vital-signs"),
    ("Observation", "status=final&code=http://loinc.org|72514-3"),
    ("Observation", "combo-code=8480-6"),
    ("Observation", "component-code=8462-4"),
    (
        "Observation",
        "value-concept=http://snomed.info/sct|266919005",
    ),
    ("Observation", "code:text=body"),
    ("Encounter", "class=EMER,IMP"),
    ("Encounter", "type=http://snomed.info/sct|185349003"),
    ("Condition", "code=444814009,195662009"),
    ("Condition", "clinical-status=resolved"),
    ("MedicationRequest", "status=active&intent=order"),
    ("Immunization", "vaccine-code=140"),
    ("Patient", "gender=female"),
    (
        "Patient",
        "identifier=http://hl7.org/fhir/sid/us-ssn|999-71-9728",
    ),
    ("Patient", "phone=555-846-1088"),
    ("CarePlan", "condition:missing=false"),
    ("AllergyIntolerance", "criticality=low"),
    ("Organization", "active=true"),
    // _id and _lastUpdated
    (
        "Patient",
        "_id=6c5d9ca9-54d7-42f5-bfae-a7c19cd217f2,58c297c4-d684-4677-8024-01131d93835e",
    ),
    ("Practitioner", "_lastUpdated=ge2000-01-01"),
    // string
    ("Patient", "name=ma"),
    ("Patient", "family=lemke"),
    ("Patient", "given=ramon"),
    ("Patient", "given:exact=Ramón"),
    ("Patient", "given:contains=ari"),
    ("Patient", "address-city=boston,worcester"),
    ("Organization", "name=holyoke"),
    ("Practitioner", "name:contains=rice"),
    ("Observation", "value-string=never"),
    // date
    ("Observation", "date=ge2015-01-01&date=lt2016-01-01"),
    ("Observation", "date=2016"),
    ("Observation", "date=sa2019-06-01"),
    ("Observation", "date=eb2011"),
    ("Encounter", "date=ge2018-01-01&date=le2018-12-31"),
    ("Encounter", "date=2019-05"),
    ("Patient", "birthdate=lt1960"),
    ("Patient", "birthdate=1971-04-05"),
    ("Condition", "onset-date=gt2019-01-01T00:00:00Z"),
    ("Procedure", "date=lt2011-01-01"),
    ("MedicationRequest", "authoredon=2017"),
    ("Claim", "created=ge2019-11"),
    // quantity and number
    ("Observation", "value-quantity=gt100"),
    (
        "Observation",
        "value-quantity=lt30|http://unitsofmeasure.org|kg/m2",
    ),
    (
        "Observation",
        "value-quantity=ge60||/min&value-quantity=le70||/min",
    ),
    ("Observation", "value-quantity=72.0"),
    ("Encounter", "date=ap2019-05-10"),
    // reference
    (
        "Observation",
        "subject=Patient/6c5d9ca9-54d7-42f5-bfae-a7c19cd217f2",
    ),
    (
        "Observation",
        "patient=6c5d9ca9-54d7-42f5-bfae-a7c19cd217f2",
    ),
    (
        "Encounter",
        "subject:Patient=6c5d9ca9-54d7-42f5-bfae-a7c19cd217f2",
    ),
    (
        "Claim",
        "patient=Patient/6c5d9ca9-54d7-42f5-bfae-a7c19cd217f2,Patient/58c297c4-d684-4677-8024-01131d93835e",
    ),
    // :missing
    ("Observation", "value-quantity:missing=true"),
    ("Condition", "abatement-date:missing=true"),
    ("Encounter", "reason-code:missing=false"),
    ("Patient", "deceased:missing=true"),
    ("Patient", "deceased=false"),
    // chains and _has
    ("Observation", "subject:Patient.gender=female&code=8867-4"),
    ("Observation", "patient.birthdate=ge1990"),
    ("Encounter", "service-provider.name=holyoke"),
    ("Encounter", "practitioner.family=rice"),
    ("Patient", "_has:Condition:patient:code=444814009"),
    ("Patient", "_has:Observation:patient:value-quantity=gt200"),
];

fn query_table_impl(resources: &[serde_json::Value]) {
    let (store, stored) = support::load_store(resources);
    let oracle = support::oracle::Oracle::new(&stored);
    let mut non_empty = 0;
    let mut failures = Vec::new();
    for (ty, q) in QUERIES {
        let expected = oracle.ids(ty, q);
        // small pages so that keyset paging is exercised
        let got: Vec<String> = support::search_ids(&*store, ty, &format!("{q}&_count=997"))
            .unwrap_or_else(|e| panic!("{ty}?{q}: {e}"));
        let got_set: BTreeSet<String> = got.iter().cloned().collect();
        assert_eq!(
            got.len(),
            got_set.len(),
            "{ty}?{q}: duplicate ids across pages"
        );
        if got_set != expected {
            failures.push(format!(
                "{ty}?{q}: index {} vs oracle {} (only index: {:?}; only oracle: {:?})",
                got_set.len(),
                expected.len(),
                got_set.difference(&expected).take(3).collect::<Vec<_>>(),
                expected.difference(&got_set).take(3).collect::<Vec<_>>()
            ));
        }
        if !expected.is_empty() {
            non_empty += 1;
        }
        // The export predicate agrees (chains and _has are not allowed in _typeFilter).
        if !q.contains('.') && !q.contains("_has") {
            let p = Predicate::compile(ty, q).unwrap_or_else(|e| panic!("{ty}?{q}: {e}"));
            let by_predicate: BTreeSet<String> = stored
                .iter()
                .filter(|r| p.matches(r))
                .map(|r| r["id"].as_str().unwrap_or_default().to_string())
                .collect();
            if by_predicate != expected {
                failures.push(format!(
                    "predicate {ty}?{q}: {} vs oracle {}",
                    by_predicate.len(),
                    expected.len()
                ));
            }
        }
        eprintln!("{:>6}  {ty}?{q}", expected.len());
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(QUERIES.len() >= 40);
    assert!(
        non_empty >= 55,
        "only {non_empty} queries select anything: the table must test something"
    );
}

#[test]
fn query_table_matches_brute_force() {
    let resources = support::synthea::load();
    assert!(resources.len() > 38_000, "the whole data set is loaded");
    assert!(resources.iter().any(|r| r["id"] == PATIENT));
    query_table_impl(&resources);
}
