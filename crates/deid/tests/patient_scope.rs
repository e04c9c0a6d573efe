//! `dateShiftScope: "patient"` (our extension): every resource of a patient's compartment is
//! shifted by the patient's amount, so intervals within a patient survive exactly; resources
//! outside any compartment keep the reference's `resource` scope; both walkers agree.

use chrono::NaiveDate;
use deid::{Engine, transforms};
use serde_json::{Value as Json, json};

fn config(scope: &str) -> String {
    json!({"fhirVersion": "R4", "fhirPathRules": [
        {"path": "Resource.id", "method": "cryptoHash"},
        {"path": "nodesByType('Reference').reference", "method": "cryptoHash"},
        {"path": "nodesByType('date')", "method": "dateShift"},
        {"path": "nodesByType('dateTime')", "method": "dateShift"},
        {"path": "nodesByType('Period')", "method": "dateShift"}
    ], "parameters": {"dateShiftKey": "date-key", "cryptoHashKey": "hash-key",
        "dateShiftScope": scope}})
    .to_string()
}

fn engines(scope: &str) -> [Engine; 2] {
    let today = NaiveDate::from_ymd_opt(2026, 1, 1).unwrap();
    let e = Engine::from_config_text(&config(scope))
        .unwrap()
        .with_today(today);
    [e.clone(), e.rule_by_rule()]
}

fn day(s: &str) -> NaiveDate {
    NaiveDate::parse_from_str(&s[..10], "%Y-%m-%d").unwrap()
}

/// Two patient ids whose shifts differ (the shift is one of 101 values).
const P1: &str = "patient-one";
const P2: &str = "patient-two";

fn resources(p: &str) -> Vec<Json> {
    vec![
        json!({"resourceType": "Patient", "id": p, "birthDate": "1980-03-01"}),
        json!({"resourceType": "Encounter", "id": format!("{p}-enc"), "status": "finished",
            "class": {"code": "AMB"}, "subject": {"reference": format!("Patient/{p}")},
            "period": {"start": "2020-03-01T10:00:00Z", "end": "2020-03-04T11:00:00Z"}}),
        json!({"resourceType": "Condition", "id": format!("{p}-cond"),
            "subject": {"reference": format!("Patient/{p}")}, "recordedDate": "2021-07-15",
            "contained": [{"resourceType": "Observation", "id": "c1", "status": "final",
                "code": {"text": "x"}, "effectiveDateTime": "2021-07-10"}]}),
    ]
}

/// Days each date moved, per resource.
fn shifts(engine: &Engine, input: &[Json]) -> Vec<i64> {
    let mut out = Vec::new();
    for r in input {
        let o = engine.anonymize(r.clone()).unwrap().resource;
        let pairs = [
            ("birthDate", r["birthDate"].clone(), o["birthDate"].clone()),
            (
                "start",
                r["period"]["start"].clone(),
                o["period"]["start"].clone(),
            ),
            (
                "end",
                r["period"]["end"].clone(),
                o["period"]["end"].clone(),
            ),
            (
                "recorded",
                r["recordedDate"].clone(),
                o["recordedDate"].clone(),
            ),
            (
                "contained",
                r["contained"][0]["effectiveDateTime"].clone(),
                o["contained"][0]["effectiveDateTime"].clone(),
            ),
        ];
        for (what, a, b) in pairs {
            if let (Some(a), Some(b)) = (a.as_str(), b.as_str()) {
                assert_ne!(a, b, "{what} shifted");
                out.push((day(b) - day(a)).num_days());
            }
        }
    }
    out
}

#[test]
fn a_patients_resources_share_one_shift_and_patients_differ() {
    assert_ne!(
        transforms::patient_shift_offset("date-key", P1),
        transforms::patient_shift_offset("date-key", P2),
        "pick ids with different shifts"
    );
    for engine in engines("patient") {
        let one = shifts(&engine, &resources(P1));
        let two = shifts(&engine, &resources(P2));
        assert_eq!(one.len(), 5);
        assert!(
            one.iter().all(|d| *d == one[0]),
            "one shift for P1: {one:?}"
        );
        assert!(
            two.iter().all(|d| *d == two[0]),
            "one shift for P2: {two:?}"
        );
        assert_eq!(one[0], transforms::patient_shift_offset("date-key", P1));
        assert_ne!(one[0], two[0]);
        // Age at the encounter survives exactly.
        let p = engine.anonymize(resources(P1)[0].clone()).unwrap().resource;
        let e = engine.anonymize(resources(P1)[1].clone()).unwrap().resource;
        assert_eq!(
            day(e["period"]["start"].as_str().unwrap()) - day(p["birthDate"].as_str().unwrap()),
            day("2020-03-01") - day("1980-03-01")
        );
    }
    // With the reference's `resource` scope the same resources move by different amounts.
    let [plain, _] = engines("resource");
    let one = shifts(&plain, &resources(P1));
    assert!(one.iter().any(|d| *d != one[0]), "{one:?}");
}

#[test]
fn outside_any_compartment_resource_scope_applies() {
    let org = json!({"resourceType": "Organization", "id": "org-1",
        "extension": [{"url": "http://x", "valueDate": "2020-01-01"}]});
    let [patient, _] = engines("patient");
    let [resource, _] = engines("resource");
    assert_eq!(
        patient.anonymize(org.clone()).unwrap().resource,
        resource.anonymize(org).unwrap().resource
    );
    // A Group of several patients has no single patient either.
    let group = json!({"resourceType": "Group", "id": "g", "type": "person", "actual": true,
        "member": [{"entity": {"reference": "Patient/a"}, "period": {"start": "2020-01-01"}},
                   {"entity": {"reference": "Patient/b"}}]});
    assert_eq!(
        patient.anonymize(group.clone()).unwrap().resource,
        resource.anonymize(group).unwrap().resource
    );
}

#[test]
fn bundle_entries_take_their_own_patients_through_full_urls() {
    let entry = |url: &str, r: Json| json!({"fullUrl": url, "resource": r});
    let bundle = json!({"resourceType": "Bundle", "id": "b", "type": "collection", "entry": [
        entry("urn:uuid:a", json!({"resourceType": "Patient", "id": P1, "birthDate": "1980-03-01"})),
        entry("urn:uuid:b", json!({"resourceType": "Patient", "id": P2, "birthDate": "1980-03-01"})),
        entry("urn:uuid:c", json!({"resourceType": "Encounter", "id": "e", "status": "finished",
            "class": {"code": "AMB"}, "subject": {"reference": "urn:uuid:b"},
            "period": {"start": "1990-03-01"}})),
    ]});
    for engine in engines("patient") {
        let out = engine.anonymize(bundle.clone()).unwrap().resource;
        let b1 = day(out["entry"][0]["resource"]["birthDate"].as_str().unwrap());
        let b2 = day(out["entry"][1]["resource"]["birthDate"].as_str().unwrap());
        let enc = day(out["entry"][2]["resource"]["period"]["start"]
            .as_str()
            .unwrap());
        assert_ne!(b1, b2);
        // The Encounter belongs to P2: its interval to P2's birth survives.
        assert_eq!(
            (enc - b2).num_days(),
            (day("1990-03-01") - day("1980-03-01")).num_days()
        );
        // Same shifts as the resources alone (NDJSON) get.
        let alone = engine
            .anonymize(json!({"resourceType": "Patient", "id": P2, "birthDate": "1980-03-01"}))
            .unwrap()
            .resource;
        assert_eq!(alone["birthDate"].as_str().map(day), Some(b2));
    }
}

#[test]
fn fixed_offsets_still_win() {
    let text = config("patient").replace(
        "\"dateShiftScope\":\"patient\"",
        "\"dateShiftScope\":\"patient\",\"dateShiftFixedOffsetInDays\":7",
    );
    let e = Engine::from_config_text(&text).unwrap();
    let out = e.anonymize(resources(P1)[0].clone()).unwrap().resource;
    assert_eq!(out["birthDate"], "1980-03-08");
}
