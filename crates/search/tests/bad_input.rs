//! No panics on any input: arbitrary parameter names and values, and resources of odd shapes.

use proptest::prelude::*;
use search::{ParseOptions, Predicate, parse_query, parse_query_string};
use serde_json::json;

const NAMES: &[&str] = &[
    "code",
    "date",
    "value-quantity",
    "subject",
    "subject:Patient.name",
    "patient.birthdate",
    "_has:Observation:patient:code",
    "_sort",
    "_count",
    "_include",
    "_id",
    "_lastUpdated",
    "code:not",
    "code:text",
    "status:missing",
    "value-string:exact",
    "focus",
    "combo-code",
];

proptest! {
    #[test]
    fn parsing_never_panics(
        name in prop::sample::select(NAMES),
        suffix in "[a-z:.|,\\\\$é -]{0,6}",
        value in "[a-z0-9:.|,\\\\$é+%T -]{0,24}",
        lenient in any::<bool>(),
    ) {
        let pairs = vec![(format!("{name}{suffix}"), value.clone())];
        let _ = parse_query("Observation", &pairs, ParseOptions { lenient, predicate_only: false });
        let _ = Predicate::compile("Observation", &format!("{name}={value}"));
        let _ = parse_query_string(&value);
    }

    #[test]
    fn matching_odd_resources_never_panics(
        v in prop_oneof![Just(json!(1)), Just(json!("x")), Just(json!(null)), Just(json!([1, {"a": 2}])), Just(json!({"coding": "no"}))],
        key in prop::sample::select(&["code", "effectiveDateTime", "valueQuantity", "subject", "effectivePeriod", "category", "meta"][..]),
        query in prop::sample::select(&["code=a", "date=ge2020", "value-quantity=gt1", "subject=Patient/1", "category:text=x", "_lastUpdated=lt2020", "code:missing=true"][..]),
    ) {
        let mut r = json!({"resourceType": "Observation", "id": "1"});
        r[key] = v;
        let p = Predicate::compile("Observation", query).unwrap();
        let _ = p.matches(&r);
        let _ = store::Indexer::entries(&search::SearchIndexer, "Observation", &r);
    }
}
