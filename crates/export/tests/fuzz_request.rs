//! Property tests (fuzzing) of the `$export` kick-off parameter parser: query pairs and POST
//! Parameters bodies built from the real parameter names and value shapes (type lists,
//! instants, `_typeFilter` queries, containers, patient references, `_elements`,
//! `includeAssociatedData`, the anonymization parameters), plus hostile ones (long lists and
//! values, odd JSON in Parameters). Properties: never a panic; an accepted request keeps the
//! documented invariants; the same parameters sent as a GET query or as a POST Parameters body
//! parse to the same request.
//!
//! `PROPTEST_CASES` sets the cases per property, `FUZZ_SCALE` multiplies the small defaults
//! below (CI runs them as they are; the long run is `scripts/fuzz-long.sh`). Failures are not persisted: a failing case is printed, minimized, and
//! becomes a named regression test.

use export::request::{parameters_to_pairs, valid_config_name, valid_container};
use export::{ExportLevel, ExportRequest};
use proptest::prelude::*;
use proptest::test_runner::Config;
use serde_json::{Value, json};

fn config(default_cases: u32) -> Config {
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
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

const NOW_MS: i64 = 1_800_000_000_000;

fn instant() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,9})?(Z|[+-][0-9]{2}:[0-9]{2})".prop_map(|s| s),
        "[0-9]{1,5}(-[0-9]{1,2}(-[0-9]{1,2})?)?".prop_map(|s| s),
        Just("2020-01-01".to_string()),
        Just("2099-01-01T00:00:00Z".to_string()),
        Just("+275760-09-13T00:00:00Z".to_string()),
        Just("ééééé".to_string()),
        Just("20é0-01-0".to_string()),
        "\\PC{0,12}".prop_map(|s| s),
    ]
}

fn type_filter() -> impl Strategy<Value = String> {
    (
        prop::sample::select(
            &[
                "Patient",
                "Observation",
                "Condition",
                "Encounter",
                "Nope",
                "",
            ][..],
        ),
        prop::sample::select(
            &[
                "?",
                "",
                "?code=1",
                "?status=final,amended",
                "?date=ge2020",
                "?_lastUpdated=gt2020-01-01",
                "?subject.name=x",
                "?_has:Observation:patient:code=1",
                "?_sort=date",
                "?code:not=x",
                "?value-quantity=lt5|http://unitsofmeasure.org|mg",
                "?gender=female&birthdate=le2000",
                "?%zz=%",
                "?code=a\\,b",
                "??",
                "?=&=&",
            ][..],
        ),
        "\\PC{0,8}",
    )
        .prop_map(|(t, q, tail)| format!("{t}{q}{tail}"))
}

fn value_for(name: &str) -> BoxedStrategy<String> {
    match name {
        "_type" => prop::collection::vec(
            prop::sample::select(
                &[
                    "Patient",
                    "Observation",
                    "Group",
                    "Nope",
                    "",
                    " Condition ",
                    "patient",
                ][..],
            ),
            0..6,
        )
        .prop_map(|v| v.join(","))
        .boxed(),
        "_since" | "_until" | "_till" => instant().boxed(),
        "_typeFilter" => type_filter().boxed(),
        "_outputFormat" => prop::sample::select(
            &[
                "application/fhir+ndjson",
                "application/fhir ndjson",
                "ndjson",
                "text/csv",
                "",
            ][..],
        )
        .prop_map(str::to_string)
        .boxed(),
        "_container" => prop_oneof![
            "[a-z0-9-]{0,70}".prop_map(|s| s),
            Just("ab".to_string()),
            Just("a--b".to_string()),
            Just("Abc".to_string()),
        ]
        .boxed(),
        "patient" => prop_oneof![
            "(Patient/)?[A-Za-z0-9.-]{0,70}".prop_map(|s| s),
            Just("Patient/".to_string()),
            Just("Observation/1".to_string()),
            "\\PC{0,12}".prop_map(|s| s),
        ]
        .boxed(),
        "_elements" => prop::collection::vec(
            prop::sample::select(
                &[
                    "id",
                    "Patient.name",
                    "Nope.x",
                    "a.b.c",
                    "",
                    "na-me",
                    "Observation.value[x]",
                ][..],
            ),
            0..5,
        )
        .prop_map(|v| v.join(","))
        .boxed(),
        "includeAssociatedData" => prop::collection::vec(
            prop::sample::select(
                &[
                    "LatestProvenanceResources",
                    "RelevantProvenanceResources",
                    "_x",
                    "",
                ][..],
            ),
            0..3,
        )
        .prop_map(|v| v.join(","))
        .boxed(),
        "_anonymizationConfig" => prop_oneof![
            Just("config.json".to_string()),
            Just("dir/config.json".to_string()),
            Just("../secret".to_string()),
            Just("/abs".to_string()),
            Just("a\\b".to_string()),
            Just("a//b".to_string()),
            (1usize..1200).prop_map(|n| "a".repeat(n)),
            "\\PC{0,16}".prop_map(|s| s),
        ]
        .boxed(),
        "_anonymizationConfigEtag" => {
            prop::sample::select(&["\"0x8D\"", "\"\"", "  ", "W/\"1\"", "abc"][..])
                .prop_map(str::to_string)
                .boxed()
        }
        _ => "\\PC{0,16}".prop_map(|s| s).boxed(),
    }
}

const NAMES: &[&str] = &[
    "_type",
    "_since",
    "_until",
    "_till",
    "_typeFilter",
    "_outputFormat",
    "_container",
    "patient",
    "_elements",
    "includeAssociatedData",
    "_anonymizationConfig",
    "_anonymizationConfigEtag",
    "_anonymizationConfigCollectionReference",
    "_format",
    "_count",
    "unknown",
];

fn pairs() -> impl Strategy<Value = Vec<(String, String)>> {
    prop::collection::vec(
        prop::sample::select(NAMES).prop_flat_map(|n| (Just(n.to_string()), value_for(n))),
        0..8,
    )
}

fn level() -> impl Strategy<Value = ExportLevel> {
    prop_oneof![
        Just(ExportLevel::System),
        Just(ExportLevel::Patient),
        "[a-z0-9-]{1,12}".prop_map(ExportLevel::Group),
    ]
}

/// The invariants of an accepted request.
fn check_accepted(
    r: &ExportRequest,
    pairs: &[(String, String)],
    is_post: bool,
) -> Result<(), TestCaseError> {
    let model = fhir_model::r4();
    for t in &r.types {
        prop_assert!(model.is_resource(t), "{t}");
    }
    let mut dedup = r.types.clone();
    dedup.sort();
    dedup.dedup();
    prop_assert_eq!(dedup.len(), r.types.len());
    if let Some(s) = r.since_ms {
        prop_assert!(s <= NOW_MS);
        // A window that cannot hold a resource is refused, not exported empty.
        prop_assert!(r.until_ms.is_none_or(|u| s <= u));
    }
    if let Some(c) = &r.container {
        prop_assert!(valid_container(c), "{c}");
    }
    for p in &r.patients {
        prop_assert!(is_post && r.level != ExportLevel::System);
        prop_assert!(store::is_valid_id(p), "{p}");
    }
    for (t, e) in &r.elements {
        prop_assert!(t.as_deref().is_none_or(|t| model.is_resource(t)));
        prop_assert!(
            !e.is_empty() && e.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
            "{e}"
        );
    }
    if let Some(a) = &r.anonymization {
        prop_assert!(valid_config_name(&a.config));
        prop_assert!(r.container.is_some());
        prop_assert!(!(a.etag.is_some() && a.collection.is_some()));
    }
    prop_assert_eq!(
        r.type_filters.len() <= pairs.iter().filter(|(n, _)| n == "_typeFilter").count(),
        true
    );
    Ok(())
}

/// The same pairs as a POST Parameters body, values as `valueString` (patients as
/// `valueReference`).
fn as_parameters(pairs: &[(String, String)]) -> Value {
    let params: Vec<Value> = pairs
        .iter()
        .map(|(n, v)| {
            if n == "patient" {
                json!({"name": n, "valueReference": {"reference": v}})
            } else {
                json!({"name": n, "valueString": v})
            }
        })
        .collect();
    json!({"resourceType": "Parameters", "parameter": params})
}

fn odd_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|i| json!(i)),
        Just(serde_json::from_str::<Value>("1.50").unwrap()),
        "\\PC{0,8}".prop_map(Value::String),
        prop::sample::select(NAMES).prop_map(|n| json!(n)),
    ];
    leaf.prop_recursive(4, 32, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec(
                (
                    prop::sample::select(
                        &[
                            "name",
                            "valueString",
                            "valueInteger",
                            "valueReference",
                            "reference",
                            "part",
                            "value",
                            "resourceType",
                            "parameter"
                        ][..]
                    ),
                    inner
                ),
                0..4
            )
            .prop_map(|kv| Value::Object(
                kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
            )),
        ]
    })
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn query_pairs_never_panic_and_accepted_requests_are_valid(
        level in level(),
        pairs in pairs(),
        is_post in any::<bool>(),
        lenient in any::<bool>(),
    ) {
        if let Ok(r) = ExportRequest::parse(level, &pairs, is_post, lenient, NOW_MS, "http://x/$export".into()) {
            check_accepted(&r, &pairs, is_post)?;
        }
    }

    /// A GET query and a POST Parameters body with the same parameters parse alike (`patient`,
    /// accepted only in a POST, left out).
    #[test]
    fn get_and_post_parse_alike(level in level(), pairs in pairs(), lenient in any::<bool>()) {
        let pairs: Vec<_> = pairs.into_iter().filter(|(n, _)| n != "patient").collect();
        let body = as_parameters(&pairs);
        let from_body = parameters_to_pairs(&body);
        prop_assert_eq!(from_body.as_ref(), Ok(&pairs));
        let get = ExportRequest::parse(level.clone(), &pairs, false, lenient, NOW_MS, String::new());
        let post = ExportRequest::parse(level, &from_body.unwrap(), true, lenient, NOW_MS, String::new());
        prop_assert_eq!(format!("{get:?}"), format!("{post:?}"));
    }

    #[test]
    fn odd_parameters_bodies_never_panic(body in odd_json(), wrap in any::<bool>(), level in level()) {
        let body = if wrap {
            json!({"resourceType": "Parameters", "parameter": body})
        } else {
            body
        };
        if let Ok(pairs) = parameters_to_pairs(&body) {
            let _ = ExportRequest::parse(level, &pairs, true, false, NOW_MS, String::new());
        }
    }
}

proptest! {
    #![proptest_config(config(32))]

    /// Long lists and values.
    #[test]
    fn hostile_parameters_never_panic(
        name in prop::sample::select(NAMES),
        piece in prop::sample::select(&["Patient,", "Observation?code=1&", "a", ",", "%", "é", "Patient.name,"][..]),
        n in prop_oneof![1usize..10, 1000usize..50_000],
        level in level(),
    ) {
        let pairs = vec![(name.to_string(), piece.repeat(n))];
        let _ = ExportRequest::parse(level.clone(), &pairs, true, true, NOW_MS, String::new());
        let many: Vec<(String, String)> = (0..n.min(5000)).map(|i| (name.to_string(), format!("{piece}{i}"))).collect();
        let _ = ExportRequest::parse(level, &many, true, true, NOW_MS, String::new());
    }
}
